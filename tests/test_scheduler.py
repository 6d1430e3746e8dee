"""Tests for rigl_func.RigLScheduler, the rigl-torch 0.5.2 compatible shell.

rigl-torch's guarantees, ported to our code (issue 3, items 1-5): exact initial nnz
per layer, inactive weights / gradients / optimizer moments exactly zero after every
step, exact resume from a checkpoint saved anywhere (inside an accumulation window,
right before and right after an update), plus argument errors and ``__str__``.
DDP is in ``test_scheduler_ddp.py``, the differential test against rigl-torch itself
in ``test_scheduler_rigl_torch.py``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rigl_func import RigLConfig, RigLScheduler, accumulate, nnz_for, target_nnz, update_topology

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only add overhead (8x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- models
class MyLinear(nn.Linear):
    """A Linear subclass: must be sparsified like nn.Linear."""


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), MyLinear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(nn.Module):
    """ResNet-18's structure at toy width, so coverage never depends on torchvision."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18() -> nn.Module:
    tv = pytest.importorskip("torchvision", reason="torchvision not installed (the 'vision' extra): resnet18 case skipped")
    return tv.models.resnet18(num_classes=5)


MODELS = {"mlp": mlp, "cnn_bn": cnn_bn, "tiny_resnet": TinyResNet, "resnet18": resnet18}


def batch(kind: str, t: int, device="cpu"):
    """Deterministic batch number ``t`` (so a resumed run sees the same data)."""
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(8, 20, generator=g) if kind == "mlp" else torch.randn(4, 3, 8, 8, generator=g)
    if kind == "resnet18":
        x = torch.randn(2, 3, 32, 32, generator=g)
    y = torch.randint(0, 5, (x.shape[0],), generator=g)
    return x.to(device), y.to(device)


def make_opt(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)


def build(kind="mlp", opt="sgd", *, seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    model = MODELS[kind]().to(device)
    optimizer = make_opt(opt, model)
    args = dict(dense_allocation=0.2, T_end=30, delta=4, ignore_linear_layers=False)
    args.update(kw)
    return model, optimizer, RigLScheduler(model, optimizer, **args)


def train_step(kind, model, opt, pruner, t, device="cpu") -> bool:
    x, y = batch(kind, t, device)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    took = pruner()
    if took:
        opt.step()
    return took


def moments(opt, p):
    return [v for v in opt.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]


# --------------------------------------------------------------------------- item 1
# Hand-computed: uniform keeps the first layer dense; nnz = numel - floor(0.8 * numel)
# (google-research/rigl's count).
#   mlp:    640 (dense) | 32*32 = 1024 - floor(819.2) = 205 | 5*32 = 160 - 128 = 32
#   cnn_bn: 3*8*9 = 216 (dense) | 8*16*9 = 1152 - floor(921.6) = 231 | 16*5 = 80 - 64 = 16
#   tiny_resnet: conv1 216 dense | 8*8*9 = 576 - floor(460.8) = 116 (layer1 conv1/2),
#     layer2.conv1 is 16*8*9 = 1152 -> 231, layer2.conv2 16*16*9 = 2304 - floor(1843.2)
#     = 461, downsample 16*8 = 128 - floor(102.4) = 26, fc 80 -> 16
INITIAL = {
    ("mlp", False): {"0.weight": None, "2.weight": 205, "4.weight": 32},
    ("mlp", True): {"0.weight": None, "2.weight": None, "4.weight": None},
    ("cnn_bn", False): {"0.weight": None, "3.weight": 231, "8.weight": 16},
    ("cnn_bn", True): {"0.weight": None, "3.weight": 231, "8.weight": None},
    ("tiny_resnet", False): {"conv1.weight": None, "layer1.conv1.weight": 116, "layer1.conv2.weight": 116,
                             "layer2.conv1.weight": 231, "layer2.conv2.weight": 461,
                             "layer2.downsample.0.weight": 26, "fc.weight": 16},
}


@pytest.mark.parametrize("kind,ignore_linear", sorted(INITIAL))
def test_initial_nnz_per_layer_exact(kind, ignore_linear):
    model, _, pruner = build(kind, ignore_linear_layers=ignore_linear)
    expected = INITIAL[(kind, ignore_linear)]
    assert pruner.layer_names == list(expected)
    params = dict(model.named_parameters())
    for name, mask, w, s in zip(pruner.layer_names, pruner.backward_masks, pruner.W, pruner.S):
        assert w is params[name]
        if expected[name] is None:
            assert mask is None and s == 0.0
            assert int((w != 0).sum()) == w.numel()  # dense layers are untouched
        else:
            assert int(mask.sum()) == expected[name] and s == pytest.approx(0.8)
            assert torch.all(w[~mask] == 0) and int((w != 0).sum()) == expected[name]
    assert pruner.N == [w.numel() for w in pruner.W]


def test_initial_nnz_erk_matches_budget():
    model, _, pruner = build("tiny_resnet", sparsity_distribution="erk", dense_allocation=0.1)
    shapes = {n: tuple(w.shape) for n, w in zip(pruner.layer_names, pruner.W)}
    counts = {n: int(m.sum()) for n, m in zip(pruner.layer_names, pruner.backward_masks)}
    assert counts == target_nnz(shapes, RigLConfig(t_end=30, delta=4, sparsity=0.9, distribution="erk"))
    assert sum(counts.values()) == pytest.approx(0.1 * sum(pruner.N), abs=len(counts))
    assert all(m is not None for m in pruner.backward_masks)  # ERK does not force the first layer dense


def test_resnet18_initial_nnz():
    model, _, pruner = build("resnet18", dense_allocation=0.1)
    assert len(pruner.W) == 21 and pruner.backward_masks[0] is None  # 20 convs + fc; conv1 dense
    for mask, n in zip(pruner.backward_masks[1:], pruner.N[1:]):
        assert int(mask.sum()) == nnz_for(n, 0.9)


def test_dense_allocation_one_is_dense():
    model, opt, pruner = build("mlp", dense_allocation=1)
    assert pruner.backward_masks == [None, None, None] and pruner.S == [0.0, 0.0, 0.0]
    for t in range(6):
        assert train_step("mlp", model, opt, pruner, t) is True


def test_layer_selection():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.c1 = nn.Conv1d(4, 4, 3)
            self.c3 = nn.Conv3d(1, 2, 2)
            self.ct = nn.ConvTranspose2d(2, 2, 2)
            self.bn1, self.bn2 = nn.BatchNorm1d(4), nn.BatchNorm2d(2)
            self.ln, self.gn = nn.LayerNorm(4), nn.GroupNorm(1, 2)
            self.fc = MyLinear(4, 3)

    net = Net()
    pruner = RigLScheduler(net, torch.optim.SGD(net.parameters(), lr=0.1), dense_allocation=0.5, T_end=10,
                           delta=3, sparsity_distribution="erk", ignore_linear_layers=False)
    assert pruner.layer_names == ["c1.weight", "c3.weight", "ct.weight", "fc.weight"]
    pruner.remove()
    pruner = RigLScheduler(net, torch.optim.SGD(net.parameters(), lr=0.1), dense_allocation=0.5, T_end=10,
                           delta=3, sparsity_distribution="erk")  # rigl-torch default: Linear stays dense
    assert pruner.backward_masks[-1] is None and pruner.backward_masks[0] is not None


# --------------------------------------------------------------------------- items 2-4
# Every optimizer x topology on the small models; torchvision's resnet18 (11M weights,
# ~10x slower per step on CPU) on two representative combinations to keep CI short.
INVARIANT_CASES = [
    pytest.param(kind, opt_name, static, id=f"{kind}-{opt_name}-{'static' if static else 'rigl'}")
    for kind in ("mlp", "cnn_bn", "tiny_resnet")
    for opt_name in ("sgd", "adam", "adamw")
    for static in (False, True)
] + [
    pytest.param("resnet18", "sgd", False, id="resnet18-sgd-rigl"),
    pytest.param("resnet18", "adamw", True, id="resnet18-adamw-static"),
]


@pytest.mark.parametrize("kind,opt_name,static", INVARIANT_CASES)
def test_invariants_every_step(kind, opt_name, static):
    model, opt, pruner = build(kind, opt_name, static_topo=static, T_end=18)
    n0 = [None if m is None else int(m.sum()) for m in pruner.backward_masks]
    first = [None if m is None else m.clone() for m in pruner.backward_masks]
    changed = False
    for t in range(22):
        took = train_step(kind, model, opt, pruner, t)
        step = t + 1
        assert pruner.step == step
        assert took is (static or not (step % 4 == 0 and step < 18))
        for name, w, mask in zip(pruner.layer_names, pruner.W, pruner.backward_masks):
            if mask is None:
                continue
            assert int(mask.sum()) == n0[pruner.layer_names.index(name)]
            assert torch.all(w[~mask] == 0), f"{name}: inactive weight nonzero at step {step}"
            assert torch.all(w.grad[~mask] == 0), f"{name}: inactive grad nonzero at step {step}"
            for m in moments(opt, w):
                assert torch.all(m[~mask] == 0), f"{name}: optimizer state nonzero at step {step}"
        changed |= any(m is not None and not torch.equal(m, f) for m, f in zip(pruner.backward_masks, first))
    assert pruner.rigl_steps == (0 if static else 4)  # updates at 4, 8, 12, 16
    assert changed is not static


@pytest.mark.parametrize("device", DEVICES)
def test_invariants_on_device(device):
    model, opt, pruner = build("mlp", "adam", device=device, grad_accumulation_n=2)
    for t in range(9):
        train_step("mlp", model, opt, pruner, t, device)
        for w, mask in zip(pruner.W, pruner.backward_masks):
            if mask is not None:
                assert mask.device == w.device and torch.all(w[~mask] == 0) and torch.all(w.grad[~mask] == 0)
    assert pruner.rigl_steps == 2 and pruner.state.step.item() == 9


def test_grads_masked_after_backward_except_where_an_update_needs_them():
    """The hook masks right after backward, except on the grad_accumulation_n iterations
    feeding an update; there the dense grad is read lazily in __call__, then masked."""
    model, opt, pruner = build("mlp", grad_accumulation_n=2, delta=5)
    for t in range(11):
        x, y = batch("mlp", t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        w, mask = pruner.W[1], pruner.backward_masks[1]
        dense_now = (t + 1) % 5 in (4, 0)  # iterations 4, 5, 9, 10
        assert bool(torch.any(w.grad[~mask] != 0)) is dense_now, t
        if pruner():
            opt.step()
        assert torch.all(w.grad[~pruner.backward_masks[1]] == 0)


@pytest.mark.parametrize("k", [1, 3])
def test_update_uses_dense_grads_of_the_window(k):
    """Oracle: the core fed by the dense grads recorded here (proves the shell passes
    unmasked, current grads and calls accumulate once per call)."""
    model, opt, pruner = build("mlp", grad_accumulation_n=k, delta=5)
    cfg = pruner.config
    for t in range(10):
        x, y = batch("mlp", t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        names = list(pruner.state.masks)
        params = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n in names}
        expect = accumulate(pruner.state, grads, cfg)
        if (t + 1) % 5 == 0:
            new_params, expect = update_topology(params, grads, expect, cfg)
        took = pruner()
        if took:
            opt.step()
        else:
            for n, p in model.named_parameters():
                if n in names:
                    assert torch.equal(p, new_params[n])
        for n in names:
            assert torch.equal(pruner.state.masks[n], expect.masks[n])
            if k > 1:
                assert torch.equal(pruner.state.grad_acc[n], expect.grad_acc[n])
    assert pruner.rigl_steps == 2 and (k > 1 or pruner.state.grad_acc == {})


def test_none_grad_is_tolerated():
    # Issue 12 (lifecycle item 2): a call without gradients is skipped with a warning,
    # never an update that grows by index.
    model, opt, pruner = build("mlp", delta=3)
    masks = [m.clone() for m in pruner.backward_masks if m is not None]
    for t in range(4):
        opt.zero_grad(set_to_none=True)
        with pytest.warns(UserWarning, match="without a backward"):
            assert pruner() is True  # no backward at all: grads are None
    assert pruner.rigl_steps == 0 and pruner.step == 0
    assert all(torch.equal(a, b) for a, b in zip(masks, [m for m in pruner.backward_masks if m is not None]))


# --------------------------------------------------------------------------- item 5
def _snapshot(model, opt, pruner):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.clone() for m in pruner.backward_masks if m is not None],
            copy.deepcopy(opt.state_dict()["state"]))


def _assert_same(a, b):
    (wa, ma, oa), (wb, mb, ob) = a, b
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(x, y) for x, y in zip(ma, mb)) and len(ma) == len(mb)
    assert oa.keys() == ob.keys()
    for i in oa:
        assert all(torch.equal(oa[i][k], ob[i][k]) for k in oa[i])


@pytest.mark.parametrize("resume", ["ctor", "load_state_dict"])
@pytest.mark.parametrize("stop", [6, 7, 8], ids=["in_window", "before_update", "after_update"])
@pytest.mark.parametrize("opt_name,static", [("sgd", False), ("adam", False), ("sgd", True)])
def test_checkpoint_resume_is_bitwise_exact(tmp_path, stop, resume, opt_name, static):
    kind, total = "cnn_bn", 14
    kw = dict(grad_accumulation_n=3, static_topo=static)  # updates at 4, 8, 12; windows {2,3,4}, {6,7,8}, ...
    model, opt, pruner = build(kind, opt_name, **kw)
    for t in range(total):
        train_step(kind, model, opt, pruner, t)
    reference = _snapshot(model, opt, pruner)

    model, opt, pruner = build(kind, opt_name, **kw)
    for t in range(stop):
        train_step(kind, model, opt, pruner, t)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "pruner": pruner.state_dict(), "optimizer": opt.state_dict()}, path)
    del model, opt, pruner

    ckpt = torch.load(path, weights_only=True)
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model = cnn_bn()
    opt = make_opt(opt_name, model)
    if resume == "ctor":
        model.load_state_dict(ckpt["model"])
        pruner = RigLScheduler(model, opt, state_dict=ckpt["pruner"])  # rigl-torch style: args from the checkpoint
    else:
        pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=30, delta=4, ignore_linear_layers=False, **kw)
        pruner.load_state_dict(ckpt["pruner"])
        model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    assert pruner.step == stop and pruner.rigl_steps == (0 if static else stop // 4)
    for t in range(stop, total):
        train_step(kind, model, opt, pruner, t)
    _assert_same(reference, _snapshot(model, opt, pruner))


# --------------------------------------------------------------------------- bad inputs
BAD_ARGS = [
    (dict(dense_allocation=0), ValueError, "dense_allocation"),
    (dict(dense_allocation=1.5), ValueError, "dense_allocation=1.5"),
    (dict(dense_allocation=float("nan")), ValueError, "dense_allocation"),
    (dict(dense_allocation="0.1"), TypeError, "dense_allocation"),
    (dict(T_end=None), ValueError, "T_end is required"),
    (dict(T_end=0), ValueError, "T_end=0"),
    (dict(T_end=10.5), TypeError, "T_end=10.5"),
    (dict(delta=0), ValueError, "delta=0"),
    (dict(delta=2.0), TypeError, "delta=2.0"),
    (dict(grad_accumulation_n=0), ValueError, "grad_accumulation_n=0"),
    (dict(grad_accumulation_n=4), ValueError, r"grad_accumulation_n must be in \[1, delta=4\)"),
    (dict(alpha=1.5), ValueError, "alpha=1.5"),
    (dict(sparsity_distribution="gaussian"), ValueError, "sparsity_distribution='gaussian'"),
    (dict(sparsity_distribution=None), TypeError, "sparsity_distribution=None"),
    (dict(static_topo="yes"), TypeError, "static_topo='yes'"),
    (dict(ignore_linear_layers=1), TypeError, "ignore_linear_layers=1"),
    (dict(seed="0"), TypeError, "seed='0'"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_ARGS)
def test_bad_arguments(kwargs, exc, match):
    model = mlp()
    args = dict(dense_allocation=0.2, T_end=30, delta=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), **args)
    assert all(bool(torch.all(p != 0)) for n, p in model.named_parameters() if n.endswith("weight"))  # untouched


def test_bad_model_and_optimizer():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        RigLScheduler(object(), opt, 0.2, 30, delta=4)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        RigLScheduler(model, "sgd", 0.2, 30, delta=4)
    with pytest.raises(ValueError, match="no Linear or Conv"):
        norm = nn.LayerNorm(4)
        RigLScheduler(norm, torch.optim.SGD(norm.parameters(), lr=0.1), 0.2, 30, delta=4)
    with pytest.raises(ValueError, match="'2.weight' is not in the optimizer"):
        RigLScheduler(model, torch.optim.SGD(model[0].parameters(), lr=0.1), 0.2, 30, delta=4, ignore_linear_layers=False)
    model[2].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="'2.weight' has requires_grad=False"):  # named: cannot be trained sparse
        RigLScheduler(model, opt, 0.2, 30, delta=4, ignore_linear_layers=False, include=(r"^2\.weight$",))
    p = RigLScheduler(model, opt, 0.2, 30, delta=4, ignore_linear_layers=False)  # unnamed: the rule keeps it dense
    assert "2.weight" not in p.state.masks
    p.remove()
    RigLScheduler(model, opt, 0.2, 30, delta=4, ignore_linear_layers=True)  # frozen but dense: fine


def test_model_registered_twice():
    model, opt, pruner = build("mlp")
    with pytest.raises(RuntimeError, match="already registered"):
        RigLScheduler(model, opt, 0.2, 30, delta=4)
    wrapped = nn.Sequential(model)  # a parent module shares the weights
    with pytest.raises(RuntimeError, match="already registered"):
        RigLScheduler(wrapped, opt, 0.2, 30, delta=4)
    clone = copy.deepcopy(model)  # a copy is a different model (hooks are not copied)
    RigLScheduler(clone, torch.optim.SGD(clone.parameters(), lr=0.1), 0.2, 30, delta=4).remove()
    pruner.remove()
    RigLScheduler(model, opt, 0.2, 30, delta=4)


def test_delta_beyond_T_end_warns_with_rigl_torch_names():
    model = mlp()
    with pytest.warns(UserWarning, match="delta=40 >= T_end=30"):
        RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.2, 30, delta=40, ignore_linear_layers=False)
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.2, 30, delta=40, static_topo=True)


def test_state_dict_mismatches_raise_and_leave_state_intact():
    model, opt, pruner = build("mlp")
    for t in range(5):
        train_step("mlp", model, opt, pruner, t)
    sd = pruner.state_dict()
    before = [m.clone() for m in pruner.backward_masks[1:]]

    other, other_opt, other_pruner = build("cnn_bn")
    with pytest.raises(ValueError, match="different model"):
        other_pruner.load_state_dict({**sd, "hyperparams": other_pruner.state_dict()["hyperparams"]})
    with pytest.raises(ValueError, match="delta: scheduler 4 vs state_dict 5"):
        pruner.load_state_dict({**sd, "hyperparams": {**sd["hyperparams"], "delta": 5}})
    bad_masks = dict(sd["masks"])
    bad_masks["4.weight"] = bad_masks["4.weight"].clone().fill_(True)
    with pytest.raises(ValueError, match="active entries"):
        pruner.load_state_dict({**sd, "masks": bad_masks})
    wide = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 33), nn.ReLU(), nn.Linear(33, 5))
    with pytest.raises(ValueError, match="shape"):
        RigLScheduler(wide, torch.optim.SGD(wide.parameters(), lr=0.1), state_dict=sd)
    with pytest.raises(ValueError, match=r"dense_allocation=0.5 \(checkpoint: 0.2\)"):
        RigLScheduler(mlp(), opt, dense_allocation=0.5, state_dict=sd)
    with pytest.raises(ValueError, match="rigl-torch checkpoint"):
        pruner.load_state_dict({"backward_masks": [], "step": 0, "rigl_steps": 0})
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        pruner.load_state_dict([1, 2])
    assert pruner.step == 5 and all(torch.equal(a, b) for a, b in zip(before, pruner.backward_masks[1:]))


def test_state_dict_contents():
    model, opt, pruner = build("mlp", grad_accumulation_n=2, delta=5)
    for t in range(4):
        train_step("mlp", model, opt, pruner, t)
    sd = pruner.state_dict()
    assert sd["step"] == 4 and sd["rigl_steps"] == 0 and sd["layers"] == pruner.layer_names
    assert sorted(sd["masks"]) == ["2.weight", "4.weight"] and sorted(sd["grad_acc"]) == ["2.weight", "4.weight"]
    assert sd["hyperparams"] == dict(dense_allocation=0.2, T_end=30, sparsity_distribution="uniform",
                                     ignore_linear_layers=False, delta=5, alpha=0.3, static_topo=False,
                                     grad_accumulation_n=2, grow="gradient")
    assert torch.any(sd["grad_acc"]["2.weight"] != 0)  # inside the window of step 5


# --------------------------------------------------------------------------- printing
def test_str_summary():
    model, opt, pruner = build("cnn_bn", dense_allocation=0.25, delta=3)
    for t in range(7):
        train_step("cnn_bn", model, opt, pruner, t)
    text = str(pruner)
    assert text.startswith("RigLScheduler(") and text.endswith(")")
    for piece in ["layers=3 (2 sparse)", "sparsity_distribution='uniform'", "dense_allocation=0.25",
                  "T_end=30", "delta=3", "alpha=0.3", "step=7, rigl_steps=2",
                  "0.weight", "3.weight", "8.weight", "288/1152", " 25.00%", "216/216", "100.00%  dense",
                  "20/80", "total_nonzero_params=524/1448 (36.19%)", "total_conv_nonzero_params=504/1368"]:
        assert piece in text, (piece, text)
    assert "rigl_steps=2" in repr(pruner)
    model, opt, pruner = build("mlp")  # no conv layer: rigl-torch's __str__ divides by zero here
    assert "total_conv" not in str(pruner) and "total_nonzero_params=877/1824" in str(pruner)


# --------------------------------------------------------------------------- plumbing
def test_no_monkey_patching_and_remove():
    model, opt, pruner = build("mlp")
    assert "step" not in vars(opt)  # optimizer.step is the optimizer's own method
    pruner.remove()
    w, mask = pruner.W[1], pruner.backward_masks[1]
    x, y = batch("mlp", 0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.any(w.grad[~mask] != 0) and torch.any(w[~mask] != 0)  # hooks are gone


def test_numpy_arguments_and_weights_only_checkpoint(tmp_path):
    np = pytest.importorskip("numpy", reason="numpy not installed")
    model, opt, pruner = build("mlp", dense_allocation=np.float64(0.2), T_end=np.int64(30), alpha=np.float32(0.5))
    train_step("mlp", model, opt, pruner, 0)
    torch.save(pruner.state_dict(), tmp_path / "p.pth")
    sd = torch.load(tmp_path / "p.pth", weights_only=True)
    assert sd["hyperparams"]["alpha"] == 0.5 and type(sd["hyperparams"]["T_end"]) is int
    model2 = mlp()
    model2.load_state_dict(model.state_dict())
    again = RigLScheduler(model2, torch.optim.SGD(model2.parameters(), lr=0.1), state_dict=sd)
    assert again.step == 1 and all(a is None and b is None or torch.equal(a, b)
                                   for a, b in zip(again.backward_masks, pruner.backward_masks))

"""Issue 12, "Lifecycle of a real training script (drop-in RigLScheduler)".

Resuming in every documented order, calls without gradients, GradScaler, copies,
weight tying, parametrized layers, layer rules in the shell, meta models, weights
loaded after the scheduler, dtype changes, checkpoint validation, params dicts with
non-float entries, LBFGS.
"""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import rigl_func as rf
from rigl_func import RigLConfig, RigLScheduler, init_state, sparse_param_names

ROOT = Path(__file__).resolve().parents[1]
KW = dict(dense_allocation=0.3, T_end=35, delta=5, sparsity_distribution="erk", ignore_linear_layers=False)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 6))


def _batch(t: int):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(8, 12, generator=g), torch.randn(8, 6, generator=g)


def _train(model, opt, pruner, steps):
    for t in steps:
        x, y = _batch(t)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if pruner():
            opt.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _load_sched(model, opt, ck):
    p = RigLScheduler(model, opt, **KW)
    p.load_state_dict(ck["pruner"])
    return p


# Every documented resume order; each gets a fresh model (other init), optimizer, scheduler.
ORDERS = {
    "model,opt,scheduler,load": lambda m, o, ck: (m.load_state_dict(ck["model"]), o.load_state_dict(ck["opt"]),
                                                  _load_sched(m, o, ck))[-1],
    "scheduler,model,opt,load": lambda m, o, ck: (lambda p: (m.load_state_dict(ck["model"]),
                                                             o.load_state_dict(ck["opt"]),
                                                             p.load_state_dict(ck["pruner"]), p)[-1])(
        RigLScheduler(m, o, **KW)),
    "scheduler,load,model,opt": lambda m, o, ck: (lambda p: (p.load_state_dict(ck["pruner"]),
                                                             m.load_state_dict(ck["model"]),
                                                             o.load_state_dict(ck["opt"]), p)[-1])(
        RigLScheduler(m, o, **KW)),
    "model,opt,scheduler(state_dict=)": lambda m, o, ck: (m.load_state_dict(ck["model"]),
                                                          o.load_state_dict(ck["opt"]),
                                                          RigLScheduler(m, o, state_dict=ck["pruner"]))[-1],
}


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_resume_is_bitwise_in_every_order(order, opt_name):
    make_opt = {"sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
                "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)}[opt_name]
    ref = _model(0)
    ref_opt = make_opt(ref)
    ref_pruner = RigLScheduler(ref, ref_opt, **KW)
    _train(ref, ref_opt, ref_pruner, range(20))
    ck = _roundtrip({"model": ref.state_dict(), "opt": ref_opt.state_dict(), "pruner": ref_pruner.state_dict()})
    _train(ref, ref_opt, ref_pruner, range(20, 40))

    model = _model(1)
    opt = make_opt(model)
    pruner = ORDERS[order](model, opt, ck)
    _train(model, opt, pruner, range(20, 40))
    assert pruner.rigl_steps == ref_pruner.rigl_steps == 6
    for (n, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
    for a, b in zip(ref_pruner.backward_masks, pruner.backward_masks):
        assert torch.equal(a, b)
    for p, q in zip(ref.parameters(), model.parameters()):
        for k, v in ref_opt.state[p].items():
            assert torch.equal(v, opt.state[q][k]), k


# ------------------------------------------------------------------ item 2
def test_call_without_backward_is_skipped():
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, **KW)
    _train(model, opt, pruner, range(4))
    masks = [m.clone() for m in pruner.backward_masks]
    x, y = _batch(4)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    assert pruner() is False and pruner.rigl_steps == 1  # step 5: update
    moved = [m.clone() for m in pruner.backward_masks]
    assert any(not torch.equal(a, b) for a, b in zip(masks, moved))
    with pytest.warns(UserWarning, match="without a backward"):
        assert pruner() is True  # second call in the same iteration
    assert pruner.step == 5 and pruner.rigl_steps == 1
    opt.zero_grad(set_to_none=True)
    for t in range(5, 10):  # no backward at all, through the next update step (10)
        with pytest.warns(UserWarning, match="without a backward"):
            assert pruner() is True
    assert pruner.step == 5 and pruner.rigl_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(moved, pruner.backward_masks))


# ------------------------------------------------------------------ item 3
@pytest.mark.parametrize("pass_scaler", [True, False])
def test_grad_scaler_usual_pattern(pass_scaler):
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    pruner = RigLScheduler(model, opt, **KW, grad_scaler=scaler if pass_scaler else None)
    ref = _model(0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    ref_pruner = RigLScheduler(ref, ref_opt, **KW)
    for t in range(12):
        x, y = _batch(t)
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if pass_scaler:
            if pruner():
                scaler.step(opt)
            scaler.update()
        else:  # the usual pattern without grad_scaler= fails on a RigL step
            if not pruner():
                with pytest.raises(AssertionError, match="No inf checks"):
                    scaler.update()
                return
            scaler.step(opt)
            scaler.update()
    _train(ref, ref_opt, ref_pruner, range(12))
    assert pruner.rigl_steps == 2
    # Scale 1024 is a power of two: unscaled gradients equal the unscaled run's.
    for a, b in zip(ref_pruner.backward_masks, pruner.backward_masks):
        assert torch.equal(a, b)
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_grad_scaler_inf_gradients_do_not_grow():
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    pruner = RigLScheduler(model, opt, **KW, grad_scaler=scaler)
    _train(model, opt, pruner, range(4))
    masks = [m.clone() for m in pruner.backward_masks]
    opt.zero_grad()
    scaler.scale(model(torch.full((2, 12), 1e38)).sum()).backward()  # overflows: inf/NaN gradients
    assert pruner() is False  # RigL step: unscaled, non-finite entries are never grown
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 16  # the inf check was recorded
    for a, b in zip(masks, pruner.backward_masks):
        assert int(a.sum()) == int(b.sum())


def test_amp_example_smoke():
    for dtype in ("bfloat16", "float16"):
        out = subprocess.run([sys.executable, str(ROOT / "examples" / "amp_train.py"), "--smoke", "--dtype", dtype],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "rigl_steps=" in out.stdout


# ------------------------------------------------------------------ item 4
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_keeps_enforcing_masks(how):
    model = _model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = RigLScheduler(model, opt, **KW)
    _train(model, opt, pruner, range(3))
    if how == "deepcopy":
        m2, o2, p2 = copy.deepcopy((model, opt, pruner))
    else:
        m2, o2, p2 = pickle.loads(pickle.dumps((model, opt, pruner)))
    assert p2.W[0] is m2[0].weight and p2.optimizer is o2
    assert len(o2._optimizer_step_post_hooks) == 1
    x, y = _batch(3)  # iteration 4 does not feed an update: the hook masks at the end of backward
    o2.zero_grad()
    nn.functional.mse_loss(m2(x), y).backward()
    for w, m in zip(p2.W, p2.backward_masks):
        assert torch.all(w.grad[~m] == 0)
    ref = _model(0)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    ref.load_state_dict(model.state_dict())
    ref_opt.load_state_dict(opt.state_dict())
    ref_p = RigLScheduler(ref, ref_opt, state_dict=pruner.state_dict())
    _train(m2, o2, p2, range(3, 12))
    _train(ref, ref_opt, ref_p, range(3, 12))
    assert p2.rigl_steps == 2
    for a, b in zip(ref.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for w, m in zip(p2.W, p2.backward_masks):
        assert torch.all(w[~m] == 0) and torch.all(w.grad[~m] == 0)
    # the original still works and is independent
    _train(model, opt, pruner, range(3, 12))
    assert pruner.rigl_steps == 2


# ------------------------------------------------------------------ item 5
class _Tied(nn.Module):
    def __init__(self, head_first: bool):
        super().__init__()
        if head_first:
            self.head = nn.Linear(8, 20, bias=False)
            self.emb = nn.Embedding(20, 8)
        else:
            self.emb = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight
        self.mid = nn.Linear(8, 8)

    def forward(self, idx):
        return self.head(self.mid(self.emb(idx)))


@pytest.mark.parametrize("head_first", [False, True])
def test_weight_tied_to_embedding_stays_dense(head_first):
    model = _Tied(head_first)
    assert sparse_param_names(model) == ["mid.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, dense_allocation=0.3, T_end=20, delta=5, ignore_linear_layers=False,
                           sparsity_distribution="erk")
    assert list(pruner.state.masks) == ["mid.weight"]
    assert int((model.emb.weight == 0).sum()) == 0


# ------------------------------------------------------------------ item 6
def test_parametrized_layers_warn_and_error_names_them():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    with pytest.warns(UserWarning, match=r"\['0'\] have a parametrized weight"):
        assert sparse_param_names(model) == ["2.weight"]
    torch.nn.utils.parametrizations.spectral_norm(model[2])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="parametrized"), pytest.raises(ValueError, match=r"\['0', '2'\] have a parametrized"):
        RigLScheduler(model, opt, dense_allocation=0.3, T_end=20, ignore_linear_layers=False)


# ------------------------------------------------------------------ item 7
def test_layer_rules_in_the_shell_keep_a_frozen_conv_dense():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    kw = dict(dense_allocation=0.3, T_end=20, delta=5, sparsity_distribution="erk", ignore_linear_layers=False)
    # the one sparsity rule (issue 18): a frozen weight stays dense unless named; named, the
    # shell cannot train it sparse and says so
    p0 = RigLScheduler(model, opt, **kw)
    assert list(p0.state.masks) == ["2.weight", "4.weight"]
    p0.remove()
    with pytest.raises(ValueError, match="requires_grad=False"):
        RigLScheduler(model, opt, **kw, include=("^0\\.weight$",))
    pruner = RigLScheduler(model, opt, **kw, dense=("0.weight",))
    assert list(pruner.state.masks) == ["2.weight", "4.weight"]
    sd = _roundtrip(pruner.state_dict())
    pruner.remove()
    p2 = RigLScheduler(model, opt, state_dict=sd)
    assert list(p2.state.masks) == ["2.weight", "4.weight"]
    p2.remove()
    p3 = RigLScheduler(model, opt, **kw, exclude=("^0\\.",), include=("weight",))
    assert list(p3.state.masks) == ["2.weight", "4.weight"]
    p3.remove()
    with pytest.raises(ValueError, match="dense names weights"):
        RigLScheduler(model, opt, **kw, dense=("0.wieght",))
    with pytest.raises(TypeError, match="dense must be a tuple of str"):
        RigLScheduler(model, opt, **kw, dense="0.weight")


# ------------------------------------------------------------------ item 8
def test_meta_model_raises_named_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="meta device.*materialize"):
        RigLScheduler(model, opt, dense_allocation=0.3, T_end=20, delta=5, ignore_linear_layers=False)
    with pytest.raises(ValueError, match="meta device"):
        init_state(model, RigLConfig(t_end=20, delta=5), seed=0)


# ------------------------------------------------------------------ item 9
def test_weights_loaded_after_the_scheduler_are_remasked_before_forward():
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = RigLScheduler(model, opt, **KW)
    _train(model, opt, pruner, range(2))
    model.load_state_dict(_model(3).state_dict())  # dense weights
    assert any(torch.any(w[~m] != 0) for w, m in zip(pruner.W, pruner.backward_masks))
    seen = []
    h = model[0].register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.clone()))
    x, y = _batch(2)
    nn.functional.mse_loss(model(x), y).backward()
    h.remove()
    assert torch.all(seen[0][~pruner.backward_masks[0]] == 0)
    for w, m in zip(pruner.W, pruner.backward_masks):
        assert torch.all(w[~m] == 0)
    assert pruner()
    # optimizer state loaded after the scheduler: re-masked by pruner()/the step hook
    sd = opt.state_dict()
    for st in sd["state"].values():
        st["momentum_buffer"] = torch.ones_like(st["momentum_buffer"])
    opt.load_state_dict(sd)
    opt.step()
    for w, m in zip(pruner.W, pruner.backward_masks):
        assert torch.all(opt.state[w]["momentum_buffer"][~m] == 0) and torch.all(w[~m] == 0)


# ------------------------------------------------------------------ item 10
def test_half_after_grad_accumulation_resumes():
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, **{**KW, "grad_accumulation_n": 3})
    _train(model, opt, pruner, range(3))
    model.half()
    x, y = _batch(3)
    opt.zero_grad()
    nn.functional.mse_loss(model(x.half()), y.half()).backward()
    pruner()
    assert all(t.dtype == torch.float16 for t in pruner.state.grad_acc.values())
    sd = _roundtrip(pruner.state_dict())
    pruner.remove()
    p2 = RigLScheduler(model, opt, state_dict=sd)
    assert p2.step == 4 and all(t.dtype == torch.float16 for t in p2.state.grad_acc.values())


# ------------------------------------------------------------------ item 11
@pytest.mark.parametrize("edit,exc,match", [
    (lambda sd: sd.update(rigl_steps=sd["step"] + 1), ValueError, r"rigl_steps.*cannot exceed.*step"),
    (lambda sd: sd.update(key=1.5), TypeError, r"state_dict\['key'\] must be an int, got key=1.5"),
    (lambda sd: sd.update(key=2 ** 70), ValueError, r"state_dict\['key'\] must fit in int64"),
    (lambda sd: sd.pop("grad_acc"), ValueError, "lacks the key 'grad_acc'"),
    (lambda sd: sd.pop("ema"), ValueError, "lacks the key 'ema'"),
    (lambda sd: sd.pop("key"), ValueError, "lacks the key 'key'"),
])
def test_checkpoint_validation(edit, exc, match):
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(model, opt, **KW)
    _train(model, opt, pruner, range(6))
    sd = dict(pruner.state_dict())
    edit(sd)
    with pytest.raises(exc, match=match):
        pruner.load_state_dict(sd)
    pruner.remove()
    with pytest.raises(exc, match=match):
        RigLScheduler(model, opt, state_dict=sd)


# ------------------------------------------------------------------ item 12
def test_params_dict_skips_non_float_entries():
    params = {"w": torch.randn(6, 8), "pos_ids": torch.arange(12).view(3, 4),
              "causal": torch.ones(4, 4, dtype=torch.bool).tril(), "b": torch.zeros(6)}
    assert sparse_param_names(params) == ["w"]
    state = init_state(params, RigLConfig(t_end=20, delta=5, sparsity=0.5), seed=0)
    assert list(state.masks) == ["w"]


# ------------------------------------------------------------------ item 14
def test_lbfgs_is_rejected():
    model = _model(0)
    with pytest.raises(TypeError, match="LBFGS is not supported"):
        RigLScheduler(model, torch.optim.LBFGS(model.parameters()), **KW)

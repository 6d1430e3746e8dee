"""Tests for rigl_func.snip: SNIP masks (Lee et al. 2019) at the distribution's sparsities.

The hand tables were worked out from the documented rule: per layer keep the
``k = target_nnz`` entries with the largest ``|w · g|``; equal scores keep the lower
flat index; NaN/``±inf`` scores come after every finite score (then lower index first).
The property test compares against a plain-Python stable sort.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from rigl_func import (
    RigLConfig,
    accumulate,
    apply_masks,
    check_state,
    is_update_step,
    sparse_param_names,
    target_nnz,
    update_topology,
)
from rigl_func.snip import snip_grads, snip_init, snip_masks, snip_scores

NAN, INF = math.nan, math.inf


def _cfg(sparsity, distribution="uniform", **kw):
    kw.setdefault("t_end", 100)
    kw.setdefault("delta", 10)
    return RigLConfig(sparsity=sparsity, distribution=distribution, **kw)


# ---------------------------------------------------------------------------------
# Hand-computed masks on a 2x3 layer.

# (w, g, sparsity, expected mask); k = nnz_for(6, sparsity)
SNIP_TABLE = [
    # |w·g| = [[1, 2, 2], [.3, 1, .5]]; k = 3: both 2s, then the tie at 1 -> index 0
    pytest.param([[1.0, -2.0, 0.5], [3.0, 0.1, -1.0]], [[1.0, 1.0, 4.0], [0.1, 10.0, -0.5]], 0.5,
                 [[1, 1, 1], [0, 0, 0]], id="k3-tie-lower-index"),
    # same scores, k = 2 (sparsity 0.67: round(1.98) = 2)
    pytest.param([[1.0, -2.0, 0.5], [3.0, 0.1, -1.0]], [[1.0, 1.0, 4.0], [0.1, 10.0, -0.5]], 0.67,
                 [[0, 1, 1], [0, 0, 0]], id="k2"),
    # k = 4: 2, 2, 1 (idx 0), 1 (idx 4)
    pytest.param([[1.0, -2.0, 0.5], [3.0, 0.1, -1.0]], [[1.0, 1.0, 4.0], [0.1, 10.0, -0.5]], 1 / 3,
                 [[1, 1, 1], [0, 1, 0]], id="k4"),
    # the sign of w·g does not matter: |-3| and |-2| are the largest
    pytest.param([[-3.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0]], 0.67,
                 [[1, 0, 0], [0, 0, 1]], id="signed"),
    # not |w| alone nor |g| alone: the largest weight has a zero gradient
    pytest.param([[9.0, 1.0, 2.0], [1.0, 1.0, 1.0]], [[0.0, 3.0, 1.0], [1.0, 0.5, 0.1]], 0.67,
                 [[0, 1, 1], [0, 0, 0]], id="product-not-magnitude"),
    # all scores equal (incl. -0.0 vs 0.0): the lowest flat indices
    pytest.param([[0.0, -0.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 1.0, -1.0], [1.0, 1.0, 1.0]], 0.5,
                 [[1, 1, 1], [0, 0, 0]], id="all-ties-zero"),
    pytest.param([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]], 0.67,
                 [[1, 1, 0], [0, 0, 0]], id="all-ties"),
    # NaN weight and inf gradient: scores [[nan, .5, .2], [.1, .4, inf]] -> finite first
    pytest.param([[NAN, 1.0, 1.0], [1.0, 1.0, 1.0]], [[1.0, 0.5, 0.2], [0.1, 0.4, INF]], 0.5,
                 [[0, 1, 1], [0, 1, 0]], id="nan-inf-never-first"),
    # +inf (a "large" score) and inf * 0 = NaN: after 1e-30 and after the zeros
    pytest.param([[INF, 1e-20, 1.0], [0.0, 1.0, 1.0]], [[1.0, 1e-10, 0.0], [INF, 0.0, 0.0]], 0.67,
                 [[0, 1, 1], [0, 0, 0]], id="inf-after-tiny-and-zero"),
    # fewer finite scores than k: the finite one, then non-finite by lower index
    pytest.param([[NAN, NAN, NAN], [NAN, 1.0, NAN]], [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], 0.5,
                 [[1, 1, 0], [0, 1, 0]], id="fewer-finite-than-k"),
]


@pytest.mark.parametrize("w, g, sparsity, expected", SNIP_TABLE)
def test_snip_masks_hand_table(w, g, sparsity, expected, device):
    params = {"w": torch.tensor(w, device=device), "b": torch.zeros(2, device=device)}
    grads = {"w": torch.tensor(g, device=device), "b": torch.ones(2, device=device)}
    masks = snip_masks(params, grads, _cfg(sparsity))
    assert list(masks) == ["w"]  # 1-d params are not sparsified
    assert masks["w"].dtype == torch.bool and masks["w"].device.type == device.type
    assert masks["w"].int().tolist() == expected


def test_snip_scores_nonfinite_to_neg_inf():
    s = snip_scores(torch.tensor([2.0, -1.0, NAN, INF, 0.0, INF]), torch.tensor([0.5, 3.0, 1.0, 1.0, INF, 0.0]))
    assert s.tolist() == [1.0, 3.0, -INF, -INF, -INF, -INF]


# ---------------------------------------------------------------------------------
# Reference property test: a plain-Python stable sort.

def _reference(w, g, k):
    scores = [abs(a * b) for a, b in zip(w, g)]
    order = sorted(range(len(w)), key=lambda i: (not math.isfinite(scores[i]),
                                                 -scores[i] if math.isfinite(scores[i]) else 0.0, i))
    keep = set(order[:k])
    return [i in keep for i in range(len(w))]


_values = st.one_of(
    st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, 2.0, NAN, INF, -INF]),
    st.floats(-4, 4, width=32),
)


@given(data=st.data(), rows=st.integers(1, 4), cols=st.integers(1, 5), sparsity=st.floats(0.0, 0.95))
def test_snip_masks_match_reference(data, rows, cols, sparsity):
    n = rows * cols
    w = data.draw(st.lists(_values, min_size=n, max_size=n))
    g = data.draw(st.lists(_values, min_size=n, max_size=n))
    params = {"w": torch.tensor(w, dtype=torch.float32).reshape(rows, cols)}
    grads = {"w": torch.tensor(g, dtype=torch.float32).reshape(rows, cols)}
    cfg = _cfg(sparsity)
    k = target_nnz({"w": (rows, cols)}, cfg)["w"]
    # products computed in float32 as the library does
    prods = (params["w"] * grads["w"]).reshape(-1).tolist()
    expected = _reference(prods, [1.0] * n, k)
    assert snip_masks(params, grads, cfg)["w"].reshape(-1).tolist() == expected


# ---------------------------------------------------------------------------------
# Per-layer counts equal the distribution's.

class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _convnet_batch(seed=0):
    torch.manual_seed(seed)
    net = ConvNet()
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(16, 3, 4, 4, generator=gen)
    y = torch.randint(0, 5, (16,), generator=gen)
    return net, x, y


@pytest.mark.parametrize("distribution", ["uniform", "erk", "er"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_per_layer_nnz_equals_target(distribution, sparsity):
    net, x, y = _convnet_batch()
    cfg = _cfg(sparsity, distribution, method="static", dense=("fc2.weight",))
    state = snip_init(net, nn.functional.cross_entropy, cfg, seed=0, batch=(x, y))
    names = sparse_param_names(net, cfg)
    assert list(state.masks) == names == ["conv.weight", "fc1.weight"]
    expected = target_nnz({n: tuple(state.masks[n].shape) for n in names}, cfg)
    assert {n: int(m.sum()) for n, m in state.masks.items()} == expected
    check_state(state, dict(net.named_parameters()), cfg)
    # the masks are the top-k of |w·g| of the dense net on the batch
    params, grads = snip_grads(net, nn.functional.cross_entropy, (x, y))
    for n in names:
        scores = (params[n] * grads[n]).abs()
        kept, dropped = scores[state.masks[n]], scores[~state.masks[n]]
        assert dropped.numel() == 0 or kept.min() >= dropped.max()


def test_snip_init_batch_form_equals_loss_of_params_form():
    net, x, y = _convnet_batch(1)
    cfg = _cfg(0.8, "erk", method="static")

    def loss_of_params(p):
        return nn.functional.cross_entropy(functional_call(net, p, (x,)), y)

    # functional_call without buffers updates the net's BN running stats in place (a
    # user's choice here): use a copy. Train-mode BN normalizes by batch statistics,
    # so both forms see the same gradients.
    a = snip_init(copy.deepcopy(net), loss_of_params, cfg, seed=3)
    b = snip_init(net, nn.functional.cross_entropy, cfg, seed=3, batch=(x, y))
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert int(a.key) == int(b.key) == 3


def test_snip_init_params_dict_and_names():
    gen = torch.Generator().manual_seed(0)
    params = {"w1": torch.randn(6, 4, generator=gen), "b1": torch.randn(6, generator=gen), "w2": torch.randn(2, 6, generator=gen)}
    x = torch.randn(10, 4, generator=gen)

    def loss(p):
        return (torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T).pow(2).mean()

    cfg = _cfg(0.5, exclude=("^w2$",))
    state = snip_init(params, loss, cfg, seed=0)
    assert list(state.masks) == ["w1"] and int(state.masks["w1"].sum()) == 12
    # snip_masks with explicit names agrees
    p, g = snip_grads(params, loss)
    assert torch.equal(snip_masks(p, g, cfg, names=["w1"])["w1"], state.masks["w1"])
    assert torch.equal(snip_masks(p, g, cfg)["w1"], state.masks["w1"])


def test_inputs_not_mutated():
    net, x, y = _convnet_batch(2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x0, y0 = x.clone(), y.clone()
    snip_init(net, nn.functional.cross_entropy, _cfg(0.9, "erk"), seed=0, batch=(x, y))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "model params or BN buffers changed"
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(x, x0) and torch.equal(y, y0)

    params = {"w": torch.randn(4, 5)}
    grads = {"w": torch.randn(4, 5)}
    copies = {k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in grads.items()}
    snip_masks(params, grads, _cfg(0.5))
    assert torch.equal(params["w"], copies[0]["w"]) and torch.equal(grads["w"], copies[1]["w"])


# ---------------------------------------------------------------------------------
# Then training: static keeps the masks, RigL / SET keep the counts.

def _mlp_setup(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 1))
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(64, 8, generator=gen)
    y = torch.sin(x @ torch.randn(8, 1, generator=gen))
    return net, x, y


def _train(net, x, y, state, cfg, steps=26, lr=0.2):
    params = apply_masks({k: v.detach().clone() for k, v in net.named_parameters()}, state.masks)

    def loss_fn(p):
        return ((functional_call(net, p, (x,)) - y) ** 2).mean()

    grad_fn = torch.func.grad_and_value(loss_fn)
    nnz = target_nnz({k: tuple(m.shape) for k, m in state.masks.items()}, cfg)
    losses, updates = [], 0
    for _ in range(steps):
        grads, loss = grad_fn(params)
        losses.append(float(loss))
        state = accumulate(state, grads, cfg)
        if is_update_step(state.step, cfg):
            params, state = update_topology(params, grads, state, cfg)
            updates += 1
        else:
            g = apply_masks(grads, state.masks)
            params = {k: params[k] - lr * g[k] for k in params}
        for k, m in state.masks.items():
            assert int(m.sum()) == nnz[k]
            assert not params[k][~m].any()
    return params, state, losses, updates


def test_snip_then_static_training_keeps_masks():
    net, x, y = _mlp_setup()
    cfg = _cfg(0.7, "erk", method="static", t_end=30, delta=5)
    state = snip_init(net, nn.functional.mse_loss, cfg, seed=0, batch=(x, y))
    initial = {k: m.clone() for k, m in state.masks.items()}
    _, state, losses, updates = _train(net, x, y, state, cfg)
    assert updates == 0 and int(state.num_updates) == 0
    assert all(torch.equal(state.masks[k], initial[k]) for k in initial)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["rigl", "set", "snfs"])
def test_snip_then_dynamic_training_keeps_nnz(method):
    net, x, y = _mlp_setup(1)
    cfg = _cfg(0.7, "erk", method=method, t_end=30, delta=5, alpha=0.5)
    state = snip_init(net, nn.functional.mse_loss, cfg, seed=0, batch=(x, y))
    initial = {k: m.clone() for k, m in state.masks.items()}
    _, state, losses, updates = _train(net, x, y, state, cfg)
    assert updates == 5 and int(state.num_updates) == 5  # steps 5, 10, ..., 25
    assert any(not torch.equal(state.masks[k], initial[k]) for k in initial)
    assert losses[-1] < losses[0]


def test_snip_seed_is_the_random_key():
    net, x, y = _mlp_setup(2)
    cfg = _cfg(0.7, "uniform", method="set", t_end=30, delta=5, alpha=0.5)
    a = snip_init(net, nn.functional.mse_loss, cfg, seed=0, batch=(x, y))
    b = snip_init(net, nn.functional.mse_loss, cfg, seed=1, batch=(x, y))
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks), "SNIP masks do not depend on the seed"
    assert (int(a.key), int(b.key)) == (0, 1) and a.key.dtype == torch.int64
    _, sa, _, _ = _train(net, x, y, a, cfg, steps=5)
    _, sb, _, _ = _train(net, x, y, b, cfg, steps=5)
    assert any(not torch.equal(sa.masks[k], sb.masks[k]) for k in sa.masks), "SET growth ignored the seed"


# ---------------------------------------------------------------------------------
# Bad inputs.

def test_bad_inputs():
    params = {"w": torch.randn(3, 4)}
    cfg = _cfg(0.5)
    with pytest.raises(ValueError, match=r"grads is missing the sparse layer 'w'"):
        snip_masks(params, {}, cfg)
    with pytest.raises(ValueError, match=r"grads\['w'\] has shape \(4, 3\)"):
        snip_masks(params, {"w": torch.randn(4, 3)}, cfg)
    with pytest.raises(TypeError, match=r"grads\['w'\] must be a floating-point tensor"):
        snip_masks(params, {"w": torch.ones(3, 4, dtype=torch.int64)}, cfg)
    with pytest.raises(ValueError, match=r"names has entries that are not in params: \['v'\]"):
        snip_masks(params, params, cfg, names=["v"])
    with pytest.raises(TypeError, match=r"config must be a RigLConfig"):
        snip_masks(params, params, {"sparsity": 0.5})
    with pytest.raises(TypeError, match=r"seed must be an int, got seed=1.5"):
        snip_init(params, lambda p: p["w"].sum(), cfg, seed=1.5)
    with pytest.raises(TypeError, match=r"batch=\(inputs, targets\) needs an nn.Module"):
        snip_init(params, lambda p: p["w"].sum(), cfg, seed=0, batch=(1, 2))
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor"):
        snip_init(params, lambda p: p["w"], cfg, seed=0)
    with pytest.raises(ValueError, match=r"batch must be a pair"):
        snip_init(nn.Linear(4, 3), nn.functional.mse_loss, cfg, seed=0, batch=(torch.ones(1, 4),))


def test_structured_config_rejected():
    try:
        cfg = RigLConfig(t_end=100, delta=10, structure="n:m", n_m=(2, 4))
    except TypeError:
        pytest.skip("RigLConfig has no structure field in this checkout")
    with pytest.raises(ValueError, match=r"structure='n:m'"):
        snip_masks({"w": torch.randn(4, 8)}, {"w": torch.randn(4, 8)}, cfg)

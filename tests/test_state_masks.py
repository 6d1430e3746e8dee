"""Tests for rigl_func.state and rigl_func.masks: choosing sparse layers, initial
masks, ``check_state``, ``apply_masks``, ``validate_masks`` and the pytree contract of
``RigLState``."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

import rigl_func
from rigl_func import (
    RigLConfig,
    RigLState,
    apply_masks,
    check_state,
    init_masks,
    init_state,
    sparse_param_names,
    target_nnz,
    validate_masks,
)


def _cfg(**kw):
    base = dict(t_end=100, delta=10, sparsity=0.8, distribution="uniform")
    base.update(kw)
    return RigLConfig(**base)


class Zoo(nn.Module):
    """One of every layer type that matters for the choice of sparse layers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv1 = nn.Conv1d(4, 6, 3)
        self.bn1 = nn.BatchNorm1d(6)
        self.conv2 = nn.Conv2d(3, 5, 3)
        self.gn = nn.GroupNorm(1, 5)
        self.conv3 = nn.Conv3d(2, 4, (1, 2, 2), bias=False)
        self.bn3 = nn.BatchNorm3d(4)
        self.deconv = nn.ConvTranspose2d(5, 3, 2)
        self.ln = nn.LayerNorm(7)
        self.head = nn.Sequential(nn.Linear(7, 8), nn.ReLU(), nn.Linear(8, 2, bias=False))
        self.scale = nn.Parameter(torch.ones(3, 3))  # a bare 2-D parameter, not a layer weight


ZOO_SPARSE = ["conv1.weight", "conv2.weight", "conv3.weight", "deconv.weight", "head.0.weight", "head.2.weight"]


def test_sparse_param_names_from_module():
    assert sparse_param_names(Zoo(), _cfg()) == ZOO_SPARSE


def test_sparse_param_names_from_dict():
    params = {"a": torch.zeros(4, 3), "b": torch.zeros(4), "c": torch.zeros(2, 2, 3, 3), "d": torch.zeros(())}
    assert sparse_param_names(params, _cfg()) == ["a", "c"]
    with pytest.raises(TypeError, match="model_or_params"):
        sparse_param_names([torch.zeros(2, 2)], _cfg())


@pytest.mark.parametrize(
    "kw, expected",
    [
        # include adds to the module rule (issue 18): the embedding and the bare parameter
        (dict(include=(r"^emb\.", r"^scale$")), ["scale", "emb.weight"] + ZOO_SPARSE),
        (dict(exclude=(r"^head",)), ["conv1.weight", "conv2.weight", "conv3.weight", "deconv.weight"]),
        (dict(dense=("head.2.weight", "conv1.weight")), ["conv2.weight", "conv3.weight", "deconv.weight", "head.0.weight"]),
        (dict(include=(r"conv", r"head"), exclude=(r"conv[12]",), dense=("head.0.weight",)),
         ["conv3.weight", "deconv.weight", "head.2.weight"]),
    ],
)
def test_include_exclude_dense(kw, expected):
    cfg = _cfg(**kw)
    assert sparse_param_names(Zoo(), cfg) == expected
    state = init_state(Zoo(), cfg, seed=0)
    assert list(state.masks) == expected


def test_init_state_from_module_exact_nnz():
    model = Zoo()
    cfg = _cfg(sparsity=0.8)
    state = init_state(model, cfg, seed=0)
    params = dict(model.named_parameters())
    assert list(state.masks) == ZOO_SPARSE
    # uniform 0.8, by hand: numel - floor(0.8 * numel) (google-research/rigl's count)
    hand = {"conv1.weight": 15, "conv2.weight": 27, "conv3.weight": 7, "deconv.weight": 12,
            "head.0.weight": 12, "head.2.weight": 4}
    # numel: 6*4*3=72 - floor(57.6), 5*3*9=135 - 108, 4*2*4=32 - floor(25.6), 5*3*4=60 - 48,
    #        8*7=56 - floor(44.8), 2*8=16 - floor(12.8)
    assert {k: int(m.sum()) for k, m in state.masks.items()} == hand
    assert target_nnz({k: tuple(params[k].shape) for k in ZOO_SPARSE}, cfg) == hand
    for name, mask in state.masks.items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape
    assert state.step.shape == () and state.step.dtype == torch.int64 and int(state.step) == 0
    assert state.num_updates.shape == () and state.num_updates.dtype == torch.int64 and int(state.num_updates) == 0
    assert state.grad_acc == {}


@pytest.mark.parametrize("distribution", ["uniform", "erk", "erdos_renyi"])
def test_init_state_nnz_matches_target(distribution, device):
    params = {"a": torch.randn(30, 20, device=device), "b": torch.randn(16, 8, 3, 3, device=device),
              "c": torch.randn(10, 30, device=device), "bias": torch.randn(10, device=device)}
    cfg = _cfg(distribution=distribution, sparsity=0.9, grad_accumulation_n=3)
    state = init_state(params, cfg, seed=1)
    shapes = {k: tuple(params[k].shape) for k in ("a", "b", "c")}
    assert {k: int(m.sum()) for k, m in state.masks.items()} == target_nnz(shapes, cfg)
    total = sum(int(m.sum()) for m in state.masks.values())
    # the budget is the uniform one, up to per-layer rounding
    assert abs(total - 0.1 * (600 + 1152 + 300)) <= 3
    for name, mask in state.masks.items():
        assert mask.device.type == device.type
        acc = state.grad_acc[name]
        assert acc.shape == params[name].shape and acc.dtype == params[name].dtype
        assert acc.device.type == device.type and not acc.any()
    assert state.step.device.type == device.type
    check_state(state, params, cfg)


def test_same_seed_same_masks_different_seed_differs(device):
    params = {"a": torch.zeros(20, 20, device=device), "b": torch.zeros(8, 4, 3, 3, device=device)}
    cfg = _cfg(sparsity=0.5)
    s1 = init_state(params, cfg, seed=7)
    s2 = init_state(params, cfg, seed=7)
    s3 = init_state(params, cfg, seed=8)
    assert all(torch.equal(s1.masks[k], s2.masks[k]) for k in s1.masks)
    assert not torch.equal(s1.masks["a"], s3.masks["a"])
    assert not torch.equal(s1.masks["b"], s3.masks["b"])


def test_masks_do_not_depend_on_device(device):
    cpu = init_state({"a": torch.zeros(12, 12)}, _cfg(), seed=3)
    dev = init_state({"a": torch.zeros(12, 12, device=device)}, _cfg(), seed=3)
    assert torch.equal(cpu.masks["a"], dev.masks["a"].cpu())


def test_generator_argument():
    params = {"a": torch.zeros(20, 20)}
    cfg = _cfg(sparsity=0.5)
    from_seed = init_state(params, cfg, seed=5)
    gen = torch.Generator().manual_seed(5)
    first = init_state(params, cfg, generator=gen)
    assert torch.equal(first.masks["a"], from_seed.masks["a"])
    second = init_state(params, cfg, generator=gen)  # the generator has advanced
    assert not torch.equal(second.masks["a"], first.masks["a"])


def test_exactly_one_randomness_source():
    params = {"a": torch.zeros(4, 4)}
    cfg = _cfg(sparsity=0.5)
    masks = {"a": torch.eye(4, dtype=torch.bool) | torch.eye(4, dtype=torch.bool).roll(1, 0)}
    assert int(masks["a"].sum()) == 8
    with pytest.raises(TypeError, match="exactly one"):
        init_state(params, cfg)
    with pytest.raises(TypeError, match="exactly one"):
        init_state(params, cfg, seed=0, generator=torch.Generator())
    with pytest.raises(TypeError, match="exactly one"):
        init_state(params, cfg, seed=0, masks=masks)
    with pytest.raises(TypeError, match="exactly one"):
        init_state(params, cfg, generator=torch.Generator(), masks=masks)
    with pytest.raises(TypeError, match="seed"):
        init_state(params, cfg, seed=1.5)
    with pytest.raises(TypeError, match="seed"):
        init_state(params, cfg, seed=True)
    with pytest.raises(TypeError, match="generator"):
        init_state(params, cfg, generator=123)
    with pytest.raises(TypeError, match="config"):
        init_state(params, {"sparsity": 0.5}, seed=0)
    state = init_state(params, cfg, masks=masks)
    assert torch.equal(state.masks["a"], masks["a"])


def test_init_state_rejects_bad_masks():
    params = {"a": torch.zeros(4, 4), "b": torch.zeros(4)}
    cfg = _cfg(sparsity=0.5)  # 8 active entries in "a"
    good = torch.zeros(4, 4, dtype=torch.bool)
    good.view(-1)[:8] = True
    with pytest.raises(ValueError, match=r"'a'.*7 active.*requires 8"):
        bad = good.clone()
        bad.view(-1)[0] = False
        init_state(params, cfg, masks={"a": bad})
    with pytest.raises(ValueError, match=r"'z'"):
        init_state(params, cfg, masks={"z": good})
    with pytest.raises(ValueError, match=r"'a'.*\(2, 8\).*\(4, 4\)"):
        init_state(params, cfg, masks={"a": good.reshape(2, 8)})
    with pytest.raises(TypeError, match=r"'a'"):
        init_state(params, cfg, masks={"a": good.float()})


def _valid(device, **cfg_kw):
    params = {"w": torch.randn(6, 5, device=device), "v": torch.randn(4, 2, 2, 2, device=device), "b": torch.randn(6, device=device)}
    cfg = _cfg(sparsity=0.5, **cfg_kw)
    return params, cfg, init_state(params, cfg, seed=0)


def test_check_state_accepts_valid(device):
    params, cfg, state = _valid(device)
    check_state(state, params, cfg)
    params, cfg, state = _valid(device, grad_accumulation_n=2)
    check_state(state, params, cfg)


def test_check_state_rejects(device):
    params, cfg, state = _valid(device)
    w = state.masks["w"]
    flip_one = w.clone()
    flip_one.view(-1)[w.view(-1).nonzero()[0]] = False
    cases = [
        (ValueError, r"state.masks.*'extra'", state._replace(masks={**state.masks, "extra": w})),
        (ValueError, r"state.masks\['w'\].*\(5, 6\).*\(6, 5\)", state._replace(masks={**state.masks, "w": w.reshape(5, 6)})),
        (TypeError, r"state.masks\['w'\]", state._replace(masks={**state.masks, "w": w.to(torch.uint8)})),
        (ValueError, r"state.masks\['w'\] has 14 active entries.*requires 15", state._replace(masks={**state.masks, "w": flip_one})),
        (ValueError, r"state.masks\['w'\] has 30 active.*requires 15", state._replace(masks={**state.masks, "w": torch.ones_like(w)})),
        (TypeError, r"state.step", state._replace(step=torch.tensor(0.0, device=device))),
        (TypeError, r"state.step", state._replace(step=torch.zeros(1, dtype=torch.int64, device=device))),
        (TypeError, r"state.step", state._replace(step=0)),
        (TypeError, r"state.num_updates", state._replace(num_updates=torch.tensor(0, dtype=torch.int32, device=device))),
        (ValueError, r"state.grad_acc", state._replace(grad_acc={"w": torch.zeros(6, 5, device=device)})),
    ]
    for exc, pattern, bad in cases:
        with pytest.raises(exc, match=pattern):
            check_state(bad, params, cfg)
    with pytest.raises(TypeError, match="RigLState"):
        check_state(tuple(state), params, cfg)
    # a state from another config fails
    with pytest.raises(ValueError, match="active entries"):
        check_state(state, params, _cfg(sparsity=0.9))
    # accumulators must match when grad_accumulation_n > 1
    params, cfg2, state2 = _valid(device, grad_accumulation_n=2)
    with pytest.raises(ValueError, match=r"grad_acc"):
        check_state(state2._replace(grad_acc={"w": state2.grad_acc["w"]}), params, cfg2)
    with pytest.raises(ValueError, match=r"grad_acc\['w'\]"):
        check_state(state2._replace(grad_acc={**state2.grad_acc, "w": torch.zeros(6, 5, dtype=torch.float64, device=device)}), params, cfg2)


# ---------------------------------------------------------------------------------
# init_masks

def test_init_masks_exact_counts_and_errors():
    gen = torch.Generator().manual_seed(0)
    masks = init_masks({"a": (3, 4), "b": (2, 2, 2), "c": (5,)}, {"a": 5, "b": 0, "c": 5}, generator=gen)
    assert {k: int(m.sum()) for k, m in masks.items()} == {"a": 5, "b": 0, "c": 5}
    assert masks["b"].shape == (2, 2, 2) and masks["a"].dtype == torch.bool
    with pytest.raises(ValueError, match=r"nnz\['a'\].*13"):
        init_masks({"a": (3, 4)}, {"a": 13}, generator=gen)
    with pytest.raises(ValueError, match=r"nnz\['a'\].*-1"):
        init_masks({"a": (3, 4)}, {"a": -1}, generator=gen)
    with pytest.raises(TypeError, match="generator"):
        init_masks({"a": (3, 4)}, {"a": 1}, generator=0)


def test_init_masks_is_uniform_over_positions():
    # each position is active with probability nnz / numel = 1/4
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4)
    trials = 400
    for _ in range(trials):
        counts += init_masks({"a": (4, 4)}, {"a": 4}, generator=gen)["a"].float()
    freq = counts / trials
    assert (freq - 0.25).abs().max() < 0.1  # ~4.6 standard deviations


# ---------------------------------------------------------------------------------
# apply_masks / validate_masks

class Moments(NamedTuple):
    mu: dict
    nu: dict


def test_apply_masks_nested_and_nan(device):
    nan = math.nan
    mask = torch.tensor([[True, False], [False, True]], device=device)
    w = torch.tensor([[1.0, nan], [math.inf, 2.0]], device=device)
    b = torch.tensor([nan, 3.0], device=device)
    tree = {
        "params": {"w": w, "b": b},
        "opt": [{"w": w * 2, "step": torch.tensor(3.0, device=device)}, (w.double(),)],
        "moments": Moments(mu={"w": w.clone()}, nu={"w": torch.ones(2, 2, device=device), "b": b}),
        "w": torch.ones(3, device=device),  # keyed like the mask but another shape: left alone
        "other": 5,
    }
    before = {"w": w.clone(), "b": b.clone()}
    out = apply_masks(tree, {"w": mask})
    expected = [[1.0, 0.0], [0.0, 2.0]]
    assert out["params"]["w"].tolist() == expected
    assert out["opt"][0]["w"].tolist() == [[2.0, 0.0], [0.0, 4.0]]
    assert out["opt"][0]["step"].item() == 3.0
    # tuple element not under the "w" key: untouched
    assert torch.equal(out["opt"][1][0].isnan(), w.double().isnan())
    assert isinstance(out["moments"], Moments)
    assert out["moments"].mu["w"].tolist() == expected
    assert out["moments"].nu["w"].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    for dense_b in (out["params"]["b"], out["moments"].nu["b"]):  # dense keys left alone
        assert dense_b.isnan().tolist() == [True, False] and dense_b[1].item() == 3.0
    assert torch.equal(out["w"], torch.ones(3, device=device))
    assert out["other"] == 5
    assert out["params"]["w"].dtype == w.dtype and out["opt"][1][0].dtype == torch.float64
    # pure
    assert torch.equal(w.isnan(), before["w"].isnan()) and torch.equal(torch.nan_to_num(w), torch.nan_to_num(before["w"]))
    assert tree["params"]["w"] is w


def test_apply_masks_dtypes(device):
    mask = torch.tensor([True, False, True], device=device)
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int64):
        t = torch.tensor([5, 6, 7], dtype=dtype, device=device)
        out = apply_masks({"x": t}, {"x": mask})["x"]
        assert out.dtype == dtype and out.tolist() == [5, 0, 7]


def test_validate_masks_messages():
    params = {"w": torch.zeros(2, 3), "i": torch.zeros(2, 2, dtype=torch.int64)}
    validate_masks({"w": torch.ones(2, 3, dtype=torch.bool)}, params)
    with pytest.raises(ValueError, match=r"masks\['w'\] has shape \(2, 2\) but params\['w'\] has shape \(2, 3\)"):
        validate_masks({"w": torch.ones(2, 2, dtype=torch.bool)}, params)
    with pytest.raises(ValueError, match=r"'nope'"):
        validate_masks({"nope": torch.ones(2, 3, dtype=torch.bool)}, params)
    with pytest.raises(TypeError, match=r"masks\['w'\].*torch.float32"):
        validate_masks({"w": torch.ones(2, 3)}, params)
    with pytest.raises(TypeError, match=r"params\['i'\]"):
        validate_masks({"i": torch.ones(2, 2, dtype=torch.bool)}, params)
    with pytest.raises(TypeError, match="my_masks"):
        validate_masks([torch.ones(2, 3, dtype=torch.bool)], params, argname="my_masks")
    with pytest.raises(ValueError, match=r"my_masks\['w'\]"):
        validate_masks({"w": torch.ones(3, 2, dtype=torch.bool)}, params, argname="my_masks")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA) for a device mismatch")
def test_validate_masks_device_mismatch():
    with pytest.raises(ValueError, match=r"masks\['w'\] is on cpu"):
        validate_masks({"w": torch.ones(2, 3, dtype=torch.bool)}, {"w": torch.zeros(2, 3, device="cuda")})


# ---------------------------------------------------------------------------------
# RigLState is a pytree of tensors only.

@pytest.mark.parametrize("k", [1, 3])
def test_riglstate_is_a_pytree_of_tensors(k, device):
    params = {"w": torch.randn(6, 5, device=device), "v": torch.randn(4, 4, device=device), "b": torch.zeros(4, device=device)}
    cfg = _cfg(sparsity=0.5, grad_accumulation_n=k)
    state = init_state(params, cfg, seed=0)
    leaves, spec = tree_flatten(state)
    n_masks, n_acc = 2, (2 if k > 1 else 0)
    assert len(leaves) == n_masks + 3 + n_acc  # + step, num_updates, key; no EMA without SNFS
    assert all(isinstance(x, torch.Tensor) for x in leaves), [type(x) for x in leaves]
    assert not any(x is None for x in leaves)
    rebuilt = tree_unflatten(leaves, spec)
    assert type(rebuilt) is RigLState
    assert rebuilt._fields == ("masks", "step", "num_updates", "grad_acc", "ema", "key")
    assert all(torch.equal(rebuilt.masks[n], state.masks[n]) for n in state.masks)
    # no field may be None, as that would be a leaf under vmap
    assert all(getattr(state, f) is not None for f in RigLState._fields)


def test_riglstate_passes_through_vmap(device):
    params = {"w": torch.randn(6, 5, device=device)}
    cfg = _cfg(sparsity=0.5, grad_accumulation_n=2)
    states = [init_state(params, cfg, seed=s) for s in range(3)]
    leaves = [tree_flatten(s)[0] for s in states]
    spec = tree_flatten(states[0])[1]
    batched = tree_unflatten([torch.stack(xs) for xs in zip(*leaves)], spec)
    out = torch.func.vmap(lambda s: s._replace(step=s.step + 1))(batched)
    assert type(out) is RigLState and out.step.tolist() == [1, 1, 1]
    assert torch.equal(out.masks["w"], batched.masks["w"])


def test_public_api_exports():
    for name in rigl_func.__all__:
        assert hasattr(rigl_func, name), name

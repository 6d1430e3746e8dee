"""Tests for rigl_func.pruning: gradual magnitude pruning (Zhu & Gupta 2017).

* Schedule goldens worked out by hand from s_t = s_f + (s_i - s_f)(1 - p)^3.
* Exact per-layer counts at every pruning step, recomputed independently from the
  distributions (uniform: s_t everywhere; ERK: erk(shapes, s_t)).
* Hand table of which active entries are pruned (lowest |w|, NaN first, ties by lower
  flat index).
* Properties: masks shrink monotonically, never regrow, pruned entries exactly zero,
  inputs not mutated.
* Transforms: torch.compile(fullgraph=True) equals eager without recompiling across
  steps; vmap over 3 models equals a loop.

The compile backend defaults to inductor; set ``RIGL_FUNC_TEST_COMPILE_BACKEND`` to
``aot_eager`` for a quicker run that still checks full-graph capture and recompilation.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, vmap

from rigl_func import erk, get_distribution, nnz_for, uniform
from rigl_func.pruning import (
    PruningConfig,
    init_pruning_masks,
    is_pruning_step,
    mean_density_over_training,
    mean_layer_densities_over_training,
    prune,
    pruning_layer_sparsities,
    pruning_sparsity,
    pruning_steps,
    pruning_target_nnz,
)

COMPILE_BACKEND = os.environ.get("RIGL_FUNC_TEST_COMPILE_BACKEND", "inductor")
NAN = math.nan


def _params(seed, device, shapes=None):
    shapes = shapes or {"a.weight": (12, 10), "a.bias": (12,), "b.weight": (4, 12), "c.weight": (3, 2, 3, 3)}
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen).to(device) for k, s in shapes.items()}


def _counts(masks):
    return {k: int(m.sum()) for k, m in masks.items()}


# ---------------------------------------------------------------------------------
# Schedule.

GOLDEN = PruningConfig(final_sparsity=0.9, initial_sparsity=0.1, t0=100, t1=500, frequency=50)
# p = (t - 100) / 400; s = 0.9 - 0.8 (1 - p)^3
SCHEDULE_TABLE = [
    (0, 0.1),      # before t0: s_i
    (99, 0.1),
    (100, 0.1),    # t0: p = 0
    (200, 0.9 - 0.8 * 0.75**3),   # 0.5625
    (300, 0.8),    # midpoint: 0.9 - 0.8 / 8
    (400, 0.8875),  # 0.9 - 0.8 / 64
    (500, 0.9),    # t1
    (501, 0.9),    # after t1
    (10**6, 0.9),
]


@pytest.mark.parametrize("step, expected", SCHEDULE_TABLE)
def test_schedule_goldens(step, expected, device):
    assert pruning_sparsity(step, GOLDEN) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    as_tensor = pruning_sparsity(torch.tensor(step, device=device), GOLDEN)
    assert as_tensor.dtype == torch.float64 and as_tensor.dim() == 0 and as_tensor.device.type == device.type
    assert float(as_tensor) == pruning_sparsity(step, GOLDEN)  # same arithmetic, bit for bit


def test_schedule_defaults_and_monotone():
    cfg = PruningConfig(final_sparsity=0.75, t0=0, t1=8)
    assert pruning_sparsity(0, cfg) == 0.0 and pruning_sparsity(8, cfg) == 0.75
    assert pruning_sparsity(4, cfg) == 0.75 - 0.75 / 8  # dyadic: exact
    values = [pruning_sparsity(t, GOLDEN) for t in range(0, 600)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_pruning_steps_and_predicate(device):
    cfg = PruningConfig(final_sparsity=0.5, t0=10, t1=35, frequency=10)
    assert pruning_steps(cfg) == (10, 20, 30, 35)  # t1 added: s_f is always reached
    on_grid = PruningConfig(final_sparsity=0.5, t0=0, t1=30, frequency=10)
    assert pruning_steps(on_grid) == (0, 10, 20, 30)
    for c in (cfg, on_grid):
        expected = set(pruning_steps(c))
        for t in range(-3, 60):
            assert is_pruning_step(t, c) == (t in expected), t
            assert bool(is_pruning_step(torch.tensor(t, device=device), c)) == (t in expected), t


# ---------------------------------------------------------------------------------
# Exact per-layer counts at every pruning step (uniform and ERK).

def _expected_counts(shapes, s, distribution):
    numel = {k: math.prod(v) for k, v in shapes.items()}
    sparsities = get_distribution(distribution)(shapes, s)
    return {k: nnz_for(numel[k], sparsities[k]) for k in shapes}


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
@pytest.mark.parametrize("initial", [0.0, 0.3])
def test_exact_counts_follow_the_cubic_schedule(distribution, initial, device):
    cfg = PruningConfig(final_sparsity=0.85, initial_sparsity=initial, t0=3, t1=40, frequency=4,
                        distribution=distribution)
    params = _params(0, device)
    masks = init_pruning_masks(params, cfg)
    shapes = {k: tuple(m.shape) for k, m in masks.items()}
    assert list(masks) == ["a.weight", "b.weight", "c.weight"] and all(m.all() for m in masks.values())
    checked = []
    for step in range(0, 46):
        if not is_pruning_step(step, cfg):
            continue
        old = masks
        params, masks = prune(params, masks, step, cfg)
        s = pruning_sparsity(step, cfg)
        expected = _expected_counts(shapes, s, distribution)
        assert _counts(masks) == expected, (step, s)
        assert pruning_target_nnz(shapes, step, cfg) == expected
        assert pruning_layer_sparsities(shapes, step, cfg) == (
            uniform(shapes, s) if distribution == "uniform" else erk(shapes, s))
        for k in masks:
            assert not (masks[k] & ~old[k]).any(), "regrew"
            assert not params[k][~masks[k]].any(), "pruned entry not zero"
        checked.append(step)
    assert checked == [3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 40]
    assert _counts(masks) == _expected_counts(shapes, 0.85, distribution)
    if distribution == "erk":  # ERK really gives the layers different sparsities
        assert len({round(v, 6) for v in erk(shapes, 0.85).values()}) > 1


def test_target_nnz_int_and_tensor_paths_agree(device):
    cfg = PruningConfig(final_sparsity=0.9, initial_sparsity=0.2, t0=5, t1=27, frequency=6, distribution="erk")
    shapes = {"a": (12, 10), "b": (4, 12), "c": (3, 2, 3, 3)}
    numel = {k: math.prod(v) for k, v in shapes.items()}
    last = None
    for t in range(-2, 40):
        as_int = pruning_target_nnz(shapes, t, cfg)
        as_tensor = pruning_target_nnz(shapes, torch.tensor(t, device=device), cfg)
        assert {k: int(v) for k, v in as_tensor.items()} == as_int, t
        assert all(v.dtype == torch.int64 and v.dim() == 0 for v in as_tensor.values())
        if t < 5:
            assert as_int == numel  # dense before t0
        elif is_pruning_step(t, cfg):
            last = _expected_counts(shapes, pruning_sparsity(t, cfg), "erk")
            assert as_int == last
        else:
            assert as_int == last  # counts of the previous pruning step


# ---------------------------------------------------------------------------------
# Which entries are pruned: hand table.

# (w, mask, step, expected mask) with cfg: s_f = 0.5, t0 = 0, t1 = 4, frequency = 2 on 2x4.
# Targets: t=0 -> 8, t=2 -> s = .5 - .5/8 = .4375 -> round(4.5) = 5, t=4 -> 4.
HAND_CFG = PruningConfig(final_sparsity=0.5, t0=0, t1=4, frequency=2)
PRUNE_TABLE = [
    pytest.param([[0.5, -0.1, 0.3, 2.0], [-0.7, 0.2, 0.05, 1.0]], [[1] * 4] * 2, 2,
                 [[1, 0, 1, 1], [1, 0, 0, 1]], id="lowest-abs-three"),
    pytest.param([[0.5, -0.1, 0.3, 2.0], [-0.7, 0.2, 0.05, 1.0]], [[1] * 4] * 2, 4,
                 [[1, 0, 0, 1], [1, 0, 0, 1]], id="lowest-abs-four"),
    # inactive small weights are not counted: only active entries compete
    pytest.param([[0.5, 0.0, 0.3, 2.0], [-0.7, 0.2, 0.0, 1.0]], [[1, 0, 1, 1], [1, 1, 0, 1]], 4,
                 [[1, 0, 0, 1], [1, 0, 0, 1]], id="among-active-only"),
    # sign does not matter; ties drop the lower flat index first
    pytest.param([[-0.3, 0.3, 0.3, 0.3], [0.3, -0.3, 1.0, 1.0]], [[1] * 4] * 2, 2,
                 [[0, 0, 0, 1], [1, 1, 1, 1]], id="ties-lower-index-first"),
    # NaN weights go first
    pytest.param([[NAN, 0.1, 0.3, 2.0], [NAN, 0.2, 0.05, 1.0]], [[1] * 4] * 2, 2,
                 [[0, 1, 1, 1], [0, 1, 0, 1]], id="nan-first"),
    # already sparser than the target: nothing changes (never regrows)
    pytest.param([[0.5, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 1.0]], [[1, 0, 0, 1], [0, 0, 0, 1]], 4,
                 [[1, 0, 0, 1], [0, 0, 0, 1]], id="sparser-than-target"),
    # before a pruning step / between pruning steps: counts of the previous one
    pytest.param([[0.5, -0.1, 0.3, 2.0], [-0.7, 0.2, 0.05, 1.0]], [[1] * 4] * 2, 1,
                 [[1] * 4] * 2, id="t1-dense-target"),
    pytest.param([[0.5, -0.1, 0.3, 2.0], [-0.7, 0.2, 0.05, 1.0]], [[1] * 4] * 2, 3,
                 [[1, 0, 1, 1], [1, 0, 0, 1]], id="t3-previous-target"),
]


@pytest.mark.parametrize("w, mask, step, expected", PRUNE_TABLE)
def test_prune_hand_table(w, mask, step, expected, device):
    params = {"w": torch.tensor(w, device=device), "b": torch.tensor([NAN, 1.0], device=device)}
    masks = {"w": torch.tensor(mask, dtype=torch.bool, device=device)}
    for s in (step, torch.tensor(step, device=device)):
        new_params, new_masks = prune(params, masks, s, HAND_CFG)
        assert new_masks["w"].int().tolist() == expected
        expected_w = torch.where(new_masks["w"], params["w"], torch.zeros((), device=device))
        assert torch.equal(new_params["w"], expected_w)
        assert new_params["b"] is params["b"]  # dense params pass through


# ---------------------------------------------------------------------------------
# Properties (hypothesis).

@given(
    seed=st.integers(0, 2**16),
    final=st.floats(0.0, 0.97),
    frac_initial=st.floats(0.0, 1.0),
    t0=st.integers(0, 5),
    span=st.integers(1, 12),
    frequency=st.integers(1, 5),
    distribution=st.sampled_from(["uniform", "erk", "er"]),
    skip=st.booleans(),
)
def test_properties(seed, final, frac_initial, t0, span, frequency, distribution, skip):
    cfg = PruningConfig(final_sparsity=final, initial_sparsity=final * frac_initial, t0=t0, t1=t0 + span,
                        frequency=frequency, distribution=distribution)
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(5, 7, generator=gen), "v": torch.randn(3, 4, generator=gen)}
    params["w"][0, :3] = 0.5  # ties
    masks = init_pruning_masks(params, cfg)
    shapes = {k: tuple(m.shape) for k, m in masks.items()}
    steps = range(0, t0 + span + 3, 3 if skip else 1)  # skipping steps must still give exact counts
    for step in steps:
        before_p = {k: v.clone() for k, v in params.items()}
        before_m = {k: v.clone() for k, v in masks.items()}
        new_params, new_masks = prune(params, masks, step, cfg)
        assert all(torch.equal(params[k], before_p[k]) for k in params), "params mutated"
        assert all(torch.equal(masks[k], before_m[k]) for k in masks), "masks mutated"
        target = pruning_target_nnz(shapes, step, cfg)
        for k in masks:
            assert not (new_masks[k] & ~masks[k]).any(), "regrew"
            assert int(new_masks[k].sum()) == min(int(masks[k].sum()), target[k])
            assert torch.equal(new_params[k][~new_masks[k]], torch.zeros_like(new_params[k][~new_masks[k]]))
            assert torch.equal(new_params[k][new_masks[k]], params[k][new_masks[k]])
            # every pruned entry had |w| <= every kept one
            pruned = masks[k] & ~new_masks[k]
            if pruned.any() and new_masks[k].any():
                assert params[k][pruned].abs().max() <= params[k][new_masks[k]].abs().min()
        params, masks = new_params, new_masks
    assert _counts(masks) == _expected_counts(shapes, final, distribution)  # s_f reached at t1


# ---------------------------------------------------------------------------------
# torch.compile and vmap.

from conftest import CountingBackend  # noqa: E402  (shared test helper)


def test_compile_equals_eager_without_recompiles(device):
    torch._dynamo.reset()
    cfg = PruningConfig(final_sparsity=0.8, t0=2, t1=23, frequency=4, distribution="erk")
    params = _params(1, device)
    masks = init_pruning_masks(params, cfg)
    backend = CountingBackend(COMPILE_BACKEND)
    compiled = torch.compile(prune, fullgraph=True, backend=backend)
    changes = 0
    for step in range(0, 28):
        if step == 10:  # a NaN weight must be pruned first in both
            params = {**params, "b.weight": params["b.weight"].clone().index_fill(1, torch.tensor([0], device=device), NAN)}
        t = torch.tensor(step, device=device)
        eager_p, eager_m = prune(params, masks, t, cfg)
        comp_p, comp_m = compiled(params, masks, t, cfg)
        assert set(comp_p) == set(eager_p) and set(comp_m) == set(eager_m)
        for k in eager_p:
            assert torch.equal(comp_p[k], eager_p[k]) and comp_p[k].dtype == eager_p[k].dtype, (step, k)
        for k in eager_m:
            assert torch.equal(comp_m[k], eager_m[k]), (step, k)
        int_p, int_m = prune(params, masks, step, cfg)
        assert all(torch.equal(int_m[k], eager_m[k]) for k in eager_m)
        changes += any(not torch.equal(eager_m[k], masks[k]) for k in masks)
        params, masks = eager_p, eager_m
        assert backend.calls == 1, f"recompiled at step {step}"
    assert changes >= 5
    assert not any(v.isnan().any() for k, v in params.items() if k in masks)


K = 3


def _stack(trees):
    return {k: torch.stack([t[k] for t in trees]) for k in trees[0]}


@pytest.mark.parametrize("batched_step", [False, True])
def test_vmap_over_models_equals_loop(batched_step, device):
    cfg = PruningConfig(final_sparsity=0.7, t0=0, t1=20, frequency=5, distribution="erk")
    params = [_params(10 + i, device) for i in range(K)]
    masks = [init_pruning_masks(p, cfg) for p in params]
    # bring each model to its own earlier state
    for i, upto in enumerate([0, 5, 10]):
        for step in pruning_steps(cfg):
            if step <= upto:
                params[i], masks[i] = prune(params[i], masks[i], step, cfg)
    if batched_step:
        steps = torch.tensor([5, 15, 20], device=device)
        out_p, out_m = vmap(prune, in_dims=(0, 0, 0, None))(_stack(params), _stack(masks), steps, cfg)
    else:
        steps = torch.tensor([15] * K, device=device)
        out_p, out_m = vmap(prune, in_dims=(0, 0, None, None))(_stack(params), _stack(masks), steps[0], cfg)
    for i in range(K):
        ref_p, ref_m = prune(params[i], masks[i], int(steps[i]), cfg)
        for k in ref_p:
            assert torch.equal(out_p[k][i], ref_p[k]), (i, k)
        for k in ref_m:
            assert torch.equal(out_m[k][i], ref_m[k]), (i, k)
            assert int(ref_m[k].sum()) == pruning_target_nnz({k: tuple(ref_m[k].shape) for k in ref_m}, int(steps[i]), cfg)[k]


# ---------------------------------------------------------------------------------
# Layers kept dense, training, FLOPs helper.

def test_include_exclude_dense_and_module():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 8), nn.Linear(8, 3))
    cfg = PruningConfig(final_sparsity=0.5, t0=0, t1=2, frequency=1, dense=("4.weight",))
    masks = init_pruning_masks(net, cfg)
    assert list(masks) == ["0.weight", "3.weight"]  # no biases, no BN, 4.weight dense
    assert list(init_pruning_masks(net, PruningConfig(0.5, 0, 2, exclude=("^0\\.",)))) == ["3.weight", "4.weight"]
    assert list(init_pruning_masks(net, PruningConfig(0.5, 0, 2, include=("^4\\.",)))) == ["4.weight"]
    params = {k: v.detach() for k, v in net.named_parameters()}
    new_params, new_masks = prune(params, masks, 2, cfg)
    assert _counts(new_masks) == {"0.weight": 36, "3.weight": 64}
    assert torch.equal(new_params["4.weight"], params["4.weight"]) and torch.equal(new_params["1.weight"], params["1.weight"])


def test_gradual_pruning_training_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 8, generator=gen)
    y = 0.5 * (x @ torch.randn(8, 1, generator=gen))
    cfg = PruningConfig(final_sparsity=0.8, t0=5, t1=35, frequency=5)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    masks = init_pruning_masks(params, cfg)
    grad_fn = torch.func.grad_and_value(lambda p: ((functional_call(net, p, (x,)) - y) ** 2).mean())
    losses, history = [], []
    for step in range(50):
        if is_pruning_step(step, cfg):
            params, masks = prune(params, masks, step, cfg)
            history.append(sum(_counts(masks).values()))
        grads, loss = grad_fn(params)
        losses.append(float(loss))
        params = {k: params[k] - 0.1 * (grads[k] * masks[k] if k in masks else grads[k]) for k in params}
        assert all(not params[k][~m].any() for k, m in masks.items())
    assert history == sorted(history, reverse=True) and len(history) == 7
    # n - floor(0.8 * n): 256 - floor(204.8), 32 - floor(25.6)
    assert _counts(masks) == {"0.weight": 52, "2.weight": 7}
    assert losses[-1] < 0.2 * losses[0]  # still learns while pruned to 80%


def test_mean_density_over_training():
    cfg = PruningConfig(final_sparsity=0.5, t0=2, t1=4, frequency=1)
    # steps 0..7: 1, 1, 1 (t0, s_i = 0), 1 - .4375, .5, .5, .5, .5
    assert mean_density_over_training(cfg, 8) == (3 + 0.5625 + 4 * 0.5) / 8
    assert mean_density_over_training(cfg, 3) == 1.0
    assert mean_density_over_training(cfg, 4) == (3 + 0.5625) / 4
    # brute force: the mean of the exact per-layer densities of a simulated run
    cfg = PruningConfig(final_sparsity=0.9, initial_sparsity=0.2, t0=5, t1=50, frequency=7, distribution="erk")
    shapes = {"a": (20, 10), "b": (5, 20)}
    params = {k: torch.randn(s, generator=torch.Generator().manual_seed(0)) for k, s in shapes.items()}
    masks = init_pruning_masks(params, cfg)
    total = {k: 0.0 for k in shapes}
    for t in range(80):
        if is_pruning_step(t, cfg):
            params, masks = prune(params, masks, t, cfg)
        for k in shapes:
            total[k] += int(masks[k].sum()) / masks[k].numel()
    means = mean_layer_densities_over_training(shapes, cfg, 80)
    assert means == pytest.approx({k: v / 80 for k, v in total.items()}, rel=1e-12)
    # the scalar version follows 1 - s_t of the pruning steps (the RigL paper's 3 f_D (1 - s_t))
    expected = sum(1.0 if t < 5 else 1 - pruning_sparsity(max(s for s in pruning_steps(cfg) if s <= t), cfg)
                   for t in range(80)) / 80
    assert mean_density_over_training(cfg, 80) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="total_steps must be an int > 0, got total_steps=0"):
        mean_density_over_training(cfg, 0)


# ---------------------------------------------------------------------------------
# Bad inputs.

BAD_CONFIGS = [
    (dict(final_sparsity=1.0, t0=0, t1=10), ValueError, r"final_sparsity must be in \[0, 1\), got final_sparsity=1.0"),
    (dict(final_sparsity=-0.1, t0=0, t1=10), ValueError, r"final_sparsity=-0.1"),
    (dict(final_sparsity=math.nan, t0=0, t1=10), ValueError, r"final_sparsity=nan"),
    (dict(final_sparsity="0.5", t0=0, t1=10), TypeError, r"final_sparsity must be a real number, got final_sparsity='0.5'"),
    (dict(final_sparsity=0.5, t0=10, t1=10), ValueError, r"t1 must be > t0=10, got t1=10"),
    (dict(final_sparsity=0.5, t0=10, t1=5), ValueError, r"t1 must be > t0=10, got t1=5"),
    (dict(final_sparsity=0.5, t0=-1, t1=5), ValueError, r"t0 must be >= 0, got t0=-1"),
    (dict(final_sparsity=0.5, t0=0, t1=5.0), TypeError, r"t1 must be an int, got t1=5.0"),
    (dict(final_sparsity=0.5, t0=True, t1=5), TypeError, r"t0 must be an int, got t0=True"),
    (dict(final_sparsity=0.5, t0=0, t1=5, frequency=0), ValueError, r"frequency must be > 0, got frequency=0"),
    (dict(final_sparsity=0.5, t0=0, t1=5, frequency=-3), ValueError, r"frequency must be > 0, got frequency=-3"),
    (dict(final_sparsity=0.5, initial_sparsity=0.6, t0=0, t1=5), ValueError,
     r"initial_sparsity must be in \[0, final_sparsity=0.5\], got initial_sparsity=0.6"),
    (dict(final_sparsity=0.5, initial_sparsity=-0.1, t0=0, t1=5), ValueError, r"initial_sparsity=-0.1"),
    (dict(final_sparsity=0.5, t0=0, t1=5, distribution="gaussian"), ValueError, r"distribution=.gaussian."),
    (dict(final_sparsity=0.5, t0=0, t1=5, erk_power_scale=-1.0), ValueError, r"erk_power_scale=-1.0"),
    (dict(final_sparsity=0.5, t0=0, t1=5, dense="fc.weight"), TypeError, r"dense must be a tuple of str, got dense='fc.weight'"),
    (dict(final_sparsity=0.5, t0=0, t1=5, exclude=("(",)), ValueError, r"exclude has an invalid regex '\('"),
]


@pytest.mark.parametrize("kwargs, exc, message", BAD_CONFIGS)
def test_bad_configs(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        PruningConfig(**kwargs)


def test_config_frozen_and_hashable():
    cfg = PruningConfig(final_sparsity=0.5, t0=0, t1=5)
    with pytest.raises(Exception):
        cfg.t1 = 7
    assert {cfg: 1}[PruningConfig(0.5, 0, 5)] == 1


def test_bad_call_arguments():
    cfg = PruningConfig(final_sparsity=0.5, t0=0, t1=5)
    params = {"w": torch.randn(3, 4)}
    masks = init_pruning_masks(params, cfg)
    for step in (1.0, True, torch.tensor(1.0), torch.tensor([1, 2])):
        with pytest.raises(TypeError, match=r"step must be an int or a 0-d integer tensor, got step="):
            prune(params, masks, step, cfg)
    with pytest.raises(TypeError, match=r"cfg must be a PruningConfig"):
        prune(params, masks, 1, {"final_sparsity": 0.5})
    with pytest.raises(ValueError, match=r"masks\['w'\] has shape \(4, 3\) but params\['w'\] has shape \(3, 4\)"):
        prune(params, {"w": torch.ones(4, 3, dtype=torch.bool)}, 1, cfg)
    with pytest.raises(TypeError, match=r"masks\['w'\] must be a bool tensor"):
        prune(params, {"w": torch.ones(3, 4)}, 1, cfg)
    with pytest.raises(ValueError, match=r"masks has key 'v' that is not in params"):
        prune(params, {"v": torch.ones(3, 4, dtype=torch.bool)}, 1, cfg)
    with pytest.raises(TypeError, match=r"step must be a Python int, got step=tensor\(1\)"):
        pruning_layer_sparsities({"w": (3, 4)}, torch.tensor(1), cfg)
    with pytest.raises(TypeError, match=r"cfg must be a PruningConfig, got cfg=\{'t0': 0\}"):
        pruning_steps({"t0": 0})


def test_public_exports():
    import rigl_func

    for name in ("PruningConfig", "prune", "init_pruning_masks", "pruning_sparsity", "is_pruning_step",
                 "pruning_target_nnz", "mean_density_over_training", "snip_masks", "snip_init"):
        assert name in rigl_func.__all__ and hasattr(rigl_func, name)
    assert rigl_func.prune is prune

"""Every dynamic-sparse-training row of the RigL paper's comparison is a config value.

``RigLConfig(method=...)``: ``"rigl"`` (drop |w|, grow |g|), ``"set"`` (grow uniformly
at random, Mocanu et al. 2018), ``"snfs"`` (grow by |EMA of dense gradients|,
Dettmers & Zettlemoyer 2019 as simplified by RigL), ``"static"`` (masks never
change). Each method is tested on its defining property:

* SET: growth is a pure function of (seed, step, layer): same seed gives identical
  masks in another process, a different seed differs, the grown positions are the
  top random scores among the positions not kept, and every such position is
  chosen with the same frequency over many keys (chi-square bound).
* SNFS: the EMA matches a hand computation over 3 steps; growth follows |EMA|, not |g|.
* static: ``is_update_step`` is always False and the masks never change.
* schedules and grow initializations: inverse-power goldens, ``grow_init="normal"``
  (std of the layer's active weights) and ``"gradient"`` (``-scale * g``).
* custom criteria (3-argument, and 4-argument with an ``aux`` momentum tree):
  ``vmap`` equals a loop; ``torch.compile(fullgraph=True)`` equals eager (exactly,
  random criteria included; ``allclose`` for ``grow_init="normal"``, whose log/cos
  the compiler may evaluate a few ulps differently) without recompiling.
* resume: a run saved with ``torch.save`` and restored with ``torch.load`` continues
  with exactly the masks of an uninterrupted run (SET and SNFS).

The compile backend defaults to inductor (as in ``test_composition.py``); set
``RIGL_FUNC_TEST_COMPILE_BACKEND=aot_eager`` for a quicker run that still checks
full-graph capture and recompilation. Inductor's inlining is capped while compiling
(``realize_opcount_threshold``, see ``_inductor_options``): without it the first
(cold-cache) compile of the random criteria takes minutes on a 2-core CPU.
"""

from __future__ import annotations

import warnings

import contextlib
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from _timeouts import timeout_s

import rigl_func as rf
from rigl_func import (
    RigLConfig,
    RigLState,
    accumulate,
    apply_masks,
    drop,
    drop_fraction,
    grow,
    init_state,
    is_update_step,
    target_nnz,
    update_layer,
    update_topology,
)
from rigl_func.config import METHODS
from rigl_func.random import fold_in, layer_id, uniform

COMPILE_BACKEND = os.environ.get("RIGL_FUNC_TEST_COMPILE_BACKEND", "inductor")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------
# Helpers: a tiny regression MLP as a dict of params, and a functional training loop.

def _problem(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = {
        "fc1.weight": 0.5 * torch.randn(16, 8, generator=gen),
        "fc1.bias": torch.zeros(16),
        "fc2.weight": 0.5 * torch.randn(3, 16, generator=gen),
        "fc2.bias": torch.zeros(3),
    }
    x = torch.randn(64, 8, generator=gen)
    y = torch.randn(64, 3, generator=gen)
    return {k: v.to(device) for k, v in params.items()}, x.to(device), y.to(device)


def _loss(p, x, y):
    h = torch.tanh(x @ p["fc1.weight"].T + p["fc1.bias"])
    return ((h @ p["fc2.weight"].T + p["fc2.bias"] - y) ** 2).mean()


def _train(cfg, params, state, momentum, x, y, start, stop):
    """Steps ``start + 1 .. stop``; the batch of step t depends on t only."""
    grad_fn = torch.func.grad(_loss)
    for step in range(start + 1, stop + 1):
        idx = torch.randint(0, x.shape[0], (16,), generator=torch.Generator().manual_seed(step)).to(x.device)
        grads = grad_fn(params, x[idx], y[idx])
        state = accumulate(state, grads, cfg)
        if is_update_step(step, cfg):
            old = state.masks
            params, state = update_topology(params, grads, state, cfg)
            momentum = rf.reset_optimizer_state(momentum, old, state.masks)
        else:
            g = apply_masks(grads, state.masks)
            momentum = {k: 0.9 * momentum[k] + g[k] for k in params}
            params = {k: params[k] - 0.05 * momentum[k] for k in params}
    return params, state, momentum


def _start(cfg, device, seed=0):
    params, x, y = _problem(device)
    state = init_state(params, cfg, seed=seed)
    params = apply_masks(params, state.masks)
    return params, state, {k: torch.zeros_like(v) for k, v in params.items()}, x, y


def _stack(trees):
    flats = [tree_flatten(t) for t in trees]
    return tree_unflatten([torch.stack(xs) for xs in zip(*(f[0] for f in flats))], flats[0][1])


def _assert_same(a, b):
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


from conftest import CountingBackend  # noqa: E402  (shared test helper)


# ---------------------------------------------------------------------------------
# Every method is a config value.

@pytest.mark.parametrize("method", ["rigl", "set", "snfs", "static"])
def test_each_method_runs_by_changing_one_config_value(method, device):
    cfg = RigLConfig(t_end=30, delta=5, sparsity=0.75, distribution="erk", method=method)
    assert (cfg.drop_criterion, cfg.grow_criterion, cfg.ema_momentum) == METHODS[method]
    params, state, momentum, x, y = _start(cfg, device)
    initial = {k: m.clone() for k, m in state.masks.items()}
    nnz = target_nnz({k: tuple(m.shape) for k, m in state.masks.items()}, cfg)
    params, state, _ = _train(cfg, params, state, momentum, x, y, 0, 40)
    assert int(state.step) == 40
    assert int(state.num_updates) == (0 if method == "static" else 5)  # steps 5, 10, ..., 25
    for k, m in state.masks.items():
        assert int(m.sum()) == nnz[k]
        assert not params[k][~m].any()
    changed = any(not torch.equal(state.masks[k], initial[k]) for k in initial)
    assert changed == (method != "static")
    assert set(state.ema) == (set(state.masks) if method == "snfs" else set())


def test_methods_differ_only_in_their_growth():
    """Same data, same initial masks: RigL, SET and SNFS choose different connections."""
    finals = {}
    for method in ("rigl", "set", "snfs"):
        cfg = RigLConfig(t_end=30, delta=5, sparsity=0.75, distribution="erk", method=method)
        params, state, momentum, x, y = _start(cfg, "cpu")
        _, state, _ = _train(cfg, params, state, momentum, x, y, 0, 10)
        finals[method] = state.masks["fc1.weight"]
    assert not torch.equal(finals["rigl"], finals["set"])
    assert not torch.equal(finals["rigl"], finals["snfs"])


# ---------------------------------------------------------------------------------
# SET.

def _set_layer_case(device):
    cfg = RigLConfig(t_end=100, delta=10, sparsity=0.75, distribution="uniform", method="set",
                     schedule="constant", alpha=0.5)
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(5, 8, generator=gen).to(device)}
    state = init_state(params, cfg, seed=11)
    return cfg, apply_masks(params, state.masks), state


def test_set_grows_top_random_scores_among_positions_not_kept(device):
    """The grown entries are the n highest ``uniform(key)`` scores among the entries
    not kept (inactive or just dropped), with ``key = fold_in(fold_in(seed, step),
    layer_id(name))``: reproducible from the seed, step and name alone."""
    cfg, params, state = _set_layer_case(device)
    grads = {"w": torch.randn(5, 8, generator=torch.Generator().manual_seed(4)).to(device)}
    for _ in range(10):
        state = accumulate(state, grads, cfg)
    new_params, new_state = update_topology(params, grads, state, cfg)

    mask = state.masks["w"]
    n = math.floor(0.5 * int(mask.sum()))  # constant schedule: 5 of 10
    kept = drop(params["w"].abs(), mask, n)
    key = fold_in(fold_in(torch.tensor(11, device=device), 10), layer_id("w"))
    expected = grow(uniform(key, (5, 8), device), kept, n)
    assert torch.equal(new_state.masks["w"], expected)
    assert int((expected & ~kept).sum()) == n
    # growth ignores the gradients
    other = {"w": torch.randn(5, 8, generator=torch.Generator().manual_seed(5)).to(device)}
    assert torch.equal(update_topology(params, other, state, cfg)[1].masks["w"], expected)


def test_set_same_masks_for_same_seed_different_for_other_seed_or_key(device):
    cfg, params, state = _set_layer_case(device)
    grads = {"w": torch.zeros(5, 8, device=device)}
    for _ in range(10):
        state = accumulate(state, grads, cfg)
    torch.manual_seed(1234)  # the global RNG plays no part
    a = update_topology(params, grads, state, cfg)[1].masks["w"]
    torch.rand(7)
    b = update_topology(params, grads, state, cfg)[1].masks["w"]
    c = update_topology(params, grads, state._replace(key=state.key + 1), cfg)[1].masks["w"]
    d = update_topology(params, grads, state._replace(step=state.step + 10), cfg)[1].masks["w"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # another seed: other positions
    assert not torch.equal(a, d)  # another step: other positions


_SET_SCRIPT = textwrap.dedent(
    """
    import hashlib
    import torch
    import rigl_func as rf

    def set_checksum(seed):
        cfg = rf.RigLConfig(t_end=50, delta=5, sparsity=0.8, distribution="uniform", method="set")
        gen = torch.Generator().manual_seed(123)  # weights and gradients do not depend on seed
        params = {"a.weight": torch.randn(12, 10, generator=gen), "b.weight": torch.randn(5, 12, generator=gen)}
        state = rf.init_state(params, cfg, seed=seed)
        params = rf.apply_masks(params, state.masks)
        digest = hashlib.sha256()
        for step in range(1, 41):
            grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
            state = rf.accumulate(state, grads, cfg)
            if rf.is_update_step(step, cfg):
                params, state = rf.update_topology(params, grads, state, cfg)
                for k in sorted(state.masks):
                    digest.update(bytes(state.masks[k].to(torch.uint8).flatten().tolist()))
        return digest.hexdigest()
    """
)


def test_set_same_seed_identical_masks_in_another_process():
    namespace: dict = {}
    exec(_SET_SCRIPT, namespace)
    torch.rand(5)  # disturb this process's global RNG
    here = namespace["set_checksum"](7)
    code = _SET_SCRIPT + "\ntorch.manual_seed(987)\nprint(set_checksum(7))\nprint(set_checksum(8))\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout_s(600), check=True).stdout.split()
    assert out[0] == here
    assert out[1] != here


def test_set_growth_is_uniform_over_candidates():
    """Over 1400 keys, each of the 35 positions not kept is grown ~200 times.

    A layer of 40 entries keeps 5 of its 10 active ones (|w| is fixed) and grows 5
    of the other 35. Pearson's statistic over the 35 counts has mean ~34 (slightly
    less: draws within one update are without replacement) and sd ~8; we require
    < 34 + 5 * 8.2, and every candidate grown at least 100 times."""
    cfg = RigLConfig(t_end=100, delta=10, sparsity=0.75, distribution="uniform", method="set",
                     schedule="constant", alpha=0.5)
    params = {"w": torch.linspace(-2.0, 2.0, 40).reshape(5, 8)}
    state = init_state(params, cfg, seed=0)
    params = apply_masks(params, state.masks)
    grads = {"w": torch.zeros(5, 8)}
    draws = 1400
    states = state._replace(key=torch.arange(draws, dtype=torch.int64), step=torch.tensor(10))
    dims = RigLState(masks=None, step=None, num_updates=None, grad_acc=None, ema=None, key=0)
    _, batched = vmap(update_topology, in_dims=(None, None, dims, None))(params, grads, states, cfg)
    new = batched.masks["w"]  # [draws, 5, 8]
    kept = drop(params["w"].abs(), state.masks["w"], 5)
    assert bool((new & kept).sum(dim=(1, 2)).eq(5).all())  # the 5 largest |w| always stay
    assert bool(new.sum(dim=(1, 2)).eq(10).all())
    counts = (new & ~kept).sum(0)[~kept].double()  # the 35 candidates
    expected = draws * 5 / 35
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 34 + 5 * math.sqrt(2 * 34), chi2
    assert float(counts.min()) >= 100, counts
    just_dropped = (state.masks["w"] & ~kept)[~kept]
    assert float(counts[just_dropped].mean()) > 100  # just-dropped positions are regrown too


@settings(max_examples=40)
@given(st.data())
def test_set_and_snfs_update_properties(data):
    """Random layers: nnz conserved, the (nnz - n) largest |w| kept, grown entries were
    not kept (inactive or just dropped), new ones at 0, inactive exactly 0, inputs
    untouched; n = min(floor(f * nnz), inactive count)."""
    rows, cols = data.draw(st.integers(1, 6)), data.draw(st.integers(2, 8))
    numel = rows * cols
    nnz = data.draw(st.integers(1, numel - 1))
    fraction = data.draw(st.floats(0.0, 1.0))
    criterion = data.draw(st.sampled_from(["random", "ema"]))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=gen)[:nnz]] = True
    mask = mask.reshape(rows, cols)
    w = torch.randn(rows, cols, generator=gen) * mask
    g, ema = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen)
    inputs = [t.clone() for t in (w, g, mask, ema)]
    p, new = update_layer(w, g, mask, fraction, max_n=nnz, grow_criterion=criterion,
                          extras={"key": torch.tensor(seed), "ema": ema})
    for before, after in zip(inputs, (w, g, mask, ema)):
        assert torch.equal(before, after)
    n = min(math.floor(fraction * nnz), numel - nnz)
    kept = drop(w.abs(), mask, n)
    assert int(new.sum()) == nnz
    assert bool((kept & ~new).sum() == 0)                      # the largest |w| stay
    grown = new & ~kept
    assert int(grown.sum()) == n                               # n grown among the not-kept
    assert torch.equal(p[new & mask], w[new & mask])           # kept (or regrown) keep their value
    assert not p[~new].any() and not p[new & ~mask].any()      # inactive and new: exactly 0
    if criterion == "ema":                                     # SNFS: the n largest |EMA| not kept
        assert torch.equal(new, grow(ema.abs(), kept, n))


# ---------------------------------------------------------------------------------
# SNFS.

def test_snfs_ema_matches_hand_computation(device):
    cfg = RigLConfig(t_end=100, delta=10, sparsity=0.5, distribution="uniform", method="snfs")
    assert (cfg.ema_momentum, cfg.grow_criterion) == (0.9, "ema")
    state = init_state({"w": torch.zeros(2, 2, device=device)}, cfg, seed=0)
    g = [torch.tensor(v, device=device) for v in ([[1.0, -2.0], [0.0, 4.0]], [[2.0, 0.0], [1.0, -4.0]],
                                                  [[4.0, 2.0], [0.0, 0.0]])]
    # m1 = 0.1 g1; m2 = 0.9 m1 + 0.1 g2; m3 = 0.9 m2 + 0.1 g3 = 0.081 g1 + 0.09 g2 + 0.1 g3
    expected = [[[0.1, -0.2], [0.0, 0.4]], [[0.29, -0.18], [0.1, -0.04]], [[0.661, 0.038], [0.09, -0.036]]]
    for grads, want in zip(g, expected):
        state = accumulate(state, {"w": grads}, cfg)
        torch.testing.assert_close(state.ema["w"], torch.tensor(want, device=device), rtol=1e-6, atol=1e-7)
    assert int(state.step) == 3
    # the EMA is not reset by a topology update
    with warnings.catch_warnings():  # a hand-built state at step 3, off the schedule: expected
        warnings.filterwarnings("ignore", message="update_topology was called at a state.step that is not")
        _, after = update_topology({"w": torch.zeros(2, 2, device=device)}, {"w": g[0]}, state, cfg)
    assert torch.equal(after.ema["w"], state.ema["w"])


def test_ema_momentum_is_configurable():
    cfg = RigLConfig(t_end=100, delta=10, sparsity=0.5, distribution="uniform", grow_criterion="ema",
                     ema_momentum=0.5)
    state = init_state({"w": torch.zeros(2, 2)}, cfg, seed=0)
    for value in (1.0, 2.0, 4.0):
        state = accumulate(state, {"w": torch.full((2, 2), value)}, cfg)
    assert state.ema["w"][0, 0].item() == 0.125 * 1 + 0.25 * 2 + 0.5 * 4


@pytest.mark.parametrize("method, grown", [("snfs", 5), ("rigl", 3)])
def test_snfs_grows_by_ema_not_gradient(method, grown, device):
    cfg = RigLConfig(t_end=100, delta=10, sparsity=0.5, distribution="uniform", alpha=0.4,
                     schedule="constant", method=method)
    params = {"w": torch.tensor([[3.0, 2.0, 1.0, 0.0, 0.0, 0.0]], device=device)}
    state = init_state(params, cfg, masks={"w": params["w"] != 0})
    grads = {"w": torch.tensor([[0.0, 0.0, 0.0, 10.0, 0.1, 0.1]], device=device)}
    if method == "snfs":
        state = state._replace(ema={"w": torch.tensor([[0.0, 0.0, 0.0, 0.1, 0.1, -5.0]], device=device)})
    with warnings.catch_warnings():  # a hand-built state at step 0 (f = alpha): expected
        warnings.filterwarnings("ignore", message="update_topology at state.step=0")
        new_params, new_state = update_topology(params, grads, state, cfg)  # n = floor(0.4 * 3) = 1
    expected = torch.tensor([[True, True, False, False, False, False]], device=device)
    expected[0, grown] = True
    assert torch.equal(new_state.masks["w"], expected)
    assert new_params["w"].tolist() == [[3.0, 2.0, 0.0, 0.0, 0.0, 0.0]]


# ---------------------------------------------------------------------------------
# Static.

def test_static_never_updates(device):
    cfg = RigLConfig(t_end=100, delta=10, method="static")
    twin = RigLConfig(t_end=100, delta=10, method="rigl")
    steps = torch.arange(0, 301, device=device)
    assert not any(is_update_step(s, cfg) for s in range(301))
    assert not bool(is_update_step(steps, cfg).any())
    assert int(is_update_step(steps, twin).sum()) == 9  # 10, 20, ..., 90


# ---------------------------------------------------------------------------------
# Inverse-power schedule: f = alpha * (1 - p)^k, p = clip((t - t_start) / (t_end - t_start), 0, 1).

@pytest.mark.parametrize(
    "step, t_start, power, expected",
    [
        (0, 0, 3.0, 0.3),
        (25, 0, 3.0, 0.1265625),    # 0.3 * 0.75^3
        (50, 0, 3.0, 0.0375),       # 0.3 * 0.5^3
        (75, 0, 3.0, 0.0046875),    # 0.3 * 0.25^3
        (100, 0, 3.0, 0.0),
        (150, 0, 3.0, 0.0),
        (10, 20, 3.0, 0.3),         # before t_start: alpha
        (60, 20, 3.0, 0.0375),      # p = 40 / 80
        (50, 0, 1.0, 0.15),         # k = 1: linear
        (50, 0, 2.0, 0.075),
        (50, 0, 0.5, 0.3 * math.sqrt(0.5)),
    ],
)
def test_inverse_power_goldens(step, t_start, power, expected, device):
    cfg = RigLConfig(t_end=100, delta=5, t_start=t_start, alpha=0.3, schedule="inverse_power", schedule_power=power)
    assert drop_fraction(step, cfg) == pytest.approx(expected, abs=1e-15)
    tensor = drop_fraction(torch.tensor(step, device=device), cfg)
    assert tensor.dtype == torch.float64 and tensor.item() == pytest.approx(expected, abs=1e-15)


def test_inverse_power_replaced_count(device):
    cfg = RigLConfig(t_end=100, delta=25, alpha=0.3, sparsity=0.5, distribution="uniform",
                     schedule="inverse_power", schedule_power=3.0)
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(10, 8, generator=gen).to(device)}
    state = init_state(params, cfg, seed=0)
    params = apply_masks(params, state.masks)
    base = torch.randn(10, 8, generator=gen).to(device)
    replaced = []
    for step in range(1, 100):
        grads = {"w": torch.where(state.masks["w"], 0.0, base)}  # dropped entries are not regrown
        state = accumulate(state, grads, cfg)
        if is_update_step(step, cfg):
            old = state.masks["w"]
            params, state = update_topology(params, grads, state, cfg)
            replaced.append(int((old & ~state.masks["w"]).sum()))
    # nnz 40: floor(40 * 0.3 * 0.75^3) = 5, floor(40 * 0.0375) = 1, floor(40 * 0.0046875) = 0
    assert replaced == [5, 1, 0]


# ---------------------------------------------------------------------------------
# Grow initialization.

def _grow_init_case(grow_init, scale, device):
    cfg = RigLConfig(t_end=100, delta=10, sparsity=0.5, distribution="uniform", alpha=0.5, schedule="constant",
                     grow_init=grow_init, grow_init_scale=scale)
    gen = torch.Generator().manual_seed(0)
    params = {"w": (0.5 * torch.randn(32, 32, generator=gen) + 0.2).to(device)}
    state = init_state(params, cfg, seed=0)
    params = apply_masks(params, state.masks)
    # dense gradient zero on active entries: the 256 grown are all genuinely new
    grads = {"w": torch.where(state.masks["w"], 0.0, torch.randn(32, 32, generator=gen).to(device))}
    for _ in range(10):
        state = accumulate(state, grads, cfg)
    new_params, new_state = update_topology(params, grads, state, cfg)
    return params, grads, state, new_params, new_state


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_grow_init_normal(scale, device):
    params, _, state, new_params, new_state = _grow_init_case("normal", scale, device)
    old, new = state.masks["w"], new_state.masks["w"]
    fresh = new & ~old
    assert int(fresh.sum()) == 256
    active = params["w"][old]
    std = active.std(unbiased=False)
    values = new_params["w"][fresh]
    assert bool((values != 0).all())
    assert float(values.std() / (scale * std)) == pytest.approx(1.0, abs=0.12)
    assert abs(float(values.mean())) < 0.25 * scale * float(std)  # centred at 0, not at the weights' mean
    assert torch.equal(new_params["w"][new & old], params["w"][new & old])  # kept: unchanged
    assert not new_params["w"][~new].any()
    if scale == 2.0:  # same key: exactly twice the scale-1 values
        unit = _grow_init_case("normal", 1.0, device)[3]
        assert torch.equal(values, 2.0 * unit["w"][fresh])


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_grow_init_gradient(scale, device):
    params, grads, state, new_params, new_state = _grow_init_case("gradient", scale, device)
    old, new = state.masks["w"], new_state.masks["w"]
    fresh = new & ~old
    assert int(fresh.sum()) == 256
    assert torch.equal(new_params["w"][fresh], -scale * grads["w"][fresh])
    assert torch.equal(new_params["w"][new & old], params["w"][new & old])
    assert not new_params["w"][~new].any()


@pytest.mark.parametrize("grow_init", ["zeros", "normal", "gradient"])
def test_regrown_just_dropped_connection_keeps_its_value(grow_init, device):
    w = torch.tensor([[0.5, 0.1], [0.0, 0.0]], device=device)
    m = torch.tensor([[True, True], [False, False]], device=device)
    key = {"key": torch.tensor(0, device=device)}
    # index 1 (|w| = 0.1) is dropped and, having the largest gradient, regrown: it keeps 0.1
    g = torch.tensor([[0.0, 9.0], [1.0, 0.2]], device=device)
    p, m2 = update_layer(w, g, m, 0.5, max_n=1, grow_init=grow_init, extras=key)
    assert m2.tolist() == [[True, True], [False, False]] and p.tolist() == w.tolist()
    # index 2 is genuinely new: initialized by grow_init
    g = torch.tensor([[0.0, 0.1], [9.0, 0.2]], device=device)
    p, m2 = update_layer(w, g, m, 0.5, max_n=1, grow_init=grow_init, extras=key)
    assert m2.tolist() == [[True, False], [True, False]]
    assert p[0].tolist() == [0.5, 0.0] and p[1, 1].item() == 0.0
    value = p[1, 0].item()
    if grow_init == "zeros":
        assert value == 0.0
    elif grow_init == "gradient":
        assert value == -9.0
    else:
        assert value != 0.0  # N(0, std of {0.5, 0.1} = 0.2)


# ---------------------------------------------------------------------------------
# Custom criteria: one plain function, 3 or 4 arguments.

LR = 0.1


def drop_by_lookahead(param, grad, mask):
    """|w - lr g|: the magnitude after the pending SGD step."""
    return (param - LR * grad).abs()


def grow_by_agreement(param, grad, mask, extras):
    """g * m with m from ``aux={"momentum": ...}``: gradient agreeing with its momentum."""
    return grad * extras["momentum"]


def test_custom_criteria_drive_the_selection(device):
    w = torch.tensor([[1.0, 0.75, 0.0, 0.0]], device=device)
    m = torch.tensor([[True, True, False, False]], device=device)
    g = torch.tensor([[5.0, 0.0, -1.0, 2.0]], device=device)
    mom = torch.tensor([[0.0, 0.0, -3.0, 1.0]], device=device)
    p, m2 = update_layer(w, g, m, 0.5, max_n=1, drop_criterion=drop_by_lookahead,
                         grow_criterion=grow_by_agreement, extras={"momentum": mom})
    # lookahead drops index 0 (|1 - 0.5| < 0.75); agreement grows index 2 (3 > 2)
    assert m2.tolist() == [[False, True, True, False]]
    assert p.tolist() == [[0.0, 0.75, 0.0, 0.0]]
    # the built-in criteria would have chosen differently
    _, m3 = update_layer(w, g, m, 0.5, max_n=1)
    assert m3.tolist() == [[True, False, False, True]]


def _custom_config(**kw):
    return RigLConfig(t_end=40, delta=4, sparsity=0.5, distribution="uniform", alpha=0.5,
                      drop_criterion=drop_by_lookahead, grow_criterion=grow_by_agreement, **kw)


VMAP_CONFIGS = {
    "custom": _custom_config(),
    "set_normal": RigLConfig(t_end=40, delta=4, sparsity=0.5, distribution="uniform", alpha=0.5, method="set",
                             grow_init="normal"),
    "snfs_gradient": RigLConfig(t_end=40, delta=4, sparsity=0.5, distribution="uniform", alpha=0.5,
                                method="snfs", grow_init="gradient"),
}


@pytest.mark.parametrize("name", sorted(VMAP_CONFIGS))
def test_vmap_equals_loop(name, device):
    cfg = VMAP_CONFIGS[name]
    k = 3
    gen = torch.Generator().manual_seed(2)
    params, states, grads, moms = [], [], [], []
    for i in range(k):
        p = {"a": torch.randn(6, 5, generator=gen).to(device), "b": torch.randn(3, 6, generator=gen).to(device)}
        s = init_state(p, cfg, seed=i)
        for _ in range(4):
            g = {n: torch.randn(v.shape, generator=gen).to(device) for n, v in p.items()}
            s = accumulate(s, g, cfg)
        params.append(apply_masks(p, s.masks))
        states.append(s)
        grads.append(g)
        moms.append({n: torch.randn(v.shape, generator=gen).to(device) for n, v in p.items()})
    batched = vmap(update_topology, in_dims=(0, 0, 0, None, 0))(
        _stack(params), _stack(grads), _stack(states), cfg, {"momentum": _stack(moms)})
    looped = [update_topology(p, g, s, cfg, aux={"momentum": m}) for p, g, s, m in zip(params, grads, states, moms)]
    _assert_same(batched, _stack(looped))
    assert not torch.equal(looped[0][1].masks["a"], looped[1][1].masks["a"])


def _inductor_options():
    """Cap inductor's inlining of pointwise chains: the counter-based hash
    (:mod:`rigl_func.random`) reuses every intermediate twice, and without a cap
    inductor's CPU code generation re-traces it exponentially (a SET +
    ``grow_init="normal"`` update took ~5 min to compile cold on 2 cores; ~20 s with it).
    Code generation only: results are the same."""
    try:
        return torch._inductor.config.patch(realize_opcount_threshold=8)
    except (AttributeError, RuntimeError):  # an older torch without the knob
        return contextlib.nullcontext()


def _compile_run(cfg, device, steps=12):
    """Eager and compiled update_topology side by side over the update steps."""
    torch._dynamo.reset()
    backend = CountingBackend(COMPILE_BACKEND)
    compiled = torch.compile(update_topology, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(6, 4, generator=gen).to(device)}
    state = init_state(params, cfg, seed=5)
    params = apply_masks(params, state.masks)
    momentum = {"w": torch.zeros(6, 4, device=device)}
    pairs = []
    for step in range(1, steps + 1):
        grads = {"w": torch.randn(6, 4, generator=gen).to(device)}
        momentum = {"w": 0.9 * momentum["w"] + grads["w"]}
        state = accumulate(state, grads, cfg)
        if not is_update_step(step, cfg):
            continue
        eager = update_topology(params, grads, state, cfg, {"momentum": momentum})
        with _inductor_options():
            comp = compiled(params, grads, state, cfg, {"momentum": momentum})
        pairs.append((eager, comp))
        params, state = eager
        assert backend.calls == 1, f"recompiled at step {step}"
    assert len(pairs) == steps // cfg.delta
    return pairs


def test_compile_custom_criteria_equals_eager(device):
    for (ep, es), (cp, cs) in _compile_run(_custom_config(), device):
        _assert_same(cs, es)
        _assert_same(cp, ep)


def test_compile_random_growth_and_normal_init(device):
    """SET + ``grow_init="normal"``: masks (random growth) exactly equal, new weights
    allclose (Box-Muller's log/cos may differ by a few ulps under the compiler)."""
    cfg = RigLConfig(t_end=40, delta=4, sparsity=0.5, distribution="uniform", alpha=0.5, method="set",
                     grow_init="normal")
    for (ep, es), (cp, cs) in _compile_run(cfg, device):
        _assert_same(cs.masks, es.masks)
        _assert_same((cs.step, cs.num_updates, cs.key), (es.step, es.num_updates, es.key))
        torch.testing.assert_close(cp, ep, rtol=1e-5, atol=1e-6)
        assert bool((cp["w"] != 0).eq(cs.masks["w"]).all())  # exact zeros stay exact


# ---------------------------------------------------------------------------------
# Resume from a saved state.

@pytest.mark.parametrize("method, grow_init", [("set", "normal"), ("snfs", "zeros")])
def test_resume_from_saved_state_gives_identical_masks(method, grow_init, tmp_path, device):
    cfg = RigLConfig(t_end=40, delta=5, sparsity=0.75, distribution="erk", method=method, grow_init=grow_init)
    params, state, momentum, x, y = _start(cfg, device, seed=3)
    full = _train(cfg, params, state, momentum, x, y, 0, 40)

    params, state, momentum = _train(cfg, params, state, momentum, x, y, 0, 13)  # stop between updates
    if method == "snfs":
        assert state.ema["fc1.weight"].abs().sum() > 0
    torch.save({"params": params, "state": state, "momentum": momentum}, tmp_path / "ckpt.pt")
    del params, state, momentum
    torch.manual_seed(999)  # a resumed process has another global RNG state
    with torch.serialization.safe_globals([RigLState]):
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert isinstance(ckpt["state"], RigLState)
    resumed = _train(cfg, ckpt["params"], ckpt["state"], ckpt["momentum"], x, y, 13, 40)

    _assert_same(resumed[1], full[1])  # masks, counters, EMA, key
    _assert_same(resumed[0], full[0])  # and weights
    assert int(resumed[1].num_updates) == 7  # 5, 10, ..., 35


# ---------------------------------------------------------------------------------
# The example script, in smoke mode.

def test_custom_criterion_example_smoke(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("custom_criterion_example", ROOT / "examples" / "custom_criterion.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # torch.compile looks its globals up by module name
    spec.loader.exec_module(module)
    acc = module.main(steps=40, models=2, compile_backend="eager")
    assert 0.0 <= acc <= 1.0

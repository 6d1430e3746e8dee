"""The batched update (flat buffers, segmented radix select) against the per-layer
oracle, and its GPU-readiness proxies measured on the CPU.

1. ``update_topology`` == ``update_topology_per_layer`` **bit for bit** (masks, params,
   state) on random, tie-heavy, NaN/inf and tiny-layer inputs, for RigL, SET, SNFS,
   custom criteria with ``aux``, every ``grow_init``, accumulation and mixed dtypes.
2. ``take_top_rows`` == a per-row ``select_top`` (the primitive the oracle uses).
3. Kernel-launching ATen ops per update do not grow with the number of layers (the
   issue's target: at most 1 per additional layer; built-in criteria reach 0).
4. No host sync and no host-to-device copy in an update (state on the ``meta``
   device stands in for an accelerator: any copy from the host is counted).
5. Inputs are not modified.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rigl_func as rf
from rigl_func.dispatch import count_ops
from rigl_func.row_select import order_keys, pad_rows, take_top_rows
from rigl_func.selection import select_top
from rigl_func.testing import make_scores
from rigl_func.topology import update_topology_per_layer

from conftest import assert_trees_equal, clone_tree, same_tree, stack_trees







def _values(gen: torch.Generator, shape, kind: str, dtype) -> torch.Tensor:
    return make_scores(shape, kind, gen, dtype)  # random, tie-heavy (+-0.0) or NaN/inf


def _momentum_grow(param, grad, mask, extras):
    return (grad * extras["momentum"]).abs()


def _negative_drop(param, grad, mask):  # a drop score with negative values and ties
    return param.round() - 1.0


_METHODS = {
    "rigl": {},
    "set": {"method": "set"},
    "snfs": {"method": "snfs"},
    "custom": {"grow_criterion": _momentum_grow, "drop_criterion": _negative_drop},
    "acc2": {"grad_accumulation_n": 2},
}


@st.composite
def _case(draw):
    n_layers = draw(st.integers(1, 4))
    shapes = [tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))) for _ in range(n_layers)]
    return {
        "shapes": shapes,
        "method": draw(st.sampled_from(sorted(_METHODS))),
        "kind": draw(st.sampled_from(["random", "ties", "nonfinite"])),
        "grow_init": draw(st.sampled_from(["zeros", "gradient", "normal"])),
        "dtypes": draw(st.sampled_from(["float32", "float64", "mixed"])),
        "sparsity": draw(st.sampled_from([0.5, 0.8, 0.9])),
        "alpha": draw(st.sampled_from([0.3, 0.5, 1.0])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _world(case, device):
    gen = torch.Generator().manual_seed(case["seed"])
    dtypes = {"float32": [torch.float32], "float64": [torch.float64],
              "mixed": [torch.float32, torch.bfloat16, torch.float64]}[case["dtypes"]]
    params, grads, mom = {}, {}, {}
    for i, shape in enumerate(case["shapes"]):
        dtype = dtypes[i % len(dtypes)]
        name = f"layer{i}.weight"
        params[name] = _values(gen, shape, case["kind"], dtype).to(device)
        grads[name] = _values(gen, shape, case["kind"], dtype).to(device)
        mom[name] = _values(gen, shape, "random", dtype).to(device)
    cfg = rf.RigLConfig(t_end=1000, delta=10, sparsity=case["sparsity"], alpha=case["alpha"], distribution="uniform",
                        grow_init=case["grow_init"], include=(".*",), **_METHODS[case["method"]])
    state = rf.init_state(params, cfg, seed=case["seed"])
    params = rf.apply_masks(params, state.masks)
    for _ in range(10):  # reach the update step (and fill the accumulators)
        state = rf.accumulate(state, grads, cfg)
    aux = {"momentum": mom} if case["method"] == "custom" else None
    return params, grads, state, cfg, aux


@given(case=_case())
def test_batched_equals_per_layer_bitwise(case, device):
    params, grads, state, cfg, aux = _world(case, device)
    before = clone_tree((params, grads, state))
    p1, s1 = rf.update_topology(params, grads, state, cfg, aux, engine="batched")
    p2, s2 = update_topology_per_layer(params, grads, state, cfg, aux)
    assert_trees_equal((p1, s1), (p2, s2), bitwise=True)
    assert same_tree((params, grads, state), before)  # pure
    target = rf.target_nnz({k: tuple(m.shape) for k, m in state.masks.items()}, cfg)
    assert {k: int(m.sum()) for k, m in s1.masks.items()} == target  # exact nnz per layer
    for name, mask in s1.masks.items():
        assert bool((p1[name][~mask] == 0).all())  # inactive entries exactly 0


def test_batched_equals_per_layer_over_many_updates(device):
    """A whole run: 6 updates on ResNet-like layer sizes, masks and params identical."""
    gen = torch.Generator().manual_seed(3)
    shapes = {"conv1.weight": (16, 3, 3, 3), "conv2.weight": (32, 16, 3, 3), "fc.weight": (10, 32)}
    params = {k: torch.randn(s, generator=gen).to(device) for k, s in shapes.items()}
    cfg = rf.RigLConfig(t_end=100, delta=5, sparsity=0.9, distribution="erk")
    s1 = s2 = rf.init_state(params, cfg, seed=1)
    p1 = p2 = rf.apply_masks(params, s1.masks)
    for step in range(30):
        grads = {k: torch.randn(s, generator=gen).to(device) for k, s in shapes.items()}
        s1, s2 = rf.accumulate(s1, grads, cfg), rf.accumulate(s2, grads, cfg)
        if rf.is_update_step(step + 1, cfg):
            p1, s1 = rf.update_topology(p1, grads, s1, cfg, engine="batched")
            p2, s2 = update_topology_per_layer(p2, grads, s2, cfg)
    assert int(s1.num_updates) == 6
    assert_trees_equal((p1, s1), (p2, s2), bitwise=True)


@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.sampled_from(["random", "ties", "nonfinite"]),
       st.integers(0, 2**16), st.booleans())
def test_take_top_rows_equals_per_row_select_top(sizes, kind, seed, largest):
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    values = _values(gen, (total,), kind, torch.float32)
    eligible = torch.rand(total, generator=gen) < 0.7
    counts = [int(torch.randint(0, int(e.sum()) + 1, (), generator=gen)) for e in eligible.split(sizes)]
    width = max(sizes)
    keys = order_keys(values if largest else -values, eligible)  # NaN first either way (as drop does)
    rows_keys = pad_rows(list(keys.split(sizes)), width, -(2**31))
    rows_eligible = pad_rows(list(eligible.split(sizes)), width, False)
    k = max(max(counts), 1)
    got = take_top_rows(rows_keys, rows_eligible, torch.tensor(counts), k)
    want = [select_top(v if largest else -v, e, c) for v, e, c in zip(values.split(sizes), eligible.split(sizes), counts)]
    for row, w, n in zip(got.unbind(0), want, sizes):
        assert torch.equal(row[:n], w) and not row[n:].any()
    assert got.sum(1).tolist() == counts


def _launches(n_layers: int, method: str, device="cpu", width: int = 24) -> tuple[int, int, int]:
    params = {f"l{i}.weight": torch.randn(width, width + i) for i in range(n_layers)}
    cfg = rf.RigLConfig(t_end=100, delta=10, sparsity=0.9, distribution="erk", **_METHODS[method])
    state = rf.init_state(params, cfg, seed=0)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    for _ in range(10):
        state = rf.accumulate(state, grads, cfg)
    if device == "meta":
        to = lambda tree: {k: v.to("meta") for k, v in tree.items()}  # noqa: E731
        params, grads = to(params), to(grads)
        state = rf.RigLState(to(state.masks), state.step.to("meta"), state.num_updates.to("meta"),
                             to(state.grad_acc), to(state.ema), state.key.to("meta"))
    aux = {"momentum": grads} if method == "custom" else None
    rf.update_topology(params, grads, state, cfg, aux, engine="batched")  # warm-up: builds cached constants
    with count_ops() as ops:
        rf.update_topology(params, grads, state, cfg, aux, engine="batched")
    return ops.launches, ops.syncs, ops.host_to_device


@pytest.mark.parametrize("method", ["rigl", "set", "snfs", "acc2"])
def test_update_op_count_does_not_grow_with_layers(method):
    """Issue target: <= 1 kernel-launching op per additional sparse layer; built-in
    criteria need none (the per-layer loop took ~96 per layer)."""
    small, _, _ = _launches(4, method)
    large, _, _ = _launches(16, method)
    assert large - small <= 0, f"{method}: {small} launches for 4 layers, {large} for 16"
    assert small < 400


def test_custom_criterion_costs_only_its_own_ops_per_layer():
    small, _, _ = _launches(4, "custom")
    large, _, _ = _launches(16, "custom")
    per_layer = (large - small) / 12
    # _momentum_grow: mul + abs; _negative_drop: round + sub; one cat input each: no more.
    assert per_layer <= 4, per_layer


@pytest.mark.parametrize("method", ["rigl", "set", "snfs", "acc2"])
def test_update_makes_no_sync_and_no_host_to_device_copy(method):
    launches, syncs, host_to_device = _launches(6, method, device="meta")
    assert syncs == 0 and host_to_device == 0, (syncs, host_to_device)


def test_grow_init_normal_batched_path_has_no_host_copy():
    params = {f"l{i}.weight": torch.randn(8, 8, device="meta") for i in range(3)}
    cfg = rf.RigLConfig(t_end=100, delta=10, sparsity=0.5, distribution="uniform", grow_init="normal")
    masks = {k: torch.ones(8, 8, dtype=torch.bool, device="meta") for k in params}
    z = torch.zeros((), dtype=torch.int64, device="meta")
    state = rf.RigLState(masks, z + 10, z, {}, {}, z)
    rf.update_topology(params, params, state, cfg)
    with count_ops() as ops:
        rf.update_topology(params, params, state, cfg)
    assert ops.syncs == 0 and ops.host_to_device == 0


def test_masks_and_params_come_back_as_views_of_flat_buffers():
    params = {f"l{i}.weight": torch.randn(6, 5) for i in range(3)}
    cfg = rf.RigLConfig(t_end=100, delta=10, sparsity=0.8, distribution="uniform")
    state = rf.init_state(params, cfg, seed=0)
    new_params, new_state = rf.update_topology(rf.apply_masks(params, state.masks), params, state._replace(
        step=torch.tensor(10)), cfg, engine="batched")
    storages = {m.untyped_storage().data_ptr() for m in new_state.masks.values()}
    assert len(storages) == 1
    assert all(new_params[k].shape == params[k].shape for k in params)
    assert math.prod(new_params["l0.weight"].shape) == 30


def test_auto_engine_is_batched_off_the_cpu():
    small, _, _ = _launches(4, "rigl", device="meta")
    large, _, _ = _launches(16, "rigl", device="meta")
    assert large == small  # meta stands in for an accelerator: the batched engine ran


def test_engine_name_is_checked():
    params = {"w": torch.randn(4, 4)}
    cfg = rf.RigLConfig(t_end=100, delta=10, sparsity=0.5, distribution="uniform")
    state = rf.init_state(params, cfg, seed=0)
    with pytest.raises(ValueError, match="engine must be 'auto', 'batched' or 'per_layer', got engine='fast'"):
        rf.update_topology(params, params, state, cfg, engine="fast")




@pytest.mark.parametrize("dtype_view", ["dtype view", "no batched dtype view (torch 2.11)"])
def test_batched_engine_under_vmap_equals_loop(dtype_view, request):
    if dtype_view != "dtype view":
        request.getfixturevalue("no_batched_dtype_view")
    shapes = {"a.weight": (6, 5), "b.weight": (4, 6, 3)}
    cfg = rf.RigLConfig(t_end=100, delta=10, sparsity=0.8, distribution="erk", method="set")
    worlds = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        state = rf.init_state(params, cfg, seed=seed)._replace(step=torch.tensor(10))
        grads = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        worlds.append((rf.apply_masks(params, state.masks), grads, state))
    loop = [rf.update_topology(p, g, s, cfg, engine="batched") for p, g, s in worlds]
    fn = lambda p, g, s: rf.update_topology(p, g, s, cfg, engine="batched")  # noqa: E731
    batched = torch.func.vmap(fn)(*[stack_trees([w[i] for w in worlds]) for i in range(3)])
    assert_trees_equal(batched, stack_trees(loop), bitwise=True)


def test_batched_engine_compiles_fullgraph_without_recompiles():
    from conftest import CountingBackend

    shapes = {"a.weight": (8, 5), "b.weight": (6, 8)}
    cfg = rf.RigLConfig(t_end=200, delta=5, sparsity=0.8, distribution="uniform")
    gen = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    state = rf.init_state(params, cfg, seed=0)
    params = rf.apply_masks(params, state.masks)
    backend = CountingBackend("inductor")
    compiled = torch.compile(lambda p, g, s: rf.update_topology(p, g, s, cfg, engine="batched"),
                             fullgraph=True, backend=backend)
    for step in range(3):
        grads = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        state = state._replace(step=torch.tensor(5 * (step + 1)))
        eager = rf.update_topology(params, grads, state, cfg, engine="batched")
        params, state = compiled(params, grads, state)
        assert_trees_equal((params, state), eager, bitwise=True)
    assert backend.calls == 1

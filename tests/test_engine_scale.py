"""The batched engine at scale (issue 17): exact under NaN / inf / signed zeros /
denormals, bounded bytes and memory, any number of layers and total size, several
devices, chunking that changes nothing.

Bytes and memory are deterministic proxies measured on ``meta`` tensors
(:func:`rigl_func.dispatch.count_ops`, :func:`rigl_func.dispatch.track_memory`), so
any model size can be checked on a CPU without allocating it.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rigl_func as rf
from rigl_func.dispatch import count_ops, track_memory
from rigl_func.model_shapes import resnet50_shapes
from rigl_func.topology import update_topology_per_layer

from conftest import assert_trees_equal, clone_tree, same_tree, stack_trees

_SPECIALS = [0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38, 1.0, -1.0, 0.5]


def _cfg(**kw):
    base = dict(t_end=1000, delta=10, sparsity=0.5, alpha=0.25, schedule="constant", distribution="uniform",
                include=(".*",))
    base.update(kw)
    return rf.RigLConfig(**base)


def _state(masks, step=10):
    z = torch.zeros((), dtype=torch.int64, device=next(iter(masks.values())).device)
    return rf.RigLState(dict(masks), z + step, z, {}, {}, z)


def test_issue_repro_nan_weight_is_dropped_before_an_exact_zero():
    """The issue's case: active ``0.0`` and NaN weights; per-layer drops the NaN."""
    w = {"w": torch.tensor([0.0, math.nan, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0])}
    g = {"w": torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])}
    state = _state({"w": torch.tensor([True] * 4 + [False] * 4)})
    cfg = _cfg()
    p1, s1 = rf.update_topology(w, g, state, cfg, engine="batched")
    p2, s2 = update_topology_per_layer(w, g, state, cfg)
    assert s2.masks["w"].tolist() == [True, False, True, True, True, False, False, False]  # NaN dropped
    assert_trees_equal((p1, s1), (p2, s2), bitwise=True)
    # ... and under vmap (the step_ensemble path) the same.
    stacked = stack_trees([w, w]), stack_trees([g, g]), stack_trees([state, state])
    vp, vs = torch.func.vmap(lambda p, gg, s: rf.update_topology(p, gg, s, cfg, engine="batched"))(*stacked)
    assert_trees_equal((vp, vs), stack_trees([(p2, s2), (p2, s2)]), bitwise=True)


@st.composite
def _special_case(draw):
    n_layers = draw(st.integers(1, 5))
    sizes = [draw(st.integers(1, 70)) for _ in range(n_layers)]
    def values(n):
        return draw(st.lists(st.sampled_from(_SPECIALS) | st.floats(-4, 4, width=32), min_size=n, max_size=n))
    return {
        "sizes": sizes,
        "w": [values(n) for n in sizes],
        "g": [values(n) for n in sizes],
        "active": [draw(st.lists(st.booleans(), min_size=n, max_size=n)) for n in sizes],
        "alpha": draw(st.sampled_from([0.25, 0.5, 1.0])),
        "grow_init": draw(st.sampled_from(["zeros", "gradient"])),
        "accumulate": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        "chunk": draw(st.sampled_from([0, 1, 50])),
        "method": draw(st.sampled_from(["rigl", "set"])),
    }


def _special_world(case):
    dtype = case["dtype"]
    params = {f"l{i}": torch.tensor(w, dtype=torch.float32).to(dtype) for i, w in enumerate(case["w"])}
    grads = {f"l{i}": torch.tensor(g, dtype=torch.float32).to(dtype) for i, g in enumerate(case["g"])}
    masks = {f"l{i}": torch.tensor(a, dtype=torch.bool) for i, a in enumerate(case["active"])}
    cfg = _cfg(alpha=case["alpha"], grow_init=case["grow_init"], update_chunk=case["chunk"],
               grad_accumulation_n=2 if case["accumulate"] else 1, method=case.get("method", "rigl"))
    state = _state(masks)._replace(key=torch.tensor(len(case["sizes"])))
    if case["accumulate"]:
        state = state._replace(grad_acc={k: v * 0.5 for k, v in grads.items()})
    return params, grads, state, cfg


@given(case=_special_case())
def test_batched_equals_per_layer_with_nan_inf_zeros_and_denormals(case):
    """NaN / ±inf / ±0.0 / denormals / float32 max in weights *and* gradients, any mask
    (nnz not the config's target), several size classes, chunked or not."""
    params, grads, state, cfg = _special_world(case)
    before = clone_tree((params, grads, state))
    got = rf.update_topology(params, grads, state, cfg, engine="batched")
    want = update_topology_per_layer(params, grads, state, cfg)
    assert_trees_equal(got, want, bitwise=True)
    assert same_tree((params, grads, state), before)
    for name, mask in got[1].masks.items():
        assert int(mask.sum()) == int(state.masks[name].sum())  # nnz conserved per layer


@given(case=_special_case(), copies=st.integers(2, 3))
def test_vmap_path_equals_per_layer_with_specials(case, copies):
    """The vmapped batched engine (``step_ensemble``) on the same special values."""
    case = dict(case, dtype=torch.float32, chunk=0)
    worlds = []
    for k in range(copies):  # different weights per model: rotate the values
        c = dict(case, w=[w[k:] + w[:k] for w in case["w"]])
        worlds.append(_special_world(c))
    cfg = worlds[0][3]
    want = stack_trees([update_topology_per_layer(p, g, s, cfg) for p, g, s, _ in worlds])
    fn = lambda p, g, s: rf.update_topology(p, g, s, cfg, engine="batched")  # noqa: E731
    got = torch.func.vmap(fn)(*[stack_trees([w[i] for w in worlds]) for i in range(3)])
    assert_trees_equal(got, want, bitwise=True)


def test_chunking_changes_nothing_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    shapes = {f"l{i}.weight": (17 + 3 * i, 29) for i in range(12)} | {"big.weight": (64, 64)}
    params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    grads = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    results = []
    for chunk in (0, 1, 600, 5000):
        cfg = rf.RigLConfig(t_end=100, delta=10, sparsity=0.8, distribution="erk", update_chunk=chunk)
        state = rf.init_state(params, cfg, seed=0)._replace(step=torch.tensor(10))
        results.append(rf.update_topology(rf.apply_masks(params, state.masks), grads, state, cfg, engine="batched"))
    for other in results[1:]:
        assert_trees_equal(results[0], other, bitwise=True)


def test_update_chunk_is_validated():
    with pytest.raises(ValueError, match="update_chunk must be >= 0.*got update_chunk=-1"):
        rf.RigLConfig(t_end=10, update_chunk=-1)
    with pytest.raises(TypeError, match="update_chunk must be an int"):
        rf.RigLConfig(t_end=10, update_chunk=1.5)


def _meta_world(shapes, sparsity=0.9, **kw):
    cfg = rf.RigLConfig(t_end=1000, delta=10, sparsity=sparsity, distribution="uniform", include=(".*",), **kw)
    params = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    masks = {k: torch.empty(s, dtype=torch.bool, device="meta") for k, s in shapes.items()}
    return params, {k: torch.empty_like(v) for k, v in params.items()}, _state(masks), cfg


def _measure(shapes, **kw):
    params, grads, state, cfg = _meta_world(shapes, **kw)
    rf.update_topology(params, grads, state, cfg, engine="batched")  # warm-up: cached constants
    with track_memory() as mem, count_ops() as ops:
        new_params, new_state = rf.update_topology(params, grads, state, cfg, engine="batched")
    assert {k: tuple(v.shape) for k, v in new_state.masks.items()} == {k: tuple(s) for k, s in shapes.items()}
    mem.outputs_bytes = mem.live_bytes  # while the outputs are alive
    return mem, ops, sum(math.prod(s) for s in shapes.values())


# Budgets measured with these tests (meta, torch 2.14.1): ResNet-50 90% 187.6 B per
# weight (the old radix engine: 446), 347 launches. The issue's target is 64 B: not met
# (docs/performance.md says why); these budgets hold the figures against regressions.
BYTES_PER_WEIGHT_BUDGET = 195.0


def test_bytes_moved_per_weight_resnet50():
    _, ops, n = _measure(resnet50_shapes())
    assert ops.syncs == 0 and ops.host_to_device == 0
    assert ops.bytes_moved / n <= BYTES_PER_WEIGHT_BUDGET, ops.bytes_moved / n


def test_peak_memory_50_layers_of_1m_within_8_bytes_per_weight():
    """Issue target: <= 8 B per sparse weight, outputs (4 B params + 1 B mask) included;
    the automatic chunking keeps the temporaries to a sixteenth of the model."""
    mem, ops, n = _measure({f"l{i}.weight": (1024, 1024) for i in range(50)})
    assert mem.peak_bytes / n <= 8.0, mem.peak_bytes / n
    assert 5.0 <= mem.outputs_bytes / n < 5.001  # the outputs (and a few 0-d counters)


def test_peak_memory_2000_tiny_layers_within_64_mb():
    """Issue target: <= 64 MB for 2,000 layers of 8x8 (the radix engine: +2.6 GB)."""
    mem, ops, n = _measure({f"l{i}.weight": (8, 8) for i in range(2000)})
    assert mem.peak_bytes <= 64 * 2**20, mem.peak_bytes
    assert ops.launches <= 150, ops.launches  # one size class: the op count of one layer


def test_launches_do_not_grow_with_the_number_of_layers():
    """Layers of one size octave share one padded row matrix: 0 ops per added layer;
    over every size from 1 to 2**20 the op count is bounded by the ~21 octaves."""
    small = _measure({f"l{i}.weight": (64, 40 + i % 24) for i in range(10)})[1].launches
    large = _measure({f"l{i}.weight": (64, 40 + i % 24) for i in range(500)})[1].launches
    assert large == small, (small, large)
    octaves = _measure({f"l{i}.weight": (1 + i * 331,) for i in range(3200)})[1].launches
    assert octaves <= 21 * small, (octaves, small)


def test_moe_layout_with_50000_layers_on_meta():
    """An MoE with one Linear per expert: more layers than an int16/int32-packed bin
    index could address (> 32,767 segments)."""
    shapes = {f"e{i}.weight": (16, 8) for i in range(50_000)}
    mem, ops, n = _measure(shapes)
    assert ops.syncs == 0 and ops.launches <= 150


def test_7b_like_layout_above_2_31_entries_on_meta():
    """32 GPT blocks with d=4096 (6.4B weights, over 2**31 in total): the update's shape
    logic runs (chunked automatically) and the memory stays bounded."""
    d = 4096
    shapes = {}
    for b in range(32):
        shapes |= {f"h{b}.attn.qkv.weight": (3 * d, d), f"h{b}.attn.proj.weight": (d, d),
                   f"h{b}.mlp.fc.weight": (4 * d, d), f"h{b}.mlp.proj.weight": (d, 4 * d)}
    mem, ops, n = _measure(shapes)
    assert n > 2**31
    assert mem.peak_bytes / n <= 8.0, mem.peak_bytes / n
    assert ops.syncs == 0


def test_layers_on_two_devices_cpu_and_meta():
    """Layers split over two devices: grouped per device (no raw torch.cat error); the
    CPU layers equal the per-layer engine, the meta ones have the right shapes."""
    gen = torch.Generator().manual_seed(0)
    cpu = {f"c{i}.weight": torch.randn(12, 9, generator=gen) for i in range(3)}
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in cpu.items()}
    cfg = rf.RigLConfig(t_end=100, delta=10, sparsity=0.8, distribution="uniform")
    state = rf.init_state(cpu, cfg, seed=0)._replace(step=torch.tensor(10))
    params = rf.apply_masks(cpu, state.masks)
    meta = {f"m{i}.weight": torch.empty(10, 7, device="meta") for i in range(2)}
    mixed_state = state._replace(masks={**state.masks, **{k: torch.empty(v.shape, dtype=torch.bool, device="meta")
                                                           for k, v in meta.items()}})
    mixed_params = {**params, **meta}
    mixed_grads = {**grads, **{k: torch.empty_like(v) for k, v in meta.items()}}
    want = update_topology_per_layer(params, grads, state, cfg)
    for engine in ("batched", "auto"):
        new_params, new_state = rf.update_topology(mixed_params, mixed_grads, mixed_state, cfg, engine=engine)
        for k in cpu:
            assert torch.equal(new_state.masks[k], want[1].masks[k]) and torch.equal(new_params[k], want[0][k])
        for k, v in meta.items():
            assert new_state.masks[k].device.type == "meta" and new_state.masks[k].shape == v.shape

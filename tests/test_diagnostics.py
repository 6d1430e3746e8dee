"""Diagnostics: hand-computed densities, turnover and ITOP rates; purity; a real run.

The in-time over-parameterization (ITOP) rate is Liu et al. 2021's
``R = sum_l |ever_l| / sum_l N_l`` over the sparse layers.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import vmap

from rigl_func import RigLConfig, accumulate, apply_masks, init_state, is_update_step, update_topology
from rigl_func.diagnostics import density, itop_rate, summary, turnover, update_ever_active

T, F = True, False


def _b(rows):
    return torch.tensor(rows, dtype=torch.bool)


# Two layers: "a" 2x4 with 3 active, "b" 3 entries with 1 active.
A0 = _b([[T, T, F, F], [T, F, F, F]])
B0 = _b([T, F, F])
# After an update: "a" moved 2 of its 3 connections, "b" kept its one.
A1 = _b([[T, F, T, F], [F, F, F, T]])
B1 = _b([T, F, F])
# After a second update: "a" moves one back to a former position, one new; "b" moves.
A2 = _b([[T, T, F, F], [F, F, T, F]])
B2 = _b([F, T, F])


def test_density_hand_computed(device):
    masks = {"a": A0.to(device), "b": B0.to(device)}
    assert density(masks) == {"a": 3 / 8, "b": 1 / 3, "total": 4 / 11}
    params = {"a": torch.zeros(2, 4), "bias": torch.zeros(5), "b": torch.zeros(3), "norm": torch.zeros(4)}
    # all params: 4 active sparse entries + 9 dense entries, over 11 + 9 entries
    assert density(masks, params) == {"a": 3 / 8, "b": 1 / 3, "total": 4 / 11, "total_all": 13 / 20}


def test_density_edge_cases():
    assert density({}) == {"total": 0.0}
    assert density({}, {"w": torch.zeros(3)}) == {"total": 0.0, "total_all": 1.0}
    assert density({"w": torch.zeros(2, 2, dtype=torch.bool)}) == {"w": 0.0, "total": 0.0}
    assert density({"w": torch.tensor([0.0, 2.5, 0.0, 1.0])}) == {"w": 0.5, "total": 0.5}  # any nonzero


def test_density_errors():
    import pytest

    with pytest.raises(ValueError, match="missing the sparse layer 'a'"):
        density({"a": A0}, {"b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"masks\['a'\] has shape \(2, 4\)"):
        density({"a": A0}, {"a": torch.zeros(8)})


def test_turnover_hand_computed(device):
    old = {"a": A0.to(device), "b": B0.to(device)}
    new = {"a": A1.to(device), "b": B1.to(device)}
    # "a": grown (0,2) and (1,3) = 2 of 3; "b": 0 of 1; total 2 of 4
    assert turnover(old, new) == {"a": 2 / 3, "b": 0.0, "total": 0.5}
    assert turnover(old, old) == {"a": 0.0, "b": 0.0, "total": 0.0}
    # pruning only shrinks masks: nothing is replaced
    assert turnover({"a": A0}, {"a": A0 & _b([[T, F, F, F], [T, F, F, F]])}) == {"a": 0.0, "total": 0.0}
    # no active entries before: 0, not a division by zero
    empty = torch.zeros(3, dtype=torch.bool)
    assert turnover({"e": empty}, {"e": B0}) == {"e": 0.0, "total": 0.0}


def test_turnover_errors():
    import pytest

    with pytest.raises(ValueError, match="same keys"):
        turnover({"a": A0}, {"b": A0})
    with pytest.raises(ValueError, match="shape"):
        turnover({"a": A0}, {"a": B0})


def test_itop_hand_computed(device):
    masks = [{"a": A.to(device), "b": B.to(device)} for A, B in ((A0, B0), (A1, B1), (A2, B2))]
    ever = update_ever_active(None, masks[0])
    assert itop_rate(ever) == {"a": 3 / 8, "b": 1 / 3, "total": 4 / 11}  # R starts at the density
    ever = update_ever_active(ever, masks[1])
    # "a": (0,0) (0,1) (1,0) + (0,2) (1,3) = 5; "b": 1
    assert itop_rate(ever) == {"a": 5 / 8, "b": 1 / 3, "total": 6 / 11}
    ever = update_ever_active(ever, masks[2])
    # "a": + (1,2) = 6; "b": + (1) = 2
    assert itop_rate(ever) == {"a": 6 / 8, "b": 2 / 3, "total": 8 / 11}
    assert ever["a"].device == masks[0]["a"].device and ever["a"].dtype == torch.bool


def test_itop_includes_current_masks():
    ever = update_ever_active(None, {"a": A0, "b": B0})
    assert itop_rate(ever, {"a": A1, "b": B1}) == itop_rate(update_ever_active(ever, {"a": A1, "b": B1}))


def test_pure_inputs_not_mutated():
    old = {"a": A0.clone(), "b": B0.clone()}
    new = {"a": A1.clone(), "b": B1.clone()}
    ever = update_ever_active(None, old)
    assert ever["a"] is not old["a"]
    ever2 = update_ever_active(ever, new)
    for fn in (lambda: density(old), lambda: turnover(old, new), lambda: itop_rate(ever, new)):
        fn()
    assert torch.equal(old["a"], A0) and torch.equal(new["a"], A1) and torch.equal(ever["a"], A0)
    assert torch.equal(ever2["a"], A0 | A1)


def test_update_ever_active_under_vmap_and_compile():
    stacked_ever = {"a": torch.stack([A0, A1]), "b": torch.stack([B0, B1])}
    stacked_masks = {"a": torch.stack([A1, A2]), "b": torch.stack([B1, B2])}
    out = vmap(update_ever_active)(stacked_ever, stacked_masks)
    assert torch.equal(out["a"], torch.stack([A0 | A1, A1 | A2]))
    compiled = torch.compile(update_ever_active, fullgraph=True, backend="eager")
    assert torch.equal(compiled({"a": A0}, {"a": A2})["a"], A0 | A2)


@given(st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_properties_random_masks(numel, seed):
    gen = torch.Generator().manual_seed(seed)
    old = {"w": torch.rand(numel, generator=gen) < 0.5}
    perm = torch.randperm(numel, generator=gen)
    new = {"w": old["w"][perm]}  # same nnz
    t = turnover(old, new)["w"]
    n_old = int(old["w"].sum())
    dropped = int((old["w"] & ~new["w"]).sum())
    assert 0.0 <= t <= 1.0
    assert t == (dropped / n_old if n_old else 0.0)  # nnz preserved: grown == dropped
    ever = update_ever_active(update_ever_active(None, old), new)
    r = itop_rate(ever)["w"]
    assert density(new)["w"] <= r <= 1.0
    assert r == int((old["w"] | new["w"]).sum()) / numel


def test_summary_keys_and_values():
    cfg = RigLConfig(t_end=100, delta=10, sparsity=0.5, distribution="uniform", alpha=0.5, schedule="constant")
    params = {"a": torch.randn(4, 4, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(4)}
    state = init_state(params, cfg, seed=0)
    old = state.masks
    ever = update_ever_active(None, old)
    grads = {"a": torch.arange(16.0).reshape(4, 4), "b": torch.zeros(4)}
    for _ in range(10):
        state = accumulate(state, grads, cfg)
    params, state = update_topology(apply_masks(params, state.masks), grads, state, cfg)
    s = summary(state, ever, old_masks=old, config=cfg, params=params)
    assert all(isinstance(v, float) for v in s.values())
    assert s["step"] == 10.0 and s["num_updates"] == 1.0
    assert s["density/a"] == s["density/total"] == 0.5
    assert s["density/total_all"] == (8 + 4) / 20
    assert s["drop_fraction"] == 0.5
    # 4 of the 8 active replaced (drop fraction 0.5); unless a regrown one was just dropped
    assert s["turnover/a"] == turnover(old, state.masks)["a"]
    assert 0 < s["turnover/a"] <= 0.5
    assert s["itop/a"] == 0.5 + s["turnover/a"] / 2  # 8 old + grown new positions, of 16
    assert set(s) == {"step", "num_updates", "density/a", "density/total", "density/total_all", "itop/a",
                      "itop/total", "turnover/a", "turnover/total", "drop_fraction"}
    assert set(summary(state)) == {"step", "num_updates", "density/a", "density/total"}


def test_itop_grows_with_set_and_stays_with_static():
    """A short run: SET explores (R rises above the density), static does not."""
    rates = {}
    for method in ("set", "static"):
        cfg = RigLConfig(t_end=60, delta=5, sparsity=0.8, distribution="uniform", method=method)
        params = {"w": torch.randn(10, 10, generator=torch.Generator().manual_seed(1))}
        state = init_state(params, cfg, seed=3)
        params = apply_masks(params, state.masks)
        ever = update_ever_active(None, state.masks)
        for step in range(1, 61):
            grads = {"w": torch.randn(10, 10, generator=torch.Generator().manual_seed(step))}
            state = accumulate(state, grads, cfg)
            if is_update_step(step, cfg):
                params, state = update_topology(params, grads, state, cfg)
                ever = update_ever_active(ever, state.masks)
            else:
                params = apply_masks({"w": params["w"] - 0.1 * grads["w"]}, state.masks)
        rates[method] = itop_rate(ever, state.masks)["total"]
    assert rates["static"] == 0.2
    assert rates["set"] > 0.3  # 0.44 here: 24 positions explored beyond the initial 20

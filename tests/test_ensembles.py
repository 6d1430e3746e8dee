"""Ensembles of K seeds: ``stack_states`` / ``unstack_states`` around one ``vmap``-ed
update equal K separate updates, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import rigl_func as rf
from conftest import assert_trees_equal, stack_trees


def _world(seed: int, cfg):
    gen = torch.Generator().manual_seed(seed)
    params = {"a.weight": torch.randn(8, 6, generator=gen), "b.weight": torch.randn(4, 8, generator=gen)}
    state = rf.init_state(params, cfg, seed=seed)
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    return rf.apply_masks(params, state.masks), grads, rf.accumulate(state._replace(step=torch.tensor(9)), grads, cfg)


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_vmapped_ensemble_equals_separate_updates(method):
    cfg = rf.RigLConfig(t_end=100, delta=10, sparsity=0.75, distribution="erk", method=method)
    worlds = [_world(s, cfg) for s in range(4)]
    states = rf.stack_states([w[2] for w in worlds])
    assert states.masks["a.weight"].shape == (4, 8, 6) and states.key.tolist() == [0, 1, 2, 3]
    params, state = vmap(rf.update_topology, in_dims=(0, 0, 0, None))(
        stack_trees([w[0] for w in worlds]), stack_trees([w[1] for w in worlds]), states, cfg)
    for i, (single, model_state) in enumerate(zip([rf.update_topology(*w, cfg) for w in worlds],
                                                  rf.unstack_states(state))):
        assert_trees_equal((single[0], single[1]), ({k: v[i] for k, v in params.items()}, model_state))
    assert len({tuple(s.masks["a.weight"].flatten().tolist()) for s in rf.unstack_states(state)}) == 4


def test_unstack_inverts_stack():
    cfg = rf.RigLConfig(t_end=100, delta=10, sparsity=0.5, distribution="uniform", grad_accumulation_n=2)
    states = [rf.init_state({"w": torch.zeros(3, 5)}, cfg, seed=s) for s in range(3)]
    for a, b in zip(rf.unstack_states(rf.stack_states(states)), states):
        assert_trees_equal(a, b)


def test_stack_errors_name_the_problem():
    cfg = rf.RigLConfig(t_end=100, delta=10, sparsity=0.5, distribution="uniform")
    with pytest.raises(ValueError, match="at least one state"):
        rf.stack_states([])
    one = rf.init_state({"w": torch.zeros(2, 2)}, cfg, seed=0)
    other = rf.init_state({"v": torch.zeros(2, 2)}, cfg, seed=0)
    with pytest.raises(ValueError, match=r"states\[1\] has other layers"):
        rf.stack_states([one, other])
    with pytest.raises(ValueError, match="needs a batched state"):
        rf.unstack_states(one)


def test_ensemble_example_trains_every_seed():
    from conftest import load_example

    accs = load_example("ensemble").main(seeds=3, steps=60, batch=32)
    assert len(accs) == 3 and min(accs) > 0.5  # chance is about 0.25

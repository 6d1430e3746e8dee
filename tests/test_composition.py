"""Composition with torch.func and torch.compile.

1. A complete functional training loop (``functional_call`` + ``torch.func.grad``,
   ``accumulate`` -> ``is_update_step`` -> ``update_topology`` or a masked momentum-SGD
   step, ``reset_optimizer_state`` on the momentum pytree).
2. ``vmap`` over K stacked models equals K separate calls, exactly.
3. ``torch.compile(fullgraph=True)`` equals eager exactly and does not recompile on
   later steps (optax's "no recompilation on the second call").

The compile backend defaults to inductor; set ``RIGL_FUNC_TEST_COMPILE_BACKEND`` to
``aot_eager`` (or ``eager``) for a quicker run that still checks full-graph capture
and recompilation.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from conftest import assert_trees_equal as _assert_same, index_tree as _index, stack_trees as _stack  # shared test helpers
from rigl_func import (
    RigLConfig,
    RigLState,
    accumulate,
    apply_masks,
    init_state,
    is_update_step,
    reset_optimizer_state,
    target_nnz,
    update_topology,
)

COMPILE_BACKEND = os.environ.get("RIGL_FUNC_TEST_COMPILE_BACKEND", "inductor")


def _mlp(seed: int, device, sizes=(8, 32, 1)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2])).to(device)


def _detached(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}








# ---------------------------------------------------------------------------------
# 1. Functional training loop.

def test_functional_training_loop(device):
    model = _mlp(0, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=gen).to(device)
    y = torch.sin(x @ torch.randn(8, 1, generator=gen).to(device))
    cfg = RigLConfig(t_end=60, delta=10, sparsity=0.6, distribution="erk", alpha=0.3)

    params = _detached(model)
    state = init_state(params, cfg, seed=0)
    params = apply_masks(params, state.masks)
    nnz = target_nnz({k: tuple(m.shape) for k, m in state.masks.items()}, cfg)
    initial_masks = {k: m.clone() for k, m in state.masks.items()}

    def loss_fn(p, xb, yb):
        loss = ((functional_call(model, p, (xb,)) - yb) ** 2).mean()
        return loss, loss

    grad_fn = torch.func.grad(loss_fn, has_aux=True)
    opt = {"momentum": {k: torch.zeros_like(v) for k, v in params.items()}}
    lr, beta = 0.1, 0.9
    losses, updates = [], 0
    for _ in range(100):
        grads, loss = grad_fn(params, x, y)
        losses.append(loss.item())
        state = accumulate(state, grads, cfg)
        if is_update_step(state.step, cfg):
            old = state.masks
            params, state = update_topology(params, grads, state, cfg)
            opt = reset_optimizer_state(opt, old, state.masks)
            updates += 1
            for k in old:
                changed = state.masks[k] & ~old[k]
                assert not opt["momentum"][k][~(old[k] & state.masks[k])].any()
                assert not params[k][changed].any()
        else:
            g = apply_masks(grads, state.masks)
            opt = {"momentum": {k: beta * opt["momentum"][k] + g[k] for k in params}}
            params = {k: params[k] - lr * opt["momentum"][k] for k in params}  # no re-masking
        for k, m in state.masks.items():
            assert int(m.sum()) == nnz[k]
            assert torch.equal(params[k][~m], torch.zeros_like(params[k][~m])), "inactive weight became non-zero"
    assert updates == 5 and int(state.num_updates) == 5  # steps 10, 20, ..., 50
    assert any(not torch.equal(state.masks[k], initial_masks[k]) for k in initial_masks)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


# ---------------------------------------------------------------------------------
# 2. vmap over stacked models.

K = 3


def _k_models(device, cfg, steps):
    models = [_mlp(10 + i, device, sizes=(6, 8, 3)) for i in range(K)]
    params = [_detached(m) for m in models]
    states = [init_state(p, cfg, seed=i) for i, p in enumerate(params)]
    params = [apply_masks(p, s.masks) for p, s in zip(params, states)]
    gen = torch.Generator().manual_seed(5)
    grads = []
    for i, (p, s) in enumerate(zip(params, states)):
        for _ in range(steps[i]):
            g = {k: torch.randn(v.shape, generator=gen).to(device) for k, v in p.items()}
            s = accumulate(s, g, cfg)
        states[i] = s
        grads.append(g)
    return models, params, grads, states


@pytest.mark.parametrize("k", [1, 2])
def test_vmap_shared_step_equals_loop(k, device):
    cfg = RigLConfig(t_end=50, delta=5, sparsity=0.5, distribution="uniform", alpha=0.6, grad_accumulation_n=k)
    models, params, grads, states = _k_models(device, cfg, steps=[5] * K)
    stacked_params, _ = stack_module_state(models)
    # stack_module_state gives the models' own (unmasked) weights: mask them per model
    stacked_params = {k_: v.detach() for k_, v in stacked_params.items()}
    assert torch.equal(stacked_params["0.weight"][1], models[1][0].weight)
    stacked_params = vmap(apply_masks)(stacked_params, _stack([s.masks for s in states]))
    assert all(torch.equal(stacked_params[n][i], params[i][n]) for i in range(K) for n in params[0])
    shared = states[0]
    batched = _stack(states)._replace(step=shared.step, num_updates=shared.num_updates)
    dims = RigLState(masks=0, step=None, num_updates=None, grad_acc=0, ema=0, key=0)
    out_params, out_state = vmap(update_topology, in_dims=(0, 0, dims, None))(stacked_params, _stack(grads), batched, cfg)
    changed = 0
    for i in range(K):
        ref_params, ref_state = update_topology(params[i], grads[i], states[i], cfg)
        _assert_same(_index(out_params, i), ref_params)
        _assert_same(_index(out_state.masks, i), ref_state.masks)
        _assert_same(_index(out_state.grad_acc, i), ref_state.grad_acc)
        assert int(out_state.num_updates[i]) == 1 and int(out_state.step[i]) == 5
        changed += sum(int((ref_state.masks[n] != states[i].masks[n]).sum()) for n in ref_state.masks)
    assert changed > 0


def test_vmap_batched_states_equals_loop(device):
    """Each model at its own step (so its own drop fraction) and its own accumulator."""
    cfg = RigLConfig(t_end=40, delta=5, sparsity=0.5, distribution="erk", alpha=0.8, grad_accumulation_n=2)
    models, params, grads, states = _k_models(device, cfg, steps=[5, 10, 15])
    assert [int(s.step) for s in states] == [5, 10, 15]
    out_params, out_state = vmap(update_topology, in_dims=(0, 0, 0, None))(
        _stack(params), _stack(grads), _stack(states), cfg)
    n_changed = []
    for i in range(K):
        ref_params, ref_state = update_topology(params[i], grads[i], states[i], cfg)
        _assert_same(_index(out_params, i), ref_params)
        _assert_same(_index(out_state, i), ref_state)
        n_changed.append(sum(int((ref_state.masks[n] & ~states[i].masks[n]).sum()) for n in ref_state.masks))
    assert all(n > 0 for n in n_changed)


def test_vmap_accumulate_equals_loop(device):
    cfg = RigLConfig(t_end=40, delta=5, sparsity=0.5, distribution="uniform", grad_accumulation_n=3)
    models, params, grads, states = _k_models(device, cfg, steps=[3, 4, 7])
    out = vmap(accumulate, in_dims=(0, 0, None))(_stack(states), _stack(grads), cfg)
    for i in range(K):
        _assert_same(_index(out, i), accumulate(states[i], grads[i], cfg))


# ---------------------------------------------------------------------------------
# 3. torch.compile

from conftest import CountingBackend  # noqa: E402  (shared test helper)


def _compile_setup(device, k):
    cfg = RigLConfig(t_end=40, delta=4, sparsity=0.5, distribution="uniform", alpha=0.5, grad_accumulation_n=k)
    model = _mlp(3, device, sizes=(4, 6, 3))
    params = _detached(model)
    state = init_state(params, cfg, seed=0)
    return cfg, apply_masks(params, state.masks), state


def test_compile_update_topology_equals_eager_without_recompiles(device):
    torch._dynamo.reset()
    cfg, params, state = _compile_setup(device, k=1)
    backend = CountingBackend(COMPILE_BACKEND)
    compiled = torch.compile(update_topology, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(0)
    n_updates = 0
    for step in range(1, 21):
        grads = {k: torch.randn(v.shape, generator=gen).to(device) for k, v in params.items()}
        if step == 8:  # non-finite gradients must behave the same way
            grads["0.weight"][0, :2] = torch.tensor([float("nan"), float("inf")])
        state = accumulate(state, grads, cfg)
        if not is_update_step(step, cfg):
            continue
        if step == 12:  # a NaN weight (with zero gradient: not regrown) is dropped first
            first_active = state.masks["2.weight"].reshape(-1).nonzero()[0, 0]
            params = {**params, "2.weight": params["2.weight"].reshape(-1).index_fill(0, first_active, float("nan")).reshape(3, 6)}
            grads["2.weight"] = grads["2.weight"].reshape(-1).index_fill(0, first_active, 0.0).reshape(3, 6)
        eager_params, eager_state = update_topology(params, grads, state, cfg)
        comp_params, comp_state = compiled(params, grads, state, cfg)
        _assert_same(comp_params, eager_params)
        _assert_same(comp_state, eager_state)
        assert any(not torch.equal(eager_state.masks[k], state.masks[k]) for k in state.masks)
        assert not any(v.isnan().any() for v in eager_params.values())
        params, state = eager_params, eager_state
        n_updates += 1
        assert backend.calls == 1, f"recompiled at step {step}"
    assert n_updates == 5  # steps 4, 8, 12, 16, 20


def test_compile_accumulate_equals_eager_without_recompiles(device):
    torch._dynamo.reset()
    cfg, params, state = _compile_setup(device, k=3)
    backend = CountingBackend(COMPILE_BACKEND)
    compiled = torch.compile(accumulate, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 14):
        grads = {k: torch.randn(v.shape, generator=gen).to(device) for k, v in params.items()}
        if step in (1, 5):  # outside the windows {2, 3, 4}, {6, 7, 8}: ignored
            grads = {k: torch.full_like(v, float("nan")) for k, v in grads.items()}
        eager = accumulate(state, grads, cfg)
        comp = compiled(state, grads, cfg)
        _assert_same(comp, eager)
        state = eager
        if is_update_step(step, cfg):
            assert state.grad_acc["0.weight"].abs().sum() > 0
            params, state = update_topology(params, grads, state, cfg)
    assert not any(v.isnan().any() for v in state.grad_acc.values())
    assert backend.calls == 1

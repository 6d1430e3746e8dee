"""Tests for rigl_func.functional_optim: masked, pure SGD / AdamW steps.

Reference: ``torch.optim.SGD(foreach=True)`` / ``AdamW(foreach=True)`` stepped on the
masked gradients must give bitwise the same weights and state. Then: inactive entries
stay exactly zero (NaN gradients there included), purity, the moments reset by
``reset_optimizer_state``, ``vmap`` over stacked models equals a loop, a
``torch.func.grad`` training loop, ``torch.compile(fullgraph=True)`` equals eager
without recompiling, and a launch count independent of the number of layers.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

from conftest import CountingBackend, clone_tree, same_tree
from rigl_func import apply_masks, reset_optimizer_state
from rigl_func.dispatch import count_ops
from rigl_func.functional_optim import AdamW, AdamWState, SGD, SGDState, adamw, mask_grads, sgd

COMPILE_BACKEND = os.environ.get("RIGL_FUNC_TEST_COMPILE_BACKEND", "inductor")
SHAPES = {"a.weight": (5, 7), "a.bias": (5,), "b.weight": (3, 4, 2), "c.weight": (6, 5)}


def _setup(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    masks = {n: (torch.rand(SHAPES[n], generator=gen) > 0.5).to(device) for n in ("a.weight", "b.weight", "c.weight")}
    params = apply_masks({n: torch.randn(s, generator=gen).to(device) for n, s in SHAPES.items()}, masks)
    return {n: p.clone() for n, p in params.items()}, masks, gen


def _grads(gen, device):
    return {n: torch.randn(s, generator=gen).to(device) for n, s in SHAPES.items()}


TORCH_CASES = [
    (dict(lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1, foreach=True)),
    (dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=True)),
    (dict(lr=0.05, momentum=0.9, nesterov=True),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, foreach=True)),
    (dict(lr=0.1, momentum=0.8, dampening=0.3),
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, dampening=0.3, foreach=True)),
]


def _compare_with_torch(fopt, make_torch, device, steps=6, exact=True):
    params, masks, gen = _setup(device)
    ref = [torch.nn.Parameter(p.clone()) for p in params.values()]
    topt = make_torch(ref)
    state = fopt.init(params)
    for _ in range(steps):
        grads = _grads(gen, device)
        grads["a.weight"][~masks["a.weight"]] = float("nan")  # inactive NaN: must not leak
        masked = apply_masks(grads, masks)
        for p, n in zip(ref, params):
            p.grad = masked[n].clone()
        topt.step()
        params, state = fopt.step(params, grads, state, masks)
        for p, n in zip(ref, params):
            if exact:
                assert torch.equal(p.detach(), params[n]), n
            else:
                torch.testing.assert_close(params[n], p.detach(), rtol=1e-6, atol=1e-7)
                p.data.copy_(params[n])  # no drift: every step is compared from the same weights
    return ref, topt, params, state, masks


@pytest.mark.parametrize("kw,make_torch", TORCH_CASES, ids=["plain", "momentum_wd", "nesterov", "dampening"])
def test_sgd_bitwise_equals_torch_optim_foreach(kw, make_torch, device):
    ref, topt, params, state, masks = _compare_with_torch(sgd(**kw), make_torch, device)
    assert isinstance(state, SGDState) and int(state.count) == 6 and state.count.dtype == torch.int64
    if kw.get("momentum"):
        for p, n in zip(ref, params):
            assert torch.equal(topt.state[p]["momentum_buffer"], state.momentum[n])
    else:
        assert state.momentum == {}


@pytest.mark.parametrize("kw", [dict(lr=0.01, weight_decay=0.1), dict(lr=0.003, betas=(0.8, 0.99), eps=1e-6,
                                                                      weight_decay=0.0)])
def test_adamw_equals_torch_optim_foreach(kw, device):
    """Moments bitwise; weights to one rounding: torch.optim's foreach AdamW reads the
    step with ``.item()`` and applies ``lr / (1 - b1^t)`` as a Python float in one
    ``addcdiv`` (fused multiply-add on vector CPUs), ours keeps it a 0-d tensor (no
    host sync) and multiplies, then adds."""
    ref, topt, params, state, masks = _compare_with_torch(
        adamw(**kw), lambda p: torch.optim.AdamW(p, foreach=True, **kw), device, exact=False)
    assert isinstance(state, AdamWState) and int(state.count) == 6
    for p, n in zip(ref, params):
        assert torch.equal(topt.state[p]["exp_avg"], state.exp_avg[n])
        assert torch.equal(topt.state[p]["exp_avg_sq"], state.exp_avg_sq[n])


@pytest.mark.parametrize("opt", [SGD(lr=0.1, momentum=0.9, weight_decay=0.1), AdamW(lr=0.1),
                                 AdamW(lr=0.1, eps=0.0)], ids=["sgd", "adamw", "adamw_eps0"])
def test_inactive_entries_stay_exactly_zero_and_step_is_pure(opt, device):
    params, masks, gen = _setup(device)
    state = opt.init(params)
    for _ in range(4):
        grads = _grads(gen, device)
        for n, m in masks.items():
            grads[n][~m] = float("nan")
        before = clone_tree((params, grads, state))
        new_params, new_state = opt.step(params, grads, state, masks)
        assert same_tree((params, grads, state), before)  # pure
        moments = new_state.momentum if isinstance(new_state, SGDState) else {**new_state.exp_avg}
        for n, m in masks.items():
            assert torch.all(new_params[n][~m] == 0) and not new_params[n][m].isnan().any()
            if n in moments:
                assert torch.all(moments[n][~m] == 0)
        assert not new_params["a.bias"].isnan().any()
        params, state = new_params, new_state


def test_state_is_reset_by_reset_optimizer_state(device):
    params, masks, gen = _setup(device)
    opt = adamw(lr=0.01)
    params, state = opt.step(params, _grads(gen, device), opt.init(params), masks)
    new_masks = {n: m.roll(1, 0) for n, m in masks.items()}
    reset = reset_optimizer_state(state, masks, new_masks)
    assert isinstance(reset, AdamWState) and reset.count is state.count
    for n, m in masks.items():
        keep = m & new_masks[n]
        for tree, new_tree in ((state.exp_avg, reset.exp_avg), (state.exp_avg_sq, reset.exp_avg_sq)):
            assert torch.equal(new_tree[n], torch.where(keep, tree[n], 0.0))
    assert torch.equal(reset.exp_avg["a.bias"], state.exp_avg["a.bias"])  # dense: untouched


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _loss_fn(model):
    def loss(params, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    return loss


def test_torch_func_grad_training_loop():
    model = _mlp(0)
    params = {n: p.detach() for n, p in model.named_parameters()}
    masks = {"0.weight": torch.rand(8, 6, generator=torch.Generator().manual_seed(0)) > 0.5}
    params = apply_masks(params, masks)
    opt = sgd(0.5, momentum=0.9)
    state = opt.init(params)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    loss = _loss_fn(model)
    first = loss(params, x, y)
    for _ in range(20):
        params, state = opt.step(params, grad(loss)(params, x, y), state, masks)
    assert loss(params, x, y) < first
    assert torch.all(params["0.weight"][~masks["0.weight"]] == 0)


@pytest.mark.parametrize("opt", [sgd(0.1, momentum=0.9, dampening=0.1), adamw(0.01)], ids=["sgd", "adamw"])
def test_vmap_over_stacked_models_equals_loop(opt):
    models = [_mlp(s) for s in range(3)]
    stacked, _ = stack_module_state(models)
    stacked = {n: p.detach() for n, p in stacked.items()}
    gen = torch.Generator().manual_seed(0)
    masks = {"0.weight": torch.rand(3, 8, 6, generator=gen) > 0.5, "2.weight": torch.rand(3, 3, 8, generator=gen) > 0.5}
    stacked = vmap(apply_masks)(stacked, masks)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in stacked.items()}
    states = vmap(opt.init)(stacked)
    step = vmap(opt.step)
    for _ in range(3):
        new_params, new_states = step(stacked, grads, states, masks)
        for i in range(3):
            pick = lambda tree: torch.utils._pytree.tree_map(lambda t: t[i], tree)  # noqa: E731
            p_i, s_i = opt.step(pick(stacked), pick(grads), pick(states), pick(masks))
            assert same_tree(p_i, pick(new_params)) and same_tree(s_i, pick(new_states))
        stacked, states = new_params, new_states


@pytest.mark.parametrize("opt", [sgd(0.1, momentum=0.9, weight_decay=1e-3), adamw(0.01)], ids=["sgd", "adamw"])
def test_compile_fullgraph_equals_eager_without_recompiles(opt):
    torch._dynamo.reset()
    params, masks, gen = _setup("cpu")
    backend = CountingBackend(COMPILE_BACKEND)
    compiled = torch.compile(opt.step, fullgraph=True, backend=backend)
    state_e = state_c = opt.init(params)
    params_e = params_c = params
    for _ in range(4):
        grads = _grads(gen, "cpu")
        params_e, state_e = opt.step(params_e, grads, state_e, masks)
        params_c, state_c = compiled(params_c, grads, state_c, masks)
        for n in params:
            torch.testing.assert_close(params_c[n], params_e[n], rtol=1e-5, atol=1e-6)
        assert int(state_c.count) == int(state_e.count)
        for n, m in masks.items():
            assert torch.all(params_c[n][~m] == 0)
    assert backend.calls == 1


def test_launches_do_not_grow_with_layers():
    """Counted on ``meta`` (a stand-in for a GPU: the CPU masks tensor by tensor, see
    ``masked_where``'s ``pack``)."""
    def launches(n_layers, opt):
        params = {f"{i}.weight": torch.randn(4, 4, device="meta") for i in range(n_layers)}
        masks = {n: torch.rand(4, 4, device="meta") > 0.5 for n in params}
        grads = {n: torch.randn(4, 4, device="meta") for n in params}
        state = opt.init(params)
        with count_ops() as ops:
            opt.step(params, grads, state, masks)
        assert ops.syncs == 0 and ops.host_to_device == 0
        return ops.launches

    for opt in (sgd(0.1, momentum=0.9, weight_decay=1e-4), adamw(1e-3)):
        assert launches(4, opt) == launches(16, opt)


def test_mask_grads_and_errors():
    g = mask_grads({"w": torch.tensor([1.0, float("nan")]), "b": torch.ones(1)}, {"w": torch.tensor([True, False])})
    assert g["w"].tolist() == [1.0, 0.0] and g["b"].tolist() == [1.0]
    with pytest.raises(ValueError, match="lr must be in"):
        sgd(-1.0)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        sgd(0.1, nesterov=True)
    with pytest.raises(TypeError, match="betas must be a tuple"):
        AdamW(betas=[0.9, 0.99])
    with pytest.raises(ValueError, match=r"betas\[1\] must be in"):
        adamw(betas=(0.9, 1.0))
    opt = sgd(0.1, momentum=0.9)
    state = opt.init({"w": torch.ones(2)})
    with pytest.raises(ValueError, match="grads must have the keys of params"):
        opt.step({"w": torch.ones(2)}, {"v": torch.ones(2)}, state)
    with pytest.raises(ValueError, match="state.momentum must have the keys"):
        opt.step({"v": torch.ones(2)}, {"v": torch.ones(2)}, state)
    assert hash(opt) == hash(sgd(0.1, momentum=0.9))  # frozen config: a static compile argument


def _halving(count):
    return 0.1 * 0.5 ** count.to(torch.float64)  # exact powers of two: no rounding in the schedule


@pytest.mark.parametrize("which", ["sgd", "adamw"])
def test_lr_schedule_equals_torch_lambda_lr(which, device):
    """``lr`` as a function of the step count equals ``torch.optim`` + ``LambdaLR``
    (to float rounding: the scheduled lr is a tensor, multiplied then subtracted)."""
    if which == "sgd":
        fopt = sgd(_halving, momentum=0.9, weight_decay=1e-2)
        make = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=True)  # noqa: E731
    else:
        fopt = adamw(_halving, weight_decay=0.1)
        make = lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1, foreach=True)  # noqa: E731
    params, masks, gen = _setup(device)
    ref = [torch.nn.Parameter(p.clone()) for p in params.values()]
    topt = make(ref)
    schedule = torch.optim.lr_scheduler.LambdaLR(topt, lambda epoch: 0.5 ** epoch)
    state = fopt.init(params)
    for _ in range(5):
        grads = apply_masks(_grads(gen, device), masks)
        for p, n in zip(ref, params):
            p.grad = grads[n].clone()
        topt.step()
        schedule.step()
        params, state = fopt.step(params, grads, state, masks)
        for p, n in zip(ref, params):
            torch.testing.assert_close(params[n], p.detach(), rtol=1e-6, atol=1e-7)
            p.data.copy_(params[n])
    assert topt.param_groups[0]["lr"] == 0.1 * 0.5 ** 5


def test_lr_schedule_compiles_without_recompiles_and_bad_schedule_is_named():
    torch._dynamo.reset()
    params, masks, gen = _setup("cpu")
    opt = sgd(_halving, momentum=0.9)
    backend = CountingBackend(COMPILE_BACKEND)
    compiled = torch.compile(opt.step, fullgraph=True, backend=backend)
    eager = comp = (params, opt.init(params))
    for _ in range(4):
        grads = _grads(gen, "cpu")
        eager = opt.step(*eager[:1], grads, eager[1], masks)
        comp = compiled(*comp[:1], grads, comp[1], masks)
        for n in params:
            torch.testing.assert_close(comp[0][n], eager[0][n], rtol=1e-6, atol=1e-7)
    assert backend.calls == 1
    with pytest.raises(TypeError, match="learning-rate schedule must return a 0-d float tensor, got 0.1"):
        sgd(lambda c: 0.1).step(params, _grads(gen, "cpu"), sgd(0.1).init(params), masks)


def test_masked_where_packed_and_per_tensor_agree_bitwise():
    from rigl_func.masks import masked_where

    gen = torch.Generator().manual_seed(5)
    tensors = [torch.randn(s, generator=gen) for s in [(3, 4), (5,), (2, 2, 2)]] + [torch.ones(3, dtype=torch.bfloat16)]
    tensors[0][0, 0], tensors[1][2], tensors[2][1, 1, 1] = float("nan"), float("inf"), -0.0
    masks = [torch.rand(t.shape, generator=gen) > 0.4 for t in tensors]
    masks[0][0, 0] = masks[1][2] = False
    packed, single = masked_where(tensors, masks, pack=True), masked_where(tensors, masks, pack=False)
    for a, b, t, m in zip(packed, single, tensors, masks):
        assert a.dtype == b.dtype == t.dtype
        assert torch.equal(a.view(-1).view(torch.uint8) if a.dtype != torch.bfloat16 else a.float(),
                           b.view(-1).view(torch.uint8) if b.dtype != torch.bfloat16 else b.float())
        assert not a[~m].any() and torch.equal(a[m], t[m])
    assert masked_where(tensors, masks)[0]._base is None  # the CPU default: tensor by tensor

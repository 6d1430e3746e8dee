"""Masking in one launch (issue 11, item 2): kernel launches, host syncs and
host-to-device copies of the masking passes, counted on the CPU with
:func:`rigl_func.dispatch.count_ops` (deterministic; the same ATen ops launch kernels
on a GPU).

What is counted for the shell: one whole steady-state (non-update) iteration --
``zero_grad``, forward, ``backward()`` (with the scheduler's grad hooks and its
end-of-backward callback), ``pruner()``, ``optimizer.step()`` (with its post hook) --
minus the same iteration of an identical model trained densely without a scheduler.
The difference is what the scheduler adds; its growth from 4 to 16 sparse layers,
divided by 12, is the cost per additional sparse layer (was 4: a ``torch.where`` and
a fresh 0-d zero per weight, twice).

Then the behaviours the batching must keep: masks are views of one flat buffer,
gradients are masked at the end of every backward (several backward calls per
iteration, a layer without gradient, a backward that raised), weights and state are
re-masked when ``optimizer.step()`` runs after a backward the scheduler has not seen,
and the functional ``apply_masks`` / ``reset_optimizer_state`` / torch-optimizer
helpers take a constant number of launches under ``vmap`` and ``torch.compile``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import CountingBackend
from rigl_func import (
    RigLScheduler,
    apply_masks,
    mask_torch_optimizer_state_,
    reset_optimizer_state,
    reset_torch_optimizer_state_,
)
from rigl_func.dispatch import count_ops

COMPILE_BACKEND = os.environ.get("RIGL_FUNC_TEST_COMPILE_BACKEND", "inductor")
WIDTH = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(n_layers: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(n_layers):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers)


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def _iteration_ops(n_layers: int, opt_name: str, sparse: bool, **kw):
    model = _model(n_layers)
    opt = _optimizer(opt_name, model)
    pruner = None
    if sparse:
        pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=10_000, delta=100,
                               sparsity_distribution="erk", ignore_linear_layers=False, **kw)
        assert all(m is not None for m in pruner.backward_masks)
    x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(0))

    def iteration():
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if pruner is None or pruner():
            opt.step()

    for _ in range(3):  # steady state: iterations 1-3 are far from the update at 100
        iteration()
    with count_ops() as ops:
        iteration()
    if pruner is not None:
        assert pruner.step == 4 and pruner.rigl_steps == 0
    return ops


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("k", [1, 3], ids=["k1", "k3"])
def test_shell_steady_state_launches_per_layer(opt_name, k):
    added = {}
    for n in (4, 16):
        shell, dense = _iteration_ops(n, opt_name, True, grad_accumulation_n=k), _iteration_ops(n, opt_name, False)
        # The scheduler adds no sync (torch.optim.Adam's own foreach step reads its step
        # counter with .item() on the CPU: counted in both).
        assert shell.syncs == dense.syncs and shell.host_to_device == dense.host_to_device == 0
        if opt_name == "sgd":
            assert shell.syncs == 0
        added[n] = shell.launches - dense.launches
    per_layer = (added[16] - added[4]) / 12
    assert per_layer <= 0.1, (added, shell.launch_ops - dense.launch_ops)
    # What is left: pack + where + copy back (the grads), the step counter.
    assert added[4] <= 4, shell.launch_ops - dense.launch_ops


def test_masks_are_views_of_one_flat_buffer():
    model = _model(6)
    opt = _optimizer("sgd", model)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=30, delta=2, sparsity_distribution="erk",
                           ignore_linear_layers=False)
    x = torch.randn(4, WIDTH)
    for step in range(5):  # updates at 2 and 4 repack the masks
        masks = list(pruner.state.masks.values())
        storages = {m.untyped_storage().data_ptr() for m in masks}
        assert len(storages) == 1
        assert masks[0].untyped_storage().nbytes() == sum(m.numel() for m in masks)  # 1 byte per sparse weight
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if pruner():
            opt.step()
    assert pruner.rigl_steps == 2


def _assert_grads_masked(pruner):
    for w, m in zip(pruner.W, pruner.backward_masks):
        if w.grad is not None:
            assert torch.all(w.grad[~m] == 0)


class _Raise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("backward failed on purpose")


def test_grads_masked_at_the_end_of_every_backward():
    model = _model(4)
    opt = _optimizer("sgd", model)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=1000, delta=100, sparsity_distribution="erk",
                           ignore_linear_layers=False)
    x = torch.randn(4, WIDTH)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    _assert_grads_masked(pruner)
    # A second backward in the same iteration (gradient accumulation by the user)
    # reaching only the last two layers: masked again.
    h = model[:4](x).detach()
    model[4:](h).pow(2).mean().backward()
    _assert_grads_masked(pruner)
    # A backward that raises after the last layer's hook fired leaves its callback unrun;
    # the next backward still masks at its end.
    with pytest.raises(RuntimeError, match="on purpose"):
        model[4:](_Raise.apply(model[:4](x))).pow(2).mean().backward()
    model(x).pow(2).mean().backward()
    _assert_grads_masked(pruner)
    assert pruner()  # no update
    opt.step()
    _assert_grads_masked(pruner)


def test_pruner_masks_when_no_callback_ran():
    model = _model(3)
    opt = _optimizer("sgd", model)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=1000, delta=100, sparsity_distribution="erk",
                           ignore_linear_layers=False)
    for w in pruner.W:  # gradients written by hand (e.g. loaded): no backward, no callback
        w.grad = torch.ones_like(w)
    assert pruner()
    _assert_grads_masked(pruner)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_step_after_unseen_dense_backward_remasks_weights_and_state(opt_name):
    """``optimizer.step()`` right after a backward whose gradients were left dense for
    the update (no ``pruner()`` call in between, against the protocol): the post hook
    cannot rely on zero-preservation and re-masks weights and state."""
    model = _model(3)
    opt = _optimizer(opt_name, model)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=1000, delta=2, sparsity_distribution="erk",
                           ignore_linear_layers=False)
    x = torch.randn(4, WIDTH)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    assert pruner()
    opt.step()
    opt.zero_grad()
    model(x).pow(2).mean().backward()  # iteration 2 feeds the update: dense gradients
    assert any(torch.any(w.grad[~m] != 0) for w, m in zip(pruner.W, pruner.backward_masks))
    opt.step()
    for w, m in zip(pruner.W, pruner.backward_masks):
        assert torch.all(w[~m] == 0)
        for v in opt.state[w].values():
            if v.shape == w.shape:
                assert torch.all(v[~m] == 0)


# --------------------------------------------------------------------------- functional
def _tree(n_layers, gen):
    params = {f"{i}.weight": torch.randn(WIDTH, WIDTH, generator=gen) for i in range(n_layers)}
    params.update({f"{i}.bias": torch.randn(WIDTH, generator=gen) for i in range(n_layers)})
    masks = {f"{i}.weight": torch.rand(WIDTH, WIDTH, generator=gen) > 0.5 for i in range(n_layers)}
    return params, masks


def _launches(fn) -> int:
    with count_ops() as ops:
        fn()
    assert ops.syncs == 0 and ops.host_to_device == 0
    return ops.launches


def test_functional_masking_launches_do_not_grow_with_layers():
    """On ``meta``, the stand-in for a GPU (on the CPU ``masked_where`` goes tensor by
    tensor: launches are free there, bandwidth is not)."""
    counts = {}
    meta = lambda tree: {k: v.to("meta") for k, v in tree.items()}  # noqa: E731
    for n in (4, 16):
        gen = torch.Generator().manual_seed(n)
        params, masks = _tree(n, gen)
        new_masks = meta({k: m.roll(1, 0) for k, m in masks.items()})
        params, masks = meta(params), meta(masks)
        moments = {"mu": dict(params), "nu": dict(params), "count": torch.tensor(3)}
        model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(n)]).to("meta")
        opt = torch.optim.Adam(model.parameters())
        for p in model.parameters():  # the state one Adam step leaves
            opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        live = dict(model.named_parameters())
        counts[n] = (
            _launches(lambda: apply_masks(params, masks)),
            _launches(lambda: apply_masks(moments, masks)),
            _launches(lambda: reset_optimizer_state(moments, masks, new_masks)),
            _launches(lambda: mask_torch_optimizer_state_(opt, live, masks)),
            _launches(lambda: reset_torch_optimizer_state_(opt, live, masks, new_masks)),
        )
    assert counts[4] == counts[16], counts


def test_apply_masks_batched_under_vmap_and_compile():
    gen = torch.Generator().manual_seed(0)
    params, masks = _tree(3, gen)
    params["0.weight"][0, 0] = float("nan")
    masks["0.weight"][0, 0] = False
    eager = apply_masks(params, masks)
    stacked = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    out = torch.func.vmap(apply_masks, in_dims=(0, None))(stacked, masks)
    for k in params:
        assert torch.equal(out[k][0], eager[k]) and torch.equal(out[k][1], apply_masks({k: 2 * params[k]}, masks)[k])
    torch._dynamo.reset()
    backend = CountingBackend(COMPILE_BACKEND)
    compiled = torch.compile(apply_masks, fullgraph=True, backend=backend)
    for scale in (1.0, 3.0):
        tree = {k: scale * v for k, v in params.items()}
        got, want = compiled(tree, masks), apply_masks(tree, masks)
        assert all(torch.equal(got[k], want[k]) for k in params)
    assert eager["0.weight"][0, 0] == 0 and backend.calls == 1

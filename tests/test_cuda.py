"""The topology update on a GPU (issue 11): no host syncs, CUDA graphs, CPU == CUDA, compile.

With state, params and grads on CUDA:

1. ``torch.cuda.set_sync_debug_mode("error")`` around ``accumulate`` +
   ``update_topology`` (after one warm-up call, which may build cached constants) for
   RigL/SET/SNFS with uniform and ERK sparsity, and around a non-update
   ``RigLScheduler`` step (``pruner()`` + ``optimizer.step()``): any synchronizing
   call (``.item()``, ``bool(tensor)``, a pageable host-to-device copy) raises.
2. ``update_topology`` captured in a CUDA graph (static inputs, warm-up on a side
   stream, ``torch.cuda.graph``); new inputs copied into the static tensors; the replay
   equals an eager call on the same inputs bit for bit.
3. The same seed and inputs give bit-identical masks and params on the CPU and on CUDA
   over several updates (``init_state`` draws masks on the CPU).
4. ``torch.compile(update_topology, fullgraph=True)`` on CUDA equals eager and does not
   recompile.
6. The one-call step ``tx.step`` (issue 13) on CUDA: no sync at optimizer or update
   steps (the step counter is a CPU tensor), masks equal to the CPU run; compiled with
   ``fullgraph=True`` (a ``torch.cond`` on a CPU predicate around CUDA operands): equal
   to eager, no recompile, no sync.

These are skipped where ``torch.cuda.is_available()`` is False (CI); run them on a GPU
with ``bash benchmarks/gpu_check.sh OUTDIR``. The last test runs everywhere: the update
with every tensor on the ``meta`` device, counted by :func:`rigl_func.dispatch.count_ops`,
must do no host syncs and no host-to-device copies once warmed up.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

import rigl_func
from rigl_func import RigLConfig, accumulate, apply_masks, init_state, is_update_step, update_topology
from rigl_func.dispatch import count_ops
from conftest import CountingBackend, same_tree  # shared test helpers

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: A dense bias (passes through), two Linear weights and a conv weight.
SHAPES = {"a.weight": (32, 24), "a.bias": (32,), "b.weight": (16, 32), "c.weight": (8, 4, 3, 3)}
CONFIGS = {
    "rigl-uniform": dict(distribution="uniform"),
    "rigl-erk": dict(distribution="erk"),
    "set-uniform": dict(distribution="uniform", grow_criterion="random"),
    "set-erk": dict(distribution="erk", grow_criterion="random"),
    "snfs-uniform": dict(distribution="uniform", ema_momentum=0.9, grow_criterion="ema"),
    "snfs-erk": dict(distribution="erk", ema_momentum=0.9, grow_criterion="ema"),
    "rigl-erk-accumulate2": dict(distribution="erk", grad_accumulation_n=2),
}
SOME = ["rigl-uniform", "rigl-erk", "set-erk", "snfs-uniform", "rigl-erk-accumulate2"]


def _cfg(name: str) -> RigLConfig:
    return RigLConfig(t_end=500, delta=5, sparsity=0.8, alpha=0.5, **CONFIGS[name])


def _to(tree, device):
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def _clone(tree):
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _setup(name: str, device, seed: int = 0):
    """Config, masked params and a fresh state (masks drawn on the CPU), moved to ``device``."""
    cfg = _cfg(name)
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    state = init_state(params, cfg, seed=seed)
    return cfg, _to(apply_masks(params, state.masks), device), _to(state, device)


def _grads(gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    return {k: torch.randn(s, generator=gen).to(device) for k, s in SHAPES.items()}


def _at_step(state, step: int):
    return state._replace(step=torch.full_like(state.step, step))


class _SyncsAreErrors:
    """``torch.cuda.set_sync_debug_mode("error")`` inside, the previous mode restored after."""

    def __enter__(self):
        self.prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.prev)
        return False


# ---------------------------------------------------------------------------------
# 1. No host syncs.

@requires_cuda
@pytest.mark.parametrize("name", list(CONFIGS))
def test_accumulate_and_update_do_not_sync(name):
    cfg, params, state = _setup(name, "cuda")
    gen = torch.Generator().manual_seed(1)
    start = _at_step(state, cfg.delta - 1)
    warm = accumulate(start, _grads(gen, "cuda"), cfg)  # warm-up: may build cached constants
    update_topology(params, _grads(gen, "cuda"), warm, cfg)
    grads = _grads(gen, "cuda")
    torch.cuda.synchronize()
    with _SyncsAreErrors():
        acc = accumulate(start, grads, cfg)
        new_params, new_state = update_topology(params, grads, acc, cfg)
    torch.cuda.synchronize()
    assert int(new_state.num_updates) == 1 and int(new_state.step) == cfg.delta
    for k, m in new_state.masks.items():
        assert int(m.sum()) == int(state.masks[k].sum())
        assert not new_params[k][~m].any()


@requires_cuda
def test_scheduler_plain_step_does_not_sync():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = rigl_func.RigLScheduler(model, opt, dense_allocation=0.2, T_end=1000, delta=100,
                                     ignore_linear_layers=False)
    x, y = torch.randn(16, 24, device="cuda"), torch.randint(0, 8, (16,), device="cuda")

    def backward():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    backward()
    if pruner():  # warm-up step: creates the momentum buffers
        opt.step()
    backward()
    torch.cuda.synchronize()
    with _SyncsAreErrors():
        stepped = pruner()
        if stepped:
            opt.step()
    torch.cuda.synchronize()
    assert stepped, "step 2 of delta=100 is not an update step"
    for name, mask in pruner.state.masks.items():
        assert not dict(model.named_parameters())[name][~mask].any()


# ---------------------------------------------------------------------------------
# 2. CUDA graph capture and replay.

@requires_cuda
@pytest.mark.parametrize("name", SOME)
def test_cuda_graph_replay_equals_eager(name):
    cfg, params, state = _setup(name, "cuda")
    gen = torch.Generator().manual_seed(2)
    grads = _grads(gen, "cuda")
    state = accumulate(_at_step(state, cfg.delta - 1), grads, cfg)
    static = _clone((params, grads, state))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream (PyTorch's CUDA graph recipe)
        for _ in range(3):
            update_topology(*static, cfg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = update_topology(*static, cfg)

    changed = 0
    for update in range(2, 5):  # new params, grads, masks and step (so a new drop fraction) each time
        eager = update_topology(params, grads, state, cfg)
        leaves, spec = tree_flatten((params, grads, state))
        static_leaves, static_spec = tree_flatten(static)
        assert spec == static_spec
        for dst, src in zip(static_leaves, leaves):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert same_tree(static_out, eager), f"replay {update - 1} differs from eager"
        changed += sum(int((eager[1].masks[k] != state.masks[k]).sum()) for k in state.masks)
        params = eager[0]
        grads = _grads(gen, "cuda")
        state = accumulate(_at_step(eager[1], update * cfg.delta - 1), grads, cfg)
    assert changed > 0


# ---------------------------------------------------------------------------------
# 3. CPU == CUDA.

def _train(name: str, device, updates: int = 4):
    """``updates`` delta-windows of accumulate / masked SGD / update_topology on ``device``."""
    cfg = _cfg(name)
    gen = torch.Generator().manual_seed(3)
    params = {k: torch.randn(s, generator=gen).to(device) for k, s in SHAPES.items()}
    state = init_state(params, cfg, seed=5)  # masks drawn on the CPU, then moved
    params = apply_masks(params, state.masks)
    history = [_to(state.masks, "cpu")]
    gen = torch.Generator().manual_seed(4)
    for step in range(1, updates * cfg.delta + 1):
        grads = _grads(gen, device)
        state = accumulate(state, grads, cfg)
        if is_update_step(step, cfg):
            params, state = update_topology(params, grads, state, cfg)
            history.append(_to(state.masks, "cpu"))
        else:
            masked = apply_masks(grads, state.masks)
            params = {k: params[k] - 0.05 * masked[k] for k in params}
    return history, _to(params, "cpu"), _to(state, "cpu")


@requires_cuda
@pytest.mark.parametrize("name", SOME)
def test_cpu_and_cuda_give_identical_masks(name):
    cpu_history, cpu_params, cpu_state = _train(name, "cpu")
    cuda_history, cuda_params, cuda_state = _train(name, "cuda")
    assert len(cpu_history) == len(cuda_history) == 5
    for i, (a, b) in enumerate(zip(cpu_history, cuda_history)):
        assert same_tree(a, b), f"masks differ after update {i}"
    assert any(not torch.equal(cpu_history[0][k], cpu_history[-1][k]) for k in cpu_history[0])
    assert same_tree(cpu_params, cuda_params)
    assert same_tree(cpu_state, cuda_state)


# ---------------------------------------------------------------------------------
# 4. torch.compile on CUDA.

_TORCH_2_11 = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)


@requires_cuda
@pytest.mark.xfail(_TORCH_2_11, strict=True, reason=(
    "torch < 2.13 (pyproject requires >= 2.13): torch 2.11's dynamo returns the RigLState NamedTuple of a "
    "compiled update_topology empty (len 0), on the CPU and on CUDA, with either engine (seen on the GPU "
    "machine, 2026-12-04); torch 2.13/2.14 compile it correctly (tests/test_batched_update.py)"))
@pytest.mark.parametrize("name", ["rigl-erk", "set-uniform"])
def test_compile_on_cuda_equals_eager_without_recompiles(name):
    torch._dynamo.reset()
    cfg, params, state = _setup(name, "cuda")
    backend = CountingBackend("inductor")
    compiled = torch.compile(update_topology, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(6)
    for update in range(1, 4):
        grads = _grads(gen, "cuda")
        state = accumulate(_at_step(state, update * cfg.delta - 1), grads, cfg)
        eager = update_topology(params, grads, state, cfg)
        assert same_tree(compiled(params, grads, state, cfg), eager), f"update {update}"
        params, state = eager
        assert backend.calls == 1, f"recompiled at update {update}"


# ---------------------------------------------------------------------------------
# 5. Everywhere: no syncs or host-to-device copies, counted on the meta device.

@pytest.mark.parametrize("name", ["rigl-uniform", "rigl-erk", "set-erk", "snfs-uniform", "rigl-erk-accumulate2"])
def test_update_on_meta_has_no_syncs_or_host_copies(name):
    cfg, params, state = _setup(name, "meta")
    grads = {k: torch.empty(s, device="meta") for k, s in SHAPES.items()}
    state = _at_step(state, cfg.delta)
    update_topology(params, grads, state, cfg)  # the first call may build cached constants
    with count_ops() as ops:
        new_params, new_state = update_topology(params, grads, state, cfg)
    assert all(v.device.type == "meta" for v in tree_flatten((new_params, new_state))[0])
    assert (ops.syncs, ops.host_to_device) == (0, 0), dict(ops.launch_ops)


# ---------------------------------------------------------------------------------
# 6. The one-call step (issue 13): params and RigL / optimizer state on CUDA, the step
#    counter on the CPU.

def _tx_setup(name: str, device):
    cfg = _cfg(name)
    gen = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    tx = rigl_func.rigl(cfg, rigl_func.sgd(0.05, momentum=0.9))
    params, state = tx.init(params, seed=0)
    return tx, _to(params, device), state._replace(rigl=_to(state.rigl, device), opt=_to(state.opt, device))


def _assert_close_runs(a, b):
    (pa, sa), (pb, sb) = a, b
    for k, m in sa.rigl.masks.items():
        assert torch.equal(m.cpu(), sb.rigl.masks[k].cpu()), k
    for k in pa:
        torch.testing.assert_close(pa[k].cpu(), pb[k].cpu(), rtol=1e-5, atol=1e-6)
    assert int(sa.count) == int(sb.count) and int(sa.rigl.num_updates) == int(sb.rigl.num_updates)


@requires_cuda
@pytest.mark.parametrize("name", ["rigl-erk", "set-uniform", "snfs-uniform"])
def test_one_call_step_does_not_sync_and_matches_the_cpu(name):
    tx, p_cpu, s_cpu = _tx_setup(name, "cpu")
    _, p, s = _tx_setup(name, "cuda")
    gen = torch.Generator().manual_seed(2)
    for i in range(3 * tx.config.delta):  # 3 updates; the first one warms up cached constants
        g = _grads(gen, "cpu")
        p_cpu, s_cpu = tx.step(p_cpu, g, s_cpu)
        g = _to(g, "cuda")
        torch.cuda.synchronize()
        if i < tx.config.delta:
            p, s = tx.step(p, g, s)
            continue
        with _SyncsAreErrors():
            p, s = tx.step(p, g, s)
    torch.cuda.synchronize()
    assert int(s.rigl.num_updates) == 3
    _assert_close_runs((p, s), (p_cpu, s_cpu))


@requires_cuda
def test_compiled_one_call_step_on_cuda_equals_eager_without_recompiles_or_syncs():
    torch._dynamo.reset()
    tx, p, s = _tx_setup("rigl-erk", "cuda")
    backend = CountingBackend("inductor")
    compiled = torch.compile(tx.step, fullgraph=True, backend=backend)
    eager = comp = (p, s)
    gen = torch.Generator().manual_seed(3)
    for i in range(3 * tx.config.delta):
        g = _to(_grads(gen, "cpu"), "cuda")
        eager = tx.step(*eager[:1], g, eager[1])
        torch.cuda.synchronize()
        if i < tx.config.delta:
            comp = compiled(*comp[:1], g, comp[1])
        else:
            with _SyncsAreErrors():
                comp = compiled(*comp[:1], g, comp[1])
        _assert_close_runs(comp, eager)
    assert backend.calls == 1, "recompiled"


# 7. Issue 17: the padded-row engine on CUDA with NaN / inf / ±0.0 / denormal weights and
# gradients (CUDA's topk, compares and scans): batched == per-layer on CUDA, and CUDA ==
# the CPU, bit for bit; chunked or not.
@requires_cuda
def test_batched_engine_on_cuda_with_special_values_equals_per_layer_and_cpu():
    from hypothesis import given, settings

    from test_engine_scale import _special_case, _special_world
    from conftest import assert_trees_equal
    from rigl_func.topology import update_topology_per_layer

    @settings(max_examples=150, deadline=None)
    @given(case=_special_case())
    def check(case):
        params, grads, state, cfg = _special_world(case)
        cpu = update_topology_per_layer(params, grads, state, cfg)
        on = lambda tree: tree_map(lambda t: t.cuda() if isinstance(t, torch.Tensor) else t, tree)  # noqa: E731
        batched = rigl_func.update_topology(on(params), on(grads), on(state), cfg, engine="batched")
        per_layer = update_topology_per_layer(on(params), on(grads), on(state), cfg)
        assert_trees_equal(batched, per_layer, bitwise=True)
        assert_trees_equal(tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, batched), cpu,
                           bitwise=True)

    check()

"""Process bodies for the multi-process tests (``test_distributed.py``, ``test_fsdp.py``).

Spawned interpreters import this module by name (``tests/`` is on ``sys.path`` under
pytest), so it holds no tests itself. Every check runs in ``try/except`` and records
``"ok"`` or the traceback in ``<out>/rank<r>.json``; a check only ever fails after a
collective whose result both ranks see, so both ranks fail together instead of one
of them hanging in the next collective.

The functional loop: float64 MLP, data at step ``t`` is a pure function of ``t`` (the
global batch of ``2 * B`` rows; rank ``r`` of ``world`` takes its slice), pure SGD
with momentum, gradients averaged by :func:`rigl_func.distributed.all_reduce_mean`.
"""

from __future__ import annotations

import datetime
import json
import gc
import os
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import rigl_func as rf
from rigl_func import distributed as rd
from rigl_func.checkpoint import load_checkpoint, save_checkpoint
from _timeouts import timeout_s

B = 8  # per-rank batch of the 2-rank runs; the 1-process twin uses 2 * B
STEPS = 24
LR, MOMENTUM = 0.05, 0.9


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4)).double()


def make_config(method: str, k: int = 1) -> rf.RigLConfig:
    delta = 6 if k > 1 else 4
    return rf.RigLConfig(t_end=20, delta=delta, sparsity=0.75, distribution="erk", alpha=0.4, method=method,
                         grad_accumulation_n=k)


def batch(t: int, rank: int, world: int, per_rank: int):
    """Rows ``[rank * per_rank, (rank + 1) * per_rank)`` of step ``t``'s global batch."""
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(2 * B, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (2 * B,), generator=g)
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    return x[sl], y[sl]


def init_run(method: str, k: int, seed: int):
    """Params, momentum and state from ``seed`` (each rank passes its own; rank 0's win)."""
    torch.manual_seed(seed)
    net = make_net()
    config = make_config(method, k)
    state = rd.broadcast_tree(rf.init_state(net, config, seed=seed))
    params = {n: p.detach() for n, p in net.named_parameters()}
    params = rf.apply_masks(rd.broadcast_tree(params), state.masks)
    momentum = {n: torch.zeros_like(p) for n, p in params.items()}
    return net, config, {"params": params, "momentum": momentum, "state": state, "t": 0}


def to_saveable(run: dict) -> dict:
    return {**run, "state": run["state"]._asdict()}


def from_saved(obj: dict) -> dict:
    return {**obj, "state": rf.RigLState(**obj["state"])}


def train(net, config, run: dict, until: int, rank: int, world: int, *, on_step=None, save_at=(), path_fmt=""):
    """Advance ``run`` to step ``until``; pure loop, the dict is rebuilt every step."""
    per_rank = 2 * B // world

    def loss_fn(p, x, y):
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    params, momentum, state = run["params"], run["momentum"], run["state"]
    for t in range(run["t"] + 1, until + 1):
        x, y = batch(t, rank, world, per_rank)
        grads = rd.all_reduce_mean(grad(loss_fn)(params, x, y))
        state = rf.accumulate(state, grads, config)
        updated = bool(rf.is_update_step(t, config))
        if updated:
            old = state.masks
            params, state = rf.update_topology(params, grads, state, config)
            momentum = rf.reset_optimizer_state(momentum, old, state.masks)
            rd.check_consistent(state.masks)
        else:
            g = rf.apply_masks(grads, state.masks)
            momentum = {n: MOMENTUM * momentum[n] + g[n] for n in params}
            params = {n: params[n] - LR * momentum[n] for n in params}
        run = {"params": params, "momentum": momentum, "state": state, "t": t}
        if on_step is not None:
            on_step(t, run, updated)
        if t in save_at and rank == 0:
            save_checkpoint(to_saveable(run), path_fmt.format(t))
    return run


# ---------------------------------------------------------------------------- helpers
def gathered_equal(tensor: torch.Tensor, world: int) -> bool:
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous())
    return all(torch.equal(out[0], o) for o in out[1:])


def packed(tree) -> torch.Tensor:
    """All leaves as one float64/uint8-free vector for bitwise comparison across ranks."""
    leaves = [v for v in torch.utils._pytree.tree_flatten(tree)[0] if isinstance(v, torch.Tensor)]
    return torch.cat([v.detach().reshape(-1).to(torch.float64) for v in leaves])


def _setup(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s(600)))


def _run_checks(rank: int, out_dir: str, checks: dict) -> None:
    results = {}
    for name, fn in checks.items():
        try:
            fn()
            results[name] = "ok"
        except Exception:  # recorded, asserted by the pytest process
            results[name] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


# ---------------------------------------------------------------------------- phase 1
RESUME_CASES = {  # name -> (method, grad_accumulation_n, stop steps)
    "rigl_k3": ("rigl", 3, (4, 11, 12)),  # window 4-6 of update 6; 11: right before update 12; 12: right after
    "snfs": ("snfs", 1, (7, 8)),
    "set": ("set", 1, (8,)),
}


def phase1(rank: int, world: int, port: int, out_dir: str) -> None:
    """Masks identical every step (a), final results for the 1-process twin (b), the
    uninterrupted runs with checkpoints (c), consistency-check failure modes (e)."""
    _setup(rank, world, port)
    checks = {}

    def masks_every_step(method):
        def check():
            net, config, run = init_run(method, 1, seed=rank)  # rank 0's seed must win
            changed = []

            def on_step(t, run, updated):
                assert gathered_equal(packed(run["state"].masks), world), f"{method}: masks differ at step {t}"
                assert gathered_equal(packed(run["params"]), world), f"{method}: params differ at step {t}"
                if updated:
                    changed.append(t)
                    for n, m in run["state"].masks.items():
                        assert torch.all(run["params"][n][~m] == 0), f"{method} {n}: inactive weight at step {t}"

            first = {n: m.clone() for n, m in run["state"].masks.items()}
            run = train(net, config, run, STEPS, rank, world, on_step=on_step)
            assert changed == [4, 8, 12, 16], f"{method}: updates at {changed}"
            assert any(not torch.equal(first[n], m) for n, m in run["state"].masks.items()), f"{method}: no change"
            if rank == 0:
                save_checkpoint(to_saveable(run), os.path.join(out_dir, f"final_{method}.pt"))
        return check

    for method in ("rigl", "set", "snfs"):
        checks[f"masks_{method}"] = masks_every_step(method)

    def resume_reference(case):
        def check():
            method, k, stops = RESUME_CASES[case]
            net, config, run = init_run(method, k, seed=0)
            run = train(net, config, run, STEPS, rank, world, save_at=stops,
                        path_fmt=os.path.join(out_dir, f"func_{case}_{{}}.pt"))
            if rank == 0:
                save_checkpoint(to_saveable(run), os.path.join(out_dir, f"func_{case}_final.pt"))
        return check

    for case in RESUME_CASES:
        checks[f"reference_{case}"] = resume_reference(case)
    checks["reference_scheduler"] = lambda: scheduler_run(rank, world, out_dir, resume_at=None)
    checks["all_reduce_mean"] = lambda: _check_all_reduce(rank, world)
    checks["consistency_check"] = lambda: _check_consistency(rank, world)
    _run_checks(rank, out_dir, checks)
    gc.collect()  # free DDP reducers while the group lives (exit-time aborts otherwise)
    dist.destroy_process_group()


def _check_all_reduce(rank: int, world: int) -> None:
    tree = {"a": torch.full((3, 2), float(rank + 1)), "b": [torch.full((4,), 2.0 * rank, dtype=torch.float64)],
            "c": torch.full((5,), float(rank), dtype=torch.float32)}
    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        out = rd.all_reduce_mean(tree)
    finally:
        dist.all_reduce = original
    assert sorted(map(str, calls)) == ["torch.float32", "torch.float64"], f"one collective per dtype, got {calls}"
    assert torch.equal(out["a"], torch.full((3, 2), 1.5)) and torch.equal(out["c"], torch.full((5,), 0.5))
    assert torch.equal(out["b"][0], torch.ones(4, dtype=torch.float64))
    assert torch.equal(tree["a"], torch.full((3, 2), float(rank + 1))), "input modified"


def _check_consistency(rank: int, world: int) -> None:
    net = make_net()
    state = rd.broadcast_tree(rf.init_state(net, make_config("rigl"), seed=rank))
    rd.check_consistent(state.masks)  # identical after the broadcast: passes
    masks = dict(state.masks)
    if rank == 1:  # move one active connection of layer 2.weight: same nnz, other position
        m = masks["2.weight"].clone().reshape(-1)
        on, off = int(m.nonzero()[0]), int((~m).nonzero()[0])
        m[on], m[off] = False, True
        masks["2.weight"] = m.view_as(masks["2.weight"])
    try:
        rd.check_consistent(masks)
    except RuntimeError as err:
        assert "'2.weight'" in str(err) and "'0.weight'" not in str(err), str(err)
    else:
        raise AssertionError("check_consistent did not raise for a perturbed mask")
    fewer = {k: v for k, v in state.masks.items() if rank == 0 or k != "4.weight"}
    try:
        rd.check_consistent(fewer)
    except RuntimeError as err:
        assert "different structures" in str(err), str(err)
    else:
        raise AssertionError("check_consistent did not raise for a missing layer")
    assert gathered_equal(packed(rd.broadcast_tree(masks)), world), "broadcast did not restore agreement"


# ---------------------------------------------------------------------------- scheduler
SCHED_STOPS = (4, 11, 12)


def scheduler_run(rank: int, world: int, out_dir: str, resume_at):
    """RigLScheduler under DDP (k=3, delta=6); uninterrupted with checkpoints, or resumed."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(rank + 10 * (resume_at is not None))  # a resumed run must not depend on its init
    net = make_net()
    ddp = DDP(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM)
    pruner = rf.RigLScheduler(ddp, opt, dense_allocation=0.25, T_end=20, delta=6, grad_accumulation_n=3,
                              ignore_linear_layers=False, seed=rank + 5)
    start = 0
    if resume_at is not None:
        ckpt = load_checkpoint(os.path.join(out_dir, f"sched_{resume_at}.pt"))
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        pruner.load_state_dict(ckpt["pruner"])
        start = ckpt["t"]
    for t in range(start + 1, STEPS + 1):
        x, y = batch(t, rank, world, B)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        if pruner():
            opt.step()
        rd.check_consistent(pruner.state.masks)
        if resume_at is None and t in SCHED_STOPS and rank == 0:
            save_checkpoint({"model": net.state_dict(), "optimizer": opt.state_dict(),
                             "pruner": pruner.state_dict(), "t": t}, os.path.join(out_dir, f"sched_{t}.pt"))
    final = {"model": net.state_dict(), "optimizer": opt.state_dict(), "pruner": pruner.state_dict()}
    pruner.remove()
    if rank == 0:
        name = "sched_final.pt" if resume_at is None else f"sched_resumed_{resume_at}.pt"
        save_checkpoint(final, os.path.join(out_dir, name))


# ---------------------------------------------------------------------------- phase 2
def phase2(rank: int, world: int, port: int, out_dir: str) -> None:
    """Fresh processes: load every checkpoint of phase 1 and run to the end."""
    _setup(rank, world, port)
    checks = {}

    def resume(case, stop):
        def check():
            method, k, _ = RESUME_CASES[case]
            net = make_net()
            run = from_saved(load_checkpoint(os.path.join(out_dir, f"func_{case}_{stop}.pt")))
            assert run["t"] == stop
            run = train(net, make_config(method, k), run, STEPS, rank, world)
            if rank == 0:
                save_checkpoint(to_saveable(run), os.path.join(out_dir, f"func_{case}_resumed_{stop}.pt"))
        return check

    for case, (_, _, stops) in RESUME_CASES.items():
        for stop in stops:
            checks[f"resume_{case}_{stop}"] = resume(case, stop)
    for stop in SCHED_STOPS:
        checks[f"resume_scheduler_{stop}"] = (lambda s: lambda: scheduler_run(rank, world, out_dir, s))(stop)
    _run_checks(rank, out_dir, checks)
    gc.collect()  # free DDP reducers while the group lives (exit-time aborts otherwise)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- FSDP2
FSDP_CASES = (("rigl", 1), ("snfs", 1), ("rigl", 3))


def fsdp_run(rank: int, world: int, method: str, k: int):
    """RigL on a ``fully_shard``-ed model with torch.optim.SGD; returns (masks per update, full params)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rigl_func import fsdp as rfs

    torch.manual_seed(0)  # fully_shard keeps each rank's chunk of its own init: same seed everywhere
    net = make_net()
    config = make_config(method, k)
    state = rf.init_state(net, config, seed=0)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n in state.masks:
                p.mul_(state.masks[n])
    # fully_shard's default mesh is on the accelerator when there is one (cuda:0 on a GPU
    # machine), while this test, its gloo group and its unsharded reference run on the CPU.
    mesh = init_device_mesh("cpu", (world,))
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    params = dict(net.named_parameters())
    assert all(type(p).__name__ == "DTensor" for p in params.values())
    device = next(iter(params.values())).device
    assert device.type == "cpu", device
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    history = []
    for t in range(1, STEPS + 1):
        x, y = (v.to(device) for v in batch(t, rank, world, B))  # inputs follow the model's device
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        grads = {n: p.grad for n, p in params.items()}
        state = rfs.accumulate_sharded(state, grads, config)
        if bool(rf.is_update_step(t, config)):
            old = rfs.local_masks(state.masks, params)
            new_local, state = rfs.update_topology_sharded(params, grads, state, config)
            new = rfs.local_masks(state.masks, params)
            with torch.no_grad():
                for n, value in new_local.items():
                    params[n].to_local().copy_(value)
                    buf = opt.state[params[n]]["momentum_buffer"].to_local()
                    buf.masked_fill_(~(old[n] & new[n]), 0)
            history.append({n: m.clone() for n, m in state.masks.items()})
            rd.check_consistent(state.masks)
        else:
            with torch.no_grad():
                for n, m in rfs.local_masks(state.masks, params).items():
                    params[n].grad.to_local().masked_fill_(~m, 0)
            opt.step()
    full = {n: p.detach().full_tensor() for n, p in params.items()}
    return history, full, state


def fsdp_phase(rank: int, world: int, port: int, out_dir: str) -> None:
    """FSDP2 (fully_shard) masks equal the unsharded functional run's after every update."""
    _setup(rank, world, port)
    checks = {}

    def case(method, k):
        def check():
            sharded_hist, sharded_params, sharded_state = fsdp_run(rank, world, method, k)
            net, config, run = init_run(method, k, seed=0)
            ref_hist = []
            run = train(net, config, run, STEPS, rank, world,
                        on_step=lambda t, r, up: up and ref_hist.append(r["state"].masks))
            assert len(ref_hist) == len(sharded_hist) >= 3, (len(ref_hist), len(sharded_hist))
            for i, (a, b) in enumerate(zip(ref_hist, sharded_hist)):
                for n in a:
                    assert torch.equal(a[n], b[n]), f"{method} k={k}: update {i + 1}, {n}: masks differ"
            for n, p in run["params"].items():
                torch.testing.assert_close(sharded_params[n], p, rtol=1e-9, atol=1e-12)
            for n, m in sharded_state.masks.items():
                assert torch.all(sharded_params[n][~m] == 0), f"{n}: inactive weight is not 0"
            assert int(sharded_state.step) == STEPS
        return check

    for method, k in FSDP_CASES:
        checks[f"fsdp_{method}_k{k}"] = case(method, k)
    _run_checks(rank, out_dir, checks)
    gc.collect()  # free DDP reducers while the group lives (exit-time aborts otherwise)
    dist.destroy_process_group()

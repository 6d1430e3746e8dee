"""RigLScheduler under 2-process DistributedDataParallel, gloo on CPU (issue 3, item 6).

One spawn (two fresh interpreters) runs every case, because starting them costs more
than the training. Each rank gets its own data, its own model init and its own
``seed``: DDP broadcasts rank 0's weights and the scheduler broadcasts rank 0's masks,
so everything must still agree. Checked after every call: masks and weights identical
on both ranks, inactive weights / grads / momentum exactly zero; before every update:
the gradients the update reads are the all-reduced (identical) dense ones, and the new
masks equal the pure core's update on them.
"""

from __future__ import annotations

import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo not available"
)

WORLD = 2
# (static_topo, grad_accumulation_n, gradient_as_bucket_view)
CASES = [(False, 1, False), (False, 2, True), (True, 1, False)]


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4),
    )


def _same_on_all_ranks(tensor: torch.Tensor, what: str) -> None:
    gathered = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(gathered, tensor)
    for other in gathered[1:]:
        assert torch.equal(gathered[0], other), f"{what} differs between ranks"


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def _run_case(rank: int, static: bool, k: int, bucket_view: bool) -> None:
    from rigl_func import RigLScheduler, accumulate, update_topology

    torch.manual_seed(rank)  # different init per rank: DDP broadcasts rank 0's weights
    model = _net()
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    pruner = RigLScheduler(ddp, opt, dense_allocation=0.25, T_end=16, delta=3, grad_accumulation_n=k,
                           ignore_linear_layers=False, static_topo=static, seed=rank)  # rank 0's masks win
    assert pruner.layer_names == ["0.weight", "3.weight", "7.weight", "9.weight"]  # no "module." prefix
    names = list(pruner.state.masks)
    params = dict(model.named_parameters())
    _same_on_all_ranks(_flat(pruner.state.masks.values()), "initial masks")
    first = [m.clone() for m in pruner.state.masks.values()]
    for t in range(12):
        g = torch.Generator().manual_seed(100 * rank + t)  # each rank its own data
        x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        update = not static and (t + 1) % 3 == 0 and t + 1 < 16
        if update:
            grads = {n: params[n].grad.clone() for n in names}
            _same_on_all_ranks(_flat(grads.values()), "gradients read by the update")
            assert any(bool(torch.any(grads[n][~m] != 0)) for n, m in pruner.state.masks.items()), "grads masked"
            expect = accumulate(pruner.state, grads, pruner.config)
            _, expect = update_topology({n: params[n].detach() for n in names}, grads, expect, pruner.config)
        took = pruner()
        assert took is not update
        if took:
            opt.step()
        else:
            assert all(torch.equal(pruner.state.masks[n], expect.masks[n]) for n in names)
        masks = pruner.state.masks
        _same_on_all_ranks(_flat(masks.values()), f"masks after step {t + 1}")
        _same_on_all_ranks(_flat(p for p in model.parameters()), f"weights after step {t + 1}")
        for n, m in masks.items():
            p = params[n]
            assert torch.all(p[~m] == 0) and torch.all(p.grad[~m] == 0), f"{n} step {t + 1}"
            buf = opt.state.get(p, {}).get("momentum_buffer")
            assert buf is None or torch.all(buf[~m] == 0), f"{n} momentum step {t + 1}"
    changed = any(not torch.equal(a, b) for a, b in zip(first, pruner.state.masks.values()))
    assert pruner.rigl_steps == (0 if static else 4) and changed is not static
    pruner.remove()


def _worker(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for case in CASES:
            _run_case(rank, *case)
        # Free the DDP reducers (cycles: only the collector frees them) while the process
        # group lives, and let both ranks finish before either tears gloo down: otherwise a
        # process now and then aborted at exit, after the test had passed (SIGABRT,
        # "terminate called without an active exception", no Python frame).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)

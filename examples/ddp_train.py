"""Data-parallel RigL with checkpoints and exact resume, functional or rigl-torch style.

    torchrun --nproc_per_node=2 examples/ddp_train.py                     # gloo on CPU, nccl on GPUs
    torchrun --nproc_per_node=2 examples/ddp_train.py --api scheduler     # RigLScheduler + DDP
    python examples/ddp_train.py --steps 100                              # one process, no torchrun
    torchrun --nproc_per_node=2 examples/ddp_train.py --resume            # continue from --ckpt

A small MLP on synthetic 4-class data. The global batch of step ``t`` is a pure
function of ``(seed, t)`` and each rank takes its slice, so a resumed run sees
exactly the batches the uninterrupted run would have seen.

* ``--api functional``: ``torch.func`` gradients averaged with
  :func:`rigl_func.distributed.all_reduce_mean` (no DDP), SGD with momentum as a pure
  pytree, rank 0's initial state broadcast with :func:`~rigl_func.distributed.broadcast_tree`.
* ``--api scheduler``: ``DistributedDataParallel`` + ``torch.optim.SGD`` +
  :class:`rigl_func.RigLScheduler` (it broadcasts rank 0's masks itself).

Both check that the ranks agree on the masks after every topology update
(:func:`~rigl_func.distributed.check_consistent`) and save an atomic checkpoint from
rank 0 every ``--save-every`` steps (:func:`rigl_func.checkpoint.save_checkpoint`).
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

import rigl_func as rf
from rigl_func import distributed as rd
from rigl_func.checkpoint import load_checkpoint, remove_stale_temp_files, save_checkpoint

FEATURES, CLASSES, N = 32, 4, 4096


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, FEATURES, generator=g)
    y = (x[:, :CLASSES] * 3 + 0.2 * torch.randn(N, CLASSES, generator=g)).argmax(1)
    return x, y


def step_batch(x, y, seed: int, t: int, global_batch: int, rank: int, world: int, device):
    """Rank ``rank``'s slice of step ``t``'s global batch (a pure function of seed and t)."""
    idx = torch.randint(0, N, (global_batch,), generator=torch.Generator().manual_seed(seed * 100003 + t))
    idx = idx.view(world, -1)[rank]
    return x[idx].to(device), y[idx].to(device)


def setup() -> tuple[int, int, torch.device]:
    """Initialize the process group under torchrun (nccl with GPUs, else gloo)."""
    if "RANK" not in os.environ:  # plain `python`: one process, the helpers are no-ops
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def main(argv: Optional[Sequence[str]] = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", choices=("functional", "scheduler"), default="functional")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--global-batch", type=int, default=128, help="split evenly across ranks")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--delta", type=int, default=25)
    parser.add_argument("--grad-accumulation-n", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt", default="runs/ddp/ckpt.pt")
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--resume", action="store_true", help="continue from --ckpt if it exists")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="simulate a preemption: save and exit after this step (the schedule still uses --steps)")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    rank, world, device = setup()
    if rank == 0:
        print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s) per rank, "
              f"{world} rank(s)", flush=True)
    try:
        if args.global_batch % world:
            raise ValueError(f"--global-batch={args.global_batch} must be divisible by the world size {world}")
        return train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank: int, world: int, device: torch.device) -> float:
    torch.manual_seed(args.seed + rank)  # deliberately different per rank: rank 0's init is broadcast
    h = args.hidden
    model = nn.Sequential(nn.Linear(FEATURES, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, CLASSES)).to(device)
    x, y = make_data(args.seed)
    t_end = int(0.75 * args.steps)
    config = rf.RigLConfig(sparsity=args.sparsity, distribution="erk", delta=args.delta, t_end=max(t_end, 2),
                           alpha=0.3, grad_accumulation_n=args.grad_accumulation_n)
    ckpt = None
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.ckpt)), exist_ok=True)
        remove_stale_temp_files(args.ckpt)  # leftovers of a killed save; the checkpoint itself is complete
    if rd.is_distributed():
        dist.barrier()
    if args.resume and os.path.isfile(args.ckpt):
        ckpt = load_checkpoint(args.ckpt, map_location=device)
        if ckpt["api"] != args.api:
            raise ValueError(f"--ckpt {args.ckpt!r} was written with --api {ckpt['api']}, not --api {args.api}")
    start = 0 if ckpt is None else int(ckpt["t"])
    last = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    if rank == 0:
        print(f"world={world} device={device} api={args.api} start_step={start} steps={args.steps}", flush=True)

    if args.api == "functional":
        state = rd.broadcast_tree(rf.init_state(model, config, seed=args.seed + rank))
        params = rd.broadcast_tree({k: v.detach() for k, v in model.named_parameters()})
        params = rf.apply_masks(params, state.masks)
        momentum = {k: torch.zeros_like(v) for k, v in params.items()}
        if ckpt is not None:
            state, params, momentum = rf.RigLState(**ckpt["state"]), ckpt["params"], ckpt["momentum"]
            rd.check_consistent(state.masks)

        def loss_fn(p, xb, yb):
            return F.cross_entropy(functional_call(model, p, (xb,)), yb)

        for t in range(start + 1, last + 1):
            xb, yb = step_batch(x, y, args.seed, t, args.global_batch, rank, world, device)
            grads, loss = grad_and_value(loss_fn)(params, xb, yb)
            grads = rd.all_reduce_mean(grads)  # dense, averaged: identical on every rank
            state = rf.accumulate(state, grads, config)
            if rf.is_update_step(t, config):
                old = state.masks
                params, state = rf.update_topology(params, grads, state, config)
                momentum = rf.reset_optimizer_state(momentum, old, state.masks)
                rd.check_consistent(state.masks)
            else:
                g = rf.apply_masks(grads, state.masks)
                momentum = {k: 0.9 * momentum[k] + g[k] for k in params}
                params = {k: params[k] - args.lr * momentum[k] for k in params}
            if rank == 0 and (t % args.save_every == 0 or t == last):
                save_checkpoint({"api": "functional", "t": t, "state": state._asdict(), "params": params,
                                 "momentum": momentum}, args.ckpt)
            if rank == 0 and (t % 100 == 0 or t == args.steps):
                print(f"step {t:4d}  loss {loss.item():.4f}  updates {int(state.num_updates)}", flush=True)
        logits = functional_call(model, params, (x.to(device),))
    else:
        ddp = nn.parallel.DistributedDataParallel(model) if rd.is_distributed() else model
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        pruner = rf.RigLScheduler(ddp, opt, dense_allocation=1 - args.sparsity, T_end=max(t_end, 2),
                                  sparsity_distribution="erk", ignore_linear_layers=False, delta=args.delta,
                                  grad_accumulation_n=args.grad_accumulation_n, seed=args.seed + rank)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            pruner.load_state_dict(ckpt["pruner"])  # collective: rank 0's masks are broadcast
        for t in range(start + 1, last + 1):
            xb, yb = step_batch(x, y, args.seed, t, args.global_batch, rank, world, device)
            opt.zero_grad()
            loss = F.cross_entropy(ddp(xb), yb)
            loss.backward()
            if pruner():
                opt.step()
            else:
                rd.check_consistent(pruner.state.masks)
            if rank == 0 and (t % args.save_every == 0 or t == last):
                save_checkpoint({"api": "scheduler", "t": t, "model": model.state_dict(),
                                 "optimizer": opt.state_dict(), "pruner": pruner.state_dict()}, args.ckpt)
            if rank == 0 and (t % 100 == 0 or t == args.steps):
                print(f"step {t:4d}  loss {loss.item():.4f}  updates {pruner.rigl_steps}", flush=True)
        pruner.remove()
        with torch.no_grad():
            logits = model(x.to(device))
    acc = (logits.argmax(1).cpu() == y).float().mean().item()
    if rank == 0:
        print(f"train accuracy {acc:.3f}", flush=True)
    return acc


if __name__ == "__main__":
    main()

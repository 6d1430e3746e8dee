"""Shared machinery of the full-scale RigL scripts (``cifar10_wrn.py``, ``imagenet_resnet50.py``).

What lives here, so the two scripts hold only their model, data and recipe:

* :func:`base_parser` -- the flags both scripts share (method, sparsity, RigL knobs,
  optimizer, data, checkpointing, device / AMP / channels-last).
* **Reproducible data order.** :class:`EpochSampler` yields ``(index, sample_seed)``:
  the epoch's permutation is a pure function of ``(seed, epoch)`` and every sample's
  augmentation seed of ``(seed, epoch, position)``; :class:`SeededDataset` runs the
  (torchvision) transform under that seed. A resumed run therefore starts at the
  exact batch where it stopped, with the same crops and flips, whatever ``--workers``.
* :func:`train` -- the loop: SGD, a per-step learning rate ``lr_at(step)`` (no LR
  scheduler state to save), the drop-in :class:`rigl_func.RigLScheduler`
  (``if pruner(): optimizer.step()``), top-1 evaluation after every epoch, logging,
  and atomic checkpoints (:func:`rigl_func.checkpoint.save_checkpoint`) of model,
  optimizer, RigL state, step, epoch, batch position and RNG states, with ``--resume``.

On a CPU a run resumed from a checkpoint is bit-identical to the uninterrupted run
(weights and masks; ``tests/test_fullscale_examples.py`` checks it). On a GPU add
``--deterministic`` for the same guarantee (cuDNN picks non-deterministic kernels
otherwise).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

import rigl_func as rf
from rigl_func.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["METHODS", "base_parser", "mix_seed", "EpochSampler", "SeededDataset", "decay_param_groups",
           "make_pruner", "train", "evaluate", "piecewise", "round_steps", "check_args"]

METHODS = ("dense", "static", "set", "rigl")
_MASK64 = (1 << 64) - 1
# Flags that define the training run; a --resume with different values is refused.
_RECIPE_KEYS = ("method", "sparsity", "distribution", "delta", "alpha", "t_end_fraction", "epochs", "batch_size",
                "lr", "momentum", "weight_decay", "seed", "fake_data", "fake_size")


def mix_seed(*values: int) -> int:
    """Hash integers into one seed in ``[0, 2**63)`` (splitmix64 finalizer, chained).

    Example:
        >>> mix_seed(0, 1, 2) == mix_seed(0, 1, 2) != mix_seed(0, 2, 1)
        True
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1


class EpochSampler(Sampler):
    """Yields ``(index, sample_seed)`` for positions ``start, start+1, ...`` of an epoch.

    The order is ``torch.randperm(n)`` under a generator seeded by ``mix_seed(seed,
    epoch)`` (or ``0..n-1`` when ``shuffle=False``); ``sample_seed = mix_seed(seed,
    epoch, position)``. Pure function of its arguments, so a resumed run sees the
    same batches.

    Example:
        >>> list(EpochSampler(4, seed=0, epoch=0, start=2)) == list(EpochSampler(4, seed=0, epoch=0))[2:]
        True
    """

    def __init__(self, n: int, *, seed: int, epoch: int, start: int = 0, shuffle: bool = True) -> None:
        if not 0 <= start <= n:
            raise ValueError(f"start must be in [0, n={n}], got start={start}")
        self.n, self.seed, self.epoch, self.start, self.shuffle = n, seed, epoch, start, shuffle

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for pos in range(self.start, self.n):
            yield order[pos], mix_seed(self.seed, self.epoch, pos)

    def __len__(self) -> int:
        return self.n - self.start


class SeededDataset(Dataset):
    """``base[index]`` -> ``(transform(image), target)``, the transform run under ``sample_seed``.

    Items are ``(index, sample_seed)`` pairs (from :class:`EpochSampler`). The
    transform's draws from the global torch RNG (all of torchvision's random
    transforms) happen inside ``torch.random.fork_rng``, so the caller's RNG is untouched.
    """

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]):
        index, sample_seed = item
        image, target = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            x = self.transform(image)
        return x, target


def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags shared by both scripts; each script adds its own and sets defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("sparse training")
    g.add_argument("--method", choices=METHODS, default="rigl", help="dense | static | set | rigl (default: rigl)")
    g.add_argument("--sparsity", type=float, default=0.9, help="overall sparsity in [0, 1) (default: 0.9)")
    g.add_argument("--distribution", choices=("uniform", "erk"), help="sparsity distribution over layers")
    g.add_argument("--delta", type=int, default=100, help="steps between topology updates (default: 100)")
    g.add_argument("--alpha", type=float, default=0.3, help="initial drop fraction, cosine-annealed (default: 0.3)")
    g.add_argument("--t-end-fraction", type=float, default=0.75,
                   help="topology frozen after this fraction of training (default: 0.75)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, help="training epochs (the schedule is defined by them)")
    g.add_argument("--batch-size", type=int, help="training batch size")
    g.add_argument("--lr", type=float, help="(peak) learning rate")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, help="L2 on conv/linear weights (not on norms or biases)")
    g.add_argument("--seed", type=int, default=0, help="model init, masks, data order, augmentation (default: 0)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="dataset root (see the module docstring)")
    g.add_argument("--fake-data", action="store_true", help="torchvision FakeData instead of real data (no download)")
    g.add_argument("--fake-size", type=int, default=512, help="FakeData training images (default: 512)")
    g.add_argument("--fake-val-size", type=int, default=64, help="FakeData validation images (default: 64)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    g.add_argument("--eval-batch-size", type=int, default=256)
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/fullscale", help="output directory (checkpoint.pt) (default: runs/fullscale)")
    g.add_argument("--resume", help="checkpoint to continue from (e.g. OUT/checkpoint.pt)")
    g.add_argument("--max-steps", type=int, help="stop after this many steps in total (smoke runs); the LR "
                   "and RigL schedules still follow --epochs")
    g.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (default: 1000)")
    g.add_argument("--log-every", type=int, default=100, help="steps between log lines (default: 100)")
    g.add_argument("--no-eval", action="store_true", help="skip the per-epoch evaluation")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--amp", action="store_true", help="bf16 autocast for forward and loss")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format (GPU convs)")
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (bitwise resume on GPU; slower)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the flag for values the loop cannot run with."""
    for name in ("epochs", "batch_size", "delta", "checkpoint_every", "log_every", "eval_batch_size", "fake_size",
                 "fake_val_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise ValueError(f"--max-steps must be > 0, got {args.max_steps}")
    if not 0.0 <= args.sparsity < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if not 0.0 < args.t_end_fraction <= 1.0:
        raise ValueError(f"--t-end-fraction must be in (0, 1], got {args.t_end_fraction}")
    if not args.fake_data and args.data is None:
        raise ValueError("--data is required (or pass --fake-data for a smoke run)")


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two SGD groups: conv/linear weights (``ndim > 1``) with weight decay, the rest without."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_pruner(args: argparse.Namespace, model: nn.Module, optimizer, total_steps: int):
    """The :class:`rigl_func.RigLScheduler` for ``--method`` (``None`` for dense).

    Every Conv/Linear weight is sparsifiable (``ignore_linear_layers=False``, as in the
    paper); ``uniform`` keeps the first layer dense, ``erk`` sets all layers' densities.
    """
    if args.method == "dense":
        return None
    t_end = int(args.t_end_fraction * total_steps)
    if t_end <= 0:
        raise ValueError(f"T_end = int(--t-end-fraction * total steps) = {t_end} must be > 0 "
                         f"(total steps {total_steps}): train for more steps")
    return rf.RigLScheduler(model, optimizer, dense_allocation=1.0 - args.sparsity, T_end=t_end,
                            sparsity_distribution=args.distribution, ignore_linear_layers=False, delta=args.delta,
                            alpha=args.alpha, static_topo=args.method == "static", seed=args.seed,
                            grow="random" if args.method == "set" else "gradient")


def _density(pruner) -> float:
    if pruner is None:
        return 1.0
    active = sum(int(m.sum()) if m is not None else n for m, n in zip(pruner.backward_masks, pruner.N))
    return active / sum(pruner.N)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, args: argparse.Namespace, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (a :class:`SeededDataset`), in [0, 1]."""
    model.eval()
    loader = DataLoader(data, batch_size=args.eval_batch_size, num_workers=args.workers,
                        sampler=EpochSampler(len(data), seed=0, epoch=0, shuffle=False))
    correct = total = 0
    for x, y in loader:
        x, y = _to(x, y, device, args)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        total += y.numel()
    return correct / max(total, 1)


def _to(x, y, device, args):
    x = x.to(device, non_blocking=True)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    # RNG states are CPU ByteTensors; a checkpoint loaded with map_location="cuda"
    # moves them to the GPU, and torch.set_rng_state rejects those: move them back.
    torch.set_rng_state(states["torch"].cpu())
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def train(args: argparse.Namespace, build_model: Callable[[], nn.Module], train_data: Dataset, val_data: Dataset,
          make_lr: Callable[[int, int], Callable[[int], float]], criterion: nn.Module, *,
          nesterov: bool) -> dict[str, Any]:
    """Train with the paper's sparse-training protocol; checkpoint, resume, evaluate.

    Args:
        args: parsed flags from :func:`base_parser` (plus the script's own).
        build_model: called once after ``torch.manual_seed(args.seed)``.
        train_data, val_data: :class:`SeededDataset` s.
        make_lr: ``(steps_per_epoch, total_steps) -> lr_at``, ``lr_at(step) -> float``
            the learning rate of 0-based step ``step``.
        criterion: the loss, ``criterion(logits, targets)``.
        nesterov: Nesterov momentum.

    Returns:
        ``{"step", "epoch", "top1" (last evaluation or None), "density", "checkpoint",
        "model", "pruner", "optimizer"}``.
    """
    check_args(args)
    device = torch.device(args.device)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    steps_per_epoch = len(train_data) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size={args.batch_size} is larger than the training set ({len(train_data)})")
    total_steps = args.epochs * steps_per_epoch
    stop = total_steps if args.max_steps is None else min(args.max_steps, total_steps)
    lr_at = make_lr(steps_per_epoch, total_steps)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = build_model().to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(decay_param_groups(model, args.weight_decay), lr=lr_at(0),
                                momentum=args.momentum, nesterov=nesterov)
    pruner = make_pruner(args, model, optimizer, total_steps)
    recipe = {k: getattr(args, k) for k in _RECIPE_KEYS}
    step, top1 = 0, None
    if args.resume:
        ck = load_checkpoint(args.resume, map_location=device)
        diff = {k: (ck["recipe"].get(k), v) for k, v in recipe.items() if ck["recipe"].get(k) != v}
        if diff:
            raise ValueError(f"--resume {args.resume!r} was saved with other flags (saved, now): {diff}")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if pruner is not None:
            pruner.load_state_dict(ck["pruner"])
        step, top1 = int(ck["step"]), ck["top1"]
        _set_rng_states(ck["rng"])
        print(f"resumed from {args.resume} at step {step} (epoch {ck['epoch']}, batch {ck['batch']})", flush=True)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "checkpoint.pt")

    saved_at = [None]

    def checkpoint() -> None:
        saved_at[0] = step
        epoch, batch = divmod(step, steps_per_epoch)
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "pruner": None if pruner is None else pruner.state_dict(), "step": step, "epoch": epoch,
                         "batch": batch, "top1": top1, "recipe": recipe, "rng": _rng_states()}, path)

    print(f"{args.method} sparsity={args.sparsity if pruner else 0.0} distribution={args.distribution}: "
          f"{total_steps} steps ({args.epochs} epochs x {steps_per_epoch}), running to step {stop}, "
          f"T_end={getattr(pruner, 'T_end', None)}, density={_density(pruner):.4f}; torch {torch.__version__}, "
          f"device {device}, {torch.get_num_threads()} CPU thread(s)", flush=True)
    tic, tic_step = time.perf_counter(), step
    while step < stop:
        epoch, batch = divmod(step, steps_per_epoch)
        sampler = EpochSampler(len(train_data), seed=args.seed, epoch=epoch, start=batch * args.batch_size)
        loader = DataLoader(train_data, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                            num_workers=args.workers, pin_memory=device.type == "cuda")
        model.train()
        for x, y in loader:
            x, y = _to(x, y, device, args)
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss = criterion(model(x), y)
            loss.backward()
            if pruner is None or pruner():  # False on a RigL step: the update replaces the optimizer step
                optimizer.step()
            step += 1
            if step % args.log_every == 0 or step == stop:
                rate = (step - tic_step) * args.batch_size / (time.perf_counter() - tic)
                print(f"step {step}/{total_steps} epoch {epoch} loss {loss.item():.4f} lr {lr:.4g} "
                      f"density {_density(pruner):.4f} rigl_steps {getattr(pruner, 'rigl_steps', 0)} "
                      f"{rate:.0f} img/s", flush=True)
                tic, tic_step = time.perf_counter(), step
            if step % steps_per_epoch == 0 and not args.no_eval:
                top1 = evaluate(model, val_data, args, device)
                model.train()
                print(f"epoch {epoch + 1} step {step} top1 {100 * top1:.2f}", flush=True)
            if step % args.checkpoint_every == 0:
                checkpoint()
            if step == stop:
                break
    final_eval = not args.no_eval and step % steps_per_epoch != 0  # stopped mid-epoch (--max-steps)
    if final_eval:
        top1 = evaluate(model, val_data, args, device)
        print(f"final step {step} top1 {100 * top1:.2f}", flush=True)
    if final_eval or saved_at[0] != step:
        checkpoint()
    if pruner is not None:
        print(pruner, flush=True)
    return {"step": step, "epoch": step / steps_per_epoch, "top1": top1, "density": _density(pruner),
            "checkpoint": path, "model": model, "pruner": pruner, "optimizer": optimizer}


def piecewise(boundaries: Sequence[int], values: Sequence[float]) -> Callable[[int], float]:
    """``lr_at(step) = values[i]`` with ``i`` the number of boundaries ``<= step``.

    Example:
        >>> f = piecewise([2, 4], [1.0, 0.5, 0.25])
        >>> [f(s) for s in range(5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"need len(values) == len(boundaries) + 1, got {len(values)} and {len(boundaries)}")
    bounds = list(boundaries)

    def lr_at(step: int) -> float:
        return values[sum(1 for b in bounds if step >= b)]

    return lr_at


def round_steps(epochs: float, steps_per_epoch: int) -> int:
    """``round(epochs * steps_per_epoch)`` as an int (schedule points in steps)."""
    return int(math.floor(epochs * steps_per_epoch + 0.5))

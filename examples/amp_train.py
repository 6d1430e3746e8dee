"""Mixed precision (autocast + GradScaler) with the drop-in ``RigLScheduler``.

The usual AMP loop works unchanged once the scheduler knows the scaler::

    scaler = torch.amp.GradScaler(device)
    pruner = RigLScheduler(model, opt, ..., grad_scaler=scaler)
    with torch.autocast(device, dtype=torch.float16):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    if pruner():              # unscales the gradients on the iterations that feed an update
        scaler.step(opt)
    scaler.update()           # also after a RigL step (the inf check was recorded)

On an update step the gradients are unscaled first; entries whose unscaled gradient
is inf/NaN (an overflow) are never grown, so an overflowed layer replaces fewer
connections, or none. bfloat16 needs no scaler (``GradScaler(enabled=False)``).

Runs on a laptop CPU in seconds: ``python examples/amp_train.py --smoke``;
``--device cuda --dtype float16 --steps 2000`` for a real run.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from rigl_func import RigLScheduler


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--smoke", action="store_true", help="a few steps, tiny model")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, set before any work (default 1: a model this small runs best on 1; 0: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s)")
    steps, width = (30, 32) if args.smoke else (args.steps, 256)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10)).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(args.device, enabled=dtype == torch.float16)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=int(0.75 * steps), delta=max(2, steps // 10),
                           sparsity_distribution="erk", ignore_linear_layers=False, grad_scaler=scaler)
    teacher = torch.randn(20, 10, device=args.device)
    for t in range(steps):
        x = torch.randn(64, 20, device=args.device)
        y = (x @ teacher).argmax(1)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if pruner():
            scaler.step(opt)
        scaler.update()
        if t % max(1, steps // 5) == 0 or t == steps - 1:
            print(f"step {t:4d}  loss {loss.item():.4f}  scale {scaler.get_scale() if scaler.is_enabled() else 1.0}")
    density = sum(int(m.sum()) for m in pruner.backward_masks if m is not None) / sum(
        w.numel() for w, m in zip(pruner.W, pruner.backward_masks) if m is not None)
    print(f"done: rigl_steps={pruner.rigl_steps} density={density:.3f} dtype={args.dtype}")


if __name__ == "__main__":
    main()

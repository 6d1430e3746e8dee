"""An ordinary PyTorch training script, made sparse with rigl-torch's two lines.

Only the two marked lines (and the import) are RigL; the rest is a plain training
loop. The data set is generated in code: 10 classes of noisy, randomly shifted 16x16
"glyphs" (one random prototype per class), so the script needs no download.

    python examples/rigl_torch_style.py                  # ~300 steps, CPU, < 30 s
    python examples/rigl_torch_style.py --steps 20       # smoke test
    python examples/rigl_torch_style.py --dense-allocation 0.05 --distribution erk
    python examples/rigl_torch_style.py --checkpoint ckpt.pth   # saves every 50 steps; rerun to resume

Coming from rigl-torch? Replace ``from rigl_torch.RigL import RigLScheduler`` with
``from rigl_func import RigLScheduler``; see the README section "Coming from rigl-torch".
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from rigl_func import RigLScheduler


def make_data(n: int, seed: int, classes: int = 10, size: int = 16):
    """``n`` samples: a class prototype, shifted by up to 1 pixel, plus noise."""
    protos = (torch.rand(classes, 1, size, size, generator=torch.Generator().manual_seed(0)) > 0.6).float()
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = protos[y]
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    x = torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(1, 2)) for img, (dy, dx) in zip(x, shifts)])
    return x + 0.5 * torch.randn(x.shape, generator=g), y


def make_model(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def save(path: str, model, optimizer, lr_schedule, pruner) -> None:
    """Checkpoint as rigl-torch's README suggests, written atomically (temp file + rename)."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_schedule": lr_schedule.state_dict(), "pruner": pruner.state_dict()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training iterations (batches)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--dense-allocation", type=float, default=0.1, help="fraction of weights kept")
    parser.add_argument("--distribution", default="uniform", choices=["uniform", "erk"])
    parser.add_argument("--delta", type=int, default=25, help="steps between topology updates")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--grad-accumulation-n", type=int, default=1)
    parser.add_argument("--static-topo", action="store_true", help="fixed random mask (no RigL)")
    parser.add_argument("--checkpoint", default=None, help="save here at the end; resume from it if it exists")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, set before any work (default 1: a model this small runs best on 1; "
                             "0: torch's default, OMP_NUM_THREADS or one per core)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s)")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    x_train, y_train = make_data(2048, seed=1)
    x_test, y_test = make_data(1024, seed=2)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    model = make_model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    start, state_dict = 0, None
    if args.checkpoint and os.path.exists(args.checkpoint):
        ckpt = torch.load(args.checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_schedule.load_state_dict(ckpt["lr_schedule"])
        state_dict, start = ckpt["pruner"], ckpt["pruner"]["step"]
        print(f"resumed from {args.checkpoint} at step {start}")

    T_end = int(0.75 * args.steps)  # RigL's recommendation: update the topology for 75% of training
    # ------------------------------ REQUIRED LINE # 1 ------------------------------
    pruner = RigLScheduler(model, optimizer, dense_allocation=args.dense_allocation,
                           sparsity_distribution=args.distribution, T_end=max(T_end, 1), delta=args.delta,
                           alpha=args.alpha, grad_accumulation_n=args.grad_accumulation_n,
                           static_topo=args.static_topo, ignore_linear_layers=False, state_dict=state_dict)
    # --------------------------------------------------------------------------------
    print(pruner)

    tic = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed + start)  # a resumed run draws other batches
    for step in range(start, args.steps):
        idx = torch.randint(0, x_train.shape[0], (args.batch_size,), generator=g).to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        # ------------------------------ REQUIRED LINE # 2 ------------------------------
        if pruner():  # False on a RigL step: the topology update replaces optimizer.step()
            # ----------------------------------------------------------------------------
            optimizer.step()
        lr_schedule.step()
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            print(f"step {step + 1:5d}  loss {loss.item():.3f}  rigl_steps {pruner.rigl_steps}  "
                  f"test acc {accuracy(model, x_test, y_test):.3f}")

            if args.checkpoint:  # every 50 steps: an interrupted run resumes from here
                save(args.checkpoint, model, optimizer, lr_schedule, pruner)

    print(pruner)
    print(f"final test accuracy {accuracy(model, x_test, y_test):.3f} in {time.perf_counter() - tic:.1f} s")


if __name__ == "__main__":
    main()

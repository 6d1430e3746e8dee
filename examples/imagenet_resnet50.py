"""RigL on ImageNet with ResNet-50: the paper's recipe (Evci et al. 2020, Section 4.1).

Recipe (defaults): torchvision ResNet-50 (last BN of each block zero-initialized),
uniform sparsity with the first layer dense (``--distribution erk`` optional), RigL with
``delta=100``, ``alpha=0.3`` cosine-annealed, topology frozen after 75% of training;
SGD momentum 0.9, label smoothing 0.1, L2 weight decay 1e-4 on conv/linear weights;
learning rate ``0.1 x batch / 256`` (1.6 at the paper's batch 4096), linear warmup over
5 epochs, x0.1 at epochs 30, 70 and 90, 100 epochs (the 1x schedule). ``--multiplier M``
scales the epochs and the decay points (2x, 5x runs of the paper); the warmup stays
5 epochs. Random-resized crop + flip for training, resize 256 / center crop 224 for
evaluation. ``--method dense|static|set|rigl``.

Paper target (top-1): RigL, uniform, 90% sparsity, 1x schedule: 72.0 (dense: 76.8).

Run (ImageNet as an ImageFolder: ``--data`` holds ``train/`` and ``val/``, one folder per class)::

    python examples/imagenet_resnet50.py --data /data/imagenet --batch-size 1024 --workers 16 \\
        --amp --channels-last --sparsity 0.9 --out runs/r50_rigl90
    python examples/imagenet_resnet50.py --data /data/imagenet --batch-size 1024 --workers 16 \\
        --amp --channels-last --sparsity 0.9 --out runs/r50_rigl90 --resume runs/r50_rigl90/checkpoint.pt
    python examples/imagenet_resnet50.py --fake-data --image-size 32 --batch-size 4 --max-steps 6  # smoke

This is a single-process script (one GPU); the paper used batch 4096 on 32 TPUs. With a
smaller batch the learning rate follows the linear scaling rule above.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _fullscale as fs  # noqa: E402

__all__ = ["parse_args", "main", "lr_schedule"]

PAPER_TARGETS = "Paper top-1: RigL uniform 90% sparsity, 1x schedule: 72.0; dense ResNet-50: 76.8."
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def lr_schedule(peak: float, steps_per_epoch: int, *, warmup_epochs: float = 5.0,
                decay_epochs: Sequence[float] = (30.0, 70.0, 90.0), factor: float = 0.1):
    """Linear warmup to ``peak``, then ``peak * factor**i`` after the ``i``-th decay epoch.

    ``lr_at(step) = peak * (step + 1) / W`` for ``step < W = warmup steps``, else
    ``peak * factor ** #{decay steps <= step}``.

    Example:
        >>> f = lr_schedule(1.0, 2, warmup_epochs=2, decay_epochs=(3,))   # W = 4, decay at step 6
        >>> [round(f(s), 3) for s in range(8)]
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.1, 0.1]
    """
    warmup = fs.round_steps(warmup_epochs, steps_per_epoch)
    decay = fs.piecewise([fs.round_steps(e, steps_per_epoch) for e in decay_epochs],
                         [peak * factor ** i for i in range(len(decay_epochs) + 1)])

    def lr_at(step: int) -> float:
        return peak * (step + 1) / warmup if step < warmup else decay(step)

    return lr_at


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = fs.base_parser(__doc__)
    p.add_argument("--multiplier", type=float, default=1.0,
                   help="training length multiplier: epochs and decay epochs x M (default: 1)")
    p.add_argument("--warmup-epochs", type=float, default=5.0, help="linear LR warmup (default: 5)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=224, help="training/eval crop size (default: 224)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.set_defaults(distribution="uniform", epochs=None, batch_size=4096, lr=None, weight_decay=1e-4,
                   checkpoint_every=1000, out="runs/imagenet_resnet50", fake_size=64, fake_val_size=16)
    p.epilog = PAPER_TARGETS
    args = p.parse_args(argv)
    if args.multiplier <= 0:
        raise ValueError(f"--multiplier must be > 0, got {args.multiplier}")
    if args.epochs is None:
        args.epochs = max(1, int(round(100 * args.multiplier)))
    if args.lr is None:
        args.lr = 0.1 * args.batch_size / 256
    return args


def _datasets(args: argparse.Namespace):
    import torchvision
    from torchvision import transforms as T

    size = args.image_size
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize])
    eval_tf = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), *normalize])
    if args.fake_data:
        shape = (3, size, size)
        train = torchvision.datasets.FakeData(args.fake_size, shape, args.num_classes, random_offset=0)
        val = torchvision.datasets.FakeData(args.fake_val_size, shape, args.num_classes, random_offset=10**6)
    else:
        dirs = [os.path.join(args.data, split) for split in ("train", "val")]
        missing = [d for d in dirs if not os.path.isdir(d)]
        if missing:
            raise ValueError(f"--data={args.data!r} must hold train/ and val/ ImageFolders; missing {missing}")
        train, val = (torchvision.datasets.ImageFolder(d) for d in dirs)
    return fs.SeededDataset(train, train_tf), fs.SeededDataset(val, eval_tf)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse ``argv``, train, return :func:`_fullscale.train`'s result dict."""
    args = parse_args(argv)
    train_data, val_data = _datasets(args)
    decay_epochs = [e * args.multiplier for e in (30, 70, 90)]

    def make_lr(steps_per_epoch: int, total_steps: int):
        return lr_schedule(args.lr, steps_per_epoch, warmup_epochs=args.warmup_epochs, decay_epochs=decay_epochs)

    def build_model() -> nn.Module:
        import torchvision

        return torchvision.models.resnet50(weights=None, num_classes=args.num_classes, zero_init_residual=True)

    return fs.train(args, build_model, train_data, val_data, make_lr,
                    nn.CrossEntropyLoss(label_smoothing=args.label_smoothing), nesterov=False)


if __name__ == "__main__":
    main()

"""RigL on CIFAR-10 with WideResNet-22-2: the paper's recipe (Evci et al. 2020, Section 4.2).

Recipe (defaults): WideResNet-22-2 (1.08M parameters), ERK sparsity, RigL with
``delta=100``, ``alpha=0.3`` cosine-annealed, topology frozen after 75% of training;
SGD with Nesterov momentum 0.9, batch 128, 250 epochs (97.5k steps), learning rate 0.1
divided by 5 every 30k steps, L2 weight decay 5e-4 on conv/linear weights; random
crop (4 px zero padding) and horizontal flip. ``--method dense|static|set|rigl``.

Paper target (top-1, RigL-ERK): 93.6 / 92.9 / 91.8 at 80 / 90 / 95% sparsity (dense 94.1).

Run (CIFAR-10 in torchvision's format under ``--data``, e.g. ``data/cifar-10-batches-py``
is looked up as ``--data data``; nothing is downloaded)::

    python examples/cifar10_wrn.py --data data --sparsity 0.9 --out runs/wrn_rigl90
    python examples/cifar10_wrn.py --data data --resume runs/wrn_rigl90/checkpoint.pt --out runs/wrn_rigl90
    python examples/cifar10_wrn.py --fake-data --max-steps 20 --out /tmp/wrn_smoke   # no data needed
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _fullscale as fs  # noqa: E402

__all__ = ["WideResNet", "parse_args", "main"]

PAPER_TARGETS = "RigL-ERK top-1 (paper): 93.6 / 92.9 / 91.8 at 80 / 90 / 95% sparsity; dense 94.1."
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class _Block(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, 1x1 conv shortcut on a shape change."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (cin != cout or stride != 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WideResNet-depth-width (Zagoruyko & Komodakis 2016) for 32x32 inputs.

    ``depth = 6 n + 4``: a 3x3 stem conv (16 channels), three groups of ``n`` blocks
    with ``16 w, 32 w, 64 w`` channels (strides 1, 2, 2), BN-ReLU, global average
    pooling, a linear classifier. WRN-22-2 has 1,079,642 parameters (1.1M).

    Args:
        depth: ``6 n + 4`` (22 for WRN-22-2).
        width: channel multiplier ``w`` (2).
        num_classes: outputs.

    Example:
        >>> net = WideResNet(22, 2)
        >>> sum(p.numel() for p in net.parameters())
        1079642
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int = 22, width: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 with n >= 1, got depth={depth}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got width={width}")
        n = (depth - 4) // 6
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        layers, cin = [], 16
        for i, cout in enumerate((16 * width, 32 * width, 64 * width)):
            for j in range(n):
                layers.append(_Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = fs.base_parser(__doc__)
    p.add_argument("--depth", type=int, default=22, help="WRN depth 6n+4 (default: 22)")
    p.add_argument("--width", type=int, default=2, help="WRN width multiplier (default: 2)")
    p.add_argument("--lr-decay-every", type=int, default=30000, help="steps between LR decays (default: 30000)")
    p.add_argument("--lr-decay-factor", type=float, default=0.2, help="LR multiplier per decay (default: 0.2)")
    p.add_argument("--no-nesterov", action="store_true", help="plain momentum (the paper uses Nesterov)")
    p.set_defaults(distribution="erk", epochs=250, batch_size=128, lr=0.1, weight_decay=5e-4, checkpoint_every=1000,
                   out="runs/cifar10_wrn")
    p.epilog = PAPER_TARGETS
    return p.parse_args(argv)


def _datasets(args: argparse.Namespace):
    import torchvision
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalize])
    eval_tf = T.Compose(normalize)
    if args.fake_data:
        train = torchvision.datasets.FakeData(args.fake_size, (3, 32, 32), 10, random_offset=0)
        val = torchvision.datasets.FakeData(args.fake_val_size, (3, 32, 32), 10, random_offset=10**6)
    else:
        try:
            train = torchvision.datasets.CIFAR10(args.data, train=True, download=False)
            val = torchvision.datasets.CIFAR10(args.data, train=False, download=False)
        except RuntimeError as err:
            raise ValueError(f"--data={args.data!r}: no CIFAR-10 found there ({err}); download it with "
                             "torchvision.datasets.CIFAR10(root, download=True) or use --fake-data") from err
    return fs.SeededDataset(train, train_tf), fs.SeededDataset(val, eval_tf)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse ``argv``, train, return :func:`_fullscale.train`'s result dict."""
    args = parse_args(argv)
    if args.lr_decay_every <= 0:
        raise ValueError(f"--lr-decay-every must be > 0, got {args.lr_decay_every}")
    train_data, val_data = _datasets(args)

    def make_lr(steps_per_epoch: int, total_steps: int):
        bounds = list(range(args.lr_decay_every, total_steps, args.lr_decay_every))
        return fs.piecewise(bounds, [args.lr * args.lr_decay_factor ** i for i in range(len(bounds) + 1)])

    return fs.train(args, lambda: WideResNet(args.depth, args.width, 10), train_data, val_data, make_lr,
                    nn.CrossEntropyLoss(), nesterov=not args.no_nesterov)


if __name__ == "__main__":
    main()

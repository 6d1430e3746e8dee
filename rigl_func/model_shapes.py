"""Weight shapes of the reference models of the RigL paper, without building them.

RigL (Evci et al. 2020, Sec. 4.1) reports ImageNet results on ResNet-50; the
per-layer sparsities of :mod:`rigl_func.distributions` only need the shapes, so they
are generated here from the architecture instead of instantiating (or installing)
torchvision. Names match ``torchvision.models.resnet50().named_parameters()``.
``mlp_shapes`` is LeNet-300-100 on MNIST, a laptop-sized sanity check.
"""

from __future__ import annotations

__all__ = ["resnet50_shapes", "mlp_shapes"]

_RESNET50_BLOCKS = (3, 4, 6, 3)
_RESNET50_WIDTHS = (64, 128, 256, 512)
_EXPANSION = 4


def resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """Shapes of the 53 conv weights and the fc weight of torchvision's ResNet-50.

    Built from the bottleneck structure (He et al. 2016, ResNet v1.5 as in
    torchvision): a 7x7 stem ``conv1``, then stages of ``[3, 4, 6, 3]`` blocks with
    widths ``64/128/256/512`` and expansion 4. Each block has ``conv1`` (1x1),
    ``conv2`` (3x3, carries the stride) and ``conv3`` (1x1); block 0 of every stage
    also has the projection ``downsample.0`` (1x1). BatchNorm parameters and the fc
    bias are not included. Layout: Conv ``[out, in, kh, kw]``, Linear ``[out, in]``.

    Returns:
        ``{name: shape}`` in ``named_parameters()`` order, 54 entries (1000 ImageNet
        classes), 25,502,912 weights in total.

    Example:
        >>> shapes = resnet50_shapes()
        >>> len(shapes), shapes["layer1.0.conv2.weight"], shapes["fc.weight"]
        (54, (64, 64, 3, 3), (1000, 2048))
    """
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}
    in_channels = 64
    stages = zip(_RESNET50_BLOCKS, _RESNET50_WIDTHS)
    for stage, (blocks, width) in enumerate(stages, start=1):
        out_channels = width * _EXPANSION
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (width, in_channels, 1, 1)
            shapes[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
            shapes[f"{prefix}.conv3.weight"] = (out_channels, width, 1, 1)
            if block == 0:
                shape = (out_channels, in_channels, 1, 1)
                shapes[f"{prefix}.downsample.0.weight"] = shape
            in_channels = out_channels
    shapes["fc.weight"] = (1000, in_channels)
    return shapes


def mlp_shapes() -> dict[str, tuple[int, ...]]:
    """Shapes of the weights of LeNet-300-100 (784 -> 300 -> 100 -> 10).

    Returns:
        ``{"fc1.weight": (300, 784), "fc2.weight": (100, 300),
        "fc3.weight": (10, 100)}`` (Linear layout ``[out, in]``, biases omitted).

    Example:
        >>> mlp_shapes()["fc2.weight"]
        (100, 300)
    """
    return {"fc1.weight": (300, 784), "fc2.weight": (100, 300), "fc3.weight": (10, 100)}

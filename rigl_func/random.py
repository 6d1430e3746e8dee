"""Counter-based, stateless random numbers for pure functions.

SET's random growth and random grow-initialization need randomness *inside* pure,
compiled and vmapped functions, reproducible across devices, processes and resumes.
``torch.Generator`` is stateful and device-specific, so instead every random value
is a hash of ``(key, step, layer, position)``: the same inputs give the same numbers
on CPU and CUDA, in eager, under ``torch.compile`` and under ``vmap`` (where a batched
``key`` gives each model its own stream, like ``randomness="different"``).

The hash is a 32-bit integer mixer (xor-shift-multiply, constants from the "hash
prospector" low-bias family) evaluated in int64 with all products kept below 2**63,
so no overflow occurs on any backend. Uniforms carry 24 random bits.
"""

from __future__ import annotations

import math
import zlib
from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["hash32", "layer_id", "fold_in", "uniform", "normal"]

_MASK32 = 0xFFFFFFFF


def hash32(x: Tensor) -> Tensor:
    """Mix an int64 tensor holding values in [0, 2**32) into [0, 2**32). Pure.

    Example:
        >>> hash32(torch.tensor([0, 1, 2])).tolist() != [0, 1, 2]
        True
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def layer_id(name: str) -> int:
    """Stable 32-bit id of a parameter name (CRC-32; not Python's salted ``hash``)."""
    return zlib.crc32(name.encode())


def fold_in(key: Tensor, data: Union[int, Tensor]) -> Tensor:
    """Derive a new 0-d key from ``key`` and ``data`` (an int or 0-d int tensor).

    Example:
        >>> k = torch.tensor(0)
        >>> bool(fold_in(k, 1) != fold_in(k, 2))
        True
    """
    if isinstance(data, torch.Tensor):
        data = data.to(device=key.device, dtype=torch.int64) & _MASK32
    else:  # a fill on the key's device: no host-to-device copy
        data = torch.full((), int(data) & _MASK32, dtype=torch.int64, device=key.device)
    return hash32(hash32(key.to(torch.int64)) ^ hash32(data + 0x9E3779B9))


def uniform(key: Tensor, shape: Sequence[int], device=None) -> Tensor:
    """Uniform float32 samples in [0, 1) of ``shape``, a pure function of ``key``.

    Args:
        key: 0-d int64 tensor (e.g. ``fold_in(fold_in(state.key, step), layer_id(name))``).
        shape: output shape.
        device: defaults to ``key.device``.

    Example:
        >>> u = uniform(torch.tensor(7), (1000,))
        >>> bool((u >= 0).all() and (u < 1).all()), abs(u.mean().item() - 0.5) < 0.05
        (True, True)
    """
    device = key.device if device is None else device
    numel = math.prod(shape)
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    bits = hash32(hash32(idx ^ key.to(device)) + key.to(device))
    return ((bits >> 8).to(torch.float32) * (1.0 / (1 << 24))).reshape(tuple(shape))


def normal(key: Tensor, shape: Sequence[int], device=None) -> Tensor:
    """Standard normal float32 samples of ``shape`` (Box-Muller on two uniforms).

    Example:
        >>> z = normal(torch.tensor(3), (4000,))
        >>> abs(z.mean().item()) < 0.1, abs(z.std().item() - 1) < 0.1
        (True, True)
    """
    u1 = uniform(fold_in(key, 1), shape, device)
    u2 = uniform(fold_in(key, 2), shape, device)
    radius = torch.sqrt(-2.0 * torch.log1p(-u1))  # 1 - u1 in (0, 1]: finite
    return radius * torch.cos(2.0 * math.pi * u2)

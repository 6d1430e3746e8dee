"""The two primitive mask edits of dynamic sparse training: ``drop`` and ``grow``.

RigL (Evci et al. 2020, Sec. 3) drops the ``n`` active connections with the smallest
drop score and grows the ``n`` inactive connections with the largest grow score.

Selection is exact and deterministic: **the entry with the lower flat index wins**
among equal scores (is grown first, is dropped first); ``-0.0`` and ``+0.0`` tie.
Scores are compared in float32. One sorted ``torch.topk`` of static size gives the
cut-off score (the ``n``-th largest); every entry above it is selected, and among the
entries equal to it the first ones in flat order (a cumulative sum), so no sort keys
are built and nothing depends on how ``topk`` orders ties.

Non-finite scores:

* ``drop``: NaN scores are dropped before everything else (then ``-inf``).
* ``grow``: NaN and ``±inf`` scores are never grown. ``-inf`` is therefore the way for
  a custom criterion to forbid growth at a position.

``n`` may be a Python int or a 0-d integer tensor. With a tensor ``n`` the selection
runs a ``topk`` of static size ``max_n`` (default: the tensor's size) and keeps the
first ``n``, so nothing depends on the value of ``n`` at trace time
(``torch.compile(fullgraph=True)`` and ``vmap`` work).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from rigl_func.row_select import ordered_int32_

__all__ = ["drop", "grow", "select_top"]

Count = Union[int, Tensor]

_INT32_MAGNITUDE = 0x7FFFFFFF


def _check(scores: Tensor, mask: Tensor, n: Count, max_n: Optional[int]) -> None:
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got scores={type(scores).__name__}"
                        f"{'' if not isinstance(scores, Tensor) else ' of dtype ' + str(scores.dtype)}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got mask dtype={getattr(mask, 'dtype', type(mask))}")
    if scores.shape != mask.shape:
        raise ValueError(f"scores and mask must have the same shape, got {tuple(scores.shape)} and {tuple(mask.shape)}")
    if scores.numel() >= 2**31:
        raise ValueError(f"tensors with >= 2**31 entries are not supported, got numel={scores.numel()}")
    if isinstance(n, Tensor):
        if n.dim() != 0 or n.is_floating_point() or n.dtype == torch.bool:
            raise TypeError(f"n must be an int or a 0-d integer tensor, got n={n!r}")
    elif isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int or a 0-d integer tensor, got n={n!r}")
    elif n < 0:
        raise ValueError(f"n must be >= 0, got n={n}")
    if max_n is not None and (not isinstance(max_n, int) or max_n < 0):
        raise ValueError(f"max_n must be a non-negative int, got max_n={max_n!r}")


def _order_keys(values: Tensor) -> Tensor:
    """Unique int64 keys, monotone in (values, -flat_index). values: float32, flat."""
    values = values + 0.0  # -0.0 -> +0.0 so that both zeros tie
    nan = torch.isnan(values)
    ordered = torch.where(nan, _INT32_MAGNITUDE, ordered_int32_(values))  # NaN ranks above +inf
    numel = values.shape[-1]
    rev_index = torch.arange(numel - 1, -1, -1, device=values.device, dtype=torch.int64)
    return ordered.to(torch.int64) * (2**32) + rev_index


def _take_top(values: Tensor, eligible: Optional[Tensor], count: Tensor, k: int, *, nan: bool = True) -> Tensor:
    """The ``count`` eligible entries with the largest ``values``, ties to the lower index.

    Args:
        values: float32, flat; ineligible entries already ``-inf``; NaN ranks above ``+inf``.
        eligible: bool, flat (only read when ``nan``).
        count: 0-d int64, ``0 <= count <= min(k, eligible.sum())``.
        k: static ``topk`` size, ``>= 1``.
        nan: ``False`` if every eligible value is finite (then ``values == cut`` can
            only hold at eligible entries once ``count >= 1``).

    Returns:
        bool, flat, exactly ``count`` entries ``True``.
    """
    top = torch.topk(values, k, sorted=True).values  # topk ranks NaN above +inf
    cut = top.gather(0, (count - 1).clamp(min=0).reshape(1))  # the count-th largest, shape (1,)
    if nan:
        values_nan, cut_nan = torch.isnan(values), torch.isnan(cut)
        above = (values > cut) | (values_nan & ~cut_nan)
        at = ((values == cut) | (values_nan & cut_nan)) & eligible
    else:
        above = values > cut
        at = values == cut
    need = count - torch.count_nonzero(above)  # 0 when count == 0: nothing is above the maximum
    return above | (at & (torch.cumsum(at, 0, dtype=torch.int32) <= need))


def select_top(keys_source: Tensor, eligible: Tensor, n: Count, max_n: Optional[int] = None) -> Tensor:
    """Exactly ``min(n, eligible.sum())`` eligible entries with the largest values.

    The building block of :func:`drop` and :func:`grow`; ties go to the lower flat
    index. Pure.

    Args:
        keys_source: float tensor, any shape; ``±inf`` rank beyond every finite
            value and NaN ranks above ``+inf``.
        eligible: bool tensor, same shape; only these entries can be selected.
        n: int or 0-d integer tensor, number of entries to select.
        max_n: static upper bound on ``n`` when ``n`` is a tensor (``topk`` size).

    Returns:
        bool tensor, same shape, ``True`` at the selected entries.

    Example:
        >>> s = torch.tensor([0.5, 0.9, 0.9, 0.1])
        >>> select_top(s, torch.tensor([True, True, True, False]), 2).tolist()
        [False, True, True, False]
    """
    shape = keys_source.shape
    flat = keys_source.reshape(-1).to(torch.float32)
    numel = flat.shape[0]
    if isinstance(n, Tensor):
        k = numel if max_n is None else min(max_n, numel)
    else:
        k = min(n, numel)
    if k == 0:
        return torch.zeros(shape, dtype=torch.bool, device=flat.device)
    eligible = eligible.reshape(-1)
    count = torch.minimum(torch.as_tensor(n, device=flat.device), torch.count_nonzero(eligible)).clamp(max=k)
    values = torch.where(eligible, flat, float("-inf"))
    return _take_top(values, eligible, count, k).reshape(shape)


def drop(scores: Tensor, mask: Tensor, n: Count, *, max_n: Optional[int] = None) -> Tensor:
    """Deactivate the ``n`` active entries with the lowest ``scores``.

    Args:
        scores: float tensor, any shape (e.g. ``|w|``, shape ``[out, in]``).
        mask: bool tensor of the same shape, ``True`` = active.
        n: int or 0-d integer tensor; at most ``mask.sum()`` entries are dropped.
        max_n: static upper bound on ``n`` when ``n`` is a tensor.

    Returns:
        New bool mask with ``mask.sum() - min(n, mask.sum())`` active entries, a
        subset of ``mask``. NaN scores are dropped first; equal scores drop the
        lower flat index first. Pure: inputs are not modified.

    Raises:
        TypeError: wrong dtypes. ValueError: shape mismatch or negative ``n``.

    Example:
        >>> w = torch.tensor([[0.3, -0.1], [0.0, 2.0]])
        >>> m = torch.tensor([[True, True], [False, True]])
        >>> drop(w.abs(), m, 1).tolist()
        [[True, False], [False, True]]
    """
    _check(scores, mask, n, max_n)
    # Select the largest of -scores: NaN ranks above +inf (dropped strictly first), then
    # -inf; +-inf stay distinct from +-float32 max.
    return mask ^ select_top(-scores.float(), mask, n, max_n)


def grow(scores: Tensor, mask: Tensor, n: Count, *, max_n: Optional[int] = None) -> Tensor:
    """Activate the ``n`` inactive entries with the highest ``scores``.

    Args:
        scores: float tensor, any shape (e.g. ``|dL/dw|``).
        mask: bool tensor of the same shape, ``True`` = active.
        n: int or 0-d integer tensor.
        max_n: static upper bound on ``n`` when ``n`` is a tensor.

    Returns:
        New bool mask, a superset of ``mask`` with ``min(n, m)`` more active entries,
        where ``m`` is the number of inactive entries with a finite score. Non-finite
        scores are never grown; equal scores grow the lower flat index first.
        Pure: inputs are not modified.

    Raises:
        TypeError: wrong dtypes. ValueError: shape mismatch or negative ``n``.

    Example:
        >>> g = torch.tensor([[0.3, 5.0], [0.7, float("nan")]])
        >>> m = torch.tensor([[True, False], [False, False]])
        >>> grow(g.abs(), m, 2).tolist()
        [[True, True], [True, False]]
    """
    _check(scores, mask, n, max_n)
    return mask | select_top(scores, torch.isfinite(scores) & ~mask, n, max_n)

"""Exact top-``count`` selection in every row of a padded ``[R, P]`` matrix: the
selection engine of the batched RigL update.

RigL (Evci et al. 2020, Sec. 3) drops and grows a different number of connections in
every layer. The batched update lays several layers out as the rows of one matrix
(each row padded to the widest layer of the group, :func:`pad_rows`) and selects in
all rows at once with the per-layer algorithm of :func:`rigl_func.select_top`,
vectorized over rows (:func:`take_top_rows`):

1. one sorted ``torch.topk`` of static size ``k`` along the rows gives every row's
   cut-off value (its ``count``-th largest);
2. every entry beyond the cut-off is selected;
3. among the eligible entries equal to the cut-off, the first ones in row order (one
   ``cumsum`` ranks them): ties go to the lower flat index.

No sort, no data-dependent shape, no host sync, no per-row fixed buffer: the memory
is the padded matrix, and the number of ops does not depend on the number of rows,
so it runs under ``torch.compile(fullgraph=True)``, ``vmap`` and CUDA-graph capture.
The result equals a per-row :func:`rigl_func.select_top` bit for bit (tested).

The module also holds the order keys shared with :mod:`rigl_func.selection`:
:func:`order_keys` maps float32 scores to int32 keys whose signed order is the float
order (``-0.0`` ties ``+0.0``, NaN above ``+inf``), for scores that may be negative.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["order_keys", "order_keys_", "ordered_int32_", "is_batched", "pad_rows", "take_top_rows", "NEVER"]

#: Key of an entry that must never be selected (below every order key).
NEVER = -(2**31)
_INT32_MAGNITUDE = 0x7FFFFFFF


def is_batched(values: Tensor) -> bool:
    """Whether ``values`` is a ``torch.func.vmap`` batched tensor (False if undetectable).
    Dynamo traces the check (an in-graph function of its trace rules), so a compiled
    ``vmap`` takes the batched paths too."""
    check = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
    return bool(check(values)) if check is not None else False


def _ordered_bits_without_view(values: Tensor) -> Tensor:
    """``bits ^ ((bits >> 31) & 0x7FFFFFFF)`` of float32 ``values`` without a dtype view.

    Bit-identical to the view formulation for every non-NaN float32 (NaN is
    overwritten by the callers); ``-0.0`` must already be ``+0.0``. Only ops with vmap
    batching rules (``log2``, ``exp2``, ``where``): ``Tensor.view(dtype)`` has none in some
    torch releases (torch 2.11).
    """
    a = values.abs().to(torch.float64)  # exact
    # Exponent e = floor(log2(a)), corrected by one where log2 rounded (float64 ops only:
    # torch.frexp's int32 exponent does not compile in inductor's vectorized CPU code).
    safe = torch.where((a > 0) & ~torch.isinf(a), a, 1.0)
    e = torch.floor(torch.log2(safe))
    e = e - (torch.exp2(e) > safe).to(torch.float64) + (torch.exp2(e + 1.0) <= safe).to(torch.float64)
    # normal (a >= 2**-126): biased exponent e + 127, fraction (a / 2**e - 1) * 2**23 (exact)
    normal = (e + 127.0) * 2.0**23 + (safe / torch.exp2(e) - 1.0) * 2.0**23
    subnormal = a * 2.0**149  # biased exponent 0, fraction a / 2**-149 (exact)
    magnitude = torch.where(a >= 2.0**-126, normal, subnormal)
    magnitude = torch.where(torch.isinf(a), float(0x7F800000), magnitude).to(torch.int64)
    ordered = torch.where(torch.signbit(values), -1 - magnitude, magnitude)
    return ordered.to(torch.int32)


def ordered_int32_(values: Tensor) -> Tensor:
    """int32 whose signed order is the order of float32 ``values`` (``-0.0`` already
    ``+0.0``; NaN keys are meaningless: callers overwrite them). Computed in the memory
    of ``values`` (overwritten), except under ``vmap``, where a view-free formulation
    returns a new tensor.

    Example:
        >>> ordered_int32_(torch.tensor([-2.0, -1.0, 0.0, 1.5])).tolist() == sorted(
        ...     ordered_int32_(torch.tensor([-2.0, -1.0, 0.0, 1.5])).tolist())
        True
    """
    if is_batched(values):
        return _ordered_bits_without_view(values)
    keys = values.view(torch.int32)
    return keys.bitwise_xor_((keys >> 31).bitwise_and_(_INT32_MAGNITUDE))


def order_keys(values: Tensor, eligible: Tensor) -> Tensor:
    """int32 keys with the order of ``values``; ``NEVER`` where not ``eligible``.

    Args:
        values: float32, any shape. ``-0.0`` and ``+0.0`` get the same key; every NaN
            gets ``INT32_MAX`` (above ``+inf``).
        eligible: bool, same shape.

    Returns:
        int32, same shape; eligible keys are ``> NEVER`` (``-inf`` maps to
        ``-2**31 + 2**23 - 1``). Pure (see :func:`order_keys_` for the version that
        reuses its input's memory).

    Example:
        >>> k = order_keys(torch.tensor([-1.0, -0.0, 0.0, 2.0, float("nan")]), torch.tensor([True] * 5))
        >>> bool(k[0] < k[1] == k[2] < k[3] < k[4])
        True
    """
    return order_keys_(values + 0.0, eligible)


def order_keys_(values: Tensor, eligible: Optional[Tensor]) -> Tensor:
    """:func:`order_keys` computed in the memory of ``values`` (float32, overwritten);
    ``eligible=None`` leaves every key as it is."""
    nan = values.isnan()
    keys = ordered_int32_(values.add_(0.0))  # -0.0 -> +0.0
    keys.masked_fill_(nan, _INT32_MAGNITUDE)
    return keys if eligible is None else keys.masked_fill_(~eligible, NEVER)


def pad_rows(tensors: Sequence[Tensor], width: int, fill) -> Tensor:
    """``[len(tensors), width]``: row ``i`` holds ``tensors[i]`` flattened, then ``fill``.

    One ``torch.cat`` whatever the number of rows (the padding is sliced from one
    filler), so the op count does not grow with the number of layers.

    Args:
        tensors: tensors of one dtype and device, each with ``numel <= width``.
        width: the row length ``P``.
        fill: Python scalar for the padding.

    Returns:
        A new tensor ``[R, width]`` (the inputs are not modified).

    Example:
        >>> pad_rows([torch.tensor([1, 2]), torch.tensor([[3, 4], [5, 6]])], 4, 0).tolist()
        [[1, 2, 0, 0], [3, 4, 5, 6]]
    """
    shorts = [width - t.numel() for t in tensors]
    longest = max(shorts)
    if longest == 0 and len(tensors) == 1:
        return tensors[0].reshape(-1).clone().view(1, width)
    # One contiguous filler (sliced per row): cat's batched copy takes contiguous inputs
    # only; stride-0 (expanded) pieces would each cost a copy kernel on a GPU.
    filler = torch.full((longest,), fill, dtype=tensors[0].dtype, device=tensors[0].device) if longest else None
    parts = []
    for t, short in zip(tensors, shorts):
        parts.append(t.reshape(-1))
        if short:
            parts.append(filler[:short])
    return torch.cat(parts).view(len(tensors), width)


def take_top_rows(values: Tensor, eligible: Tensor, count: Tensor, k: int, *, largest: bool = True) -> Tensor:
    """In every row, the ``count`` eligible entries with the largest (or smallest)
    ``values``; ties to the lower index.

    Args:
        values: ``[R, P]`` float or integer, no NaN (map NaN to a value first). The
            ineligible entries must hold a value that no eligible entry beats:
            the minimum of the dtype for ``largest``, the maximum otherwise (ties with
            eligible entries are fine).
        eligible: bool ``[R, P]``.
        count: int64 ``[R]`` with ``0 <= count[r] <= min(k, eligible[r].sum())``.
        k: static ``topk`` size, ``1 <= k <= P``.
        largest: select the largest (True) or the smallest values.

    Returns:
        bool ``[R, P]`` with exactly ``count[r]`` entries ``True`` in row ``r``. Pure.

    Example:
        >>> v = torch.tensor([[0.5, 0.9, 0.9, 0.1], [3.0, 1.0, -1.0, -1.0]])
        >>> e = torch.tensor([[True] * 4, [True, True, False, False]])
        >>> take_top_rows(v, e, torch.tensor([2, 1]), 2).tolist()
        [[False, True, True, False], [True, False, False, False]]
    """
    top = torch.topk(values, k, dim=-1, largest=largest, sorted=True).values
    cut = top.gather(-1, (count - 1).clamp(min=0).unsqueeze(-1))  # [R, 1]: the count-th best
    beyond = values > cut if largest else values < cut
    at = (values == cut).logical_and_(eligible)
    need = count - beyond.sum(-1)  # [R]; 0 when count == 0: nothing is beyond the best
    # Tie ranks: one scan over the flattened rows (a flat scan is one fast device-wide
    # scan on a GPU; a scan along long rows of a 2-D tensor is not: 73% of an update on
    # an H200), each row's offset folded into its threshold instead of subtracted.
    rows, width = at.shape[-2], at.shape[-1]
    dtype = torch.int32 if rows * width < 2**31 else torch.int64
    flat_rank = at.reshape(*at.shape[:-2], rows * width).cumsum(-1, dtype=dtype).view(at.shape)
    before = torch.cat([torch.zeros_like(flat_rank[..., :1, -1]), flat_rank[..., :-1, -1]], -1)  # [R]: earlier rows' ties
    return beyond.logical_or_(at.logical_and_(flat_rank <= (need + before).unsqueeze(-1)))

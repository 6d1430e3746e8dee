"""Exact top-``count`` selection in every segment of a flat buffer, in a constant
number of ops: the selection engine of the batched RigL update.

RigL (Evci et al. 2020, Sec. 3) drops and grows a different number of connections in
every layer. Packing the layers' scores into one flat buffer (segment ``l`` holds
layer ``l``, the idea of FSDP's flat parameters) turns "a ``topk`` per layer" into one
*segmented* selection. It is a two-level radix select on 32-bit order keys:

1. **Keys.** :func:`order_keys` maps float32 scores to int32 keys whose signed order
   is the float order (``-0.0`` ties ``+0.0``, NaN above ``+inf``); ``INT32_MIN``
   marks entries that are never selected.
2. **Level 1.** One histogram of the top 16 bits per segment (``index_add`` into
   ``num_segments x 65536`` bins), a suffix ``cumsum`` and a batched
   ``searchsorted`` give every segment's boundary bucket and how many entries lie
   strictly above it.
3. **Level 2.** The same on the low 16 bits of the entries in the boundary bucket
   only (the others go to two spare bins): now the boundary is one exact key.
4. **Ties.** Among the entries equal to a segment's boundary key, the first ones in
   flat order win: one ``cumsum`` ranks them.

Every step is an elementwise op, a gather from a small table, a histogram or a scan:
no sort, no ``topk``, no data-dependent shape, no host sync, so it runs under
``torch.compile(fullgraph=True)``, ``vmap`` and CUDA-graph capture, and the number of
ops does not depend on the number of segments. The result equals a per-segment
``topk`` with ties to the lower index bit for bit (tested against
:func:`rigl_func.select_top`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["order_keys", "order_keys_", "ordered_int32_", "is_batched", "segment_top", "segment_top_", "segment_ids", "NEVER"]

#: Key of an entry that must never be selected.
NEVER = -(2**31)
_BITS = 16
_BINS = 1 << _BITS
_INT32_MAGNITUDE = 0x7FFFFFFF


def is_batched(values: Tensor) -> bool:
    """Whether ``values`` is a ``torch.func.vmap`` batched tensor (False if undetectable
    or while ``torch.compile`` traces: dynamo would graph-break on the check)."""
    if torch.compiler.is_compiling():
        return False
    check = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
    return bool(check(values)) if check is not None else False


def _ordered_bits_without_view(values: Tensor) -> Tensor:
    """``bits ^ ((bits >> 31) & 0x7FFFFFFF)`` of float32 ``values`` without a dtype view.

    Bit-identical to the view formulation for every non-NaN float32 (NaN is
    overwritten by the callers); ``-0.0`` must already be ``+0.0``. Only ops with vmap
    batching rules (``torch.frexp`` et al.): ``Tensor.view(dtype)`` has none in some
    torch releases (torch 2.11).
    """
    a = values.abs().to(torch.float64)  # exact
    mant, exp = torch.frexp(a)  # a = mant * 2**exp, mant in [0.5, 1) (0 for a == 0)
    exp = exp.to(torch.float64)
    # normal (a >= 2**-126): biased exponent exp + 126, fraction mant * 2**24 - 2**23
    normal = (exp + 125.0) * 2.0**23 + mant * 2.0**24
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
        values: float32 ``[N]``. ``-0.0`` and ``+0.0`` get the same key; every NaN
            gets ``INT32_MAX`` (above ``+inf``).
        eligible: bool ``[N]``.

    Returns:
        int32 ``[N]``; eligible keys are ``> NEVER`` (``-inf`` maps to ``-2**31 + 2**23 - 1``).
        Pure (see :func:`order_keys_` for the version that reuses its input's memory).

    Example:
        >>> k = order_keys(torch.tensor([-1.0, -0.0, 0.0, 2.0, float("nan")]), torch.tensor([True] * 5))
        >>> bool(k[0] < k[1] == k[2] < k[3] < k[4])
        True
    """
    return order_keys_(values + 0.0, eligible)


def order_keys_(values: Tensor, eligible: Tensor) -> Tensor:
    """:func:`order_keys` computed in the memory of ``values`` (float32, overwritten)."""
    nan = values.isnan()
    keys = ordered_int32_(values.add_(0.0))  # -0.0 -> +0.0
    keys.masked_fill_(nan, _INT32_MAGNITUDE)
    return keys.masked_fill_(~eligible, NEVER)


def segment_ids(sizes: tuple, ids: Tensor) -> Tensor:
    """int32 ``[sum(sizes)]``: the segment of every entry, ``ids[l]`` repeated
    ``sizes[l]`` times (``ids``: int32 ``arange(L)`` on the target device). One
    ``cat`` of expanded views: one op, no host sync, no index tensor."""
    if len(sizes) == 1:  # one segment: a stride-0 view, no memory
        return ids[0].expand(sizes[0])
    return torch.cat([ids[i].expand(size) for i, size in enumerate(sizes)])


def _histogram(bins: Tensor, num_bins: int) -> Tensor:
    ones = torch.ones((), dtype=torch.int32, device=bins.device).expand(bins.shape)
    return torch.zeros(num_bins, dtype=torch.int32, device=bins.device).index_add(0, bins, ones)


def _boundary(hist: Tensor, want: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per segment (row of ``hist``, ``[L, 65536]``): the bucket that holds the
    ``want``-th largest entry, the count strictly above it and the count in it."""
    desc = hist.flip(1).cumsum(1, dtype=torch.int32)  # desc[l, j]: entries in buckets >= 65535 - j
    j = torch.searchsorted(desc, want.to(torch.int32).unsqueeze(1))  # first j with desc >= want
    j = j.clamp(max=_BINS - 1)
    bucket = (_BINS - 1) - j
    inside = hist.gather(1, bucket)
    above = desc.gather(1, j) - inside
    return bucket, above, inside


def _classes(digits: Tensor, bucket: Tensor) -> Tensor:
    """uint8 ``[L * 65536]``: 2 above the segment's bucket, 1 in it, 0 below."""
    return ((digits > bucket).to(torch.uint8) * 2 + (digits == bucket).to(torch.uint8)).view(-1)


def segment_top(keys: Tensor, seg: Tensor, count: Tensor) -> Tensor:
    """In every segment, the ``count`` entries with the largest ``keys``; ties to the
    lower flat index.

    Args:
        keys: int32 ``[N]`` from :func:`order_keys` (``NEVER`` = not selectable).
        seg: int32 ``[N]``, the segment of each entry, non-decreasing
            (:func:`segment_ids`); segments are contiguous.
        count: int64 ``[L]``; ``0 <= count[l] <=`` the number of selectable entries
            of segment ``l``.

    Returns:
        bool ``[N]`` with exactly ``count[l]`` entries ``True`` in segment ``l``. Pure.

    Example:
        >>> keys = order_keys(torch.tensor([0.5, 0.9, 0.9, 0.1, 3.0, 1.0]), torch.ones(6, dtype=torch.bool))
        >>> seg = torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.int32)
        >>> segment_top(keys, seg, torch.tensor([2, 1])).tolist()
        [False, True, True, False, True, False]
    """
    return segment_top_(keys.clone(), seg, count)


def segment_top_(keys: Tensor, seg: Tensor, count: Tensor) -> Tensor:
    """:func:`segment_top` that reuses the memory of ``keys`` (overwritten): the
    batched update's peak memory is a few bytes per weight lower."""
    num = count.shape[0]
    device = keys.device
    # Level 1: the top 16 bits, one histogram row per segment.
    bin1 = (keys >> _BITS).add_(seg, alpha=_BINS).add_(_BINS // 2)
    bucket1, above1, _ = _boundary(_histogram(bin1, num * _BINS).view(num, _BINS), count)
    digits = torch.arange(_BINS, dtype=torch.int32, device=device)
    cls1 = _classes(digits, bucket1).index_select(0, bin1)
    # Level 2: the low 16 bits of the boundary bucket's entries (in the keys' memory);
    # the others go to the spare bins num*B (below) and num*B + 1 (above).
    bin2 = keys.bitwise_and_(_BINS - 1).add_(seg, alpha=_BINS)
    bin2.masked_fill_(cls1 == 0, num * _BINS).masked_fill_(cls1 == 2, num * _BINS + 1)
    del cls1
    hist2 = _histogram(bin2, num * _BINS + 2)
    need = count - above1.view(-1).to(count.dtype)
    bucket2, above2, ties = _boundary(hist2[: num * _BINS].view(num, _BINS), need)
    spare_classes = torch.arange(0, 4, 2, dtype=torch.uint8, device=device)
    cls2 = torch.cat([_classes(digits, bucket2), spare_classes]).index_select(0, bin2)
    # Ties: the first (need - above2) entries equal to the boundary key, in flat order.
    at = cls2 == 1
    ties = ties.view(-1)
    last = torch.cumsum(ties, 0, dtype=torch.int32) - ties + (need - above2.view(-1)).to(torch.int32)
    table = last.repeat_interleave(_BINS, output_size=num * _BINS)
    if is_batched(keys):  # vmap has no rule for out= and clamp_
        del bin1
        bin2 = bin2.clamp(max=num * _BINS - 1)
        bound = table.index_select(0, bin2)
        chosen = torch.cumsum(at, 0, dtype=torch.int32) <= bound
    else:  # reuse bin1's and bin2's memory
        bin2.clamp_(max=num * _BINS - 1)
        bound = torch.index_select(table, 0, bin2, out=bin1)
        chosen = torch.cumsum(at, 0, dtype=torch.int32, out=bin2) <= bound  # inclusive rank among tie entries
    return chosen.logical_and_(at).logical_or_(cls2 == 2)

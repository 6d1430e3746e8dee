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

from typing import Callable, Optional, Union

import torch
from torch import Tensor

__all__ = ["order_keys", "order_keys_", "ordered_int32_", "exclude_", "is_batched", "segment_top", "segment_top_",
           "repeat_per_segment", "bin_bases", "EXCLUDED_BUCKETS", "NEVER"]

#: Key of an entry that must never be selected.
NEVER = -(2**31)
_BITS = 16
_BINS = 1 << _BITS
_INT32_MAGNITUDE = 0x7FFFFFFF
_SPREAD = 0x3FFFFF  # excluded keys: level-1 buckets 0-63 (see exclude_)
#: Level-1 buckets that only excluded entries occupy (order keys start at bucket 127).
EXCLUDED_BUCKETS = 64


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


def order_keys_(values: Tensor, eligible: Optional[Tensor]) -> Tensor:
    """:func:`order_keys` computed in the memory of ``values`` (float32, overwritten);
    ``eligible=None`` leaves every key as it is (see :func:`exclude_`)."""
    nan = values.isnan()
    keys = ordered_int32_(values.add_(0.0))  # -0.0 -> +0.0
    keys.masked_fill_(nan, _INT32_MAGNITUDE)
    return keys if eligible is None else keys.masked_fill_(~eligible, NEVER)


def exclude_(keys: Tensor, excluded: Tensor, spread: Tensor) -> Tensor:
    """In place: ``keys`` at ``excluded`` entries become never-selected keys that differ
    from entry to entry: ``NEVER | (spread & 0x3FFFFF)``, i.e. level-1 buckets 0-63 and
    varying low bits, below every order key (``-inf``'s is in bucket 127).

    Same selection as filling ``NEVER``, but the histograms of :func:`segment_top_` do
    not pile every excluded entry of a layer onto one bin: on a GPU those are atomic
    adds to one address, serialized (the inactive 90% of a layer). ``spread``: any
    int32 ``[N]`` whose bits vary (e.g. another score's keys). Returns ``keys``.
    """
    spread = (spread & _SPREAD).bitwise_or_(NEVER)
    if is_batched(keys):  # vmap has no batching rule for out= variants
        return torch.where(excluded, spread, keys)
    return torch.where(excluded, spread, keys, out=keys)


def repeat_per_segment(sizes: tuple, values: Tensor) -> Tensor:
    """``[sum(sizes)]``: ``values[l]`` repeated ``sizes[l]`` times (``values``: ``[L]`` on
    the target device, e.g. :func:`bin_bases`). One ``cat`` of expanded views: one op,
    no host sync, no index tensor; a stride-0 view for one segment.

    Example:
        >>> repeat_per_segment((2, 3), torch.tensor([7, 9])).tolist()
        [7, 7, 9, 9, 9]
    """
    if len(sizes) == 1:
        return values[0].expand(sizes[0])
    return torch.cat([values[i].expand(size) for i, size in enumerate(sizes)])


def bin_bases(num: int, device=None) -> Tensor:
    """int32 ``[num]``: ``l * 65536 + 32768``, the first level-1 bin of segment ``l``
    shifted so that ``(key >> 16) + base`` is a bin index (``key >> 16 >= -32768``)."""
    return torch.arange(num, dtype=torch.int32, device=device) * _BINS + _BINS // 2


def _histogram(bins: Tensor, num_bins: int) -> Tensor:
    ones = torch.ones((), dtype=torch.int32, device=bins.device).expand(bins.shape)
    return torch.zeros(num_bins, dtype=torch.int32, device=bins.device).index_add(0, bins, ones)


def _boundary(hist: Tensor, want: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per segment (row of ``hist``, ``[L, 65536]``): the bucket that holds the
    ``want``-th largest entry, the count strictly above it and the count in it
    (``[L, 1]`` each)."""
    desc = hist.flip(1).cumsum(1, dtype=torch.int32)  # desc[l, j]: entries in buckets >= 65535 - j
    j = torch.searchsorted(desc, want.to(torch.int32).unsqueeze(1))  # first j with desc >= want
    j = j.clamp(max=_BINS - 1)
    bucket = (_BINS - 1) - j
    inside = hist.gather(1, bucket)
    above = desc.gather(1, j) - inside
    return bucket, above, inside


def segment_top(keys: Tensor, seg: Tensor, count: Tensor) -> Tensor:
    """In every segment, the ``count`` entries with the largest ``keys``; ties to the
    lower flat index.

    Args:
        keys: int32 ``[N]`` from :func:`order_keys` (``NEVER`` = not selectable).
        seg: int32 ``[N]``, the segment of each entry, non-decreasing; segments are
            contiguous.
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
    return segment_top_(keys.clone(), seg * _BINS + _BINS // 2, count, count.shape[0])


def segment_top_(keys: Tensor, bases: Tensor, count: Union[Tensor, Callable[[Tensor], Tensor]], num: int) -> Tensor:
    """:func:`segment_top` with per-entry bin bases (:func:`repeat_per_segment` of
    :func:`bin_bases`) for ``num`` segments, that overwrites ``keys``. ``count`` may be a function of the
    level-1 histogram (int32 ``[L, 65536]``; buckets ``0 .. EXCLUDED_BUCKETS - 1`` hold
    exactly the ``NEVER`` and :func:`exclude_` entries, so row ``l`` tells segment
    ``l``'s selectable count).

    Eleven full-size passes: two to bin, a histogram, a gather of the level-2 row, two
    to bin again, a histogram, a gather of the tie flag, a scan and a gather and compare
    against one lookup table that encodes "above", "below" and the tie rank limit.
    """
    device = keys.device
    # Level 1: the top 16 bits, one histogram row per segment.
    bin1 = (keys >> _BITS).add_(bases)
    hist1 = _histogram(bin1, num * _BINS).view(num, _BINS)
    if callable(count):
        count = count(hist1)
    bucket1, above1, _ = _boundary(hist1, count)
    need = count - above1.view(-1).to(count.dtype)
    # Level 2 goes to one histogram row per segment for the entries of its boundary
    # bucket, and to spare rows num (below) and num + 1 (above) for all others: a table
    # over level-1 bins gives each entry its level-2 row base.
    digits = torch.arange(_BINS, dtype=torch.int32, device=device)
    rows = bin_bases(num, device).unsqueeze(1)
    below, above = num * _BINS + _BINS // 2, (num + 1) * _BINS + _BINS // 2
    row_of = torch.where(digits == bucket1, rows, torch.where(digits > bucket1, above, below).to(torch.int32))
    row = row_of.view(-1).index_select(0, bin1)
    bin2 = keys.bitwise_and_(_BINS - 1).add_(row)  # in the keys' memory
    hist2 = _histogram(bin2, (num + 2) * _BINS + _BINS // 2)[_BINS // 2:].view(num + 2, _BINS)
    bucket2, above2, ties = _boundary(hist2[:num], need)
    # Selected <=> rank <= limit[bin], rank = inclusive count of tie entries (those
    # equal to their segment's boundary key) so far: limit is INT32_MAX above the
    # boundary, -1 below it, and for tie entries the tie entries of earlier segments
    # plus the ones this segment still needs (ties to the lower index).
    ties = ties.view(-1)
    last = (torch.cumsum(ties, 0, dtype=torch.int32) - ties + (need - above2.view(-1)).to(torch.int32)).unsqueeze(1)
    big = torch.iinfo(torch.int32).max
    limit = torch.where(digits > bucket2, big, torch.where(digits == bucket2, last, -1))
    spare = torch.stack([torch.full((_BINS,), -1, dtype=torch.int32, device=device),
                         torch.full((_BINS,), big, dtype=torch.int32, device=device)])
    pad = torch.zeros(_BINS // 2, dtype=torch.int32, device=device)  # bins start at B / 2
    limit = torch.cat([pad, limit.view(-1), spare.view(-1)])
    at_table = torch.cat([pad.bool(), (digits == bucket2).view(-1), torch.zeros(2 * _BINS, dtype=torch.bool, device=device)])
    at = at_table.index_select(0, bin2)
    if is_batched(keys):  # vmap has no batching rule for out= variants
        return torch.cumsum(at, 0, dtype=torch.int32) <= limit.index_select(0, bin2)
    # Reuse the level-1 buffers for the scan and the limits (no new full-size int32).
    rank = torch.cumsum(at, 0, dtype=torch.int32, out=row)
    return rank <= torch.index_select(limit, 0, bin2, out=bin1)


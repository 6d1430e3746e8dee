"""The unstructured RigL update of all sparse layers at once, on padded row matrices.

Same result, bit for bit, as :func:`rigl_func.update_layer` mapped over the layers
(Evci et al. 2020, Sec. 3; the per-layer path is the oracle in the tests), with a
number of ATen ops that does not grow with the number of layers:

* layers are grouped by device, param dtype and size octave (``2**j <= numel <
  2**(j+1)``); a group's layers are the rows of one ``[R, P]`` matrix, each padded to
  the group's widest layer (one ``torch.cat`` per tensor kind, :func:`pad_rows`), so
  padding costs less than 2x and the number of groups is at most ~31 per dtype and
  device whatever the number of layers;
* the built-in criteria (``magnitude``, ``gradient``, ``ema``, ``random``) are
  evaluated once per group; a custom criterion is still written for one tensor and
  called per layer (its own ops are its own);
* every row's drop and grow set is chosen by :func:`rigl_func.row_select.take_top_rows`,
  the per-layer algorithm (one sorted ``topk`` for the cut-off, a ``cumsum`` for
  ties) vectorized over rows: exact by construction, NaN and ``±inf`` included;
* big groups are cut into chunks of at most ``config.update_chunk`` entries (auto:
  unbounded up to 2**25 entries, then ``total / 16``), so the temporaries stay a
  fraction of the outputs; each chunk writes its rows into the flat output buffers
  (``torch.cat(..., out=)``). Chunking changes nothing in the result;
* per-row constants (caps, layer ids) are small device tensors built once per layout
  and device and cached: no host-to-device copy and no host sync after the first
  call (CUDA-graph capturable), no per-layer buffer (memory is the padded rows).

Counts and offsets are Python ints or int64 tensors: any number of layers, any total
size (one layer must stay below ``2**31`` entries, as ``topk`` and the tie scan need).
Results are views of flat buffers (one bool buffer for the masks, one per dtype for the
params, per device), in group order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from rigl_func import criteria as C
from rigl_func.criteria import call_criterion, resolve_criterion
from rigl_func.random import fold_in, hash32
from rigl_func.row_select import is_batched, order_keys_, pad_rows, take_top_rows
from rigl_func.selection import _check

__all__ = ["update_layers_batched", "plan_chunks", "AUTO_CHUNK_FREE", "Chunk"]

_CACHE: dict = {}
_CACHE_LIMIT = 64
#: Up to this many entries in total, ``update_chunk=0`` (auto) does not chunk.
AUTO_CHUNK_FREE = 2**25
_AUTO_CHUNK_PARTS = 16


class Chunk(NamedTuple):
    """Rows processed together: layer indices (into the update's layer order), the
    padded width ``P`` and the static ``topk`` size ``k`` (the largest cap)."""

    layers: tuple
    width: int
    k: int


#: Padding (in entries) worth one more group of rows in :func:`plan_chunks`: a group costs
#: ~60 launches (0.15-0.6 ms on a GPU), a padded entry ~200 B of traffic (~0.1 ns).
GROUP_COST_ENTRIES = 2**21
_DP_LIMIT = 512


def _groups(sizes: list) -> list:
    """Partition layer indices (one kind) into groups of padded rows: distinct sizes in
    ascending order are cut into runs minimizing ``GROUP_COST_ENTRIES * groups +
    padding`` (dynamic programming; size octaves beyond ``_DP_LIMIT`` distinct sizes)."""
    distinct = sorted(set(sizes))
    if len(distinct) > _DP_LIMIT:
        by_octave: dict = {}
        for i, n in enumerate(sizes):
            by_octave.setdefault(max(n, 1).bit_length(), []).append(i)
        return [by_octave[b] for b in sorted(by_octave)]
    count = {n: 0 for n in distinct}
    for n in sizes:
        count[n] += 1
    d = len(distinct)
    cum_c, cum_s = [0] * (d + 1), [0] * (d + 1)
    for j, n in enumerate(distinct):
        cum_c[j + 1] = cum_c[j] + count[n]
        cum_s[j + 1] = cum_s[j] + count[n] * n
    best, cut = [0] + [None] * d, [0] * (d + 1)
    for j in range(1, d + 1):  # best[j]: the first j distinct sizes
        width = distinct[j - 1]
        for i in range(j):
            cost = best[i] + GROUP_COST_ENTRIES + width * (cum_c[j] - cum_c[i]) - (cum_s[j] - cum_s[i])
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], d
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    slot = {}
    for g, (i, j) in enumerate(reversed(bounds)):
        for n in distinct[i:j]:
            slot[n] = g
    out: list = [[] for _ in bounds]
    for i, n in enumerate(sizes):
        out[slot[n]].append(i)
    return out


@functools.lru_cache(maxsize=64)
def plan_chunks(sizes: tuple, caps: tuple, kinds: tuple, chunk: int = 0) -> tuple[Chunk, ...]:
    """Group layers into chunks of padded rows. Pure Python on static shapes (cached).

    Layers of one kind (device and dtype) are grouped by size (:func:`_groups`: few
    groups, little padding); a group is cut into chunks of at most ``chunk`` padded
    entries.

    Args:
        sizes: numel per layer. caps: static ``topk`` size per layer (``<= numel``).
        kinds: a hashable per layer that must match within a chunk (device, dtype).
        chunk: at most this many padded entries per chunk (a single row may exceed
            it); 0 = auto (no limit up to :data:`AUTO_CHUNK_FREE` entries in total,
            else ``max(total // 16, 2**20)``).

    Returns:
        Chunks in a deterministic order (by kind, then size, then layer index).

    Example:
        >>> plan_chunks((6, 5, 100, 7), (1, 1, 9, 2), ("a",) * 4)
        (Chunk(layers=(0, 1, 2, 3), width=100, k=9),)
        >>> [c.layers for c in plan_chunks((6, 5, 10**7, 7), (1, 1, 9, 2), ("a",) * 4)]
        [(0, 1, 3), (2,)]
    """
    total = sum(sizes)
    if chunk == 0:
        chunk = 2**62 if total <= AUTO_CHUNK_FREE else max(total // _AUTO_CHUNK_PARTS, 2**20)
    by_kind: dict = {}
    for i, kind in enumerate(kinds):
        by_kind.setdefault(kind, []).append(i)
    out = []
    for members in by_kind.values():  # insertion order: deterministic
        for group in _groups([sizes[i] for i in members]):
            rows = [members[i] for i in group]
            width = max(sizes[i] for i in rows)
            per_chunk = max(1, chunk // width)
            for start in range(0, len(rows), per_chunk):
                part = tuple(rows[start:start + per_chunk])
                out.append(Chunk(part, width, min(width, max(caps[i] for i in part))))
    return tuple(out)


def _constants(device: torch.device, plan: tuple, ids: tuple, caps: tuple, sizes: tuple) -> tuple[Tensor, ...]:
    """int64 ``[L]`` caps, layer ids and sizes on ``device``, in plan order (cached per
    layout); chunk ``c``'s rows are a slice of them."""
    def build():
        order = [i for c in plan for i in c.layers]
        values = [caps[i] for i in order] + [ids[i] for i in order] + [sizes[i] for i in order]
        if torch.compiler.is_compiling():
            # Scalar fills, not torch.tensor(list): a lifted tensor constant inside a
            # torch.cond branch breaks inductor's codegen in torch 2.13 (the one-call step).
            flat = torch.zeros(len(values), dtype=torch.int64, device=device)
            for i, v in enumerate(values):
                flat[i] = v
        else:
            flat = torch.tensor(values, dtype=torch.int64, device=device)
        n = len(order)
        return flat[:n], flat[n:2 * n], flat[2 * n:]

    if torch.compiler.is_compiling():
        return build()
    key = (str(device), plan, ids, caps, sizes)
    found = _CACHE.get(key)
    if found is None:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        found = _CACHE[key] = build()
    return found


def layer_extras(name: str, key: Tensor, step: Tensor, ema: Mapping[str, Tensor],
                 aux: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The ``extras`` a criterion sees for layer ``name`` (see :mod:`rigl_func.criteria`)."""
    extras = {"key": key, "step": step}
    if name in ema:
        extras["ema"] = ema[name]
    extras.update({tree_name: tree[name] for tree_name, tree in aux.items()})
    return extras


#: Built-in criteria whose scores are >= 0 (or NaN).
_NONNEG = (C.magnitude, C.gradient, C.ema, C.random)
#: Built-in criteria that read no per-layer random key.
_KEYLESS = (C.magnitude, C.gradient, C.ema)


class _Rows(NamedTuple):
    """One chunk's inputs as padded rows, and what its criteria need."""

    width: int
    params: Tensor  # [R, P] param dtype, padding 0
    param_list: list  # per-layer params, growth, masks, extras (custom criteria)
    growth: list
    mask_list: list
    extras: list
    ema: list
    row_keys: Optional[Tensor]  # int64 [R]: fold_in(step_key, layer id), when a criterion needs it


def _uniform_rows(row_keys: Tensor, width: int) -> Tensor:
    """:func:`rigl_func.random.uniform` of every row's layer (same bits, padded)."""
    idx = torch.arange(width, dtype=torch.int64, device=row_keys.device)
    key = row_keys.unsqueeze(-1)
    bits = hash32(hash32(idx ^ key) + key)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _score_rows(fn: Callable, rows: _Rows, growth_rows: Callable[[], Tensor], fill) -> Tensor:
    """``[R, P]`` scores of criterion ``fn`` (in the criterion's dtype), new memory."""
    if fn is C.magnitude:
        return rows.params.abs()
    if fn is C.gradient:
        return growth_rows().abs()
    if fn is C.ema:
        return pad_rows(rows.ema, rows.width, fill).abs_()
    if fn is C.random:
        return _uniform_rows(rows.row_keys, rows.width)
    scores = []
    for p, g, m, e in zip(rows.param_list, rows.growth, rows.mask_list, rows.extras):
        s = call_criterion(fn, p, g, m, e)
        _check(s, m, 0, None)
        scores.append(s)
    dtype = torch.promote_types(scores[0].dtype, torch.float32) if len({s.dtype for s in scores}) > 1 else scores[0].dtype
    return pad_rows([s.to(dtype) for s in scores], rows.width, fill)


def _drop_values(scores: Tensor, mask: Tensor, nonneg: bool) -> tuple[Tensor, bool]:
    """Values whose ``take_top_rows`` selection is the per-layer drop order (NaN
    first, then the smallest score): ``(values, largest)``. Overwrites ``scores``."""
    if nonneg:
        # |score| >= 0: smallest first, NaN -> -1 (before every score), inactive -> +inf.
        v = scores.float() if scores.dtype != torch.float32 else scores
        v = v.nan_to_num_(nan=-1.0, posinf=math.inf, neginf=-math.inf)
        return torch.where(mask, v, math.inf), False
    # Any sign: the per-layer path selects the largest of -score (NaN above +inf).
    v = scores.float() if scores.dtype != torch.float32 else scores
    return order_keys_(v.neg_(), mask), True


def _grow_values(scores: Tensor, can_grow: Tensor, nonneg: bool) -> tuple[Tensor, bool]:
    """Values for the grow selection (largest first) over ``can_grow`` (finite only)."""
    v = scores.float() if scores.dtype != torch.float32 else scores
    if nonneg:
        return torch.where(can_grow, v, -1.0), True
    return order_keys_(v, can_grow), True  # float64 scores may round to +-inf: still ordered


def _update_chunk(chunk: Chunk, params, growth, masks, ema, names: tuple, extras: list, row_keys: Optional[Tensor],
                  caps_t: Tensor, sizes_t: Tensor, fraction: Tensor, drop_fn, grow_fn,
                  config) -> tuple[Tensor, Tensor]:
    """New mask rows and new param rows of one chunk."""
    rows_names = [names[i] for i in chunk.layers]
    width = chunk.width
    mask = pad_rows([masks[n] for n in rows_names], width, False)
    wrows = pad_rows([params[n] for n in rows_names], width, 0)
    rows = _Rows(width, wrows, [params[n] for n in rows_names], [growth[n] for n in rows_names],
                 [masks[n] for n in rows_names], [extras[i] for i in chunk.layers],
                 [ema[n] for n in rows_names if n in ema], row_keys)
    cache: dict = {}

    def growth_rows() -> Tensor:
        if "g" not in cache:
            cache["g"] = pad_rows([growth[n] for n in rows_names], width, math.nan)
        return cache["g"]

    grow_scores = _score_rows(grow_fn, rows, growth_rows, math.nan)
    if grow_fn in (C.random, C.magnitude) and any(masks[n].numel() < width for n in rows_names):
        # these scores are finite in the padding: make it never growable (NaN)
        valid = torch.arange(width, device=sizes_t.device) < sizes_t.unsqueeze(-1)
        grow_scores = grow_scores.masked_fill(valid.logical_not_(), math.nan)
    if grow_fn in _NONNEG and grow_scores.dtype == torch.float32:
        finite = grow_scores < math.inf  # >= 0 or NaN: one compare
    else:
        finite = grow_scores.isfinite()  # in the criterion's dtype: float64 decides before rounding
    nnz = mask.sum(-1)
    growable = finite.logical_and(mask.logical_not()).sum(-1)
    n = torch.floor(fraction.to(torch.float64) * nnz).to(torch.int64).clamp(min=0)
    n = torch.minimum(torch.minimum(n, caps_t), growable)
    if chunk.k == 0:
        kept, grown = mask, torch.zeros_like(mask)
    else:
        drop_scores = _score_rows(drop_fn, rows, growth_rows, 0.0)
        values, largest = _drop_values(drop_scores, mask, drop_fn in _NONNEG)
        dropped = take_top_rows(values, mask, torch.minimum(n, nnz), chunk.k, largest=largest)
        del values
        kept = dropped.logical_not_().logical_and_(mask)
        can_grow = finite.logical_and_(kept.logical_not())
        values, largest = _grow_values(grow_scores, can_grow, grow_fn in _NONNEG)
        grown = take_top_rows(values, can_grow, n, chunk.k, largest=largest)
        del values
    new_mask = kept.logical_or(grown)
    zero = torch.zeros((), dtype=wrows.dtype, device=wrows.device)
    new_params = torch.where(new_mask & mask, wrows, zero)  # dropped and regrown: kept (as per-layer)
    if config.grow_init == "gradient":
        init = -growth_rows().to(wrows.dtype)
        fresh = grown.logical_and(mask.logical_not())
        new_params = torch.where(fresh, config.grow_init_scale * torch.nan_to_num(init, nan=0.0, posinf=0.0, neginf=0.0),
                                 new_params)
    return new_mask, new_params


def _unpad(rows: Tensor, sizes: list, out: Optional[Tensor]) -> Tensor:
    """Row ``i``'s first ``sizes[i]`` entries, concatenated (into ``out`` if given)."""
    parts = [r[:s] for r, s in zip(rows.unbind(0), sizes)]
    if out is None:
        return parts[0].clone() if len(parts) == 1 else torch.cat(parts)
    return torch.cat(parts, out=out)


def update_layers_batched(
    params: Mapping[str, Tensor],
    growth: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    fraction: Tensor,
    step_key: Tensor,
    step: Tensor,
    layer_ids: tuple,
    caps: tuple,
    config,
    aux: Optional[Mapping[str, Mapping[str, Tensor]]] = None,
    ema: Optional[Mapping[str, Tensor]] = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Unstructured RigL update of every layer in ``masks``: ``(new_params, new_masks)``.

    Args:
        params, growth: float trees (growth: the gradients or their accumulated mean).
        masks: bool tree of the sparse layers (any devices: grouped per device).
        fraction: 0-d float64 drop fraction ``f(t)``.
        step_key: 0-d int64, ``fold_in(state.key, state.step)``.
        step: 0-d int64, ``state.step`` (criteria read it from ``extras``).
        layer_ids: static 32-bit ids of the layers (:func:`rigl_func.random.layer_id`).
        caps: static ``topk`` sizes ``min(floor(alpha * N_target), numel)`` per layer.
        config: the :class:`rigl_func.RigLConfig` (criteria, grow init, update_chunk).
        aux: named trees for custom criteria. ema: the state's gradient EMAs.

    Returns:
        New params (the sparse layers, inactive entries exactly 0) and new masks, as
        views of flat buffers. Pure.
    """
    names = tuple(masks)
    for n in names:  # the per-layer path's checks (selection._check), without ops
        if masks[n].dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got mask dtype={masks[n].dtype}")
        if masks[n].numel() >= 2**31:
            raise ValueError(f"tensors with >= 2**31 entries are not supported, got numel={masks[n].numel()}")
    aux = {} if aux is None else aux
    ema = {} if ema is None else ema
    drop_fn = resolve_criterion(config.drop_criterion, "drop_criterion")
    grow_fn = resolve_criterion(config.grow_criterion, "grow_criterion")
    sizes = tuple(masks[n].numel() for n in names)
    devices = tuple(masks[n].device for n in names)
    kinds = tuple((str(d), params[n].dtype) for d, n in zip(devices, names))
    plan = plan_chunks(sizes, caps, kinds, getattr(config, "update_chunk", 0))
    new_masks: dict[str, Tensor] = {}
    new_params: dict[str, Tensor] = {}
    needs_keys = drop_fn not in _KEYLESS or grow_fn not in _KEYLESS or config.grow_init == "normal"
    custom = drop_fn not in _NONNEG or grow_fn not in _NONNEG or config.grow_init == "normal"
    for device in dict.fromkeys(devices):  # one set of flat buffers per device
        dev_plan = tuple(c for c in plan if devices[c.layers[0]] == device)
        caps_all, ids_all, sizes_all = _constants(device, dev_plan, tuple(layer_ids), caps, sizes)
        dev_step = step.to(device) if step.device != device else step
        dev_fraction = fraction.to(device) if fraction.device != device else fraction
        keys_all = None
        if needs_keys:
            keys_all = fold_in(step_key.to(device) if step_key.device != device else step_key, ids_all)
        extras: list = [None] * len(names)
        chunk_keys, chunk_caps, at = [], [], 0
        for c in dev_plan:
            r = len(c.layers)
            chunk_caps.append((caps_all[at:at + r], sizes_all[at:at + r]))
            chunk_keys.append(None if keys_all is None else keys_all[at:at + r])
            if custom:
                for j, i in enumerate(c.layers):
                    extras[i] = layer_extras(names[i], chunk_keys[-1][j], dev_step, ema, aux)
            at += r
        _update_device(dev_plan, chunk_caps, chunk_keys, params, growth, masks, ema, names, sizes, extras,
                       dev_fraction, drop_fn, grow_fn, config, new_masks, new_params)
    return {n: new_params[n] for n in names}, {n: new_masks[n] for n in names}


def _update_device(plan, chunk_caps, chunk_keys, params, growth, masks, ema, names, sizes, extras, fraction,
                   drop_fn, grow_fn, config, new_masks: dict, new_params: dict) -> None:
    """Run the chunks of one device; fill ``new_masks``/``new_params`` with views."""
    total = sum(sizes[i] for c in plan for i in c.layers)
    lead = masks[names[plan[0].layers[0]]]
    chunked = len(plan) > 1 and not torch.compiler.is_compiling() and not is_batched(lead)
    mask_out = torch.empty(total, dtype=torch.bool, device=lead.device) if chunked else None
    dtype_total: dict = {}
    for c in plan:
        dt = params[names[c.layers[0]]].dtype
        dtype_total[dt] = dtype_total.get(dt, 0) + sum(sizes[i] for i in c.layers)
    param_out = ({dt: torch.empty(t, dtype=dt, device=lead.device) for dt, t in dtype_total.items()}
                 if chunked else None)
    mask_parts, param_parts = [], {}
    at, dt_at = 0, dict.fromkeys(dtype_total, 0)
    for c, (caps_t, sizes_t), row_keys in zip(plan, chunk_caps, chunk_keys):
        c_sizes = [sizes[i] for i in c.layers]
        span = sum(c_sizes)
        new_mask, new_param = _update_chunk(c, params, growth, masks, ema, names, extras, row_keys, caps_t,
                                            sizes_t, fraction, drop_fn, grow_fn, config)
        dt = new_param.dtype
        if chunked:
            flat_mask = _unpad(new_mask, c_sizes, mask_out[at:at + span])
            flat_param = _unpad(new_param, c_sizes, param_out[dt][dt_at[dt]:dt_at[dt] + span])
        else:
            flat_mask, flat_param = _unpad(new_mask, c_sizes, None), _unpad(new_param, c_sizes, None)
        mask_parts.append(flat_mask)
        param_parts.setdefault(dt, []).append(flat_param)
        at += span
        dt_at[dt] += span
        del new_mask, new_param
    if not chunked and len(plan) > 1:  # compiled or vmapped: one buffer by concatenation
        mask_parts = [torch.cat(mask_parts)]
        for dt, parts in param_parts.items():
            param_parts[dt] = [torch.cat(parts)]
    # Views, in plan order.
    order = [i for c in plan for i in c.layers]
    flat_mask = mask_out if chunked else mask_parts[0]
    for i, part in zip(order, flat_mask.split([sizes[i] for i in order])):
        new_masks[names[i]] = part.view(masks[names[i]].shape)
    for dt in dtype_total:
        dt_order = [i for c in plan if params[names[c.layers[0]]].dtype == dt for i in c.layers]
        flat = param_out[dt] if chunked else param_parts[dt][0]
        for i, part in zip(dt_order, flat.split([sizes[i] for i in dt_order])):
            new_params[names[i]] = part.view(params[names[i]].shape)
    if config.grow_init == "normal":  # per-layer statistics: the per-layer code, on views
        from rigl_func.topology import _init_grown

        for i in order:
            n = names[i]
            new_params[n] = _init_grown(params[n], growth[n], masks[n], new_masks[n], extras[i], "normal",
                                        config.grow_init_scale)

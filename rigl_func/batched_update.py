"""The unstructured RigL update of all sparse layers at once, on flat buffers.

Same result, bit for bit, as :func:`rigl_func.update_layer` mapped over the layers
(Evci et al. 2020, Sec. 3; the per-layer path is the oracle in the tests), but with a
number of ATen ops that does not grow with the number of layers:

* the layers' masks and scores are concatenated into flat buffers (segment ``l`` =
  layer ``l``, one ``torch.cat`` each); results come back as ``split`` views (no
  kernel);
* the built-in criteria (``magnitude``, ``gradient``, ``ema``, ``random``) are
  evaluated once on the flat buffer; a custom criterion is still written for one
  tensor and called per layer (its own ops are its own);
* every layer's drop and grow set is chosen by one segmented selection
  (:func:`rigl_func.segment_select.segment_top`);
* per-layer constants (sizes, layer ids, ``topk`` caps) are small device tensors built
  once per layout and device and cached, so an update makes no host-to-device copy
  and no host sync (CUDA-graph capturable after one warm-up call).

Layers whose params have different dtypes are grouped by dtype for the value-producing
steps (the new params, ``grow_init``), so rounding is that of the per-layer path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from rigl_func import criteria as C
from rigl_func.criteria import call_criterion, resolve_criterion
from rigl_func.random import fold_in, hash32
from rigl_func.selection import _check
from rigl_func.segment_select import _BINS, EXCLUDED_BUCKETS, NEVER, bin_bases, exclude_, is_batched, order_keys_, repeat_per_segment, segment_top_

__all__ = ["update_layers_batched"]

_CACHE: dict = {}
_CACHE_LIMIT = 64


def _constants(device: torch.device, sizes: tuple, ids: tuple, caps: tuple) -> tuple[Tensor, ...]:
    """Per-layer int64 ``[L]`` tensors on ``device``: sizes, offsets, layer ids, caps,
    and the int32 level-1 bin bases of :mod:`rigl_func.segment_select`."""
    def build():
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        values = [*sizes, *offsets, *ids, *caps]
        if torch.compiler.is_compiling():
            # Scalar fills, not torch.tensor(list): a lifted tensor constant inside a
            # torch.cond branch breaks inductor's codegen in torch 2.13 (the one-call step).
            rows = torch.zeros(len(values), dtype=torch.int64, device=device)
            for i, v in enumerate(values):
                rows[i] = v
        else:
            rows = torch.tensor(values, dtype=torch.int64, device=device)
        return (*rows.view(4, len(sizes)).unbind(0), bin_bases(len(sizes), device))

    if torch.compiler.is_compiling():
        return build()
    key = (str(device), sizes, ids, caps)
    found = _CACHE.get(key)
    if found is None:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        found = _CACHE[key] = build()
    return found


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _flat_uniform(layer_keys: Tensor, sizes: tuple, offsets: Tensor, total: int) -> Tensor:
    """:func:`rigl_func.random.uniform` of every layer, concatenated (same bits)."""
    idx = torch.arange(total, dtype=torch.int64, device=offsets.device) - repeat_per_segment(sizes, offsets)
    key = repeat_per_segment(sizes, layer_keys)
    bits = hash32(hash32(idx ^ key) + key)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


class _Layers(NamedTuple):
    """The layers of one update, in order, and what the flat criteria need."""

    names: tuple
    params: Mapping[str, Tensor]
    growth: Mapping[str, Tensor]
    masks: Mapping[str, Tensor]
    extras: list
    sizes: tuple  # numel per layer
    offsets: Tensor  # int64 [L]
    layer_keys: Tensor  # int64 [L]
    total: int


def _scores(fn: Callable, layers: _Layers) -> Tensor:
    """Flat ``[N]`` scores of criterion ``fn`` over all layers, in new memory (the
    caller may overwrite them)."""
    names = layers.names
    if fn is C.magnitude:
        return _flat([layers.params[n] for n in names]).abs_()
    if fn is C.gradient:
        return _flat([layers.growth[n] for n in names]).abs_()
    if fn is C.ema:
        return _flat([e["ema"] for e in layers.extras]).abs_()
    if fn is C.random:
        return _flat_uniform(layers.layer_keys, layers.sizes, layers.offsets, layers.total)
    scores = []
    for n, e in zip(names, layers.extras):
        s = call_criterion(fn, layers.params[n], layers.growth[n], layers.masks[n], e)
        _check(s, layers.masks[n], 0, None)
        scores.append(s)
    return _flat(scores)


#: Built-in criteria whose scores are >= 0 (or NaN): their float32 bits are order keys.
_NONNEG = (C.magnitude, C.gradient, C.ema, C.random)
_INF_BITS = 0x7F800000


def _grow_keys(fn: Callable, layers: _Layers) -> tuple[Tensor, Tensor]:
    """int32 order keys of the grow scores (``NEVER`` where non-finite) and the bool
    non-finite mask. Non-negative float32 scores are their own keys (their bits);
    float64 ones take the generic path, since finiteness is decided before rounding."""
    scores = _scores(fn, layers)
    if fn in _NONNEG and scores.dtype != torch.float64 and not is_batched(scores):  # vmap: no dtype view
        keys = _float32_owned(scores).view(torch.int32)
        nonfinite = keys >= _INF_BITS
        return keys.masked_fill_(nonfinite, NEVER), nonfinite
    finite = scores.isfinite()
    return order_keys_(_float32_owned(scores), finite), finite.logical_not_()


def _drop_keys(scores: Tensor, nonneg: bool) -> Tensor:
    """int32 keys of "drop first" (the smallest score; NaN before everything), for every
    entry (exclude the inactive ones with :func:`exclude_`). Overwrites ``scores``."""
    scores = _float32_owned(scores)
    if not nonneg or is_batched(scores):  # vmap: no dtype view
        return order_keys_(scores.neg_(), None)
    keys = scores.view(torch.int32)
    nan = keys > _INF_BITS
    keys.bitwise_xor_(0x7FFFFFFF)  # decreasing in the score: the smallest |w| ranks first
    return keys.masked_fill_(nan, 0x7FFFFFFF)


def layer_extras(name: str, key: Tensor, step: Tensor, ema: Mapping[str, Tensor],
                 aux: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The ``extras`` a criterion sees for layer ``name`` (see :mod:`rigl_func.criteria`)."""
    extras = {"key": key, "step": step}
    if name in ema:
        extras["ema"] = ema[name]
    extras.update({tree_name: tree[name] for tree_name, tree in aux.items()})
    return extras


def _new_params(names: tuple, params, growth, masks, new_masks, mask: Tensor, new_mask: Tensor, sizes: tuple,
                extras: list, grow_init: str, grow_init_scale: float,
                flat_params: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Step 4: kept entries keep their value, inactive ones are 0, new ones get grow_init."""
    from rigl_func.topology import _init_grown

    if grow_init == "normal":  # per-layer statistics: the per-layer code, on views
        return {n: _init_grown(params[n], growth[n], masks[n], new_masks[n], e, grow_init, grow_init_scale)
                for n, e in zip(names, extras)}
    if grow_init not in ("zeros", "gradient"):
        raise ValueError(f"grow_init must be 'zeros', 'normal' or 'gradient', got grow_init={grow_init!r}")
    groups: dict[torch.dtype, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(params[n].dtype, []).append(i)
    keep, fresh = new_mask & mask, (new_mask & ~mask if grow_init == "gradient" else None)
    out: dict[str, Tensor] = {}
    keep_parts = keep.split(sizes) if len(groups) > 1 else None
    fresh_parts = fresh.split(sizes) if len(groups) > 1 and fresh is not None else None
    for dtype, idx in groups.items():
        group = [names[i] for i in idx]
        group_sizes = [sizes[i] for i in idx]
        keep_g, fresh_g = keep, fresh
        if keep_parts is not None:  # this dtype's layers only
            keep_g = torch.cat([keep_parts[i] for i in idx])
            fresh_g = None if fresh_parts is None else torch.cat([fresh_parts[i] for i in idx])
        if len(groups) == 1 and flat_params is not None and flat_params.dtype == dtype:
            values = flat_params.masked_fill_(~keep_g, 0)  # the flat copy made for the drop scores
        else:
            values = torch.where(keep_g, _flat([params[n] for n in group]), torch.zeros((), dtype=dtype, device=keep.device))
        if fresh_g is not None:
            init = -_flat([growth[n] for n in group]).to(dtype)
            values = torch.where(fresh_g, grow_init_scale * torch.nan_to_num(init, nan=0.0, posinf=0.0, neginf=0.0),
                                 values)
        for n, part in zip(group, values.split(group_sizes)):
            out[n] = part.view(params[n].shape)
    return {n: out[n] for n in names}


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
        masks: bool tree of the sparse layers (all on one device).
        fraction: 0-d float64 drop fraction ``f(t)``.
        step_key: 0-d int64, ``fold_in(state.key, state.step)``.
        step: 0-d int64, ``state.step`` (criteria read it from ``extras``).
        layer_ids: static 32-bit ids of the layers (:func:`rigl_func.random.layer_id`).
        caps: static ``topk`` sizes ``min(floor(alpha * N_target), numel)`` per layer.
        config: the :class:`rigl_func.RigLConfig` (criteria, grow init).
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
    device = masks[names[0]].device
    sizes = tuple(masks[n].numel() for n in names)
    total = sum(sizes)
    sizes_t, offsets_t, ids_t, caps_t, row_bases = _constants(device, sizes, tuple(layer_ids), tuple(caps))
    layer_keys = fold_in(step_key, ids_t)
    extras = [layer_extras(n, layer_keys[i], step, ema, aux) for i, n in enumerate(names)]
    layers = _Layers(names, params, growth, masks, extras, sizes, offsets_t, layer_keys, total)
    drop_fn = resolve_criterion(config.drop_criterion, "drop_criterion")
    grow_fn = resolve_criterion(config.grow_criterion, "grow_criterion")
    mask = _flat([masks[n] for n in names])
    inactive = ~mask
    bases = repeat_per_segment(sizes, row_bases)  # per entry: its layer's first level-1 bin

    # Grow keys first (they decide how many entries each layer can replace); non-finite
    # grow scores are never grown.
    grow_keys, nonfinite = _grow_keys(grow_fn, layers)
    # Inactive entries with a non-finite grow score, per layer: a histogram on the grow
    # keys' level-1 bins (spread over the row, not one atomic address per layer).
    bad_bins = (grow_keys >> 16).add_(bases)
    bad = torch.zeros(len(names) * _BINS, dtype=torch.int32, device=device).index_add(
        0, bad_bins, nonfinite.logical_and_(inactive).to(torch.int32)).view(len(names), _BINS).sum(1)
    del bad_bins
    del nonfinite

    if drop_fn is C.magnitude:  # keep the flat copy of the params: it becomes the new params
        flat_params = _flat([params[n] for n in names])
        drop_keys = _drop_keys(flat_params.abs(), nonneg=True)
    else:
        flat_params = None
        drop_keys = _drop_keys(_scores(drop_fn, layers), nonneg=drop_fn in _NONNEG)
    drop_keys = exclude_(drop_keys, inactive, grow_keys)  # the grow keys vary where weights are 0
    counts = {}

    def drop_count(hist1: Tensor) -> Tensor:
        # Buckets 0-63 of a row hold exactly the layer's excluded (inactive) entries.
        nnz = sizes_t - hist1[:, :EXCLUDED_BUCKETS].sum(1)
        growable = sizes_t - nnz - bad
        n = torch.floor(fraction.to(torch.float64) * nnz).to(torch.int64).clamp(min=0)
        counts["n"] = torch.minimum(torch.minimum(n, caps_t), growable)
        return torch.minimum(counts["n"], nnz)

    dropped = segment_top_(drop_keys, bases, drop_count, len(names))
    del drop_keys
    kept = dropped.logical_not_().logical_and_(mask)  # in the memory of `dropped`
    grown = segment_top_(exclude_(grow_keys, kept, grow_keys), bases, counts["n"], len(names))
    del grow_keys
    new_mask = kept.logical_or_(grown)
    new_masks = {nm: part.view(masks[nm].shape) for nm, part in zip(names, new_mask.split(sizes))}
    new_params = _new_params(names, params, growth, masks, new_masks, mask, new_mask, sizes, extras,
                             config.grow_init, config.grow_init_scale, flat_params)
    return new_params, new_masks


def _float32_owned(scores: Tensor) -> Tensor:
    """``scores`` as float32, in its own memory (the caller may overwrite it)."""
    return scores.float() if scores.dtype != torch.float32 else scores

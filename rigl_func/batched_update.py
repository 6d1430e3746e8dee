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
from typing import Callable, Optional

import torch
from torch import Tensor

from rigl_func import criteria as C
from rigl_func.criteria import call_criterion, resolve_criterion
from rigl_func.random import fold_in, hash32
from rigl_func.selection import _check
from rigl_func.segment_select import order_keys_, segment_ids, segment_top_

__all__ = ["update_layers_batched"]

_CACHE: dict = {}
_CACHE_LIMIT = 64


def _constants(device: torch.device, sizes: tuple, ids: tuple, caps: tuple) -> tuple[Tensor, ...]:
    """Per-layer int64 ``[L]`` tensors on ``device``: sizes, offsets, layer ids, caps,
    and the int32 segment numbers ``arange(L)``."""
    def build():
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        rows = torch.tensor([list(sizes), offsets, list(ids), list(caps), list(range(len(sizes)))],
                            dtype=torch.int64, device=device)
        return (*rows[:4].unbind(0), rows[4].to(torch.int32))

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


def _flat_uniform(layer_keys: Tensor, seg: Tensor, offsets: Tensor, total: int) -> Tensor:
    """:func:`rigl_func.random.uniform` of every layer, concatenated (same bits)."""
    seg = seg.to(torch.int64)
    idx = torch.arange(total, dtype=torch.int64, device=seg.device) - offsets[seg]
    key = layer_keys[seg]
    bits = hash32(hash32(idx ^ key) + key)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _scores(fn: Callable, which: str, names: tuple, params, growth, masks, extras: list, flat: dict) -> Tensor:
    """Flat ``[N]`` scores of criterion ``fn`` over all layers."""
    if fn is C.magnitude:
        return flat["params"]().abs()  # flat params stay cached for the new params
    if fn is C.gradient:
        return flat["growth"]().abs_()  # a fresh cat: modified in place
    if fn is C.ema:
        return _flat([e["ema"] for e in extras]).abs_()
    if fn is C.random:
        return flat["uniform"]()
    scores = []
    for n, e in zip(names, extras):
        s = call_criterion(fn, params[n], growth[n], masks[n], e)
        _check(s, masks[n], 0, None)
        scores.append(s)
    return _flat(scores)


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
    for dtype, idx in groups.items():
        group = [names[i] for i in idx]
        group_sizes = [sizes[i] for i in idx]
        keep_g, fresh_g = keep, fresh
        if len(groups) > 1:  # this dtype's layers only
            keep_g = torch.cat([keep.split(sizes)[i] for i in idx])
            fresh_g = None if fresh is None else torch.cat([fresh.split(sizes)[i] for i in idx])
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
    extras_base: Mapping[str, Tensor],
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
        extras_base: extras shared by every layer (``{"step": state.step}``).
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
    sizes_t, offsets_t, ids_t, caps_t, seg_ids = _constants(device, sizes, tuple(layer_ids), tuple(caps))
    seg = segment_ids(sizes, seg_ids)
    layer_keys = fold_in(step_key, ids_t)
    extras = []
    for i, n in enumerate(names):
        e = {"key": layer_keys[i], **extras_base}
        if n in ema:
            e["ema"] = ema[n]
        e.update({tree_name: tree[n] for tree_name, tree in aux.items()})
        extras.append(e)
    cache: dict[str, Tensor] = {}

    def lazy(name: str, make: Callable[[], Tensor]) -> Callable[[], Tensor]:
        def get() -> Tensor:
            if name not in cache:
                cache[name] = make()
            return cache[name]
        return get

    flat = {  # fresh tensors on every call (criteria overwrite them), except the params' copy
        "params": lazy("params", lambda: _flat([params[n] for n in names])),
        "growth": lambda: _flat([growth[n] for n in names]),
        "uniform": lambda: _flat_uniform(layer_keys, seg, offsets_t, total),
    }
    drop_fn = resolve_criterion(config.drop_criterion, "drop_criterion")
    grow_fn = resolve_criterion(config.grow_criterion, "grow_criterion")
    mask = _flat([masks[n] for n in names])
    drop_keys = order_keys_(_float32_owned(_scores(drop_fn, "drop", names, params, growth, masks, extras, flat)).neg_(),
                            mask)
    grow_scores = _scores(grow_fn, "grow", names, params, growth, masks, extras, flat)
    flat_params = cache.get("params")
    cache.clear()

    finite = grow_scores.isfinite()
    per_layer = torch.zeros(len(names), dtype=torch.int32, device=device)
    nnz = per_layer.index_add(0, seg, mask.to(torch.int32)).to(torch.int64)
    growable = per_layer.index_add(0, seg, (finite & ~mask).to(torch.int32)).to(torch.int64)
    n = torch.floor(fraction.to(torch.float64) * nnz).to(torch.int64).clamp(min=0)
    n = torch.minimum(torch.minimum(n, caps_t), growable)
    dropped = segment_top_(drop_keys, seg, torch.minimum(n, nnz))
    del drop_keys
    kept = mask & ~dropped
    grown = segment_top_(order_keys_(_float32_owned(grow_scores), finite & ~kept), seg, n)
    del grow_scores
    new_mask = kept | grown
    new_masks = {nm: part.view(masks[nm].shape) for nm, part in zip(names, new_mask.split(sizes))}
    new_params = _new_params(names, params, growth, masks, new_masks, mask, new_mask, sizes, extras,
                             config.grow_init, config.grow_init_scale, flat_params)
    return new_params, new_masks


def _float32_owned(scores: Tensor) -> Tensor:
    """``scores`` as float32, in its own memory (the caller may overwrite it)."""
    return scores.float() if scores.dtype != torch.float32 else scores

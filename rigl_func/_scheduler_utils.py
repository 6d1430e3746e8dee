"""Helpers of the rigl-torch compatibility shell (:mod:`rigl_func.scheduler`).

Three kinds of code live here, none of them part of the algorithm:

* argument checking with rigl-torch's names (``dense_allocation``, ``T_end``,
  ``delta``) and the mapping onto a :class:`rigl_func.RigLConfig`;
* in-place edits of live ``nn.Parameter`` / ``.grad`` tensors (trailing ``_``);
* the (de)serialization of a scheduler checkpoint and the initial mask broadcast.

The algorithm itself (masks, accumulation window, drop/grow) is only ever reached
through the pure core functions.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from rigl_func.config import _is_int, _is_real
from rigl_func.config import RigLConfig
from rigl_func.distributions import DISTRIBUTIONS
from rigl_func.schedules import in_accumulation_window
from rigl_func.state import RigLState

__all__ = [
    "HYPERPARAMS",
    "FORMAT",
    "check_hyperparams",
    "make_config",
    "unwrap_model",
    "needs_dense_grads",
    "is_distributed",
    "MaskGroup",
    "pack_masks",
    "zero_inactive_packed_",
    "mask_grads_",
    "mask_weights_",
    "broadcast_masks",
    "describe",
    "resolve_hyperparams",
    "saved_hyperparams",
    "state_from_dict",
]

#: rigl-torch's constructor defaults (rigl-torch 0.5.2, ``rigl_torch/RigL.py``).
HYPERPARAMS = {
    "dense_allocation": 1,
    "T_end": None,
    "sparsity_distribution": "uniform",
    "ignore_linear_layers": True,
    "delta": 100,
    "alpha": 0.3,
    "static_topo": False,
    "grad_accumulation_n": 1,
    "grow": "gradient",  # ours (keyword-only): "gradient" = RigL, "random" = SET, "ema" = SNFS
    "include": (),  # ours (keyword-only): the RigLConfig layer rules
    "exclude": (),
    "dense": (),
    "fused_splits": (),  # ours (keyword-only): RigLConfig(fused_splits=...), as (regex, k) pairs
}

#: Keys that checkpoints written before they existed lack (read as their defaults).
_LAYER_RULES = ("include", "exclude", "dense")


def saved_hyperparams(saved: Mapping) -> dict:
    """A checkpoint's hyperparameters, layer rules defaulted and as tuples."""
    out = dict(saved)
    for name in _LAYER_RULES:
        value = out.get(name, ())
        out[name] = tuple(value) if isinstance(value, (list, tuple)) else value
    value = out.get("fused_splits", ())
    out["fused_splits"] = _fused_pairs(value) if isinstance(value, (dict, list, tuple)) else value
    return out


def _fused_pairs(value) -> tuple:
    """``{regex: k}`` or ``(regex, k)`` pairs (lists after a round trip) as a tuple of tuples."""
    items = value.items() if isinstance(value, dict) else value
    return tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in items)

#: ``grow=`` value -> core method.
GROW_METHODS = {"gradient": "rigl", "random": "set", "ema": "snfs"}

#: Marks a checkpoint written by :meth:`RigLScheduler.state_dict`.
FORMAT = "rigl_func.RigLScheduler/1"



def check_hyperparams(hp: Mapping) -> dict:
    """Validate rigl-torch's arguments; errors name the rigl-torch argument and value.

    Args:
        hp: the eight keys of :data:`HYPERPARAMS`.

    Returns:
        A normalized copy of plain Python values (``sparsity_distribution``
        lower-cased, ``int``/``float``/``bool``), so checkpoints load with
        ``torch.load(..., weights_only=True)``.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range.
    """
    hp = dict(hp)
    for name in _LAYER_RULES:
        value = hp[name]
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{name} must be a tuple of str, got {name}={value!r}")
        hp[name] = tuple(value)
    fused = hp["fused_splits"]
    if not isinstance(fused, (dict, list, tuple)):
        raise TypeError(f"fused_splits must be a dict {{regex: k}} or (regex, k) pairs, got fused_splits={fused!r}")
    hp["fused_splits"] = _fused_pairs(fused)
    if hp["grow"] not in GROW_METHODS:
        raise ValueError(f"grow must be one of {sorted(GROW_METHODS)}, got grow={hp['grow']!r}")
    d = hp["dense_allocation"]
    if not _is_real(d):
        raise TypeError(f"dense_allocation must be a float in (0, 1], got dense_allocation={d!r}")
    if not (math.isfinite(d) and 0 < d <= 1):
        raise ValueError(f"dense_allocation must be in (0, 1] (the fraction of weights kept), got dense_allocation={d!r}")
    hp["dense_allocation"] = float(d)
    for name in ("T_end", "delta", "grad_accumulation_n"):
        value = hp[name]
        if value is None and name == "T_end":
            raise ValueError("T_end is required: the step after which the topology is frozen "
                             "(rigl-torch recommends int(0.75 * total_iterations)), got T_end=None")
        if not _is_int(value):
            raise TypeError(f"{name} must be an int, got {name}={value!r}")
        hp[name] = int(value)
    if hp["T_end"] <= 0:
        raise ValueError(f"T_end must be > 0, got T_end={hp['T_end']}")
    if hp["delta"] <= 0:
        raise ValueError(f"delta must be > 0, got delta={hp['delta']}")
    if not 1 <= hp["grad_accumulation_n"] < hp["delta"]:
        raise ValueError(f"grad_accumulation_n must be in [1, delta={hp['delta']}), "
                         f"got grad_accumulation_n={hp['grad_accumulation_n']}")
    a = hp["alpha"]
    if not _is_real(a):
        raise TypeError(f"alpha must be a float in [0, 1], got alpha={a!r}")
    if not (math.isfinite(a) and 0 <= a <= 1):
        raise ValueError(f"alpha must be in [0, 1], got alpha={a!r}")
    hp["alpha"] = float(a)
    dist = hp["sparsity_distribution"]
    if not isinstance(dist, str):
        raise TypeError(f"sparsity_distribution must be a str, got sparsity_distribution={dist!r}")
    if dist.lower() not in DISTRIBUTIONS:
        raise ValueError(f"sparsity_distribution must be one of {sorted(DISTRIBUTIONS)}, "
                         f"got sparsity_distribution={dist!r}")
    hp["sparsity_distribution"] = dist.lower()
    for name in ("static_topo", "ignore_linear_layers"):
        if not isinstance(hp[name], bool):
            raise TypeError(f"{name} must be a bool, got {name}={hp[name]!r}")
    return hp


_RENAME = {"t_end": "T_end", "sparsity": "dense_allocation (as 1 - sparsity)",
           "distribution": "sparsity_distribution"}


def _rename(message: str) -> str:
    for ours, theirs in _RENAME.items():
        message = message.replace(f"{ours}=", f"{theirs}=").replace(f"{ours} must", f"{theirs} must")
    return message


def make_config(hp: Mapping, layers: Mapping[str, nn.Module], *, frozen: frozenset = frozenset()) -> RigLConfig:
    """Map checked rigl-torch arguments onto a :class:`RigLConfig`.

    ``sparsity = 1 - dense_allocation``; the first layer is dense under ``'uniform'``
    when there is more than one layer (rigl-torch, and the RigL paper's uniform
    baseline); ``ignore_linear_layers`` makes every ``nn.Linear`` weight dense;
    ``dense_allocation == 1`` makes every layer dense (rigl-torch skips layers with
    sparsity 0).

    Args:
        hp: output of :func:`check_hyperparams`.
        layers: sparsifiable parameter name -> owning module, in model order.
        frozen: names of those whose weight has ``requires_grad=False`` (dense unless
            ``include`` names them).

    Returns:
        The config; its ``dense`` field lists the dense layers.
    """
    names = list(layers)
    dense = []
    for i, (name, module) in enumerate(layers.items()):
        if hp["dense_allocation"] == 1:
            dense.append(name)
        elif i == 0 and hp["sparsity_distribution"] == "uniform" and len(names) > 1:
            dense.append(name)
        elif hp["ignore_linear_layers"] and isinstance(module, nn.Linear):
            dense.append(name)
    dense = list(dict.fromkeys(dense + list(hp["dense"])))
    # With no sparse layer left the distribution is never evaluated; ER/ERK raise on an
    # empty layer set (core: erk({}) -> ValueError), uniform returns {}.
    n_sparse = sum(n not in dense and not any(re.search(p, n) for p in hp["exclude"])
                   and (n not in frozen or any(re.search(p, n) for p in hp["include"])) for n in names)
    distribution = hp["sparsity_distribution"] if n_sparse else "uniform"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cfg = RigLConfig(
                t_end=hp["T_end"], sparsity=1.0 - float(hp["dense_allocation"]), distribution=distribution,
                delta=hp["delta"], alpha=float(hp["alpha"]), grad_accumulation_n=hp["grad_accumulation_n"],
                dense=tuple(dense), method=GROW_METHODS[hp["grow"]],
                include=hp["include"], exclude=hp["exclude"], fused_splits=hp["fused_splits"],
            )
        except (TypeError, ValueError) as err:
            raise type(err)(_rename(str(err))) from err
    if not hp["static_topo"] and n_sparse:
        for w in caught:
            warnings.warn(_rename(str(w.message)), w.category, stacklevel=3)
    return cfg


def resolve_hyperparams(given: Mapping, saved: Mapping) -> dict:
    """Constructor with ``state_dict=``: saved hyperparameters fill in arguments left at
    rigl-torch's defaults (rigl-torch overwrites them all); an explicit, different
    value is an error.

    Raises:
        ValueError: listing every argument that contradicts the checkpoint.
    """
    out, clashes = {}, []
    saved = saved_hyperparams(saved)
    for name, default in HYPERPARAMS.items():
        if name not in saved:
            raise ValueError(f"state_dict['hyperparams'] lacks {name!r}; not a RigLScheduler checkpoint?")
        value = given[name]
        if name == "fused_splits" and isinstance(value, (dict, list, tuple)):
            value = _fused_pairs(value)
        if value is default or (type(value) is type(default) and value == default):
            out[name] = saved[name]
        else:
            if value != saved[name]:
                clashes.append(f"{name}={value!r} (checkpoint: {saved[name]!r})")
            out[name] = value
    if clashes:
        raise ValueError("arguments contradict the state_dict they resume from: " + ", ".join(clashes))
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers, so that
    parameter names match the unwrapped model's ``named_parameters()``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got model={type(model).__name__}")
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def needs_dense_grads(step: int, config: RigLConfig) -> bool:
    """Whether the iteration that :func:`rigl_func.accumulate` will count as ``step``
    feeds a topology update (always with SNFS, whose gradient EMA sees every
    iteration). Python ints: no device sync."""
    return config.ema_momentum > 0 or bool(in_accumulation_window(step, config))


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and initialized (gradients may be
    all-reduced after the post-accumulate-grad hooks have run)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class MaskGroup(NamedTuple):
    """The masks of the sparse weights of one (device, dtype), packed for batched passes.

    Built by :func:`pack_masks` whenever the masks change (init, load, update), never per
    step. ``flat`` is the only copy of the masks: the state's per-layer masks are views
    of it, so packing costs no persistent memory (1 byte per sparse weight in all).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    sizes: tuple[int, ...]
    flat: Tensor  # bool [sum(sizes)]: the masks of ``names``, concatenated in this order
    zero: Tensor  # shape=(), the weights' dtype and device: ``torch.where``'s fill value, made once


def _shared_flat(masks: list[Tensor]) -> Optional[Tensor]:
    """The 1-D buffer the masks already are consecutive views of (e.g. masks returned as
    ``split`` views of one flat buffer), else ``None``."""
    first = masks[0]
    ptr, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for m in masks:
        if not m.is_contiguous() or m.untyped_storage().data_ptr() != ptr or m.storage_offset() != offset:
            return None
        offset += m.numel()
    if offset > first.untyped_storage().nbytes():  # bool: 1 byte per element
        return None
    return first.as_strided((offset - first.storage_offset(),), (1,), first.storage_offset())


def pack_masks(masks: Mapping[str, Tensor], params: Mapping[str, Tensor]
               ) -> tuple[dict[str, Tensor], tuple[MaskGroup, ...]]:
    """Group the masks by their weights' (device, dtype) and pack each group into one flat
    bool buffer (reused as is when the masks already are consecutive views of one).

    Args:
        masks: name -> bool mask (the state's masks), in model order.
        params: name -> the live weights (their dtype and device pick the group).

    Returns:
        ``(views, groups)``: the same masks as views of the groups' flat buffers (store
        them in the state so that no second copy is kept), and the groups.
    """
    by_key: dict[tuple, list[str]] = {}
    for name in masks:
        p = params[name]
        by_key.setdefault((p.device, p.dtype), []).append(name)
    views, groups = {}, []
    for (device, dtype), names in by_key.items():
        ms = [masks[n] for n in names]
        flat = _shared_flat(ms)
        if flat is None:
            flat = torch.cat([m.reshape(-1) for m in ms])
        sizes = tuple(m.numel() for m in ms)
        shapes = tuple(m.shape for m in ms)
        for name, chunk, shape in zip(names, flat.split(sizes), shapes):
            views[name] = chunk.view(shape)
        groups.append(MaskGroup(tuple(names), shapes, sizes, flat, torch.zeros((), dtype=dtype, device=device)))
    return {n: views[n] for n in masks}, tuple(groups)


_chunk_cat = getattr(torch, "_chunk_cat", None)


def _flat_cat(tensors: list[Tensor]) -> Tensor:
    # One launch that flattens and concatenates (torch >= 2.4; FSDP2 packs with it);
    # otherwise a view per tensor and one cat.
    if _chunk_cat is not None:
        return _chunk_cat(tensors, 0, 1).view(-1)
    return torch.cat([t.reshape(-1) for t in tensors])


@torch.no_grad()
def zero_inactive_packed_(tensors: list[Tensor], group: MaskGroup) -> None:
    """In place: ``tensors`` (aligned with ``group.names``, the group's dtype) are exactly 0
    where the masks are False, NaN/inf there included.

    Three kernel launches whatever the number of layers: pack (``_chunk_cat``), one
    ``torch.where(flat_mask, flat, zero, out=flat)``, and one same-dtype
    ``torch._foreach_copy_`` back (the multi-tensor fast path on CUDA). One tensor:
    a single ``torch.where`` in place.
    """
    if len(tensors) == 1:
        t = tensors[0]
        torch.where(group.flat.view(t.shape), t, group.zero, out=t)
        return
    flat = _flat_cat(tensors)
    torch.where(group.flat, flat, group.zero, out=flat)
    torch._foreach_copy_(tensors, [c.view(s) for c, s in zip(flat.split(group.sizes), group.shapes)])


@torch.no_grad()
def mask_grads_(params: Mapping[str, Tensor], groups: tuple[MaskGroup, ...]) -> None:
    """In place: ``param.grad`` is exactly 0 at inactive entries (``None`` grads skipped)."""
    for group in groups:
        grads = [params[n].grad for n in group.names]
        if all(g is not None and g.dtype == group.zero.dtype for g in grads):
            zero_inactive_packed_(grads, group)
            continue
        for g, m in zip(grads, group.flat.split(group.sizes)):  # some grads are missing: rare
            if g is not None:
                g.masked_fill_(m.view(g.shape).logical_not(), 0)


@torch.no_grad()
def mask_weights_(params: Mapping[str, Tensor], groups: tuple[MaskGroup, ...]) -> None:
    """In place: inactive weights are exactly 0."""
    for group in groups:
        zero_inactive_packed_([params[n] for n in group.names], group)


def broadcast_masks(masks: Mapping[str, Tensor], src: int = 0) -> dict[str, Tensor]:
    """``src``'s masks on every rank when ``torch.distributed`` is initialized (else the
    input). Bool tensors travel as uint8 (gloo has no bool). Collective: every rank
    must call it. Returns new tensors; the input is not modified."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(masks)
    out = {}
    for name, mask in masks.items():
        buf = mask.to(torch.uint8)
        dist.broadcast(buf, src)
        out[name] = buf.bool()
    return out


def state_from_dict(sd: Mapping, params: Mapping[str, Tensor], config: RigLConfig,
                    step_device: torch.device, *, sparse: Optional[list] = None) -> tuple[RigLState, int, int]:
    """Rebuild ``(state, step, rigl_steps)`` from a checkpoint: masks and accumulators on
    their params' devices, counters on ``step_device`` (as :func:`rigl_func.init_state`).
    ``params``: the sparsifiable params (dense ones included), name -> tensor;
    ``sparse``: the names the sparsity rule makes sparse (default: ``config.is_sparse_name``).

    Raises:
        ValueError: the checkpoint's layers, shapes or counters do not fit.
    """
    masks, grad_acc = sd["masks"], sd.get("grad_acc", {})
    if not isinstance(masks, Mapping) or not isinstance(grad_acc, Mapping):
        raise ValueError("state_dict['masks'] and state_dict['grad_acc'] must be dicts name -> tensor")
    want = [n for n in params if (n in sparse if sparse is not None else config.is_sparse_name(n))]
    if sorted(masks) != sorted(want):
        raise ValueError(f"state_dict has masks for layers {sorted(masks)} but this model's sparse layers "
                         f"are {sorted(want)}: the checkpoint is from a different model or configuration")
    for name, mask in masks.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != params[name].shape:
            raise ValueError(f"state_dict['masks'][{name!r}] must be a bool tensor of shape "
                             f"{tuple(params[name].shape)}, got {getattr(mask, 'dtype', type(mask))} "
                             f"{tuple(getattr(mask, 'shape', ()))}: the checkpoint is from a different model")
    step, rigl_steps = sd["step"], sd["rigl_steps"]
    if not (_is_int(step) and _is_int(rigl_steps) and step >= 0 and rigl_steps >= 0):
        raise ValueError(f"state_dict step/rigl_steps must be ints >= 0, got step={step!r}, rigl_steps={rigl_steps!r}")
    if not all(n in params and isinstance(t, Tensor) for n, t in grad_acc.items()):
        raise ValueError(f"state_dict['grad_acc'] has entries {sorted(grad_acc)} that are not tensors of this model's layers")
    state = RigLState(
        masks={n: masks[n].to(params[n].device, copy=True) for n in want},
        step=torch.tensor(int(step), dtype=torch.int64, device=step_device),
        num_updates=torch.tensor(int(rigl_steps), dtype=torch.int64, device=step_device),
        grad_acc={n: t.to(params[n].device, params[n].dtype) for n, t in grad_acc.items()},
        ema={n: t.to(params[n].device, params[n].dtype) for n, t in sd.get("ema", {}).items()},
        key=torch.tensor(int(sd.get("key", 0)), dtype=torch.int64, device=step_device),
    )
    return state, int(step), int(rigl_steps)


def describe(names: list[str], weights: list[Tensor], masks: Mapping[str, Tensor], hp: Mapping, step: int,
             rigl_steps: int) -> str:
    """rigl-torch's ``str(scheduler)`` table: per-layer shape, nonzeros and density
    (syncs the device: printing only)."""
    rows, total, active, conv_total, conv_active = [], 0, 0, 0, 0
    width = max(len(n) for n in names)
    for name, w in zip(names, weights):
        nnz = int(masks[name].sum()) if name in masks else w.numel()
        kind = "sparse" if name in masks else "dense"
        rows.append(f"  {name:<{width}}  {str(tuple(w.shape)):<18} {nnz:>10}/{w.numel():<10} "
                    f"{100.0 * nnz / w.numel():6.2f}%  {kind}")
        total, active = total + w.numel(), active + nnz
        if w.dim() > 2:
            conv_total, conv_active = conv_total + w.numel(), conv_active + nnz
    hp = hp
    lines = [
        "RigLScheduler(",
        f"  layers={len(weights)} ({len(masks)} sparse), sparsity_distribution={hp['sparsity_distribution']!r}, "
        f"dense_allocation={hp['dense_allocation']}, static_topo={hp['static_topo']}, "
        f"ignore_linear_layers={hp['ignore_linear_layers']},",
        f"  T_end={hp['T_end']}, delta={hp['delta']}, alpha={hp['alpha']}, "
        f"grad_accumulation_n={hp['grad_accumulation_n']},",
        f"  {'layer':<{width}}  {'shape':<18} {'nonzero':>10}/{'total':<10} {'density':>7}",
        *rows,
        f"  total_nonzero_params={active}/{total} ({100.0 * active / total:.2f}%),",
    ]
    if conv_total:
        lines.append(f"  total_conv_nonzero_params={conv_active}/{conv_total} "
                     f"({100.0 * conv_active / conv_total:.2f}%),")
    lines += [f"  step={step}, rigl_steps={rigl_steps}", ")"]
    return "\n".join(lines)

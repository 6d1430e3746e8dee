"""Fused projections as separate layers: ``RigLConfig(fused_splits=...)``.

A fused attention projection stacks several layers in one tensor: ``nn.MultiheadAttention``'s
``in_proj_weight`` is ``[3d, d]`` (Q, K and V one above the other, PyTorch's layout), a
GPT-style ``c_attn`` ``nn.Linear(d, 3d)`` has the same ``[3d, d]`` weight. Treated as one
layer, ERK gives the three projections one density and an update may move connections from
Q to V. With ``fused_splits={r"in_proj_weight$": 3}`` every sparse parameter whose name
matches is, for the sparsity distribution (uniform, ER, ERK), the exact per-layer counts, the
initial masks, :func:`rigl_func.check_state` and every topology update, ``k`` layers of
``[d0 / k, *rest]`` (row blocks ``[i * d0/k, (i+1) * d0/k)``), while it stays one tensor,
one mask and one optimizer entry everywhere else. The update runs on row-block views (the
engine sees ``k`` layers named ``"<name>[i/k]"``) and concatenates the results, so each
block keeps its own exact count through every update (drop and grow per block); random
criteria draw per block (the block's name is its random stream).

All functions here are pure and work on logical shapes, so they compose with
``torch.func.vmap`` (the block split is along the parameter's dim 0) and ``torch.compile``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["fused_plan", "split_shapes", "split_tree", "merge_tree", "slice_name"]

_SLICE = re.compile(r"\[\d+/\d+\]$")


def slice_name(name: str, i: int, k: int) -> str:
    """The name of row block ``i`` of ``k`` of parameter ``name``: ``"name[i/k]"``.

    Example:
        >>> slice_name("attn.in_proj_weight", 1, 3)
        'attn.in_proj_weight[1/3]'
    """
    return f"{name}[{i}/{k}]"


def fused_plan(shapes: Mapping[str, Any], config: Any) -> dict[str, int]:
    """``name -> k`` for the layers of ``shapes`` that ``config.fused_splits`` splits
    (first matching pattern; block names ``"...[i/k]"`` are never split again).

    Raises:
        ValueError: a matched layer whose dim 0 is not divisible by ``k`` (names it).

    Example:
        >>> from rigl_func import RigLConfig
        >>> cfg = RigLConfig(t_end=10, delta=5, fused_splits={r"in_proj_weight$": 3})
        >>> fused_plan({"attn.in_proj_weight": (24, 8), "fc.weight": (8, 8)}, cfg)
        {'attn.in_proj_weight': 3}
    """
    rules = tuple(getattr(config, "fused_splits", ()) or ())
    if not rules:
        return {}
    plan = {}
    for name, shape in shapes.items():
        if _SLICE.search(name):
            continue
        for pattern, k in rules:
            if re.search(pattern, name):
                shape = tuple(shape)
                if len(shape) < 1 or shape[0] % k:
                    raise ValueError(f"fused_splits: {name!r} has shape {shape}, whose dim 0 is not divisible by "
                                     f"k={k} (pattern {pattern!r}); fused_splits={dict(rules)!r}")
                if k > 1:
                    plan[name] = k
                break
    return plan


def split_shapes(shapes: Mapping[str, Any], config: Any) -> dict[str, tuple[int, ...]]:
    """``shapes`` with every fused layer replaced by its ``k`` row blocks, in place order.

    Example:
        >>> from rigl_func import RigLConfig
        >>> cfg = RigLConfig(t_end=10, delta=5, fused_splits={"qkv": 3})
        >>> split_shapes({"qkv": (6, 2), "o": (2, 2)}, cfg)
        {'qkv[0/3]': (2, 2), 'qkv[1/3]': (2, 2), 'qkv[2/3]': (2, 2), 'o': (2, 2)}
    """
    plan = fused_plan(shapes, config)
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        k = plan.get(name, 1)
        if k == 1:
            out[name] = shape
            continue
        for i in range(k):
            out[slice_name(name, i, k)] = (shape[0] // k, *shape[1:])
    return out


def split_tree(tree: Mapping[str, Any], plan: Mapping[str, int]) -> dict[str, Any]:
    """``tree`` with each tensor of a planned layer replaced by its ``k`` row-block views
    (``tensor.chunk(k, 0)``: no copy). Entries not in ``plan`` pass through. Pure.

    Example:
        >>> parts = split_tree({"qkv": torch.arange(6).reshape(6, 1)}, {"qkv": 3})
        >>> {k: v.flatten().tolist() for k, v in parts.items()}
        {'qkv[0/3]': [0, 1], 'qkv[1/3]': [2, 3], 'qkv[2/3]': [4, 5]}
    """
    out: dict[str, Any] = {}
    for name, value in tree.items():
        k = plan.get(name, 1)
        if k == 1 or not isinstance(value, Tensor):
            out[name] = value
            continue
        for i, part in enumerate(value.chunk(k, 0)):
            out[slice_name(name, i, k)] = part
    return out


def merge_tree(tree: Mapping[str, Any], plan: Mapping[str, int]) -> dict[str, Any]:
    """The inverse of :func:`split_tree`: row blocks concatenated back (one new tensor per
    planned layer, ``torch.cat`` along dim 0). Pure.

    Example:
        >>> t = torch.arange(6).reshape(6, 1)
        >>> torch.equal(merge_tree(split_tree({"qkv": t}, {"qkv": 3}), {"qkv": 3})["qkv"], t)
        True
    """
    out: dict[str, Any] = {}
    done = set()
    for name, value in tree.items():
        base = name[: name.rindex("[")] if _SLICE.search(name) else None
        if base is None or base not in plan:
            out[name] = value
            continue
        if base in done:
            continue
        k = plan[base]
        out[base] = torch.cat([tree[slice_name(base, i, k)] for i in range(k)], 0)
        done.add(base)
    return out


def run_split(update, params, grads, state, config, aux, **kwargs):
    """``update(params, grads, state, config, aux, **kwargs)`` with the fused layers of
    ``state.masks`` split into row-block layers, and its results merged back: each block
    keeps its exact count (the update's invariant, per layer). Returns ``update``'s
    ``(params, state)`` keyed like the inputs. ``update`` is called directly when nothing
    is fused."""
    plan = fused_plan({n: tuple(m.shape) for n, m in state.masks.items()}, config)
    if not plan:
        return update(params, grads, state, config, aux, **kwargs)
    split = lambda tree: split_tree(tree, plan) if isinstance(tree, Mapping) else tree  # noqa: E731
    inner = state._replace(masks=split(state.masks), grad_acc=split(state.grad_acc), ema=split(state.ema))
    aux = None if aux is None else {k: split(v) for k, v in aux.items()}
    new_params, new_state = update(split(params), split(grads), inner, config, aux, **kwargs)
    params_out = merge_tree(new_params, plan)
    masks = merge_tree(new_state.masks, plan)
    zeros = {n: torch.zeros_like(t) for n, t in state.grad_acc.items()}
    return ({n: params_out[n] for n in params},
            new_state._replace(masks={n: masks[n] for n in state.masks}, grad_acc=zeros, ema=state.ema))

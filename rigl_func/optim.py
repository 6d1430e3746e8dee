"""Optimizer-state hygiene for sparse training.

RigL (Evci et al. 2020, Sec. 3) starts genuinely new connections from zero *with a
fresh optimizer state*: their SGD momentum and Adam moments must be zero, and so must
the state at inactive positions, or a later regrowth would inherit stale momentum.
Positions kept across an update (including dropped-and-regrown ones) keep their state.

* :func:`reset_optimizer_state` is pure and works on any pytree of moments keyed by
  parameter name (functional optimizers, ``torch.func`` loops).
* :func:`reset_torch_optimizer_state_` / :func:`mask_torch_optimizer_state_` edit a
  ``torch.optim`` optimizer in place (trailing underscore, PyTorch's convention).

Every function masks all layers and moments in one batched pass (pack, one masked
fill, one multi-tensor copy back): the number of kernel launches does not grow with
the number of layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rigl_func.masks import map_masked_leaves_batched, masked_where

__all__ = ["reset_optimizer_state", "reset_torch_optimizer_state_", "mask_torch_optimizer_state_",
           "preserves_zeros", "zero_inactive_list_"]


def _keep(old: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``old & new`` per key, in one ``&`` per device (views of one new buffer)."""
    if set(old) != set(new):
        raise ValueError(f"old_masks and new_masks must have the same keys, got {sorted(old)} and {sorted(new)}")
    by_device: dict[torch.device, list[str]] = {}
    for k, m in new.items():
        by_device.setdefault(m.device, []).append(k)
    keep = {}
    for names in by_device.values():
        if len(names) == 1:
            keep[names[0]] = old[names[0]] & new[names[0]]
            continue
        flat = torch.cat([old[k].reshape(-1) for k in names]) & torch.cat([new[k].reshape(-1) for k in names])
        for k, chunk in zip(names, flat.split([new[k].numel() for k in names])):
            keep[k] = chunk.view(new[k].shape)
    return {k: keep[k] for k in new}


def reset_optimizer_state(opt_state: Any, old_masks: Mapping[str, Tensor], new_masks: Mapping[str, Tensor]) -> Any:
    """Zero optimizer moments except where a connection was active before *and* after.

    All moments of the tree are reset together (:func:`rigl_func.masks.masked_where`):
    a constant number of kernel launches per (dtype, device), however many layers and
    moments.

    Args:
        opt_state: pytree (dicts/lists/tuples/NamedTuples) whose leaves keyed by a
            sparse parameter's name are moments shaped like that parameter, e.g.
            ``{"momentum": {"fc.weight": t}}``. Other leaves pass through.
        old_masks: masks before the update. new_masks: masks after it.

    Returns:
        New pytree; new connections and inactive positions hold 0. Pure.

    Example:
        >>> old = {"w": torch.tensor([True, True, False])}
        >>> new = {"w": torch.tensor([True, False, True])}
        >>> reset_optimizer_state({"mom": {"w": torch.ones(3)}}, old, new)["mom"]["w"]
        tensor([1., 0., 0.])
    """
    return map_masked_leaves_batched(opt_state, _keep(old_masks, new_masks), masked_where)


@torch.no_grad()
def zero_inactive_list_(tensors: list[Tensor], masks: list[Tensor]) -> None:
    """In place: ``tensors[i]`` is exactly 0 where ``masks[i]`` is False (NaN/inf too).

    :func:`rigl_func.masks.masked_where` (one pack and one masked fill per dtype and
    device) and one ``torch._foreach_copy_`` back: the number of kernel launches does
    not grow with the number of tensors.
    """
    torch._foreach_copy_(tensors, masked_where(tensors, masks))


def _edit_torch_state_(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    tensors, keeps = [], []
    for name, keep in masks.items():
        state = optimizer.state.get(params[name])
        if not state:
            continue
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == keep.shape:
                tensors.append(value)
                keeps.append(keep)
    if tensors:
        zero_inactive_list_(tensors, keeps)


@torch.no_grad()
def reset_torch_optimizer_state_(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, Tensor],
    old_masks: Mapping[str, Tensor],
    new_masks: Mapping[str, Tensor],
) -> None:
    """In place: zero every per-parameter state tensor of ``optimizer`` (SGD
    ``momentum_buffer``, Adam/AdamW ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, ...)
    at new connections and inactive positions.

    Args:
        optimizer: a ``torch.optim`` optimizer.
        params: name -> the parameter objects the optimizer holds.
        old_masks, new_masks: masks before and after the topology update.
    """
    _edit_torch_state_(optimizer, params, _keep(old_masks, new_masks))


@torch.no_grad()
def mask_torch_optimizer_state_(
    optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], masks: Mapping[str, Tensor]
) -> None:
    """In place: zero ``optimizer``'s per-parameter state at inactive positions."""
    _edit_torch_state_(optimizer, params, masks)


def preserves_zeros(optimizer: torch.optim.Optimizer) -> bool:
    """Whether one ``optimizer.step()`` keeps an entry exactly 0 -- its weight *and* its
    per-parameter state -- when its gradient, weight and state are exactly 0 before.

    True for ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay,
    ``maximize``), and ``Adam`` / ``AdamW`` with ``eps > 0`` in every param group
    (moments stay 0 and the update is ``lr * 0 / (0 + eps) = 0``; decoupled decay
    scales 0). Exact classes only: a subclass may change the rule. The stateful
    shell uses it to skip re-masking the optimizer state after such steps.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> preserves_zeros(torch.optim.Adam([w])), preserves_zeros(torch.optim.Adam([w], eps=0.0))
        (True, False)
    """
    kind = type(optimizer)
    if kind is torch.optim.SGD:
        return True
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        return all(float(group.get("eps", 0.0)) > 0.0 for group in optimizer.param_groups)
    return False

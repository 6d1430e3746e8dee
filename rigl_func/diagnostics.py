"""Diagnostics of sparse training: plain dicts of floats, ready for any logger.

Pure functions of masks (``dict[str, bool Tensor]``) and :class:`rigl_func.RigLState`:

* :func:`density`: active fraction per sparse layer, over all sparse layers
  (``"total"``) and, given the params, over the whole model (``"total_all"``).
* :func:`turnover`: fraction of the active connections an update replaced.
* :func:`update_ever_active` and :func:`itop_rate`: the *in-time
  over-parameterization* rate of Liu et al. 2021 ("Do We Actually Need Dense
  Over-Parameterization? In-Time Over-Parameterization in Sparse Training", Sec. 3),
  ``R = sum_l |ever_l|_0 / sum_l N_l``: the fraction of the sparse layers' weights
  that have been active at some point since the start of training.
* :func:`summary`: step, number of updates, densities (and turnover, ITOP rate,
  drop fraction when their inputs are given) as one flat ``dict[str, float]`` with
  ``"group/name"`` keys.

Every function except :func:`update_ever_active` returns Python floats, so it reads
tensor values back to the host (a device sync): call it when logging, not inside a
compiled step. :func:`update_ever_active` is pure tensor code (a logical or) and runs
under ``vmap`` and ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rigl_func.config import RigLConfig
    from rigl_func.state import RigLState

__all__ = ["density", "turnover", "update_ever_active", "itop_rate", "summary"]

Masks = Mapping[str, Tensor]


def _check_same_keys(a: Masks, b: Masks, a_name: str, b_name: str) -> None:
    if set(a) != set(b):
        raise ValueError(f"{a_name} and {b_name} must have the same keys, got {sorted(a)} and {sorted(b)}")
    for name in a:
        if a[name].shape != b[name].shape:
            raise ValueError(f"{a_name}[{name!r}] has shape {tuple(a[name].shape)} but "
                             f"{b_name}[{name!r}] has {tuple(b[name].shape)}")


def _count(mask: Tensor) -> int:
    return int(torch.count_nonzero(mask))


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def density(masks: Masks, params: Optional[Mapping[str, Tensor]] = None) -> dict[str, float]:
    """Fraction of active entries per sparse layer and in total.

    Args:
        masks: ``dict[str, bool Tensor]`` of the sparse layers (any nonzero counts as active).
        params: optional ``dict[str, Tensor]`` of *all* parameters; adds ``"total_all"``,
            the density over every parameter, with the ones absent from ``masks``
            (dense layers, biases, norms) counted as fully dense.

    Returns:
        ``{name: nnz / numel for each mask, "total": sum(nnz) / sum(numel)}`` over the
        sparse layers (``0.0`` when there are none), plus ``"total_all"`` with
        ``params``. Pure: inputs are not modified.

    Raises:
        ValueError: a mask's shape differs from its parameter's.

    Example:
        >>> m = {"a": torch.tensor([True, False, False, False]), "b": torch.ones(2, 2, dtype=torch.bool)}
        >>> density(m)
        {'a': 0.25, 'b': 1.0, 'total': 0.625}
        >>> density(m, {"a": torch.zeros(4), "b": torch.zeros(2, 2), "bias": torch.zeros(2)})["total_all"]
        0.7
    """
    result: dict[str, float] = {}
    active = numel = 0
    for name, mask in masks.items():
        n, k = _count(mask), mask.numel()
        result[name] = _ratio(n, k)
        active, numel = active + n, numel + k
    result["total"] = _ratio(active, numel)
    if params is not None:
        for name, mask in masks.items():
            if name not in params:
                raise ValueError(f"params is missing the sparse layer {name!r}")
            if tuple(params[name].shape) != tuple(mask.shape):
                raise ValueError(f"masks[{name!r}] has shape {tuple(mask.shape)} but params[{name!r}] "
                                 f"has {tuple(params[name].shape)}")
        dense = sum(p.numel() for name, p in params.items() if name not in masks)
        result["total_all"] = _ratio(active + dense, numel + dense)
    return result


def turnover(old_masks: Masks, new_masks: Masks) -> dict[str, float]:
    """Fraction of the active connections that an update replaced.

    Per layer ``|new & ~old| / |old|``: connections grown at positions that were
    inactive, over the active count before the update. A connection dropped and
    regrown in the same update is not counted. For nnz-preserving updates (RigL, SET,
    SNFS) this equals the fraction dropped; after pruning (masks only shrink) it is 0,
    follow :func:`density` instead.

    Args:
        old_masks: bool masks before the update.
        new_masks: bool masks after it, same keys and shapes.

    Returns:
        ``{name: fraction, ..., "total": sum(grown) / sum(|old|)}`` (``0.0`` for
        layers with no active entries). Pure.

    Raises:
        ValueError: keys or shapes differ.

    Example:
        >>> old = {"w": torch.tensor([True, True, True, True, False, False, False, False])}
        >>> new = {"w": torch.tensor([True, True, True, False, True, False, False, False])}
        >>> turnover(old, new)
        {'w': 0.25, 'total': 0.25}
    """
    _check_same_keys(old_masks, new_masks, "old_masks", "new_masks")
    result: dict[str, float] = {}
    grown_total = old_total = 0
    for name, old in old_masks.items():
        old, new = old.bool(), new_masks[name].bool()
        grown, n_old = _count(new & ~old), _count(old)
        result[name] = _ratio(grown, n_old)
        grown_total, old_total = grown_total + grown, old_total + n_old
    result["total"] = _ratio(grown_total, old_total)
    return result


def update_ever_active(ever: Optional[Masks], masks: Masks) -> dict[str, Tensor]:
    """Record which weights have ever been active: ``ever | masks`` per layer.

    Call it after every topology update (and once with the initial masks); the
    result feeds :func:`itop_rate`. Pure tensor code: works under ``vmap`` and
    ``torch.compile`` and on any device.

    Args:
        ever: ``dict[str, bool Tensor]`` from the previous call, or ``None`` to start
            from ``masks``.
        masks: current bool masks, same keys and shapes.

    Returns:
        A new ``dict[str, bool Tensor]``. Pure: inputs are not modified.

    Raises:
        ValueError: keys or shapes differ.

    Example:
        >>> ever = update_ever_active(None, {"w": torch.tensor([True, False, False])})
        >>> ever = update_ever_active(ever, {"w": torch.tensor([False, True, False])})
        >>> ever["w"].tolist()
        [True, True, False]
    """
    if ever is None:
        return {name: mask.bool().clone() for name, mask in masks.items()}
    _check_same_keys(ever, masks, "ever", "masks")
    return {name: ever[name].bool() | mask.bool() for name, mask in masks.items()}


def itop_rate(ever: Masks, masks: Optional[Masks] = None) -> dict[str, float]:
    """In-time over-parameterization rate (Liu et al. 2021): fraction ever active.

    ``R_l = |ever_l|_0 / N_l`` per sparse layer and ``R = sum_l |ever_l|_0 / sum_l N_l``
    in total, where ``ever = ever | masks`` (the current masks are included, so
    passing ``state.masks`` right after an update needs no extra
    :func:`update_ever_active` call). ``R`` starts at the density and grows as the
    topology explores; static sparse training keeps ``R`` equal to the density.

    Args:
        ever: output of :func:`update_ever_active`.
        masks: optional current masks, same keys and shapes.

    Returns:
        ``{name: R_l, ..., "total": R}``. Pure.

    Example:
        >>> ever = {"w": torch.tensor([True, True, False, False])}
        >>> itop_rate(ever, {"w": torch.tensor([False, False, True, False])})
        {'w': 0.75, 'total': 0.75}
    """
    if masks is not None:
        ever = update_ever_active(ever, masks)
    return density(ever)


def summary(
    state: RigLState,
    ever: Optional[Masks] = None,
    *,
    old_masks: Optional[Masks] = None,
    config: Optional[RigLConfig] = None,
    params: Optional[Mapping[str, Tensor]] = None,
) -> dict[str, float]:
    """One flat dict of floats describing the sparse state, for a logger.

    Keys: ``"step"``, ``"num_updates"``, ``"density/<layer>"`` and
    ``"density/total"`` (:func:`density`); with ``params`` also
    ``"density/total_all"``; with ``ever`` the ``"itop/<layer>"`` and ``"itop/total"``
    (:func:`itop_rate`, current masks included); with ``old_masks`` the
    ``"turnover/<layer>"`` and ``"turnover/total"`` of the update from ``old_masks`` to
    ``state.masks`` (:func:`turnover`); with ``config`` the ``"drop_fraction"`` f(step)
    of the schedule.

    Args:
        state: a :class:`rigl_func.RigLState`.
        ever: optional ever-active masks (:func:`update_ever_active`).
        old_masks: optional masks before the last update.
        config: optional :class:`rigl_func.RigLConfig`.
        params: optional all parameters (see :func:`density`).

    Returns:
        ``dict[str, float]``. Pure; reads the state's values back to the host.

    Example:
        >>> from rigl_func import RigLConfig, init_state
        >>> cfg = RigLConfig(t_end=100, delta=10, sparsity=0.75, distribution="uniform")
        >>> state = init_state({"w": torch.zeros(4, 4)}, cfg, seed=0)
        >>> summary(state, config=cfg)
        {'step': 0.0, 'num_updates': 0.0, 'density/w': 0.25, 'density/total': 0.25, 'drop_fraction': 0.3}
    """
    result = {"step": float(state.step), "num_updates": float(state.num_updates)}
    result.update({f"density/{k}": v for k, v in density(state.masks, params).items()})
    if ever is not None:
        result.update({f"itop/{k}": v for k, v in itop_rate(ever, state.masks).items()})
    if old_masks is not None:
        result.update({f"turnover/{k}": v for k, v in turnover(old_masks, state.masks).items()})
    if config is not None:
        from rigl_func.schedules import drop_fraction

        result["drop_fraction"] = float(drop_fraction(int(state.step), config))
    return result

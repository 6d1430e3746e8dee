"""Gradual magnitude pruning (Zhu & Gupta 2017), with exact per-layer counts.

"To prune, or not to prune" (Zhu & Gupta 2017, Sec. 3, Eq. 1) starts from a dense
network and raises the sparsity from ``s_i`` to ``s_f`` between steps ``t0`` and
``t1`` on a cubic schedule

    s_t = s_f + (s_i - s_f) * (1 - p) ** 3,    p = clip((t - t0) / (t1 - t0), 0, 1),

re-pruning every ``frequency`` steps: each sparse layer keeps the active entries
with the largest ``|w|``. It is the "Pruning" baseline of the RigL paper
(Evci et al. 2020, Sec. 4). Here

* the pruning steps are ``P = {t0, t0 + frequency, ...} ∩ [t0, t1]``, plus ``t1``
  itself, so the final sparsity is always reached (:func:`pruning_steps`);
* the per-layer sparsity at step ``t`` is the config's distribution applied to
  ``s_t`` (``uniform``: ``s_t`` everywhere; ``erk``: ``erk(shapes, s_t)``), turned
  into an exact count by :func:`rigl_func.nnz_for` — no histogram or threshold
  approximation;
* :func:`prune` at step ``t`` brings every layer to the count of the latest pruning
  step ``<= t`` (no-op before ``t0``; between pruning steps it is a no-op on masks
  pruned at the previous pruning step), by dropping the active entries with the
  smallest ``|w|`` (:func:`rigl_func.drop`: NaN weights first, ties by lower flat
  index). Pruning never regrows: the new mask is a subset of the old one.

Everything works with a Python ``int`` step or a 0-d integer tensor step (no host
sync, a static ``topk`` size), so :func:`prune` runs under ``torch.compile``
(``fullgraph=True``, one graph for every step) and ``torch.func.vmap``.

Step convention: ``step`` is the index of the training iteration about to run; call
``prune`` before its forward pass, so the masks of pruning step ``t`` are in force
during iteration ``t`` (the accounting of :func:`mean_density_over_training`).

Cost: the static ``topk`` size of a layer is ``numel - final count`` (about a sort
of the layer), which keeps the counts exact whatever mask comes in. Pruning steps
are rare, so guard the call with :func:`is_pruning_step`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import Tensor, nn

from rigl_func.config import _is_int
from rigl_func.distributions import get_distribution, nnz_for
from rigl_func.masks import sparse_param_names, validate_masks
from rigl_func.pruning_config import PruningConfig
from rigl_func.selection import drop

__all__ = [
    "PruningConfig",
    "pruning_sparsity",
    "pruning_steps",
    "is_pruning_step",
    "pruning_layer_sparsities",
    "pruning_target_nnz",
    "init_pruning_masks",
    "prune",
    "mean_density_over_training",
    "mean_layer_densities_over_training",
]

Step = Union[int, Tensor]



def _check_config(cfg: Any) -> None:
    if not isinstance(cfg, PruningConfig):
        raise TypeError(f"cfg must be a PruningConfig, got cfg={cfg!r}")


def _check_step(step: Any) -> None:
    if isinstance(step, Tensor):
        if step.dim() != 0 or step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
            raise TypeError(f"step must be an int or a 0-d integer tensor, got step={step!r}")
    elif not _is_int(step):
        raise TypeError(f"step must be an int or a 0-d integer tensor, got step={step!r}")


def pruning_sparsity(step: Step, cfg: PruningConfig):
    """Overall target sparsity ``s_t = s_f + (s_i - s_f) * (1 - p) ** 3`` at ``step``.

    ``p = clip((t - t0) / (t1 - t0), 0, 1)``: ``s_i`` up to ``t0``, ``s_f`` from ``t1``.

    Args:
        step: int or 0-d integer tensor.
        cfg: the pruning config.

    Returns:
        float, or a 0-d float64 tensor if ``step`` is a tensor (no host sync).

    Example:
        >>> cfg = PruningConfig(final_sparsity=0.8, t0=100, t1=300)
        >>> [round(pruning_sparsity(t, cfg), 6) for t in (0, 100, 200, 300, 400)]
        [0.0, 0.0, 0.7, 0.8, 0.8]
    """
    _check_config(cfg)
    _check_step(step)
    span = float(cfg.t1 - cfg.t0)
    s_i, s_f = float(cfg.initial_sparsity), float(cfg.final_sparsity)
    if isinstance(step, Tensor):
        p = ((step.to(torch.float64) - cfg.t0) / span).clamp(0.0, 1.0)
        q = 1.0 - p
        return s_f + (s_i - s_f) * (q * q * q)
    p = min(max((step - cfg.t0) / span, 0.0), 1.0)
    q = 1.0 - p
    return s_f + (s_i - s_f) * (q * q * q)


def pruning_steps(cfg: PruningConfig) -> tuple[int, ...]:
    """All pruning steps: ``t0, t0 + frequency, ... <= t1``, then ``t1``.

    Example:
        >>> pruning_steps(PruningConfig(final_sparsity=0.5, t0=10, t1=35, frequency=10))
        (10, 20, 30, 35)
    """
    _check_config(cfg)
    return _pruning_steps(cfg)


@functools.lru_cache(maxsize=64)
def _pruning_steps(cfg: PruningConfig) -> tuple[int, ...]:
    grid = tuple(range(cfg.t0, cfg.t1 + 1, cfg.frequency))
    return grid if grid[-1] == cfg.t1 else grid + (cfg.t1,)


def is_pruning_step(step: Step, cfg: PruningConfig):
    """Whether ``step`` is a pruning step: ``t0 <= step <= t1`` and
    ``(step - t0) % frequency == 0``, or ``step == t1``.

    Args:
        step: int or 0-d integer tensor.
        cfg: the pruning config.

    Returns:
        bool, or a 0-d bool tensor if ``step`` is a tensor.

    Example:
        >>> cfg = PruningConfig(final_sparsity=0.5, t0=10, t1=35, frequency=10)
        >>> [t for t in range(50) if is_pruning_step(t, cfg)]
        [10, 20, 30, 35]
    """
    _check_config(cfg)
    _check_step(step)
    on_grid = ((step - cfg.t0) % cfg.frequency == 0) & (step >= cfg.t0) & (step <= cfg.t1)
    return on_grid | (step == cfg.t1)


def _shapes(shapes: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    if not isinstance(shapes, Mapping):
        raise TypeError(f"shapes must be a mapping name -> shape, got shapes={type(shapes).__name__}")
    return {k: tuple(int(d) for d in s) for k, s in shapes.items()}


def _layer_sparsities(shapes: dict[str, tuple[int, ...]], sparsity: float, cfg: PruningConfig) -> dict[str, float]:
    fn = get_distribution(cfg.distribution)
    if cfg.distribution == "erk":
        return fn(shapes, sparsity, power_scale=cfg.erk_power_scale)
    return fn(shapes, sparsity)


def pruning_layer_sparsities(shapes: Mapping[str, Any], step: int, cfg: PruningConfig) -> dict[str, float]:
    """Per-layer sparsity at ``step``: ``cfg.distribution`` applied to ``s_t``.

    Args:
        shapes: name -> shape of the pruned layers.
        step: a Python int.
        cfg: the pruning config.

    Returns:
        ``{name: sparsity}`` in the order of ``shapes``.

    Example:
        >>> cfg = PruningConfig(final_sparsity=0.5, t0=0, t1=10, distribution="erk")
        >>> {k: round(v, 4) for k, v in pruning_layer_sparsities({"a": (10, 10), "b": (100, 100)}, 10, cfg).items()}
        {'a': 0.0, 'b': 0.505}
    """
    _check_config(cfg)
    if not _is_int(step):
        raise TypeError(f"step must be a Python int, got step={step!r}")
    return _layer_sparsities(_shapes(shapes), float(pruning_sparsity(step, cfg)), cfg)


@functools.lru_cache(maxsize=256)
def _counts_at(shapes: tuple, step: int, cfg: PruningConfig) -> tuple[int, ...]:
    """Exact active counts per layer (in the order of ``shapes``) after pruning at ``step``."""
    shapes = dict(shapes)
    sparsities = _layer_sparsities(shapes, float(pruning_sparsity(step, cfg)), cfg)
    return tuple(nnz_for(math.prod(shapes[k]), sparsities[k]) for k in shapes)


def _last_pruning_index(step: int, cfg: PruningConfig) -> int:
    """Number of pruning steps ``<= step`` (0 before ``t0``)."""
    if step < cfg.t0:
        return 0
    grid = min((step - cfg.t0) // cfg.frequency, (cfg.t1 - cfg.t0) // cfg.frequency) + 1
    extra = int(step >= cfg.t1 and (cfg.t1 - cfg.t0) % cfg.frequency != 0)
    return grid + extra


def _last_pruning_index_tensor(step: Tensor, cfg: PruningConfig) -> Tensor:
    """Tensor version of :func:`_last_pruning_index` (no host sync)."""
    step = step.to(torch.int64)
    n_grid = (cfg.t1 - cfg.t0) // cfg.frequency + 1
    grid = (torch.div(step - cfg.t0, cfg.frequency, rounding_mode="floor") + 1).clamp(0, n_grid)
    if (cfg.t1 - cfg.t0) % cfg.frequency != 0:
        grid = grid + (step >= cfg.t1).to(torch.int64)
    return grid


@torch.compiler.assume_constant_result
def _count_table(shapes: tuple, cfg: PruningConfig) -> tuple[tuple[int, ...], ...]:
    """Row ``j``: the counts after the ``j``-th pruning step (row 0: dense). Plain
    Python on shapes and the config, evaluated once at trace time under compile."""
    return _count_table_cached(shapes, cfg)


@functools.lru_cache(maxsize=16)
def _count_table_cached(shapes: tuple, cfg: PruningConfig) -> tuple[tuple[int, ...], ...]:
    dense = tuple(math.prod(s) for _, s in shapes)
    return (dense,) + tuple(_counts_at(shapes, t, cfg) for t in pruning_steps(cfg))


def pruning_target_nnz(shapes: Mapping[str, Any], step: Step, cfg: PruningConfig) -> dict[str, Any]:
    """Active entries per layer after the latest pruning step ``<= step``.

    At a pruning step ``t`` this is ``nnz_for(numel, s_l(t))`` with ``s_l(t)`` from
    :func:`pruning_layer_sparsities`; between pruning steps it is the count of the
    previous one; before ``t0`` it is ``numel`` (dense).

    Args:
        shapes: name -> shape of the pruned layers.
        step: int, or 0-d integer tensor (then the counts of every pruning step are
            tabulated once per (shapes, cfg) and indexed on the device; no host sync).
        cfg: the pruning config.

    Returns:
        ``{name: int}``, or ``{name: 0-d int64 tensor}`` if ``step`` is a tensor.

    Example:
        >>> cfg = PruningConfig(final_sparsity=0.5, t0=10, t1=30, frequency=10)
        >>> [pruning_target_nnz({"w": (4, 4)}, t, cfg)["w"] for t in (0, 10, 19, 20, 30, 99)]
        [16, 16, 16, 9, 8, 8]
    """
    _check_config(cfg)
    _check_step(step)
    shapes = tuple(_shapes(shapes).items())
    if isinstance(step, Tensor):
        table = torch.tensor(_count_table(shapes, cfg), dtype=torch.int64, device=step.device)
        row = table.index_select(0, _last_pruning_index_tensor(step, cfg).reshape(1)).reshape(-1)
        return {name: row[i] for i, (name, _) in enumerate(shapes)}
    counts = _counts_in_force(shapes, step, cfg)
    return {name: counts[i] for i, (name, _) in enumerate(shapes)}


@torch.compiler.assume_constant_result
def _counts_in_force(shapes: tuple, step: int, cfg: PruningConfig) -> tuple[int, ...]:
    """Counts after the latest pruning step ``<= step`` (int step; dense before ``t0``)."""
    index = _last_pruning_index(step, cfg)
    if index == 0:
        return tuple(math.prod(s) for _, s in shapes)
    return _counts_at(shapes, pruning_steps(cfg)[index - 1], cfg)


@torch.compiler.assume_constant_result
def _max_prune(shapes: tuple, cfg: PruningConfig) -> tuple[int, ...]:
    """Static ``topk`` size per layer: ``numel - smallest count of any pruning step``
    (the final one), the most one call can prune from any mask, so the counts are
    exact even if pruning steps were skipped or a call starts from dense."""
    table = _count_table_cached(shapes, cfg)
    return tuple(math.prod(s) - min(row[i] for row in table) for i, (_, s) in enumerate(shapes))


def init_pruning_masks(model_or_params: Union[nn.Module, Mapping[str, Tensor]], cfg: PruningConfig) -> dict[str, Tensor]:
    """All-True (dense) masks for the layers ``cfg`` prunes: pruning starts dense.

    Args:
        model_or_params: an ``nn.Module`` (``Linear``/``Conv`` weights) or a
            ``dict[str, Tensor]`` (every tensor with >= 2 dims), filtered by
            ``cfg.include`` / ``cfg.exclude`` / ``cfg.dense``.
        cfg: the pruning config.

    Returns:
        ``dict[str, bool Tensor]`` shaped and placed like the params.

    Example:
        >>> masks = init_pruning_masks({"w": torch.zeros(2, 3), "b": torch.zeros(3)}, PruningConfig(0.5, 0, 10))
        >>> {k: (tuple(m.shape), bool(m.all())) for k, m in masks.items()}
        {'w': ((2, 3), True)}
    """
    _check_config(cfg)
    params = dict(model_or_params.named_parameters()) if isinstance(model_or_params, nn.Module) else model_or_params
    names = sparse_param_names(model_or_params, cfg)
    return {n: torch.ones(params[n].shape, dtype=torch.bool, device=params[n].device) for n in names}


def prune(
    params: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    step: Step,
    cfg: PruningConfig,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Magnitude-prune every masked layer to its count at ``step``.

    For each layer, ``n = max(0, mask.sum() - target)`` with ``target`` from
    :func:`pruning_target_nnz` (the latest pruning step ``<= step``), and the ``n``
    active entries with the smallest ``|w|`` are dropped (:func:`rigl_func.drop`:
    NaN weights first, then ascending ``|w|``, ties by lower flat index). Call it at
    pruning steps (:func:`is_pruning_step`); elsewhere it changes nothing on masks
    pruned at the previous pruning step (but still costs a ``topk``).

    Args:
        params: ``dict[str, Tensor]`` of all params; keys absent from ``masks``
            pass through unchanged.
        masks: ``dict[str, bool Tensor]``, current masks (start from
            :func:`init_pruning_masks`).
        step: int or 0-d integer tensor (a tensor gives one compiled graph for
            every step).
        cfg: the pruning config.

    Returns:
        ``(params, masks)``: new masks ⊆ old masks with exactly
        ``min(old nnz, target)`` active entries per layer (never regrows), and params
        with every inactive entry exactly ``0``. Pure: inputs are not modified.

    Raises:
        TypeError/ValueError: masks that do not fit params, a bad step or config.

    Example:
        >>> cfg = PruningConfig(final_sparsity=0.5, t0=0, t1=10, frequency=5)
        >>> params = {"w": torch.tensor([[0.5, -0.25], [-2.0, 0.375]]), "b": torch.ones(2)}
        >>> masks = init_pruning_masks(params, cfg)
        >>> params, masks = prune(params, masks, 10, cfg)  # target: 2 of 4
        >>> masks["w"].tolist(), params["w"].tolist(), params["b"].tolist()
        ([[True, False], [True, False]], [[0.5, 0.0], [-2.0, 0.0]], [1.0, 1.0])
    """
    _check_config(cfg)
    _check_step(step)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict[str, Tensor], got params={type(params).__name__}")
    validate_masks(masks, params)
    shapes = tuple((k, tuple(m.shape)) for k, m in masks.items())
    targets = pruning_target_nnz(dict(shapes), step, cfg)
    max_n = dict(zip(masks, _max_prune(shapes, cfg)))
    new_params = dict(params)
    new_masks = {}
    for name, mask in masks.items():
        param = params[name]
        n = (mask.sum() - torch.as_tensor(targets[name], device=mask.device)).clamp(min=0)
        new_masks[name] = drop(param.abs(), mask, n, max_n=max_n[name])
        new_params[name] = torch.where(new_masks[name], param, torch.zeros((), dtype=param.dtype, device=param.device))
    return new_params, new_masks


def _density_segments(cfg: PruningConfig, total_steps: int):
    """Yield ``(start, end, count_row)``: the counts in force on steps [start, end)."""
    starts = [0] + [t for t in pruning_steps(cfg) if t < total_steps]
    for j, start in enumerate(starts):
        end = starts[j + 1] if j + 1 < len(starts) else total_steps
        if end > start:
            yield start, end, j


def mean_density_over_training(cfg: PruningConfig, total_steps: int) -> float:
    """Mean over training steps ``t = 0 .. total_steps - 1`` of the density ``1 - s``
    in force at ``t`` (``s`` of the latest pruning step ``<= t``; dense before ``t0``).

    The RigL paper's pruning cost is the mean over training of ``3 f_D (1 - s_t)``:
    ``3 * f_D * mean_density_over_training(cfg, T)``. Exact for ``uniform``; for ERK,
    where per-layer densities differ, weight the layers with
    :func:`mean_layer_densities_over_training`. Pure Python, ``O(len(pruning_steps))``.

    Args:
        cfg: the pruning config.
        total_steps: number of training steps, an int > 0.

    Returns:
        float in (0, 1].

    Example:
        >>> cfg = PruningConfig(final_sparsity=0.5, t0=2, t1=4, frequency=1)
        >>> mean_density_over_training(cfg, 8)  # densities 1, 1, 1, .5625, .5, .5, .5, .5
        0.6953125
    """
    _check_config(cfg)
    if not _is_int(total_steps) or total_steps <= 0:
        raise ValueError(f"total_steps must be an int > 0, got total_steps={total_steps!r}")
    steps = (0,) + pruning_steps(cfg)
    total = 0.0
    for start, end, j in _density_segments(cfg, total_steps):
        density = 1.0 if j == 0 else 1.0 - float(pruning_sparsity(steps[j], cfg))
        total += density * (end - start)
    return total / total_steps


def mean_layer_densities_over_training(shapes: Mapping[str, Any], cfg: PruningConfig, total_steps: int) -> dict[str, float]:
    """Per-layer mean over training of the exact density ``nnz / numel`` in force.

    With dense forward FLOPs ``f_l`` per pruned layer, the RigL paper's pruning
    training cost is ``3 * (f_other + sum_l f_l * density_l)`` per step, averaged.

    Args:
        shapes: name -> shape of the pruned layers.
        cfg: the pruning config.
        total_steps: number of training steps, an int > 0.

    Returns:
        ``{name: mean density}``.

    Example:
        >>> cfg = PruningConfig(final_sparsity=0.5, t0=2, t1=4, frequency=1)
        >>> mean_layer_densities_over_training({"w": (4, 4)}, cfg, 8)  # 1, 1, 1, 9/16, 8/16 x 4
        {'w': 0.6953125}
    """
    _check_config(cfg)
    if not _is_int(total_steps) or total_steps <= 0:
        raise ValueError(f"total_steps must be an int > 0, got total_steps={total_steps!r}")
    shapes = tuple(_shapes(shapes).items())
    table = _count_table_cached(shapes, cfg)
    total = [0.0] * len(shapes)
    for start, end, j in _density_segments(cfg, total_steps):
        for i, (_, s) in enumerate(shapes):
            total[i] += table[j][i] / math.prod(s) * (end - start)
    return {name: total[i] / total_steps for i, (name, _) in enumerate(shapes)}

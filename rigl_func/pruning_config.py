"""Hyperparameters of gradual magnitude pruning (:mod:`rigl_func.pruning`).

Example:
    >>> PruningConfig(final_sparsity=0.9, t0=1000, t1=8000, frequency=500).final_sparsity
    0.9
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rigl_func.config import _check_layer_rules, _is_int, _is_real, _is_sparse_name
from rigl_func.distributions import get_distribution

__all__ = ["PruningConfig"]


@dataclass(frozen=True)
class PruningConfig:
    """Frozen gradual-magnitude-pruning hyperparameters (validated, hashable).

    Args:
        final_sparsity: ``s_f``, the sparsity reached at ``t1``, in [0, 1).
        t0: first pruning step, an int >= 0.
        t1: last pruning step, an int > ``t0``; the sparsity is ``s_f`` from here on.
        frequency: steps between pruning steps, an int > 0 (``t1`` is a pruning
            step as well, even if ``t1 - t0`` is not a multiple of it).
        initial_sparsity: ``s_i``, the sparsity set at ``t0``, in [0, ``final_sparsity``].
        distribution: per-layer sparsity of ``s_t``: ``"uniform"`` (default, the
            paper's), ``"erdos_renyi"`` (``"er"``) or ``"erk"``.
        erk_power_scale: exponent of the ERK raw score (1.0 = RigL paper).
        include: regular expressions; when non-empty only matching parameter names
            (``re.search``) are pruned.
        exclude: regular expressions; matching parameters stay dense.
        dense: exact parameter names that stay dense.

    Raises:
        TypeError/ValueError: a field has a wrong type or value; the message names it.

    Example:
        >>> cfg = PruningConfig(final_sparsity=0.9, t0=1000, t1=8000, frequency=500)
        >>> cfg.initial_sparsity, cfg.distribution, hash(cfg) == hash(PruningConfig(0.9, 1000, 8000, 500))
        (0.0, 'uniform', True)
    """

    final_sparsity: float
    t0: int
    t1: int
    frequency: int = 100
    initial_sparsity: float = 0.0
    distribution: str = "uniform"
    erk_power_scale: float = 1.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("t0", "t1", "frequency"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"{name} must be an int, got {name}={value!r}")
        for name in ("final_sparsity", "initial_sparsity", "erk_power_scale"):
            value = getattr(self, name)
            if not _is_real(value):
                raise TypeError(f"{name} must be a real number, got {name}={value!r}")
        if not (math.isfinite(self.final_sparsity) and 0.0 <= self.final_sparsity < 1.0):
            raise ValueError(f"final_sparsity must be in [0, 1), got final_sparsity={self.final_sparsity!r}")
        if not (math.isfinite(self.initial_sparsity) and 0.0 <= self.initial_sparsity <= self.final_sparsity):
            raise ValueError(f"initial_sparsity must be in [0, final_sparsity={self.final_sparsity!r}], "
                             f"got initial_sparsity={self.initial_sparsity!r}")
        if self.t0 < 0:
            raise ValueError(f"t0 must be >= 0, got t0={self.t0}")
        if self.t1 <= self.t0:
            raise ValueError(f"t1 must be > t0={self.t0}, got t1={self.t1}")
        if self.frequency <= 0:
            raise ValueError(f"frequency must be > 0, got frequency={self.frequency}")
        if not (math.isfinite(self.erk_power_scale) and self.erk_power_scale >= 0):
            raise ValueError(f"erk_power_scale must be finite and >= 0, got erk_power_scale={self.erk_power_scale!r}")
        if not isinstance(self.distribution, str):
            raise TypeError(f"distribution must be a str, got distribution={self.distribution!r}")
        get_distribution(self.distribution)
        _check_layer_rules(self)

    def is_sparse_name(self, name: str) -> bool:
        """Whether include/exclude/dense let ``name`` be pruned (as :class:`rigl_func.RigLConfig`).

        Example:
            >>> PruningConfig(0.5, 0, 10, dense=("fc.weight",)).is_sparse_name("fc.weight")
            False
        """
        return _is_sparse_name(self, name)

"""Static hyperparameters of RigL: a frozen, hashable, validated config.

Everything that does not change during training lives here (sparsity, distribution,
``delta``, ``t_end``, ``alpha``, schedule, criteria, accumulation window, which layers
are sparse). Being hashable, a config can be a static argument of ``torch.compile``.
Everything that changes lives in :class:`rigl_func.RigLState`.

``method`` picks a row of the RigL paper's comparison (``"rigl"``, ``"set"``,
``"snfs"``, ``"static"``) by filling in the criteria and EMA momentum left unset.
``structure`` picks the mask pattern: ``"unstructured"`` (the paper), ``"n:m"`` or
``"block"`` (see :mod:`rigl_func.structured`).

Names follow the RigL paper (Evci et al. 2020, Sec. 3): ``delta`` is ΔT, the number
of steps between topology updates, ``t_end`` is T_end, the step after which the
topology is frozen, ``alpha`` is the initial drop fraction α.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Union

__all__ = ["RigLConfig", "Criterion", "METHODS"]

Criterion = Callable[..., "object"]
CriterionSpec = Union[str, Callable]

_SCHEDULES = ("cosine", "constant", "linear", "inverse_power")
_GROW_INITS = ("zeros", "normal", "gradient")
#: method -> (drop criterion, grow criterion, EMA momentum) used when those fields are left unset.
METHODS = {
    "rigl": ("magnitude", "gradient", 0.0),   # Evci et al. 2020
    "set": ("magnitude", "random", 0.0),      # Mocanu et al. 2018
    "snfs": ("magnitude", "ema", 0.9),        # Dettmers & Zettlemoyer 2019 (RigL's simplification)
    "static": ("magnitude", "gradient", 0.0), # masks never change
}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_layer_rules(config) -> None:
    """Validate the ``include``/``exclude``/``dense`` fields shared by the configs."""
    for name in ("include", "exclude", "dense"):
        value = getattr(config, name)
        if isinstance(value, str) or not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{name} must be a tuple of str, got {name}={value!r}")
    for name in ("include", "exclude"):
        for pattern in getattr(config, name):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{name} has an invalid regex {pattern!r}: {err}") from None


def _is_sparse_name(config, name: str) -> bool:
    """The include/exclude/dense rule shared by the configs (see ``RigLConfig.is_sparse_name``)."""
    if name in config.dense:
        return False
    if any(re.search(p, name) for p in config.exclude):
        return False
    return not config.include or any(re.search(p, name) for p in config.include)


#: id -> live config, for constant functions under torch.compile (see config_by_id).
_LIVE_CONFIGS: "weakref.WeakValueDictionary[int, RigLConfig]" = weakref.WeakValueDictionary()


def config_by_id(key: int) -> "RigLConfig":
    """The live :class:`RigLConfig` whose ``id()`` is ``key``.

    ``torch.compile`` can pass ``id(config)`` (a Python int, guarded on the object's
    identity) to a ``torch.compiler.assume_constant_result`` function, where the config
    itself cannot be passed on every torch release (torch 2.11: "can't reconstruct
    arbitrary frozen dataclass instances") and its int fields may have become symbolic.
    """
    return _LIVE_CONFIGS[key]


@dataclass(frozen=True)
class RigLConfig:
    """Frozen RigL hyperparameters (validated on construction, hashable).

    Args:
        t_end: T_end, the first step at which no topology update happens any more
            (paper: 75% of training). Must be > 0.
        sparsity: overall fraction of zeros over the sparse layers, in [0, 1).
        distribution: per-layer sparsity distribution, ``"uniform"``,
            ``"erdos_renyi"`` (``"er"``) or ``"erk"``.
        delta: ΔT, steps between topology updates, > 0.
        alpha: initial drop fraction α in [0, 1].
        schedule: drop-fraction schedule ``"cosine"`` (paper default),
            ``"constant"``, ``"linear"`` or ``"inverse_power"``
            (``alpha * (1 - p) ** schedule_power``); see :mod:`rigl_func.schedules`.
        t_start: first step at which updates may happen (default 0).
        method: ``"rigl"`` (default), ``"set"`` (random growth), ``"snfs"`` (growth by
            the EMA of dense gradients) or ``"static"`` (no updates).
        drop_criterion: name in :data:`rigl_func.criteria.CRITERIA` or a function
            ``(param, grad, mask[, extras]) -> scores``; the lowest-scoring active
            entries are dropped. ``None``: the method's (``"magnitude"``, |w|).
            Needs a criterion declared with :func:`rigl_func.criterion` are checked
            here (``"ema"``: ``ema_momentum > 0``) and its aux trees recorded, so that
            :func:`rigl_func.update_topology` requires them in ``aux`` up front.
        grow_criterion: same form; the highest-scoring inactive entries are grown.
            ``None``: the method's (RigL ``"gradient"``, SET ``"random"``, SNFS ``"ema"``).
        grow_init: value of genuinely new connections: ``"zeros"`` (paper),
            ``"normal"`` (N(0, std of the layer's active weights) * grow_init_scale),
            ``"gradient"`` (``-grow_init_scale * grad``, one SGD step from zero).
        grow_init_scale: scale for ``grow_init`` ``"normal"`` / ``"gradient"``.
        ema_momentum: β of the gradient EMA ``m = β m + (1 - β) g`` kept in the state
            (SNFS); ``None``: the method's (0.9 for SNFS, else 0 = no EMA).
        schedule_power: exponent k of the ``"inverse_power"`` schedule.
        grad_accumulation_n: number of most recent steps whose dense gradients are
            averaged for the grow score, in [1, delta) (rigl-torch's extension).
        include: regular expressions (``re.search``); they *add* floating-point
            parameters with >= 2 dims to the rule's sparse set (e.g.
            ``r"in_proj_weight$"``, an embedding): see
            :func:`rigl_func.sparse_param_names` and the table in ``docs/sharp_bits.md``.
            A pattern that matches no parameter name is an error.
        exclude: regular expressions; matching parameters stay dense.
        dense: exact parameter names kept dense (left out of the sparsity budget).
        erk_power_scale: exponent of the ERK raw score (1.0 = paper).
        structure: mask pattern of every sparse layer (:mod:`rigl_func.structured`):
            ``"unstructured"`` (default, the paper), ``"n:m"`` or ``"block"``.
        n_m: ``(N, M)`` with ``1 <= N <= M``, used when ``structure="n:m"``: exactly
            ``N`` active entries in every group of ``M`` consecutive entries along
            dim 1 of the weight (Linear ``[out, in]``: the inputs; Conv
            ``[out, in, *k]``: the input channels at each ``(out, *k)`` position).
            The sparsity of every sparse layer is then ``1 - N/M``; ``sparsity`` and
            ``distribution`` are ignored. Dim 1 must be divisible by ``M``.
        block: ``(rows, cols)`` block shape over the ``(out, in)`` dims, used when
            ``structure="block"``; Conv kernels have their own blocks at each kernel
            position. The distribution's per-layer sparsity is rounded to whole
            blocks. Dims 0 and 1 must be divisible by ``rows`` and ``cols``.

        update_chunk: the batched engine (:mod:`rigl_func.batched_update`) processes its
            padded rows in chunks of at most this many entries (a single layer may
            exceed it), so an update's temporaries stay a fraction of the model; the
            result does not depend on it. ``0`` (default): automatic (no chunking up
            to 2**25 weights, then one sixteenth of the sparse weights per chunk).
        fused_splits: fused projections as separate layers, ``{regex: k}`` (or a tuple
            of ``(regex, k)`` pairs; stored as the tuple): a sparse parameter whose name
            matches (``re.search``, first pattern wins) counts as ``k`` layers of row
            blocks ``[d0 / k, *rest]`` for the distribution, the exact counts, the
            initial masks and every update (each block keeps its own count), while it
            stays one tensor. E.g. ``{r"in_proj_weight$": 3, r"c_attn\\.weight$": 3}``
            for Q/K/V (:mod:`rigl_func.fused`).

    Raises:
        ValueError: a field has an invalid value; the message names it.
        TypeError: a field has the wrong type; the message names it.

    Example:
        >>> cfg = RigLConfig(t_end=750, sparsity=0.9, delta=100)
        >>> cfg.alpha, cfg.schedule, cfg.distribution
        (0.3, 'cosine', 'erk')
        >>> hash(cfg) == hash(RigLConfig(t_end=750, sparsity=0.9, delta=100))
        True
    """

    t_end: int
    sparsity: float = 0.9
    distribution: str = "erk"
    delta: int = 100
    alpha: float = 0.3
    schedule: str = "cosine"
    t_start: int = 0
    method: str = "rigl"
    drop_criterion: Optional[CriterionSpec] = None
    grow_criterion: Optional[CriterionSpec] = None
    grow_init: str = "zeros"
    grow_init_scale: float = 1.0
    ema_momentum: Optional[float] = None
    schedule_power: float = 3.0
    grad_accumulation_n: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()
    erk_power_scale: float = 1.0
    structure: str = "unstructured"
    n_m: tuple[int, int] = (2, 4)
    block: tuple[int, int] = (4, 4)
    update_chunk: int = 0
    fused_splits: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        _LIVE_CONFIGS[id(self)] = self  # see config_by_id
        self._validate()

    def __setstate__(self, state: dict) -> None:  # pickle / copy.deepcopy: no __post_init__
        self.__dict__.update(state)
        _LIVE_CONFIGS[id(self)] = self

    def _validate(self) -> None:
        from rigl_func.criteria import BUILTIN_EXTRAS, criterion_needs, resolve_criterion
        from rigl_func.distributions import get_distribution
        from rigl_func.structured import STRUCTURES

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got method={self.method!r}")
        drop_default, grow_default, ema_default = METHODS[self.method]
        if self.drop_criterion is None:
            object.__setattr__(self, "drop_criterion", drop_default)
        if self.grow_criterion is None:
            object.__setattr__(self, "grow_criterion", grow_default)
        if self.ema_momentum is None:
            object.__setattr__(self, "ema_momentum", ema_default)
        for name in ("t_end", "delta", "t_start", "grad_accumulation_n", "update_chunk"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"{name} must be an int, got {name}={value!r}")
        for name in ("sparsity", "alpha", "erk_power_scale", "grow_init_scale", "ema_momentum", "schedule_power"):
            value = getattr(self, name)
            if not _is_real(value):
                raise TypeError(f"{name} must be a real number, got {name}={value!r}")
        if self.t_end <= 0:
            raise ValueError(f"t_end must be > 0, got t_end={self.t_end}")
        if self.update_chunk < 0:
            raise ValueError(f"update_chunk must be >= 0 (0 = automatic), got update_chunk={self.update_chunk}")
        if self.delta <= 0:
            raise ValueError(f"delta must be > 0, got delta={self.delta}")
        if not 0 <= self.t_start < self.t_end:
            raise ValueError(
                f"t_start must be in [0, t_end={self.t_end}), got t_start={self.t_start}"
            )
        if not (math.isfinite(self.sparsity) and 0.0 <= self.sparsity < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got sparsity={self.sparsity!r}")
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got alpha={self.alpha!r}")
        if not (math.isfinite(self.erk_power_scale) and self.erk_power_scale >= 0):
            raise ValueError(
                f"erk_power_scale must be finite and >= 0, got erk_power_scale={self.erk_power_scale!r}"
            )
        if not (math.isfinite(self.ema_momentum) and 0.0 <= self.ema_momentum < 1.0):
            raise ValueError(f"ema_momentum must be in [0, 1), got ema_momentum={self.ema_momentum!r}")
        if not (math.isfinite(self.grow_init_scale) and self.grow_init_scale >= 0):
            raise ValueError(f"grow_init_scale must be finite and >= 0, got grow_init_scale={self.grow_init_scale!r}")
        if not (math.isfinite(self.schedule_power) and self.schedule_power > 0):
            raise ValueError(f"schedule_power must be finite and > 0, got schedule_power={self.schedule_power!r}")
        if self.grow_criterion == "ema" and self.ema_momentum == 0.0:
            raise ValueError("grow_criterion='ema' needs ema_momentum in (0, 1), got ema_momentum=0.0")
        if self.grad_accumulation_n == 1 and self.delta == 1:  # the default n: blame delta
            raise ValueError(
                f"delta must be >= 2 (grad_accumulation_n={self.grad_accumulation_n} must be < delta), "
                f"got delta={self.delta}"
            )
        if not 1 <= self.grad_accumulation_n < self.delta:
            raise ValueError(
                f"grad_accumulation_n must be in [1, delta={self.delta}), "
                f"got grad_accumulation_n={self.grad_accumulation_n}"
            )
        if not isinstance(self.distribution, str):
            raise TypeError(f"distribution must be a str, got distribution={self.distribution!r}")
        get_distribution(self.distribution)
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got schedule={self.schedule!r}")
        if self.grow_init not in _GROW_INITS:
            raise ValueError(f"grow_init must be one of {_GROW_INITS}, got grow_init={self.grow_init!r}")
        aux_needs = []  # (field, criterion name, aux trees it declared), checked by update_topology
        for field in ("drop_criterion", "grow_criterion"):
            fn = resolve_criterion(getattr(self, field), field)
            needs = criterion_needs(fn)
            name = getattr(fn, "__name__", repr(fn))
            if "ema" in needs and self.ema_momentum == 0.0:
                raise ValueError(f"{field}={name!r} needs extras['ema'], which needs ema_momentum in (0, 1), "
                                 f"got ema_momentum={self.ema_momentum!r}")
            trees = tuple(n for n in needs if n not in BUILTIN_EXTRAS)
            if trees:
                aux_needs.append((field, name, trees))
        object.__setattr__(self, "_aux_needs", tuple(aux_needs))  # not a field: eq/hash unchanged
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got structure={self.structure!r}")
        for name in ("n_m", "block"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 2 and all(_is_int(v) for v in value)):
                raise TypeError(f"{name} must be a tuple of two ints, got {name}={value!r}")
        if not 1 <= self.n_m[0] <= self.n_m[1]:
            raise ValueError(f"n_m=(N, M) must satisfy 1 <= N <= M, got n_m={self.n_m!r}")
        if not (self.block[0] >= 1 and self.block[1] >= 1):
            raise ValueError(f"block=(rows, cols) must be positive, got block={self.block!r}")
        _check_layer_rules(self)
        self._check_fused_splits()
        if self.delta >= self.t_end and self.method != "static":
            warnings.warn(
                f"delta={self.delta} >= t_end={self.t_end}: no topology update will ever "
                "happen (the masks stay static)",
                stacklevel=4,
            )

    def _check_fused_splits(self) -> None:
        value = self.fused_splits
        pairs = tuple(value.items()) if isinstance(value, dict) else value
        if not isinstance(pairs, tuple) or not all(
                isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and _is_int(p[1]) for p in pairs):
            raise TypeError(f"fused_splits must be a dict {{regex: k}} or a tuple of (regex, k) pairs, "
                            f"got fused_splits={value!r}")
        for pattern, k in pairs:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"fused_splits has an invalid regex {pattern!r}: {err}") from None
            if k < 1:
                raise ValueError(f"fused_splits[{pattern!r}] must be an int >= 1, got {k!r}")
        object.__setattr__(self, "fused_splits", tuple((p, int(k)) for p, k in pairs))

    def is_sparse_name(self, name: str) -> bool:
        """Whether ``exclude``/``dense`` leave ``name`` sparse (if the sparsity rule,
        :func:`rigl_func.sparse_param_names`, or ``include`` makes it a candidate).

        Args:
            name: a parameter name as in ``named_parameters()``.

        Returns:
            ``False`` if ``name`` is in ``dense`` or matches an ``exclude`` pattern.
            (``include`` adds names, it does not filter: see :meth:`is_included`.)

        Example:
            >>> RigLConfig(t_end=10, delta=5, exclude=("^fc",)).is_sparse_name("fc.weight")
            False
        """
        return name not in self.dense and not any(re.search(p, name) for p in self.exclude)

    def is_included(self, name: str) -> bool:
        """Whether an ``include`` pattern names ``name`` (adding it to the sparse set).

        Example:
            >>> RigLConfig(t_end=10, delta=5, include=("in_proj",)).is_included("attn.in_proj_weight")
            True
        """
        return any(re.search(p, name) for p in self.include)

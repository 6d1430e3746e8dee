"""Per-layer sparsity distributions: uniform, Erdős–Rényi (ER) and ER-Kernel (ERK).

RigL (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners", Sec. 3,
"Sparsity distribution") fixes an overall sparsity S and spreads it over the layers
in one of three ways:

- **uniform**: every sparse layer has sparsity S.
- **Erdős–Rényi** (Mocanu et al. 2018, SET): the density of a layer with
  ``n_in`` inputs and ``n_out`` outputs scales with ``(n_in + n_out) / (n_in * n_out)``.
- **Erdős–Rényi-Kernel**: the same with the kernel dimensions included, density
  ``∝ (sum(shape) / prod(shape)) ** power_scale``.

For ER and ERK the densities are ``eps * raw_l`` with one ``eps`` chosen so that the
sparse layers keep the budget of the uniform case counted as the original code counts
it, ``n_l - floor(S * n_l)`` ones per layer:
``sum_l eps * raw_l * n_l = sum_l (n_l - floor(S * n_l))``. A layer whose density
would exceed 1 is made dense, its ``floor(S * n_l)`` zeros are taken off the budget of
the others, and ``eps`` is solved again (``get_sparsities_erdos_renyi`` in
google-research/rigl ``sparse_utils.py``). A layer at sparsity ``s`` then gets
``n - floor(s * n)`` active entries (:func:`nnz_for`, as the original's
``get_mask_random_numpy``). The floats are computed in the original's order, so the
sparsities and counts match it on any shapes, not only in the large-layer limit.

Every function here is pure Python, works on shapes only (PyTorch layout: ``Linear``
``[out, in]``, ``Conv`` ``[out, in, *kernel]``) and returns a sparsity (fraction of
zeros) per parameter name, in the order of ``shapes``.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import Callable

__all__ = [
    "uniform",
    "erdos_renyi",
    "erk",
    "nnz_for",
    "DISTRIBUTIONS",
    "get_distribution",
]

Shapes = Mapping[str, Sequence[int]]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_shapes(shapes) -> dict[str, tuple[int, ...]]:
    if not isinstance(shapes, Mapping):
        raise TypeError(f"shapes must be a mapping name -> shape, got {shapes=}")
    checked = {}
    for name, shape in shapes.items():
        if not isinstance(shape, Sequence) or isinstance(shape, str):
            raise TypeError(
                f"shapes[{name!r}] must be a sequence of ints, got {shape!r}")
        if len(shape) == 0:
            raise ValueError(
                f"shapes[{name!r}] must have at least one dim, got {shape!r}")
        if not all(_is_int(d) for d in shape):
            raise TypeError(f"shapes[{name!r}] must contain ints, got {shape!r}")
        if not all(d > 0 for d in shape):
            raise ValueError(
                f"shapes[{name!r}] must have positive dims, got {shape!r}")
        checked[name] = tuple(int(d) for d in shape)
    return checked


def _check_dense(dense, shapes: Mapping[str, tuple[int, ...]]) -> frozenset[str]:
    if isinstance(dense, str) or not isinstance(dense, Collection):
        raise TypeError(f"dense must be a collection of names, got {dense=}")
    unknown = [name for name in dense if name not in shapes]
    if unknown:
        raise ValueError(
            f"dense names must be keys of shapes, got {dense=} (unknown: {unknown})")
    return frozenset(dense)


def _validate(shapes, sparsity, dense):
    if not _is_real(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity=}")
    shapes = _check_shapes(shapes)
    return shapes, float(sparsity), _check_dense(dense, shapes)


def _solve(
    shapes: dict[str, tuple[int, ...]],
    sparsity: float,
    dense: frozenset[str],
    raw: dict[str, float],
) -> dict[str, float]:
    """Scales densities ``eps * raw[name]`` to the uniform budget (ER and ERK)."""
    sparse = [name for name in shapes if name not in dense]
    if sparsity == 0.0 or not sparse:  # nothing to distribute: every layer dense
        return {name: 0.0 for name in shapes}
    numel = {name: math.prod(shapes[name]) for name in sparse}
    # Budget in whole weights, as the original charges it: a layer at the uniform
    # sparsity keeps n - floor(S * n) ones (its get_n_zeros), not (1 - S) * n.
    zeros = {name: math.floor(sparsity * n) for name, n in numel.items()}
    densified: set[str] = set()
    while True:
        divisor, rhs = 0.0, 0  # rhs is an exact int count of ones
        for name in sparse:
            if name in densified:
                rhs -= zeros[name]
            else:
                rhs += numel[name] - zeros[name]
                divisor += raw[name] * numel[name]
        if divisor == 0.0:
            raise ValueError("raw scores of the remaining layers underflow to 0 (is "
                             f"power_scale too large?), cannot solve {sparsity=}")
        eps = rhs / divisor
        max_raw = max(raw[name] for name in sparse if name not in densified)
        if max_raw * eps <= 1.0:
            break
        tied = {n for n in sparse if n not in densified and raw[n] == max_raw}
        if len(densified) + len(tied) == len(sparse):
            # Exact arithmetic gives max_raw * eps <= 1 for the last group whenever
            # sparsity >= 0; only rounding gets here (e.g. sparsity 0, all raw equal).
            break
        densified |= tied
    return {name: 0.0 if name in dense or name in densified
            else max(0.0, 1.0 - eps * raw[name]) for name in shapes}


def uniform(
    shapes: Shapes, sparsity: float, dense: Collection[str] = ()
) -> dict[str, float]:
    """Gives every layer the same sparsity.

    Args:
        shapes: parameter name -> shape, e.g. ``dict(model.named_parameters())``
            mapped to ``.shape``. Every dim must be a positive int.
        sparsity: fraction of zeros in each non-dense layer, in [0, 1).
        dense: names of ``shapes`` kept dense (sparsity 0.0).

    Returns:
        ``{name: sparsity}`` for every name in ``shapes``, in the same order.

    Raises:
        ValueError: ``sparsity`` outside [0, 1), a non-positive dim, or a ``dense``
            name that is not in ``shapes``.
        TypeError: ``shapes`` is not a mapping of int sequences.

    Example:
        >>> uniform({"fc1.weight": (300, 784), "fc2.weight": (10, 300)}, 0.9,
        ...         dense=["fc2.weight"])
        {'fc1.weight': 0.9, 'fc2.weight': 0.0}
    """
    shapes, sparsity, dense = _validate(shapes, sparsity, dense)
    return {name: 0.0 if name in dense else sparsity for name in shapes}


def erdos_renyi(
    shapes: Shapes, sparsity: float, dense: Collection[str] = ()
) -> dict[str, float]:
    """Erdős–Rényi (Mocanu et al. 2018): density ``∝ (n_in + n_out) / (n_in * n_out)``.

    ``n_out = shape[0]``, ``n_in = shape[1]``; kernel dims of a conv are ignored
    (use :func:`erk` to include them). A 1-D shape ``(n,)`` is treated as
    ``n_out = n``, ``n_in = 1``. Densities ``eps * raw_l`` are scaled so that the
    non-dense layers keep ``sum_l (n_l - floor(sparsity * n_l))`` weights, the
    original's count (module docstring); a layer whose density would exceed 1 is
    made dense and ``eps`` is solved again.

    Args:
        shapes: parameter name -> shape (``Linear [out, in]``, ``Conv [out, in, *k]``).
        sparsity: overall fraction of zeros over the non-dense layers, in [0, 1).
        dense: names of ``shapes`` kept dense (sparsity 0.0) and left out of the
            budget.

    Returns:
        ``{name: sparsity}`` for every name in ``shapes``, in the same order.

    Raises:
        ValueError: bad ``sparsity``, ``shapes`` or ``dense`` (see :func:`uniform`),
            or every layer is in ``dense``.
        TypeError: ``shapes`` is not a mapping of int sequences.

    Example:
        >>> s = erdos_renyi({"a": (10, 10), "b": (100, 10)}, 0.5)
        >>> {k: round(v, 4) for k, v in s.items()}
        {'a': 0.1538, 'b': 0.5346}
    """
    shapes, sparsity, dense = _validate(shapes, sparsity, dense)
    raw = {}
    for name, shape in shapes.items():
        n_out, n_in = shape[0], (shape[1] if len(shape) > 1 else 1)
        raw[name] = (n_in + n_out) / (n_in * n_out)
    return _solve(shapes, sparsity, dense, raw)


def erk(
    shapes: Shapes,
    sparsity: float,
    dense: Collection[str] = (),
    power_scale: float = 1.0,
) -> dict[str, float]:
    """Erdős–Rényi-Kernel: density ``∝ (sum(shape) / prod(shape)) ** power_scale``.

    The RigL default (Sec. 3). Solved like :func:`erdos_renyi`: the non-dense layers
    keep ``sum_l (n_l - floor(sparsity * n_l))`` weights; layers whose density would
    exceed 1 are made dense (all layers tied at the largest score at once) and ``eps`` is
    solved again. ``power_scale=0`` gives :func:`uniform`.

    Args:
        shapes: parameter name -> shape (``Linear [out, in]``, ``Conv [out, in, *k]``).
        sparsity: overall fraction of zeros over the non-dense layers, in [0, 1).
        dense: names of ``shapes`` kept dense (sparsity 0.0) and left out of the
            budget.
        power_scale: exponent of the score, finite and >= 0 (1.0 in the paper).
            Very large values leave layers with tiny scores at sparsity ~1.0.

    Returns:
        ``{name: sparsity}`` for every name in ``shapes``, in the same order.

    Raises:
        ValueError: bad ``sparsity``, ``shapes``, ``dense`` or ``power_scale``,
            every layer is in ``dense``, or the scores left after densifying all
            underflow to 0 (``power_scale`` too large).
        TypeError: ``shapes`` is not a mapping of int sequences.

    Example:
        >>> s = erk({"a": (10, 10), "b": (100, 100)}, 0.5)  # "a" is made dense
        >>> {k: round(v, 4) for k, v in s.items()}
        {'a': 0.0, 'b': 0.505}
    """
    shapes, sparsity, dense = _validate(shapes, sparsity, dense)
    if not _is_real(power_scale) or not math.isfinite(power_scale) or power_scale < 0:
        raise ValueError(f"power_scale must be finite and >= 0, got {power_scale=}")
    ratio = {name: sum(s) / math.prod(s) for name, s in shapes.items()}
    return _solve(shapes, sparsity, dense, _powers(ratio, dense, power_scale))


def _powers(ratio: dict[str, float], dense: frozenset[str], power_scale: float):
    """``ratio ** power_scale``, rescaled only where the plain powers over/underflow.

    The plain powers are the original's floats (so counts match it bit for bit).
    Dividing by the largest ratio first changes no result in exact arithmetic (eps
    absorbs the constant) and keeps the powers <= 1, so a large ``power_scale``
    neither overflows nor rounds the top layer's score to 0.
    """
    sparse = [r for n, r in ratio.items() if n not in dense]
    try:
        raw = {name: r ** power_scale for name, r in ratio.items()}
        if all(raw[n] >= sys.float_info.min for n in ratio if n not in dense):
            return raw
    except OverflowError:
        pass
    top = max(sparse, default=1.0)
    return {name: (r / top) ** power_scale for name, r in ratio.items()}


def nnz_for(numel: int, sparsity: float) -> int:
    """Number of active entries of a layer with ``numel`` entries at ``sparsity``.

    ``numel - floor(sparsity * numel)``, the count of google-research/rigl
    (``get_n_zeros`` zeros, ``get_mask_random_numpy``), with the float product
    computed as it does; at least 1 for a non-empty layer, so no layer is
    disconnected (this only matters at ``sparsity == 1``). An empty layer has 0.

    Args:
        numel: number of entries of the layer, an int >= 0.
        sparsity: fraction of zeros, in [0, 1].

    Returns:
        ``0`` if ``numel == 0`` else
        ``max(1, numel - floor(sparsity * numel))``.

    Raises:
        ValueError: ``numel`` negative or not an int, or ``sparsity`` outside [0, 1].

    Example:
        >>> nnz_for(100, 0.9), nnz_for(33, 0.9), nnz_for(4, 0.9), nnz_for(0, 0.5)
        (10, 4, 1, 0)
    """
    if not _is_int(numel) or numel < 0:
        raise ValueError(f"numel must be an int >= 0, got {numel=}")
    if not _is_real(sparsity) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity=}")
    if numel == 0:
        return 0
    numel = int(numel)
    return max(1, numel - math.floor(float(sparsity) * numel))


DISTRIBUTIONS: dict[str, Callable[..., dict[str, float]]] = {
    "uniform": uniform,
    "erdos_renyi": erdos_renyi,
    "er": erdos_renyi,
    "erk": erk,
}


def get_distribution(name: str) -> Callable[..., dict[str, float]]:
    """Looks up a distribution in :data:`DISTRIBUTIONS` by name.

    Args:
        name: ``"uniform"``, ``"erdos_renyi"`` (alias ``"er"``) or ``"erk"``.

    Returns:
        The function ``(shapes, sparsity, dense=()) -> {name: sparsity}``.

    Raises:
        ValueError: unknown ``name``.

    Example:
        >>> get_distribution("er") is erdos_renyi
        True
    """
    try:
        return DISTRIBUTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"distribution must be one of {sorted(DISTRIBUTIONS)}, "
                         f"got distribution={name!r}") from None

"""Testing helpers for people who unit-test their own pure functions, above all new
drop/grow criteria (:mod:`rigl_func.criteria`).

* Hypothesis strategies (needs ``hypothesis``): :func:`masks_with_nnz` (bool masks
  with an exact number of active entries), :func:`param_trees` (params/grads dicts
  shaped like a model) and :func:`score_tensors` (random, tie-heavy or NaN/inf
  scores).
* :func:`check_criterion`: runs a criterion through every property the update relies
  on and raises :class:`CriterionCheckError` naming the first broken one: a tensor of
  the parameter's shape and a floating dtype, inputs untouched (pure), deterministic,
  ``vmap`` == a loop, ``torch.compile(fullgraph=True)`` == eager, and a full RigL
  update with it keeps the update's invariants (exact nnz per layer, inactive params
  exactly 0, nothing grown where the grow score is ``-inf``, same result twice).

Example:
    >>> from rigl_func.testing import check_criterion
    >>> def grow_by_momentum(param, grad, mask, extras):
    ...     return (grad * extras["momentum"]).abs()
    >>> report = check_criterion(grow_by_momentum, role="grow", aux=("momentum",), compile=False)
    >>> report["nnz_exact"], report["vmap_equals_loop"]
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor

__all__ = ["CriterionCheckError", "check_criterion", "make_scores", "masks_with_nnz", "param_trees", "score_tensors"]

#: Default layer shapes of :func:`check_criterion`: a Linear, a conv and a tiny layer.
DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((12, 10), (6, 4, 3, 3), (2, 3))


class CriterionCheckError(AssertionError):
    """A criterion broke a property :func:`check_criterion` checks; ``property`` names it."""

    def __init__(self, prop: str, message: str) -> None:
        super().__init__(f"{prop}: {message}")
        self.property = prop


def _hypothesis():
    try:
        from hypothesis import strategies
    except ImportError as err:  # pragma: no cover - hypothesis is in the dev extra
        raise ImportError("rigl_func.testing strategies need hypothesis: pip install hypothesis") from err
    return strategies


def masks_with_nnz(shape: Sequence[int], nnz: Optional[int] = None):
    """Strategy of bool masks of ``shape`` with exactly ``nnz`` active entries (any
    count in ``[0, numel]`` when ``nnz`` is None), at random positions.

    Example:
        >>> from hypothesis import given
        >>> @given(masks_with_nnz((4, 5), nnz=7))
        ... def test(mask):
        ...     assert int(mask.sum()) == 7
        >>> test()
    """
    st = _hypothesis()
    numel = math.prod(shape)
    counts = st.just(nnz) if nnz is not None else st.integers(0, numel)

    def build(args):
        k, seed = args
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:k]] = True
        return flat.reshape(tuple(shape))

    return st.tuples(counts, st.integers(0, 2**31 - 1)).map(build)


def score_tensors(shape: Sequence[int], kind: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """Strategy of float tensors of ``shape``: ``"random"`` (normal), ``"ties"`` (few
    distinct values, ``-0.0`` among them) or ``"nonfinite"`` (NaN and ``+-inf``
    sprinkled in); any of the three when ``kind`` is None."""
    st = _hypothesis()
    kinds = st.just(kind) if kind is not None else st.sampled_from(["random", "ties", "nonfinite"])
    return st.tuples(kinds, st.integers(0, 2**31 - 1)).map(lambda a: _scores(tuple(shape), a[0], a[1], dtype))


def param_trees(shapes: Optional[Sequence[Sequence[int]]] = None, kind: Optional[str] = None):
    """Strategy of ``(params, grads)`` dicts named like a model (``"layer{i}.weight"``),
    one tensor per shape (default: :data:`DEFAULT_SHAPES`)."""
    st = _hypothesis()
    shapes = [tuple(s) for s in (shapes or DEFAULT_SHAPES)]
    kinds = st.just(kind) if kind is not None else st.sampled_from(["random", "ties", "nonfinite"])

    def build(args):
        k, seed = args
        params = {f"layer{i}.weight": _scores(s, "random", seed + 2 * i, torch.float32) for i, s in enumerate(shapes)}
        grads = {f"layer{i}.weight": _scores(s, k, seed + 2 * i + 1, torch.float32) for i, s in enumerate(shapes)}
        return params, grads

    return st.tuples(kinds, st.integers(0, 2**30)).map(build)


def make_scores(shape: Sequence[int], kind: str, generator: torch.Generator,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """One float tensor of ``shape`` drawn from ``generator``: ``"random"`` (normal),
    ``"ties"`` (values in {-1, -0.5, 0, 0.5, 1} and ``-0.0``: ties everywhere) or
    ``"nonfinite"`` (normal with 10% NaN, 5% ``+inf``, 5% ``-inf``). The sampler behind
    :func:`score_tensors`, for tests that draw their own.

    Example:
        >>> t = make_scores((100,), "nonfinite", torch.Generator().manual_seed(0))
        >>> bool(t.isnan().any()), bool(t.isinf().any())
        (True, True)
    """
    shape, gen = tuple(shape), generator
    if kind == "ties":
        v = torch.randint(-2, 3, shape, generator=gen).to(torch.float32) * 0.5
        v = torch.where(torch.rand(shape, generator=gen) < 0.2, -0.0, v)
    else:
        v = torch.randn(shape, generator=gen)
    if kind == "nonfinite":
        u = torch.rand(shape, generator=gen)
        v = torch.where(u < 0.1, float("nan"), torch.where(u < 0.15, float("inf"), torch.where(u < 0.2, -float("inf"), v)))
    return v.to(dtype)


def _scores(shape: tuple, kind: str, seed: int, dtype: torch.dtype) -> Tensor:
    return make_scores(shape, kind, torch.Generator().manual_seed(seed), dtype)


def _bits(t: Tensor) -> Tensor:
    views = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(views[t.element_size()]) if t.is_floating_point() else t


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _call(fn: Callable, param: Tensor, grad: Tensor, mask: Tensor, extras: Mapping[str, Tensor]) -> Tensor:
    from rigl_func.criteria import _takes_extras

    return fn(param, grad, mask, extras) if _takes_extras(fn) else fn(param, grad, mask)


def _inputs(shape: tuple, seed: int, aux: Sequence[str]) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=gen)[: max(1, numel // 3)]] = True
    mask = mask.reshape(shape)
    param = torch.where(mask, torch.randn(shape, generator=gen), 0.0)
    grad = torch.randn(shape, generator=gen)
    extras = {"key": torch.tensor(seed, dtype=torch.int64), "step": torch.tensor(10, dtype=torch.int64),
              "ema": torch.randn(shape, generator=gen)}
    extras.update({name: torch.randn(shape, generator=gen) for name in aux})
    return param, grad, mask, extras


def check_criterion(
    fn: Callable[..., Tensor],
    *,
    role: str = "grow",
    shapes: Sequence[Sequence[int]] = DEFAULT_SHAPES,
    aux: Sequence[str] = (),
    seed: int = 0,
    vmap: bool = True,
    compile: bool = True,
    compile_backend: str = "eager",
    **config_overrides: Any,
) -> dict[str, Any]:
    """Check that ``fn`` is a well-behaved drop or grow criterion.

    Args:
        fn: ``(param, grad, mask[, extras]) -> scores``.
        role: ``"grow"`` or ``"drop"``: which config field the update check uses.
        shapes: layer shapes to try (one tiny layer included by default).
        aux: names of the extra trees ``fn`` reads from ``extras`` (``aux=`` of
            :func:`rigl_func.update_topology`); filled with random tensors.
        seed: seed of the random inputs.
        vmap, compile: run the ``torch.func.vmap`` and ``torch.compile(fullgraph=True)``
            checks (compile with ``compile_backend``; ``"inductor"`` checks codegen too).
        **config_overrides: extra :class:`rigl_func.RigLConfig` fields for the update
            check (e.g. ``ema_momentum=0.9`` for a criterion that reads ``extras["ema"]``).

    Returns:
        A report ``{property: True}`` of every property checked.

    Raises:
        CriterionCheckError: naming the first broken property (``returns_tensor``,
            ``shape``, ``dtype``, ``pure``, ``deterministic``, ``vmap_equals_loop``,
            ``compile_equals_eager``, ``nnz_exact``, ``inactive_zero``,
            ``no_growth_at_neg_inf``, ``update_deterministic``).
        ValueError: ``role`` is not ``"grow"`` or ``"drop"``.
    """
    if role not in ("grow", "drop"):
        raise ValueError(f"role must be 'grow' or 'drop', got role={role!r}")
    name = getattr(fn, "__name__", repr(fn))
    report: dict[str, Any] = {}
    for i, shape in enumerate(tuple(s) for s in shapes):
        param, grad, mask, extras = _inputs(shape, seed + i, aux)
        before = {k: v.clone() for k, v in {"param": param, "grad": grad, "mask": mask, **extras}.items()}
        versions = {k: v._version for k, v in {"param": param, "grad": grad, "mask": mask, **extras}.items()}
        try:
            out = _call(fn, param, grad, mask, extras)
        except KeyError as err:
            raise CriterionCheckError("extras", f"{name} read extras[{err.args[0]!r}], which the update does not "
                                      f"pass; available: {sorted(extras)} (declare aux trees with aux=)") from err
        if not isinstance(out, Tensor):
            raise CriterionCheckError("returns_tensor", f"{name} returned {type(out).__name__}, not a Tensor")
        if out.shape != param.shape:
            raise CriterionCheckError("shape", f"{name} returned shape {tuple(out.shape)} for a param of shape "
                                      f"{tuple(param.shape)}")
        if not out.is_floating_point():
            raise CriterionCheckError("dtype", f"{name} returned dtype {out.dtype}; scores must be floating point")
        now = {"param": param, "grad": grad, "mask": mask, **extras}
        # values, and version counters: an in-place op that leaves the values as they were
        # (param.mul_(1), param[~mask] = 0) still writes the caller's tensor (the update rejects it)
        changed = [k for k in before if not _same(before[k], now[k]) or now[k]._version != versions[k]]
        if changed:
            raise CriterionCheckError("pure", f"{name} modified its inputs {changed} (in-place op such as abs_()?)")
        if not _same(out, _call(fn, param, grad, mask, extras)):
            raise CriterionCheckError("deterministic", f"{name} gave different scores for the same inputs "
                                      "(use rigl_func.random.uniform(extras['key'], ...) for randomness)")
    report.update(returns_tensor=True, shape=True, dtype=True, pure=True, deterministic=True)
    shape = tuple(shapes[0])
    if vmap:
        _check_vmap(fn, name, shape, seed, aux)
        report["vmap_equals_loop"] = True
    if compile:
        _check_compile(fn, name, shape, seed, aux, compile_backend)
        report["compile_equals_eager"] = True
    report.update(_check_update(fn, name, role, [tuple(s) for s in shapes], seed, aux, config_overrides))
    return report


def _check_vmap(fn, name, shape, seed, aux) -> None:
    batch = [_inputs(shape, seed + 100 + b, aux) for b in range(3)]
    loop = torch.stack([_call(fn, *args) for args in batch])
    stacked = [torch.stack([args[j] for args in batch]) for j in range(3)]
    extras = {k: torch.stack([args[3][k] for args in batch]) for k in batch[0][3]}
    try:
        out = torch.func.vmap(lambda p, g, m, e: _call(fn, p, g, m, e))(*stacked, extras)
    except Exception as err:  # noqa: BLE001 - any failure is the finding
        raise CriterionCheckError("vmap_equals_loop", f"{name} fails under torch.func.vmap: {err}") from err
    if not _same(out, loop):
        raise CriterionCheckError("vmap_equals_loop", f"{name} under vmap differs from a loop over the batch")


def _check_compile(fn, name, shape, seed, aux, backend) -> None:
    args = _inputs(shape, seed + 200, aux)
    try:
        compiled = torch.compile(lambda p, g, m, e: _call(fn, p, g, m, e), fullgraph=True, backend=backend)
        out = compiled(*args)
    except Exception as err:  # noqa: BLE001
        raise CriterionCheckError("compile_equals_eager",
                                  f"{name} fails under torch.compile(fullgraph=True): {str(err).splitlines()[0]}") from err
    if not _same(out, _call(fn, *args)):
        raise CriterionCheckError("compile_equals_eager", f"{name} compiled differs from eager")


def _check_update(fn, name, role, shapes, seed, aux, overrides) -> dict[str, bool]:
    import rigl_func as rf
    from rigl_func.random import fold_in, layer_id

    gen = torch.Generator().manual_seed(seed + 300)
    params = {f"layer{i}.weight": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    trees = {a: {k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for a in aux}
    field = {"grow": "grow_criterion", "drop": "drop_criterion"}[role]
    cfg = rf.RigLConfig(t_end=100, delta=10, sparsity=0.5, alpha=0.5, distribution="uniform", include=(".*",),
                        **{field: fn, **overrides})
    state = rf.init_state(params, cfg, seed=seed)._replace(step=torch.tensor(10))
    params = rf.apply_masks(params, state.masks)
    results = []
    for engine in ("batched", "per_layer"):
        results.append(rf.update_topology(params, grads, state, cfg, aux=trees or None, engine=engine))
    (p1, s1), (p2, s2) = results
    target = rf.target_nnz({k: tuple(m.shape) for k, m in state.masks.items()}, cfg)
    got = {k: int(m.sum()) for k, m in s1.masks.items()}
    if got != target:
        raise CriterionCheckError("nnz_exact", f"an update with {name} left {got} active entries, not {target}")
    for k, m in s1.masks.items():
        if bool((p1[k][~m] != 0).any()):
            raise CriterionCheckError("inactive_zero", f"an update with {name} left nonzeros at inactive {k!r}")
    if any(not _same(s1.masks[k], s2.masks[k]) or not _same(p1[k], p2[k]) for k in s1.masks):
        raise CriterionCheckError("update_deterministic", f"the batched and per-layer updates with {name} differ")
    if role == "grow":  # nothing grows where the criterion says -inf
        step_key = fold_in(state.key, state.step)
        for k, m in state.masks.items():  # the extras the update passed
            e = {"key": fold_in(step_key, layer_id(k)), "step": state.step, **{a: trees[a][k] for a in aux}}
            if k in state.ema:
                e["ema"] = state.ema[k]
            scores = _call(fn, params[k], grads[k], m, e)
            forbidden = scores == -float("inf")
            if bool((s1.masks[k] & ~m & forbidden).any()):
                raise CriterionCheckError("no_growth_at_neg_inf", f"an update grew {k!r} where {name} is -inf")
    return {"nnz_exact": True, "inactive_zero": True, "update_deterministic": True,
            **({"no_growth_at_neg_inf": True} if role == "grow" else {})}

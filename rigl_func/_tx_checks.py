"""Input checks of the one-call step (:meth:`rigl_func.RigLOptimizer.step`), run eagerly.

``tx.step`` runs them where they cost nothing that matters: at the first call
(``state.count == 0``), at every eager update step (rare, and far more expensive than the
checks), at every step with ``debug=True``, and after any exception of an eager step (so an
input that breaks a later plain step gets a named error instead of a raw one). Never under
``torch.compile``. Each check names ``tx.step(...)``, the argument and only the offending
names: missing/extra gradient keys, ``None`` gradients, shapes and devices that changed after
``tx.init``, the ``aux`` trees the criteria declare (``@rigl_func.criterion(needs=...)``),
and extras an undeclared criterion reads (one dry run of each criterion on the smallest
sparse layer, on copies). ``docs/bad_inputs.md`` lists them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rigl_func.criteria import CRITERIA, MissingExtrasError, call_criterion, resolve_criterion

__all__ = ["check_step_inputs"]


def _few(names: list) -> str:
    """At most 5 names, then a count: the offending names, never the full lists."""
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _shape(t: Any) -> tuple:
    return tuple(t.shape)


def check_step_inputs(params: Any, grads: Any, state: Any, aux: Any, config: Any, *, where: str = "tx.step",
                      batched: bool = False) -> None:
    """Raise a named ``TypeError``/``ValueError`` for inputs ``tx.step`` cannot use.

    Args:
        params, grads, state, aux: the arguments of ``tx.step`` (``aux`` already a dict).
        config: the :class:`rigl_func.RigLConfig`.
        where: the entry point named in messages (``"tx.step"``/``"tx.step_ensemble"``).
        batched: leading ``K`` dimension on every tensor (``step_ensemble``).

    Raises:
        TypeError: ``params``/``grads`` not dicts, a gradient that is ``None`` or not a tensor.
        ValueError: missing or extra gradient keys, a sparse layer missing from ``params``,
            shapes or devices that differ from the masks ``tx.init`` made, a missing or
            incomplete ``aux`` tree.
        rigl_func.MissingExtrasError: a criterion reads an extras key nobody passes.
    """
    call = f"{where}(params, grads, state)"
    for argname, tree in (("params", params), ("grads", grads)):
        if not isinstance(tree, Mapping):
            raise TypeError(f"{call}: {argname} must be a dict[str, Tensor] keyed like tx.init's params, "
                            f"got {argname}={type(tree).__name__}")
    none = [k for k, g in grads.items() if g is None]
    if none:
        raise TypeError(f"{call}: grads[{none[0]!r}] is None (no gradient reached {_few(none)}); pass a tensor for "
                        "every parameter, e.g. zeros: torch.autograd.grad(..., allow_unused=True, "
                        "materialize_grads=True), or torch.func.grad, which always returns one")
    bad = [k for k, g in grads.items() if not isinstance(g, Tensor)]
    if bad:
        raise TypeError(f"{call}: grads[{bad[0]!r}] must be a Tensor, got {type(grads[bad[0]]).__name__}")
    missing = [k for k in params if k not in grads]
    if missing:
        raise ValueError(f"{call}: grads lacks {_few(missing)}, a key of params (every parameter needs a gradient; "
                         "zeros for one that gets none)")
    extra = [k for k in grads if k not in params]
    if extra:
        raise ValueError(f"{call}: grads has {_few(extra)}, which params lacks (grads must be keyed like params)")
    masks = state.rigl.masks
    lost = [k for k in masks if k not in params]
    if lost:
        raise ValueError(f"{call}: params lacks the sparse layer(s) {_few(lost)} of state.rigl.masks (from tx.init): "
                         "params and state of different models?")
    for name, p in params.items():
        if not isinstance(p, Tensor):
            raise TypeError(f"{call}: params[{name!r}] must be a Tensor, got {type(p).__name__}")
        if _shape(grads[name]) != _shape(p):
            raise ValueError(f"{call}: grads[{name!r}] has shape {_shape(grads[name])} but params[{name!r}] has "
                             f"{_shape(p)}")
        mask = masks.get(name)
        if mask is None:
            continue
        if _shape(mask) != _shape(p):
            raise ValueError(f"{call}: params[{name!r}] has shape {_shape(p)} but state.rigl.masks[{name!r}] has "
                             f"{_shape(mask)} (the shape tx.init saw): the parameter changed shape after tx.init; "
                             "call tx.init again for the new model")
        if mask.device != p.device or grads[name].device != p.device:
            raise ValueError(f"{call}: params[{name!r}] is on {p.device}, grads[{name!r}] on {grads[name].device} "
                             f"and state.rigl.masks[{name!r}] on {mask.device}: keep them on one device")
    _check_aux(aux, masks, config, where)
    _dry_run_criteria(params, grads, state, aux, config, where, batched)


def _check_aux(aux: Mapping, masks: Mapping[str, Tensor], config: Any, where: str) -> None:
    for field, fn_name, trees in getattr(config, "_aux_needs", ()):
        absent = [t for t in trees if t not in aux]
        if absent:
            raise ValueError(f"{where}(..., aux=) lacks the {_few(absent)} tree that {field}={fn_name!r} declares "
                             f"(needs={trees!r}); pass {where}(params, grads, state, aux={{{absent[0]!r}: tree}}) "
                             f"with a tensor per sparse layer (aux has {sorted(aux)})")
    for tree_name, tree in aux.items():
        if not isinstance(tree, Mapping):
            raise TypeError(f"{where}(..., aux={{{tree_name!r}: ...}}) must be a dict[str, Tensor], "
                            f"got {type(tree).__name__}")
        gone = [k for k in masks if k not in tree]
        if gone:
            raise ValueError(f"{where}(..., aux={{{tree_name!r}: ...}}) lacks the sparse layer(s) {_few(gone)}")
        for name, mask in masks.items():
            t = tree[name]
            if not isinstance(t, Tensor) or _shape(t) != _shape(mask):
                got = _shape(t) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{where}(..., aux={{{tree_name!r}: ...}})[{name!r}] must be a tensor of shape "
                                 f"{_shape(mask)} (the layer's), got {got}")


def _dry_run_criteria(params, grads, state, aux, config, where: str, batched: bool) -> None:
    """Call each custom criterion once on copies of the smallest sparse layer, with the extras
    an update would pass, so a read of an undeclared, missing extras key fails now, named."""
    if config.method == "static" or not state.rigl.masks:
        return
    fns = [(field, resolve_criterion(getattr(config, field), field)) for field in ("drop_criterion", "grow_criterion")]
    fns = [(field, fn) for field, fn in fns if fn not in CRITERIA.values()]
    if not fns:
        return
    name = min(state.rigl.masks, key=lambda k: state.rigl.masks[k].numel())

    def one(t: Tensor) -> Tensor:
        return (t[0] if batched else t).detach().clone()

    layer = [one(params[name]), one(grads[name]), one(state.rigl.masks[name])]
    extras = {"key": torch.zeros((), dtype=torch.int64, device=layer[0].device),
              "step": torch.zeros((), dtype=torch.int64, device=layer[0].device)}
    if name in state.rigl.ema:
        extras["ema"] = one(state.rigl.ema[name])
    extras.update({k: one(tree[name]) for k, tree in aux.items()})
    for field, fn in fns:
        try:
            with torch.no_grad():
                call_criterion(fn, *layer, extras)
        except MissingExtrasError as err:
            key = str(err).split("read extras[", 1)[-1].split("]", 1)[0]
            fn_name = getattr(fn, "__name__", repr(fn))
            raise MissingExtrasError(
                f"{where}: {field}={fn_name!r} reads extras[{key}], which no update passes (extras: "
                f"{sorted(extras)}); pass {where}(params, grads, state, aux={{{key}: tree}}) and declare it with "
                f"@rigl_func.criterion(needs=({key},))") from None

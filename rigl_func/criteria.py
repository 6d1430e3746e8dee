"""Drop and grow criteria: plain functions ``(param, grad, mask[, extras]) -> scores``.

A criterion maps one layer's tensors to a float score per entry, same shape as the
parameter. :func:`rigl_func.drop` removes the *lowest* drop scores among active
entries; :func:`rigl_func.grow` adds the *highest* grow scores among inactive ones.
RigL (Evci et al. 2020, Sec. 3) drops by weight magnitude and grows by the magnitude
of the dense gradient. A new criterion is one function; pass it as
``RigLConfig(drop_criterion=fn)`` or ``RigLConfig(grow_criterion=fn)``. It must be
pure and shape-preserving so it works under ``vmap`` and ``torch.compile``; return
``-inf`` where growth must never happen.

Args of every criterion:
    param: float tensor, the layer's weight (zeros at inactive entries), e.g. ``[out, in]``.
    grad: float tensor, same shape, the dense gradient (or its accumulated mean).
    mask: bool tensor, same shape, the current mask.
    extras: optional 4th argument, ``dict[str, Tensor]`` of per-layer extras:
        ``"key"`` (0-d int64, a random key unique to this layer and update step; use
        :func:`rigl_func.random.uniform`), ``"step"`` (0-d int64), ``"ema"`` (the
        gradient EMA, when ``ema_momentum > 0``), plus the layer's entry of every
        tree passed as ``update_topology(..., aux={"momentum": tree})``.

Example, a new grow criterion (gradient times optimizer momentum) in three lines:

    def grow_by_momentum(param, grad, mask, extras):
        return (grad * extras["momentum"]).abs()
    config = RigLConfig(t_end=..., grow_criterion=grow_by_momentum)
    params, state = update_topology(params, grads, state, config, aux={"momentum": mom})

The protocol, explicitly. Dispatch: a criterion is called with ``extras`` iff it takes
it, declared by :func:`criterion` (``fn.rigl_takes_extras``) or, undeclared, read from
its signature (4 or more positional parameters, or ``*args``). Needs: a criterion
declares the extras it reads with ``@criterion(needs=(...))`` (``fn.rigl_needs``).
:class:`rigl_func.RigLConfig` checks them when it is built (``"ema"`` needs
``ema_momentum > 0``; ``"key"`` and ``"step"`` are always there) and records the other
names as aux trees, which :func:`rigl_func.update_topology` requires in ``aux`` up
front (a ``ValueError`` naming the criterion and the missing tree). The built-ins
declare theirs: ``random`` needs ``"key"``, ``ema`` needs ``"ema"``. An undeclared
criterion that reads a missing key gets a :class:`MissingExtrasError` (a ``KeyError``)
listing the available keys and pointing to ``aux=``; one that returns non-floating
scores gets a ``TypeError`` naming it. Check a criterion before training with
:func:`rigl_func.testing.check_criterion` (purity, shape, dtype, vmap, compile).

    @criterion(needs=("momentum",))
    def grow_by_momentum(param, grad, mask, extras):
        return (grad * extras["momentum"]).abs()
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from rigl_func.random import uniform

__all__ = ["magnitude", "gradient", "random", "ema", "CRITERIA", "resolve_criterion", "call_criterion",
           "criterion", "criterion_needs", "takes_extras", "MissingExtrasError", "BUILTIN_EXTRAS"]

#: Extras every update passes (``"ema"`` only when ``ema_momentum > 0``); other names are aux trees.
BUILTIN_EXTRAS = ("key", "step", "ema")


class MissingExtrasError(KeyError):
    """A criterion read an ``extras`` key the update did not pass (a ``KeyError``)."""

    def __str__(self) -> str:  # KeyError's str() is the repr of its argument
        return str(self.args[0]) if self.args else ""


def criterion(fn: Optional[Callable] = None, *, needs: Sequence[str] = (), takes_extras: Optional[bool] = None):
    """Declare what a criterion needs: ``@criterion(needs=("momentum",))``.

    Sets ``fn.rigl_needs`` (tuple of extras keys read) and ``fn.rigl_takes_extras``
    (whether it is called with the 4th ``extras`` argument) and returns ``fn`` itself.
    :class:`rigl_func.RigLConfig` checks the needs when built; names other than
    :data:`BUILTIN_EXTRAS` must then be passed as ``update_topology(..., aux={name: tree})``.

    Args:
        fn: the criterion (or omit it to use ``criterion(...)`` as a decorator factory).
        needs: extras keys the criterion reads.
        takes_extras: call it with ``extras``; default: ``True`` if ``needs`` is
            non-empty, else read from the signature.

    Raises:
        ValueError: ``needs`` non-empty with ``takes_extras=False``.
        TypeError: ``needs`` is not a sequence of str.

    Example:
        >>> @criterion(needs=("momentum",))
        ... def grow_by_momentum(param, grad, mask, extras):
        ...     return extras["momentum"].abs()
        >>> grow_by_momentum.rigl_needs, grow_by_momentum.rigl_takes_extras
        (('momentum',), True)
    """
    if isinstance(needs, str) or not all(isinstance(n, str) for n in needs):
        raise TypeError(f"needs must be a tuple of str, got needs={needs!r}")
    needs = tuple(needs)
    if needs and takes_extras is False:
        raise ValueError(f"a criterion with needs={needs!r} must take extras, got takes_extras=False")

    def mark(f: Callable) -> Callable:
        f.rigl_needs = needs
        f.rigl_takes_extras = bool(needs) or (_signature_takes_extras(f) if takes_extras is None else takes_extras)
        return f

    return mark if fn is None else mark(fn)


def criterion_needs(fn: Callable) -> tuple[str, ...]:
    """The extras keys ``fn`` declared with :func:`criterion` (``()`` if undeclared)."""
    return tuple(getattr(fn, "rigl_needs", ()))


def takes_extras(fn: Callable) -> bool:
    """Whether ``fn`` is called with ``extras``: its declaration, else its signature."""
    declared = getattr(fn, "rigl_takes_extras", None)
    return _signature_takes_extras(fn) if declared is None else bool(declared)


def magnitude(param: Tensor, grad: Tensor, mask: Tensor) -> Tensor:
    """Weight magnitude ``|w|`` (RigL's and SET's drop criterion).

    Example:
        >>> import torch
        >>> magnitude(torch.tensor([-2.0, 1.0]), torch.zeros(2), torch.ones(2, dtype=torch.bool))
        tensor([2., 1.])
    """
    return param.abs()


def gradient(param: Tensor, grad: Tensor, mask: Tensor) -> Tensor:
    """Dense-gradient magnitude ``|dL/dw|`` (RigL's grow criterion).

    Example:
        >>> import torch
        >>> gradient(torch.zeros(2), torch.tensor([0.5, -3.0]), torch.zeros(2, dtype=torch.bool))
        tensor([0.5000, 3.0000])
    """
    return grad.abs()


@criterion(needs=("key",))
def random(param: Tensor, grad: Tensor, mask: Tensor, extras: Mapping[str, Tensor]) -> Tensor:
    """Uniform random scores from ``extras["key"]`` (SET's grow criterion).

    Reproducible: a function of the state's key, the step and the layer name.

    Example:
        >>> import torch
        >>> s = random(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool), {"key": torch.tensor(1)})
        >>> s.shape, bool(((s >= 0) & (s < 1)).all())
        (torch.Size([3]), True)
    """
    return uniform(extras["key"], param.shape, param.device)


@criterion(needs=("ema",))
def ema(param: Tensor, grad: Tensor, mask: Tensor, extras: Mapping[str, Tensor]) -> Tensor:
    """Magnitude of the exponential moving average of dense gradients (SNFS).

    Example:
        >>> import torch
        >>> ema(torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.bool), {"ema": torch.tensor([-1.0, 0.5])})
        tensor([1.0000, 0.5000])
    """
    return extras["ema"].abs()


CRITERIA: dict[str, Callable[..., Tensor]] = {
    "magnitude": magnitude,
    "gradient": gradient,
    "random": random,
    "ema": ema,
}


def _signature_takes_extras(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4 or any(p.kind == p.VAR_POSITIONAL for p in params)


_takes_extras = takes_extras  # old private name (rigl_func.testing)


def call_criterion(fn: Callable, param: Tensor, grad: Tensor, mask: Tensor, extras: Mapping[str, Tensor]) -> Tensor:
    """Call a 3- or 4-argument criterion (see :func:`takes_extras`) and check its result.

    Raises:
        MissingExtrasError: ``fn`` read an extras key that is not there; the message
            lists the available keys and points to ``update_topology(..., aux=)``.
        ValueError: the scores are not a tensor of ``param``'s shape, or ``fn``
            modified one of its inputs in place (seen through version counters,
            eager only).
        TypeError: the scores are not floating point.
    """
    name = getattr(fn, "__name__", repr(fn))
    watched = {"param": param, "grad": grad, "mask": mask,
               **{f"extras[{k!r}]": v for k, v in extras.items() if isinstance(v, Tensor)}}
    # Version counters: free host ints (eager; a compiled or vmapped call cannot be watched).
    versions = None if torch.compiler.is_compiling() else {k: t._version for k, t in watched.items()}
    try:
        scores = fn(param, grad, mask, extras) if takes_extras(fn) else fn(param, grad, mask)
    except KeyError as err:
        key = err.args[0] if err.args else None
        if isinstance(err, MissingExtrasError) or not isinstance(key, str) or key in extras:
            raise
        raise MissingExtrasError(
            f"criterion {name!r} read extras[{key!r}], which this update does not pass; available keys: "
            f"{sorted(extras)}. Pass the tree as update_topology(..., aux={{{key!r}: tree}}) and declare "
            f"it with @rigl_func.criterion(needs=({key!r},))") from None
    if versions is not None:
        changed = [k for k, t in watched.items() if t._version != versions[k]]
        if changed:
            raise ValueError(f"criterion {name!r} modified {', '.join(changed)} in place (e.g. grad.abs_()): the "
                             "caller's tensors changed; a criterion must be pure, use out-of-place ops "
                             "(grad.abs())")
    if not isinstance(scores, Tensor) or scores.shape != param.shape:
        raise ValueError(f"criterion {name!r} must return a tensor of shape "
                         f"{tuple(param.shape)}, got {getattr(scores, 'shape', type(scores).__name__)}")
    if not scores.is_floating_point():
        raise TypeError(f"criterion {name!r} must return floating-point scores, got dtype {scores.dtype}")
    return scores


def resolve_criterion(spec: Union[str, Callable], argname: str = "criterion") -> Callable:
    """Turn a criterion name or function into a function.

    Args:
        spec: a key of :data:`CRITERIA` or a callable ``(param, grad, mask[, extras]) -> scores``.
        argname: argument name used in error messages.

    Raises:
        ValueError: unknown name. TypeError: neither a str nor a callable.

    Example:
        >>> resolve_criterion("magnitude") is magnitude
        True
    """
    if isinstance(spec, str):
        if spec not in CRITERIA:
            raise ValueError(f"{argname} must be one of {sorted(CRITERIA)} or a callable, got {argname}={spec!r}")
        return CRITERIA[spec]
    if callable(spec):
        return spec
    raise TypeError(f"{argname} must be a str or a callable, got {argname}={spec!r}")

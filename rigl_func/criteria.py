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
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping, Union

from torch import Tensor

from rigl_func.random import uniform

__all__ = ["magnitude", "gradient", "random", "ema", "CRITERIA", "resolve_criterion", "call_criterion"]


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


def _takes_extras(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4 or any(p.kind == p.VAR_POSITIONAL for p in params)


def call_criterion(fn: Callable, param: Tensor, grad: Tensor, mask: Tensor, extras: Mapping[str, Tensor]) -> Tensor:
    """Call a 3- or 4-argument criterion and check it returned a tensor of the right shape."""
    scores = fn(param, grad, mask, extras) if _takes_extras(fn) else fn(param, grad, mask)
    if not isinstance(scores, Tensor) or scores.shape != param.shape:
        raise ValueError(f"criterion {getattr(fn, '__name__', fn)!r} must return a tensor of shape "
                         f"{tuple(param.shape)}, got {getattr(scores, 'shape', type(scores).__name__)}")
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

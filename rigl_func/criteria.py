"""Drop and grow criteria: plain functions ``(param, grad, mask) -> scores``.

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
"""

from __future__ import annotations

from typing import Callable, Union

from torch import Tensor

__all__ = ["magnitude", "gradient", "CRITERIA", "resolve_criterion"]


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


CRITERIA: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "magnitude": magnitude,
    "gradient": gradient,
}


def resolve_criterion(spec: Union[str, Callable], argname: str = "criterion") -> Callable:
    """Turn a criterion name or function into a function.

    Args:
        spec: a key of :data:`CRITERIA` or a callable ``(param, grad, mask) -> scores``.
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

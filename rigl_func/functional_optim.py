"""Masked functional optimizers: SGD and AdamW as pure ``init`` / ``step`` pairs (optax-style).

For ``torch.func`` training loops (``functional_call`` + ``torch.func.grad``) with
sparse masks. RigL (Evci et al. 2020, Sec. 3) trains the active weights only: the
gradients of inactive weights are zeroed, and new connections start with zero weight
and zero optimizer state (:func:`rigl_func.reset_optimizer_state` after each update).

* One batched pass masks the gradients of all layers
  (:func:`rigl_func.masks.masked_where`: pack, one masked fill, views back).
* The update itself runs as multi-tensor ops (``torch._foreach_*``, the out-of-place
  variants: pure), in the order of ``torch.optim``'s ``foreach`` implementations:
  :class:`SGD` equals ``torch.optim.SGD(foreach=True)`` stepped on masked gradients
  bitwise; :class:`AdamW`'s moments equal ``AdamW(foreach=True)``'s bitwise and its
  weights to one float rounding (torch applies the bias-corrected step size as a
  Python float read with ``.item()``; here it stays a 0-d tensor). Under
  ``torch.func`` transforms (``vmap``, ``grad``), which have no batching rules for
  ``_foreach`` ops, and under ``torch.compile`` (inductor fuses), the same math runs
  per tensor.
* The step counter is a 0-d int64 tensor and the bias corrections are tensor math:
  no host sync, no recompilation when the step changes under ``torch.compile``.

Inactive weights stay exactly zero without a second masking pass: with zero weight,
zero (masked) gradient and zero state, SGD's update is ``0`` and AdamW's is
``lr * 0 / (0 + eps) = 0`` for ``eps > 0`` (with ``eps == 0`` the step masks the new
weights too). Start from masked params (:func:`rigl_func.apply_masks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from rigl_func.masks import masked_where

__all__ = ["SGD", "SGDState", "AdamW", "AdamWState", "CustomOptimizer", "sgd", "adamw", "custom_optimizer", "mask_grads"]

Params = Mapping[str, Tensor]


class SGDState(NamedTuple):
    """State of :class:`SGD`: momentum buffers keyed by parameter name (``{}`` without
    momentum) and the number of steps taken."""

    momentum: dict[str, Tensor]
    count: Tensor  # shape=(), int64


class AdamWState(NamedTuple):
    """State of :class:`AdamW`: first and second moments keyed by parameter name and the
    number of steps taken."""

    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    count: Tensor  # shape=(), int64


def _wrapped(t: Tensor) -> bool:
    # BatchedTensor (vmap) / GradTrackingTensor (torch.func.grad): no _foreach batching rules.
    # Compiled: per tensor too (inductor fuses the ops; under a compiled vmap the tensors
    # are batched but cannot be asked).
    return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t)


def _fe(name: str, *args, **kwargs) -> list[Tensor]:
    """``torch._foreach_<name>(*args)``, or the same op tensor by tensor under a
    ``torch.func`` transform. Arguments that are not lists are shared by all tensors."""
    first = args[0]
    if not first:
        return []
    if not _wrapped(first[0]):
        return list(getattr(torch, f"_foreach_{name}")(*args, **kwargs))
    fn = getattr(torch, name)
    cols = [a if isinstance(a, (list, tuple)) else [a] * len(first) for a in args]
    return [fn(*row, **kwargs) for row in zip(*cols)]


def mask_grads(grads: Params, masks: Optional[Params]) -> dict[str, Tensor]:
    """``grads`` with every gradient keyed like ``masks`` zeroed at inactive entries, in
    one batched pass (exact zeros, NaN/inf included). Pure.

    Example:
        >>> mask_grads({"w": torch.ones(3), "b": torch.ones(1)}, {"w": torch.tensor([True, False, True])})
        {'w': tensor([1., 0., 1.]), 'b': tensor([1.])}
    """
    out = dict(grads)
    if masks:
        names = [n for n in masks if n in grads]
        for name, g in zip(names, masked_where([grads[n] for n in names], [masks[n] for n in names])):
            out[name] = g
    return out


def _check_trees(params: Params, grads: Params, moments: Params, what: str) -> list[str]:
    names = list(params)
    if set(grads) != set(names):
        raise ValueError(f"grads must have the keys of params, got {sorted(grads)} and {sorted(names)}")
    if moments is not None and set(moments) != set(names):
        raise ValueError(f"state.{what} must have the keys of params (from init(params)), "
                         f"got {sorted(moments)} and {sorted(names)}")
    return names


def _counter(params: Params) -> Tensor:
    device = next(iter(params.values())).device if params else None
    return torch.zeros((), dtype=torch.int64, device=device)  # shape=(), int64


def _check_real(name: str, value, low: float, high: float = float("inf"), *, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {name}={value!r}")
    ok = (low < value if open_low else low <= value) and value < high
    if not ok:
        bounds = f"{'(' if open_low else '['}{low}, {high})"
        raise ValueError(f"{name} must be in {bounds}, got {name}={value!r}")


def _check_lr(lr) -> None:
    if not callable(lr):
        _check_real("lr", lr, 0.0)


def _lr_at(lr, count: Tensor):
    """``lr`` as is, or a schedule ``lr(count)`` evaluated at the optimizer's step count
    (0-d int64, steps taken so far): a 0-d float tensor, computed on the device."""
    if not callable(lr):
        return lr
    value = lr(count)
    if not isinstance(value, Tensor) or value.dim() != 0 or not value.is_floating_point():
        raise TypeError(f"a learning-rate schedule must return a 0-d float tensor, got {value!r}")
    return value


@dataclass(frozen=True)
class SGD:
    """SGD with momentum, dampening, Nesterov and (coupled) weight decay, as
    ``torch.optim.SGD``: ``g += wd p``; ``b = m b + (1 - d) g`` (``b = g`` on the first
    step); ``g = g + m b`` (Nesterov) or ``b``; ``p -= lr g``.

    ``lr`` is a float or a schedule: a function ``count -> lr`` of the optimizer's step
    count (0-d int64 tensor, steps taken so far) returning a 0-d float tensor, evaluated
    on the device every step (no sync, no recompile), e.g. cosine decay over ``T`` steps:
    ``lambda c: 0.1 * 0.5 * (1 + torch.cos(math.pi * c / T))``. Under :func:`rigl_func.rigl`
    the topology-update steps are not optimizer steps, so ``count`` lags the iteration
    count by ``state.rigl.num_updates``.

    Frozen and hashable: a static argument for ``torch.compile``.

    Example:
        >>> opt = SGD(lr=0.1, momentum=0.9)
        >>> params, masks = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([True, False])}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.tensor([1.0, 5.0])}, state, masks)
        >>> params["w"].tolist(), state.momentum["w"].tolist(), int(state.count)
        ([0.8999999761581421, 0.0], [1.0, 0.0], 1)
    """

    lr: Union[float, Callable[[Tensor], Tensor]]
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        _check_real("momentum", self.momentum, 0.0)
        _check_real("dampening", self.dampening, 0.0, 1.0 + 1e-12)
        _check_real("weight_decay", self.weight_decay, 0.0)
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got nesterov={self.nesterov!r}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(f"nesterov=True needs momentum > 0 and dampening = 0, got momentum={self.momentum}, "
                             f"dampening={self.dampening}")

    def init(self, params: Params) -> SGDState:
        """Zero momentum buffers shaped like ``params`` (none without momentum), count 0."""
        momentum = {n: torch.zeros_like(p) for n, p in params.items()} if self.momentum else {}
        return SGDState(momentum=momentum, count=_counter(params))

    def step(self, params: Params, grads: Params, state: SGDState,
             masks: Optional[Params] = None) -> tuple[dict[str, Tensor], SGDState]:
        """One masked SGD step.

        Args:
            params: name -> weight (zero at inactive entries).
            grads: name -> gradient, same keys.
            state: from :meth:`init` or the previous step.
            masks: name -> bool mask of the sparse params (``None``: dense step).

        Returns:
            ``(new_params, new_state)``. Pure: inputs are not modified.
        """
        names = _check_trees(params, grads, state.momentum if self.momentum else None, "momentum")
        grads = mask_grads(grads, masks)
        ps, gs = [params[n] for n in names], [grads[n] for n in names]
        if self.weight_decay:
            gs = _fe("add", gs, ps, alpha=self.weight_decay)
        momentum = {}
        if self.momentum:
            bufs = _fe("mul", [state.momentum[n] for n in names], self.momentum)
            bufs = _fe("add", bufs, gs, alpha=1.0 - self.dampening)
            if self.dampening:  # torch.optim starts the buffer at g, undamped: pick g on step 1
                first = (state.count == 0).to(gs[0].dtype) if gs else None  # shape=(); lerp by 0 or 1 is exact
                bufs = _fe("lerp", bufs, gs, first)
            # (without dampening 0 * m + g == g: the first step needs no branch)
            gs = _fe("add", gs, bufs, alpha=self.momentum) if self.nesterov else bufs
            momentum = dict(zip(names, bufs))
        lr = _lr_at(self.lr, state.count)
        # A scheduled lr is a 0-d tensor: multiply, then subtract (foreach's alpha= takes numbers only).
        new = _fe("sub", ps, _fe("mul", gs, lr)) if isinstance(lr, Tensor) else _fe("add", ps, gs, alpha=-lr)
        return dict(zip(names, new)), SGDState(momentum=momentum, count=state.count + 1)


@dataclass(frozen=True)
class AdamW:
    """AdamW (decoupled weight decay), as ``torch.optim.AdamW``: ``p *= 1 - lr wd``;
    ``m = lerp(m, g, 1 - b1)``; ``v = b2 v + (1 - b2) g^2``;
    ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    The bias corrections are computed from the 0-d step counter in float64 (as
    ``torch.optim`` does in Python floats), so nothing syncs with the device.

    Example:
        >>> opt = AdamW(lr=0.1, weight_decay=0.0)
        >>> params, masks = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([True, False])}
        >>> params, state = opt.step(params, {"w": torch.tensor([2.0, 5.0])}, opt.init(params), masks)
        >>> [round(x, 4) for x in params["w"].tolist()], state.exp_avg_sq["w"].tolist()[1]
        ([0.9, 0.0], 0.0)
    """

    lr: Union[float, Callable[[Tensor], Tensor]] = 1e-3  # or a schedule, as in SGD
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        _check_real("eps", self.eps, 0.0)
        _check_real("weight_decay", self.weight_decay, 0.0)
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2):
            raise TypeError(f"betas must be a tuple of two floats, got betas={self.betas!r}")
        for i, b in enumerate(self.betas):
            _check_real(f"betas[{i}]", b, 0.0, 1.0)

    def init(self, params: Params) -> AdamWState:
        """Zero moments shaped like ``params``, count 0."""
        return AdamWState(exp_avg={n: torch.zeros_like(p) for n, p in params.items()},
                          exp_avg_sq={n: torch.zeros_like(p) for n, p in params.items()},
                          count=_counter(params))

    def step(self, params: Params, grads: Params, state: AdamWState,
             masks: Optional[Params] = None) -> tuple[dict[str, Tensor], AdamWState]:
        """One masked AdamW step (see :meth:`SGD.step` for the arguments). Pure."""
        names = _check_trees(params, grads, state.exp_avg, "exp_avg")
        _check_trees(params, grads, state.exp_avg_sq, "exp_avg_sq")
        beta1, beta2 = self.betas
        grads = mask_grads(grads, masks)
        ps, gs = [params[n] for n in names], [grads[n] for n in names]
        count = state.count + 1
        lr = _lr_at(self.lr, state.count)
        if self.weight_decay:
            ps = _fe("mul", ps, 1.0 - lr * self.weight_decay)
        exp_avg = _fe("lerp", [state.exp_avg[n] for n in names], gs, 1.0 - beta1)
        exp_avg_sq = _fe("addcmul", _fe("mul", [state.exp_avg_sq[n] for n in names], beta2), gs, gs,
                         value=1.0 - beta2)
        t = count.to(torch.float64)
        neg_step_size = -lr / (1.0 - beta1 ** t)  # shape=(), float64
        bias_correction2_sqrt = (1.0 - beta2 ** t) ** 0.5  # shape=(), float64
        denom = _fe("add", _fe("div", _fe("sqrt", exp_avg_sq), bias_correction2_sqrt), self.eps)
        new = _fe("add", ps, _fe("mul", _fe("div", exp_avg, denom), neg_step_size))
        new_params = dict(zip(names, new))
        if self.eps == 0 and masks:  # 0 / 0 at inactive entries: re-mask the weights
            new_params = mask_grads(new_params, masks)
        return new_params, AdamWState(exp_avg=dict(zip(names, exp_avg)), exp_avg_sq=dict(zip(names, exp_avg_sq)),
                                      count=count)


def sgd(lr: Union[float, Callable[[Tensor], Tensor]], momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0) -> SGD:
    """A masked functional SGD (:class:`SGD`), named like ``optax.sgd``.

    Example:
        >>> opt = sgd(0.1, momentum=0.9)
        >>> state = opt.init({"w": torch.ones(2)})
        >>> state.count
        tensor(0)
    """
    return SGD(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)


def adamw(lr: Union[float, Callable[[Tensor], Tensor]] = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 1e-2) -> AdamW:
    """A masked functional AdamW (:class:`AdamW`), named like ``optax.adamw``.

    Example:
        >>> opt = adamw(1e-3)
        >>> sorted(opt.init({"w": torch.ones(2)}).exp_avg)
        ['w']
    """
    return AdamW(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


@dataclass(frozen=True)
class CustomOptimizer:
    """Any pure optimizer given as two functions, made mask-aware (see
    :func:`custom_optimizer`)."""

    init_fn: Callable[[Params], Any]
    step_fn: Callable[[Params, Params, Any], tuple[Params, Any]]

    def __post_init__(self) -> None:
        for name in ("init_fn", "step_fn"):
            if not callable(getattr(self, name)):
                raise TypeError(f"{name} must be callable, got {name}={getattr(self, name)!r}")

    def init(self, params: Params) -> Any:
        """``init_fn(params)``."""
        return self.init_fn(params)

    def step(self, params: Params, grads: Params, state: Any,
             masks: Optional[Params] = None) -> tuple[dict[str, Tensor], Any]:
        """``step_fn`` on masked gradients; the new params are masked again (one
        batched pass each), so inactive weights stay exactly 0 whatever the rule."""
        new_params, new_state = self.step_fn(params, mask_grads(grads, masks), state)
        return mask_grads(new_params, masks), new_state


def custom_optimizer(init_fn: Callable[[Params], Any],
                     step_fn: Callable[[Params, Params, Any], tuple[Params, Any]]) -> CustomOptimizer:
    """Plug any pure optimizer into :func:`rigl_func.rigl`.

    Args:
        init_fn: ``params -> state``, a pytree whose per-parameter tensors sit in dicts
            keyed by parameter name (so :func:`rigl_func.reset_optimizer_state` zeroes
            them at new connections).
        step_fn: ``(params, grads, state) -> (new_params, new_state)``, pure.

    Returns:
        A :class:`CustomOptimizer`: ``step(params, grads, state, masks)`` masks the
        gradients, calls ``step_fn`` and masks the new params.

    Example:
        >>> def init(params):
        ...     return {"velocity": {k: torch.zeros_like(v) for k, v in params.items()}}
        >>> def step(params, grads, state):  # heavy-ball with a sign: a Lion-like toy
        ...     vel = {k: 0.9 * state["velocity"][k] + grads[k] for k in params}
        ...     return {k: params[k] - 0.1 * vel[k].sign() for k in params}, {"velocity": vel}
        >>> opt = custom_optimizer(init, step)
        >>> p, s = opt.step({"w": torch.ones(2)}, {"w": torch.ones(2)}, opt.init({"w": torch.ones(2)}),
        ...                 {"w": torch.tensor([True, False])})
        >>> p["w"].tolist()
        [0.8999999761581421, 0.0]
    """
    return CustomOptimizer(init_fn=init_fn, step_fn=step_fn)

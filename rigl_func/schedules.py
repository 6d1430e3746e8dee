"""Drop-fraction schedules and the update-step predicate (RigL paper, Sec. 3, Eq. 1).

The fraction of active connections replaced at update step ``t`` is ``f(t)``; the
paper's default is cosine annealing

    f(t) = alpha / 2 * (1 + cos(pi * t / T_end))

With a start step ``t_start`` the progress is ``p = (t - t_start) / (T_end - t_start)``
clipped to [0, 1] (``t_start = 0`` gives the paper's formula):

* ``cosine``:   f = alpha / 2 * (1 + cos(pi * p))
* ``constant``: f = alpha
* ``linear``:   f = alpha * (1 - p)
* ``inverse_power``: f = alpha * (1 - p) ** k   (``config.schedule_power``)

Every function accepts a Python ``int`` step (returns Python values) or a 0-d integer
tensor (returns 0-d tensors, no host sync), so they run inside ``torch.compile`` and
``vmap``.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Union

import torch

if TYPE_CHECKING:
    from rigl_func.config import RigLConfig

__all__ = [
    "cosine_schedule",
    "constant_schedule",
    "linear_schedule",
    "inverse_power_schedule",
    "drop_fraction",
    "is_update_step",
    "in_accumulation_window",
    "SCHEDULES",
]

Step = Union[int, torch.Tensor]


def _progress(step: Step, t_start: int, t_end: int):
    span = float(t_end - t_start)
    if isinstance(step, torch.Tensor):
        return ((step.to(torch.float64) - t_start) / span).clamp(0.0, 1.0)
    return min(max((step - t_start) / span, 0.0), 1.0)


def cosine_schedule(step: Step, alpha: float, t_end: int, t_start: int = 0):
    """Cosine-annealed drop fraction ``alpha/2 * (1 + cos(pi * p))``.

    Args:
        step: current step, int or 0-d integer tensor.
        alpha: initial drop fraction.
        t_end: step at which the fraction reaches 0.
        t_start: step at which the fraction is ``alpha``.

    Returns:
        float, or 0-d float64 tensor if ``step`` is a tensor.

    Example:
        >>> round(cosine_schedule(0, 0.3, 100), 6), round(cosine_schedule(50, 0.3, 100), 6)
        (0.3, 0.15)
    """
    p = _progress(step, t_start, t_end)
    if isinstance(p, torch.Tensor):
        return alpha / 2 * (1 + torch.cos(math.pi * p))
    return alpha / 2 * (1 + math.cos(math.pi * p))


def constant_schedule(step: Step, alpha: float, t_end: int, t_start: int = 0):
    """Constant drop fraction ``alpha`` (SET's original schedule).

    Example:
        >>> constant_schedule(70, 0.3, 100)
        0.3
    """
    if isinstance(step, torch.Tensor):
        return torch.full((), alpha, dtype=torch.float64, device=step.device)
    return float(alpha)


def linear_schedule(step: Step, alpha: float, t_end: int, t_start: int = 0):
    """Linearly decaying drop fraction ``alpha * (1 - p)``.

    Example:
        >>> round(linear_schedule(25, 0.4, 100), 6)
        0.3
    """
    p = _progress(step, t_start, t_end)
    if isinstance(p, torch.Tensor):
        return alpha * (1 - p)
    return alpha * (1 - p)


def inverse_power_schedule(step: Step, alpha: float, t_end: int, t_start: int = 0, power: float = 3.0):
    """Inverse-power drop fraction ``alpha * (1 - p) ** power``.

    Example:
        >>> round(inverse_power_schedule(50, 0.4, 100, power=2), 6)
        0.1
    """
    p = _progress(step, t_start, t_end)
    return alpha * (1 - p) ** power


SCHEDULES = {
    "cosine": cosine_schedule,
    "constant": constant_schedule,
    "linear": linear_schedule,
    "inverse_power": inverse_power_schedule,
}


def drop_fraction(step: Step, config: RigLConfig):
    """Drop fraction ``f(step)`` for ``config.schedule``.

    Args:
        step: int or 0-d integer tensor.
        config: supplies ``schedule``, ``alpha``, ``t_end``, ``t_start``.

    Returns:
        float, or 0-d float64 tensor if ``step`` is a tensor.

    Example:
        >>> from rigl_func import RigLConfig
        >>> round(drop_fraction(100, RigLConfig(t_end=200, delta=100, alpha=0.3)), 6)
        0.15
    """
    if config.schedule == "inverse_power":
        return inverse_power_schedule(step, config.alpha, config.t_end, config.t_start, config.schedule_power)
    return SCHEDULES[config.schedule](step, config.alpha, config.t_end, config.t_start)


def _check_step(step: Step) -> None:
    """Steps are counts: a Python int or an integer tensor (a float step would make
    ``% delta`` compare rounded values; a bool is a mistake)."""
    if isinstance(step, torch.Tensor):
        if step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
            raise TypeError(f"step must be an int or an integer tensor, got a tensor of dtype {step.dtype}")
    elif isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int or an integer tensor, got step={step!r}")


def host_readable(*tensors: torch.Tensor, debug: bool = False) -> bool:
    """Whether reading the values of ``tensors`` on the host is free of cost and safe:
    plain CPU tensors in eager mode (with ``debug=True``: any device, at the price of a
    host sync on CUDA). Never under ``torch.compile`` or inside ``torch.func`` transforms."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
        if t.device.type == "meta" or (t.device.type != "cpu" and not debug):
            return False
    return True


def is_update_step(step: Step, config: RigLConfig, *, state=None):
    """Whether a topology update happens at ``step``.

    True iff ``config.method != "static"``, ``step > 0``, ``t_start <= step < t_end``
    and ``(step - t_start) % delta == 0``. Steps count completed training iterations,
    as :func:`rigl_func.accumulate` does: the first update happens on the
    ``delta``-th iteration (rigl-torch's convention).

    Args:
        step: int or 0-d integer tensor.
        config: supplies ``delta``, ``t_start``, ``t_end``.
        state: optional :class:`rigl_func.RigLState`. When ``step`` is a Python int
            (your own counter) and ``state.step`` a CPU tensor (eager, no transform),
            they must agree: forgetting :func:`rigl_func.accumulate`, or calling it
            twice, is caught here. Not checked when ``state.step`` is on an
            accelerator (that would be a host sync), under ``vmap`` or ``torch.compile``.
            Simplest of all: pass ``state.step`` itself as ``step``.

    Returns:
        bool, or 0-d bool tensor if ``step`` is a tensor.

    Raises:
        TypeError: ``step`` is a float, a bool or a float/bool tensor.
        ValueError: ``step`` disagrees with ``state.step`` (see ``state``).

    Example:
        >>> from rigl_func import RigLConfig
        >>> cfg = RigLConfig(t_end=300, delta=100)
        >>> [s for s in range(0, 401, 50) if is_update_step(s, cfg)]
        [100, 200]
    """
    _check_step(step)
    if state is not None and not isinstance(step, torch.Tensor):
        counter = state.step
        if isinstance(counter, torch.Tensor) and counter.dim() == 0 and host_readable(counter):
            if int(counter) != step:
                raise ValueError(
                    f"step={step} disagrees with state.step={int(counter)}: call "
                    "rigl_func.accumulate(state, grads, config) exactly once per iteration, or pass "
                    "state.step as the step")
    if config.method == "static":
        return torch.zeros((), dtype=torch.bool, device=step.device) if isinstance(step, torch.Tensor) else False
    on_grid = (step - config.t_start) % config.delta == 0
    in_range = (step >= config.t_start) & (step < config.t_end) & (step > 0)
    return on_grid & in_range


def in_accumulation_window(step: Step, config: RigLConfig):
    """Whether the gradients of iteration ``step`` feed a topology update.

    True iff ``step`` is an update step or one of the ``grad_accumulation_n - 1``
    iterations before one (:func:`rigl_func.accumulate` averages exactly these).

    Args:
        step: int or 0-d integer tensor (the value ``state.step`` has *after*
            :func:`rigl_func.accumulate` counted the iteration).
        config: supplies ``grad_accumulation_n``, ``delta``, ``t_start``, ``t_end``.

    Returns:
        bool, or 0-d bool tensor if ``step`` is a tensor.

    Example:
        >>> from rigl_func import RigLConfig
        >>> cfg = RigLConfig(t_end=300, delta=100, grad_accumulation_n=3)
        >>> [s for s in range(1, 301) if in_accumulation_window(s, cfg)]
        [98, 99, 100, 198, 199, 200]
    """
    to_boundary = (config.delta - (step - config.t_start) % config.delta) % config.delta
    return (to_boundary < config.grad_accumulation_n) & is_update_step(step + to_boundary, config)

"""Hooks of the drop-in :class:`rigl_func.RigLScheduler` on the live model and optimizer.

* :class:`GradMaskHook`: the post-accumulate-grad hook of every sparse weight; it
  queues one end-of-backward callback that masks all gradients in one batched pass,
  and marks the weight as registered (:func:`registered_to`).
* :class:`LoadHook`: the load-state-dict post hook of the model and optimizer, and the
  one-shot forward pre hook it arms, so weights loaded after the scheduler exists are
  re-masked before the next forward.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["GradMaskHook", "LoadHook", "registered_to"]


class GradMaskHook:
    """Post-accumulate-grad hook shared by all sparse weights; also marks them as
    registered. The first firing in a backward queues one end-of-backward callback;
    the others return after one flag test."""

    __slots__ = ("scheduler",)

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def __call__(self, param: Tensor) -> None:
        sched = self.scheduler
        task = _graph_task_id()
        if sched._queued == task:
            return
        sched._queued, sched._clean, sched._fresh, sched._undo = task, False, True, None
        torch.autograd.Variable._execution_engine.queue_callback(sched._end_of_backward)


# Id of the running backward pass (torch >= 2.1): a new backward queues its own callback
# even when an earlier one raised before its callback ran.
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: 0)


def registered_to(param: Tensor) -> Optional[Any]:
    # The live hook is the registration mark: it goes away with remove(), is not copied
    # by deepcopy and is not pickled (an attribute on the model or weight would be).
    # ``_post_accumulate_grad_hooks`` is where Tensor.register_post_accumulate_grad_hook
    # keeps hooks (torch >= 2.1).
    hooks = getattr(param, "_post_accumulate_grad_hooks", None) or {}
    for hook in hooks.values():
        if isinstance(hook, GradMaskHook):
            return hook.scheduler
    return None


class LoadHook:
    """Load-state-dict post hook of the model and the optimizer, and the one-shot forward
    pre hook they arm: weights or state loaded after the scheduler exists are re-masked
    before the next forward (or ``pruner()`` / ``optimizer.step()``). Holds the
    scheduler weakly; a deep copy or an unpickled copy is a no-op (the copied scheduler
    registers its own)."""

    __slots__ = ("ref", "forward")

    def __init__(self, scheduler=None, forward: bool = False) -> None:
        self.ref = weakref.ref(scheduler) if scheduler is not None else None
        self.forward = forward

    def __call__(self, *args) -> None:
        sched = self.ref() if self.ref is not None else None
        if sched is not None:
            sched._on_load(forward=self.forward)

    def __deepcopy__(self, memo) -> "LoadHook":
        return LoadHook()

    def __reduce__(self):
        return (LoadHook, ())

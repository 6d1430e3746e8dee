"""Lifecycle checks and helpers of the rigl-torch compatibility shell (:mod:`rigl_func.scheduler`).

Not part of the algorithm: what a real training script does around the scheduler --
resuming in any order, ``GradScaler``, ``copy.deepcopy``/``pickle``, loading weights
after the scheduler exists, unsupported optimizers and models that are not
materialized. Each function either makes the case work or raises an error that says
what to do.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from rigl_func.config import _is_int
from rigl_func import _scheduler_utils as U
from rigl_func.masks import SPARSIFIABLE_MODULES

__all__ = [
    "check_format",
    "check_trainable",
    "check_same_hyperparams",
    "grad_marks",
    "no_new_grads",
    "follow_dtypes",
    "check_optimizer",
    "check_materialized",
    "check_dense_names",
    "no_layers_error",
    "check_checkpoint_fields",
    "Undo",
    "save_undo",
    "restore_undo_",
    "unscale_",
]


def check_optimizer(optimizer) -> None:
    """Raises TypeError for a non-optimizer, or an optimizer whose ``step(closure)``
    evaluates the model several times per step (LBFGS: masked gradients and state
    cannot be guaranteed between its inner evaluations)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got optimizer={type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError("optimizer=LBFGS is not supported: its step(closure) re-evaluates the model and updates "
                        "its history between pruner() calls, so inactive weights would receive nonzero updates; "
                        "use a first-order optimizer (SGD, Adam, AdamW, ...) or the functional API")


def check_materialized(params: Mapping[str, Tensor]) -> None:
    """Raises ValueError for sparse weights on the ``meta`` device (deferred init)."""
    meta = [n for n, p in params.items() if p.device.type == "meta"]
    if meta:
        raise ValueError(f"weights {meta} are on the meta device (deferred initialization): materialize the model "
                         "first (e.g. model.to_empty(device=...) and initialize the weights), then create the "
                         "RigLScheduler")


def check_dense_names(dense, names) -> None:
    """Raises ValueError when ``dense=`` names a weight that is not a parameter of the model
    (``names``: every parameter name, tied aliases included)."""
    unknown = [n for n in dense if n not in names]
    if unknown:
        raise ValueError(f"dense names weights that are not parameters of this model: {unknown} "
                         f"(candidates: {list(names)[:8]}), got dense={tuple(dense)!r}")


def no_layers_error(module: nn.Module) -> ValueError:
    """The error for a model without sparsifiable weights; names parametrized layers."""
    wrapped = [name or type(module).__name__ for name, m in module.named_modules()
               if isinstance(m, SPARSIFIABLE_MODULES) and "weight" not in m._parameters]
    hint = (f"; the layers {wrapped} have a parametrized weight (torch.nn.utils.parametrize, spectral_norm or "
            "weight_norm), which cannot be sparsified: remove the parametrization" if wrapped else "")
    return ValueError(f"model has no Linear or Conv layer to sparsify ({type(module).__name__}){hint}")


def check_checkpoint_fields(sd: Mapping) -> None:
    """Raises ValueError/TypeError naming the field and value of a malformed checkpoint."""
    for key in ("grad_acc", "ema", "key"):
        if key not in sd:
            raise ValueError(f"state_dict lacks the key {key!r} (written by every RigLScheduler.state_dict())")
    for key in ("grad_acc", "ema"):
        if not isinstance(sd[key], Mapping):
            raise TypeError(f"state_dict[{key!r}] must be a dict name -> tensor, got {type(sd[key]).__name__}")
    key = sd["key"]
    if not _is_int(key):
        raise TypeError(f"state_dict['key'] must be an int, got key={key!r}")
    if not -2**63 <= key < 2**63:
        raise ValueError(f"state_dict['key'] must fit in int64, got key={key!r}")
    step, rigl_steps = sd["step"], sd["rigl_steps"]
    if _is_int(step) and _is_int(rigl_steps) and rigl_steps > step:
        raise ValueError(f"state_dict['rigl_steps'] cannot exceed state_dict['step'], got rigl_steps={rigl_steps}, "
                         f"step={step}")


class Undo(NamedTuple):
    """What the constructor's initial masking overwrote, so that a checkpoint loaded next
    (model and optimizer loaded *before* the scheduler) is restored exactly. Only
    entries that nobody has written since (same ``_version``) are restored."""

    weights: list[tuple[Tensor, Tensor, int]]  # (live weight, copy before masking, _version after masking)
    state: list[tuple[Tensor, str, Tensor, Tensor, int]]  # (param, key, live state tensor, copy, _version)


def save_undo(params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer) -> Undo:
    """Copies of the weights and their weight-shaped optimizer state (before masking)."""
    weights = [(p, p.detach().clone(), 0) for p in params.values()]
    state = [(p, k, t, t.detach().clone(), 0) for p in params.values()
             for k, t in optimizer.state.get(p, {}).items() if isinstance(t, Tensor) and t.shape == p.shape]
    return Undo(weights, state)


def stamp_undo(undo: Undo) -> Undo:
    """Record the versions after masking: a later write (``model.load_state_dict``,
    ``optimizer.load_state_dict``, a training step) invalidates that entry."""
    return Undo([(p, c, p._version) for p, c, _ in undo.weights],
                [(p, k, t, c, t._version) for p, k, t, c, _ in undo.state])


@torch.no_grad()
def restore_undo_(undo: Optional[Undo], optimizer: torch.optim.Optimizer) -> None:
    """In place: put back what the initial masking zeroed, where nothing wrote since."""
    if undo is None:
        return
    for p, copy, version in undo.weights:
        if p._version == version:
            p.copy_(copy)
    for p, key, t, copy, version in undo.state:
        if optimizer.state.get(p, {}).get(key) is t and t._version == version:
            t.copy_(copy)


def unscale_(scaler, optimizer: torch.optim.Optimizer) -> None:
    """``scaler.unscale_(optimizer)`` unless the scaler is disabled or this optimizer's
    gradients were already unscaled since the last ``scaler.update()`` (the clipping
    pattern). Records the inf check, so ``scaler.update()`` works after a RigL step."""
    if scaler is None or not scaler.is_enabled():
        return
    from torch.amp.grad_scaler import OptState

    states = getattr(scaler, "_per_optimizer_states", {})
    if states.get(id(optimizer), {}).get("stage") is OptState.UNSCALED:
        return
    scaler.unscale_(optimizer)


def check_trainable(params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Raises ValueError for a frozen sparse weight or one missing from the optimizer."""
    in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, p in params.items():
        if not p.requires_grad:
            raise ValueError(f"weight {name!r} has requires_grad=False; RigL needs its gradient (unfreeze it, "
                             f"or keep it dense: dense=({name!r},))")
        if id(p) not in in_opt:
            raise ValueError(f"weight {name!r} is not in the optimizer's param_groups; pass the optimizer "
                             "that trains this model")


def check_format(sd) -> None:
    """Raises TypeError/ValueError for anything but a complete scheduler checkpoint."""
    if not isinstance(sd, Mapping):
        raise TypeError(f"state_dict must be a dict from RigLScheduler.state_dict(), got {type(sd).__name__}")
    if sd.get("format") != U.FORMAT:
        hint = (" (this looks like a rigl-torch checkpoint; its layout (backward_masks, no accumulators or "
                "random key) cannot be loaded: start from its model weights with a fresh RigLScheduler)"
                if "backward_masks" in sd else "")
        raise ValueError(f"state_dict is not a {U.FORMAT} checkpoint{hint}")
    for key in ("hyperparams", "masks", "step", "rigl_steps"):
        if key not in sd:
            raise ValueError(f"state_dict lacks the key {key!r}")
    check_checkpoint_fields(sd)


def grad_marks(params: Mapping[str, Tensor]) -> list:
    """(weak reference, version) of every gradient: tells gradients written since apart."""
    return [(weakref.ref(p.grad), p.grad._version) if p.grad is not None else None for p in params.values()]


def no_new_grads(params: Mapping[str, Tensor], last) -> bool:
    """``pruner()`` was called and no backward reached the sparse weights since its last
    call: true when every gradient is None, when the last call followed a backward
    (``last == "backward"``: a second call in the same iteration), or when the
    gradients are the objects and versions ``grad_marks`` saw at the last call
    (gradients written by hand count as new)."""
    if not params:
        return False
    if all(p.grad is None for p in params.values()) or last == "backward":
        return True
    same = lambda a, b: (a is None and b is None) or (a is not None and b is not None  # noqa: E731
                                                      and a[0]() is b[0]() and a[1] == b[1])
    return last is not None and all(same(a, b) for a, b in zip(grad_marks(params), last))


def follow_dtypes(state, groups, params: Mapping[str, Tensor]):
    """After ``model.half()`` / ``.to(dtype)``: the accumulators and mask groups follow the
    weights' dtype. Returns ``(state, groups)`` (the inputs when nothing changed;
    Python checks only)."""
    if all(g.zero.dtype == params[g.names[0]].dtype for g in groups) and all(
            t.dtype == params[n].dtype for tree in (state.grad_acc, state.ema) for n, t in tree.items()):
        return state, groups
    masks, groups = U.pack_masks(state.masks, params)
    return state._replace(masks=masks, grad_acc={n: t.to(params[n].dtype) for n, t in state.grad_acc.items()},
                          ema={n: t.to(params[n].dtype) for n, t in state.ema.items()}), groups


def check_same_hyperparams(hp: Mapping, saved: Mapping) -> None:
    """Raises ValueError listing every hyperparameter a checkpoint was saved with otherwise."""
    saved = U.saved_hyperparams(saved)
    diff = [f"{k}: scheduler {hp[k]!r} vs state_dict {saved.get(k)!r}" for k in U.HYPERPARAMS if saved.get(k) != hp[k]]
    if diff:
        raise ValueError("state_dict was saved with other hyperparameters: " + "; ".join(diff))

"""``RigLScheduler``: rigl-torch 0.5.2's two-line drop-in, as a thin shell over the core.

For users of rigl-torch (McCrearyD/rigl-torch): change only the import line::

    pruner = RigLScheduler(model, optimizer, dense_allocation=0.1, T_end=T_end, delta=100)
    ...
    loss.backward()
    if pruner():            # False on a RigL step: the update replaces optimizer.step()
        optimizer.step()

The scheduler holds a :class:`rigl_func.RigLConfig` and a :class:`rigl_func.RigLState`
and calls the pure core (:func:`rigl_func.accumulate`, :func:`rigl_func.is_update_step`,
:func:`rigl_func.update_topology`, Evci et al. 2020, Sec. 3 / Algorithm 1); the in-place
edits of the live model and optimizer are the only thing it adds.

Mechanics (no monkey-patching of ``optimizer.step``):

* The masks of each (device, dtype) are packed into one flat bool buffer whenever they
  change (init, load, update); the state's per-layer masks are views of it, so this
  costs no memory. Every masking pass is batched over all layers: pack the tensors
  (``torch._chunk_cat``), one ``torch.where(flat_mask, flat, zero, out=flat)`` with a
  cached 0-d zero, one same-dtype ``torch._foreach_copy_`` back -- three kernel
  launches however many layers.
* One ``register_post_accumulate_grad_hook`` object on every sparse weight: the first
  time it fires in a backward it queues one end-of-backward callback
  (``Variable._execution_engine.queue_callback``); later firings only read a flag
  (no tensor work). The callback masks all gradients at inactive entries in one
  batched pass -- except on the iterations whose dense gradient an update needs (the
  update step and the ``grad_accumulation_n - 1`` before it). There the gradient is
  left dense and read *lazily* in ``__call__``, after ``backward()`` has returned;
  under DDP that is after the all-reduce, so every rank decides on the same averaged
  gradient. No dense copy is kept: with ``grad_accumulation_n == 1`` the update reads
  ``param.grad`` itself, with more the core's running mean is the only buffer.
  ``__call__`` masks the gradients where the callback did not (dense iterations,
  update steps, no callback since the last call) and, under ``torch.distributed``,
  again on every call, so they are zero at inactive entries after every call
  whatever the hook order inside DDP. Gradients are masked (users clip them between
  ``backward()`` and ``pruner()``; the invariant tests hold them zero).
* ``optimizer.register_step_post_hook``: when the optimizer provably keeps zeros
  (SGD, Adam/AdamW with ``eps > 0``: :func:`rigl_func.optim.preserves_zeros`) and the
  gradients were masked, an entry whose weight, gradient and state are 0 stays 0, so
  nothing is re-masked. Otherwise (another optimizer, or ``optimizer.step()`` after a
  backward that :meth:`__call__` has not seen) the inactive weights are re-zeroed,
  and the optimizer state too.

A steady-state (non-update) SGD/Adam step therefore costs 3 + 1 kernel launches
(grad masking, the step counter), independent of the number of layers, and no host
sync (``tests/test_masking_launches.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor, nn  # noqa: F401  (nn: used by the doctest)

from rigl_func import _scheduler_checks as C
from rigl_func._scheduler_hooks import GradMaskHook, LoadHook, registered_to
from rigl_func import _scheduler_utils as U
from rigl_func.config import RigLConfig
from rigl_func.masks import sparse_candidates, sparse_param_names, target_sparsities
from rigl_func.optim import mask_torch_optimizer_state_, preserves_zeros, reset_torch_optimizer_state_
from rigl_func.schedules import is_update_step
from rigl_func.state import RigLState, check_state, init_state
from rigl_func.topology import accumulate, update_topology

__all__ = ["RigLScheduler"]

def _hp_property(key: str, doc: str) -> property:
    return property(lambda self: self._hp[key], doc=doc)


class RigLScheduler:
    """rigl-torch-compatible RigL scheduler (same constructor, same call protocol).

    Args:
        model: the ``nn.Module`` (also wrapped in DDP / DataParallel / ``torch.compile``).
            Sparse layers: the one rule of :func:`rigl_func.sparse_param_names` (the
            weights of ``nn.Linear`` and ``nn.Conv{1,2,3}d``; never biases, norms,
            embeddings or frozen weights unless ``include=`` names them), then
            ``ignore_linear_layers`` and the uniform first-layer rule.
        optimizer: a ``torch.optim`` optimizer holding the sparse weights.
        dense_allocation: fraction of weights kept, in (0, 1]; our ``sparsity`` is
            ``1 - dense_allocation``.
        T_end: step from which the topology is frozen (required, > 0).
        sparsity_distribution: ``'uniform'`` (first layer dense when there are several,
            as in rigl-torch), ``'erk'`` or ``'er'``.
        ignore_linear_layers: keep every ``nn.Linear`` dense (rigl-torch's default: True).
        delta: steps between topology updates (> 0).
        alpha: initial drop fraction, cosine-annealed to 0 at ``T_end``.
        static_topo: never change the masks (static sparse training).
        grad_accumulation_n: number of most recent iterations whose dense gradients are
            averaged for growth, in [1, delta).
        state_dict: a :meth:`state_dict` to resume from. Arguments left at their
            defaults are taken from it (as rigl-torch does); explicit ones must agree.
        seed: keyword-only; seed of the random initial masks and of SET's random
            growth (same seed -> same masks on every process; under
            ``torch.distributed`` rank 0's are broadcast).
        grow: keyword-only; the grow criterion: ``"gradient"`` (RigL, default),
            ``"random"`` (SET) or ``"ema"`` (SNFS: EMA of dense gradients, momentum 0.9).
        include, exclude, dense: keyword-only; the :class:`RigLConfig` layer rules
            (``include`` regexes add weights, e.g. ``in_proj_weight``; ``exclude`` regexes
            and ``dense`` exact names remove them).
        fused_splits: keyword-only; :class:`RigLConfig`'s ``fused_splits`` (``{regex: k}``):
            a fused QKV weight counts as ``k`` row-block layers (:mod:`rigl_func.fused`).
        grad_scaler: keyword-only; the ``torch.amp.GradScaler`` of the loop. On the
            iterations that feed an update ``pruner()`` unscales the gradients
            (``scaler.unscale_(optimizer)``), so the update sees true gradients and
            ``scaler.update()`` works after a RigL step.

    Attributes:
        W: the sparsifiable weights (list of ``nn.Parameter``), model order.
        backward_masks: bool masks aligned with ``W``; ``None`` for dense layers.
        S: target sparsity per layer of ``W`` (0.0 for dense ones). N: numel per layer.
        step: calls so far. rigl_steps: topology updates so far.
        config: the :class:`RigLConfig`. state: the current :class:`RigLState`.

    Raises:
        TypeError/ValueError: a bad argument (the message names it and its value), a
            model without Linear/Conv layers, sparse weights that are frozen or not in
            the optimizer, a ``state_dict`` from another model or configuration.
        RuntimeError: a weight of ``model`` is already registered with a scheduler
            (call :meth:`remove` on that one first).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> pruner = RigLScheduler(net, opt, dense_allocation=0.25, T_end=75, delta=10,
        ...                        sparsity_distribution="erk", ignore_linear_layers=False)
        >>> [None if m is None else int(m.sum()) for m in pruner.backward_masks]
        [27, 22]
        >>> for _ in range(10):
        ...     opt.zero_grad()
        ...     net(torch.randn(4, 8)).pow(2).mean().backward()
        ...     if pruner():
        ...         opt.step()
        >>> pruner.step, pruner.rigl_steps
        (10, 1)
        >>> pruner.remove()
    """

    def __init__(self, model, optimizer, dense_allocation=1, T_end=None, sparsity_distribution="uniform",
                 ignore_linear_layers=True, delta=100, alpha=0.3, static_topo=False, grad_accumulation_n=1,
                 state_dict=None, *, seed: int = 0, grow: str = "gradient", include=(), exclude=(), dense=(),
                 fused_splits=(), grad_scaler=None):
        module = U.unwrap_model(model)
        C.check_optimizer(optimizer)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got seed={seed!r}")
        hp = dict(dense_allocation=dense_allocation, T_end=T_end, sparsity_distribution=sparsity_distribution,
                  ignore_linear_layers=ignore_linear_layers, delta=delta, alpha=alpha, static_topo=static_topo,
                  grad_accumulation_n=grad_accumulation_n, grow=grow, include=include, exclude=exclude, dense=dense,
                  fused_splits=fused_splits)
        if state_dict is not None:
            C.check_format(state_dict)
            hp = U.resolve_hyperparams(hp, state_dict["hyperparams"])
        self._hp = U.check_hyperparams(hp)

        all_params = dict(module.named_parameters())
        modules = dict(module.named_modules())
        # W: what the rule can make sparse (Linear/Conv weights, frozen ones too, and what
        # include= adds); the sparse set is the one rule's (rigl_func.sparse_param_names).
        self.layer_names = sparse_candidates(module, RigLConfig(t_end=3, delta=2, include=self._hp["include"]))
        if not self.layer_names:
            raise C.no_layers_error(module)
        C.check_dense_names(self._hp["dense"], [n for n, _ in module.named_parameters(remove_duplicate=False)])
        for name in self.layer_names:
            if registered_to(all_params[name]) is not None:
                raise RuntimeError(f"model is already registered with a RigLScheduler (weight {name!r} has its "
                                   "hooks); call .remove() on the old scheduler before creating a new one")
        owners = {n: modules[n.rpartition(".")[0]] for n in self.layer_names}
        frozen = frozenset(n for n in self.layer_names if not all_params[n].requires_grad)
        self.config = U.make_config(self._hp, owners, frozen=frozen)
        self._params = {n: all_params[n] for n in sparse_param_names(module, self.config)}
        C.check_materialized(self._params)
        C.check_trainable(self._params, optimizer)
        self.model, self.optimizer, self.seed, self._module = model, optimizer, seed, module
        self.grad_scaler = grad_scaler
        # _stale: weights/state loaded after the scheduler, not yet re-masked (_fwd: the
        # one-shot forward pre hook that does it). _undo: what the initial masking zeroed.
        self._stale, self._fwd, self._undo = False, None, None
        self.W = [all_params[n] for n in self.layer_names]
        self.N = [w.numel() for w in self.W]
        shapes = {n: tuple(p.shape) for n, p in self._params.items()}
        sparsities = target_sparsities(shapes, self.config) if shapes else {}
        self.S = [float(sparsities.get(n, 0.0)) for n in self.layer_names]

        step_device = next(iter(all_params.values())).device
        if state_dict is not None:
            self._set_state(state_dict, step_device)
        else:
            undo = C.save_undo(self._params, optimizer)
            self._install(init_state(module, self.config, seed=seed), 0, 0)
            self._undo = C.stamp_undo(undo)  # freed by the first backward, pruner() or step
        self._queued: Optional[int] = None  # graph task whose end-of-backward callback is pending
        # _fresh: a backward reached the sparse weights since the last call; _marks: the
        # gradients (object, version) at the last call that saw none.
        self._fresh, self._marks = False, None
        self._attach()

    def _attach(self) -> None:
        hook, load = GradMaskHook(self), LoadHook(self)
        self._handles = [p.register_post_accumulate_grad_hook(hook) for p in self._params.values()]
        self._handles += [self.optimizer.register_step_post_hook(self._after_optimizer_step),
                          self._module.register_load_state_dict_post_hook(load),
                          self.optimizer.register_load_state_dict_post_hook(load)]

    def __getstate__(self) -> dict:
        # copy.deepcopy / pickle: hooks are not copied; __setstate__ registers the copy's
        # own on the copied model and optimizer (copy them together: deepcopy((model, opt, pruner))).
        state = dict(self.__dict__)
        state.update(_handles=[], _fwd=None, _undo=None, _queued=None,
                     _marks=self._marks if self._marks == "backward" else None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if any(registered_to(p) is not None for p in self._params.values()):
            raise RuntimeError("the copied model's weights are already registered with a RigLScheduler")
        self._attach()

    # ------------------------------------------------------------------ setup
    def _set_state(self, sd: Mapping, step_device: torch.device, undo: Optional[C.Undo] = None) -> None:
        params = {n: w for n, w in zip(self.layer_names, self.W)}
        if list(sd.get("layers", self.layer_names)) != self.layer_names:
            raise ValueError(f"state_dict was saved for layers {list(sd['layers'])} but this model has "
                             f"{self.layer_names}: the checkpoint is from a different model")
        state, step, rigl_steps = U.state_from_dict(sd, params, self.config, step_device, sparse=list(self._params))
        self._install(state, step, rigl_steps, undo)

    def _install(self, state: RigLState, step: int, rigl_steps: int, undo: Optional[C.Undo] = None) -> None:
        """Broadcast rank 0's masks (under torch.distributed), validate, and make the
        model and optimizer obey them."""
        state = state._replace(masks=U.broadcast_masks(state.masks))
        try:
            check_state(state, {n: w for n, w in zip(self.layer_names, self.W)}, self.config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"state does not fit this model/config: {err}") from err
        C.restore_undo_(undo, self.optimizer)
        masks, self._groups = U.pack_masks(state.masks, self._params)
        self._state, self._step, self._rigl_steps = state._replace(masks=masks), step, rigl_steps
        self._refresh()
        self._stale = True
        self._remask_()
        U.mask_grads_(self._params, self._groups)
        # _clean: the gradients are masked and no optimizer state or weight has seen an
        # unmasked one, so a zero-preserving optimizer step keeps inactive entries 0.
        # _masked: a callback masked the gradients since the last __call__.
        self._clean, self._masked = True, False

    def _refresh(self) -> None:
        # Python mirror of "does the next iteration need dense grads": no device sync.
        self._dense_next = (not self.static_topo and bool(self._params)
                            and U.needs_dense_grads(self._step + 1, self.config))

    def remove(self) -> None:
        """Detach from the model and optimizer (hooks removed); masks stay applied."""
        for handle in self._handles + ([self._fwd] if self._fwd is not None else []):
            handle.remove()
        self._handles, self._fwd = [], None

    def _on_load(self, forward: bool) -> None:
        """LoadHook: the model's or optimizer's ``load_state_dict`` ran (arm a one-shot
        forward pre hook; ``pruner()``, the step hook or ``load_state_dict`` may come
        first), or that forward pre hook fired (re-mask now)."""
        if forward:
            self._remask_()
            return
        self._stale, self._clean = True, False
        if self._fwd is None:
            self._fwd = self._module.register_forward_pre_hook(LoadHook(self, forward=True))

    @torch.no_grad()
    def _remask_(self) -> None:
        """Zero weights and optimizer state at inactive entries if something loaded them."""
        if self._fwd is not None:
            self._fwd.remove()
            self._fwd = None
        if self._stale:
            self._stale = False
            U.mask_weights_(self._params, self._groups)
            mask_torch_optimizer_state_(self.optimizer, self._params, self._state.masks)

    # ------------------------------------------------------------------ training
    def __call__(self) -> bool:
        """Count one iteration; on an update step perform the RigL update.

        Returns:
            ``False`` on a RigL step (the update replaced the optimizer step: do not
            call ``optimizer.step()``), ``True`` otherwise.
        """
        self._remask_()
        self._undo = None
        if not self._fresh and C.no_new_grads(self._params, self._marks):
            warnings.warn("pruner() was called without a backward since its last call (or every gradient is None): "
                          "the call is skipped -- not counted, topology unchanged. Call it once per iteration, "
                          "after loss.backward()", UserWarning, stacklevel=2)
            return True
        if self._fresh:
            self._fresh, self._marks = False, "backward"
        dense = self._dense_next  # this iteration's gradients were left dense for the update
        masked, pending = self._masked, self._queued is not None  # pending: a backward raised
        self._masked, self._queued = False, None
        do_update = (not self.static_topo and bool(self._params)
                     and bool(is_update_step(self._step + 1, self.config)))
        if dense or do_update:
            C.unscale_(self.grad_scaler, self.optimizer)
            self._state, self._groups = C.follow_dtypes(self._state, self._groups, self._params)
        if dense:
            grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in self._params.items()}
            self._state = accumulate(self._state, grads, self.config)
        else:
            # Outside the accumulation window (and without SNFS's EMA) accumulate() only
            # counts the step; with a static topology nothing reads what it would fold
            # in. Either way: skip its per-layer pass over the gradients.
            self._state = self._state._replace(step=self._state.step + 1)
        self._step += 1
        # No sparse layer (dense_allocation=1): nothing to update, so never skip the
        # optimizer step (rigl-torch returns False every delta steps even then).
        if do_update:
            if not dense:  # not reached with the core's schedules (an update step is in its window)
                grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in self._params.items()}
            self._rigl_step_(grads)
        # The callback already masked this backward's gradients unless they were left
        # dense, no callback ran (no backward, or it raised), or an all-reduce (DDP) may
        # have run after it: mask (again) only then.
        if do_update or dense or not masked or pending or U.is_distributed():
            U.mask_grads_(self._params, self._groups)
        self._clean = True
        self._refresh()
        if self._marks != "backward":  # gradients written by hand: remember them (after masking)
            self._marks = C.grad_marks(self._params)
        return not do_update

    @torch.no_grad()
    def _end_of_backward(self) -> None:
        """Queued by the grad hook; runs once at the end of a backward pass."""
        self._queued = None
        # Under torch.distributed an all-reduce (DDP, possibly on bucket views of these very
        # gradients) may still be in flight: leave them alone, __call__ masks them after it.
        if not self._dense_next and not U.is_distributed():
            U.mask_grads_(self._params, self._groups)
            self._clean = self._masked = True

    @torch.no_grad()
    def _rigl_step_(self, grads: Mapping[str, Tensor]) -> None:
        old_masks = self._state.masks
        params = {n: p.detach() for n, p in self._params.items()}
        new_params, self._state = update_topology(params, grads, self._state, self.config)
        masks, self._groups = U.pack_masks(self._state.masks, self._params)
        self._state = self._state._replace(masks=masks)
        torch._foreach_copy_(list(self._params.values()), [new_params[n] for n in self._params])
        reset_torch_optimizer_state_(self.optimizer, self._params, old_masks, masks)
        self._rigl_steps += 1

    @torch.no_grad()
    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        # Weights and state are zero at inactive entries after __init__, load_state_dict
        # and every update (reset_torch_optimizer_state_); with masked gradients
        # SGD/Adam/AdamW keep both zero (0 * anything finite, lr * 0 / (0 + eps)), so
        # re-masking them would be wasted passes (tests/test_scheduler.py's invariant
        # tests check weights, grads and moments after every step).
        self._undo = None
        if self._clean and preserves_zeros(optimizer):
            return
        self._stale = False
        U.mask_weights_(self._params, self._groups)
        mask_torch_optimizer_state_(optimizer, self._params, self._state.masks)

    # rigl-torch's public helpers, for scripts that call them.
    def apply_mask_to_weights(self) -> None:
        """In place: zero inactive weights."""
        U.mask_weights_(self._params, self._groups)

    def apply_mask_to_gradients(self) -> None:
        """In place: zero the gradients of inactive weights."""
        U.mask_grads_(self._params, self._groups)

    def reset_momentum(self) -> None:
        """In place: zero the optimizer state (momentum, Adam moments) at inactive entries."""
        mask_torch_optimizer_state_(self.optimizer, self._params, self._state.masks)

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> RigLState:
        """The current core state (immutable; replaced, never edited in place)."""
        return self._state

    @property
    def step(self) -> int:
        """Number of calls so far (rigl-torch's ``step``)."""
        return self._step

    @property
    def rigl_steps(self) -> int:
        """Number of topology updates so far."""
        return self._rigl_steps

    @property
    def backward_masks(self) -> list[Optional[Tensor]]:
        """Bool masks aligned with :attr:`W`; ``None`` for dense layers."""
        return [self._state.masks.get(n) for n in self.layer_names]

    dense_allocation = _hp_property("dense_allocation", "Fraction of weights kept, in (0, 1].")
    T_end = _hp_property("T_end", "Step from which the topology is frozen.")
    delta_T = _hp_property("delta", "Steps between topology updates (rigl-torch's name).")
    delta = _hp_property("delta", "Steps between topology updates.")
    alpha = _hp_property("alpha", "Initial drop fraction.")
    sparsity_distribution = _hp_property("sparsity_distribution", "'uniform', 'erk' or 'er'.")
    static_topo = _hp_property("static_topo", "Whether the topology is frozen.")
    grad_accumulation_n = _hp_property("grad_accumulation_n", "Iterations averaged for growth.")
    ignore_linear_layers = _hp_property("ignore_linear_layers", "Whether Linear layers stay dense.")

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: masks, accumulators, counters, and the
        hyperparameters (checked on load). Tensors are shared, not copied: the
        scheduler replaces them, never edits them in place. Save it with ``torch.save``."""
        return {
            "format": U.FORMAT,
            "hyperparams": {k: v for k, v in self._hp.items()
                            if v != () or k not in ("include", "exclude", "dense", "fused_splits")},
            "layers": list(self.layer_names),
            "N": list(self.N),
            "S": list(self.S),
            "masks": dict(self._state.masks),
            "grad_acc": dict(self._state.grad_acc),
            "ema": dict(self._state.ema),
            "key": int(self._state.key),
            "step": self._step,
            "rigl_steps": self._rigl_steps,
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore a :meth:`state_dict`; the weights and optimizer state are re-masked.

        Load the model's weights and the optimizer too, before or after, in any order:
        the result is bitwise that of the uninterrupted run (weights zeroed by the
        constructor's initial masking are put back, if nothing wrote them since).
        Under ``torch.distributed`` this is a collective (rank 0's masks are
        broadcast): call it on every rank.

        Raises:
            ValueError: the checkpoint's hyperparameters differ from this scheduler's
                (every difference is listed), or it is from a different model.
        """
        C.check_format(state_dict)
        C.check_same_hyperparams(self._hp, state_dict["hyperparams"])
        undo, self._undo = self._undo, None  # model/optimizer loaded before the scheduler existed
        self._set_state(state_dict, self._state.step.device, undo)

    # ------------------------------------------------------------------ printing
    def __str__(self) -> str:
        return U.describe(self.layer_names, self.W, self._state.masks, self._hp, self._step, self._rigl_steps)

    def __repr__(self) -> str:
        return (f"RigLScheduler(layers={len(self.W)}, dense_allocation={self._hp['dense_allocation']}, "
                f"sparsity_distribution={self._hp['sparsity_distribution']!r}, step={self._step}, "
                f"rigl_steps={self._rigl_steps})")

"""One call per training iteration: RigL folded into a pure functional optimizer.

``tx = rigl(config, sgd(0.1, momentum=0.9))`` is, in the spirit of an optax
``GradientTransformation``, a pair of pure functions:

* ``params, state = tx.init(model, seed=0)``: random masks with the exact nnz of the
  config, masked params, the optimizer's state and a step counter;
* ``params, state = tx.step(params, grads, state)``: one training iteration, given the
  *dense* gradients. It runs :func:`rigl_func.accumulate`; then, at an update step
  (:func:`rigl_func.is_update_step`), the topology update
  (:func:`rigl_func.update_topology`: drop, grow, grow-init) and the optimizer-state
  reset of new connections (:func:`rigl_func.reset_optimizer_state`) *instead of* the
  optimizer step, as Evci et al. (2020, Alg. 1) and google-research/rigl do; at every
  other step the optimizer step on masked gradients.

The primitives stay public: ``tx.step`` is exactly the four-call loop of
``docs/api.md`` (tested bit for bit).

**Deciding "update or not" without a host sync.** ``state.count`` is the step counter
(iterations seen, equal to ``state.rigl.step``) kept as a 0-d int64 *CPU* tensor, so
reading it never waits for the GPU. Eager, ``tx.step`` reads it and runs one branch in
Python. Under ``torch.compile`` the branch is a ``torch.cond`` on a predicate computed
on the CPU: one graph holds both branches, nothing recompiles when the step changes,
and the compiled code reads a CPU value only. Under ``torch.func.vmap`` over K models
the K counters must agree (they do when the K states advance together); the branch is
then taken once for all K.

**Plugging in another optimizer.** Any object with ``init(params) -> opt_state`` and
``step(params, grads, opt_state, masks) -> (params, opt_state)`` works
(:class:`rigl_func.SGD`, :class:`rigl_func.AdamW`, or
:func:`rigl_func.custom_optimizer` around two plain functions). Its state must be a
pytree whose per-parameter tensors sit in dicts keyed by parameter name (as
``torch.func`` trees are), so the reset finds them. The optimizer's moments are not
passed to criteria on their own: they are masked (zero at every inactive entry), so a
growth criterion reading them would regrow what it dropped; pass what a criterion needs
as ``aux`` (e.g. a momentum of the *dense* gradients), or use ``state.rigl.ema``
(``RigLConfig(ema_momentum=...)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from rigl_func.config import RigLConfig
from rigl_func.masks import apply_masks
from rigl_func.optim import reset_optimizer_state
from rigl_func.schedules import is_update_step
from rigl_func.state import RigLState, init_state
from rigl_func._tx_checks import check_step_inputs
from rigl_func.topology import _update_topology, accumulate

__all__ = ["RigLOptimizer", "RigLOptimizerState", "rigl"]


class RigLOptimizerState(NamedTuple):
    """State of :class:`RigLOptimizer`.

    Attributes:
        rigl: the :class:`rigl_func.RigLState` (masks, accumulators, key) on the
            params' device.
        opt: the optimizer's state pytree.
        count: shape=(), int64, on the CPU: training iterations seen, the one step
            counter (equal to ``rigl.step``, which lives on the params' device; this copy
            decides "update or not" without a device sync).
    """

    rigl: RigLState
    opt: Any
    count: Tensor  # shape=(), int64, CPU


def _is_wrapped(t: Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _host_bool(pred: Tensor) -> bool:
    """``bool(pred)`` for a CPU predicate, also inside ``torch.func.vmap``: the K
    batched values are read from the unwrapped CPU tensor and must agree."""
    t = pred
    while _is_wrapped(t):
        t = torch._C._functorch.get_unwrapped(t)
    if t.device.type != "cpu":  # pragma: no cover - count is checked to be on the CPU
        raise ValueError(f"state.count must be a CPU tensor, got one on {t.device}")
    if t.dim() == 0:
        return bool(t)
    values = t.reshape(-1).tolist()
    if len(set(values)) > 1:
        raise ValueError("the states vmapped over are at different steps (state.count differs across the batch), "
                         "so some would update and some would not: step K models together from states "
                         "created together (rigl_func.stack_states of fresh tx.init states)")
    return bool(values[0]) if values else False


def _own(leaves: list[Tensor]) -> list[Tensor]:
    """Tensors with storage of their own (no view of a shared flat buffer, no input
    passed through), so they can be the operands and outputs of ``torch.cond``.

    Compiled: ``where(True, t, t)``. (``clone`` would be removed by inductor's no-op
    pass, which compares sizes and strides but not storage offsets, and ``torch.cond``
    then rejects branches whose outputs differ in storage offset.) Eager: views are
    copied with one multi-tensor copy; other tensors pass through (eager code may alias).
    """
    if torch.compiler.is_compiling():
        return [torch.where(torch.ones((), dtype=torch.bool, device=t.device), t, t) for t in leaves]
    out = list(leaves)
    views = [i for i, t in enumerate(leaves) if _is_wrapped(t) or t._base is not None]
    if not views:
        return out
    if _is_wrapped(leaves[views[0]]):
        for i in views:
            out[i] = leaves[i].clone()
        return out
    fresh = [torch.empty_like(leaves[i], memory_format=torch.contiguous_format) for i in views]
    torch._foreach_copy_(fresh, [leaves[i] for i in views])
    for i, t in zip(views, fresh):
        out[i] = t
    return out


def _own_tree(tree: Any) -> Any:
    leaves, spec = pytree.tree_flatten(tree)
    return pytree.tree_unflatten(_own(leaves), spec)


def _check_optimizer(optimizer: Any) -> None:
    for method in ("init", "step"):
        if not callable(getattr(optimizer, method, None)):
            raise TypeError("optimizer must have init(params) and step(params, grads, state, masks) methods "
                            f"(rigl_func.sgd, rigl_func.adamw, rigl_func.custom_optimizer), got optimizer={optimizer!r}")


@dataclass(frozen=True)
class RigLOptimizer:
    """RigL and a pure optimizer as one ``init`` / ``step`` pair (see the module doc).

    Build it with :func:`rigl`. Frozen and hashable, so ``torch.compile`` treats it as
    a constant.

    Attributes:
        config: the RigL config.
        optimizer: a pure optimizer (``init`` / ``step(params, grads, state, masks)``).
        engine: the update engine of :func:`rigl_func.update_topology`.
        debug: run the value checks of :func:`rigl_func.update_topology` on accelerators
            too (each costs a host sync there).
    """

    config: RigLConfig
    optimizer: Any
    engine: str = "auto"
    debug: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.config, RigLConfig):
            raise TypeError(f"config must be a RigLConfig, got config={self.config!r}")
        _check_optimizer(self.optimizer)
        if self.engine not in ("auto", "batched", "per_layer"):
            raise ValueError(f"engine must be 'auto', 'batched' or 'per_layer', got engine={self.engine!r}")
        if not isinstance(self.debug, bool):
            raise TypeError(f"debug must be a bool, got debug={self.debug!r}")

    def init(
        self,
        model_or_params: Union[nn.Module, Mapping[str, Tensor]],
        *,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        masks: Optional[Mapping[str, Tensor]] = None,
    ) -> tuple[dict[str, Tensor], RigLOptimizerState]:
        """Masks, masked params and the optimizer's state.

        Args:
            model_or_params: an ``nn.Module`` (the module rule of
                :func:`rigl_func.sparse_param_names` picks the sparse weights, as in
                :func:`rigl_func.init_state`; tied weights appear once) or a
                ``dict[str, Tensor]`` of params (the dict rule).
            seed, generator, masks: exactly one, as in :func:`rigl_func.init_state`.

        Returns:
            ``(params, state)``: detached params (``dict[str, Tensor]``, each with its
            own storage) with inactive entries 0, and a :class:`RigLOptimizerState` at
            ``count == 0``. Pure: the model is not modified.
        """
        params = dict(model_or_params.named_parameters()) if isinstance(model_or_params, nn.Module) \
            else dict(model_or_params)
        # The module itself, not its params dict: the module rule picks the sparse weights
        # (rigl_func.sparse_param_names), exactly as init_state(model) and RigLScheduler do.
        rigl_state = init_state(model_or_params, self.config, seed=seed, generator=generator, masks=masks)
        masked = apply_masks({k: v.detach() for k, v in params.items()}, rigl_state.masks)
        params = {k: v.clone(memory_format=torch.contiguous_format) for k, v in masked.items()}
        rigl_state = rigl_state._replace(masks={k: m.clone() for k, m in rigl_state.masks.items()})
        count = torch.zeros((), dtype=torch.int64)  # shape=(), int64, CPU
        return params, RigLOptimizerState(rigl=rigl_state, opt=self.optimizer.init(params), count=count)

    def is_update_step(self, state: RigLOptimizerState) -> bool:
        """Whether the next :meth:`step` (or :meth:`step_ensemble`: the K counters must
        agree) updates the topology. Reads the CPU counter: free."""
        if state.count.dim() == 0 and not _is_wrapped(state.count):
            return bool(is_update_step(int(state.count) + 1, self.config))
        return _host_bool(is_update_step(state.count + 1, self.config))

    def step(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        state: RigLOptimizerState,
        aux: Optional[Mapping[str, Mapping[str, Tensor]]] = None,
    ) -> tuple[dict[str, Tensor], RigLOptimizerState]:
        """One training iteration (see the module doc).

        Args:
            params: ``dict[str, Tensor]`` (inactive entries 0; from :meth:`init` or the
                previous step).
            grads: the *dense* gradients w.r.t. ``params`` (e.g. ``torch.func.grad``),
                same keys. Do not mask them: the optimizer step masks them, and RigL
                grows where the dense gradient is large.
            state: from :meth:`init` or the previous step.
            aux: named trees for custom criteria (``update_topology``'s ``aux``),
                e.g. ``{"momentum": m}``. Under ``torch.compile`` they must not be
                tensors of ``state`` itself (``torch.cond`` rejects repeated operands).

        Returns:
            ``(params, state)``, new. Pure: inputs are not modified. Returned tensors
            do not share storage (``torch.compile`` requires it of ``torch.cond``
            operands, see ``docs/sharp_bits.md``).

        Raises:
            TypeError: ``state`` is not a :class:`RigLOptimizerState`; ``params``/``grads``
                are not dicts; a gradient is ``None`` (named: pass zeros for a parameter
                that gets no gradient).
            ValueError: ``state.count`` is not a 0-d int64 CPU tensor, or it disagrees
                with ``state.rigl.step`` (checked where reading both is free); ``grads``
                lacks a key of ``params`` or has one it lacks (only those names); a
                parameter's shape or device differs from its mask's (``tx.init``'s); a
                missing or incomplete ``aux`` tree that a criterion declares.
            rigl_func.MissingExtrasError: a criterion reads an extras key nobody passes.

        The input checks run eagerly at the first call (``state.count == 0``), at update
        steps, at every step with ``debug=True`` and after any error of an eager step;
        never under ``torch.compile`` (``docs/bad_inputs.md``).
        """
        self._check_state(state, batched=False)
        if not torch.compiler.is_compiling():  # under vmap(tx.step) the K counters must agree
            update = self.is_update_step(state)
            return self._eager(params, grads, state, aux, update, "tx.step", False,
                               lambda *ops: self._step_given(*ops, update=update))
        operands = (dict(params), dict(grads), state, self._aux(aux))
        pred = is_update_step(state.count + 1, self.config)  # shape=(), bool, CPU
        if torch._C._functorch.is_batchedtensor(pred):
            # A compiled vmap(tx.step): torch.cond cannot branch on a batched predicate
            # (its vmap rule selects a single output), so both branches run and each
            # model takes its own. step_ensemble branches once for all K models.
            upd, trn = (self._step_given(*operands, update=u) for u in (True, False))
            where = pred.to(next(iter(params.values())).device) if params else pred
            return pytree.tree_map(lambda a, b: torch.where(where, a, b), upd, trn)
        return self._cond(pred, lambda *ops, update: self._step_given(*ops, update=update), operands)

    def step_ensemble(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        state: RigLOptimizerState,
        aux: Optional[Mapping[str, Mapping[str, Tensor]]] = None,
    ) -> tuple[dict[str, Tensor], RigLOptimizerState]:
        """One training iteration of K models at once: ``torch.func.vmap(tx.step)``
        with the update-or-not branch taken once for all K.

        Args:
            params, grads, state, aux: as in :meth:`step`, every tensor stacked along a
                leading ``K`` dimension (:func:`rigl_func.stack_states`; grads from
                ``vmap(grad(loss))``). The K counters must agree (states initialized
                together and stepped together).

        Returns:
            ``(params, state)``, stacked. Equal to a loop of :meth:`step` over the K
            models (tested bit for bit). Under ``torch.compile(fullgraph=True)`` one
            ``torch.cond`` on ``state.count[0]`` picks the branch: no recompiles, no
            syncs, and the update runs only at update steps (a compiled
            ``vmap(tx.step)`` has to run it at every step).

        Raises:
            ValueError: ``state.count`` is not a ``[K]`` int64 CPU tensor, or (eager) its
                K values differ.
        """
        self._check_state(state, batched=True)

        def vmapped(*ops, update):
            return torch.func.vmap(lambda *o: self._step_given(*o, update=update))(*ops)

        if not torch.compiler.is_compiling():
            update = self.is_update_step(state)
            return self._eager(params, grads, state, aux, update, "tx.step_ensemble", True,
                               lambda *ops: vmapped(*ops, update=update))
        operands = (dict(params), dict(grads), state, self._aux(aux))
        return self._cond(is_update_step(state.count[0] + 1, self.config), vmapped, operands)

    def _eager(self, params, grads, state, aux, update: bool, where: str, batched: bool, run):
        """An eager step with the input checks of :mod:`rigl_func._tx_checks`: at the first call
        (``state.count == 0``), at update steps, at every step with ``debug``, and after an
        exception (a named error replaces a raw one). Plain steps after the first pay nothing."""
        count = state.count
        first = not _is_wrapped(count) and (int(count) == 0 if count.dim() == 0 else 0 in count.tolist())
        check = lambda: check_step_inputs(params, grads, state, self._aux(aux), self.config,  # noqa: E731
                                          where=where, batched=batched)
        if first or update or self.debug or not isinstance(params, Mapping) or not isinstance(grads, Mapping):
            check()
        try:
            return run(dict(params), dict(grads), state, self._aux(aux))
        except (RuntimeError, TypeError, ValueError, AttributeError, KeyError, IndexError):
            check()  # a named error when the inputs are the cause
            raise

    @staticmethod
    def _cond(pred: Tensor, fn, operands: tuple):
        """``fn(*operands, update=bool(pred))`` as one ``torch.cond`` (compiled)."""
        leaves, spec = pytree.tree_flatten(operands)
        out_spec = pytree.tree_structure((operands[0], operands[2]))  # (params, state): same trees out

        def branch(update: bool):
            def run(*flat):
                return tuple(pytree.tree_leaves(fn(*pytree.tree_unflatten(list(flat), spec), update=update)))
            return run

        with torch.no_grad():  # a training step; also lets torch.cond accept aliased operands
            flat = torch.cond(pred, branch(True), branch(False), tuple(leaves))
        return pytree.tree_unflatten(list(flat), out_spec)

    def _aux(self, aux) -> dict:
        if aux is None:
            return {}
        if not isinstance(aux, Mapping):
            raise TypeError(f"aux must be a dict of named trees, got aux={type(aux).__name__}")
        return {name: dict(tree) for name, tree in aux.items()}

    def _check_state(self, state: Any, *, batched: bool) -> None:
        if not isinstance(state, RigLOptimizerState):
            raise TypeError(f"state must be a RigLOptimizerState (from tx.init), got state={type(state).__name__}")
        count = state.count
        dims = 1 if batched else 0
        if not isinstance(count, Tensor) or count.device.type != "cpu" or count.dtype != torch.int64 \
                or count.dim() != dims:
            want = "a [K] int64 CPU tensor (rigl_func.stack_states of tx.init states)" if batched else \
                "a 0-d int64 CPU tensor (from tx.init)"
            raise ValueError(f"state.count must be {want}, got state.count={count!r}")
        step = state.rigl.step
        if torch.compiler.is_compiling() or _is_wrapped(count) or _is_wrapped(step) or step.device.type != "cpu":
            return
        if (int(step) != int(count)) if dims == 0 else (step.shape != count.shape or not torch.equal(step, count)):
            raise ValueError(f"state.rigl.step={step.tolist()} disagrees with state.count={count.tolist()}: "
                             "tx.step calls rigl_func.accumulate itself; do not call it on tx's state")

    def _step_given(self, params, grads, state: RigLOptimizerState, aux, *, update: bool):
        """:meth:`step` with the branch given: accumulate, then the topology update and
        optimizer-state reset (``update``) or the optimizer step on masked gradients.
        Under ``no_grad``, as ``torch.optim``'s steps: params that require grad (an
        ``autograd.grad`` loop) do not chain one step's graph to the next."""
        with torch.no_grad():
            rigl_state = accumulate(state.rigl, grads, self.config)
            if update:
                batched = {"auto": "auto", "batched": True, "per_layer": False}[self.engine]  # as update_topology
                new_params, new_rigl = _update_topology(params, grads, rigl_state, self.config, aux,
                                                        batched=batched, debug=self.debug, caller="tx.step")
                new_rigl = new_rigl._replace(masks={k: new_rigl.masks[k] for k in rigl_state.masks})
                new_opt = reset_optimizer_state(state.opt, rigl_state.masks, new_rigl.masks)
            else:
                new_params, new_opt = self.optimizer.step(params, grads, state.opt, rigl_state.masks)
                # The full structure check costs a flatten per step: traced once when
                # compiled (where torch.cond needs it), eager only with debug=True.
                full = torch.compiler.is_compiling() or self.debug
                if type(new_opt) is not type(state.opt) or \
                        (full and pytree.tree_structure(new_opt) != pytree.tree_structure(state.opt)):
                    raise TypeError("optimizer.step must return a state with the structure of the one it got "
                                    f"(got {pytree.tree_structure(new_opt)} for {pytree.tree_structure(state.opt)})")
                new_rigl = rigl_state
            out = ({k: new_params[k] for k in params},
                   RigLOptimizerState(rigl=new_rigl, opt=new_opt, count=state.count + 1))
            # Compiled: every output gets storage of its own (torch.cond). Eager: the
            # update's views of flat buffers are copied apart (cheap, update steps only).
            return _own_tree(out) if (update or torch.compiler.is_compiling()) else out


def rigl(config: RigLConfig, optimizer: Any, *, engine: str = "auto", debug: bool = False) -> RigLOptimizer:
    """RigL around a pure optimizer: one ``step`` call per training iteration.

    Args:
        config: the RigL config (``method="rigl"``; ``"set"``/``"snfs"``/``"static"``
            work the same way).
        optimizer: :func:`rigl_func.sgd`, :func:`rigl_func.adamw`, or any object with
            ``init(params)`` and ``step(params, grads, state, masks)``
            (:func:`rigl_func.custom_optimizer`).
        engine: ``"auto"``, ``"batched"`` or ``"per_layer"`` (:func:`rigl_func.update_topology`).
        debug: value checks on accelerators too (host syncs).

    Returns:
        A :class:`RigLOptimizer`.

    Example:
        >>> import rigl_func as rf
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> tx = rf.rigl(rf.RigLConfig(sparsity=0.5, delta=2, t_end=10, distribution="uniform"), rf.sgd(0.1))
        >>> params, state = tx.init(net, seed=0)
        >>> loss = lambda p: torch.func.functional_call(net, p, (torch.ones(4, 8),)).square().sum()
        >>> for _ in range(4):
        ...     params, state = tx.step(params, torch.func.grad(loss)(params), state)
        >>> int(state.count), int(state.rigl.num_updates), int(state.opt.count)
        (4, 2, 2)
    """
    return RigLOptimizer(config=config, optimizer=optimizer, engine=engine, debug=debug)

"""One RigL topology update and the gradient-accumulation window (Evci et al. 2020,
Sec. 3, Algorithm 1).

At an update step ``t`` every sparse layer with ``N`` active connections

1. computes ``n = floor(f(t) * N)`` (``f`` from :mod:`rigl_func.schedules`);
2. drops the ``n`` active entries with the lowest drop score (default ``|w|``);
3. grows ``n`` entries with the highest grow score (default ``|g|``, the *dense*
   gradient) among all entries not kept by step 2 — the just-dropped ones included;
4. sets genuinely new connections to zero; a connection dropped and regrown in the
   same update keeps its value. Inactive params are returned as exact zeros.

``N`` is preserved exactly. Non-finite grow scores are never grown; if fewer than
``n`` inactive entries have a finite grow score, ``n`` is lowered to that number for
the layer (so the count still holds). NaN drop scores are dropped first.

``n`` is a 0-d tensor: ``drop``/``grow`` use a ``topk`` of static size
``floor(alpha * N_target)`` where ``N_target`` is the layer's active count from the
config's distribution (:func:`rigl_func.target_nnz`); masks with more active entries
than the config prescribes drop at most that many (``check_state`` catches such masks).

Structured configs (``RigLConfig(structure="n:m" | "block")``) replace steps 1-3 by
the rules of :mod:`rigl_func.structured` (drop and grow inside every N:M group, or
whole blocks on the block grid); step 4 is shared. :func:`update_layer` dispatches on
``structure``; :func:`update_topology` lifts it over the layers in every case.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import Tensor

from rigl_func.batched_update import layer_extras, update_layers_batched
from rigl_func.config import CriterionSpec, RigLConfig, config_by_id
from rigl_func import criteria as C
from rigl_func.criteria import call_criterion, resolve_criterion
from rigl_func.random import fold_in, layer_id, normal
from rigl_func.masks import target_nnz
from rigl_func.schedules import drop_fraction, host_readable, in_accumulation_window, is_update_step
from rigl_func.selection import _check, _take_top
from rigl_func.fused import run_split
from rigl_func.state import RigLState
from rigl_func.structured import update_mask_block, update_mask_n_m

__all__ = ["accumulate", "update_topology", "update_layer", "update_topology_per_layer"]


def update_layer(
    param: Tensor,
    grad: Tensor,
    mask: Tensor,
    fraction: Union[float, Tensor],
    *,
    max_n: int,
    drop_criterion: CriterionSpec = "magnitude",
    grow_criterion: CriterionSpec = "gradient",
    extras: Optional[Mapping[str, Tensor]] = None,
    grow_init: str = "zeros",
    grow_init_scale: float = 1.0,
    structure: str = "unstructured",
    n_m: tuple[int, int] = (2, 4),
    block: tuple[int, int] = (4, 4),
) -> tuple[Tensor, Tensor]:
    """RigL update of one layer: the unit that ``update_topology`` maps over layers.

    Args:
        param: float tensor, e.g. ``[out, in]`` or ``[out, in, kh, kw]``.
        grad: dense gradient (or accumulated mean), same shape.
        mask: bool tensor, same shape.
        fraction: drop fraction ``f(t)`` (float or 0-d tensor).
        max_n: static upper bound on the number of replaced entries.
        drop_criterion, grow_criterion: names or functions
            ``(param, grad, mask[, extras]) -> scores``.
        extras: per-layer extras for criteria and random inits (``"key"``: 0-d int64,
            needed by random criteria and ``grow_init="normal"``; ``"ema"``; ...).
        grow_init: ``"zeros"``, ``"normal"`` or ``"gradient"`` (see :class:`RigLConfig`).
        grow_init_scale: scale of the non-zero grow inits.
        structure: ``"unstructured"`` (the steps of the module doc),
            ``"n:m"`` (:func:`rigl_func.structured.update_mask_n_m`) or ``"block"``
            (:func:`rigl_func.structured.update_mask_block`).
        n_m, block: the pattern's parameters, as in :class:`RigLConfig`.

    Returns:
        ``(new_param, new_mask)``: same nnz as ``mask`` (and, structured, the same
        count per N:M group / whole blocks); new connections initialized by
        ``grow_init``, inactive entries exactly 0. Pure: inputs are not modified.

    Example:
        >>> w = torch.tensor([[0.5, -0.1], [0.0, 0.0]])
        >>> g = torch.tensor([[0.0, 0.0], [0.9, 0.2]])
        >>> m = torch.tensor([[True, True], [False, False]])
        >>> p, m2 = update_layer(w, g, m, 0.5, max_n=1)
        >>> m2.tolist(), p.tolist()
        ([[True, False], [True, False]], [[0.5, 0.0], [0.0, 0.0]])
    """
    extras = {} if extras is None else extras
    drop_scores = call_criterion(resolve_criterion(drop_criterion, "drop_criterion"), param, grad, mask, extras)
    grow_scores = call_criterion(resolve_criterion(grow_criterion, "grow_criterion"), param, grad, mask, extras)
    if structure == "unstructured":
        new_mask = _update_mask(drop_scores, grow_scores, mask, fraction, max_n=max_n)
    elif structure == "n:m":
        new_mask = update_mask_n_m(drop_scores, grow_scores, mask, fraction, max_n=max_n, n_m=n_m)
    elif structure == "block":
        new_mask = update_mask_block(drop_scores, grow_scores, mask, fraction, max_n=max_n, block=block)
    else:
        raise ValueError(f"structure must be 'unstructured', 'n:m' or 'block', got structure={structure!r}")
    new_mask = new_mask.contiguous()  # regrouped (einops) masks may come back permuted: keep one layout
    return _init_grown(param, grad, mask, new_mask, extras, grow_init, grow_init_scale), new_mask


def _update_mask(drop_scores: Tensor, grow_scores: Tensor, mask: Tensor, fraction: Union[float, Tensor], *, max_n: int) -> Tensor:
    """Steps 1-3 of the module doc (unstructured): the new mask."""
    _check(drop_scores, mask, 0, max_n)
    _check(grow_scores, mask, 0, max_n)
    k = min(max_n, mask.numel())
    if k == 0:
        return mask
    # Same result as drop() then grow() with n = min(floor(f * nnz), max_n, growable), with
    # the eligibility masks and counts computed once and shared by both steps; each step is
    # one float32 topk for its cut-off plus a cumsum for ties (selection._take_top).
    m = mask.reshape(-1)
    finite = torch.isfinite(grow_scores).reshape(-1)
    growable = finite & ~m
    nnz = torch.count_nonzero(m)
    fraction = torch.as_tensor(fraction, dtype=torch.float64, device=mask.device)
    n = torch.floor(fraction * nnz).to(torch.int64).clamp(min=0, max=k)
    n = torch.minimum(n, torch.count_nonzero(growable))
    # Drop: the n largest of -score among active entries (NaN scores first, then -inf).
    dropped = _take_top(torch.where(m, -drop_scores.reshape(-1).float(), float("-inf")), m, torch.minimum(n, nnz), k)
    # Grow: the n largest finite scores among entries not kept (just-dropped ones included);
    # at least n are eligible, since `growable` has at least n.
    can_grow = growable | (finite & dropped)
    grow_values = torch.where(can_grow, grow_scores.reshape(-1).float(), float("-inf"))
    # float32 scores are finite where eligible; float64 ones may round to +-inf in float32.
    grown = _take_top(grow_values, can_grow, n, k, nan=grow_scores.dtype == torch.float64)
    return ((m ^ dropped) | grown).reshape(mask.shape)


def _init_grown(
    param: Tensor, grad: Tensor, mask: Tensor, new_mask: Tensor, extras: Mapping[str, Tensor],
    grow_init: str, grow_init_scale: float,
) -> Tensor:
    """Step 4 of the module doc, shared by every structure: the new param.

    Entries kept (active in ``mask`` and ``new_mask``) keep their value, inactive ones
    are 0, genuinely new ones (``new_mask & ~mask``) get ``grow_init``.
    """
    zero = torch.zeros((), dtype=param.dtype, device=param.device)
    new_param = torch.where(new_mask & mask, param, zero)
    if grow_init == "zeros":
        return new_param
    fresh = new_mask & ~mask
    if grow_init == "normal":
        active = mask.to(param.dtype)
        count = active.sum().clamp(min=1)
        mean = (param * active).sum() / count
        std = torch.sqrt((((param - mean) * active) ** 2).sum() / count)
        init = normal(fold_in(extras["key"], 0x5EED), param.shape, param.device).to(param.dtype) * std
    elif grow_init == "gradient":
        init = -grad.to(param.dtype)
    else:
        raise ValueError(f"grow_init must be 'zeros', 'normal' or 'gradient', got grow_init={grow_init!r}")
    return torch.where(fresh, grow_init_scale * torch.nan_to_num(init, nan=0.0, posinf=0.0, neginf=0.0), new_param)


@torch.compiler.assume_constant_result
def _static_layer_info(shapes: tuple, config_id: int) -> dict[str, int]:
    """Static ``topk`` size per layer: ``floor(alpha * N_target)``. Plain Python on
    shapes and the config (passed by ``id``: :func:`rigl_func.config.config_by_id`),
    evaluated once at trace time under ``torch.compile``."""
    shapes = dict(shapes)
    config = config_by_id(config_id)
    expected = target_nnz(shapes, config)
    return {
        k: min(math.floor(config.alpha * expected[k]), math.prod(shapes[k])) for k in shapes
    }


@torch.compiler.assume_constant_result
def _layer_ids(names: tuple) -> tuple:
    return tuple(layer_id(n) for n in names)


def _check_tree(tree: Mapping[str, Tensor], masks: Mapping[str, Tensor], argname: str) -> None:
    if not isinstance(tree, Mapping):
        raise TypeError(f"{argname} must be a dict[str, Tensor], got {type(tree).__name__}")
    missing = [k for k in masks if k not in tree]
    if missing:
        raise ValueError(f"{argname} is missing sparse layers {missing}")
    for name, mask in masks.items():
        if not isinstance(tree[name], Tensor):
            raise TypeError(f"{argname}[{name!r}] must be a Tensor, got {type(tree[name]).__name__}")
        if tree[name].device != mask.device:
            raise ValueError(f"{argname}[{name!r}] is on {tree[name].device} but state.masks[{name!r}] is on {mask.device}")
        if tuple(tree[name].shape) != tuple(mask.shape):
            raise ValueError(f"{argname}[{name!r}] has shape {tuple(tree[name].shape)} but the mask has {tuple(mask.shape)}")


def _check_types(state: RigLState, config: RigLConfig) -> None:
    if not isinstance(state, RigLState):
        raise TypeError(f"state must be a RigLState, got state={type(state).__name__}")
    if not isinstance(config, RigLConfig):
        raise TypeError(f"config must be a RigLConfig, got config={config!r}")


def update_topology(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    state: RigLState,
    config: RigLConfig,
    aux: Optional[Mapping[str, Mapping[str, Tensor]]] = None,
    *,
    engine: str = "auto",
    debug: bool = False,
) -> tuple[dict[str, Tensor], RigLState]:
    """One RigL topology update across all sparse layers, at step ``state.step``.

    Call it on update steps (:func:`rigl_func.is_update_step`) *instead of* the
    optimizer step, after :func:`accumulate` has seen this step's gradients. Then
    reset the optimizer state of new connections
    (:func:`rigl_func.reset_optimizer_state`).

    Args:
        params: ``dict[str, Tensor]`` of all params (dense ones pass through).
        grads: dense gradients w.r.t. the (masked) params, same keys. Do not mask
            them. Ignored for growth when ``grad_accumulation_n > 1`` (the
            accumulated mean in ``state.grad_acc`` is used instead).
        state: current state; ``state.step`` picks the drop fraction.
        config: the RigL config.
        aux: optional named trees (e.g. ``{"momentum": momentum_tree}``) whose
            per-layer entries reach custom criteria through ``extras``.
        engine: ``"batched"`` (all unstructured layers as padded rows, one
            selection per size class, :mod:`rigl_func.batched_update`: a number of
            ops that does not grow with the number of layers, the fast path on
            GPUs; layers on several devices are processed per device),
            ``"per_layer"`` (a loop of :func:`update_layer`,
            :func:`update_topology_per_layer`) or ``"auto"`` (default: per device,
            batched for layers on any device but the CPU, per-layer for those on the
            CPU, where the loop measured faster on a 2-core machine; see
            ``docs/performance.md``). The engines give the same result bit for bit;
            structured configs always run per layer.
        debug: also run the value checks below on accelerators (each costs a host
            sync there). By default they run only where they are free: eager, on
            the CPU, outside ``torch.func`` transforms; never under ``torch.compile``.

    Value checks (see ``debug``), each a ``UserWarning`` shown once per call site:
    ``state.step == 0`` (:func:`accumulate` was never called: the drop fraction is
    ``alpha``; a warning, not an error, since hand-built states at step 0 are fine in
    unit tests); a ``state.step`` off the schedule (``not is_update_step(state.step,
    config)``: the drop fraction is ``f(state.step)`` all the same); gradients that are zero at every inactive entry
    but not at every active one (masked gradients: RigL would regrow exactly what it
    dropped), unless the grow criterion ignores them
    (``"random"``, ``"ema"``). Always checked, free: every aux tree a criterion
    declared with :func:`rigl_func.criterion` is in ``aux``.

    Returns:
        ``(params, state)``: new params with inactive entries exactly 0, and a state
        with new masks, ``num_updates + 1`` and zeroed accumulators. Pure. With the
        batched engine the sparse layers' params and masks are views of one flat
        buffer each.

    Example:
        >>> from rigl_func import RigLConfig, init_state, accumulate, apply_masks
        >>> params = {"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(0))}
        >>> cfg = RigLConfig(t_end=100, delta=10, sparsity=0.5, distribution="uniform")
        >>> state = init_state(params, cfg, seed=0)
        >>> params = apply_masks(params, state.masks)
        >>> grads = {"w": torch.ones(8, 8)}
        >>> for _ in range(10):  # iterations 1..10; step 10 is an update step
        ...     state = accumulate(state, grads, cfg)
        >>> params, state = update_topology(params, grads, state, cfg)
        >>> int(state.masks["w"].sum()), int(state.num_updates)
        (32, 1)
    """
    if engine not in ("auto", "batched", "per_layer"):
        raise ValueError(f"engine must be 'auto', 'batched' or 'per_layer', got engine={engine!r}")
    batched = {"auto": "auto", "batched": True, "per_layer": False}[engine]
    return _update_topology(params, grads, state, config, aux, batched=batched, debug=debug)


def update_topology_per_layer(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    state: RigLState,
    config: RigLConfig,
    aux: Optional[Mapping[str, Mapping[str, Tensor]]] = None,
) -> tuple[dict[str, Tensor], RigLState]:
    """:func:`update_topology` as a Python loop of :func:`update_layer` over the layers.

    The reference (oracle) of the batched update: same arguments, same result bit for
    bit, but dozens of ATen ops per layer. Structured configs always take this path.
    """
    return _update_topology(params, grads, state, config, aux, batched=False)


def _check_values(state, config, growth, stacklevel: int, debug: bool, caller: str = "update_topology") -> None:
    """The value checks of :func:`update_topology` (only where ``host_readable``)."""
    if host_readable(state.step, debug=debug) and state.step.dim() == 0:
        step = int(state.step)
        if step == 0:  # a warning, not an error: hand-built states at step 0 (f = alpha) are legitimate in tests
            warnings.warn("update_topology at state.step=0: accumulate was never called, so the drop fraction "
                          "is alpha instead of the schedule's value; call rigl_func.accumulate(state, grads, "
                          "config) once per iteration", UserWarning, stacklevel=stacklevel)
        elif not is_update_step(step, config):
            warnings.warn("update_topology was called at a state.step that is not an update step "
                          "(is_update_step(state.step, config) is False): the drop fraction is that of "
                          "state.step; call accumulate once per iteration and update only when "
                          "is_update_step(state.step, config)", UserWarning, stacklevel=stacklevel)
    if resolve_criterion(config.grow_criterion, "grow_criterion") in (C.random, C.ema):
        return
    tensors = [t for name in state.masks for t in (state.masks[name], growth[name])]
    if not tensors or not host_readable(*tensors, debug=debug) or any(m.dtype != torch.bool for m in state.masks.values()):
        return  # bad masks: the update's own checks name them
    any_inactive = active_nonzero = False
    for name, mask in state.masks.items():
        g = growth[name]
        if bool(g.masked_fill(mask, 0).ne(0).any()):
            return  # a nonzero gradient at an inactive entry: not masked
        any_inactive = any_inactive or not bool(mask.all())
        active_nonzero = active_nonzero or bool(g.masked_fill(~mask, 0).ne(0).any())
    if any_inactive and active_nonzero:
        warnings.warn(f"the gradients passed to {caller} are zero at every inactive entry: they were "
                      "probably masked; pass the dense gradients (RigL grows where |grad| is largest, so "
                      "with masked gradients it regrows what it dropped)", UserWarning, stacklevel=stacklevel)


def _update_topology(params, grads, state, config, aux, *, batched: Union[bool, str], debug: bool = False,
                     caller: str = "update_topology"):
    """The update; ``caller`` names the public entry point in warnings (``"tx.step"``).
    Layers fused by ``config.fused_splits`` run as their row blocks (:mod:`rigl_func.fused`)."""
    # warnings point at the user's call: update_topology -> _update_topology -> [run_split ->] _update_split
    # (tx.step: -> _step_given -> lambda -> _eager -> step -> the user's call)
    level = 5 if caller == "update_topology" else 8
    if getattr(config, "fused_splits", ()) and isinstance(state, RigLState) and isinstance(state.masks, Mapping):
        return run_split(_update_split, params, grads, state, config, aux, batched=batched, debug=debug,
                         caller=caller, stacklevel=level + 1)
    return _update_split(params, grads, state, config, aux, batched=batched, debug=debug, caller=caller,
                         stacklevel=level)


def _update_split(params, grads, state, config, aux, *, batched: Union[bool, str], debug: bool = False,
                  caller: str = "update_topology", stacklevel: int = 4):
    """``batched``: True (the batched engine), False (per layer) or ``"auto"`` (batched for
    the layers off the CPU)."""
    _check_types(state, config)
    _check_tree(params, state.masks, "params")
    accumulating = config.grad_accumulation_n > 1
    growth = state.grad_acc if accumulating else grads
    _check_tree(growth, state.masks, "state.grad_acc" if accumulating else "grads")
    fraction = drop_fraction(state.step, config)
    names = tuple(state.masks)
    max_n = _static_layer_info(tuple((k, tuple(m.shape)) for k, m in state.masks.items()), id(config))
    ids = dict(zip(names, _layer_ids(names)))
    aux = {} if aux is None else aux
    for tree_name, tree in aux.items():
        _check_tree(tree, state.masks, f"aux[{tree_name!r}]")
    for field, fn_name, trees in getattr(config, "_aux_needs", ()):
        missing = [t for t in trees if t not in aux]
        if missing:
            raise ValueError(f"{field}={fn_name!r} declares needs={trees!r} but aux has no {missing} tree "
                             f"(aux has {sorted(aux)}): pass update_topology(..., aux={{{missing[0]!r}: tree}}), "
                             "a dict[str, Tensor] per sparse layer")
    _check_values(state, config, growth, stacklevel, debug, caller)
    step_key = fold_in(state.key, state.step)
    new_params = dict(params)
    fast = ()
    if batched and config.structure == "unstructured":  # "auto": the layers off the CPU
        fast = tuple(n for n in names if batched is True or state.masks[n].device.type != "cpu")
    new_masks = {}
    if fast:
        layer_params, new_masks = update_layers_batched(
            params, growth, {n: state.masks[n] for n in fast}, fraction, step_key, state.step,
            tuple(ids[n] for n in fast), tuple(max_n[n] for n in fast), config, aux, state.ema)
        new_params.update(layer_params)
    if len(fast) < len(names):
        for name, mask in state.masks.items():
            if name in new_masks:
                continue
            extras = layer_extras(name, fold_in(step_key, ids[name]), state.step, state.ema, aux)
            new_params[name], new_masks[name] = update_layer(
                params[name], growth[name], mask, fraction, max_n=max_n[name],
                drop_criterion=config.drop_criterion, grow_criterion=config.grow_criterion,
                extras=extras, grow_init=config.grow_init, grow_init_scale=config.grow_init_scale,
                structure=config.structure, n_m=config.n_m, block=config.block,
            )
    new_masks = {n: new_masks[n] for n in names}
    return new_params, state._replace(masks=new_masks, num_updates=state.num_updates + 1,
                                      grad_acc=_zeros_like_tree(state.grad_acc))


def _zeros_like_tree(tree: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Zeros shaped like ``tree``: one flat buffer per dtype and device, split into views."""
    groups: dict = {}
    for name, value in tree.items():
        groups.setdefault((value.dtype, value.device), []).append(name)
    out = {}
    for (dtype, device), names in groups.items():
        sizes = [tree[n].numel() for n in names]
        for n, part in zip(names, torch.zeros(sum(sizes), dtype=dtype, device=device).split(sizes)):
            out[n] = part.view(tree[n].shape)
    return {n: out[n] for n in tree}


def accumulate(state: RigLState, grads: Mapping[str, Tensor], config: RigLConfig) -> RigLState:
    """Record one training iteration: ``step += 1`` and fold ``grads`` into the window.

    Call it once per iteration, after the backward pass and before checking
    :func:`rigl_func.is_update_step`. With ``ema_momentum = β > 0`` (SNFS) it also
    updates ``state.ema = β ema + (1 - β) grads`` on every iteration. With ``grad_accumulation_n = k > 1`` the dense
    gradients of the ``k`` iterations ending at an update step (that step included)
    are averaged into ``state.grad_acc``; other iterations leave it unchanged (even
    if their gradients are NaN). With ``k = 1`` only the step counter moves.

    Args:
        state: current state.
        grads: dense gradients, ``dict[str, Tensor]`` with at least the sparse layers.
        config: supplies ``grad_accumulation_n``, ``delta``, ``t_start``, ``t_end``.

    Returns:
        A new :class:`RigLState`. Pure.

    Example:
        >>> from rigl_func import RigLConfig, init_state
        >>> cfg = RigLConfig(t_end=100, delta=4, grad_accumulation_n=2, sparsity=0.5, distribution="uniform")
        >>> state = init_state({"w": torch.zeros(2, 2)}, cfg, seed=0)
        >>> for i in range(4):
        ...     state = accumulate(state, {"w": torch.full((2, 2), float(i))}, cfg)
        >>> int(state.step), state.grad_acc["w"][0, 0].item()  # mean of steps 3 and 4 (values 2, 3)
        (4, 2.5)
    """
    _check_types(state, config)
    step = state.step + 1
    k = config.grad_accumulation_n
    beta = config.ema_momentum
    if k == 1 and beta == 0.0:
        return state._replace(step=step)
    _check_tree(grads, state.masks, "grads")
    ema = {name: beta * value + (1.0 - beta) * grads[name].to(value.dtype) for name, value in state.ema.items()}
    if k == 1:
        return state._replace(step=step, ema=ema)
    in_window = in_accumulation_window(step, config)
    acc = {
        name: torch.where(in_window, value + grads[name].to(value.dtype) / k, value)
        for name, value in state.grad_acc.items()
    }
    return state._replace(step=step, grad_acc=acc, ema=ema)

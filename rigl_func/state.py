"""``RigLState``: the immutable pytree that carries everything RigL changes.

A NamedTuple of tensors only (no ``None`` leaves), so it passes through
``torch.func.vmap``, ``torch.compile`` and ``torch.utils._pytree`` unchanged. Update
it with ``state._replace(...)``; every function here returns a new state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from rigl_func.config import RigLConfig
from rigl_func.fused import fused_plan, merge_tree, split_shapes, split_tree
from rigl_func.masks import init_masks, sparse_param_names, target_nnz, validate_masks
from rigl_func.structured import check_structured_mask, init_masks_block, init_masks_n_m

__all__ = ["RigLState", "init_state", "check_state", "zeros_accumulator", "zeros_ema", "stack_states", "unstack_states"]


class RigLState(NamedTuple):
    """Mutable-in-spirit, immutable-in-fact RigL state.

    Attributes:
        masks: ``dict[str, bool Tensor]`` keyed like ``named_parameters()``; only
            sparse layers appear.
        step: shape=(), int64: training iterations seen so far (incremented by
            :func:`rigl_func.accumulate`).
        num_updates: shape=(), int64: topology updates performed so far.
        grad_acc: ``dict[str, Tensor]`` running mean of the dense gradients inside
            the accumulation window, same keys/shapes/dtypes as the sparse params;
            empty (no memory) when ``grad_accumulation_n == 1``.
        ema: ``dict[str, Tensor]`` exponential moving average of the dense gradients
            (SNFS), updated by every :func:`rigl_func.accumulate`; empty when
            ``ema_momentum == 0``.
        key: shape=(), int64: random key (seed) of random criteria / grow inits.
            Random numbers are hashes of (key, step, layer), so a resumed run draws
            the same numbers as an uninterrupted one.
    """

    masks: dict[str, Tensor]
    step: Tensor  # shape=(), int64
    num_updates: Tensor  # shape=(), int64
    grad_acc: dict[str, Tensor]
    ema: dict[str, Tensor]
    key: Tensor  # shape=(), int64


def zeros_accumulator(params: Mapping[str, Tensor], masks: Mapping[str, Tensor], config: RigLConfig) -> dict[str, Tensor]:
    """Zero gradient accumulators for the sparse layers (``{}`` if not accumulating)."""
    if config.grad_accumulation_n == 1:
        return {}
    return {name: torch.zeros_like(params[name]) for name in masks}


def zeros_ema(params: Mapping[str, Tensor], masks: Mapping[str, Tensor], config: RigLConfig) -> dict[str, Tensor]:
    """Zero gradient EMAs for the sparse layers (``{}`` if ``ema_momentum == 0``)."""
    if config.ema_momentum == 0.0:
        return {}
    return {name: torch.zeros_like(params[name]) for name in masks}


def init_state(
    model_or_params: Union[nn.Module, Mapping[str, Tensor]],
    config: RigLConfig,
    *,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    masks: Optional[Mapping[str, Tensor]] = None,
) -> RigLState:
    """Choose the sparse layers, compute their sparsities and draw random masks.

    With ``config.structure="n:m"`` every group of ``M`` along dim 1 gets ``N`` random
    active entries; with ``"block"`` whole blocks are drawn
    (:mod:`rigl_func.structured`).

    Exactly one of ``seed`` / ``generator`` / ``masks`` must be given. The state's
    random ``key`` is ``seed`` (or drawn from ``generator``; 0 with ``masks``: use
    ``state._replace(key=...)`` for random criteria). Masks are
    drawn on the CPU (same seed, same masks on every device and process) and placed
    on each parameter's device. Remember to zero the params afterwards:
    ``params = rigl_func.apply_masks(params, state.masks)``.

    Args:
        model_or_params: an ``nn.Module`` or a ``dict[str, Tensor]`` of params.
        config: the RigL config.
        seed: integer seed for the random initial topology.
        generator: a CPU ``torch.Generator`` instead of ``seed``.
        masks: ready-made masks (e.g. from SNIP); validated against the config.

    Returns:
        A fresh :class:`RigLState` with ``step == 0`` and ``num_updates == 0``.

    Raises:
        TypeError/ValueError: missing/duplicate randomness source, a ``seed`` outside
            int64, masks that do not fit the params or the config, a sparse layer with
            no entries (keep it dense), ``config.dense`` naming a missing parameter.

    Example:
        >>> from rigl_func import RigLConfig
        >>> net = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> cfg = RigLConfig(t_end=100, delta=10, sparsity=0.8, distribution="uniform")
        >>> state = init_state(net, cfg, seed=0)
        >>> {k: int(m.sum()) for k, m in state.masks.items()}
        {'0.weight': 40, '2.weight': 4}
    """
    given = sum(x is not None for x in (seed, generator, masks))
    if given != 1:
        raise TypeError("init_state needs exactly one of seed=, generator= or masks= "
                        f"(got seed={seed!r}, generator={generator!r}, masks={'...' if masks is not None else None})")
    if not isinstance(config, RigLConfig):
        raise TypeError(f"config must be a RigLConfig, got config={config!r}")
    if isinstance(model_or_params, nn.Module):
        params = dict(model_or_params.named_parameters())
    else:
        params = dict(model_or_params)
    names = sparse_param_names(model_or_params, config)  # the one rule (docs/sharp_bits.md)
    for pattern, _ in config.fused_splits:
        if not any(re.search(pattern, n) for n in names):
            raise ValueError(f"fused_splits pattern {pattern!r} matches no sparse layer (sparse: {names[:8]}"
                             f"{'...' if len(names) > 8 else ''}); add the weight with include=, "
                             f"got fused_splits={dict(config.fused_splits)!r}")
    for name in names:
        if params[name].numel() == 0:
            raise ValueError(f"params[{name!r}] has shape {tuple(params[name].shape)} and no entries: an empty "
                             f"layer cannot be sparse; keep it dense, e.g. RigLConfig(dense=({name!r},))")
    key = 0
    if masks is None:
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed must be an int, got seed={seed!r}")
            if not -2**63 <= seed < 2**63:
                raise ValueError(f"seed must fit in int64, i.e. be in [-2**63, 2**63), got seed={seed!r}")
            generator = torch.Generator().manual_seed(seed)
            key = seed
        full_shapes = {n: tuple(params[n].shape) for n in names}
        plan = fused_plan(full_shapes, config)  # fused layers are drawn block by block (rigl_func.fused)
        shapes = split_shapes(full_shapes, config)
        nnz = target_nnz(shapes, config)
        devices = {n: params[n.rpartition("[")[0] if n not in params else n].device for n in shapes}
        if config.structure == "n:m":
            masks = {k: m.contiguous() for k, m in init_masks_n_m(shapes, config.n_m, generator=generator,
                                                                   device=devices).items()}
        elif config.structure == "block":
            masks = init_masks_block(shapes, nnz, config.block, generator=generator, device=devices)
        else:
            masks = init_masks(shapes, nnz, generator=generator, device=devices)
        masks = merge_tree(masks, plan)
        if seed is None:  # the key continues the generator's stream, after the masks
            key = int(torch.randint(0, 2**31 - 1, (), generator=generator))
    else:
        masks = dict(masks)
    step_device = next(iter(params.values())).device if params else None
    zero = torch.zeros((), dtype=torch.int64, device=step_device)
    state = RigLState(masks=masks, step=zero, num_updates=zero.clone(),
                      grad_acc=zeros_accumulator(params, masks, config),
                      ema=zeros_ema(params, masks, config),
                      key=torch.tensor(key, dtype=torch.int64, device=step_device))
    check_state(state, params, config)
    return state


def check_state(state: RigLState, params: Mapping[str, Tensor], config: RigLConfig) -> None:
    """Validate ``state`` against ``params`` and ``config`` (eager; syncs the device).

    Checks the masks' keys, shapes, dtype and devices, that each layer has exactly
    the number of active entries the config's distribution prescribes (and, for a
    structured config, the N:M or block pattern), that the
    counters are 0-d int64 tensors and that the accumulators fit. Use it after
    loading a checkpoint: a state from another model or config fails here.

    Raises:
        TypeError/ValueError naming the offending field and value.
    """
    if not isinstance(state, RigLState):
        raise TypeError(f"state must be a RigLState, got {type(state).__name__}")
    validate_masks(state.masks, params, argname="state.masks")
    for field in ("step", "num_updates", "key"):
        value = getattr(state, field)
        if not isinstance(value, Tensor) or value.dim() != 0 or value.dtype != torch.int64:
            raise TypeError(f"state.{field} must be a 0-d int64 tensor, got {value!r}")
    # fused layers (config.fused_splits) are checked block by block: "name[i/k]" is row block i of k
    blocks = split_tree(state.masks, fused_plan({k: tuple(m.shape) for k, m in state.masks.items()}, config))
    expected = target_nnz({k: tuple(m.shape) for k, m in blocks.items()}, config)
    for name, mask in blocks.items():
        if mask.device.type == "meta":
            raise ValueError(f"state.masks[{name!r}] is on the meta device (deferred initialization): materialize "
                             "the model first (model.to_empty(device=...) and initialize it), then build the state")
        actual = int(mask.sum())
        if actual != expected[name]:
            rule = f"distribution={config.distribution!r}, sparsity={config.sparsity}"
            if config.structure == "n:m":
                rule = f"structure='n:m', n_m={config.n_m}"
            elif config.structure == "block":
                rule = f"structure='block', block={config.block}, {rule}"
            raise ValueError(
                f"state.masks[{name!r}] has {actual} active entries but the config ({rule}) requires {expected[name]}"
            )
        check_structured_mask(name, mask, config)
    want_acc = set(state.masks) if config.grad_accumulation_n > 1 else set()
    if set(state.grad_acc) != want_acc:
        raise ValueError(f"state.grad_acc keys {sorted(state.grad_acc)} do not match the expected {sorted(want_acc)} "
                         f"for grad_accumulation_n={config.grad_accumulation_n}")
    want_ema = set(state.masks) if config.ema_momentum > 0 else set()
    if set(state.ema) != want_ema:
        raise ValueError(f"state.ema keys {sorted(state.ema)} do not match the expected {sorted(want_ema)} "
                         f"for ema_momentum={config.ema_momentum}")
    for field, tree in (("grad_acc", state.grad_acc), ("ema", state.ema)):
        for name, acc in tree.items():
            if acc.shape != params[name].shape or acc.dtype != params[name].dtype:
                raise ValueError(f"state.{field}[{name!r}] has shape/dtype {tuple(acc.shape)}/{acc.dtype}, "
                                 f"params[{name!r}] has {tuple(params[name].shape)}/{params[name].dtype}")


def stack_states(states: list[Any]) -> Any:
    """Stack K states leaf by leaf into one batched state (``[K, ...]`` tensors) for a
    ``torch.func.vmap`` over K models (an ensemble of seeds). Any pytree of tensors
    works: :class:`RigLState`, :class:`rigl_func.RigLOptimizerState`, params dicts. Pure.

    Raises:
        ValueError: an empty list, or states of different layers or fields.

    Example:
        >>> from rigl_func import RigLConfig
        >>> cfg = RigLConfig(t_end=100, delta=10, sparsity=0.5, distribution="uniform")
        >>> params = {"w": torch.zeros(4, 4)}
        >>> batched = stack_states([init_state(params, cfg, seed=s) for s in range(3)])
        >>> tuple(batched.masks["w"].shape), batched.key.tolist()
        ((3, 4, 4), [0, 1, 2])
    """
    if not states:
        raise ValueError("stack_states needs at least one state, got states=[]")
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat = [tree_flatten(s) for s in states]
    spec = flat[0][1]
    for i, (_, other) in enumerate(flat[1:], start=1):
        if other != spec:
            raise ValueError(f"states[{i}] has other layers or fields than states[0]; stack states of one model")
    return tree_unflatten([torch.stack(leaves) for leaves in zip(*(f[0] for f in flat))], spec)


def unstack_states(state: Any) -> list[Any]:
    """The K states of a batched state (:func:`stack_states`, or a ``vmap`` output).
    Works on any pytree of ``[K, ...]`` tensors (a :class:`RigLState`, a
    :class:`rigl_func.RigLOptimizerState`, a params dict). Pure (the states are views
    of the batched tensors).

    Raises:
        ValueError: a leaf without the common leading ``K`` dimension.

    Example:
        >>> from rigl_func import RigLConfig
        >>> cfg = RigLConfig(t_end=100, delta=10, sparsity=0.5, distribution="uniform")
        >>> states = [init_state({"w": torch.zeros(4, 4)}, cfg, seed=s) for s in range(2)]
        >>> [int(s.key) for s in unstack_states(stack_states(states))]
        [0, 1]
    """
    from torch.utils._pytree import tree_flatten, tree_unflatten

    leaves, spec = tree_flatten(state)
    sizes = {tuple(leaf.shape[:1]) for leaf in leaves if isinstance(leaf, Tensor)}
    if len(sizes) != 1 or () in sizes or any(not isinstance(leaf, Tensor) for leaf in leaves):
        shapes = sorted({tuple(leaf.shape) for leaf in leaves if isinstance(leaf, Tensor)})[:4]
        raise ValueError("unstack_states needs a batched state (every leaf a tensor with the same leading K "
                         f"dimension), got leaves of shapes {shapes}")
    k = sizes.pop()[0]
    return [tree_unflatten([leaf[i] for leaf in leaves], spec) for i in range(k)]

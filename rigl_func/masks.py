"""Masks: which parameters are sparse, random initial masks, and applying masks.

Masks are ``dict[str, Tensor]`` of bool tensors keyed by ``named_parameters()`` names
and shaped like the parameter; dense parameters are simply absent. The initial
topology of RigL is random with an exact number of active entries per layer
(Evci et al. 2020, Sec. 3), given by the sparsity distribution. Structured configs
(``RigLConfig(structure="n:m" | "block")``) count and draw masks by the rules of
:mod:`rigl_func.structured`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor, nn

from rigl_func.distributions import get_distribution, nnz_for
from rigl_func.fused import fused_plan, slice_name, split_shapes
from rigl_func.structured import structured_nnz

if TYPE_CHECKING:
    from rigl_func.config import RigLConfig

__all__ = [
    "SPARSIFIABLE_MODULES",
    "sparse_param_names",
    "sparse_candidates",
    "target_sparsities",
    "target_nnz",
    "init_masks",
    "apply_masks",
    "validate_masks",
    "map_masked_leaves",
    "map_masked_leaves_batched",
    "masked_where",
]

#: Module types whose ``weight`` is sparsified by default (subclasses included).
SPARSIFIABLE_MODULES = (nn.Linear, nn.modules.conv._ConvNd)

Params = Mapping[str, Tensor]


def _aliases(module: nn.Module) -> dict[int, list[str]]:
    """id(param) -> every name it has (``named_parameters(remove_duplicate=False)``
    order; the first is the canonical name ``named_parameters()`` reports)."""
    out: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def _type_candidates(module: nn.Module) -> tuple[set[int], set[int], list[str]]:
    """(ids of Linear/Conv weights, ids of embedding weights, names of parametrized layers)."""
    typed, embedding, wrapped = set(), set(), []
    for mod_name, sub in module.named_modules(remove_duplicate=False):
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)):
            embedding.add(id(sub.weight))
        elif isinstance(sub, SPARSIFIABLE_MODULES):
            if isinstance(sub._parameters.get("weight"), Tensor):
                typed.add(id(sub._parameters["weight"]))
            elif isinstance(getattr(sub, "weight", None), Tensor):
                wrapped.append(mod_name)
    return typed, embedding, wrapped


def _eligible(t: Any) -> bool:
    """A tensor that can carry a mask: floating point with at least 2 dims."""
    return isinstance(t, Tensor) and t.dim() >= 2 and t.is_floating_point()


def _rigl_rules(config: Any) -> bool:
    """Whether ``config`` uses the additive ``include`` of :class:`RigLConfig` (the one rule
    below); other configs (``PruningConfig``) filter with ``config.is_sparse_name``."""
    from rigl_func.config import RigLConfig

    return isinstance(config, RigLConfig)


def sparse_candidates(model_or_params: Union[nn.Module, Params], config: Optional[RigLConfig] = None) -> list[str]:
    """The weights that *can* be sparse before ``exclude``/``dense`` remove any: the
    rule's default set plus what ``config.include`` adds, in ``named_parameters()`` order.

    For a module this also lists frozen (``requires_grad=False``) Linear/Conv weights,
    which the rule keeps dense unless named (the ``RigLScheduler`` lists them in ``W`` as
    rigl-torch does). Use :func:`sparse_param_names` for the sparse set itself.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
        >>> sparse_candidates(net)
        ['1.weight']
    """
    names, _ = _rule(model_or_params, config, frozen_are_candidates=True)
    return names


def _rule(model_or_params, config, *, frozen_are_candidates: bool = False) -> tuple[list[str], dict[str, list[str]]]:
    """(candidate names in order, canonical name -> aliases). See :func:`sparse_param_names`."""
    include = tuple(getattr(config, "include", ())) if config is not None and _rigl_rules(config) else ()
    if isinstance(model_or_params, nn.Module):
        module = model_or_params
        aliases_by_id = _aliases(module)
        typed, embedding, wrapped = _type_candidates(module)
        names, aliases = [], {}
        for name, p in module.named_parameters():
            alias = aliases_by_id.get(id(p), [name])
            aliases[name] = alias
            default = id(p) in typed and id(p) not in embedding and (p.requires_grad or frozen_are_candidates)
            named = _eligible(p) and any(re.search(pat, a) for pat in include for a in alias)
            if default or named:
                names.append(name)
        left = sorted({w for w in wrapped if not any(n.startswith(f"{w}.parametrizations.") for n in names)})
        if left:
            warnings.warn(f"layers {left} have a parametrized weight (parametrize, spectral_norm or weight_norm) "
                          "and stay dense: remove the parametrization to sparsify them, or name the tensor "
                          "the parametrization reads in include= (e.g. '<layer>.parametrizations.weight.original')",
                          stacklevel=3)
        return names, aliases
    if isinstance(model_or_params, Mapping):
        names = [n for n, t in model_or_params.items() if _eligible(t)]
        seen: dict[int, str] = {}
        for n in names:  # one tensor under two names (a tied head): two masks would disagree
            other = seen.setdefault(id(model_or_params[n]), n)
            if other != n:
                raise ValueError(f"params[{other!r}] and params[{n!r}] are the same tensor (tied weights): pass the "
                                 "module (its rule reports a tied weight once) or the dict of "
                                 "dict(model.named_parameters()), which lists it once")
        return names, {n: [n] for n in model_or_params}
    raise TypeError(f"model_or_params must be an nn.Module or a dict of tensors, got {type(model_or_params).__name__}")


def sparse_param_names(model_or_params: Union[nn.Module, Params], config: Optional[RigLConfig] = None) -> list[str]:
    """Names of the parameters to sparsify, in ``named_parameters()`` order: **the one
    sparsity rule**, which :func:`rigl_func.init_state`, ``tx.init`` of
    :func:`rigl_func.rigl` and :class:`rigl_func.RigLScheduler` all call (the table is
    in ``docs/sharp_bits.md``).

    Module rule (``model_or_params`` is an ``nn.Module``), by default:

    * sparse: the ``weight`` of every ``nn.Linear`` and ``Conv{1,2,3}d`` (transposed
      convs and subclasses included, e.g. ``MultiheadAttention.out_proj``);
    * dense: biases, normalization layers, embeddings, ``MultiheadAttention``'s
      ``in_proj_weight``, recurrent (LSTM/GRU) matrices, bare ``nn.Parameter`` tensors;
    * tied weights are one tensor, reported once under the name
      ``named_parameters()`` gives it (its first); a weight tied to an ``nn.Embedding``
      (an LM head sharing the embedding matrix) stays dense, in either definition order;
    * frozen weights (``requires_grad=False``) stay dense;
    * a parametrized weight (``torch.nn.utils.parametrize``, ``spectral_norm``,
      ``weight_norm``) has no plain ``weight`` parameter: it stays dense, with a
      ``UserWarning`` naming the layer.

    Then ``config.include`` (regexes, ``re.search``) *adds* every floating-point
    parameter with at least 2 dims that one of its names matches (e.g.
    ``r"in_proj_weight$"``, an embedding, a frozen weight, a parametrization's
    ``original``); ``config.exclude`` (regexes) and ``config.dense`` (exact names)
    remove weights. A tied weight is added or removed when any of its names is.

    Dict rule (a ``dict[str, Tensor]``, no module types available): every
    floating-point tensor with at least 2 dims, so ``in_proj_weight``, LSTM and
    embedding tensors are sparse there, and ``include`` adds nothing; pass the module for
    the module rule. Configs other than :class:`rigl_func.RigLConfig`
    (``PruningConfig``) filter the default set with their ``is_sparse_name``.

    Args:
        model_or_params: an ``nn.Module`` or a ``dict[str, Tensor]``.
        config: the RigL config (``None``: the default set).

    Returns:
        list of parameter names.

    Raises:
        ValueError: an ``include`` pattern matches no parameter name, or
            ``config.dense`` names a parameter that does not exist.

    Example:
        >>> from rigl_func import RigLConfig
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> sparse_param_names(net, RigLConfig(t_end=10, delta=5))
        ['0.weight', '2.weight']
        >>> mha = nn.MultiheadAttention(8, 2)
        >>> sparse_param_names(mha, RigLConfig(t_end=10, delta=5, include=("in_proj_weight",)))
        ['in_proj_weight', 'out_proj.weight']
    """
    names, aliases = _rule(model_or_params, config)
    if config is None:
        return names
    if not _rigl_rules(config):
        return [n for n in names if config.is_sparse_name(n)]
    every = [a for alias in aliases.values() for a in alias]
    for pattern in config.include:
        if not any(re.search(pattern, a) for a in every):
            raise ValueError(f"include pattern {pattern!r} matches no parameter name (names: {every[:8]}"
                             f"{'...' if len(every) > 8 else ''}), got include={config.include!r}")
    unknown = [n for n in config.dense if n not in every]
    if unknown:
        raise ValueError(f"config.dense names parameters that do not exist: {unknown} "
                         f"(parameters: {every[:8]}...), got dense={config.dense!r}")
    return [n for n in names if all(config.is_sparse_name(a) for a in aliases.get(n, [n]))]


def target_sparsities(shapes: Mapping[str, Any], config: RigLConfig) -> dict[str, float]:
    """Per-layer sparsity that ``config``'s distribution assigns to ``shapes``.

    With ``structure="n:m"`` every layer gets ``1 - N/M`` (the distribution does not
    apply); with ``structure="block"`` these are the distribution's sparsities before
    :func:`target_nnz` rounds them to whole blocks. A layer split by
    ``config.fused_splits`` gets the mean of its ``k`` blocks' sparsities (the
    distribution sees the blocks as layers).

    Args:
        shapes: name -> shape of the sparse layers only.
        config: supplies ``distribution``, ``sparsity`` and ``erk_power_scale``
            (and ``structure``, ``n_m``).

    Example:
        >>> from rigl_func import RigLConfig
        >>> target_sparsities({"w": (10, 10)}, RigLConfig(t_end=10, delta=5, sparsity=0.5))
        {'w': 0.5}
    """
    fn = get_distribution(config.distribution)
    shapes = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
    plan = fused_plan(shapes, config)
    if plan:  # fused layers: the distribution sees their blocks; a fused layer's is their mean
        parts = target_sparsities(split_shapes(shapes, config), config)
        return {k: sum(parts[slice_name(k, i, plan[k])] for i in range(plan[k])) / plan[k] if k in plan else parts[k]
                for k in shapes}
    if config.structure == "n:m":
        return {k: 1.0 - config.n_m[0] / config.n_m[1] for k in shapes}
    if config.distribution == "erk":
        return fn(shapes, config.sparsity, power_scale=config.erk_power_scale)
    return fn(shapes, config.sparsity)


def target_nnz(shapes: Mapping[str, Any], config: RigLConfig) -> dict[str, int]:
    """Exact number of active entries per sparse layer (see :func:`nnz_for`).

    Structured configs: ``numel * N / M`` for N:M; ``nnz_for(n_blocks, s) * rows *
    cols`` for blocks (:func:`rigl_func.structured.structured_nnz`). A layer split by
    ``config.fused_splits`` gets the sum of its blocks' counts (:mod:`rigl_func.fused`).

    Raises:
        ValueError: a layer's shape does not fit the structure (names the layer).

    Example:
        >>> from rigl_func import RigLConfig
        >>> target_nnz({"w": (10, 10)}, RigLConfig(t_end=10, delta=5, sparsity=0.9, distribution="uniform"))
        {'w': 10}
    """
    plan = fused_plan(shapes, config)
    if plan:  # the sum of the blocks' exact counts (rigl_func.fused)
        parts = target_nnz(split_shapes(shapes, config), config)
        return {k: sum(parts[slice_name(k, i, plan[k])] for i in range(plan[k])) if k in plan else parts[k]
                for k in shapes}
    sparsities = target_sparsities(shapes, config)
    if config.structure != "unstructured":
        return {k: structured_nnz(k, shapes[k], s, config) for k, s in sparsities.items()}
    return {k: nnz_for(math.prod(shapes[k]), s) for k, s in sparsities.items()}


def init_masks(
    shapes: Mapping[str, Any],
    nnz: Mapping[str, int],
    *,
    generator: torch.Generator,
    device: Union[str, torch.device, Mapping[str, torch.device], None] = None,
) -> dict[str, Tensor]:
    """Uniformly random masks with exactly ``nnz[name]`` active entries each.

    Random numbers are drawn on the CPU from ``generator`` in the order of
    ``shapes``, so the same seed gives the same masks on every device and process.

    Args:
        shapes: name -> shape.
        nnz: name -> number of active entries (``0 <= nnz <= numel``).
        generator: a CPU ``torch.Generator`` (explicit randomness).
        device: where to put the masks (one device or a name -> device mapping).

    Returns:
        dict name -> bool tensor of that shape.

    Example:
        >>> m = init_masks({"w": (3, 4)}, {"w": 5}, generator=torch.Generator().manual_seed(0))
        >>> int(m["w"].sum()), m["w"].dtype
        (5, torch.bool)
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got generator={generator!r}")
    masks = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        k = nnz[name]
        if not 0 <= k <= numel:
            raise ValueError(f"nnz[{name!r}] must be in [0, {numel}], got {k}")
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[torch.randperm(numel, generator=generator)[:k]] = True
        dev = device.get(name) if isinstance(device, Mapping) else device
        masks[name] = flat.reshape(tuple(shape)).to(dev) if dev is not None else flat.reshape(tuple(shape))
    return masks


def map_masked_leaves(tree: Any, masks: Mapping[str, Tensor], fn) -> Any:
    """Rebuild ``tree``, replacing each tensor stored under a key of ``masks`` by
    ``fn(tensor, masks[key])``. Dicts, lists, tuples and NamedTuples are walked, so
    params, grads and nested optimizer states (``{"exp_avg": {name: t}}``) all work.
    Tensors whose shape differs from the mask's (e.g. Adam's scalar ``step``) are
    left alone. Pure.
    """
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            mask = masks.get(key) if isinstance(key, str) else None
            if mask is not None and isinstance(value, Tensor) and value.shape == mask.shape:
                out[key] = fn(value, mask)
            else:
                out[key] = map_masked_leaves(value, masks, fn)
        return out
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(map_masked_leaves(v, masks, fn) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_masked_leaves(v, masks, fn) for v in tree)
    return tree


def masked_where(tensors: list[Tensor], masks: list[Tensor], *, pack: Optional[bool] = None) -> list[Tensor]:
    """``[where(m, t, 0) for t, m in zip(tensors, masks)]``, in a constant number of ops
    off the CPU.

    Packed (``pack=True``): tensors are grouped by (dtype, device); each group is packed
    into one flat buffer (``cat``), zeroed with one ``masked_fill`` under the
    concatenated negated mask and read back as views (``split`` and ``view`` launch no
    kernel): about 4 kernel launches per group whatever the number of tensors, instead
    of one or two per tensor. Per tensor (``pack=False``): one ``torch.where`` each,
    which moves half the bytes (no packing copies). ``pack=None`` (default) packs
    everywhere but on the CPU, where launches are free and bandwidth is not (ResNet-18's
    one-call training step: 92 -> 76 ms on 2 cores, dense 64 ms), and under
    ``torch.compile``, which fuses either way. Both give the same values bit for bit.
    Inactive entries are exactly 0, also where the input holds NaN/inf (no
    multiplication). Works under ``torch.func.vmap``, ``torch.func.grad`` and
    ``torch.compile(fullgraph=True)``.

    Args:
        tensors: tensors of any shapes and dtypes.
        masks: bool tensors, ``masks[i].shape == tensors[i].shape``, same devices.
        pack: see above.

    Returns:
        New tensors (packed: views of one new buffer per group). Pure: inputs are not
        modified.

    Example:
        >>> out = masked_where([torch.ones(2, 2), torch.full((3,), float("nan"))],
        ...                    [torch.eye(2, dtype=torch.bool), torch.tensor([False, True, False])])
        >>> out[0].tolist(), out[1].tolist()
        ([[1.0, 0.0], [0.0, 1.0]], [0.0, nan, 0.0])
    """
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    out: list[Any] = [None] * len(tensors)
    for (dtype, device), idx in groups.items():
        packed = pack if pack is not None else (device.type != "cpu" or torch.compiler.is_compiling())
        if not packed:
            zero = torch.zeros((), dtype=dtype, device=device)
            for i in idx:
                out[i] = torch.where(masks[i], tensors[i], zero)
            continue
        if len(idx) == 1:
            i = idx[0]
            out[i] = tensors[i].masked_fill(masks[i].logical_not(), 0)
            continue
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        inactive = torch.cat([masks[i].reshape(-1) for i in idx]).logical_not_()  # our own buffer
        flat = flat.masked_fill(inactive, 0)
        for i, chunk in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = chunk.view(tensors[i].shape)
    return out


def _collect(tree: Any, masks: Mapping[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    leaves: list[Tensor] = []
    leaf_masks: list[Tensor] = []

    def take(t: Tensor, m: Tensor) -> Tensor:
        leaves.append(t)
        leaf_masks.append(m)
        return t

    map_masked_leaves(tree, masks, take)
    return leaves, leaf_masks


def map_masked_leaves_batched(tree: Any, masks: Mapping[str, Tensor], fn) -> Any:
    """Like :func:`map_masked_leaves`, but ``fn`` maps the *lists* of all matching leaves
    and their masks at once: ``fn(list[Tensor], list[Tensor]) -> list[Tensor]``, so a
    multi-tensor implementation (``masked_where``, ``torch._foreach_*``) handles the
    whole tree in one call. Pure when ``fn`` is.

    Example:
        >>> tree = {"mu": {"w": torch.ones(2)}, "nu": {"w": torch.ones(2)}}
        >>> out = map_masked_leaves_batched(tree, {"w": torch.tensor([True, False])}, masked_where)
        >>> out["mu"]["w"].tolist(), out["nu"]["w"].tolist()
        ([1.0, 0.0], [1.0, 0.0])
    """
    leaves, leaf_masks = _collect(tree, masks)
    if not leaves:
        return map_masked_leaves(tree, masks, lambda t, m: t)
    results = iter(fn(leaves, leaf_masks))
    return map_masked_leaves(tree, masks, lambda t, m: next(results))


def apply_masks(tree: Any, masks: Mapping[str, Tensor]) -> Any:
    """Zero the inactive entries of every tensor keyed like ``masks``.

    All matching leaves of the tree are masked together (:func:`masked_where`): a
    constant number of kernel launches per (dtype, device), however many layers.

    Args:
        tree: ``dict[str, Tensor]`` shaped like the params (params, grads,
            optimizer moments), possibly nested in dicts/lists/tuples.
        masks: ``dict[str, bool Tensor]``; keys absent from masks are untouched.

    Returns:
        A new tree; masked entries are exactly ``0`` (also where the input held
        NaN/inf). Masked leaves of one dtype and device are views of one new buffer.
        Pure: inputs are not modified.

    Example:
        >>> apply_masks({"w": torch.ones(2, 2), "b": torch.ones(2)}, {"w": torch.eye(2, dtype=torch.bool)})["w"]
        tensor([[1., 0.],
                [0., 1.]])
    """
    return map_masked_leaves_batched(tree, masks, masked_where)


def validate_masks(masks: Mapping[str, Tensor], params: Params, *, argname: str = "masks") -> None:
    """Raise if ``masks`` do not fit ``params`` (keys, shapes, dtype, device).

    Raises:
        TypeError: a mask is not a bool tensor.
        ValueError: a mask's key is not a parameter, or its shape or device differs.

    Example:
        >>> validate_masks({"w": torch.ones(2, 2, dtype=torch.bool)}, {"w": torch.zeros(2, 3)})
        Traceback (most recent call last):
        ...
        ValueError: masks['w'] has shape (2, 2) but params['w'] has shape (2, 3)
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"{argname} must be a dict of bool tensors, got {type(masks).__name__}")
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"{argname} has key {name!r} that is not in params (params keys: {list(params)[:8]}...)")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{argname}[{name!r}] must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        param = params[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"{argname}[{name!r}] has shape {tuple(mask.shape)} but params[{name!r}] has shape {tuple(param.shape)}")
        if mask.device != param.device:
            raise ValueError(f"{argname}[{name!r}] is on {mask.device} but params[{name!r}] is on {param.device}")
        if not param.is_floating_point():
            raise TypeError(f"params[{name!r}] must be floating point to be sparsified, got {param.dtype}")

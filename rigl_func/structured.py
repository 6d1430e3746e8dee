"""Structured sparsity for RigL: N:M and block masks, their counts, initial masks and
topology updates.

``RigLConfig(structure=...)`` picks one pattern for every sparse layer; the functions
here are the per-layer rules that :func:`rigl_func.init_state`,
:func:`rigl_func.target_nnz`, :func:`rigl_func.check_state` and
:func:`rigl_func.update_layer` dispatch to. All regrouping is done with einops.

**Grouped axis.** A weight is read as ``[out, in, *k]`` (Linear ``[out, in]``, Conv
``[out, in, kh, kw]``; any number of trailing kernel dims), i.e. as a stack of
``prod(k)`` ``[out, in]`` matrices, one per kernel position. Both patterns live in
those ``[out, in]`` matrices, so a 1x1 Conv behaves exactly like a Linear layer.
(A transposed Conv stores ``[in, out, *k]``; the rules apply to its dims 0 and 1 as
stored.)

* **N:M** (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"; Zhou et
  al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From
  Scratch"): a *group* is ``M`` consecutive entries along dim 1 — the inputs of one
  output of a Linear; the input channels ``[m*M, (m+1)*M)`` of one output channel at
  one kernel position ``(kh, kw)`` of a Conv (the reduction order of channels-last
  implicit GEMM, the layout sparse tensor cores accelerate). Regrouping:
  ``rearrange(w, "o (g m) ... -> o ... g m", m=M)``. Every group has exactly ``N``
  active entries, so every layer has sparsity ``1 - N/M`` and ``nnz = numel * N/M``;
  the config's ``sparsity`` and ``distribution`` do not apply to N:M layers.
  Dim 1 must be divisible by ``M``.
* **Block** (Gray et al. 2017, "GPU Kernels for Block-Sparse Weights"): blocks of
  ``block = (rows, cols)`` entries over ``(out, in)``, at each kernel position
  separately. The *block grid* is ``reduce(w, "(ob r) (ib c) ... -> ob ib ...")``,
  shape ``[out/rows, in/cols, *k]``. A mask is a union of whole blocks. A layer with
  distribution sparsity ``s`` (from ``sparsity`` and ``distribution`` on the element
  shapes, as in the unstructured case) keeps ``nnz_for(n_blocks, s)`` blocks, i.e.
  ``n_blocks - floor(s * n_blocks)``, at least 1, and
  ``nnz = that * rows * cols``. Dims 0 and 1 must be divisible by ``rows``/``cols``.

**N:M update.** With ``nnz`` active entries and drop fraction ``f``:

1. each group ``g`` may lose at most ``c_g = min(active_g, growable_g)`` entries,
   where ``growable_g`` counts its inactive entries with a finite grow score (so it
   can always refill itself);
2. ``n = min(floor(f * nnz), max_n, sum_g c_g)`` active entries are dropped: the ``n``
   lowest drop scores over the whole layer among the ``c_g`` lowest of each group —
   exactly RigL's global drop, subject to the per-group capacity (greedy on a
   partition matroid, so it is the capacity-respecting set of lowest scores);
3. each group grows back exactly as many as it lost, ``r_g``, taking its ``r_g``
   highest finite grow scores among its entries not kept (the just-dropped included;
   such an entry keeps its value).

So every group keeps its count (exactly ``N``), ``n`` entries are replaced per layer
as in unstructured RigL (fewer only when groups cannot refill), non-finite grow
scores are never grown and NaN drop scores are dropped first. All ties go to the
lower flat index (within a group: the lower position). Static shapes: per-group
ranks come from an ``argsort`` of ``M`` keys, the layer-wide drop is
:func:`rigl_func.drop` with a tensor ``n``.

**Block update.** Block scores are the *mean* of the element scores over each block
(for ``|w|`` and ``|g|`` this ranks like the block's L1 norm; the mean keeps the
criterion's scale, works for signed custom criteria, and is non-finite when any
element is, e.g. a NaN gradient or a criterion's ``-inf``: such blocks are never
grown). On the block grid, ``n_blocks = min(floor(f * active_blocks),
floor(alpha * target_blocks), growable_blocks)`` blocks are dropped with
:func:`rigl_func.drop` and grown with :func:`rigl_func.grow` (ties: lower flat index
on the grid ``[out/rows, in/cols, *k]``), then expanded to whole blocks.

In both cases genuinely new entries are initialized by ``config.grow_init`` in
:func:`rigl_func.update_layer`, exactly as unstructured ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Union

import torch
from einops import rearrange, reduce, repeat
from torch import Tensor

from rigl_func.distributions import nnz_for
from rigl_func.selection import _order_keys, drop, grow

if TYPE_CHECKING:
    from rigl_func.config import RigLConfig

__all__ = [
    "STRUCTURES",
    "check_layer_shape",
    "structured_nnz",
    "group_n_m",
    "ungroup_n_m",
    "pool_blocks",
    "expand_blocks",
    "init_masks_n_m",
    "init_masks_block",
    "update_mask_n_m",
    "update_mask_block",
    "check_structured_mask",
]

STRUCTURES = ("unstructured", "n:m", "block")

_NO_KEY = torch.iinfo(torch.int64).min


# --------------------------------------------------------------------------------
# Geometry and counts (plain Python on shapes).

def check_layer_shape(name: str, shape: Any, config: RigLConfig) -> None:
    """Raise unless layer ``name`` of ``shape`` can carry ``config.structure``.

    Raises:
        ValueError: fewer than 2 dims, or dims not divisible by ``M`` (N:M, dim 1) or
            by the block (dims 0 and 1); the message names the layer and shape.

    Example:
        >>> from rigl_func import RigLConfig
        >>> check_layer_shape("fc.weight", (8, 6), RigLConfig(t_end=10, delta=5, structure="n:m"))
        Traceback (most recent call last):
        ...
        ValueError: layer 'fc.weight' with shape (8, 6): n_m=(2, 4) needs dim 1 (in) divisible by M=4; keep the layer dense (RigLConfig(dense=...)) or change n_m
    """
    shape = tuple(int(d) for d in shape)
    if config.structure == "unstructured":
        return
    if len(shape) < 2:
        raise ValueError(f"layer {name!r} with shape {shape}: structure={config.structure!r} "
                         "needs a weight with at least 2 dims [out, in, *k]")
    if config.structure == "n:m":
        m = config.n_m[1]
        if shape[1] % m:
            raise ValueError(f"layer {name!r} with shape {shape}: n_m={config.n_m} needs dim 1 (in) divisible "
                             f"by M={m}; keep the layer dense (RigLConfig(dense=...)) or change n_m")
    elif config.structure == "block":
        rows, cols = config.block
        if shape[0] % rows or shape[1] % cols:
            raise ValueError(f"layer {name!r} with shape {shape}: block={config.block} needs dim 0 (out) divisible "
                             f"by {rows} and dim 1 (in) divisible by {cols}; keep the layer dense "
                             "(RigLConfig(dense=...)) or change block")
    else:
        raise ValueError(f"structure must be one of {STRUCTURES}, got structure={config.structure!r}")


def structured_nnz(name: str, shape: Any, sparsity: float, config: RigLConfig) -> int:
    """Active entries of layer ``name`` under ``config.structure`` (see module doc).

    Args:
        name: layer name (for error messages).
        shape: the weight's shape.
        sparsity: the distribution's sparsity for the layer (unused for N:M).
        config: supplies ``structure``, ``n_m`` and ``block``.

    Example:
        >>> from rigl_func import RigLConfig
        >>> cfg = RigLConfig(t_end=10, delta=5, structure="block", block=(2, 2))
        >>> structured_nnz("w", (4, 8), 0.7, cfg)  # 8 blocks, 8 - floor(0.7 * 8) = 3 blocks of 4
        12
        >>> structured_nnz("w", (4, 8), 0.7, RigLConfig(t_end=10, delta=5, structure="n:m", n_m=(1, 4)))
        8
    """
    check_layer_shape(name, shape, config)
    numel = math.prod(int(d) for d in shape)
    if config.structure == "n:m":
        n, m = config.n_m
        return numel // m * n
    if config.structure == "block":
        size = config.block[0] * config.block[1]
        return nnz_for(numel // size, sparsity) * size
    return nnz_for(numel, sparsity)


# --------------------------------------------------------------------------------
# Regrouping (einops).

# The regrouping helpers below are pure reshapes/permutes/reductions of their tensor
# argument. ``allow_in_graph`` lets ``torch.compile`` record each as one graph node
# instead of tracing einops' pattern parser on every call (about 0.5 s of Dynamo
# time per call with torch >= 2.8, where einops no longer registers itself).
# Only these wrappers are registered; einops' own functions are left alone.


@torch.compiler.allow_in_graph
def group_n_m(x: Tensor, m: int) -> Tensor:
    """``[out, in, *k] -> [out, *k, in/m, m]``: the N:M groups on the last dim.

    Example:
        >>> group_n_m(torch.arange(8).reshape(1, 8), 4).tolist()
        [[[0, 1, 2, 3], [4, 5, 6, 7]]]
    """
    return rearrange(x, "o (g m) ... -> o ... g m", m=m)


@torch.compiler.allow_in_graph
def ungroup_n_m(x: Tensor) -> Tensor:
    """Inverse of :func:`group_n_m`: ``[out, *k, g, m] -> [out, g*m, *k]``."""
    return rearrange(x, "o ... g m -> o (g m) ...")


@torch.compiler.allow_in_graph
def pool_blocks(x: Tensor, block: tuple[int, int], reduction: str = "mean") -> Tensor:
    """Reduce each ``block`` of ``x [out, in, *k]`` to one entry: ``[out/r, in/c, *k]``.

    Example:
        >>> pool_blocks(torch.arange(8.0).reshape(2, 4), (2, 2)).tolist()
        [[2.5, 4.5]]
    """
    return reduce(x, "(ob r) (ib c) ... -> ob ib ...", reduction, r=block[0], c=block[1])


@torch.compiler.allow_in_graph
def expand_blocks(x: Tensor, block: tuple[int, int]) -> Tensor:
    """Inverse of pooling: repeat each grid entry over its block, ``[out, in, *k]``."""
    return repeat(x, "ob ib ... -> (ob r) (ib c) ...", r=block[0], c=block[1])


def _check_update_shape(mask: Tensor, argname: str, value: tuple[int, int], divisors: dict[int, int]) -> None:
    """``divisors``: dim -> the number that must divide it."""
    if mask.dim() < 2 or any(mask.shape[d] % k for d, k in divisors.items()):
        need = ", ".join(f"dim {d} by {k}" for d, k in divisors.items())
        raise ValueError(f"{argname}={value} does not divide the mask's shape {tuple(mask.shape)} "
                         f"(needs at least 2 dims and {need})")


# --------------------------------------------------------------------------------
# Initial masks (random, on the CPU generator, in the order of ``shapes``).

def _place(mask: Tensor, device: Union[str, torch.device, Mapping, None], name: str) -> Tensor:
    dev = device.get(name) if isinstance(device, Mapping) else device
    return mask.to(dev) if dev is not None else mask


def init_masks_n_m(
    shapes: Mapping[str, Any],
    n_m: tuple[int, int],
    *,
    generator: torch.Generator,
    device: Union[str, torch.device, Mapping[str, torch.device], None] = None,
) -> dict[str, Tensor]:
    """Random N:M masks: in every group ``N`` of the ``M`` entries, uniformly at random.

    Args:
        shapes: name -> shape ``[out, in, *k]`` with ``in % M == 0``.
        n_m: ``(N, M)``.
        generator: a CPU ``torch.Generator`` (one ``rand`` per layer, in order).
        device: one device or a name -> device mapping.

    Example:
        >>> m = init_masks_n_m({"w": (2, 8)}, (2, 4), generator=torch.Generator().manual_seed(0))
        >>> group_n_m(m["w"], 4).sum(-1).tolist()
        [[2, 2], [2, 2]]
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got generator={generator!r}")
    n, m = n_m
    masks = {}
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2 or shape[1] % m or not 0 <= n <= m:
            raise ValueError(f"n_m={n_m} does not fit shapes[{name!r}]={shape} (needs 0 <= N <= M and dim 1 divisible by M)")
        grouped = (shape[0], *shape[2:], shape[1] // m, m)
        rank = _rank(torch.rand(grouped, generator=generator))
        masks[name] = _place(ungroup_n_m(rank < n), device, name)
    return masks


def init_masks_block(
    shapes: Mapping[str, Any],
    nnz: Mapping[str, int],
    block: tuple[int, int],
    *,
    generator: torch.Generator,
    device: Union[str, torch.device, Mapping[str, torch.device], None] = None,
) -> dict[str, Tensor]:
    """Random block masks: ``nnz[name] / (rows * cols)`` blocks chosen uniformly.

    Example:
        >>> m = init_masks_block({"w": (4, 8)}, {"w": 8}, (2, 2), generator=torch.Generator().manual_seed(0))
        >>> pool_blocks(m["w"].float(), (2, 2)).sum().item()  # 2 full blocks
        2.0
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got generator={generator!r}")
    size = block[0] * block[1]
    masks = {}
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2 or shape[0] % block[0] or shape[1] % block[1]:
            raise ValueError(f"block={block} does not divide shapes[{name!r}]={shape} (dims 0 and 1)")
        grid = (shape[0] // block[0], shape[1] // block[1], *shape[2:])
        n_blocks = math.prod(grid)
        k = nnz[name]
        if k % size or not 0 <= k // size <= n_blocks:
            raise ValueError(f"nnz[{name!r}] must be a multiple of the block size {size} in [0, {n_blocks * size}], got {k}")
        flat = torch.zeros(n_blocks, dtype=torch.bool)
        flat[torch.randperm(n_blocks, generator=generator)[: k // size]] = True
        masks[name] = _place(expand_blocks(flat.reshape(grid), block), device, name)
    return masks


# --------------------------------------------------------------------------------
# Topology updates (pure, static shapes).

def _rank(values: Tensor, eligible: Union[Tensor, None] = None) -> Tensor:
    """Rank of each entry along the last dim, 0 = largest; ties -> lower position.

    Uses the keys of :mod:`rigl_func.selection` (float32 order, NaN above ``+inf``);
    ineligible entries rank after every eligible one.
    """
    keys = _order_keys(values.to(torch.float32))
    if eligible is not None:
        keys = torch.where(eligible, keys, _NO_KEY)
    return torch.argsort(torch.argsort(keys, dim=-1, descending=True), dim=-1)


def _replaced(fraction: Union[float, Tensor], active: Tensor, limit: Tensor, max_n: int) -> Tensor:
    """``min(floor(fraction * active.sum()), max_n, limit)`` as a 0-d int64 tensor."""
    fraction = torch.as_tensor(fraction, dtype=torch.float64, device=active.device)
    n = torch.floor(fraction * active.sum()).to(torch.int64).clamp(min=0, max=max_n)
    return torch.minimum(n, limit)


def update_mask_n_m(
    drop_scores: Tensor,
    grow_scores: Tensor,
    mask: Tensor,
    fraction: Union[float, Tensor],
    *,
    max_n: int,
    n_m: tuple[int, int],
) -> Tensor:
    """RigL mask update that keeps every N:M group's count (module doc, "N:M update").

    Args:
        drop_scores: float ``[out, in, *k]``; the lowest active ones are dropped.
        grow_scores: float, same shape; the highest finite ones are grown.
        mask: bool, same shape, N:M along dim 1 (every group's count is preserved).
        fraction: drop fraction ``f(t)``, float or 0-d tensor.
        max_n: static upper bound on the number of replaced entries.
        n_m: ``(N, M)``; only ``M`` (the group size) matters for the update.

    Returns:
        New bool mask with the same count in every group. Pure.

    Raises:
        ValueError: dim 1 of ``mask`` is not divisible by ``M``.

    Example:
        >>> w = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.5, 0.0, 0.4, 0.0]])
        >>> g = torch.tensor([[0.0, 0.0, 0.3, 0.7, 0.0, 0.8, 0.0, 0.2]])
        >>> m = w != 0
        >>> update_mask_n_m(w.abs(), g.abs(), m, 0.5, max_n=2, n_m=(2, 4)).int().tolist()
        [[1, 0, 0, 1, 1, 1, 0, 0]]
    """
    _check_update_shape(mask, "n_m", n_m, {1: n_m[1]})
    m = n_m[1]
    active = group_n_m(mask, m)
    finite = group_n_m(torch.isfinite(grow_scores), m)
    capacity = torch.minimum(active.sum(-1), (finite & ~active).sum(-1))
    # the c_g most droppable actives of each group are eligible; drop n of them layer-wide
    droppable = _rank(group_n_m(-drop_scores.float(), m), active) < capacity.unsqueeze(-1)
    eligible = ungroup_n_m(active & droppable)
    n = _replaced(fraction, mask, eligible.sum(), max_n)
    dropped = group_n_m(eligible & ~drop(drop_scores, eligible, n, max_n=max_n), m)
    kept = active & ~dropped
    # every group regrows as many as it lost, by its highest finite grow scores
    candidates = ~kept & finite
    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    safe = torch.where(finite, group_n_m(grow_scores.float(), m), zero)
    grown = candidates & (_rank(safe, candidates) < dropped.sum(-1, keepdim=True))
    return ungroup_n_m(kept | grown)


def update_mask_block(
    drop_scores: Tensor,
    grow_scores: Tensor,
    mask: Tensor,
    fraction: Union[float, Tensor],
    *,
    max_n: int,
    block: tuple[int, int],
) -> Tensor:
    """RigL mask update on whole blocks (module doc, "Block update").

    Args:
        drop_scores, grow_scores: float ``[out, in, *k]``; pooled by the block mean.
        mask: bool, same shape, a union of whole blocks (a block counts as active
            when all its entries are).
        fraction: drop fraction ``f(t)``.
        max_n: static upper bound on replaced *entries*; ``max_n // (rows * cols)``
            bounds the replaced blocks.
        block: ``(rows, cols)``.

    Returns:
        New bool mask, a union of whole blocks with as many blocks as ``mask``. Pure.

    Raises:
        ValueError: dims 0/1 of ``mask`` are not divisible by ``block``.

    Example:
        >>> w = torch.tensor([[1.0, 1.0, 0.2, 0.2, 0.0, 0.0]]).repeat(2, 1)
        >>> g = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.5, 0.5]]).repeat(2, 1)
        >>> update_mask_block(w.abs(), g.abs(), w != 0, 0.5, max_n=4, block=(2, 2)).int().tolist()
        [[1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1]]
    """
    _check_update_shape(mask, "block", block, {0: block[0], 1: block[1]})
    size = block[0] * block[1]
    drop_blocks = pool_blocks(drop_scores.float(), block)
    grow_blocks = pool_blocks(grow_scores.float(), block)
    active = pool_blocks(mask.to(torch.int32), block, "sum") == size
    growable = (torch.isfinite(grow_blocks) & ~active).sum()
    max_blocks = max_n // size
    n = _replaced(fraction, active, growable, max_blocks)
    kept = drop(drop_blocks, active, n, max_n=max_blocks)
    return expand_blocks(grow(grow_blocks, kept, n, max_n=max_blocks), block)


# --------------------------------------------------------------------------------
# Validation (eager).

def check_structured_mask(name: str, mask: Tensor, config: RigLConfig, *, argname: str = "state.masks") -> None:
    """Raise unless ``mask`` has ``config.structure``'s pattern (eager; syncs).

    N:M: every group has exactly ``N`` active entries. Block: the mask is a union of
    whole blocks. Unstructured: nothing to check.

    Raises:
        ValueError naming the layer, the pattern and the first offending group/block.
    """
    check_layer_shape(name, tuple(mask.shape), config)
    if config.structure == "n:m":
        n, m = config.n_m
        counts = group_n_m(mask, m).sum(-1)
        bad = (counts != n).nonzero()
        if bad.numel():
            idx = tuple(bad[0].tolist())
            raise ValueError(f"{argname}[{name!r}] is not {n}:{m} along dim 1: group {idx} "
                             f"(index [out, *k, group]) has {int(counts[idx])} active entries, expected {n}")
    elif config.structure == "block":
        counts = pool_blocks(mask.to(torch.int32), config.block, "sum")
        size = config.block[0] * config.block[1]
        bad = ((counts != 0) & (counts != size)).nonzero()
        if bad.numel():
            idx = tuple(bad[0].tolist())
            raise ValueError(f"{argname}[{name!r}] is not a union of whole {config.block} blocks: block {idx} "
                             f"(index [out/rows, in/cols, *k]) has {int(counts[idx])} of {size} entries active")

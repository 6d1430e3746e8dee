"""Collectives for data-parallel RigL: broadcast, gradient averaging, mask checks.

The core (:mod:`rigl_func.topology`, :mod:`rigl_func.state`, ...) never talks to other
processes: it takes already-reduced gradients and returns new trees. Under data
parallelism every rank runs the *same* pure update on the *same* inputs, so the
masks stay identical if (a) every rank starts from the same state and params
(:func:`broadcast_tree`) and (b) every rank feeds the update the same averaged
gradients (:func:`all_reduce_mean`, or ``DistributedDataParallel``). Random criteria
(SET, ``grow_init="normal"``) are hashes of ``(state.key, step, layer)``
(:mod:`rigl_func.random`), so they agree across ranks without any communication.
:func:`check_consistent` is a cheap guard that this really holds.

All helpers work with any initialized process group (the default group unless
``group=`` is given; gloo, nccl, ...). **Without** an initialized process group, or
with a world size of 1, they are no-ops: the same training script then runs as a
single process, with or without ``torchrun``. All of them are collectives: every
rank of the group must call them, in the same order, with trees of the same
structure (``check_consistent`` detects a structure mismatch and raises on every
rank instead of hanging).

Communication is coalesced: one collective per ``(device, dtype)`` bucket of the
tree's leaves, not one per layer.

Example (single process: the helpers are identities):
    >>> import torch
    >>> tree = {"w": torch.ones(2, 3), "m": torch.tensor([True, False])}
    >>> out = all_reduce_mean({"w": tree["w"]})
    >>> torch.equal(out["w"], tree["w"])
    True
    >>> check_consistent(broadcast_tree(tree))  # nothing to compare against: passes
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_unflatten

from rigl_func.random import hash32

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "broadcast_tree",
    "all_reduce_mean",
    "tree_checksums",
    "check_consistent",
]

_MASK32 = 0xFFFFFFFF


def is_distributed(group: Any = None) -> bool:
    """True when ``torch.distributed`` is initialized and the group has > 1 rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def get_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when not distributed)."""
    dist = torch.distributed
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def get_world_size(group: Any = None) -> int:
    """Number of ranks in ``group`` (1 when not distributed)."""
    dist = torch.distributed
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _comm_device(group: Any) -> torch.device:
    """Device for small bookkeeping tensors: CUDA for nccl, else CPU."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _buckets(leaves: list[Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``leaves`` grouped by (device, wire dtype); bool travels as uint8."""
    groups: dict[tuple, list[int]] = {}
    for i, leaf in enumerate(leaves):
        dtype = torch.uint8 if leaf.dtype == torch.bool else leaf.dtype
        groups.setdefault((leaf.device, dtype), []).append(i)
    return groups


def _check_leaf(leaf: Any, where: str, fn: str) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support has no DTensor
        return
    if isinstance(leaf, DTensor):
        raise TypeError(f"{fn}: leaf {where} is a DTensor (FSDP2/tensor parallel); use rigl_func.fsdp.full_tree "
                        "to gather it first")


def broadcast_tree(tree: Any, src: int = 0, group: Any = None) -> Any:
    """``src``'s tensor leaves on every rank, as a new tree (Pure: inputs not modified).

    Use it once after initialization (``state = broadcast_tree(state)``, ``params =
    broadcast_tree(params)``) so that every rank starts from rank 0's masks, weights
    and optimizer moments. Non-tensor leaves (ints, strings, ``None``) are returned
    as they are, not broadcast. Leaves are coalesced into one ``broadcast`` per
    ``(device, dtype)``; bool tensors travel as uint8 (gloo has no bool).

    Args:
        tree: any pytree (dict, list, tuple, NamedTuple such as :class:`RigLState`) whose
            tensor leaves have the same shapes and dtypes on every rank.
        src: global rank whose values win.
        group: process group (default: the default group).

    Returns:
        A tree of the same structure with fresh tensors (the input itself when not
        distributed).

    Example:
        >>> import torch
        >>> broadcast_tree({"m": torch.tensor([True, False])})["m"].tolist()
        [True, False]
    """
    if not is_distributed(group):
        return tree
    leaves, spec = tree_flatten(tree)
    tensor_idx = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
    for i in tensor_idx:
        _check_leaf(leaves[i], f"#{i}", "broadcast_tree")
    tensors = [leaves[i] for i in tensor_idx]
    out = list(leaves)
    for (device, wire), members in _buckets(tensors).items():
        buf = torch.cat([tensors[j].detach().reshape(-1).to(wire) for j in members])
        torch.distributed.broadcast(buf, src, group=group)
        for j, piece in zip(members, buf.split([tensors[j].numel() for j in members])):
            t = tensors[j]
            out[tensor_idx[j]] = piece.view(t.shape).to(t.dtype).clone()
    return tree_unflatten(out, spec)


def all_reduce_mean(grads: Any, group: Any = None) -> Any:
    """The mean of ``grads`` over the ranks of ``group``, as a new tree. Pure.

    For functional data-parallel loops that do not use ``DistributedDataParallel``:
    each rank computes gradients on its own batch, then
    ``grads = all_reduce_mean(grads)`` gives every rank the gradient of the global
    batch (for a loss that is a mean over equally sized local batches). RigL needs
    the *dense* averaged gradient, so call it before :func:`rigl_func.accumulate`
    and do not mask the gradients first. The leaves are flattened into one buffer
    per ``(device, dtype)`` and reduced with one ``all_reduce(SUM)`` each, then
    divided by the world size (exact for a power-of-two world size).

    Args:
        grads: pytree of floating-point tensors, same shapes on every rank.
        group: process group (default: the default group).

    Returns:
        A tree of the same structure (the input itself when not distributed).

    Raises:
        TypeError: a leaf is not a floating-point tensor.
    """
    leaves, spec = tree_flatten(grads)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor) or not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(f"all_reduce_mean: every leaf must be a floating-point tensor, got leaf #{i} "
                            f"of type {type(leaf).__name__} {getattr(leaf, 'dtype', '')}")
        _check_leaf(leaf, f"#{i}", "all_reduce_mean")
    if not is_distributed(group):
        return grads
    world = torch.distributed.get_world_size(group)
    out = list(leaves)
    for (device, dtype), members in _buckets(leaves).items():
        buf = torch.cat([leaves[j].detach().reshape(-1) for j in members])
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM, group=group)
        buf /= world
        for j, piece in zip(members, buf.split([leaves[j].numel() for j in members])):
            out[j] = piece.view(leaves[j].shape)
    return tree_unflatten(out, spec)


def _bits(flat: Tensor) -> Tensor:
    """The bit pattern of every element as int64 (bool -> 0/1, floats reinterpreted)."""
    if flat.dtype == torch.bool:
        return flat.to(torch.int64)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.is_floating_point():
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
        flat = flat.contiguous().view(as_int)
    return flat.to(torch.int64)


def tree_checksums(tree: Any) -> Tensor:
    """Order-independent int64 checksum of every tensor leaf: ``[num_leaves, 2]``.

    Column 0 is ``sum_i hash(i, bits(x_i))`` (a multiset hash of (position, value)
    pairs, < 2**63 for leaves of fewer than 2**31 elements), column 1 is the number
    of non-zero entries (the active count of a mask). Two ranks whose masks differ
    in a single position get different checksums unless two 32-bit hashes collide.
    Local and pure; it syncs nothing.

    Example:
        >>> import torch
        >>> a = {"w": torch.tensor([True, False, True])}
        >>> b = {"w": torch.tensor([True, True, False])}
        >>> bool((tree_checksums(a)[:, 0] != tree_checksums(b)[:, 0]).all())
        True
        >>> tree_checksums(a)[:, 1].tolist()
        [2]
    """
    leaves = [x for x in tree_flatten(tree)[0] if isinstance(x, Tensor)]
    rows = []
    for leaf in leaves:
        flat = leaf.detach().reshape(-1)
        bits = _bits(flat)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        idx = torch.arange(bits.numel(), dtype=torch.int64, device=bits.device)
        h = hash32(hash32(idx) ^ (bits & _MASK32)) ^ hash32((bits >> 32) & _MASK32)
        if leaf.dtype == torch.bool:
            h = h * bits  # only active positions count: a hash of the set of positions
        nonzero = torch.count_nonzero(flat) if flat.numel() else torch.zeros((), dtype=torch.int64)
        rows.append(torch.stack([h.sum(), nonzero.to(torch.int64)]))
    if not rows:
        return torch.zeros(0, 2, dtype=torch.int64)
    return torch.stack([r.cpu() for r in rows])


def _names(tree: Any) -> list[str]:
    """Readable names of the tensor leaves: the keys of a flat dict, else pytree paths."""
    if isinstance(tree, Mapping) and all(isinstance(v, Tensor) for v in tree.values()):
        return [str(k) for k in tree]
    return [keystr(path) for path, x in tree_flatten_with_path(tree)[0] if isinstance(x, Tensor)]


def check_consistent(tree: Any, *, what: str = "masks", group: Any = None) -> None:
    """Raise on every rank if the ranks' ``tree`` differ (checksums, not full copies).

    Each rank computes :func:`tree_checksums` (two int64 per leaf) and gathers them
    (two small ``all_gather``; the first one compares the trees' structure, so a
    mismatched tree raises instead of hanging). Call it after every topology update
    with ``state.masks``; it also works for params or optimizer moments (bitwise).

    Args:
        tree: a dict of tensors (layer names appear in the error) or any pytree.
        what: what the tree is, for the message.
        group: process group (default: the default group).

    Raises:
        RuntimeError: the ranks' trees differ; the message names the layer(s) and the
            active counts per rank. Raised on every rank.
    """
    if not is_distributed(group):
        return
    dist = torch.distributed
    world = dist.get_world_size(group)
    device = _comm_device(group)
    names = _names(tree)
    sums = tree_checksums(tree)
    shapes = [tuple(x.shape) for x in tree_flatten(tree)[0] if isinstance(x, Tensor)]
    header = torch.tensor([len(names), zlib.crc32(repr((names, shapes)).encode())], dtype=torch.int64, device=device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=group)
    if any(not torch.equal(h, headers[0]) for h in headers[1:]):
        raise RuntimeError(f"check_consistent: the ranks' {what} have different structures (layer names or "
                           f"shapes); per-rank [count, crc32 of names and shapes]: {[h.tolist() for h in headers]}")
    sums = sums.to(device)
    gathered = [torch.empty_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums, group=group)
    table = torch.stack(gathered).cpu()  # [world, leaves, 2]
    bad = (table != table[:1]).any(dim=2).any(dim=0)
    if bool(bad.any()):
        layers = [names[i] for i in bad.nonzero().flatten().tolist()]
        counts = {names[i]: table[:, i, 1].tolist() for i in bad.nonzero().flatten().tolist()}
        raise RuntimeError(f"check_consistent: {what} differ between ranks in {layers} "
                           f"(non-zero count per rank: {counts}); the ranks have diverged")

"""RigL on FSDP2-sharded parameters (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter is a ``DTensor`` of which each rank holds one shard
(``Shard(0)`` on a 1-D mesh: rank ``r`` holds ``torch.chunk(full, world, 0)[r]``),
and after ``backward()`` the gradients are sharded the same way and already averaged
over the ranks (reduce-scatter). A RigL update needs whole layers: the drop and grow
counts are per layer and the ``topk`` runs over all of a layer's entries. The design
here is the simplest exact one:

1. **Masks and RigL state stay whole (replicated)** on every rank: bool masks cost
   one byte per weight; ``grad_acc`` / ``ema`` (only with accumulation or SNFS) are
   full-size float tensors.
2. On an update step, :func:`update_topology_sharded` all-gathers the sparse layers'
   weights and gradients (``DTensor.full_tensor()``), runs the pure
   :func:`rigl_func.update_topology` on the full tensors - identically on every rank,
   because the inputs are identical and randomness is a hash of (seed, step, layer) -
   and returns this rank's shard of the new weights plus the new (whole) state.
3. Between updates, :func:`local_masks` gives each rank the shard of every mask that
   matches its weight shard, to mask gradients, weights and optimizer moments
   locally, with no communication.

:func:`accumulate_sharded` gathers gradients only on the iterations whose
gradients :func:`rigl_func.accumulate` actually reads (every iteration for SNFS's
EMA, the accumulation window otherwise, never for plain RigL with
``grad_accumulation_n = 1``).

Cost: one all-gather of the sparse weights and gradients per update (every
``delta`` steps) and a transient peak of one full copy of them per rank. A
distributed ``topk`` would avoid the full copy; it is not implemented.
Only 1-D meshes with ``Shard(d)`` or ``Replicate()`` placements are supported
(plain FSDP2); other layouts raise ``NotImplementedError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor

from rigl_func.config import RigLConfig
from rigl_func.schedules import in_accumulation_window
from rigl_func.state import RigLState
from rigl_func.topology import accumulate, update_topology

__all__ = ["full_tree", "local_shard", "local_masks", "accumulate_sharded", "update_topology_sharded"]


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def full_tree(tree: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Whole tensors: ``DTensor`` leaves are all-gathered (``full_tensor()``), plain
    tensors pass through. Collective when any leaf is a DTensor. Pure."""
    dtensor = _dtensor_cls()
    return {k: (v.full_tensor() if isinstance(v, dtensor) else v) for k, v in tree.items()}


def local_shard(full: Tensor, like: Tensor) -> Tensor:
    """The part of ``full`` that this rank holds for the DTensor ``like``.

    Args:
        full: whole tensor, shape ``like.shape``.
        like: a ``DTensor`` on a 1-D mesh with ``Shard(d)`` or ``Replicate()``
            placement (or a plain tensor: then ``full`` is returned).

    Returns:
        A plain tensor shaped like ``like.to_local()`` (a view of ``full``).

    Raises:
        ValueError: shapes differ. NotImplementedError: another layout.
    """
    if not isinstance(like, _dtensor_cls()):
        return full
    from torch.distributed.tensor import Replicate, Shard

    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"local_shard: full has shape {tuple(full.shape)} but the DTensor has {tuple(like.shape)}")
    mesh = like.device_mesh
    if mesh.ndim != 1 or len(like.placements) != 1:
        raise NotImplementedError(f"local_shard supports 1-D meshes only, got placements={like.placements}")
    placement = like.placements[0]
    if isinstance(placement, Replicate):
        return full
    if not isinstance(placement, Shard):
        raise NotImplementedError(f"local_shard supports Shard/Replicate placements, got {placement}")
    chunks = torch.chunk(full, mesh.size(), dim=placement.dim)
    coord = mesh.get_local_rank()
    local_shape = tuple(like.to_local().shape)
    if coord < len(chunks):
        piece = chunks[coord]
    else:  # more ranks than rows: this rank holds an empty shard
        shape = list(full.shape)
        shape[placement.dim] = 0
        piece = full.new_empty(shape)
    if tuple(piece.shape) != local_shape:
        raise NotImplementedError(f"local_shard: expected a chunk of shape {local_shape}, computed "
                                  f"{tuple(piece.shape)} (uneven sharding that is not torch.chunk's)")
    return piece


def local_masks(masks: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each mask's shard matching this rank's shard of ``params[name]``. Local, pure.

    Example:
        >>> import torch
        >>> local_masks({"w": torch.tensor([True, False])}, {"w": torch.zeros(2)})["w"].tolist()
        [True, False]
    """
    return {name: local_shard(mask, params[name]) for name, mask in masks.items()}


def _reads_grads(step_after: Tensor, config: RigLConfig) -> bool:
    if config.ema_momentum > 0:
        return True
    if config.grad_accumulation_n == 1:
        return False
    return bool(in_accumulation_window(step_after, config))


def accumulate_sharded(state: RigLState, grads: Mapping[str, Tensor], config: RigLConfig) -> RigLState:
    """:func:`rigl_func.accumulate` for sharded gradients (whole ``grad_acc``/``ema``).

    Gathers the sparse layers' gradients only when ``accumulate`` reads them this
    iteration (decided eagerly, one host sync). Collective on those iterations:
    call it on every rank. Pure.
    """
    if not _reads_grads(state.step + 1, config):
        # accumulate ignores the gradients on this iteration (outside the window,
        # or nothing to accumulate): pass same-shaped placeholders, no gathering.
        return accumulate(state, {**state.grad_acc}, config)
    return accumulate(state, full_tree({n: grads[n] for n in state.masks}), config)


def update_topology_sharded(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    state: RigLState,
    config: RigLConfig,
    aux: Optional[Mapping[str, Mapping[str, Tensor]]] = None,
) -> tuple[dict[str, Tensor], RigLState]:
    """:func:`rigl_func.update_topology` on sharded params; returns local shards.

    Args:
        params: name -> parameter (``DTensor`` under FSDP2, or plain) for at least
            the sparse layers.
        grads: name -> averaged dense gradient, sharded like ``params`` (FSDP2's
            ``p.grad``); ignored with ``grad_accumulation_n > 1``.
        state: whole (replicated) state, identical on every rank.
        config: the RigL config.
        aux: optional whole trees for custom criteria.

    Returns:
        ``(local_params, state)``: ``local_params[name]`` is this rank's shard of the
        new weights of every sparse layer (a plain tensor shaped like
        ``params[name].to_local()``; copy it into the parameter's local tensor), and
        the new whole state, identical on every rank. Collective. Pure.
    """
    names = list(state.masks)
    full_params = full_tree({n: params[n] for n in names})
    if config.grad_accumulation_n > 1:
        full_grads = {n: state.grad_acc[n] for n in names}  # unused: growth reads grad_acc
    else:
        full_grads = full_tree({n: grads[n] for n in names})
    new_full, state = update_topology(full_params, full_grads, state, config, aux=aux)
    return {n: local_shard(new_full[n], params[n]) for n in names}, state


"""Block-sparse layouts of masked Linear weights, built once per topology update.

A :class:`BlockLayout` lists the active ``(rows, cols)`` blocks of one ``[out, in]``
mask (a union of whole blocks, e.g. from ``RigLConfig(structure="block")``) in
row-major order, with CSR row pointers and the column-major permutation that the
transposed product ``g W_s`` reads. It holds indices only: the weight values are read
from the (dense) parameter at each call of :func:`rigl_func.sparse_linear`, so a
layout stays valid across optimizer steps and changes only at topology updates.
RigL keeps the number of active entries of each layer exact, so a layer's number of
active blocks ``nnzb`` and hence every shape in its layout is the same after each
update (``torch.compile`` does not recompile).

Building a layout reads the mask on the host (``nonzero``): do it once per topology
update, never per step. ``block=(1, 1)`` describes an unstructured mask (one "block"
per active entry).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["BlockLayout", "block_layout", "block_layouts", "with_dense_grad", "layout_mask"]


class BlockLayout(NamedTuple):
    """Indices of the active blocks of one ``[out, in]`` weight.

    Attributes:
        rows: int64 ``[nnzb]`` block-row of each active block, row-major order.
        cols: int64 ``[nnzb]`` block-column of each active block.
        crow: int64 ``[out/r + 1]`` CSR row pointers into ``rows``/``cols``.
        t_perm: int64 ``[nnzb]`` the blocks in column-major order (indices into ``rows``).
        t_ccol: int64 ``[in/c + 1]`` CSC column pointers into ``t_perm``.
        shape: ``(out, in)``.
        block: ``(r, c)`` block shape.
        kernel: the kernel used (``"blocks"``, ``"triton"``, ``"dense"``, ...), chosen
            at build time by :func:`rigl_func.sparse_kernels.choose_kernel` for ``"auto"``.
        dense_grad: whether :func:`rigl_func.sparse_linear` returns the dense weight
            gradient ``g^T x`` (RigL update steps) instead of its active blocks only.
    """

    rows: Tensor
    cols: Tensor
    crow: Tensor
    t_perm: Tensor
    t_ccol: Tensor
    shape: tuple[int, int]
    block: tuple[int, int]
    kernel: str
    dense_grad: bool

    @property
    def nnzb(self) -> int:
        """Number of active blocks."""
        return self.rows.shape[0]

    @property
    def density(self) -> float:
        """Fraction of active entries."""
        (o, i), (r, c) = self.shape, self.block
        return self.nnzb * r * c / (o * i)


def _check_block(mask: Tensor, block: tuple[int, int], name: str) -> tuple[int, int]:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        got = f"{type(mask).__name__}" if not isinstance(mask, Tensor) else f"{mask.dtype} {tuple(mask.shape)}"
        raise ValueError(f"{name}: mask must be a 2-D bool tensor [out, in] (a Linear weight's), got {got}")
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and b >= 1 for b in block)):
        raise ValueError(f"block must be (rows, cols) of positive ints, got {block=}")
    r, c = block
    o, i = mask.shape
    if o % r or i % c:
        raise ValueError(f"{name}: mask shape {(o, i)} is not divisible by block={tuple(block)}")
    return r, c


def block_layout(mask: Tensor, block: tuple[int, int] = (32, 32), *, kernel: str = "auto",
                 dense_grad: bool = False, dtype: torch.dtype = torch.float32, name: str = "mask") -> BlockLayout:
    """The layout of one block-structured ``[out, in]`` mask.

    Args:
        mask: bool ``[out, in]``, a union of whole ``block`` blocks.
        block: ``(r, c)``; ``(1, 1)`` for an unstructured mask.
        kernel: ``"auto"`` (per device, shape, density and ``dtype``:
            :func:`rigl_func.sparse_kernels.choose_kernel`) or one of ``"blocks"`` (CPU),
            ``"triton"`` (CUDA), ``"dense"``, or a registered one.
        dense_grad: see :class:`BlockLayout`.
        dtype: the compute dtype ``"auto"`` chooses for.
        name: used in error messages.

    Returns:
        :class:`BlockLayout`, index tensors on ``mask.device``. Reads the mask on the
        host: once per topology update.

    Raises:
        ValueError: not a 2-D bool mask, shape not divisible by ``block``, a partial
            block (the mask is not a union of whole blocks), or an unknown ``kernel``.

    Example:
        >>> m = torch.zeros(4, 6, dtype=torch.bool); m[:2, 2:4] = True
        >>> lay = block_layout(m, (2, 2), kernel="blocks")
        >>> lay.rows.tolist(), lay.cols.tolist(), lay.nnzb
        ([0], [1], 1)
    """
    r, c = _check_block(mask, block, name)
    from rigl_func.sparse_kernels import choose_kernel, kernel_names  # noqa: PLC0415 (they import this module)

    if kernel != "auto" and kernel not in kernel_names():
        raise ValueError(f"kernel must be 'auto' or one of {kernel_names()}, got {kernel=!r}")
    o, i = mask.shape
    grid = mask.reshape(o // r, r, i // c, c)
    active = grid.any(dim=(1, 3))
    if not torch.equal(grid.all(dim=(1, 3)), active):
        raise ValueError(f"{name}: mask is not a union of whole {r}x{c} blocks (some blocks are partly active); "
                         f"use the block= the mask was made with, or (1, 1) for an unstructured mask")
    rows, cols = active.nonzero(as_tuple=True)
    t_perm = torch.argsort(cols * (o // r) + rows)
    counts = torch.bincount(rows, minlength=o // r)
    t_counts = torch.bincount(cols, minlength=i // c)
    zero = torch.zeros(1, dtype=torch.int64, device=mask.device)
    layout = BlockLayout(rows=rows, cols=cols, crow=torch.cat([zero, counts.cumsum(0)]),
                         t_perm=t_perm, t_ccol=torch.cat([zero, t_counts.cumsum(0)]),
                         shape=(o, i), block=(r, c), kernel=kernel, dense_grad=bool(dense_grad))
    if kernel == "auto":
        layout = layout._replace(kernel=choose_kernel(layout, mask.device, dtype))
    return layout


def block_layouts(masks: Mapping[str, Tensor], block: tuple[int, int] = (32, 32), *, kernel: str = "auto",
                  dense_grad: bool = False, dtype: torch.dtype = torch.float32) -> dict[str, BlockLayout]:
    """:func:`block_layout` of every 2-D mask of a tree (Conv masks are skipped).

    Example:
        >>> lays = block_layouts({"fc.weight": torch.ones(4, 4, dtype=torch.bool)}, (2, 2), kernel="dense")
        >>> lays["fc.weight"].nnzb
        4
    """
    return {k: block_layout(m, block, kernel=kernel, dense_grad=dense_grad, dtype=dtype, name=k)
            for k, m in masks.items() if m.dim() == 2}


def with_dense_grad(layouts: Mapping[str, BlockLayout], dense_grad: bool) -> dict[str, BlockLayout]:
    """The same layouts with ``dense_grad`` set (free: no tensor is touched). Pass
    ``tx.is_update_step(state)``: the dense weight gradient is computed only where RigL
    reads it.

    Example:
        >>> lays = block_layouts({"w": torch.ones(2, 2, dtype=torch.bool)}, (1, 1), kernel="dense")
        >>> with_dense_grad(lays, True)["w"].dense_grad
        True
    """
    return {k: v._replace(dense_grad=bool(dense_grad)) for k, v in layouts.items()}


def layout_mask(layout: BlockLayout) -> Tensor:
    """The bool ``[out, in]`` mask a layout describes (for tests and the dense kernel).

    Example:
        >>> m = torch.eye(4, dtype=torch.bool).repeat_interleave(2, 0).repeat_interleave(2, 1)
        >>> torch.equal(layout_mask(block_layout(m, (2, 2), kernel="dense")), m)
        True
    """
    (o, i), (r, c) = layout.shape, layout.block
    grid = torch.zeros(o // r, i // c, dtype=torch.bool, device=layout.rows.device)
    grid[layout.rows, layout.cols] = True
    return grid.repeat_interleave(r, 0).repeat_interleave(c, 1)

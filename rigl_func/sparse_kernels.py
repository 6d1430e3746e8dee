"""Block-sparse matmul kernels behind :func:`rigl_func.sparse_linear`, and the rule that
picks one per device, shape, density and dtype.

Each kernel computes, for a 2-D input ``x [M, in]``, the active blocks
``vb [nnzb, r, c]`` of a weight ``W_s [out, in]`` and a :class:`BlockLayout`:

* ``mm``: ``y = x W_s^T`` ``[M, out]`` (forward);
* ``mm_t``: ``dx = g W_s`` ``[M, in]`` (input gradient);
* ``sddmm``: ``(g^T x)`` at the active blocks only, ``[nnzb, r, c]`` (weight gradient,
  a sampled dense-dense product).

Kernels (one table, :data:`KERNEL_TABLE`):

* ``"dense"``: scatter the blocks into a zero ``[out, in]`` and use dense matmuls
  (the fallback wherever sparse is slower);
* ``"gather"``: pure PyTorch with static shapes: gather the input slices of the active
  blocks, ``einsum``, ``index_add``. Any device; composes with ``vmap``;
* ``"bsr"``: ``torch.sparse`` BSR (CSR for ``(1, 1)`` blocks) matmuls (MKL on the CPU) and a
  per-block ``mm`` loop for ``sddmm``, as ``torch.library`` custom ops (opaque to
  ``torch.compile``; no ``vmap`` rule);
* ``"triton"``: Triton kernels (CUDA; :mod:`rigl_func.triton_block_sparse`).

The ``"auto"`` choice (:func:`choose_kernel`) follows ``python -m benchmarks --only
sparse_speedup`` (docs/sparse_kernels.md has the numbers).
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from rigl_func.sparse_layout import BlockLayout

__all__ = ["Kernel", "KERNEL_TABLE", "choose_kernel", "gather_blocks", "scatter_blocks"]


class Kernel(NamedTuple):
    """The three products of one kernel (see the module doc)."""

    mm: Callable[[Tensor, Tensor, BlockLayout], Tensor]
    mm_t: Callable[[Tensor, Tensor, BlockLayout], Tensor]
    sddmm: Callable[[Tensor, Tensor, BlockLayout], Tensor]


def gather_blocks(weight: Tensor, layout: BlockLayout) -> Tensor:
    """The active blocks of ``weight [out, in]`` as ``[nnzb, r, c]`` (row-major order).

    Example:
        >>> from rigl_func.sparse_layout import block_layout
        >>> lay = block_layout(torch.ones(2, 4, dtype=torch.bool), (2, 2), kernel="dense")
        >>> gather_blocks(torch.arange(8.).view(2, 4), lay)[1].tolist()
        [[2.0, 3.0], [6.0, 7.0]]
    """
    (o, i), (r, c) = layout.shape, layout.block
    return weight.view(o // r, r, i // c, c)[layout.rows, :, layout.cols, :]


def _batched(t: Tensor) -> bool:
    """Whether ``t`` is a vmap-batched tensor at some functorch level."""
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(t):
        if f.is_batchedtensor(t):
            return True
        t = f.get_unwrapped(t)
    return False


def scatter_blocks(vb: Tensor, layout: BlockLayout) -> Tensor:
    """Dense ``[out, in]``: the blocks ``vb [nnzb, r, c]`` at their places, zeros elsewhere.

    Example:
        >>> from rigl_func.sparse_layout import block_layout
        >>> m = torch.zeros(2, 4, dtype=torch.bool); m[:, 2:] = True
        >>> lay = block_layout(m, (2, 2), kernel="dense")
        >>> scatter_blocks(torch.ones(1, 2, 2), lay).tolist()
        [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
    """
    (o, i), (r, c) = layout.shape, layout.block
    if torch.compiler.is_compiling() or _batched(vb):  # vmap: out of place (one more copy)
        grid = vb.new_zeros(o // r, i // c, r, c).index_put((layout.rows, layout.cols), vb)
        return grid.permute(0, 2, 1, 3).reshape(o, i)
    out = vb.new_zeros(o // r, r, i // c, c)
    out[layout.rows, :, layout.cols, :] = vb
    return out.view(o, i)


# dense --------------------------------------------------------------------------------

def _dense_mm(x: Tensor, vb: Tensor, layout: BlockLayout) -> Tensor:
    return x @ scatter_blocks(vb, layout).t()


def _dense_mm_t(g: Tensor, vb: Tensor, layout: BlockLayout) -> Tensor:
    return g @ scatter_blocks(vb, layout)


def _dense_sddmm(g: Tensor, x: Tensor, layout: BlockLayout) -> Tensor:
    return gather_blocks(g.t() @ x, layout)


# gather (pure PyTorch, static shapes) ---------------------------------------------------

def _gather_mm(x: Tensor, vb: Tensor, layout: BlockLayout) -> Tensor:
    (o, i), (r, c) = layout.shape, layout.block
    xb = x.reshape(-1, i // c, c).index_select(1, layout.cols)  # [M, nnzb, c]
    part = torch.einsum("mkc,krc->mkr", xb, vb)
    return x.new_zeros(x.shape[0], o // r, r).index_add(1, layout.rows, part).view(-1, o)


def _gather_mm_t(g: Tensor, vb: Tensor, layout: BlockLayout) -> Tensor:
    (o, i), (r, c) = layout.shape, layout.block
    gb = g.reshape(-1, o // r, r).index_select(1, layout.rows)  # [M, nnzb, r]
    part = torch.einsum("mkr,krc->mkc", gb, vb)
    return g.new_zeros(g.shape[0], i // c, c).index_add(1, layout.cols, part).view(-1, i)


def _gather_sddmm(g: Tensor, x: Tensor, layout: BlockLayout) -> Tensor:
    (o, i), (r, c) = layout.shape, layout.block
    gb = g.reshape(-1, o // r, r).index_select(1, layout.rows)
    xb = x.reshape(-1, i // c, c).index_select(1, layout.cols)
    return torch.einsum("mkr,mkc->krc", gb, xb)


# bsr (torch.sparse) as custom ops ---------------------------------------------------------

def _compressed(crow: Tensor, cols: Tensor, vb: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "Sparse BSR/CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        if vb.shape[1] == vb.shape[2] == 1:
            return torch.sparse_csr_tensor(crow, cols, vb.reshape(-1), size, check_invariants=False)
        return torch.sparse_bsr_tensor(crow, cols, vb, size, check_invariants=False)


def _bsr_mm_impl(x: Tensor, vb: Tensor, crow: Tensor, cols: Tensor, out_features: int) -> Tensor:
    """``x [M, in] @ W_s^T`` with ``W_s`` a BSR/CSR ``[out_features, in]``."""
    if x.dtype not in (torch.float32, torch.float64):  # torch's CPU BSR/CSR: no bf16/fp16
        return _bsr_mm_impl(x.float(), vb.float(), crow, cols, out_features).to(x.dtype)
    w = _compressed(crow, cols, vb, (out_features, x.shape[1]))
    return (w @ x.t()).t()  # [M, out], feature-major memory (no transpose copy)


_bsr_mm_op = torch.library.custom_op("rigl_func::bsr_mm", _bsr_mm_impl, mutates_args=())


@_bsr_mm_op.register_fake
def _(x, vb, crow, cols, out_features):
    return x.new_empty(out_features, x.shape[0]).t()


def _block_sddmm_impl(g: Tensor, x: Tensor, rows: Tensor, cols: Tensor, r: int, c: int) -> Tensor:
    """``(g^T x)`` at the blocks ``(rows, cols)``: one ``[r, M] @ [M, c]`` mm per block."""
    out = g.new_empty(rows.shape[0], r, c)
    if r == c == 1:  # unstructured: dense product, then the entries
        return (g.t() @ x)[rows, cols].view(-1, 1, 1)
    # feature-major [features, M] slabs: each block's operands are contiguous rows
    # (a transposed copy when not already so: cheaper than strided mm operands, measured)
    gt, xt = g.t().contiguous(), x.t().contiguous()
    for k, (i, j) in enumerate(zip(rows.tolist(), cols.tolist())):
        torch.mm(gt[i * r:(i + 1) * r], xt[j * c:(j + 1) * c].t(), out=out[k])
    return out


_block_sddmm_op = torch.library.custom_op("rigl_func::block_sddmm", _block_sddmm_impl, mutates_args=())


@_block_sddmm_op.register_fake
def _(g, x, rows, cols, r, c):
    return g.new_empty(rows.shape[0], r, c)


def _op(op, impl):
    # The custom op (opaque to torch.compile) on detached inputs: the op has no autograd
    # formula (sparse_linear's Function is the formula), and functorch unwraps its inputs.
    return lambda *args: op(*(a.detach() if isinstance(a, Tensor) else a for a in args))


def _bsr_mm(x: Tensor, vb: Tensor, layout: BlockLayout) -> Tensor:
    return _op(_bsr_mm_op, _bsr_mm_impl)(x, vb, layout.crow, layout.cols, layout.shape[0])


def _bsr_mm_t(g: Tensor, vb: Tensor, layout: BlockLayout) -> Tensor:
    vbt = vb.index_select(0, layout.t_perm).transpose(1, 2).contiguous()
    return _op(_bsr_mm_op, _bsr_mm_impl)(g, vbt, layout.t_ccol, layout.rows.index_select(0, layout.t_perm), layout.shape[1])


def _bsr_sddmm(g: Tensor, x: Tensor, layout: BlockLayout) -> Tensor:
    return _op(_block_sddmm_op, _block_sddmm_impl)(g, x, layout.rows, layout.cols, *layout.block)


def _triton_kernel() -> Kernel:
    from rigl_func import triton_block_sparse as tbs  # noqa: PLC0415 (imports triton)

    return Kernel(tbs.mm, tbs.mm_t, tbs.sddmm)


#: name -> Kernel ("triton" is loaded on first use).
KERNEL_TABLE: dict[str, Kernel] = {
    "dense": Kernel(_dense_mm, _dense_mm_t, _dense_sddmm),
    "gather": Kernel(_gather_mm, _gather_mm_t, _gather_sddmm),
    "bsr": Kernel(_bsr_mm, _bsr_mm_t, _bsr_sddmm),
}


def get_kernel(name: str) -> Kernel:
    """The :class:`Kernel` called ``name``."""
    if name == "triton" and name not in KERNEL_TABLE:
        KERNEL_TABLE["triton"] = _triton_kernel()
    if name not in KERNEL_TABLE:
        raise ValueError(f"unknown kernel {name!r}: one of {sorted(KERNEL_TABLE) + ['triton']}")
    return KERNEL_TABLE[name]


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def choose_kernel(layout: BlockLayout, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The fastest kernel for this device, block shape, density and dtype, as measured by
    ``python -m benchmarks --only sparse_speedup`` (docs/sparse_kernels.md):

    * CPU, fp32, square blocks of at least 16x16 and density <= 0.25: ``"bsr"`` (MKL);
      otherwise (unstructured, small blocks, denser, bf16/fp16: torch's CPU BSR has no
      fast reduced-precision path) ``"dense"``;
    * CUDA, blocks of at least 16x16 and density <= 0.25, Triton installed: ``"triton"``;
      otherwise ``"dense"``;
    * any other device: ``"dense"``.

    Example:
        >>> from rigl_func.sparse_layout import block_layout
        >>> m = torch.zeros(64, 64, dtype=torch.bool); m[:32, :32] = True
        >>> choose_kernel(block_layout(m, (32, 32), kernel="dense"), "cpu")
        'bsr'
    """
    device = torch.device(device)
    r, c = layout.block
    blocky = r >= 16 and c >= 16 and layout.density <= 0.25
    if device.type == "cpu":
        return "bsr" if blocky and r == c and dtype == torch.float32 else "dense"
    if device.type == "cuda":
        return "triton" if blocky and _triton_ok() else "dense"
    return "dense"

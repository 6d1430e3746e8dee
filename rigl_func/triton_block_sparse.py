"""Triton block-sparse kernels (CUDA; their correctness is tested on the CPU with
``TRITON_INTERPRET=1``), the ``"triton"`` kernel of :mod:`rigl_func.sparse_kernels`.

For ``x [M, in]``, active blocks ``vb [nnzb, r, c]`` (row-major order) and a
:class:`rigl_func.BlockLayout`:

* :func:`mm` ``y = x W_s^T``: one program per (token tile, block row) walks the row's
  blocks (CSR ``crow``) and accumulates ``x_tile[:, cols] @ vb[k]^T`` in fp32;
* :func:`mm_t` ``dx = g W_s``: one program per (token tile, block column) walks the
  column's blocks (``t_ccol``, ``t_perm``);
* :func:`sddmm` ``(g^T x)`` at the active blocks: one program per block reduces over
  the tokens.

Blocks must be at least 16x16 (``tl.dot``); fp32 inputs use IEEE fp32 products (no
TF32), bf16/fp16 inputs accumulate in fp32. No host sync: the loop bounds are read on
the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rigl_func.sparse_layout import BlockLayout

__all__ = ["mm", "mm_t", "sddmm"]

BLOCK_M = 64


@triton.jit
def _mm_kernel(x_ptr, vb_ptr, ptr_ptr, idx_ptr, perm_ptr, y_ptr, M, sxm, sxk, sym, syn,
               R: tl.constexpr, C: tl.constexpr, BM: tl.constexpr, TRANS: tl.constexpr, IEEE: tl.constexpr):
    # TRANS=False: y[:, i-block] = sum_k x[:, cols[k]-block] @ vb[k]^T   (R = r, C = c)
    # TRANS=True:  y[:, j-block] = sum_k x[:, rows[k]-block] @ vb[k]     (R = c, C = r: the output block width)
    pm = tl.program_id(0)
    i = tl.program_id(1)
    offs_m = pm * BM + tl.arange(0, BM)
    rr = tl.arange(0, R)
    cc = tl.arange(0, C)
    acc = tl.zeros((BM, R), dtype=tl.float32)
    start = tl.load(ptr_ptr + i)
    end = tl.load(ptr_ptr + i + 1)
    for t in range(start, end):
        if TRANS:
            k = tl.load(perm_ptr + t)
        else:
            k = t
        j = tl.load(idx_ptr + k)
        xa = tl.load(x_ptr + offs_m[:, None] * sxm + (j * C + cc)[None, :] * sxk,
                     mask=offs_m[:, None] < M, other=0.0)
        if TRANS:  # vb[k] is [C, R] here: rows of the weight block = input features of g
            wb = tl.load(vb_ptr + k * R * C + cc[:, None] * R + rr[None, :])
        else:      # vb[k] is [R, C]: read it transposed as [C, R]
            wb = tl.load(vb_ptr + k * R * C + rr[None, :] * C + cc[:, None])
        if IEEE:
            acc += tl.dot(xa, wb, input_precision="ieee")
        else:
            acc += tl.dot(xa, wb)
    tl.store(y_ptr + offs_m[:, None] * sym + (i * R + rr)[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=offs_m[:, None] < M)


@triton.jit
def _sddmm_kernel(g_ptr, x_ptr, rows_ptr, cols_ptr, out_ptr, M, sgm, sgn, sxm, sxk,
                  R: tl.constexpr, C: tl.constexpr, BM: tl.constexpr, IEEE: tl.constexpr):
    k = tl.program_id(0)
    i = tl.load(rows_ptr + k)
    j = tl.load(cols_ptr + k)
    rr = tl.arange(0, R)
    cc = tl.arange(0, C)
    acc = tl.zeros((R, C), dtype=tl.float32)
    for m0 in range(0, M, BM):
        offs_m = m0 + tl.arange(0, BM)
        ga = tl.load(g_ptr + offs_m[None, :] * sgm + (i * R + rr)[:, None] * sgn, mask=offs_m[None, :] < M, other=0.0)
        xa = tl.load(x_ptr + offs_m[:, None] * sxm + (j * C + cc)[None, :] * sxk, mask=offs_m[:, None] < M, other=0.0)
        if IEEE:
            acc += tl.dot(ga, xa, input_precision="ieee")
        else:
            acc += tl.dot(ga, xa)
    tl.store(out_ptr + k * R * C + rr[:, None] * C + cc[None, :], acc.to(out_ptr.dtype.element_ty))


def _check(layout: BlockLayout) -> tuple[int, int]:
    r, c = layout.block
    if r < 16 or c < 16 or r & (r - 1) or c & (c - 1):
        raise ValueError(f"the triton kernel needs power-of-two blocks of at least 16x16, got block={layout.block}")
    return r, c


def _mm_impl(x: Tensor, vb: Tensor, ptr: Tensor, idx: Tensor, perm: Tensor, out_features: int,
             trans: bool) -> Tensor:
    m = x.shape[0]
    r, c = vb.shape[1:]
    rr, cc = (c, r) if trans else (r, c)  # output block width, input block width
    y = x.new_empty(m, out_features)
    grid = (triton.cdiv(m, BLOCK_M), out_features // rr)
    _mm_kernel[grid](x, vb, ptr, idx, perm, y, m, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                     R=rr, C=cc, BM=BLOCK_M, TRANS=trans, IEEE=x.dtype == torch.float32)
    return y


_mm_op = torch.library.custom_op("rigl_func::triton_block_mm", _mm_impl, mutates_args=())


@_mm_op.register_fake
def _(x, vb, ptr, idx, perm, out_features, trans):
    return x.new_empty(x.shape[0], out_features)


def _sddmm_impl(g: Tensor, x: Tensor, rows: Tensor, cols: Tensor, r: int, c: int) -> Tensor:
    out = g.new_empty(rows.shape[0], r, c)
    if rows.shape[0]:
        _sddmm_kernel[(rows.shape[0],)](g, x, rows, cols, out, g.shape[0], g.stride(0), g.stride(1),
                                        x.stride(0), x.stride(1), R=r, C=c, BM=BLOCK_M,
                                        IEEE=g.dtype == torch.float32)
    return out


_sddmm_op = torch.library.custom_op("rigl_func::triton_block_sddmm", _sddmm_impl, mutates_args=())


@_sddmm_op.register_fake
def _(g, x, rows, cols, r, c):
    return g.new_empty(rows.shape[0], r, c)


def _register_vmaps() -> None:  # called by rigl_func.sparse_kernels when it loads this module
    from rigl_func.sparse_kernels import register_loop_vmap  # noqa: PLC0415

    register_loop_vmap(_mm_op)
    register_loop_vmap(_sddmm_op)


def _d(*args):  # the ops have no autograd formula: sparse_linear's Function is the formula
    return tuple(a.detach() if isinstance(a, Tensor) else a for a in args)


def mm(x: Tensor, vb: Tensor, layout: BlockLayout) -> Tensor:
    """``y = x W_s^T``, ``[M, out]``."""
    _check(layout)
    return _mm_op(*_d(x, vb.contiguous(), layout.crow, layout.cols, layout.t_perm, layout.shape[0], False))


def mm_t(g: Tensor, vb: Tensor, layout: BlockLayout) -> Tensor:
    """``dx = g W_s``, ``[M, in]``."""
    _check(layout)
    return _mm_op(*_d(g, vb.contiguous(), layout.t_ccol, layout.rows, layout.t_perm, layout.shape[1], True))


def sddmm(g: Tensor, x: Tensor, layout: BlockLayout) -> Tensor:
    """``(g^T x)`` at the active blocks, ``[nnzb, r, c]``."""
    r, c = _check(layout)
    return _sddmm_op(*_d(g, x, layout.rows, layout.cols, r, c))

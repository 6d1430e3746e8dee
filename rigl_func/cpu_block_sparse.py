"""The CPU block-sparse kernel (``kernel="blocks"`` of :mod:`rigl_func.sparse_kernels`):
one small dense matmul per active block, on feature-major operands, the blocks split
over the intra-op threads.

For ``x [M, in]``, active blocks ``vb [nnzb, r, c]`` and a :class:`rigl_func.BlockLayout`:

* :func:`mm` ``y = x W_s^T``: ``x^T`` is made contiguous (``[in, M]``: each input block is
  a contiguous ``[c, M]`` slab); block row ``i`` of ``y^T`` is
  ``sum_k vb[k] @ x^T[cols[k] slab]``, an ``mm`` then ``addmm_`` chain into one
  ``[r, M]`` output slab; ``y`` is returned as the transposed view of ``y^T`` (so the
  next layer's ``x^T`` is free);
* :func:`mm_t` ``dx = g W_s``: the same per block column with ``vb[k]^T``;
* :func:`sddmm` ``(g^T x)`` at the active blocks: ``g^T[rows[k] slab] @ x^T[cols[k] slab]^T``.

Each thread runs its share of block rows (balanced by block count) with one intra-op
thread: hundreds of small OpenMP regions cost far more than the matmuls on a busy
machine (measured: ``python -m benchmarks --only sparse_speedup``). While a kernel runs,
``torch.get_num_threads()`` is 1 (process-wide), then restored. The ops are
``torch.library`` custom ops, opaque to ``torch.compile``.
"""

from __future__ import annotations

import bisect
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import Tensor

from rigl_func.sparse_layout import BlockLayout

__all__ = ["mm", "mm_t", "sddmm"]

_POOLS: dict[int, ThreadPoolExecutor] = {}


def _parallel(work: Callable[[int, int], None], ptr: list[int]) -> None:
    """``work(lo, hi)`` over items ``[0, len(ptr) - 1)``, split over the intra-op threads so
    that each gets about the same number of blocks (``ptr``: cumulative block counts)."""
    n, total = len(ptr) - 1, ptr[-1]
    workers = min(torch.get_num_threads(), max(1, total // 8))
    if workers <= 1:
        work(0, n)
        return
    bounds = sorted({0, n, *(min(n, bisect.bisect_left(ptr, total * w // workers)) for w in range(1, workers))})
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="rigl_func_blocks")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        list(_POOLS[workers].map(work, bounds[:-1], bounds[1:]))
    finally:
        torch.set_num_threads(threads)


def _fm(t: Tensor) -> Tensor:
    """``t [M, f]`` as a contiguous ``[f, M]`` (free when ``t`` is a transposed view)."""
    return t.t().contiguous()


def _mm_impl(x: Tensor, vb: Tensor, ptr: Tensor, idx: Tensor, perm: Tensor, out_features: int,
             trans: bool) -> Tensor:
    xt = _fm(x)
    r, c = vb.shape[1:]
    ro, ri = (c, r) if trans else (r, c)  # output / input block widths
    yt = x.new_empty(out_features, x.shape[0])
    ptr_l, idx_l = ptr.tolist(), idx.tolist()
    perm_l = perm.tolist() if trans else None

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            out = yt[i * ro:(i + 1) * ro]
            start, end = ptr_l[i], ptr_l[i + 1]
            if start == end:
                out.zero_()
            for t in range(start, end):
                k = perm_l[t] if trans else t
                w = vb[k].t() if trans else vb[k]
                slab = xt[idx_l[k] * ri:(idx_l[k] + 1) * ri]
                if t == start:
                    torch.mm(w, slab, out=out)
                else:
                    out.addmm_(w, slab)

    _parallel(work, ptr_l)
    return yt.t()


def _fake_mm(x, vb, ptr, idx, perm, out_features, trans):
    return x.new_empty(out_features, x.shape[0]).t()


def _sddmm_impl(g: Tensor, x: Tensor, rows: Tensor, cols: Tensor, r: int, c: int) -> Tensor:
    gt, xt = _fm(g), _fm(x)
    out = g.new_empty(rows.shape[0], r, c)
    pairs = list(zip(rows.tolist(), cols.tolist()))

    def work(lo: int, hi: int) -> None:
        for k in range(lo, hi):
            i, j = pairs[k]
            torch.mm(gt[i * r:(i + 1) * r], xt[j * c:(j + 1) * c].t(), out=out[k])

    _parallel(work, list(range(len(pairs) + 1)))
    return out


def _fake_sddmm(g, x, rows, cols, r, c):
    return g.new_empty(rows.shape[0], r, c)


_mm_op = torch.library.custom_op("rigl_func::cpu_block_mm", _mm_impl, mutates_args=())
_mm_op.register_fake(_fake_mm)
_sddmm_op = torch.library.custom_op("rigl_func::cpu_block_sddmm", _sddmm_impl, mutates_args=())
_sddmm_op.register_fake(_fake_sddmm)


def _register_vmaps() -> None:  # called by rigl_func.sparse_kernels (it imports this module)
    from rigl_func.sparse_kernels import register_loop_vmap  # noqa: PLC0415

    register_loop_vmap(_mm_op)
    register_loop_vmap(_sddmm_op)


def _d(*args):  # the ops have no autograd formula: sparse_linear's Function is the formula
    return tuple(a.detach() if isinstance(a, Tensor) else a for a in args)


def mm(x: Tensor, vb: Tensor, layout: BlockLayout) -> Tensor:
    """``y = x W_s^T``, ``[M, out]`` (a transposed view of a contiguous ``[out, M]``).

    Example:
        >>> from rigl_func.sparse_layout import block_layout
        >>> m = torch.zeros(4, 4, dtype=torch.bool); m[2:, :2] = True
        >>> lay = block_layout(m, (2, 2), kernel="blocks")
        >>> mm(torch.ones(1, 4), torch.ones(1, 2, 2), lay).tolist()
        [[0.0, 0.0, 2.0, 2.0]]
    """
    return _mm_op(*_d(x, vb, layout.crow, layout.cols, layout.t_perm, layout.shape[0], False))


def mm_t(g: Tensor, vb: Tensor, layout: BlockLayout) -> Tensor:
    """``dx = g W_s``, ``[M, in]``."""
    return _mm_op(*_d(g, vb, layout.t_ccol, layout.rows, layout.t_perm, layout.shape[1], True))


def sddmm(g: Tensor, x: Tensor, layout: BlockLayout) -> Tensor:
    """``(g^T x)`` at the active blocks, ``[nnzb, r, c]``."""
    return _sddmm_op(*_d(g, x, layout.rows, layout.cols, *layout.block))

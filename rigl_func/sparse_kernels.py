"""Block-sparse matmul kernels behind :func:`rigl_func.sparse_linear`, and the rule that
picks one per device, shape, density and dtype.

Each kernel computes, for a 2-D input ``x [M, in]``, the active blocks
``vb [nnzb, r, c]`` of a weight ``W_s [out, in]`` and a :class:`BlockLayout`:

* ``mm``: ``y = x W_s^T`` ``[M, out]`` (forward);
* ``mm_t``: ``dx = g W_s`` ``[M, in]`` (input gradient);
* ``sddmm``: ``(g^T x)`` at the active blocks only, ``[nnzb, r, c]`` (weight gradient,
  a sampled dense-dense product).

Kernels (one table, :data:`KERNEL_TABLE`; only those that won a measurement are kept):

* ``"blocks"``: one small matmul per active block on feature-major operands, split over
  the CPU threads (:mod:`rigl_func.cpu_block_sparse`; custom ops, opaque to
  ``torch.compile``). It beat torch's BSR/CSR (MKL) and a pure-PyTorch gather/``einsum``/
  ``index_add`` kernel on every block config measured (those two live on in the benchmark,
  ``benchmarks/sparse_speedup.py``, via :func:`register_kernel`);
* ``"triton"``: Triton kernels (CUDA; :mod:`rigl_func.triton_block_sparse`);
* ``"dense"``: scatter the blocks into a zero ``[out, in]`` and use dense matmuls: the
  fallback wherever sparse is slower (pure PyTorch: batched by ``vmap`` natively; the
  custom ops of the other two loop over a ``vmap`` batch, :func:`register_loop_vmap`).

The ``"auto"`` choice (:func:`choose_kernel`) follows ``python -m benchmarks --only
sparse_speedup`` (docs/sparse_kernels.md has the numbers).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from rigl_func import cpu_block_sparse
from rigl_func.sparse_layout import BlockLayout

__all__ = ["CPU_MIN_NUMEL", "Kernel", "KERNEL_TABLE", "choose_kernel", "gather_blocks", "get_kernel", "kernel_names",
           "register_kernel", "register_loop_vmap", "scatter_blocks"]


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


def register_loop_vmap(op) -> None:
    """Give a ``torch.library`` custom op a ``vmap`` rule that loops over the batch (each
    batched argument sliced, the others shared; the outputs stacked along dim 0). The
    kernels' ops use it, so ``vmap`` over models, seeds or layouts works with every kernel
    (as fast as a loop, no faster)."""

    def rule(info, in_dims, *args):
        outs = [op(*(a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)))
                for b in range(info.batch_size)]
        return torch.stack(outs), 0

    op.register_vmap(rule)


def _triton_kernel() -> Kernel:
    from rigl_func import triton_block_sparse as tbs  # noqa: PLC0415 (imports triton)

    tbs._register_vmaps()
    return Kernel(tbs.mm, tbs.mm_t, tbs.sddmm)


#: name -> Kernel ("triton" is added on first use: it imports triton).
KERNEL_TABLE: dict[str, Kernel] = {
    "dense": Kernel(_dense_mm, _dense_mm_t, _dense_sddmm),
    "blocks": Kernel(cpu_block_sparse.mm, cpu_block_sparse.mm_t, cpu_block_sparse.sddmm),
}


cpu_block_sparse._register_vmaps()


def kernel_names() -> list[str]:
    """Names a layout may use (besides ``"auto"``)."""
    return sorted(set(KERNEL_TABLE) | {"triton"})


def register_kernel(name: str, kernel: Kernel) -> None:
    """Add a kernel to :data:`KERNEL_TABLE` (e.g. to compare one in a benchmark), then
    ``block_layout(mask, block, kernel=name)``. Its three functions take and return
    what the module doc says; ``sparse_linear`` supplies the autograd formula.

    Raises:
        ValueError: ``name`` is ``"auto"`` or already taken, or ``kernel`` is not a
            :class:`Kernel`.
    """
    if name == "auto" or name in kernel_names():
        raise ValueError(f"kernel name {name!r} is reserved or taken: {kernel_names()}")
    if not isinstance(kernel, Kernel):
        raise ValueError(f"kernel must be a Kernel(mm, mm_t, sddmm), got {type(kernel).__name__}")
    KERNEL_TABLE[name] = kernel


def get_kernel(name: str) -> Kernel:
    """The :class:`Kernel` called ``name``."""
    if name == "triton" and name not in KERNEL_TABLE:
        KERNEL_TABLE["triton"] = _triton_kernel()
    if name not in KERNEL_TABLE:
        raise ValueError(f"unknown kernel {name!r}: one of {kernel_names()}")
    return KERNEL_TABLE[name]


#: The smallest weight (``out * in``) the CPU kernel is chosen for (2**18: ``[1024, 256]``).
CPU_MIN_NUMEL = 2**18


def choose_kernel(layout: BlockLayout, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The fastest kernel for this device, block shape, density and dtype, as measured by
    ``python -m benchmarks --only sparse_speedup`` (docs/sparse_kernels.md):

    * CPU, fp32, blocks of at least 16x16, density <= 0.25 and at least
      :data:`CPU_MIN_NUMEL` weights: ``"blocks"`` (measured, 32x32 blocks, 2 threads:
      1.4-4.8x over dense for ``[1024, 256]`` and ``[4096, 1024]`` weights at densities
      0.05-0.25 and 2,048 tokens; 0.2-0.5x for ``[512, 128]`` at 1,024 tokens, where the
      per-block overhead wins); otherwise (unstructured, small blocks or weights, denser,
      bf16/fp16) ``"dense"``;
    * CUDA: ``"dense"``. The ``"triton"`` kernel is correct (tested on CUDA) but measured
      slower than dense cuBLAS on an H200 (torch 2.11, GPT MLP block, 2,048 and 16,384
      tokens, 90-95% block 32x32: 0.53-0.99x forward, 0.53-0.65x training step, bf16 and
      fp32), so it is used only when asked for by name (``kernel="triton"``);
    * any other device: ``"dense"``.

    Example:
        >>> from rigl_func.sparse_layout import block_layout
        >>> m = torch.zeros(1024, 256, dtype=torch.bool); m[:32, :32] = True
        >>> choose_kernel(block_layout(m, (32, 32), kernel="dense"), "cpu")
        'blocks'
        >>> choose_kernel(block_layout(m[:64, :64], (32, 32), kernel="dense"), "cpu")  # too small
        'dense'
    """
    device = torch.device(device)
    r, c = layout.block
    blocky = r >= 16 and c >= 16 and layout.density <= 0.25
    if device.type == "cpu":
        big = layout.shape[0] * layout.shape[1] >= CPU_MIN_NUMEL
        return "blocks" if blocky and big and dtype == torch.float32 else "dense"
    return "dense"

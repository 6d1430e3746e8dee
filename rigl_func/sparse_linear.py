"""Sparse execution of masked Linear layers: ``sparse_linear`` and its module form.

``sparse_linear(x, weight, layout, bias)`` computes ``x W_s^T + b`` where ``W_s`` is
``weight`` restricted to the layout's active blocks, with the layout's kernel
(:mod:`rigl_func.sparse_kernels`). Its gradients (a ``torch.autograd.Function`` with
``setup_context``, so ``torch.func.grad`` and ``torch.compile`` trace it):

* input: ``g W_s`` with the sparse kernel;
* weight, plain steps (``layout.dense_grad=False``): ``g^T x`` at the active blocks only
  (a sampled dense-dense product), zeros elsewhere — equal to the gradient of the dense
  masked computation ``x (W * mask)^T``, which is what the optimizer step uses;
* weight, RigL update steps (``dense_grad=True``): the dense ``g^T x``, the gradient of
  ``x W^T`` at every entry, which RigL's grow criterion reads.

Entries of ``weight`` outside the layout are never read (they are zero in a RigL
run). One loop for training (docs/sparse_kernels.md)::

    layouts = rf.block_layouts(state.rigl.masks, (32, 32))
    for step ...:
        update = tx.is_update_step(state)            # free: a CPU counter
        grads = grad(loss)(params, rf.with_dense_grad(layouts, update), batch)  # the model calls sparse_linear
        params, state = tx.step(params, grads, state)
        if update:
            layouts = rf.block_layouts(state.rigl.masks, (32, 32))
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor, nn

from rigl_func.sparse_kernels import gather_blocks, get_kernel, scatter_blocks
from rigl_func.sparse_layout import BlockLayout

__all__ = ["sparse_linear", "SparseLinear", "sparse_modules", "set_layouts_"]


def _rebuild(tensors: tuple[Tensor, ...], meta: tuple) -> BlockLayout:
    return BlockLayout(*tensors, *meta)


class _SparseLinearFn(torch.autograd.Function):
    generate_vmap_rule = True  # the kernels' custom ops have loop vmap rules (register_loop_vmap)

    @staticmethod
    def forward(x: Tensor, weight: Tensor, rows, cols, crow, t_perm, t_ccol, meta: tuple) -> Tensor:
        layout = _rebuild((rows, cols, crow, t_perm, t_ccol), meta)
        return get_kernel(layout.kernel).mm(x, gather_blocks(weight, layout), layout)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, *idx, meta = inputs
        ctx.save_for_backward(x, weight, *idx)
        ctx.meta = meta

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, *idx = ctx.saved_tensors
        layout = _rebuild(tuple(idx), ctx.meta)
        kernel = get_kernel(layout.kernel)
        dx = dw = None
        # Under torch.compile, needs_input_grad is not reliable for a functorch grad over
        # several arguments (it dropped the weight gradient): compute both there.
        every = torch.compiler.is_compiling()
        if every or ctx.needs_input_grad[0]:
            dx = kernel.mm_t(g, gather_blocks(weight, layout), layout)
        if every or ctx.needs_input_grad[1]:
            dw = g.t() @ x if layout.dense_grad else scatter_blocks(kernel.sddmm(g, x, layout), layout)
        return dx, dw, None, None, None, None, None, None


def _check(x: Tensor, weight: Tensor, layout: BlockLayout, bias: Optional[Tensor]) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout (rigl_func.block_layout), got {type(layout).__name__}")
    if tuple(weight.shape) != tuple(layout.shape):
        raise ValueError(f"weight shape {tuple(weight.shape)} != layout.shape {tuple(layout.shape)}: "
                         f"a layout from another layer?")
    if x.shape[-1] != layout.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim, the weight takes {layout.shape[1]}")
    if bias is not None and tuple(bias.shape) != (layout.shape[0],):
        raise ValueError(f"bias shape {tuple(bias.shape)} != ({layout.shape[0]},)")


def sparse_linear(x: Tensor, weight: Tensor, layout: BlockLayout, bias: Optional[Tensor] = None) -> Tensor:
    """``x W_s^T + bias`` with a block-sparse kernel (see the module doc).

    Args:
        x: ``[..., in]``.
        weight: ``[out, in]``, the dense parameter (only its active blocks are read).
        layout: from :func:`rigl_func.block_layout` for this weight's mask.
        bias: ``[out]`` or ``None``.

    Returns:
        ``[..., out]``; equal to ``F.linear(x, weight * mask, bias)`` to float rounding
        (the tolerance is in tests/test_sparse_kernels.py). Pure.

    Raises:
        TypeError / ValueError: a non-layout, or shapes that do not match the layout.

    Example:
        >>> from rigl_func.sparse_layout import block_layout
        >>> m = torch.zeros(4, 4, dtype=torch.bool); m[:2, :2] = True
        >>> w, x = torch.randn(4, 4) * m, torch.randn(3, 4)
        >>> y = sparse_linear(x, w, block_layout(m, (2, 2), kernel="blocks"))
        >>> torch.allclose(y, x @ w.t(), atol=1e-6)
        True
    """
    _check(x, weight, layout, bias)
    lead = x.shape[:-1]
    y = _SparseLinearFn.apply(x.reshape(-1, x.shape[-1]), weight, layout.rows, layout.cols, layout.crow,
                              layout.t_perm, layout.t_ccol, tuple(layout[5:]))
    y = y.reshape(*lead, layout.shape[0])
    return y if bias is None else y + bias


class SparseLinear(nn.Module):
    """``nn.Linear`` with the same parameters (``weight``, ``bias``) whose forward is
    :func:`sparse_linear` with ``self.layout``; made by :func:`sparse_modules`, so
    ``torch.func.functional_call`` with the model's params works unchanged.

    Example:
        >>> from rigl_func.sparse_layout import block_layout
        >>> lin = nn.Linear(4, 4)
        >>> sl = SparseLinear.from_linear(lin, block_layout(torch.ones(4, 4, dtype=torch.bool), (2, 2), kernel="dense"))
        >>> torch.allclose(sl(torch.ones(1, 4)), lin(torch.ones(1, 4)), atol=1e-6)
        True
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], layout: BlockLayout) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = weight
        self.bias = bias
        self.layout = layout

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: BlockLayout) -> "SparseLinear":
        """Shares ``linear``'s parameters."""
        return cls(linear.weight, linear.bias, layout)

    def forward(self, x: Tensor) -> Tensor:
        return sparse_linear(x, self.weight, self.layout, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block={self.layout.block}, density={self.layout.density:.3f}, kernel={self.layout.kernel!r}")


def sparse_modules(model: nn.Module, layouts: Mapping[str, BlockLayout]) -> nn.Module:
    """A deep copy of ``model`` whose ``nn.Linear`` layers named in ``layouts`` (by their
    weight's name, ``"fc1.weight"``) are :class:`SparseLinear`; parameter names are
    unchanged, so ``functional_call(sparse_model, params, args)`` takes the same params.
    For inference: export ``params`` + masks with ``block_layouts(masks, block)``.

    Raises:
        ValueError: a layout names no ``nn.Linear`` weight of ``model``.

    Example:
        >>> from rigl_func.sparse_layout import block_layouts
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> sm = sparse_modules(model, block_layouts({"0.weight": torch.ones(4, 4, dtype=torch.bool)}, (2, 2)))
        >>> type(sm[0]).__name__, [n for n, _ in sm.named_parameters()]
        ('SparseLinear', ['0.weight', '0.bias'])
    """
    out = copy.deepcopy(model)
    linears = {f"{n}.weight" if n else "weight": (n, m) for n, m in out.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(layouts) - set(linears))
    if missing:
        raise ValueError(f"layouts name no nn.Linear weight of the model: {missing}")
    for key, layout in layouts.items():
        name, lin = linears[key]
        parent = out.get_submodule(name.rpartition(".")[0]) if "." in name else out
        setattr(parent, name.rpartition(".")[2], SparseLinear.from_linear(lin, layout))
    return out


def set_layouts_(model: nn.Module, layouts: Mapping[str, BlockLayout]) -> nn.Module:
    """In place (the shell): give each :class:`SparseLinear` of ``model`` its new layout
    (after a topology update, or ``with_dense_grad``). Returns ``model``.

    Raises:
        ValueError: a layout names no ``SparseLinear`` weight of ``model``.
    """
    mods = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    missing = sorted(set(layouts) - set(mods))
    if missing:
        raise ValueError(f"layouts name no SparseLinear weight of the model: {missing}")
    for key, layout in layouts.items():
        mods[key].layout = layout
    return model

"""Benchmark: sparse kernels (``rigl_func.sparse_linear``) against dense, on a GPT MLP block.

The block: ``x [T, d] -> Linear(d, 4d) -> GELU -> Linear(4d, d)`` with ``d = 1024``,
``T = 2048`` tokens (smoke: ``d = 128``, ``T = 128``), both weights sparse (uniform
sparsity), masks from ``rigl_func.rigl(RigLConfig(structure=...))``. Configs: 90% and
95%, blocks of 32x32 and unstructured. Variants, timed interleaved in one run:

* **dense**: ``functional_call`` of the ``nn.Sequential`` with the masked params
  (zeros at inactive entries), i.e. what a RigL run does without sparse kernels;
* **sparse (<kernel>)**: the same block with ``rigl_func.sparse_linear`` and the layouts
  of the masks, for the ``"auto"`` kernel (the library's choice) and each candidate
  forced: ``blocks`` (the library's CPU kernel), ``triton`` (CUDA), and two that lost and
  live only here: ``bsr`` (torch.sparse BSR/CSR matmuls, MKL on the CPU) and ``gather``
  (pure PyTorch: gather, ``einsum``, ``index_add``).

Two measurements per variant: **forward** (``no_grad``) and **training step**: forward,
``torch.func.grad`` w.r.t. the params *and* the input (both gradients of each layer),
and ``tx.step`` (AdamW) at a plain step (the weight gradient at the active blocks only;
the dense one is computed at RigL update steps, every ``delta`` steps). The
update-step row times the training step with ``dense_grad=True``; the exported row the
forward of ``functional_call(rigl_func.sparse_modules(model, layouts), params, x)``
(inference export). CPU: fp32, the
thread count of ``--threads``; CUDA: bf16 (the GPU target) and fp32, plus the block
configs at 8x the tokens in bf16 (launch overheads weigh less). Ratios are
dense / sparse medians of the same run. On a shared machine the timings are noisy.
The last line of the summary is
``sparse_speedup <device>: mlp_fwd <X>x mlp_train <Y>x (95% block 32x32)``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import warnings

import rigl_func as rf
from rigl_func.sparse_kernels import KERNEL_TABLE, Kernel, register_kernel
from rigl_func.sparse_layout import BlockLayout, block_layouts, with_dense_grad
from rigl_func.sparse_linear import sparse_linear
from benchmarks.common import Context, Section, fmt_ms, markdown_table, time_interleaved

__all__ = ["NAME", "TITLE", "run", "mlp_block", "COMPARED"]

Tensor = torch.Tensor


# Kernels compared against the library's (they lost, so they live here) ------------------

def _gather_mm(x: Tensor, vb: Tensor, layout: BlockLayout) -> Tensor:
    """Pure PyTorch, static shapes: gather the inputs of each block, einsum, index_add."""
    (o, i), (r, c) = layout.shape, layout.block
    part = torch.einsum("mkc,krc->mkr", x.reshape(-1, i // c, c).index_select(1, layout.cols), vb)
    return x.new_zeros(x.shape[0], o // r, r).index_add(1, layout.rows, part).view(-1, o)


def _gather_mm_t(g: Tensor, vb: Tensor, layout: BlockLayout) -> Tensor:
    (o, i), (r, c) = layout.shape, layout.block
    part = torch.einsum("mkr,krc->mkc", g.reshape(-1, o // r, r).index_select(1, layout.rows), vb)
    return g.new_zeros(g.shape[0], i // c, c).index_add(1, layout.cols, part).view(-1, i)


def _gather_sddmm(g: Tensor, x: Tensor, layout: BlockLayout) -> Tensor:
    (o, i), (r, c) = layout.shape, layout.block
    return torch.einsum("mkr,mkc->krc", g.reshape(-1, o // r, r).index_select(1, layout.rows),
                        x.reshape(-1, i // c, c).index_select(1, layout.cols))


def _bsr_mm_impl(x: Tensor, vb: Tensor, crow: Tensor, cols: Tensor, out_features: int) -> Tensor:
    """torch.sparse BSR (CSR for 1x1 blocks; MKL on the CPU, square blocks only)."""
    if x.dtype not in (torch.float32, torch.float64):
        return _bsr_mm_impl(x.float(), vb.float(), crow, cols, out_features).to(x.dtype)
    with warnings.catch_warnings():  # "Sparse BSR/CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        size = (out_features, x.shape[1])
        w = (torch.sparse_csr_tensor(crow, cols, vb.reshape(-1), size, check_invariants=False)
             if vb.shape[1] == vb.shape[2] == 1 else
             torch.sparse_bsr_tensor(crow, cols, vb, size, check_invariants=False))
    return (w @ x.t()).t()


_bsr_op = torch.library.custom_op("rigl_func_bench::bsr_mm", _bsr_mm_impl, mutates_args=())
_bsr_op.register_fake(lambda x, vb, crow, cols, out_features: x.new_empty(out_features, x.shape[0]).t())


def _bsr_mm(x: Tensor, vb: Tensor, layout: BlockLayout) -> Tensor:
    return _bsr_op(x.detach(), vb.detach(), layout.crow, layout.cols, layout.shape[0])


def _bsr_mm_t(g: Tensor, vb: Tensor, layout: BlockLayout) -> Tensor:
    vbt = vb.detach().index_select(0, layout.t_perm).transpose(1, 2).contiguous()
    return _bsr_op(g.detach(), vbt, layout.t_ccol, layout.rows.index_select(0, layout.t_perm), layout.shape[1])


def _unstructured_sddmm(g: Tensor, x: Tensor, layout: BlockLayout) -> Tensor:
    """1x1 blocks: the dense product, then the entries (no faster CPU path was found)."""
    return (g.t() @ x)[layout.rows, layout.cols].view(-1, 1, 1)


def _bsr_sddmm(g: Tensor, x: Tensor, layout: BlockLayout) -> Tensor:
    if layout.block == (1, 1):
        return _unstructured_sddmm(g, x, layout)
    return KERNEL_TABLE["blocks"].sddmm(g, x, layout)  # the per-block mm loop


#: Kernels this benchmark compares with the library's (registered on import).
COMPARED = {"bsr": Kernel(_bsr_mm, _bsr_mm_t, _bsr_sddmm), "gather": Kernel(_gather_mm, _gather_mm_t, _gather_sddmm)}
for _name, _kernel in COMPARED.items():
    if _name not in KERNEL_TABLE:
        register_kernel(_name, _kernel)

NAME = "sparse_speedup"
TITLE = "Sparse kernels vs dense: GPT MLP block"


def mlp_block(d: int) -> nn.Module:
    """``Linear(d, 4d) -> GELU -> Linear(4d, d)``."""
    return nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


def _forward_fn(model: nn.Module, layouts: dict | None) -> Callable:
    if layouts is None:
        return lambda p, x: functional_call(model, p, (x,))

    def fwd(p, x):
        h = F.gelu(sparse_linear(x, p["0.weight"], layouts["0.weight"], p["0.bias"]))
        return sparse_linear(h, p["2.weight"], layouts["2.weight"], p["2.bias"])

    return fwd


def _setup(ctx: Context, d: int, tokens: int, sparsity: float, block: tuple[int, int], dtype: torch.dtype):
    torch.manual_seed(0)
    model = mlp_block(d).to(ctx.device, dtype)
    structure = "unstructured" if block == (1, 1) else "block"
    cfg = rf.RigLConfig(sparsity=sparsity, distribution="uniform", structure=structure,
                        block=block if structure == "block" else (4, 4), t_end=10**9, delta=10**8)
    tx = rf.rigl(cfg, rf.adamw(1e-3))
    params, state = tx.init(model, seed=0)
    x = torch.randn(tokens, d, device=ctx.device, dtype=dtype)
    return model, tx, params, state, x


def _variants(model, tx, params, state, x, layouts) -> dict[str, Callable[[], Any]]:
    fwd = _forward_fn(model, layouts)

    def loss(p, xb):
        return fwd(p, xb).float().pow(2).mean()

    grads_fn = grad(loss, argnums=(0, 1))

    def forward():
        with torch.no_grad():
            return fwd(params, x)

    def train():
        g, gx = grads_fn(params, x)
        return tx.step(params, g, state), gx

    return {"fwd": forward, "train": train}


def run(ctx: Context, log: Callable[[str], None] = print) -> Section:
    dev = ctx.device.type
    d, tokens = (128, 128) if ctx.smoke else (1024, 2048)
    dtypes = [torch.float32] if dev == "cpu" else [torch.bfloat16, torch.float32]
    configs = [(0.95, (32, 32), tokens), (0.9, (32, 32), tokens), (0.95, (1, 1), tokens), (0.9, (1, 1), tokens)]
    if dev == "cuda" and not ctx.smoke:  # launch overheads weigh less with 8x the tokens
        configs += [(0.95, (32, 32), 8 * tokens), (0.9, (32, 32), 8 * tokens)]
    candidates = (["blocks"] if dev == "cpu" else ["triton"]) + ["bsr", "gather"]
    rows, data, lines = [], {}, []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for sparsity, block, n_tok in configs:
            if n_tok != tokens and dtype != dtypes[0]:
                continue
            label = f"{sparsity:.0%} " + ("unstructured" if block == (1, 1) else f"block {block[0]}x{block[1]}")
            label += "" if n_tok == tokens else f", {n_tok:,} tokens"
            log(f"[{NAME}] {dev} {dname} {label} ...")
            model, tx, params, state, x = _setup(ctx, d, n_tok, sparsity, block, dtype)
            masks = state.rigl.masks
            auto = block_layouts(masks, block, dtype=dtype)
            kernels = {"auto": auto["0.weight"].kernel}
            fns = {f"dense {k}": f for k, f in _variants(model, tx, params, state, x, None).items()}
            variants = {"auto": auto}
            for name in candidates:
                if block == (1, 1) and (name in ("blocks", "triton") or (name == "gather" and not ctx.smoke)):
                    continue  # one matmul per weight / [T, nnz] gathers (gigabytes at full size)
                variants[name] = block_layouts(masks, block, kernel=name, dtype=dtype)
            for vname, lays in variants.items():
                for k, f in _variants(model, tx, params, state, x, lays).items():
                    fns[f"{vname} {k}"] = f
            upd = with_dense_grad(auto, True)
            fns["auto update-step train"] = _variants(model, tx, params, state, x, upd)["train"]
            exported = rf.sparse_modules(model, auto)  # inference export: params + masks -> SparseLinear

            def export_fwd(m=exported, p=params):
                with torch.no_grad():
                    return functional_call(m, p, (x,))

            fns["export fwd"] = export_fwd
            failed = {}
            for name, fn in list(fns.items()):  # a comparison kernel that fails on this device is reported, not fatal
                if name.startswith(("dense ", "auto ")):
                    continue
                try:
                    fn()
                except Exception as err:  # noqa: BLE001
                    failed[name.split(" ")[0]] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
            fns = {k: f for k, f in fns.items() if k.split(" ")[0] not in failed}
            t = time_interleaved(fns, device=ctx.device, repeats=ctx.repeats, warmup=ctx.warmup)
            base = {k: t[f"dense {k}"].median_ms for k in ("fwd", "train")}
            for vname in failed:
                rows.append([dname, label, vname, failed[vname], "", "", ""])
            for vname in [v for v in variants if v not in failed]:
                shown = f"{vname} ({kernels['auto']})" if vname == "auto" else vname
                rows.append([dname, label, shown, fmt_ms(t[f"{vname} fwd"].median_ms),
                             f"{base['fwd'] / t[f'{vname} fwd'].median_ms:.2f}x",
                             fmt_ms(t[f"{vname} train"].median_ms),
                             f"{base['train'] / t[f'{vname} train'].median_ms:.2f}x"])
            if "export" not in failed:
                rows.append([dname, label, "exported: sparse_modules + functional_call", fmt_ms(t["export fwd"].median_ms),
                             f"{base['fwd'] / t['export fwd'].median_ms:.2f}x", "", ""])
            rows.append([dname, label, "auto, update step (dense weight grad)", "", "",
                         fmt_ms(t["auto update-step train"].median_ms),
                         f"{base['train'] / t['auto update-step train'].median_ms:.2f}x"])
            rows.append([dname, label, "dense", fmt_ms(base["fwd"]), "1.00x", fmt_ms(base["train"]), "1.00x"])
            key = (dname, label)
            data[key] = {name: t[name].median_ms for name in t} | {"auto_kernel": kernels["auto"]}
            fwd_x = base["fwd"] / t["auto fwd"].median_ms
            train_x = base["train"] / t["auto train"].median_ms
            if block == (32, 32) and dtype == dtypes[0] and n_tok == tokens:  # the 95% line last, no dtype
                tag = dev if sparsity == 0.95 or dev == "cpu" else f"{dev} {dname}"
                lines.append(f"sparse_speedup {tag}: mlp_fwd {fwd_x:.2f}x mlp_train {train_x:.2f}x ({label})")
    lines.sort(key=lambda s: "95%" in s)
    header = ["dtype", "config", "kernel", "forward ms", "fwd speedup", "train step ms", "train speedup"]
    threads = torch.get_num_threads()
    md = [__doc__.split("\n\n")[1].replace("\n", " "), "",
          f"Sizes: d={d}, tokens={tokens} unless the config says otherwise; device {dev}, {threads} threads; "
          f"medians of {ctx.repeats} runs (interleaved; noisy on a shared machine).", "", markdown_table(header, rows), "",
          *[f"`{s}`" for s in lines]]
    summary = "\n".join([" | ".join(f"{str(c):>14s}" for c in r) for r in [header, *rows]] + lines)
    return Section(title=TITLE, markdown="\n".join(md), summary=summary, data={"lines": lines, **{
        f"{a} {b}": v for (a, b), v in data.items()}})

"""Benchmark 4: K independently-masked sparse MLPs in one ``vmap``-ed step vs K sequential ones.

Models: the MNIST-1D MLP 40-100-100-10 (15k weights; the target is judged on it) and
the MNIST MLP 784-300-100-10 (266k weights), batch 64, 90% sparse (ERK), ``delta=100``,
plain SGD (lr 0.01). The K models have their own initial weights and masks
(``init_state(..., seed=i)``) and see the same batch (an ensemble). A step is

* plain: ``torch.func.grad`` of the cross-entropy through
  ``torch.func.functional_call``, ``rigl_func.accumulate``, masked SGD
  (``params - lr * where(mask, grad, 0)``);
* update (every ``delta`` steps): the same gradient and ``accumulate``, then
  ``rigl_func.update_topology`` instead of SGD.

**vmapped**: gradient, ``accumulate`` and ``update_topology`` under
``torch.func.vmap`` on stacked params/states (the batch not mapped), SGD on the stacked
tensors. **sequential**: the per-model step in a Python loop over K models. The ratio
is sequential time over vmapped time (= throughput ratio); amortized step =
``(99 * plain + update) / 100``.

**compiled** (with ``--compile primary|all``, on the first model): the plain step of
each mode under ``torch.compile``, vmapped vs a Python loop over a compiled single-model
step; update steps stay eager.

Why two sizes: ``vmap`` saves per-op dispatch and Python overhead (paid once instead of
K times), not arithmetic. The small MLP's step is mostly overhead, where ensembling
with ``vmap`` pays off; the larger one is matmul-bound on a CPU thread, where it cannot.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import rigl_func
from benchmarks.common import Context, Section, fmt_ms, markdown_table, save_plot, time_interleaved
from benchmarks.train_step import mlp

__all__ = ["NAME", "TITLE", "run", "make_step"]

NAME = "vmap"
TITLE = "vmap ensembles: K sparse MLPs in one vmapped step vs K sequential steps"
DELTA, T_END, LR = 100, 10_000, 0.01
TARGET_RATIO, TARGET_K = 3.0, 8
PLOT = "vmap_ensembles.png"


def make_step(model: torch.nn.Module, cfg: rigl_func.RigLConfig, k: Optional[int] = None,
              autograd: bool = False) -> tuple[Callable, Callable]:
    """Plain and update steps ``(params, state, x, y) -> (params, state)``.

    Args:
        model: skeleton module for ``functional_call`` (its own weights are unused).
        cfg: the RigL config.
        k: ``None``: steps of one model. An int: steps of ``k`` stacked models (leading
            dim ``k`` on every param and state leaf; ``x``, ``y`` shared), with the
            gradient, ``accumulate`` and ``update_topology`` under ``torch.func.vmap``
            and the masked SGD update done directly on the stacked tensors (it is
            elementwise, so it needs no ``vmap``).
        autograd: with ``k``: the gradient by one ``torch.autograd.grad`` of the sum of
            the K losses of a ``vmap``-ed forward (model i's gradient is that of its own
            loss; equal to ``vmap(grad)`` up to float rounding) -- fewer functorch layers
            per op, so less fixed overhead.
    """

    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    dloss, acc, upd = grad(loss), rigl_func.accumulate, rigl_func.update_topology
    if k is not None and autograd:
        vloss = vmap(loss, in_dims=(0, None, None))

        def dloss(params, x, y):  # one backward through the vmapped forward: sum_i loss_i
            leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            with torch.enable_grad():
                grads = torch.autograd.grad(vloss(leaves, x, y).sum(), list(leaves.values()))
            return dict(zip(leaves, grads))
    elif k is not None:
        dloss = vmap(dloss, in_dims=(0, None, None))
    if k is not None:
        acc = vmap(acc, in_dims=(0, 0, None))
        upd = vmap(upd, in_dims=(0, 0, 0, None))

    def plain(params, state, x, y):
        grads = dloss(params, x, y)
        state = acc(state, grads, cfg)
        new = {n: p - LR * (torch.where(state.masks[n], grads[n], 0.0) if n in state.masks else grads[n])
               for n, p in params.items()}
        return new, state

    def update(params, state, x, y):
        grads = dloss(params, x, y)
        return upd(params, grads, acc(state, grads, cfg), cfg)

    return plain, update


def _setup(k: int, sizes: tuple[int, ...], cfg) -> tuple[list[dict], list[Any], torch.nn.Module]:
    models = [mlp(sizes, seed=i) for i in range(k)]
    params, states = [], []
    for i, m in enumerate(models):
        p = {n: t.detach() for n, t in m.named_parameters()}
        s = rigl_func.init_state(p, cfg, seed=i)
        params.append(rigl_func.apply_masks(p, s.masks))
        states.append(s)
    return params, states, models[0].to("meta")


def _stack(trees: list) -> Any:
    from torch.utils._pytree import tree_map

    return tree_map(lambda *xs: torch.stack(xs), *trees)


#: (label, layer sizes, batch); the first is the one the target is judged on.
MODELS = [
    ("MNIST-1D MLP 40-100-100-10, batch 64", (40, 100, 100, 10), 64),
    ("MNIST MLP 784-300-100-10, batch 64", (784, 300, 100, 10), 64),
]


def _compiled(fn: Callable, ctx: Context, *args) -> tuple[Callable, float]:
    """``torch.compile(fn)`` and the seconds of its first call (the compile)."""
    compiled = torch.compile(fn, backend=ctx.compile_backend)
    start = time.perf_counter()
    compiled(*args)
    return compiled, time.perf_counter() - start


def _time_model(ctx: Context, sizes: tuple[int, ...], batch: int, ks: tuple[int, ...], cfg, log,
                compiled: bool = False) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, sizes[0], generator=gen).to(ctx.device)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen).to(ctx.device)
    results = {}
    for k in ks:
        params, states, skeleton = _setup(k, sizes, cfg)
        params = [{n: t.to(ctx.device) for n, t in p.items()} for p in params]
        states = [torch.utils._pytree.tree_map(lambda t: t.to(ctx.device), s) for s in states]
        plain, update = make_step(skeleton, cfg)
        vplain, vupdate = make_step(skeleton, cfg, k=k)
        aplain, aupdate = make_step(skeleton, cfg, k=k, autograd=True)
        sp = _stack(params)
        at_plain = [s._replace(step=torch.full_like(s.step, DELTA // 2 - 1)) for s in states]
        at_update = [s._replace(step=torch.full_like(s.step, DELTA - 1)) for s in states]
        ss_plain, ss_update = _stack(at_plain), _stack(at_update)
        fns = {
            "vmapped plain": lambda: vplain(sp, ss_plain, x, y),
            "sequential plain": lambda: [plain(p, s, x, y) for p, s in zip(params, at_plain)],
            "vmapped update": lambda: vupdate(sp, ss_update, x, y),
            "sequential update": lambda: [update(p, s, x, y) for p, s in zip(params, at_update)],
            "vmapped-fwd plain": lambda: aplain(sp, ss_plain, x, y),
            "vmapped-fwd update": lambda: aupdate(sp, ss_update, x, y),
        }
        if compiled:  # plain steps only (99 of every 100 steps); update steps stay eager
            cv, cv_s = _compiled(vplain, ctx, sp, ss_plain, x, y)
            cs, cs_s = _compiled(plain, ctx, params[0], at_plain[0], x, y)
            fns["compiled vmapped plain"] = lambda: cv(sp, ss_plain, x, y)
            fns["compiled sequential plain"] = lambda: [cs(p, s, x, y) for p, s in zip(params, at_plain)]
            log(f"[{NAME}] K={k}: compiled the vmapped plain step in {cv_s:.1f} s, the single-model one in {cs_s:.1f} s")
        repeats = ctx.repeats * (1 if ctx.smoke else 3)
        log(f"[{NAME}] {'-'.join(map(str, sizes))} K={k}: {', '.join(fns)} x {repeats} ...")
        results[k] = time_interleaved(fns, device=ctx.device, repeats=repeats, warmup=ctx.warmup + 1)
    return results


def _amortized(t: dict, kind: str) -> float:
    """``(99 plain + 1 update) / 100``; compiled kinds use the eager update of their mode."""
    update = kind.replace("compiled ", "")
    return ((DELTA - 1) * t[f"{kind} plain"].median_ms + t[f"{update} update"].median_ms) / DELTA


def run(ctx: Context, log: Callable[[str], None] = print) -> Section:
    """Run the vmap ensemble benchmark and return its RESULTS.md section."""
    models = [("MLP 64-32-10, batch 8 (smoke)", (64, 32, 10), 8)] if ctx.smoke else MODELS
    ks = (1, 2) if ctx.smoke else (1, 2, 4, 8, 16)
    cfg = rigl_func.RigLConfig(t_end=T_END, delta=DELTA, sparsity=0.9, distribution="erk")
    compiled = ctx.compile_configs != "none"  # on the first (primary) model only
    all_results = {label: _time_model(ctx, sizes, batch, ks, cfg, log, compiled=compiled and i == 0)
                   for i, (label, sizes, batch) in enumerate(models)}
    label0, results0 = next(iter(all_results.items()))
    compiled_md = []
    if compiled:
        crow = []
        for k, t in results0.items():
            crow.append([k, t["compiled vmapped plain"].spread(), t["compiled sequential plain"].spread(),
                         f"{_amortized(t, 'sequential') / _amortized(t, 'compiled vmapped'):.2f}x",
                         f"{_amortized(t, 'compiled sequential') / _amortized(t, 'compiled vmapped'):.2f}x",
                         f"{1e3 * k / _amortized(t, 'compiled vmapped'):,.0f}"])
        compiled_md = [
            f"**Compiled** ({label0}; `torch.compile(backend={ctx.compile_backend!r})` of the plain step, "
            "compile time excluded; update steps eager):",
            "",
            markdown_table(["K", "compiled vmapped plain ms", "compiled sequential plain ms",
                            "compiled vmapped vs eager sequential", "compiled vmapped vs compiled sequential",
                            "compiled vmapped model-steps/s"], crow, align="rrrrrr"),
            "",
        ]

    header = ["model", "K", "vmapped plain ms", "sequential plain ms", "plain ratio", "vmapped update ms",
              "sequential update ms", "amortized ratio", "vmapped model-steps/s", "vmapped-fwd plain ms",
              "vmapped-fwd amortized ratio"]
    rows = []
    for label, results in all_results.items():
        for k, t in results.items():
            rows.append([label, k, t["vmapped plain"].spread(), t["sequential plain"].spread(),
                         f"{t['sequential plain'].median_ms / t['vmapped plain'].median_ms:.2f}x",
                         fmt_ms(t["vmapped update"].median_ms), fmt_ms(t["sequential update"].median_ms),
                         f"{_amortized(t, 'sequential') / _amortized(t, 'vmapped'):.2f}x",
                         f"{1e3 * k / _amortized(t, 'vmapped'):,.0f}", t["vmapped-fwd plain"].spread(),
                         f"{_amortized(t, 'sequential') / _amortized(t, 'vmapped-fwd'):.2f}x"])

    def draw(plt):
        fig, axes = plt.subplots(1, len(all_results), figsize=(5 * len(all_results), 3.5), squeeze=False)
        for ax, (label, results) in zip(axes[0], all_results.items()):
            kk = list(results)
            for kind, name in (("vmapped", "vmap(grad)"), ("vmapped-fwd", "vmap forward + autograd"),
                               ("sequential", "sequential"), ("compiled vmapped", "compiled vmap(grad)"),
                               ("compiled sequential", "compiled sequential")):
                if f"{kind} plain" not in results[kk[0]]:
                    continue
                ax.plot(kk, [1e3 * k / _amortized(results[k], kind) for k in kk], "o-", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xticks(kk, [str(k) for k in kk])
            ax.set_xlabel("K models")
            ax.set_ylabel("model-steps / s (amortized, delta=100)")
            ax.set_title(label, fontsize=9)
            ax.legend()

    plot = save_plot(draw, Path(__file__).resolve().parent / PLOT, enabled=not ctx.smoke)
    verdict = []
    for label, results in all_results.items():
        if TARGET_K in results:
            seq = _amortized(results[TARGET_K], "sequential")
            r = seq / _amortized(results[TARGET_K], "vmapped")
            r2 = seq / _amortized(results[TARGET_K], "vmapped-fwd")
            verdict.append(f"- {label}: vmap(grad) {r:.2f}x, vmapped forward + autograd {r2:.2f}x the sequential "
                           f"throughput at K={TARGET_K} (amortized, both eager); target >= {TARGET_RATIO:.0f}x "
                           f"**{'met' if max(r, r2) >= TARGET_RATIO else 'not met'}** eager vs eager.")
            if "compiled vmapped plain" in results[TARGET_K]:
                t = results[TARGET_K]
                rc = seq / _amortized(t, "compiled vmapped")
                rcc = _amortized(t, "compiled sequential") / _amortized(t, "compiled vmapped")
                verdict.append(f"  Compiled, the vmapped step is {rc:.2f}x the eager sequential throughput and "
                               f"{rcc:.2f}x the compiled sequential one at K={TARGET_K}: compiling the vmapped "
                               "step is the lever; like for like (compiled vs compiled) the target is "
                               f"**{'met' if rcc >= TARGET_RATIO else 'not met'}**.")
    md = [
        f"90% ERK, `delta={DELTA}`, SGD lr {LR}; each model has its own initial weights and masks (seed i), the "
        f"batch is shared. Device: {ctx.device}. Median (min–max) of {ctx.repeats * (1 if ctx.smoke else 3)} "
        f"interleaved runs after {ctx.warmup + 1} warm-up; ratio = sequential time / vmapped time (= throughput "
        "ratio). *vmapped*: `vmap(grad(loss))`; *vmapped-fwd*: one `torch.autograd.grad` of the summed "
        "losses of a vmapped forward (same gradients up to rounding); both run `accumulate` and "
        "`update_topology` under `vmap`.",
        "",
        markdown_table(header, rows, align="lrrrrrrrrrr"),
        "",
        *compiled_md,
        plot,
        "",
        *verdict,
        "- Which size is meaningful: `vmap` removes per-model dispatch and Python overhead, not arithmetic. "
        "The MNIST-1D-sized MLP (40 inputs, two hidden layers of 100, 15k weights) has a per-model step of "
        "about a millisecond, "
        "mostly overhead, so K models in one vmapped step cost little more than one; the 266k-weight MNIST "
        "MLP at batch 64 is already matmul-bound on one CPU thread, so there `vmap` gains nothing (and its "
        "batched matmuls can be slightly slower than K separate ones). On a GPU the second regime starts "
        "much later.",
    ]
    summary = "\n".join(" | ".join(f"{str(c):>18s}" for c in r) for r in [header, *rows])
    return Section(title=TITLE, markdown="\n".join(md), summary=summary, data={"results": all_results})

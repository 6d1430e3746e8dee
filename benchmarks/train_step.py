"""Benchmark 3: training-step overhead of sparse training against dense training.

Models: an MLP 784-300-100-10 (batch 64) and torchvision's ResNet-18 with
``num_classes=10`` on 32x32 inputs (CIFAR-sized, batch 64); smoke: batch 4. Every
variant trains its own copy with SGD (lr 0.01, momentum 0.9, PyTorch's default
foreach implementation) on the same fixed batch, 90% sparsity (uniform, first layer
dense; Linear layers sparse), ``delta=100``:

* **dense**: ``zero_grad``, forward, ``backward``, ``optimizer.step()``.
* **rigl_func shell**: the same plus ``if pruner(): optimizer.step()``
  (``rigl_func.RigLScheduler``).
* **functional**: ``torch.func.functional_call`` + ``torch.autograd.grad``,
  ``rigl_func.accumulate``, ``update_topology`` + ``reset_optimizer_state`` on update
  steps, else ``rigl_func.functional_optim.sgd``'s masked step (the gradients of all
  sparse layers masked in one batched pass, then ``torch._foreach_*`` over all params).
* **one call (tx.step)**: the functional iteration as ``tx = rigl_func.rigl(cfg, sgd(...))``,
  ``params, state = tx.step(params, grads, state)`` (issue 13).
* **rigl-torch**: like the shell with rigl-torch 0.5.2's ``RigLScheduler``.

A *plain* step is iteration 50 of the 100-step window, an *update* step is iteration
100 (each call puts the counters there first). Amortized per-step cost with an update
every ``delta = 100`` steps: ``(99 * plain + update) / 100``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rigl_func.dispatch import count_ops

import rigl_func
from rigl_func.functional_optim import sgd
from benchmarks.common import (
    Context,
    Section,
    Timing,
    fmt_ms,
    markdown_table,
    RIGL_TORCH,
    optional_import,
    profile_ops,
    save_plot,
    set_scheduler_step,
    time_interleaved,
)

__all__ = ["NAME", "TITLE", "run", "mlp"]

NAME = "train_step"
TITLE = "Training-step overhead vs dense training (ResNet-18 CIFAR, MLP)"
DELTA, T_END, DENSITY, LR, MOMENTUM = 100, 100_000, 0.1, 0.01, 0.9
TARGET_PLAIN, TARGET_AMORTIZED = 0.05, 0.10
PLOT = "train_step_overhead.png"


def mlp(sizes: tuple[int, ...] = (784, 300, 100, 10), seed: int = 0) -> nn.Sequential:
    """LeNet-300-100-style MLP with ReLUs; ``seed`` fixes its initialization."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


class _Variant:
    """One way of training; ``step(t)`` runs iteration ``t`` (1-based) on the batch."""

    def __init__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.model, (self.x, self.y) = model, batch
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def _backward(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()

    def step(self, t: int) -> None:
        self._backward()
        self.opt.step()


class _Shell(_Variant):
    def __init__(self, model, batch) -> None:
        super().__init__(model, batch)
        self.pruner = rigl_func.RigLScheduler(model, self.opt, dense_allocation=DENSITY, T_end=T_END, delta=DELTA,
                                              ignore_linear_layers=False)

    def step(self, t: int) -> None:
        set_scheduler_step(self.pruner, t - 1)
        self._backward()
        if self.pruner():
            self.opt.step()


class _RiglTorch(_Variant):
    def __init__(self, model, batch) -> None:
        super().__init__(model, batch)
        from rigl_torch.RigL import RigLScheduler

        self.pruner = RigLScheduler(model, self.opt, dense_allocation=DENSITY, T_end=T_END, delta=DELTA,
                                    ignore_linear_layers=False)

    def step(self, t: int) -> None:
        self.pruner.step = t - 1
        self._backward()
        if self.pruner():
            self.opt.step()


class _Functional:
    """The loop of README's functional example, with the masked functional SGD-momentum
    (:func:`rigl_func.functional_optim.sgd`: one batched gradient-masking pass, then
    ``torch._foreach_*`` ops)."""

    def __init__(self, model: nn.Module, batch) -> None:
        self.model, (self.x, self.y) = model, batch
        self.cfg = rigl_func.RigLConfig(t_end=T_END, delta=DELTA, sparsity=1 - DENSITY, distribution="uniform",
                                        dense=(_first_layer(model),))
        params = {n: p.detach() for n, p in model.named_parameters()}
        self.buffers = dict(model.named_buffers())
        self.state = rigl_func.init_state(model, self.cfg, seed=0)
        self.opt = sgd(LR, momentum=MOMENTUM)
        self.params = {n: p.clone().requires_grad_(True)
                       for n, p in rigl_func.apply_masks(params, self.state.masks).items()}
        self.opt_state = self.opt.init(self.params)

    def step(self, t: int) -> None:
        self.state = self.state._replace(step=torch.full_like(self.state.step, t - 1))
        loss = F.cross_entropy(functional_call(self.model, (self.params, self.buffers), (self.x,)), self.y)
        grads = dict(zip(self.params, torch.autograd.grad(loss, list(self.params.values()))))
        self.state = rigl_func.accumulate(self.state, grads, self.cfg)
        with torch.no_grad():
            if rigl_func.is_update_step(t, self.cfg):  # Python int: no device sync
                old = self.state.masks
                new, self.state = rigl_func.update_topology({n: p.detach() for n, p in self.params.items()}, grads,
                                                            self.state, self.cfg)
                self.opt_state = rigl_func.reset_optimizer_state(self.opt_state, old, self.state.masks)
            else:
                new, self.opt_state = self.opt.step(self.params, grads, self.opt_state, self.state.masks)
        self.params = {n: p.requires_grad_(True) for n, p in new.items()}


class _OneCall(_Functional):
    """The same iteration as one call: ``tx = rigl_func.rigl(cfg, sgd(...))``;
    ``params, state = tx.step(params, grads, state)``."""

    def __init__(self, model: nn.Module, batch) -> None:
        super().__init__(model, batch)
        self.tx = rigl_func.rigl(self.cfg, self.opt)
        params, self.tstate = self.tx.init({n: p.detach() for n, p in model.named_parameters()}, seed=0)
        self.params = {n: p.requires_grad_(True) for n, p in params.items()}

    def step(self, t: int) -> None:
        rigl = self.tstate.rigl._replace(step=torch.full_like(self.tstate.rigl.step, t - 1))
        self.tstate = self.tstate._replace(rigl=rigl, count=torch.tensor(t - 1))
        loss = F.cross_entropy(functional_call(self.model, (self.params, self.buffers), (self.x,)), self.y)
        grads = dict(zip(self.params, torch.autograd.grad(loss, list(self.params.values()))))
        with torch.no_grad():
            new, self.tstate = self.tx.step({n: p.detach() for n, p in self.params.items()}, grads, self.tstate)
        self.params = {n: p.requires_grad_(True) for n, p in new.items()}


def _first_layer(model: nn.Module) -> str:
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            return name + ".weight"
    raise ValueError("model has no Linear/Conv layer")


VARIANTS: dict[str, Callable[..., Any]] = {
    "dense": _Variant, "rigl_func shell": _Shell, "functional": _Functional, "one call (tx.step)": _OneCall,
    "rigl-torch": _RiglTorch,
}


def _models(ctx: Context) -> list[tuple[str, Optional[Callable[[], nn.Module]], tuple[int, ...], Optional[str]]]:
    if ctx.smoke:  # every code path, in seconds
        from benchmarks.rigl_torch_step import _small_net

        return [("MLP 64-32-10 (smoke)", lambda: mlp((64, 32, 10)), (64,), None),
                ("small conv net (smoke)", _small_net, (3, 8, 8), None)]
    tv, why = optional_import("torchvision")
    resnet = None if tv is None else (lambda: (torch.manual_seed(0), tv.models.resnet18(num_classes=10))[1])
    return [("MLP 784-300-100-10", mlp, (784,), None),
            ("ResNet-18 CIFAR (32x32)", resnet, (3, 32, 32), why)]


def _time_model(ctx: Context, name: str, make: Callable[[], nn.Module], in_shape: tuple[int, ...],
                rt_note: Optional[str], log) -> dict[str, Any]:
    batch_size = 4 if ctx.smoke else 64
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, *in_shape), generator=gen).to(ctx.device)
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(ctx.device)
    variants = {}
    for vname, cls in VARIANTS.items():
        if vname == "rigl-torch" and rt_note:
            continue
        variants[vname] = cls(make().to(ctx.device), (x, y))
    plain_repeats = ctx.repeats * (1 if ctx.smoke else 3)
    log(f"[{NAME}] {name}: plain steps, {', '.join(variants)} x {plain_repeats} ...")
    plain = time_interleaved({v: (lambda o=o: o.step(DELTA // 2)) for v, o in variants.items()},
                             device=ctx.device, repeats=plain_repeats, warmup=ctx.warmup + 1)
    log(f"[{NAME}] {name}: update steps x {ctx.repeats} ...")
    update = time_interleaved({v: (lambda o=o: o.step(DELTA)) for v, o in variants.items() if v != "dense"},
                              device=ctx.device, repeats=ctx.repeats, warmup=ctx.warmup)
    launches = {}  # deterministic: kernel-launching ATen ops of one plain step (forward and backward included)
    for v, o in variants.items():
        with count_ops() as ops:
            o.step(DELTA // 2)
        launches[v] = ops.launches
    profiles = {}
    if ctx.profile and not ctx.smoke:
        for v in ("dense", "rigl_func shell"):
            profiles[v] = profile_ops(lambda o=variants[v]: o.step(DELTA // 2), ctx.device, row_limit=12)
    return {"plain": plain, "update": update, "profiles": profiles, "batch": batch_size, "launches": launches}


def _amortized(plain: Timing, update: Optional[Timing]) -> Optional[float]:
    if update is None:
        return plain.median_ms
    return ((DELTA - 1) * plain.median_ms + update.median_ms) / DELTA


def run(ctx: Context, log: Callable[[str], None] = print) -> Section:
    """Run the training-step benchmark and return its RESULTS.md section."""
    _, rt_note = optional_import(RIGL_TORCH)
    header = ["model", "variant", "plain step ms", "vs dense", "launches / plain step", "update step ms",
              "amortized ms (delta=100)", "amortized vs dense"]
    rows, data, details = [], {}, []
    for name, make, in_shape, why in _models(ctx):
        if make is None:
            rows.append([name, why, "—", "—", "—", "—", "—", "—"])
            continue
        res = _time_model(ctx, name, make, in_shape, rt_note, log)
        data[name] = res
        dense = res["plain"]["dense"].median_ms
        for v in VARIANTS:
            if v not in res["plain"]:
                rows.append([name, v, rt_note, "—", "—", "—", "—", "—"])
                continue
            p, u = res["plain"][v], res["update"].get(v)
            am = _amortized(p, u)
            rows.append([name, v, p.spread(), f"{p.median_ms / dense - 1:+.1%}" if v != "dense" else "—",
                         str(res["launches"][v]), u.spread() if u else "—", fmt_ms(am), f"{am / dense - 1:+.1%}" if v != "dense" else "—"])
        for v, prof in res["profiles"].items():
            details += [f"**{name}, {v}, plain step** (one call, self CPU time)", "",
                        "```", prof["cpu_table"].rstrip(), "```", ""]

    def draw(plt):
        names = [n for n in data]
        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.2), squeeze=False)
        for ax, n in zip(axes[0], names):
            res = data[n]
            dense = res["plain"]["dense"].median_ms
            vs = [v for v in VARIANTS if v in res["plain"] and v != "dense"]
            plain = [100 * (res["plain"][v].median_ms / dense - 1) for v in vs]
            am = [100 * (_amortized(res["plain"][v], res["update"].get(v)) / dense - 1) for v in vs]
            xs = range(len(vs))
            ax.bar([i - 0.2 for i in xs], plain, 0.4, label="plain step")
            ax.bar([i + 0.2 for i in xs], am, 0.4, label="amortized, delta=100")
            ax.axhline(100 * TARGET_PLAIN, color="gray", ls="--", lw=0.8)
            ax.axhline(100 * TARGET_AMORTIZED, color="gray", ls=":", lw=0.8)
            ax.set_xticks(list(xs), vs)
            ax.set_ylabel("% over dense step")
            ax.set_title(n)
            ax.legend(fontsize=8)

    plot = save_plot(draw, _plot_path(), enabled=not ctx.smoke and bool(data))
    md = [
        f"SGD (lr {LR}, momentum {MOMENTUM}, foreach), 90% sparse (uniform, first layer dense, Linear layers "
        f"sparse), `delta={DELTA}`, cross-entropy on one fixed random batch of "
        f"{next(iter(data.values()))['batch'] if data else '—'}. Device: {ctx.device}. Plain: iteration 50 of the "
        f"window, median (min–max) of {ctx.repeats * (1 if ctx.smoke else 3)} interleaved runs after "
        f"{ctx.warmup + 1} warm-up; update: iteration 100, {ctx.repeats} runs. Amortized = "
        f"(99 x plain + update) / 100. Targets: plain <= +{TARGET_PLAIN:.0%}, amortized <= +{TARGET_AMORTIZED:.0%} "
        "over dense.",
        "",
        markdown_table(header, rows, align="llrrrrrr"),
        "",
        plot,
        "",
        NOTES,
    ]
    if details:
        md += ["", "<details><summary>Profiles (plain step)</summary>", "", *details, "</details>"]
    summary = "\n".join(" | ".join(f"{str(c):>16s}" for c in row) for row in [header, *rows])
    return Section(title=TITLE, markdown="\n".join(md), summary=summary, data=data)


def _plot_path():
    from pathlib import Path

    return Path(__file__).resolve().parent / PLOT


NOTES = """\
- **What the shell adds to a plain step** (`rigl_func.RigLScheduler`): one masking pass over
  the gradients of all sparse layers at the end of `backward()` (a callback queued by the
  grad hook), batched: pack (`torch._chunk_cat`), one `torch.where(flat_mask, flat, zero,
  out=flat)` with the masks packed once per topology change, one `torch._foreach_copy_`
  back -- 3 kernel launches (plus the step counter) whatever the number of layers
  (`tests/test_masking_launches.py`). After `optimizer.step()` nothing is re-masked for
  SGD/Adam/AdamW: with masked gradients and zero state they keep inactive weights and
  state exactly zero (`rigl_func.optim.preserves_zeros`). Nothing syncs with the device
  (counters are Python ints).
- **rigl-torch** multiplies gradients, weights and momentum by the mask every step (three
  passes); its update step sorts every layer completely (see the rigl-torch section).
- **Functional**: no hooks; `rigl_func.functional_optim.sgd` masks the gradients of all
  sparse layers in one batched pass and runs SGD as `torch._foreach_*` ops. Weights stay
  exactly zero at inactive entries because their gradient and momentum are zero there.
- On the CPU a bool-masked pass costs several times an `add_` of the same size (the mask
  load does not vectorize as well), so the overhead is set by the number of masked passes
  over the weights relative to the step's arithmetic: small for ResNet-18 (convolutions
  dominate), larger for the MLP, whose step is short.
"""

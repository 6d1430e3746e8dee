"""Benchmark 1: one ``rigl_func.update_topology`` step on ResNet-50, against a floor.

The model is the 54 conv/linear weights of torchvision's ResNet-50
(:func:`rigl_func.model_shapes.resnet50_shapes`, 25.5M weights) with random weights
and gradients; masks come from ``rigl_func.init_state(params, cfg, seed=0)`` and
``state.step = delta``, the first real update step, so the drop fraction
``f = cfg.alpha/2 * (1 + cos(pi * delta / t_end))`` is just below ``alpha``
(RigL paper, Sec. 3, Eq. 1).

Three variants run interleaved in the same process:

* **eager**: ``update_topology(params, grads, state, cfg)``.
* **compiled**: ``torch.compile(update_topology, fullgraph=True)``; its first call
  (tracing + code generation + one run) is reported separately as compile time.
* **floor**: per layer one ``torch.topk`` over ``|grad|`` with the ``k`` of the step,
  ``k = floor(f * nnz)``, and one elementwise pass over weights, gradients and mask
  (``grad.abs()``, ``torch.where(mask, w, 0)``). Any exact RigL update reads these
  tensors and selects ``k`` of ``numel`` entries at least once, so this is a lower
  bound on its cost (RigL in fact selects twice: drop and grow).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

import rigl_func
from rigl_func.model_shapes import mlp_shapes, resnet50_shapes

from rigl_func.dispatch import count_ops
from benchmarks.common import (
    Context,
    Section,
    Timing,
    fmt_ms,
    fmt_ratio,
    markdown_table,
    profile_ops,
    time_interleaved,
    timed_call,
)

__all__ = ["NAME", "TITLE", "Case", "cases", "make_floor", "run"]

NAME = "topology"
TITLE = "update_topology vs. a topk floor (eager and torch.compile)"

#: Schedule of the benchmarked config: step = DELTA is the first update step.
DELTA = 100
T_END = 25_000
#: The target of this benchmark: update_topology within this factor of the floor.
TARGET_RATIO = 2.0

# A cost model of one update on an H100, from the op trace (labelled "modeled"): every
# launching op streams its inputs and outputs once at the effective bandwidth measured
# with torch._foreach_mul_ (shared/h100-figures.md: 2.2 TB/s, range 1.1-2.9); topk costs
# what the measured flat topk over 25.5M entries did (0.78 ms, 30.6 ps per input entry,
# several radix passes); eager launches cost 12 us of host time each (the measured
# 12-22 us range), CUDA-graph replays 2.5 us. Eager wall = max(host, device); graph
# wall = device + replays.
H100_BANDWIDTH = 2.2e12
H100_TOPK_S_PER_ENTRY = 0.78e-3 / 25.5e6
H100_LAUNCH_S = 12e-6
H100_REPLAY_S = 2.5e-6


def modeled_h100_ms(ops) -> tuple[float, float]:
    """``(eager_ms, graph_ms)`` of one call whose ops ``ops`` (a
    :class:`rigl_func.dispatch.OpCounts`) recorded, on an H100 (modeled)."""
    topk_bytes = ops.bytes_by_op.get("topk", 0)
    device = (ops.bytes_moved - topk_bytes) / H100_BANDWIDTH + ops.topk_entries * H100_TOPK_S_PER_ENTRY
    return 1e3 * max(device, ops.launches * H100_LAUNCH_S), 1e3 * (device + ops.launches * H100_REPLAY_S)


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration."""

    sparsity: float
    distribution: str
    primary: bool = False  # compiled and profiled by default

    @property
    def label(self) -> str:
        return f"{self.distribution} {self.sparsity:.0%}"

    def config(self) -> rigl_func.RigLConfig:
        return rigl_func.RigLConfig(t_end=T_END, delta=DELTA, sparsity=self.sparsity,
                                    distribution=self.distribution)


def cases(smoke: bool) -> list[Case]:
    """90% sparsity, uniform and ERK; full mode adds 80% and 95%. The first (uniform 90%)
    is the primary config: the one that is compiled and profiled by default."""
    sparsities = (0.9,) if smoke else (0.9, 0.8, 0.95)
    configs = [(s, d) for s in sparsities for d in ("uniform", "erk")]
    return [Case(s, d, primary=(i == 0)) for i, (s, d) in enumerate(configs)]


def model_shapes(smoke: bool) -> tuple[str, dict[str, tuple[int, ...]]]:
    """ResNet-50 in full mode; LeNet-300-100 (266k weights) in smoke mode."""
    if smoke:
        return "LeNet-300-100 (smoke)", mlp_shapes()
    return "ResNet-50", resnet50_shapes()


def make_floor(params: dict, grads: dict, masks: dict, fraction: float) -> tuple[Callable[[], Any], dict[str, int]]:
    """The floor: per layer one ``topk`` over ``|grad|`` and one elementwise pass.

    Args:
        params, grads, masks: ``dict[str, Tensor]`` of the sparse layers.
        fraction: drop fraction ``f`` of the benchmarked step.

    Returns:
        ``(fn, ks)``: the zero-argument floor and ``k = floor(f * nnz)`` per layer
        (computed here, outside the timed region).
    """
    ks = {name: math.floor(fraction * int(mask.sum())) for name, mask in masks.items()}

    def floor() -> list:
        out = []
        for name, mask in masks.items():
            param = params[name]
            scores = grads[name].abs()
            out.append(torch.topk(scores.reshape(-1), ks[name]))
            out.append(torch.where(mask, param, torch.zeros((), dtype=param.dtype, device=param.device)))
        return out

    return floor, ks


@dataclass
class CaseResult:
    case: Case
    timings: dict[str, Timing]
    compile_s: Optional[float]
    fraction: float
    numel: int
    nnz: int
    floor_k: int
    topk_size: int
    replaced: int
    compiled_matches: Optional[bool]
    load: Optional[float] = None  # 1-minute load average after timing (other processes' CPU use)
    launches: Optional[dict] = None  # kernel-launching ATen ops of one update, per engine
    bytes_per_weight: Optional[dict] = None  # bytes read + written per sparse weight, per engine
    modeled: Optional[dict] = None  # engine -> (eager ms, graph ms) on an H100, modeled

    def ms(self, variant: str) -> Optional[float]:
        timing = self.timings.get(variant)
        return None if timing is None else timing.median_ms


def _inputs(shapes: dict, device: torch.device, seed: int = 0) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=gen).to(device) for k, s in shapes.items()}
    grads = {k: torch.randn(s, generator=gen).to(device) for k, s in shapes.items()}
    return params, grads


def _same_result(a, b) -> bool:
    (pa, sa), (pb, sb) = a, b
    return all(torch.equal(sa.masks[k], sb.masks[k]) and torch.equal(pa[k], pb[k]) for k in sa.masks)


def _run_case(ctx: Context, case: Case, dense_params: dict, grads: dict, compile_it: bool,
              log: Callable[[str], None]) -> tuple[CaseResult, dict[str, Callable[[], Any]]]:
    cfg = case.config()
    state = rigl_func.init_state(dense_params, cfg, seed=0)
    params = rigl_func.apply_masks(dense_params, state.masks)
    state = state._replace(step=torch.full_like(state.step, DELTA))
    fraction = float(rigl_func.drop_fraction(DELTA, cfg))
    floor, ks = make_floor(params, grads, state.masks, fraction)
    shapes = {k: tuple(m.shape) for k, m in state.masks.items()}
    target = rigl_func.target_nnz(shapes, cfg)
    topk_size = sum(min(math.floor(cfg.alpha * target[k]), math.prod(shapes[k])) for k in shapes)

    fns: dict[str, Callable[[], Any]] = {
        "eager": lambda: rigl_func.update_topology(params, grads, state, cfg),
        "batched": lambda: rigl_func.update_topology(params, grads, state, cfg, engine="batched"),
        "per_layer": lambda: rigl_func.update_topology(params, grads, state, cfg, engine="per_layer"),
    }
    launches, per_weight, modeled = {}, {}, {}
    numel = sum(m.numel() for m in state.masks.values())
    for variant in ("batched", "per_layer"):
        with count_ops() as ops:
            fns[variant]()
        launches[variant] = ops.launches
        per_weight[variant] = ops.bytes_moved / numel
        ops.topk_entries = _topk_entries(fns[variant])
        modeled[variant] = modeled_h100_ms(ops)
    reference, _ = timed_call(fns["eager"], ctx.device)
    replaced = sum(int((state.masks[k] & ~reference[1].masks[k]).sum()) for k in state.masks)

    compile_s = matches = None
    if compile_it:
        torch._dynamo.reset()
        compiled = torch.compile(rigl_func.update_topology, fullgraph=True, backend=ctx.compile_backend)
        log(f"  compiling {case.label} (backend={ctx.compile_backend}) ...")
        out, compile_s = timed_call(lambda: compiled(params, grads, state, cfg), ctx.device)
        matches = _same_result(out, reference)
        del out
        fns["compiled"] = lambda: compiled(params, grads, state, cfg)
    del reference
    fns["floor"] = floor

    log(f"  timing {case.label}: {', '.join(fns)} x {ctx.repeats} (+{ctx.warmup} warm-up) ...")
    timings = time_interleaved(fns, device=ctx.device, repeats=ctx.repeats, warmup=ctx.warmup,
                               warmed=("eager", "compiled", "batched", "per_layer"))
    result = CaseResult(
        case=case, timings=timings, compile_s=compile_s, fraction=fraction,
        numel=sum(m.numel() for m in state.masks.values()),
        nnz=sum(int(m.sum()) for m in state.masks.values()),
        floor_k=sum(ks.values()), topk_size=topk_size, replaced=replaced, compiled_matches=matches,
        load=os.getloadavg()[0] if hasattr(os, "getloadavg") else None, launches=launches,
        bytes_per_weight=per_weight, modeled=modeled,
    )
    return result, fns


def _topk_entries(fn: Callable[[], Any]) -> int:
    """Input entries of every ``topk`` that ``fn`` dispatches (one call on ``meta``-free
    inputs; counted with a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Topk(TorchDispatchMode):
        entries = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "topk":
                _Topk.entries += args[0].numel()
            return func(*args, **(kwargs or {}))

    with _Topk():
        fn()
    return _Topk.entries


def _topk_share(profile: dict) -> float:
    total = profile["total_self_cpu_us"]
    topk = sum(us for op, us in profile["self_cpu_us"].items() if op in ("aten::topk", "aten::sort"))
    return topk / total if total else float("nan")


def _profile_block(title: str, profile: dict) -> str:
    text = f"**{title}** (self CPU time; `aten::topk` = {_topk_share(profile):.0%} of it)\n\n```\n{profile['cpu_table'].rstrip()}\n```\n"
    if profile.get("device_table"):
        text += f"\nSame call, sorted by self device time:\n\n```\n{profile['device_table'].rstrip()}\n```\n"
    return text


def _observations(results: list[CaseResult], profiles: dict[str, dict], ctx: Context) -> list[str]:
    lines = []
    for variant in ("eager", "compiled"):
        ratios = [(r.case.label, r.ms(variant) / r.ms("floor")) for r in results if r.ms(variant) and r.ms("floor")]
        if not ratios:
            continue
        met = [label for label, ratio in ratios if ratio <= TARGET_RATIO]
        worst = max(ratios, key=lambda x: x[1])
        best = min(ratios, key=lambda x: x[1])
        span = (f"{best[1]:.2f}x the floor ({best[0]})" if len(ratios) == 1 else
                f"{best[1]:.2f}x–{worst[1]:.2f}x the floor (best {best[0]}, worst {worst[0]})")
        lines.append(
            f"- **{variant}**: {span}; target <= {TARGET_RATIO:.0f}x met for "
            f"{len(met)}/{len(ratios)} configs{': ' + ', '.join(met) if met and len(met) < len(ratios) else ''}."
        )
    if "eager" in profiles:
        prof = profiles["eager"]
        ops = sorted(prof["self_cpu_us"].items(), key=lambda kv: -kv[1])
        others = [(op, us) for op, us in ops if op not in ("aten::topk", "aten::sort")][:4]
        total = prof["total_self_cpu_us"]
        lines.append(
            f"- In the eager profile `aten::topk` takes {_topk_share(prof):.0%} of the self CPU time; the rest is "
            "elementwise work and allocation: "
            + ", ".join(f"`{op}` {us / total:.0%} ({prof['calls'][op]} calls)" for op, us in others) + "."
        )
    if "floor" in profiles:
        lines.append(f"- In the floor, `aten::topk` takes {_topk_share(profiles['floor']):.0%} of the self CPU time.")
    mismatched = [r.case.label for r in results if r.compiled_matches is False]
    checked = [r for r in results if r.compiled_matches is not None]
    if checked:
        lines.append("- Compiled masks and params equal eager ones bit for bit in "
                     f"{len(checked) - len(mismatched)}/{len(checked)} configs"
                     + (f" (**mismatch: {', '.join(mismatched)}**)." if mismatched else "."))
    return lines


def run(ctx: Context, log: Callable[[str], None] = print) -> Section:
    """Run benchmark 1 and return its RESULTS.md section."""
    model_name, shapes = model_shapes(ctx.smoke)
    log(f"[{NAME}] {model_name}: {len(shapes)} layers, {sum(math.prod(s) for s in shapes.values()):,} weights on {ctx.device}")
    dense_params, grads = _inputs(shapes, ctx.device)
    results: list[CaseResult] = []
    profiles: dict[str, dict] = {}
    for case in cases(ctx.smoke):
        compile_it = ctx.compile_configs == "all" or (ctx.compile_configs == "primary" and case.primary)
        result, fns = _run_case(ctx, case, dense_params, grads, compile_it, log)
        results.append(result)
        log(f"  {case.label}: eager {fmt_ms(result.ms('eager'))} ms, compiled {fmt_ms(result.ms('compiled'))} ms, "
            f"floor {fmt_ms(result.ms('floor'))} ms")
        if ctx.profile and case.primary:
            log(f"  profiling {case.label} ...")
            for variant in fns:
                profiles[variant] = profile_ops(fns[variant], ctx.device, warmup=False)
        del fns

    header = ["config", "eager (auto) ms", "batched ms", "per-layer ms", "compiled ms", "floor ms", "eager/floor",
              "launches batched / per-layer", "B per weight batched / per-layer",
              "H100 modeled ms, batched eager / graph", "H100 modeled ms, per-layer eager"]
    rows = [[r.case.label, fmt_ms(r.ms("eager")), fmt_ms(r.ms("batched")), fmt_ms(r.ms("per_layer")),
             fmt_ms(r.ms("compiled")), fmt_ms(r.ms("floor")), fmt_ratio(r.ms("eager"), r.ms("floor")),
             f"{r.launches['batched']} / {r.launches['per_layer']}",
             f"{r.bytes_per_weight['batched']:.0f} / {r.bytes_per_weight['per_layer']:.0f}",
             f"{r.modeled['batched'][0]:.1f} / {r.modeled['batched'][1]:.1f}",
             f"{r.modeled['per_layer'][0]:.1f}"] for r in results]
    detail_header = ["config", "f", "nnz", "changed", "floor k", "topk size", "eager ms", "compiled ms",
                     "floor ms", "compile s", "compiled == eager", "load"]
    detail_rows = [
        [r.case.label, f"{r.fraction:.4f}", f"{r.nnz:,}", f"{r.replaced:,}", f"{r.floor_k:,}", f"{r.topk_size:,}",
         r.timings["eager"].spread(),
         r.timings["compiled"].spread() if "compiled" in r.timings else "—",
         r.timings["floor"].spread(),
         f"{r.compile_s:.1f}" if r.compile_s is not None else "—",
         {None: "—", True: "yes", False: "**no**"}[r.compiled_matches],
         f"{r.load:.1f}" if r.load is not None else "—"]
        for r in results
    ]
    md = [
        f"Model: {model_name}, {len(shapes)} sparse layers, {results[0].numel:,} weights; random weights and "
        f"gradients; masks from `init_state(params, cfg, seed=0)`; `RigLConfig(t_end={T_END}, delta={DELTA}, "
        f"alpha=0.3, schedule='cosine')`, `state.step = {DELTA}`. Device: {ctx.device}. Median of "
        f"{ctx.repeats} interleaved runs after {ctx.warmup} warm-up run(s); compile time excluded. "
        "Bytes: read + written by the launching ops of one call (`rigl_func.dispatch.count_ops`), per sparse "
        "weight. H100 columns are **modeled** from that op trace, not measured: "
        f"{H100_BANDWIDTH / 1e12:.1f} TB/s effective bandwidth, topk at the measured "
        f"{H100_TOPK_S_PER_ENTRY * 1e12:.1f} ps per input entry, {H100_LAUNCH_S * 1e6:.0f} us host time per "
        f"eager launch, {H100_REPLAY_S * 1e6:.1f} us per CUDA-graph replay (shared/h100-figures.md).",
        "",
        markdown_table(header, rows),
        "",
        "<details><summary>Details: median (min–max) ms, counts summed over layers</summary>",
        "",
        markdown_table(detail_header, detail_rows),
        "",
        "`f`: drop fraction of the step; `changed`: connections dropped and not regrown (= genuinely new ones); `floor k`: "
        "sum of `floor(f * nnz)`, the `k` of the floor's topk; `topk size`: sum of the static topk size of "
        "`update_topology` (`floor(alpha * nnz)`, one drop and one grow topk per layer); `compile s`: first "
        f"call of the compiled function (tracing, code generation with backend `{ctx.compile_backend}`, one run); "
        f"`load`: 1-minute load average after the case (above {os.cpu_count()} means other processes competed for the cores).",
        "",
        "</details>",
        "",
    ]
    if profiles:
        md += [f"#### Profile ({results[0].case.label}, one call, `torch.profiler`)", ""]
        for variant, title in (("eager", "Eager update_topology"), ("floor", "Floor"), ("compiled", "Compiled update_topology")):
            if variant in profiles:
                md += [_profile_block(title, profiles[variant]), ""]
    md += ["#### Notes", "", *_observations(results, profiles, ctx), "", NOTES]

    summary = "\n".join(" | ".join(f"{c:>14s}" for c in row) for row in [header, *rows])
    return Section(title=TITLE, markdown="\n".join(md), summary=summary,
                   data={"results": results, "profiles": profiles})


NOTES = """\
- **What the floor means.** Any exact RigL update has to read every weight, gradient and
  mask entry and select `k = floor(f * nnz)` of `numel` entries per layer; the floor does
  that once (one `topk` on `|grad|`, one `abs`, one `where`), and `topk` is most of its
  cost. `update_topology` selects twice (drop by `|w|`, grow by `|grad|`), each time with
  a `topk` of static size `floor(alpha * nnz)` over all `numel` entries, so two floors,
  i.e. **2x, is what this scheme costs with zero overhead**; everything else (scores,
  eligibility, tie-breaking, counts, mask algebra) comes on top. Getting below 2x needs a
  cheaper drop selection (e.g. a `topk` over the active entries only).
- **Eager cost is the number of full-size passes.** Each eager op reads whole tensors
  and allocates a full-size output, so the cost of the elementwise part is roughly
  (number of ops) x (bytes per element); 8-byte (`int64`) temporaries cost twice as much
  as `float32` ones, and `Tensor.sum()` of a bool tensor first converts it to `int64`
  (`torch.count_nonzero` does not). CPU `topk` on a 1-D tensor is single-threaded.
- **Compiled** fuses the elementwise ops into a few loops; `topk` (and `scatter`)
  stay library calls. Compile time is the first call with a cold inductor cache
  (a fresh cache directory per run unless `--keep-compile-cache`); later runs of the
  same code with a warm cache compile much faster.
- **Noise.** Variants are interleaved, so load from other processes affects all of
  them; ratios are taken between medians of the same run. Compare absolute numbers only
  between runs on the same machine (see the header: load average, threads). With more
  busy threads than cores, every multi-threaded (OpenMP) op can wait a scheduler time
  slice for its second thread, which inflates op-heavy variants (eager) far more than
  `topk`-heavy ones (the floor); on a busy machine `--threads 1` gives steadier ratios.
"""

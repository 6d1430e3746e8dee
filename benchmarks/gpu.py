"""GPU check (issue 11): one topology update and the training-step overhead on one device.

Run from the repository root::

    python -m benchmarks.gpu --out OUTDIR [--device cuda] [--quick] [--budget-s 150]

It writes ``OUTDIR/gpu_report.md`` and ``OUTDIR/gpu_report.json`` after every stage,
so a run cut short by a timeout still leaves what it measured. ``--device cpu
--quick`` runs the same code paths on tiny sizes on a CPU in about a minute (CI
smoke-tests it); the GPU numbers come from ``benchmarks/gpu_check.sh`` on a GPU box.

Timing: every variant gets ``warmup`` untimed calls, then ``repeats`` timed calls,
interleaved round-robin. On CUDA a call is timed with CUDA events recorded on the
current stream right before and after it, after ``torch.cuda.synchronize()`` (so no
earlier work is counted) and read after ``end.synchronize()``; host wall time of the
same call is reported beside it. Medians and min–max are in milliseconds.

Stages (run in this order; the report keeps its own order):

1. **One topology update** on ResNet-50 shapes (:func:`rigl_func.model_shapes.resnet50_shapes`,
   54 weights, 25.5M) at 90% sparsity, ``uniform`` and ``erk``: ``update_topology``
   eager, and floors: a per-layer ``abs(g)`` + ``topk(k = floor(f * nnz))`` loop, one
   ``torch.topk`` over all entries (k = 3%), one ``torch.sort`` of all entries.
2. **Same-model update step** on torchvision's ResNet-50: rigl-torch 0.5.2's
   ``RigLScheduler`` (update step), ``rigl_func.RigLScheduler`` (update step),
   ``update_topology`` on the shell's state, sparsimony 0.1.0's ``RigL.step()``.
3. **Training-step overhead vs dense** (non-update steps, SGD momentum 0.9).
4. **CUDA graph** of ``update_topology`` (capture after a side-stream warm-up; replay
   checked bit for bit against eager on new inputs).
5. **torch.compile(update_topology, fullgraph=True)** (compile time, equality, timing).

Anything not installed, or failing, is reported as a line of text, never a crash.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

import rigl_func
from rigl_func.dispatch import count_ops
from rigl_func.model_shapes import mlp_shapes, resnet50_shapes

from benchmarks.common import fmt_ms, markdown_table, RIGL_TORCH, optional_import, set_scheduler_step
from benchmarks.rigl_torch_step import KWARGS as SCHED_KWARGS
from benchmarks.rigl_torch_step import _at_update_step_ours, _at_update_step_rigl_torch, _small_net
from benchmarks.train_step import mlp

__all__ = ["Stats", "Ctx", "time_variants", "environment", "main"]

DELTA, T_END, SPARSITY = 100, 25_000, 0.9
TRAIN_T_END, LR, MOMENTUM = 100_000, 0.01, 0.9
SECTIONS = ("Environment", "One topology update", "Profile of one update", "Same-model update step",
            "Training-step overhead vs dense", "Errors and skips")


# ----------------------------------------------------------------------------- timing
@dataclass
class Stats:
    """Samples of one variant, in milliseconds (device time on CUDA, wall on CPU)."""

    ms: list[float]
    wall_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    def spread(self) -> str:
        return f"{fmt_ms(self.median)} ({fmt_ms(min(self.ms))}–{fmt_ms(max(self.ms))})"

    def as_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median, "min_ms": min(self.ms), "max_ms": max(self.ms),
                "wall_median_ms": statistics.median(self.wall_ms), "samples_ms": self.ms}


def _time_once(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        del out
        return start.elapsed_time(end), wall
    t0 = time.perf_counter()
    out = fn()
    wall = (time.perf_counter() - t0) * 1e3
    del out
    return wall, wall


def _err(err: BaseException, lines: int = 4) -> str:
    text = " // ".join(line.strip() for line in str(err).strip().splitlines()[:lines] if line.strip())
    return f"{type(err).__name__}: {text[:500]}".replace("|", "/")  # no pipes: it goes into table cells


def time_variants(fns: dict[str, Callable[[], Any]], device: torch.device, *, repeats: int, warmup: int,
                  errors: dict[str, str]) -> dict[str, Stats]:
    """Time several variants interleaved; a variant that raises goes to ``errors``.

    Returns:
        name -> :class:`Stats` for the variants that ran.
    """
    ok = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ok[name] = fn
        except Exception as err:  # noqa: BLE001 - reported, not raised
            errors[name] = _err(err)
    samples: dict[str, Stats] = {name: Stats([], []) for name in ok}
    items = list(ok.items())
    for r in range(repeats):
        shift = r % max(len(items), 1)
        for name, fn in items[shift:] + items[:shift]:
            if name in errors:
                continue
            try:
                ms, wall = _time_once(fn, device)
            except Exception as err:  # noqa: BLE001
                errors[name] = _err(err)
                continue
            samples[name].ms.append(ms)
            samples[name].wall_ms.append(wall)
    return {name: s for name, s in samples.items() if s.ms and name not in errors}


# ----------------------------------------------------------------------------- context
@dataclass
class Ctx:
    device: torch.device
    quick: bool
    out: Path
    deadline: float
    compile_backend: str
    repeats: int
    warmup: int
    started: float = field(default_factory=time.perf_counter)
    md: dict[str, list[str]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def write(self) -> None:
        """Write gpu_report.md and gpu_report.json with everything measured so far."""
        self.data["wall_s"] = round(time.perf_counter() - self.started, 1)
        lines = ["# rigl_func GPU check" + (" (quick: tiny sizes, not representative)" if self.quick else ""), "",
                 f"`python -m benchmarks.gpu {' '.join(sys.argv[1:])}`; wall time so far "
                 f"{self.data['wall_s']:.0f} s.", ""]
        for title in SECTIONS:
            body = list(self.md.get(title, []))
            if title == "Errors and skips":
                body = [f"- {n}" for n in self.notes] or ["- none"]
            if not body:
                body = ["_(not reached in this run)_"]
            lines += [f"## {title}", "", *body, ""]
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_report.md").write_text("\n".join(lines))
        (self.out / "gpu_report.json").write_text(json.dumps({**self.data, "notes": self.notes}, indent=1,
                                                             default=str))


# ----------------------------------------------------------------------------- environment
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _driver_info() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        info["nvidia-smi (name, driver, memory)"] = out.splitlines()[0] if out else "no output"
        head = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
        found = re.search(r"CUDA Version:\s*([\d.]+)", head)
        if found:
            info["CUDA version supported by the driver (nvidia-smi)"] = found.group(1)
    except (OSError, subprocess.SubprocessError) as err:
        info["nvidia-smi"] = f"not available ({type(err).__name__})"
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            info["cuDriverGetVersion"] = f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        info["cuDriverGetVersion"] = "libcuda.so.1 not loadable"
    return info


def environment(device: torch.device) -> dict[str, str]:
    """Versions and device description for the report header."""
    info = {
        "torch.__version__": torch.__version__,
        "torch.version.cuda (CUDA runtime torch was built with)": str(torch.version.cuda),
        "torch.cuda.is_available()": str(torch.cuda.is_available()),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["torch.cuda.get_device_name()"] = torch.cuda.get_device_name(device)
        info["compute capability, memory"] = f"{props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB"
        info["cuDNN"] = str(torch.backends.cudnn.version())
        info.update(_driver_info())
    else:
        info["torch.cuda.get_device_name()"] = "n/a (CPU run)"
    info.update({
        "Python": platform.python_version(),
        "platform": platform.platform(),
        "CPU cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "rigl_func": rigl_func.__version__,
        **{pkg: _version(pkg) for pkg in ("torchvision", "rigl-torch", "sparsimony", "numpy", "triton")},
    })
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["git"] = "unknown"
    return info


# ----------------------------------------------------------------------------- stage 1, 4, 5: topology
def _randn_tree(shapes: dict, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen).to(device) for k, s in shapes.items()}


def _same(a, b) -> bool:
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    return sa == sb and all(torch.equal(x, y) for x, y in zip(la, lb) if isinstance(x, torch.Tensor))


@dataclass
class _TopoCase:
    dist: str
    cfg: rigl_func.RigLConfig
    params: dict
    grads: dict
    state: Any
    rows: dict[str, Stats] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)  # variant -> note (errors, equality, compile time)


def _topology_cases(ctx: Ctx) -> tuple[str, list[_TopoCase]]:
    name, shapes = ("LeNet-300-100 shapes (quick)", mlp_shapes()) if ctx.quick else ("ResNet-50 shapes", resnet50_shapes())
    dense = _randn_tree(shapes, ctx.device, 0)
    grads = _randn_tree(shapes, ctx.device, 1)
    cases = []
    for dist in ("uniform", "erk"):
        cfg = rigl_func.RigLConfig(t_end=T_END, delta=DELTA, sparsity=SPARSITY, distribution=dist)
        state = rigl_func.init_state(dense, cfg, seed=0)
        state = state._replace(step=torch.full_like(state.step, DELTA))
        cases.append(_TopoCase(dist, cfg, rigl_func.apply_masks(dense, state.masks), grads, state))
    numel = sum(math.prod(s) for s in shapes.values())
    return f"{name}: {len(shapes)} weights, {numel:,} entries", cases


def _stage_topology(ctx: Ctx, model: str, cases: list[_TopoCase]) -> None:
    for case in cases:
        params, grads, state, cfg = case.params, case.grads, case.state, case.cfg
        fraction = float(rigl_func.drop_fraction(DELTA, cfg))
        ks = {n: math.floor(fraction * int(m.sum())) for n, m in state.masks.items()}
        flat = torch.cat([g.reshape(-1) for g in grads.values()]).abs()
        k_all = max(1, int(0.03 * flat.numel()))

        def per_layer_floor():
            return [torch.topk(grads[n].abs().reshape(-1), ks[n]) for n in state.masks]

        fns = {
            "rigl_func update_topology (eager)": lambda: rigl_func.update_topology(params, grads, state, cfg),
            "rigl_func update_topology, engine='per_layer'": lambda: rigl_func.update_topology(
                params, grads, state, cfg, engine="per_layer"),
            "floor: per-layer abs(g) + topk(floor(f nnz)) loop": per_layer_floor,
            "floor: one topk over all entries (k=3%)": lambda: torch.topk(flat, k_all),
            "floor: one sort of all entries (float32)": lambda: torch.sort(flat),
        }
        try:
            rigl_func.update_topology(params, grads, state, cfg)  # first call may build cached constants
            with count_ops() as ops:
                rigl_func.update_topology(params, grads, state, cfg)
            case.extra["rigl_func update_topology (eager)"] = (
                f"{ops.launches} kernel launches, {ops.syncs} syncs, {ops.host_to_device} host-to-device copies per call")
        except Exception as err:  # noqa: BLE001
            case.extra["rigl_func update_topology (eager)"] = _err(err)
        try:
            case.extra["peak memory"] = _peak_note(lambda: rigl_func.update_topology(params, grads, state, cfg),
                                                   ctx.device, sum(m.numel() for m in state.masks.values()))
            ctx.md.setdefault("Profile of one update", []).extend(
                [f"{case.dist} 90%, top ops by self device time:", "",
                 *_profile_md(lambda: rigl_func.update_topology(params, grads, state, cfg), ctx.device), ""])
        except Exception as err:  # noqa: BLE001
            case.extra["peak memory"] = _err(err)
        errors: dict[str, str] = {}
        case.rows.update(time_variants(fns, ctx.device, repeats=ctx.repeats, warmup=ctx.warmup, errors=errors))
        case.extra.update(errors)
        ctx.notes += [f"topology {case.dist} {v}: {e}" for v, e in errors.items()]
    _render_topology(ctx, model, cases)


def _peak_note(fn: Callable[[], Any], device: torch.device, numel: int) -> str:
    """Peak extra device memory of one call per sparse weight (outputs included)."""
    if device.type != "cuda":
        return "peak memory: CUDA only"
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return f"peak extra memory {peak / numel:.1f} B per sparse weight (outputs included; target <= 12)"


def _profile_md(fn: Callable[[], Any], device: torch.device, rows: int = 15) -> list[str]:
    """Top ops of one call by self device time (CPU time without a GPU): where the
    batched update spends its time (e.g. histogram atomics in ``index_add``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=key, row_limit=rows)
    except Exception:  # noqa: BLE001 - older/newer profiler column names
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return ["```", table.rstrip(), "```"]


def _capture_graph(case: _TopoCase, device: torch.device):
    """Capture ``update_topology`` in a CUDA graph on static copies of the inputs."""
    static = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x,
                      (case.params, case.grads, case.state))
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            rigl_func.update_topology(*static, case.cfg)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rigl_func.update_topology(*static, case.cfg)
    return graph, static, out


def _stage_graph(ctx: Ctx, model: str, cases: list[_TopoCase]) -> None:
    name = "rigl_func update_topology (CUDA graph replay)"
    for case in cases:
        if ctx.device.type != "cuda":
            case.extra[name] = "skipped: CUDA graphs need a CUDA device"
            continue
        try:
            graph, static, out = _capture_graph(case, ctx.device)
        except Exception as err:  # noqa: BLE001
            case.extra[name] = "capture failed: " + _err(err)
            ctx.notes.append(f"CUDA graph capture ({case.dist}): {_err(err)}")
            try:
                torch.cuda.synchronize(ctx.device)
            except Exception as err2:  # noqa: BLE001
                ctx.notes.append(f"CUDA context after the failed capture: {_err(err2)}")
            continue
        # New inputs: other gradients and another step (so another drop fraction).
        new = (case.params, _randn_tree({k: tuple(g.shape) for k, g in case.grads.items()}, ctx.device, 7),
               case.state._replace(step=torch.full_like(case.state.step, 2 * DELTA)))
        for dst, src in zip(tree_flatten(static)[0], tree_flatten(new)[0]):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        equal = _same(out, rigl_func.update_topology(*new, case.cfg))
        errors: dict[str, str] = {}
        case.rows.update(time_variants({name: graph.replay}, ctx.device, repeats=ctx.repeats, warmup=ctx.warmup,
                                       errors=errors))
        case.extra[name] = errors.get(name, "replay == eager on new inputs (new grads, step 200): "
                                      + ("yes" if equal else "**NO**") + "; input copies not timed")
        del graph, static, out
    _render_topology(ctx, model, cases)


def _stage_compile(ctx: Ctx, model: str, cases: list[_TopoCase], min_left: float) -> None:
    name = f"rigl_func update_topology (torch.compile fullgraph, {ctx.compile_backend})"
    for case in cases:
        if ctx.left() < min_left:
            case.extra[name] = f"skipped: time budget ({ctx.left():.0f} s left, want {min_left:.0f} s)"
            ctx.notes.append(f"compile {case.dist}: {case.extra[name]}")
            continue
        torch._dynamo.reset()
        compiled = torch.compile(rigl_func.update_topology, fullgraph=True, backend=ctx.compile_backend)
        args = (case.params, case.grads, case.state, case.cfg)
        try:
            t0 = time.perf_counter()
            out = compiled(*args)
            ctx.sync()
            compile_s = time.perf_counter() - t0
            equal = _same(out, rigl_func.update_topology(*args))
            del out
        except Exception as err:  # noqa: BLE001
            case.extra[name] = "compile failed: " + _err(err)
            ctx.notes.append(f"torch.compile ({case.dist}): {_err(err)}")
            continue
        errors: dict[str, str] = {}
        case.rows.update(time_variants({name: lambda: compiled(*args)}, ctx.device, repeats=ctx.repeats,
                                       warmup=ctx.warmup, errors=errors))
        case.extra[name] = errors.get(name, f"first call (compile + run) {compile_s:.1f} s; compiled == eager: "
                                      + ("yes" if equal else "**NO**"))
        _render_topology(ctx, model, cases)
    _render_topology(ctx, model, cases)


def _render_topology(ctx: Ctx, model: str, cases: list[_TopoCase]) -> None:
    eager = "rigl_func update_topology (eager)"
    header = ["config", "variant", "median ms", "median (min–max) ms", "wall ms", "/ eager", "note"]
    rows, data = [], []
    for case in cases:
        base = case.rows.get(eager)
        variants = list(dict.fromkeys([*case.rows, *case.extra]))
        for variant in sorted(variants, key=lambda v: (not v.startswith("rigl_func"), variants.index(v))):
            s = case.rows.get(variant)
            ratio = f"{s.median / base.median:.2f}x" if s and base else "—"
            rows.append([f"{case.dist} 90%", variant, fmt_ms(s.median) if s else "—", s.spread() if s else "—",
                         fmt_ms(statistics.median(s.wall_ms)) if s else "—", ratio, case.extra.get(variant, "")])
            data.append({"config": case.dist, "variant": variant, **(s.as_dict() if s else {}),
                         "note": case.extra.get(variant, "")})
    clock = "CUDA events" if ctx.device.type == "cuda" else "wall clock"
    ctx.md["One topology update"] = [
        f"{model}; random weights and gradients; masks from `init_state(params, cfg, seed=0)`; "
        f"`RigLConfig(t_end={T_END}, delta={DELTA}, sparsity={SPARSITY})`, `state.step = {DELTA}` (an update "
        f"step). Device {ctx.device}; {clock}; median (min–max) of {ctx.repeats} interleaved calls after "
        f"{ctx.warmup} warm-up; `wall ms`: host time of the same call incl. synchronize; `/ eager`: this "
        "variant's median over eager `update_topology`'s.",
        "",
        markdown_table(header, rows, align="llrrrrl"),
    ]
    ctx.data["topology"] = data
    ctx.write()


# ----------------------------------------------------------------------------- stage 2: same-model update step
def _same_model_factory(ctx: Ctx) -> tuple[str, Optional[Callable[[], nn.Module]], Optional[str]]:
    if ctx.quick:
        return "small conv net (quick)", _small_net, None
    tv, why = optional_import("torchvision")
    if tv is None:
        return "torchvision ResNet-50", None, why
    return "torchvision ResNet-50", lambda: (torch.manual_seed(0), tv.models.resnet50())[1], None


def _fake_grads(model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    return {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(device)
            for i, (n, p) in enumerate(model.named_parameters())}


def _rigl_torch_update(make, grads, device) -> Callable[[], Any]:
    from rigl_torch.RigL import RigLScheduler as RTScheduler

    model = make().to(device)
    pruner = RTScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=MOMENTUM), **SCHED_KWARGS)
    return _at_update_step_rigl_torch(pruner, grads)


def _ours_update(make, grads, device) -> dict[str, Callable[[], Any]]:
    """The shell's update step, and ``update_topology`` on the shell's params (uniform) and
    on an ERK state of the same weights."""
    model = make().to(device)
    sched = rigl_func.RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=MOMENTUM),
                                    **SCHED_KWARGS)
    params = {n: p.detach() for n, p in model.named_parameters()}
    fns = {"rigl_func RigLScheduler() shell (update step, uniform)": _at_update_step_ours(sched, grads)}
    for dist, cfg in (("uniform", sched.config),
                      ("erk", rigl_func.RigLConfig(t_end=T_END, delta=DELTA, sparsity=SPARSITY, distribution="erk"))):
        state = rigl_func.init_state(params, cfg, seed=0) if dist == "erk" else sched.state
        state = state._replace(step=torch.full_like(state.step, DELTA))
        sparse = rigl_func.apply_masks({n: params[n] for n in state.masks}, state.masks)
        fns[f"rigl_func update_topology ({dist}, same weights)"] = (
            lambda sparse=sparse, state=state, cfg=cfg: rigl_func.update_topology(sparse, grads, state, cfg))
    return fns


def _sparsimony_update(make, grads, device, dist: str) -> Callable[[], Any]:
    """sparsimony 0.1.0: ``RigL(scheduler, distribution, optimizer, sparsity).prepare(model,
    [{"tensor_fqn": ...}])``; ``step()`` updates when its ``_step_count`` hits a multiple of
    ``delta_t``, growing by the ``dense_grad`` buffer of its parametrization."""
    from sparsimony.distributions.base import ERKDistribution, UniformDistribution
    from sparsimony.dst.rigl import RigL
    from sparsimony.schedulers.base import CosineDecayScheduler
    from sparsimony.utils import get_parametrization

    model = make().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=MOMENTUM)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first = names[0]
    distribution = (UniformDistribution(excluded_mod_name_regexs=[f"^{re.escape(first)}$"]) if dist == "uniform"
                    else ERKDistribution())
    sparsifier = RigL(CosineDecayScheduler(0.3, T_END, DELTA), distribution, opt, sparsity=SPARSITY,
                      init_method=None)
    sparsifier.prepare(model, [{"tensor_fqn": f"{n}.weight"} for n in names])
    modules = dict(model.named_modules())

    def call():
        sparsifier._step_count = DELTA - 1
        for n in names:
            get_parametrization(modules[n], "weight").dense_grad = grads[f"{n}.weight"]
        return sparsifier.step()

    return call


def _stage_same_model(ctx: Ctx) -> None:
    title = "Same-model update step"
    model_name, make, why = _same_model_factory(ctx)
    if make is None:
        ctx.md[title] = [why]
        ctx.notes.append(f"same-model update step: {why}")
        return
    grads = _fake_grads(make(), ctx.device)
    fns: dict[str, Callable[[], Any]] = {}
    skipped: dict[str, str] = {}
    rt_name = "rigl-torch 0.5.2 RigLScheduler() (update step, uniform)"
    rt, why_rt = optional_import(RIGL_TORCH)
    if rt is None:
        skipped[rt_name] = why_rt
    else:
        fns[rt_name] = _rigl_torch_update(make, grads, ctx.device)
    fns.update(_ours_update(make, grads, ctx.device))
    sp, why_sp = optional_import("sparsimony")
    for dist in ("uniform", "erk"):
        label = f"sparsimony 0.1.0 RigL.step() (update step, {dist})"
        try:
            if sp is None:
                raise ImportError(why_sp)
            fns[label] = _sparsimony_update(make, grads, ctx.device, dist)
        except Exception as err:  # noqa: BLE001
            skipped[label] = why_sp if sp is None else "setup failed: " + _err(err)
    errors: dict[str, str] = {}
    repeats = max(2, ctx.repeats // 3)
    timings = time_variants(fns, ctx.device, repeats=repeats, warmup=1, errors=errors)
    skipped.update(errors)
    ctx.notes += [f"same-model {k}: {v}" for k, v in skipped.items()]
    header = ["variant", "median ms", "median (min–max) ms", "wall ms", "/ rigl_func (same distribution)"]
    rows, data = [], []
    for name in dict.fromkeys([rt_name, *fns, *skipped]):
        s = timings.get(name)
        if s is None:
            rows.append([name, skipped.get(name, "—"), "—", "—", "—"])
            data.append({"variant": name, "note": skipped.get(name, "")})
            continue
        dist = "erk" if "erk" in name else "uniform"
        base = timings.get(f"rigl_func update_topology ({dist}, same weights)")
        rows.append([name, fmt_ms(s.median), s.spread(), fmt_ms(statistics.median(s.wall_ms)),
                     f"{s.median / base.median:.2f}x" if base else "—"])
        data.append({"variant": name, **s.as_dict()})
    ctx.md[title] = [
        f"Model: {model_name}; every library gets its own copy and the same random gradients, and each call is "
        f"put at step {DELTA} (an update step) first. rigl-torch and the rigl_func shell: "
        f"`{', '.join(f'{k}={v!r}' for k, v in SCHED_KWARGS.items())}` (uniform: first layer dense). "
        "`update_topology` rows: the shell's state (uniform) or `init_state(weights, RigLConfig(sparsity=0.9, "
        "distribution='erk'))`, no shell around it. sparsimony: `RigL(CosineDecayScheduler(0.3, T_END, DELTA), "
        "UniformDistribution(first layer excluded) | ERKDistribution(), sparsity=0.9, init_method=None)`, its "
        "`dense_grad` buffers set to the same gradients. rigl-torch has no ERK (any other "
        "`sparsity_distribution` sparsifies every layer uniformly). "
        f"Device {ctx.device}; median (min–max) of {repeats} interleaved calls after 1 warm-up; last column: "
        "median over `update_topology`'s of the same distribution (> 1x: slower than rigl_func).",
        "",
        markdown_table(header, rows, align="lrrrr"),
    ]
    ctx.data["same_model"] = data


# ----------------------------------------------------------------------------- stage 3: training steps
class _Dense:
    """``zero_grad``, forward (bf16 autocast if ``amp``), backward, ``optimizer.step()``."""

    def __init__(self, model: nn.Module, batch, amp: bool) -> None:
        self.model, (self.x, self.y), self.amp = model, batch, amp
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def _autocast(self):
        return torch.autocast(self.x.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _backward(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()

    def step(self, t: int) -> None:
        self._backward()
        self.opt.step()


class _Shell(_Dense):
    """``rigl_func.RigLScheduler`` drop-in: ``if pruner(): opt.step()``."""

    def __init__(self, model, batch, amp) -> None:
        super().__init__(model, batch, amp)
        self.pruner = rigl_func.RigLScheduler(model, self.opt, dense_allocation=1 - SPARSITY, T_end=TRAIN_T_END,
                                              delta=DELTA, ignore_linear_layers=False)

    def step(self, t: int) -> None:
        set_scheduler_step(self.pruner, t - 1)
        self._backward()
        if self.pruner():
            self.opt.step()


class _RiglTorch(_Dense):
    def __init__(self, model, batch, amp) -> None:
        super().__init__(model, batch, amp)
        from rigl_torch.RigL import RigLScheduler

        self.pruner = RigLScheduler(model, self.opt, dense_allocation=1 - SPARSITY, T_end=TRAIN_T_END, delta=DELTA,
                                    ignore_linear_layers=False)

    def step(self, t: int) -> None:
        self.pruner.step = t - 1
        self._backward()
        if self.pruner():
            self.opt.step()


def _functional_sgd():
    """``rigl_func.functional_optim.sgd`` where this checkout has it, else ``None``."""
    try:
        from rigl_func.functional_optim import sgd
    except ImportError:
        return None
    return sgd(LR, momentum=MOMENTUM)


class _Functional(_Dense):
    """benchmarks/train_step.py's functional loop: ``functional_call`` + ``autograd.grad``,
    ``accumulate``, then (non-update step) a masked momentum-SGD step: with
    ``rigl_func.functional_optim.sgd`` where it exists, else sparse-layer gradients masked
    with one ``torch.where`` each and momentum SGD as ``torch._foreach_*`` ops."""

    def __init__(self, model, batch, amp) -> None:
        super().__init__(model, batch, amp)
        first = next(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))) + ".weight"
        self.cfg = rigl_func.RigLConfig(t_end=TRAIN_T_END, delta=DELTA, sparsity=SPARSITY, distribution="uniform",
                                        dense=(first,))
        self.buffers = dict(model.named_buffers())
        self.state = rigl_func.init_state(model, self.cfg, seed=0)
        params = rigl_func.apply_masks({n: p.detach() for n, p in model.named_parameters()}, self.state.masks)
        fmt = {n: torch.channels_last if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
               and not p.is_contiguous() else torch.contiguous_format for n, p in model.named_parameters()}
        self.names = list(params)
        self.params = [params[n].contiguous(memory_format=fmt[n]).requires_grad_(True) for n in self.names]
        self.sgd = _functional_sgd()
        if self.sgd is not None:
            self.opt_state = self.sgd.init({n: p.detach() for n, p in zip(self.names, self.params)})
        self.momentum = [torch.zeros_like(p) for p in self.params]
        self.masks = [self.state.masks.get(n) for n in self.names]

    def step(self, t: int) -> None:
        self.state = self.state._replace(step=torch.full_like(self.state.step, t - 1))
        tree = dict(zip(self.names, self.params))
        with self._autocast():
            loss = F.cross_entropy(functional_call(self.model, (tree, self.buffers), (self.x,)), self.y)
        grads = list(torch.autograd.grad(loss, self.params))
        self.state = rigl_func.accumulate(self.state, dict(zip(self.names, grads)), self.cfg)
        if rigl_func.is_update_step(t, self.cfg):
            raise RuntimeError("the training-step stage times non-update steps only")
        with torch.no_grad():
            if self.sgd is not None:
                new, self.opt_state = self.sgd.step({n: p.detach() for n, p in tree.items()},
                                                    dict(zip(self.names, grads)), self.opt_state, self.state.masks)
                self.params = [new[n].requires_grad_(True) for n in self.names]
                return
            grads = [g if m is None else torch.where(m, g, 0.0) for g, m in zip(grads, self.masks)]
            torch._foreach_mul_(self.momentum, MOMENTUM)
            torch._foreach_add_(self.momentum, grads)
            torch._foreach_add_([p.detach() for p in self.params], self.momentum, alpha=-LR)


class _OneCall(_Functional):
    """The functional iteration as one call (issue 13): ``tx = rigl_func.rigl(cfg, sgd)``,
    ``params, state = tx.step(params, grads, state)`` (a CPU step counter decides the
    branch: no sync)."""

    def __init__(self, model, batch, amp) -> None:
        super().__init__(model, batch, amp)
        if self.sgd is None or not hasattr(rigl_func, "rigl"):
            raise RuntimeError("this checkout has no rigl_func.rigl (issue 13)")
        self.tx = rigl_func.rigl(self.cfg, self.sgd)
        fmt = {n: p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for n, p in zip(self.names, self.params)}
        params, self.tstate = self.tx.init({n: p.detach() for n, p in zip(self.names, self.params)}, seed=0)
        self.params = [(params[n].contiguous(memory_format=torch.channels_last) if fmt[n] else params[n])
                       .requires_grad_(True) for n in self.names]

    def step(self, t: int) -> None:
        rigl = self.tstate.rigl._replace(step=torch.full_like(self.tstate.rigl.step, t - 1))
        self.tstate = self.tstate._replace(rigl=rigl, count=torch.tensor(t - 1))
        tree = dict(zip(self.names, self.params))
        with self._autocast():
            loss = F.cross_entropy(functional_call(self.model, (tree, self.buffers), (self.x,)), self.y)
        grads = dict(zip(self.names, torch.autograd.grad(loss, self.params)))
        if self.tx.is_update_step(self.tstate):
            raise RuntimeError("the training-step stage times non-update steps only")
        with torch.no_grad():
            new, self.tstate = self.tx.step({n: p.detach() for n, p in tree.items()}, grads, self.tstate)
        self.params = [new[n].requires_grad_(True) for n in self.names]


VARIANTS = {"dense": _Dense, "rigl_func shell": _Shell, "functional": _Functional, "one call (tx.step)": _OneCall,
            "rigl-torch": _RiglTorch}


def _training_models(ctx: Ctx) -> list[dict[str, Any]]:
    tv, why = optional_import("torchvision")
    resnet = (lambda arch, **kw: None) if tv is None else (
        lambda arch, **kw: (torch.manual_seed(0), getattr(tv.models, arch)(**kw))[1])
    if ctx.quick:
        return [
            dict(name="ResNet-18 (16x16, batch 4, bf16 autocast, channels_last; quick stand-in for ResNet-50)",
                 make=lambda: resnet("resnet18", num_classes=10), shape=(3, 16, 16), batch=4, classes=10, amp=True,
                 cl=True, repeats=3, why=why),
            dict(name="MLP 784-300-100-10 (batch 4)", make=mlp, shape=(784,), batch=4, classes=10, amp=False,
                 cl=False, repeats=5, why=None),
        ]
    return [
        dict(name="ResNet-50 (224x224, batch 64, bf16 autocast, channels_last)", make=lambda: resnet("resnet50"),
             shape=(3, 224, 224), batch=64, classes=1000, amp=True, cl=True, repeats=15, why=why),
        dict(name="ResNet-18 CIFAR (num_classes=10, 32x32, batch 64)",
             make=lambda: resnet("resnet18", num_classes=10), shape=(3, 32, 32), batch=64, classes=10, amp=False,
             cl=False, repeats=30, why=why),
        dict(name="MLP 784-300-100-10 (batch 64)", make=mlp, shape=(784,), batch=64, classes=10, amp=False,
             cl=False, repeats=60, why=None),
    ]


def _stage_training(ctx: Ctx) -> None:
    title = "Training-step overhead vs dense"
    _, why_rt = optional_import(RIGL_TORCH)
    header = ["model", "variant", "median ms", "median (min–max) ms", "wall ms", "vs dense"]
    rows, data = [], []
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for spec in _training_models(ctx):
        if spec["why"]:
            rows.append([spec["name"], spec["why"], "—", "—", "—", "—"])
            continue
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((spec["batch"], *spec["shape"]), generator=gen).to(ctx.device)
        y = torch.randint(0, spec["classes"], (spec["batch"],), generator=gen).to(ctx.device)
        fmt = torch.channels_last if spec["cl"] else torch.contiguous_format
        x = x.contiguous(memory_format=fmt) if x.dim() == 4 else x
        variants, errors = {}, {}
        for vname, cls in VARIANTS.items():
            if vname == "rigl-torch" and why_rt:
                errors[vname] = why_rt
                continue
            try:
                variants[vname] = cls(spec["make"]().to(ctx.device, memory_format=fmt), (x, y), spec["amp"])
            except Exception as err:  # noqa: BLE001
                errors[vname] = "setup failed: " + _err(err)
        timings = time_variants({v: (lambda o=o: o.step(DELTA // 2)) for v, o in variants.items()}, ctx.device,
                                repeats=spec["repeats"], warmup=ctx.warmup + 1, errors=errors)
        dense = timings.get("dense")
        for vname in VARIANTS:
            s = timings.get(vname)
            if s is None:
                rows.append([spec["name"], vname, errors.get(vname, "—"), "—", "—", "—"])
                data.append({"model": spec["name"], "variant": vname, "note": errors.get(vname, "")})
                continue
            rows.append([spec["name"], vname, fmt_ms(s.median), s.spread(), fmt_ms(statistics.median(s.wall_ms)),
                         f"{s.median / dense.median - 1:+.1%}" if dense and vname != "dense" else "—"])
            data.append({"model": spec["name"], "variant": vname, **s.as_dict()})
        ctx.notes += [f"training {spec['name']} {v}: {e}" for v, e in errors.items()]
        del variants
        ctx.md[title] = _training_md(ctx, header, rows)
        ctx.data["training"] = data
        ctx.write()


def _training_md(ctx: Ctx, header, rows) -> list[str]:
    return [
        f"Non-update steps (iteration {DELTA // 2} of the {DELTA}-step window), SGD lr {LR} momentum {MOMENTUM} "
        f"(PyTorch's default foreach), 90% sparse (uniform, first layer dense, Linear layers sparse), cross-entropy "
        f"on one fixed random batch; each variant trains its own copy. Variants: dense; rigl_func shell "
        "(`rigl_func.RigLScheduler`, `if pruner(): opt.step()`); functional (benchmarks/train_step.py's loop: "
        "`functional_call` + `autograd.grad`, `accumulate`, then "
        + ("`rigl_func.functional_optim.sgd(lr, momentum=0.9).step(params, grads, state, masks)`"
           if _functional_sgd() is not None else "masked grads and foreach momentum SGD (this checkout has no "
           "`rigl_func.functional_optim`)") + "); one call (the same as `tx.step(params, grads, state)` of "
        "`tx = rigl_func.rigl(cfg, sgd(...))`); rigl-torch 0.5.2. "
        f"Device {ctx.device}; median (min–max) of interleaved steps after {ctx.warmup + 1} warm-up; "
        "`vs dense`: median over dense's median, minus 1.",
        "",
        markdown_table(header, rows, align="llrrrr"),
    ]


# ----------------------------------------------------------------------------- main
def _stage(ctx: Ctx, label: str, fn: Callable[[], None], min_left: float) -> None:
    if ctx.left() < min_left:
        ctx.notes.append(f"{label}: skipped: time budget ({ctx.left():.0f} s left, want {min_left:.0f} s)")
        ctx.write()
        return
    print(f"[gpu] {label} ({ctx.left():.0f} s of budget left) ...", flush=True)
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - one broken stage must not hide the others
        ctx.notes.append(f"{label}: stage failed: {_err(err, lines=8)}")
    ctx.data.setdefault("stage_s", {})[label] = round(time.perf_counter() - t0, 1)
    ctx.write()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_report.md / gpu_report.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (CPU smoke test)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip stages that would start with less time left (default: no limit)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 20; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per variant (default 3; quick 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's; 1 for --quick on the CPU, steadier when busy)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; eager for --quick on the CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    ctx = Ctx(device=device, quick=args.quick, out=args.out,
              deadline=time.perf_counter() + (args.budget_s if args.budget_s is not None else float("inf")),
              compile_backend=args.compile_backend or ("eager" if args.quick and device.type == "cpu" else "inductor"),
              repeats=args.repeats or (3 if args.quick else 20), warmup=args.warmup or (1 if args.quick else 3))
    if device.type == "cuda" and not torch.cuda.is_available():
        ctx.md["Environment"] = ["skipped: CUDA not available (torch.cuda.is_available() is False); "
                                 "run with --device cpu --quick for a smoke test"]
        ctx.notes.append("everything: skipped: CUDA not available")
        ctx.write()
        print(f"CUDA not available; wrote {ctx.out / 'gpu_report.md'}")
        return 0
    env = ctx.data["environment"] = environment(device)
    ctx.md["Environment"] = [f"- **{k}**: {v}" for k, v in env.items()]
    ctx.write()
    torch.manual_seed(0)
    quick = ctx.quick
    model, cases = _topology_cases(ctx)
    _stage(ctx, "topology (eager, floors)", lambda: _stage_topology(ctx, model, cases), 0)
    _stage(ctx, "same-model update step", lambda: _stage_same_model(ctx), 5 if quick else 25)
    _stage(ctx, "training steps", lambda: _stage_training(ctx), 5 if quick else 25)
    _stage(ctx, "CUDA graph", lambda: _stage_graph(ctx, model, cases), 2 if quick else 10)
    _stage(ctx, "torch.compile", lambda: _stage_compile(ctx, model, cases, 2 if quick else 45), 0)
    ctx.write()
    print((ctx.out / "gpu_report.md").read_text())
    print(f"wrote {ctx.out / 'gpu_report.md'} and gpu_report.json in {time.perf_counter() - ctx.started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

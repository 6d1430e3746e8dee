"""One RigL update on a GPU, both engines, measured with CUDA events (issue 17).

    python -m benchmarks.engine_gpu [--out DIR] [--quick]

Models (random weights and gradients, masks from ``init_state``-like random draws on the
device, ``state.step = delta``): ResNet-50's 54 conv/fc weights (25.5M) at 90% uniform and
ERK, and a GPT-style stack of ``nn.Linear`` weights (d=2048, 24 blocks: qkv, proj, fc,
proj; 1.2B weights) at 90% uniform. Per model: the batched engine eager and replayed from
a CUDA graph, the per-layer engine eager (ResNet-50 only), peak extra memory
(``torch.cuda.max_memory_allocated``, outputs included) per sparse weight, the op trace's
launches and bytes per weight, and a ``torch.profiler`` table of the top CUDA kernels of
one batched update. Prints a markdown report (and writes it to ``DIR/engine_gpu.md``).
Without CUDA it runs the ResNet-50 case on the CPU at 1 repeat (a smoke run).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Callable

import torch

import rigl_func as rf
from rigl_func.dispatch import count_ops
from rigl_func.model_shapes import resnet50_shapes

__all__ = ["gpt_shapes", "main"]


def gpt_shapes(d: int = 2048, blocks: int = 24) -> dict[str, tuple[int, int]]:
    """The Linear weights of a GPT-style stack: qkv ``[3d, d]``, proj ``[d, d]``,
    fc ``[4d, d]``, proj ``[d, 4d]`` per block."""
    out = {}
    for b in range(blocks):
        out |= {f"h{b}.attn.qkv.weight": (3 * d, d), f"h{b}.attn.proj.weight": (d, d),
                f"h{b}.mlp.fc.weight": (4 * d, d), f"h{b}.mlp.proj.weight": (d, 4 * d)}
    return out


def _world(shapes: dict, distribution: str, device: torch.device):
    cfg = rf.RigLConfig(t_end=25_000, delta=100, sparsity=0.9, distribution=distribution, include=(".*",))
    gen = torch.Generator(device=device).manual_seed(0)
    params = {k: torch.randn(s, generator=gen, device=device) for k, s in shapes.items()}
    grads = {k: torch.randn(s, generator=gen, device=device) for k, s in shapes.items()}
    nnz = rf.target_nnz(shapes, cfg)
    masks = {}
    for k, s in shapes.items():  # nnz[k] random active entries, drawn on the device
        scores = torch.rand(s, generator=gen, device=device).reshape(-1)
        m = torch.zeros_like(scores, dtype=torch.bool)
        m[torch.topk(scores, nnz[k]).indices] = True
        masks[k] = m.view(s)
    params = {k: torch.where(masks[k], v, 0.0) for k, v in params.items()}
    z = torch.zeros((), dtype=torch.int64, device=device)
    state = rf.RigLState(masks, z + 100, z, {}, {}, z)
    return params, grads, state, cfg


def _time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> tuple[float, float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), min(times), max(times)


def _graph(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (inputs are fixed tensors); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _peak(fn: Callable[[], object], device: torch.device, numel: int) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / numel


def _profile(fn: Callable[[], object], device: torch.device, rows: int = 12) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "self_cuda_time_total" if torch.__version__ < "2.4" else "self_device_time_total"
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="ResNet-50 uniform only, 3 repeats")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = 1 if device.type == "cpu" else (3 if args.quick else 7)
    cases = [("ResNet-50", resnet50_shapes(), "uniform"), ("ResNet-50", resnet50_shapes(), "erk")]
    if device.type == "cuda" and not args.quick:
        cases.append(("GPT d=2048 x 24 blocks", gpt_shapes(), "uniform"))
    if args.quick or device.type == "cpu":
        cases = cases[:1]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [f"# One update, {name}, torch {torch.__version__}, 90% sparse", "",
             "| model | weights | layers | batched eager ms | batched CUDA graph ms | per-layer eager ms | "
             "launches batched / per-layer | B per weight (trace) | peak extra B per weight (outputs incl.) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    profile_text = ""
    for label, shapes, dist in cases:
        params, grads, state, cfg = _world(shapes, dist, device)
        numel = sum(math.prod(s) for s in shapes.values())
        batched = lambda: rf.update_topology(params, grads, state, cfg, engine="batched")  # noqa: E731
        per_layer = lambda: rf.update_topology(params, grads, state, cfg, engine="per_layer")  # noqa: E731
        batched()
        with count_ops() as ops_b:
            batched()
        b = _time(batched, device, repeats)
        g = "—"
        if device.type == "cuda":
            try:
                g = "%.2f" % _time(_graph(batched), device, repeats)[0]
            except Exception as err:  # report, do not stop the run
                g = f"failed: {type(err).__name__}"
        small = numel < 10**8
        if small:
            per_layer()
            with count_ops() as ops_p:
                per_layer()
            p = "%.2f" % _time(per_layer, device, max(1, repeats // 2), warmup=1)[0]
            launches = f"{ops_b.launches} / {ops_p.launches}"
        else:
            p, launches = "—", f"{ops_b.launches} / —"
        peak = _peak(batched, device, numel)
        lines.append(f"| {label} {dist} | {numel:,} | {len(shapes)} | {b[0]:.2f} ({b[1]:.2f}-{b[2]:.2f}) | {g} | {p} | "
                     f"{launches} | {ops_b.bytes_moved / numel:.0f} | {peak:.1f} |")
        print(lines[-1], flush=True)
        if not profile_text:
            profile_text = _profile(batched, device)
        del params, grads, state
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = "\n".join(lines + ["", "Top kernels of one batched update (ResNet-50 uniform):", "", "```",
                                profile_text.rstrip(), "```", ""])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "engine_gpu.md"), "w") as f:
            f.write(report)
    print(report)
    return report


if __name__ == "__main__":
    main()

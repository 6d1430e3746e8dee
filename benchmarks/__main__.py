"""Command line of the rigl_func benchmarks.

    python -m benchmarks --write-results   # full run (1 thread), rewrites benchmarks/RESULTS.md (+ plots),
                                                       # keeping its "(hand-written" sections
    python -m benchmarks                 # full run, report to a temp file (RESULTS.md untouched)
    python -m benchmarks --smoke         # seconds; CI; writes a temp file, never RESULTS.md
    python -m benchmarks --only topology train_step --device cuda --repeats 5

Benchmarks (``--only``): topology (update_topology vs a topk floor), rigl_torch (one
update step vs rigl-torch 0.5.2), train_step (training-step overhead vs dense), vmap
(vmapped ensembles vs a loop), memory (bytes per sparse weight), sparse_speedup (sparse
kernels vs dense on a GPT MLP block; its last line ``sparse_speedup <device>: mlp_fwd <X>x
mlp_train <Y>x (95% block 32x32)``). rigl-torch and
torchvision are optional: without them the affected rows say ``skipped: <reason>``.

Threads: ``--threads`` (default 1, set before anything runs; 0 keeps torch's default,
i.e. ``OMP_NUM_THREADS`` or one per core). The console and the report header give the
torch version, device and threads of the run.

Timings are never asserted on: a slow or busy machine gives slow numbers, not a
failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

import importlib

from benchmarks import common

__all__ = ["BENCHMARKS", "main", "hand_written_sections"]

#: Registered benchmarks, in the order they run and appear in RESULTS.md.
_MODULES = ("topology", "rigl_torch_step", "train_step", "vmap_ensembles", "memory", "sparse_speedup")


def _load(module: str) -> ModuleType:
    return importlib.import_module(f"benchmarks.{module}")


BENCHMARKS: dict[str, ModuleType] = {m.NAME: m for m in map(_load, _MODULES)}

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


HAND_WRITTEN = "(hand-written"


def hand_written_sections(text: str) -> list[str]:
    """The ``## ...`` sections of a RESULTS.md whose heading contains ``(hand-written``
    (results of other commands: the GPU check, issue write-ups), as lines, in order.
    Headings inside code fences (profiler tables) are not headings."""
    kept, keep, fenced = [], False, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            keep = HAND_WRITTEN in line
        elif not fenced and line.startswith("# "):
            keep = False
        if keep:
            kept.append(line)
    return kept + ([""] if kept and kept[-1] else [])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes and few repeats: exercises every code path in seconds (CI)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available, else cpu")
    p.add_argument("--write-results", action="store_true",
                   help=f"write the report to {RESULTS.name} next to this file (full runs only)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown report (default: a temporary file; with --write-results benchmarks/RESULTS.md)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default: 3, smoke: 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant before timing (default: 1)")
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None, help="run only these benchmarks")
    p.add_argument("--compile", dest="compile_configs", choices=("primary", "all", "none"), default="primary",
                   help="which configs also run torch.compile: primary (default: the first config of each "
                        "benchmark, e.g. uniform 90%%), all (a cold inductor compile of the ResNet-50 update "
                        "takes about 5 minutes on 2 CPU cores, per config) or none")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; smoke: eager, which runs the same "
                        "fullgraph=True Dynamo trace, so graph breaks still fail, but generates no code)")
    p.add_argument("--keep-compile-cache", action="store_true",
                   help="use the persistent inductor cache (warm compiles); default: a fresh cache per run")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch.profiler tables")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads, set before anything runs (default 1: steady on a busy machine, "
                        "and what RESULTS.md uses; 0: torch's default, i.e. OMP_NUM_THREADS or one per core)")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="wall (default) or process: CPU time of this process (CPU only; with --threads 1 it "
                        "ignores time spent waiting for a core on a busy machine)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        _parser().error("--device cuda but torch.cuda.is_available() is False")
    if args.write_results and (args.smoke or args.out is not None or args.only):
        _parser().error("--write-results writes benchmarks/RESULTS.md from a full run of every benchmark: "
                        "drop --smoke / --out / --only")
    if args.write_results:
        out = RESULTS
    else:
        out = args.out or Path(tempfile.gettempdir()) / (
            "rigl_func_benchmarks_smoke.md" if args.smoke else "rigl_func_benchmarks.md")
        if args.smoke and out.resolve() == RESULTS:
            _parser().error(f"--smoke never writes {RESULTS}; pass another --out")
    repeats = args.repeats if args.repeats is not None else (2 if args.smoke else 3)
    if repeats < 1 or args.warmup < 0:
        _parser().error(f"--repeats must be >= 1 and --warmup >= 0, got {repeats=}, warmup={args.warmup}")
    if args.clock == "process" and args.device != "cpu":
        _parser().error("--clock process measures CPU time: use it with --device cpu")
    common.clock[0] = args.clock
    if args.threads < 0:
        _parser().error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = None
    if not args.keep_compile_cache:
        cache = tempfile.TemporaryDirectory(prefix="rigl_func_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache.name, "triton"))

    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s) "
          f"(--threads; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})", flush=True)
    if args.device == "cpu" and not torch.cuda.is_available():
        print("note: CUDA is not available; all numbers are CPU numbers", flush=True)
    ctx = common.Context(
        device=torch.device(args.device),
        smoke=args.smoke,
        repeats=repeats,
        warmup=args.warmup,
        compile_backend=args.compile_backend or ("eager" if args.smoke else "inductor"),
        compile_configs=args.compile_configs,
        profile=args.profile,
    )
    info = common.machine_info(ctx.device)
    info["clock"] = ("wall time (time.perf_counter)" if args.clock == "wall" else
                     "process CPU time (time.process_time, all threads summed)")
    command = "python -m benchmarks" + ("" if not argv else " " + " ".join(argv))
    started, date = time.perf_counter(), common.now_utc()
    sections = []
    try:
        for name in args.only or list(BENCHMARKS):
            section = BENCHMARKS[name].run(ctx, log=lambda msg: print(msg, flush=True))
            sections.append(section)
            print(f"\n{section.title}\n{section.summary}\n", flush=True)
    finally:
        if cache is not None:
            cache.cleanup()
    if hasattr(os, "getloadavg"):
        info["load average at end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    info["wall time of this run"] = f"{time.perf_counter() - started:.0f} s"

    lines = [
        "# rigl_func benchmarks" + (" (smoke run: tiny sizes, not representative)" if args.smoke else ""),
        "",
        f"Generated by `{command}` on {date}. Re-run it from the repository root to update this file.",
        "",
        *(f"- **{k}**: {v}" for k, v in info.items()),
        "",
    ]
    if out.resolve() == RESULTS.resolve() and RESULTS.exists():
        lines += hand_written_sections(RESULTS.read_text())  # kept across --write-results
    for section in sections:
        lines += [f"## {section.title}", "", section.markdown.rstrip(), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line of the rigl_func benchmarks.

    python -m benchmarks                 # full run, writes benchmarks/RESULTS.md
    python -m benchmarks --smoke         # seconds; CI; writes a temp file, never RESULTS.md
    python -m benchmarks --only topology --device cuda --repeats 5

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

from benchmarks import common, topology

__all__ = ["BENCHMARKS", "main"]

#: Registered benchmarks, in the order they run and appear in RESULTS.md.
BENCHMARKS: dict[str, ModuleType] = {
    topology.NAME: topology,
}

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes and few repeats: exercises every code path in seconds (CI)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, default=None,
                   help=f"markdown report (default: {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}; "
                        "with --smoke a temporary file)")
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
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        _parser().error("--device cuda but torch.cuda.is_available() is False")
    if args.smoke:
        out = args.out or Path(tempfile.gettempdir()) / "rigl_func_benchmarks_smoke.md"
        if out.resolve() == RESULTS:
            _parser().error(f"--smoke never writes {RESULTS}; pass another --out")
    else:
        out = args.out or RESULTS
    repeats = args.repeats if args.repeats is not None else (2 if args.smoke else 3)
    if repeats < 1 or args.warmup < 0:
        _parser().error(f"--repeats must be >= 1 and --warmup >= 0, got {repeats=}, warmup={args.warmup}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cache = None
    if not args.keep_compile_cache:
        cache = tempfile.TemporaryDirectory(prefix="rigl_func_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache.name, "triton"))

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
    for section in sections:
        lines += [f"## {section.title}", "", section.markdown.rstrip(), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

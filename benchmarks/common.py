"""Shared harness of the rigl_func benchmarks: timing, profiling, machine description.

Every benchmark module times several variants of one computation *in the same run*
and interleaves them (round-robin, rotating the order each round), so that load from
other processes, frequency changes and allocator state hit all variants alike. A
timing is ``warmup`` untimed calls, then ``repeats`` timed calls, reported as
median / min / max in milliseconds; on CUDA the device is synchronized before the
clock is started and before it is read.

Nothing here asserts on timings: the smoke mode runs in CI and must never fail
because a machine is slow or busy.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

__all__ = [
    "Context",
    "Section",
    "Timing",
    "sync",
    "time_interleaved",
    "timed_call",
    "machine_info",
    "markdown_table",
    "profile_ops",
    "fmt_ms",
    "fmt_ratio",
    "optional_import",
    "RIGL_TORCH",
]


@dataclass(frozen=True)
class Context:
    """What every benchmark gets from the command line.

    Attributes:
        device: where tensors live (``cpu`` or ``cuda``).
        smoke: tiny sizes, few repeats; exercise every code path in seconds.
        repeats: timed calls per variant.
        warmup: untimed calls per variant before timing.
        compile_backend: ``torch.compile`` backend (``inductor`` in full mode).
        compile_configs: ``"all"``, ``"primary"`` (only each benchmark's primary
            config) or ``"none"``: which configs also run the compiled variant.
        profile: whether to run ``torch.profiler`` on the primary config.
    """

    device: torch.device
    smoke: bool
    repeats: int
    warmup: int
    compile_backend: str = "inductor"
    compile_configs: str = "primary"
    profile: bool = True


@dataclass
class Section:
    """One benchmark's contribution to RESULTS.md and to the console."""

    title: str
    markdown: str
    summary: str = ""  # short plain-text table for the console
    data: dict[str, Any] = field(default_factory=dict)  # raw numbers (for tests/tools)


@dataclass(frozen=True)
class Timing:
    """Wall-clock samples of one variant, in seconds."""

    samples: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1e3

    @property
    def min_ms(self) -> float:
        return min(self.samples) * 1e3

    @property
    def max_ms(self) -> float:
        return max(self.samples) * 1e3

    def spread(self) -> str:
        """``median (min-max)`` in ms, for detail tables."""
        return f"{fmt_ms(self.median_ms)} ({fmt_ms(self.min_ms)}–{fmt_ms(self.max_ms)})"


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Clock of :func:`timed_call`: ``"wall"`` (``time.perf_counter``, default) or
#: ``"process"`` (``time.process_time``: CPU seconds of this process, all threads
#: summed; with ``--threads 1`` on a shared machine it leaves out the time spent
#: waiting for a core). Set by ``python -m benchmarks --clock``.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}
clock: list[str] = ["wall"]


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run ``fn`` once and return ``(result, seconds)``, synchronizing the device."""
    now = CLOCKS[clock[0]]
    sync(device)
    start = now()
    out = fn()
    sync(device)
    return out, now() - start


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    warmed: Collection[str] = (),
) -> dict[str, Timing]:
    """Time several variants of the same computation, interleaved.

    Each round calls every variant once; round ``r`` starts at variant ``r mod len``
    so that no variant always runs right after the same neighbour. Results are
    dropped before the next call (their memory is freed, as in a training loop).

    Args:
        fns: name -> zero-argument callable.
        device: device to synchronize.
        repeats: timed rounds (>= 1).
        warmup: untimed calls per variant before timing.
        warmed: variants the caller has already run once (e.g. to check results or
            to compile them); they get one warm-up call fewer.

    Returns:
        name -> :class:`Timing` with ``repeats`` samples.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats=}")
    items = list(fns.items())
    for name, fn in items:
        for _ in range(warmup - (name in warmed)):
            timed_call(fn, device)
    samples: dict[str, list[float]] = {name: [] for name, _ in items}
    for r in range(repeats):
        shift = r % len(items)
        for name, fn in items[shift:] + items[:shift]:
            gc.collect()
            out, seconds = timed_call(fn, device)
            del out
            samples[name].append(seconds)
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return rev + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: torch.device) -> dict[str, str]:
    """A description of the machine, for the header of RESULTS.md.

    Returns:
        Ordered ``label -> value`` strings: CPU model (from ``/proc/cpuinfo``), core
        counts, torch threads, torch version, device name, Python, OS, load average.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        device_name = f"{torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    else:
        device_name = f"CPU ({_cpu_model()})"
    info = {
        "CPU": _cpu_model(),
        "CPU cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "torch threads": f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
        "torch": torch.__version__,
        "device": device_name,
        "GPU": (f"{torch.cuda.device_count()} CUDA device(s) available" + ("" if device.type == "cuda" else
                ", not used by this run (pass --device cuda)") if torch.cuda.is_available() else
                "none available to this run (torch.cuda.is_available() is False), so there are no CUDA "
                "numbers; `python -m benchmarks --device cuda --write-results` produces them on a GPU machine"),
        "Python": platform.python_version(),
        "OS": platform.platform(),
        "git": _git_revision(),
    }
    if hasattr(os, "getloadavg"):
        info["load average at start"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "—"
    if ms >= 100:
        return f"{ms:,.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def fmt_ratio(num: Optional[float], den: Optional[float]) -> str:
    if num is None or den is None or den <= 0:
        return "—"
    return f"{num / den:.2f}x"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    """A GitHub markdown table. ``align``: one char per column, ``l`` or ``r``."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def profile_ops(fn: Callable[[], Any], device: torch.device, *, row_limit: int = 15,
                warmup: bool = True) -> dict[str, Any]:
    """Run ``fn`` once under ``torch.profiler`` (after one warm-up call if ``warmup``).

    Args:
        fn: zero-argument callable.
        device: adds CUDA activity and a device-time table on ``cuda``.
        row_limit: rows per table.

    Returns:
        ``{"cpu_table": str, "device_table": str or None, "self_cpu_us": {op: us},
        "calls": {op: count}, "total_self_cpu_us": float}``; tables are
        ``torch.profiler`` text tables sorted by self CPU (resp. device) time.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    if warmup:
        timed_call(fn, device)
    with profile(activities=activities) as prof:
        timed_call(fn, device)
    averages = prof.key_averages()
    result: dict[str, Any] = {
        "cpu_table": averages.table(sort_by="self_cpu_time_total", row_limit=row_limit),
        "device_table": None,
        "self_cpu_us": {e.key: e.self_cpu_time_total for e in averages},
        "calls": {e.key: e.count for e in averages},
    }
    result["total_self_cpu_us"] = sum(result["self_cpu_us"].values())
    if device.type == "cuda":
        for key in ("self_device_time_total", "self_cuda_time_total"):
            try:
                result["device_table"] = averages.table(sort_by=key, row_limit=row_limit)
                break
            except (AttributeError, KeyError, ValueError, TypeError):
                continue
    return result


#: What to import to use rigl-torch: its scheduler module, not just the package.
#: rigl-torch 0.5.2's ``rigl_torch/RigL.py`` imports ``rigl_torch/util.py``, which imports
#: torchvision, so without torchvision ``import rigl_torch`` works and ``rigl_torch.RigL``
#: does not.
RIGL_TORCH = "rigl_torch.RigL"


def optional_import(name: str) -> tuple[Any, Optional[str]]:
    """``(module, None)`` or ``(None, "skipped: <why>")``.

    Benchmarks that compare against rigl-torch or build torchvision models use it so
    that a missing package yields a ``skipped: ...`` cell instead of a crash. Import the
    module that is actually used (``RIGL_TORCH`` for rigl-torch): a package can import
    while one of its modules needs a dependency that is missing, and the reason then
    names that dependency.

    Example:
        >>> optional_import("math")[1] is None
        True
        >>> optional_import("surely_not_installed_xyz")[1]
        'skipped: surely_not_installed_xyz not installed (ModuleNotFoundError)'
    """
    import importlib

    try:
        return importlib.import_module(name), None
    except ImportError as err:  # ModuleNotFoundError, or a broken install
        missing = getattr(err, "name", None)
        top = name.split(".")[0]
        if isinstance(err, ModuleNotFoundError) and missing and missing.split(".")[0] != top:
            hint = " (README: install torchvision with --no-deps)" if missing.split(".")[0] == "torchvision" else ""
            return None, f"skipped: {name} needs {missing}, which is not installed{hint}"
        return None, f"skipped: {name} not installed ({type(err).__name__})"


def save_plot(draw: Callable[[Any], None], path: "os.PathLike[str] | str", *, enabled: bool = True) -> str:
    """Draw a matplotlib figure with ``draw(plt)`` and save it to ``path``.

    Args:
        draw: callable receiving ``matplotlib.pyplot``; it creates the figure.
        path: PNG file to write.
        enabled: ``False`` (e.g. smoke runs) skips drawing.

    Returns:
        A markdown line: an image link relative to ``benchmarks/`` or a note saying
        why there is no plot (matplotlib absent, disabled).
    """
    if not enabled:
        return "_(plot not drawn in this run)_"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "_(no plot: matplotlib is not installed)_"
    draw(plt)
    plt.tight_layout()
    plt.savefig(path, dpi=110)
    plt.close("all")
    return f"![{os.path.basename(path)}]({os.path.basename(path)})"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def set_scheduler_step(sched: Any, calls_done: int) -> None:
    """Benchmark-only: put a ``rigl_func.RigLScheduler`` at ``calls_done`` calls, so that
    its next call is iteration ``calls_done + 1`` (e.g. ``delta - 1`` -> an update step).

    Rewrites the shell's counters and ``state.step``; masks and accumulators stay as
    they are (their values do not change the cost of a step).
    """
    sched._step = calls_done
    sched._state = sched._state._replace(step=torch.full_like(sched._state.step, calls_done))
    sched._refresh()

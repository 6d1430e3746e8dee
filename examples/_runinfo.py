"""Thread count and run description shared by the example scripts.

The example models are small (thousands to a few hundred thousand weights): their
matmuls and convolutions are far too short to gain from several intra-op threads, and
an OpenMP team of N threads *spin-waits* for its slowest member, so when other programs
share the cores a multi-threaded step can be 10-20x slower than a one-thread step (a
2-core machine with other load: ``compare_criteria.py`` took 902 s with torch's default
threads, 134 s with one thread, same numbers). So every example takes ``--threads``,
**default 1**, applied with ``torch.set_num_threads`` before any work starts;
``--threads 0`` keeps torch's own default (the ``OMP_NUM_THREADS`` environment variable,
else one thread per core). The examples that spread runs over worker processes
(``--jobs``) give each worker ``--threads`` threads.

Every example prints one line saying what it ran with (torch version, device, threads),
and every ``results.json`` stores the same as ``"environment"``: results move a little
across torch versions and thread counts (floating-point summation order), so a number
without them cannot be compared.

Example:
    >>> import argparse, torch
    >>> parser = argparse.ArgumentParser()
    >>> add_threads_argument(parser)
    >>> args = parser.parse_args(["--threads", "1"])
    >>> apply_threads(args.threads)
    1
    >>> info = run_info("cpu", jobs=1)
    >>> info["threads"], info["jobs"], info["torch"] == torch.__version__
    (1, 1, True)
"""

from __future__ import annotations

import argparse
import os
import platform
from typing import Any, Union

import torch

__all__ = ["add_threads_argument", "apply_threads", "run_info", "describe"]

THREADS_HELP = ("torch intra-op threads, set before any work starts (default 1: these models are small, and one "
                "thread does not collapse when other programs share the cores; 0: torch's default, i.e. "
                "OMP_NUM_THREADS or one per core)")


def add_threads_argument(parser: argparse.ArgumentParser, default: int = 1) -> None:
    """Adds ``--threads`` (an int >= 0, ``default`` 1) to ``parser``."""
    parser.add_argument("--threads", type=int, default=default, help=THREADS_HELP)


def apply_threads(threads: int) -> int:
    """``torch.set_num_threads(threads)`` unless ``threads == 0`` (torch's default kept).

    Args:
        threads: intra-op threads, >= 0.

    Returns:
        The thread count torch now uses.

    Raises:
        ValueError: ``threads`` is negative or not an int.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"--threads must be an integer >= 0 (0: torch's default), got threads={threads!r}")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def run_info(device: Union[str, torch.device], jobs: int = 1, threads: Union[int, None] = None) -> dict[str, Any]:
    """What a run ran with, for its printout and its ``results.json``.

    Args:
        device: the device the run trains on.
        jobs: worker processes (each with ``threads`` threads).
        threads: threads per process (default: ``torch.get_num_threads()`` now).

    Returns:
        ``{"torch", "device", "threads", "jobs", "OMP_NUM_THREADS", "cpu", "cpu_cores", "python"}``.
    """
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    return {
        "torch": torch.__version__,
        "device": f"{device} ({name})",
        "threads": torch.get_num_threads() if threads is None else threads,
        "jobs": jobs,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
    }


def describe(info: dict[str, Any]) -> str:
    """One line for the console: ``torch 2.14.1, device cpu (...), 1 thread x 2 worker processes``."""
    threads = f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}"
    jobs = f" x {info['jobs']} worker processes" if info.get("jobs", 1) > 1 else ""
    return f"torch {info['torch']}, device {info['device']}, {threads}{jobs} (--threads; {info['cpu_cores']} cores)"

"""Timeouts for the tests that start processes: hang guards, never speed checks.

Each timeout is a generous base (several times the slowest run seen on a loaded
2-core machine) times ``RIGL_FUNC_TEST_TIMEOUT_SCALE`` (default 1; raise it on a slow
or shared machine, e.g. ``RIGL_FUNC_TEST_TIMEOUT_SCALE=4 pytest``). No test asserts
on wall-clock time: a run that is merely slow passes.
"""

from __future__ import annotations

import os

__all__ = ["timeout_s"]


def timeout_s(base: float) -> float:
    """``base`` seconds times ``RIGL_FUNC_TEST_TIMEOUT_SCALE`` (a positive float)."""
    raw = os.environ.get("RIGL_FUNC_TEST_TIMEOUT_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        scale = float("nan")
    if not scale > 0:
        raise ValueError(f"RIGL_FUNC_TEST_TIMEOUT_SCALE must be a positive number, got {raw!r}")
    return base * scale

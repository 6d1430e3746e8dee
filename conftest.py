"""Root pytest configuration: what ``python -m pytest`` cannot collect on this install.

``--doctest-modules`` imports every module of ``rigl_func``; a module whose optional
dependency is missing (``rigl_func/triton_block_sparse.py`` needs Triton, which CPU builds
of torch do not ship) is left out of collection here, and the header of the run says so,
instead of an import error that stops the whole session. Its tests skip with a reason in
``tests/``.
"""

from __future__ import annotations

import importlib.util

#: module -> the package it needs (doctest collection only).
OPTIONAL = {"rigl_func/triton_block_sparse.py": "triton"}

collect_ignore = [path for path, dep in OPTIONAL.items() if importlib.util.find_spec(dep) is None]


def pytest_report_header(config):
    return [f"not collected (doctests): {path}: needs {OPTIONAL[path]}, not installed" for path in collect_ignore]

"""Benchmarks of rigl_func: ``python -m benchmarks [--smoke]`` from the repository root.

Each benchmark is a module with ``NAME``, ``TITLE`` and ``run(ctx, log) ->
Section`` (see :mod:`benchmarks.common`); :mod:`benchmarks.__main__` lists them in
``BENCHMARKS`` and writes their sections into ``benchmarks/RESULTS.md``. To add one
(training-step overhead, vmap ensembles, memory, rigl-torch comparison), write
``benchmarks/<name>.py`` with those three names and add it to ``BENCHMARKS``.
"""

from __future__ import annotations

__all__: list[str] = []

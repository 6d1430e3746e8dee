"""Benchmarks of rigl_func: ``python -m benchmarks [--smoke | --write-results]`` from the repository root.

Each benchmark is a module with ``NAME``, ``TITLE`` and ``run(ctx, log) ->
Section`` (see :mod:`benchmarks.common`); :mod:`benchmarks.__main__` lists them in
``BENCHMARKS`` and writes their sections into ``benchmarks/RESULTS.md``:
``topology`` (update_topology vs a topk floor), ``rigl_torch`` (one update step vs
rigl-torch 0.5.2), ``train_step`` (training-step overhead vs dense), ``vmap``
(vmapped ensembles vs a loop) and ``memory`` (bytes per sparse weight). To add one,
write ``benchmarks/<name>.py`` with those three names and add it to ``_MODULES``.
"""

from __future__ import annotations

__all__: list[str] = []

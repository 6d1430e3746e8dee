"""Shared test fixtures: the ``device`` parametrization and the hypothesis profiles.

* ``device``: every test that takes it runs once per available device (``cpu``
  always, ``cuda`` wherever ``torch.cuda.is_available()``). It is session-scoped so
  that hypothesis ``@given`` tests can use it (hypothesis rejects function-scoped
  fixtures, which would not be reset between examples).
* Hypothesis profiles: ``rigl_func`` (default; no deadline, modest example counts so
  the suite stays fast on a 2-core CPU) and ``thorough`` (many more examples). Pick one
  with ``HYPOTHESIS_PROFILE=thorough pytest tests``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

settings.register_profile(
    "rigl_func",
    deadline=None,
    max_examples=50,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=500,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "rigl_func"))


@pytest.fixture(scope="session", params=DEVICES)
def device(request) -> torch.device:
    """A device to create tensors on: ``cpu``, plus ``cuda`` when available."""
    return torch.device(request.param)


class CountingBackend:
    """A torch.compile backend that counts graph compilations around a named inner
    backend. Every (re)compilation calls it once; works on torch 2.4 and later."""

    def __init__(self, name: str):
        from torch._dynamo.backends.registry import lookup_backend

        self.inner = lookup_backend(name)
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.calls += 1
        return self.inner(gm, example_inputs)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

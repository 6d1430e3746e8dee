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


def t_(values, device, dtype=torch.float32) -> torch.Tensor:
    """Float tensor literal on ``device``."""
    return torch.tensor(values, dtype=dtype, device=device)


def m_(bits, device) -> torch.Tensor:
    """Mask literal: nested lists of 0/1 -> bool tensor on ``device``."""
    return torch.tensor(bits, dtype=torch.bool, device=device)


def clone_tree(tree):
    """Deep copy of the tensor leaves of a pytree (to check inputs are not mutated)."""
    return torch.utils._pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def same_tree(a, b) -> bool:
    """Trees equal leaf by leaf: same structure, dtypes, shapes, devices and values
    (NaN counts as equal to NaN)."""
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or x.device != y.device:
                return False
            if not torch.equal(x, y) and not (x.is_floating_point() and torch.allclose(x, y, rtol=0, atol=0, equal_nan=True)):
                return False
        elif x != y:
            return False
    return True


def stack_trees(trees):
    """Stack K pytrees with the same structure leaf by leaf (``vmap`` inputs)."""
    flats = [torch.utils._pytree.tree_flatten(t) for t in trees]
    spec = flats[0][1]
    assert all(f[1] == spec for f in flats)
    return torch.utils._pytree.tree_unflatten([torch.stack(xs) for xs in zip(*(f[0] for f in flats))], spec)


def index_tree(tree, i):
    """Row ``i`` of every leaf of a stacked pytree."""
    leaves, spec = torch.utils._pytree.tree_flatten(tree)
    return torch.utils._pytree.tree_unflatten([x[i] for x in leaves], spec)


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_trees_equal(a, b, *, bitwise: bool = False) -> None:
    """Same structure, dtypes, shapes and values (``torch.equal``); with ``bitwise`` the
    raw bits of float leaves are compared (NaN payloads and ``-0.0`` count)."""
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        if bitwise and x.is_floating_point():
            x, y = x.view(_INT_VIEW[x.element_size()]), y.view(_INT_VIEW[y.element_size()])
        assert torch.equal(x, y)


@pytest.fixture
def no_batched_dtype_view(monkeypatch):
    """Emulates torch releases (2.11) where ``Tensor.view(dtype)`` has no vmap batching rule."""
    real_view = torch.Tensor.view

    def view(self, *args, **kwargs):
        if args and isinstance(args[0], torch.dtype) and torch._C._functorch.is_batchedtensor(self):
            raise RuntimeError("Batching rule not implemented for aten::view.dtype")
        return real_view(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "view", view)

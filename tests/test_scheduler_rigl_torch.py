"""Differential test: RigLScheduler against rigl-torch 0.5.2 itself (issue 3, item 7).

Both schedulers start from the same model and the same masks (ours are copied into
rigl-torch's ``backward_masks``, so the initial random draw does not matter) and see
the same batches. Tanh activations and random data keep weights and gradients free of
ties (no exact zeros among active weights, no equal grow scores), where the two
implementations may legitimately order entries differently. Expected: the same return
value from every call, the same masks and nnz per layer after every update, and the
same weights after every step.

rigl-torch's ``util.py`` imports torchvision only to test ``isinstance`` against
ResNet blocks; when torchvision is absent a placeholder module is put in
``sys.modules`` for the import and removed right after.
"""

from __future__ import annotations

import copy
import sys
import types
from importlib import metadata

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rigl_func import RigLScheduler


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference_scheduler():
    pytest.importorskip("rigl_torch", reason="rigl-torch==0.5.2 (optional extra 'reference') not installed")
    version = metadata.version("rigl-torch")
    if version != "0.5.2":
        pytest.skip(f"differential test is pinned to rigl-torch 0.5.2, found {version}")
    added = []
    try:
        import torchvision  # noqa: F401  (only to know whether a placeholder is needed)
    except ImportError:
        resnet = types.ModuleType("torchvision.models.resnet")
        resnet.BasicBlock = type("BasicBlock", (), {})
        resnet.Bottleneck = type("Bottleneck", (), {})
        models = types.ModuleType("torchvision.models")
        models.resnet = resnet
        tv = types.ModuleType("torchvision")
        tv.models = models
        for name, mod in (("torchvision", tv), ("torchvision.models", models), ("torchvision.models.resnet", resnet)):
            sys.modules[name] = mod
            added.append(name)
    try:
        from rigl_torch.RigL import RigLScheduler as Reference
    finally:
        for name in added:
            del sys.modules[name]
    return Reference


def mlp_tanh() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))


def cnn_tanh() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


def _batch(kind, t):
    g = torch.Generator().manual_seed(7000 + t)
    x = torch.randn(8, 20, generator=g) if kind == "mlp" else torch.randn(4, 3, 8, 8, generator=g)
    return x, torch.randint(0, 5, (x.shape[0],), generator=g)


# (model, ignore_linear_layers, grad_accumulation_n); an MLP with its Linear layers
# ignored would have nothing to sparsify.
CASES = [("mlp", False, 1), ("mlp", False, 3), ("cnn", False, 1), ("cnn", False, 3), ("cnn", True, 1), ("cnn", True, 3)]


@pytest.mark.parametrize("kind,ignore_linear,k", CASES)
def test_matches_rigl_torch(kind, ignore_linear, k):
    Reference = _reference_scheduler()
    torch.manual_seed(0)
    ours_model = mlp_tanh() if kind == "mlp" else cnn_tanh()
    ref_model = copy.deepcopy(ours_model)
    ours_opt = torch.optim.SGD(ours_model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    args = dict(dense_allocation=0.3, T_end=40, sparsity_distribution="uniform", delta=5, alpha=0.3,
                grad_accumulation_n=k, static_topo=False, ignore_linear_layers=ignore_linear)
    ours = RigLScheduler(ours_model, ours_opt, **args)
    ref = Reference(ref_model, ref_opt, **args)

    assert [s > 0 for s in ref.S] == [m is not None for m in ours.backward_masks]  # same dense layers
    ref.backward_masks = [None if m is None else m.clone() for m in ours.backward_masks]
    ref_model.load_state_dict(ours_model.state_dict())

    for t in range(45):
        x, y = _batch(kind, t)
        results = []
        for model, opt, sched in ((ours_model, ours_opt, ours), (ref_model, ref_opt, ref)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            results.append(sched())
            if results[-1]:
                opt.step()
        assert results[0] == results[1], f"step {t + 1}: ours returned {results[0]}, rigl-torch {results[1]}"
        assert ours.step == ref.step and ours.rigl_steps == ref.rigl_steps
        for i, (a, b) in enumerate(zip(ours.backward_masks, ref.backward_masks)):
            assert (a is None) == (b is None)
            if a is not None:
                assert int(a.sum()) == int(b.sum()), f"step {t + 1} layer {i}: nnz differs"
                assert torch.equal(a, b.bool()), f"step {t + 1} layer {i}: masks differ"
        for (name, p), q in zip(ours_model.state_dict().items(), ref_model.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"step {t + 1}: {name} differs")
    assert ours.rigl_steps == 7  # updates at 5, 10, ..., 35

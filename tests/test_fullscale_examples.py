"""Smoke tests of the full-scale scripts on FakeData: exact sparsity, real topology
updates, and checkpoint + resume that continues bit for bit on the CPU.

Each script runs 6 steps of a 1-epoch, 8-step schedule (``T_end = 6``, ``delta = 2``:
updates at steps 2 and 4), then again as 3 steps + ``--resume`` to step 6; the two
final checkpoints must be identical (weights, BN buffers, momentum, masks, counters).
"""

from __future__ import annotations

import math

import pytest
import torch

import rigl_func as rf
from rigl_func.checkpoint import load_checkpoint

pytest.importorskip("torchvision", reason="torchvision not installed (the 'vision' extra, with a torchvision matching your torch): full-scale scripts not smoke-tested")

from conftest import EXAMPLES, load_example as _load  # noqa: E402  (shared test helper)


COMMON = ["--fake-data", "--batch-size", "4", "--fake-size", "32", "--fake-val-size", "4", "--epochs", "1",
          "--log-every", "100", "--checkpoint-every", "1000", "--seed", "0"]
# name: (flags, steps of the first half of the split run, RigL updates in 6 steps).
# 8 steps in the epoch, T_end = int(0.75 * 8) = 6. WRN: delta 2 -> updates at 2 and 4, split
# after 3. ResNet-50 (its updates dominate the test time): delta 3 -> one update at 3, split after 2.
SCRIPTS = {
    "cifar10_wrn": (["--depth", "10", "--width", "1", "--sparsity", "0.9", "--delta", "2"], 3, 2),
    "imagenet_resnet50": (["--image-size", "32", "--num-classes", "10", "--sparsity", "0.9", "--delta", "3"], 2, 1),
}
WRN = COMMON + SCRIPTS["cifar10_wrn"][0]


def _flat(ck: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint that must match after a resume."""
    out = {f"model/{k}": v for k, v in ck["model"].items()}
    for pid, st in ck["optimizer"]["state"].items():
        out[f"momentum/{pid}"] = st["momentum_buffer"]
    out.update({f"mask/{k}": v for k, v in ck["pruner"]["masks"].items()})
    return out


@pytest.fixture(scope="module", params=sorted(SCRIPTS))
def runs(request, tmp_path_factory):
    """(script name, expected updates, result of the straight 6-step run, its checkpoint, the resumed one's)."""
    torch.set_num_threads(1)
    name = request.param
    flags, half, updates = SCRIPTS[name]
    main = _load(name).main
    base = COMMON + flags
    straight, split = tmp_path_factory.mktemp(f"{name}_straight"), tmp_path_factory.mktemp(f"{name}_split")
    result = main(base + ["--max-steps", "6", "--out", str(straight)])
    first = main(base + ["--max-steps", str(half), "--out", str(split)])
    assert first["step"] == half and first["pruner"].rigl_steps < updates  # an update comes after the split
    first["pruner"].remove()
    resumed = main(base + ["--max-steps", "6", "--out", str(split), "--resume", str(split / "checkpoint.pt")])
    assert resumed["step"] == 6
    return (name, updates, result, load_checkpoint(straight / "checkpoint.pt"),
            load_checkpoint(split / "checkpoint.pt"))


def test_sparsity_is_exact_and_masked_weights_are_zero(runs):
    name, _, result, _, _ = runs
    pruner, model = result["pruner"], result["model"]
    params = dict(model.named_parameters())
    masks = pruner.state.masks
    assert masks, "no sparse layer"
    for layer, s, numel in zip(pruner.layer_names, pruner.S, pruner.N):
        if layer not in masks:
            assert s == 0.0
            continue
        mask, w = masks[layer], params[layer]
        assert int(mask.sum()) == rf.nnz_for(numel, s)
        assert torch.all(w[~mask] == 0)
        assert int((w != 0).sum()) <= int(mask.sum())
    if name == "imagenet_resnet50":
        # uniform 90%, first layer (conv1) dense, all others numel - floor(0.9 * numel) by hand
        assert "conv1.weight" not in masks and len(masks) == len(pruner.layer_names) - 1
        for layer, mask in masks.items():
            assert int(mask.sum()) == max(1, mask.numel() - math.floor((1 - 0.1) * mask.numel())), layer
    total = sum(pruner.N)
    active = sum(int(masks[n].sum()) if n in masks else numel for n, numel in zip(pruner.layer_names, pruner.N))
    assert abs(active / total - 0.1) < 0.01
    assert result["top1"] is not None and 0.0 <= result["top1"] <= 1.0


def test_topology_was_updated(runs):
    _, updates, result, _, _ = runs
    pruner = result["pruner"]
    assert pruner.step == 6 and pruner.rigl_steps == updates
    initial = rf.init_state(result["model"], pruner.config, seed=0).masks
    changed = [n for n, m in pruner.state.masks.items() if not torch.equal(m, initial[n])]
    assert changed, "no mask changed: the RigL updates did nothing"
    for n, m in pruner.state.masks.items():  # nnz is conserved by every update
        assert int(m.sum()) == int(initial[n].sum())


def test_resume_is_bitwise_identical(runs):
    _, updates, _, straight, resumed = runs
    assert straight["step"] == resumed["step"] == 6
    assert straight["pruner"]["rigl_steps"] == resumed["pruner"]["rigl_steps"] == updates
    a, b = _flat(straight), _flat(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs from the straight run in {different[:5]}"


def test_resume_with_other_flags_is_refused(tmp_path):
    main = _load("cifar10_wrn").main
    main(WRN + ["--max-steps", "1", "--no-eval", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="sparsity"):
        main(WRN + ["--sparsity", "0.8", "--max-steps", "2", "--out", str(tmp_path),
                          "--resume", str(tmp_path / "checkpoint.pt")])


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--sparsity", "1.0"), ("--max-steps", "-1")])
def test_bad_flags_raise_value_error_naming_them(tmp_path, flag, value):
    main = _load("cifar10_wrn").main
    with pytest.raises(ValueError, match=flag):
        main(WRN + [flag, value, "--out", str(tmp_path)])


def test_static_method_keeps_masks(tmp_path):
    out = _load("cifar10_wrn").main(WRN + ["--method", "static", "--max-steps", "4", "--no-eval",
                                          "--out", str(tmp_path)])
    pruner = out["pruner"]
    initial = rf.init_state(out["model"], pruner.config, seed=0).masks
    assert pruner.rigl_steps == 0
    assert all(torch.equal(m, initial[n]) for n, m in pruner.state.masks.items())


@pytest.mark.parametrize("name", ["_fullscale", "cifar10_wrn", "imagenet_resnet50"])
def test_docstring_examples(name):
    # examples/ is outside pytest's doctest paths; run them here (WRN-22-2 parameter count,
    # the LR schedules, the seeded data order).
    import doctest
    import importlib
    import sys

    if str(EXAMPLES) not in sys.path:  # the scripts import _fullscale from their own folder
        sys.path.insert(0, str(EXAMPLES))
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_wrn_22_2_parameter_count():
    # By hand: stem 432; group 1 (16->32) 14,432 + 2 x 18,560; group 2 (32->64) 57,536 + 2 x 73,984;
    # group 3 (64->128) 229,760 + 2 x 295,424; final BN 256; fc 1,290  ->  1,079,642 (~1.1M).
    net = _load("cifar10_wrn").WideResNet(22, 2)
    assert sum(p.numel() for p in net.parameters()) == 1_079_642
    # stem + 9 blocks x 2 convs + 3 shortcut 1x1 convs (one per group: the width changes in each)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 1 + 18 + 3

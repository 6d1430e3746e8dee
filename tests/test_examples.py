"""The examples run (tiny settings) and learn: they are documentation that cannot rot."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_functional_step_learns():
    # 4 classes: chance is 0.25; the sparse MLP must beat it clearly in 150 steps.
    acc = _load("functional_step").main(steps=150, seed=0)
    assert acc > 0.6


def test_rigl_torch_style_script_runs():
    out = subprocess.run([sys.executable, str(EXAMPLES / "rigl_torch_style.py"), "--steps", "20"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RigLScheduler" in out.stdout or "step" in out.stdout


def test_train_mnist1d_smoke(tmp_path):
    pytest.importorskip("mnist1d", reason="mnist1d (examples extra) not installed: main demo not smoke-tested")
    pytest.importorskip("tqdm", reason="tqdm (examples extra) not installed")
    pytest.importorskip("matplotlib", reason="matplotlib (examples extra) not installed")
    runs = _load("train_mnist1d").main(["--smoke", "--out", str(tmp_path)])
    assert {r["method"] for r in runs} == {"dense", "static", "set", "rigl", "rigl-erk"}
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "results.md").exists()
    for r in runs:
        if r["method"] != "dense":
            assert abs(r["density"] - 0.1) < 0.02

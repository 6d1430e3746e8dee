"""Smoke test of the GPU check (issue 11) on the CPU: ``python -m benchmarks.gpu --device cpu
--quick`` runs every code path on tiny sizes and writes a report with the expected
sections; ``benchmarks/gpu_check.sh`` parses; the committed wheels are small and not
ignored by git. No timing is asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _timeouts import timeout_s

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RIGL_TORCH, optional_import  # noqa: E402

# The README's install has no torchvision (and so no usable rigl-torch 0.5.2, whose
# rigl_torch/util.py imports it): the report must then say "skipped: <why>" in those rows
# and still have every section, with no failed stage.
TORCHVISION = optional_import("torchvision")[0] is not None
RIGL_TORCH_OK = optional_import(RIGL_TORCH)[0] is not None

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
WHEELS = ROOT / "benchmarks" / "wheels"


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_quick")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout_s(900))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_quick_report_has_every_section(quick_report):
    text = (quick_report / "gpu_report.md").read_text()
    for heading in ("# rigl_func GPU check", "## Environment", "## One topology update", "## Same-model update step",
                    "## Training-step overhead vs dense", "## Errors and skips"):
        assert heading in text, heading
    assert "_(not reached in this run)_" not in text
    assert "torch.__version__" in text and "torch.cuda.get_device_name()" in text
    for row in ("rigl_func update_topology (eager)", "floor: one sort of all entries", "floor: one topk over all",
                "floor: per-layer", "torch.compile fullgraph", "CUDA graph replay", "rigl_func RigLScheduler() shell",
                "| dense |", "| functional |", "| rigl-torch |", "| rigl-torch 0.5.2 RigLScheduler() (update step"):
        assert row in text, row
    assert "skipped: CUDA graphs need a CUDA device" in text
    assert "stage failed" not in text, text[text.index("## Errors and skips"):]
    rigl_torch_rows = [line for line in text.splitlines() if line.startswith("| ") and "rigl-torch" in line]
    # the same-model update, the MLP's training step and, with torchvision, ResNet-18's
    assert len(rigl_torch_rows) == 2 + TORCHVISION, rigl_torch_rows
    for line in rigl_torch_rows:
        skipped = "skipped: rigl_torch.RigL needs torchvision, which is not installed" in line
        assert skipped is not RIGL_TORCH_OK, line
    resnet = [line for line in text.splitlines() if line.startswith("| ResNet-18")]
    assert resnet and all(("skipped: torchvision not installed" in line) is not TORCHVISION for line in resnet), resnet


def test_quick_report_json(quick_report):
    data = json.loads((quick_report / "gpu_report.json").read_text())
    assert {"environment", "topology", "same_model", "training", "notes", "stage_s"} <= set(data)
    eager = [r for r in data["topology"] if r["variant"] == "rigl_func update_topology (eager)"]
    assert {r["config"] for r in eager} == {"uniform", "erk"}
    assert all(r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in eager)
    compiled = [r for r in data["topology"] if "torch.compile" in r["variant"]]
    assert compiled and all("compiled == eager: yes" in r["note"] for r in compiled), compiled
    dense = [r for r in data["training"] if r["variant"] == "dense"]
    assert len(dense) == (2 if TORCHVISION else 1) and all(r["median_ms"] > 0 for r in dense)  # ResNet-18, MLP
    rigl_torch = [r for r in data["training"] if r["variant"] == "rigl-torch"]
    assert [("median_ms" in r) for r in rigl_torch] == [RIGL_TORCH_OK] * len(dense), rigl_torch


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=timeout_s(120))
    assert proc.returncode == 0, proc.stderr
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "tests/test_cuda.py" in text and "-m benchmarks.gpu" in text and "--no-index" in text


def test_gpu_check_script_usage_error():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=timeout_s(120))
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_wheels_are_small_and_not_ignored():
    wheels = sorted(WHEELS.glob("*.whl"))
    assert sum(w.stat().st_size for w in wheels) < 1_000_000
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for wheel in wheels:
        ignored = subprocess.run(["git", "check-ignore", "-q", str(wheel)], cwd=ROOT, timeout=timeout_s(120))
        assert ignored.returncode == 1, f"{wheel.name} is ignored by .gitignore"

"""Examples say what they ran with (issue 19): ``--threads`` (default 1) is applied before any
work, the run prints the torch version, device and threads, and every ``results.json`` records
them (``"environment"``). Results move with the torch version and thread count (summation
order), so a stored number without them cannot be compared."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_example


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_apply_threads_sets_and_validates(keep_threads):
    runinfo = load_example("_runinfo")
    assert runinfo.apply_threads(1) == 1 == torch.get_num_threads()
    torch.set_num_threads(2)
    assert runinfo.apply_threads(0) == 2  # 0: torch's own default kept
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="--threads must be an integer >= 0"):
            runinfo.apply_threads(bad)
    info = runinfo.run_info("cpu", jobs=2, threads=1)
    assert info["torch"] == torch.__version__ and info["threads"] == 1 and info["device"].startswith("cpu")
    assert runinfo.describe(info).startswith(f"torch {torch.__version__}, device cpu") and "1 thread x 2" in \
        runinfo.describe(info)


def _check_environment(env: dict, threads: int) -> None:
    assert env["torch"] == torch.__version__ and env["threads"] == threads and env["device"].startswith("cpu")
    assert {"jobs", "OMP_NUM_THREADS", "cpu", "cpu_cores", "python"} <= set(env)


def test_demo_results_json_records_torch_threads_device(tmp_path, capsys, keep_threads):
    pytest.importorskip("mnist1d", reason="mnist1d (examples extra) not installed")
    pytest.importorskip("tqdm", reason="tqdm (examples extra) not installed")
    pytest.importorskip("matplotlib", reason="matplotlib (examples extra) not installed")
    torch.set_num_threads(2)
    demo = load_example("train_mnist1d")
    demo.main(["--smoke", "--methods", "rigl", "--out", str(tmp_path)])
    assert torch.get_num_threads() == 2  # restored after the run
    printed = capsys.readouterr().out
    assert f"torch {torch.__version__}, device cpu" in printed and "1 thread" in printed
    _check_environment(json.loads((tmp_path / "results.json").read_text())["environment"], threads=1)


def test_reproduce_records_the_environment_of_every_run(tmp_path, keep_threads):
    for name in ("mnist1d", "tqdm", "matplotlib"):
        pytest.importorskip(name, reason=f"{name} (examples extra) not installed")
    study = load_example("reproduce")
    study.main(["--smoke", "--combos", "mnist1d-cnn", "--methods", "rigl", "--out", str(tmp_path)])
    stored = json.loads((tmp_path / "results.json").read_text())
    _check_environment(stored["environment"], threads=1)
    assert stored["runs"] and all(r["environment"] == stored["environment"] for r in stored["runs"])

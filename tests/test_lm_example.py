"""The byte-level GPT example (``examples/train_lm.py``): its smoke run, its sparse set, and
``tx.step_ensemble`` on the LM equal to a loop of ``tx.step``."""

from __future__ import annotations

import importlib
import math
import re
import sys
import warnings

import pytest
import torch
from torch.func import grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import rigl_func as rf
from conftest import EXAMPLES, assert_trees_equal

sys.path.insert(0, str(EXAMPLES))  # a real import (not load_example): its dataclass needs sys.modules
lm = importlib.import_module("train_lm")


def test_corpus_is_fixed_and_disjoint():
    data = lm.corpus()
    assert not set(lm.TRAIN_MODULES) & set(lm.VAL_MODULES)
    assert list(lm.TRAIN_MODULES) == sorted(lm.TRAIN_MODULES) and list(lm.VAL_MODULES) == sorted(lm.VAL_MODULES)
    assert data["train"].dtype == torch.uint8 and len(data["train"]) > 1_000_000 and len(data["val"]) > 100_000
    assert data["info"]["train_bytes"] == len(data["train"])


def test_sparse_set_is_attention_and_mlp_only():
    model = lm.GPT(lm.GPTConfig(layers=2, width=32, heads=2, context=16))
    args = lm.parser().parse_args([])
    tx = lm.make_tx("rigl-erk", 0.9, 100, args, model)
    params, state = tx.init(model, seed=0)
    expected = [f"blocks.{i}.{p}.weight" for i in range(2) for p in ("q", "k", "v", "o", "fc1", "fc2")]
    assert list(state.rigl.masks) == expected
    assert "tok.weight" in params and "pos.weight" in params  # dense: embeddings (and the tied head)
    with pytest.raises(Exception, match="method must be one of"):
        lm.parse_method("rigl-b7")


def test_smoke_run_prints_a_rigl_row_with_exact_counts(tmp_path, capsys):
    runs = lm.main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| rigl |")]
    assert len(rows) == 1, out
    assert {r["method"] for r in runs} == {"dense", "rigl"}
    for r in runs:
        assert all(math.isfinite(v) for _, v in r["curve"]) and math.isfinite(r["val_loss"])
        assert r["nnz"] == r["target_nnz"]  # exact nnz per layer
        assert r["bpb"] == pytest.approx(r["val_loss"] / math.log(2))
    rigl = next(r for r in runs if r["method"] == "rigl")
    smoke = lm.GPT(lm.GPTConfig(layers=1, width=64, heads=2, context=32))  # the --smoke model
    numel = {n: p.numel() for n, p in smoke.named_parameters()}
    assert set(rigl["nnz"]) == set(rf.sparse_param_names(smoke))
    assert rigl["sparse_density"] == sum(rigl["target_nnz"].values()) / sum(numel[k] for k in rigl["nnz"])
    assert rigl["density"] == (sum(rigl["nnz"].values()) + sum(numel.values()) - sum(numel[k] for k in rigl["nnz"])) \
        / sum(numel.values())
    assert rigl["sparse_density"] == pytest.approx(0.1, abs=1e-3)
    assert rigl["num_updates"] > 0 and rigl["infer_flops"] < 1.0
    density_cell = rows[0].split("|")[7].strip()
    assert re.fullmatch(r"\d\.\d{3} / 0\.100", density_cell), rows[0]
    for name in ("results.json", "results.md", "val_loss.png", "bpb.png"):
        assert (tmp_path / name).is_file()
    again = lm.main(["--report", str(tmp_path / "results.json"), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "results.md").read_text() == (tmp_path / "results.md").read_text()
    assert [r["train_flops"] for r in again] == [r["train_flops"] for r in runs]


def test_flops_count_attention():
    """The FLOPs columns include attention (counted on SDPA's math path): torch's FlopCounterMode has no
    formula for the fused CPU kernel."""
    cfg = lm.GPTConfig(layers=2, width=32, heads=2, context=16)
    flops = lm.model_flops(lm.GPT(cfg))
    linear = sum(v for k, v in flops.items() if k != "total")  # q, k, v, o, fc1, fc2 (the tied head is not a module)
    head = 2 * cfg.context * cfg.width * cfg.vocab
    attention = cfg.layers * 2 * (2 * cfg.context * cfg.context * cfg.width)  # q k^T and att v, dense T x T
    assert flops["total"] == linear + head + attention


def _ensemble_world(k_models: int = 4):
    cfg = lm.GPTConfig(layers=1, width=32, heads=2, context=16)
    args = lm.parser().parse_args(["--delta", "2", "--lr", "1e-2"])
    inits, model = [], None
    for k in range(k_models):
        torch.manual_seed(k)
        model = lm.GPT(cfg)
        tx = lm.make_tx("rigl", 0.8, 8, args, model)
        inits.append(tx.init(model, seed=k))
    return cfg, model, tx, inits


def test_step_ensemble_on_the_lm_equals_a_loop_of_step_bitwise():
    """K=4 LMs, 7 steps with 2 topology updates: ``tx.step_ensemble`` on the stacked trees equals
    ``tx.step`` per model bit for bit. Both get the same per-model gradients (computed by a loop),
    so the comparison isolates the step; the gradients of ``vmap(grad)`` are compared to tolerance
    below (batched matmuls may sum in another order)."""
    cfg, model, tx, inits = _ensemble_world()
    loss_fn = lm.loss_of(model)
    singles = list(inits)
    params = rf.stack_states([p for p, _ in inits])
    state = rf.stack_states([s for _, s in inits])
    gen = torch.Generator().manual_seed(0)
    data = lm.corpus()["train"][:50_000]
    for _ in range(7):
        batches = [lm.batch_at(data, torch.randint(0, 40_000, (4,), generator=gen), cfg.context) for _ in singles]
        grads = [grad(loss_fn)(p, x, y) for (p, _), (x, y) in zip(singles, batches)]
        singles = [tx.step(p, g, s) for (p, s), g in zip(singles, grads)]
        params, state = tx.step_ensemble(params, rf.stack_states(grads), state)
        for k, (p, s) in enumerate(singles):
            assert_trees_equal(({n: v[k] for n, v in params.items()}, rf.unstack_states(state)[k]), (p, s), bitwise=True)
    assert int(state.rigl.num_updates[0]) == 2  # steps 2 and 4 (t_end = 6)
    assert len({tuple(m.flatten().tolist()) for m in state.rigl.masks["blocks.0.q.weight"]}) == 4


def test_vmapped_lm_gradients_use_the_math_attention_path():
    """``vmap(grad(loss))`` over K=4 LMs inside ``sdpa_kernel(SDPBackend.MATH)``: no "batching rule"
    fallback warning (the fused CPU kernel has none) and the per-model gradients of a loop to 1e-5."""
    cfg, model, _, inits = _ensemble_world()
    loss_fn = lm.loss_of(model)
    params = rf.stack_states([p for p, _ in inits])
    gen = torch.Generator().manual_seed(1)
    data = lm.corpus()["train"][:50_000]
    x, y = lm.batch_at(data, torch.randint(0, 40_000, (16,), generator=gen), cfg.context)
    x, y = x.view(4, 4, -1), y.view(4, 4, -1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        with sdpa_kernel(SDPBackend.MATH):
            batched = vmap(grad(loss_fn))(params, x, y)
    for k, (p, _) in enumerate(inits):
        single = grad(loss_fn)(p, x[k], y[k])
        for n in single:
            torch.testing.assert_close(batched[n][k], single[n], rtol=1e-5, atol=1e-6)


def test_ensemble_mode_matches_separate_runs():
    """``--ensemble`` (K seeds in one ``vmap(grad)`` + ``tx.step_ensemble``) trains the same runs as
    ``train_one`` per seed: same initial weights, masks and batches; exact counts; the same losses to
    float rounding (the vmapped gradients sum in another order)."""
    args = lm.parser().parse_args(["--steps", "60", "--delta", "10", "--layers", "1", "--width", "32", "--heads", "2",
                                   "--context", "16", "--batch-size", "4", "--evals", "2", "--val-windows", "16",
                                   "--seeds", "2"])
    together = lm.train_ensemble("rigl", 0.8, 1, args)
    for seed, run in enumerate(together):
        alone = lm.train_one(("rigl", 0.8, seed, 1), args)
        assert run["seed"] == seed and run["nnz"] == run["target_nnz"] == alone["nnz"]
        assert run["num_updates"] == alone["num_updates"] == 4
        assert run["val_loss"] == pytest.approx(alone["val_loss"], rel=2e-3)

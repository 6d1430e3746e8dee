"""RigLScheduler(grow=...) runs SET and SNFS through the same pure core."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rigl_func import RigLScheduler


def _run(grow: str, seed: int, steps: int = 30, resume_at: int | None = None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=40, delta=5,
                           ignore_linear_layers=False, grow=grow, seed=seed)
    history, grads_seen = [], []
    for t in range(steps):
        g = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads_seen.append({n: p.grad.clone() for n, p in pruner._params.items()})
        old = {n: m.clone() for n, m in pruner.state.masks.items()}
        if pruner():
            opt.step()
        else:
            history.append((old, {n: m.clone() for n, m in pruner.state.masks.items()}))
        if resume_at is not None and t + 1 == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=True)
            pruner.remove()
            torch.manual_seed(123)  # a fresh model with other weights: everything must come from the checkpoint
            model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
            model.load_state_dict(ckpt["model"])
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            opt.load_state_dict(ckpt["opt"])
            pruner = RigLScheduler(model, opt, dense_allocation=0.2, T_end=40, delta=5, ignore_linear_layers=False,
                                   grow=grow, seed=seed, state_dict=ckpt["pruner"])
    return model, pruner, history, grads_seen


@pytest.mark.parametrize("grow", ["random", "ema"])
def test_nnz_constant_and_growth_from_inactive_or_dropped(grow):
    _, pruner, history, _ = _run(grow, seed=1)
    assert pruner.rigl_steps == 6 and len(history) == 6
    for old, new in history:
        for n in old:
            assert int(new[n].sum()) == int(old[n].sum())
    assert any(not torch.equal(o[n], w[n]) for o, w in history for n in o)


def test_set_same_seed_same_masks_other_seed_differs():
    a = _run("random", seed=1)[1].state.masks
    b = _run("random", seed=1)[1].state.masks
    c = _run("random", seed=2)[1].state.masks
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_set_growth_differs_from_rigl_growth():
    rigl = _run("gradient", seed=1)[1].state.masks
    set_ = _run("random", seed=1)[1].state.masks
    assert any(not torch.equal(rigl[n], set_[n]) for n in rigl)


def test_snfs_ema_matches_hand_computation():
    _, pruner, _, grads = _run("ema", seed=1, steps=7)
    beta = pruner.config.ema_momentum
    assert beta == 0.9
    for n, ema in pruner.state.ema.items():
        expected = torch.zeros_like(ema)
        for g in grads:  # dense grads as seen after backward (the hook leaves them dense for SNFS)
            expected = beta * expected + (1 - beta) * g[n]
        torch.testing.assert_close(ema, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("grow", ["random", "ema"])
def test_resume_continues_exactly(grow):
    full_model, full, _, _ = _run(grow, seed=4, steps=23)
    res_model, res, _, _ = _run(grow, seed=4, steps=23, resume_at=12)
    assert all(torch.equal(full.state.masks[n], res.state.masks[n]) for n in full.state.masks)
    assert all(torch.equal(a, b) for a, b in zip(full_model.state_dict().values(), res_model.state_dict().values()))


def test_bad_grow_value():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="grow='bogus'"):
        RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), dense_allocation=0.5, T_end=10,
                      delta=3, grow="bogus")

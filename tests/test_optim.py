"""Tests for rigl_func.optim: optimizer-state hygiene after a topology update.

Rule (RigL, Sec. 3): optimizer moments survive only where a connection was active
before *and* after the update; new connections and inactive positions get 0.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

from rigl_func import mask_torch_optimizer_state_, reset_optimizer_state, reset_torch_optimizer_state_
from conftest import m_ as _m  # shared test helpers

OLD = [[1, 1, 0], [0, 1, 0]]
NEW = [[1, 0, 1], [0, 1, 0]]
# keep = OLD & NEW = [[1, 0, 0], [0, 1, 0]]


class Trace(NamedTuple):
    momentum: dict
    count: torch.Tensor


def test_reset_optimizer_state_nested(device):
    t = torch.arange(1.0, 7.0, device=device).reshape(2, 3)
    b = torch.tensor([7.0, 8.0], device=device)
    state = {
        "momentum": {"w": t, "b": b},
        "adam": ({"w": t * 10}, {"w": t * 100}),
        "step": torch.tensor(3.0, device=device),
        "nested": {"deeper": [{"w": t.double()}]},
        "trace": Trace(momentum={"w": -t}, count=torch.tensor(4, device=device)),
    }
    old, new = {"w": _m(OLD, device)}, {"w": _m(NEW, device)}
    out = reset_optimizer_state(state, old, new)
    assert out["momentum"]["w"].tolist() == [[1.0, 0.0, 0.0], [0.0, 5.0, 0.0]]
    assert out["adam"][0]["w"].tolist() == [[10.0, 0.0, 0.0], [0.0, 50.0, 0.0]]
    assert out["adam"][1]["w"].tolist() == [[100.0, 0.0, 0.0], [0.0, 500.0, 0.0]]
    assert out["nested"]["deeper"][0]["w"].tolist() == [[1.0, 0.0, 0.0], [0.0, 5.0, 0.0]]
    assert out["nested"]["deeper"][0]["w"].dtype == torch.float64
    assert isinstance(out["adam"], tuple) and isinstance(out["nested"]["deeper"], list)
    assert isinstance(out["trace"], Trace)
    assert out["trace"].momentum["w"].tolist() == [[-1.0, 0.0, 0.0], [0.0, -5.0, 0.0]]
    assert out["trace"].count.item() == 4
    assert out["momentum"]["b"].tolist() == [7.0, 8.0]
    assert out["step"].item() == 3.0
    # pure
    assert t.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert state["momentum"]["w"] is t


def test_reset_optimizer_state_key_mismatch():
    m = torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="same keys"):
        reset_optimizer_state({"w": torch.ones(2)}, {"w": m}, {"v": m})


def _model_and_masks(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(device)  # tanh: no dead units
    gen = torch.Generator().manual_seed(1)
    old = {"0.weight": torch.rand(4, 5, generator=gen) < 0.5, "2.weight": torch.rand(3, 4, generator=gen) < 0.5}
    new = {k: v.clone() for k, v in old.items()}
    # move two entries of each layer: one active -> inactive, one inactive -> active
    for k, m in new.items():
        flat = m.view(-1)
        on, off = flat.nonzero()[0].item(), (~flat).nonzero()[0].item()
        flat[on], flat[off] = False, True
    old = {k: v.to(device) for k, v in old.items()}
    new = {k: v.to(device) for k, v in new.items()}
    return model, old, new


def _train(model, opt, device, steps=3):
    gen = torch.Generator().manual_seed(2)  # same data on every device
    x = torch.randn(8, 5, generator=gen).to(device)
    y = torch.randn(8, 3, generator=gen).to(device)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()  # dense grads: state is non-zero everywhere
        opt.step()


@pytest.mark.parametrize(
    "make, keys",
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), ["momentum_buffer"]),
        (lambda p: torch.optim.Adam(p, lr=0.01), ["exp_avg", "exp_avg_sq"]),
        (lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True), ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
    ],
    ids=["sgd-momentum", "adam", "adamw-amsgrad"],
)
def test_reset_torch_optimizer_state(make, keys, device):
    model, old, new = _model_and_masks(device)
    opt = make(model.parameters())
    _train(model, opt, device)
    params = dict(model.named_parameters())
    before = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
              for p in params.values()}
    for name in old:
        for key in keys:
            assert (opt.state[params[name]][key] != 0).all(), "test setup: state should be dense"
    reset_torch_optimizer_state_(opt, params, old, new)
    for name, p in params.items():
        st, st0 = opt.state[p], before[id(p)]
        assert set(st) == set(st0)
        if "step" in st0:  # scalar step untouched
            assert torch.equal(torch.as_tensor(st["step"]), torch.as_tensor(st0["step"]))
        for key in keys:
            if name not in old:
                assert torch.equal(st[key], st0[key]), f"dense {name}.{key} changed"
                continue
            keep = old[name] & new[name]
            assert torch.equal(st[key][keep], st0[key][keep]), f"{name}.{key} changed at kept entries"
            assert not st[key][~keep].any(), f"{name}.{key} not zero at new/inactive entries"
            grown = new[name] & ~old[name]
            assert grown.any() and not st[key][grown].any()
    # the optimizer still steps
    _train(model, opt, device, steps=1)


def test_mask_torch_optimizer_state(device):
    model, old, _ = _model_and_masks(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, device)
    params = dict(model.named_parameters())
    buf0 = {n: opt.state[p]["momentum_buffer"].clone() for n, p in params.items()}
    mask_torch_optimizer_state_(opt, params, old)
    for name, p in params.items():
        buf = opt.state[p]["momentum_buffer"]
        if name in old:
            assert torch.equal(buf[old[name]], buf0[name][old[name]])
            assert not buf[~old[name]].any()
        else:
            assert torch.equal(buf, buf0[name])


def test_torch_optimizer_without_state_and_errors(device):
    model, old, new = _model_and_masks(device)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reset_torch_optimizer_state_(opt, params, old, new)  # no state yet: nothing to do
    assert all(len(opt.state[p]) == 0 for p in params.values())
    with pytest.raises(TypeError, match="optimizer"):
        reset_torch_optimizer_state_({"state": {}}, params, old, new)
    with pytest.raises(ValueError, match="same keys"):
        reset_torch_optimizer_state_(opt, params, old, {"0.weight": new["0.weight"]})

"""Regression tests for issue 12 (user on an H100 with torch 2.11)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import vmap

from conftest import assert_trees_equal as _assert_same, index_tree as _index, stack_trees as _stack  # shared test helpers
from rigl_func import RigLConfig, accumulate, apply_masks, init_state, update_topology








# ---------------------------------------------------------------------------------
# Item 1: vmap with structure="n:m" (``_order_keys`` used a dtype view).

def test_vmap_update_topology_n_m_equals_loop():
    cfg = RigLConfig(t_end=40, delta=5, sparsity=0.5, structure="n:m", n_m=(2, 4), alpha=0.6)
    params, grads, states = [], [], []
    gen = torch.Generator().manual_seed(5)
    for i in range(2):
        torch.manual_seed(10 + i)
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
        p = {k: v.detach().clone() for k, v in model.named_parameters()}
        s = init_state(p, cfg, seed=i)
        p = apply_masks(p, s.masks)
        for _ in range(5):
            g = {k: torch.randn(v.shape, generator=gen) for k, v in p.items()}
            s = accumulate(s, g, cfg)
        params.append(p), grads.append(g), states.append(s)
    out_params, out_state = vmap(update_topology, in_dims=(0, 0, 0, None))(
        _stack(params), _stack(grads), _stack(states), cfg)
    changed = 0
    for i in range(2):
        ref_params, ref_state = update_topology(params[i], grads[i], states[i], cfg)
        _assert_same(_index(out_params, i), ref_params)
        _assert_same(_index(out_state, i), ref_state)
        changed += sum(int((ref_state.masks[n] != states[i].masks[n]).sum()) for n in ref_state.masks)
    assert changed > 0


def test_order_keys_vmap_path_bit_identical():
    """The view-free keys used under vmap equal the dtype-view keys, bit for bit."""
    from rigl_func.selection import _order_keys

    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), float("nan"), -float("nan"),
                            1e-45, -1e-45, 2.0**-126, -2.0**-126, 2.0**-127, 1.1754942e-38,
                            3.4028235e38, -3.4028235e38])
    values = torch.cat([bits.view(torch.float32), special]).reshape(8, -1)
    ref = torch.stack([_order_keys(row) for row in values])
    assert torch.equal(vmap(_order_keys)(values), ref)


def test_vmap_n_m_without_view_dtype_batching_rule(no_batched_dtype_view):
    """Emulates torch releases where ``Tensor.view(dtype)`` has no vmap batching rule."""
    test_vmap_update_topology_n_m_equals_loop()


# ---------------------------------------------------------------------------------
# Item 2: examples/_fullscale.py resume with map_location=cuda (RNG states moved off the CPU).

class _NotOnCpu(torch.Tensor):
    """Stands in for an RNG state that ``torch.load(map_location="cuda")`` moved to the GPU."""

    def cpu(self, *args, **kwargs):
        return torch.Tensor(self).as_subclass(torch.Tensor)


def _strict(real):
    """``torch.set_rng_state`` as it behaves for a state that is not a CPU ByteTensor."""
    def check(state):
        if type(state) is not torch.Tensor or state.device.type != "cpu" or state.dtype != torch.uint8:
            raise TypeError("RNG state must be a torch.ByteTensor")
        return real(state)
    return check


def test_fullscale_set_rng_states_moves_states_to_cpu(monkeypatch):
    import io
    import random

    from conftest import load_example

    fullscale = load_example("_fullscale")
    torch.manual_seed(3)
    random.seed(3)
    buf = io.BytesIO()
    torch.save({"rng": fullscale._rng_states()}, buf)
    buf.seek(0)
    states = torch.load(buf, map_location="cpu", weights_only=False)["rng"]
    expected = (torch.rand(4), random.random())
    states["torch"] = states["torch"].as_subclass(_NotOnCpu)
    cuda_seen = []
    states["cuda"] = [states["torch"].clone().as_subclass(_NotOnCpu)]
    monkeypatch.setattr(torch, "set_rng_state", _strict(torch.set_rng_state))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda ss: cuda_seen.extend(_strict(lambda s: s)(s) for s in ss))
    fullscale._set_rng_states(states)
    assert torch.equal(torch.rand(4), expected[0]) and random.random() == expected[1]
    assert len(cuda_seen) == 1 and type(cuda_seen[0]) is torch.Tensor


# ---------------------------------------------------------------------------------
# Item 3: RigLConfig(delta=1) blamed grad_accumulation_n, which the user never set.

def test_delta_one_error_names_delta():
    with pytest.raises(ValueError, match=r"^delta must be >= 2 .*got delta=1$"):
        RigLConfig(t_end=100, delta=1)
    with pytest.raises(ValueError, match=r"grad_accumulation_n must be in \[1, delta=2\), got grad_accumulation_n=2"):
        RigLConfig(t_end=100, delta=2, grad_accumulation_n=2)
    RigLConfig(t_end=100, delta=2)

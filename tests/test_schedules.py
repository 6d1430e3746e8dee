"""Tests for rigl_func.schedules: drop-fraction goldens and the update-step predicate.

Goldens are worked out by hand from the formulas in the module docstring, with
``p = clip((t - t_start) / (T_end - t_start), 0, 1)``:

* cosine:   alpha/2 * (1 + cos(pi p)); at p = 1/4 that is alpha/2 * (1 + sqrt(2)/2)
* linear:   alpha * (1 - p)
* constant: alpha
"""

from __future__ import annotations

import math

import pytest
import torch

from rigl_func import (
    RigLConfig,
    constant_schedule,
    cosine_schedule,
    drop_fraction,
    in_accumulation_window,
    is_update_step,
    linear_schedule,
)

# (fn, step, alpha, t_end, t_start, expected)
GOLDENS = [
    (cosine_schedule, 0, 0.3, 100, 0, 0.3),
    (cosine_schedule, 25, 0.3, 100, 0, 0.15 * (1 + math.sqrt(2) / 2)),
    (cosine_schedule, 50, 0.3, 100, 0, 0.15),
    (cosine_schedule, 75, 0.3, 100, 0, 0.15 * (1 - math.sqrt(2) / 2)),
    (cosine_schedule, 100, 0.3, 100, 0, 0.0),
    (cosine_schedule, 250, 0.3, 100, 0, 0.0),  # clipped after T_end
    (cosine_schedule, -5, 0.3, 100, 0, 0.3),  # clipped before 0
    (cosine_schedule, 10, 0.4, 100, 20, 0.4),  # before t_start: alpha
    (cosine_schedule, 20, 0.4, 100, 20, 0.4),  # p = 0
    (cosine_schedule, 60, 0.4, 100, 20, 0.2),  # p = 40/80 = 1/2
    (cosine_schedule, 100, 0.4, 100, 20, 0.0),
    (linear_schedule, 0, 0.4, 100, 0, 0.4),
    (linear_schedule, 25, 0.4, 100, 0, 0.3),
    (linear_schedule, 50, 0.4, 100, 0, 0.2),
    (linear_schedule, 100, 0.4, 100, 0, 0.0),
    (linear_schedule, 150, 0.4, 100, 0, 0.0),
    (linear_schedule, 40, 0.4, 100, 20, 0.3),  # p = 20/80 = 1/4
    (linear_schedule, 5, 0.4, 100, 20, 0.4),
    (constant_schedule, 0, 0.3, 100, 0, 0.3),
    (constant_schedule, 70, 0.3, 100, 0, 0.3),
    (constant_schedule, 500, 0.3, 100, 0, 0.3),
    (constant_schedule, 30, 0.25, 100, 20, 0.25),
]


@pytest.mark.parametrize("fn, step, alpha, t_end, t_start, expected", GOLDENS)
def test_schedule_goldens_int(fn, step, alpha, t_end, t_start, expected):
    out = fn(step, alpha, t_end, t_start)
    assert isinstance(out, float)
    assert out == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("fn, step, alpha, t_end, t_start, expected", GOLDENS)
def test_schedule_goldens_tensor(fn, step, alpha, t_end, t_start, expected, device):
    step_t = torch.tensor(step, dtype=torch.int64, device=device)
    out = fn(step_t, alpha, t_end, t_start)
    assert isinstance(out, torch.Tensor)
    assert out.dim() == 0 and out.dtype == torch.float64 and out.device.type == device.type
    assert out.item() == pytest.approx(expected, abs=1e-12)
    # int and tensor paths agree to float64 rounding
    assert out.item() == pytest.approx(fn(step, alpha, t_end, t_start), rel=1e-14, abs=1e-15)


@pytest.mark.parametrize("schedule, expected", [("cosine", 0.15), ("linear", 0.15), ("constant", 0.3)])
def test_drop_fraction_dispatch(schedule, expected, device):
    cfg = RigLConfig(t_end=200, delta=10, alpha=0.3, schedule=schedule)
    assert drop_fraction(100, cfg) == pytest.approx(expected, abs=1e-12)
    assert drop_fraction(torch.tensor(100, device=device), cfg).item() == pytest.approx(expected, abs=1e-12)


def test_drop_fraction_uses_t_start():
    cfg = RigLConfig(t_end=120, delta=10, alpha=0.5, t_start=20, schedule="linear")
    assert drop_fraction(20, cfg) == pytest.approx(0.5)
    assert drop_fraction(70, cfg) == pytest.approx(0.25)  # p = 50/100
    assert drop_fraction(120, cfg) == pytest.approx(0.0)


def test_schedules_are_monotone_non_increasing():
    for fn in (cosine_schedule, linear_schedule, constant_schedule):
        values = [fn(t, 0.3, 100, 10) for t in range(-5, 120)]
        assert all(a >= b for a, b in zip(values, values[1:])), fn.__name__
        assert all(0.0 <= v <= 0.3 + 1e-15 for v in values)


# ---------------------------------------------------------------------------------
# is_update_step

# (config kwargs, steps that are update steps, within range(0, last))
UPDATE_TABLE = [
    (dict(t_end=300, delta=100), [100, 200], 450),
    (dict(t_end=301, delta=100), [100, 200, 300], 450),
    (dict(t_end=10, delta=3), [3, 6, 9], 20),
    (dict(t_end=9, delta=3), [3, 6], 20),
    # with t_start, updates may happen from t_start on: t_start, t_start + delta, ...
    (dict(t_end=50, delta=10, t_start=5), [5, 15, 25, 35, 45], 70),
    (dict(t_end=50, delta=10, t_start=10), [10, 20, 30, 40], 70),
    (dict(t_end=4, delta=2, t_start=0, grad_accumulation_n=1), [2], 10),
]


@pytest.mark.parametrize("kwargs, expected, last", UPDATE_TABLE)
def test_is_update_step_table(kwargs, expected, last, device):
    cfg = RigLConfig(**kwargs)
    got_int = [s for s in range(last) if is_update_step(s, cfg)]
    assert got_int == expected
    for s in range(last):
        out = is_update_step(s, cfg)
        assert type(out) is bool
        out_t = is_update_step(torch.tensor(s, device=device), cfg)
        assert out_t.dim() == 0 and out_t.dtype == torch.bool and out_t.device.type == device.type
        assert bool(out_t) == out


def test_no_update_at_step_zero_even_on_grid():
    cfg = RigLConfig(t_end=100, delta=10)
    assert is_update_step(0, cfg) is False
    assert is_update_step(10, cfg) is True


def test_is_update_step_batched_tensor(device):
    cfg = RigLConfig(t_end=50, delta=10)
    steps = torch.tensor([0, 5, 10, 20, 40, 50, 60], device=device)
    assert is_update_step(steps, cfg).tolist() == [False, False, True, True, True, False, False]


# ---------------------------------------------------------------------------------
# in_accumulation_window: the update step and the grad_accumulation_n - 1 before it.

# (config kwargs, window steps, within range(0, last))
WINDOW_TABLE = [
    (dict(t_end=300, delta=100, grad_accumulation_n=3), [98, 99, 100, 198, 199, 200], 420),
    (dict(t_end=301, delta=100, grad_accumulation_n=2), [99, 100, 199, 200, 299, 300], 420),
    (dict(t_end=100, delta=10, grad_accumulation_n=1), list(range(10, 100, 10)), 130),
    (dict(t_end=8, delta=4, grad_accumulation_n=2), [3, 4], 20),  # 8 is not an update step
    # t_start = 5, delta = 10: updates 5, 15, 25, 35, 45
    (dict(t_end=50, delta=10, t_start=5, grad_accumulation_n=2), [4, 5, 14, 15, 24, 25, 34, 35, 44, 45], 70),
    # t_start = 3, delta = 4, k = 3: update 3 takes steps 1..3
    (dict(t_end=12, delta=4, t_start=3, grad_accumulation_n=3), [1, 2, 3, 5, 6, 7, 9, 10, 11], 20),
]


@pytest.mark.parametrize("kwargs, expected, last", WINDOW_TABLE)
def test_in_accumulation_window_table(kwargs, expected, last, device):
    cfg = RigLConfig(**kwargs)
    assert [s for s in range(last) if in_accumulation_window(s, cfg)] == expected
    steps = torch.arange(last, device=device)
    out = in_accumulation_window(steps, cfg)
    assert out.dtype == torch.bool
    assert steps[out].tolist() == expected
    for s in (0, expected[0], last - 1):
        out_t = in_accumulation_window(torch.tensor(s, device=device), cfg)
        assert out_t.dim() == 0 and bool(out_t) == bool(in_accumulation_window(s, cfg))

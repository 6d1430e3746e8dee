"""Tests for rigl_func.config.RigLConfig: validation, immutability, hashing."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest

from rigl_func import RigLConfig, magnitude

BASE = dict(t_end=100, delta=10)


def _make(**overrides):
    return RigLConfig(**{**BASE, **overrides})


# (field, bad value, text expected in the message)
INVALID_VALUES = [
    ("sparsity", -0.1, "sparsity=-0.1"),
    ("sparsity", 1.0, "sparsity=1.0"),
    ("sparsity", 1.5, "sparsity=1.5"),
    ("sparsity", math.nan, "sparsity=nan"),
    ("sparsity", math.inf, "sparsity=inf"),
    ("delta", 0, "delta=0"),
    ("delta", -1, "delta=-1"),
    ("t_end", 0, "t_end=0"),
    ("t_end", -5, "t_end=-5"),
    ("t_start", -1, "t_start=-1"),
    ("t_start", 100, "t_start=100"),
    ("alpha", -0.1, "alpha=-0.1"),
    ("alpha", 1.5, "alpha=1.5"),
    ("alpha", math.nan, "alpha=nan"),
    ("erk_power_scale", -1.0, "erk_power_scale=-1.0"),
    ("erk_power_scale", math.inf, "erk_power_scale=inf"),
    ("grad_accumulation_n", 0, "grad_accumulation_n=0"),
    ("grad_accumulation_n", -2, "grad_accumulation_n=-2"),
    ("grad_accumulation_n", 10, "grad_accumulation_n=10"),  # == delta
    ("grad_accumulation_n", 11, "grad_accumulation_n=11"),
    ("distribution", "gaussian", "distribution='gaussian'"),
    ("schedule", "exponential", "schedule='exponential'"),
    ("grow_init", "random", "grow_init='random'"),
    ("drop_criterion", "bogus", "drop_criterion='bogus'"),
    ("grow_criterion", "momentum", "grow_criterion='momentum'"),
    ("include", ("conv[",), "include"),
    ("exclude", ("(unclosed",), "exclude"),
]


@pytest.mark.parametrize("field, value, text", INVALID_VALUES)
def test_invalid_values_raise_value_error(field, value, text):
    with pytest.raises(ValueError) as info:
        _make(**{field: value})
    msg = str(info.value)
    assert field in msg
    assert text in msg


@pytest.mark.parametrize("field, value", [("include", ("conv[",)), ("exclude", ("(unclosed",))])
def test_bad_regex_message_has_pattern(field, value):
    with pytest.raises(ValueError, match=field) as info:
        _make(**{field: value})
    assert repr(value[0]) in str(info.value)


# (field, bad value)
WRONG_TYPES = [
    ("delta", 1.5),
    ("delta", True),
    ("delta", "10"),
    ("t_end", 100.0),
    ("t_end", False),
    ("t_start", None),
    ("grad_accumulation_n", 2.0),
    ("sparsity", "0.9"),
    ("sparsity", True),
    ("sparsity", None),
    ("alpha", "0.3"),
    ("alpha", False),
    ("erk_power_scale", "1"),
    ("distribution", 3),
    ("drop_criterion", 3),
    ("include", "conv"),
    ("include", ["conv"]),
    ("exclude", (1,)),
    ("dense", "fc.weight"),
    ("dense", ("fc.weight", None)),
]


@pytest.mark.parametrize("field, value", WRONG_TYPES)
def test_wrong_types_raise_type_error(field, value):
    with pytest.raises(TypeError) as info:
        _make(**{field: value})
    msg = str(info.value)
    assert field in msg
    assert repr(value) in msg


def test_grad_accumulation_interval_bounds_are_valid():
    assert _make(grad_accumulation_n=1).grad_accumulation_n == 1
    assert _make(grad_accumulation_n=9).grad_accumulation_n == 9  # delta - 1


def test_valid_edge_values():
    cfg = _make(sparsity=0.0, alpha=0.0)
    assert cfg.sparsity == 0.0 and cfg.alpha == 0.0
    cfg = _make(sparsity=0.999, alpha=1.0, t_start=99, erk_power_scale=0.0)
    assert cfg.alpha == 1.0 and cfg.t_start == 99


def test_defaults():
    cfg = RigLConfig(t_end=750, delta=100)
    assert (cfg.sparsity, cfg.distribution, cfg.alpha, cfg.schedule) == (0.9, "erk", 0.3, "cosine")
    assert (cfg.t_start, cfg.grad_accumulation_n, cfg.grow_init) == (0, 1, "zeros")
    assert (cfg.drop_criterion, cfg.grow_criterion) == ("magnitude", "gradient")


def test_frozen():
    cfg = _make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sparsity = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.delta = 3


def test_hashable_and_equal():
    a = _make(sparsity=0.8, include=("conv",), dense=("fc.weight",))
    b = _make(sparsity=0.8, include=("conv",), dense=("fc.weight",))
    c = _make(sparsity=0.7, include=("conv",), dense=("fc.weight",))
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2
    assert {a: 1}[b] == 1
    # a callable criterion keeps it hashable
    d = _make(drop_criterion=magnitude, grow_criterion=lambda p, g, m: g.abs())
    assert isinstance(hash(d), int)


def test_delta_at_least_t_end_warns_at_caller():
    with pytest.warns(UserWarning, match=r"delta=100 >= t_end=100") as record:
        RigLConfig(t_end=100, delta=100)
    assert record[0].filename == __file__  # stacklevel points at the user's code
    with pytest.warns(UserWarning, match=r"delta=150 >= t_end=100"):
        RigLConfig(t_end=100, delta=150)


def test_no_warning_when_delta_below_t_end():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RigLConfig(t_end=100, delta=99)


def test_is_sparse_name():
    cfg = _make(include=(r"^conv", r"fc\d"), exclude=(r"bias$", r"conv3"), dense=("fc2.weight",))
    assert cfg.is_sparse_name("conv1.weight")
    assert cfg.is_sparse_name("fc1.weight")
    assert not cfg.is_sparse_name("fc2.weight")  # dense
    assert not cfg.is_sparse_name("conv3.weight")  # excluded
    assert not cfg.is_sparse_name("conv1.bias")  # excluded
    # include adds names (issue 18), it does not filter: head.weight is left to the rule
    assert cfg.is_sparse_name("head.weight") and not cfg.is_included("head.weight")
    assert cfg.is_included("fc1.weight")
    assert _make().is_sparse_name("anything.weight")

"""Tests for rigl_func.distributions and rigl_func.model_shapes.

Golden values were computed independently of the implementation: exact rational
arithmetic (``fractions.Fraction``) with a different solve (sort the distinct raw
scores, densify the top-k groups for k = 0, 1, ... and take the first k for which
``eps * max_remaining_raw <= 1``), on ResNet-50 shapes built separately and checked
against torchvision's 25,557,032 parameters minus 53,120 BatchNorm parameters and the
1,000 fc biases = 25,502,912 weights.
"""

from __future__ import annotations

import math
from fractions import Fraction as F

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rigl_func.distributions import (
    DISTRIBUTIONS,
    erdos_renyi,
    erk,
    get_distribution,
    nnz_for,
    uniform,
)
from rigl_func.model_shapes import mlp_shapes, resnet50_shapes

ALL = [uniform, erdos_renyi, erk]


def _budget(shapes, sparsities, dense=()):
    """(kept weights, (1 - S) * total) over the non-dense layers."""
    numel = {k: math.prod(v) for k, v in shapes.items() if k not in dense}
    return sum((1 - sparsities[k]) * n for k, n in numel.items()), sum(numel.values())


# ---------------------------------------------------------------------------------
# Hand-computed tiny examples.
# ---------------------------------------------------------------------------------

# (1) ERK, shapes a=(10, 10), b=(100, 10), sparsity 0.5, no densification:
#   n_a = 100, n_b = 1000, N = 1100, budget rhs = 0.5 * 1100 = 550
#   raw_a = (10 + 10) / 100 = 1/5,  raw_b = (100 + 10) / 1000 = 11/100
#   divisor = 1/5 * 100 + 11/100 * 1000 = 20 + 110 = 130,  eps = 550 / 130 = 55/13
#   max raw * eps = 1/5 * 55/13 = 11/13 <= 1  -> stop
#   density_a = 11/13 -> sparsity 2/13;  density_b = 11/100 * 55/13 = 121/260
#   -> sparsity 139/260.  Check: 100 * 11/13 + 1000 * 121/260 = 550.
#
# (2) ERK, shapes a=(10, 10), b=(100, 100), sparsity 0.5, "a" densified:
#   n_a = 100, n_b = 10000, rhs = 0.5 * 10100 = 5050
#   raw_a = 20/100 = 1/5, raw_b = 200/10000 = 1/50
#   divisor = 20 + 200 = 220, eps = 5050/220 = 22.95; raw_a * eps = 4.59 > 1
#   -> densify "a" and repeat: rhs = 0.5 * 10000 - 0.5 * 100 = 4950,
#   divisor = 200, eps = 24.75, raw_b * eps = 0.495 <= 1 -> stop
#   -> a: 0, b: 1 - 0.495 = 101/200.  Check: 100 + 10000 * 0.495 = 5050.
#
# (3) ERK, tie: a=(2, 2), b=(2, 2), c=(100, 100), sparsity 0.5:
#   raw_a = raw_b = 4/4 = 1, raw_c = 1/50; N = 10008, rhs = 5004
#   divisor = 4 + 4 + 200 = 208, eps = 24.06 > 1 -> densify a AND b (tied max)
#   rhs = 0.5 * 10000 - 0.5 * 8 = 4996, divisor = 200, eps = 24.98,
#   c density = 0.4996 -> sparsity 0.5004 = 1251/2500.  Check: 8 + 4996 = 5004.
#
# (4) ER ignores the kernel: conv=(8, 4, 3, 3), fc=(10, 8), sparsity 0.5:
#   raw_conv = (4 + 8) / 32 = 3/8, raw_fc = (8 + 10) / 80 = 9/40
#   n_conv = 288, n_fc = 80, rhs = 184, divisor = 108 + 18 = 126, eps = 92/63
#   conv density 3/8 * 92/63 = 23/42 -> 19/42; fc density 9/40 * 92/63 = 23/70
#   -> 47/70.  Check: 288 * 23/42 + 80 * 23/70 = 157.71 + 26.29 = 184.
HAND = [
    (erk, {"a": (10, 10), "b": (100, 10)}, {"a": F(2, 13), "b": F(139, 260)}),
    (erdos_renyi, {"a": (10, 10), "b": (100, 10)}, {"a": F(2, 13), "b": F(139, 260)}),
    (erk, {"a": (10, 10), "b": (100, 100)}, {"a": 0, "b": F(101, 200)}),
    (erk, {"a": (2, 2), "b": (2, 2), "c": (100, 100)},
     {"a": 0, "b": 0, "c": F(1251, 2500)}),
    (erdos_renyi, {"conv": (8, 4, 3, 3), "fc": (10, 8)},
     {"conv": F(19, 42), "fc": F(47, 70)}),
]


@pytest.mark.parametrize("fn, shapes, expected", HAND)
def test_hand_computed(fn, shapes, expected):
    got = fn(shapes, 0.5)
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(float(value), abs=1e-12)


# ---------------------------------------------------------------------------------
# Golden ERK values for ResNet-50 and LeNet-300-100 (power_scale=1).
# ---------------------------------------------------------------------------------

GOLDEN_RESNET50 = {
    (0.8, ()): {
        "conv1.weight": 0.14280878,
        "layer1.0.conv1.weight": 0.0,
        "layer1.0.conv2.weight": 0.63809686,
        "layer1.0.conv3.weight": 0.0,
        "layer3.0.conv2.weight": 0.91256258,
        "layer4.2.conv3.weight": 0.75674083,
        "layer4.0.downsample.0.weight": 0.85406349,
        "fc.weight": 0.85182497,
    },
    (0.9, ()): {
        "conv1.weight": 0.57996664,
        "layer1.0.conv1.weight": 0.0,
        "layer1.0.conv2.weight": 0.82266338,
        "layer1.0.conv3.weight": 0.04119120,
        "layer3.0.conv2.weight": 0.95715468,
        "layer4.2.conv3.weight": 0.88080027,
        "layer4.0.downsample.0.weight": 0.92848946,
        "fc.weight": 0.92739257,
    },
    (0.8, ("conv1.weight",)): {
        "conv1.weight": 0.0,
        "layer1.0.conv1.weight": 0.0,
        "layer1.0.conv2.weight": 0.63764549,
        "layer1.0.conv3.weight": 0.0,
        "layer3.0.conv2.weight": 0.91245353,
        "layer4.2.conv3.weight": 0.75643744,
        "layer4.0.downsample.0.weight": 0.85388148,
        "fc.weight": 0.85164017,
    },
    (0.9, ("conv1.weight",)): {
        "conv1.weight": 0.0,
        "layer1.0.conv1.weight": 0.0,
        "layer1.0.conv2.weight": 0.82245336,
        "layer1.0.conv3.weight": 0.04005565,
        "layer3.0.conv2.weight": 0.95710394,
        "layer4.2.conv3.weight": 0.88065909,
        "layer4.0.downsample.0.weight": 0.92840477,
        "fc.weight": 0.92730657,
    },
}

# fc3 (raw 0.11) is densified at both sparsities; exact values as fractions.
GOLDEN_MLP = {
    0.8: {"fc1.weight": 913777 / 1090740, "fc2.weight": 2953 / 5565, "fc3.weight": 0.0},
    0.9: {"fc1.weight": 191229 / 207760, "fc2.weight": 204 / 265, "fc3.weight": 0.0},
}


@pytest.mark.parametrize("key", list(GOLDEN_RESNET50))
def test_erk_golden_resnet50(key):
    sparsity, dense = key
    got = erk(resnet50_shapes(), sparsity, dense=dense)
    for name, value in GOLDEN_RESNET50[key].items():
        assert got[name] == pytest.approx(value, abs=1e-5), name
    kept, total = _budget(resnet50_shapes(), got, dense)
    assert kept == pytest.approx((1 - sparsity) * total, rel=1e-9)


@pytest.mark.parametrize("sparsity", list(GOLDEN_MLP))
def test_erk_golden_mlp(sparsity):
    got = erk(mlp_shapes(), sparsity)
    assert got == pytest.approx(GOLDEN_MLP[sparsity], abs=1e-5)


def test_er_equals_erk_for_2d_and_1d_convention():
    shapes = mlp_shapes()
    assert erdos_renyi(shapes, 0.9) == pytest.approx(erk(shapes, 0.9), abs=1e-12)
    # ER treats (n,) as n_out = n, n_in = 1, i.e. like (n, 1).
    got = erdos_renyi({"a": (4,), "b": (8, 8)}, 0.7)
    assert got == pytest.approx(erk({"a": (4, 1), "b": (8, 8)}, 0.7), abs=1e-12)


# ---------------------------------------------------------------------------------
# Invariants.
# ---------------------------------------------------------------------------------

shape_st = st.lists(st.integers(1, 64), min_size=1, max_size=4).map(tuple)
shapes_st = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3), shape_st, min_size=1, max_size=6
)
sparsity_st = st.floats(0.0, 0.99, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(shapes=shapes_st, sparsity=sparsity_st, data=st.data())
@pytest.mark.parametrize("fn", ALL)
def test_budget_and_range(fn, shapes, sparsity, data):
    names = list(shapes)
    dense = data.draw(st.lists(st.sampled_from(names), unique=True,
                               max_size=len(names) - 1))
    before = dict(shapes)
    got = fn(shapes, sparsity, dense=dense)
    assert shapes == before  # pure
    assert list(got) == names
    assert all(0.0 <= s < 1.0 for s in got.values())
    assert all(got[name] == 0.0 for name in dense)
    kept, total = _budget(shapes, got, dense)
    assert kept == pytest.approx((1 - sparsity) * total, rel=1e-6)


@settings(max_examples=100, deadline=None)
@given(shapes=shapes_st, sparsity=sparsity_st)
def test_erk_power_scale_zero_is_uniform(shapes, sparsity):
    got = erk(shapes, sparsity, power_scale=0.0)
    assert got == pytest.approx(uniform(shapes, sparsity), abs=1e-9)


@pytest.mark.parametrize("fn", ALL)
def test_dense_excluded_from_budget(fn):
    shapes = resnet50_shapes()
    got = fn(shapes, 0.9, dense=["conv1.weight", "fc.weight"])
    assert got["conv1.weight"] == got["fc.weight"] == 0.0
    kept, total = _budget(shapes, got, ["conv1.weight", "fc.weight"])
    assert total == 25_502_912 - 64 * 3 * 7 * 7 - 1000 * 2048
    assert kept == pytest.approx(0.1 * total, rel=1e-9)


def test_sparsity_zero_is_dense():
    for fn in ALL:
        assert set(fn(resnet50_shapes(), 0.0).values()) == {0.0}


def test_erk_large_power_scale():
    # 2.0 ** 2000 would overflow; scores are rescaled by the largest one first.
    got = erk({"a": (1, 1), "b": (1, 2), "c": (2, 1)}, 0.5, power_scale=2000.0)
    assert got == pytest.approx({"a": 0.0, "b": 0.625, "c": 0.625})
    # (1/64) ** 2000 underflows to 0: no budget can be placed on "b".
    with pytest.raises(ValueError, match="power_scale"):
        erk({"a": (1, 1), "b": (64, 64)}, 0.5, power_scale=2000.0)


def test_torch_size_shapes():
    torch = pytest.importorskip("torch", reason="torch not installed")
    shapes = {"w": torch.Size([300, 784]), "v": torch.Size([10, 300])}
    assert erk(shapes, 0.9) == pytest.approx(erk({"w": (300, 784), "v": (10, 300)}, 0.9))


def test_registry():
    assert DISTRIBUTIONS == {"uniform": uniform, "erdos_renyi": erdos_renyi,
                             "er": erdos_renyi, "erk": erk}
    for name, fn in DISTRIBUTIONS.items():
        assert get_distribution(name) is fn


# ---------------------------------------------------------------------------------
# Bad input: type, argument name and value in the message.
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("sparsity, shown", [
    (-0.1, "-0.1"), (1.0, "1.0"), (float("nan"), "nan"), (True, "True"),
    ("0.9", "'0.9'"),
])
def test_bad_sparsity(fn, sparsity, shown):
    with pytest.raises(ValueError, match="sparsity") as info:
        fn({"w": (4, 4)}, sparsity)
    assert shown in str(info.value)


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("shape, exc", [
    ((3, 0), ValueError), ((3, -2), ValueError), ((), ValueError),
    ((3, 2.5), TypeError), ("34", TypeError), (7, TypeError), ((True, 3), TypeError),
])
def test_bad_shape(fn, shape, exc):
    with pytest.raises(exc) as info:
        fn({"ok": (2, 2), "layer.weight": shape}, 0.5)
    assert "layer.weight" in str(info.value) and repr(shape) in str(info.value)


@pytest.mark.parametrize("fn", ALL)
def test_shapes_not_a_mapping(fn):
    with pytest.raises(TypeError, match="shapes"):
        fn([(2, 2)], 0.5)


@pytest.mark.parametrize("fn", ALL)
def test_bad_dense(fn):
    with pytest.raises(ValueError, match="dense") as info:
        fn({"w": (4, 4)}, 0.5, dense=["nope.weight"])
    assert "nope.weight" in str(info.value)
    with pytest.raises(TypeError, match="dense"):
        fn({"w": (4, 4)}, 0.5, dense="w")  # a str, not a collection of names


@pytest.mark.parametrize("fn", ALL)
def test_all_dense_or_empty_is_consistent(fn):
    # Every layer dense (or no layers at all): nothing to distribute, all 0.0 --
    # the same answer for every distribution, so a model without sparse layers works.
    assert fn({"w": (4, 4), "v": (2, 3)}, 0.5, dense=["w", "v"]) == {"w": 0.0, "v": 0.0}
    assert fn({}, 0.5) == {}


@pytest.mark.parametrize("power_scale, shown", [
    (-1.0, "-1.0"), (float("inf"), "inf"), (float("nan"), "nan"), (True, "True"),
])
def test_bad_power_scale(power_scale, shown):
    with pytest.raises(ValueError, match="power_scale") as info:
        erk({"w": (4, 4)}, 0.5, power_scale=power_scale)
    assert shown in str(info.value)


def test_unknown_distribution():
    with pytest.raises(ValueError) as info:
        get_distribution("lognormal")
    message = str(info.value)
    assert "distribution" in message and "'lognormal'" in message
    assert all(name in message for name in DISTRIBUTIONS)


# ---------------------------------------------------------------------------------
# nnz_for.
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("numel, sparsity, expected", [
    (100, 0.9, 10),
    (10, 0.95, 1),   # 0.5 rounds up (and at least one anyway)
    (4, 0.375, 3),   # exactly 2.5 -> 3: halves round up, not to even
    (4, 0.9, 1),     # 0.4 -> 0, but at least one active weight
    (7, 0.0, 7),
    (0, 0.5, 0),
    (5, 1.0, 1),
])
def test_nnz_for(numel, sparsity, expected):
    assert nnz_for(numel, sparsity) == expected


@pytest.mark.parametrize("numel, sparsity, name", [
    (-1, 0.5, "numel"), (2.0, 0.5, "numel"), (10, 1.5, "sparsity"),
    (10, -0.1, "sparsity"),
])
def test_nnz_for_bad_input(numel, sparsity, name):
    with pytest.raises(ValueError, match=name):
        nnz_for(numel, sparsity)


# ---------------------------------------------------------------------------------
# model_shapes.
# ---------------------------------------------------------------------------------

def test_resnet50_shapes():
    shapes = resnet50_shapes()
    assert len(shapes) == 54
    assert sum(math.prod(s) for s in shapes.values()) == 25_502_912
    assert sum(name.endswith("downsample.0.weight") for name in shapes) == 4
    names = list(shapes)
    assert names[0] == "conv1.weight" and names[-1] == "fc.weight"
    assert names[1:5] == ["layer1.0.conv1.weight", "layer1.0.conv2.weight",
                          "layer1.0.conv3.weight", "layer1.0.downsample.0.weight"]
    expected = {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv1.weight": (128, 256, 1, 1),
        "layer2.3.conv3.weight": (512, 128, 1, 1),
        "layer3.0.conv2.weight": (256, 256, 3, 3),
        "layer3.5.conv1.weight": (256, 1024, 1, 1),
        "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
    }
    for name, shape in expected.items():
        assert shapes[name] == shape, name


def test_mlp_shapes():
    assert mlp_shapes() == {"fc1.weight": (300, 784), "fc2.weight": (100, 300),
                            "fc3.weight": (10, 100)}

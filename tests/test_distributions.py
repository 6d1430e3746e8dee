"""Tests for rigl_func.distributions and rigl_func.model_shapes.

Golden values were computed independently of the implementation: exact rational
arithmetic (``fractions.Fraction``) with a different solve (sort the distinct raw
scores, densify the top-k groups for k = 0, 1, ... and take the first k for which
``eps * max_remaining_raw <= 1``), on ResNet-50 shapes built separately and checked
against torchvision's 25,557,032 parameters minus 53,120 BatchNorm parameters and the
1,000 fc biases = 25,502,912 weights. The budget is the original's
(google-research/rigl ``get_sparsities_erdos_renyi``): ``n - floor(S * n)`` ones per
layer, not ``(1 - S) * n``.
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
    """(kept weights, total) over the non-dense layers."""
    numel = {k: math.prod(v) for k, v in shapes.items() if k not in dense}
    return sum((1 - sparsities[k]) * n for k, n in numel.items()), sum(numel.values())


def _ones(shapes, sparsity, dense=()):
    """The original's budget: sum of n - floor(S * n) over the non-dense layers."""
    numel = [math.prod(v) for k, v in shapes.items() if k not in dense]
    return sum(n - math.floor(sparsity * n) for n in numel)


def _original(shapes, sparsity, dense=(), kernel=True, power_scale=1.0):
    """google-research/rigl's get_sparsities_erdos_renyi, restated in plain floats.

    Same float operations in the same order (so the same bits): per layer
    ``n_zeros = floor(S * n)``; remaining layers add ``n - n_zeros`` to ``rhs`` and
    ``raw * n`` to ``divisor``; densified ones subtract ``n_zeros``; ``eps = rhs /
    divisor``; every layer tied at the top raw score is densified while
    ``top * eps > 1``. Sparsity ``1 - eps * raw``. ER uses the first two dims.
    """
    densified = set()
    while True:
        rhs, divisor, raw = 0, 0, {}
        for name, shape in shapes.items():
            n = math.prod(shape)
            zeros = math.floor(sparsity * n)
            if name in dense:
                continue
            if name in densified:
                rhs -= zeros
                continue
            rhs += n - zeros
            if kernel:
                raw[name] = (sum(shape) / n) ** power_scale
            else:
                n_out, n_in = shape[0], (shape[1] if len(shape) > 1 else 1)
                raw[name] = (n_in + n_out) / (n_in * n_out)
            divisor += raw[name] * n
        if not raw:  # only rounding densifies the last group (every n_zeros == 0)
            break
        eps = rhs / divisor
        top = max(raw.values())
        if top * eps <= 1:
            break
        densified |= {name for name, r in raw.items() if r == top}
    return {name: 1.0 - eps * raw[name] if name in raw else 0.0 for name in shapes}


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
# Small model where the original's whole-weight budget matters (issue 12): every
# layer's n is not a multiple of 10, so n - floor(S * n) != (1 - S) * n.
# ---------------------------------------------------------------------------------
#
# a = conv (32, 16, 3, 3): n = 4608,  sum(shape) = 54, ER (n_in + n_out) = 48
# b = conv (32, 16, 1, 1): n = 512,   sum(shape) = 50, ER 48
# c = conv (64, 32, 3, 3): n = 18432, sum(shape) = 102, ER 96
# d = fc   (10, 64):       n = 640,   sum(shape) = 74, ER 74
#
# (5) ERK at 0.9. n_zeros = floor(0.9 n): a 4147 (of 4147.2), b 460 (460.8),
#   c 16588 (16588.8), d 576  -> ones a 461, b 52, c 1844, d 64, rhs = 2421
#   (the old (1 - S) * N budget was 2419.2). raw * n = sum(shape), so
#   divisor = 54 + 50 + 102 + 74 = 280 and eps = 2421/280.
#   top raw is d's, 74/640 * 2421/280 = 179154/179200 <= 1 -> no densification.
#   kept (eps * sum(shape)): a 130734/280 = 466.907, b 121050/280 = 432.32,
#   c 246942/280 = 881.936, d 179154/280 = 639.836
#   sparsity 1 - kept/n: a 64417/71680, b 2231/14336, c 273001/286720, d 23/89600
#   ones n - floor(s n) = ceil(kept): a 467, b 433, c 882, d 640 (total 2422).
#   The old budget gave eps = 8.64, kept 466.56, 432, 881.28, 639.36 and rounded
#   counts 467, 432, 881, 639.
# (6) ERK at 0.8. n_zeros: a 3686 (3686.4), b 409 (409.6), c 14745 (14745.6),
#   d 512 -> ones 922 + 103 + 3687 + 128 = 4840 = rhs, divisor 280, eps = 121/7;
#   d: 74/640 * 121/7 = 1.999 > 1 -> densify d: rhs = 922 + 103 + 3687 - 512 = 4200,
#   divisor = 54 + 50 + 102 = 206, eps = 4200/206; b: 50/512 * 4200/206 = 1.991 > 1
#   -> densify b: rhs = 922 + 3687 - 512 - 409 = 3688, divisor = 54 + 102 = 156,
#   eps = 3688/156; a: 54/4608 * 3688/156 = 0.277 <= 1 -> stop.
#   kept a 54 * 3688/156 = 1276.615, c 102 * 3688/156 = 2411.385
#   sparsity a 1 - 199152/718848 = 1203/1664, c 1 - 376176/2875392 = 52067/59904
#   ones a 1277, b 512, c 2412, d 640.
# (7) ER at 0.9 (kernel ignored): raw * n = 48 * 9 = 432, 48, 96 * 9 = 864, 74,
#   divisor = 1418, rhs = 2421 (as in (5)), eps = 2421/1418; d: 74/640 * 2421/1418
#   = 0.197 <= 1. kept a 432 * 2421/1418 = 737.57, b 81.95, c 1475.14, d 126.34
#   sparsity a = b = 1 - 432 * 2421 / (1418 * 4608) = 38113/45376,
#   c 1 - 864 * 2421 / (1418 * 18432) = 83489/90752, d 1 - 74 * 2421 / (1418 * 640)
#   = 364183/453760; ones a 738, b 82, c 1476, d 127.
SMALL = {"a": (32, 16, 3, 3), "b": (32, 16, 1, 1), "c": (64, 32, 3, 3), "d": (10, 64)}
GOLDEN_SMALL = [
    (erk, 0.9, {"a": 1 - F(54 * 2421, 280 * 4608), "b": 1 - F(50 * 2421, 280 * 512),
                "c": 1 - F(102 * 2421, 280 * 18432), "d": 1 - F(74 * 2421, 280 * 640)},
     {"a": 467, "b": 433, "c": 882, "d": 640}),
    (erk, 0.8, {"a": 1 - F(54 * 3688, 156 * 4608), "b": 0,
                "c": 1 - F(102 * 3688, 156 * 18432), "d": 0},
     {"a": 1277, "b": 512, "c": 2412, "d": 640}),
    (erdos_renyi, 0.9, {"a": 1 - F(432 * 2421, 1418 * 4608),
                        "b": 1 - F(48 * 2421, 1418 * 512),
                        "c": 1 - F(864 * 2421, 1418 * 18432),
                        "d": 1 - F(74 * 2421, 1418 * 640)},
     {"a": 738, "b": 82, "c": 1476, "d": 127}),
]


def test_golden_small_fractions():
    # The reduced fractions quoted in the derivation above.
    erk9, erk8, er9 = (expected for _, _, expected, _ in GOLDEN_SMALL)
    assert erk9 == {"a": F(64417, 71680), "b": F(2231, 14336),
                    "c": F(273001, 286720), "d": F(23, 89600)}
    assert (erk8["a"], erk8["c"]) == (F(1203, 1664), F(52067, 59904))
    assert er9 == {"a": F(38113, 45376), "b": F(38113, 45376),
                   "c": F(83489, 90752), "d": F(364183, 453760)}


@pytest.mark.parametrize("fn, sparsity, expected, ones", GOLDEN_SMALL)
def test_golden_small_model(fn, sparsity, expected, ones):
    got = fn(SMALL, sparsity)
    assert got == pytest.approx({k: float(v) for k, v in expected.items()}, abs=1e-12)
    assert {k: nnz_for(math.prod(SMALL[k]), s) for k, s in got.items()} == ones
    kept, _ = _budget(SMALL, got)
    assert kept == pytest.approx(_ones(SMALL, sparsity), rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(shapes=st.dictionaries(st.text("abcdefgh", min_size=1, max_size=3),
                             st.lists(st.integers(1, 64), min_size=1,
                                      max_size=4).map(tuple),
                             min_size=1, max_size=6),
       sparsity=st.floats(0.01, 0.99, allow_nan=False), data=st.data())
@pytest.mark.parametrize("fn, kernel", [(erk, True), (erdos_renyi, False)])
def test_matches_original_on_any_shapes(fn, kernel, shapes, sparsity, data):
    # Issue 12: match get_sparsities_erdos_renyi to 1e-6 in density on any shapes.
    # Same float operations, so the sparsities agree to the last bits and the
    # counts n - floor(s * n) agree exactly.
    names = list(shapes)
    dense = data.draw(st.lists(st.sampled_from(names), unique=True,
                               max_size=len(names) - 1))
    got = fn(shapes, sparsity, dense=dense)
    want = _original(shapes, sparsity, dense=dense, kernel=kernel)
    assert got == pytest.approx(want, abs=1e-12)
    for name, shape in shapes.items():
        n = math.prod(shape)
        assert nnz_for(n, got[name]) == max(1, n - math.floor(want[name] * n)), name


# ---------------------------------------------------------------------------------
# Golden ERK values for ResNet-50 and LeNet-300-100 (power_scale=1).
# ---------------------------------------------------------------------------------
# ResNet-50: recomputed for the n - floor(S * n) budget (issue 12); the values of the
# old (1 - S) * n budget differed by up to 4.3e-6 (conv1 at 0.8: 0.14280878).
# LeNet-300-100: every n is a multiple of 10, so both budgets agree.

GOLDEN_RESNET50 = {
    (0.8, ()): {
        "conv1.weight": 0.1428045283,
        "layer1.0.conv1.weight": 0.0,
        "layer1.0.conv2.weight": 0.6380950703,
        "layer1.0.conv3.weight": 0.0,
        "layer3.0.conv2.weight": 0.9125621485,
        "layer4.2.conv3.weight": 0.7567396260,
        "layer4.0.downsample.0.weight": 0.8540627655,
        "fc.weight": 0.8518242383,
    },
    (0.9, ()): {
        "conv1.weight": 0.5799622164,
        "layer1.0.conv1.weight": 0.0,
        "layer1.0.conv2.weight": 0.8226615170,
        "layer1.0.conv3.weight": 0.0411811126,
        "layer3.0.conv2.weight": 0.9571542285,
        "layer4.2.conv3.weight": 0.8807990106,
        "layer4.0.downsample.0.weight": 0.9284887117,
        "fc.weight": 0.9273918020,
    },
    (0.8, ("conv1.weight",)): {
        "conv1.weight": 0.0,
        "layer1.0.conv1.weight": 0.0,
        "layer1.0.conv2.weight": 0.6376437275,
        "layer1.0.conv3.weight": 0.0,
        "layer3.0.conv2.weight": 0.9124531021,
        "layer4.2.conv3.weight": 0.7564362485,
        "layer4.0.downsample.0.weight": 0.8538807627,
        "fc.weight": 0.8516394438,
    },
    (0.9, ("conv1.weight",)): {
        "conv1.weight": 0.0,
        "layer1.0.conv1.weight": 0.0,
        "layer1.0.conv2.weight": 0.8224515017,
        "layer1.0.conv3.weight": 0.0400456193,
        "layer3.0.conv2.weight": 0.9571034878,
        "layer4.2.conv3.weight": 0.8806578453,
        "layer4.0.downsample.0.weight": 0.9284040235,
        "fc.weight": 0.9273058148,
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
        assert got[name] == pytest.approx(value, abs=1e-9), name
    kept, _ = _budget(resnet50_shapes(), got, dense)
    assert kept == pytest.approx(_ones(resnet50_shapes(), sparsity, dense), rel=1e-12)


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
    budget = (1 - sparsity) * total if fn is uniform else _ones(shapes, sparsity, dense)
    assert kept == pytest.approx(budget, rel=1e-6)


@settings(max_examples=100, deadline=None)
@given(shapes=shapes_st, sparsity=sparsity_st)
def test_erk_power_scale_zero_is_uniform(shapes, sparsity):
    # One sparsity for every layer: that of the original's whole-weight budget,
    # 1 - sum(n - floor(S n)) / sum(n), which is S when every S * n is an integer.
    got = erk(shapes, sparsity, power_scale=0.0)
    total = sum(math.prod(s) for s in shapes.values())
    common = 1 - _ones(shapes, sparsity) / total if sparsity > 0 else 0.0
    assert got == pytest.approx(dict.fromkeys(shapes, common), abs=1e-9)
    assert erk({"w": (10, 10)}, sparsity, power_scale=0.0)["w"] == pytest.approx(
        1 - (100 - math.floor(sparsity * 100)) / 100, abs=1e-12)


@pytest.mark.parametrize("fn", ALL)
def test_dense_excluded_from_budget(fn):
    shapes = resnet50_shapes()
    got = fn(shapes, 0.9, dense=["conv1.weight", "fc.weight"])
    assert got["conv1.weight"] == got["fc.weight"] == 0.0
    kept, total = _budget(shapes, got, ["conv1.weight", "fc.weight"])
    assert total == 25_502_912 - 64 * 3 * 7 * 7 - 1000 * 2048
    budget = 0.1 * total if fn is uniform else _ones(
        shapes, 0.9, ["conv1.weight", "fc.weight"])
    assert kept == pytest.approx(budget, rel=1e-9)


def test_sparsity_zero_is_dense():
    for fn in ALL:
        assert set(fn(resnet50_shapes(), 0.0).values()) == {0.0}


def test_erk_large_power_scale():
    # 2.0 ** 2000 would overflow; scores are rescaled by the largest one first.
    # "a" (score 2) is densified; it has floor(0.5 * 1) = 0 zeros to give back, so
    # "b" and "c" share their own 2 * (2 - floor(0.5 * 2)) = 2 ones: sparsity 0.5.
    # (The old (1 - S) * n budget charged "a" 0.5 and gave 0.625.)
    got = erk({"a": (1, 1), "b": (1, 2), "c": (2, 1)}, 0.5, power_scale=2000.0)
    assert got == pytest.approx({"a": 0.0, "b": 0.5, "c": 0.5})
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
    # numel - floor(sparsity * numel), as google-research/rigl (issue 12).
    (100, 0.9, 10),
    (10, 0.95, 1),   # 10 - floor(9.5)
    (4, 0.375, 3),   # 4 - floor(1.5)
    (4, 0.9, 1),     # 4 - floor(3.6); was round(0.4) = 0 clipped to 1
    (33, 0.9, 4),    # 33 - floor(29.7); round((1 - s) * n) = round(3.3) gave 3
    (9, 0.4, 6),     # 9 - floor(3.6); round(5.4) gave 5
    (7, 0.0, 7),
    (0, 0.5, 0),
    (5, 1.0, 1),     # 5 - 5 = 0, but at least one active weight
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

"""Tests for rigl_func.selection: ``drop`` and ``grow``.

The expected masks in the tables were worked out by hand from the documented rules
(jaxpruner's ``testRigLUpdateMask`` style):

* ``drop`` removes the ``n`` *active* entries with the lowest score; NaN scores go
  first, then ``-inf``; equal scores drop the lower flat index first.
* ``grow`` activates the ``n`` *inactive* entries with the highest finite score; NaN
  and ``±inf`` are never grown; equal scores grow the lower flat index first.

The property tests compare against a plain-Python reference that sorts with a stable
key ``(class, value, index)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rigl_func import drop, grow
from conftest import m_ as _m, t_ as _t  # shared test helpers

NAN, INF = math.nan, math.inf
F32MAX = torch.finfo(torch.float32).max
F32TINY = float(torch.finfo(torch.float32).smallest_normal) / 4  # a subnormal


# ---------------------------------------------------------------------------------
# Hand-computed tables.

# (scores, mask, n, expected mask)
DROP_TABLE = [
    pytest.param([0.5, 0.1, 0.9, 0.3], [1, 1, 1, 1], 2, [1, 0, 1, 0], id="lowest-two"),
    pytest.param([0.5, 0.1, 0.9, 0.3], [1, 0, 1, 1], 1, [1, 0, 1, 0], id="only-active-count"),
    pytest.param([-2.0, 3.0, -1.0, 0.0], [1, 1, 1, 1], 2, [0, 1, 0, 1], id="signed-scores"),
    pytest.param([0.2, 0.2, 0.2, 0.2], [1, 1, 1, 1], 2, [0, 0, 1, 1], id="ties-lower-index-first"),
    pytest.param([0.2, 0.2, 0.2, 0.2], [0, 1, 0, 1], 1, [0, 0, 0, 1], id="ties-among-active"),
    pytest.param([[0.1, 0.5], [0.1, 0.1]], [[1, 1], [1, 1]], 2, [[0, 1], [0, 1]], id="2d-ties-flat-order"),
    pytest.param([-INF, 0.0, NAN, -1.0], [1, 1, 1, 1], 1, [1, 1, 0, 1], id="nan-first"),
    pytest.param([-INF, 0.0, NAN, -1.0], [1, 1, 1, 1], 2, [0, 1, 0, 1], id="nan-then-neg-inf"),
    pytest.param([-INF, 0.0, NAN, -1.0], [1, 1, 1, 1], 3, [0, 1, 0, 0], id="nan-neg-inf-then-lowest"),
    pytest.param([NAN, 1.0, NAN], [1, 1, 1], 1, [0, 1, 1], id="two-nans-lower-index"),
    pytest.param([INF, 5.0, 1.0], [1, 1, 1], 2, [1, 0, 0], id="pos-inf-dropped-last"),
    # +-inf are distinct from +-float32 max: -inf before -max, max before +inf
    pytest.param([-F32MAX, -INF], [1, 1], 1, [1, 0], id="neg-inf-before-neg-max"),
    pytest.param([INF, F32MAX], [1, 1], 1, [1, 0], id="max-before-pos-inf"),
    pytest.param([-F32MAX, -INF, NAN], [1, 1, 1], 2, [1, 0, 0], id="nan-neg-inf-then-neg-max"),
    pytest.param([NAN, 0.5, 0.2], [0, 1, 1], 1, [0, 1, 0], id="inactive-nan-ignored"),
    pytest.param([0.0, -0.0], [1, 1], 1, [0, 1], id="zero-neg-zero-tie"),
    pytest.param([-0.0, 0.0], [1, 1], 1, [0, 1], id="neg-zero-zero-tie"),
    pytest.param([0.5, 0.1, 0.9], [1, 1, 1], 0, [1, 1, 1], id="n-zero"),
    pytest.param([0.5, 0.1, 0.9], [1, 0, 1], 2, [0, 0, 0], id="n-equals-nnz"),
    pytest.param([0.5, 0.1, 0.9], [1, 0, 1], 100, [0, 0, 0], id="n-exceeds-nnz"),
    pytest.param([0.5, 0.1, 0.9], [0, 0, 0], 2, [0, 0, 0], id="empty-mask"),
]

# (scores, mask, n, expected mask)
GROW_TABLE = [
    pytest.param([0.5, 0.1, 0.9, 0.3], [0, 0, 0, 0], 2, [1, 0, 1, 0], id="highest-two"),
    pytest.param([0.5, 0.1, 0.9, 0.3], [0, 0, 1, 0], 1, [1, 0, 1, 0], id="active-not-candidates"),
    pytest.param([-1.0, -2.0, -0.5], [0, 0, 0], 1, [0, 0, 1], id="negative-scores"),
    pytest.param([0.2, 0.2, 0.2, 0.2], [0, 0, 0, 0], 2, [1, 1, 0, 0], id="ties-lower-index-first"),
    pytest.param([0.2, 0.2, 0.2, 0.2], [1, 0, 0, 0], 2, [1, 1, 1, 0], id="ties-among-inactive"),
    pytest.param([[0.7, 0.1], [0.7, 0.7]], [[0, 0], [0, 0]], 2, [[1, 0], [1, 0]], id="2d-ties-flat-order"),
    pytest.param([NAN, INF, -INF, 0.1, 0.2], [0, 0, 0, 0, 0], 1, [0, 0, 0, 0, 1], id="non-finite-skipped"),
    pytest.param([NAN, INF, -INF, 0.1, 0.2], [0, 0, 0, 0, 0], 5, [0, 0, 0, 1, 1], id="fewer-finite-than-n"),
    pytest.param([NAN, INF, -INF], [0, 0, 0], 2, [0, 0, 0], id="no-finite-candidate"),
    pytest.param([-0.0, 0.0], [0, 0], 1, [1, 0], id="neg-zero-zero-tie"),
    pytest.param([F32MAX, INF, -F32MAX], [0, 0, 0], 2, [1, 0, 1], id="max-grown-inf-not"),
    pytest.param([0.0, F32TINY, -F32TINY], [0, 0, 0], 1, [0, 1, 0], id="subnormal-above-zero"),
    pytest.param([0.0, -0.0], [0, 0], 1, [1, 0], id="zero-neg-zero-tie"),
    pytest.param([0.5, 0.1, 0.9], [0, 1, 0], 0, [0, 1, 0], id="n-zero"),
    pytest.param([0.5, 0.1, 0.9], [0, 1, 0], 100, [1, 1, 1], id="n-exceeds-inactive"),
    pytest.param([0.5, 0.1, 0.9], [1, 1, 1], 3, [1, 1, 1], id="full-mask"),
]


@pytest.mark.parametrize("scores, mask, n, expected", DROP_TABLE)
def test_drop_table(scores, mask, n, expected, device):
    out = drop(_t(scores, device), _m(mask, device), n)
    assert out.dtype == torch.bool and out.device.type == device.type
    assert out.tolist() == _m(expected, "cpu").tolist()


@pytest.mark.parametrize("scores, mask, n, expected", GROW_TABLE)
def test_grow_table(scores, mask, n, expected, device):
    out = grow(_t(scores, device), _m(mask, device), n)
    assert out.dtype == torch.bool and out.device.type == device.type
    assert out.tolist() == _m(expected, "cpu").tolist()


@pytest.mark.parametrize("scores, mask, n, expected", DROP_TABLE)
def test_drop_table_tensor_n(scores, mask, n, expected, device):
    """The same table with ``n`` as a 0-d tensor, with and without ``max_n``."""
    s, m = _t(scores, device), _m(mask, device)
    n_t = torch.tensor(n, device=device)
    assert drop(s, m, n_t).tolist() == _m(expected, "cpu").tolist()
    assert drop(s, m, n_t, max_n=n).tolist() == _m(expected, "cpu").tolist()
    assert drop(s, m, n_t, max_n=n + 3).tolist() == _m(expected, "cpu").tolist()


@pytest.mark.parametrize("scores, mask, n, expected", GROW_TABLE)
def test_grow_table_tensor_n(scores, mask, n, expected, device):
    s, m = _t(scores, device), _m(mask, device)
    n_t = torch.tensor(n, device=device)
    assert grow(s, m, n_t).tolist() == _m(expected, "cpu").tolist()
    assert grow(s, m, n_t, max_n=n).tolist() == _m(expected, "cpu").tolist()
    assert grow(s, m, n_t, max_n=n + 3).tolist() == _m(expected, "cpu").tolist()


def test_tensor_n_max_n_is_a_static_cap(device):
    """``max_n`` bounds the selection when the tensor ``n`` exceeds it (documented)."""
    s = _t([0.4, 0.1, 0.3, 0.2], device)
    full = _m([1, 1, 1, 1], device)
    assert drop(s, full, torch.tensor(3, device=device), max_n=2).tolist() == [True, False, True, False]
    assert grow(s, ~full, torch.tensor(3, device=device), max_n=1).tolist() == [True, False, False, False]


def test_int32_tensor_n(device):
    s = _t([0.4, 0.1, 0.3, 0.2], device)
    n = torch.tensor(2, dtype=torch.int32, device=device)
    assert drop(s, _m([1, 1, 1, 1], device), n).tolist() == [True, False, True, False]
    assert grow(s, _m([0, 0, 0, 0], device), n).tolist() == [True, False, True, False]


def test_conv_4d(device):
    # shape (out=2, in=1, kh=2, kw=2); flat order: 3 7 1 5 | 0 6 2 4
    scores = _t([3.0, 7.0, 1.0, 5.0, 0.0, 6.0, 2.0, 4.0], device).reshape(2, 1, 2, 2)
    full = torch.ones(2, 1, 2, 2, dtype=torch.bool, device=device)
    # drop the three lowest values 0, 1, 2 at flat positions 4, 2, 6
    expected_drop = [[[[1, 1], [0, 1]]], [[[0, 1], [0, 1]]]]
    out = drop(scores, full, 3)
    assert out.shape == (2, 1, 2, 2)
    assert out.tolist() == _m(expected_drop, "cpu").tolist()
    # grow the three highest values 7, 6, 5 at flat positions 1, 5, 3
    expected_grow = [[[[0, 1], [0, 1]]], [[[0, 1], [0, 0]]]]
    out = grow(scores, ~full, 3)
    assert out.shape == (2, 1, 2, 2)
    assert out.tolist() == _m(expected_grow, "cpu").tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_score_dtypes(dtype, device):
    # values exactly representable in every dtype
    scores = _t([0.5, 0.25, 1.0, 0.125, 0.25], device, dtype)
    assert drop(scores, _m([1, 1, 1, 1, 1], device), 2).tolist() == [True, False, True, False, True]
    assert drop(scores, _m([1, 0, 1, 1, 1], device), 2).tolist() == [True, False, True, False, False]
    assert grow(scores, _m([0, 0, 0, 0, 0], device), 3).tolist() == [True, True, True, False, False]
    with_nan = _t([NAN, 0.25, -INF, 0.5], device, dtype)
    assert drop(with_nan, _m([1, 1, 1, 1], device), 1).tolist() == [False, True, True, True]
    assert drop(with_nan, _m([1, 1, 1, 1], device), 2).tolist() == [False, True, False, True]
    assert grow(with_nan, _m([0, 0, 0, 0], device), 4).tolist() == [False, True, False, True]


def test_float64_compared_in_float32(device):
    """Documented: scores are compared in float32, so float64 values that round to the
    same float32 tie and fall back to the flat index."""
    scores = _t([1.0 + 1e-12, 1.0], device, torch.float64)
    assert drop(scores, _m([1, 1], device), 1).tolist() == [False, True]
    assert grow(scores.neg(), _m([0, 0], device), 1).tolist() == [True, False]


def test_float64_beyond_float32_range(device):
    """A finite float64 score too large for float32 still orders correctly and is
    grown (it is finite in its own dtype)."""
    scores = _t([1e300, 2.0, -1e300], device, torch.float64)
    assert grow(scores, _m([0, 0, 0], device), 1).tolist() == [True, False, False]
    assert drop(scores, _m([1, 1, 1], device), 1).tolist() == [True, True, False]


def test_inputs_not_mutated(device):
    scores = _t([[NAN, -0.0, 0.3], [INF, -INF, 0.1]], device)
    mask = _m([[1, 0, 1], [0, 1, 1]], device)
    s0, m0 = scores.clone(), mask.clone()
    n = torch.tensor(2, device=device)
    n0 = n.clone()
    for fn in (drop, grow):
        fn(scores, mask, 2)
        fn(scores, mask, n, max_n=3)
        assert torch.equal(scores.isnan(), s0.isnan())
        assert torch.equal(torch.nan_to_num(scores), torch.nan_to_num(s0))
        assert torch.equal(scores.signbit(), s0.signbit())
        assert torch.equal(mask, m0) and torch.equal(n, n0)


def test_output_is_a_new_tensor(device):
    scores, mask = _t([0.1, 0.2], device), _m([1, 0], device)
    for fn in (drop, grow):
        out = fn(scores, mask, 0)
        assert torch.equal(out, mask)
        out[0] = ~out[0]
        assert mask.tolist() == [True, False]


# ---------------------------------------------------------------------------------
# Errors.

@pytest.mark.parametrize("fn", [drop, grow])
def test_errors(fn):
    s = torch.tensor([0.1, 0.2, 0.3])
    m = torch.tensor([True, False, True])
    with pytest.raises(TypeError, match="scores"):
        fn(torch.tensor([1, 2, 3]), m, 1)
    with pytest.raises(TypeError, match="scores"):
        fn([0.1, 0.2, 0.3], m, 1)
    with pytest.raises(TypeError, match="mask"):
        fn(s, torch.tensor([1.0, 0.0, 1.0]), 1)
    with pytest.raises(TypeError, match="mask"):
        fn(s, torch.tensor([1, 0, 1], dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match=r"scores and mask.*\(3,\).*\(1, 3\)"):
        fn(s, m.reshape(1, 3), 1)
    with pytest.raises(ValueError, match=r"\bn\b.*-1"):
        fn(s, m, -1)
    for bad_n in (1.5, True, None, torch.tensor(1.0), torch.tensor([1]), torch.tensor(True)):
        with pytest.raises(TypeError, match=r"\bn\b"):
            fn(s, m, bad_n)
    with pytest.raises(ValueError, match="max_n"):
        fn(s, m, torch.tensor(1), max_n=-1)


# ---------------------------------------------------------------------------------
# Properties against a plain-Python reference.

def _ref_drop(scores: list[float], mask: list[bool], n: int) -> list[bool]:
    active = [i for i, m in enumerate(mask) if m]

    def key(i):  # NaN first, then ascending (-0.0 == 0.0 in Python), then index
        s = scores[i]
        return (0, 0.0, i) if math.isnan(s) else (1, s, i)

    dropped = set(sorted(active, key=key)[: min(n, len(active))])
    return [m and i not in dropped for i, m in enumerate(mask)]


def _ref_grow(scores: list[float], mask: list[bool], n: int) -> list[bool]:
    candidates = [i for i, m in enumerate(mask) if not m and math.isfinite(scores[i])]
    grown = set(sorted(candidates, key=lambda i: (-scores[i], i))[:n])
    return [m or i in grown for i, m in enumerate(mask)]


_SPECIAL = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, INF, -INF, NAN, F32MAX, -F32MAX, F32TINY, -F32TINY])
_SCORE = st.one_of(st.floats(width=32), _SPECIAL, st.integers(-3, 3).map(float))


@st.composite
def _case(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    numel = math.prod(shape)
    scores = draw(st.lists(_SCORE, min_size=numel, max_size=numel))
    mask = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
    n = draw(st.integers(0, numel + 3))
    mode = draw(st.sampled_from(["int", "tensor", "tensor_max"]))
    max_n = draw(st.integers(n, numel + 5)) if mode == "tensor_max" else None
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return shape, scores, mask, n, mode, max_n, dtype


def _run(fn, case, device):
    shape, scores, mask, n, mode, max_n, dtype = case
    s = torch.tensor(scores, dtype=dtype, device=device).reshape(shape)
    m = torch.tensor(mask, dtype=torch.bool, device=device).reshape(shape)
    n_arg = n if mode == "int" else torch.tensor(n, device=device)
    out = fn(s, m, n_arg) if max_n is None else fn(s, m, n_arg, max_n=max_n)
    assert out.shape == shape and out.dtype == torch.bool
    return m, out


@given(case=_case())
def test_drop_property(case, device):
    shape, scores, mask, n, *_ = case
    m, out = _run(drop, case, device)
    nnz = sum(mask)
    assert not (out & ~m).any(), "drop activated an entry"
    assert int(out.sum()) == nnz - min(n, nnz)
    assert out.reshape(-1).tolist() == _ref_drop(scores, mask, n)


@given(case=_case())
def test_grow_property(case, device):
    shape, scores, mask, n, *_ = case
    m, out = _run(grow, case, device)
    finite_inactive = sum(1 for s, a in zip(scores, mask) if not a and math.isfinite(s))
    assert not (m & ~out).any(), "grow deactivated an entry"
    assert int(out.sum()) == sum(mask) + min(n, finite_inactive)
    assert out.reshape(-1).tolist() == _ref_grow(scores, mask, n)


@given(case=_case())
def test_int_and_tensor_n_agree(case, device):
    shape, scores, mask, n, *_ = case
    s = torch.tensor(scores, device=device).reshape(shape)
    m = torch.tensor(mask, dtype=torch.bool, device=device).reshape(shape)
    n_t = torch.tensor(n, device=device)
    for fn in (drop, grow):
        ref = fn(s, m, n)
        assert torch.equal(fn(s, m, n_t), ref)
        assert torch.equal(fn(s, m, n_t, max_n=n), ref)
        assert torch.equal(fn(s, m, n_t, max_n=n + 7), ref)

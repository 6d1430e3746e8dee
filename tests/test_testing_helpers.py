"""``rigl_func.testing``: the strategies produce what they promise, and
``check_criterion`` passes on the built-in criteria and names the broken property of
deliberately broken ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from rigl_func import criteria
from rigl_func.testing import CriterionCheckError, check_criterion, masks_with_nnz, param_trees, score_tensors


@given(masks_with_nnz((5, 7), nnz=11))
def test_masks_with_nnz_exact(mask):
    assert mask.dtype == torch.bool and mask.shape == (5, 7) and int(mask.sum()) == 11


@given(score_tensors((40,), kind="nonfinite"))
def test_nonfinite_scores_have_shape_and_dtype(scores):
    assert scores.shape == (40,) and scores.dtype == torch.float32


@given(param_trees([(3, 4), (2, 2, 3)]))
def test_param_trees_are_shaped_like_a_model(trees):
    params, grads = trees
    assert list(params) == ["layer0.weight", "layer1.weight"] and params.keys() == grads.keys()
    assert [tuple(v.shape) for v in params.values()] == [(3, 4), (2, 2, 3)]


@pytest.mark.parametrize("fn, role, overrides", [
    (criteria.magnitude, "drop", {}),
    (criteria.gradient, "grow", {}),
    (criteria.random, "grow", {}),
    (criteria.ema, "grow", {"ema_momentum": 0.9}),
], ids=["magnitude", "gradient", "random", "ema"])
def test_built_in_criteria_pass(fn, role, overrides):
    report = check_criterion(fn, role=role, **overrides)
    assert all(report.values()) and {"pure", "vmap_equals_loop", "compile_equals_eager", "nnz_exact"} <= set(report)


def _in_place(param, grad, mask):
    return grad.abs_()


def _wrong_shape(param, grad, mask):
    return grad.abs().reshape(-1)


def _integer(param, grad, mask):
    return (grad > 0).to(torch.int64)


def _not_deterministic(param, grad, mask):
    return grad.abs() + torch.rand(grad.shape)


def _host_sync(param, grad, mask):
    return grad.abs() * float(grad.abs().max())  # .item(): breaks fullgraph compile


def _graph_break(param, grad, mask):
    torch._dynamo.graph_break()  # a no-op in eager and under vmap; fullgraph=True refuses it
    return grad.abs()


def _missing_key(param, grad, mask, extras):
    return (grad * extras["momentum"]).abs()


def _forbids_first_row(param, grad, mask):
    return torch.where(torch.arange(grad.shape[0]).view(-1, *[1] * (grad.dim() - 1)) == 0, -float("inf"),
                       grad.abs())


@pytest.mark.parametrize("fn, prop", [
    (_in_place, "pure"),
    (_wrong_shape, "shape"),
    (_integer, "dtype"),
    (_not_deterministic, "deterministic"),
    (_host_sync, "vmap_equals_loop"),
    (_graph_break, "compile_equals_eager"),
    (_missing_key, "extras"),
])
def test_broken_criteria_fail_naming_the_property(fn, prop):
    with pytest.raises(CriterionCheckError, match=f"^{prop}: ") as info:
        check_criterion(fn, role="grow")
    assert info.value.property == prop


def test_aux_trees_reach_the_criterion():
    assert check_criterion(_missing_key, role="grow", aux=("momentum",), compile=False)["pure"]


def test_neg_inf_forbids_growth_and_is_checked():
    assert check_criterion(_forbids_first_row, role="grow", compile=False)["no_growth_at_neg_inf"]


def test_role_is_checked():
    with pytest.raises(ValueError, match="role must be 'grow' or 'drop', got role='both'"):
        check_criterion(criteria.gradient, role="both")

"""The criteria protocol (issue 13, item 4) and the silent mistakes caught for free (item 2).

Declared needs (``rigl_func.criterion``), explicit 3-vs-4-argument dispatch, clear
errors for a missing extras key or non-floating scores, the value checks of
``update_topology`` (step 0, off-schedule step, masked gradients) and
``is_update_step(..., state=)``; plus the two literature criteria of
``examples/criteria_zoo.py`` under ``check_criterion`` and a smoke run of the example.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import rigl_func as rf
from rigl_func import criteria as C
from rigl_func.criteria import MissingExtrasError, call_criterion, takes_extras
from rigl_func.testing import check_criterion

from conftest import load_example  # shared test helper

ENGINES = ("batched", "per_layer")


@functools.lru_cache(maxsize=None)
def _zoo():
    return load_example("criteria_zoo")


def _setup(step: int = 10, **overrides):
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(t_end=100, delta=10, sparsity=0.5, distribution="uniform")
    kwargs.update(overrides)
    config = rf.RigLConfig(**kwargs)
    params = {"a": torch.randn(6, 5, generator=gen), "b": torch.randn(4, 6, generator=gen)}
    state = rf.init_state(params, config, seed=0)._replace(step=torch.tensor(step))
    params = rf.apply_masks(params, state.masks)
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    return params, grads, state, config


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


# ----------------------------------------------------------------- item 2 (a), (b): criterion errors
@pytest.mark.parametrize("engine", ENGINES)
def test_missing_extras_key_lists_available_keys_and_points_to_aux(engine):
    def grow_undeclared(param, grad, mask, extras):
        return extras["momentum"].abs()

    params, grads, state, config = _setup(grow_criterion=grow_undeclared)
    with pytest.raises(KeyError) as info:
        rf.update_topology(params, grads, state, config, engine=engine)
    assert isinstance(info.value, MissingExtrasError)
    message = str(info.value)
    assert "grow_undeclared" in message and "extras['momentum']" in message
    assert "available keys: ['key', 'step']" in message
    assert "aux={'momentum': tree}" in message


def test_keyerror_of_a_present_key_is_not_rewritten():
    def broken(param, grad, mask, extras):
        return {"x": param}["y"]

    with pytest.raises(KeyError) as info:
        call_criterion(broken, torch.zeros(2), torch.zeros(2), torch.ones(2, dtype=torch.bool), {"y": torch.zeros(2)})
    assert not isinstance(info.value, MissingExtrasError)


@pytest.mark.parametrize("engine", ENGINES)
def test_non_floating_scores_raise_type_error_naming_the_criterion(engine):
    def grow_as_int(param, grad, mask):
        return (grad * 100).to(torch.int64)

    params, grads, state, config = _setup(grow_criterion=grow_as_int)
    with pytest.raises(TypeError, match=r"criterion 'grow_as_int' must return floating-point scores, got dtype torch.int64"):
        rf.update_topology(params, grads, state, config, engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_wrong_shape_raises_value_error_naming_the_criterion(engine):
    def drop_flat(param, grad, mask):
        return param.abs().reshape(-1)

    params, grads, state, config = _setup(drop_criterion=drop_flat)
    with pytest.raises(ValueError, match=r"criterion 'drop_flat' must return a tensor of shape"):
        rf.update_topology(params, grads, state, config, engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_in_place_criterion_raises_naming_the_input(engine):
    """``g.abs_()`` inside a criterion silently rewrote the caller's gradients."""
    def grow_in_place(param, grad, mask):
        return grad.abs_()

    params, grads, state, config = _setup(grow_criterion=grow_in_place)
    with pytest.raises(ValueError, match=r"criterion 'grow_in_place' modified grad in place \(e.g. grad.abs_\(\)\)"):
        rf.update_topology(params, grads, state, config, engine=engine)

    def drop_touches_extras(param, grad, mask, extras):
        extras["step"].add_(1)
        return param.abs()

    params, grads, state, config = _setup(drop_criterion=drop_touches_extras)
    with pytest.raises(ValueError, match=r"modified extras\['step'\] in place"):
        rf.update_topology(params, grads, state, config, engine=engine)


# ----------------------------------------------------------------- item 2 (c) / item 4: the protocol
def test_dispatch_is_declared_or_read_from_the_signature():
    def three(param, grad, mask):
        return param

    def four(param, grad, mask, extras):
        return param

    def defaulted(param, grad, mask, extras=None):
        return param if extras is None else param + 1

    assert not takes_extras(three) and takes_extras(four) and takes_extras(defaulted)
    declared = rf.criterion(defaulted, takes_extras=False)
    assert declared is defaulted and not takes_extras(declared)
    x = torch.zeros(2)
    assert torch.equal(call_criterion(declared, x, x, x.bool(), {"key": torch.tensor(0)}), x)


def test_criterion_declaration_attributes_and_validation():
    @rf.criterion(needs=("momentum",))
    def grow(param, grad, mask, extras):
        return extras["momentum"]

    assert grow.rigl_needs == ("momentum",) and grow.rigl_takes_extras is True
    assert C.random.rigl_needs == ("key",) and C.ema.rigl_needs == ("ema",)
    assert C.criterion_needs(C.magnitude) == () and C.criterion_needs(C.gradient) == ()
    with pytest.raises(TypeError, match="needs must be a tuple of str"):
        rf.criterion(needs="momentum")
    with pytest.raises(ValueError, match="must take extras, got takes_extras=False"):
        rf.criterion(needs=("momentum",), takes_extras=False)


def test_config_checks_declared_ema_need_and_records_aux_trees():
    @rf.criterion(needs=("ema",))
    def drop_by_ema(param, grad, mask, extras):
        return extras["ema"].abs()

    with pytest.raises(ValueError, match=r"drop_criterion='drop_by_ema' needs extras\['ema'\], which needs ema_momentum"):
        rf.RigLConfig(t_end=100, delta=10, drop_criterion=drop_by_ema)
    with pytest.raises(ValueError, match=r"drop_criterion='ema' needs extras\['ema'\]"):
        rf.RigLConfig(t_end=100, delta=10, drop_criterion="ema")
    assert rf.RigLConfig(t_end=100, delta=10, drop_criterion=drop_by_ema, ema_momentum=0.9)._aux_needs == ()
    zoo = _zoo()
    a = rf.RigLConfig(t_end=100, delta=10, grow_criterion=zoo.grow_by_momentum)
    b = rf.RigLConfig(t_end=100, delta=10, grow_criterion=zoo.grow_by_momentum)
    assert a._aux_needs == (("grow_criterion", "grow_by_momentum", ("momentum",)),)
    assert a == b and hash(a) == hash(b)  # the record is not a field


@pytest.mark.parametrize("engine", ENGINES)
def test_declared_aux_tree_missing_raises_up_front(engine):
    zoo = _zoo()
    params, grads, state, config = _setup(grow_criterion=zoo.grow_by_momentum)
    with pytest.raises(ValueError, match=r"grow_criterion='grow_by_momentum' declares needs=\('momentum',\) "
                                         r"but aux has no \['momentum'\] tree \(aux has \['trend'\]\)"):
        rf.update_topology(params, grads, state, config, aux={"trend": grads}, engine=engine)
    new_params, new_state = rf.update_topology(params, grads, state, config, aux={"momentum": grads}, engine=engine)
    assert {k: int(m.sum()) for k, m in new_state.masks.items()} == {k: int(m.sum()) for k, m in state.masks.items()}


# ----------------------------------------------------------------- item 2 (d), (f): update_topology value checks
def test_update_at_step_zero_warns():
    params, grads, state, config = _setup(step=0)
    _, messages = _caught(lambda: rf.update_topology(params, grads, state, config))
    assert any("update_topology at state.step=0: accumulate was never called" in m for m in messages), messages


def test_update_off_schedule_warns_and_on_schedule_is_silent():
    params, grads, state, config = _setup(step=15)
    _, messages = _caught(lambda: rf.update_topology(params, grads, state, config))
    assert any("not an update step" in m for m in messages), messages
    params, grads, state, config = _setup(step=10)
    _, messages = _caught(lambda: rf.update_topology(params, grads, state, config))
    assert messages == []


def test_value_warnings_are_shown_once_per_call_site():
    params, grads, state, config = _setup(step=15)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            rf.update_topology(params, grads, state, config)
    assert sum("not an update step" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_masked_gradients_warn(engine):
    params, grads, state, config = _setup()
    masked = rf.apply_masks(grads, state.masks)
    (_, new_state), messages = _caught(lambda: rf.update_topology(params, masked, state, config, engine=engine))
    assert any("zero at every inactive entry: they were probably masked; pass the dense gradients" in m
               for m in messages), messages
    assert all(torch.equal(new_state.masks[k], state.masks[k]) for k in state.masks)  # the no-op it warns about
    _, messages = _caught(lambda: rf.update_topology(params, grads, state, config, engine=engine))
    assert messages == []


def test_masked_gradient_check_skips_growth_that_ignores_gradients_and_all_zero_grads():
    params, grads, state, config = _setup(method="set")
    _, messages = _caught(lambda: rf.update_topology(params, rf.apply_masks(grads, state.masks), state, config))
    assert messages == []
    params, grads, state, config = _setup()
    zeros = {k: torch.zeros_like(v) for k, v in grads.items()}
    _, messages = _caught(lambda: rf.update_topology(params, zeros, state, config))
    assert messages == []


def test_value_checks_are_skipped_inside_vmap():
    params, grads, state, config = _setup(step=0)
    masked = rf.apply_masks(grads, state.masks)
    stack = lambda tree: {k: torch.stack([v, v]) for k, v in tree.items()}  # noqa: E731
    states = rf.stack_states([state, state])
    (_, out), messages = _caught(lambda: torch.func.vmap(rf.update_topology, in_dims=(0, 0, 0, None), randomness="different")(
        stack(params), stack(masked), states, config))
    assert messages == []
    assert out.masks["a"].shape == (2, 6, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: debug=True reads values on the device")
def test_debug_flag_checks_on_cuda():
    params, grads, state, config = _setup(step=0)
    to = lambda tree: {k: v.cuda() for k, v in tree.items()}  # noqa: E731
    state = torch.utils._pytree.tree_map(lambda t: t.cuda(), state)
    _, messages = _caught(lambda: rf.update_topology(to(params), to(grads), state, config))
    assert messages == []  # no host sync by default
    _, messages = _caught(lambda: rf.update_topology(to(params), to(grads), state, config, debug=True))
    assert any("state.step=0" in m for m in messages)


# ----------------------------------------------------------------- item 2 (e): is_update_step(state=)
def test_is_update_step_checks_the_user_counter_against_state():
    _, _, state, config = _setup(step=10)
    assert rf.is_update_step(10, config, state=state) is True
    assert rf.is_update_step(11, config, state=state._replace(step=torch.tensor(11))) is False
    with pytest.raises(ValueError, match=r"step=20 disagrees with state.step=10: call rigl_func.accumulate"):
        rf.is_update_step(20, config, state=state)
    assert bool(rf.is_update_step(state.step, config, state=state))  # a tensor step is state.step itself
    meta = state._replace(step=torch.tensor(3, device="meta"))       # not host-readable: not checked, no sync
    assert rf.is_update_step(10, config, state=meta) is True


# ----------------------------------------------------------------- item 4: the zoo example
def test_zoo_criteria_pass_check_criterion():
    zoo = _zoo()
    report = check_criterion(zoo.grow_by_momentum, role="grow", aux=("momentum",))
    assert report["pure"] and report["dtype"] and report["vmap_equals_loop"] and report["compile_equals_eager"]
    report = check_criterion(zoo.drop_by_sensitivity, role="drop")
    assert report["nnz_exact"] and report["update_deterministic"]


def test_zoo_example_smoke():
    zoo = _zoo()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # on schedule, dense gradients: no value warning
        loss = zoo.main(steps=60, seed=0)
    assert loss == loss and loss < 1.4  # finite, and below the chance level ln 4 = 1.39

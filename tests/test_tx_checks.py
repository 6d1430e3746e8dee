"""When ``tx.step`` checks its inputs (issue 18, item 3): at the first call, at update steps,
with ``debug=True`` and after an error; never at later plain steps or under
``torch.compile``. The messages themselves are rows of ``tests/test_bad_inputs.py``."""

from __future__ import annotations

import pytest
import torch

import rigl_func as rf
from rigl_func import _tx_checks, sparse_optimizer


def _setup(debug=False, **kw):
    gen = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(6, 5, generator=gen), "b": torch.randn(4, 6, generator=gen),
              "bias": torch.randn(4, generator=gen)}
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    cfg = rf.RigLConfig(**{"t_end": 100, "delta": 5, "sparsity": 0.5, "distribution": "uniform", **kw})
    tx = rf.rigl(cfg, rf.sgd(0.1), debug=debug)
    p, s = tx.init(params, seed=0)
    return tx, p, grads, s


@pytest.fixture
def calls(monkeypatch):
    seen = []
    real = _tx_checks.check_step_inputs

    def spy(*args, **kwargs):
        seen.append(int(args[2].count.reshape(-1)[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sparse_optimizer, "check_step_inputs", spy)
    return seen


def test_checked_at_first_call_and_update_steps_only(calls):
    tx, p, g, s = _setup()
    for _ in range(11):
        p, s = tx.step(p, g, s)
    assert calls == [0, 4, 9]  # counts before the call: the first call, updates at steps 5 and 10


def test_debug_checks_every_step(calls):
    tx, p, g, s = _setup(debug=True)
    for _ in range(3):
        p, s = tx.step(p, g, s)
    assert calls == [0, 1, 2]


def test_error_at_a_later_plain_step_is_named(calls):
    tx, p, g, s = _setup()
    p, s = tx.step(p, g, s)
    with pytest.raises(ValueError, match=r"params\['b'\] has shape \(6, 4\) but state.rigl.masks\['b'\] has \(4, 6\)"):
        tx.step({**p, "b": p["b"].T.contiguous()}, {**g, "b": g["b"].T.contiguous()}, s)
    assert calls == [0, 1]  # the second check ran only because the step raised


def test_step_ensemble_checks_name_it():
    tx, p, g, s = _setup()
    runs = [tx.init({k: v.clone() for k, v in p.items()}, seed=k) for k in range(2)]
    P, S = rf.stack_states([r[0] for r in runs]), rf.stack_states([r[1] for r in runs])
    G = {k: torch.stack([v, v]) for k, v in g.items()}
    with pytest.raises(ValueError, match=r"tx.step_ensemble\(params, grads, state\): grads lacks 'bias'"):
        tx.step_ensemble(P, {k: G[k] for k in ("a", "b")}, S)
    with pytest.raises(TypeError, match=r"tx.step_ensemble\(params, grads, state\): grads\['a'\] is None"):
        tx.step_ensemble(P, {**G, "a": None}, S)
    P2, S2 = tx.step_ensemble(P, G, S)  # good inputs still step
    assert int(S2.count[0]) == 1


def test_undeclared_extras_with_aux_passes_the_first_step():
    def grow(param, grad, mask, extras):
        return (grad * extras["momentum"]).abs()

    tx, p, g, s = _setup(grow_criterion=grow)
    mom = {"a": torch.ones(6, 5), "b": torch.ones(4, 6)}
    for _ in range(5):
        p, s = tx.step(p, g, s, aux={"momentum": mom})
    assert int(s.rigl.num_updates) == 1


def test_dry_run_does_not_touch_inputs():
    seen = []

    def grow(param, grad, mask, extras):
        seen.append(param.data_ptr())
        return grad.abs()

    tx, p, g, s = _setup(grow_criterion=grow)
    tx.step(p, g, s)
    assert seen and all(ptr not in {t.data_ptr() for t in p.values()} for ptr in seen)  # copies


def test_compiled_step_runs_no_checks(calls):
    tx, p, g, s = _setup()
    p, s = tx.step(p, g, s)  # eager first call: checked once
    step = torch.compile(tx.step, fullgraph=True, backend="eager")
    for _ in range(3):
        p, s = step(p, g, s)
    assert calls == [0]
    assert int(s.count) == 4

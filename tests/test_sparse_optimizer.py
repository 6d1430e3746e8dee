"""``rigl_func.rigl``: one call per training iteration (issue 13, item 1).

``tx.step`` must equal the four-call loop of the primitives bit for bit, compose with
``torch.func.grad`` / ``vmap`` / ``torch.compile(fullgraph=True)`` (no recompiles, no
syncs), and catch the usage mistakes it can see.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_leaves, tree_map

import rigl_func as rf
from rigl_func.dispatch import count_ops


def _net(layers: int = 2, width: int = 24, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    mods, d = [], 12
    for _ in range(layers):
        mods += [torch.nn.Linear(d, width), torch.nn.ReLU()]
        d = width
    return torch.nn.Sequential(*mods, torch.nn.Linear(d, 3))


def _data(seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss(model):
    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)
    return loss


CFG = dict(sparsity=0.8, distribution="erk", delta=3, t_end=16, alpha=0.3)
OPTS = {
    "sgd": lambda: rf.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adamw": lambda: rf.adamw(1e-2, weight_decay=1e-2),
}


def _manual(model, config, opt, steps, seed=0, engine="per_layer", grads_of=None):
    """The four-call loop of the README before issue 13 (the reference)."""
    state = rf.init_state(model, config, seed=seed)
    params = rf.apply_masks({k: v.detach().clone() for k, v in model.named_parameters()}, state.masks)
    opt_state = opt.init(params)
    loss = _loss(model)
    for i in range(steps):
        x, y = _data(i)
        g = grad(loss)(params, x, y)
        state = rf.accumulate(state, g, config)
        if rf.is_update_step(state.step, config):
            old = state.masks
            params, state = rf.update_topology(params, g, state, config, engine=engine)
            opt_state = rf.reset_optimizer_state(opt_state, old, state.masks)
        else:
            params, opt_state = opt.step(params, g, opt_state, state.masks)
    return params, state, opt_state


def _run(tx, model, steps, seed=0, step_fn=None, start=None):
    params, state = start if start is not None else tx.init(model, seed=seed)
    loss = _loss(model)
    step_fn = step_fn or tx.step
    for i in range(int(state.count), steps):
        x, y = _data(i)
        params, state = step_fn(params, grad(loss)(params, x, y), state)
    return params, state


def _equal_trees(a, b) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


@pytest.mark.parametrize("opt_name", sorted(OPTS))
@pytest.mark.parametrize("engine", ["per_layer", "batched"])
@pytest.mark.parametrize("method", ["rigl", "set", "snfs"])
def test_step_equals_the_four_call_loop_bit_for_bit(opt_name, engine, method):
    extra = {"ema_momentum": 0.9} if method == "snfs" else {}
    config = rf.RigLConfig(method=method, **CFG, **extra)
    model = _net()
    tx = rf.rigl(config, OPTS[opt_name](), engine=engine)
    params, state = _run(tx, model, 14)
    ref_params, ref_state, ref_opt = _manual(model, config, OPTS[opt_name](), 14, engine=engine)
    assert _equal_trees(params, ref_params)
    assert _equal_trees(state.rigl, ref_state) and _equal_trees(state.opt, ref_opt)
    assert int(state.rigl.num_updates) == 4  # steps 3, 6, 9, 12
    assert int(state.count) == int(state.rigl.step) == 14
    assert int(state.opt.count) == 14 - 4  # an update step replaces the optimizer step


@pytest.mark.parametrize("extra,updates", [
    (dict(grad_accumulation_n=2), 3),
    (dict(method="static"), 0),
    (dict(structure="n:m", n_m=(1, 4), sparsity=0.75, distribution="uniform"), 3),
    (dict(structure="block", block=(2, 2), distribution="uniform", dense=("4.weight",)), 3),  # 3 outputs: not 2x2
    (dict(grow_init="gradient", grow_init_scale=0.5), 3),
    (dict(grow_init="normal"), 3),
], ids=["accumulate2", "static", "n:m", "block", "grow_init_gradient", "grow_init_normal"])
def test_other_configs_equal_the_four_call_loop(extra, updates):
    model = _net()
    config = rf.RigLConfig(**{**CFG, **extra})
    tx = rf.rigl(config, rf.sgd(0.05, momentum=0.9))
    params, state = _run(tx, model, 10)
    ref_params, ref_state, _ = _manual(model, config, rf.sgd(0.05, momentum=0.9), 10)
    assert _equal_trees(params, ref_params) and _equal_trees(state.rigl, ref_state)
    assert int(state.rigl.num_updates) == updates


def test_exact_nnz_inactive_zero_and_inputs_untouched():
    model = _net(3)
    config = rf.RigLConfig(**CFG)
    tx = rf.rigl(config, rf.adamw(1e-2))
    params, state = tx.init(model, seed=1)
    nnz = {k: int(m.sum()) for k, m in state.rigl.masks.items()}
    loss = _loss(model)
    for i in range(9):
        x, y = _data(i)
        g = grad(loss)(params, x, y)
        before = copy.deepcopy((params, g, state))
        new_params, new_state = tx.step(params, g, state)
        assert _equal_trees((params, g, state), before), "tx.step modified its inputs"
        params, state = new_params, new_state
        assert {k: int(m.sum()) for k, m in state.rigl.masks.items()} == nnz
        for k, m in state.rigl.masks.items():
            assert not params[k][~m].any()
            assert not state.opt.exp_avg[k][~m].any() and not state.opt.exp_avg_sq[k][~m].any()
    assert int(state.rigl.num_updates) == 3


def test_returned_tensors_never_share_storage():
    """torch.cond (compile) rejects aliased operands: eager outputs must be safe to feed it."""
    model = _net(3)
    tx = rf.rigl(rf.RigLConfig(**CFG), rf.sgd(0.05, momentum=0.9), engine="batched")
    for steps in (0, 2, 3, 4):  # init, before, at and after an update (batched: flat-buffer views)
        params, state = _run(tx, model, steps)
        ptrs = [t.untyped_storage().data_ptr() for t in tree_leaves((params, state)) if t.numel()]
        assert len(ptrs) == len(set(ptrs)), steps


def test_model_is_not_modified_and_init_detaches():
    model = _net()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    params, state = rf.rigl(rf.RigLConfig(**CFG), rf.sgd(0.1)).init(model, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    assert all(not p.requires_grad for p in params.values())
    assert state.count.device.type == "cpu" and state.count.dtype == torch.int64 and state.count.dim() == 0


def test_resume_from_a_checkpoint_equals_uninterrupted(tmp_path):
    model = _net()
    tx = rf.rigl(rf.RigLConfig(method="set", **CFG), rf.sgd(0.05, momentum=0.9))
    full = _run(tx, model, 13)
    half = _run(tx, model, 7)
    path = tmp_path / "ckpt.pt"
    rf.save_checkpoint({"params": half[0], "state": half[1]}, path)
    loaded = rf.load_checkpoint(path)  # weights_only=True: the state types are allowlisted
    assert isinstance(loaded["state"], rf.RigLOptimizerState) and isinstance(loaded["state"].opt, rf.SGDState)
    resumed = _run(tx, model, 13, start=(loaded["params"], loaded["state"]))
    assert _equal_trees(full, resumed)


def _stacked(tx, k=3):
    models = [_net(seed=s) for s in range(k)]
    inits = [tx.init(m, seed=s) for s, m in enumerate(models)]
    return models[0], inits, rf.stack_states([p for p, _ in inits]), rf.stack_states([s for _, s in inits])


def _ensemble_data(i, k):
    xs, ys = zip(*(_data(100 * i + j) for j in range(k)))
    return torch.stack(xs), torch.stack(ys)


@pytest.mark.parametrize("how", ["vmap", "step_ensemble"])
def test_k_seeds_in_one_call_equal_a_loop(how):
    tx = rf.rigl(rf.RigLConfig(method="set", **CFG), rf.sgd(0.05, momentum=0.9))
    model, inits, params, state = _stacked(tx)
    loss = _loss(model)
    loop = list(inits)
    for i in range(8):
        x, y = _ensemble_data(i, 3)
        g = vmap(grad(loss))(params, x, y)
        params, state = vmap(tx.step)(params, g, state) if how == "vmap" else tx.step_ensemble(params, g, state)
        loop = [tx.step(p, grad(loss)(p, x[j], y[j]), s) for j, (p, s) in enumerate(loop)]
    assert state.count.tolist() == [8, 8, 8] and state.rigl.num_updates.tolist() == [2, 2, 2]
    assert tx.is_update_step(state) is True  # the next step, 9, updates (read from the [K] counter)
    for j, (p, s) in enumerate(loop):
        assert _equal_trees(tree_map(lambda t: t[j], (params, state)), (p, s))
    assert len({tuple(m.flatten().tolist()) for m in state.rigl.masks["0.weight"]}) == 3  # own masks


def test_ensemble_counts_must_agree():
    tx = rf.rigl(rf.RigLConfig(**CFG), rf.sgd(0.05))
    model, inits, params, state = _stacked(tx, 2)
    state = state._replace(count=torch.tensor([2, 1]), rigl=state.rigl._replace(step=torch.tensor([2, 1])))
    g = tree_map(torch.zeros_like, params)
    with pytest.raises(ValueError, match="different steps"):
        tx.step_ensemble(params, g, state)
    with pytest.raises(ValueError, match="different steps"):
        vmap(tx.step)(params, g, state)
    with pytest.raises(ValueError, match=r"\[K\] int64 CPU"):
        tx.step_ensemble(*inits[0][:1], g, inits[0][1])


def test_compiled_step_fullgraph_no_recompiles_equals_eager():
    """The whole iteration (torch.func.grad + tx.step) in one graph: updates at steps
    3, 6, 9 and optimizer steps in between run without a recompile."""
    model = _net()
    loss = _loss(model)
    tx = rf.rigl(rf.RigLConfig(**CFG), rf.sgd(0.05, momentum=0.9))

    def iteration(params, state, x, y):
        return tx.step(params, grad(loss)(params, x, y), state)

    torch._dynamo.reset()
    compiled = torch.compile(iteration, fullgraph=True)
    eager = tx.init(model, seed=0)
    comp = eager
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(10):
            x, y = _data(i)
            eager = iteration(*eager, x, y)
            comp = compiled(*comp, x, y)
            assert _equal_trees(eager[1].rigl.masks, comp[1].rigl.masks), i
            for k in eager[0]:
                torch.testing.assert_close(comp[0][k], eager[0][k], rtol=1e-5, atol=1e-6)
    assert int(comp[1].count) == 10 and int(comp[1].rigl.num_updates) == 3 and int(comp[1].opt.count) == 7


def test_compiled_step_ensemble_no_recompiles_equals_eager():
    tx = rf.rigl(rf.RigLConfig(**CFG), rf.adamw(1e-2), engine="batched")
    model, _, params, state = _stacked(tx, 2)
    loss = _loss(model)

    def iteration(params, state, x, y):
        return tx.step_ensemble(params, vmap(grad(loss))(params, x, y), state)

    comp = _compiled_equals_eager_ensemble(iteration, params, state, steps=7)
    assert comp[1].rigl.num_updates.tolist() == [2, 2]


def _compiled_equals_eager_ensemble(iteration, params, state, steps: int):
    """Run ``iteration`` eager and compiled (fullgraph, recompiles are errors) on 2
    stacked models; masks must agree at every step. Returns the compiled run."""
    torch._dynamo.reset()
    compiled = torch.compile(iteration, fullgraph=True)
    eager = comp = (params, state)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(steps):
            x, y = _ensemble_data(i, 2)
            eager = iteration(*eager, x, y)
            comp = compiled(*comp, x, y)
            assert _equal_trees(eager[1].rigl.masks, comp[1].rigl.masks), i
    return comp


def _on_meta(tree):
    return tree_map(lambda t: t.to("meta"), tree)


def _step_counts(layers: int) -> list[int]:
    model = _net(layers)
    tx = rf.rigl(rf.RigLConfig(**CFG), rf.sgd(0.05, momentum=0.9), engine="batched")
    params, state = tx.init(model, seed=0)
    params = _on_meta(params)
    state = state._replace(rigl=_on_meta(state.rigl), opt=_on_meta(state.opt))
    grads = tree_map(torch.ones_like, params)
    for _ in range(3):  # warm-up to the first update: builds the update's cached per-layer constants
        params, state = tx.step(params, grads, state)
    launches = []
    for _ in range(3):  # steps 4, 5 (optimizer), 6 (update)
        with count_ops() as ops:
            params, state = tx.step(params, grads, state)
        assert (ops.syncs, ops.host_to_device) == (0, 0), dict(ops.launch_ops)
        launches.append(ops.launches)
    assert int(state.count) == 6  # (the device counters are meta: unreadable)
    return launches


def test_no_device_sync_or_host_copy_and_launches_do_not_grow_with_layers():
    """Counted on the meta device: 0 syncs and 0 host-to-device copies at optimizer
    steps and at an update step (the CPU counter is read on the host, for free); the
    optimizer step's launches do not grow with the number of layers, the update
    step's by at most the few per-layer copies that un-alias its outputs."""
    small, large = _step_counts(2), _step_counts(8)
    assert small[1] == large[1], f"optimizer step: {small[1]} launches for 2 layers, {large[1]} for 8"
    assert large[2] - small[2] <= 0, f"update step: {small[2]} launches for 2 layers, {large[2]} for 8"


def test_custom_optimizer_plugs_in_and_keeps_zeros():
    def init(params):
        return {"velocity": {k: torch.zeros_like(v) for k, v in params.items()}}

    def step(params, grads, state):  # sign updates with decoupled decay: moves zeros unless masked
        vel = {k: 0.9 * state["velocity"][k] + grads[k] for k in params}
        return {k: params[k] * 0.99 - 1e-2 * (vel[k].sign() + 0.1) for k in params}, {"velocity": vel}

    model = _net()
    tx = rf.rigl(rf.RigLConfig(**CFG), rf.custom_optimizer(init, step))
    params, state = _run(tx, model, 10)
    assert int(state.rigl.num_updates) == 3
    for k, m in state.rigl.masks.items():
        assert not params[k][~m].any() and not state.opt["velocity"][k][~m].any()
    # the optimizer state of connections grown at step 9 was reset, then stepped once
    with pytest.raises(TypeError, match="init_fn must be callable"):
        rf.custom_optimizer(None, step)


def test_aux_reaches_criteria_and_a_missing_tree_is_named():
    @rf.criterion(needs=("momentum",))
    def momentum_grow(param, grad, mask, extras):
        return extras["momentum"].abs() + grad.abs()

    config = rf.RigLConfig(grow_criterion=momentum_grow, **CFG)
    tx = rf.rigl(config, rf.sgd(0.05, momentum=0.9))
    model = _net()
    loss = _loss(model)
    params, state = tx.init(model, seed=0)
    momentum = {k: torch.zeros_like(params[k]) for k in state.rigl.masks}
    for i in range(4):  # a momentum of the dense gradients, kept by the loop (SNFS)
        x, y = _data(i)
        g = grad(loss)(params, x, y)
        momentum = {k: 0.9 * momentum[k] + g[k] for k in momentum}
        params, state = tx.step(params, g, state, aux={"momentum": momentum})
    assert int(state.rigl.num_updates) == 1
    # not silently taken from the optimizer's (masked) momentum: a named error
    with pytest.raises(ValueError, match="momentum"):
        _run(tx, model, 4)


def test_masked_gradients_reaching_an_update_warn():
    model = _net()
    tx = rf.rigl(rf.RigLConfig(**CFG), rf.sgd(0.05))
    params, state = tx.init(model, seed=0)
    loss = _loss(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            x, y = _data(i)
            g = rf.apply_masks(grad(loss)(params, x, y), state.rigl.masks)  # the mistake
            params, state = tx.step(params, g, state)
    assert any("masked" in str(w.message) for w in caught)


def test_bad_inputs_are_named():
    config = rf.RigLConfig(**CFG)
    with pytest.raises(TypeError, match="config must be a RigLConfig"):
        rf.rigl({"sparsity": 0.9}, rf.sgd(0.1))
    with pytest.raises(TypeError, match="optimizer must have init"):
        rf.rigl(config, torch.optim.SGD)
    with pytest.raises(ValueError, match="engine must be"):
        rf.rigl(config, rf.sgd(0.1), engine="fast")
    tx = rf.rigl(config, rf.sgd(0.1))
    params, state = tx.init(_net(), seed=0)
    grads = tree_map(torch.zeros_like, params)
    with pytest.raises(TypeError, match="state must be a RigLOptimizerState"):
        tx.step(params, grads, state.rigl)
    with pytest.raises(ValueError, match="state.count must be a 0-d int64 CPU tensor"):
        tx.step(params, grads, state._replace(count=state.count.float()))
    with pytest.raises(ValueError, match="disagrees with state.count"):  # accumulate called on tx's state
        tx.step(params, grads, state._replace(rigl=rf.accumulate(state.rigl, grads, config)))
    with pytest.raises(TypeError, match="aux must be a dict"):
        tx.step(params, grads, state, aux=[1])
    bad = rf.custom_optimizer(lambda p: {"a": {}}, lambda p, g, s: (p, {"b": {}}))
    with pytest.raises(TypeError, match="structure"):  # checked with debug=True (and at compile time)
        rf.rigl(config, bad, debug=True).step(params, grads, rf.rigl(config, bad).init(_net(), seed=0)[1])
    worse = rf.custom_optimizer(lambda p: {"a": {}}, lambda p, g, s: (p, [s]))
    with pytest.raises(TypeError, match="structure"):  # another type: always
        rf.rigl(config, worse).step(params, grads, rf.rigl(config, worse).init(_net(), seed=0)[1])


def test_is_update_step_reads_the_counter():
    tx = rf.rigl(rf.RigLConfig(**CFG), rf.sgd(0.1))
    params, state = tx.init(_net(), seed=0)
    flags = []
    for i in range(7):
        flags.append(tx.is_update_step(state))
        params, state = tx.step(params, tree_map(torch.ones_like, params), state)
    assert flags == [False, False, True, False, False, True, False]


def test_count_ops_separates_device_syncs_from_host_reads():
    with count_ops() as ops:
        torch.ones(()).item()
        bool(torch.ones((), dtype=torch.bool))
    assert (ops.syncs, ops.host_reads) == (0, 2)


def test_compiled_vmap_of_step_runs_both_branches_and_stays_exact():
    """A compiled ``vmap(tx.step)`` cannot branch once (batched predicate): each model
    selects its branch's outputs; masks equal the eager vmap's."""
    tx = rf.rigl(rf.RigLConfig(method="set", **CFG), rf.sgd(0.05, momentum=0.9))
    model, _, params, state = _stacked(tx, 2)
    loss = _loss(model)

    def iteration(params, state, x, y):
        return vmap(lambda p, s, xb, yb: tx.step(p, grad(loss)(p, xb, yb), s))(params, state, x, y)

    comp = _compiled_equals_eager_ensemble(iteration, params, state, steps=4)
    assert comp[1].rigl.num_updates.tolist() == [1, 1] and comp[1].opt.count.tolist() == [3, 3]


def test_step_does_not_chain_autograd_graphs():
    """With an ``autograd.grad`` loop the params require grad; ``tx.step`` runs under
    ``no_grad`` (as ``torch.optim``), so no graph links one step to the next."""
    model = _net()
    tx = rf.rigl(rf.RigLConfig(**CFG), rf.adamw(1e-2))
    params, state = tx.init(model, seed=0)
    for i in range(4):  # crosses the update at step 3
        params = {k: v.requires_grad_(True) for k, v in params.items()}
        x, y = _data(i)
        loss = torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        params, state = tx.step(params, grads, state)
        assert all(v.grad_fn is None for v in tree_leaves((params, state)))  # (passed-through leaves may require grad)
    assert int(state.rigl.num_updates) == 1


def test_load_checkpoint_survives_a_safe_globals_context(tmp_path):
    """``with torch.serialization.safe_globals([RigLState])`` removes RigLState from the
    allowlist on exit, even though rigl_func had added it: load_checkpoint still loads."""
    params, state = rf.rigl(rf.RigLConfig(**CFG), rf.sgd(0.1)).init(_net(), seed=0)
    rf.save_checkpoint(state, tmp_path / "s.pt")
    with torch.serialization.safe_globals([rf.RigLState]):
        pass
    assert rf.RigLState not in torch.serialization.get_safe_globals()
    assert _equal_trees(rf.load_checkpoint(tmp_path / "s.pt"), state)
    torch.serialization.add_safe_globals(rf.checkpoint.state_types())  # leave the process as import left it

"""Fused projections as separate layers (issue 18, item 2): ``RigLConfig(fused_splits=...)``
treats a fused QKV ``[3d, d]`` (``in_proj_weight``, a GPT-style ``c_attn``) as 3 layers of
``[d, d]`` for the distribution and the exact counts, at init and through every update,
while it stays one tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rigl_func as rf
from rigl_func.fused import fused_plan, merge_tree, split_shapes, split_tree

D = 16
SPLITS = {r"in_proj_weight$": 3, r"c_attn\.weight$": 3}


class Block(nn.Module):
    """An MHA block (fused in_proj) and a GPT-style block (fused c_attn Linear(d, 3d))."""

    def __init__(self, d: int = D):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4)
        self.c_attn = nn.Linear(d, 3 * d)
        self.mlp = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x):  # [T, B, d]
        h = x + self.attn(x, x, x, need_weights=False)[0]
        q, k, v = self.c_attn(h).chunk(3, -1)
        h = h + torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return h + self.proj(torch.relu(self.mlp(h)))


def _cfg(**kw):
    base = dict(t_end=100, delta=2, sparsity=0.9, distribution="erk", include=(r"in_proj_weight$",),
                fused_splits=SPLITS, alpha=0.5, schedule="constant")
    base.update(kw)
    return rf.RigLConfig(**base)


def _blocks(masks, cfg):
    """name -> active count of each row block (fused) or of the layer."""
    plan = fused_plan({k: tuple(m.shape) for k, m in masks.items()}, cfg)
    return {k: [int(c.sum()) for c in m.chunk(plan[k])] if k in plan else int(m.sum()) for k, m in masks.items()}


@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
def test_counts_are_those_of_separate_layers(distribution):
    model = Block()
    cfg = _cfg(distribution=distribution)
    shapes = {n: tuple(model.get_parameter(n).shape) for n in rf.sparse_param_names(model, cfg)}
    split = {"attn.in_proj_weight[0/3]": (D, D), "attn.in_proj_weight[1/3]": (D, D),
             "attn.in_proj_weight[2/3]": (D, D), "attn.out_proj.weight": (D, D),
             "c_attn.weight[0/3]": (D, D), "c_attn.weight[1/3]": (D, D), "c_attn.weight[2/3]": (D, D),
             "mlp.weight": (4 * D, D), "proj.weight": (D, 4 * D)}
    assert split_shapes(shapes, cfg) == split
    plain = rf.RigLConfig(t_end=100, delta=2, sparsity=0.9, distribution=distribution)
    per_layer = rf.target_nnz(split, plain)  # the same shapes as genuinely separate layers
    want = {"attn.in_proj_weight": sum(per_layer[f"attn.in_proj_weight[{i}/3]"] for i in range(3)),
            "attn.out_proj.weight": per_layer["attn.out_proj.weight"],
            "c_attn.weight": sum(per_layer[f"c_attn.weight[{i}/3]"] for i in range(3)),
            "mlp.weight": per_layer["mlp.weight"], "proj.weight": per_layer["proj.weight"]}
    assert rf.target_nnz(shapes, cfg) == want
    state = rf.init_state(model, cfg, seed=0)
    got = _blocks(state.masks, cfg)
    for i in range(3):
        assert got["attn.in_proj_weight"][i] == per_layer[f"attn.in_proj_weight[{i}/3]"]
        assert got["c_attn.weight"][i] == per_layer[f"c_attn.weight[{i}/3]"]
    if distribution == "erk":  # the point: a [3d, d] layer as one gets a lower ERK density than 3 of [d, d]
        one = rf.target_nnz(shapes, _cfg(fused_splits=()))
        assert want["attn.in_proj_weight"] > one["attn.in_proj_weight"]


def _train(engine: str, steps: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = Block()
    cfg = _cfg()
    tx = rf.rigl(cfg, rf.sgd(0.1), engine=engine)
    params, state = tx.init(model, seed=seed)
    x = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(1))
    loss = lambda p: torch.func.functional_call(model, p, (x,)).pow(2).mean()  # noqa: E731
    history = [(params, state)]
    for _ in range(steps):
        params, state = tx.step(params, torch.func.grad(loss)(params), state)
        history.append((params, state))
    return cfg, history


@pytest.mark.parametrize("engine", ["per_layer", "batched"])
def test_block_counts_hold_through_updates(engine):
    cfg, history = _train(engine)
    first = _blocks(history[0][1].rigl.masks, cfg)
    moved = 0
    for params, state in history[1:]:
        assert _blocks(state.rigl.masks, cfg) == first
        rf.check_state(state.rigl, params, cfg)  # checks every block's count
        for k, m in state.rigl.masks.items():
            assert bool((params[k][~m] == 0).all())
    for k in ("attn.in_proj_weight", "c_attn.weight"):
        moved += int((history[-1][1].rigl.masks[k] & ~history[0][1].rigl.masks[k]).sum())
    assert int(history[-1][1].rigl.num_updates) == 4 and moved > 0


def test_batched_equals_per_layer_bit_for_bit():
    _, a = _train("per_layer")
    _, b = _train("batched")
    for (pa, sa), (pb, sb) in zip(a, b):
        for k in sa.rigl.masks:
            assert torch.equal(sa.rigl.masks[k], sb.rigl.masks[k]), k
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k


def test_step_ensemble_equals_loop():
    model = Block()
    cfg = _cfg()
    tx = rf.rigl(cfg, rf.sgd(0.1))
    runs = [tx.init(Block(), seed=k) for k in range(2)]
    x = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(1))
    loss = lambda p: torch.func.functional_call(model, p, (x,)).pow(2).mean()  # noqa: E731
    P, S = rf.stack_states([r[0] for r in runs]), rf.stack_states([r[1] for r in runs])
    loop = list(runs)
    for _ in range(4):
        P, S = tx.step_ensemble(P, torch.func.vmap(torch.func.grad(loss))(P), S)
        loop = [tx.step(p, torch.func.grad(loss)(p), s) for p, s in loop]
    for k, (p, s) in enumerate(loop):
        for name in s.rigl.masks:
            assert torch.equal(S.rigl.masks[name][k], s.rigl.masks[name])
            assert torch.equal(P[name][k], p[name])


def test_compiled_step_equals_eager_masks():
    cfg, eager = _train("per_layer", steps=4)
    torch.manual_seed(0)
    model = Block()
    tx = rf.rigl(cfg, rf.sgd(0.1), engine="per_layer")
    params, state = tx.init(model, seed=0)
    x = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(1))
    loss = lambda p: torch.func.functional_call(model, p, (x,)).pow(2).mean()  # noqa: E731
    params, state = tx.step(params, torch.func.grad(loss)(params), state)
    step = torch.compile(tx.step, fullgraph=True, backend="eager")
    for _ in range(3):
        params, state = step(params, torch.func.grad(loss)(params), state)
    for k, m in eager[-1][1].rigl.masks.items():
        assert torch.equal(state.rigl.masks[k], m), k


def test_check_state_names_the_block():
    model = Block()
    cfg = _cfg()
    state = rf.init_state(model, cfg, seed=0)
    m = state.masks["attn.in_proj_weight"].clone()
    rows = m.reshape(3, D, D)
    # move one active entry from block 0 to block 1: the total is unchanged
    src = rows[0].reshape(-1).nonzero()[0, 0]
    dst = (~rows[1].reshape(-1)).nonzero()[0, 0]
    rows[0].view(-1)[src] = False
    rows[1].view(-1)[dst] = True
    bad = state._replace(masks={**state.masks, "attn.in_proj_weight": rows.reshape(3 * D, D)})
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"state.masks\['attn.in_proj_weight\[0/3\]'\] has \d+ active entries"):
        rf.check_state(bad, params, cfg)


def test_split_and_merge_are_inverse_views():
    t = torch.arange(12.0).reshape(6, 2)
    parts = split_tree({"qkv": t, "o": t}, {"qkv": 3})
    assert list(parts) == ["qkv[0/3]", "qkv[1/3]", "qkv[2/3]", "o"]
    assert parts["qkv[1/3]"].data_ptr() == t[2:4].data_ptr()  # views, no copy
    assert torch.equal(merge_tree(parts, {"qkv": 3})["qkv"], t)


def test_config_field():
    cfg = _cfg()
    assert cfg.fused_splits == ((r"in_proj_weight$", 3), (r"c_attn\.weight$", 3))
    assert hash(cfg) == hash(_cfg(fused_splits=tuple(SPLITS.items())))
    with pytest.raises(TypeError, match="fused_splits must be a dict"):
        _cfg(fused_splits={"x": 2.5})
    with pytest.raises(ValueError, match=r"fused_splits\['x'\] must be an int >= 1, got 0"):
        _cfg(fused_splits={"x": 0})
    with pytest.raises(ValueError, match="fused_splits has an invalid regex"):
        _cfg(fused_splits={"(": 3})


def test_bad_fused_layers_are_named():
    with pytest.raises(ValueError, match=r"'mlp.weight' has shape \(64, 16\), whose dim 0 is not divisible by k=5"):
        rf.init_state(Block(), _cfg(fused_splits={r"^mlp\.weight$": 5}), seed=0)
    # in_proj_weight left dense (no include=): the split pattern would do nothing -- an error
    with pytest.raises(ValueError, match=r"fused_splits pattern 'in_proj_weight\$' matches no sparse layer"):
        rf.init_state(Block(), _cfg(include=(), fused_splits={r"in_proj_weight$": 3}), seed=0)


def test_scheduler_holds_block_counts_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = Block()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(dense_allocation=0.1, T_end=100, delta=2, sparsity_distribution="erk", ignore_linear_layers=False,
              include=(r"in_proj_weight$",), fused_splits=SPLITS)
    pruner = rf.RigLScheduler(model, opt, **kw)
    cfg = pruner.config
    assert cfg.fused_splits == tuple(SPLITS.items())
    # the same sparse set and per-block counts as the functional path
    state = rf.init_state(model, cfg, seed=0)
    assert _blocks(pruner.state.masks, cfg) == _blocks(state.masks, cfg)
    first = _blocks(pruner.state.masks, cfg)
    x = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(1))
    for _ in range(6):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if pruner():
            opt.step()
    assert pruner.rigl_steps == 3 and _blocks(pruner.state.masks, cfg) == first
    torch.save(pruner.state_dict(), tmp_path / "sd.pt")
    pruner.remove()
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    again = rf.RigLScheduler(model, opt, state_dict=sd)
    assert again.config.fused_splits == cfg.fused_splits
    again.remove()
    again = rf.RigLScheduler(model, opt, state_dict=sd, **kw)  # explicit, equal arguments agree
    again.remove()


@pytest.mark.parametrize("kw", [dict(method="snfs"), dict(method="set", grow_init="normal"),
                                dict(grad_accumulation_n=2, delta=4), dict(structure="block", block=(4, 4)),
                                dict(structure="n:m", n_m=(2, 4))], ids=["snfs", "set", "accumulate", "block", "n:m"])
def test_block_counts_hold_for_every_method_and_structure(kw):
    torch.manual_seed(0)
    model = Block()
    cfg = _cfg(**kw)
    tx = rf.rigl(cfg, rf.adamw(1e-2))
    params, state = tx.init(model, seed=0)
    first, start = _blocks(state.rigl.masks, cfg), state.rigl.masks
    x = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(1))
    loss = lambda p: torch.func.functional_call(model, p, (x,)).pow(2).mean()  # noqa: E731
    for _ in range(8):
        params, state = tx.step(params, torch.func.grad(loss)(params), state)
        assert _blocks(state.rigl.masks, cfg) == first
    rf.check_state(state.rigl, params, cfg)  # the structure's pattern holds in every block too
    assert sum(int((state.rigl.masks[k] & ~start[k]).sum()) for k in start) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the batched engine is the default there)")
def test_block_counts_hold_on_cuda_batched_equals_per_layer():
    masks = {}
    for engine in ("batched", "per_layer"):
        torch.manual_seed(0)
        model = Block().cuda()
        cfg = _cfg()
        tx = rf.rigl(cfg, rf.sgd(0.1), engine=engine)
        params, state = tx.init(model, seed=0)
        first = _blocks(state.rigl.masks, cfg)
        x = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(1)).cuda()
        loss = lambda p: torch.func.functional_call(model, p, (x,)).pow(2).mean()  # noqa: E731
        for _ in range(6):
            params, state = tx.step(params, torch.func.grad(loss)(params), state)
        assert _blocks(state.rigl.masks, cfg) == first
        masks[engine] = {k: m.cpu() for k, m in state.rigl.masks.items()}
    for k in masks["batched"]:
        assert torch.equal(masks["batched"][k], masks["per_layer"][k]), k

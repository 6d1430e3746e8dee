"""The one sparsity rule (issue 18): ``init_state``, ``sparse_param_names``, ``tx.init`` and
``RigLScheduler`` choose the same sparse weights on a language-model-like module with a
tied embedding/head, ``nn.MultiheadAttention``, an LSTM, LayerNorm, a frozen layer and a
parametrized layer; ``include=`` adds weights, ``exclude=``/``dense=`` remove them."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import rigl_func as rf


class _Sym(nn.Module):
    def forward(self, w):
        return (w + w.T) / 2


class TinyLM(nn.Module):
    """Every module type the rule distinguishes, in one model."""

    def __init__(self, vocab: int = 11, d: int = 8, tie_first: bool = True):
        super().__init__()
        if tie_first:
            self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(6, d)  # learned positions: an embedding, dense
        self.attn = nn.MultiheadAttention(d, 2)
        self.ln = nn.LayerNorm(d)
        self.lstm = nn.LSTM(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.frozen = nn.Linear(d, d)
        self.frozen.weight.requires_grad_(False)
        self.sym = nn.Linear(d, d)
        parametrize.register_parametrization(self.sym, "weight", _Sym())
        self.head = nn.Linear(d, vocab, bias=False)
        if not tie_first:  # head defined first, embedding tied to it afterwards
            self.emb = nn.Embedding(vocab, d)
        self.head.weight = self.emb.weight

    def forward(self, tokens):  # [T, B] int64 -> [T, B, vocab]
        h = self.emb(tokens) + self.pos(torch.arange(tokens.shape[0]))[:, None]
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.ln(h + self.mlp(h))
        return self.head(h)


#: The module rule on TinyLM: Linear weights only (out_proj is a Linear), no embeddings,
#: no tied head, no in_proj_weight, no LSTM, no frozen or parametrized weight.
EXPECTED = ["attn.out_proj.weight", "mlp.0.weight", "mlp.2.weight"]


def _cfg(**kw):
    return rf.RigLConfig(**{"t_end": 100, "delta": 10, "sparsity": 0.8, "distribution": "erk", **kw})


def _four(model: nn.Module, **rules) -> dict[str, list[str]]:
    """The sparse set of each entry point, for one model and one set of layer rules."""
    cfg = _cfg(**rules)
    tx = rf.rigl(cfg, rf.sgd(0.1))
    _, state = tx.init(model, seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    pruner = rf.RigLScheduler(model, opt, dense_allocation=0.2, T_end=100, delta=10, sparsity_distribution="erk",
                              ignore_linear_layers=False, **rules)
    try:
        return {
            "sparse_param_names": rf.sparse_param_names(model, cfg),
            "init_state": list(rf.init_state(model, cfg, seed=0).masks),
            "tx.init": list(state.rigl.masks),
            "RigLScheduler": list(pruner.state.masks),
        }
    finally:
        pruner.remove()


@pytest.fixture(autouse=True)
def _quiet_parametrize_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"layers \['sym'\] have a parametrized weight")
        yield


@pytest.mark.parametrize("tie_first", [True, False], ids=["emb-first", "head-first"])
def test_four_entry_points_agree_by_default(tie_first):
    got = _four(TinyLM(tie_first=tie_first))
    for entry, names in got.items():
        assert names == EXPECTED, entry


def test_include_adds_in_proj_weight_everywhere():
    got = _four(TinyLM(), include=(r"in_proj_weight$",))
    for entry, names in got.items():
        assert names == ["attn.in_proj_weight"] + EXPECTED, entry


def test_include_adds_an_embedding_and_its_tied_head_once():
    model = TinyLM()
    canonical = [n for n, p in model.named_parameters() if p is model.emb.weight][0]
    for pattern in (r"^emb\.weight$", r"^head\.weight$"):  # either name of the tied tensor
        got = _four(model, include=(pattern,))
        for entry, names in got.items():
            assert canonical in names and names.count(canonical) == 1, entry
            assert set(names) == {canonical, *EXPECTED}, entry
    # the one mask is used through both names: functional_call ties them
    tx = rf.rigl(_cfg(include=(r"^head\.weight$",)), rf.sgd(0.1))
    params, state = tx.init(model, seed=0)
    assert "head.weight" not in params or params["head.weight"] is params[canonical]
    assert int(state.rigl.masks[canonical].sum()) < model.emb.weight.numel()


def test_exclude_of_either_tied_name_keeps_it_dense():
    model = TinyLM()
    cfg = _cfg(include=(r"^emb\.weight$",), exclude=(r"^head\.",))
    assert rf.sparse_param_names(model, cfg) == EXPECTED


def test_exclude_and_dense_remove():
    got = _four(TinyLM(), include=(r"in_proj_weight$",), exclude=(r"^mlp\.0\.",), dense=("attn.out_proj.weight",))
    for entry, names in got.items():
        assert names == ["attn.in_proj_weight", "mlp.2.weight"], entry


def test_frozen_weight_named_is_sparse_in_the_functional_path():
    model = TinyLM()
    cfg = _cfg(include=(r"^frozen\.weight$",))
    assert "frozen.weight" in rf.sparse_param_names(model, cfg)
    _, state = rf.rigl(cfg, rf.sgd(0.1)).init(model, seed=0)
    assert "frozen.weight" in state.rigl.masks
    # the shell cannot train it (no gradient): a named error
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="'frozen.weight' has requires_grad=False"):
        rf.RigLScheduler(model, opt, dense_allocation=0.2, T_end=100, delta=10, ignore_linear_layers=False,
                         sparsity_distribution="erk", include=(r"^frozen\.weight$",))


def test_parametrized_layer_warns_and_can_be_named():
    model = TinyLM()
    with pytest.warns(UserWarning, match=r"layers \['sym'\] have a parametrized weight"):
        rf.sparse_param_names(model, _cfg())
    original = "sym.parametrizations.weight.original"
    names = rf.sparse_param_names(model, _cfg(include=(original.replace(".", r"\."),)))
    assert original in names


def test_lstm_weights_can_be_added():
    model = TinyLM()
    names = rf.sparse_param_names(model, _cfg(include=(r"^lstm\.weight_",)))
    assert [n for n in names if n.startswith("lstm")] == ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]


def test_include_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"include pattern 'in_prj' matches no parameter name"):
        rf.init_state(TinyLM(), _cfg(include=("in_prj",)), seed=0)


def test_include_of_1d_params_adds_nothing():
    model = TinyLM()
    assert rf.sparse_param_names(model, _cfg(include=(r"bias$",))) == EXPECTED


def test_dense_accepts_either_tied_name():
    model = TinyLM()
    for name in ("emb.weight", "head.weight"):
        assert rf.sparse_param_names(model, _cfg(include=(r"^emb\.",), dense=(name,))) == EXPECTED
    with pytest.raises(ValueError, match=r"config.dense names parameters that do not exist: \['hed.weight'\]"):
        rf.sparse_param_names(model, _cfg(dense=("hed.weight",)))


def test_dict_rule_is_unchanged():
    """A dict of tensors has no module types: every float tensor with >= 2 dims."""
    model = TinyLM()
    params = dict(model.named_parameters())
    names = rf.sparse_param_names(params, _cfg())
    assert names == [n for n, p in params.items() if p.dim() >= 2 and p.is_floating_point()]
    assert "attn.in_proj_weight" in names and "emb.weight" in names
    assert list(rf.init_state(params, _cfg(), seed=0).masks) == names
    assert list(rf.rigl(_cfg(), rf.sgd(0.1)).init(params, seed=0)[1].rigl.masks) == names


def test_tx_init_trains_the_tied_lm():
    """tx.init(model) + tx.step with functional_call on the tied model (the head reads the
    dense embedding through its second name): exact counts kept, inactive entries 0."""
    torch.manual_seed(0)
    model = TinyLM()
    cfg = _cfg(include=(r"in_proj_weight$",), delta=2, t_end=10)
    tx = rf.rigl(cfg, rf.sgd(0.05))
    params, state = tx.init(model, seed=0)
    assert "head.weight" not in params  # tied: reported once, under its first name
    x = torch.randint(0, 11, (5, 3))
    loss = lambda p: torch.func.functional_call(model, p, (x,)).logsumexp(-1).mean()  # noqa: E731
    nnz = {k: int(m.sum()) for k, m in state.rigl.masks.items()}
    for _ in range(4):
        params, state = tx.step(params, torch.func.grad(loss)(params), state)
    assert {k: int(m.sum()) for k, m in state.rigl.masks.items()} == nnz
    assert int(state.rigl.num_updates) == 2
    for k, m in state.rigl.masks.items():
        assert bool((params[k][~m] == 0).all())


def test_dict_with_a_tied_tensor_twice_is_an_error():
    model = TinyLM()
    params = dict(model.named_parameters(remove_duplicate=False))
    with pytest.raises(ValueError, match=r"params\['emb.weight'\] and params\['head.weight'\] are the same tensor"):
        rf.init_state(params, _cfg(), seed=0)

"""A GPT-style byte-level language model trained sparse with RigL, on the Python standard library.

The corpus is real text present on every machine with Python: the standard library's own
source files (``sysconfig.get_paths()["stdlib"]``). A fixed, sorted list of modules
(:data:`TRAIN_MODULES`, about 1.9 MB) is concatenated for training and a fixed, disjoint
list (:data:`VAL_MODULES`, about 135 kB) is held out for validation; every name exists on
Python 3.11, 3.12 and 3.13 (a package such as ``logging`` is read from its
``__init__.py``). The files differ a little between Python versions, so ``results.json``
records the Python version, the corpus sizes and their SHA-256.

The model (:class:`GPT`) is a pre-norm transformer: learned token and position embeddings,
blocks of ``LayerNorm -> causal self-attention (q, k, v, o projections, SDPA) -> residual``
and ``LayerNorm -> MLP (4x, GELU) -> residual``, a final LayerNorm, and an output head tied
to the token embedding. The sparse weights are the attention projections and the MLP
matrices (the ``nn.Linear`` weights: the library's module rule); embeddings, the tied head,
norms and biases stay dense. The sparse set is printed at start. Every sparse matmul goes through
one function, :func:`linear` (``x @ w.T + b``): the place to swap in a sparse kernel.

Training is functional: ``torch.func.grad`` of a ``functional_call`` loss, then one
``tx.step`` of ``rigl_func.rigl(config, rigl_func.adamw(schedule))`` per iteration
(warm-up + cosine learning rate). Methods: ``dense``, ``static``, ``set``, ``rigl``
(uniform), ``rigl-erk``, ``static-erk``, ``set-erk``, and block-structured variants
``<method>-b16`` / ``-b32`` / ``-b64`` (``structure="block"`` with square blocks; e.g.
``rigl-b32``, ``rigl-erk-b16``). Prints a results table (validation loss and bits per byte,
mean ± std over seeds, density, training and inference FLOPs relative to dense), saves
plots (validation-loss curves, mean ± 1 std band over seeds; final bits per byte against
sparsity) and ``results.json`` in ``--out``.

    python examples/train_lm.py                      # dense, static, SET, RigL, RigL-ERK at 90%, 3 seeds (2 workers)
    python examples/train_lm.py --smoke              # CI: < 1 min on 2 CPU cores
    python examples/train_lm.py --study              # the docs/results.md LM study (see there)
    python examples/train_lm.py --ensemble --seeds 4 --methods rigl   # 4 seeds in one vmap'd step_ensemble
    python examples/train_lm.py --methods dense rigl-b32 --sparse-kernels --seeds 1   # ms/step: kernels vs dense
    python examples/train_lm.py --device cuda --layers 6 --width 384 --heads 6 --context 256 \\
        --batch-size 64 --steps 5000 --jobs 1 --sparsity 0.8 0.9 0.95   # a larger model on a GPU

``OMP_NUM_THREADS=1`` is advised on a shared machine; ``--jobs`` worker processes run one
(``--threads``) torch thread each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import platform
import re
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

import rigl_func as rf

# ----------------------------------------------------------------------------- corpus
#: Training modules (sorted). Every name exists on CPython 3.11-3.13.
TRAIN_MODULES = (
    "argparse", "ast", "calendar", "cmd", "codecs", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "difflib", "dis", "enum", "fnmatch", "functools", "getopt", "gettext", "glob", "gzip",
    "inspect", "ipaddress", "locale", "logging", "numbers", "operator", "optparse", "pickle", "pprint",
    "queue", "random", "selectors", "shutil", "socket", "string", "subprocess", "tarfile", "tempfile",
    "threading", "tokenize", "traceback", "typing", "uuid", "weakref",
)
#: Held-out validation modules (sorted, disjoint from the training list).
VAL_MODULES = ("bisect", "fractions", "heapq", "shlex", "statistics", "textwrap")


def module_file(stdlib: Path, name: str) -> Path:
    """The source file of standard-library module ``name``: ``name.py``, or ``name/__init__.py``
    for a package. Raises ``FileNotFoundError`` naming the module and the directory."""
    for path in (stdlib / f"{name}.py", stdlib / name / "__init__.py"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"standard-library module {name!r} has no source file under {stdlib} "
                            f"(a Python without its .py sources?)")


def load_corpus(stdlib: Optional[Path] = None) -> dict[str, Any]:
    """The training and validation byte streams.

    Returns:
        ``{"train": uint8 [N_train], "val": uint8 [N_val], "info": {...}}`` where each file's
        bytes are followed by ``b"\\n"``; ``info`` has the stdlib path, the Python version, the
        sizes and the SHA-256 of both streams.
    """
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if set(TRAIN_MODULES) & set(VAL_MODULES):
        raise ValueError("TRAIN_MODULES and VAL_MODULES overlap")
    out: dict[str, Any] = {"info": {"stdlib": str(stdlib), "python": platform.python_version()}}
    for split, names in (("train", TRAIN_MODULES), ("val", VAL_MODULES)):
        data = b"".join(module_file(stdlib, n).read_bytes() + b"\n" for n in sorted(names))
        out[split] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out["info"][f"{split}_bytes"] = len(data)
        out["info"][f"{split}_sha256"] = hashlib.sha256(data).hexdigest()
    return out


_CORPUS: dict[str, Any] = {}


def corpus() -> dict[str, Any]:
    """:func:`load_corpus`, cached per process (workers load it themselves)."""
    if not _CORPUS:
        _CORPUS.update(load_corpus())
    return _CORPUS


# ----------------------------------------------------------------------------- model
@dataclass(frozen=True)
class GPTConfig:
    """Shape of :class:`GPT` (byte vocabulary of 256)."""

    layers: int = 2
    width: int = 128
    heads: int = 4
    context: int = 64
    vocab: int = 256

    def __post_init__(self) -> None:
        for name in ("layers", "width", "heads", "context", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if self.width % self.heads:
            raise ValueError(f"width must be divisible by heads, got width={self.width}, heads={self.heads}")


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The one place where the model's sparse layers are computed: ``x @ weight.T + bias``.

    ``weight`` is the masked dense weight (``[out, in]``, inactive entries 0). With
    ``--sparse-kernels`` the block-structured runs swap these modules for ``rigl_func.SparseLinear``
    (``rigl_func.sparse_modules``: same parameter names, block-sparse kernels); nothing else changes.
    """
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` that computes through :func:`linear` (so the library's module rule makes its
    weight sparse, and ``rigl_func.forward_flops`` counts its matmul under its name)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention, ``[B, H, T, D] -> [B, H, T, D]``, with ``F.scaled_dot_product_attention``.

    Under ``torch.func.vmap`` (ensembles) run it inside
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``: the fused CPU kernel
    (``_scaled_dot_product_flash_attention_for_cpu``) has no batching rule, so vmap would warn
    and fall back to a slow per-model loop; the math path is made of batchable ops.
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.width
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.fc1, self.fc2 = Linear(d, 4 * d), Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (proj(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        x = x + self.o(attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """Byte-level GPT: ``tokens int64 [B, T] -> logits [B, T, 256]``, head tied to the embedding."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        for name, p in self.named_parameters():  # GPT-2 init; residual projections scaled by depth
            if name.endswith("weight") and p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("o.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias") and "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok.weight)  # tied head: dense


# ----------------------------------------------------------------------------- methods
BASE_METHODS = {  # name -> (rigl_func method, distribution)
    "dense": ("static", "uniform"),
    "static": ("static", "uniform"),
    "set": ("set", "uniform"),
    "rigl": ("rigl", "uniform"),
    "static-erk": ("static", "erk"),
    "set-erk": ("set", "erk"),
    "rigl-erk": ("rigl", "erk"),
}
BLOCK_SIZES = (16, 32, 64)
_METHOD_RE = re.compile(r"^(?P<base>[a-z-]+?)(?:-b(?P<block>\d+))?$")


def parse_method(name: str) -> tuple[str, str, Optional[int]]:
    """``"rigl-erk-b32" -> ("rigl", "erk", 32)``; ``"set" -> ("set", "uniform", None)``."""
    m = _METHOD_RE.match(name)
    base, block = (m.group("base"), m.group("block")) if m else (None, None)
    if base not in BASE_METHODS or (block is not None and (int(block) not in BLOCK_SIZES or base == "dense")):
        raise argparse.ArgumentTypeError(
            f"method must be one of {list(BASE_METHODS)}, optionally with -b16/-b32/-b64 (block structure; "
            f"not for dense), got {name!r}")
    rule, distribution = BASE_METHODS[base]
    return rule, distribution, None if block is None else int(block)


def method_name(name: str) -> str:
    parse_method(name)
    return name


def sort_key(method: str) -> tuple:
    rule, dist, block = parse_method(method)
    base = method.split("-b")[0] if block else method
    return (list(BASE_METHODS).index(base), block or 0)


# ----------------------------------------------------------------------------- training
def lr_schedule(lr: float, steps: int, warmup: int) -> Callable[[Tensor], Tensor]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``lr / 10`` at ``steps``; a function of
    the optimizer's step count (0-d int64 tensor) returning a 0-d float tensor (no host sync)."""

    def at(count: Tensor) -> Tensor:
        c = count.to(torch.float32)
        warm = torch.clamp((c + 1) / max(warmup, 1), max=1.0)
        progress = torch.clamp((c - warmup) / max(steps - warmup, 1), 0.0, 1.0)
        return lr * warm * (0.1 + 0.45 * (1 + torch.cos(math.pi * progress)))

    return at


def make_tx(method: str, sparsity: float, steps: int, args: argparse.Namespace, model: nn.Module) -> rf.RigLOptimizer:
    """``rf.rigl(config, rf.adamw(...))`` for one method. ``dense`` is ``static`` at sparsity 0 (all-ones
    masks: the same code path). The sparse set is the module rule's (``rf.sparse_param_names(model)``: the
    ``Linear`` weights), passed as exact ``include`` patterns so that ``tx.init`` uses the same set."""
    rule, distribution, block = parse_method(method)
    names = rf.sparse_param_names(model)
    config = rf.RigLConfig(
        sparsity=0.0 if method == "dense" else sparsity, distribution=distribution, method=rule,
        delta=args.delta, alpha=args.alpha, t_end=max(1, int(args.end_fraction * steps)),
        include=tuple(f"^{re.escape(n)}$" for n in names),
        structure="block" if block else "unstructured", block=(block, block) if block else (4, 4))
    warmup = max(1, int(args.warmup * steps))
    return rf.rigl(config, rf.adamw(lr_schedule(args.lr, steps, warmup), betas=(0.9, 0.95),
                                    weight_decay=args.weight_decay))


def batch_at(data: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-byte targets, ``int64 [B, context]`` each, of the windows starting at ``starts``."""
    idx = starts[:, None] + torch.arange(context + 1)
    win = data[idx].long()
    return win[:, :-1], win[:, 1:]


def val_starts(n: int, windows: int, context: int) -> Tensor:
    """``windows`` evenly spaced window starts over a stream of ``n`` bytes (fixed: the same in every run)."""
    return torch.linspace(0, n - context - 2, windows).long()


def loss_of(model: nn.Module) -> Callable[[dict, Tensor, Tensor], Tensor]:
    def loss_fn(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, params, (x,))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return loss_fn


def evaluate(loss_fn, params: dict[str, Tensor], val: Tensor, starts: Tensor, context: int, chunk: int = 64) -> float:
    """Mean next-byte cross-entropy (nats) over the fixed validation windows."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(starts), chunk):
            x, y = batch_at(val, starts[i:i + chunk], context)
            total += float(loss_fn(params, x.to(_dev(params)), y.to(_dev(params)))) * len(x)
    return total / len(starts)


def clip_grad_norm(grads: dict[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """``grads`` scaled by ``min(1, max_norm / global_norm)`` (as ``torch.nn.utils.clip_grad_norm_``, pure, no
    host sync; ``max_norm <= 0``: unchanged). One factor for every tensor, so RigL's growth ranking is unchanged."""
    if max_norm <= 0:
        return grads
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {k: g * scale for k, g in grads.items()}


def _dev(params: dict[str, Tensor]) -> torch.device:
    return next(iter(params.values())).device


def train_one(job: tuple[str, float, int, int], args: argparse.Namespace) -> dict:
    """One ``(method, sparsity, seed, steps multiplier)`` run; returns its curves, losses, counts and FLOPs.

    ``seed`` seeds the initial weights (``torch.manual_seed``), the random masks (``tx.init(seed=)``), the
    batch order (a ``torch.Generator``) and the SET growth (the state's key).
    """
    method, sparsity, seed, mult = job
    data = corpus()
    cfg = GPTConfig(layers=args.layers, width=args.width, heads=args.heads, context=args.context)
    dev = torch.device(args.device)
    torch.manual_seed(seed)
    model = GPT(cfg).to(dev)
    steps = args.steps * mult
    tx = make_tx(method, sparsity, steps, args, model)
    params, state = tx.init(model, seed=seed)
    loss_fn = loss_of(model)
    step_fn = grad_and_value(loss_fn)
    block = parse_method(method)[2]
    kernels = bool(getattr(args, "sparse_kernels", False)) and block is not None
    if kernels:  # --sparse-kernels: the block-sparse Linear layers run rigl_func.sparse_linear
        layouts = rf.block_layouts(state.rigl.masks, (block, block))  # once per topology update
        smodel = rf.sparse_modules(model, layouts)  # same parameter names: the same params dict
        loss_fn = loss_of(smodel)
        step_fn = grad_and_value(loss_fn)
    train, val = data["train"], data["val"]
    starts_val = val_starts(len(val), args.val_windows, cfg.context)
    gen = torch.Generator().manual_seed(10_000 + seed)
    every = max(1, steps // args.evals)
    curve, train_curve, running = [], [], []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(train) - cfg.context - 1, (args.batch_size,), generator=gen)
        x, y = (t.to(dev) for t in batch_at(train, starts, cfg.context))
        update = kernels and tx.is_update_step(state)  # the dense weight gradient only where RigL reads it
        if kernels:
            rf.set_layouts_(smodel, rf.with_dense_grad(layouts, update))
        grads, loss = step_fn(params, x, y)
        params, state = tx.step(params, clip_grad_norm(grads, args.clip), state)
        if update:
            layouts = rf.block_layouts(state.rigl.masks, (block, block))
        if step % 10 == 0 or step == steps:
            running.append(float(loss))
        if step % every == 0 or step == steps:
            curve.append((step, evaluate(loss_fn, params, val, starts_val, cfg.context)))
            train_curve.append((step, statistics.mean(running) if running else float(loss)))
            running = []
    seconds = time.perf_counter() - t0
    chosen = "+".join(sorted({lay.kernel for lay in layouts.values()})) if kernels else ""  # e.g. "blocks+dense"
    return {**_result(job, model, tx, params, state.rigl.masks, int(state.rigl.num_updates), curve, train_curve,
                      seconds, args), "sparse_kernels": chosen}


def _result(job, model, tx, params, masks, num_updates, curve, train_curve, seconds, args) -> dict:
    """One run's record: losses, exact counts (nnz and the config's target nnz per layer), densities and
    FLOPs relative to dense (``rigl_func.relative_flops``; training FLOPs times the steps multiplier)."""
    method, sparsity, seed, mult = job
    steps = args.steps * mult
    shapes = {k: tuple(m.shape) for k, m in masks.items()}
    target = rf.target_nnz(shapes, tx.config)
    nnz = {k: int(m.sum()) for k, m in masks.items()}
    n_all = sum(v.numel() for v in params.values())
    active = sum(nnz.values()) + n_all - sum(m.numel() for m in masks.values())
    layer_density = {k: nnz[k] / masks[k].numel() for k in masks}
    rel = run_flops(model, method, tx.config.method, layer_density, steps, args)
    val_loss = curve[-1][1]
    return {
        "method": method, "sparsity": 0.0 if method == "dense" else sparsity, "seed": seed, "mult": mult,
        "steps": steps, "val_loss": val_loss, "bpb": val_loss / math.log(2), "curve": curve,
        "train_curve": train_curve, "nnz": nnz, "target_nnz": target,
        "layer_density": layer_density,
        "sparse_density": sum(nnz.values()) / max(1, sum(m.numel() for m in masks.values())),
        "density": active / n_all, "params": n_all,
        "train_flops": rel["train"] * mult, "infer_flops": rel["inference"],
        "num_updates": num_updates, "seconds": seconds, "ms_per_step": 1000 * seconds / steps,
    }


def model_flops(model: nn.Module) -> dict[str, float]:
    """``rigl_func.forward_flops`` of one sequence of ``context`` bytes, attention included: counted on SDPA's
    math path, because torch's ``FlopCounterMode`` has no formula for the fused CPU kernel
    (``_scaled_dot_product_flash_attention_for_cpu``) and would leave attention out (torch 2.14)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model.eval()
    dev = next(model.parameters()).device
    with sdpa_kernel(SDPBackend.MATH):
        return rf.forward_flops(model, torch.zeros(1, model.cfg.context, dtype=torch.long, device=dev))


def run_flops(model: nn.Module, method: str, rule: str, layer_density: dict[str, float], steps: int,
              args: argparse.Namespace) -> dict[str, float]:
    """``rigl_func.relative_flops`` of one run: dense, or the config's method (``static``/``set``/``rigl``),
    RigL's dense-gradient steps counted until T_end (``--end-fraction`` of ``steps``)."""
    kind = "dense" if method == "dense" else rule
    return rf.relative_flops(model_flops(model), layer_density, kind, delta=args.delta,
                             t_end=max(1, int(args.end_fraction * steps)) if kind == "rigl" else None,
                             total_steps=steps)


def refresh_flops(runs: list[dict], args: argparse.Namespace) -> list[dict]:
    """The runs with ``train_flops``/``infer_flops`` recomputed by :func:`run_flops` from their stored
    per-layer densities (for results stored by an older version of this script)."""
    model = GPT(GPTConfig(layers=args.layers, width=args.width, heads=args.heads, context=args.context))
    out = []
    for r in runs:
        rel = run_flops(model, r["method"], parse_method(r["method"])[0], r["layer_density"], r["steps"], args)
        out.append({**r, "train_flops": rel["train"] * r["mult"], "infer_flops": rel["inference"]})
    return out


def train_ensemble(method: str, sparsity: float, mult: int, args: argparse.Namespace) -> list[dict]:
    """``--seeds`` models of one method trained together: ``vmap(grad)`` and one ``tx.step_ensemble`` per
    iteration. Seeds, masks and batch order are those of :func:`train_one` for seeds ``0..K-1``; the losses
    agree with it to float rounding (the vmapped gradients sum in another order, and a rounding difference
    can flip a tie in a topology update). Attention runs on SDPA's math path
    (``sdpa_kernel(SDPBackend.MATH)``): the fused CPU kernel has no vmap batching rule.

    Returns:
        one record per seed, as :func:`train_one`'s (``seconds`` is the ensemble's time divided by K).
    """
    from torch.func import vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    data, k_models = corpus(), args.seeds
    cfg = GPTConfig(layers=args.layers, width=args.width, heads=args.heads, context=args.context)
    dev = torch.device(args.device)
    steps = args.steps * mult
    inits = []
    for seed in range(k_models):
        torch.manual_seed(seed)
        model = GPT(cfg).to(dev)
        tx = make_tx(method, sparsity, steps, args, model)
        inits.append(tx.init(model, seed=seed))
    params, state = rf.stack_states([p for p, _ in inits]), rf.stack_states([s for _, s in inits])
    loss_fn = loss_of(model)
    step_fn = vmap(grad_and_value(loss_fn))
    clip = vmap(lambda g: clip_grad_norm(g, args.clip))
    train, val = data["train"], data["val"]
    starts_val = val_starts(len(val), args.val_windows, cfg.context)
    gens = [torch.Generator().manual_seed(10_000 + seed) for seed in range(k_models)]
    every = max(1, steps // args.evals)
    curves, train_curves, running = [[] for _ in gens], [[] for _ in gens], []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        windows = [batch_at(train, torch.randint(0, len(train) - cfg.context - 1, (args.batch_size,), generator=g),
                            cfg.context) for g in gens]
        x, y = (torch.stack(t).to(dev) for t in zip(*windows))  # [K, B, T]
        with sdpa_kernel(SDPBackend.MATH):
            grads, loss = step_fn(params, x, y)
        params, state = tx.step_ensemble(params, clip(grads), state)
        if step % 10 == 0 or step == steps:
            running.append(loss.tolist())
        if step % every == 0 or step == steps:
            for k in range(k_models):
                p_k = {n: v[k] for n, v in params.items()}
                curves[k].append((step, evaluate(loss_fn, p_k, val, starts_val, cfg.context)))
                train_curves[k].append((step, statistics.mean(r[k] for r in running) if running else float(loss[k])))
            running = []
    seconds = (time.perf_counter() - t0) / k_models
    return [_result((method, sparsity, k, mult), model, tx, {n: v[k] for n, v in params.items()},
                    {n: m[k] for n, m in state.rigl.masks.items()}, int(state.rigl.num_updates[k]),
                    curves[k], train_curves[k], seconds, args) for k in range(k_models)]


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_parallel(fn: Callable[[Any], Any], items: Iterable, jobs: int, threads: int) -> Iterator:
    """``fn(item)`` for each item, in completion order, from ``jobs`` spawned worker processes with
    ``threads`` torch threads each (``jobs <= 1``: in this process, in order)."""
    items = list(items)
    if jobs <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with multiprocessing.get_context("spawn").Pool(jobs, initializer=_init_worker, initargs=(threads,)) as pool:
        yield from pool.imap_unordered(fn, items)


class _Job:
    """Picklable ``train_one(job, args)``."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self, job):
        return train_one(job, self.args)


# ----------------------------------------------------------------------------- reporting
def label(method: str, mult: int) -> str:
    return method if mult == 1 else f"{method} ({mult}x steps)"


def groups_of(runs: list[dict]) -> dict[tuple, list[dict]]:
    keys = sorted({(r["method"], r["sparsity"], r["mult"]) for r in runs},
                  key=lambda k: (k[1], k[2], sort_key(k[0])))
    return {k: [r for r in runs if (r["method"], r["sparsity"], r["mult"]) == k] for k in keys}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict]) -> str:
    """The results table (markdown)."""
    rows = ["| method | sparsity | steps | val loss (mean ± std) | bits/byte (mean ± std) | seeds | density "
            "(all / sparse layers) | train FLOPs | infer FLOPs | ms/step |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for (method, sparsity, mult), rs in groups_of(runs).items():
        loss, loss_sd = _mean_std([r["val_loss"] for r in rs])
        bpb, bpb_sd = _mean_std([r["bpb"] for r in rs])
        rows.append(f"| {label(method, mult)} | {sparsity:.2f} | {rs[0]['steps']} | {loss:.4f} ± {loss_sd:.4f} | "
                    f"{bpb:.4f} ± {bpb_sd:.4f} | {len(rs)} | {rs[0]['density']:.3f} / {rs[0]['sparse_density']:.3f} | "
                    f"{rs[0]['train_flops']:.3f}x | {rs[0]['infer_flops']:.3f}x | "
                    f"{statistics.median(r['ms_per_step'] for r in rs):.0f}"
                    f"{' (kernels: ' + rs[0]['sparse_kernels'] + ')' if rs[0].get('sparse_kernels') else ''} |")
    return "\n".join(rows)


#: two-sided 95% Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_diff(a: list[dict], b: list[dict]) -> Optional[tuple[float, float, int]]:
    """Mean and 95% CI half-width of ``bpb(a) - bpb(b)`` paired by seed (same initial weights and batch
    order in both runs), or ``None`` with fewer than 2 common seeds."""
    bs = {r["seed"]: r["bpb"] for r in b}
    d = [r["bpb"] - bs[r["seed"]] for r in a if r["seed"] in bs]
    if len(d) < 2:
        return None
    return statistics.mean(d), _T95.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d)), len(d)


def comparisons(runs: list[dict]) -> str:
    """Paired differences in bits per byte (negative: the first method is better) with 95% CIs."""
    g = groups_of(runs)
    pairs = []
    for (method, sparsity, mult) in g:
        if method in ("rigl", "rigl-erk") and mult == 1:
            for other in ("static", "set", "static-erk", "set-erk"):
                if (other, sparsity, 1) in g and (other.endswith("erk") == method.endswith("erk")):
                    pairs.append(((method, sparsity, 1), (other, sparsity, 1)))
            if method == "rigl" and ("rigl-erk", sparsity, 1) in g:
                pairs.append((("rigl-erk", sparsity, 1), (method, sparsity, 1)))
        if mult > 1 and (method, sparsity, 1) in g:
            pairs.append(((method, sparsity, mult), (method, sparsity, 1)))
        rule, dist, block = parse_method(method)
        if block and mult == 1:
            base = method[: method.rindex("-b")]
            if (base, sparsity, 1) in g:
                pairs.append(((method, sparsity, 1), (base, sparsity, 1)))
    for k in g:  # RigL against dense at the same number of steps, and (longer runs) against dense at 1x
        if k[0] in ("rigl", "rigl-erk"):
            pairs += [(k, d) for d in dict.fromkeys([("dense", 0.0, k[2]), ("dense", 0.0, 1)]) if d in g]
    rows = ["| comparison | sparsity | Δ bits/byte (mean, 95% CI, paired by seed) | seeds | verdict |",
            "|---|---|---|---|---|"]
    for a, b in pairs:
        d = paired_diff(g[a], g[b])
        if d is None:
            continue
        mean, half, n = d
        verdict = "better" if mean + half < 0 else "worse" if mean - half > 0 else "no significant difference"
        rows.append(f"| {label(a[0], a[2])} − {label(b[0], b[2])} | {a[1]:.2f} | {mean:+.4f} "
                    f"[{mean - half:+.4f}, {mean + half:+.4f}] | {n} | {label(a[0], a[2])} {verdict} |")
    return "\n".join(rows)


def make_figures(runs: list[dict]) -> dict:
    """``{"val_loss": fig, "bpb": fig}``: validation loss against training step per sparsity (mean ± 1 std
    over seeds), and final bits per byte against sparsity per method (mean ± std error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = groups_of(runs)
    methods = sorted({k[0] for k in g}, key=sort_key)
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    sparsities = sorted({k[1] for k in g if k[0] != "dense"}) or [0.0]
    nseeds = sorted({len(rs) for rs in g.values()})
    seeds_txt = f"{nseeds[0]}" if len(nseeds) == 1 else f"{nseeds[0]}-{nseeds[-1]}"
    styles = {1: "-", 2: "--", 5: ":"}
    fig, axes = plt.subplots(1, len(sparsities), figsize=(5.5 * len(sparsities), 4.2), squeeze=False, sharey=True)
    for ax, s in zip(axes[0], sparsities):
        for (method, sparsity, mult), rs in g.items():
            if sparsity != s and method != "dense":
                continue
            steps = [t for t, _ in rs[0]["curve"]]
            vals = torch.tensor([[v for _, v in r["curve"]] for r in rs], dtype=torch.float64)
            mean = vals.mean(0).tolist()
            std = vals.std(0).tolist() if len(rs) > 1 else [0.0] * len(mean)
            ax.plot(steps, mean, styles.get(mult, "-."), color=colors[method], label=label(method, mult))
            ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=colors[method], alpha=0.2, linewidth=0)
        ax.set(xlabel="training step", title=f"sparsity {s:.2f}", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="line: mean, band: ± 1 std", title_fontsize=7)
    axes[0][0].set_ylabel("validation loss (nats/byte)")
    fig.suptitle(f"Byte-level GPT on the Python stdlib: validation loss, mean ± std over {seeds_txt} seeds")
    fig.tight_layout()
    figures = {"val_loss": fig}

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in methods:
        pts = sorted((k[1], rs) for k, rs in g.items() if k[0] == method and k[2] == 1)
        if not pts:
            continue
        xs = [s for s, _ in pts]
        ms = [_mean_std([r["bpb"] for r in rs]) for _, rs in pts]
        if method == "dense":
            ax.axhline(ms[0][0], color=colors[method], linestyle="--", label="dense")
            ax.axhspan(ms[0][0] - ms[0][1], ms[0][0] + ms[0][1], color=colors[method], alpha=0.15)
        else:
            ax.errorbar(xs, [m for m, _ in ms], yerr=[d for _, d in ms], marker="o", capsize=3,
                        color=colors[method], label=method)
    ax.set(xlabel="sparsity", ylabel="validation bits per byte",
           title=f"Final bits per byte (mean ± std over {seeds_txt} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figures["bpb"] = fig
    return figures


def plot(runs: list[dict], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    for name, fig in make_figures(runs).items():
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


# ----------------------------------------------------------------------------- main
STUDY_SPARSITIES = (0.8, 0.9, 0.95)


def study_jobs(seeds: int) -> list[tuple[str, float, int, int]]:
    """The docs/results.md grid: dense; static, SET, RigL, RigL-ERK at 80/90/95%; RigL at 90% with 2x and
    5x steps; RigL at 90% with 16x16 and 32x32 blocks. Ordered so that partial results are useful (the 90%
    comparison first) and the long 5x runs overlap with short ones."""
    core = ("static", "set", "rigl", "rigl-erk")
    jobs = [("dense", 0.0, s, 1) for s in range(seeds)] + [(m, 0.9, s, 1) for m in core for s in range(seeds)]
    jobs += [("rigl", 0.9, s, 5) for s in range(seeds)]
    jobs += [(m, sp, s, 1) for sp in (0.8, 0.95) for m in core for s in range(seeds)]
    jobs += [(m, 0.9, s, 1) for m in ("rigl-b16", "rigl-b32") for s in range(seeds)]
    jobs += [("rigl", 0.9, s, 2) for s in range(seeds)]
    return jobs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", type=method_name, default=["dense", "static", "set", "rigl", "rigl-erk"],
                   help="dense, static, set, rigl, rigl-erk, static-erk, set-erk; -b16/-b32/-b64 for block structure")
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.9])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400, help="training steps (per run, before --mult)")
    p.add_argument("--mult", nargs="+", type=int, default=[1], help="step multipliers (RigL paper's 2x, 5x)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up, fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping by global norm (0: off)")
    p.add_argument("--delta", type=int, default=20, help="ΔT, steps between topology updates")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--end-fraction", type=float, default=0.75, help="T_end as a fraction of the steps")
    p.add_argument("--evals", type=int, default=10, help="validation points per run")
    p.add_argument("--val-windows", type=int, default=256, help="fixed validation windows of --context bytes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (1: in-process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (or in-process)")
    p.add_argument("--out", type=Path, default=Path("runs/lm"))
    p.add_argument("--study", action="store_true", help="the docs/results.md grid (ignores --methods/--sparsity/--mult)")
    p.add_argument("--report", type=Path, default=None, metavar="RESULTS_JSON",
                   help="no training: rebuild the table and plots of a stored results.json in --out")
    p.add_argument("--ensemble", action="store_true",
                   help="train the seeds of each method together (vmap(grad) + tx.step_ensemble), in-process")
    p.add_argument("--sparse-kernels", action="store_true",
                   help="block methods (-b16/-b32/-b64) run their sparse Linear layers with rigl_func.sparse_linear "
                        "(the kernel rigl_func picks per layer: sparse where measured faster, else dense; the dense "
                        "weight gradient only at update steps); the table's ms/step names the kernels used")
    p.add_argument("--smoke", action="store_true", help="tiny run for CI: dense + rigl, 1 seed, 120 steps of a 1-layer d=64 model")
    return p


def main(argv=None) -> list[dict]:
    args = parser().parse_args(argv)
    if args.report is not None:
        return rereport(args.report, args.out)
    if args.smoke:
        args.methods, args.steps, args.delta, args.jobs = ["dense", "rigl"], 120, 10, 1
        args.seeds = 2 if args.ensemble else 1
        args.layers, args.width, args.heads, args.context, args.batch_size = 1, 64, 2, 32, 8
        args.evals, args.val_windows, args.mult = 4, 32, [1]
    if args.sparse_kernels and args.ensemble:
        parser().error("--sparse-kernels trains one model per process: drop --ensemble")
    if args.device.startswith("cuda") and args.jobs > 1:
        args.jobs = 1  # one process owns the GPU
    from tqdm.auto import tqdm

    info = corpus()["info"]
    model = GPT(GPTConfig(layers=args.layers, width=args.width, heads=args.heads, context=args.context))
    sparse = rf.sparse_param_names(model)
    n_sparse = sum(p.numel() for n, p in model.named_parameters() if n in sparse)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, Python {info['python']}, device {args.device}, {args.jobs} worker(s) x "
          f"{args.threads} thread(s); corpus {info['train_bytes']:,} train / {info['val_bytes']:,} val bytes")
    print(f"model: {n_all:,} params, {n_sparse:,} in {len(sparse)} sparse weights: {', '.join(sparse)}; "
          "dense: embeddings (tied head), norms, biases")
    if args.study:
        jobs = study_jobs(args.seeds)
    else:
        jobs = [(m, sp, s, mult) for sp in args.sparsity for m in args.methods for mult in args.mult
                for s in range(args.seeds) if not (m == "dense" and sp != args.sparsity[0])]
    if not jobs:
        raise ValueError(f"no runs to do: methods={args.methods}, sparsity={args.sparsity}, seeds={args.seeds}")
    if not args.study:
        jobs.sort(key=lambda j: -j[3])  # long runs first: better packing on the workers
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    runs, start = [], time.time()
    try:
        with tqdm(total=sum(j[3] for j in jobs) * args.steps, desc="training", unit="step", unit_scale=True) as bar:
            if args.ensemble:  # one process, all seeds of a (method, sparsity, mult) at once
                groups = list(dict.fromkeys((m, sp, mult) for m, sp, _, mult in jobs))
                results = (r for g in groups for r in train_ensemble(*g, args))
            else:
                results = run_parallel(_Job(args), jobs, args.jobs, args.threads)
            for run in results:
                runs.append(run)
                (args.out / "runs.partial.json").write_text(json.dumps(runs))  # survives an interrupted run
                bar.set_postfix(run=f"{label(run['method'], run['mult'])} s={run['sparsity']} seed={run['seed']}",
                                bpb=f"{run['bpb']:.3f}")
                bar.update(run["steps"])
    finally:
        torch.set_num_threads(threads)
    wall = time.time() - start
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": multiprocessing.cpu_count(), "device": args.device, "threads": args.threads,
            "jobs": args.jobs, "wall_s": wall, "corpus": info, "model": asdict(GPTConfig(
                layers=args.layers, width=args.width, heads=args.heads, context=args.context)),
            "params": n_all, "sparse_params": n_sparse, "sparse_names": sparse,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    report(runs, meta, args.out)
    return runs


def report(runs: list[dict], meta: dict, out: Path) -> None:
    """Prints the results table and the paired comparisons; writes ``results.json``, ``results.md`` and the
    plots to ``out``."""
    a = meta["args"]
    runs = sorted(runs, key=lambda r: (r["sparsity"], r["mult"], sort_key(r["method"]), r["seed"]))
    table, comp = summarize(runs), comparisons(runs)
    head = (f"Byte-level GPT ({a['layers']} layers, d={a['width']}, {a['heads']} heads, context {a['context']}, "
            f"{meta['params']:,} params), {a['steps']} steps x batch {a['batch_size']}, {a['seeds']} seed(s), "
            f"wall {meta['wall_s']:.0f} s ({meta['jobs']} worker(s) x {meta['threads']} thread(s), "
            f"torch {meta['torch']}, {meta['device']})")
    print(f"\n{head}\n\n{table}\n")
    if comp.count("\n") > 1:
        print(comp + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    (out / "results.md").write_text(f"{head}\n\n{table}\n\n{comp}\n")
    for path in plot(runs, out):
        print(f"saved {path}")


def rereport(results_json: Path, out: Path) -> list[dict]:
    """Rebuilds the table, comparisons and plots of a stored ``results.json`` in ``out``, with the FLOPs
    recomputed from the stored per-layer densities (:func:`refresh_flops`)."""
    stored = json.loads(Path(results_json).read_text())
    meta = stored["meta"]
    runs = refresh_flops(stored["runs"], argparse.Namespace(**meta["args"]))
    report(runs, meta, out)
    return runs


if __name__ == "__main__":
    main()

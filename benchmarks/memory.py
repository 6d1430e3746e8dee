"""Benchmark 5: persistent memory added by the sparse state, rigl_func vs rigl-torch.

Measured, not estimated: every tensor reachable from the scheduler object (its
attributes, dicts, lists, tuples, NamedTuples and hook objects, recursively) is
collected, tensors that share storage with the model's parameters, buffers or
gradients or with the optimizer's state are left out, shared storages are counted
once, and their ``untyped_storage().nbytes()`` are summed. For the functional API the
same walk runs over the :class:`rigl_func.RigLState`.

Each configuration trains a few steps (``delta=4``) on one fixed batch and the walk
runs after every ``backward()`` and after every scheduler call; the table shows the
value between steps far from an update (*steady*) and the maximum seen (*peak*,
inside the accumulation window / at the update). Bytes are divided by the number of
weights of the sparse layers.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

import rigl_func
from benchmarks.common import Context, Section, markdown_table, RIGL_TORCH, optional_import
from benchmarks.train_step import mlp

__all__ = ["NAME", "TITLE", "run", "held_tensors", "held_bytes"]

NAME = "memory"
TITLE = "Persistent memory of the sparse state (bytes per sparse weight)"
DELTA = 4
TARGET_BYTES = 1.0

#: (label, rigl_func.RigLScheduler kwargs, rigl-torch kwargs or None)
CONFIGS: list[tuple[str, dict, Optional[dict]]] = [
    ("rigl, grad_accumulation_n=1", {}, {}),
    ("rigl, grad_accumulation_n=3", {"grad_accumulation_n": 3}, {"grad_accumulation_n": 3}),
    ("snfs (gradient EMA)", {"grow": "ema"}, None),
    ("set (random growth)", {"grow": "random"}, None),
]


def _children(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        yield from obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from obj
    elif hasattr(obj, "__dict__"):
        yield from vars(obj).values()
    if hasattr(obj, "__slots__") and not isinstance(obj, (dict, list, tuple)):
        for slot in obj.__slots__:
            if hasattr(obj, slot):
                yield getattr(obj, slot)


def held_tensors(root: Any, skip: tuple[type, ...] = (nn.Module, torch.optim.Optimizer)) -> list[torch.Tensor]:
    """Tensors reachable from ``root`` through containers and object attributes.

    Args:
        root: any object (a scheduler, a ``RigLState``, a dict, ...).
        skip: objects of these types are not entered (the model and optimizer).

    Returns:
        The tensors found, each object once (order of discovery).

    Example:
        >>> class Box:
        ...     def __init__(self):
        ...         self.a, self.b = torch.zeros(3), [torch.ones(2, dtype=torch.bool)]
        >>> [tuple(t.shape) for t in held_tensors(Box())]
        [(3,), (2,)]
    """
    seen, found, stack = set(), [], [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))) or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            continue
        if callable(obj) and not hasattr(obj, "__dict__") and not hasattr(obj, "__slots__"):
            continue  # builtins, bound C methods
        stack.extend(reversed(list(_children(obj))))
    return found


def held_bytes(root: Any, exclude: list[torch.Tensor], *, scalars: bool = True) -> int:
    """Bytes of the storages of :func:`held_tensors` (``root``), each storage once,
    leaving out storages shared with ``exclude`` (model and optimizer tensors) and,
    with ``scalars=False``, 0-d tensors (counters, keys: a constant, not per weight)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude if t.numel()}
    storages = {}
    for t in held_tensors(root):
        s = t.untyped_storage()
        if s.data_ptr() in excluded or (not scalars and t.dim() == 0):
            continue
        storages[(s.data_ptr(), s.device)] = s.nbytes()
    return sum(storages.values())


def _model_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.parameters()) + list(model.buffers())
    out += [p.grad for p in model.parameters() if p.grad is not None]
    for state in opt.state.values():
        out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def _trace(make: Callable[[], nn.Module], batch, make_sched: Callable, steps: int) -> tuple[int, int, int, int]:
    """Train ``steps`` steps; return (steady bytes, peak bytes, sparse weights, bytes of 0-d tensors)."""
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched, masks = make_sched(model, opt)
    x, y = batch
    samples = []  # (iteration, bytes)
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        samples.append((t, held_bytes(sched, _model_tensors(model, opt))))
        if sched():
            opt.step()
        samples.append((t, held_bytes(sched, _model_tensors(model, opt))))
    n_sparse = sum(m.numel() for m in masks(sched) if m is not None)
    steady = [b for t, b in samples if t % DELTA == 1]  # right after an update, far from the next window
    fixed = held_bytes(sched, _model_tensors(model, opt)) - held_bytes(sched, _model_tensors(model, opt),
                                                                       scalars=False)
    return max(steady), max(b for _, b in samples), n_sparse, fixed


def _core_state_bytes(model: nn.Module, kwargs: dict) -> tuple[int, int]:
    method = {"gradient": "rigl", "random": "set", "ema": "snfs"}[kwargs.get("grow", "gradient")]
    cfg = rigl_func.RigLConfig(t_end=1000, delta=100, sparsity=0.9, distribution="uniform", method=method,
                               grad_accumulation_n=kwargs.get("grad_accumulation_n", 1))
    state = rigl_func.init_state(model, cfg, seed=0)
    return held_bytes(state, []), sum(m.numel() for m in state.masks.values())


def run(ctx: Context, log: Callable[[str], None] = print) -> Section:
    """Measure the memory table and return its RESULTS.md section."""
    tv, tv_note = optional_import("torchvision")
    rigl_torch, rt_note = optional_import(RIGL_TORCH)
    if tv is not None and not ctx.smoke:
        model_name, in_shape = "ResNet-18 CIFAR (torchvision, num_classes=10)", (3, 32, 32)
        make = lambda: (torch.manual_seed(0), tv.models.resnet18(num_classes=10))[1].to(ctx.device)  # noqa: E731
    else:
        model_name, in_shape = "MLP 784-300-100-10" + (" (smoke)" if ctx.smoke else f" ({tv_note})"), (784,)
        make = lambda: mlp().to(ctx.device)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn((2, *in_shape), generator=gen).to(ctx.device),
             torch.randint(0, 10, (2,), generator=gen).to(ctx.device))
    common = dict(dense_allocation=0.1, T_end=1000, delta=DELTA, ignore_linear_layers=False)
    steps = 2 * DELTA + 1
    rows, data = [], {}
    for label, ours_kw, rt_kw in CONFIGS:
        log(f"[{NAME}] {label} ...")

        def ours(model, opt, kw=ours_kw):
            sched = rigl_func.RigLScheduler(model, opt, **common, **kw)
            return sched, lambda s: s.backward_masks

        steady, peak, n, fixed = _trace(make, batch, ours, steps)
        core, n_core = _core_state_bytes(make(), ours_kw)
        row = [label, f"{steady / n:.3f}", f"{peak / n:.3f}", f"{core / n_core:.3f}"]
        data[label] = {"ours": (steady, peak, n), "core": (core, n_core), "fixed": fixed}
        if rt_kw is None:
            row += ["not supported by rigl-torch"] * 2
        elif rigl_torch is None:
            row += [rt_note] * 2
        else:
            from rigl_torch.RigL import RigLScheduler as RTScheduler

            def theirs(model, opt, kw=rt_kw):
                sched = RTScheduler(model, opt, **common, **kw)
                return sched, lambda s: s.backward_masks

            rt_steady, rt_peak, rt_n, _ = _trace(make, batch, theirs, steps)
            row += [f"{rt_steady / rt_n:.3f}", f"{rt_peak / rt_n:.3f}"]
            data[label]["rigl-torch"] = (rt_steady, rt_peak, rt_n)
        rows.append(row)
    header = ["config", "rigl_func shell, steady", "rigl_func shell, peak", "rigl_func RigLState",
              "rigl-torch, steady", "rigl-torch, peak"]
    n1 = data[CONFIGS[0][0]]["ours"]
    fixed1 = data[CONFIGS[0][0]]["fixed"]
    per_weight = (n1[1] - fixed1) / n1[2]
    md = [
        f"Model: {model_name}; 90% sparse (uniform, first layer dense, Linear layers sparse), "
        f"`delta={DELTA}`, {steps} SGD steps on one batch; bytes per weight of the sparse layers "
        f"({n1[2]:,} weights). Steady: right after an update (outside any accumulation window); peak: the "
        "maximum over all steps (dense-gradient buffers live inside the window). `RigLState`: the pure state "
        "of `init_state` (masks, counters, key, accumulators, EMA). Device: "
        f"{ctx.device}.",
        "",
        markdown_table(header, rows, align="lrrrrr"),
        "",
        f"- Target <= {TARGET_BYTES:.0f} byte per sparse weight with `grad_accumulation_n=1` and no EMA: "
        f"**{'met' if per_weight <= TARGET_BYTES else 'not met'}** ({per_weight:.3f} byte per weight at peak, "
        f"plus {fixed1} bytes of 0-d counters and key for the whole model).",
        "- The bool masks are 1 byte per weight; `grad_accumulation_n > 1` adds a float32 running mean "
        "(4 bytes) and SNFS a float32 EMA (4 bytes); counters and the key are a few 0-d tensors. With "
        "`grad_accumulation_n=1` the shell keeps no gradient copy: the update reads `param.grad`.",
        "- rigl-torch keeps bool masks too, and its backward hooks keep a dense gradient copy "
        "(`IndexMaskHook.dense_grad`, 4 bytes per weight) from the first accumulating step until the "
        "next step's backward, i.e. also across the update step with `grad_accumulation_n=1`.",
    ]
    summary = "\n".join(" | ".join(f"{str(c):>24s}" for c in r) for r in [header, *rows])
    return Section(title=TITLE, markdown="\n".join(md), summary=summary, data=data)

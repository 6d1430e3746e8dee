"""FLOP accounting for sparse training (RigL paper, Sec. 4.1 and Appendix H).

Forward FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` on a
real forward pass: it counts the matmuls and convolutions (2 FLOPs per
multiply-add) and nothing else (no BatchNorm, activations, pooling or residual
adds). A sparse layer's FLOPs scale with its density (the paper's accounting:
sparse kernels are assumed to skip zeros). Training cost per step uses the paper's
convention that a backward pass costs twice the forward pass:

* dense:                 3 f_D
* static / SNIP / SET:   3 f_S
* SNFS:                  2 f_S + f_D          (dense gradients every step)
* RigL:                  (3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)   (dense gradient every ΔT)
* gradual pruning:       mean over training steps of 3 f(s_t), where f(s_t) is the
  forward cost at the sparsity in force at step t, s_t = s_f + (s_i - s_f)(1 - p)^3
  (Zhu & Gupta 2017), dense before the first pruning step

where f_D / f_S are the dense / sparse forward FLOPs. :func:`relative_flops` puts
these together for a model, an input, per-layer densities (or masks) and a method,
as the "FLOPs (Train) / FLOPs (Test)" columns of the paper's Table 2.

What this accounting includes and what the paper's differs by (ResNet-50 at 224x224,
``tests/test_flops.py``): our dense count is 8.18e9 FLOPs (conv + fc, 2 per
multiply-add); the paper's is 8.2e9. The paper's counter (``micronet_challenge``)
also adds one dense op per conv output element (the ReLU) and counts the 7x7 stem on
a 115x115 output, about +0.3% of dense, which raises the paper's sparse ratios by
~0.003. Our ratios match the paper's within 0.01 — except uniform 90%, where the
paper's Table 2 prints 0.10x while its first layer is dense: our 0.13x (first layer
dense) matches the authors' repository README; 0.10x is what all-layers-sparse gives.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "forward_flops",
    "sparse_forward_flops",
    "training_flops_per_step",
    "pruning_training_flops_per_step",
    "relative_flops",
    "TRAINING_METHODS",
]

#: Methods known to :func:`training_flops_per_step` / :func:`relative_flops`.
TRAINING_METHODS = ("dense", "static", "snip", "set", "snfs", "rigl", "pruning")

Density = Union[float, Tensor]


def forward_flops(model: nn.Module, *inputs) -> dict[str, float]:
    """Dense forward FLOPs of ``model(*inputs)``, per weight and in total.

    Args:
        model: the network (parameters as they are; zeros are counted as dense).
        *inputs: example inputs (their batch size is included in the counts).

    Returns:
        ``{"total": F, name: F_name, ...}`` where ``name`` runs over the weights of
        the modules that own a ``weight`` parameter and ``F_name`` is the FLOPs of
        the ops run inside that module (e.g. the matmul of a Linear layer).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> forward_flops(net, torch.zeros(2, 4))
        {'total': 48.0, '0.weight': 48.0}
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    result = {"total": float(sum(counter.get_flop_counts().get("Global", {}).values()))}
    for mod_name, module in model.named_modules():
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        key = f"{root}.{mod_name}" if mod_name else root
        if key in counts:
            result[f"{mod_name}.weight" if mod_name else "weight"] = float(sum(counts[key].values()))
    return result


def _as_density(name: str, value: Density) -> float:
    if isinstance(value, Tensor):  # a mask (or a sparse weight): fraction of nonzeros
        return int(torch.count_nonzero(value)) / max(value.numel(), 1)
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"densities[{name!r}] must be a float in [0, 1] or a mask tensor, got {value!r}")
    return float(value)


def _densities(densities: Mapping[str, Density], flops: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(densities, Mapping):
        raise TypeError(f"densities must be a dict name -> density or mask, got {type(densities).__name__}")
    unknown = [k for k in densities if k not in flops or k == "total"]
    if unknown:
        raise ValueError(f"densities has names without FLOP counts: {unknown}")
    return {k: _as_density(k, v) for k, v in densities.items()}


def sparse_forward_flops(flops: Mapping[str, float], densities: Mapping[str, Density]) -> float:
    """Forward FLOPs when each weight in ``densities`` runs at that density.

    ``f_S = total - sum_l F_l (1 - d_l)``: linear in the densities.

    Args:
        flops: output of :func:`forward_flops`.
        densities: name -> fraction of nonzeros in [0, 1], or name -> mask tensor
            (e.g. ``state.masks``; its density is ``count_nonzero / numel``).
            Layers absent stay dense.

    Raises:
        ValueError: a name has no FLOP count or a density is outside [0, 1].

    Example:
        >>> sparse_forward_flops({"total": 100.0, "w": 80.0}, {"w": 0.25})
        40.0
        >>> sparse_forward_flops({"total": 100.0, "w": 80.0}, {"w": torch.tensor([True, False, False, False])})
        40.0
    """
    densities = _densities(densities, flops)
    return flops["total"] - sum(flops[k] * (1.0 - d) for k, d in densities.items())


def training_flops_per_step(method: str, f_sparse: float, f_dense: float, delta: int = 100) -> float:
    """Training FLOPs of one step (forward + backward) under the paper's accounting.

    Args:
        method: ``"dense"``, ``"static"``, ``"snip"``, ``"set"``, ``"snfs"`` or
            ``"rigl"`` (``"pruning"`` changes density over time: use
            :func:`pruning_training_flops_per_step`).
        f_sparse: sparse forward FLOPs f_S. f_dense: dense forward FLOPs f_D.
        delta: ΔT, steps between RigL updates.

    Returns:
        ``3 f_D`` (dense), ``3 f_S`` (static, SNIP, SET), ``2 f_S + f_D`` (SNFS) or
        ``(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)`` (RigL).

    Example:
        >>> training_flops_per_step("rigl", 1.0, 10.0, delta=1)  # (3 + 2 + 10) / 2
        7.5
        >>> training_flops_per_step("snfs", 1.0, 10.0)
        12.0
    """
    if method == "dense":
        return 3.0 * f_dense
    if method in ("static", "snip", "set"):
        return 3.0 * f_sparse
    if method == "snfs":
        return 2.0 * f_sparse + f_dense
    if method == "rigl":
        if isinstance(delta, bool) or not isinstance(delta, numbers.Integral) or delta <= 0:
            raise ValueError(f"delta must be an int > 0, got delta={delta!r}")
        return (3.0 * f_sparse * delta + 2.0 * f_sparse + f_dense) / (delta + 1)
    if method == "pruning":
        raise ValueError("method='pruning' has no fixed per-step cost: use pruning_training_flops_per_step "
                         "or relative_flops(..., method='pruning', pruning=..., total_steps=...)")
    raise ValueError(f"method must be one of {TRAINING_METHODS}, got method={method!r}")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")
    return int(value)


def _pruning_steps(t0: int, t1: int, frequency: int) -> list[int]:
    """``t0, t0 + frequency, ... <= t1``, then ``t1`` (as :func:`rigl_func.pruning.pruning_steps`)."""
    steps = list(range(t0, t1 + 1, frequency))
    return steps if steps[-1] == t1 else steps + [t1]


def _cubic_remaining(step: int, t0: int, t1: int) -> float:
    """``(1 - p)^3`` with ``p = clip((step - t0) / (t1 - t0), 0, 1)`` (Zhu & Gupta 2017, Eq. 1)."""
    p = min(max((step - t0) / (t1 - t0), 0.0), 1.0)
    return (1.0 - p) ** 3


def pruning_training_flops_per_step(
    flops: Mapping[str, float],
    densities: Mapping[str, Density],
    *,
    total_steps: int,
    t0: int,
    t1: int,
    frequency: int = 1,
    initial_sparsity: float = 0.0,
) -> float:
    """Mean training FLOPs per step of gradual magnitude pruning (Zhu & Gupta 2017).

    Layer ``l`` with final density ``d_l`` (final sparsity ``s_l = 1 - d_l``) is dense
    before ``t0``; at each pruning step ``τ`` in ``t0, t0 + frequency, ..., t1`` (and
    ``t1``) its sparsity becomes ``s_l + (s_i - s_l)(1 - p(τ))^3``, with
    ``p(τ) = (τ - t0) / (t1 - t0)``, and stays until the next pruning step. The result
    is ``mean over t in [0, total_steps) of 3 f(t)``, with ``f(t)`` the forward FLOPs at
    the densities in force at ``t``; since ``f`` is linear in the densities this is
    ``3 f`` at the time-averaged densities. For a uniform distribution (same
    ``s_l`` everywhere) this is the schedule of :mod:`rigl_func.pruning` up to the
    rounding of per-layer counts.

    Args:
        flops: output of :func:`forward_flops`.
        densities: name -> *final* density (or final mask) of each pruned layer.
        total_steps: training steps, an int > 0.
        t0: first pruning step; t1: last (``t1 > t0``).
        frequency: steps between pruning steps, > 0.
        initial_sparsity: ``s_i``, the sparsity set at ``t0`` (default 0).

    Returns:
        Mean FLOPs per training step.

    Example:
        >>> flops = {"total": 10.0, "w": 10.0}
        >>> # dense on steps 0, 1; then sparsity .5 * (1 - (1 - p)^3) at p = 0, .5, 1; 8 steps
        >>> pruning_training_flops_per_step(flops, {"w": 0.5}, total_steps=8, t0=2, t1=4)
        20.859375
    """
    densities = _densities(densities, flops)
    total_steps = _check_int("total_steps", total_steps, 1)
    t0 = _check_int("t0", t0, 0)
    t1 = _check_int("t1", t1, t0 + 1)
    frequency = _check_int("frequency", frequency, 1)
    if not (isinstance(initial_sparsity, numbers.Real) and 0.0 <= initial_sparsity < 1.0):
        raise ValueError(f"initial_sparsity must be in [0, 1), got initial_sparsity={initial_sparsity!r}")
    # Mean over steps of w(t) = 1 (dense) before t0, else (1 - p)^3 at the last pruning step.
    steps = [s for s in _pruning_steps(t0, t1, frequency) if s < total_steps]
    before = min(t0, total_steps)
    after, weighted = 0, 0.0
    for i, start in enumerate(steps):
        end = steps[i + 1] if i + 1 < len(steps) else total_steps
        after += end - start
        weighted += (end - start) * _cubic_remaining(start, t0, t1)
    mean_densities = {}
    for name, d in densities.items():
        s_f = 1.0 - d
        # density after pruning started: 1 - s_f - (s_i - s_f) (1 - p)^3
        mean_densities[name] = (before + after * (1.0 - s_f) - (initial_sparsity - s_f) * weighted) / total_steps
    return 3.0 * sparse_forward_flops(flops, mean_densities)


def relative_flops(
    model_or_flops: Union[nn.Module, Mapping[str, float]],
    densities: Mapping[str, Density],
    method: str = "rigl",
    *,
    inputs: Union[Tensor, Sequence[Tensor], None] = None,
    delta: int = 100,
    t_end: Optional[int] = None,
    total_steps: Optional[int] = None,
    pruning: Any = None,
) -> dict[str, float]:
    """Training and inference FLOPs relative to dense, as in the RigL paper's Table 2.

    Args:
        model_or_flops: an ``nn.Module`` (then ``inputs`` is required and FLOPs are
            counted with :func:`forward_flops`) or the output of :func:`forward_flops`.
        densities: name -> density in [0, 1] or mask tensor (``state.masks`` works);
            layers absent are dense. For ``"pruning"``: the final densities.
        method: one of :data:`TRAINING_METHODS`.
        inputs: example input(s) of the module.
        delta: ΔT for ``"rigl"``.
        t_end: optional, for ``"rigl"`` (needs ``total_steps``): updates (and their
            dense gradients) stop at ``t_end``, so the steps from ``t_end`` to
            ``total_steps`` cost ``3 f_S``. Without it the paper's formula is
            applied to every step (as in its Table 2).
        total_steps: training steps; required for ``"pruning"`` and with ``t_end``.
        pruning: for ``"pruning"``: an object with the attributes ``t0``, ``t1``,
            ``frequency`` and ``initial_sparsity`` (e.g.
            :class:`rigl_func.pruning.PruningConfig`).

    Returns:
        ``{"train": train / (3 f_D), "inference": f_S / f_D, "f_dense": f_D,
        "f_sparse": f_S, "train_flops_per_step": ...}`` (for pruning ``f_S`` is the
        final sparse forward cost).

    Raises:
        ValueError: unknown method, missing arguments, bad densities.

    Example:
        >>> net = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
        >>> r = relative_flops(net, {"0.weight": 0.1}, "rigl", inputs=torch.zeros(1, 100), delta=100)
        >>> round(r["inference"], 4), round(r["train"], 4)  # fc2 (1/11 of the FLOPs) is dense
        (0.1818, 0.1845)
    """
    if method not in TRAINING_METHODS:
        raise ValueError(f"method must be one of {TRAINING_METHODS}, got method={method!r}")
    if isinstance(model_or_flops, nn.Module):
        if inputs is None:
            raise ValueError("relative_flops(model, ...) needs inputs=example input(s)")
        inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        flops = forward_flops(model_or_flops, *inputs)
    elif isinstance(model_or_flops, Mapping) and "total" in model_or_flops:
        flops = model_or_flops
    else:
        raise TypeError("model_or_flops must be an nn.Module or the dict returned by forward_flops, "
                        f"got {type(model_or_flops).__name__}")
    f_dense = float(flops["total"])
    if f_dense <= 0:
        raise ValueError(f"the dense forward pass has no counted FLOPs (total={f_dense})")
    f_sparse = sparse_forward_flops(flops, densities)
    if method == "pruning":
        if pruning is None or total_steps is None:
            raise ValueError("method='pruning' needs pruning=<object with t0, t1, frequency, initial_sparsity> "
                             "and total_steps=")
        train = pruning_training_flops_per_step(
            flops, densities, total_steps=total_steps, t0=pruning.t0, t1=pruning.t1,
            frequency=pruning.frequency, initial_sparsity=float(getattr(pruning, "initial_sparsity", 0.0)))
    else:
        train = training_flops_per_step(method, f_sparse, f_dense, delta)
        if method == "rigl" and t_end is not None:
            if total_steps is None:
                raise ValueError("t_end needs total_steps")
            total_steps = _check_int("total_steps", total_steps, 1)
            t_end = min(_check_int("t_end", t_end, 0), total_steps)
            train = (train * t_end + 3.0 * f_sparse * (total_steps - t_end)) / total_steps
    return {
        "train": train / (3.0 * f_dense),
        "inference": f_sparse / f_dense,
        "f_dense": f_dense,
        "f_sparse": f_sparse,
        "train_flops_per_step": train,
    }

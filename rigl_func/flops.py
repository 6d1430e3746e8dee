"""FLOP accounting for sparse training (RigL paper, Sec. 4 and Appendix H).

Forward FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` on a
real forward pass; a sparse layer's FLOPs scale with its density (the paper's
accounting: sparse kernels are assumed to skip zeros). Training cost per step uses
the paper's convention that a backward pass costs twice the forward pass:

* dense:            3 f_D
* static / SET:     3 f_S
* SNFS:             2 f_S + f_D          (dense gradients every step)
* RigL:             (3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)   (dense gradient every ΔT)

where f_D / f_S are the dense / sparse forward FLOPs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["forward_flops", "sparse_forward_flops", "training_flops_per_step"]


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


def sparse_forward_flops(flops: Mapping[str, float], densities: Mapping[str, float]) -> float:
    """Forward FLOPs when each weight in ``densities`` runs at that density.

    Args:
        flops: output of :func:`forward_flops`.
        densities: name -> fraction of nonzeros (layers absent stay dense).

    Example:
        >>> sparse_forward_flops({"total": 100.0, "w": 80.0}, {"w": 0.25})
        40.0
    """
    unknown = [k for k in densities if k not in flops]
    if unknown:
        raise ValueError(f"densities has names without FLOP counts: {unknown}")
    return flops["total"] - sum(flops[k] * (1.0 - d) for k, d in densities.items())


def training_flops_per_step(method: str, f_sparse: float, f_dense: float, delta: int = 100) -> float:
    """Training FLOPs of one step (forward + backward) under the paper's accounting.

    Args:
        method: ``"dense"``, ``"static"``, ``"set"``, ``"snfs"`` or ``"rigl"``.
        f_sparse: sparse forward FLOPs f_S. f_dense: dense forward FLOPs f_D.
        delta: ΔT, steps between RigL updates.

    Example:
        >>> training_flops_per_step("rigl", 1.0, 10.0, delta=1)  # (3 + 2 + 10) / 2
        7.5
    """
    if method == "dense":
        return 3.0 * f_dense
    if method in ("static", "set"):
        return 3.0 * f_sparse
    if method == "snfs":
        return 2.0 * f_sparse + f_dense
    if method == "rigl":
        if delta <= 0:
            raise ValueError(f"delta must be > 0, got delta={delta}")
        return (3.0 * f_sparse * delta + 2.0 * f_sparse + f_dense) / (delta + 1)
    raise ValueError(f"method must be one of dense/static/set/snfs/rigl, got method={method!r}")

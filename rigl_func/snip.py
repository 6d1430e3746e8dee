"""SNIP initialization: masks from the connection sensitivity ``|w · g|`` on one batch.

SNIP (Lee et al. 2019, "SNIP: Single-shot Network Pruning based on Connection
Sensitivity", Sec. 4.1) scores every connection of the *dense* network at
initialization by ``|w_j · dL/dw_j|`` on one mini-batch and keeps the highest
scores (the paper's normalization by the sum does not change a top-k). We follow
the variant of the RigL paper and code (Evci et al. 2020, Sec. 4; ``SparseSnipOptimizer``
in google-research/rigl ``sparse_optimizers.py``, applied once at step 0): the top
entries are taken **per layer**, each layer keeping exactly the number of active
entries the config's sparsity distribution prescribes (:func:`rigl_func.target_nnz`),
so SNIP, Static, SET, SNFS and RigL are compared at identical per-layer sparsities.
Training then continues static (``RigLConfig(method="static")``) or dynamic (any
other method) from these masks.

Selection uses :func:`rigl_func.selection.select_top`: exactly ``k`` entries per
layer, equal scores keep the lower flat index, scores compared in float32.

Non-finite scores (``w · g`` NaN or ``±inf``, e.g. from a NaN weight or an
overflowing gradient) are ranked **below every finite score**, so they are never
kept before a finite one; they are kept only when a layer has fewer than ``k``
finite scores (then lower flat index first), which keeps the count exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from rigl_func.config import RigLConfig
from rigl_func.masks import sparse_param_names, target_nnz
from rigl_func.selection import select_top
from rigl_func.state import RigLState, init_state

__all__ = ["snip_scores", "snip_masks", "snip_grads", "snip_init"]

Params = Mapping[str, Tensor]


def snip_scores(param: Tensor, grad: Tensor) -> Tensor:
    """SNIP connection sensitivity of one layer, ``|w · g|`` with non-finite -> ``-inf``.

    Args:
        param: float tensor, the dense weight at initialization, e.g. ``[out, in]``.
        grad: float tensor, same shape, ``dL/dw`` of the dense network on one batch.

    Returns:
        float tensor, same shape and dtype: ``|param * grad|`` where finite, ``-inf``
        where NaN or ``±inf`` (ranked below every finite score). Pure.

    Example:
        >>> snip_scores(torch.tensor([2.0, -1.0, float("nan")]), torch.tensor([0.5, 3.0, 1.0]))
        tensor([1., 3., -inf])
    """
    scores = (param * grad).abs()
    return torch.where(torch.isfinite(scores), scores, torch.full((), -torch.inf, dtype=scores.dtype, device=scores.device))


def _check_tree(tree: Any, names: Sequence[str], argname: str, params: Params) -> None:
    if not isinstance(tree, Mapping):
        raise TypeError(f"{argname} must be a dict[str, Tensor], got {argname}={type(tree).__name__}")
    for name in names:
        if name not in tree:
            raise ValueError(f"{argname} is missing the sparse layer {name!r}")
        value = tree[name]
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{argname}[{name!r}] must be a floating-point tensor, got "
                            f"{getattr(value, 'dtype', type(value).__name__)}")
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(f"{argname}[{name!r}] has shape {tuple(value.shape)} but "
                             f"params[{name!r}] has shape {tuple(params[name].shape)}")


def snip_masks(
    params: Params,
    grads: Params,
    config: RigLConfig,
    names: Optional[Sequence[str]] = None,
) -> dict[str, Tensor]:
    """SNIP masks: per sparse layer, the ``k`` entries with the largest ``|w · g|``.

    ``k = target_nnz(shapes, config)[name]``: the per-layer counts of the config's
    distribution, so the masks pass :func:`rigl_func.check_state` for ``config``.

    Args:
        params: ``dict[str, Tensor]``, the *dense* weights at initialization.
        grads: ``dict[str, Tensor]``, the dense gradients ``dL/dw`` on one batch, at
            least for the sparse layers.
        config: supplies the sparsity, distribution and include/exclude/dense rules.
        names: the sparse layers; ``None``: :func:`rigl_func.sparse_param_names`
            of ``params`` (every tensor with >= 2 dims) filtered by ``config``.
            Pass ``sparse_param_names(model, config)`` to use module types.

    Returns:
        ``dict[str, bool Tensor]``, one mask per sparse layer (shaped like the
        param) with exactly ``k`` active entries. Ties keep the lower flat index;
        NaN/``±inf`` scores come after every finite one (see :func:`snip_scores`).
        Pure: inputs are not modified.

    Raises:
        TypeError/ValueError: a sparse layer is missing from ``params``/``grads``,
            has another shape, or is not floating point.
        ValueError: a structured config (``structure != "unstructured"``).

    Example:
        >>> w = {"w": torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.1, -1.0]])}
        >>> g = {"w": torch.tensor([[1.0, 1.0, 4.0], [0.1, 10.0, -0.5]])}
        >>> cfg = RigLConfig(t_end=10, delta=5, sparsity=0.5, distribution="uniform")
        >>> snip_masks(w, g, cfg)["w"].int().tolist()  # |w·g| = [[1, 2, 2], [.3, 1, .5]]
        [[1, 1, 1], [0, 0, 0]]
    """
    if not isinstance(config, RigLConfig):
        raise TypeError(f"config must be a RigLConfig, got config={config!r}")
    structure = getattr(config, "structure", "unstructured")
    if structure != "unstructured":
        raise ValueError(f"SNIP masks are unstructured; got structure={structure!r} "
                         "(SNIP for N:M or block patterns is not supported: use structure=\"unstructured\")")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict[str, Tensor], got params={type(params).__name__}")
    names = sparse_param_names(params, config) if names is None else list(names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"names has entries that are not in params: {unknown}")
    _check_tree(params, names, "params", params)
    _check_tree(grads, names, "grads", params)
    counts = target_nnz({n: tuple(params[n].shape) for n in names}, config)
    masks = {}
    for name in names:
        scores = snip_scores(params[name], grads[name])
        everything = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        masks[name] = select_top(scores, everything, counts[name])
    return masks


def snip_grads(
    model: Union[nn.Module, Params],
    loss_fn: Callable[..., Tensor],
    batch: Optional[tuple] = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Dense weights and gradients of one batch, for :func:`snip_masks`.

    Does not touch the model: the params are detached copies, ``.grad`` is left
    alone, and buffers (e.g. BatchNorm running statistics) are cloned before the
    forward pass, so their in-place updates do not reach the model.

    Args:
        model: an ``nn.Module`` or a ``dict[str, Tensor]`` of params.
        loss_fn: with ``batch=None``, ``loss_fn(params) -> scalar`` (``params`` a
            ``dict[str, Tensor]``; use ``torch.func.functional_call``). With a
            ``batch=(inputs, targets)`` and a module, ``loss_fn(outputs, targets)``
            (e.g. ``torch.nn.functional.cross_entropy``), where ``outputs`` is the
            model applied to ``inputs`` (a tensor or a tuple of positional inputs).
        batch: ``None`` or ``(inputs, targets)``.

    Returns:
        ``(params, grads)``: dicts over all params; unused params get zero grads.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> x, y = torch.ones(4, 3), torch.zeros(4, 1)
        >>> p, g = snip_grads(net, nn.functional.mse_loss, (x, y))
        >>> sorted(g), g["weight"].shape
        (['bias', 'weight'], torch.Size([1, 3]))
    """
    if isinstance(model, nn.Module):
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        buffers = {k: v.clone() for k, v in model.named_buffers()}
    elif isinstance(model, Mapping):
        if batch is not None:
            raise TypeError("batch=(inputs, targets) needs an nn.Module (a params dict has no forward); "
                            "pass loss_fn(params) -> loss and batch=None instead")
        params = {k: v.detach().clone() for k, v in model.items()}
        buffers = {}
    else:
        raise TypeError(f"model must be an nn.Module or a dict of tensors, got model={type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got loss_fn={loss_fn!r}")
    leaves = {k: v.requires_grad_(True) if v.is_floating_point() else v for k, v in params.items()}
    with torch.enable_grad():
        if batch is None:
            loss = loss_fn(leaves)
        else:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError(f"batch must be a pair (inputs, targets), got batch of type {type(batch).__name__}")
            inputs, targets = batch
            inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
            outputs = torch.func.functional_call(model, {**leaves, **buffers}, inputs)
            loss = loss_fn(outputs, targets)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
        wrt = [k for k, v in leaves.items() if v.requires_grad]
        grads = torch.autograd.grad(loss.reshape(()), [leaves[k] for k in wrt], allow_unused=True)
    out = {k: torch.zeros_like(leaves[k]) if g is None else g.detach() for k, g in zip(wrt, grads)}
    return {k: v.detach() for k, v in leaves.items()}, out


def snip_init(
    model: Union[nn.Module, Params],
    loss_fn: Callable[..., Tensor],
    config: RigLConfig,
    *,
    seed: int,
    batch: Optional[tuple] = None,
) -> RigLState:
    """A :class:`rigl_func.RigLState` whose masks are SNIP's, ready for training.

    :func:`snip_grads` on one batch, then :func:`snip_masks` on the sparse layers
    (module types and ``config`` decide which, as in :func:`rigl_func.init_state`),
    then ``init_state(model, config, masks=...)``. The masks are deterministic given
    the weights and the batch; ``seed`` becomes the state's random ``key`` (used by
    random criteria such as SET's and by ``grow_init="normal"``). As after
    ``init_state``, zero the pruned weights with
    ``params = rigl_func.apply_masks(params, state.masks)``.

    Args:
        model: an ``nn.Module`` or a ``dict[str, Tensor]`` of dense params.
        loss_fn: see :func:`snip_grads`.
        config: the RigL config of the training that follows; ``method="static"``
            for SNIP as published, any other method for SNIP + dynamic training.
        seed: int, the state's random key.
        batch: ``None`` or ``(inputs, targets)``, see :func:`snip_grads`.

    Returns:
        A fresh :class:`rigl_func.RigLState` (``step == 0``) with SNIP masks.

    Raises:
        TypeError: ``seed`` not an int, or bad ``model``/``loss_fn``/``config``.

    Example:
        >>> from rigl_func import apply_masks
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
        >>> cfg = RigLConfig(t_end=100, delta=10, sparsity=0.75, distribution="uniform", method="static")
        >>> state = snip_init(net, nn.functional.cross_entropy, cfg, seed=1, batch=(x, y))
        >>> {k: int(m.sum()) for k, m in state.masks.items()}, int(state.key)
        ({'0.weight': 32, '2.weight': 8}, 1)
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got seed={seed!r}")
    if not isinstance(config, RigLConfig):
        raise TypeError(f"config must be a RigLConfig, got config={config!r}")
    params, grads = snip_grads(model, loss_fn, batch)
    masks = snip_masks(params, grads, config, names=sparse_param_names(model, config))
    state = init_state(model, config, masks=masks)
    return state._replace(key=torch.tensor(seed, dtype=torch.int64, device=state.key.device))

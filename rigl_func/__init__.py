"""rigl_func: functional dynamic sparse training (RigL, Evci et al. 2020) for PyTorch.

Pure functions over ``dict[str, Tensor]`` trees and an immutable :class:`RigLState`;
they compose with ``torch.func`` (``functional_call``, ``grad``, ``vmap``) and
``torch.compile``. :class:`RigLScheduler` is a drop-in, stateful shell for rigl-torch
users.
"""

from __future__ import annotations

from rigl_func import checkpoint, distributed
from rigl_func.checkpoint import load_checkpoint, remove_stale_temp_files, save_checkpoint
from rigl_func.config import RigLConfig
from rigl_func.criteria import CRITERIA, MissingExtrasError, criterion, gradient, magnitude, resolve_criterion
from rigl_func.distributions import erdos_renyi, erk, get_distribution, nnz_for, uniform
from rigl_func.diagnostics import density, itop_rate, summary, turnover, update_ever_active
from rigl_func.masks import (
    apply_masks,
    init_masks,
    sparse_param_names,
    target_nnz,
    target_sparsities,
    validate_masks,
)
from rigl_func.flops import forward_flops, relative_flops
from rigl_func.functional_optim import AdamW, AdamWState, CustomOptimizer, SGD, SGDState, adamw, custom_optimizer, sgd
from rigl_func.optim import mask_torch_optimizer_state_, reset_optimizer_state, reset_torch_optimizer_state_
from rigl_func.pruning import (
    PruningConfig,
    init_pruning_masks,
    is_pruning_step,
    mean_density_over_training,
    mean_layer_densities_over_training,
    prune,
    pruning_layer_sparsities,
    pruning_sparsity,
    pruning_steps,
    pruning_target_nnz,
)
from rigl_func.scheduler import RigLScheduler
from rigl_func.schedules import (
    constant_schedule,
    cosine_schedule,
    drop_fraction,
    in_accumulation_window,
    is_update_step,
    linear_schedule,
)
from rigl_func.selection import drop, grow
from rigl_func.snip import snip_grads, snip_init, snip_masks, snip_scores
from rigl_func.sparse_optimizer import RigLOptimizer, RigLOptimizerState, rigl
from rigl_func.sparse_layout import BlockLayout, block_layout, block_layouts, with_dense_grad
from rigl_func.sparse_linear import SparseLinear, set_layouts_, sparse_linear, sparse_modules
from rigl_func.state import RigLState, check_state, init_state, stack_states, unstack_states
from rigl_func.topology import accumulate, update_layer, update_topology

__version__ = "0.1.0"

# The state types load with torch.load(weights_only=True) (load_checkpoint also re-adds them
# for its call if a caller's torch.serialization.safe_globals context removed them).
import torch as _torch

_torch.serialization.add_safe_globals(checkpoint.state_types())
del _torch

__all__ = [
    "PruningConfig",
    "RigLConfig",
    "RigLScheduler",
    "RigLState",
    "CRITERIA",
    "checkpoint",
    "distributed",
    "accumulate",
    "apply_masks",
    "check_state",
    "constant_schedule",
    "cosine_schedule",
    "drop",
    "drop_fraction",
    "erdos_renyi",
    "erk",
    "get_distribution",
    "gradient",
    "grow",
    "init_masks",
    "init_state",
    "stack_states",
    "unstack_states",
    "in_accumulation_window",
    "is_update_step",
    "linear_schedule",
    "load_checkpoint",
    "magnitude",
    "mask_torch_optimizer_state_",
    "nnz_for",
    "reset_optimizer_state",
    "reset_torch_optimizer_state_",
    "remove_stale_temp_files",
    "resolve_criterion",
    "save_checkpoint",
    "sparse_param_names",
    "target_nnz",
    "target_sparsities",
    "uniform",
    "update_layer",
    "update_topology",
    "validate_masks",
    "init_pruning_masks",
    "is_pruning_step",
    "mean_density_over_training",
    "mean_layer_densities_over_training",
    "prune",
    "pruning_layer_sparsities",
    "pruning_sparsity",
    "pruning_steps",
    "pruning_target_nnz",
    "snip_grads",
    "snip_init",
    "snip_masks",
    "snip_scores",
    "density",
    "forward_flops",
    "itop_rate",
    "relative_flops",
    "summary",
    "turnover",
    "update_ever_active",
    "SGD",
    "SGDState",
    "AdamW",
    "AdamWState",
    "sgd",
    "adamw",
    "CustomOptimizer",
    "custom_optimizer",
    "RigLOptimizer",
    "RigLOptimizerState",
    "rigl",
    "criterion",
    "MissingExtrasError",
    "BlockLayout",
    "block_layout",
    "block_layouts",
    "with_dense_grad",
    "sparse_linear",
    "SparseLinear",
    "sparse_modules",
    "set_layouts_",
]

"""The functional RigL training step, end to end, in ~40 lines.

A small MLP on synthetic data trained with ``torch.func.functional_call`` +
``torch.func.grad_and_value``, SGD with momentum as a pure pytree, and RigL topology
updates from :mod:`rigl_func`. Runs in a few seconds on a laptop CPU:

    python examples/functional_step.py --steps 300
"""

from __future__ import annotations

import argparse

import torch
from torch.func import functional_call, grad_and_value

import rigl_func as rf


def main(steps: int = 300, seed: int = 0) -> float:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    x = torch.randn(1024, 32)
    y = (x[:, :4] * 3 + 0.2 * torch.randn(1024, 4)).argmax(1)  # learnable synthetic labels

    config = rf.RigLConfig(sparsity=0.9, distribution="erk", delta=25, t_end=int(0.75 * steps), alpha=0.3)
    state = rf.init_state(model, config, seed=seed)
    params = rf.apply_masks({k: v.detach() for k, v in model.named_parameters()}, state.masks)
    momentum = {k: torch.zeros_like(v) for k, v in params.items()}

    def loss_fn(p, xb, yb):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xb,)), yb)

    for step in range(steps):
        idx = torch.randint(0, 1024, (64,))
        grads, loss = grad_and_value(loss_fn)(params, x[idx], y[idx])   # dense grads
        state = rf.accumulate(state, grads, config)                     # step += 1
        if rf.is_update_step(step + 1, config):                         # RigL step replaces SGD
            old_masks = state.masks
            params, state = rf.update_topology(params, grads, state, config)
            momentum = rf.reset_optimizer_state(momentum, old_masks, state.masks)
        else:
            grads = rf.apply_masks(grads, state.masks)
            momentum = {k: 0.9 * momentum[k] + grads[k] for k in params}
            params = {k: params[k] - 0.05 * momentum[k] for k in params}
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  updates {int(state.num_updates)}")

    acc = (functional_call(model, params, (x,)).argmax(1) == y).float().mean().item()
    density = {k: round(m.float().mean().item(), 3) for k, m in state.masks.items()}
    print(f"train accuracy {acc:.3f}; per-layer density {density}")
    return acc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.seed)

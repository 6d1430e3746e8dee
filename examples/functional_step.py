"""The functional RigL training loop, one call per iteration, and what that call does.

A small MLP on synthetic data trained with ``torch.func.functional_call`` +
``torch.func.grad_and_value`` and ``tx = rigl_func.rigl(config, rigl_func.sgd(...))``.
``spelled_out`` is the same iteration written with the public primitives
(``accumulate``, ``is_update_step``, ``update_topology``, ``reset_optimizer_state``):
start there to change one of the steps. ``--spelled-out`` trains with it; both give the
same weights bit for bit. A few seconds on a laptop CPU:

    python examples/functional_step.py --steps 300
"""

from __future__ import annotations

import argparse

import torch
from torch.func import functional_call, grad_and_value

import rigl_func as rf


def spelled_out(tx: rf.RigLOptimizer, params, grads, state: rf.RigLOptimizerState):
    """``tx.step(params, grads, state)`` with the primitives (eager, one model)."""
    rigl = rf.accumulate(state.rigl, grads, tx.config)                  # rigl.step += 1
    if rf.is_update_step(rigl.step, tx.config):                         # a RigL step replaces the optimizer step
        params, new_rigl = rf.update_topology(params, grads, rigl, tx.config)  # dense grads: drop, grow, zero-init
        opt = rf.reset_optimizer_state(state.opt, rigl.masks, new_rigl.masks)  # new connections: zero momentum
        rigl = new_rigl
    else:
        params, opt = tx.optimizer.step(params, grads, state.opt, rigl.masks)  # masks the gradients
    return params, rf.RigLOptimizerState(rigl=rigl, opt=opt, count=state.count + 1)


def main(steps: int = 300, seed: int = 0, use_spelled_out: bool = False) -> float:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    x = torch.randn(1024, 32)
    y = (x[:, :4] * 3 + 0.2 * torch.randn(1024, 4)).argmax(1)  # learnable synthetic labels

    def loss_fn(p, xb, yb):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xb,)), yb)

    config = rf.RigLConfig(sparsity=0.9, distribution="erk", delta=25, t_end=int(0.75 * steps), alpha=0.3)
    tx = rf.rigl(config, rf.sgd(0.05, momentum=0.9))
    params, state = tx.init(model, seed=seed)
    step = (lambda p, g, s: spelled_out(tx, p, g, s)) if use_spelled_out else tx.step
    for i in range(steps):
        idx = torch.randint(0, 1024, (64,))
        grads, loss = grad_and_value(loss_fn)(params, x[idx], y[idx])  # dense gradients
        params, state = step(params, grads, state)
        if i % 100 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {loss.item():.4f}  updates {int(state.rigl.num_updates)}")

    acc = (functional_call(model, params, (x,)).argmax(1) == y).float().mean().item()
    density = {k: round(m.float().mean().item(), 3) for k, m in state.rigl.masks.items()}
    print(f"train accuracy {acc:.3f}; per-layer density {density}")
    return acc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spelled-out", action="store_true", help="train with the primitives instead of tx.step")
    import _runinfo  # examples/ is on sys.path when run as a script: --threads, the run description

    _runinfo.add_threads_argument(parser)
    args = parser.parse_args()
    print(_runinfo.describe(_runinfo.run_info("cpu", threads=_runinfo.apply_threads(args.threads))))
    main(args.steps, args.seed, args.spelled_out)

"""K seeds of a sparse MLP trained in one call per step, reported as mean ± std.

Each model has its own initial weights, random mask (``tx.init(model, seed=k)``), data
order and optimizer state; ``rigl_func.stack_states`` stacks the K params and states, and
``tx.step_ensemble`` runs ``accumulate``, the topology update, the optimizer-state reset and
the masked SGD step of all K models at once (``torch.func.vmap`` inside, the branch
taken once for all K). A few seconds on a laptop CPU:

    python examples/ensemble.py --seeds 4 --steps 300      # --threads N: torch threads (default 1)
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.func import functional_call, grad, vmap

import rigl_func as rf


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))


def main(seeds: int = 4, steps: int = 300, batch: int = 64) -> list[float]:
    torch.manual_seed(1234)
    x = torch.randn(2048, 32)
    y = (x[:, :4] * 3 + 0.2 * torch.randn(2048, 4)).argmax(1)  # learnable synthetic labels
    config = rf.RigLConfig(sparsity=0.9, distribution="erk", delta=25, t_end=int(0.75 * steps))
    tx = rf.rigl(config, rf.sgd(0.05, momentum=0.9))

    inits = []
    for k in range(seeds):
        torch.manual_seed(k)
        inits.append(tx.init(_net(), seed=k))  # own initial weights and random mask per model
    params = rf.stack_states([p for p, _ in inits])
    state = rf.stack_states([s for _, s in inits])
    base = _net().to("meta")

    def loss_fn(p, xb, yb):
        return torch.nn.functional.cross_entropy(functional_call(base, p, (xb,)), yb)

    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (seeds, batch), generator=gen)  # own data order per model
        params, state = tx.step_ensemble(params, vmap(grad(loss_fn))(params, x[idx], y[idx]), state)

    logits = vmap(lambda p: functional_call(base, p, (x,)))(params)
    accs = [(logits[k].argmax(1) == y).float().mean().item() for k in range(seeds)]
    print(f"{seeds} seeds, {int(state.rigl.num_updates[0])} topology updates each: train accuracy "
          f"{statistics.mean(accs):.3f} ± {statistics.stdev(accs) if seeds > 1 else 0.0:.3f} (mean ± std)")
    return accs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    import _runinfo  # examples/ is on sys.path when run as a script: --threads, the run description

    _runinfo.add_threads_argument(parser)
    args = parser.parse_args()
    print(_runinfo.describe(_runinfo.run_info("cpu", threads=_runinfo.apply_threads(args.threads))))
    main(args.seeds, args.steps)

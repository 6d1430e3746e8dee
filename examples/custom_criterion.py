"""New drop and grow criteria in a few lines, in a functional loop, under vmap and compile.

A criterion is one plain function ``(param, grad, mask[, extras]) -> scores`` (see
:mod:`rigl_func.criteria`). This script defines two:

* ``drop_by_lookahead``: drop the weights that are smallest *after* the pending SGD
  step, ``|w - lr * g|`` (3 arguments);
* ``grow_by_agreement``: grow where the dense gradient agrees with its momentum,
  ``g * m``, with ``m`` a momentum of dense gradients kept by the loop and passed
  in through ``update_topology(..., aux={"momentum": m})`` (4 arguments: ``extras``
  holds the layer's entry of every aux tree, plus ``"key"``, ``"step"``).

Then it trains a small MLP with them, checks that ``vmap`` over 3 models equals a
loop, and that ``torch.compile(fullgraph=True)`` equals eager. A few seconds on a
laptop CPU:

    python examples/custom_criterion.py --steps 300
"""

from __future__ import annotations

import argparse

import torch
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_map

import rigl_func as rf

LR, BETA = 0.05, 0.9


def drop_by_lookahead(param, grad, mask):             # magnitude after the next SGD step
    return (param - LR * grad).abs()


def grow_by_agreement(param, grad, mask, extras):     # gradient x momentum of dense gradients
    return grad * extras["momentum"]


def _assert_equal(a, b, exact=True):
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        assert (torch.equal(x, y) if exact else torch.allclose(x, y)), "results differ"


def main(steps: int = 300, seed: int = 0, models: int = 3, compile_backend: str = "inductor") -> float:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    x = torch.randn(512, 16)
    y = (x[:, :4] * 2 + 0.2 * torch.randn(512, 4)).argmax(1)
    config = rf.RigLConfig(t_end=int(0.75 * steps), delta=20, sparsity=0.9, distribution="erk",
                           drop_criterion=drop_by_lookahead, grow_criterion=grow_by_agreement)

    def loss_fn(p, xb, yb):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (xb,)), yb)

    # 1. A functional training loop with the new criteria.
    state = rf.init_state(net, config, seed=seed)
    params = rf.apply_masks({k: v.detach() for k, v in net.named_parameters()}, state.masks)
    trend = {k: torch.zeros_like(params[k]) for k in state.masks}       # momentum of dense grads
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}      # SGD momentum
    for step in range(1, steps + 1):
        idx = torch.randint(0, 512, (64,))
        grads, loss = grad_and_value(loss_fn)(params, x[idx], y[idx])
        trend = {k: BETA * trend[k] + grads[k] for k in trend}
        state = rf.accumulate(state, grads, config)
        if rf.is_update_step(step, config):
            old = state.masks
            params, state = rf.update_topology(params, grads, state, config, aux={"momentum": trend})
            velocity = rf.reset_optimizer_state(velocity, old, state.masks)
            continue
        grads = rf.apply_masks(grads, state.masks)
        velocity = {k: BETA * velocity[k] + grads[k] for k in params}
        params = {k: params[k] - LR * velocity[k] for k in params}
    acc = (functional_call(net, params, (x,)).argmax(1) == y).float().mean().item()
    print(f"train accuracy {acc:.3f} after {int(state.num_updates)} topology updates, loss {loss.item():.3f}")

    # 2. vmap over `models` models (own params, grads, momentum and random key each) == a loop.
    gen = torch.Generator().manual_seed(seed + 1)
    ps = [tree_map(lambda v: v + 0.01 * torch.randn(v.shape, generator=gen), params) for _ in range(models)]
    ps = [rf.apply_masks(p, state.masks) for p in ps]
    gs = [tree_map(lambda v: torch.randn(v.shape, generator=gen), p) for p in ps]
    ms = [{k: torch.randn(state.masks[k].shape, generator=gen) for k in state.masks} for _ in range(models)]
    ss = [state._replace(key=torch.tensor(i), step=torch.tensor(config.delta)) for i in range(models)]  # an update step
    stack = lambda trees: tree_map(lambda *xs: torch.stack(xs), *trees)  # noqa: E731
    batched = vmap(rf.update_topology, in_dims=(0, 0, 0, None, 0))(
        stack(ps), stack(gs), stack(ss), config, {"momentum": stack(ms)})
    looped = [rf.update_topology(p, g, s, config, aux={"momentum": m}) for p, g, s, m in zip(ps, gs, ss, ms)]
    _assert_equal(batched, stack(looped))
    print(f"vmap over {models} models == loop")

    # 3. torch.compile(fullgraph=True) == eager.
    compiled = torch.compile(rf.update_topology, fullgraph=True, backend=compile_backend)
    _assert_equal(compiled(ps[0], gs[0], ss[0], config, {"momentum": ms[0]}), looped[0])
    print(f"torch.compile(fullgraph=True, backend={compile_backend!r}) == eager")
    return acc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--compile-backend", default="inductor")
    import _runinfo  # examples/ is on sys.path when run as a script: --threads, the run description

    _runinfo.add_threads_argument(parser)
    args = parser.parse_args()
    print(_runinfo.describe(_runinfo.run_info("cpu", threads=_runinfo.apply_threads(args.threads))))
    main(args.steps, args.seed, args.models, args.compile_backend)

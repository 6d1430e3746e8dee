"""Two criteria from the literature beyond RigL's, declared with ``rigl_func.criterion``.

* ``grow_by_momentum`` (SNFS, Dettmers & Zettlemoyer 2019, Sec. 3): grow where the
  *momentum* of the dense gradients is largest, ``|m|``, with ``m = beta m + g``
  kept by the training loop and passed as ``aux={"momentum": m}`` (to ``tx.step`` or
  ``update_topology``).
  It declares ``needs=("momentum",)``, so an update without that aux tree fails up
  front with a ``ValueError`` naming the criterion.
* ``drop_by_sensitivity`` (first-order Taylor saliency, Molchanov et al. 2017 / SNIP,
  Lee et al. 2019; GraNet's pruning score uses it too): drop the active weights whose
  removal changes the loss least, ``|w * g|``.

The script checks both with :func:`rigl_func.testing.check_criterion`, then trains a
small MLP with them, one ``tx.step(params, grads, state, aux={"momentum": m})`` call per
iteration. A few seconds
on a laptop CPU:

    python examples/criteria_zoo.py --steps 200
"""

from __future__ import annotations

import argparse

import torch
from torch.func import functional_call, grad_and_value

import rigl_func as rf
from rigl_func.testing import check_criterion

BETA = 0.9


@rf.criterion(needs=("momentum",))
def grow_by_momentum(param, grad, mask, extras):
    """SNFS growth: ``|momentum of dense gradients|``."""
    return extras["momentum"].abs()


@rf.criterion(takes_extras=False)
def drop_by_sensitivity(param, grad, mask):
    """First-order saliency ``|w * g|``: the loss change when ``w`` is removed."""
    return (param * grad).abs()


def check(compile: bool = False) -> None:
    """Both criteria pass every property of ``check_criterion``."""
    check_criterion(grow_by_momentum, role="grow", aux=("momentum",), compile=compile)
    check_criterion(drop_by_sensitivity, role="drop", compile=compile)


def main(steps: int = 200, seed: int = 0, lr: float = 0.1) -> float:
    """Train an MLP with both criteria; returns the final training loss."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    x = torch.randn(256, 16)
    y = (x[:, :4] * 2 + 0.2 * torch.randn(256, 4)).argmax(1)
    config = rf.RigLConfig(t_end=int(0.75 * steps), delta=20, sparsity=0.8, distribution="erk",
                           drop_criterion=drop_by_sensitivity, grow_criterion=grow_by_momentum)

    def loss_fn(p):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (x,)), y)

    tx = rf.rigl(config, rf.sgd(lr))
    params, state = tx.init(net, seed=seed)
    momentum = {k: torch.zeros_like(params[k]) for k in state.rigl.masks}
    for _ in range(steps):
        grads, loss = grad_and_value(loss_fn)(params)
        momentum = {k: BETA * momentum[k] + grads[k] for k in momentum}   # of the dense gradients
        params, state = tx.step(params, grads, state, aux={"momentum": momentum})  # reaches extras["momentum"]
    density = {k: round(float(m.float().mean()), 3) for k, m in state.rigl.masks.items()}
    print(f"final loss {float(loss):.4f}, {int(state.rigl.num_updates)} updates, densities {density}")
    return float(loss)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true", help="skip check_criterion")
    import _runinfo  # examples/ is on sys.path when run as a script: --threads, the run description

    _runinfo.add_threads_argument(parser)
    args = parser.parse_args()
    print(_runinfo.describe(_runinfo.run_info("cpu", threads=_runinfo.apply_threads(args.threads))))
    if not args.no_check:
        check()
        print("check_criterion: both criteria pass")
    main(args.steps, args.seed)

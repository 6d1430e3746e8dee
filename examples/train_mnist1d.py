"""Main demo: dense vs static vs SET vs RigL (uniform and ERK) on MNIST-1D.

MNIST-1D (Greydanus 2020) is generated locally by the ``mnist1d`` package (no
download): 4,000 training and 1,000 test sequences of length 40, 10 classes. A small
1-D CNN is trained with the *functional* rigl_func API (``functional_call`` +
``update_topology``) at 90% sparsity by default. Prints a results table (test
accuracy mean ± std over seeds, final density, training/inference FLOPs relative to
dense) and saves plots (accuracy curves, mean ± std over seeds; per-layer density uniform vs
ERK; mask turnover, every seed) and ``results.json`` to ``--out``.

    pip install -e ".[examples]"
    python examples/train_mnist1d.py                  # about 1.5 min on 2 CPU cores (2 worker processes)
    python examples/train_mnist1d.py --seeds 5 --epochs 100 --sparsity 0.8 0.9 0.95 --device cuda

Threads: ``--threads`` per worker process, default 1 (see ``_runinfo.py``: small models
gain nothing from more, and several threads collapse on a busy machine). The run prints
and ``results.json`` records the torch version, device and threads it ran with.
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
import _runinfo  # noqa: E402  (--threads and the run description)
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


def layer_labels(model: torch.nn.Module) -> dict[str, str]:
    """Short, readable names for the weight tensors of ``model`` in model order: ``{"1.weight": "conv1", ...,
    "14.weight": "fc2"}`` (convolutions ``convK``, linear layers ``fcK``, anything else its class name)."""
    labels, counts = {}, {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        kind = "conv" if isinstance(module, torch.nn.modules.conv._ConvNd) else (
            "fc" if isinstance(module, torch.nn.Linear) else type(module).__name__.lower())
        counts[kind] = counts.get(kind, 0) + 1
        labels[f"{name}.weight" if name else "weight"] = f"{kind}{counts[kind]}"
    return labels


def _seed_text(groups: list[list[dict]]) -> str:
    """``"3 seeds"`` when every group has the same number of runs, else ``"2-3 seeds"``."""
    sizes = sorted({len(g) for g in groups if g}) or [0]
    n = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    return f"{n} seed{'' if n == '1' else 's'}"


def make_figures(runs: list[dict]) -> dict:
    """The demo's three figures, ``{"accuracy": fig, "layer_density": fig, "turnover": fig}`` (matplotlib, Agg).

    Every curve is the mean over seeds with a ± 1 std band (the number of seeds is in each title); the turnover
    plot also draws each seed as a thin line; the density bars are means over seeds (std error bars when the seeds
    differ; the per-layer counts are deterministic, so they normally do not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    sparsities = sorted({r["sparsity"] for r in runs})
    groups = {(m, s): [r for r in runs if r["method"] == m and r["sparsity"] == s] for m in METHODS for s in sparsities}
    groups = {k: g for k, g in groups.items() if g}
    styles = ["-", "--", ":", "-."]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, sparsity), rs in groups.items():
        curves = torch.tensor([r["curve"] for r in rs], dtype=torch.float64) * 100
        mean = curves.mean(0).tolist()  # plain lists: matplotlib and torch tensors warn under NumPy 2
        std = curves.std(0).tolist() if len(rs) > 1 else [0.0] * len(mean)
        epochs = list(range(1, len(mean) + 1))
        label = method if method == "dense" else f"{method} s={sparsity}"
        style = "-" if method == "dense" else styles[sparsities.index(sparsity) % len(styles)]
        ax.plot(epochs, mean, style, color=colors[method], label=label)
        ax.fill_between(epochs, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                        color=colors[method], alpha=0.2, linewidth=0)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)",
           title=f"MNIST-1D test accuracy: mean ± std over {_seed_text(list(groups.values()))}")
    ax.legend(fontsize=8, title="line: mean, band: ± 1 std", title_fontsize=8)
    ax.grid(alpha=0.3)
    figures["accuracy"] = fig

    fig, ax = plt.subplots(figsize=(7, 4))
    # Every weight of the model, in model order; a layer absent from a run's masks is dense.
    model = sm.mnist1d_cnn()
    labels = layer_labels(model)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    names = list(labels)
    sparsity = sparsities[-1]
    density_groups, spread = [], 0.0
    for offset, method in ((-0.2, "rigl"), (0.2, "rigl-erk")):
        rs = groups.get((method, sparsity), [])
        if not rs:
            continue
        density_groups.append(rs)
        per_layer = torch.tensor([[r["layer_density"].get(n, 1.0) for n in names] for r in rs], dtype=torch.float64)
        std = per_layer.std(0) if len(rs) > 1 else torch.zeros(len(names))
        spread = max(spread, float(std.max()))
        ax.bar([i + offset for i in range(len(names))], per_layer.mean(0).tolist(),
               yerr=std.tolist() if spread > 1e-9 else None,
               capsize=3, width=0.4,
               color=colors[method], label="uniform (first layer dense)" if method == "rigl" else "ERK")
    ax.set_xticks(range(len(names)), [f"{labels[n]}\n{sizes[n]:,} w" for n in names])
    ax.set(xlabel="layer (weight count)", ylabel="density (fraction of weights kept)",
           title=f"RigL per-layer density at sparsity {sparsity} ("
                 + (f"mean ± std over {_seed_text(density_groups)})" if spread > 1e-9
                    else f"identical in all {_seed_text(density_groups)})"))
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    figures["layer_density"] = fig

    fig, ax = plt.subplots(figsize=(7, 4))
    turnover_groups = []
    for (method, sparsity), rs in groups.items():
        rs = [r for r in rs if r["turnover"]]
        if not rs or method not in ("set", "rigl", "rigl-erk"):
            continue
        turnover_groups.append(rs)
        steps = [t for t, _ in rs[0]["turnover"]]
        values = torch.tensor([[100 * v for _, v in r["turnover"]] for r in rs], dtype=torch.float64)
        for row in values:
            ax.plot(steps, row.tolist(), color=colors[method], linewidth=0.7, alpha=0.35)
        label = method if len(sparsities) == 1 else f"{method} s={sparsity}"
        ax.plot(steps, values.mean(0).tolist(), marker=".", color=colors[method], label=f"{label} (mean)")
    ax.set(xlabel="training step", ylabel="new connections (% of active)",
           title=f"Mask turnover per topology update: {_seed_text(turnover_groups)} (thin: each seed)")
    ax.legend()
    ax.grid(alpha=0.3)
    figures["turnover"] = fig
    return figures


def plot(runs: list[dict], out: Path) -> list[Path]:
    """Saves ``make_figures(runs)`` as ``out/{accuracy,layer_density,turnover}.png``."""
    import matplotlib.pyplot as plt

    paths = []
    for name, fig in make_figures(runs).items():
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
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
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, --threads torch threads each (1: in-process)")
    _runinfo.add_threads_argument(parser)
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
    info = _runinfo.run_info(args.device, jobs=min(args.jobs, len(jobs)) if args.jobs > 1 else 1,
                             threads=_runinfo.apply_threads(args.threads))
    print(_runinfo.describe(info), flush=True)
    try:
        with tqdm(total=len(jobs), desc=f"training ({args.epochs} epochs per run)", unit="run") as progress:
            for run in sm.run_parallel(work, jobs, args.jobs, threads=info["threads"]):
                runs.append(run)
                progress.set_postfix(method=run["method"], seed=run["seed"], acc=f"{run['test_acc']:.3f}")
                progress.update(1)
    finally:
        torch.set_num_threads(threads)
    runs.sort(key=lambda r: (r["sparsity"], list(METHODS).index(r["method"]), r["seed"]))
    table = summarize(runs)
    info["wall_s"] = round(time.time() - start, 1)
    print(f"\nMNIST-1D, {args.epochs} epochs, {args.seeds} seeds, {info['wall_s']:.0f} s; {_runinfo.describe(info)}\n")
    print(table)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "environment": info, "runs": runs}, indent=1))
    (args.out / "results.md").write_text(table + "\n")
    for path in plot(runs, args.out):
        print(f"saved {path}")
    return runs


if __name__ == "__main__":
    main()

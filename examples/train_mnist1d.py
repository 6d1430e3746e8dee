"""Main demo: dense vs static vs SET vs RigL (uniform and ERK) on MNIST-1D.

MNIST-1D (Greydanus 2020) is generated locally by the ``mnist1d`` package (no
download): 4,000 training and 1,000 test sequences of length 40, 10 classes. A small
1-D CNN is trained with the *functional* rigl_func API (``functional_call`` +
``update_topology``) at 90% sparsity by default. Prints a results table (test
accuracy mean ± std over seeds, final density, training/inference FLOPs relative to
dense) and saves plots (accuracy curves, per-layer density uniform vs ERK, mask
turnover) and ``results.json`` to ``--out``.

    pip install -e ".[examples]"
    python examples/train_mnist1d.py                  # ~5 min on 2 CPU cores
    python examples/train_mnist1d.py --seeds 5 --epochs 100 --sparsity 0.8 0.9 0.95 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

import rigl_func as rf
from rigl_func.flops import forward_flops, sparse_forward_flops, training_flops_per_step

METHODS = {  # name -> (distribution, topology update rule)
    "dense": (None, None),
    "static": ("uniform", None),
    "set": ("uniform", "random"),
    "rigl": ("uniform", "gradient"),
    "rigl-erk": ("erk", "gradient"),
}


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Conv1d(32, 64, 3, stride=2, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Conv1d(64, 64, 3, stride=2, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Flatten(), nn.Linear(640, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10),
    )


def load_mnist1d(cache: Path) -> dict[str, torch.Tensor]:
    """Generate MNIST-1D once (about 5 s) and cache it as a tensor file."""
    if cache.exists():
        return torch.load(cache)
    from mnist1d.data import get_dataset_args, make_dataset

    raw = make_dataset(get_dataset_args())
    data = {
        "x": torch.tensor(raw["x"], dtype=torch.float32), "y": torch.tensor(raw["y"], dtype=torch.int64),
        "x_test": torch.tensor(raw["x_test"], dtype=torch.float32), "y_test": torch.tensor(raw["y_test"], dtype=torch.int64),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


def train_one(method: str, sparsity: float, seed: int, data: dict, args, progress) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(seed)
    model = make_model().to(device)
    x, y = data["x"].to(device), data["y"].to(device)
    x_test, y_test = data["x_test"].to(device), data["y_test"].to(device)
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    distribution, rule = METHODS[method]

    params = {k: v.detach() for k, v in model.named_parameters()}
    masks, config, state = {}, None, None
    if distribution is not None:
        first = rf.sparse_param_names(model)[0]
        config = rf.RigLConfig(
            sparsity=sparsity, distribution=distribution, delta=args.delta, alpha=args.alpha,
            t_end=max(2, int(0.75 * total_steps)),
            dense=(first,) if distribution == "uniform" else (),  # paper: first layer dense for uniform
        )
        state = rf.init_state(params, config, seed=seed)
        params = rf.apply_masks(params, state.masks)
        masks = state.masks
    momentum = {k: torch.zeros_like(v) for k, v in params.items()}
    gen = torch.Generator().manual_seed(10_000 + seed)  # SET's random growth and batch order

    def grads_of(p, xb, yb) -> dict[str, torch.Tensor]:
        # Dense gradients w.r.t. the (masked) params. torch.autograd.grad on a
        # functional_call is ~3x cheaper per step on CPU than torch.func.grad here.
        leaves = {k: v.requires_grad_(True) for k, v in ((k, v.detach()) for k, v in p.items())}
        loss = nn.functional.cross_entropy(functional_call(model, leaves, (xb,)), yb)
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    def evaluate(p) -> float:
        model.eval()  # BatchNorm running statistics (buffers live in the module)
        with torch.no_grad():
            acc = (functional_call(model, p, (x_test,)).argmax(1) == y_test).float().mean().item()
        model.train()
        return acc

    curve, turnover = [], []
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(x), generator=gen).to(device)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            grads = grads_of(params, x[idx], y[idx])
            step += 1
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            if state is not None:
                state = rf.accumulate(state, grads, config)
            if rule is not None and rf.is_update_step(step, config):
                old = state.masks
                signal = grads if rule == "gradient" else {
                    k: torch.rand(m.shape, generator=gen).to(device) for k, m in old.items()}
                params, state = rf.update_topology(params, signal, state, config)
                momentum = rf.reset_optimizer_state(momentum, old, state.masks)
                new = sum(int((state.masks[k] & ~old[k]).sum()) for k in old)
                turnover.append((step, new / sum(int(m.sum()) for m in old.values())))
                masks = state.masks
                continue  # the RigL step replaces the optimizer step
            grads = rf.apply_masks(grads, masks)
            momentum = {k: 0.9 * momentum[k] + grads[k] + args.weight_decay * params[k] for k in params}
            params = rf.apply_masks({k: params[k] - lr * momentum[k] for k in params}, masks)
        curve.append(evaluate(params))
        progress.set_postfix(method=method, s=sparsity, seed=seed, acc=f"{curve[-1]:.3f}")
        progress.update(1)

    densities = {k: m.float().mean().item() for k, m in masks.items()}
    model.eval()  # BatchNorm with a single example
    flops = forward_flops(model, x_test[:1])
    f_dense = flops["total"]
    f_sparse = sparse_forward_flops(flops, densities)
    kind = {"dense": "dense", "static": "static", "set": "set"}.get(method, "rigl")
    active_steps = config.t_end if config is not None else 0
    train = (training_flops_per_step(kind, f_sparse, f_dense, args.delta) * active_steps
             + 3 * f_sparse * (total_steps - active_steps)) / (3 * f_dense * total_steps) if kind == "rigl" else \
        training_flops_per_step(kind, f_sparse, f_dense, args.delta) / (3 * f_dense)
    n_sparse = sum(m.numel() for m in masks.values())
    n_all = sum(v.numel() for v in params.values())
    nnz = sum(int(m.sum()) for m in masks.values()) + (n_all - n_sparse)
    return {
        "method": method, "sparsity": sparsity, "seed": seed, "test_acc": curve[-1], "curve": curve,
        "turnover": turnover, "layer_density": densities, "density": nnz / n_all,
        "train_flops": train, "infer_flops": f_sparse / f_dense,
    }


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
    for offset, method in ((-0.2, "rigl"), (0.2, "rigl-erk")):
        rs = [r for r in runs if r["method"] == method]
        if rs:
            names = list(rs[0]["layer_density"])
            ax.bar([i + offset for i in range(len(names))], [rs[0]["layer_density"][n] for n in names], width=0.4,
                   label="uniform (first layer dense)" if method == "rigl" else "ERK")
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
    parser.add_argument("--out", type=Path, default=Path("runs/mnist1d"))
    parser.add_argument("--smoke", action="store_true", help="tiny run (CI): 1 seed, 2 epochs, 512 samples")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs, args.delta = 1, 2, 2
    from tqdm.auto import tqdm

    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_mnist1d(args.out / "mnist1d.pt")
    if args.smoke:
        data = {k: v[:512] for k, v in data.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    runs, start = [], time.time()
    jobs = [(m, s, seed) for s in args.sparsity for m in args.methods for seed in range(args.seeds)
            if not (m == "dense" and s != args.sparsity[0])]
    with tqdm(total=len(jobs) * args.epochs, desc="training", unit="epoch") as progress:
        for method, sparsity, seed in jobs:
            runs.append(train_one(method, sparsity, seed, data, args, progress))
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

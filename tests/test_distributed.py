"""Data-parallel RigL with ``rigl_func.distributed`` (2 processes, gloo, CPU), exact
resume in fresh processes, and crash-safe checkpoints.

Two spawns of two interpreters each (starting them costs more than the training):

* phase 1 (``_dist_workers.phase1``): the functional loop with
  :func:`all_reduce_mean` for RigL, SET and SNFS, each rank starting from its *own*
  seed (rank 0's state and params are broadcast): masks and params bitwise equal on
  both ranks after every step; all_reduce_mean values and one collective per dtype;
  ``check_consistent`` raises on a perturbed mask and on a missing layer; the
  uninterrupted runs that save checkpoints (functional and ``RigLScheduler`` + DDP).
* phase 2 (``_dist_workers.phase2``, fresh processes): load each checkpoint, run to
  the end; final params, masks, accumulators and optimizer state must be *bitwise*
  equal to the uninterrupted run.

In the pytest process itself: the 1-process run with a batch of ``2B`` equals the
2-rank run (``B`` each) - same masks, allclose weights - and the checkpoint crash
tests (SIGKILL during repeated saves; an exception or a hard exit inside
``torch.save``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _dist_workers as W
from _timeouts import timeout_s
import rigl_func as rf
from rigl_func import distributed as rd
from rigl_func.checkpoint import load_checkpoint, remove_stale_temp_files, save_checkpoint

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo not available"
)
WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, out_dir: Path) -> dict:
    mp.spawn(fn, args=(WORLD, _free_port(), str(out_dir)), nprocs=WORLD, join=True)
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in range(1, WORLD):
        assert results[r].keys() == results[0].keys()
    return {name: [res[name] for res in results] for name in results[0]}


@pytest.fixture(scope="module")
def phase1(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return out, _spawn(W.phase1, out)


@pytest.fixture(scope="module")
def phase2(phase1):
    out, _ = phase1
    sub = out / "phase2"
    sub.mkdir()
    for f in out.glob("*.pt"):  # phase 2 reads the checkpoints and writes its own results there
        os.link(f, sub / f.name)
    return sub, _spawn(W.phase2, sub)


def _ok(results: dict, name: str) -> None:
    for rank, outcome in enumerate(results[name]):
        assert outcome == "ok", f"rank {rank}, check {name}:\n{outcome}"


def _load(path: Path) -> dict:
    return W.from_saved(load_checkpoint(path)) if "func_" in path.name or "final_" in path.name else load_checkpoint(path)


def _assert_trees_equal(a, b, what: str) -> None:
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb, f"{what}: structures differ"
    for i, (x, y) in enumerate(zip(la, lb)):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: leaf #{i} differs"
        else:
            assert x == y, f"{what}: leaf #{i}: {x!r} != {y!r}"


# ------------------------------------------------------------------ (a), (e): phase 1
@pytest.mark.parametrize("method", ["rigl", "set", "snfs"])
def test_masks_identical_on_all_ranks_after_every_step(phase1, method):
    _ok(phase1[1], f"masks_{method}")


def test_all_reduce_mean_values_and_one_collective_per_dtype(phase1):
    _ok(phase1[1], "all_reduce_mean")


def test_consistency_check_raises_on_perturbed_mask_and_missing_layer(phase1):
    _ok(phase1[1], "consistency_check")


# ------------------------------------------------------------------ (b): 2 x B == 1 x 2B
@pytest.mark.parametrize("method", ["rigl", "set", "snfs"])
def test_two_ranks_equal_one_process_with_double_batch(phase1, method):
    out, results = phase1
    _ok(results, f"masks_{method}")
    assert not dist.is_initialized()  # the helpers are no-ops here: world size 1
    net, config, run = W.init_run(method, 1, seed=0)
    single = W.train(net, config, run, W.STEPS, rank=0, world=1)
    double = _load(out / f"final_{method}.pt")
    for name, mask in single["state"].masks.items():
        assert torch.equal(mask, double["state"].masks[name]), f"{method} {name}: masks differ"
    for name, p in single["params"].items():
        torch.testing.assert_close(p, double["params"][name], rtol=1e-10, atol=1e-12, msg=f"{method} {name}")
    assert int(single["state"].num_updates) == int(double["state"].num_updates) == 4


# ------------------------------------------------------------------ (c): exact resume, fresh processes
@pytest.mark.parametrize("case,stop", [(c, s) for c, (_, _, stops) in W.RESUME_CASES.items() for s in stops])
def test_functional_resume_is_bitwise_exact(phase1, phase2, case, stop):
    _ok(phase1[1], f"reference_{case}")
    sub, results = phase2
    _ok(results, f"resume_{case}_{stop}")
    reference = _load(sub / f"func_{case}_final.pt")
    resumed = _load(sub / f"func_{case}_resumed_{stop}.pt")
    assert resumed["t"] == reference["t"] == W.STEPS
    _assert_trees_equal(resumed["state"], reference["state"], f"{case}@{stop} state")
    _assert_trees_equal(resumed["params"], reference["params"], f"{case}@{stop} params")
    _assert_trees_equal(resumed["momentum"], reference["momentum"], f"{case}@{stop} momentum")


@pytest.mark.parametrize("stop", W.SCHED_STOPS)
def test_scheduler_ddp_resume_is_bitwise_exact(phase1, phase2, stop):
    _ok(phase1[1], "reference_scheduler")
    sub, results = phase2
    _ok(results, f"resume_scheduler_{stop}")
    reference = load_checkpoint(sub / "sched_final.pt")
    resumed = load_checkpoint(sub / f"sched_resumed_{stop}.pt")
    assert reference["pruner"]["rigl_steps"] == 3 and reference["pruner"]["step"] == W.STEPS
    _assert_trees_equal(resumed, reference, f"scheduler@{stop}")


# ------------------------------------------------------------------ (d): crash-safe checkpoints
_WRITER = textwrap.dedent("""
    import sys, torch
    from rigl_func.checkpoint import save_checkpoint
    path = sys.argv[1]
    i = 0
    while True:
        i += 1
        save_checkpoint({"i": i, "x": torch.full((1 << 20,), float(i))}, path)  # 8 MiB
        print(i, flush=True)
""")


def test_sigkill_during_repeated_checkpointing_leaves_a_complete_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    printed = []
    try:
        while len(printed) < 3:  # at least three complete saves, then kill at an arbitrary moment of the loop
            line = proc.stdout.readline()
            assert line, "writer exited early"
            printed.append(int(line))
        time.sleep(0.07)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    reported = max(printed + [int(v) for v in proc.stdout.read().split()])
    ckpt = load_checkpoint(path)
    # one complete save: the last one reported before the kill, or a later one (done, not yet printed)
    assert ckpt["i"] >= reported and torch.equal(ckpt["x"], torch.full((1 << 20,), float(ckpt["i"])))
    remove_stale_temp_files(path)  # what a killed writer may leave: never the target's name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_exception_inside_torch_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"\x80\x02partial")  # a torn write, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert int(load_checkpoint(path)["step"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # temp file removed


def test_hard_exit_inside_torch_save_leaves_previous_checkpoint_and_a_distinct_temp_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)
    code = textwrap.dedent(f"""
        import os, torch
        from rigl_func.checkpoint import save_checkpoint
        def dying_save(obj, f, *a, **k):
            f.write(b"\\x80\\x02partial"); f.flush(); os._exit(9)   # killed mid-write: no cleanup runs
        torch.save = dying_save
        save_checkpoint({{"step": torch.tensor(2)}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s(300))
    assert proc.returncode == 9, proc.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == "ckpt.pt" and names[1].startswith("ckpt.pt.") and names[1].endswith(".tmp")
    assert int(load_checkpoint(path)["step"]) == 1  # the target was never touched
    assert remove_stale_temp_files(path) == [str(tmp_path / names[1])]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


# ------------------------------------------------------------------ single process: no-ops
def test_helpers_are_identities_without_a_process_group():
    assert not dist.is_initialized()
    tree = {"w": torch.randn(3, 2), "m": torch.tensor([True, False])}
    assert rd.broadcast_tree(tree) is tree
    grads = {"w": tree["w"]}
    assert rd.all_reduce_mean(grads) is grads
    rd.check_consistent(tree)
    assert rd.get_rank() == 0 and rd.get_world_size() == 1 and not rd.is_distributed()


def test_all_reduce_mean_rejects_non_float_leaves():
    with pytest.raises(TypeError, match="leaf #0"):
        rd.all_reduce_mean({"m": torch.tensor([True])})
    with pytest.raises(TypeError, match="floating-point"):
        rd.all_reduce_mean([3])


def test_checksums_distinguish_single_position_moves():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(64, 32, generator=g) < 0.2
    base = rd.tree_checksums({"m": mask})
    flat = mask.reshape(-1)
    on, off = flat.nonzero().flatten(), (~flat).nonzero().flatten()
    seen = set()
    for i in range(50):  # 50 different single moves: every checksum differs from the base and each other
        moved = flat.clone()
        moved[on[i]], moved[off[i]] = False, True
        s = rd.tree_checksums({"m": moved.view_as(mask)})
        assert s[0, 1] == base[0, 1] and s[0, 0] != base[0, 0]
        seen.add(int(s[0, 0]))
    assert len(seen) == 50
    w = torch.randn(5, generator=g, dtype=torch.float64)
    w2 = w.clone()
    w2[3] = torch.nextafter(w2[3], torch.tensor(10.0, dtype=torch.float64))  # one ulp
    assert rd.tree_checksums([w])[0, 0] != rd.tree_checksums([w2])[0, 0]


# ------------------------------------------------------------------ the example, one process (no torchrun)
@pytest.mark.parametrize("api", ["functional", "scheduler"])
def test_ddp_example_resume_is_bitwise_exact_in_one_process(tmp_path, api):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_train", ROOT / "examples" / "ddp_train.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    common = ["--api", api, "--steps", "24", "--delta", "5", "--grad-accumulation-n", "2", "--save-every", "7",
              "--hidden", "32", "--global-batch", "32"]
    example.main(common + ["--ckpt", str(tmp_path / "full.pt")])
    example.main(common + ["--ckpt", str(tmp_path / "part.pt"), "--stop-after", "14"])  # 14: inside the window
    assert load_checkpoint(tmp_path / "part.pt")["t"] == 14
    example.main(common + ["--ckpt", str(tmp_path / "part.pt"), "--resume"])
    _assert_trees_equal(load_checkpoint(tmp_path / "part.pt"), load_checkpoint(tmp_path / "full.pt"), api)


# ------------------------------------------------------------------ (d) a rank of a 2-rank job killed mid-run
def _launch_example(args: list, port: int) -> list:
    """The 2 ranks of ``examples/ddp_train.py`` as separate processes (what torchrun does)."""
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "examples" / "ddp_train.py"), *args], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _wait_ok(procs: list) -> None:
    outs = [p.communicate(timeout=timeout_s(900))[0] for p in procs]  # hang guard only
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)


def test_rank_killed_mid_run_leaves_a_complete_checkpoint_and_resume_is_exact(tmp_path):
    common = ["--api", "functional", "--steps", "300", "--delta", "5", "--grad-accumulation-n", "2",
              "--hidden", "32", "--global-batch", "32"]
    full, part = tmp_path / "full.pt", tmp_path / "part.pt"
    _wait_ok(_launch_example(common + ["--ckpt", str(full), "--save-every", "1000"], _free_port()))

    procs = _launch_example(common + ["--ckpt", str(part), "--save-every", "1"], _free_port())
    try:
        deadline = time.monotonic() + timeout_s(600)  # hang guard only
        while not (part.exists() and load_checkpoint(part)["t"] >= 7):  # a few saves done: rank 0 saves every step
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run ended before the kill"
            time.sleep(0.005)
        os.kill(procs[0].pid, signal.SIGKILL)  # the writer, at an arbitrary moment (possibly inside a save)
    finally:
        for p in procs:  # rank 1 would wait in its next collective: the job is torn down, as a launcher does
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
    ckpt = load_checkpoint(part)  # complete and loadable, whatever the moment of the kill
    assert 7 <= ckpt["t"] < 300 and set(ckpt) == {"api", "t", "state", "params", "momentum"}
    state = rf.RigLState(**ckpt["state"])
    config = rf.RigLConfig(sparsity=0.9, distribution="erk", delta=5, t_end=225, alpha=0.3, grad_accumulation_n=2)
    rf.check_state(state, ckpt["params"], config)  # exact nnz per layer, counters, accumulators
    assert int(state.step) == ckpt["t"]

    _wait_ok(_launch_example(common + ["--ckpt", str(part), "--resume"], _free_port()))  # fresh processes
    _assert_trees_equal(load_checkpoint(part), load_checkpoint(full), "resumed after a killed rank")

"""Sparse kernels (rigl_func.sparse_layout / sparse_kernels / sparse_linear / triton_block_sparse)
against the dense masked computation.

Stated tolerances (``assert_close`` with ``atol = TOL * max|reference|``, ``rtol = TOL``):
fp32 ``TOL = 1e-4`` (summation order differs from the dense matmul), bf16 ``TOL = 2e-2``
(a few bf16 ulps; the reference is the fp32 computation on the same bf16 inputs, rounded
to bf16). Gradients included: input, weight at plain steps (active blocks, exactly zero
elsewhere) and weight at update steps (dense).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import rigl_func as rf
from rigl_func.sparse_kernels import choose_kernel, gather_blocks, scatter_blocks
from rigl_func.sparse_layout import block_layout, block_layouts, layout_mask, with_dense_grad
from rigl_func.sparse_linear import SparseLinear, set_layouts_, sparse_linear, sparse_modules

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
KERNELS = ["dense", "blocks"] + (["triton"] if torch.cuda.is_available() else [])


def _block_mask(out: int, inp: int, block: tuple[int, int], density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(out // block[0], inp // block[1], generator=g) < density
    grid[0, 0] = True  # never empty
    return grid.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    scale = expected.float().abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * float(scale))


def _case(kernel: str, device: str, dtype: torch.dtype, block: tuple[int, int], seed: int = 0):
    if kernel == "triton" and (device != "cuda" or min(block) < 16):
        pytest.skip("triton: CUDA and blocks >= 16 (the CPU interpreter test is test_triton_interpreter)")
    if kernel == "blocks" and device != "cpu":
        pytest.skip("blocks: the CPU kernel")
    out, inp = 4 * block[0], 3 * block[1]
    mask = _block_mask(out, inp, block, 0.4, seed).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(out, inp, generator=g) * 0.5).to(device, dtype) * mask
    x = torch.randn(2, 5, inp, generator=g).to(device, dtype)
    b = torch.randn(out, generator=g).to(device, dtype)
    return mask, w, x, b, block_layout(mask, block, kernel=kernel)


def test_benchmark_comparison_kernels_equal_dense():
    """The kernels the benchmark compares against (torch BSR/CSR, gather) compute the same."""
    import benchmarks.sparse_speedup  # noqa: F401  (registers "bsr" and "gather")

    for kernel, block in (("bsr", (16, 16)), ("bsr", (1, 1)), ("gather", (32, 16)), ("gather", (1, 1))):
        test_forward_and_gradients_equal_dense_masked(kernel, block, torch.float32, "cpu")


def test_register_kernel_rejects_taken_names():
    from rigl_func.sparse_kernels import KERNEL_TABLE, register_kernel

    with pytest.raises(ValueError, match="reserved or taken"):
        register_kernel("dense", KERNEL_TABLE["dense"])
    with pytest.raises(ValueError, match="Kernel"):
        register_kernel("mine", (1, 2, 3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (1, 1)], ids=["b16x16", "b32x16", "unstructured"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_forward_and_gradients_equal_dense_masked(kernel, block, dtype, device):
    mask, w, x, b, lay = _case(kernel, device, dtype, block)
    w0, x0 = w.clone(), x.clone()

    def ref(w, x, b):  # the dense masked computation, in fp32 on the same inputs
        return F.linear(x.float(), (w * mask).float(), b.float())

    def loss(fn):
        return lambda w, x, b: (fn(w, x, b).float() * torch.linspace(-1, 1, w.shape[0], device=device)).sum()

    _close(sparse_linear(x, w, lay, b), ref(w, x, b).to(dtype), dtype)
    gw, gx, gb = grad(loss(lambda w, x, b: sparse_linear(x, w, lay, b)), argnums=(0, 1, 2))(w, x, b)
    rw, rx, rb = grad(loss(ref), argnums=(0, 1, 2))(w, x, b)
    _close(gx, rx.to(dtype), dtype)
    _close(gb, rb.to(dtype), dtype)
    _close(gw, rw.to(dtype), dtype)
    assert torch.all(gw[~mask] == 0), "plain-step weight gradient must be exactly zero outside the blocks"
    # update step: the dense weight gradient, that of x W^T at every entry
    gwd = grad(loss(lambda w, x, b: sparse_linear(x, w, lay._replace(dense_grad=True), b)))(w, x, b)
    rwd = grad(loss(lambda w, x, b: F.linear(x.float(), w.float(), b.float())))(w, x, b)
    _close(gwd, rwd.to(dtype), dtype)
    assert gwd[~mask].abs().sum() > 0
    assert torch.equal(w, w0) and torch.equal(x, x0), "inputs must not be mutated"


def test_only_active_blocks_are_read():
    mask, w, x, b, lay = _case("blocks", "cpu", torch.float32, (16, 16))
    noisy = w + (~mask) * 1e3  # garbage outside the layout
    for k in ("dense", "blocks"):
        torch.testing.assert_close(sparse_linear(x, noisy, lay._replace(kernel=k)), sparse_linear(x, w, lay))


def test_layout_indices_golden():
    m = torch.zeros(4, 6, dtype=torch.bool)
    m[0:2, 4:6] = m[2:4, 0:2] = m[2:4, 4:6] = True
    lay = block_layout(m, (2, 2), kernel="dense")
    assert lay.rows.tolist() == [0, 1, 1] and lay.cols.tolist() == [2, 0, 2]
    assert lay.crow.tolist() == [0, 1, 3] and lay.t_ccol.tolist() == [0, 1, 1, 3]
    assert lay.t_perm.tolist() == [1, 0, 2]  # column-major: (1,0), (0,2), (1,2)
    assert lay.nnzb == 3 and lay.density == pytest.approx(0.5)
    assert torch.equal(layout_mask(lay), m)
    w = torch.arange(24.0).view(4, 6)
    assert torch.equal(scatter_blocks(gather_blocks(w, lay), lay), w * m)


@pytest.mark.parametrize("call, err, text", [
    (lambda: block_layout(torch.ones(4, 6, dtype=torch.bool), (4, 4)), ValueError, "not divisible"),
    (lambda: block_layout(torch.eye(4, dtype=torch.bool), (2, 2)), ValueError, "union of whole 2x2 blocks"),
    (lambda: block_layout(torch.ones(4, 4), (2, 2)), ValueError, "2-D bool"),
    (lambda: block_layout(torch.ones(4, 4, dtype=torch.bool), (0, 2)), ValueError, "block"),
    (lambda: block_layout(torch.ones(4, 4, dtype=torch.bool), (2, 2), kernel="cusparse"), ValueError, "kernel"),
    (lambda: sparse_linear(torch.ones(1, 4), torch.ones(4, 4), "layout"), TypeError, "BlockLayout"),
    (lambda: sparse_linear(torch.ones(1, 4), torch.ones(4, 8),
                           block_layout(torch.ones(4, 4, dtype=torch.bool), (2, 2))), ValueError, "layout.shape"),
    (lambda: sparse_linear(torch.ones(1, 3), torch.ones(4, 4),
                           block_layout(torch.ones(4, 4, dtype=torch.bool), (2, 2))), ValueError, "features"),
])
def test_bad_inputs(call, err, text):
    with pytest.raises(err, match=text):
        call()


def test_vmap_equals_loop():
    mask, w, x, b, lay = _case("dense", "cpu", torch.float32, (16, 16))
    ws = torch.stack([w, 2 * w, -w])
    xs = torch.stack([x, x + 1, x * 0.5])

    def loss(w, x):
        return sparse_linear(x, w, lay, b).pow(2).sum()

    batched = vmap(grad(loss, argnums=(0, 1)))(ws, xs)
    looped = [grad(loss, argnums=(0, 1))(ws[k], xs[k]) for k in range(3)]
    for i in range(2):
        # vmap runs batched matmuls, which sum in another order than the loop's: fp32
        # rounding (torch 2.13's CPU bmm differed by 2e-5 relative, above assert_close's 1.3e-6
        # rtol / 1e-5 atol default for these magnitudes); scaled to the gradient's size.
        ref = torch.stack([g[i] for g in looped])
        torch.testing.assert_close(batched[i], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("kernel", ["dense", "blocks"])
def test_compile_equals_eager_and_no_recompile_after_topology_update(kernel):
    from torch._dynamo.testing import CompileCounterWithBackend

    mask, w, x, b, lay = _case(kernel, "cpu", torch.float32, (16, 16))
    # the same nnzb elsewhere: a topology update (RigL keeps each layer's count)
    mask2 = torch.roll(mask, shifts=16, dims=1)
    lay2 = block_layout(mask2, (16, 16), kernel=kernel)
    w2 = w.roll(16, 1)

    def loss(w, x, lay):
        return sparse_linear(x, w, lay, b).pow(2).sum()

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(grad(loss, argnums=(0, 1)), backend=counter, fullgraph=True)
    for ww, ll in ((w, lay), (w2, lay2), (w, lay._replace(dense_grad=False))):
        got, want = compiled(ww, x, ll), grad(loss, argnums=(0, 1))(ww, x, ll)
        for g1, g2 in zip(got, want):
            torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-4)
    assert counter.frame_count == 1, f"recompiled after a topology update: {counter.frame_count} frames"


def test_one_loop_with_tx_equals_dense_masked_training():
    """The documented loop (layouts once per update, dense_grad from tx.is_update_step)
    trains exactly like the dense masked loop: same masks after two topology updates,
    params equal to fp32 tolerance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    cfg = rf.RigLConfig(sparsity=0.75, distribution="uniform", structure="block", block=(16, 16),
                        delta=3, t_end=8, alpha=0.5)
    tx = rf.rigl(cfg, rf.adamw(1e-2))
    x, y = torch.randn(48, 32), torch.randn(48, 16)

    def dense_loss(p):
        return F.mse_loss(functional_call(model, p, (x,)), y)

    def sparse_loss(p, lays):
        h = F.gelu(sparse_linear(x, p["0.weight"], lays["0.weight"], p["0.bias"]))
        return F.mse_loss(sparse_linear(h, p["2.weight"], lays["2.weight"], p["2.bias"]), y)

    pd, sd = tx.init(model, seed=3)
    ps, ss = tx.init(model, seed=3)
    layouts = block_layouts(ss.rigl.masks, (16, 16), kernel="blocks")
    for _ in range(8):
        update = tx.is_update_step(ss)
        gs = grad(sparse_loss)(ps, with_dense_grad(layouts, update))
        ps, ss = tx.step(ps, gs, ss)
        if update:
            layouts = block_layouts(ss.rigl.masks, (16, 16), kernel="blocks")
        pd, sd = tx.step(pd, grad(dense_loss)(pd), sd)
    assert int(ss.rigl.num_updates) == 2
    for k in sd.rigl.masks:
        assert torch.equal(ss.rigl.masks[k], sd.rigl.masks[k]), k
    for k in pd:
        torch.testing.assert_close(ps[k], pd[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_export_sparse_modules_with_functional_call(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).to(device)
    tx = rf.rigl(rf.RigLConfig(sparsity=0.8, distribution="uniform", structure="block", block=(16, 16), t_end=1000),
                 rf.sgd(0.1))
    params, state = tx.init(model, seed=0)
    smodel = sparse_modules(model, block_layouts(state.rigl.masks, (16, 16)))
    assert isinstance(smodel[0], SparseLinear) and isinstance(model[0], nn.Linear)  # model untouched
    assert [n for n, _ in smodel.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = torch.randn(8, 32, device=device)
    torch.testing.assert_close(functional_call(smodel, params, (x,)), functional_call(model, params, (x,)),
                               rtol=1e-4, atol=1e-5)
    set_layouts_(smodel, with_dense_grad(block_layouts(state.rigl.masks, (16, 16)), True))
    assert smodel[2].layout.dense_grad
    with pytest.raises(ValueError, match="no nn.Linear"):
        sparse_modules(model, {"1.weight": smodel[0].layout})


def test_choose_kernel_table():
    lay = block_layout(_block_mask(1024, 256, (32, 32), 0.1, 0), (32, 32), kernel="dense")
    small = block_layout(_block_mask(512, 128, (32, 32), 0.1, 0), (32, 32), kernel="dense")
    dense_lay = block_layout(torch.ones(1024, 256, dtype=torch.bool), (32, 32), kernel="dense")
    unstructured = block_layout(_block_mask(1024, 256, (1, 1), 0.1, 0), (1, 1), kernel="dense")
    assert choose_kernel(lay, "cpu") == "blocks"
    assert choose_kernel(small, "cpu") == "dense"
    assert choose_kernel(lay, "cpu", torch.bfloat16) == "dense"
    assert choose_kernel(dense_lay, "cpu") == "dense"
    assert choose_kernel(unstructured, "cpu") == "dense"
    assert choose_kernel(lay, "meta") == "dense"
    assert choose_kernel(lay, "cuda") in ("triton", "dense")


_INTERPRETER_CHECK = r"""
import torch
from torch.func import grad
from rigl_func.sparse_layout import block_layout
from rigl_func.sparse_linear import sparse_linear
torch.manual_seed(0)
grid = torch.rand(4, 3) < 0.5
grid[0, 0] = True
mask = grid.repeat_interleave(16, 0).repeat_interleave(32, 1)          # [64, 96], blocks 16x32
for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):      # the interpreter's bf16 dot is broken
    w = (torch.randn(64, 96) * mask).to(dtype); x = torch.randn(70, 96).to(dtype)  # 70: a partial token tile
    tri, ref = (block_layout(mask, (16, 32), kernel=k) for k in ("triton", "dense"))
    loss = lambda w, x, lay: (sparse_linear(x, w, lay).float() * torch.linspace(-1, 1, 64)).sum()
    pairs = [(sparse_linear(x, w, tri), sparse_linear(x, w, ref))]
    pairs += list(zip(grad(loss, argnums=(0, 1))(w, x, tri), grad(loss, argnums=(0, 1))(w, x, ref)))
    for a, b in pairs:
        s = float(b.float().abs().max())
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * s)
print("triton interpreter ok")
"""


def test_triton_interpreter():
    triton = pytest.importorskip("triton", reason="triton not installed")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip(f"triton {triton.__version__}: its interpreter raises InterpreterError('only 0-dimensional "
                    "arrays can be converted to Python scalars') on these kernels (seen with triton 3.6 on the "
                    "GPU machine, where test_cuda_* run the compiled kernels instead); checked with triton 3.8")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert res.returncode == 0 and "triton interpreter ok" in res.stdout, res.stderr[-3000:]


def test_blocks_kernel_thread_split_is_bitwise_equal_to_one_thread():
    """The CPU kernel splits the blocks over threads; every block runs one single-threaded
    matmul either way, so the split changes nothing, bit for bit (and restores the threads)."""
    mask = _block_mask(128, 192, (16, 16), 0.5, 0)  # ~48 blocks: 3 threads get work
    lay = block_layout(mask, (16, 16), kernel="blocks")
    assert lay.nnzb >= 24
    w, x, b = torch.randn(128, 192) * mask, torch.randn(300, 192), torch.randn(128)
    before = torch.get_num_threads()

    def run():
        return [t.clone() for t in (sparse_linear(x, w, lay, b),
                                    *grad(lambda w, x: sparse_linear(x, w, lay).pow(2).sum(), argnums=(0, 1))(w, x))]

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(3)
        three = run()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    for a, c in zip(one, three):
        assert torch.equal(a, c)


def test_benchmark_smoke_prints_the_speedup_line_last():
    """``python -m benchmarks --only sparse_speedup --smoke``'s summary ends with the line the
    issue asks for, the medians of the same run (no timing is asserted)."""
    import re

    from benchmarks.common import Context
    from benchmarks.sparse_speedup import run

    section = run(Context(device=torch.device("cpu"), smoke=True, repeats=1, warmup=0), log=lambda msg: None)
    last = section.summary.splitlines()[-1]
    assert re.fullmatch(r"sparse_speedup cpu: mlp_fwd \d+\.\d\dx mlp_train \d+\.\d\dx \(95% block 32x32\)", last), last
    assert "(90% block 32x32)" in section.summary.splitlines()[-2]
    assert "exported: sparse_modules + functional_call" in section.summary


def test_vmap_with_custom_op_kernel_equals_loop_shared_and_per_model_layouts():
    """vmap over K models with the "blocks" kernel (custom ops with a loop vmap rule): the
    layout shared by all models, and one layout per model (stacked index tensors)."""
    base = _block_mask(64, 48, (16, 16), 0.5, 0)
    masks = [torch.roll(base, shifts=(16 * s, 16 * s), dims=(0, 1)) for s in range(3)]  # same count, 3 topologies
    lays = [block_layout(m, (16, 16), kernel="blocks") for m in masks]
    k = len(lays)
    assert len({tuple(l.rows.tolist()) + tuple(l.cols.tolist()) for l in lays}) == 3
    ws = torch.stack([torch.randn(64, 48) * m for m in masks])
    xs = torch.randn(k, 7, 48)

    def loss(w, x, lay):
        return sparse_linear(x, w, lay).pow(2).sum()

    shared = vmap(grad(loss, argnums=(0, 1)), in_dims=(0, 0, None))(ws, xs, lays[0])
    for i in range(k):
        for got, want in zip(shared, grad(loss, argnums=(0, 1))(ws[i], xs[i], lays[0])):
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-4)
    stacked = lays[0]._replace(**{f: torch.stack([getattr(l, f) for l in lays]) for f in lays[0]._fields[:5]})
    dims = lays[0]._replace(rows=0, cols=0, crow=0, t_perm=0, t_ccol=0, shape=None, block=None, kernel=None,
                            dense_grad=None)
    per_model = vmap(grad(loss, argnums=(0, 1)), in_dims=(0, 0, dims))(ws, xs, stacked)
    for i in range(k):
        for got, want in zip(per_model, grad(loss, argnums=(0, 1))(ws[i], xs[i], lays[i])):
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the triton kernel's hot path)")
def test_cuda_triton_forward_and_gradients_have_no_host_sync():
    from rigl_func.dispatch import count_ops

    mask, w, x, b, lay = _case("triton", "cuda", torch.bfloat16, (32, 32))
    # auto stays dense on CUDA: the Triton kernel measured slower than dense on an H200
    # (choose_kernel); this test runs the Triton kernel by name.
    assert block_layout(mask, (32, 32), dtype=torch.bfloat16).kernel == "dense"
    assert lay.kernel == "triton"

    def loss(w, x):
        return sparse_linear(x, w, lay, b).float().pow(2).sum()

    grad(loss, argnums=(0, 1))(w, x)  # warm-up: Triton compiles
    with count_ops() as counts:
        grad(loss, argnums=(0, 1))(w, x)
        grad(lambda w, x: sparse_linear(x, w, lay._replace(dense_grad=True), b).float().pow(2).sum())(w, x)
    assert counts.syncs == 0 and counts.host_to_device == 0, (counts.syncs, counts.host_to_device)


def test_lm_example_sparse_kernels(tmp_path):
    """examples/train_lm.py --sparse-kernels: on the LM, the sparse model's loss and gradients equal
    the dense masked model's (to fp32 rounding); a block run trains with the same counts and updates,
    its validation loss close (AdamW turns rounding differences of near-zero gradients, e.g. of the
    key bias, into full-size steps, so runs drift apart slowly), and the table names the kernels."""
    import importlib

    from torch.func import grad_and_value

    sys.path.insert(0, str(ROOT / "examples"))
    lm = importlib.import_module("train_lm")
    argv = ["--out", str(tmp_path), "--steps", "24", "--delta", "8", "--layers", "1", "--width", "256", "--heads", "4",
            "--context", "32", "--batch-size", "8", "--evals", "2", "--val-windows", "16", "--jobs", "1"]
    args = lm.parser().parse_args(argv)
    torch.manual_seed(0)
    model = lm.GPT(lm.GPTConfig(layers=1, width=256, heads=4, context=32))
    tx = lm.make_tx("rigl-b16", 0.75, 24, args, model)
    params, state = tx.init(model, seed=0)
    x, y = lm.batch_at(lm.corpus()["train"], torch.arange(8) * 1000, 32)
    layouts = block_layouts(state.rigl.masks, (16, 16))
    assert {lay.kernel for lay in layouts.values()} == {"blocks", "dense"}  # MLP: blocks; 256x256 attention: dense
    smodel = sparse_modules(model, layouts)
    g_dense, l_dense = grad_and_value(lm.loss_of(model))(params, x, y)
    g_sparse, l_sparse = grad_and_value(lm.loss_of(smodel))(params, x, y)
    torch.testing.assert_close(l_sparse, l_dense, rtol=1e-5, atol=1e-6)
    for k, g in g_dense.items():
        want = g * state.rigl.masks[k] if k in state.rigl.masks else g
        torch.testing.assert_close(g_sparse[k], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-9)

    masked = lm.train_one(("rigl-b16", 0.75, 0, 1), args)
    kernels = lm.train_one(("rigl-b16", 0.75, 0, 1), lm.parser().parse_args(argv + ["--sparse-kernels"]))
    assert not masked["sparse_kernels"] and kernels["sparse_kernels"] == "blocks+dense"
    assert kernels["num_updates"] == masked["num_updates"] == 2 and kernels["nnz"] == masked["nnz"]
    assert abs(kernels["val_loss"] - masked["val_loss"]) < 0.05
    assert "(kernels: blocks+dense)" in lm.summarize([kernels])

#!/usr/bin/env bash
# GPU check of issue 11, one command, under 10 minutes on one GPU (6 + 4 for the sparse
# kernels of issue 20, part (d)), no internet:
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# (a) installs the pure-Python wheels in benchmarks/wheels/ (no index, no deps) into a
#     scratch folder put on PYTHONPATH (the environment itself is not modified), and makes
#     rigl_func importable (the repository root on PYTHONPATH; `pip install --no-deps -e .`
#     only if that is not enough);
# (b) runs tests/test_cuda.py, then the CUDA-parametrized tests of the suite
#     (`-k "cuda and not compile"`; tests/test_cuda.py covers compile on CUDA);
# (c) runs `python -m benchmarks.gpu`, which writes OUTDIR/gpu_report.md and .json;
# (d) the sparse kernels: tests/test_sparse_kernels.py on CUDA, then
#     `python -m benchmarks --only sparse_speedup --device cuda` (OUTDIR/sparse_speedup.txt,
#     .md). `SPARSE_ONLY=1 bash benchmarks/gpu_check.sh OUTDIR` runs (a) and (d) only;
# (e) the batched engine at scale (issue 17): `python -m benchmarks.engine_gpu` (ResNet-50
#     uniform/ERK and a 1.2B-weight GPT stack: eager, CUDA graph, per-layer, peak memory,
#     and a torch.profiler table of the update's top CUDA kernels (topk, scans, copies) in
#     OUTDIR/engine_gpu.md); 45 s on an H200. `ENGINE_ONLY=1` runs (a) and (e) only.
#
# Every part has its own timeout (sum: 350 s + 240 s for (d)) and runs even if an earlier part failed;
# each part's output is in OUTDIR/<part>.txt, the overview in OUTDIR/summary.md. Exit
# status 0 only if every part passed. Without a CUDA device the benchmark runs its CPU
# quick mode and the CUDA tests are skipped.
#
# Wheels: sparsimony 0.1.0 (MIT) is committed; rigl-torch 0.5.2 declares no license, so it
# is not: on a machine with PyPI access put it there first (untracked files travel with
# the working tree):  pip download --no-deps -d benchmarks/wheels rigl-torch==0.5.2
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python}
SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
T_INSTALL=30 T_CUDA_TESTS=140 T_SUITE=50 T_BENCH=130 BENCH_BUDGET=105  # test_cuda: + the compiled one-call step (issue 13)
T_SPARSE_TESTS=90 T_SPARSE_BENCH=150  # (d) sparse kernels (issue 20)
T_ENGINE=150  # (e) the batched engine at scale (issue 17)
START=$SECONDS
FAILED=0
printf '# GPU check summary\n\n| part | exit | seconds | output |\n| :--- | ---: | ---: | :--- |\n' > "$OUT/summary.md"

# part NAME TIMEOUT_S CMD...: run CMD with a timeout, output to the console and OUTDIR/NAME.txt.
part() {
    local name=$1 secs=$2 t0=$SECONDS rc note=""
    shift 2
    echo "== [$((SECONDS - START)) s] $name (timeout ${secs} s): $*"
    set +e
    timeout -k 10 "$secs" "$@" 2>&1 | tee "$OUT/$name.txt"
    rc=${PIPESTATUS[0]}
    set -e
    case $rc in
        0) ;;
        5) note=" (pytest: no tests collected)" ;;
        124 | 137) note=" (timed out after ${secs} s)"; FAILED=1 ;;
        *) FAILED=1 ;;
    esac
    echo "| $name | $rc$note | $((SECONDS - t0)) | $name.txt |" >> "$OUT/summary.md"
    echo "== $name: exit $rc$note after $((SECONDS - t0)) s"
}

# (a) wheels and rigl_func ----------------------------------------------------------
install() {
    shopt -s nullglob
    local wheels=(benchmarks/wheels/*.whl)
    shopt -u nullglob
    if ((${#wheels[@]})); then
        if ! timeout -k 5 "$T_INSTALL" "$PY" -m pip install --no-index --no-deps --ignore-requires-python \
            --disable-pip-version-check --quiet --target "$SITE" "${wheels[@]}"; then
            echo "pip could not install the wheels: putting the wheel files on PYTHONPATH instead (pure Python)"
            for w in "${wheels[@]}"; do PYTHONPATH="$REPO/$w:$PYTHONPATH"; done
        fi
    else
        echo "no wheels in benchmarks/wheels/: the rigl-torch / sparsimony rows will say 'skipped: ... not installed'"
    fi
    if ! (cd / && "$PY" -c "import rigl_func") 2>/dev/null; then
        timeout -k 5 "$T_INSTALL" "$PY" -m pip install --no-deps --no-build-isolation --quiet -e "$REPO" || true
    fi
    (cd / && "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
for name in ("rigl_func", "rigl_torch", "sparsimony", "torchvision", "numpy", "pytest", "hypothesis", "einops"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
    except Exception as err:
        print(f"{name}: skipped: {name} not installed ({type(err).__name__}: {err})")
EOF
    )
}
t0=$SECONDS
set +e
install 2>&1 | tee "$OUT/install.txt"
rc=${PIPESTATUS[0]}
set -e
echo "| install | $rc | $((SECONDS - t0)) | install.txt |" >> "$OUT/summary.md"
# the function ran in a pipeline (a subshell): redo its PYTHONPATH fallback here
if grep -q "putting the wheel files on PYTHONPATH" "$OUT/install.txt"; then
    for w in benchmarks/wheels/*.whl; do PYTHONPATH="$REPO/$w:$PYTHONPATH"; done
fi
export PYTHONPATH
(command -v nvidia-smi > /dev/null && timeout 15 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1) || true

# (b) CUDA tests ----------------------------------------------------------------------
if [[ -z ${SPARSE_ONLY:-} && -z ${ENGINE_ONLY:-} ]]; then
part test_cuda "$T_CUDA_TESTS" "$PY" -m pytest -p no:cacheprovider -v -rfEsxX --tb=short --durations=10 \
    --junitxml="$OUT/test_cuda.xml" tests/test_cuda.py
part test_suite_cuda "$T_SUITE" "$PY" -m pytest -p no:cacheprovider -q -rfE --tb=short --durations=10 \
    --junitxml="$OUT/test_suite_cuda.xml" -k "cuda and not compile" --ignore=tests/test_cuda.py tests

# (c) GPU benchmark -------------------------------------------------------------------
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DEVICE_ARGS=(--device cuda)
else
    echo "no CUDA device: the benchmark runs its CPU quick mode instead"
    DEVICE_ARGS=(--device cpu --quick)
fi
part gpu_bench "$T_BENCH" "$PY" -m benchmarks.gpu --out "$OUT" "${DEVICE_ARGS[@]}" --budget-s "$BENCH_BUDGET"
fi  # SPARSE_ONLY

# (d) sparse kernels (issue 20): the Triton kernels against dense on CUDA (fp32, bf16,
#     gradients; the Triton interpreter test too), then the GPT MLP block benchmark (bf16 first: its last line is the GPU
#     figure, `sparse_speedup cuda: mlp_fwd <X>x mlp_train <Y>x (95% block 32x32)`, the line
#     before it the 90% one). Under 4 minutes; `SPARSE_ONLY=1 bash benchmarks/gpu_check.sh OUT`
#     runs only this part (and the install): about 4 minutes.
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    SPARSE_ARGS=(--device cuda --repeats 5)
else
    SPARSE_ARGS=(--device cpu --smoke)
fi
if [[ -z ${ENGINE_ONLY:-} ]]; then
part test_sparse_kernels_cuda "$T_SPARSE_TESTS" "$PY" -m pytest -p no:cacheprovider -q -rfEs --tb=short \
    --junitxml="$OUT/test_sparse_kernels_cuda.xml" -k "cuda or triton" tests/test_sparse_kernels.py
part sparse_speedup "$T_SPARSE_BENCH" "$PY" -m benchmarks --only sparse_speedup "${SPARSE_ARGS[@]}" \
    --out "$OUT/sparse_speedup.md"
fi  # ENGINE_ONLY

# (e) the batched engine at scale (issue 17) ---------------------------------------
if [[ -z ${SPARSE_ONLY:-} ]]; then
part engine_gpu "$T_ENGINE" "$PY" -m benchmarks.engine_gpu --out "$OUT"
fi

printf '\nTotal: %s s. Report: gpu_report.md (numbers), test_cuda.txt / test_suite_cuda.txt (pytest).\n' \
    "$((SECONDS - START))" >> "$OUT/summary.md"
cat "$OUT/summary.md"
rm -rf "$SITE"
exit "$FAILED"

#!/usr/bin/env bash
# The GPU half of the test suite, for a machine with an NVIDIA GPU, nvcc and a CUDA build of torch (CI has none, so
# scripts/test.sh skips these tests there): build the WKV-7 extension for this GPU, run every test that has a CUDA
# path, check the kernels with compute-sanitizer and time them against flash-linear-attention when it is installed.
#
#   bash scripts/gpu-check.sh [OUT_DIR]        # default out/gpu-check; PYTHON picks the interpreter (python3)
#
# Uses the interpreter as it is (no virtual environment: GPU machines often have no network). Each step's full
# output goes to OUT_DIR; the script stops at the first failing step. BENCH_BUDGET_S (default 300) bounds the
# benchmark, whose first fla call compiles and autotunes Triton kernels.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${1:-out/gpu-check}
mkdir -p "$OUT"

step() { echo "== $1"; }

if ! arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null); then
    echo "gpu-check: $PY sees no CUDA device (this is for GPU machines; scripts/test.sh runs the CPU suite)" >&2
    exit 2
fi
step "build (log: $OUT/build.log)"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} RWKV_APP_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }

step "tests with a CUDA path (log: $OUT/tests.txt)"
select=()
"$PY" -c "import rwkv" 2>/dev/null || select=(-k "not official")  # the official package is a test-only dependency
"$PY" -m pytest -q "${select[@]}" tests/test_cuda_wkv.py tests/test_seqpar.py tests/test_model.py \
    tests/test_decode_fast.py tests/test_infer_engine.py tests/test_infer_units.py > "$OUT/tests.txt" 2>&1 \
    || { tail -30 "$OUT/tests.txt"; exit 1; }
tail -1 "$OUT/tests.txt"

if command -v compute-sanitizer > /dev/null; then
    step "compute-sanitizer memcheck, every kernel and configuration once (log: $OUT/memcheck.txt)"
    compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" benchmarks/wkv7.py --smoke > "$OUT/memcheck.txt" 2>&1 \
        || { tail -30 "$OUT/memcheck.txt"; exit 1; }
    tail -1 "$OUT/memcheck.txt"
fi

step "kernel benchmark (table: $OUT/wkv7.txt, numbers: $OUT/wkv7.json)"
"$PY" benchmarks/wkv7.py --json "$OUT/wkv7.json" --budget-s "${BENCH_BUDGET_S:-300}" > "$OUT/wkv7.txt" 2>&1 \
    || { tail -30 "$OUT/wkv7.txt"; exit 1; }
grep -v '^[{#]' "$OUT/wkv7.txt"

#!/usr/bin/env bash
# The GPU checks of issues 6-7 that a CPU machine cannot do, as ONE command for a machine with one
# CUDA GPU and a plain PyTorch + triton (no pkmlm install, no Hydra/omegaconf/datasets/wandb):
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else ./gpu_check_out
#
# At most 8 minutes (the stages' limits: 90 + 110 + 90 + 180 s) on one H100 (torch 2.11, triton 3.6). Each stage has its own time limit and
# writes its own file, so a stage that fails or runs out of time leaves the others' results:
#   env.txt              GPU, driver, torch / triton / python versions
#   tests.log            tests/e2e/test_kernels.py + tests/e2e/test_compile.py on CUDA: the real triton kernels
#                        (gather forward and backward, lazy-Adam rows, the custom op, the whole layer)
#                        against the torch references; the compiled layer against eager
#   bench_memory.md      scripts/bench_memory.py at the paper's sizes (the docs/benchmarks.md tables)
#   bench_model_eager.md scripts/bench_model.py --compile off: dense12 / dense24 / mem12 (3 variants)
#   bench_model_compile.md  torch.compile: dense12 / dense24 / mem12 (triton, bf16 values); the
#                        "dense12 MFU >= 50% with compile" target
#   summary.txt          each stage's exit status and seconds
# docs/benchmarks.md ("Filling the GPU rows") says where each number goes.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real kernels
PY=${PYTHON:-python3}
: >"$OUT_DIR/summary.txt"

stage() {  # stage NAME SECONDS OUTFILE COMMAND...
  local name=$1 limit=$2 file=$3 t0=$SECONDS rc
  shift 3
  echo "== $name (limit ${limit}s) -> $file"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT_DIR/$file" 2>&1
  rc=$?
  echo "$name: exit $rc, $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (time limit)')" | tee -a "$OUT_DIR/summary.txt"
  tail -n 30 "$OUT_DIR/$file"
}

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi -L 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE')"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  "$PY" -c "import pytest; print('pytest', pytest.__version__)" 2>&1
  git rev-parse --short HEAD 2>/dev/null && git status --short 2>/dev/null | head -20
} >"$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $PY; nothing to check" | tee -a "$OUT_DIR/summary.txt"
  exit 1
fi

# 1. Correctness on the GPU (torch + triton imports only; -p no:cacheprovider: nothing written here).
stage tests 90 tests.log "$PY" -m pytest -p no:cacheprovider -q tests/e2e/test_kernels.py tests/e2e/test_compile.py
# 2. The memory layer at the paper's sizes (16,384 tokens, d=1024, 512^2 values, 4 heads, knn 32).
stage bench_memory 110 bench_memory.md "$PY" scripts/bench_memory.py
# 3. Whole models, eager then compiled (separate runs: compilation is what may not fit).
stage bench_model_eager 90 bench_model_eager.md "$PY" scripts/bench_model.py --compile off --steps 15
# Compiled: the dense pair and mem12 with bf16 values on triton (the fast variant), to fit the time.
stage bench_model_compile 180 bench_model_compile.md "$PY" scripts/bench_model.py --compile on --steps 15 \
  --kernels triton:bfloat16

echo "== summary"
cat "$OUT_DIR/summary.txt"
! grep -qv ": exit 0," "$OUT_DIR/summary.txt"

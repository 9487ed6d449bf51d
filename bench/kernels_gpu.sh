#!/usr/bin/env bash
# Kernels on the lent GPU, in one device call from the repository root:
#
#     bash bench/kernels_gpu.sh [bench.kernels args...]      (e.g. --tune, --quick, --only moe,attn)
#
# 1. pytest -m gpu tests/kernels      -> $OUT/pytest_kernels.log
# (KT_DIAG=1: python tests/kernels/gpu_diag.py -> $OUT/diag.log)
# 2. python -m bench.kernels "$@"     -> $OUT/bench_kernels.log, $OUT/kernels.json (+ tuned_configs.json)
# Each step has its own timeout (KT_PYTEST, KT_BENCH seconds); the summary lines come last.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/kernels_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' +local changes')" | tee "$OUT/versions.log"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$OUT/versions.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/versions.log"
set -o pipefail
timeout --kill-after=5 "${KT_PYTEST:-170}" python3 -m pytest -m gpu tests/kernels -q -p no:cacheprovider -rf 2>&1 \
    | tee "$OUT/pytest_kernels.log" | grep -vE "^\s*$" | tail -25
echo "pytest rc=$?"
if [ "${KT_DIAG:-0}" = 1 ]; then
    timeout --kill-after=5 "${KT_DIAG_CAP:-90}" python3 tests/kernels/gpu_diag.py 2>&1 | tee "$OUT/diag.log"
fi
timeout --kill-after=5 "${KT_BENCH:-230}" python3 -m bench.kernels --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_kernels.log"
echo "bench rc=$?"

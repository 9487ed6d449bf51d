#!/usr/bin/env bash
# The one script to run on the lent GPU machine, in a single device call from the repository root:
#
#     bash bench/gpu_check.sh            (device tool: carry [".whl"] if the server tests need the wheels)
#
# Steps, each under its own timeout, each logged to $OUT/<name>.log, a failure does not stop the next one:
#   1. pytest -m gpu -q                           (all gpu-marked tests)
#   2. python -m bench.kernels                    (only if bench/kernels.py exists)
#   3. python -m bench.engine --device cuda ...   (3 dense + 12 MoE layers on an 80 GB GPU, 3 + 24 from 130 GB)
# and prints a short summary table last. Total wall time stays under GPU_CHECK_BUDGET seconds (default 560):
# each step's timeout is the smaller of its own cap and what is left of the budget.
#
# Environment knobs: OUT (default ./gpu_check_out), GPU_CHECK_BUDGET, PYTEST_CAP, KERNELS_CAP, ENGINE_CAP,
# ENGINE_LAYERS (overrides the memory-based choice), ENGINE_ARGS (extra bench.engine flags), ENGINE_DEVICE
# (default cuda; cpu only to dry-run this script), SKIP (names of steps to skip, e.g. "pytest kernels").
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-560}
PYTEST_CAP=${PYTEST_CAP:-180}
KERNELS_CAP=${KERNELS_CAP:-60}
ENGINE_CAP=${ENGINE_CAP:-330}
SKIP=${SKIP:-}
RESERVE=10 # seconds kept for the summary

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$OUT/wheels.log" 2>&1 \
        && echo "installed $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site" \
        || echo "wheel install failed (see $OUT/wheels.log)"
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.log"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee "$OUT/versions.log"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' +local changes')" | tee -a "$OUT/versions.log"

# Main-model size from the GPU's memory (bench/fit_layers.sh)
MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -dc '0-9')
LAYERS=${ENGINE_LAYERS:-$(bash bench/fit_layers.sh)}

declare -a NAMES STATUS SECS
step() { # step NAME CAP COMMAND...
    local name=$1 cap=$2
    shift 2
    if [[ " $SKIP " == *" $name "* ]]; then
        NAMES+=("$name"); STATUS+=("skipped"); SECS+=(0)
        return
    fi
    local now left limit t0 rc
    now=$(date +%s)
    left=$((BUDGET - (now - START) - RESERVE))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 20 ]; then
        echo "=== $name: skipped, ${left}s of the budget left"
        NAMES+=("$name"); STATUS+=("no time"); SECS+=(0)
        return
    fi
    echo "=== $name (timeout ${limit}s): $*"
    t0=$(date +%s)
    (
        set -o pipefail
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    )
    rc=$?
    local st="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then st="TIMEOUT"; elif [ "$rc" -ne 0 ]; then st="FAIL rc=$rc"; fi
    NAMES+=("$name"); STATUS+=("$st"); SECS+=($(($(date +%s) - t0)))
}

step pytest "$PYTEST_CAP" python3 -m pytest -m gpu -q -p no:cacheprovider
if [ -f bench/kernels.py ]; then
    step kernels "$KERNELS_CAP" python3 -m bench.kernels
else
    NAMES+=("kernels"); STATUS+=("absent"); SECS+=(0)
fi
# shellcheck disable=SC2086
step engine "$ENGINE_CAP" python3 -m bench.engine --device "${ENGINE_DEVICE:-cuda}" --layers "$LAYERS" --dense-layers 3 \
    --out "$OUT/engine.json" ${ENGINE_ARGS:-}

echo
echo "=== summary (GPU memory ${MEM_MIB} MiB, engine model ${LAYERS} layers, logs in $OUT)"
printf '%-10s %-14s %6s\n' step status seconds
for i in "${!NAMES[@]}"; do
    printf '%-10s %-14s %6s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"
done
if [ -f "$OUT/pytest.log" ]; then
    echo "pytest: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/pytest.log" | tail -1)"
fi
if [ -f "$OUT/engine.json" ]; then
    python3 - "$OUT/engine.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
hw = r.get("hardware", {})
print(f"engine: bandwidth {hw.get('bandwidth', {}).get('GBps', 0):.0f} GB/s, "
      f"fp8 {hw.get('peaks', {}).get('fp8_tflops') or 0:.0f} / mm {hw.get('peaks', {}).get('mm_tflops') or 0:.0f} TFLOP/s"
      + ("" if "finished_at" in r else "  (run did not finish: partial results)"))
for row in r.get("summary", []):
    t = row.get("target")
    tgt = "-" if t is None else (("<=" if row["better"] == "lower" else ">=") + f"{t:g}x")
    met = {None: "-", True: "yes", False: "NO"}[row.get("met")]
    ratio = "-" if row.get("ratio") is None else f"{row['ratio']:.2f}x"
    print(f"  {row['name']:58s} {ratio:>9s}  target {tgt:7s} {met}")
if not r.get("overlap", {}).get("implemented", True):
    print("  overlap: not implemented")
EOF
fi
echo "total $(($(date +%s) - START))s"

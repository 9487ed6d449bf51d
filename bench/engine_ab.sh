#!/usr/bin/env bash
# A/B of engine settings on the lent GPU: bench.engine in alternating processes, one per setting per round,
# so process-to-process noise (about +-3% at batch 1) shows next to the difference being measured.
#
#     VARIANTS="GLINT_PDL=1|GLINT_PDL=0" ROUNDS=3 bash bench/engine_ab.sh [bench.engine args]
#
# PYTHON: the interpreter (default python3).
# VARIANTS: '|'-separated environment settings (each a space-separated list of VAR=value, may be empty).
# Default bench.engine args: the batch-1 decode of run 6 (27 layers on a 130 GB GPU, else 15, with fusions).
# Prints every process's decode / prefill lines tagged with its variant number; logs under $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/engine_ab_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
IFS='|' read -r -a VARS <<<"${VARIANTS:-GLINT_PDL=1|GLINT_PDL=0}"
ROUNDS=${ROUNDS:-2}
LAYERS=${ENGINE_LAYERS:-$(bash bench/fit_layers.sh)}
if [ $# -eq 0 ]; then
    set -- --device cuda --layers "$LAYERS" --dense-layers 3 --no-hf --hf-layers 0 --batches 1 --prefill 256 \
        --enable-shared-experts-fusion --enable-fused-qk-norm-rope
fi
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' +local changes'); args: $*"
for i in "${!VARS[@]}"; do echo "variant $i: ${VARS[$i]:-(default environment)}"; done
for r in $(seq 1 "$ROUNDS"); do
    for i in "${!VARS[@]}"; do
        t0=$(date +%s)
        env ${VARS[$i]} timeout --kill-after=10 "${ENGINE_CAP:-200}" "${PYTHON:-python3}" -m bench.engine "$@" \
            >"$OUT/v${i}_r$r.log" 2>&1
        echo "[variant $i round $r, $(( $(date +%s) - t0 )) s] $(grep -E '^decode B=|^prefill ' "$OUT/v${i}_r$r.log" | tr '\n' ' ')"
    done
done

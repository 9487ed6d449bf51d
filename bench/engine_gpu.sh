#!/usr/bin/env bash
# Engine step benchmarks on the lent GPU, default flags and the optimized fusions, in one device call:
#
#     bash bench/engine_gpu.sh [extra bench.engine args]        (ENGINE_LAYERS, OUT, ENGINE_CAP as gpu_check.sh)
#
# 1. python -m bench.engine --profile --no-hf                          -> $OUT/engine_default.{log,json}
# 2. ... --enable-shared-experts-fusion --enable-fused-qk-norm-rope    -> $OUT/engine_fused.{log,json}
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/engine_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LAYERS=${ENGINE_LAYERS:-$(bash bench/fit_layers.sh)}
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' +local changes'), $LAYERS layers"
for variant in default fused; do
    flags=""
    [ "$variant" = fused ] && flags="--enable-shared-experts-fusion --enable-fused-qk-norm-rope"
    timeout --kill-after=10 "${ENGINE_CAP:-200}" python3 -m bench.engine --device cuda --layers "$LAYERS" \
        --dense-layers 3 --profile --no-hf --hf-layers 0 --out "$OUT/engine_$variant.json" $flags "$@" \
        2>&1 | grep -vE "Loading weights|Capturing CUDA|[Ww]arn" | tee "$OUT/engine_$variant.log"
done

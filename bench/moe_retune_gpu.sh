#!/usr/bin/env bash
# Retune the fused-MoE prefill buckets of this GPU and measure the whole prefill before and after, in one device
# call (session 26 did this by hand on an H100: 4K prefill 73.78 -> 69.76 ms at 15 layers).
#
#     PY=$PY bash bench/moe_retune_gpu.sh        # after `eval "$(bash bench/fa4_wheels.sh install)"`, carry [".fa4"]
#
# 1. bench/prefill_gpu.sh with the committed tables (BACKENDS / SHAPES / SHARDS below; 27 layers on an H200);
#    BEFORE_SHAPES / AFTER_SHAPES replace SHAPES for one side ("" skips the before run)
# 2. python -m bench.kernels --only moe --tune --write-tables --moe-tokens $TOKENS --moe-inter $INTER: sweeps gate_up
#    tiles (TMA1) and the persistent / one-tile down GEMM per bucket and merges the winners into
#    kernels/configs/fused_moe, a width at a time (a TUNE_CAP cut keeps the widths already done)
# 3. bench/prefill_gpu.sh again, now with the merged tables
# The merged tables come back as $OUT/tables/*.json with '=' and ',' in their names replaced by '_' (the device
# tool does not return such names); tuned_configs.json (the tuned buckets only, real names as keys) is in $OUT too:
# `python -c "import json, bench.kernels as b; b.write_moe_tables(json.load(open('tuned_configs.json')), '')"`
# merges it here.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/moe_retune_out}
PY=${PY:-python3}
TOKENS=${TOKENS:-4096,16384}
INTER=${INTER:-1536,192,384}  # widths in tuning order (TP1 first: item 3's model); each lands as soon as it is tuned
export BACKENDS=${BACKENDS:-fa4} SHARDS=${SHARDS:-1} SHAPES=${SHAPES:-"4096:0"} CAP=${CAP:-130} PY
mkdir -p "$OUT/tables"
BEFORE_SHAPES=${BEFORE_SHAPES-$SHAPES} AFTER_SHAPES=${AFTER_SHAPES-$SHAPES}
if [ -n "$BEFORE_SHAPES" ]; then
    echo "== before (committed tables)"
    OUT=$OUT/before SHAPES=$BEFORE_SHAPES bash bench/prefill_gpu.sh 2>&1 | tail -n 12
fi
echo "== tune $TOKENS"
timeout --kill-after=10 "${TUNE_CAP:-240}" "$PY" -m bench.kernels --only moe --tune --write-tables \
    --moe-tokens "$TOKENS" --moe-inter "$INTER" --out "$OUT" 2>&1 | grep -E "tuned|wrote|^fused_moe"
for f in kernels/configs/fused_moe/*.json; do
    name=$(basename "$f")
    cp "$f" "$OUT/tables/${name//[=,]/_}"
done
echo "== after (retuned tables)"
OUT=$OUT/after SHAPES=$AFTER_SHAPES bash bench/prefill_gpu.sh 2>&1 | tail -n 12

#!/usr/bin/env bash
# Piecewise prefill CUDA graphs (engine/prefill_graphs.py) on one GPU, one device call: the GPU tests of the graphs,
# then bench.engine prefills with --piecewise-cuda-graph-max-tokens, each timed with and without the graphs in the
# same run (and --host-profile: the host enqueue time through the graphs). Knobs: PY (bench/fa4_wheels.sh's venv
# for fa4), LAYERS (15), RUNS ("TP:TOKENS[:PREFIX]" list, default 8:4096 8:1024 1:4096; PREFIX = tokens cached
# before the prefill), TESTS (1; "all": every test of tests/gpu/test_engine_gpu.py), CAP (s per bench run),
# MIXED (0; > 0: also a mixed step of that many decodes + the prefill chunk, eager / piecewise / decodes alone),
# EXTRA (more bench.engine flags, e.g. "--kv-cache-dtype fp8_e4m3").
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/piecewise_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}; LAYERS=${LAYERS:-15}; RUNS=${RUNS:-"8:4096 8:1024 1:4096"}; CAP=${CAP:-150}; MIXED=${MIXED:-0}
EXTRA=${EXTRA:-}
if [ "${TESTS:-1}" = 1 ]; then
    timeout 300 "$PY" -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_prefill_graphs.py \
        tests/gpu/test_engine_gpu.py -k "piecewise or graphs_equal_eager or prefill_graphs" 2>&1 | tail -8
elif [ "${TESTS:-1}" = all ]; then
    timeout 420 "$PY" -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_prefill_graphs.py \
        tests/gpu/test_engine_gpu.py tests/test_fa4_fp8_prompt.py 2>&1 | grep -E "passed|failed|^FAILED" | tail -12
fi
for run in $RUNS; do
    IFS=: read -r tp tokens prefix <<< "$run"; prefix=${prefix:-0}
    shard="--heads $((96 / tp)) --kv-heads $(( 8 / tp > 0 ? 8 / tp : 1 )) --moe-intermediate $((1536 / tp))"
    shard="$shard --intermediate $((12288 / tp))"
    name="tp${tp}_${tokens}_p${prefix}"
    # shellcheck disable=SC2086
    timeout --kill-after=10 "$CAP" "$PY" -m bench.engine --device cuda --layers "$LAYERS" --dense-layers 3 --no-hf \
        --hf-layers 0 --batches 1 --prefill "$tokens" --prefill-prefix "$prefix" --prefill-attention-backend fa4 \
        --enable-shared-experts-fusion --enable-fused-qk-norm-rope $shard --mixed-decodes "$MIXED" \
        --piecewise-cuda-graph-max-tokens $((tokens + MIXED)) --host-profile $EXTRA --out "$OUT/$name.json" \
        > "$OUT/$name.log" 2>&1
    echo "rc=$? $name"
    grep -E "^(prefill $tokens|-- prefill|decode B=1:|mixed step)|Error|error" "$OUT/$name.log" | head -12 \
        | sed "s/^/$name: /"
done

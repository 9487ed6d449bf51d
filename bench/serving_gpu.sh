#!/usr/bin/env bash
# Serving on one GPU: the server on a dummy real-shape GLM-4.7 (bench/real_shape.py) under bench.serving, for the
# baseline and the optimized 1-GPU presets (configs/presets), one after the other. Writes $OUT/serving_<preset>.json
# and prints a TTFT/TPOT/ITL table. Knobs: LAYERS, NUM_PROMPTS, RATE, INPUT_LEN, OUTPUT_LEN, PRESETS, SERVER_WAIT_S
# (start-up limit), CLIENT_TIMEOUT_S, SERVER_ARGS (extra server flags) with TAG (appended to the result names),
# SHAPE_ARGS (bench.real_shape flags, e.g. a TP shard's widths: "--set num_attention_heads=12 ..."),
# WARMUP_PROMPTS (a first, unrecorded run of that many prompts at the first rate: the load's step shapes compile
# there, not inside the measurement). Multi-GPU presets (optimized-tp4) spawn their ranks from the server.
# Last, each run's engine steps against their floor (bench/step_floor.py: the decode step under the load vs the
# bytes it must read; STEP_FLOOR=0 skips it).
# Issue 21 item 4 (the prefill cap next to decodes), one call:
#   for cap in "" 2048; do TAG=${cap:+_cap$cap} SERVER_ARGS="--chunked-prefill-size 16384 ${cap:+--max-prefill-tokens-while-decoding $cap}" \
#     PRESETS=optimized-1gpu WARMUP_PROMPTS=16 RATE=6 bash bench/serving_gpu.sh; done
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/serving_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}
LAYERS=${LAYERS:-$(bash bench/fit_layers.sh)}
NUM_PROMPTS=${NUM_PROMPTS:-48}
RATE=${RATE:-4}
RATES=${RATES:-$RATE}  # several: one run each against the same server, $OUT/serving_<preset>_r<rate>.json;
# run i uses seed i-1, so no run's prompts are already in the prefix cache from an earlier one
NUMS=${NUMS:-$NUM_PROMPTS}  # prompts per rate (one number for all, or one per rate)
INPUT_LEN=${INPUT_LEN:-4096}
OUTPUT_LEN=${OUTPUT_LEN:-1000}
PRESETS=${PRESETS:-"baseline-1gpu optimized-1gpu"}
SERVER_WAIT_S=${SERVER_WAIT_S:-300}
CLIENT_TIMEOUT_S=${CLIENT_TIMEOUT_S:-400}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
# shellcheck disable=SC2086
MODEL=$(python3 -m bench.real_shape --layers "$LAYERS" ${SHAPE_ARGS:-})
echo "model $MODEL ($LAYERS layers), $NUM_PROMPTS prompts, ${INPUT_LEN} in / ${OUTPUT_LEN} out, Poisson rate $RATE/s"
for preset in $PRESETS; do
    port=$((18000 + RANDOM % 1000))
    # shellcheck disable=SC2086
    python3 -m server --model "$MODEL" --preset "$preset" --host 127.0.0.1 --port "$port" ${SERVER_ARGS:-} \
        >"$OUT/server_$preset${TAG:-}.log" 2>&1 &
    pid=$!
    ok=0
    t_start=$(date +%s)
    for _ in $(seq 1 "$SERVER_WAIT_S"); do
        if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then ok=1; break; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    if [ "$ok" -ne 1 ]; then
        echo "=== $preset: server did not start"; tail -20 "$OUT/server_$preset${TAG:-}.log"; kill "$pid" 2>/dev/null
        continue
    fi
    echo "=== $preset (server up in $(( $(date +%s) - t_start )) s)"
    grep -E "KV cache|capacity" "$OUT/server_$preset${TAG:-}.log" | head -3
    if [ "${WARMUP_PROMPTS:-0}" -gt 0 ]; then
        timeout "$CLIENT_TIMEOUT_S" python3 -m bench.serving --base-url "http://127.0.0.1:$port" --endpoint completions \
            --dataset random --num-prompts "$WARMUP_PROMPTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
            --request-rate "${RATES%% *}" --seed 1000 --tokenizer "$MODEL" --tokenize-prompt --disable-tqdm \
            >"$OUT/warmup_$preset${TAG:-}.log" 2>&1
    fi
    i=0
    for rate in $RATES; do
        i=$((i + 1))
        n=$(echo "$NUMS" | awk -v i="$i" '{print (i <= NF) ? $i : $NF}')
        name=$preset${TAG:-}; [ "$RATES" = "$RATE" ] || name="${preset}${TAG:-}_r$rate"
        echo "--- $name: $n prompts at $rate req/s"
        timeout "$CLIENT_TIMEOUT_S" python3 -m bench.serving --base-url "http://127.0.0.1:$port" --endpoint completions \
            --dataset random --num-prompts "$n" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
            --request-rate "$rate" --seed "$((i - 1))" --tokenizer "$MODEL" --tokenize-prompt --disable-tqdm \
            --output-json "$OUT/serving_$name.json" 2>&1 | tail -30
        RESULTS="${RESULTS:-} $name"
    done
    kill -INT "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then echo "=== $preset: server still up 60 s after SIGINT, killed"; kill -9 "$pid"; fi
    wait "$pid" 2>/dev/null
    echo "=== $preset${TAG:-}: $(grep -c "slow step" "$OUT/server_$preset${TAG:-}.log") slow steps (> 1 s) logged"
    echo "=== $preset: server exit $(tail -1 "$OUT/server_$preset${TAG:-}.log" | cut -c1-160)"
done
# shellcheck disable=SC2086
python3 - "$OUT" ${RESULTS:-$PRESETS} <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'run':18} {'req/s':>7} {'out tok/s':>10} {'TTFT mean':>10} {'TTFT p99':>9} {'TPOT mean':>10} {'ITL p99':>8} {'ITL max':>8}  (ms)")
for p in sys.argv[2:]:
    f = out / f"serving_{p}.json"
    if not f.is_file():
        print(f"{p:18} (no result)"); continue
    s = json.loads(f.read_text())["summary"]
    g = lambda k, q: s.get(k, {}).get(q, float("nan"))
    print(f"{p:18} {s.get('request_throughput', float('nan')):7.2f} {s.get('output_throughput', float('nan')):10.0f} "
          f"{g('ttft_ms','mean'):10.1f} {g('ttft_ms','p99'):9.1f} {g('tpot_ms','mean'):10.2f} {g('itl_ms','p99'):8.2f} {g('itl_ms','max'):8.1f}")
PY
# each run's engine steps against their floor (bench/step_floor.py; the GPU is free again: bandwidth and peaks
# are measured once here)
files=""
for p in ${RESULTS:-$PRESETS}; do [ -f "$OUT/serving_$p.json" ] && files="$files $OUT/serving_$p.json"; done
if [ -n "$files" ] && [ "${STEP_FLOOR:-1}" = 1 ]; then
    # shellcheck disable=SC2086
    timeout 120 python3 -m bench.step_floor $files --model "$MODEL" 2>&1 | grep -v '^{' | cut -c1-200
fi

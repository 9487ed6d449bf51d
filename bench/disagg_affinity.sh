#!/usr/bin/env bash
# Does the router's prefix affinity help? Two prefill instances and one decode instance behind
# `python -m disagg.router`, multi-turn agentic sessions (each turn carries the earlier ones) through bench.serving,
# once with prefix affinity (--prefill-affinity-chars 2048, the default) and once without (0: least loaded only).
# Prints the prefill instances' prefix-cache hit rate (hit tokens / prompt tokens looked up) and TTFT for each.
# Runs anywhere (DEVICE_ARGS="--device cpu" and the tiny model by default; on a GPU set MODEL and DEVICE_ARGS="").
# Knobs: MODEL, DEVICE_ARGS, SESSIONS, TURNS, TOOL_LEN, OUTPUT_LEN, CONC.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/disagg_affinity_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD} UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
MODEL=${MODEL:-$(python3 -c "from model.tiny import tiny_model_dir; print(tiny_model_dir('bf16'))")}
DEVICE_ARGS=${DEVICE_ARGS:---device cpu}
SESSIONS=${SESSIONS:-12}; TURNS=${TURNS:-4}; TOOL_LEN=${TOOL_LEN:-200}; OUTPUT_LEN=${OUTPUT_LEN:-8}; CONC=${CONC:-6}
PIDS=()
stop_all() {
    for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    done
    PIDS=()
}
trap stop_all EXIT
up() { for _ in $(seq 1 300); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 1; done; return 1; }

for chars in 2048 0; do
    base=$((20000 + RANDOM % 500 * 8))
    for i in 1 2; do
        python3 -m server --model "$MODEL" $DEVICE_ARGS --port $((base + i)) --disaggregation-mode prefill \
            --disaggregation-bootstrap-port $((base + 4 + i)) >"$OUT/prefill$i.$chars.log" 2>&1 &
        PIDS+=($!)
    done
    python3 -m server --model "$MODEL" $DEVICE_ARGS --port $((base + 3)) --disaggregation-mode decode \
        >"$OUT/decode.$chars.log" 2>&1 &
    PIDS+=($!)
    for p in 1 2 3; do up "http://127.0.0.1:$((base + p))" || { echo "instance $p did not start"; exit 1; }; done
    python3 -m disagg.router --prefill "http://127.0.0.1:$((base + 1))" --prefill "http://127.0.0.1:$((base + 2))" \
        --decode "http://127.0.0.1:$((base + 3))" --port "$base" --prefill-affinity-chars "$chars" \
        >"$OUT/router.$chars.log" 2>&1 &
    PIDS+=($!)
    up "http://127.0.0.1:$base" || { echo "router did not start"; exit 1; }
    python3 -m bench.serving --base-url "http://127.0.0.1:$base" --dataset agentic --num-sessions "$SESSIONS" \
        --num-turns "$TURNS" --tool-result-len "$TOOL_LEN" --output-len "$OUTPUT_LEN" --max-concurrency "$CONC" \
        --tokenizer "$MODEL" --disable-tqdm --warmup-requests 0 --output-json "$OUT/serving.$chars.json" \
        >"$OUT/serving.$chars.log" 2>&1
    python3 - "$OUT/serving.$chars.json" "http://127.0.0.1:$((base + 1))" "http://127.0.0.1:$((base + 2))" "$chars" <<'PY'
import json, sys, urllib.request
summary = json.load(open(sys.argv[1]))["summary"]
hit = queried = 0
for url in sys.argv[2:4]:
    s = json.load(urllib.request.urlopen(url + "/server_info"))["engine"]
    hit += s["prefix_cache_hit_tokens"]; queried += s["prefix_cache_queried_tokens"]
print(f"affinity chars {sys.argv[4]:>5}: prefill prefix-cache hit rate {hit / max(queried, 1):.3f} "
      f"({hit}/{queried} tokens), TTFT mean {summary['ttft_ms']['mean']:.1f} ms p99 {summary['ttft_ms']['p99']:.1f} ms, "
      f"{summary['completed']} completed, {summary['failed']} failed")
PY
    stop_all
done

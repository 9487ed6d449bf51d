#!/usr/bin/env bash
# Speculative decoding on a real (trained) model, in one run: the server with none / NEXTN / SUFFIX / HYBRID on
# the same checkpoint, each under bench.serving on the agentic-edit set (files asked back with small edits:
# repetition) and on plain-code (continuations: none), at concurrency 1 and 16. Prints TPOT (mean/p50/p99) and
# the acceptance the server counted (glint:spec_* from /metrics) per run; JSON per run in $OUT.
# Usage: MODEL=path/to/trained-fp8 bash bench/spec_serving_gpu.sh
# Knobs: METHODS, CONCURRENCY, SESSIONS, TURNS, OUTPUT_LEN, INPUT_LEN, EXTRA_FLAGS (server flags for every run).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/serving_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}
MODEL=${MODEL:?set MODEL to the trained checkpoint (python -m bench.train_small --out DIR)}
METHODS=${METHODS:-"none NEXTN SUFFIX HYBRID"}
CONCURRENCY=${CONCURRENCY:-"1 16"}
SESSIONS=${SESSIONS:-16}
TURNS=${TURNS:-3}
INPUT_LEN=${INPUT_LEN:-1024}
OUTPUT_LEN=${OUTPUT_LEN:-512}
EXTRA_FLAGS=${EXTRA_FLAGS:-"--enable-fused-qk-norm-rope --enable-shared-experts-fusion"}
SERVER_WAIT_S=${SERVER_WAIT_S:-240}
declare -A SPEC=(
    [none]=""
    [NEXTN]="--speculative-algorithm NEXTN --speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4"
    [SUFFIX]="--speculative-algorithm SUFFIX --speculative-eagle-topk 1 --speculative-suffix-cache-max-depth 64 --speculative-suffix-max-spec-factor 1.0 --speculative-suffix-min-token-prob 0.1 --speculative-num-draft-tokens 17"
    [HYBRID]="--speculative-algorithm HYBRID --speculative-num-steps 3 --speculative-suffix-cache-max-depth 64 --speculative-num-draft-tokens 17"
)
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 ~ "^"n {print $2; exit}'; }
printf "%-7s %-13s %4s | %9s %9s %9s | %8s %8s %7s\n" method dataset conc "TPOT mean" p50 p99 drafted accepted "acc len"
for method in $METHODS; do
    port=$((19000 + RANDOM % 1000))
    # shellcheck disable=SC2086
    python3 -m server --model "$MODEL" --host 127.0.0.1 --port "$port" ${SPEC[$method]} $EXTRA_FLAGS \
        >"$OUT/spec_server_$method.log" 2>&1 &
    pid=$!
    ok=0
    for _ in $(seq 1 "$SERVER_WAIT_S"); do
        if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then ok=1; break; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    if [ "$ok" -ne 1 ]; then echo "=== $method: server did not start"; tail -20 "$OUT/spec_server_$method.log"; kill "$pid" 2>/dev/null; continue; fi
    for dataset in agentic-edit plain-code; do
        for conc in $CONCURRENCY; do
            d0=$(metric "$port" glint:spec_draft_tokens_total); a0=$(metric "$port" glint:spec_accepted_tokens_total)
            v0=$(metric "$port" glint:spec_num_verifies_total)
            name="${method}_${dataset}_c$conc"
            python3 -m bench.serving --base-url "http://127.0.0.1:$port" --endpoint chat --dataset "$dataset" \
                --num-sessions "$SESSIONS" --num-turns "$TURNS" --num-prompts $((SESSIONS * TURNS)) \
                --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --max-concurrency "$conc" --temperature 0 \
                --tokenizer "$MODEL" --disable-tqdm --output-json "$OUT/spec_$name.json" >"$OUT/spec_$name.log" 2>&1
            d1=$(metric "$port" glint:spec_draft_tokens_total); a1=$(metric "$port" glint:spec_accepted_tokens_total)
            v1=$(metric "$port" glint:spec_num_verifies_total)
            python3 - "$OUT/spec_$name.json" "$method" "$dataset" "$conc" "${d0:-0}" "${d1:-0}" "${a0:-0}" "${a1:-0}" "${v0:-0}" "${v1:-0}" <<'PY'
import json, sys
path, method, dataset, conc, d0, d1, a0, a1, v0, v1 = sys.argv[1:]
try:
    r = json.load(open(path))
except (OSError, ValueError):
    print(f"{method:<7} {dataset:<13} {conc:>4} | run failed, see the .log next to {path}"); sys.exit()
t = r.get("summary", {}).get("tpot_ms") or {}
d, a, v = float(d1) - float(d0), float(a1) - float(a0), float(v1) - float(v0)
acc = (a + v) / v if v else 1.0
print(f"{method:<7} {dataset:<13} {conc:>4} | {t.get('mean', float('nan')):9.2f} {t.get('median', float('nan')):9.2f} "
      f"{t.get('p99', float('nan')):9.2f} | {d:8.0f} {a:8.0f} {acc:7.2f}")
PY
        done
    done
    kill -INT "$pid"; for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
done

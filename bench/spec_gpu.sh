#!/usr/bin/env bash
# Issue 16 on one H200 in one device call: (re)train the small model unless MODEL names one, the GPU tests of
# speculation (MTP draft graphs replay what the eager chain drafts; graphs = eager = plain), then
# bench.spec_budget with one process per (method, budget) so that no engine's memory or compiles leak into the
# next one's measurement. Prints the table last; JSON lines in $OUT/spec_budget.jsonl.
# Usage: bash bench/spec_gpu.sh                      (trains: ~4 min of the call)
#        MODEL=.models/fp8-channel bash bench/spec_gpu.sh   (a carried checkpoint; see bench/RESULTS.md)
# Knobs: TRAIN_S (training time budget), EXPORT_MODEL (0: keep the trained folder on the device), RUNS ("method:budget ..."),
# REPEAT (> 1: one process, the methods of RUNS interleaved over REPEAT rounds, budget on), CONCURRENCY, SPEC_ARGS (extra
# bench.spec_budget arguments), RUN_TIMEOUT_S (per process), SKIP_TESTS=1, TESTS_K (pytest -k), DEVICE.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/spec_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
TRAIN_S=${TRAIN_S:-200}
RUNS=${RUNS:-"none:on mtp:on suffix:on hybrid:on mtp:off hybrid:off"}
CONCURRENCY=${CONCURRENCY:-1,16}
SPEC_ARGS=${SPEC_ARGS:-"--num-prompts 16 --num-sessions 8 --num-turns 3 --output-len 256"}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-150}
TESTS_K=${TESTS_K:-"mtp_draft_graphs or speculation or draft_budget"}
DEVICE=${DEVICE:-cuda}  # cpu: a smoke run (with MODEL and SKIP_TESTS=1)
if [ -z "${MODEL:-}" ]; then
    python3 -m bench.train_small --out /tmp/ts --device cuda --time-budget "$TRAIN_S" --extra-code purelib \
        --extra-code-mb 150 2>&1 | tail -5 | tee "$OUT/train.log"
    cp /tmp/ts/train_small.json "$OUT/" 2>/dev/null
    MODEL=/tmp/ts/fp8-channel
    # The trained FP8 folder back to the dev machine in pieces under the device tool's 16 MiB per file:
    #   cat model.tar.part-* | tar -x -C .models   (then MODEL=.models/fp8-channel in a later call)
    [ "${EXPORT_MODEL:-1}" = 1 ] && tar -C /tmp/ts -c fp8-channel | split -b 15m - "$OUT/model.tar.part-"
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout 240 python3 -m pytest -q -m gpu tests/gpu/test_engine_gpu.py -k "$TESTS_K" \
        2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
fi
rm -f "$OUT/spec_budget.jsonl"
if [ "${REPEAT:-1}" -gt 1 ]; then
    # every engine in one process for REPEAT rounds, the methods interleaved per block of CONCURRENCY prompts or
    # sessions (bench/spec_budget.py; SPEC_ARGS="... --interleave cell": per whole cell): a slow period of the host
    # hits one block of every method, and the summary pairs each request with none's run of it (95% intervals;
    # add none#2 to RUNS for the A/A noise floor)
    methods=$(for mb in $RUNS; do echo "${mb%:*}"; done | awk '!seen[$0]++' | paste -sd, -)
    # shellcheck disable=SC2086
    timeout "$((RUN_TIMEOUT_S * REPEAT))" python3 -m bench.spec_budget --model "$MODEL" --device "$DEVICE" \
        --methods "$methods" --budget on --concurrency "$CONCURRENCY" $SPEC_ARGS --repeat "$REPEAT" \
        --enable-fused-qk-norm-rope --enable-shared-experts-fusion --out "$OUT/spec_budget.jsonl" 2>&1 \
        | grep -v "Loading\|Capturing" >>"$OUT/spec_budget.log"
    sed -n '/^--- paired summary/,$p' "$OUT/spec_budget.log"
    exit 0
fi
for mb in $RUNS; do
    # shellcheck disable=SC2086
    timeout "$RUN_TIMEOUT_S" python3 -m bench.spec_budget --model "$MODEL" --device "$DEVICE" --methods "${mb%:*}" \
        --budget "${mb#*:}" --concurrency "$CONCURRENCY" $SPEC_ARGS --enable-fused-qk-norm-rope \
        --enable-shared-experts-fusion --out "$OUT/spec_budget.jsonl" 2>&1 | grep -v "Loading\|Capturing" \
        >>"$OUT/spec_budget.log"
done
python3 - "$OUT/spec_budget.jsonl" <<'PY'
import json, sys
try:
    rows = [json.loads(line) for line in open(sys.argv[1])]
except OSError:
    sys.exit("no results")
order = ["none", "suffix", "mtp", "hybrid"]
print(f"{'dataset':13} {'conc':>4} {'method':7} {'budget':6} | {'TPOT mean':>9} {'p50':>7} {'p99':>7} | "
      f"{'tok/s':>8} {'drafted/tok':>11} {'accepted/tok':>12} {'overlapped':>10} {'retired':>8}")
for r in sorted(rows, key=lambda r: (r["dataset"], r["concurrency"], order.index(r["method"]), r["budget"])):
    print(f"{r['dataset']:13} {r['concurrency']:>4} {r['method']:7} {r['budget']:6} | {r['tpot_ms_mean']:9.2f} "
          f"{r['tpot_ms_p50']:7.2f} {r['tpot_ms_p99']:7.2f} | {r['output_tok_s']:8.0f} "
          f"{r['drafted_per_token']:11.2f} {r['accepted_per_token']:12.2f} {r.get('overlapped_steps', -1):10} "
          f"{r.get('mtp_retired', -1)}/{r.get('requests', -1)}")
PY

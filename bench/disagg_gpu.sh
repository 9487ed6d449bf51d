#!/usr/bin/env bash
# Prefill/decode disaggregation on one GPU (issue 17 item 7): colocated (also with the prefill cap next to decodes,
# issue 21 item 4) vs disaggregated (sync and async transfer)
# under one load where long prompts arrive while other requests decode. A prefill and a decode instance share
# the GPU (memory split by --mem-fraction-static), behind `python -m disagg.router`; the colocated run is one
# server with the same memory. Two bench.serving clients run at once: DECODERS (short prompts, long outputs,
# fixed concurrency: their TPOT / ITL show how much the long prefills stall decoding) and LONG (long prompts at a
# Poisson rate, few output tokens: their TTFT shows prefill + handover). The decoders must outlast the long
# prompts' arrivals (DEC_NUM/DEC_CONC x DEC_OUT tokens x ~5 ms vs LONG_NUM/LONG_RATE s), else most long prompts
# meet no decode. Transfer cost per request comes from the instances' stats over the measured load (after the
# warm-up): the decode side's disagg_landing_seconds_total (the prefill side's Done, i.e. first token sampled and
# every write posted -> every page landed there) against the prefill side's disagg_prefill_seconds_total
# (scheduled -> first token); also the prefill side's transfer tail (first token -> the Ack was read there, at
# its next step).
# Writes $OUT/<run>_{decoders,long}.json and prints one table. The device tool returns a limited number of files:
# run with OUT=/tmp/dg and then `tar -C /tmp -czf "$OUT/dg.tgz" dg` to get them all back.
# Knobs: LAYERS (real-shape dummy model depth; two instances must fit), MODEL (a checkpoint instead),
# DEVICE_ARGS (e.g. "--device cpu" for a smoke run), RUNS, LONG_LEN, LONG_NUM, LONG_RATE, DEC_LEN, DEC_OUT,
# DEC_NUM, DEC_CONC, MEM, BACKEND, SERVER_WAIT_S, CLIENT_TIMEOUT_S, SERVER_ARGS (extra flags for every instance,
# e.g. "--max-num-batched-tokens 16384").
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/disagg_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# NIXL over UCX between two processes on one GPU: CUDA IPC with zero-copy gets (else it falls back to TCP)
export UCX_CUDA_IPC_ENABLE_GET_ZCOPY=${UCX_CUDA_IPC_ENABLE_GET_ZCOPY:-yes}
LAYERS=${LAYERS:-8}
if [ -z "${MODEL:-}" ]; then  # the real-shape folder holds config + tokenizer only: random weights
    MODEL=$(python3 -m bench.real_shape --layers "$LAYERS"); LOAD_ARGS=(--load-format dummy)
else
    LOAD_ARGS=()
fi
DEVICE_ARGS=${DEVICE_ARGS:-}
RUNS=${RUNS:-"colocated colocated-capped disagg-sync disagg-async"}  # also: disagg-async-last-sync
CAP=${CAP:-2048}  # colocated-capped: --max-prefill-tokens-while-decoding (issue 21 item 4)
LONG_LEN=${LONG_LEN:-16384}; LONG_NUM=${LONG_NUM:-16}; LONG_RATE=${LONG_RATE:-0.5}
DEC_LEN=${DEC_LEN:-1024}; DEC_OUT=${DEC_OUT:-2048}; DEC_NUM=${DEC_NUM:-48}; DEC_CONC=${DEC_CONC:-16}
MEM=${MEM:-0.40}  # per instance in the disaggregated runs; the colocated server gets 2 x MEM
BACKEND=${BACKEND:-nixl}
SERVER_WAIT_S=${SERVER_WAIT_S:-600}
CLIENT_TIMEOUT_S=${CLIENT_TIMEOUT_S:-900}
echo "model $MODEL; long: $LONG_NUM x $LONG_LEN tokens at $LONG_RATE/s; decoders: $DEC_NUM x $DEC_LEN in/$DEC_OUT out, $DEC_CONC at once"

PIDS=()
wait_up() {  # url pid log
    for _ in $(seq 1 "$SERVER_WAIT_S"); do
        curl -sf "$1/health" >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || { echo "--- died:"; tail -20 "$3"; return 1; }
        sleep 1
    done
    echo "--- not up after $SERVER_WAIT_S s:"; tail -20 "$3"; return 1
}
stop_all() {
    for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    done
    PIDS=()
}
trap stop_all EXIT

for run in $RUNS; do
    base=$((19000 + RANDOM % 500 * 4))
    url="http://127.0.0.1:$base"
    # shellcheck disable=SC2206
    common=(--model "$MODEL" "${LOAD_ARGS[@]}" --host 127.0.0.1 $DEVICE_ARGS ${SERVER_ARGS:-})
    if [ "${run#colocated}" != "$run" ]; then
        mem2=$(python3 -c "print(2 * $MEM)")
        cap=(); [ "$run" = colocated-capped ] && cap=(--max-prefill-tokens-while-decoding "$CAP")
        python3 -m server "${common[@]}" --port "$base" --mem-fraction-static "$mem2" "${cap[@]}" \
            >"$OUT/$run.server.log" 2>&1 &
        PIDS+=($!); wait_up "$url" "$!" "$OUT/$run.server.log" || { stop_all; continue; }
        prefill_url=$url; decode_url=$url
    else
        async=()
        # disagg-async: every write async (sessions 10-13's async); disagg-async-last-sync: the default async
        # transfer since session 14 (a request's last write is posted after its step)
        [ "$run" = disagg-async ] && async=(--disaggregation-async-transfer --disable-disaggregation-async-last-chunk-sync)
        [ "$run" = disagg-async-last-sync ] && async=(--disaggregation-async-transfer)
        p=$((base + 1)); d=$((base + 2)); bport=$((base + 3))
        python3 -m server "${common[@]}" --port "$p" --mem-fraction-static "$MEM" --disaggregation-mode prefill \
            --disaggregation-bootstrap-port "$bport" --disaggregation-transfer-backend "$BACKEND" "${async[@]}" \
            >"$OUT/$run.prefill.log" 2>&1 &
        PIDS+=($!); wait_up "http://127.0.0.1:$p" "$!" "$OUT/$run.prefill.log" || { stop_all; continue; }
        python3 -m server "${common[@]}" --port "$d" --mem-fraction-static "$MEM" --disaggregation-mode decode \
            --disaggregation-transfer-backend "$BACKEND" "${async[@]}" >"$OUT/$run.decode.log" 2>&1 &
        PIDS+=($!); wait_up "http://127.0.0.1:$d" "$!" "$OUT/$run.decode.log" || { stop_all; continue; }
        python3 -m disagg.router --prefill "http://127.0.0.1:$p" --decode "http://127.0.0.1:$d" --port "$base" \
            >"$OUT/$run.router.log" 2>&1 &
        PIDS+=($!); wait_up "$url" "$!" "$OUT/$run.router.log" || { stop_all; continue; }
        prefill_url="http://127.0.0.1:$p"; decode_url="http://127.0.0.1:$d"
    fi
    echo "=== $run"
    bench=(python3 -m bench.serving --base-url "$url" --endpoint completions --dataset random --tokenizer "$MODEL"
           --tokenize-prompt --disable-tqdm)
    # warm-up, not timed: the shapes the load brings (long prefill chunks next to a decode batch: the decoders
    # outlast the long prompts), so that no
    # run pays Triton's compile and autotune of a new shape inside its measurement
    timeout "$CLIENT_TIMEOUT_S" "${bench[@]}" --num-prompts "$DEC_CONC" --input-len "$DEC_LEN" --output-len 512 \
        --max-concurrency "$DEC_CONC" --seed 21 >"$OUT/${run}_warmup.log" 2>&1 &
    warm=$!
    timeout "$CLIENT_TIMEOUT_S" "${bench[@]}" --num-prompts 2 --input-len "$LONG_LEN" --output-len 4 \
        --max-concurrency 1 --seed 22 --warmup-requests 0 >>"$OUT/${run}_warmup.log" 2>&1
    wait "$warm"
    curl -sf "$prefill_url/server_info" >"$OUT/${run}_prefill_info0.json" || true
    curl -sf "$decode_url/server_info" >"$OUT/${run}_decode_info0.json" || true
    timeout "$CLIENT_TIMEOUT_S" "${bench[@]}" --num-prompts "$DEC_NUM" --input-len "$DEC_LEN" --output-len "$DEC_OUT" \
        --max-concurrency "$DEC_CONC" --seed 11 --output-json "$OUT/${run}_decoders.json" >"$OUT/${run}_decoders.log" 2>&1 &
    dec=$!
    sleep 2  # decoders running first
    timeout "$CLIENT_TIMEOUT_S" "${bench[@]}" --num-prompts "$LONG_NUM" --input-len "$LONG_LEN" --output-len 16 \
        --request-rate "$LONG_RATE" --seed 12 --warmup-requests 0 --output-json "$OUT/${run}_long.json" \
        >"$OUT/${run}_long.log" 2>&1
    wait "$dec"
    curl -sf "$prefill_url/server_info" >"$OUT/${run}_prefill_info.json" || true
    curl -sf "$decode_url/server_info" >"$OUT/${run}_decode_info.json" || true
    stop_all
    # steps over 1 s (engine/engine_core.py SLOW_STEP_S): a kernel variant compiling inside the load, a stalled peer
    echo "$run: $(cat "$OUT/$run".*.log 2>/dev/null | grep -c "slow step") slow steps logged (warm-up included)"
done

python3 - "$OUT" $RUNS <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
nan = float("nan")
print(f"{'run':14} {'long TTFT mean':>14} {'p50':>8} {'p99':>8} | {'dec TPOT mean':>13} {'ITL p50':>8} {'ITL p99':>8} "
      f"{'ITL max':>8} | {'landing/prefill':>15}  (ms)")
for run in sys.argv[2:]:
    try:
        lg = json.loads((out / f"{run}_long.json").read_text())["summary"]
        dc = json.loads((out / f"{run}_decoders.json").read_text())["summary"]
    except (OSError, ValueError, KeyError):
        print(f"{run:14} (no result)"); continue
    g = lambda s, k, q: s.get(k, {}).get(q, nan)
    ratio = ""
    try:  # over the measured load: stats after it minus stats after the warm-up
        def delta(side):
            a, b = (json.loads((out / f"{run}_{side}_info{s}.json").read_text())["engine"] for s in ("0", ""))
            return {k: b[k] - a.get(k, 0) for k in b if isinstance(b[k], (int, float))}
        st, dst = delta("prefill"), delta("decode")
        if st.get("disagg_prefill_seconds_total"):
            pre, n = st["disagg_prefill_seconds_total"], st["disagg_handovers_total"]
            land, tail = dst.get("disagg_landing_seconds_total", nan), st["disagg_transfer_tail_seconds_total"]
            ratio = (f"{land / pre:.3f} (landing {1000 * land / max(n, 1):.1f} ms, prefill {1000 * pre / max(n, 1):.0f}"
                     f" ms, Ack read {1000 * tail / max(n, 1):.0f} ms each; {n} handovers, "
                     f"{st['disagg_failed_total']} failed)")
            w = max(st.get("disagg_writes_done_total", 0), 1)
            ratio += (f"; per write: GPU wait {1000 * st.get('disagg_write_gpu_wait_seconds_total', nan) / w:.1f}, "
                      f"post delay {1000 * st.get('disagg_write_post_delay_seconds_total', nan) / w:.1f}, "
                      f"flight {1000 * st.get('disagg_write_flight_seconds_total', nan) / w:.1f} ms "
                      f"({st.get('disagg_writes_done_total', 0)} writes)")
    except (OSError, ValueError, KeyError):
        pass
    print(f"{run:14} {g(lg,'ttft_ms','mean'):14.1f} {g(lg,'ttft_ms','p50'):8.1f} {g(lg,'ttft_ms','p99'):8.1f} | "
          f"{g(dc,'tpot_ms','mean'):13.2f} {g(dc,'itl_ms','p50'):8.2f} {g(dc,'itl_ms','p99'):8.2f} "
          f"{g(dc,'itl_ms','max'):8.1f} | {ratio}")
    for name, s in (("long", lg), ("decoders", dc)):
        if s.get("failed"):
            print(f"   {name}: {s['failed']} failed: {s.get('errors')}")
PY

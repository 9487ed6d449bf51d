#!/usr/bin/env bash
# Prefill/decode disaggregation (issues 17 and 20): colocated (also with the prefill cap next to decodes, issue 21
# item 4, and two colocated instances behind the router) vs disaggregated (sync and async transfer) under one load
# where long prompts arrive while other requests decode. GPUS=1: a prefill and a decode instance share the GPU
# (memory split by --mem-fraction-static); the colocated run is one server with the same memory. GPUS=2 (issue 20):
# the prefill instance (and the colocated one) on GPU 0, the decode instance (and a second colocated one) on GPU 1,
# KV over NVLink. Two bench.serving clients run at once: DECODERS (short prompts, long outputs,
# fixed concurrency: their TPOT / ITL show how much the long prefills stall decoding) and LONG (long prompts at a
# Poisson rate, few output tokens: their TTFT shows prefill + handover). The decoders must outlast the long
# prompts' arrivals (DEC_NUM/DEC_CONC x DEC_OUT tokens x ~5 ms vs LONG_NUM/LONG_RATE s), else most long prompts
# meet no decode. Transfer cost per request comes from the instances' stats over the measured load (after the
# warm-up): the decode side's disagg_landing_seconds_total (the prefill side's Done, i.e. first token sampled and
# every write posted -> every page landed there) against the prefill side's disagg_prefill_seconds_total
# (scheduled -> first token); also the prefill side's transfer tail (first token -> the Ack was read there, at
# its next step), and per write: bytes (pages x the KV page size from the model's config) over its flight time.
# Runs (RUNS): colocated, colocated-capped, colocated-router (two colocated instances behind `disagg.router
# --colocated`), disagg-sync, disagg-async (every write async), disagg-async-last-sync (the default async),
# disagg-kill (as disagg-async-last-sync with --disaggregation-timeout KILL_TIMEOUT; the decode instance is
# SIGKILLed KILL_AT s into the load: the clients' requests must all end within the deadline, and the prefill
# instance must get every page back).
# Writes $OUT/<run>_{decoders,long}.json and prints one table. The device tool returns a limited number of files:
# run with OUT=/tmp/dg and then `tar -C /tmp -czf "$OUT/dg.tgz" dg` to get them all back.
# Knobs: GPUS, PLACE (GPUS=2: index or mask, below), LAYERS (real-shape dummy model depth; the instances must fit), MODEL (a checkpoint instead),
# DEVICE_ARGS (e.g. "--device cpu" for a smoke run), RUNS, LONG_LEN, LONG_RANGE (long prompts of
# LONG_RANGE x LONG_LEN .. LONG_LEN tokens), LONG_NUM, LONG_RATE, DEC_LEN, DEC_OUT, DEC_NUM, DEC_CONC, MEM,
# BACKEND, KV_DTYPE, SERVER_WAIT_S, CLIENT_TIMEOUT_S, KILL_AT, KILL_TIMEOUT, SERVER_ARGS (extra flags for every
# instance, e.g. "--max-num-batched-tokens 16384").
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/disagg_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# NIXL over UCX between two processes on one GPU: CUDA IPC with zero-copy gets (else it falls back to TCP)
export UCX_CUDA_IPC_ENABLE_GET_ZCOPY=${UCX_CUDA_IPC_ENABLE_GET_ZCOPY:-yes}
LAYERS=${LAYERS:-8}
GPUS=${GPUS:-1}
if [ -z "${MODEL:-}" ]; then  # the real-shape folder holds config + tokenizer only: random weights
    MODEL=$(python3 -m bench.real_shape --layers "$LAYERS"); LOAD_ARGS=(--load-format dummy)
else
    LOAD_ARGS=()
fi
DEVICE_ARGS=${DEVICE_ARGS:-}
RUNS=${RUNS:-"colocated colocated-capped disagg-sync disagg-async"}
CAP=${CAP:-2048}  # colocated-capped: --max-prefill-tokens-while-decoding (issue 21 item 4)
LONG_LEN=${LONG_LEN:-16384}; LONG_RANGE=${LONG_RANGE:-1.0}; LONG_NUM=${LONG_NUM:-16}; LONG_RATE=${LONG_RATE:-0.5}
DEC_LEN=${DEC_LEN:-1024}; DEC_OUT=${DEC_OUT:-2048}; DEC_NUM=${DEC_NUM:-48}; DEC_CONC=${DEC_CONC:-16}
# per instance; GPUS=1: the instances share the GPU and a lone colocated server gets 2 x MEM
if [ "$GPUS" = 2 ]; then MEM=${MEM:-0.85}; else MEM=${MEM:-0.40}; fi
BACKEND=${BACKEND:-nixl}
KV_DTYPE=${KV_DTYPE:-auto}
KILL_AT=${KILL_AT:-12}; KILL_TIMEOUT=${KILL_TIMEOUT:-20}
SERVER_WAIT_S=${SERVER_WAIT_S:-600}
CLIENT_TIMEOUT_S=${CLIENT_TIMEOUT_S:-900}
echo "model $MODEL; $GPUS GPU(s); long: $LONG_NUM x $LONG_LEN tokens (x$LONG_RANGE..1) at $LONG_RATE/s; decoders: $DEC_NUM x $DEC_LEN in/$DEC_OUT out, $DEC_CONC at once"

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
# GPUS=2: PLACE=index (default) gives each instance --base-gpu-id and lets every process see both GPUs (CUDA IPC
# can map the peer's memory); PLACE=mask hides the other GPU (CUDA_VISIBLE_DEVICES), as many launch scripts do
PLACE=${PLACE:-index}
on_gpu() {  # the env prefix that puts an instance on GPU $1 (GPUS=2, PLACE=mask), or nothing
    [ "$GPUS" = 2 ] && [ "$PLACE" = mask ] && echo "env CUDA_VISIBLE_DEVICES=$1"
}
gpu_args() {  # the server flag that puts an instance on GPU $1 (GPUS=2, PLACE=index), or nothing
    [ "$GPUS" = 2 ] && [ "$PLACE" = index ] && echo "--base-gpu-id $1"
}
# which UCX protocols the transfers took (cuda_ipc over NVLink, or a copy through the host), in the instances' logs
[ "$GPUS" = 2 ] && export UCX_PROTO_INFO=${UCX_PROTO_INFO:-y}
start_server() {  # log gpu server-args...: an instance of this run on GPU $gpu, in the background ($! is its pid).
    # Each leads a process group of its own (setsid), so that disagg-kill's kill -9 -pid takes its engine too.
    local log=$1 gpu=$2
    shift 2
    # shellcheck disable=SC2046
    setsid $(on_gpu "$gpu") python3 -m server "${common[@]}" $(gpu_args "$gpu") "$@" >"$OUT/$run.$log.log" 2>&1 &
    PIDS+=($!)
}
start_router() {  # router-args...: disagg.router on this run's port in front of its instances, waited for
    python3 -m disagg.router "$@" --port "$base" >"$OUT/$run.router.log" 2>&1 &
    PIDS+=($!)
    wait_up "$url" "$!" "$OUT/$run.router.log"
}
engine_stat() {  # url key: one number from the instance's engine stats
    curl -sf "$1/server_info" | python3 -c "import json,sys; print(json.load(sys.stdin)['engine'].get('$2', 'nan'))"
}

for run in $RUNS; do
    base=$((19000 + RANDOM % 500 * 4))
    url="http://127.0.0.1:$base"
    # shellcheck disable=SC2206
    common=(--model "$MODEL" "${LOAD_ARGS[@]}" --host 127.0.0.1 --kv-cache-dtype "$KV_DTYPE" $DEVICE_ARGS ${SERVER_ARGS:-})
    if [ "$run" = colocated-router ]; then  # two colocated instances (one per GPU with GPUS=2) behind the router
        c1=$((base + 1)); c2=$((base + 2))
        start_server c1 0 --port "$c1" --mem-fraction-static "$MEM"; p1=$!
        start_server c2 1 --port "$c2" --mem-fraction-static "$MEM"; p2=$!
        wait_up "http://127.0.0.1:$c1" "$p1" "$OUT/$run.c1.log" && wait_up "http://127.0.0.1:$c2" "$p2" \
            "$OUT/$run.c2.log" && start_router --colocated "http://127.0.0.1:$c1" --colocated "http://127.0.0.1:$c2" \
            || { stop_all; continue; }
        prefill_url="http://127.0.0.1:$c1"; decode_url="http://127.0.0.1:$c2"
    elif [ "${run#colocated}" != "$run" ]; then
        mem=$MEM; [ "$GPUS" = 2 ] || mem=$(python3 -c "print(2 * $MEM)")
        cap=(); [ "$run" = colocated-capped ] && cap=(--max-prefill-tokens-while-decoding "$CAP")
        start_server server 0 --port "$base" --mem-fraction-static "$mem" "${cap[@]}"
        wait_up "$url" "$!" "$OUT/$run.server.log" || { stop_all; continue; }
        prefill_url=$url; decode_url=$url
    else
        async=()
        # disagg-async: every write async (sessions 10-13's async); disagg-async-last-sync and disagg-kill: the
        # default async transfer since session 14 (a request's last write is posted after its step)
        [ "$run" = disagg-async ] && async=(--disaggregation-async-transfer --disable-disaggregation-async-last-chunk-sync)
        [ "$run" = disagg-async-last-sync ] && async=(--disaggregation-async-transfer)
        [ "$run" = disagg-kill ] && async=(--disaggregation-async-transfer --disaggregation-timeout "$KILL_TIMEOUT")
        p=$((base + 1)); d=$((base + 2)); bport=$((base + 3))
        start_server prefill 0 --port "$p" --mem-fraction-static "$MEM" --disaggregation-mode prefill \
            --disaggregation-bootstrap-port "$bport" --disaggregation-transfer-backend "$BACKEND" "${async[@]}"
        ppid_=$!
        start_server decode 1 --port "$d" --mem-fraction-static "$MEM" --disaggregation-mode decode \
            --disaggregation-transfer-backend "$BACKEND" "${async[@]}"
        dpid=$!
        wait_up "http://127.0.0.1:$p" "$ppid_" "$OUT/$run.prefill.log" && wait_up "http://127.0.0.1:$d" "$dpid" \
            "$OUT/$run.decode.log" && start_router --prefill "http://127.0.0.1:$p" --decode "http://127.0.0.1:$d" \
            || { stop_all; continue; }
        prefill_url="http://127.0.0.1:$p"; decode_url="http://127.0.0.1:$d"
    fi
    echo "=== $run"
    bench=(python3 -m bench.serving --base-url "$url" --endpoint completions --dataset random --tokenizer "$MODEL"
           --tokenize-prompt --disable-tqdm)
    # warm-up, not timed: the shapes the load brings (long prefill chunks next to a decode batch: the decoders
    # outlast the long prompts), so that no
    # run pays Triton's compile and autotune of a new shape inside its measurement
    timeout "$CLIENT_TIMEOUT_S" "${bench[@]}" --num-prompts "$DEC_CONC" --input-len "$DEC_LEN" --output-len 512 \
        --max-concurrency "$DEC_CONC" --seed 21 --output-json none >"$OUT/${run}_warmup.log" 2>&1 &
    warm=$!
    timeout "$CLIENT_TIMEOUT_S" "${bench[@]}" --num-prompts 2 --input-len "$LONG_LEN" --output-len 4 \
        --max-concurrency 1 --seed 22 --warmup-requests 0 --output-json none >>"$OUT/${run}_warmup.log" 2>&1
    wait "$warm"
    curl -sf "$prefill_url/server_info" >"$OUT/${run}_prefill_info0.json" || true
    curl -sf "$decode_url/server_info" >"$OUT/${run}_decode_info0.json" || true
    timeout "$CLIENT_TIMEOUT_S" "${bench[@]}" --num-prompts "$DEC_NUM" --input-len "$DEC_LEN" --output-len "$DEC_OUT" \
        --max-concurrency "$DEC_CONC" --seed 11 --output-json "$OUT/${run}_decoders.json" >"$OUT/${run}_decoders.log" 2>&1 &
    dec=$!
    sleep 2  # decoders running first
    timeout "$CLIENT_TIMEOUT_S" "${bench[@]}" --num-prompts "$LONG_NUM" --input-len "$LONG_LEN" --output-len 16 \
        --random-range-ratio "$LONG_RANGE" --request-rate "$LONG_RATE" --seed 12 --warmup-requests 0 \
        --output-json "$OUT/${run}_long.json" >"$OUT/${run}_long.log" 2>&1 &
    long=$!
    if [ "$run" = disagg-kill ]; then  # the decode instance and its engine processes, all at once
        sleep "$KILL_AT"
        kill -9 -- "-$dpid"
        t_kill=$(date +%s.%N)
        echo "$run: SIGKILLed the decode instance (process group $dpid) $((KILL_AT + 2)) s into the load"
        # from the kill on, twice a second: the last moment the prefill instance held a page or a room, until the
        # clients are done and it holds none (or the deadline + 30 s passed)
        rm -f "$OUT/${run}_clients_done"; echo "$t_kill" >"$OUT/${run}_last_busy"
        (
            end=$(( $(date +%s) + KILL_TIMEOUT + 30 + LONG_NUM ))
            while [ "$(date +%s)" -lt "$end" ]; do
                used=$(engine_stat "$prefill_url" used_kv_blocks); rooms=$(engine_stat "$prefill_url" disagg_rooms_active)
                if [ "$used" = 0 ] && [ "$rooms" = 0 ]; then
                    [ -e "$OUT/${run}_clients_done" ] && break
                else
                    date +%s.%N >"$OUT/${run}_last_busy"
                fi
                sleep 0.5
            done
            printf '{"t_kill": %s, "t_last_busy": %s, "used_kv_blocks": %s, "rooms_active": %s, "failed_handovers": %s, "timeout_s": %s}\n' \
                "$t_kill" "$(cat "$OUT/${run}_last_busy")" "$used" "$rooms" \
                "$(engine_stat "$prefill_url" disagg_failed_total)" "$KILL_TIMEOUT" >"$OUT/${run}_kill.json"
        ) &
        poller=$!
    fi
    wait "$long"; wait "$dec"
    if [ "$run" = disagg-kill ]; then
        touch "$OUT/${run}_clients_done"; wait "$poller"
    fi
    curl -sf "$prefill_url/server_info" >"$OUT/${run}_prefill_info.json" || true
    curl -sf "$decode_url/server_info" >"$OUT/${run}_decode_info.json" || true
    stop_all
    # steps over 1 s (engine/engine_core.py SLOW_STEP_S): a kernel variant compiling inside the load, a stalled peer
    echo "$run: $(cat "$OUT/$run".*.log 2>/dev/null | grep -c "slow step") slow steps logged (warm-up included)"
    [ -n "${UCX_PROTO_INFO:-}" ] && grep -h -m4 "cuda_ipc\|cuda_copy\|tcp/" "$OUT/$run".prefill.log "$OUT/$run".decode.log 2>/dev/null
done

python3 - "$OUT" "$MODEL" "$KV_DTYPE" $RUNS <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
nan = float("nan")
cfg = json.loads((pathlib.Path(sys.argv[2]) / "config.json").read_text())
kv_dtype_bytes = 1 if sys.argv[3].startswith("fp8") else 2
# one KV page (16 tokens) of the layers a non-speculative instance caches
page_bytes = 16 * cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * kv_dtype_bytes


def kill_report(run):
    """disagg-kill: how long the requests the kill cut took to end, and when the prefill side's pages came back."""
    k = json.loads((out / f"{run}_kill.json").read_text())
    cut, after, ok = [], 0, 0
    for side in ("decoders", "long"):
        res = json.loads((out / f"{run}_{side}.json").read_text())
        for r in res["requests"]:
            sent, end = res["t0_unix"] + r["send_time"], res["t0_unix"] + r["end_time"]
            if r["success"]:
                ok += 1
            elif sent < k["t_kill"]:
                cut.append(end - k["t_kill"])
            else:
                after += 1
    print(f"   kill: {len(cut)} requests in flight failed, the last {max(cut, default=nan):.1f} s after the kill "
          f"(deadline {k['timeout_s']} s); {after} sent later failed; {ok} succeeded; prefill instance at the end: "
          f"{k['used_kv_blocks']} pages in use, {k['rooms_active']} rooms; it last held some "
          f"{k['t_last_busy'] - k['t_kill']:.1f} s after the kill ({k['failed_handovers']} failed handovers)")
print(f"{'run':14} {'long TTFT mean':>14} {'p50':>8} {'p99':>8} | {'dec TPOT mean':>13} {'ITL p50':>8} {'ITL p99':>8} "
      f"{'ITL max':>8} | {'landing/prefill':>15}  (ms)")
for run in sys.argv[4:]:
    try:
        lg = json.loads((out / f"{run}_long.json").read_text())["summary"]
        dc = json.loads((out / f"{run}_decoders.json").read_text())["summary"]
    except (OSError, ValueError, KeyError):
        print(f"{run:14} (no result)"); continue
    g = lambda s, k, q: nan if s.get(k, {}).get(q) is None else s[k][q]  # null: no request succeeded
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
            flight = st.get("disagg_write_flight_seconds_total", nan)
            nbytes = st.get("disagg_pages_sent_total", 0) * page_bytes
            ratio += (f"; per write: GPU wait {1000 * st.get('disagg_write_gpu_wait_seconds_total', nan) / w:.1f}, "
                      f"post delay {1000 * st.get('disagg_write_post_delay_seconds_total', nan) / w:.1f}, "
                      f"flight {1000 * flight / w:.1f} ms "
                      f"({st.get('disagg_writes_done_total', 0)} writes); per request {nbytes / max(n, 1) / 2**20:.0f} MiB "
                      f"in {1000 * flight / max(n, 1):.1f} ms of flight ({nbytes / flight / 1e9:.1f} GB/s)")
    except (OSError, ValueError, KeyError):
        pass
    print(f"{run:14} {g(lg,'ttft_ms','mean'):14.1f} {g(lg,'ttft_ms','p50'):8.1f} {g(lg,'ttft_ms','p99'):8.1f} | "
          f"{g(dc,'tpot_ms','mean'):13.2f} {g(dc,'itl_ms','p50'):8.2f} {g(dc,'itl_ms','p99'):8.2f} "
          f"{g(dc,'itl_ms','max'):8.1f} | {ratio}")
    for name, s in (("long", lg), ("decoders", dc)):
        if s.get("failed"):
            print(f"   {name}: {s['failed']} failed: {s.get('errors')}")
    if run == "disagg-kill":
        try:
            kill_report(run)
        except (OSError, ValueError, KeyError) as e:
            print(f"   kill: no report ({e!r})")
PY

#!/usr/bin/env bash
# Issue 7 on a 4-GPU machine (device kind nvidia-h200-x4), in stages (STAGES="test decode serving"):
#   allreduce  bench.allreduce at TP: NCCL vs the one-shot / fused all-reduce per call at batch 1/16/48, in CUDA
#            graphs, with its correctness check (issue 19 item 1); then decode steps with the fusion on
#            (bench.tp_decode --enable-allreduce-fusion, same flags as the decode stage)
#   test     tests/gpu/test_tp_gpu.py: TP2 and TP4 vs TP1 at real widths (4 layers), graphs = eager, the fused
#            all-reduce vs NCCL; tests/gpu/test_allreduce_gpu.py: the one-shot kernel's check and timed run
#   decode   the full 92-layer GLM-4.7-FP8 shape at TP4 (dummy weights, the optimized flags): decode steps at
#            batch 1/16/64 with 4K context vs the per-GPU HBM floor, the all-reduce share, a 4096-token prefill,
#            a lone request's TTFT and TPOT (bench/tp_decode.py)
#   serving  the server with configs/presets/optimized-tp4.json under bench.serving: at each of RATES req/s
#            (default 7), NUMS random 4096-in / 1000-out requests (bench/serving_gpu.sh)
#   seed     issue 19 item 3 (TP=8 on 8 GPUs): the seed's load, SEED_NUM (420) random 4096-in / 1000-out requests at
#            SEED_RATE (14) req/s, one server per run of SEED_RUNS (baseline optimized optimized-suffix): the seed's
#            TP8 presets with dummy weights, FP8 KV and 16K chunks (the baseline too), Triton attention (no
#            flash-attn there); NEXTN is in both presets, optimized-suffix swaps it for SUFFIX 64 / 1.0 / 0.1
#            (dummy weights accept nothing: system cost). serving_gpu.sh prints each run's steps vs their floor.
#   prefill-repeat  issue 19 item 2: the 4096-token TP prefill (243 vs 204 ms in two sessions) in PREFILL_RUNS (2)
#            fresh processes, each with its per-kernel profile of rank 0 and the GPUs' clocks and temperature
#            before it, so that a difference between processes shows which kernels it is in
# DECODE_ARGS adds flags to bench.tp_decode (e.g. "--profile --tpot-tokens 0").
# Full logs and JSON go to $OUT; the output keeps to the result lines. NVLink multicast stays off.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/tp4_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TP=${TP:-4}
LAYERS=${LAYERS:-92}
STAGES=${STAGES:-"test decode serving"}
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nvidia-smi -L | wc -l) GPUs, stages: $STAGES"
for stage in $STAGES; do
    t0=$(date +%s)
    case "$stage" in
    test)
        GLINT_TP_TEST_TIMEOUT_S=${GLINT_TP_TEST_TIMEOUT_S:-150} timeout "${TEST_TIMEOUT_S:-480}" \
            python3 -m pytest -m gpu tests/gpu/test_tp_gpu.py tests/gpu/test_allreduce_gpu.py -q -s \
            -p no:cacheprovider >"$OUT/tp_test.log" 2>&1
        echo "=== test: exit $? in $(( $(date +%s) - t0 )) s"
        grep -E '_mean"|equal_eager|passed|failed|Error|error' "$OUT/tp_test.log" | cut -c1-300 | tail -30
        ;;
    allreduce)
        timeout "${AR_TIMEOUT_S:-240}" python3 -m torch.distributed.run --nproc-per-node "$TP" -m bench.allreduce \
            --batches "${AR_BATCHES:-1,16,48,64}" --out "$OUT/allreduce.json" >"$OUT/allreduce.log" 2>&1
        echo "=== allreduce: exit $? in $(( $(date +%s) - t0 )) s"
        grep -E '^(check|TP|batch)|Error|error' "$OUT/allreduce.log" | cut -c1-400 | tail -20
        t0=$(date +%s)
        timeout "${DECODE_TIMEOUT_S:-480}" python3 -m bench.tp_decode --tp "$TP" --layers "$LAYERS" \
            --kv-cache-dtype fp8_e4m3 --enable-shared-experts-fusion --enable-fused-qk-norm-rope \
            --enable-allreduce-fusion ${DECODE_ARGS:-} --out "$OUT/tp_decode_fused.json" >"$OUT/tp_decode_fused.log" 2>&1
        echo "=== decode with the fused all-reduce: exit $? in $(( $(date +%s) - t0 )) s"
        grep -E '^(TP|decode|prefill|one request|--)|Error|error' "$OUT/tp_decode_fused.log" | cut -c1-160 | tail -20
        ;;
    decode)
        timeout "${DECODE_TIMEOUT_S:-480}" python3 -m bench.tp_decode --tp "$TP" --layers "$LAYERS" \
            --kv-cache-dtype fp8_e4m3 --enable-shared-experts-fusion --enable-fused-qk-norm-rope \
            ${DECODE_ARGS:-} --out "$OUT/tp_decode.json" >"$OUT/tp_decode.log" 2>&1
        echo "=== decode: exit $? in $(( $(date +%s) - t0 )) s"
        grep -E '^(TP|decode|prefill|one request|--)|^ +[0-9.]+ us|Error|error' "$OUT/tp_decode.log" | cut -c1-160 \
            | tail -80
        ;;
    serving)
        LAYERS=$LAYERS PRESETS=optimized-tp4 RATES=${RATES:-7} NUMS=${NUMS:-210} \
            SERVER_WAIT_S=${SERVER_WAIT_S:-420} CLIENT_TIMEOUT_S=${CLIENT_TIMEOUT_S:-360} OUT=$OUT \
            bash bench/serving_gpu.sh 2>&1 | tail -45
        echo "=== serving: $(( $(date +%s) - t0 )) s"
        ;;
    prefill-repeat)
        for i in $(seq 1 "${PREFILL_RUNS:-2}"); do
            nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader \
                >"$OUT/prefill_clocks_$i.txt" 2>&1
            timeout "${DECODE_TIMEOUT_S:-480}" python3 -m bench.tp_decode --tp "$TP" --layers "$LAYERS" --batches 1 \
                --tpot-tokens 0 --kv-cache-dtype fp8_e4m3 --enable-shared-experts-fusion --enable-fused-qk-norm-rope \
                --profile ${DECODE_ARGS:-} --out "$OUT/prefill_repeat_$i.json" >"$OUT/prefill_repeat_$i.log" 2>&1
            echo "=== prefill run $i: exit $?; SM clocks $(cut -d, -f2 "$OUT/prefill_clocks_$i.txt" | tr -d ' MHz' \
                | paste -sd/)"
            grep -E '^prefill' "$OUT/prefill_repeat_$i.log" | cut -c1-160
            grep -A12 '^-- prefill ' "$OUT/prefill_repeat_$i.log" | cut -c1-160
        done
        echo "=== prefill-repeat: $(( $(date +%s) - t0 )) s"
        ;;
    seed)
        for run in ${SEED_RUNS:-baseline optimized optimized-suffix}; do
            common="--load-format dummy --kv-cache-dtype fp8_e4m3 --chunked-prefill-size 16384 --attention-backend triton"
            case "$run" in
            baseline) preset=baseline; tag=""; args="$common" ;;
            optimized) preset=optimized; tag=""; args="$common" ;;
            optimized-suffix) preset=optimized; tag=_suffix; args="$common --speculative-algorithm SUFFIX \
                --speculative-suffix-cache-max-depth 64 --speculative-suffix-max-spec-factor 1.0 \
                --speculative-suffix-min-token-prob 0.1" ;;
            *) echo "unknown seed run $run"; continue ;;
            esac
            LAYERS=$LAYERS PRESETS=$preset TAG=$tag SERVER_ARGS="$args" RATES=${SEED_RATE:-14} NUMS=${SEED_NUM:-420} \
                WARMUP_PROMPTS=${WARMUP_PROMPTS:-16} SERVER_WAIT_S=${SERVER_WAIT_S:-420} \
                CLIENT_TIMEOUT_S=${CLIENT_TIMEOUT_S:-360} OUT=$OUT bash bench/serving_gpu.sh 2>&1 | tail -40
        done
        echo "=== seed: $(( $(date +%s) - t0 )) s"
        ;;
    *) echo "unknown stage $stage"; exit 2 ;;
    esac
done

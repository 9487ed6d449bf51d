#!/usr/bin/env bash
# Host-bound prefill at the TP8 shard widths (issue #21 item 3): Triton's launch path against the direct launch of
# kernels/triton_launch.py in one device call. First the GPU tests with the direct launch on and every direct
# launch checked against Triton's own kernel selection (GLINT_LAUNCH_CHECK=1), then ROUNDS interleaved pairs of
# bench.engine runs (GLINT_FAST_LAUNCH=0 / 1, same tree) with --host-profile: prefill ms, host enqueue ms.
# Knobs: PY (bench/fa4_wheels.sh's venv for fa4), LAYERS (15), SHAPE (4096), TP (8), ROUNDS (2), CAP (s per run),
# TESTS (1: run the checked tests first).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/launch_ab_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}; LAYERS=${LAYERS:-15}; SHAPE=${SHAPE:-4096}; TP=${TP:-8}; ROUNDS=${ROUNDS:-2}; CAP=${CAP:-170}
if [ "${TESTS:-1}" = 1 ]; then
    GLINT_FAST_LAUNCH=1 GLINT_LAUNCH_CHECK=1 timeout 240 "$PY" -m pytest -q -x -m "gpu or not gpu" \
        -p no:cacheprovider tests/kernels/test_triton_launch.py tests/kernels/test_kernels_norm_act.py \
        tests/kernels/test_kernels_quant.py tests/kernels/test_kernels_moe_align.py \
        tests/kernels/test_kernels_moe_routing.py tests/kernels/test_kernels_fused_moe.py \
        2>&1 | tail -3
fi
shard="--heads $((96 / TP)) --kv-heads $(( 8 / TP > 0 ? 8 / TP : 1 )) --moe-intermediate $((1536 / TP))"
shard="$shard --intermediate $((12288 / TP))"
for r in $(seq "$ROUNDS"); do
    for fast in 0 1; do
        name="fast${fast}_r$r"
        # shellcheck disable=SC2086
        GLINT_FAST_LAUNCH=$fast timeout --kill-after=10 "$CAP" "$PY" -m bench.engine --device cuda \
            --layers "$LAYERS" --dense-layers 3 --no-hf --hf-layers 0 --batches 1 --prefill "$SHAPE" \
            --prefill-attention-backend fa4 --enable-shared-experts-fusion --enable-fused-qk-norm-rope $shard \
            --host-profile --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
        grep -E "^(prefill $SHAPE:|-- prefill)" "$OUT/$name.log" | sed "s/^/$name: /"
    done
done

#!/usr/bin/env bash
# Issue 21 item 3 in one device call: the whole prefill on the real-width model (27 layers on one H200, dummy FP8
# weights, both fusions) against its compute floor, with our Triton prefill attention and with the SDPA path
# (--prefill-attention-backend sdpa), at 4096 and 16384 tokens and for a 16384-token chunk after 4096 cached
# tokens; then the TP4 and TP8 shard widths emulated on one GPU (heads, KV heads, expert and dense widths cut by
# the TP size). Decode B=1/64 rides along in every run (must not get slower). Prints one table; JSON in $OUT.
# Knobs: LAYERS (27 where the GPU has 130+ GB, else 15), BACKENDS ("triton sdpa fa4"), CAP (seconds per bench.engine
# run; the first run on a fresh machine also compiles the Triton cache), SHARDS ("1 4 8"), SHAPES ("4096:0 16384:0
# 16384:4096": new:cached tokens), PY (the interpreter: bench/fa4_wheels.sh's venv for fa4), EXTRA (more bench.engine
# arguments: EXTRA=--profile SHARDS=8 SHAPES=16384:0 profiles the TP8 shard), SHARD_SHAPES (the shapes the TP4 / TP8
# shard widths run, of SHAPES: "16384:0"). SHARDS may also name "8rank" (rank 0 of TP8 built alone: the same
# widths through the TP code path, floors per rank) and "8ep" (that with --enable-expert-parallel: 20 experts whole).
# Backend "fa4paged": fa4 with its packed-K/V gather and its fresh-K/V prompts off (every step over the pages: the
# session-20 behaviour).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/prefill_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LAYERS=${LAYERS:-$(bash bench/fit_layers.sh)}
PY=${PY:-python3}; BACKENDS=${BACKENDS:-"triton sdpa"}; CAP=${CAP:-150}; SHARDS=${SHARDS:-"1 4 8"}
SHAPES=${SHAPES:-"4096:0 16384:0 16384:4096"}
SHARD_SHAPES=${SHARD_SHAPES:-"16384:0"}
EXTRA=${EXTRA:-}  # more bench.engine arguments, e.g. "--profile" (each run's full log: $OUT/<run>.log)
shard_args() {  # GLM-4.7: 96 heads / 8 KV heads, MoE expert width 1536, dense width 12288
    [ "$1" = 1 ] && return
    case "$1" in  # rank 0 of a TP group built alone (bench/emulated_rank.py), experts sliced / whole (EP)
        *rank) echo "--emulate-tp ${1%rank}"; return;;
        *ep) echo "--emulate-tp ${1%ep} --enable-expert-parallel"; return;;
    esac
    echo "--heads $((96 / $1)) --kv-heads $(( 8 / $1 > 0 ? 8 / $1 : 1 )) --moe-intermediate $((1536 / $1)) --intermediate $((12288 / $1))"
}
backend_args() {
    local paged="--fa4-gather-min-pairs 1000000000 --fa4-paged-prompts"
    [ "$1" = fa4paged ] && { echo "--prefill-attention-backend fa4 $paged"; return; }
    echo "--prefill-attention-backend $1"
}
for tp in $SHARDS; do
    for backend in $BACKENDS; do
        for shape in $SHAPES; do
            set -- ${shape/:/ }
            [ "$tp" != 1 ] && [[ " $SHARD_SHAPES " != *" $1:$2 "* ]] && continue  # shard widths: SHARD_SHAPES
            name="tp${tp}_${backend}_q$1_p$2"
            # shellcheck disable=SC2046
            timeout --kill-after=10 "$CAP" "$PY" -m bench.engine --device cuda --layers "$LAYERS" --dense-layers 3 \
                --no-hf --hf-layers 0 --batches 1,64 --prefill "$1" --prefill-prefix "$2" \
                $(backend_args "$backend") --enable-shared-experts-fusion --enable-fused-qk-norm-rope \
                $(shard_args "$tp") $EXTRA --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" \
                | grep -E "^(decode|prefill) " | sed "s/^/$name: /"
        done
    done
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
print(f"{'run':28} {'prefill ms':>10} {'eager ms':>9} {'floor ms':>9} {'x floor':>8} | {'decode B=1':>10} {'B=64':>8} (ms)")
for f in sorted(pathlib.Path(sys.argv[1]).glob("tp*.json")):
    r = json.loads(f.read_text())
    p, d = r.get("prefill", {}), {x["batch"]: x["step_ms"] for x in r.get("decode", [])}
    if p:
        # prefill ms: as the engine runs it (through the piecewise graphs up to their tokens); eager: without them
        print(f"{f.stem:28} {p['ms']:10.2f} {p.get('eager_ms', float('nan')):9.2f} {p['floor_ms']:9.2f} "
              f"{p['ratio_vs_floor']:8.2f} | "
              f"{d.get(1, float('nan')):10.3f} {d.get(64, float('nan')):8.3f}")
PY

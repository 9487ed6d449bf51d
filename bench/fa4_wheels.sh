#!/usr/bin/env bash
# flash-attn-4 (kernels/fa4_prefill.py, `--prefill-attention-backend fa4`) on the lent GPU machine, which does not
# have it. The tested set (session 20): flash-attn-4 4.0.0b19, nvidia-cutlass-dsl 4.5.2 (its libs-base wheel, 74 MB,
# holds the CuTe DSL and its compiler; the registry's 4.6+ libs-base wheels lack the `cutlass.cute` Python package,
# so `flash_attn.cute` does not import with them), quack-kernels 0.5.0, apache-tvm-ffi, torch-c-dlpack-ext, einops.
# One device call carries at most 64 MiB, so the set travels in two calls to the same warm machine (it is released
# after ~30 s idle: start the second call right after the first):
#
#   here:     bash bench/fa4_wheels.sh prepare     # downloads the set into .fa4a/ (first half of libs-base) and
#                                                  # .fa4b/ (second half + the small wheels); both git-ignored
#   device 1: bash bench/fa4_wheels.sh stage       # carry [".fa4a"]: keeps the first half in /tmp/fa4parts
#   device 2: eval "$(bash bench/fa4_wheels.sh install)"   # carry [".fa4b", ".whl_lite"]: a venv in /tmp/fa4env
#             $PY -m bench.fa4_prefill             # (PY and PYTHONPATH exported: torch from the image, the rest
#                                                  #  from the venv)
set -euo pipefail
cd "$(dirname "$0")/.."
LIBS=nvidia_cutlass_dsl_libs_base-4.5.2-cp312-cp312-manylinux_2_28_x86_64.whl
case "${1:-}" in
prepare)
    tmp=$(mktemp -d)
    plat=(--only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --no-deps)
    pip download -q "${plat[@]}" -d "$tmp" "flash-attn-4==4.0.0b19" "nvidia-cutlass-dsl==4.5.2" \
        "nvidia-cutlass-dsl-libs-base==4.5.2" "quack-kernels==0.5.0" "apache-tvm-ffi>=0.1.12,<0.2" \
        "torch-c-dlpack-ext" "einops"
    rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
    (cd "$tmp" && split -b 47M "$LIBS" libs.part. && md5sum "$LIBS" | cut -d' ' -f1 > libs.md5)
    mv "$tmp"/libs.part.aa .fa4a/ && mv "$tmp"/libs.part.ab "$tmp"/libs.md5 .fa4b/
    rm "$tmp/$LIBS" && mv "$tmp"/*.whl .fa4b/ && rmdir "$tmp"
    grep -qx '/.fa4a/' .git/info/exclude 2>/dev/null || printf '/.fa4a/\n/.fa4b/\n' >> .git/info/exclude
    du -sh .fa4a .fa4b
    ;;
stage)
    mkdir -p /tmp/fa4parts && cp .fa4a/libs.part.aa /tmp/fa4parts/ && ls -la /tmp/fa4parts >&2
    ;;
install)
    mkdir -p /tmp/fa4w
    cat /tmp/fa4parts/libs.part.aa .fa4b/libs.part.ab > "/tmp/fa4w/$LIBS"
    sum=$(md5sum "/tmp/fa4w/$LIBS" | cut -d' ' -f1)
    [ "$sum" = "$(cat .fa4b/libs.md5)" ] || { echo "libs-base: bad md5 (stage in the previous call?)" >&2; exit 1; }
    cp .fa4b/*.whl /tmp/fa4w/
    rm -rf /tmp/fa4env && python3 -m venv /tmp/fa4env
    /tmp/fa4env/bin/python -m pip install -q --no-index --no-deps --no-compile /tmp/fa4w/*.whl .whl_lite/*.whl >&2
    site=$(python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
    echo "export PY=/tmp/fa4env/bin/python PYTHONPATH=$PWD:$site PYTHONUNBUFFERED=1"
    ;;
*)
    echo "usage: bash bench/fa4_wheels.sh prepare|stage|install" >&2
    exit 2
    ;;
esac

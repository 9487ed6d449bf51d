#!/usr/bin/env bash
# flash-attn-4 (kernels/fa4_prefill.py, `--prefill-attention-backend fa4`) on the lent GPU machine, which does not
# have it. The tested set (session 20): flash-attn-4 4.0.0b19, nvidia-cutlass-dsl 4.5.2 (its libs-base wheel, 74 MB,
# holds the CuTe DSL and its compiler; the registry's 4.6+ libs-base wheels lack the `cutlass.cute` Python package,
# so `flash_attn.cute` does not import with them), quack-kernels 0.5.0, apache-tvm-ffi, torch-c-dlpack-ext, einops.
# One device call carries at most 64 MiB; the libs-base wheel alone is 71 MiB (zip deflate), so `prepare` unpacks it
# and packs it again as tar.xz (49 MiB; ~2.5 min of xz here), which with the small wheels (5 MiB) and the checkout
# (3 MiB) fits one call. Before session 24 it travelled in two halves over two calls, which needed the machine to stay
# warm between them (it is released after ~30 s idle) and lost the first half when it did not.
#
#   here:     bash bench/fa4_wheels.sh prepare     # downloads the set into .fa4/ (git-ignored)
#   device:   eval "$(bash bench/fa4_wheels.sh install)"   # carry [".fa4"]: a venv in /tmp/fa4env
#             $PY -m bench.fa4_prefill             # (PY and PYTHONPATH exported: torch from the image, the rest
#                                                  #  from the venv)
# The kernels and benchmarks need none of the server wheels (.whl_lite); carrying both passes the limit.
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
    rm -rf .fa4 .fa4a .fa4b && mkdir -p .fa4 "$tmp/libs"
    (cd "$tmp/libs" && unzip -q "../$LIBS")
    tar -C "$tmp/libs" -cf - . | xz -9e -T2 > .fa4/libs.tar.xz
    rm -rf "$tmp/libs" "$tmp/$LIBS" && mv "$tmp"/*.whl .fa4/ && rmdir "$tmp"
    grep -qx '/.fa4/' .git/info/exclude 2>/dev/null || echo '/.fa4/' >> .git/info/exclude
    du -sh .fa4
    ;;
install)
    rm -rf /tmp/fa4env && python3 -m venv /tmp/fa4env
    site=$(/tmp/fa4env/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter=\"tar\")" \
        .fa4/libs.tar.xz "$site"
    /tmp/fa4env/bin/python -m pip install -q --no-index --no-deps --no-compile .fa4/*.whl >&2
    if compgen -G ".whl_lite/*.whl" >/dev/null; then
        /tmp/fa4env/bin/python -m pip install -q --no-index --no-deps --no-compile .whl_lite/*.whl >&2
    fi
    torch_site=$(python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
    echo "export PY=/tmp/fa4env/bin/python PYTHONPATH=$PWD:$torch_site PYTHONUNBUFFERED=1"
    ;;
*)
    echo "usage: bash bench/fa4_wheels.sh prepare|install" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Fill the ignored .whl/ with what the servers, the router and NIXL need on the GPU machine (Python 3.12; it
# has torch, triton, transformers, numpy but no server stack), small enough to travel with the repo (64 MiB per
# device call): the server wheels from ../shared/device-wheels, llguidance, httpx (+ deps), and nixl-cu13 with
# its expert-parallel extension (nixl_ep_cu13/, 28 MB of the 59 MB wheel; glint does not use it) cut out.
# On the device: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#                export PYTHONPATH=/tmp/site:$PWD          (carry: [".whl"], or [".whl_lite", ".models"] below)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/device-wheels}
mkdir -p .git/info  # a fresh checkout may have none
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
for name in annotated_types fastapi msgspec opentelemetry_api prometheus_client pydantic pydantic_core pyzmq \
            starlette typing_inspection uvicorn; do
    cp "$SHARED"/"$name"-*.whl .whl/
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "nixl-cu13==1.5.1" llguidance httpx httpcore h11 anyio idna certifi 2>&1 | grep -v "^WARNING" || true
python3 - <<'PY'
import glob, os, zipfile
src = glob.glob(".whl/nixl_cu13-*.whl")[0]
tmp = src + ".full"
os.rename(src, tmp)
with zipfile.ZipFile(tmp) as zin, zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if info.filename.startswith("nixl_ep_cu13/"):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if not l.startswith(b"nixl_ep_cu13/"))
        zout.writestr(info, data, compress_type=info.compress_type)
os.remove(tmp)
PY
# .whl_lite/: the same without NIXL (7.6 MB), for calls that carry the trained model (.models/, 37 MB) too and
# need no KV transfer (the speculative and prefill benchmarks, the GPU tests): carry [".models", ".whl_lite"]
grep -qx '/.whl_lite/' .git/info/exclude 2>/dev/null || echo '/.whl_lite/' >> .git/info/exclude
rm -rf .whl_lite && mkdir -p .whl_lite && find .whl -name '*.whl' ! -name 'nixl*' -exec cp {} .whl_lite/ \;
du -sh .whl .whl_lite

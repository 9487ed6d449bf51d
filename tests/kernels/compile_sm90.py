"""Compile every Triton kernel for sm_90 (H100/H200) on a machine without a GPU, and print each kernel's
registers, spills and shared memory. Catches compile errors under the Triton version installed here (run it
with the GPU image's Triton too) at no device time.

    python tests/kernels/compile_sm90.py            # all kernels, real shapes
    python tests/kernels/compile_sm90.py quant moe  # only the named groups

It swaps Triton's active driver for a stub that reports an sm_90 target and turns every launch into a
compile-only warmup, then calls the wrappers on CPU tensors with the real shapes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _StubDriver:
    def __init__(self):
        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def set_current_device(self, d):
        pass

    def get_current_stream(self, d=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        return triton.testing.do_bench

    def is_active(self):
        return True


COMPILED: list[tuple[str, object]] = []
_orig_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    k = _orig_run(self, *args, grid=grid, warmup=True, **kwargs)
    COMPILED.append((self.fn.__name__, k))
    return k


def install() -> None:
    driver.set_active(_StubDriver())
    JITFunction.run = _compile_only
    # compile the PDL variants the GPU runs (grid dependency wait / launch_dependents); the stub's tensors
    # are CPU tensors, on which pdl_launch would turn it off. Before any kernel module takes the name.
    import kernels.triton_common as common

    common.pdl_launch = lambda device: dict(PDL=True, launch_pdl=True)


def resource_report() -> list[str]:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    lines = []
    seen = set()
    for name, k in COMPILED:
        if k is None or id(k) in seen:
            continue
        seen.add(id(k))
        md = k.metadata
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
        usage = " ".join(line.strip() for line in res.splitlines() if "REG" in line)
        mma = "QGMMA" if "QGMMA" in sass else "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else "-"
        cfg = f"w{md.num_warps} s{md.num_stages}"
        lines.append(f"{name:34s} {cfg:7s} smem={md.shared:6d} mma={mma:5s} {usage}")
    return lines


if __name__ == "__main__":
    install()
    sys.path.insert(0, os.path.dirname(__file__))
    from compile_cases import run_cases

    failed = run_cases(sys.argv[1:])
    for line in resource_report():
        print(line)
    print(f"{len(COMPILED)} launches compiled, {len(failed)} groups failed: {failed}")
    sys.exit(1 if failed else 0)

"""Unquantized (bf16) expert weights must not select a fused-MoE variant too large for a Hopper block's shared
memory. The FP8-sized configs at more than 2048 tokens (128 x 256 x 128 down tiles, 3 stages) need 288 KiB in
bf16: Triton raised OutOfResources on the GPU (the kernel warm-up's first 4096-token step of the tiny bf16
checkpoint, session 14). Compiled for sm_90 on this machine (tests/kernels/compile_sm90.py's stub driver), in a
subprocess so that its stub stays out of this one."""
from __future__ import annotations

from kernel_helpers import compile_sm90


def test_bf16_moe_variants_fit_in_shared_memory():
    out = compile_sm90("moe_bf16")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "moe bf16 + fp32: " in out.stdout and "largest shared memory" in out.stdout

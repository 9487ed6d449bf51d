"""A serving step's token count must not select a new compiled kernel variant. Triton keys its compile cache on
whether each int argument is divisible by 16, so without `token_counts(...)` (kernels/triton_common.py) a mixed
step of 8207 tokens after one of 8208 recompiles the GEMM, MoE, routing, alignment and RoPE kernels -- seconds of
stall inside serving (the colocated runs of bench/RESULTS.md, session 13). Compiled for sm_90 on this machine
(no GPU: tests/kernels/compile_sm90.py's stub driver), in a subprocess so that its stub stays out of this one."""
from __future__ import annotations

from kernel_helpers import compile_sm90


def test_a_token_count_of_another_alignment_compiles_no_new_variant():
    out = compile_sm90("token_counts")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "token counts 8208 / 8207: no new variants of" in out.stdout
    assert "_moe_gate_up_kernel" in out.stdout and "_fp8_gemm_kernel" in out.stdout
    assert "_extend_kernel" in out.stdout and "_verify_kernel" in out.stdout and "_decode_kernel" in out.stdout

"""Triton SwiGLU: silu(gate) * up over a fused [.., 2I] input (gate half first), as kernels/activation.py.

Reproduces the reference's roundings (silu rounded to the input dtype, then the product rounded). Optionally
quantizes the result per token to FP8 E4M3 in the same pass (for the following FP8 down projection).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import (
    cdiv, fp8_row_outputs, next_pow2, pdl_launch, pdl_release, pdl_wait, round_bf16, to_fp8, to_out,
)


@triton.jit
def _swiglu(row_ptr, c, m, I, X_BF16: tl.constexpr):
    """silu(gate) * up of columns c of one row (gate at row_ptr, up at row_ptr + I), rounded as the reference:
    silu to the input dtype, then the product (returned in the input dtype)."""
    g = tl.load(row_ptr + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(row_ptr + I + c, mask=m, other=0.0).to(tl.float32)
    s = g / (1.0 + tl.exp(-g))
    if X_BF16:
        s = round_bf16(s)
    else:
        s = s.to(row_ptr.dtype.element_ty).to(tl.float32)
    return to_out(s * u, row_ptr.dtype.element_ty)


@triton.jit
def _silu_mul_kernel(
    x_ptr, y_ptr, q_ptr, qs_ptr, I, stride_x, stride_y, stride_q,
    BLOCK: tl.constexpr, QUANT: tl.constexpr, X_BF16: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    # QUANT: one program per row walks the whole row twice (amax, then quantize); else one block per program
    n_iter = tl.cdiv(I, BLOCK) if QUANT else 1
    for it in range(0, n_iter):
        c = col0 + it * BLOCK + offs
        m = c < I
        yo = _swiglu(x_ptr + row * stride_x, c, m, I, X_BF16)
        tl.store(y_ptr + row * stride_y + c, yo, mask=m)
        if QUANT:
            amax = tl.maximum(amax, tl.abs(yo.to(tl.float32)))
    if QUANT:
        scale = tl.maximum(tl.max(amax, 0) / 448.0, 1e-12)
        for it in range(0, n_iter):
            c = it * BLOCK + offs
            m = c < I
            yv = tl.load(y_ptr + row * stride_y + c, mask=m, other=0.0).to(tl.float32)
            q = tl.clamp(yv / scale, -448.0, 448.0)
            tl.store(q_ptr + row * stride_q + c, to_fp8(q), mask=m)
        tl.store(qs_ptr + row, scale)


def _launch(x: torch.Tensor, quant: bool):
    shape = x.shape
    two_i = shape[-1]
    i = two_i // 2
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    t = x2.shape[0]
    y = torch.empty(t, i, dtype=x.dtype, device=x.device)
    q, qs = fp8_row_outputs(t, i, x.device) if quant else (None, None)
    if t:
        block = min(next_pow2(i), 2048 if quant else 1024)
        grid = (t, 1 if quant else cdiv(i, block))
        _silu_mul_kernel[grid](
            x2, y, q if quant else y, qs if quant else y, i, x2.stride(0), y.stride(0), q.stride(0) if quant else 0,
            BLOCK=block, QUANT=quant, X_BF16=x.dtype == torch.bfloat16, num_warps=4, enable_fp_fusion=False,
            **pdl_launch(x.device),
        )
    return y.view(*shape[:-1], i), q, qs


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    return _launch(x, False)[0]


def silu_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [T, 2I] -> (y [T, I] in x.dtype, y_fp8 [T, I], y_scale fp32 [T, 1]) with y_fp8 = per-token quant of y."""
    return _launch(x, True)


__all__ = ["silu_mul", "silu_mul_fp8"]

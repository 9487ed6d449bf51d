"""Triton RMSNorm and fused residual-add + RMSNorm (HF Glm4MoeRMSNorm semantics, as kernels/norm.py).

One program per row. The roundings of the torch reference are reproduced: x + residual rounded to x's dtype,
the normalized row rounded to x's dtype, then one rounding of weight * normalized to the output dtype.
Optionally the normalized output is also quantized per token to FP8 E4M3 (for a following FP8 linear).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import (
    fp8_row_outputs, next_pow2, pdl_launch, pdl_release, pdl_wait, round_bf16, to_fp8, to_out,
)


@triton.jit
def normalize_and_store(
    x, row, offs, m, w_ptr, y_ptr, q_ptr, qs_ptr, H, eps, stride_y, stride_q,
    QUANT: tl.constexpr, X_BF16: tl.constexpr, X_DTYPE: tl.constexpr,
):
    """Store rms_norm(x) (x: one fp32 row holding values of dtype X_DTYPE) to y's row, and its per-token FP8
    quantization when QUANT. Shared with the fused all-reduce (kernels/triton_allreduce.py)."""
    var = tl.sum(x * x, 0) / H
    n = x * tl.rsqrt(var + eps)
    if X_BF16:
        n = round_bf16(n)
    else:
        n = n.to(X_DTYPE).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = w * n
    yo = to_out(y, y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + offs, yo, mask=m)
    if QUANT:
        yf = yo.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(yf), 0) / 448.0, 1e-12)
        q = tl.clamp(yf / scale, -448.0, 448.0)
        tl.store(q_ptr + row * stride_q + offs, to_fp8(q), mask=m)
        tl.store(qs_ptr + row, scale)


@triton.jit
def add_residual_and_store(x, r_ptr, s_ptr, row, offs, m, stride_r, stride_s, X_BF16: tl.constexpr):
    """x + the residual's row, rounded to the inputs' dtype as torch's add would, stored to s's row and returned
    (fp32). Shared with the fused all-reduce (kernels/triton_allreduce.py)."""
    x = x + tl.load(r_ptr + row * stride_r + offs, mask=m, other=0.0).to(tl.float32)
    if X_BF16:
        x = round_bf16(x)
    tl.store(s_ptr + row * stride_s + offs, to_out(x, s_ptr.dtype.element_ty), mask=m)
    return x


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, q_ptr, qs_ptr,
    H, eps, stride_x, stride_r, stride_y, stride_s, stride_q,
    HAS_RES: tl.constexpr, QUANT: tl.constexpr, X_BF16: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x = add_residual_and_store(x, r_ptr, s_ptr, row, offs, m, stride_r, stride_s, X_BF16)
    normalize_and_store(x, row, offs, m, w_ptr, y_ptr, q_ptr, qs_ptr, H, eps, stride_y, stride_q,
                        QUANT, X_BF16, x_ptr.dtype.element_ty)


def _rows(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1]
    x2 = x.reshape(-1, h)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _launch(x, residual, weight, eps, quant):
    shape = x.shape
    h = shape[-1]
    x2 = _rows(x)
    t = x2.shape[0]
    out_dtype = torch.result_type(weight, x)
    y = torch.empty(t, h, dtype=out_dtype, device=x.device)
    s = r2 = None
    if residual is not None:
        r2 = _rows(residual)
        s = torch.empty(t, h, dtype=x.dtype, device=x.device)
    q, qs = fp8_row_outputs(t, h, x.device) if quant else (None, None)
    if t:
        block = next_pow2(h)
        nw = 1 if block <= 256 else 4 if block <= 2048 else 8
        _rms_norm_kernel[(t,)](
            x2, r2 if r2 is not None else x2, weight, y, s if s is not None else y, q if quant else y,
            qs if quant else y, h, eps, x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0),
            s.stride(0) if s is not None else 0, q.stride(0) if quant else 0,
            HAS_RES=residual is not None, QUANT=quant, X_BF16=x.dtype == torch.bfloat16, BLOCK=block,
            num_warps=nw, enable_fp_fusion=False, **pdl_launch(x.device),
        )
    y = y.view(shape)
    if s is not None:
        s = s.view(shape)
    return y, s, q, qs


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps, False)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y, s, _, _ = _launch(x, residual, weight, eps, False)
    return y, s


def rms_norm_fp8(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Returns (y, x + residual or None, y_fp8 [T, H], y_scale fp32 [T, 1]) for 2-D x; y_fp8 is y quantized
    per token exactly as quant_fp8_per_token_ref(y) would."""
    return _launch(x, residual, weight, eps, True)


__all__ = ["rms_norm", "add_rms_norm", "rms_norm_fp8"]

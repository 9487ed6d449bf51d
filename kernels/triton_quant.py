"""Triton FP8 E4M3 activation quantization: per token (scale [T, 1]) and per 1 x group (scale [T, K/group]).

Same math as kernels/quant.py: scale = max(amax / 448, 1e-12), q = clamp(x / scale, +-448) rounded to
nearest even. Rows may be strided (last dim contiguous).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import (
    FP8_MAX, MIN_SCALE, cdiv, next_pow2, pdl_launch, pdl_release, pdl_wait, to_fp8,
)

FP8_DTYPE = torch.float8_e4m3fn
ROW_ELEMENTS = 4096  # elements per program of the per-token kernel, in whole rows


@triton.jit
def _quant_row_kernel(
    x_ptr, q_ptr, s_ptr, T, K, stride_x, stride_q,
    BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, ROWS: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    offs = tl.arange(0, BLOCK)
    if ONE_PASS:  # ROWS whole rows per program (short rows: the MoE's act at N = 192 / 384)
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rm = rows < T
        m = rm[:, None] & (offs[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=m, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), 1) / 448.0, 1e-12)
        q = tl.clamp(x / scale[:, None], -448.0, 448.0)
        tl.store(q_ptr + rows[:, None] * stride_q + offs[None, :], to_fp8(q), mask=m)
        tl.store(s_ptr + rows, scale, mask=rm)
    else:
        row = tl.program_id(0).to(tl.int64)
        xr = x_ptr + row * stride_x
        qr = q_ptr + row * stride_q
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            m = k0 + offs < K
            x = tl.load(xr + k0 + offs, mask=m, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, 0) / 448.0, 1e-12)
        for k0 in range(0, K, BLOCK):
            m = k0 + offs < K
            x = tl.load(xr + k0 + offs, mask=m, other=0.0).to(tl.float32)
            q = tl.clamp(x / scale, -448.0, 448.0)
            tl.store(qr + k0 + offs, to_fp8(q), mask=m)
        tl.store(s_ptr + row, scale)


@triton.jit
def _quant_group_kernel(
    x_ptr, q_ptr, s_ptr, K, NG, stride_x, stride_q, stride_s,
    GROUP: tl.constexpr, GPB: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    g0 = tl.program_id(1) * GPB
    gi = g0 + tl.arange(0, GPB)
    ci = tl.arange(0, GROUP)
    cols = gi[:, None] * GROUP + ci[None, :]
    m = (gi[:, None] < NG) & (cols < K)
    x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 1) / 448.0, 1e-12)
    q = tl.clamp(x / scale[:, None], -448.0, 448.0)
    tl.store(q_ptr + row * stride_q + cols, to_fp8(q), mask=m)
    tl.store(s_ptr + row * stride_s + gi, scale, mask=gi < NG)


def quant_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] -> (x_fp8 [T, K], scale fp32 [T, 1])."""
    assert x.dim() == 2 and x.stride(1) == 1
    t, k = x.shape
    q = torch.empty(t, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(t, 1, dtype=torch.float32, device=x.device)
    if t == 0:
        return q, s
    block = min(next_pow2(k), 8192)
    one_pass = block >= k
    # short rows share a program (one program per row of 192 took 56 us for the MoE act of 4K tokens, H100)
    rows = max(1, ROW_ELEMENTS // block) if one_pass else 1
    nw = 4 if rows * block <= 2048 else 8
    _quant_row_kernel[(cdiv(t, rows),)](x, q, s, t, k, x.stride(0), q.stride(0), BLOCK=block, ONE_PASS=one_pass,
                                        ROWS=rows, num_warps=nw, **pdl_launch(x.device))
    return q, s


def quant_fp8_per_group(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] -> (x_fp8 [T, K], scale fp32 [T, ceil(K / group)]). A partial last group is quantized as if
    zero-padded (what the block-FP8 reference does after padding K)."""
    assert x.dim() == 2 and x.stride(1) == 1
    t, k = x.shape
    ng = cdiv(k, group)
    q = torch.empty(t, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(t, ng, dtype=torch.float32, device=x.device)
    if t == 0:
        return q, s
    gpb = min(next_pow2(ng), max(1, 2048 // group))
    _quant_group_kernel[(t, cdiv(ng, gpb))](
        x, q, s, k, ng, x.stride(0), q.stride(0), s.stride(0), GROUP=group, GPB=gpb, num_warps=4,
        **pdl_launch(x.device),
    )
    return q, s


__all__ = ["quant_fp8_per_token", "quant_fp8_per_group", "FP8_MAX", "MIN_SCALE"]

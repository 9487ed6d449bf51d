"""The fused MoE's large-prefill path through cuBLAS's FP8 grouped GEMM (`torch._scaled_grouped_mm`), FP8 per
channel only. At the TP1 expert width (I = 1536) and >= 4096 tokens cuBLAS's grouped GEMMs ran ~1.5x faster than
our Triton gate_up / down kernels (bench/RESULTS.md, session 18); at narrower experts ours win, so the launch
config turns this on per (E, N, token bucket): key GROUPED_MM.

  1. pairs sorted by expert (kernels/triton_moe_align.py), each expert's run padded to BLOCK_M rows
  2. gather: x (quantized per token) copied into that row order, padding rows zero; group ends per expert
  3. y1 = x_sorted @ w13[e]^T per group (bf16 out), SwiGLU + per-row FP8 quant (kernels/triton_activation.py)
  4. y2 = act @ w2[e]^T per group (bf16 out, sorted rows)
  5. out[t] = sum_j w[t, j] * y2[row of pair t*k + j] in fp32 (a row map inverts the sort)

Rows past the last expert's run (the align step bounds the block count without a host sync) are neither
computed by the grouped GEMMs nor read by the sum. The roundings follow the reference (kernels/fused_moe.py): bf16
linear outputs, silu rounded, product rounded, per-row FP8 quant of the activation. Off CUDA the grouped GEMM is
a per-group torch matmul with the same roundings (the CPU interpreter tests run the whole path)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_activation import silu_mul_fp8
from kernels.triton_common import cdiv, pdl_launch, pdl_release, pdl_wait, to_out, token_counts
from kernels.triton_moe_align import moe_align
from kernels.triton_quant import quant_fp8_per_token


def available(device: torch.device) -> bool:
    """Whether the grouped GEMM can run here (CUDA with torch's FP8 grouped GEMM, or the CPU reference)."""
    return device.type != "cuda" or hasattr(torch, "_scaled_grouped_mm")


@triton.jit(**token_counts("NP"))
def _gather_rows_kernel(
    x_ptr, xs_ptr, sorted_ptr, out_ptr, outs_ptr, NP, TOPK, H, stride_x, stride_o,
    ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """ROWS sorted rows per program: x[token of the row's pair] and its scale; padding rows zeros, scale 1."""
    pdl_wait(PDL)
    pdl_release(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    pair = tl.load(sorted_ptr + rows)
    valid = pair < NP
    tok = tl.where(valid, pair // TOPK, 0).to(tl.int64)
    tl.store(outs_ptr + rows, tl.load(xs_ptr + tok, mask=valid, other=1.0))
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mh = h < H
        v = tl.load(x_ptr + tok[:, None] * stride_x + h[None, :], mask=valid[:, None] & mh[None, :], other=0.0)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + h[None, :], v, mask=mh[None, :])


@triton.jit
def _mapped_reduce_kernel(
    y_ptr, map_ptr, w_ptr, out_ptr, H, stride_ym, stride_wt, stride_ot,
    TOPK: tl.constexpr, BLOCK_H: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """out[t] = sum_j w[t, j] * y[map[t * TOPK + j]] in fp32 (rank order of j: deterministic)."""
    pdl_wait(PDL)
    pdl_release(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        w = tl.load(w_ptr + t * stride_wt + j)
        row = tl.load(map_ptr + t * TOPK + j).to(tl.int64)
        acc += tl.load(y_ptr + row * stride_ym + h, mask=m, other=0.0).to(tl.float32) * w
    tl.store(out_ptr + t * stride_ot + h, to_out(acc, out_ptr.dtype.element_ty), mask=m)


def group_ends(block_expert: torch.Tensor, num_experts: int, block_m: int) -> torch.Tensor:
    """int32 [E]: the end row of each expert's run in sorted order (cumulative; an expert without pairs repeats
    the previous end), from the align step's block -> expert map (-1 past the last block). No host sync."""
    blocks = torch.zeros(num_experts + 1, dtype=torch.int32, device=block_expert.device)
    blocks.scatter_add_(0, (block_expert.long() + 1), torch.ones_like(block_expert, dtype=torch.int32))
    return (blocks[1:].cumsum(0) * block_m).to(torch.int32)


def grouped_mm_fp8(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                   ends: torch.Tensor) -> torch.Tensor:
    """a [rows, K] FP8 with per-row scales [rows]; w [E, N, K] FP8 with per-channel scales [E, N]; group e is rows
    ends[e-1]..ends[e]. -> bf16 [rows, N] (rows past ends[-1]: not written)."""
    if a.device.type == "cuda":
        return torch._scaled_grouped_mm(a, w.transpose(1, 2), a_scale, w_scale, offs=ends,
                                        out_dtype=torch.bfloat16)
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.bfloat16, device=a.device)
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            prod = a[start:end].float() @ w[e].float().t()
            out[start:end] = (prod * a_scale[start:end, None] * w_scale[e][None, :]).to(torch.bfloat16)
        start = end
    return out


def fused_moe_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor, block_m: int,
                      x_fp8: torch.Tensor | None = None, x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """kernels.triton_moe.fused_moe's contract (FP8 per channel): x [T, H] -> [T, H] in x.dtype."""
    t, h = x.shape
    e, two_i, _ = w13.shape
    topk = topk_ids.shape[1]
    np_ = t * topk
    if block_m % 16:
        raise ValueError(f"the grouped GEMM needs groups of 16-row multiples, got BLOCK_M={block_m}")
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    sorted_ids, bexp = moe_align(ids, e, block_m)
    rows = bexp.numel() * block_m
    if x_fp8 is None:
        x_fp8, x_scale = quant_fp8_per_token(x)
    xs = x_scale.reshape(-1)
    a = torch.empty(rows, h, dtype=x_fp8.dtype, device=x.device)
    a_scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    gather_rows = 16
    _gather_rows_kernel[(rows // gather_rows,)](
        x_fp8, xs, sorted_ids, a, a_scale, np_, topk, h, x_fp8.stride(0), a.stride(0),
        ROWS=gather_rows, BLOCK_H=512, num_warps=4, **pdl_launch(x.device),
    )
    ends = group_ends(bexp, e, block_m)
    y1 = grouped_mm_fp8(a, a_scale, w13, w13_scale.reshape(e, two_i), ends)
    _, act, act_scale = silu_mul_fp8(y1)
    y2 = grouped_mm_fp8(act, act_scale.reshape(-1), w2, w2_scale.reshape(e, h), ends)
    row_of = torch.empty(np_ + 1, dtype=torch.int32, device=x.device)  # slot np_ takes every padding row
    row_of.scatter_(0, sorted_ids.long(), torch.arange(rows, dtype=torch.int32, device=x.device))
    tw = topk_weights if topk_weights.stride(1) == 1 else topk_weights.contiguous()
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    bh = 1024
    _mapped_reduce_kernel[(t, cdiv(h, bh))](
        y2, row_of, tw, out, h, y2.stride(0), tw.stride(0), out.stride(0), TOPK=topk, BLOCK_H=bh, num_warps=4,
        **pdl_launch(x.device),
    )
    return out


__all__ = ["available", "fused_moe_grouped", "group_ends", "grouped_mm_fp8"]

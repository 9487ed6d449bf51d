"""Row bookkeeping of the fused MoE: the expert segments of the sorted (token, slot) pairs for the unpadded
grouped-GEMM path (kernels/fused_moe_quack.py), and the top-k sum back in token order that both paths end with
(rows in pair order for the Triton kernels, through the pair -> row map for the unpadded path)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import cdiv, pdl_launch, pdl_release, pdl_wait, to_out, token_counts
from kernels.triton_moe_align import moe_align

SEGMENT_ROWS = 1024
REDUCE_BLOCK_H = 1024


@triton.jit(**token_counts("NP"))
def _segment_rows_kernel(
    sorted_ptr, xs_ptr, tok_ptr, rs_ptr, row_of_ptr, NP, TOPK,
    ROWS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Per sorted row r: its token (pair // TOPK), that token's x scale, and row_of[pair] = r."""
    pdl_wait(PDL)
    pdl_release(PDL)
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    m = r < NP
    pair = tl.load(sorted_ptr + r, mask=m, other=0)
    tok = pair // TOPK
    tl.store(tok_ptr + r, tok, mask=m)
    tl.store(rs_ptr + r, tl.load(xs_ptr + tok, mask=m, other=1.0), mask=m)
    tl.store(row_of_ptr + pair, r, mask=m)


@triton.jit
def _topk_sum_kernel(
    y_ptr, row_of_ptr, w_ptr, out_ptr, H, stride_ym, stride_wt, stride_ot,
    TOPK: tl.constexpr, BLOCK_H: tl.constexpr, MAPPED: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """out[t] = sum_j w[t, j] * y[row of pair t * TOPK + j] in fp32 (rank order of j: deterministic); the row is
    row_of[pair] when MAPPED, else the pair itself."""
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        w = tl.load(w_ptr + t * stride_wt + j)
        if MAPPED:
            row = tl.load(row_of_ptr + t * TOPK + j).to(tl.int64)
        else:
            row = t * TOPK + j
        acc += tl.load(y_ptr + row * stride_ym + h, mask=m, other=0.0).to(tl.float32) * w
    tl.store(out_ptr + t * stride_ot + h, to_out(acc, out_ptr.dtype.element_ty), mask=m)


def expert_segments(topk_ids: torch.Tensor, num_experts: int, x_scale: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (cu_seqlens int32 [E + 1], token of each sorted row int32 [P], its x scale fp32 [P],
    sorted row of each pair int32 [P]); P = T * k, rows sorted by expert. No host sync."""
    topk = topk_ids.shape[1]
    np_ = topk_ids.numel()
    dev = topk_ids.device
    sorted_ids, row_expert = moe_align(topk_ids, num_experts, 1)  # BLOCK_M = 1: exactly P rows, no padding
    bounds = torch.arange(num_experts + 1, dtype=row_expert.dtype, device=dev)
    cu_seqlens = torch.searchsorted(row_expert, bounds, out_int32=True)  # row_expert is sorted
    tok = torch.empty(np_, dtype=torch.int32, device=dev)
    row_scale = torch.empty(np_, dtype=torch.float32, device=dev)
    row_of = torch.empty(np_, dtype=torch.int32, device=dev)
    _segment_rows_kernel[(cdiv(np_, SEGMENT_ROWS),)](
        sorted_ids, x_scale, tok, row_scale, row_of, np_, topk, ROWS=SEGMENT_ROWS, num_warps=4, **pdl_launch(dev),
    )
    return cu_seqlens, tok, row_scale, row_of


def topk_sum(y: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor, row_of: torch.Tensor | None = None
             ) -> torch.Tensor:
    """out [T, H] <- sum_j topk_weights[t, j] * y[row of pair t * k + j] (fp32 sum, j in rank order); y [rows, H]
    holds pair p at row_of[p] (the unpadded path's sorted rows), or at row p when row_of is None (pair order)."""
    t, h = out.shape
    if t == 0:
        return out
    tw = topk_weights if topk_weights.stride(1) == 1 else topk_weights.contiguous()
    _topk_sum_kernel[(t, cdiv(h, REDUCE_BLOCK_H))](
        y, y if row_of is None else row_of, tw, out, h, y.stride(0), tw.stride(0), out.stride(0), TOPK=tw.shape[1],
        BLOCK_H=REDUCE_BLOCK_H, MAPPED=row_of is not None, num_warps=4, **pdl_launch(out.device),
    )
    return out


__all__ = ["expert_segments", "topk_sum"]

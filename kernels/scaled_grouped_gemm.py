"""The scaled FP8 grouped GEMM's contract, argument checks and torch reference (no GPU library needed).

    out[r, n] = bf16( (sum_k a[idx[r], k] * w[e, n, k]) * row_scale[r] * col_scale[e, n] )  for r in group e

Group e is the output rows cu_seqlens[e] .. cu_seqlens[e + 1] (an expert without rows: an empty group); idx[r] is
a_idx[r] when given (A rows gathered by index), else r. The fused MoE's QuACK path (kernels/fused_moe_quack.py)
runs it on Hopper through kernels/quack_grouped_gemm.py and off CUDA through `scaled_grouped_gemm_ref`, so its
CPU tests run the whole path with the same layouts and checks.
"""
from __future__ import annotations

import torch


def check_args(a: torch.Tensor, w: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
               cu_seqlens: torch.Tensor, out: torch.Tensor, a_idx: torch.Tensor | None) -> None:
    """The layout the compiled kernel assumes (16-byte aligned rows, K-contiguous FP8, fp32 scales, int32 indices);
    ValueError / TypeError naming the first argument that does not fit."""
    groups, n, k = w.shape
    rows = out.shape[0]
    if a.dtype != torch.float8_e4m3fn or w.dtype != torch.float8_e4m3fn:
        raise TypeError(f"a and w must be float8_e4m3fn, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or a.shape[1] != k or a.stride(1) != 1 or w.stride(2) != 1:
        raise ValueError(f"a [*, {k}] and w [E, N, {k}] must be K-contiguous, got a {tuple(a.shape)}")
    if k % 16 or a.stride(0) % 16 or w.stride(1) % 16 or w.stride(0) % 16:
        raise ValueError(f"a's and w's rows must be 16-byte aligned (K = {k})")
    if out.dtype != torch.bfloat16 or out.dim() != 2 or out.shape[1] != n or out.stride(1) != 1 or out.stride(0) % 8:
        raise ValueError(f"out must be bf16 [rows, {n}] with 16-byte aligned rows, got {tuple(out.shape)}")
    if row_scale.dtype != torch.float32 or tuple(row_scale.shape) != (rows,) or row_scale.stride(0) != 1:
        raise ValueError(f"row_scale must be contiguous fp32 [{rows}], got {tuple(row_scale.shape)}")
    if col_scale.dtype != torch.float32 or tuple(col_scale.shape) != (groups, n) or col_scale.stride(1) != 1:
        raise ValueError(f"col_scale must be fp32 [{groups}, {n}] with contiguous rows, got {tuple(col_scale.shape)}")
    if cu_seqlens.dtype != torch.int32 or tuple(cu_seqlens.shape) != (groups + 1,) or not cu_seqlens.is_contiguous():
        raise ValueError(f"cu_seqlens must be contiguous int32 [{groups + 1}], got {tuple(cu_seqlens.shape)}")
    if a_idx is None and a.shape[0] != rows:
        raise ValueError(f"without a_idx, a has one row per output row ({rows}), got {a.shape[0]}")
    if a_idx is not None and (a_idx.dtype != torch.int32 or tuple(a_idx.shape) != (rows,) or a_idx.stride(0) != 1):
        raise ValueError(f"a_idx must be contiguous int32 [{rows}]")


def scaled_grouped_gemm_ref(a: torch.Tensor, w: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                            cu_seqlens: torch.Tensor, out: torch.Tensor, a_idx: torch.Tensor | None = None,
                            tile: object = None) -> torch.Tensor:
    """The module formula in fp32 matmuls per group, one bf16 rounding (`tile` is accepted and ignored)."""
    check_args(a, w, row_scale, col_scale, cu_seqlens, out, a_idx)
    bounds = cu_seqlens.tolist()
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        rows = a[a_idx[lo:hi].long()] if a_idx is not None else a[lo:hi]
        acc = rows.float() @ w[e].float().t()
        out[lo:hi] = (acc * row_scale[lo:hi, None] * col_scale[e][None, :]).to(out.dtype)
    return out


__all__ = ["check_args", "scaled_grouped_gemm_ref"]

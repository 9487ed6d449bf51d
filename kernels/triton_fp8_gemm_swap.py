"""Triton FP8 GEMM for decode-sized M (<= 16 tokens), "swap AB": y^T[N, M] = w[N, K] @ x[M, K]^T.

At M <= 16 the tensor-core GEMM (kernels/triton_fp8_gemm.py) gives the MMA a 16-row token tile, below Hopper's
64-row warpgroup MMA. Here the weight rows are the MMA's M side (64 or 128 of them) and the tokens its N side
(16), so each MMA is full and the weights stream through the wgmma pipeline. Both operands stay K-major, as
FP8 wgmma requires. Channel scales only (per-token x_scale [M, 1], per-channel w_scale [N, 1]), applied in
the epilogue; split-K as in triton_fp8_gemm (fp32 partials, a self-resetting ticket per weight tile, the last
split sums the partials in split order).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import cdiv, dot_operand, next_pow2, to_out, zeroed_counters

MAX_M = 16


@triton.jit
def _fp8_gemm_swap_kernel(
    x_ptr, w_ptr, c_ptr, xs_ptr, ws_ptr, bias_ptr, part_ptr, cnt_ptr,
    M, N, K, SPLIT_K, stride_xm, stride_wn, stride_cm, stride_xsm,
    BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_w = tl.program_id(0)
    pid_k = tl.program_id(1)
    rw = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    mw = rw < N
    rw_c = tl.where(mw, rw, 0).to(tl.int64)
    rt = tl.arange(0, BLOCK_T)
    mt = rt < M
    rt_c = tl.where(mt, rt, 0).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)

    k_iters = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_iters, SPLIT_K)
    k_begin = pid_k * per_split
    k_end = tl.minimum(k_begin + per_split, k_iters)

    w_rows = w_ptr + rw_c[:, None] * stride_wn
    x_cols = x_ptr + rt_c[None, :] * stride_xm
    acc = tl.zeros([BLOCK_W, BLOCK_T], dtype=tl.float32)
    for ki in range(k_begin, k_end):
        k = ki * BLOCK_K + rk
        if EVEN_K:
            w = tl.load(w_rows + k[None, :])
            xt = tl.load(x_cols + k[:, None])
        else:
            w = tl.load(w_rows + k[None, :], mask=k[None, :] < K, other=0.0)
            xt = tl.load(x_cols + k[:, None], mask=k[:, None] < K, other=0.0)
        # fp32 sum across K tiles (the FP8 MMA accumulator alone keeps ~14 mantissa bits)
        acc += tl.dot(dot_operand(w), dot_operand(xt))

    c_ptrs = c_ptr + rt_c[None, :] * stride_cm + rw[:, None]  # y^T tile -> y: contiguous along the weight rows
    cmask = mw[:, None] & mt[None, :]
    if SPLIT:
        offs = tl.arange(0, BLOCK_W)[:, None] * BLOCK_T + tl.arange(0, BLOCK_T)[None, :]
        tile = part_ptr + (pid_w * SPLIT_K).to(tl.int64) * (BLOCK_W * BLOCK_T)
        tl.store(tile + pid_k * (BLOCK_W * BLOCK_T) + offs, acc)
        tl.debug_barrier()  # every thread's partial stores precede the ticket (release)
        ticket = tl.atomic_add(cnt_ptr + pid_w, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_W, BLOCK_T], dtype=tl.float32)
            for s in range(0, SPLIT_K):
                acc += tl.load(tile + s * (BLOCK_W * BLOCK_T) + offs, cache_modifier=".cg")
            y = acc * tl.load(ws_ptr + rw_c)[:, None] * tl.load(xs_ptr + rt_c * stride_xsm)[None, :]
            if HAS_BIAS:
                y += tl.load(bias_ptr + rw_c).to(tl.float32)[:, None]
            tl.store(c_ptrs, to_out(y, c_ptr.dtype.element_ty), mask=cmask)
            tl.atomic_xchg(cnt_ptr + pid_w, 0)
    else:
        y = acc * tl.load(ws_ptr + rw_c)[:, None] * tl.load(xs_ptr + rt_c * stride_xsm)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rw_c).to(tl.float32)[:, None]
        tl.store(c_ptrs, to_out(y, c_ptr.dtype.element_ty), mask=cmask)


def swap_config(m: int, n: int, k: int, num_sms: int = 132) -> dict:
    """The heuristic launch config (kernels/configs/fp8_linear.json `small_m_swap` holds swept ones): 256-wide K
    tiles, 128 weight rows when there are enough of them, split-K only when the weight tiles are too few to
    cover the SMs. Fitted to the H200 sweep in `python -m bench.fp8_swap_sweep --sweep`."""
    block_k = 256 if k >= 1024 else 128
    block_w = 128 if m <= 4 and cdiv(n, 128) >= num_sms // 2 else 64
    tiles = cdiv(n, block_w)
    k_iters = cdiv(k, block_k)
    split = 1 if tiles >= num_sms // 3 else max(1, min(4, k_iters // 2, cdiv(num_sms, tiles)))
    per = cdiv(k_iters, split)
    split = cdiv(k_iters, per)  # no empty splits
    stages = 4 if block_w == 128 else 6
    return dict(BLOCK_W=block_w, BLOCK_K=block_k, SPLIT_K=split, num_warps=4, num_stages=stages)


def fp8_gemm_swap(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: dict | None = None,
    num_sms: int = 132,
) -> torch.Tensor:
    """xq fp8 [M, K] (M <= 16), x_scale [M, 1], w fp8 [N, K], w_scale [N, 1] -> [M, N] out_dtype."""
    m, k = xq.shape
    n = w.shape[0]
    if m > MAX_M:
        raise ValueError(f"fp8_gemm_swap takes at most {MAX_M} tokens, got {m}")
    assert xq.stride(1) == 1 and w.stride(1) == 1 and w.shape[1] == k
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    cfg = dict(config) if config else swap_config(m, n, k, num_sms)
    split = cfg.pop("SPLIT_K")
    block_t = max(16, next_pow2(m))
    tiles = cdiv(n, cfg["BLOCK_W"])
    if split > 1:
        part = torch.empty(tiles * split * cfg["BLOCK_W"] * block_t, dtype=torch.float32, device=xq.device)
        cnt = zeroed_counters(tiles, xq.device)
    else:
        part = cnt = out
    xs = x_scale.reshape(m, -1)
    _fp8_gemm_swap_kernel[(tiles, split)](
        xq, w, out, xs, w_scale.reshape(-1), bias if bias is not None else out, part, cnt,
        m, n, k, split, xq.stride(0), w.stride(0), out.stride(0), xs.stride(0),
        BLOCK_T=block_t, SPLIT=split > 1, HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg,
    )
    return out


__all__ = ["fp8_gemm_swap", "swap_config", "MAX_M"]

"""Triton FP8 GEMV for decode-sized M (1 to 4 tokens): y[M, N] = (x_fp8 @ w_fp8^T) * x_scale * w_scale (+ bias).

At M <= 4 a linear layer is a pure weight stream, and the tensor-core GEMM (kernels/triton_fp8_gemm.py) pads M
to 16 and reached 51-59% of HBM bandwidth on H200. Here each program reads a [BLOCK_N, BLOCK_K] slab of the
weight with 16-byte loads, multiplies it with the M activation rows on the CUDA cores (fp8 x fp8 products are
exact in fp32) and keeps a 2-D fp32 accumulator, reduced over K once at the end. Many small programs keep the
tail of the last wave short. When N alone gives too few programs, K is split: each split stores its fp32
partial, takes a ticket, and the last split of an N block sums the partials in split order (deterministic, no
float atomics), runs the epilogue, and re-arms the ticket (counters stay zeroed across CUDA-graph replays).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.triton_common import cdiv, next_pow2, to_out, zeroed_counters

MAX_M = 4


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, out_ptr, xs_ptr, ws_ptr, bias_ptr, part_ptr, cnt_ptr,
    M, N, K, SPLIT_K, K_PER_SPLIT, stride_xm, stride_wn, stride_om, stride_xsm,
    M_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    rn_c = tl.where(mn, rn, 0).to(tl.int64)
    rm = tl.arange(0, M_P)
    mm = rm < M
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rn_c[:, None] * stride_wn
    x_rows = x_ptr + tl.where(mm, rm, 0)[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros([M_P, BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    for k0 in range(k_begin, k_begin + K_PER_SPLIT, BLOCK_K):
        k = k0 + rk
        if EVEN_K:
            w = tl.load(w_rows + k[None, :])
            x = tl.load(x_rows + k[None, :])
        else:
            w = tl.load(w_rows + k[None, :], mask=k[None, :] < K, other=0.0)
            x = tl.load(x_rows + k[None, :], mask=k[None, :] < K, other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, 2)  # [M_P, BLOCK_N]
    o_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    omask = mm[:, None] & mn[None, :]
    if SPLIT:
        offs = rm[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile = part_ptr + (pid_n * SPLIT_K).to(tl.int64) * (M_P * BLOCK_N)
        tl.store(tile + pid_k * (M_P * BLOCK_N) + offs, y)
        tl.debug_barrier()  # every thread's partial stores precede the ticket (release)
        ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            y = tl.zeros([M_P, BLOCK_N], dtype=tl.float32)
            for s in range(0, SPLIT_K):
                y += tl.load(tile + s * (M_P * BLOCK_N) + offs, cache_modifier=".cg")
            y = y * tl.load(xs_ptr + tl.where(mm, rm, 0) * stride_xsm)[:, None]
            y = y * tl.load(ws_ptr + rn_c)[None, :]
            if HAS_BIAS:
                y += tl.load(bias_ptr + rn_c).to(tl.float32)[None, :]
            tl.store(o_ptrs, to_out(y, out_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)
    else:
        y = y * tl.load(xs_ptr + tl.where(mm, rm, 0) * stride_xsm)[:, None]
        y = y * tl.load(ws_ptr + rn_c)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn_c).to(tl.float32)[None, :]
        tl.store(o_ptrs, to_out(y, out_ptr.dtype.element_ty), mask=omask)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemv_config(m: int, n: int, k: int, num_sms: int = 132) -> dict:
    """16 weight rows x (512 / M_P) bytes of K per program step; K split until there are >= 4 programs per SM."""
    m_p = next_pow2(m)
    block_n = 16
    block_k = max(128, 512 // m_p)
    k_iters = cdiv(k, block_k)
    blocks_n = cdiv(n, block_n)
    split = max(1, min(k_iters, cdiv(4 * num_sms, blocks_n), 16))
    per = cdiv(k_iters, split)
    split = cdiv(k_iters, per)  # no empty splits
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, K_PER_SPLIT=per * block_k, num_warps=4,
                num_stages=1)


def fp8_gemv(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: dict | None = None,
) -> torch.Tensor:
    """x_fp8 [M, K] (M <= 4), x_scale [M, 1] fp32, w [N, K] fp8, w_scale [N, 1] fp32 -> [M, N] out_dtype."""
    m, k = x_fp8.shape
    n = w.shape[0]
    if m > MAX_M:
        raise ValueError(f"fp8_gemv takes at most {MAX_M} rows, got {m}")
    assert x_fp8.stride(1) == 1 and w.stride(1) == 1 and w.shape[1] == k
    out = torch.empty(m, n, dtype=out_dtype, device=x_fp8.device)
    if m == 0:
        return out
    cfg = dict(config) if config else gemv_config(m, n, k, _num_sms(x_fp8.device.index or 0) if x_fp8.is_cuda else 132)
    split = cfg.pop("SPLIT_K")
    per = cfg.pop("K_PER_SPLIT")
    m_p = next_pow2(m)
    blocks_n = cdiv(n, cfg["BLOCK_N"])
    if split > 1:
        part = torch.empty(blocks_n * split * m_p * cfg["BLOCK_N"], dtype=torch.float32, device=x_fp8.device)
        cnt = zeroed_counters(blocks_n, x_fp8.device)
    else:
        part = cnt = out
    xs = x_scale.reshape(m, -1)
    ws = w_scale.reshape(-1)
    _fp8_gemv_kernel[(blocks_n, split)](
        x_fp8, w, out, xs, ws, bias if bias is not None else out, part, cnt,
        m, n, k, split, per, x_fp8.stride(0), w.stride(0), out.stride(0), xs.stride(0),
        M_P=m_p, SPLIT=split > 1, HAS_BIAS=bias is not None, EVEN_K=k == split * per, **cfg,
    )
    return out


__all__ = ["fp8_gemv", "gemv_config", "MAX_M"]

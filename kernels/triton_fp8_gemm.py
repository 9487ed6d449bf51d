"""Triton FP8 GEMMs for linear layers: y[M, N] = x[M, K] @ w[N, K]^T with FP8 E4M3 operands.

Two scale formats (kernels/fp8_linear.py):
  channel  x quantized per token (x_scale [M, 1]), w per output channel (w_scale [N, 1]); applied once in the
           epilogue. On CUDA, `fp8_linear_channel_auto` sends M <= 16 to the swap-AB kernel
           (triton_fp8_gemm_swap.py, faster at every GLM shape on H200) and larger M to cuBLAS `_scaled_mm`;
           this kernel serves the interpreter (CPU tests) and is the swap kernel's benchmark baseline.
  block    x quantized per 1 x 128 group (x_scale [M, K/128]), w per 128 x 128 block (w_scale [N/128, K/128]);
           applied per K block (BLOCK_K = 128).
Bias is added in the epilogue. Small M uses split-K: each split stores an fp32 partial tile, takes a ticket
(atomic counter per output tile), and the last split to arrive sums the partials and runs the epilogue, then
resets the ticket to zero (so the counters stay zeroed across launches and CUDA-graph replays). The split-K
workspace and counters assume one stream at a time uses a given device's kernels.
"""
from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl

from kernels.triton_common import (
    cdiv, device_name, dot_operand, next_pow2, num_sms, pdl_launch, pdl_release, pdl_wait, to_out, zeroed_counters,
    token_counts,
)
from kernels.triton_fp8_gemm_swap import MAX_M as SWAP_KERNEL_MAX_M
from kernels.triton_fp8_gemm_swap import fp8_gemm_swap
from kernels.triton_quant import quant_fp8_per_group, quant_fp8_per_token

# tokens up to which the swap-AB GEMM quantizes an unquantized x itself (its amax pass reads the row per token)
SWAP_QUANT_MAX_M = 4
SWAP_DECODE_M = 16  # every shape takes the swap-AB GEMM up to here; above, only where the table has buckets


@triton.jit(**token_counts("M"))
def _fp8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, ws_ptr, cnt_ptr,
    M, N, K, SPLIT_K, stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # grouped ordering of output tiles for L2 reuse of A/B across neighbouring programs
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    gid = pid // group
    first_m = gid * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm = rm < M
    mn = rn < N
    rm_c = tl.where(mm, rm, 0).to(tl.int64)
    rn_c = tl.where(mn, rn, 0).to(tl.int64)

    k_iters = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_iters, SPLIT_K)
    k_begin = pid_k * per_split
    k_end = tl.minimum(k_begin + per_split, k_iters)

    a_row = a_ptr + rm_c[:, None] * stride_am
    b_col = b_ptr + rn_c[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for ki in range(k_begin, k_end):
        k = ki * BLOCK_K + rk
        if EVEN_K:
            a = tl.load(a_row + k[None, :])
            b = tl.load(b_col + k[:, None])
        else:
            a = tl.load(a_row + k[None, :], mask=k[None, :] < K, other=0.0)
            b = tl.load(b_col + k[:, None], mask=k[:, None] < K, other=0.0)
        if BLOCK_SCALE:
            sa = tl.load(as_ptr + rm_c * stride_asm + ki)
            sb = tl.load(bs_ptr + (rn_c // 128) * stride_bsn + ki)
            acc += tl.dot(dot_operand(a), dot_operand(b)) * sa[:, None] * sb[None, :]
        else:
            # fp32 accumulation across K tiles: Hopper's FP8 tensor-core accumulator keeps ~14 mantissa bits
            # (Triton never promotes it by default on sm_90), which costs ~1e-3 relative error at K = 5120
            acc += tl.dot(dot_operand(a), dot_operand(b))

    c_ptrs = c_ptr + rm_c[:, None] * stride_cm + rn[None, :]  # rn, not rn_c: keeps the stores vectorized
    cmask = mm[:, None] & mn[None, :]
    if SPLIT:
        tile = pid_m * num_n + pid_n
        ws_tile = ws_ptr + (tile * SPLIT_K).to(tl.int64) * (BLOCK_M * BLOCK_N)
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(ws_tile + pid_k * (BLOCK_M * BLOCK_N) + offs, acc)
        tl.debug_barrier()  # every thread's partial stores precede the ticket (release)
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, SPLIT_K):
                acc += tl.load(ws_tile + s * (BLOCK_M * BLOCK_N) + offs, cache_modifier=".cg")
            y = acc
            if not BLOCK_SCALE:
                sa = tl.load(as_ptr + rm_c * stride_asm)
                sb = tl.load(bs_ptr + rn_c * stride_bsn)
                y = y * sa[:, None] * sb[None, :]
            if HAS_BIAS:
                y += tl.load(bias_ptr + rn_c).to(tl.float32)[None, :]
            tl.store(c_ptrs, to_out(y, c_ptr.dtype.element_ty), mask=cmask)
            tl.atomic_xchg(cnt_ptr + tile, 0)
    else:
        y = acc
        if not BLOCK_SCALE:
            sa = tl.load(as_ptr + rm_c * stride_asm)
            sb = tl.load(bs_ptr + rn_c * stride_bsn)
            y = y * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn_c).to(tl.float32)[None, :]
        tl.store(c_ptrs, to_out(y, c_ptr.dtype.element_ty), mask=cmask)


def gemm_config(m: int, n: int, k: int, block_scale: bool, num_sms: int = 132, device: str | None = None) -> dict:
    """Launch config: the tuned small-M entry for (device, N, K) when kernels/configs/fp8_linear.json has one
    (channel scales only), else the heuristic. Small M: one M tile, narrow N tiles and split-K to put ~2 waves of
    programs on the SMs (the weights stream once). Large M: 128 x 128 tiles."""
    if device is not None and not block_scale:
        tuned = tuned_small_m(device, n, k, m)
        if tuned is not None:
            return dict(tuned)
    if m <= 64:
        bm = max(16, next_pow2(m))
        bn = 64 if n >= 512 else 32
        bk = 128 if block_scale else 256
        if m > 32:
            bk = 128
        tiles = cdiv(n, bn) * cdiv(m, bm)
        k_iters = cdiv(k, bk)
        split = max(1, min(k_iters // 2, (2 * num_sms) // max(tiles, 1)))
        per = cdiv(k_iters, split)
        split = cdiv(k_iters, per)  # no empty splits
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GROUP_M=1, num_warps=4, num_stages=4)
    if m <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, GROUP_M=8, num_warps=8, num_stages=4)


def fp8_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    block_scale: bool,
    config: dict | None = None,
) -> torch.Tensor:
    """xq: fp8 [M, K], w: fp8 [N, K] (last dims contiguous). channel: x_scale [M, 1], w_scale [N, 1];
    block: x_scale [M, ceil(K/128)], w_scale [ceil(N/128), ceil(K/128)]. Returns [M, N] out_dtype."""
    m, k = xq.shape
    n = w.shape[0]
    assert xq.stride(1) == 1 and w.stride(1) == 1
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    if config:
        cfg = dict(config)
    elif xq.is_cuda:
        cfg = gemm_config(m, n, k, block_scale, num_sms(xq.device.index or 0), device_name(xq.device))
    else:
        cfg = gemm_config(m, n, k, block_scale)
    if block_scale:
        cfg["BLOCK_K"] = 128
    split = cfg.pop("SPLIT_K")
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    tiles = cdiv(m, bm) * cdiv(n, bn)
    if split > 1:
        ws = torch.empty(tiles * split * bm * bn, dtype=torch.float32, device=xq.device)
        cnt = zeroed_counters(tiles, xq.device)
    else:
        ws = cnt = out
    xs = x_scale if x_scale.dim() == 2 else x_scale.view(m, -1)
    ws_ = w_scale if w_scale.dim() == 2 else w_scale.view(w_scale.shape[0], -1)
    _fp8_gemm_kernel[(tiles, split)](
        xq, w, out, xs, ws_, bias if bias is not None else out, ws, cnt,
        m, n, k, split, xq.stride(0), w.stride(0), out.stride(0), xs.stride(0), ws_.stride(0),
        SPLIT=split > 1, BLOCK_SCALE=block_scale, HAS_BIAS=bias is not None,
        EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg, **pdl_launch(xq.device),
    )
    return out


def fp8_linear_channel(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_fp8: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton path of fp8_linear_channel_ref (x [T, K] -> [T, N] in x.dtype). x_fp8 / x_scale: the per-token
    quantization of x when a previous kernel already produced it."""
    if x_fp8 is None:
        x_fp8, x_scale = quant_fp8_per_token(x)
    return fp8_gemm(x_fp8, x_scale, w_fp8, w_scale, bias, x.dtype, False, config)


def fp8_linear_block(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton path of fp8_linear_block_ref (x [T, K] -> [T, N] in x.dtype)."""
    xq, xs = quant_fp8_per_group(x, 128)
    return fp8_gemm(xq, xs, w_fp8, w_scale_inv, bias, x.dtype, True, config)


__all__ = ["fp8_gemm", "fp8_linear_channel", "fp8_linear_block", "gemm_config"]


# ------------------------------------------------------------------------------------- cuBLAS crossover

_LINEAR_TABLE = os.path.join(os.path.dirname(__file__), "configs", "fp8_linear.json")


@functools.lru_cache(maxsize=None)
def _linear_table() -> dict:
    if not os.path.exists(_LINEAR_TABLE):
        return {}
    with open(_LINEAR_TABLE) as f:
        return json.load(f)


@functools.lru_cache(maxsize=4096)
def tuned_small_m(device: str, n: int, k: int, m: int) -> dict | None:
    """The tuned config of the smallest M bucket >= m for this (device, N, K), None past the largest bucket."""
    entry = _linear_table().get(device)
    if not isinstance(entry, dict):
        return None
    buckets = entry.get("small_m", {}).get(f"{n},{k}")
    if not buckets:
        return None
    fits = sorted(int(b) for b in buckets if int(b) >= m)
    return dict(buckets[str(fits[0])]) if fits else None


@functools.lru_cache(maxsize=4096)
def tuned_swap(device: str, n: int, k: int, m: int) -> dict | None:
    """The swept swap-AB config (`small_m_swap`) of the smallest M bucket >= m for this (device, N, K), or None
    (the kernel's heuristic)."""
    entry = _linear_table().get(device)
    if not isinstance(entry, dict):
        return None
    buckets = entry.get("small_m_swap", {}).get(f"{n},{k}")
    if not buckets:
        return None
    fits = sorted(int(b) for b in buckets if int(b) >= m)
    return dict(buckets[str(fits[0])]) if fits else None


def qkv_swap_config(device: torch.device, n: int, k: int, m: int) -> dict | None:
    """The swap-AB config for the fused qkv + QK-norm/RoPE kernel: the swept one of this shape on CUDA (the
    kernel widens its weight tile to one head), the heuristic elsewhere (None)."""
    if device.type != "cuda":
        return None
    return tuned_swap(device_name(device), n, k, m)


@functools.lru_cache(maxsize=None)
def triton_max_m(device: str) -> int:
    """Largest M for which the Triton GEMM is used instead of cuBLAS `_scaled_mm` (measured per GPU, stored in
    kernels/configs/fp8_linear.json; 16 when the GPU is not listed)."""
    entry = _linear_table().get(device)
    if isinstance(entry, dict) and "triton_max_m" in entry:
        return int(entry["triton_max_m"])
    return 16


def scaled_mm_ok(x: torch.Tensor, w_fp8: torch.Tensor, bias: torch.Tensor | None) -> bool:
    k = x.shape[1]
    n = w_fp8.shape[0]
    return (
        x.is_cuda and hasattr(torch, "_scaled_mm") and x.dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0
        and (bias is None or bias.dtype == torch.bfloat16)
    )


def scaled_mm_linear(
    x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """cuBLAS rowwise-scaled FP8 GEMM: per-token x_scale [M, 1] x per-channel w_scale [N, 1]."""
    return torch._scaled_mm(
        x_fp8, w_fp8.t(), scale_a=x_scale.view(-1, 1), scale_b=w_scale.view(1, -1).float(), bias=bias,
        out_dtype=out_dtype,
    )


def swap_linear_config(device: str, n: int, k: int, m: int) -> tuple[bool, dict | None]:
    """(whether an FP8 channel linear of m tokens with an [n, k] weight takes the swap-AB GEMM on this GPU, its
    swept config or None for the kernel's heuristic): every shape up to 16 tokens, up to 64 where the table has a
    bucket above 16 (the TP shards, where it beat cuBLAS)."""
    if not 0 < m <= SWAP_KERNEL_MAX_M:
        return False, None
    cfg = tuned_swap(device, n, k, m)
    return m <= SWAP_DECODE_M or cfg is not None, cfg


def fp8_linear_channel_auto(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_fp8: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    x_absmax_parts: torch.Tensor | None = None,
) -> torch.Tensor:
    """GPU FP8 channel linear: the swap-AB Triton GEMM (kernels/triton_fp8_gemm_swap.py) where
    swap_linear_config says so (up to 16 tokens; up to 64 on the swept TP shards), the Triton GEMM up to the
    measured crossover M, cuBLAS `_scaled_mm` above it. x_absmax_parts: see fp8_gemm_swap (used where the
    swap-AB GEMM quantizes x itself)."""
    m = x.shape[0]
    dev = device_name(x.device)
    swap, cfg = swap_linear_config(dev, w_fp8.shape[0], x.shape[1], m)
    if swap:
        if x_fp8 is None:
            if m <= SWAP_QUANT_MAX_M:  # the GEMM quantizes x itself: one launch instead of two
                x_fp8, x_scale = x, None
            else:
                x_fp8, x_scale = quant_fp8_per_token(x)
        return fp8_gemm_swap(x_fp8, x_scale, w_fp8, w_scale, bias, x.dtype, cfg, num_sms(x.device.index or 0),
                             x_absmax_parts=x_absmax_parts)
    if m > triton_max_m(dev) and scaled_mm_ok(x, w_fp8, bias):
        if x_fp8 is None:
            x_fp8, x_scale = quant_fp8_per_token(x)
        return scaled_mm_linear(x_fp8, x_scale, w_fp8, w_scale, bias, x.dtype)
    return fp8_linear_channel(x, w_fp8, w_scale, bias, x_fp8, x_scale)


__all__ += ["fp8_linear_channel_auto", "qkv_swap_config", "scaled_mm_linear", "swap_linear_config", "triton_max_m",
            "tuned_small_m", "tuned_swap"]

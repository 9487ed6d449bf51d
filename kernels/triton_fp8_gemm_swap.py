"""Triton FP8 GEMM for decode-sized M (<= 16 tokens), "swap AB": y^T[N, M] = w[N, K] @ x[M, K]^T.

At M <= 16 the tensor-core GEMM (kernels/triton_fp8_gemm.py) gives the MMA a 16-row token tile, below Hopper's
64-row warpgroup MMA. Here the weight rows are the MMA's M side (64 or 128 of them) and the tokens its N side
(16), so each MMA is full and the weights stream through the wgmma pipeline. Both operands stay K-major, as
FP8 wgmma requires. Channel scales only (per-token x_scale [M, 1], per-channel w_scale [N, 1]), applied in
the epilogue; split-K as in triton_fp8_gemm (fp32 partials, a self-resetting ticket per weight tile, the last
split sums the partials in split order).

Given a bf16 x instead of x_fp8 (QUANT_X), every program first finds each token's amax over the whole row
and quantizes its x tiles as it loads them, exactly as quant_fp8_per_token would: at batch 1 that replaces a
launch of the quant kernel before o_proj (the row is 24 KB and sits in L2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import (
    cdiv, dot_operand, next_pow2, pdl_launch, pdl_release, pdl_wait, round_to, tl_dtype, to_fp8, to_out,
    zeroed_counters, token_counts,
)
from kernels.triton_rope import norm_rope_heads, store_cache_slices

MAX_M = 64  # the kernel's limit (one token tile); triton_fp8_gemm.swap_linear_config picks it per shape
AMAX_K = 2048  # elements per load of the amax pass (QUANT_X)
SMEM_BUDGET = 200 * 1024  # bytes of pipelined tiles per program (Hopper: 227 KB of shared memory per block)


@triton.jit
def _scale_bias(acc, ws_ptr, bias_ptr, rw_c, x_scale, HAS_BIAS: tl.constexpr):
    """acc * w_scale * x_scale (+ bias). The bias add is an explicit fma: with FP fusion on (the plain GEMM) the
    compiler contracted it into one, with it off (the qkv + RoPE launch) it rounded twice, and the two launches'
    bf16 outputs differed in a last bit now and then (session 30, one v element on an H200)."""
    y = acc * tl.load(ws_ptr + rw_c)[:, None]
    if HAS_BIAS:
        return tl.fma(y, x_scale[None, :], tl.load(bias_ptr + rw_c).to(tl.float32)[:, None])
    return y * x_scale[None, :]


@triton.jit(**token_counts("M"))
def _fp8_gemm_swap_kernel(
    x_ptr, w_ptr, c_ptr, xs_ptr, ws_ptr, bias_ptr, part_ptr, cnt_ptr,
    M, N, K, SPLIT_K, stride_xm, stride_wn, stride_cm, stride_xsm,
    BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    # QUANT_X: x is bf16, quantized per token here (scale from a pass over the row, or from xmax_ptr's parts)
    QUANT_X: tl.constexpr = False, AMAX_BLOCK: tl.constexpr = 2048, AMAX_CHUNKS: tl.constexpr = 1,
    xmax_ptr=None, N_PARTS=0, PARTS_P: tl.constexpr = 0,
    # ROPE: the qkv epilogue (QK-norm + RoPE of q / k heads, K and V into the paged caches)
    qo_ptr=None, qw_ptr=None, kw_ptr=None, cs_ptr=None, pos_ptr=None, kc_ptr=None, vc_ptr=None, slot_ptr=None,
    HQ=0, HK=0, eps=0.0, k_scale=1.0, v_scale=1.0, stride_qot=0, stride_cs=0,
    stride_kc_slot=0, stride_kc_h=0, stride_vc_slot=0, stride_vc_h=0,
    ROPE: tl.constexpr = False, HAS_NORM: tl.constexpr = False, HALF: tl.constexpr = 1, HALF_P: tl.constexpr = 1,
    PASS: tl.constexpr = 0, PASS_P: tl.constexpr = 1, DT: tl.constexpr = tl.bfloat16, CACHE_FP8: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
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

    if QUANT_X and PARTS_P > 0:  # the row's amax from maxima of its parts, given (e.g. per attention head)
        rp = tl.arange(0, PARTS_P)
        parts = tl.load(xmax_ptr + rt_c[:, None] * N_PARTS + rp[None, :], mask=rp[None, :] < N_PARTS, other=0.0)
        x_scale = tl.maximum(tl.max(parts, 1) / 448.0, 1e-12)
    elif QUANT_X:  # per-token scale over the whole row, as quant_fp8_per_token: max(amax / 448, 1e-12)
        x_scale = tl.full([BLOCK_T], 1.0, tl.float32)
        ra = tl.arange(0, AMAX_BLOCK)
        for t in range(0, M):
            amax = tl.zeros([AMAX_BLOCK], dtype=tl.float32)
            for c in tl.static_range(AMAX_CHUNKS):  # unrolled: the row's loads are in flight together
                v = tl.load(x_ptr + t * stride_xm + c * AMAX_BLOCK + ra, mask=c * AMAX_BLOCK + ra < K, other=0.0)
                amax = tl.maximum(amax, tl.abs(v.to(tl.float32)))
            x_scale = tl.where(rt == t, tl.maximum(tl.max(amax, 0) / 448.0, 1e-12), x_scale)
    else:
        x_scale = tl.load(xs_ptr + rt_c * stride_xsm)

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
        if QUANT_X:
            xt = to_fp8(tl.clamp(xt.to(tl.float32) / x_scale[None, :], -448.0, 448.0))
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
            y = _scale_bias(acc, ws_ptr, bias_ptr, rw_c, x_scale, HAS_BIAS)
            tl.store(c_ptrs, to_out(y, c_ptr.dtype.element_ty), mask=cmask)
            tl.atomic_xchg(cnt_ptr + pid_w, 0)
            if ROPE:
                tl.debug_barrier()  # the tile's stores precede the epilogue's reloads of it
                _head_norm_rope_epilogue(
                    c_ptr, stride_cm, pid_w, M, qo_ptr, qw_ptr, kw_ptr, cs_ptr, pos_ptr, kc_ptr, vc_ptr, slot_ptr,
                    HQ, HK, eps, k_scale, v_scale, stride_qot, stride_cs, stride_kc_slot, stride_kc_h,
                    stride_vc_slot, stride_vc_h, HAS_NORM, HALF, HALF_P, PASS, PASS_P, BLOCK_W, DT, CACHE_FP8,
                )
    else:
        y = _scale_bias(acc, ws_ptr, bias_ptr, rw_c, x_scale, HAS_BIAS)
        tl.store(c_ptrs, to_out(y, c_ptr.dtype.element_ty), mask=cmask)
        if ROPE:
            tl.debug_barrier()  # the tile's stores precede the epilogue's reloads of it
            _head_norm_rope_epilogue(
                c_ptr, stride_cm, pid_w, M, qo_ptr, qw_ptr, kw_ptr, cs_ptr, pos_ptr, kc_ptr, vc_ptr, slot_ptr,
                HQ, HK, eps, k_scale, v_scale, stride_qot, stride_cs, stride_kc_slot, stride_kc_h,
                stride_vc_slot, stride_vc_h, HAS_NORM, HALF, HALF_P, PASS, PASS_P, BLOCK_W, DT, CACHE_FP8,
            )


@triton.jit
def _head_norm_rope_epilogue(
    c_ptr, stride_cm, head, M, qo_ptr, qw_ptr, kw_ptr, cs_ptr, pos_ptr, kc_ptr, vc_ptr, slot_ptr,
    HQ, HK, eps, k_scale, v_scale, stride_qot, stride_cs, stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
    HAS_NORM: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, PASS: tl.constexpr, PASS_P: tl.constexpr,
    D: tl.constexpr, DT: tl.constexpr, CACHE_FP8: tl.constexpr,
):
    """The qkv tile of one head (BLOCK_W == head_dim) is in c for every token: QK RMSNorm + RoPE of a q head
    into qo, of a k head into the paged K cache (and back into c), a v head copied into the V cache -- the
    math of kernels/triton_rope.py (qk_norm_rope with a cache), one head per program."""
    ia = tl.arange(0, HALF_P)
    for t in range(0, M):
        row = c_ptr + t * stride_cm
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = round_to(tl.load(cs_ptr + pos * stride_cs + ia, mask=ia < HALF, other=0.0)[None, :], DT)
        sin = round_to(tl.load(cs_ptr + pos * stride_cs + HALF + ia, mask=ia < HALF, other=0.0)[None, :], DT)
        if head < HQ:  # heads are rows of 2 (the second masked off): tiles of one row are avoided
            norm_rope_heads(row, qo_ptr + t * stride_qot, qw_ptr, cos, sin, head, head + 1, D, D, eps,
                            HAS_NORM, HALF, HALF_P, PASS, PASS_P, D, 2, DT)
        else:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if head < HQ + HK:
                kh = head - HQ
                a, b, c = norm_rope_heads(row + HQ * D, row + HQ * D, kw_ptr, cos, sin, kh, kh + 1, D, D, eps,
                                          HAS_NORM, HALF, HALF_P, PASS, PASS_P, D, 2, DT)
                if slot >= 0:
                    hi = kh + tl.arange(0, 2)
                    store_cache_slices(kc_ptr, slot * stride_kc_slot, hi, hi < kh + 1, a, b, c, k_scale,
                                       stride_kc_h, HALF, HALF_P, PASS, PASS_P, CACHE_FP8)
            else:
                vh = head - HQ - HK
                if slot >= 0:
                    hi = vh + tl.arange(0, 2)
                    hm = hi < vh + 1
                    vrow = row + (HQ + HK) * D + hi[:, None] * D
                    ma = hm[:, None] & (ia[None, :] < HALF)
                    va = tl.load(vrow + ia[None, :], mask=ma, other=0.0).to(tl.float32)
                    vb = tl.load(vrow + HALF + ia[None, :], mask=ma, other=0.0).to(tl.float32)
                    vc = va
                    if PASS > 0:
                        ic = tl.arange(0, PASS_P)
                        vc = tl.load(vrow + 2 * HALF + ic[None, :], mask=hm[:, None] & (ic[None, :] < PASS),
                                     other=0.0).to(tl.float32)
                    store_cache_slices(vc_ptr, slot * stride_vc_slot, hi, hm, va, vb, vc, v_scale, stride_vc_h,
                                       HALF, HALF_P, PASS, PASS_P, CACHE_FP8)


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
    x_scale: torch.Tensor | None,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: dict | None = None,
    num_sms: int = 132,
    x_absmax_parts: torch.Tensor | None = None,
) -> torch.Tensor:
    """xq fp8 [M, K] (M <= MAX_M), x_scale [M, 1], w fp8 [N, K], w_scale [N, 1] -> [M, N] out_dtype.
    With x_scale None, xq is the unquantized (bf16) x and the kernel quantizes it per token itself; given
    x_absmax_parts (fp32 [M, P]: max |x| over P slices of each row, e.g. per attention head) it takes the row
    maxima from there instead of reading every row once more."""
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
    parts = x_scale is None and x_absmax_parts is not None
    if parts:
        assert x_absmax_parts.shape[0] == m and x_absmax_parts.is_contiguous()
    _launch(
        xq, x_scale, w, w_scale, bias, out, cfg, split, cap_stages=x_scale is None,
        xmax_ptr=x_absmax_parts if parts else None, N_PARTS=x_absmax_parts.shape[1] if parts else 0,
        PARTS_P=next_pow2(x_absmax_parts.shape[1]) if parts else 0,
    )
    return out


def _launch(
    xq: torch.Tensor, x_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out: torch.Tensor, cfg: dict, split: int, cap_stages: bool, **features,
) -> None:
    """One launch of _fp8_gemm_swap_kernel into out [M, N] with launch config cfg (SPLIT_K taken out as split);
    x_scale None: the kernel quantizes the 16-bit x itself. features: the kernel's optional inputs and flags.
    cap_stages: fewer pipeline stages where the tiles would not fit SMEM_BUDGET."""
    m, k = xq.shape
    n = w.shape[0]
    block_t = max(16, next_pow2(m))
    quant_x = x_scale is None
    if cap_stages:  # e.g. 16-bit x tiles in the pipeline: fewer stages fit the 227 KB of shared memory
        per_stage = cfg["BLOCK_K"] * (cfg["BLOCK_W"] + block_t * xq.element_size())
        cfg["num_stages"] = max(2, min(cfg.get("num_stages", 3), SMEM_BUDGET // per_stage))
    tiles = cdiv(n, cfg["BLOCK_W"])
    if split > 1:
        part = torch.empty(tiles * split * cfg["BLOCK_W"] * block_t, dtype=torch.float32, device=xq.device)
        cnt = zeroed_counters(tiles, xq.device)
    else:
        part = cnt = out
    xs = xq if quant_x else x_scale.reshape(m, -1)
    _fp8_gemm_swap_kernel[(tiles, split)](
        xq, w, out, xs, w_scale.reshape(-1), bias if bias is not None else out, part, cnt,
        m, n, k, split, xq.stride(0), w.stride(0), out.stride(0), xs.stride(0),
        BLOCK_T=block_t, SPLIT=split > 1, HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0,
        QUANT_X=quant_x, AMAX_BLOCK=min(AMAX_K, next_pow2(k)), AMAX_CHUNKS=cdiv(k, AMAX_K) if quant_x else 1,
        **features, **cfg, **pdl_launch(xq.device),
    )


def qkv_rope_config(m: int, n: int, k: int, d: int, config: dict | None = None, num_sms: int = 132) -> dict:
    """fp8_qkv_norm_rope's launch config: `config` or the swap heuristic, narrowed to one head per program
    (BLOCK_W = d) with split-K keeping about as many programs. fp8_gemm_swap given the same config sums the same K
    tiles with the same MMA shape, so the two agree bit for bit (a narrower BLOCK_W alone changes the MMA a GPU
    uses: below 64 rows no wgmma, and the bf16 outputs differ in last bits)."""
    cfg = dict(config) if config else swap_config(m, n, k, num_sms)
    if cfg["BLOCK_W"] != d:
        k_iters = cdiv(k, cfg["BLOCK_K"])
        split = max(1, min(k_iters // 2, cdiv(cfg["SPLIT_K"] * d, cfg["BLOCK_W"])))
        cfg["SPLIT_K"] = cdiv(k_iters, cdiv(k_iters, split))
        cfg["BLOCK_W"] = d
    return cfg


def fp8_qkv_norm_rope(
    xq: torch.Tensor,
    x_scale: torch.Tensor | None,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    config: dict | None = None,
    num_sms: int = 132,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode QKV projection with QK-norm + RoPE + K/V store in its epilogue: one launch for what was
    fp8_gemm_swap + qk_norm_rope(k_cache=...). Weight rows are [q heads | k heads | v heads] x head_dim; one
    program owns one head (BLOCK_W = head_dim). Returns (q [M, Hq, D] normed and rotated, the raw qkv [M, N]
    with its k part normed and rotated)."""
    m, k = xq.shape
    n = w.shape[0]
    d = n // (num_heads + 2 * num_kv_heads)
    rot = cos_sin.shape[1]
    if m > MAX_M or n != d * (num_heads + 2 * num_kv_heads) or d != next_pow2(d) or rot % 2 or rot > d:
        raise ValueError(f"fp8_qkv_norm_rope: {m} tokens (at most {MAX_M}), {n} rows for {num_heads}+2x{num_kv_heads}"
                         f" heads, rotary dim {rot}")
    has_norm = q_norm_weight is not None
    assert (k_norm_weight is not None) == has_norm, "q and k norms come together"
    assert xq.stride(1) == 1 and w.stride(1) == 1 and w.shape[1] == k
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1)
    assert v_cache.stride(0) == v_cache.shape[1] * v_cache.stride(1)
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    qo = torch.empty(m, num_heads, d, dtype=out_dtype, device=xq.device)
    if m == 0:
        return qo, out
    cfg = qkv_rope_config(m, n, k, d, config, num_sms)
    split = cfg.pop("SPLIT_K")
    half = rot // 2
    pas = d - rot
    _launch(
        xq, x_scale, w, w_scale, bias, out, cfg, split, cap_stages=True,
        qo_ptr=qo, qw_ptr=q_norm_weight if has_norm else out, kw_ptr=k_norm_weight if has_norm else out,
        cs_ptr=cos_sin, pos_ptr=positions, kc_ptr=k_cache, vc_ptr=v_cache, slot_ptr=slot_mapping,
        HQ=num_heads, HK=num_kv_heads, eps=eps, k_scale=float(k_scale), v_scale=float(v_scale),
        stride_qot=qo.stride(0), stride_cs=cos_sin.stride(0), stride_kc_slot=k_cache.stride(1),
        stride_kc_h=k_cache.stride(2), stride_vc_slot=v_cache.stride(1), stride_vc_h=v_cache.stride(2),
        ROPE=True, HAS_NORM=has_norm, HALF=half, HALF_P=next_pow2(half), PASS=pas, PASS_P=next_pow2(max(pas, 1)),
        DT=tl_dtype(out_dtype), CACHE_FP8=k_cache.dtype == torch.float8_e4m3fn,
        enable_fp_fusion=False,  # no FMA contraction across the emulated bf16 roundings (as qk_norm_rope)
    )
    return qo, out


__all__ = ["fp8_gemm_swap", "fp8_qkv_norm_rope", "qkv_rope_config", "swap_config", "MAX_M"]

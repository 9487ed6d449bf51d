"""Triton GLM-4.x MoE routing (kernels/moe_routing.py): fp32 sigmoid scores, correction bias for selection
only, group-limited top-k (groups ranked by the sum of their top-2 biased scores), weights from the unbiased
scores, renormalized, times routed_scaling_factor; optionally the shared expert appended as id E, weight 1.0.

One program handles BLOCK_T tokens; experts are laid out as a [groups, experts per group] tile so group
scores are plain reductions. Top-k is k rounds of one max reduction over packed (score, id) keys (ties go to the
lowest expert id). Ids come out in selection order (descending biased score); the reference leaves the order
unspecified.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.triton_common import (
    cdiv, fp8_row_outputs, next_pow2, pdl_launch, pdl_release, pdl_wait, round_bf16, to_fp8, zeroed_counters,
    token_counts,
)


@triton.jit
def _expert_grid(G, EG, G_P: tl.constexpr, EG_P: tl.constexpr):
    """The experts as a [G_P, EG_P] tile: (expert id per lane or -1 on padding lanes, lane mask)."""
    gi = tl.arange(0, G_P)
    ji = tl.arange(0, EG_P)
    emask = (gi[:, None] < G) & (ji[None, :] < EG)
    return tl.where(emask, gi[:, None] * EG + ji[None, :], -1), emask


@triton.jit
def _route_tokens(
    logits, ti, tm, bias_ptr, w_ptr, id_ptr, E, EG, G, stride_wt, stride_it, scaling,
    TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr,
    RENORM: tl.constexpr, SHARED: tl.constexpr, BLOCK_T: tl.constexpr, G_P: tl.constexpr, EG_P: tl.constexpr,
    K_P: tl.constexpr,
):
    """Route tokens ti (mask tm) from their fp32 logits [BLOCK_T, G_P, EG_P] and store weights and ids."""
    ti_c = tl.where(tm, ti, 0).to(tl.int64)
    gi = tl.arange(0, G_P)
    ji = tl.arange(0, EG_P)
    eidx, emask = _expert_grid(G, EG, G_P, EG_P)
    eidx3 = eidx[None, :, :]  # padding lanes alias no expert
    scores = 1.0 / (1.0 + tl.exp(-logits))
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + eidx, mask=emask, other=0.0).to(tl.float32)[None, :, :]
    NEG: tl.constexpr = float("-inf")
    BIG: tl.constexpr = 1 << 30
    choice = tl.where(emask[None, :, :], choice, NEG)
    if GROUPED:
        # group score = sum of the group's top-2 biased scores
        jj = ji[None, None, :]
        top1 = tl.max(choice, 2)
        first = tl.min(tl.where(choice == top1[:, :, None], jj, BIG), 2)
        top2 = tl.max(tl.where(jj == first[:, :, None], NEG, choice), 2)
        gscore = tl.where((gi < G)[None, :], top1 + top2, NEG)  # [BLOCK_T, G_P]
        keep = tl.zeros([BLOCK_T, G_P], dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            gm = tl.max(gscore, 1)
            gsel = tl.min(tl.where(gscore == gm[:, None], gi[None, :], BIG), 1)
            hit = gi[None, :] == gsel[:, None]
            keep = keep | hit
            gscore = tl.where(hit, NEG, gscore)
        choice = tl.where(keep[:, :, None], choice, NEG)
    ki = tl.arange(0, K_P)[None, :]
    # top-k: each round takes the largest key -- the choice, then the lowest expert id -- in one max reduction.
    # The int64 key holds the fp32 choice made order-preserving as an int32 in its high word and (2^24 - id)
    # in its low word; padding lanes have low word 0, so they lose every tie. A taken lane's key drops to KO.
    bits = choice.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    low = tl.where(eidx3 >= 0, (1 << 24) - eidx3, 0)
    key = (ordered.to(tl.int64) << 32) | low.to(tl.int64)
    KO: tl.constexpr = -(1 << 63)
    ik = tl.zeros([BLOCK_T, K_P], dtype=tl.int32)
    wk = tl.zeros([BLOCK_T, K_P], dtype=tl.float32)
    for i in tl.static_range(TOP_K):
        mk = tl.max(tl.max(key, 2), 1)
        hit = key == mk[:, None, None]  # one lane per token: keys are unique
        key = tl.where(hit, KO, key)
        ik = tl.where(ki == i, ((1 << 24) - (mk & 0xFFFFFFFF)).to(tl.int32)[:, None], ik)
        # the taken expert's unbiased score (a sum of one value and zeros: exact); this round's own reduction
        # costs less than one over a [BLOCK_T, K_P, experts] tile after the loop
        wi = tl.sum(tl.sum(tl.where(hit, scores, 0.0), 2), 1)
        wk = tl.where(ki == i, wi[:, None], wk)
    if RENORM:
        wsum = tl.sum(wk, 1)
        wk = wk / (wsum[:, None] + 1e-20)
    wk = wk * scaling
    if SHARED:
        wk = tl.where(ki == TOP_K, 1.0, wk)
        ik = tl.where(ki == TOP_K, E, ik)
    omask = tm[:, None] & (ki < TOP_K + SHARED)
    tl.store(id_ptr + ti_c[:, None] * stride_it + ki, ik, mask=omask)
    tl.store(w_ptr + ti_c[:, None] * stride_wt + ki, wk, mask=omask)


@triton.jit(**token_counts("T"))
def _moe_route_kernel(
    logit_ptr, bias_ptr, w_ptr, id_ptr, T, E, EG, G, stride_lt, stride_wt, stride_it, scaling,
    TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr,
    RENORM: tl.constexpr, SHARED: tl.constexpr, BLOCK_T: tl.constexpr, G_P: tl.constexpr, EG_P: tl.constexpr,
    K_P: tl.constexpr, PARTS: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """PARTS > 1: a token's row holds PARTS partial logit vectors of E each (the split router GEMM), summed
    here in part order in fp32 -- ((p0 + p1) + p2), as torch would sum the column slices."""
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    ti = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = ti < T
    ti_c = tl.where(tm, ti, 0).to(tl.int64)
    eidx, emask = _expert_grid(G, EG, G_P, EG_P)
    m3 = tm[:, None, None] & emask[None, :, :]
    ptrs = logit_ptr + ti_c[:, None, None] * stride_lt + eidx[None, :, :]
    logits = tl.load(ptrs, mask=m3, other=0.0).to(tl.float32)
    for p in tl.static_range(1, PARTS):
        logits = logits + tl.load(ptrs + p * E, mask=m3, other=0.0).to(tl.float32)
    _route_tokens(
        logits, ti, tm, bias_ptr, w_ptr, id_ptr, E, EG, G, stride_wt, stride_it, scaling,
        TOP_K, TOPK_GROUP, HAS_BIAS, GROUPED, RENORM, SHARED, BLOCK_T, G_P, EG_P, K_P,
    )


@triton.jit
def _summed_rows(x_ptr, r_ptr, rt_c, h, mh, stride_xt, stride_rt):
    """x + residual for tokens rt_c, hidden columns h, rounded to bf16 (as the add of two bf16 tensors)."""
    x = tl.load(x_ptr + rt_c[:, None] * stride_xt + h[None, :], mask=mh[None, :], other=0.0).to(tl.float32)
    r = tl.load(r_ptr + rt_c[:, None] * stride_rt + h[None, :], mask=mh[None, :], other=0.0).to(tl.float32)
    return round_bf16(x + r)


@triton.jit
def _normed(summed, inv, nw_ptr, h, mh):
    """RMSNorm of bf16 rows as kernels/triton_norm.py: normalized row rounded to bf16, times the weight,
    rounded to bf16 again (returned as fp32)."""
    n = round_bf16(summed * inv[:, None])
    return round_bf16(tl.load(nw_ptr + h, mask=mh, other=0.0).to(tl.float32)[None, :] * n)


@triton.jit(**token_counts("T"))
def _gate_route_kernel(
    x_ptr, gw_ptr, part_ptr, cnt_ptr, bias_ptr, w_ptr, id_ptr,
    r_ptr, nw_ptr, s_ptr, y_ptr, q_ptr, qs_ptr,
    T, E, H, EG, G, H_PER_SPLIT, stride_xt, stride_gw, stride_wt, stride_it, scaling,
    stride_rt, stride_st, stride_yt, stride_qt, eps,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
    TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr,
    RENORM: tl.constexpr, SHARED: tl.constexpr, BLOCK_T: tl.constexpr, G_P: tl.constexpr, EG_P: tl.constexpr,
    K_P: tl.constexpr, NORM: tl.constexpr = False, QUANT: tl.constexpr = False, H_CHUNKS: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """Router GEMV + routing for up to BLOCK_T tokens in one launch. Program (e, h) computes the fp32 logits
    of experts [e * BLOCK_E, +BLOCK_E) over hidden slice h and stores them as a partial; the last program to
    take the ticket sums the partials in slice order (deterministic) and routes every token.

    NORM: the router's input is rms_norm(x + residual) (bf16), computed here: every program sums the squares
    of the whole row (the same chunked order everywhere, so all agree), the programs of expert block 0 also
    write their slice of x + residual, of the normalized y and (QUANT) of y in FP8 with its per-token scale,
    which takes a second pass over the row for the amax -- one launch for post-attention norm and router."""
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    pid_e = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_prog = tl.num_programs(0) * tl.num_programs(1)
    n_h = tl.num_programs(1)
    re = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    me = re < E
    re_c = tl.where(me, re, 0).to(tl.int64)
    rt = tl.arange(0, BLOCK_T)
    tm = rt < T
    rt_c = tl.where(tm, rt, 0).to(tl.int64)
    h_begin = pid_h * H_PER_SPLIT
    if NORM:
        ssq = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        for c in tl.static_range(H_CHUNKS):  # unrolled: the row's loads are in flight together
            h = c * BLOCK_H + tl.arange(0, BLOCK_H)
            sm = _summed_rows(x_ptr, r_ptr, rt_c, h, h < H, stride_xt, stride_rt)
            ssq += sm * sm
        inv = tl.rsqrt(tl.sum(ssq, 1) / H + eps)
        writer = pid_e == 0
        scale = tl.full([BLOCK_T], 1.0, tl.float32)
        if QUANT:
            if writer:
                amax = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
                for c in tl.static_range(H_CHUNKS):
                    h = c * BLOCK_H + tl.arange(0, BLOCK_H)
                    mh = h < H
                    y = _normed(_summed_rows(x_ptr, r_ptr, rt_c, h, mh, stride_xt, stride_rt), inv, nw_ptr, h, mh)
                    amax = tl.maximum(amax, tl.abs(y))
                scale = tl.maximum(tl.max(amax, 1) / 448.0, 1e-12)
                if pid_h == 0:
                    tl.store(qs_ptr + rt_c, scale, mask=tm)
    acc = tl.zeros([BLOCK_T, BLOCK_E, BLOCK_H], dtype=tl.float32)
    for h0 in range(h_begin, h_begin + H_PER_SPLIT, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mh = h < H
        w = tl.load(gw_ptr + re_c[:, None] * stride_gw + h[None, :], mask=mh[None, :], other=0.0)
        if NORM:
            sm = _summed_rows(x_ptr, r_ptr, rt_c, h, mh, stride_xt, stride_rt)
            x = _normed(sm, inv, nw_ptr, h, mh)
            if writer:
                om = tm[:, None] & mh[None, :]
                tl.store(s_ptr + rt_c[:, None] * stride_st + h[None, :], sm.to(s_ptr.dtype.element_ty), mask=om)
                tl.store(y_ptr + rt_c[:, None] * stride_yt + h[None, :], x.to(y_ptr.dtype.element_ty), mask=om)
                if QUANT:
                    q = to_fp8(tl.clamp(x / scale[:, None], -448.0, 448.0))
                    tl.store(q_ptr + rt_c[:, None] * stride_qt + h[None, :], q, mask=om)
        else:
            x = tl.load(x_ptr + rt_c[:, None] * stride_xt + h[None, :], mask=mh[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    part = tl.sum(acc, 2)  # [BLOCK_T, BLOCK_E]
    tl.store(part_ptr + (pid_h * BLOCK_T + rt[:, None]) * E + re[None, :], part, mask=me[None, :])
    tl.debug_barrier()  # every thread's partial stores precede the ticket (release)
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if ticket == n_prog - 1:
        eidx, emask = _expert_grid(G, EG, G_P, EG_P)
        logits = tl.zeros([BLOCK_T, G_P, EG_P], dtype=tl.float32)
        for sp in range(0, n_h):
            ptrs = part_ptr + (sp * BLOCK_T + rt[:, None, None]) * E + eidx[None, :, :]
            logits += tl.load(ptrs, mask=emask[None, :, :], other=0.0, cache_modifier=".cg")
        _route_tokens(
            logits, rt, tm, bias_ptr, w_ptr, id_ptr, E, EG, G, stride_wt, stride_it, scaling,
            TOP_K, TOPK_GROUP, HAS_BIAS, GROUPED, RENORM, SHARED, BLOCK_T, G_P, EG_P, K_P,
        )
        tl.atomic_xchg(cnt_ptr, 0)


def moe_route(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_fused_shared_experts: int = 0,
    parts: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights fp32 [T, k (+1)], ids int32 [T, k (+1)]). parts > 1: router_logits is
    [T, parts * E], partial logits summed here in part order (router_logit_parts' output)."""
    t, e = router_logits.shape
    assert parts >= 1 and e % parts == 0
    e //= parts
    assert e % n_group == 0 and num_fused_shared_experts in (0, 1)
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    kk = top_k + num_fused_shared_experts
    w = torch.empty(t, kk, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, kk, dtype=torch.int32, device=logits.device)
    if t == 0:
        return w, ids
    eg = e // n_group
    g_p, eg_p = next_pow2(n_group), next_pow2(eg)
    block_t = max(1, min(next_pow2(t), 2048 // (g_p * eg_p), 16))
    _moe_route_kernel[(cdiv(t, block_t),)](
        logits, correction_bias if correction_bias is not None else logits, w, ids, t, e, eg, n_group,
        logits.stride(0), w.stride(0), ids.stride(0), float(routed_scaling_factor),
        TOP_K=top_k, TOPK_GROUP=topk_group, HAS_BIAS=correction_bias is not None, GROUPED=n_group > 1,
        RENORM=renormalize, SHARED=num_fused_shared_experts, BLOCK_T=block_t, G_P=g_p, EG_P=eg_p, K_P=next_pow2(kk),
        PARTS=parts, num_warps=8 if g_p * eg_p >= 256 else 4, **pdl_launch(logits.device),
    )
    return w, ids


def split_bf16_exact(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 w -> bf16 (hi, mid, lo) with hi + mid + lo == w exactly (8 + 8 + 8 significand bits; bf16 has
    fp32's exponent range)."""
    hi = w.to(torch.bfloat16)
    r = w - hi.float()
    mid = r.to(torch.bfloat16)
    return hi, mid, (r - mid.float()).to(torch.bfloat16)


@triton.jit
def _split_bf16_kernel(w_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """out [3, N] bf16 = split_bf16_exact of fp32 w [N]: (hi, mid, lo), each a nearest-even rounding of what
    the parts before it leave (those differences are exact in fp32)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    hi = round_bf16(w)
    r = w - hi
    mid = round_bf16(r)
    lo = round_bf16(r - mid)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs, hi.to(ty), mask=m)
    tl.store(out_ptr + N + offs, mid.to(ty), mask=m)
    tl.store(out_ptr + 2 * N + offs, lo.to(ty), mask=m)


def split_bf16_stacked(w: torch.Tensor) -> torch.Tensor:
    """fp32 w [E, H] -> bf16 [3E, H] = cat(split_bf16_exact(w)) in one launch (the torch ops were ~8)."""
    assert w.dtype == torch.float32 and w.dim() == 2
    w = w.contiguous()
    out = torch.empty(3 * w.shape[0], w.shape[1], dtype=torch.bfloat16, device=w.device)
    n = w.numel()
    if n:
        _split_bf16_kernel[(cdiv(n, 1024),)](w, out, n, BLOCK=1024)
    return out


ROUTER_SPLIT_MIN_T = 1024  # tokens from which the split bf16 router GEMM is used (prefill; its extra casts and
# launches cost more than the fp32 GEMM at decode batch sizes: B=64 decode went 32.9 -> 34.0 ms with 64)


@functools.lru_cache(maxsize=None)
def _mm_out_dtype_ok(device: str) -> bool:
    """Whether this torch has torch.mm(bf16, bf16, out_dtype=torch.float32) on this device (torch >= 2.9)."""
    try:
        a = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def router_logit_parts(x: torch.Tensor, gate_weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(logits, parts): fp32 router logits x.float() @ gate_weight.T as `parts` partial vectors of E side by
    side ([T, parts * E]), to be summed in part order (moe_route(..., parts=parts) does it while it routes).
    For bf16 x on CUDA at prefill sizes: one bf16 tensor-core GEMM with fp32 output against the exact bf16 split
    [hi; mid; lo] of the fp32 weight -- every product is exact, only the summation order differs from the fp32
    GEMM (which runs on CUDA cores: ~5 ms of a 4096-token prefill over 24 MoE layers). Else one part."""
    split = x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] >= ROUTER_SPLIT_MIN_T
    if split and _mm_out_dtype_ok(str(x.device)):
        return torch.mm(x, split_bf16_stacked(gate_weight.float()).t(), out_dtype=torch.float32), 3
    return torch.nn.functional.linear(x.float(), gate_weight.float()), 1


def router_logits(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """fp32 router logits x.float() @ gate_weight.T (router_logit_parts, parts summed in order)."""
    logits, parts = router_logit_parts(x, gate_weight)
    e = gate_weight.shape[0]
    total = logits[:, :e]
    for p in range(1, parts):
        total = total + logits[:, p * e:(p + 1) * e]
    return total


# tokens up to which moe_gate_route runs the single-launch router (decode); more go through cuBLAS + moe_route
GATE_ROUTE_MAX_T = 4
_GATE_H_PER_SPLIT = 1024


def moe_gate_route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_fused_shared_experts: int = 0,
    config: dict | None = None,
    norm: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_route(x.float() @ gate_weight.T, ...) for x [T, H]: one launch for T <= GATE_ROUTE_MAX_T (the fp32
    copy of x, the fp32 GEMV and the routing kernel were three), else the fp32 linear and moe_route.
    norm: rms_norm_gate_route's tensors for the fused norm (internal)."""
    t, h = x.shape
    e = gate_weight.shape[0]
    if t > GATE_ROUTE_MAX_T or t == 0:
        assert norm is None, "the fused norm takes 1..GATE_ROUTE_MAX_T tokens (rms_norm_gate_route checks)"
        logits, parts = router_logit_parts(x, gate_weight)
        return moe_route(logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor,
                         num_fused_shared_experts, parts)
    assert e % n_group == 0 and num_fused_shared_experts in (0, 1)
    assert x.stride(1) == 1 and gate_weight.stride(1) == 1 and gate_weight.shape[1] == h
    cfg = dict(config or {})
    t_p = next_pow2(t)
    block_e = cfg.get("BLOCK_E", 4)
    per = cfg.get("H_PER_SPLIT", _GATE_H_PER_SPLIT)
    block_h = cfg.get("BLOCK_H", max(16, min(per, 1024 // t_p)))
    n_h = cdiv(h, per)
    kk = top_k + num_fused_shared_experts
    w = torch.empty(t, kk, dtype=torch.float32, device=x.device)
    ids = torch.empty(t, kk, dtype=torch.int32, device=x.device)
    part = torch.empty(n_h * t_p * e, dtype=torch.float32, device=x.device)
    cnt = zeroed_counters(1, x.device)
    eg = e // n_group
    g_p, eg_p = next_pow2(n_group), next_pow2(eg)
    nrm = norm or {}
    r, nw, sm, y, q, qs = (nrm.get(k_, part) for k_ in ("residual", "weight", "summed", "y", "q", "qs"))
    _gate_route_kernel[(cdiv(e, block_e), n_h)](
        x, gate_weight, part, cnt, correction_bias if correction_bias is not None else part, w, ids,
        r, nw, sm, y, q, qs,
        t, e, h, eg, n_group, per, x.stride(0), gate_weight.stride(0), w.stride(0), ids.stride(0),
        float(routed_scaling_factor), r.stride(0), sm.stride(0), y.stride(0), q.stride(0), float(nrm.get("eps", 0.0)),
        BLOCK_E=block_e, BLOCK_H=block_h,
        TOP_K=top_k, TOPK_GROUP=topk_group, HAS_BIAS=correction_bias is not None, GROUPED=n_group > 1,
        RENORM=renormalize, SHARED=num_fused_shared_experts, BLOCK_T=t_p, G_P=g_p, EG_P=eg_p, K_P=next_pow2(kk),
        NORM=norm is not None, QUANT="q" in nrm, H_CHUNKS=cdiv(h, block_h) if norm is not None else 1,
        num_warps=cfg.get("num_warps", 4), **pdl_launch(x.device),
    )
    return w, ids


def rms_norm_gate_route(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    quant: bool,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_fused_shared_experts: int = 0,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor, torch.Tensor]:
    """(y, x + residual, (y_fp8, y_scale) if quant, weights, ids) with y = rms_norm(x + residual) and the
    routing of y, in one launch: bf16 x / residual / norm weight and 1 <= T <= GATE_ROUTE_MAX_T only."""
    t, h = x.shape
    if not 0 < t <= GATE_ROUTE_MAX_T or x.dtype != torch.bfloat16 or residual.dtype != torch.bfloat16 \
            or norm_weight.dtype != torch.bfloat16:
        raise ValueError("rms_norm_gate_route takes 1..4 tokens of bf16 x, residual and norm weight")
    assert x.stride(1) == 1 and residual.stride(1) == 1 and residual.shape == x.shape
    summed = torch.empty_like(x)
    y = torch.empty_like(x)
    norm = dict(residual=residual, weight=norm_weight, summed=summed, y=y, eps=eps)
    yq = None
    if quant:
        yq = fp8_row_outputs(t, h, x.device)
        norm.update(q=yq[0], qs=yq[1])
    w, ids = moe_gate_route(x, gate_weight, correction_bias, top_k, n_group, topk_group, renormalize,
                            routed_scaling_factor, num_fused_shared_experts, config, norm)
    return y, summed, yq, w, ids


@triton.jit(**token_counts("NT"))
def _local_ids_kernel(ids_ptr, out_ptr, NT, START, COUNT, RANK, RANKS, K: tl.constexpr, K_P: tl.constexpr,
                      BLOCK_T: tl.constexpr, SHARED: tl.constexpr):
    """moe_local_ids_ref for BLOCK_T tokens: one launch instead of a handful of elementwise ones."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, K_P)
    m = (t[:, None] < NT) & (j[None, :] < K)
    off = t[:, None] * K + j[None, :]
    local = tl.load(ids_ptr + off, mask=m, other=-1) - START
    local = tl.where((local >= 0) & (local < COUNT), local, -1)
    if SHARED:
        mine = (t % RANKS) == RANK
        local = tl.where(j[None, :] == K - 1, tl.where(mine[:, None], COUNT, -1), local)
    tl.store(out_ptr + off, local, mask=m)


def moe_local_ids(topk_ids: torch.Tensor, start: int, count: int,
                  shared_owner: tuple[int, int] | None = None) -> torch.Tensor:
    """kernels.moe_routing.moe_local_ids_ref in one launch (int32 ids [T, k], contiguous)."""
    ids = topk_ids.contiguous()
    out = torch.empty_like(ids)
    t, k = ids.shape
    if t == 0:
        return out
    rank, ranks = shared_owner if shared_owner is not None else (0, 1)
    block = 128
    _local_ids_kernel[(cdiv(t, block),)](ids, out, t, start, count, rank, ranks, K=k, K_P=next_pow2(k),
                                         BLOCK_T=block, SHARED=shared_owner is not None, num_warps=4)
    return out


__all__ = ["moe_route", "moe_gate_route", "moe_local_ids", "rms_norm_gate_route", "router_logits",
           "router_logit_parts", "split_bf16_exact", "split_bf16_stacked", "GATE_ROUTE_MAX_T"]

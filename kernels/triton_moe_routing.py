"""Triton GLM-4.x MoE routing (kernels/moe_routing.py): fp32 sigmoid scores, correction bias for selection
only, group-limited top-k (groups ranked by the sum of their top-2 biased scores), weights from the unbiased
scores, renormalized, times routed_scaling_factor; optionally the shared expert appended as id E, weight 1.0.

One program handles BLOCK_T tokens; experts are laid out as a [groups, experts per group] tile so group
scores are plain reductions. Top-k is k rounds of argmax (ties go to the lowest expert id). Ids come out in
selection order (descending biased score); the reference leaves the order unspecified.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import cdiv, next_pow2, zeroed_counters


@triton.jit
def _argmax_3d(x, idx, BIG: tl.constexpr):
    """Per token (axis 0) max over axes 1, 2 and the lowest flat index holding it."""
    m = tl.max(tl.max(x, 2), 1)
    cand = tl.where(x == m[:, None, None], idx, BIG)
    return m, tl.min(tl.min(cand, 2), 1)


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
    wk = tl.zeros([BLOCK_T, K_P], dtype=tl.float32)
    ik = tl.zeros([BLOCK_T, K_P], dtype=tl.int32)
    for i in tl.static_range(TOP_K):
        m, sel = _argmax_3d(choice, eidx3, BIG)
        hit = eidx3 == sel[:, None, None]
        w = tl.sum(tl.sum(tl.where(hit, scores, 0.0), 2), 1)
        choice = tl.where(hit, NEG, choice)
        wk = tl.where(ki == i, w[:, None], wk)
        ik = tl.where(ki == i, sel[:, None], ik)
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


@triton.jit
def _moe_route_kernel(
    logit_ptr, bias_ptr, w_ptr, id_ptr, T, E, EG, G, stride_lt, stride_wt, stride_it, scaling,
    TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr,
    RENORM: tl.constexpr, SHARED: tl.constexpr, BLOCK_T: tl.constexpr, G_P: tl.constexpr, EG_P: tl.constexpr,
    K_P: tl.constexpr,
):
    ti = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = ti < T
    ti_c = tl.where(tm, ti, 0).to(tl.int64)
    eidx, emask = _expert_grid(G, EG, G_P, EG_P)
    m3 = tm[:, None, None] & emask[None, :, :]
    logits = tl.load(logit_ptr + ti_c[:, None, None] * stride_lt + eidx[None, :, :], mask=m3, other=0.0)
    _route_tokens(
        logits.to(tl.float32), ti, tm, bias_ptr, w_ptr, id_ptr, E, EG, G, stride_wt, stride_it, scaling,
        TOP_K, TOPK_GROUP, HAS_BIAS, GROUPED, RENORM, SHARED, BLOCK_T, G_P, EG_P, K_P,
    )


@triton.jit
def _gate_route_kernel(
    x_ptr, gw_ptr, part_ptr, cnt_ptr, bias_ptr, w_ptr, id_ptr,
    T, E, H, EG, G, H_PER_SPLIT, stride_xt, stride_gw, stride_wt, stride_it, scaling,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
    TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr,
    RENORM: tl.constexpr, SHARED: tl.constexpr, BLOCK_T: tl.constexpr, G_P: tl.constexpr, EG_P: tl.constexpr,
    K_P: tl.constexpr,
):
    """Router GEMV + routing for up to BLOCK_T tokens in one launch. Program (e, h) computes the fp32 logits
    of experts [e * BLOCK_E, +BLOCK_E) over hidden slice h and stores them as a partial; the last program to
    take the ticket sums the partials in slice order (deterministic) and routes every token."""
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
    acc = tl.zeros([BLOCK_T, BLOCK_E, BLOCK_H], dtype=tl.float32)
    h_begin = pid_h * H_PER_SPLIT
    for h0 in range(h_begin, h_begin + H_PER_SPLIT, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mh = h < H
        w = tl.load(gw_ptr + re_c[:, None] * stride_gw + h[None, :], mask=mh[None, :], other=0.0)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights fp32 [T, k (+1)], ids int32 [T, k (+1)])."""
    t, e = router_logits.shape
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
        num_warps=8 if g_p * eg_p >= 256 else 4,
    )
    return w, ids


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_route(x.float() @ gate_weight.T, ...) for x [T, H]: one launch for T <= GATE_ROUTE_MAX_T (the fp32
    copy of x, the fp32 GEMV and the routing kernel were three), else the fp32 linear and moe_route."""
    t, h = x.shape
    e = gate_weight.shape[0]
    if t > GATE_ROUTE_MAX_T or t == 0:
        logits = torch.nn.functional.linear(x.float(), gate_weight.float())
        return moe_route(logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor,
                         num_fused_shared_experts)
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
    _gate_route_kernel[(cdiv(e, block_e), n_h)](
        x, gate_weight, part, cnt, correction_bias if correction_bias is not None else part, w, ids,
        t, e, h, eg, n_group, per, x.stride(0), gate_weight.stride(0), w.stride(0), ids.stride(0),
        float(routed_scaling_factor), BLOCK_E=block_e, BLOCK_H=block_h,
        TOP_K=top_k, TOPK_GROUP=topk_group, HAS_BIAS=correction_bias is not None, GROUPED=n_group > 1,
        RENORM=renormalize, SHARED=num_fused_shared_experts, BLOCK_T=t_p, G_P=g_p, EG_P=eg_p, K_P=next_pow2(kk),
        num_warps=cfg.get("num_warps", 4),
    )
    return w, ids


__all__ = ["moe_route", "moe_gate_route", "GATE_ROUTE_MAX_T"]

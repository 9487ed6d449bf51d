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

from kernels.triton_common import cdiv, next_pow2


@triton.jit
def _argmax_3d(x, idx, BIG: tl.constexpr):
    """Per token (axis 0) max over axes 1, 2 and the lowest flat index holding it."""
    m = tl.max(tl.max(x, 2), 1)
    cand = tl.where(x == m[:, None, None], idx, BIG)
    return m, tl.min(tl.min(cand, 2), 1)


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
    gi = tl.arange(0, G_P)
    ji = tl.arange(0, EG_P)
    eidx = gi[:, None] * EG + ji[None, :]  # [G_P, EG_P] expert id
    emask = (gi[:, None] < G) & (ji[None, :] < EG)
    m3 = tm[:, None, None] & emask[None, :, :]
    eidx3 = tl.where(emask, eidx, -1)[None, :, :]  # padding lanes alias no expert
    logits = tl.load(logit_ptr + ti_c[:, None, None] * stride_lt + eidx3, mask=m3, other=0.0).to(tl.float32)
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


__all__ = ["moe_route"]

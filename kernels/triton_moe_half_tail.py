"""The fused MoE's gate_up GEMM at prefill sizes with half tiles for an expert's last block (config key HALF_TAIL1).

The sort (triton_moe_align) pads every expert's run of pairs to whole BLOCK_M-row blocks, pairs first, so only an
expert's last block holds padding, at its end. With BLOCK_M 128 an expert of 129-192 pairs costs 256 MMA rows;
here a block whose row BLOCK_M / 2 is already padding computes its first half only (two warpgroups' 64-row MMAs
become one), so the padding an expert costs is under 64 rows instead of under 128. A random top-8 routing of 4K
tokens over 160 experts (205 pairs each on average) pads 18% of its rows at 128-row granularity and 14% at 64;
a skewed routing, whose counts spread over many blocks, saves up to half its padding.

FP8 per channel, x already quantized per token, weight tiles through a tensor descriptor (TMA1), accumulation in
the MMA (FAST_ACC): the prefill configs' path of `_moe_gate_up_kernel` (triton_moe.py), whose arithmetic per row is
the same, so the outputs are equal.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_common import pdl_release, pdl_wait, round_to, to_out, token_counts


@triton.jit
def _gate_up_rows(x_ptr, xs_ptr, w_desc, ws_ptr, act_ptr, sorted_ptr, e, row0, pid_n,
                  NP, TOPK, K, I, stride_xm, stride_xsm, stride_wse, stride_wsn, stride_am,
                  DT: tl.constexpr, BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """act[row0 : row0 + BM, pid_n's columns] = silu(x @ gate^T) * (x @ up^T) for expert e's sorted rows."""
    rows = row0 + tl.arange(0, BM)
    pair = tl.load(sorted_ptr + rows)
    valid = pair < NP
    tok = tl.where(valid, pair // TOPK, 0).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < I
    rn_c = tl.where(mn, rn, 0).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_rows = x_ptr + tok[:, None] * stride_xm
    w_row = e * (2 * I) + pid_n * BLOCK_N  # gate rows; up rows are I further (past I: masked at the store)
    acc_g = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
    for ki in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_rows + (ki * BLOCK_K + rk)[None, :], mask=valid[:, None], other=0.0)
        bg = w_desc.load([w_row, ki * BLOCK_K]).T
        bu = w_desc.load([w_row + I, ki * BLOCK_K]).T
        acc_g = tl.dot(a, bg, acc_g)
        acc_u = tl.dot(a, bu, acc_u)
    e64 = e.to(tl.int64)
    sa = tl.load(xs_ptr + tok * stride_xsm)[:, None]
    sg = tl.load(ws_ptr + e64 * stride_wse + rn_c * stride_wsn)
    su = tl.load(ws_ptr + e64 * stride_wse + (rn_c + I) * stride_wsn)
    g = round_to(acc_g * sa * sg[None, :], DT)
    u = round_to(acc_u * sa * su[None, :], DT)
    h = round_to(g / (1.0 + tl.exp(-g)), DT) * u
    # output pointers from the unclamped rn with a mask (a clamped index scalarizes the stores: triton_moe)
    out = act_ptr + rows.to(tl.int64)[:, None] * stride_am + rn[None, :]
    tl.store(out, to_out(h, act_ptr.dtype.element_ty), mask=mn[None, :])


@triton.jit(**token_counts("NP"))
def _moe_gate_up_half_tail_kernel(
    x_ptr, xs_ptr, w_desc, ws_ptr, act_ptr, sorted_ptr, bexp_ptr,
    NP, TOPK, K, I, stride_xm, stride_xsm, stride_wse, stride_wsn, stride_am,
    DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    num_n = tl.cdiv(I, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // num_n
    pid_n = pid % num_n
    e = tl.load(bexp_ptr + pid_m)
    if e >= 0:
        row0 = pid_m * BLOCK_M
        # the block's pairs come first: its upper half is empty iff its middle row is padding. Rows of an empty
        # upper half are not written (the down GEMM reads them, and its rows depend on their own A rows only)
        if tl.load(sorted_ptr + row0 + BLOCK_M // 2) < NP:
            _gate_up_rows(x_ptr, xs_ptr, w_desc, ws_ptr, act_ptr, sorted_ptr, e, row0, pid_n,
                          NP, TOPK, K, I, stride_xm, stride_xsm, stride_wse, stride_wsn, stride_am,
                          DT, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            _gate_up_rows(x_ptr, xs_ptr, w_desc, ws_ptr, act_ptr, sorted_ptr, e, row0, pid_n,
                          NP, TOPK, K, I, stride_xm, stride_xsm, stride_wse, stride_wsn, stride_am,
                          DT, BLOCK_M // 2, BLOCK_N, BLOCK_K)


def moe_gate_up_half_tail(x_fp8, x_scale, w_desc, w13, w13_scale, act, sorted_ids, bexp, num_pairs: int, topk: int,
                          dt, cfg: dict, launch: dict) -> None:
    """act[row] = silu(x[tok] @ w13[e, :I]^T) * (x[tok] @ w13[e, I:]^T) (dequantized, rounded as the reference) for
    every sorted row of a block whose half holds a pair. w_desc: a descriptor of w13 viewed as [E * 2I, H] with
    [BLOCK_N1, BLOCK_K1] blocks; w13_scale viewed as [E, 2I]; launch: pdl_launch's arguments."""
    e, two_i, h = w13.shape
    inter = two_i // 2
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N1"]
    grid = (bexp.numel() * triton.cdiv(inter, bn),)
    _moe_gate_up_half_tail_kernel[grid](
        x_fp8, x_scale, w_desc, w13_scale, act, sorted_ids, bexp,
        num_pairs, topk, h, inter, x_fp8.stride(0), x_scale.stride(0), w13_scale.stride(0), w13_scale.stride(1),
        act.stride(0),
        DT=dt, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K1"], num_warps=cfg["W1"], num_stages=cfg["S1"], **launch,
    )


__all__ = ["moe_gate_up_half_tail"]

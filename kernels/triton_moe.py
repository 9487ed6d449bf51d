"""Triton fused MoE (kernels/fused_moe.py): SwiGLU experts over (token, slot) pairs grouped by expert.

  1. align     (triton_moe_align) pairs sorted by expert, each expert's run padded to BLOCK_M rows
  2. gate_up   grouped GEMM x[token] @ w13[e]^T for the gate and up rows of the same BLOCK_N columns, then
               silu(gate) * up in the epilogue -> act [rows, I] (activation dtype, sorted row order). At decode
               sizes split-K: fp32 partial tiles + a per-tile ticket; the last split reduces and runs the
               epilogue (tickets reset themselves, so the counters stay zero for the next launch / graph replay)
  3. down      grouped GEMM act @ w2[e]^T -> y [T*k, H] (activation dtype, in pair order t*k + j)
  4. reduce    out[t] = sum_j y[t*k + j] * topk_weights[t, j] in fp32 -> activation dtype
               (kernels/triton_moe_segments.topk_sum)

Quantization ("none" | "fp8_channel" | "fp8_block") as in the reference: x is quantized per token (channel)
or per 1x128 group (block) -- at decode sizes inside the gate_up kernel, at larger sizes by a separate quant
kernel -- and act per row (channel: a first pass over the row finds its amax) or per 1x128 group (block) inside
the down kernel. The torch reference's bf16 roundings (linear outputs, silu, product) are reproduced.

Accumulation: at decode sizes the FP8 products of each K tile are summed in fp32 outside the MMA; above them
(config FAST_ACC) inside it (Hopper's FP8 MMA adds with fewer mantissa bits than fp32 -- still finer than the
bf16 outputs -- and it is 22% faster at 4096 tokens). Output pointers are built from the unclamped column index
with a mask: a `tl.where`-clamped index hides the contiguity from Triton and scalarizes the stores (that once
made the down GEMM 6x slower at prefill sizes).

Launch configs come from kernels/configs/fused_moe/*.json keyed by (E, N = I, device, quant) and the token
count bucket; see `moe_config`. Config keys besides tiles: TMA1 / TMA2 (FP8 per channel above decode sizes: gate_up's
weight tiles, down's act and weight tiles through Hopper tensor descriptors); PERSIST2 (with TMA2: the down GEMM as
one program per SM walking the tiles, kernels/triton_moe_persistent.py).
"""
from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - a Triton without host tensor descriptors: pointer loads only
    TensorDescriptor = None

from kernels.triton_common import (
    INTERPRET, cdiv, device_name, dot_operand, next_pow2, pdl_launch, pdl_release, pdl_wait, round_to, tl_dtype,
    to_fp8, to_out, zeroed_counters, token_counts,
)
from kernels.triton_moe_segments import topk_sum
from kernels.triton_moe_align import max_blocks, moe_align
from kernels.triton_moe_persistent import moe_down_persistent
from kernels.triton_quant import quant_fp8_per_group, quant_fp8_per_token

_QUANT_IDS = {"none": 0, "fp8_channel": 1, "fp8_block": 2}
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs", "fused_moe")


@triton.jit
def _quant_tile(a, scale):
    """fp32 tile / per-row scale [BM, 1] -> float8e4nv, as the reference (clamp, round to nearest even)."""
    return to_fp8(tl.clamp(a / scale, -448.0, 448.0))


@triton.jit(**token_counts("NP"))
def _moe_gate_up_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, act_ptr, sorted_ptr, bexp_ptr, part_ptr, cnt_ptr,
    NP, TOPK, K, I, SPLIT_K,
    stride_xm, stride_xsm, stride_we, stride_wn, stride_wse, stride_wsn, stride_am,
    QUANT: tl.constexpr, A_MODE: tl.constexpr, DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr, PAIR: tl.constexpr, FAST_ACC: tl.constexpr,
    TMA: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    # A_MODE: 0 = x used as is (bf16 / fp8 already quantized), 2 = x in bf16, quantized here
    # TMA: w_ptr is a tensor descriptor of w13 viewed as [E * 2I, K] with [BLOCK_N, BLOCK_K] blocks (Hopper bulk
    # copies of the weight tiles; x rows are gathered by token, so they keep pointer loads)
    # PAIR: no alignment; block m is the single pair m (bexp_ptr = topk_ids), rows 1.. are padding
    num_n = tl.cdiv(I, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // num_n
    pid_n = pid % num_n
    pid_k = tl.program_id(1)
    e = tl.load(bexp_ptr + pid_m)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PAIR:
        pair = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, NP)
    else:
        pair = tl.load(sorted_ptr + rows)
    valid = pair < NP
    tok = tl.where(valid, pair // TOPK, 0).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < I
    # rn_c (clamped) only addresses weight rows / scales; output pointers use rn itself with a mask, because a
    # tl.where breaks Triton's contiguity analysis and the stores would be issued element by element
    rn_c = tl.where(mn, rn, 0).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_rows = x_ptr + tok[:, None] * stride_xm
    if TMA:
        w_row = e * (2 * I) + pid_n * BLOCK_N  # gate rows; up rows are I further (past I: masked at the store)
    else:
        wg = w_ptr + e64 * stride_we + rn_c[None, :] * stride_wn
        wu = wg + I * stride_wn
    k_iters = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_iters, SPLIT_K)
    k_begin = pid_k * per_split
    k_end = tl.minimum(k_begin + per_split, k_iters)

    if QUANT == 1 and A_MODE == 2:
        # per-token scale of x over the whole row
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for ki in range(0, k_iters):
            k = ki * BLOCK_K + rk
            a = tl.load(a_rows + k[None, :], mask=valid[:, None] & (k[None, :] < K), other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), 1))
        a_scale = tl.maximum(amax / 448.0, 1e-12)[:, None]

    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for ki in range(k_begin, k_end):
        k = ki * BLOCK_K + rk
        if TMA:
            a = tl.load(a_rows + k[None, :], mask=valid[:, None], other=0.0)
            bg = w_ptr.load([w_row, ki * BLOCK_K]).T
            bu = w_ptr.load([w_row + I, ki * BLOCK_K]).T
        elif EVEN_K:
            a = tl.load(a_rows + k[None, :], mask=valid[:, None], other=0.0)
            bg = tl.load(wg + k[:, None])
            bu = tl.load(wu + k[:, None])
        else:
            a = tl.load(a_rows + k[None, :], mask=valid[:, None] & (k[None, :] < K), other=0.0)
            bg = tl.load(wg + k[:, None], mask=k[:, None] < K, other=0.0)
            bu = tl.load(wu + k[:, None], mask=k[:, None] < K, other=0.0)
        if QUANT == 0:
            acc_g = tl.dot(dot_operand(a), dot_operand(bg), acc_g)
            acc_u = tl.dot(dot_operand(a), dot_operand(bu), acc_u)
        elif QUANT == 1:
            if A_MODE == 2:
                a = _quant_tile(a.to(tl.float32), a_scale)
            if FAST_ACC:  # accumulate in the MMA (Hopper: reduced-precision adds across all of K)
                acc_g = tl.dot(a, bg, acc_g)
                acc_u = tl.dot(a, bu, acc_u)
            else:  # fp32 accumulation across K tiles (see triton_fp8_gemm)
                acc_g += tl.dot(a, bg)
                acc_u += tl.dot(a, bu)
        else:
            if A_MODE == 2:
                sa = tl.maximum(tl.max(tl.abs(a.to(tl.float32)), 1) / 448.0, 1e-12)
                a = _quant_tile(a.to(tl.float32), sa[:, None])
            else:
                sa = tl.load(xs_ptr + tok * stride_xsm + ki)
            sg = tl.load(ws_ptr + e64 * stride_wse + (rn_c // 128) * stride_wsn + ki)
            su = tl.load(ws_ptr + e64 * stride_wse + ((rn_c + I) // 128) * stride_wsn + ki)
            acc_g += tl.dot(a, bg) * sa[:, None] * sg[None, :]
            acc_u += tl.dot(a, bu) * sa[:, None] * su[None, :]

    do_epilogue = True
    if SPLIT:
        tile = pid_m * num_n + pid_n
        base = part_ptr + (tile * SPLIT_K).to(tl.int64) * (2 * BLOCK_M * BLOCK_N)
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        mine = base + pid_k * (2 * BLOCK_M * BLOCK_N)
        tl.store(mine + offs, acc_g)
        tl.store(mine + BLOCK_M * BLOCK_N + offs, acc_u)
        tl.debug_barrier()  # every thread's partial stores precede the ticket (release)
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        do_epilogue = ticket == SPLIT_K - 1
        if do_epilogue:
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, SPLIT_K):
                p = base + s * (2 * BLOCK_M * BLOCK_N)
                acc_g += tl.load(p + offs, cache_modifier=".cg")
                acc_u += tl.load(p + BLOCK_M * BLOCK_N + offs, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + tile, 0)
    if do_epilogue:
        g = acc_g
        u = acc_u
        if QUANT == 1:
            if A_MODE == 2:
                sa = a_scale
            else:
                sa = tl.load(xs_ptr + tok * stride_xsm)[:, None]
            sg = tl.load(ws_ptr + e64 * stride_wse + rn_c * stride_wsn)
            su = tl.load(ws_ptr + e64 * stride_wse + (rn_c + I) * stride_wsn)
            g = g * sa * sg[None, :]
            u = u * sa * su[None, :]
        g = round_to(g, DT)
        u = round_to(u, DT)
        s = round_to(g / (1.0 + tl.exp(-g)), DT)
        h = s * u
        out = act_ptr + rows.to(tl.int64)[:, None] * stride_am + rn[None, :]
        tl.store(out, to_out(h, act_ptr.dtype.element_ty), mask=mn[None, :])


@triton.jit(**token_counts("NP"))
def _moe_down_kernel(
    act_ptr, as_ptr, w_ptr, ws_ptr, y_ptr, sorted_ptr, bexp_ptr, tw_ptr, ids_ptr, out_ptr, cnt_ptr,
    NP, I, H, N_LOOP,
    stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_ym, stride_wt, stride_ot,
    QUANT: tl.constexpr, A_MODE: tl.constexpr, DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PAIR: tl.constexpr, FUSE_REDUCE: tl.constexpr, TOPK: tl.constexpr, FAST_ACC: tl.constexpr,
    I_P: tl.constexpr = 16, TMA: tl.constexpr = False, REMOTE: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    # A program takes one M block and N_LOOP consecutive N tiles (row indices, the act scale and the A rows
    # are fetched once and reused). FUSE_REDUCE: after writing its y rows, a program takes a ticket per
    # (token, N tile); the program that completes a token's top-k set sums them (weighted) into out and
    # resets the ticket. REMOTE (expert parallelism): ids_ptr (topk_ids) may hold -1, another rank's expert; such a
    # pair has no row here, so a token's set is its local pairs and the sum leaves the others out.
    # TMA: act_ptr and w_ptr are tensor descriptors, act (already quantized, rows in sorted order) as [rows, I]
    # with [BLOCK_M, BLOCK_K] blocks and w2 as [E * H, I] with [BLOCK_N, BLOCK_K] blocks; K past I reads zeros.
    # Padding rows read whatever act holds there: an MMA row depends on its own A row only, and they are not stored.
    num_n = tl.cdiv(H, BLOCK_N)
    num_nb = tl.cdiv(num_n, N_LOOP)
    pid = tl.program_id(0)
    pid_m = pid // num_nb
    pid_nb = pid % num_nb
    e = tl.load(bexp_ptr + pid_m)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PAIR:
        pair = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, NP)
    else:
        pair = tl.load(sorted_ptr + rows)
    valid = pair < NP
    pair_c = tl.where(valid, pair, 0).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    if not TMA:
        a_rows = act_ptr + rows.to(tl.int64)[:, None] * stride_am
    k_iters = tl.cdiv(I, BLOCK_K)
    if QUANT == 1:
        if A_MODE == 2 and PAIR:
            # one valid row per block (lane 0): its amax from one load of the whole row, not a K loop
            ri = tl.arange(0, I_P)
            lim = tl.where(pid_m < NP, I, 0)
            arow = tl.load(act_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_am + ri, mask=ri < lim, other=0.0)
            amax = tl.where(tl.arange(0, BLOCK_M) == 0, tl.max(tl.abs(arow.to(tl.float32)), 0), 0.0)
            a_scale = tl.maximum(amax / 448.0, 1e-12)[:, None]
        elif A_MODE == 2:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for ki in range(0, k_iters):
                k = ki * BLOCK_K + rk
                a = tl.load(a_rows + k[None, :], mask=valid[:, None] & (k[None, :] < I), other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), 1))
            a_scale = tl.maximum(amax / 448.0, 1e-12)[:, None]
        else:
            a_scale = tl.load(as_ptr + rows.to(tl.int64) * stride_asm)[:, None]
    for nt in range(0, N_LOOP):
        pid_n = pid_nb * N_LOOP + nt
        if pid_n < num_n:
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mn = rn < H
            rn_c = tl.where(mn, rn, 0).to(tl.int64)
            if not TMA:
                wb = w_ptr + e64 * stride_we + rn_c[None, :] * stride_wn
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for ki in range(0, k_iters):
                k = ki * BLOCK_K + rk
                if TMA:
                    a = act_ptr.load([pid_m * BLOCK_M, ki * BLOCK_K])
                    b = w_ptr.load([e * H + pid_n * BLOCK_N, ki * BLOCK_K]).T
                elif EVEN_K:
                    a = tl.load(a_rows + k[None, :], mask=valid[:, None], other=0.0)
                    b = tl.load(wb + k[:, None])
                else:
                    a = tl.load(a_rows + k[None, :], mask=valid[:, None] & (k[None, :] < I), other=0.0)
                    b = tl.load(wb + k[:, None], mask=k[:, None] < I, other=0.0)
                if QUANT == 0:
                    acc = tl.dot(dot_operand(a), dot_operand(b), acc)
                elif QUANT == 1:
                    if A_MODE == 2:
                        a = _quant_tile(a.to(tl.float32), a_scale)
                    if FAST_ACC:
                        acc = tl.dot(a, b, acc)
                    else:
                        acc += tl.dot(a, b)
                else:
                    if A_MODE == 2:
                        af = a.to(tl.float32)
                        sa = tl.maximum(tl.max(tl.abs(af), 1) / 448.0, 1e-12)
                        a = _quant_tile(af, sa[:, None])
                    else:
                        sa = tl.load(as_ptr + rows.to(tl.int64) * stride_asm + ki)
                    sb = tl.load(ws_ptr + e64 * stride_wse + (rn_c // 128) * stride_wsn + ki)
                    acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
            y = acc
            if QUANT == 1:
                sb = tl.load(ws_ptr + e64 * stride_wse + rn_c * stride_wsn)
                y = y * a_scale * sb[None, :]
            tl.store(y_ptr + pair_c[:, None] * stride_ym + rn[None, :], to_out(y, y_ptr.dtype.element_ty),
                     mask=valid[:, None] & mn[None, :])
            if FUSE_REDUCE:
                tok = pair_c // TOPK
                tl.debug_barrier()  # all y stores of this program precede its tickets (release)
                ctr = cnt_ptr + tok * num_n + pid_n
                old = tl.atomic_add(ctr, 1, mask=valid, sem="acq_rel")
                if REMOTE:
                    here = tl.zeros([BLOCK_M], dtype=tl.int32)
                    for j in tl.static_range(TOPK):
                        here += (tl.load(ids_ptr + tok * TOPK + j, mask=valid, other=-1) >= 0).to(tl.int32)
                    last = valid & (old == here - 1)
                else:
                    last = valid & (old == TOPK - 1)
                if tl.max(last.to(tl.int32), 0) > 0:
                    red = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                    lm = last[:, None] & mn[None, :]
                    for j in tl.static_range(TOPK):
                        lmj = lm
                        if REMOTE:
                            lmj = lm & (tl.load(ids_ptr + tok * TOPK + j, mask=last, other=-1) >= 0)[:, None]
                        yj = tl.load(y_ptr + (tok * TOPK + j)[:, None] * stride_ym + rn[None, :], mask=lmj,
                                     other=0.0, cache_modifier=".cg")
                        wj = tl.load(tw_ptr + tok * stride_wt + j, mask=last, other=0.0)
                        red += yj.to(tl.float32) * wj[:, None]
                    tl.store(out_ptr + tok[:, None] * stride_ot + rn[None, :],
                             to_out(red, out_ptr.dtype.element_ty), mask=lm)
                    tl.atomic_xchg(ctr, 0, mask=last)


# ----------------------------------------------------------------------------------------------- configs

def default_config(m: int, e: int, n: int, k: int, quant: str) -> dict:
    """Heuristic config for m tokens (used when no tuned table entry exists)."""
    block = quant == "fp8_block"
    if m <= 4:
        cfg = dict(BLOCK_M=16, BLOCK_N1=32, BLOCK_K1=256, SPLIT_K1=4, W1=4, S1=4, BLOCK_N2=64, BLOCK_K2=128, W2=4, S2=3)
    elif m <= 64:
        cfg = dict(BLOCK_M=16, BLOCK_N1=64, BLOCK_K1=128, SPLIT_K1=1, W1=4, S1=4, BLOCK_N2=64, BLOCK_K2=128, W2=4, S2=3)
    elif m <= 512:
        cfg = dict(BLOCK_M=32, BLOCK_N1=64, BLOCK_K1=128, SPLIT_K1=1, W1=4, S1=4, BLOCK_N2=128, BLOCK_K2=128, W2=4, S2=3)
    elif m <= 2048:
        cfg = dict(BLOCK_M=64, BLOCK_N1=64, BLOCK_K1=128, SPLIT_K1=1, W1=4, S1=4, BLOCK_N2=128, BLOCK_K2=128, W2=4, S2=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N1=64, BLOCK_K1=128, SPLIT_K1=1, W1=8, S1=3, BLOCK_N2=256, BLOCK_K2=128, W2=8, S2=3)
    # Above decode sizes the GEMMs are compute-bound and accumulating inside the MMA pays (22% at 4096 tokens,
    # N = 1536 on H200); its Hopper FP8 adds keep fewer mantissa bits than fp32 but more than the bf16 output.
    cfg["FAST_ACC"] = m > 64
    if block:
        cfg["BLOCK_K1"] = cfg["BLOCK_K2"] = 128
    return cfg


SHARED_MEMORY_BUDGET = 200 * 1024  # of the 227 KiB a Hopper block may have: room for the epilogue's scratch


def fit_stages_unquantized(cfg: dict, elem_bytes: int) -> dict:
    """The config with pipeline stages lowered where unquantized A and B tiles (x / act and the weights, elem_bytes
    each: 2 for bf16, 4 for fp32) of that many stages would not fit in shared memory: the FP8-sized 128 x 256 x 128
    down tiles at 3 stages need 288 KiB in bf16 (Triton: OutOfResources on the first step of more than 2048 tokens),
    and fp32 weights double every tile (the 4-token decode tiles at 4 stages: 240 KiB on an H100, session 30)."""
    cfg = dict(cfg)
    for s, bn, bk, b_tiles in (("S1", "BLOCK_N1", "BLOCK_K1", 2), ("S2", "BLOCK_N2", "BLOCK_K2", 1)):
        stage = elem_bytes * cfg[bk] * (cfg["BLOCK_M"] + b_tiles * cfg[bn])  # gate_up loads the gate and up tiles
        cfg[s] = max(1, min(cfg[s], SHARED_MEMORY_BUDGET // stage))
    return cfg


def config_file(e: int, n: int, device: str, quant: str) -> str:
    return os.path.join(CONFIG_DIR, f"E={e},N={n},device={device},quant={quant}.json")


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> dict[int, dict] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        raw = json.load(f)
    return {int(m): cfg for m, cfg in raw.items() if not m.startswith("_")}


@functools.lru_cache(maxsize=None)
def _table_for(e: int, n: int, device: str, quant: str) -> dict[int, dict] | None:
    """The table for (E, N, device, quant); else the one of the nearest E with the same N (the launch config
    hardly depends on E: E=160 without shared-expert fusion reuses E=161's)."""
    table = _load_table(config_file(e, n, device, quant))
    if table is not None or not os.path.isdir(CONFIG_DIR):
        return table
    best = None
    suffix = f",N={n},device={device},quant={quant}.json"
    for name in os.listdir(CONFIG_DIR):
        if name.startswith("E=") and name.endswith(suffix):
            other = int(name[2:].split(",")[0])
            if best is None or abs(other - e) < abs(best - e):
                best = other
    return None if best is None else _load_table(config_file(best, n, device, quant))


def moe_config(m: int, e: int, n: int, k: int, quant: str, device: torch.device) -> dict:
    """Tuned config for the smallest bucket >= m tokens (else the largest bucket), or the heuristic."""
    table = _table_for(e, n, device_name(device), quant)
    if table:
        buckets = sorted(table)
        bucket = next((b for b in buckets if b >= m), buckets[-1])
        cfg = dict(default_config(m, e, n, k, quant))
        cfg.update(table[bucket])
        if quant == "fp8_block":
            cfg["BLOCK_K1"] = cfg["BLOCK_K2"] = 128
        return cfg
    return default_config(m, e, n, k, quant)


# ----------------------------------------------------------------------------------------------- launch

@functools.lru_cache(maxsize=None)
def _tma_capable(device: str) -> bool:
    """Host tensor descriptors lower to Hopper bulk copies (TMA): sm_90+, or the CPU interpreter (tests)."""
    if TensorDescriptor is None:
        return False
    if INTERPRET:
        return True
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (9, 0)


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Every tensor 2-D-viewable for a descriptor: rows 16-byte aligned, base 16-byte aligned."""
    return all(t.stride(-1) == 1 and (t.shape[-1] * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in tensors)


def _desc(t: torch.Tensor, block: list[int]):
    """A descriptor of t viewed as [rows, last dim] with blocks of `block` (TMA zero-fills past the edges)."""
    return TensorDescriptor.from_tensor(t.view(-1, t.shape[-1]), block)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    quant: str = "none",
    config: dict | None = None,
    quant_in_kernel: bool | None = None,
    x_fp8: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    remote_ids: bool = False,
) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_* [T, k] -> [T, H] in x.dtype (see the module doc).

    x_fp8 / x_scale: x already quantized per token (fp8_channel only), e.g. by the preceding RMSNorm kernel.
    quant_in_kernel: quantize act (channel) / x and act (block) inside the GEMMs; default for T <= 64.
    remote_ids: topk_ids may hold -1 (expert parallelism: an expert on another rank); those pairs add nothing, and
    a token with no local pair gets 0.
    config keys besides the tile sizes: PAIR_MAX (use no alignment when T*k <= it), FUSE_REDUCE_MAX_T.
    """
    t, h = x.shape
    e, two_i, _ = w13.shape
    inter = two_i // 2
    topk = topk_ids.shape[1]
    qid = _QUANT_IDS[quant]
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    cfg = dict(config) if config else moe_config(t, e, inter, h, quant, x.device)
    if quant == "fp8_block":
        cfg["BLOCK_K1"] = cfg["BLOCK_K2"] = 128
    if qid == 0 and not config:  # unquantized weights: the configs' stages are sized for FP8 tiles
        cfg = fit_stages_unquantized(cfg, w13.element_size())
    bm = cfg["BLOCK_M"]
    if x.stride(1) != 1:
        x = x.contiguous()
    assert w13.stride(2) == 1 and w2.stride(2) == 1
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    np_ = t * topk
    pair = np_ <= cfg.get("PAIR_MAX", 40)
    if pair:
        sorted_ids, bexp = ids, ids.view(-1)  # block m = pair m
        nblk = np_
    else:
        sorted_ids, bexp = moe_align(ids, e, bm)
        nblk = bexp.numel()
    if quant_in_kernel is None:
        quant_in_kernel = t <= 64
    if qid == 0:
        xa, xs, a_mode = x, x, 0
    elif qid == 1:
        if x_fp8 is None:
            x_fp8, x_scale = quant_fp8_per_token(x)
        xa, xs, a_mode = x_fp8, x_scale, 0
    elif quant_in_kernel:
        xa, xs, a_mode = x, x, 2
    else:
        xa, xs = quant_fp8_per_group(x, 128)
        a_mode = 0
    dt = tl_dtype(x.dtype)
    w13s = w13_scale if w13_scale is not None else w13
    w2s = w2_scale if w2_scale is not None else w2
    if qid == 1:
        w13s, w2s = w13s.view(e, -1), w2s.view(e, -1)
    ws13_strides = (w13s.stride(0), w13s.stride(1)) if qid else (0, 0)
    ws2_strides = (w2s.stride(0), w2s.stride(1)) if qid else (0, 0)

    act = torch.empty(nblk * bm, inter, dtype=x.dtype, device=x.device)
    bn1, split = cfg["BLOCK_N1"], cfg["SPLIT_K1"]
    # TMA1 / TMA2 (configs above decode sizes): weight tiles (gate_up), act and weight tiles (down) by bulk copies
    tma = qid == 1 and not pair and _tma_capable(str(x.device))
    tma1 = tma and bool(cfg.get("TMA1")) and split == 1 and cfg["BLOCK_K1"] <= 128 and _tma_ok(w13)
    w13_arg = _desc(w13, [bn1, cfg["BLOCK_K1"]]) if tma1 else w13
    n1 = cdiv(inter, bn1)
    if split > 1:
        part = torch.empty(nblk * n1 * split * 2 * bm * bn1, dtype=torch.float32, device=x.device)
        cnt = zeroed_counters(nblk * n1, x.device)
    else:
        part = cnt = act
    _moe_gate_up_kernel[(nblk * n1, split)](
        xa, xs, w13_arg, w13s, act, sorted_ids, bexp, part, cnt,
        np_, topk, h, inter, split,
        xa.stride(0), xs.stride(0) if qid else 0, w13.stride(0), w13.stride(1), *ws13_strides, act.stride(0),
        QUANT=qid, A_MODE=a_mode, DT=dt, BLOCK_M=bm, BLOCK_N=bn1, BLOCK_K=cfg["BLOCK_K1"], SPLIT=split > 1,
        EVEN_K=h % cfg["BLOCK_K1"] == 0, PAIR=pair, FAST_ACC=bool(cfg.get("FAST_ACC", False)), TMA=tma1,
        num_warps=cfg["W1"], num_stages=cfg["S1"], **pdl_launch(xa.device),
    )
    y = torch.empty(np_, h, dtype=x.dtype, device=x.device)
    bn2 = cfg["BLOCK_N2"]
    n2 = cdiv(h, bn2)
    if qid == 0 or quant_in_kernel:
        act_a, act_s, a2_mode = act, act, 2 if qid else 0
    elif qid == 1:
        act_a, act_s = quant_fp8_per_token(act)
        a2_mode = 0
    else:
        act_a, act_s = quant_fp8_per_group(act, 128)
        a2_mode = 0
    tw = topk_weights if topk_weights.stride(1) == 1 else topk_weights.contiguous()
    fuse = t <= cfg.get("FUSE_REDUCE_MAX_T", 256)
    if remote_ids and fuse:  # the fused reduce writes only tokens with a local pair
        out.zero_()
    sum_ids = ids if remote_ids else None
    cnt2 = zeroed_counters(t * n2, x.device) if fuse else y
    n_loop = max(1, min(cfg.get("N_LOOP2", 1), n2))
    bk2 = cfg["BLOCK_K2"]
    tma2 = tma and bool(cfg.get("TMA2")) and a2_mode == 0 and bk2 <= 128 and _tma_ok(act_a, w2)
    act_arg, w2_arg = (_desc(act_a, [bm, bk2]), _desc(w2, [bn2, bk2])) if tma2 else (act_a, w2)
    if tma2 and not fuse and bool(cfg.get("PERSIST2")):  # one program per SM walks the tiles
        moe_down_persistent(act_arg, act_s, w2_arg, w2, w2s, y, sorted_ids, bexp, np_, inter, cfg)
        topk_sum(y, tw, out, sum_ids)
        return out
    _moe_down_kernel[(nblk * cdiv(n2, n_loop),)](
        act_arg, act_s, w2_arg, w2s, y, sorted_ids, bexp, tw, ids, out, cnt2, np_, inter, h, n_loop,
        act_a.stride(0), act_s.stride(0) if qid else 0, w2.stride(0), w2.stride(1), *ws2_strides, y.stride(0),
        tw.stride(0), out.stride(0),
        QUANT=qid, A_MODE=a2_mode, DT=dt, BLOCK_M=bm, BLOCK_N=bn2, BLOCK_K=cfg["BLOCK_K2"],
        EVEN_K=inter % cfg["BLOCK_K2"] == 0, PAIR=pair, FUSE_REDUCE=fuse, TOPK=topk,
        FAST_ACC=bool(cfg.get("FAST_ACC", False)), I_P=next_pow2(inter), TMA=tma2, REMOTE=remote_ids and fuse,
        num_warps=cfg["W2"],
        num_stages=cfg["S2"],
        **pdl_launch(y.device),
    )
    if not fuse:
        topk_sum(y, tw, out, sum_ids)
    return out


__all__ = ["fused_moe", "moe_config", "default_config", "config_file", "fit_stages_unquantized", "max_blocks"]

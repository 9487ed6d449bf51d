"""Triton paged attention over the KV cache layout of kernels/attention.py (bf16 or FP8 pages with per-tensor
k_scale / v_scale), matching paged_attention_ref.

decode   one new token per sequence (max_query_len == 1). Grid (B, Hk, splits): a program takes all the q
         heads of one KV head (GQA group, padded to 16 rows for the tensor cores) and one contiguous slice of
         the sequence, so every K/V page is read once per KV head. Long contexts are cut into splits (chosen
         from max_seq_len and the SM count); each writes a normalized partial output and its log-sum-exp, and
         a reduce kernel merges them. Split boundaries are computed in the kernel from the real length, so a
         CUDA graph captured with one split count stays correct for any length.
verify   1 < max_query_len <= 16 (speculative verification of k+1 tokens, or decode rows mixed with them):
         grid (row blocks x Hk, B, splits). A program takes the q_len x G query rows (query-major: row
         r = i * G + g) of one KV head of one sequence (up to BLOCK_M of them; more rows take more row blocks)
         and one split of its keys, so every K/V page is read once per KV head and row block. Row i sees keys
         0 .. seq_len - q_len + i: tiles every row sees skip the mask. Same split / reduce scheme as decode,
         partial results indexed by token (works for any q_len <= max_query_len per sequence, 0 included).
extend   varlen prefill / chunked prefill / speculative verification over a cached prefix: query i of a
         sequence with q_len new tokens sits at position seq_len - q_len + i and sees keys 0 .. that position
         (all keys are read from the cache, so store_kv runs first). Grid (q blocks, Hq, B); tiles below the
         diagonal skip the mask.

Online softmax in fp32 with exp2 (scale folded with log2 e); P is rounded to the query dtype for the P @ V
tensor-core product (flash-attention style), FP8 pages are widened to the query dtype (exact).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import (cdiv, dot_operand, next_pow2, not_specialized, num_sms, pdl_launch, pdl_release,
                                   pdl_wait, to_out)

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(cache_ptr, bt_row, j, jm, hk, stride_slot, stride_h, BS: tl.constexpr, D: tl.constexpr,
                  QDT: tl.constexpr):
    """Rows j (token indices of one sequence) of one KV head from the paged cache -> [BLOCK_N, D] in QDT."""
    page = tl.load(bt_row + j // BS, mask=jm, other=0).to(tl.int64)
    slot = page * BS + (j % BS)
    d = tl.arange(0, D)
    x = tl.load(cache_ptr + slot[:, None] * stride_slot + hk * stride_h + d[None, :], mask=jm[:, None], other=0.0)
    return x.to(QDT)


@triton.jit(**not_specialized("SPLITS"))
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, len_ptr, qsl_ptr, o_ptr, po_ptr, plse_ptr, amax_ptr,
    qk_scale, v_scale, HQ, SPLITS,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_kslot, stride_kh, stride_vslot, stride_vh,
    G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
    MULTI: tl.constexpr, QDT: tl.constexpr, ABSMAX: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    tok = tl.load(qsl_ptr + b).to(tl.int64)
    L = tl.load(len_ptr + b)
    per = tl.cdiv(tl.cdiv(L, SPLITS), BLOCK_N) * BLOCK_N
    j0 = sp * per
    j1 = tl.minimum(j0 + per, L)
    gi = tl.arange(0, G_P)
    gm = gi < G
    heads = hk * G + gi
    d = tl.arange(0, D)
    q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=gm[:, None], other=0.0)
    q = q.to(QDT)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.zeros([G_P], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([G_P], dtype=tl.float32)
    acc = tl.zeros([G_P, D], dtype=tl.float32)
    jn = tl.arange(0, BLOCK_N)
    for start in range(j0, j1, BLOCK_N):
        j = start + jn
        jm = j < j1
        k = _load_kv_tile(kc_ptr, bt_row, j, jm, hk, stride_kslot, stride_kh, BS, D, QDT)
        v = _load_kv_tile(vc_ptr, bt_row, j, jm, hk, stride_vslot, stride_vh, BS, D, QDT)  # in flight with k
        s = tl.dot(dot_operand(q), dot_operand(tl.trans(k))) * qk_scale
        s = tl.where(jm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(dot_operand(p.to(QDT)), dot_operand(v))
        m_i = m_new
    if not MULTI:
        o = to_out(acc / l_i[:, None] * v_scale, o_ptr.dtype.element_ty)
        tl.store(o_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :], o, mask=gm[:, None])
        if ABSMAX:  # max |o| per head, for the per-token FP8 quantization of o_proj's input
            tl.store(amax_ptr + tok * HQ + heads, tl.max(tl.abs(o.to(tl.float32)), 1), mask=gm)
    else:
        # normalized partial output + log2-sum-exp2 of this split (empty split: lse = -inf, o = 0)
        has = l_i > 0
        o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        row = (b.to(tl.int64) * HQ + heads) * SPLITS + sp
        tl.store(po_ptr + row[:, None] * D + d[None, :], o, mask=gm[:, None])
        tl.store(plse_ptr + row, lse, mask=gm)


@triton.jit(**not_specialized("SPLITS"))
def _decode_reduce_kernel(
    po_ptr, plse_ptr, qsl_ptr, o_ptr, amax_ptr, v_scale, HQ, SPLITS, stride_ot, stride_oh,
    S_P: tl.constexpr, D: tl.constexpr, ABSMAX: tl.constexpr = False,
    PDL: tl.constexpr = False, BY_TOKEN: tl.constexpr = False,
):
    # grid (B, Hq) over the decode kernel's partials (indexed by sequence), or with BY_TOKEN (T, Hq) over the
    # verify kernel's (indexed by token)
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    if BY_TOKEN:
        tok = b.to(tl.int64)
    else:
        tok = tl.load(qsl_ptr + b).to(tl.int64)
    si = tl.arange(0, S_P)
    sm = si < SPLITS
    row = (b.to(tl.int64) * HQ + h) * SPLITS + si
    lse = tl.load(plse_ptr + row, mask=sm, other=float("-inf"))
    mx = tl.max(lse, 0)
    w = tl.where(sm & (lse > float("-inf")), tl.exp2(lse - mx), 0.0)
    d = tl.arange(0, D)
    po = tl.load(po_ptr + row[:, None] * D + d[None, :], mask=sm[:, None], other=0.0)
    o = to_out(tl.sum(po * w[:, None], 0) / tl.sum(w, 0) * v_scale, o_ptr.dtype.element_ty)
    tl.store(o_ptr + tok * stride_ot + h * stride_oh + d, o)
    if ABSMAX:
        tl.store(amax_ptr + tok * HQ + h, tl.max(tl.abs(o.to(tl.float32)), 0))


@triton.jit
def _verify_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, start, j1, lim, hk, qk_scale,
                 stride_kslot, stride_kh, stride_vslot, stride_vh,
                 D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, QDT: tl.constexpr, MASK: tl.constexpr):
    """One KV tile of the verify online softmax. MASK: row r sees keys j <= lim[r] only (causal + split end);
    without it every row sees every key of the tile."""
    j = start + tl.arange(0, BLOCK_N)
    jm = j < j1
    k = _load_kv_tile(kc_ptr, bt_row, j, jm, hk, stride_kslot, stride_kh, BS, D, QDT)
    v = _load_kv_tile(vc_ptr, bt_row, j, jm, hk, stride_vslot, stride_vh, BS, D, QDT)  # in flight with k
    s = tl.dot(dot_operand(q), dot_operand(tl.trans(k))) * qk_scale
    if MASK:
        s = tl.where(j[None, :] <= lim[:, None], s, float("-inf"))
        # keys past a row's limit get p = 0, but 0 * NaN would still reach it through P @ V: the last keys of a
        # chain may be unwritten padding slots
        v = tl.where(tl.abs(v) < float("inf"), v, 0.0)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see no key of this split yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(dot_operand(p.to(QDT)), dot_operand(v))
    return acc, m_new, l_i


@triton.jit(**not_specialized("SPLITS"))
def _verify_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, len_ptr, qsl_ptr, o_ptr, po_ptr, plse_ptr, amax_ptr,
    qk_scale, v_scale, HQ, SPLITS,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_kslot, stride_kh, stride_vslot, stride_vh,
    G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    RB: tl.constexpr, MULTI: tl.constexpr, QDT: tl.constexpr, ABSMAX: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    rb = tl.program_id(0) % RB  # the row blocks of one KV head are neighbours: their K/V reads share L2
    hk = tl.program_id(0) // RB
    b = tl.program_id(1)
    sp = tl.program_id(2)
    q0 = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q0
    if rb * BLOCK_M >= q_len * G:  # no real row in this block (a shorter chain, or no new token at all)
        return
    L = tl.load(len_ptr + b)
    per = tl.cdiv(tl.cdiv(L, SPLITS), BLOCK_N) * BLOCK_N
    j0 = sp * per
    j1 = tl.minimum(j0 + per, L)
    r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = r // G  # query of the chain
    heads = hk * G + (r - qi * G)
    rm = qi < q_len
    tok = (q0 + qi).to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=rm[:, None],
                other=0.0)
    q = q.to(QDT)
    lim = tl.minimum(L - q_len + qi, j1 - 1)  # last key row r sees in this split
    # tiles below every row's limit (keys <= L - q_len) and inside the split run without the mask
    full_end = j0 + tl.maximum(tl.minimum(j1, L - q_len + 1) - j0, 0) // BLOCK_N * BLOCK_N
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(j0, full_end, BLOCK_N):
        acc, m_i, l_i = _verify_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, start, j1, lim, hk, qk_scale,
                                     stride_kslot, stride_kh, stride_vslot, stride_vh, D, BS, BLOCK_N, QDT, False)
    for start in range(full_end, j1, BLOCK_N):
        acc, m_i, l_i = _verify_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, start, j1, lim, hk, qk_scale,
                                     stride_kslot, stride_kh, stride_vslot, stride_vh, D, BS, BLOCK_N, QDT, True)
    has = l_i > 0  # a row sees no key only in a split past its limit (or with seq_len < q_len, bad input)
    l_safe = tl.where(has, l_i, 1.0)
    if not MULTI:
        o = to_out(acc / l_safe[:, None] * v_scale, o_ptr.dtype.element_ty)
        tl.store(o_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :], o, mask=rm[:, None])
        if ABSMAX:
            tl.store(amax_ptr + tok * HQ + heads, tl.max(tl.abs(o.to(tl.float32)), 1), mask=rm)
    else:
        o = acc / l_safe[:, None]
        lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
        row = (tok * HQ + heads) * SPLITS + sp
        tl.store(po_ptr + row[:, None] * D + d[None, :], o, mask=rm[:, None])
        tl.store(plse_ptr + row, lse, mask=rm)


@triton.jit
def _extend_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, start, kv_end, qpos, hk, qk_scale,
                 stride_kslot, stride_kh, stride_vslot, stride_vh,
                 D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, QDT: tl.constexpr, MASK: tl.constexpr):
    """One KV tile of the online softmax. MASK: apply the causal / length mask (diagonal and last tiles only)."""
    j = start + tl.arange(0, BLOCK_N)
    jm = j < kv_end
    k = _load_kv_tile(kc_ptr, bt_row, j, jm, hk, stride_kslot, stride_kh, BS, D, QDT)
    s = tl.dot(dot_operand(q), dot_operand(tl.trans(k))) * qk_scale
    if MASK:
        s = tl.where(jm[None, :] & (j[None, :] <= qpos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet (padding rows)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv_tile(vc_ptr, bt_row, j, jm, hk, stride_vslot, stride_vh, BS, D, QDT)
    acc = acc * alpha[:, None] + tl.dot(dot_operand(p.to(QDT)), dot_operand(v))
    return acc, m_new, l_i


@triton.jit
def _extend_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, len_ptr, qsl_ptr, o_ptr,
    qk_scale, v_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_kslot, stride_kh, stride_vslot, stride_vh,
    G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    QDT: tl.constexpr,
):
    # grid (q blocks, Hq, B) with the q-block index reversed: the longest (last) blocks of a causal prompt start
    # first, so the short ones fill the tail of the wave
    qb = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q0 = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q0
    if qb * BLOCK_M >= q_len:
        return
    L = tl.load(len_ptr + b)
    hk = h // G
    mi = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = mi < q_len
    qpos = L - q_len + mi  # absolute key position each query may see up to
    d = tl.arange(0, D)
    tok = (q0 + mi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + d[None, :], mask=mmask[:, None], other=0.0)
    q = q.to(QDT)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    kv_end = tl.minimum(L, L - q_len + (qb + 1) * BLOCK_M)
    # keys every row of the block sees (j <= the first row's position < L): no mask
    full_end = ((L - q_len + qb * BLOCK_M + 1) // BLOCK_N) * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _extend_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, start, kv_end, qpos, hk, qk_scale,
                                     stride_kslot, stride_kh, stride_vslot, stride_vh, D, BS, BLOCK_N, QDT, False)
    for start in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _extend_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, start, kv_end, qpos, hk, qk_scale,
                                     stride_kslot, stride_kh, stride_vslot, stride_vh, D, BS, BLOCK_N, QDT, True)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale
    tl.store(o_ptr + tok[:, None] * stride_ot + h * stride_oh + d[None, :], to_out(o, o_ptr.dtype.element_ty),
             mask=mmask[:, None])


def _cache_strides(c: torch.Tensor) -> tuple[int, int]:
    assert c.stride(-1) == 1 and c.stride(0) == c.shape[1] * c.stride(1), "cache pages must be dense"
    return c.stride(1), c.stride(2)


def decode_splits(batch: int, kv_heads: int, max_seq_len: int, num_sms: int, block_n: int = 64,
                  waves: int = 2) -> int:
    """Enough (batch, kv head, split) programs for about `waves` waves, each split at least 2 KV tiles long."""
    want = cdiv(waves * num_sms, max(1, batch * kv_heads))
    return max(1, min(want, cdiv(max_seq_len, 2 * block_n), 64))


def decode_config(batch: int, kv_heads: int, max_seq_len: int, num_sms: int, fp8_kv: bool) -> dict:
    """Decode launch defaults. bf16 pages: 64-token tiles, two waves. FP8 pages (H200 sweeps at 4K context,
    `bench.decode_b1_sweep --attention-cases`, RESULTS session 5): 128-token tiles, but 64-token ones when there
    are only a few (sequence, KV head) pairs and so many short splits (B=1 at 2 KV heads: 9.5 -> 7.0 us); one wave
    of splits and 3 stages from 128 pairs (B=64 at 2 KV heads: 84 -> 67 us), 3 stages from 64."""
    if not fp8_kv:
        return dict(block_n=64, splits=decode_splits(batch, kv_heads, max_seq_len, num_sms, 64), stages=2)
    pairs = batch * kv_heads
    block_n = 64 if pairs <= 4 else 128
    splits = decode_splits(batch, kv_heads, max_seq_len, num_sms, block_n, waves=1 if pairs >= 128 else 2)
    return dict(block_n=block_n, splits=splits, stages=3 if pairs >= 64 else 2)


VERIFY_MAX_Q = 16  # the verify kernel serves 1 < max_query_len <= this; longer queries take the extend kernel


def verify_splits(programs: int, max_seq_len: int, num_sms: int, block_n: int, per_sm: int) -> int:
    """Splits for `programs` (sequence, KV head, row block) triples so that they all fit in one wave of `per_sm`
    resident programs per SM (a partial second wave doubles the chain of dependent KV tiles), each split at
    least 2 KV tiles long. Fewer splits than decode also keep the fp32 partials (q_len x G rows per split, as
    many bytes as the split's K/V at 4 x 12 rows and 128 keys) from costing more than the K/V themselves."""
    return max(1, min(per_sm * num_sms // max(1, programs), cdiv(max_seq_len, 2 * block_n), 64))


def verify_config(batch: int, kv_heads: int, group: int, max_query_len: int, max_seq_len: int, num_sms: int,
                  fp8_kv: bool) -> dict:
    """Verify launch defaults: the q_len x G rows of a KV head in one block of up to 128 rows (4 warps up to 64
    rows, counted as two resident programs per SM; 8 warps and one above), splits from verify_splits; tiles and
    stages as decode (bf16: 64 keys, 2 stages; FP8: 128 keys from 64 rows on and more than 4 programs, 3 stages
    from 64 programs). H200 sweep, 4K context (bench/RESULTS.md): these splits beat decode's two-wave rule at
    B=4, q_len 8 (55.5 -> 51.3 us bf16, 52.6 -> 48.1 FP8) and equal it at B=1 / 64, q_len 4."""
    rows = max_query_len * group
    block_m = min(128, max(16, next_pow2(rows)))
    rb = cdiv(rows, block_m)
    programs = batch * kv_heads * rb
    # FP8 below 64 rows runs mma.sync (no wgmma) where 128-key tiles spill
    block_n = 128 if fp8_kv and programs > 4 and block_m >= 64 else 64
    stages = 3 if fp8_kv and programs >= 64 else 2
    per_sm = 1 if block_m > 64 else 2
    splits = verify_splits(programs, max_seq_len, num_sms, block_n, per_sm)
    return dict(block_m=block_m, row_blocks=rb, block_n=block_n, splits=splits, warps=8 if block_m > 64 else 4,
                stages=stages)


def extend_config(max_query_len: int, head_dim: int) -> dict:
    """Extend launch config: 16-row blocks for verification-sized queries, 128 x 128 tiles for long prompts (3
    stages: 7-11% faster than 2 at 2K-16K tokens on every head layout from 12/1 to 96/8, with and without a 4K
    prefix, bench/extend_tiles.py on the H200, session 20)."""
    if max_query_len <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, W=4, S=2)
    if max_query_len <= 1024 or head_dim > 128:  # measured on H200: 64 x 64 best up to ~1K-token prompts
        return dict(BLOCK_M=64, BLOCK_N=64, W=4, S=2)
    return dict(BLOCK_M=128, BLOCK_N=128, W=8, S=3)


def attention_path(max_query_len: int, tokens: int, batch: int) -> str:
    """Which kernel serves a batch: decode (one token per sequence), verify (1 < max_query_len <= 16, or
    single tokens with sequences that have none), extend (longer queries)."""
    if max_query_len == 1 and tokens == batch:
        return "decode"
    return "verify" if max_query_len <= VERIFY_MAX_Q else "extend"


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    absmax_out: torch.Tensor | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D] in q.dtype. absmax_out (fp32 [T, Hq], optional) receives max |o| per token
    and head, written by the decode and verify kernels themselves (a following per-token FP8 quantization then
    needs no pass over o). max_query_len / max_seq_len: host-side hints (computed with a device sync when
    missing; max_query_len must not be below the real one); num_splits and the block / warp / stage arguments
    override the defaults; path ("decode" / "verify" / "extend") overrides attention_path (benchmarks, tests).

    With FP8 pages the products run in fp16 (the E4M3 -> fp16 conversion is one instruction; bf16 q loses
    nothing in fp16 at these magnitudes)."""
    t, hq, d = q.shape
    nb, bs, hk, _ = k_cache.shape
    assert hq % hk == 0 and d == next_pow2(d)
    out = torch.empty_like(q)
    b = seq_lens.numel()
    if t == 0 or b == 0:
        if absmax_out is not None:
            absmax_out.zero_()
        return out
    if absmax_out is not None:
        assert absmax_out.shape == (t, hq) and absmax_out.is_contiguous() and absmax_out.dtype == torch.float32
    if q.stride(-1) != 1:
        q = q.contiguous()
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    path = path or attention_path(max_query_len, t, b)
    assert path in ("decode", "verify", "extend"), path
    assert path != "decode" or (max_query_len == 1 and t == b), "decode: one token per sequence"
    fp8_kv = k_cache.dtype == torch.float8_e4m3fn
    if q.dtype == torch.float32:
        qdt = tl.float32
    elif fp8_kv or q.dtype == torch.float16:
        qdt = tl.float16
    else:
        qdt = tl.bfloat16
    args = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, float(scale) * float(k_scale) * LOG2E,
            float(v_scale), qdt)
    tune = dict(num_splits=num_splits, block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    if path == "extend":
        _launch_extend(*args, max_query_len, **tune)
        if absmax_out is not None:
            absmax_out.copy_(out.abs().amax(-1))
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item())
    launch = _launch_decode if path == "decode" else _launch_verify
    launch(*args, max_query_len, max_seq_len, absmax_out, **tune)
    return out


def _launch_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, query_start_loc: torch.Tensor, out: torch.Tensor, qk_scale: float,
                   v_scale: float, qdt, max_query_len: int, max_seq_len: int, absmax_out: torch.Tensor | None,
                   num_splits: int | None, block_m: int | None, block_n: int | None, num_warps: int | None,
                   num_stages: int | None) -> None:
    t, hq, d = q.shape
    nb, bs, hk, _ = k_cache.shape
    group = hq // hk
    b = seq_lens.numel()
    sms = num_sms(q.device.index or 0) if q.is_cuda else 132
    dflt = decode_config(b, hk, max_seq_len, sms, k_cache.dtype == torch.float8_e4m3fn)
    block_n = block_n or dflt["block_n"]
    splits = num_splits or (dflt["splits"] if block_n == dflt["block_n"] else
                            decode_splits(b, hk, max_seq_len, sms, block_n))
    g_p = max(16, next_pow2(group))
    if splits > 1:
        po = torch.empty(b * hq * splits * d, dtype=torch.float32, device=q.device)
        plse = torch.empty(b * hq * splits, dtype=torch.float32, device=q.device)
    else:
        po = plse = out
    absmax = absmax_out is not None
    amax = absmax_out if absmax else plse
    _decode_kernel[(b, hk, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, po, plse, amax,
        qk_scale, v_scale, hq, splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *_cache_strides(k_cache), *_cache_strides(v_cache),
        G=group, G_P=g_p, D=d, BS=bs, BLOCK_N=block_n, MULTI=splits > 1, QDT=qdt, ABSMAX=absmax,
        num_warps=num_warps or 4, num_stages=num_stages or dflt["stages"], **pdl_launch(q.device),
    )
    if splits > 1:
        _decode_reduce_kernel[(b, hq)](
            po, plse, query_start_loc, out, amax, v_scale, hq, splits, out.stride(0), out.stride(1),
            S_P=max(2, next_pow2(splits)), D=d, ABSMAX=absmax, num_warps=4, **pdl_launch(q.device),
        )


def _launch_verify(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, query_start_loc: torch.Tensor, out: torch.Tensor, qk_scale: float,
                   v_scale: float, qdt, max_query_len: int, max_seq_len: int, absmax_out: torch.Tensor | None,
                   num_splits: int | None, block_m: int | None, block_n: int | None, num_warps: int | None,
                   num_stages: int | None) -> None:
    # the grid depends on (B, Hk, max_query_len, max_seq_len) only, so a CUDA graph captured for them serves
    # any lengths up to those
    t, hq, d = q.shape
    nb, bs, hk, _ = k_cache.shape
    group = hq // hk
    b = seq_lens.numel()
    sms = num_sms(q.device.index or 0) if q.is_cuda else 132
    fp8_kv = k_cache.dtype == torch.float8_e4m3fn
    dflt = verify_config(b, hk, group, max_query_len, max_seq_len, sms, fp8_kv)
    block_m = block_m or dflt["block_m"]
    rb = cdiv(max_query_len * group, block_m)
    block_n = block_n or dflt["block_n"]
    splits = num_splits or (dflt["splits"] if (block_n, rb) == (dflt["block_n"], dflt["row_blocks"]) else
                            verify_splits(b * hk * rb, max_seq_len, sms, block_n, 1 if block_m > 64 else 2))
    if splits > 1:
        po = torch.empty(t * hq * splits * d, dtype=torch.float32, device=q.device)
        plse = torch.empty(t * hq * splits, dtype=torch.float32, device=q.device)
    else:
        po = plse = out
    absmax = absmax_out is not None
    amax = absmax_out if absmax else plse
    _verify_kernel[(rb * hk, b, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, po, plse, amax,
        qk_scale, v_scale, hq, splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *_cache_strides(k_cache), *_cache_strides(v_cache),
        G=group, D=d, BS=bs, BLOCK_M=block_m, BLOCK_N=block_n, RB=rb, MULTI=splits > 1, QDT=qdt, ABSMAX=absmax,
        num_warps=num_warps or (dflt["warps"] if block_m == dflt["block_m"] else 4 if block_m <= 64 else 8),
        num_stages=num_stages or dflt["stages"], **pdl_launch(q.device),
    )
    if splits > 1:
        _decode_reduce_kernel[(t, hq)](
            po, plse, query_start_loc, out, amax, v_scale, hq, splits, out.stride(0), out.stride(1),
            S_P=max(2, next_pow2(splits)), D=d, ABSMAX=absmax, BY_TOKEN=True, num_warps=4, **pdl_launch(q.device),
        )


def _launch_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, query_start_loc: torch.Tensor, out: torch.Tensor, qk_scale: float,
                   v_scale: float, qdt, max_query_len: int, num_splits: int | None, block_m: int | None,
                   block_n: int | None, num_warps: int | None, num_stages: int | None) -> None:
    t, hq, d = q.shape
    nb, bs, hk, _ = k_cache.shape
    b = seq_lens.numel()
    cfg = extend_config(max_query_len, d)
    block_m = block_m or cfg["BLOCK_M"]
    _extend_kernel[(cdiv(max_query_len, block_m), hq, b)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        qk_scale, v_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *_cache_strides(k_cache), *_cache_strides(v_cache),
        G=hq // hk, D=d, BS=bs, BLOCK_M=block_m, BLOCK_N=block_n or cfg["BLOCK_N"], QDT=qdt,
        num_warps=num_warps or cfg["W"], num_stages=num_stages or cfg["S"],
    )


__all__ = ["paged_attention", "attention_path", "decode_splits", "decode_config", "verify_splits",
           "verify_config", "extend_config",
           "VERIFY_MAX_Q"]


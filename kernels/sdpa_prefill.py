"""Prefill attention through torch's `scaled_dot_product_attention` (cuDNN on Hopper) over K/V gathered from the
paged cache (`--prefill-attention-backend sdpa`). Same signature and semantics as
`kernels.attention.paged_attention_ref` plus a `rest` callable for the rows this path does not take.

Which rows: a sequence with at least `min_prefill_tokens` new query tokens (default `sdpa_from_tokens`) is a
prefill row; its cached prefix + new tokens are gathered page by page into contiguous K/V in the query dtype
(FP8 pages widen exactly; k_scale is folded into the softmax scale, v_scale multiplies the gathered V) and attended
with SDPA. Every other sequence (decode, speculative verify, short chunks) goes to `rest` (our Triton kernels, or
flash_attn) as one sub-batch, so decode rows keep their kernels and their CUDA graphs.

Causal alignment. Query i of n new tokens sits at position kv_len - n + i and sees keys 0 .. kv_len - n + i (the
mask is aligned to the bottom-right corner of the [n, kv_len] score matrix). SDPA's `is_causal=True` is aligned to
the TOP-LEFT corner (torch docs; pytorch/pytorch#108108), so it is only right when there is no cached prefix
(n == kv_len). What the backends do with is_causal on a non-square matrix (torch sdp_utils.cpp): flash refuses it
(`check_flash_causal_non_square_seqlens`), cuDNN accepts it and builds its graph with `set_causal_mask(is_causal)`
(cudnn-frontend's top-left mask; torch does not call `set_causal_mask_bottom_right`), efficient / math apply
top-left. `torch.nn.attention.bias.causal_lower_right` reaches bottom-right only through the flash / efficient
kernels (never cuDNN), and an explicit [n, kv_len] mask is read once per head by cuDNN (GBs at 16K x 32K).
So, with a cached prefix of p = kv_len - n tokens:
  merge (default) two exact pieces and a log-sum-exp merge: the prefix part (every query sees all p prefix keys:
        no mask) and the new-token part (a square n x n causal matrix, where top-left == bottom-right); each
        returns its output and its log-sum-exp (the private ops `_scaled_dot_product_cudnn_attention`
        (compute_log_sumexp=True), else `_scaled_dot_product_flash_attention`, on CUDA;
        `_scaled_dot_product_flash_attention_for_cpu` on CPU), and o = o_new + sigmoid(lse_pre - lse_new) *
        (o_pre - o_new). No wasted FLOPs; one extra elementwise pass over the output.
  pad   public API only: p zero query rows in front make the matrix square (kv_len x kv_len, is_causal=True) and
        the last n output rows are kept. Exact, but the padding rows cost p^2/2 of extra score work (33% more at
        n = p, 2.3x at a chunk of 8K after a 24K prefix).
No prefix: one public SDPA call with is_causal=True.

GQA: `enable_gqa=True` (torch >= 2.5). The cuDNN backend takes K/V with fewer heads natively
(`check_batch_size_and_num_heads_dense<supports_gqa=true>` in can_use_cudnn_attention; it abides by enable_gqa since
pytorch/pytorch#149976, March 2025, before torch 2.11), as does flash; the efficient backend and math expand.
The private LSE ops take the grouped K/V as they are (SDPA passes them through unexpanded to the same ops).

One cuDNN plan per length bucket, not per length: cuDNN builds an execution plan per shape (40-90 ms on the H200,
up to 0.7 s, measured by bench/sdpa_shapes.py) and torch caches it by exact sequence lengths, so under serving --
every prompt a new length -- each prefill would pay a build. torch's `TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1`
(pytorch#155958, torch >= 2.9; opt-in, "experimental") runs BSHD-contiguous inputs without a bias through cuDNN's
ragged path and keys the plan on the lengths rounded up to powers of two; our inputs are BSHD views without a
bias. `reuse_plans_across_lengths()` sets it (unless the user set it) before this path's first SDPA call; the
variable is read once per process.

Backend order: `sdpa_kernel([CUDNN, FLASH, EFFICIENT, MATH], set_priority=True)` asks for cuDNN first (torch
already prefers it on sm90 with cuDNN > 9.15; older cuDNN fall through to flash). On CPU the flash-CPU / math
kernels run the same code, which is what the CPU tests check against the reference.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (query heads per rank at least, new query tokens from which a sequence takes SDPA), first match wins; read at
# call time. cuDNN's ragged plans need enough work per call to beat our Triton extend kernel, and the work grows with
# the heads: the crossover sits at ~3.2K new tokens at 96/8 and 48/4 heads (TP1 / TP2), ~5.5K at 24/2 (TP4), past
# 8K at 12/1 (TP8); with a 4K cached prefix it comes earlier (96/8: ~2K) (bench/sdpa_shapes.py, H200, session 20).
# At 4.2K tokens, 96/8 heads: SDPA 1.19 ms, Triton 1.43; at 7.6K, 12/1: SDPA 0.70, Triton 0.66.
SDPA_FROM_TOKENS: tuple[tuple[int, int], ...] = ((48, 3584), (24, 6144), (1, 8192))
PREFIX_MODES = ("merge", "pad")
MERGE_ROWS = 4096  # query rows per fp32 merge pass
SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
              SDPBackend.MATH]

# q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale, max_query_len=,
# max_seq_len= -> [T, Hq, D]: kernels.paged_attention, flash_attn_adapter.paged_attention_fa, the reference
AttentionFn = Callable[..., torch.Tensor]

# the CUDA op that gives an output and its log-sum-exp: "cudnn" until it fails once, then "flash"
_LSE_OP: dict[str, str] = {"cuda": "cudnn"}
AVOID_RECOMPILE_ENV = "TORCH_CUDNN_SDPA_AVOID_RECOMPILE"


def sdpa_from_tokens(num_heads: int) -> int:
    """New query tokens from which a sequence with num_heads query heads (per rank) takes the SDPA path."""
    return next(tokens for heads, tokens in SDPA_FROM_TOKENS if num_heads >= heads)


def reuse_plans_across_lengths() -> None:
    """Let cuDNN reuse one plan per power-of-two length bucket (see the module docstring); a value the user set
    is kept. Takes effect only before the process's first cuDNN SDPA call."""
    os.environ.setdefault(AVOID_RECOMPILE_ENV, "1")


def gather_kv(cache: torch.Tensor, block_row: torch.Tensor, length: int, dtype: torch.dtype,
              scale: float = 1.0) -> torch.Tensor:
    """The first `length` tokens of one sequence from a paged cache [pages, bs, Hk, D] as a contiguous
    [length, Hk, D] tensor in `dtype` (times `scale` when it is not 1): one gather of whole pages."""
    bs = cache.shape[1]
    pages = block_row[: -(-length // bs)]
    x = cache.index_select(0, pages).view(-1, *cache.shape[2:])[:length]
    x = x.to(dtype)  # FP8 -> bf16 / fp16 is exact; a no-op for a cache already in `dtype`
    return x.mul_(scale) if scale != 1.0 else x  # x is a fresh copy either way (index_select)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[L, H, D] -> the [1, H, L, D] view SDPA takes (BSHD memory layout, which cuDNN and flash read as is)."""
    return x.transpose(0, 1).unsqueeze(0)


def _attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [1, Hq, n, D] in q.dtype, natural-log log-sum-exp [1, Hq, n] fp32) of one attention; k / v may have
    fewer heads (GQA). causal: top-left aligned, used only on square score matrices."""
    if not q.is_cuda:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return o, lse.reshape(q.shape[:3])
    if _LSE_OP["cuda"] == "cudnn":
        try:
            res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                     scale=scale)
            return res[0], res[1].reshape(q.shape[:3])
        except RuntimeError:
            _LSE_OP["cuda"] = "flash"  # cuDNN refused this build / shape: flash from now on
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return res[0], res[1].reshape(q.shape[:3])


def prefill_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           prefix_mode: str = "merge", out: torch.Tensor | None = None) -> torch.Tensor:
    """One sequence: q [n, Hq, D] (query i at position kv_len - n + i), contiguous k / v [kv_len, Hk, D] (kv_len
    >= n) -> [n, Hq, D] in q.dtype, written into `out` when given. See the module docstring for prefix_mode."""
    if prefix_mode not in PREFIX_MODES:
        raise ValueError(f"prefix_mode must be one of {PREFIX_MODES}, got {prefix_mode!r}")
    reuse_plans_across_lengths()
    n, kv = q.shape[0], k.shape[0]
    p = kv - n
    if p < 0:
        raise ValueError(f"{n} new tokens but only {kv} keys")
    if out is None:
        out = torch.empty_like(q)
    q = q if q.is_contiguous() else q.contiguous()
    if p and q.is_cuda and q.dtype not in (torch.bfloat16, torch.float16):
        prefix_mode = "pad"  # the cuDNN / flash LSE ops take 16-bit inputs only
    k4, v4 = _heads_first(k), _heads_first(v)
    if p == 0 or prefix_mode == "pad":
        if p:
            qp = q.new_empty(kv, *q.shape[1:])
            qp[:p].zero_()
            qp[p:].copy_(q)
            q = qp
        with sdpa_kernel(SDPA_ORDER, set_priority=True):
            o = F.scaled_dot_product_attention(_heads_first(q), k4, v4, is_causal=True, scale=scale, enable_gqa=True)
        out.copy_(o[0, :, p:].transpose(0, 1))
        return out
    q4 = _heads_first(q)
    o_pre, lse_pre = _attention_lse(q4, k4[:, :, :p], v4[:, :, :p], scale, causal=False)
    o_new, lse_new = _attention_lse(q4, k4[:, :, p:], v4[:, :, p:], scale, causal=True)
    # o = (e^lse_pre o_pre + e^lse_new o_new) / (e^lse_pre + e^lse_new); both parts see >= 1 key (finite lse)
    # in fp32 (bf16 weights and a bf16 difference tripled the error against the reference); one fused pass per
    # op, the result written straight into out's rows
    # MERGE_ROWS queries at a time, so the fp32 temporaries stay small (3 x 4096 x Hq x D x 4 bytes)
    w = torch.sigmoid(lse_pre - lse_new).unsqueeze(-1)
    dst = _heads_first(out)
    for r0 in range(0, n, MERGE_ROWS):
        r1 = min(n, r0 + MERGE_ROWS)
        dst[:, :, r0:r1].copy_(torch.lerp(o_new[:, :, r0:r1].float(), o_pre[:, :, r0:r1].float(), w[:, :, r0:r1]))
    return out


def workspace_bytes(max_query: int, max_context: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """Peak transient bytes of one layer's prefill through this path (a sequence of up to max_query new tokens
    at a context of up to max_context): the gathered K and V, the output, and with a cached prefix the merge's
    two partial outputs, their log-sum-exps, the weights and one MERGE_ROWS block of fp32 temporaries. The
    engine reserves this before sizing the KV cache (its profiling step has no prefix)."""
    es = torch.empty((), dtype=dtype).element_size()
    n, ctx = min(max_query, max_context), max_context
    gathered = 2 * ctx * num_kv_heads * head_dim * es
    outputs = 3 * n * num_heads * head_dim * es  # out, o_pre, o_new
    lse = 3 * n * num_heads * 4  # lse_pre, lse_new, w
    merge = 3 * min(n, MERGE_ROWS) * num_heads * head_dim * 4  # two fp32 upcasts and the lerp's result
    return gathered + outputs + lse + merge


def _row_ranges(qsl: list[int], seqs: list[int]) -> list[tuple[int, int]]:
    """The packed query rows of `seqs`, as few [start, end) ranges as possible (neighbours merged)."""
    ranges: list[tuple[int, int]] = []
    for b in seqs:
        a, e = qsl[b], qsl[b + 1]
        if a == e:
            continue
        if ranges and ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], e)
        else:
            ranges.append((a, e))
    return ranges


def paged_attention_prefill_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    *,
    rest: AttentionFn,
    query_start_host: list[int] | None = None,
    seq_lens_host: list[int] | None = None,
    min_prefill_tokens: int | None = None,
    prefix_mode: str = "merge",
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D] (layout of kernels/attention.py). Sequences with >= min_prefill_tokens new
    tokens take SDPA over their gathered K/V; the others run through `rest` as one sub-batch. query_start_host /
    seq_lens_host: host copies of query_start_loc / seq_lens (read from the device, one sync, when missing)."""
    qsl = query_start_host if query_start_host is not None else query_start_loc.tolist()
    lens = seq_lens_host if seq_lens_host is not None else seq_lens.tolist()
    threshold = sdpa_from_tokens(q.shape[1]) if min_prefill_tokens is None else min_prefill_tokens
    nseq = len(lens)
    qlens = [qsl[b + 1] - qsl[b] for b in range(nseq)]
    prefill = [b for b in range(nseq) if qlens[b] >= max(threshold, 1)]
    if not prefill:
        return rest(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale,
                    max_query_len=max(qlens, default=0), max_seq_len=max(lens, default=0))
    out = torch.empty_like(q)
    for b in prefill:
        k = gather_kv(k_cache, block_tables[b], lens[b], q.dtype)
        v = gather_kv(v_cache, block_tables[b], lens[b], q.dtype, v_scale)
        prefill_attention_sdpa(q[qsl[b]:qsl[b + 1]], k, v, scale * k_scale, prefix_mode, out[qsl[b]:qsl[b + 1]])
    others = [b for b in range(nseq) if qlens[b] < max(threshold, 1) and qlens[b] > 0]
    if others:
        ranges = _row_ranges(qsl, others)
        sub_q = q[ranges[0][0]:ranges[0][1]] if len(ranges) == 1 else torch.cat([q[a:e] for a, e in ranges])
        starts = [0]
        for b in others:
            starts.append(starts[-1] + qlens[b])
        dev = query_start_loc.device
        idx = torch.tensor(others, dtype=torch.long, device=dev)
        sub_out = rest(
            sub_q, k_cache, v_cache, block_tables.index_select(0, idx), seq_lens.index_select(0, idx),
            torch.tensor(starts, dtype=query_start_loc.dtype, device=dev), scale, k_scale, v_scale,
            max_query_len=max(qlens[b] for b in others), max_seq_len=max(lens[b] for b in others),
        )
        pos = 0
        for a, e in ranges:
            out[a:e] = sub_out[pos:pos + e - a]
            pos += e - a
    return out


__all__ = ["AVOID_RECOMPILE_ENV", "PREFIX_MODES", "SDPA_FROM_TOKENS", "gather_kv", "paged_attention_prefill_sdpa",
           "prefill_attention_sdpa", "reuse_plans_across_lengths", "sdpa_from_tokens", "workspace_bytes"]

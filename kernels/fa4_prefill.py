"""Prefill attention through FlashAttention-4's CuTe-DSL kernels (`--prefill-attention-backend fa4`): the
`flash_attn.cute` package of the `flash-attn-4` wheel, which has a Hopper (sm90) forward next to its Blackwell
one. Same signature and semantics as `kernels.attention.paged_attention_ref`.

The call (flash_attn/cute/interface.py, flash-attn-4 4.0.0b19): `flash_attn_varlen_func(q [T, Hq, D], k_cache,
v_cache, cu_seqlens_q=query_start_loc, seqused_k=seq_lens, max_seqlen_q=, page_table=block_tables,
softmax_scale=, causal=True)` reads our paged cache [num_pages, page_size, Hk, D] through the page table (any
page size: a page size other than its KV tile takes its non-TMA paged loads), every sequence of the step in one
launch. Its causal mask is aligned to the bottom-right corner of each sequence's [q_len, kv_len] score matrix
(query i of n new tokens sees keys 0 .. kv_len - n + i), which is our semantics with or without a cached prefix:
no prefix / new-token split and no log-sum-exp merge as in the SDPA path. GQA: Hq a multiple of Hk, q head h
reads KV head h // (Hq / Hk). It returns (out, lse) or out, by version.

Measured (bench/fa4_prefill.py, H200, session 20, CUDA-event times of one call): 96/8 heads, 4K new tokens 0.84 ms
on the paged cache vs 1.15 ms cuDNN (ragged plans) and 1.27 ms our Triton kernel; 16K 11.8 vs 11.6 / 16.7 ms;
4K after a 4K prefix 2.34 vs 3.04 / 3.41 ms; 12 / 1 heads (the TP8 shard) 4K 0.27 vs 0.56 / 0.31 ms, 16K 1.55 vs
1.92 / 2.27 ms.

Which steps: a step whose longest query has at least FROM_TOKENS new tokens goes to FA4 whole (its decode or
short rows included: the kernel is varlen and exact for them). Other steps keep the engine's kernels and graphs.

A prompt alone. A step of one sequence without cached keys (a long prompt, or its first chunk) attends the K/V
its prologue just computed, contiguous, through FA4's batch entry point (`prompt_attention_fa4`): no pages, no
gather (H200, session 24, 96/8 heads: 0.71 vs 0.76 ms paged at 4K, 10.8 vs 11.8 ms at 16K; 12/1: 0.14 vs 0.13 at
4K, 1.23 vs 1.42 at 16K). With an FP8 cache the fresh K/V would be more exact than what later steps read back
(cached runs must match uncached ones), so the prologue kernel also writes the values the cache holds, widened
exactly to q's dtype (`qk_norm_rope(..., kv_out=)`), and FA4 attends those with the cache's scales: the numbers
the gathered FP8 path would read, without the gather (session 28; before, FP8 prompts were gathered).

Gathered or paged. Read through the page table, FA4 takes its non-TMA paged loads at our 16-token pages; on
contiguous K/V it takes TMA loads. A step whose keys are few next to its score work (`gathers`: at least
GATHER_MIN_PAIRS causal query-key pairs per key, no more keys than the worker reserved room for) is gathered into
packed K/V (kernels/packed_kv.py) and attended with cu_seqlens_k where that measured faster (H200, session 24,
bench.fa4_prefill, gather included): FP8 pages, which widen in the gather, so FA4 runs on FP8 KV caches instead of
the SDPA path (96/8 heads: 0.80 vs 0.86 ms at 4K, 11.2 vs 11.9 ms at 16K, 2.23 vs 3.00 ms at 4K after a 4K prefix;
12/1: 0.25 vs 0.59, 1.40 vs 1.65, 0.30 vs 0.95 ms); and 16-bit pages when the step attends cached keys (4K after a
4K prefix: 2.14 vs 2.30 ms at 96/8, equal at 12/1). 16-bit prompts without cached keys are not gathered (gathered
vs paged: 0.75 vs 0.76 ms at 4K and 12.0 vs 11.8 ms at 16K for 96/8, 0.18 vs 0.13 ms at 4K for 12/1): one alone
attends its own K/V (above), several in one step read the pages. Other steps (a prefill chunk next to many
long-context decode rows) read the pages; FP8 ones take the SDPA path (model/attention.py).
The library compiles a kernel per configuration (dtype, head dims, GQA packing, causal, batch / paged / packed) on
its first call, not per length: the engine's start-up warm-up compiles all three (engine/model_worker.py).
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

from kernels.flash_attn_adapter import int32_index
from kernels.dispatch import gather_packed_kv
from kernels.packed_kv import PackedKV

MODULE = "flash_attn.cute.interface"
PIP_NAME = "flash-attn-4"
FROM_TOKENS = 2048  # new tokens of a step's longest query from which the step's attention runs here
MAX_HEAD_DIM = 256
# causal query-key pairs per key from which a step's K/V are gathered: there a key's copy (read + write of K and V,
# 8 x Hk x D bytes) costs ~2% of its score work at 12 query heads per KV head (96/8, 12/1; H200 arithmetic:
# 4 TB/s, 50% of bf16 peak), the paged loads 7-9% of it
GATHER_MIN_PAIRS = 1024
FRESH_PROMPTS = True  # a prompt alone attends its own K/V (`prompt_attention_fa4`); bench A/B runs turn it off


def library() -> ModuleType | None:
    """`flash_attn.cute.interface`, or None when flash-attn-4 (or its CuTe DSL) is not installed."""
    loaded = sys.modules.get(MODULE)  # asked once per layer: skip import_module's lookup where it is loaded
    if loaded is not None:
        return loaded
    try:
        return importlib.import_module(MODULE)
    except ImportError:
        return None


def device_supported(device: torch.device | str) -> bool:
    """Hopper (sm90) or newer; a separate function so CPU tests with a fake library can override it."""
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(dev) >= (9, 0)


def unsupported_reason(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why this backend cannot run here, or None when it can (FP8 KV caches are not a reason: they take the
    SDPA path)."""
    if library() is None:
        return f"needs the {PIP_NAME} package (`{MODULE}` does not import): pip install {PIP_NAME}"
    if not device_supported(device):
        return f"needs a Hopper (sm90) or newer CUDA GPU (device is {str(device)!r})"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"needs a bfloat16 or float16 model (dtype is {str(dtype).removeprefix('torch.')})"
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return f"needs head_dim a multiple of 8 and at most {MAX_HEAD_DIM} (got {head_dim})"
    return None


def takes(max_query_len: int) -> bool:
    """Whether a step with this longest query runs its attention here."""
    return max_query_len >= FROM_TOKENS


def gathers(query_start: list[int], seq_lens: list[int], max_keys: int, widens: bool = False) -> bool:
    """Whether a step (host lists: query_start_loc, seq_lens) reads packed K/V rather than the pages: its keys fit
    max_keys, it has at least GATHER_MIN_PAIRS causal query-key pairs per key, and either its pages widen (FP8: FA4
    reads only q's dtype, and the alternative is the SDPA path) or it attends cached keys (a prefix, earlier chunks,
    decode rows). 16-bit pages of prompts alone stay paged: there the gather did not pay (H200, session 24)."""
    keys = sum(seq_lens)
    if not 0 < keys <= max_keys:
        return False
    pairs = cached = 0
    for b, kv in enumerate(seq_lens):
        n = query_start[b + 1] - query_start[b]
        pairs += n * (kv - n) + n * (n + 1) // 2
        cached += kv - n
    return pairs >= GATHER_MIN_PAIRS * keys and (widens or cached > 0)


def prompt_attention_fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, k_scale: float = 1.0,
                         v_scale: float = 1.0) -> torch.Tensor:
    """One sequence without cached keys (a whole prompt, or its first chunk): causal attention over the step's own
    K/V [T, Hk, D] as the prologue computed them (the values the cache holds, in q's dtype; divided by k_scale /
    v_scale for an FP8 cache, as the pages), through FA4's batch entry point (one sequence, no cu_seqlens, no
    pages, no gather): q [T, Hq, D] -> [T, Hq, D]."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"prefill attention backend 'fa4' {unsupported_reason(q.device, q.dtype, q.shape[-1])}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"FA4 takes q, k and v in one dtype (got {q.dtype}, {k.dtype}, {v.dtype})")
    k, v = k.contiguous(), v.contiguous()  # v is a column slice of the QKV projection
    res = lib.flash_attn_func(q[None], k[None], v[None], softmax_scale=float(scale * k_scale), causal=True)
    out = (res[0] if isinstance(res, tuple) else res)[0]
    return out.mul_(v_scale) if v_scale != 1.0 else out


def paged_attention_prefill_fa4(
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
    packed: PackedKV | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D] in q.dtype (see the module docstring). packed: gather the keys and values of
    the step into packed K/V through this index (any cache dtype) instead of reading 16-bit pages in place.
    max_query_len: a host-side hint (read from the device, one sync, when None); max_seq_len is not needed."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"prefill attention backend 'fa4' {unsupported_reason(q.device, q.dtype, q.shape[-1])}")
    if packed is None and (k_cache.dtype != q.dtype or v_cache.dtype != q.dtype):
        raise ValueError(f"FA4 reads pages in q's dtype only (q {q.dtype}, KV cache {k_cache.dtype}): FP8 KV pages "
                         "are gathered (packed=) or take the SDPA prefill path")
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    common = dict(cu_seqlens_q=int32_index(query_start_loc), max_seqlen_q=int(max_query_len),
                  softmax_scale=float(scale * k_scale), causal=True)
    if packed is None:
        res = lib.flash_attn_varlen_func(q, k_cache, v_cache, seqused_k=int32_index(seq_lens),
                                         page_table=int32_index(block_tables), **common)
    else:
        k, v = gather_packed_kv(k_cache, v_cache, packed, q.dtype)
        res = lib.flash_attn_varlen_func(q, k, v, cu_seqlens_k=packed.cu_seqlens, max_seqlen_k=packed.max_len,
                                         **common)
    out = res[0] if isinstance(res, tuple) else res
    return out.mul_(v_scale) if v_scale != 1.0 else out


__all__ = ["FRESH_PROMPTS", "FROM_TOKENS", "GATHER_MIN_PAIRS", "MODULE", "gathers", "library",
           "paged_attention_prefill_fa4", "prompt_attention_fa4", "takes", "unsupported_reason"]

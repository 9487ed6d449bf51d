"""Paged attention through the `flash_attn` library (`--attention-backend fa3`), same signature and semantics
as `kernels.dispatch.paged_attention` / `kernels.attention.paged_attention_ref`.

Which library: FlashAttention-3 (`flash_attn_interface`, built from flash-attention/hopper) when importable,
else FlashAttention-2 (`flash_attn`). The calls, as documented in Dao-AILab/flash-attention
(hopper/flash_attn_interface.py, hopper/flash_api.cpp; flash_attn/flash_attn_interface.py,
csrc/flash_attn/flash_api.cpp):

* FA3, decode and extend alike: `flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=, page_table=,
  cu_seqlens_q=, max_seqlen_q=, softmax_scale=, causal=True)`. Decode passes q as [B, 1, Hq, D] and no
  cu_seqlens_q; extend passes the packed q [T, Hq, D] with cu_seqlens_q = query_start_loc. The paged cache is
  [num_pages, page_size, Hk, D] with any page size; page_table [B, max_pages] int32 (contiguous last dim),
  cache_seqlens [B] int32 = KV tokens per sequence. num_splits=0 (the default) lets the library split long
  contexts over the KV dimension.
* FA2, decode: `flash_attn_with_kvcache(q [B, 1, Hq, D], k_cache, v_cache, cache_seqlens=, block_table=,
  softmax_scale=, causal=True)`; extend: `flash_attn_varlen_func(q [T, Hq, D], k_cache, v_cache,
  cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=, causal=True, block_table=)`, where
  with a block_table cu_seqlens_k holds the cumulative KV lengths. FA2's paged KV needs a page size divisible
  by 256 ("Paged KV cache block size must be divisible by 256").

Causal masking: since flash-attn 2.1 (README "2.1: Change behavior of causal flag", and the docstrings of both
versions) causal=True aligns the mask to the bottom-right corner of the [seqlen_q, seqlen_k] matrix, i.e. query
i of q_len new tokens sees keys 0 .. seqlen_k - q_len + i -- exactly our semantics (new token i sits at position
seq_len - q_len + i, its K/V already in the cache). With varlen q the corner is per sequence.

GQA: both versions take K/V with fewer heads than q (Hq divisible by Hk; q head h uses kv head h // (Hq/Hk)),
the same grouping as the reference's repeat_interleave.

Constraints (checked up front by `unsupported_reason`, which EngineConfig.create and build_model call):
CUDA only; q, k and v in one 16-bit dtype (bf16 or fp16: both libraries refuse fp32, and FA3's FP8 path needs
FP8 *queries* with per-(batch, kv-head) descales, so an FP8 KV cache next to bf16 queries is refused rather
than silently quantizing q); head_dim a multiple of 8 and at most 256; FA2 only: page size % 256 == 0.

This module was written against the documented API and tested on CPU with a fake module that asserts those
argument layouts; flash_attn is not installed on the lent GPU machine, so it has never run the real library.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

FA3_MODULE = "flash_attn_interface"  # FlashAttention-3 (flash-attention/hopper)
FA2_MODULE = "flash_attn"  # FlashAttention-2
FA2_PAGE_MULTIPLE = 256
MAX_HEAD_DIM = 256


def _import(name: str) -> ModuleType | None:
    """The module when it imports and has the entry point this adapter calls. flash-attn-4 (the `fa4` prefill
    backend) installs a `flash_attn` package that holds only `flash_attn.cute`: that is not FA2."""
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return None
    return mod if hasattr(mod, "flash_attn_with_kvcache") else None


def library() -> tuple[str, ModuleType] | None:
    """("fa3", module) or ("fa2", module) for the library this adapter will call, or None."""
    mod = _import(FA3_MODULE)
    if mod is not None:
        return "fa3", mod
    mod = _import(FA2_MODULE)
    if mod is not None:
        return "fa2", mod
    return None


def available() -> bool:
    """True when `flash_attn_interface` (FA3) or `flash_attn` (FA2) imports with `flash_attn_with_kvcache`."""
    return library() is not None


def device_supported(device: str) -> bool:
    """flash_attn runs on CUDA only. A separate function so CPU tests with a fake library can override it."""
    return device == "cuda"


def unsupported_reason(
    device: str,
    dtype: torch.dtype,
    head_dim: int,
    kv_dtype: torch.dtype | None = None,
    block_size: int | None = None,
) -> str | None:
    """Why the flash_attn backend cannot serve this configuration, or None when it can.
    kv_dtype / block_size: skipped when None (build_model does not know them; EngineConfig.create does)."""
    lib = library()
    if lib is None:
        return (f"needs the flash_attn package: neither `{FA3_MODULE}` (FlashAttention-3, built from "
                f"flash-attention/hopper) nor `{FA2_MODULE}` (FlashAttention-2) can be imported with `flash_attn_with_kvcache`")
    kind = lib[0]
    if not device_supported(device):
        return f"runs on CUDA only (device is {device!r})"
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        return "needs an Ampere (sm80) or newer GPU"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"needs a bfloat16 or float16 model (dtype is {str(dtype).removeprefix('torch.')})"
    if kv_dtype is not None and kv_dtype != dtype:
        return ("supports bf16/fp16 KV caches only: flash_attn needs q, k and v in one dtype, so an FP8 KV "
                "cache would need FP8 queries; use --attention-backend triton with --kv-cache-dtype fp8_e4m3")
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return f"needs head_dim a multiple of 8 and at most {MAX_HEAD_DIM} (got {head_dim})"
    if kind == "fa2" and block_size is not None and block_size % FA2_PAGE_MULTIPLE:
        return (f"with FlashAttention-2 (`{FA2_MODULE}`; `{FA3_MODULE}` is not installed) the KV page size "
                f"must be divisible by {FA2_PAGE_MULTIPLE} (got {block_size}); set --page-size / kv_block_size "
                f"{FA2_PAGE_MULTIPLE}, or install FlashAttention-3, which takes any page size")
    return None


def int32_index(t: torch.Tensor) -> torch.Tensor:
    """An index tensor as every FlashAttention entry point takes it (FA2/FA3 and FA4): int32, contiguous."""
    t = t if t.dtype == torch.int32 else t.to(torch.int32)
    return t if t.is_contiguous() else t.contiguous()


def paged_attention_fa(
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
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]; see kernels.attention for the layout. max_query_len / max_seq_len: host-side
    hints (computed from the device tensors, with a sync, when None)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"--attention-backend fa3: neither `{FA3_MODULE}` nor `{FA2_MODULE}` can be imported")
    kind, fa = lib
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or k_scale != 1.0 or v_scale != 1.0:
        raise ValueError(
            f"--attention-backend fa3 supports bf16/fp16 KV caches only (q {q.dtype}, KV {k_cache.dtype}, "
            f"k_scale {k_scale}, v_scale {v_scale}); use the triton backend for an FP8 KV cache"
        )
    t, hq, d = q.shape
    b = seq_lens.shape[0]
    if t == 0:
        return torch.empty_like(q)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    q = q if q.stride(-1) == 1 else q.contiguous()
    seq_lens = int32_index(seq_lens)
    block_tables = int32_index(block_tables)
    # decode: one new token per sequence -> the batched [B, 1, Hq, D] form (FA2's decode kernel; FA3's too)
    decode = max_query_len == 1 and t == b
    if kind == "fa3":
        if decode:
            out = fa.flash_attn_with_kvcache(
                q.view(b, 1, hq, d), k_cache, v_cache, cache_seqlens=seq_lens, page_table=block_tables,
                softmax_scale=scale, causal=True,
            )
            return out.view(t, hq, d)
        return fa.flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=seq_lens, page_table=block_tables,
            cu_seqlens_q=int32_index(query_start_loc), max_seqlen_q=max_query_len, softmax_scale=scale, causal=True,
        )
    if k_cache.shape[1] % FA2_PAGE_MULTIPLE:
        raise ValueError(
            f"FlashAttention-2's paged KV cache needs a page size divisible by {FA2_PAGE_MULTIPLE} "
            f"(got {k_cache.shape[1]})"
        )
    if decode:
        out = fa.flash_attn_with_kvcache(
            q.view(b, 1, hq, d), k_cache, v_cache, cache_seqlens=seq_lens, block_table=block_tables,
            softmax_scale=scale, causal=True,
        )
        return out.view(t, hq, d)
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    cu_seqlens_k = torch.nn.functional.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
    # max_seqlen_q is an upper bound; FA2's varlen_fwd treats max_seqlen_q == 1 as "one query per sequence"
    # (it reshapes q to [B, groups, Hk, D]), which does not hold here (t != b), so never pass 1
    return fa.flash_attn_varlen_func(
        q, k_cache, v_cache, int32_index(query_start_loc), cu_seqlens_k, max(max_query_len, 2), max_seq_len,
        softmax_scale=scale, causal=True, block_table=block_tables,
    )

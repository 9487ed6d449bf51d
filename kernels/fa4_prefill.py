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
FA4 needs q, k and v in one 16-bit dtype: FP8 KV pages go to the SDPA path instead (model/attention.py), whose
gather dequantizes them. The library compiles a kernel per configuration (dtype, head dims, GQA packing, causal,
paged) on its first call, not per length: the engine's start-up warm-up prefill compiles it.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

from kernels.flash_attn_adapter import int32_index

MODULE = "flash_attn.cute.interface"
PIP_NAME = "flash-attn-4"
FROM_TOKENS = 2048  # new tokens of a step's longest query from which the step's attention runs here
MAX_HEAD_DIM = 256


def library() -> ModuleType | None:
    """`flash_attn.cute.interface`, or None when flash-attn-4 (or its CuTe DSL) is not installed."""
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
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D] in q.dtype over 16-bit paged K/V (see the module docstring). max_query_len: a
    host-side hint (read from the device, one sync, when None); max_seq_len is not needed."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"prefill attention backend 'fa4' {unsupported_reason(q.device, q.dtype, q.shape[-1])}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"FA4 needs q, k and v in one dtype (q {q.dtype}, KV cache {k_cache.dtype}); FP8 KV "
                         "pages take the SDPA prefill path")
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    res = lib.flash_attn_varlen_func(
        q, k_cache, v_cache, cu_seqlens_q=int32_index(query_start_loc), seqused_k=int32_index(seq_lens),
        max_seqlen_q=int(max_query_len), page_table=int32_index(block_tables),
        softmax_scale=float(scale * k_scale), causal=True,
    )
    out = res[0] if isinstance(res, tuple) else res
    return out.mul_(v_scale) if v_scale != 1.0 else out


__all__ = ["FROM_TOKENS", "MODULE", "library", "paged_attention_prefill_fa4", "takes", "unsupported_reason"]

"""A step's keys and values gathered out of the paged cache into one packed, contiguous [total keys, Hk, D] tensor
per cache: sequence after sequence, no page padding — the varlen layout attention kernels read with cu_seqlens_k
(FlashAttention-4 then takes its TMA loads, which its paged path over 16-token pages does not: 0.77 vs 0.84 ms at
4K tokens, 96/8 heads, H200, bench/fa4_prefill.py). The index is built once per forward
(model/context.py ForwardContext.packed_kv) and every layer gathers through it.

FP8 pages widen to the model dtype exactly; the scales stay with the caller (as in kernels/sdpa_prefill.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedKV:
    """slots [total] int64: the cache slot (page * page_size + offset) of every key, sequence after sequence;
    cu_seqlens [B + 1] int32: where each sequence's keys start; max_len: the longest sequence's keys."""

    slots: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int

    @property
    def total(self) -> int:
        return self.slots.shape[0]


def pack_index(block_tables: torch.Tensor, seq_lens: list[int], page_size: int) -> PackedKV:
    """The packed layout of sequences of `seq_lens` keys (host list) whose pages are the rows of `block_tables`
    [B, max pages] (device): a few small device ops, no host sync."""
    dev = block_tables.device
    total = sum(seq_lens)
    lens = torch.tensor(seq_lens, dtype=torch.long, device=dev)
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.long, device=dev)
    torch.cumsum(lens, 0, out=cu[1:])
    seq = torch.repeat_interleave(torch.arange(len(seq_lens), device=dev), lens, output_size=total)
    pos = torch.arange(total, device=dev) - cu[seq]
    pages = block_tables[seq, pos // page_size].long()
    return PackedKV(pages * page_size + pos % page_size, cu.to(torch.int32), max(seq_lens, default=0))


def gather_packed(cache: torch.Tensor, packed: PackedKV, dtype: torch.dtype) -> torch.Tensor:
    """The packed keys (or values) of a paged cache [pages, page_size, Hk, D] as a fresh [total, Hk, D] tensor in
    `dtype` (FP8 -> bf16 / fp16 is exact)."""
    rows = cache.view(-1, *cache.shape[2:]).index_select(0, packed.slots)
    return rows if rows.dtype == dtype else rows.to(dtype)


def workspace_bytes(max_keys: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                    kv_dtype: torch.dtype) -> int:
    """Peak transient bytes of one layer's gather of up to max_keys keys: the index, the gathered K and V in
    `dtype`, and for a cache in another dtype (FP8) one gathered tensor before it widens."""
    es = torch.empty((), dtype=dtype).element_size()
    row = num_kv_heads * head_dim
    narrow = 0 if kv_dtype == dtype else max_keys * row * torch.empty((), dtype=kv_dtype).element_size()
    return max_keys * 8 + 2 * max_keys * row * es + narrow


__all__ = ["PackedKV", "gather_packed", "pack_index", "workspace_bytes"]

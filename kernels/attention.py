"""Paged attention: torch references.

KV cache per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]. A token's slot is
block_id * block_size + offset; slot -1 means "do not store" (padding). For a batch of B sequences packed
along T, sequence b owns query rows query_start_loc[b]:query_start_loc[b+1] and attends causally to its first
seq_lens[b] cached tokens: query i of a sequence with q_len new tokens sits at position seq_len - q_len + i.
FP8 caches hold values divided by a per-tensor scale (k_scale, v_scale).
"""
from __future__ import annotations

import torch


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """k, v: [T, Hk, D]; writes row t into slot slot_mapping[t] (skips -1)."""
    nb, bs = k_cache.shape[:2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    kc = k_cache.view(nb * bs, *k_cache.shape[2:])
    vc = v_cache.view(nb * bs, *v_cache.shape[2:])
    kc[slots] = (k[valid].float() / k_scale).to(k_cache.dtype)
    vc[slots] = (v[valid].float() / v_scale).to(v_cache.dtype)


def gather_kv_ref(cache: torch.Tensor, block_table: torch.Tensor, length: int, scale: float = 1.0) -> torch.Tensor:
    """Return the first `length` tokens of one sequence from a paged cache as fp32 [length, Hk, D]."""
    bs = cache.shape[1]
    nblocks = -(-length // bs)
    blocks = cache[block_table[:nblocks].long()]  # [nblocks, bs, Hk, D]
    return blocks.reshape(nblocks * bs, *cache.shape[2:])[:length].float() * scale


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D] in q.dtype. Softmax in fp32, GQA by head grouping."""
    t, hq, d = q.shape
    hk = k_cache.shape[2]
    group = hq // hk
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        q0, q1 = qsl[b], qsl[b + 1]
        if q1 == q0:
            continue
        kv_len = lens[b]
        k = gather_kv_ref(k_cache, block_tables[b], kv_len, k_scale).repeat_interleave(group, dim=1)
        v = gather_kv_ref(v_cache, block_tables[b], kv_len, v_scale).repeat_interleave(group, dim=1)
        qb = q[q0:q1].float()  # [n, Hq, D]
        n = q1 - q0
        scores = torch.einsum("nhd,khd->hnk", qb, k) * scale
        q_pos = torch.arange(kv_len - n, kv_len, device=q.device)
        k_pos = torch.arange(kv_len, device=q.device)
        scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = scores.softmax(dim=-1)
        out[q0:q1] = torch.einsum("hnk,khd->nhd", probs, v).to(q.dtype)
    return out

"""Paged attention: torch references.

KV cache per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]. A token's slot is
block_id * block_size + offset; slot -1 means "do not store" (padding). For a batch of B sequences packed
along T, sequence b owns query rows query_start_loc[b]:query_start_loc[b+1] and attends causally to its first
seq_lens[b] cached tokens: query i of a sequence with q_len new tokens sits at position seq_len - q_len + i.
FP8 caches hold values divided by a per-tensor scale (k_scale, v_scale).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

QUERY_CHUNK = 1024  # query rows per attention call (bounds the boolean mask: rows x kv_len)


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
    kc[slots] = cache_values_ref(k[valid], k_scale, k_cache.dtype)
    vc[slots] = cache_values_ref(v[valid], v_scale, v_cache.dtype)


def cache_values_ref(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x as a cache of `dtype` stores it: divided by the scale, FP8 saturating at +-448 (the kernels' cast)."""
    y = x.float() / scale
    if dtype == torch.float8_e4m3fn:
        y = y.clamp(-448.0, 448.0)
    return y.to(dtype)


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
    """q: [T, Hq, D] -> [T, Hq, D] in q.dtype. Softmax in fp32, GQA by head grouping.

    One fp32 scaled-dot-product attention per sequence over its gathered KV, with the causal limit aligned to
    the end of the sequence (query i of n sees keys 0 .. kv_len - n + i), in query chunks of at most
    `QUERY_CHUNK` rows so that the [rows, kv_len] mask stays small: a 34K-token prompt prefills in seconds
    on a laptop CPU (the explicit [heads, n, kv_len] score tensor took minutes)."""
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
        n = q1 - q0
        # [1, H, kv, D]: the 4-D layout takes torch's fused CPU kernel (the 3-D one took the slow math path)
        k = gather_kv_ref(k_cache, block_tables[b], kv_len, k_scale).transpose(0, 1)[None]
        v = gather_kv_ref(v_cache, block_tables[b], kv_len, v_scale).transpose(0, 1)[None]
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        for c0 in range(0, n, QUERY_CHUNK):
            c1 = min(n, c0 + QUERY_CHUNK)
            qc = q[q0 + c0 : q0 + c1].float().transpose(0, 1)[None]  # [1, Hq, rows, D]
            first = kv_len - n + c0  # position of the chunk's first query: keys before it are all visible
            end = kv_len - n + c1  # keys past the chunk's last query are never visible to it
            mask = None  # a single query row (decode) sees every key
            if c1 - c0 > 1:
                q_pos = torch.arange(first, end, device=q.device)
                k_pos = torch.arange(first, end, device=q.device)
                mask = torch.zeros(c1 - c0, end, device=q.device)  # additive: a float mask is the fast path
                mask[:, first:].masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
            o = F.scaled_dot_product_attention(qc, k[:, :, :end], v[:, :, :end], attn_mask=mask, scale=scale)
            out[q0 + c0 : q0 + c1] = o[0].transpose(0, 1).to(q.dtype)
    return out

"""The CPU attention path (kernels/attention.py: paged_attention_ref, per-sequence SDPA over the gathered KV
in query chunks) against an independent explicit-score attention on random paged inputs: chunked prefill
(queries after cached tokens), decode, GQA, several sequences, chunks longer than QUERY_CHUNK."""
from __future__ import annotations

import torch

from kernels import attention
from kernels.attention import paged_attention_ref, store_kv_ref


def _naive(q, k_seq, v_seq, n, scale):
    """q [n, Hq, D]; k_seq/v_seq [kv, Hk, D] of one sequence; query i sits at position kv - n + i."""
    kv = k_seq.shape[0]
    group = q.shape[1] // k_seq.shape[1]
    k = k_seq.repeat_interleave(group, dim=1).double()
    v = v_seq.repeat_interleave(group, dim=1).double()
    s = torch.einsum("nhd,khd->hnk", q.double(), k) * scale
    q_pos = torch.arange(kv - n, kv)
    s = s.masked_fill(torch.arange(kv)[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hnk,khd->nhd", s.softmax(-1), v)


def _case(monkeypatch, seqs, hq=4, hk=2, d=32, bs=16, chunk=None, seed=0):
    """seqs: [(kv_len, q_len)] per sequence."""
    if chunk is not None:
        monkeypatch.setattr(attention, "QUERY_CHUNK", chunk)
    g = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-kv // bs) for kv, _ in seqs) + 3
    k_cache = torch.zeros(nblocks, bs, hk, d)
    v_cache = torch.zeros(nblocks, bs, hk, d)
    perm = torch.randperm(nblocks, generator=g).tolist()  # pages scattered over the pool
    tables, qs, expect, qsl = [], [], [], [0]
    width = max(-(-kv // bs) for kv, _ in seqs)
    for kv, n in seqs:
        blocks = [perm.pop() for _ in range(-(-kv // bs))]
        tables.append(blocks + [0] * (width - len(blocks)))
        k = torch.randn(kv, hk, d, generator=g)
        v = torch.randn(kv, hk, d, generator=g)
        slots = torch.tensor([blocks[i // bs] * bs + i % bs for i in range(kv)])
        store_kv_ref(k, v, k_cache, v_cache, slots)
        q = torch.randn(n, hq, d, generator=g)
        qs.append(q)
        expect.append(_naive(q, k, v, n, d**-0.5))
        qsl.append(qsl[-1] + n)
    out = paged_attention_ref(
        torch.cat(qs), k_cache, v_cache, torch.tensor(tables), torch.tensor([kv for kv, _ in seqs]),
        torch.tensor(qsl), d**-0.5,
    )
    torch.testing.assert_close(out.double(), torch.cat(expect), atol=2e-5, rtol=2e-5)


def test_prefill_chunk_decode_and_mixed_batch(monkeypatch):
    _case(monkeypatch, [(37, 37), (100, 20), (65, 1), (16, 16), (1, 1)])


def test_query_chunks_shorter_than_the_step(monkeypatch):
    # a 300-token step split into 64-row attention calls, after 200 cached tokens, beside a decode row
    _case(monkeypatch, [(500, 300), (90, 1)], chunk=64, seed=1)


def test_gqa_groups_and_no_groups(monkeypatch):
    _case(monkeypatch, [(80, 33)], hq=8, hk=2, seed=2)
    _case(monkeypatch, [(80, 33)], hq=2, hk=2, seed=3)

"""Assertions shared by engine tests."""
from __future__ import annotations

import torch

from model.context import ForwardContext


def assert_pages_clean(engine) -> None:
    """After every request finished: invariants hold and no page is still referenced."""
    engine.check_invariants()
    stats = engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["used_kv_blocks"] == 0, stats
    assert stats["free_kv_blocks"] + stats["cached_kv_blocks"] == stats["total_kv_blocks"]


def reference_drafts(model, cfg, tokens: list[int], k: int) -> list[int]:
    """Full recompute: target over tokens[:-1], NextN over every position, then the chain of k - 1 steps."""
    n = len(tokens)
    bs = 16
    pages = -(-(n + k + 1) // bs)
    shape = (pages, bs, cfg.num_key_value_heads, cfg.head_dim)
    kv = {i: (torch.zeros(shape), torch.zeros(shape)) for i in range(cfg.num_hidden_layers + 1)}

    def ctx(start: int, q: int) -> ForwardContext:
        return ForwardContext(
            positions=torch.arange(start, start + q), slot_mapping=torch.arange(start, start + q),
            block_tables=torch.arange(pages, dtype=torch.int32)[None], seq_lens=torch.tensor([start + q], dtype=torch.int32),
            query_start_loc=torch.tensor([0, q], dtype=torch.int32), max_query_len=q, max_seq_len=start + q,
            kv_caches=kv,
        )

    with torch.no_grad():
        h = model(torch.tensor(tokens[:-1]), ctx(0, n - 1))
        u = model.mtp_forward(torch.tensor(tokens[1:]), h, ctx(0, n - 1))
        drafts = [int(model.compute_logits(u[-1:]).argmax())]
        prev = u[-1:]
        for j in range(1, k):
            prev = model.mtp_forward(torch.tensor(drafts[-1:]), prev, ctx(n - 2 + j, 1))
            drafts.append(int(model.compute_logits(prev).argmax()))
    return drafts

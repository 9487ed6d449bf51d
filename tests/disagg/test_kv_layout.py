"""Page-major KV pool: per-layer views the model can use, and how the transfer layer sees pool layouts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from disagg.kv_layout import (
    KVPageRegions,
    allocate_page_major_kv,
    allocate_page_major_kv_caches,
    dense_layer_views,
)
from engine.kv_cache import allocate_kv_caches
from kernels.attention import gather_kv_ref, paged_attention_ref, store_kv_ref
from model.config import load_model_config
from model.parallel import TPGroup

ROOT = Path(__file__).resolve().parents[2]


def test_page_major_views_match_engine_shapes_and_share_one_buffer():
    cfg = load_model_config(ROOT / "configs" / "glm47-fp8")
    tp = TPGroup(rank=3, size=8)
    layers = [0, 1, 2, 92]  # includes the MTP layer's index
    ours = allocate_page_major_kv_caches(cfg, tp, layers, 6, 16, torch.float8_e4m3fn, torch.device("cpu"))
    ref = allocate_kv_caches(cfg, tp, layers, 6, 16, torch.float8_e4m3fn, torch.device("cpu"))
    assert list(ours) == list(ref)
    for lid in layers:
        for a, b in zip(ours[lid], ref[lid]):
            assert a.shape == b.shape and a.dtype == b.dtype
    storages = {t.untyped_storage().data_ptr() for kv in ours.values() for t in kv}
    assert len(storages) == 1
    regions = KVPageRegions.from_kv_caches(ours)
    assert len(regions.regions) == 1  # one page of all layers is one contiguous run
    assert regions.page_bytes == [len(layers) * 2 * 16 * 1 * 128]  # TP8: 1 KV head of 128, FP8


def test_page_major_view_writes_land_in_the_page_of_all_layers():
    pool = allocate_page_major_kv([5, 7, 9], 8, 4, 2, 16, torch.bfloat16, "cpu")
    k, v = pool.kv_caches[7]  # second layer
    k[3, 1, 0] = torch.arange(16, dtype=torch.bfloat16)
    v[6, 2, 1] = -torch.arange(16, dtype=torch.bfloat16)
    assert torch.equal(pool.buffer[3, 1, 0, 1, 0], torch.arange(16, dtype=torch.bfloat16))
    assert torch.equal(pool.buffer[6, 1, 1, 2, 1], -torch.arange(16, dtype=torch.bfloat16))
    assert int((pool.buffer != 0).sum()) == 30  # 15 nonzero values each, nothing else touched
    row = pool.regions.regions[0][3]  # page 3 as the transfer layer moves it
    assert torch.equal(row, pool.buffer[3].contiguous().view(-1).view(torch.uint8))


def test_per_layer_regions_follow_layer_order_not_addresses():
    shape = (8, 4, 1, 16)
    made = [(torch.randn(shape), torch.randn(shape)) for _ in range(3)]
    kv = {2: made[0], 0: made[1], 1: made[2]}  # layer ids unrelated to allocation order
    regions = KVPageRegions.from_kv_caches(kv)
    expect = [t for lid in (0, 1, 2) for t in kv[lid]]
    assert [r.data_ptr() for r in regions.regions] == [t.data_ptr() for t in expect]
    assert regions.page_bytes == [4 * 16 * 4] * 6
    assert torch.equal(regions.regions[3][5], kv[1][1][5].reshape(-1).view(torch.uint8))


def test_regions_reject_mixed_page_counts():
    with pytest.raises(ValueError):
        KVPageRegions((torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(5, 8, dtype=torch.uint8)))


def test_attention_reference_reads_page_major_views():
    """paged_attention_ref / gather_kv_ref on the strided per-layer views give what they give on dense copies."""
    g = torch.Generator().manual_seed(0)
    nb, bs, hk, d, hq = 12, 4, 2, 16, 4
    pool = allocate_page_major_kv([0, 1, 2], nb, bs, hk, d, torch.float32, "cpu")
    pool.buffer.copy_(torch.randn(pool.buffer.shape, generator=g))
    k, v = pool.kv_caches[1]
    assert not k.is_contiguous()
    seq_lens = torch.tensor([9, 5])
    block_tables = torch.tensor([[7, 2, 10], [4, 11, 0]])
    qsl = torch.tensor([0, 3, 5])
    q = torch.randn(5, hq, d, generator=g)
    out = paged_attention_ref(q, k, v, block_tables, seq_lens, qsl, 0.25)
    dense = paged_attention_ref(q, k.contiguous(), v.contiguous(), block_tables, seq_lens, qsl, 0.25)
    assert torch.equal(out, dense)
    assert torch.equal(gather_kv_ref(k, block_tables[0], 9), pool.buffer[[7, 2, 10], 1, 0].reshape(12, hk, d)[:9])


def test_dense_views_with_scaled_block_ids_reach_the_same_pages():
    """The no-kernel-change option: dense per-layer views + block ids * (2 * num_layers)."""
    g = torch.Generator().manual_seed(1)
    nb, bs, hk, d, hq = 10, 4, 2, 16, 4
    pool = allocate_page_major_kv([3, 4, 5], nb, bs, hk, d, torch.float32, "cpu")
    dense, f = dense_layer_views(pool)
    assert f == 6
    k, v = dense[4]
    assert k.stride(0) == bs * k.stride(1)  # the kernels' "pages must be dense" check holds
    slots = torch.tensor([9, 0, 27, 38])  # logical slots: block * bs + offset
    kn, vn = torch.randn(4, hk, d, generator=g), torch.randn(4, hk, d, generator=g)
    store_kv_ref(kn, vn, k, v, (slots // bs) * f * bs + slots % bs)
    sk, sv = pool.kv_caches[4]  # the strided views of the same layer see the rows at the logical slots
    assert torch.equal(sk[slots // bs, slots % bs], kn) and torch.equal(sv[slots // bs, slots % bs], vn)
    assert int((pool.buffer != 0).sum()) == 2 * kn.numel()
    pool.buffer.copy_(torch.randn(pool.buffer.shape, generator=g))
    block_tables = torch.tensor([[7, 2, 9], [4, 0, 1]])
    seq_lens, qsl = torch.tensor([10, 6]), torch.tensor([0, 2, 5])
    q = torch.randn(5, hq, d, generator=g)
    ref = paged_attention_ref(q, sk.contiguous(), sv.contiguous(), block_tables, seq_lens, qsl, 0.25)
    out = paged_attention_ref(q, k, v, block_tables * f, seq_lens, qsl, 0.25)
    assert torch.equal(out, ref)

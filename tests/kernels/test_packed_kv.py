"""kernels/packed_kv.py: the packed-K/V index and gather against a per-sequence slice of the pages, and the
workspace arithmetic."""
from __future__ import annotations

import pytest
import torch

from kernels import dispatch, fa4_prefill, triton_packed_kv
from kernels.packed_kv import gather_packed, pack_index, workspace_bytes
from kernels.triton_packed_kv import gather_packed_kv
from model.context import ForwardContext
from test_flash_attn_adapter import make_batch


@pytest.mark.parametrize("seq_lens", [[300, 1, 17], [16, 32], [5], [0, 40]])
def test_gather_packs_every_sequence_in_order(seq_lens):
    bs = 16
    _, kc, vc, bt, _, _ = make_batch([max(s, 1) for s in seq_lens], [1] * len(seq_lens), 4, 2, 32, bs)
    packed = pack_index(bt.to(torch.int64), seq_lens, bs)
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, *torch.tensor(
        seq_lens).cumsum(0).tolist()]
    assert packed.max_len == max(seq_lens) and packed.total == sum(seq_lens)
    for cache in (kc, vc):
        got = gather_packed(cache, packed, cache.dtype)
        want = torch.cat([cache[bt[b].long()].reshape(-1, *cache.shape[2:])[:n] for b, n in enumerate(seq_lens)])
        assert torch.equal(got, want)


# (Hk, D): GLM-4.7's 8 x 128 and its TP8 shard 1 x 128; 3 x 40 = rows of 120, not a power of two (masked tail)
@pytest.mark.parametrize("hk,d", [(8, 128), (1, 128), (3, 40)])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_triton_gather_equals_the_reference(device, hk, d, cache_dtype):
    """Both caches in one launch, FP8 widened exactly, keys in index order (slots repeat and run backwards here)."""
    pages, bs = 7, 16
    kc = (torch.randn(pages, bs, hk, d, device=device) * 4).to(cache_dtype)
    vc = (torch.randn(pages, bs, hk, d, device=device) * 4).to(cache_dtype)
    seq_lens = [37, 1, 50]
    bt = torch.stack([torch.randperm(pages, device=device) for _ in seq_lens])
    packed = pack_index(bt, seq_lens, bs)
    k, v = gather_packed_kv(kc, vc, packed.slots, torch.bfloat16)
    assert k.dtype == v.dtype == torch.bfloat16 and k.shape == (sum(seq_lens), hk, d)
    assert torch.equal(k, gather_packed(kc, packed, torch.bfloat16))
    assert torch.equal(v, gather_packed(vc, packed, torch.bfloat16))
    assert not torch.equal(k, v)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_dispatch_gathers_widening_pages_in_one_launch(device, monkeypatch, cache_dtype):
    """dispatch.gather_packed_kv: the Triton kernel where FP8 pages widen, index_select for 16-bit pages (which
    moves them as fast: H100, session 28); the same packed K/V either way."""
    launches: list[torch.dtype] = []
    real = triton_packed_kv.gather_packed_kv
    monkeypatch.setattr(triton_packed_kv, "gather_packed_kv",
                        lambda kc, *a: launches.append(kc.dtype) or real(kc, *a))
    kc = (torch.randn(5, 16, 2, 32, device=device) * 4).to(cache_dtype)
    vc = (torch.randn(5, 16, 2, 32, device=device) * 4).to(cache_dtype)
    packed = pack_index(torch.tensor([[3, 0, 4], [1, 2, 0]], device=device), [40, 20], 16)
    with dispatch.kernel_backend("triton"):
        k, v = dispatch.gather_packed_kv(kc, vc, packed, torch.bfloat16)
    assert launches == ([torch.float8_e4m3fn] if cache_dtype == torch.float8_e4m3fn else [])
    assert torch.equal(k, gather_packed(kc, packed, torch.bfloat16))
    assert torch.equal(v, gather_packed(vc, packed, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_triton_gather_gpu(cache_dtype):
    """A 16K chunk after a 4K prefix (20,480 keys, 8 x 128, 16-token pages in random order), against the
    reference (its time: bench/fa4_prefill.py's *_triton columns)."""
    pages, bs, hk, d = 1400, 16, 8, 128
    kc = (torch.randn(pages, bs, hk, d, device="cuda") * 4).to(cache_dtype)
    vc = (torch.randn(pages, bs, hk, d, device="cuda") * 4).to(cache_dtype)
    bt = torch.randperm(pages, device="cuda")[None, :1280].to(torch.int32)
    packed = pack_index(bt, [20480], bs)
    k, v = gather_packed_kv(kc, vc, packed.slots, torch.bfloat16)
    want_k, want_v = gather_packed(kc, packed, torch.bfloat16), gather_packed(vc, packed, torch.bfloat16)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_fp8_pages_widen_exactly():
    _, kc, _, bt, _, _ = make_batch([40, 9], [1, 1], 2, 1, 16, 16)
    fp8 = (kc.float() * 8).to(torch.float8_e4m3fn)
    packed = pack_index(bt, [40, 9], 16)
    got = gather_packed(fp8, packed, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, gather_packed(fp8.to(torch.bfloat16), packed, torch.bfloat16))


def test_workspace_bytes():
    # 1000 keys, 8 x 128 values per key: index 8 B, K and V 2 x 2 B per value; FP8 adds one 1-byte copy
    assert workspace_bytes(1000, 8, 128, torch.bfloat16, torch.bfloat16) == 1000 * (8 + 2 * 1024 * 2)
    assert workspace_bytes(1000, 8, 128, torch.bfloat16, torch.float8_e4m3fn) == 1000 * (8 + 2 * 1024 * 2 + 1024)
    assert workspace_bytes(0, 8, 128, torch.bfloat16, torch.bfloat16) == 0


# widens: FP8 pages; a 16-bit prompt without cached keys is never gathered (kernels/fa4_prefill.py `gathers`)
@pytest.mark.parametrize("max_packed_kv,widens,gathers", [(0, True, False), (4096, True, True), (4095, True, False),
                                                          (4096, False, False)])
def test_forward_context_decides_and_builds_once(monkeypatch, max_packed_kv, widens, gathers):
    asked: list[int] = []
    real = fa4_prefill.gathers
    monkeypatch.setattr(fa4_prefill, "gathers", lambda *a: asked.append(1) or real(*a))
    bt = torch.arange(256).view(1, -1)
    ctx = ForwardContext(positions=torch.arange(4096), slot_mapping=torch.arange(4096), block_tables=bt,
                         seq_lens=torch.tensor([4096]), query_start_loc=torch.tensor([0, 4096]), max_query_len=4096,
                         max_seq_len=4096, host_query_start_loc=[0, 4096], host_seq_lens=[4096],
                         max_packed_kv=max_packed_kv)
    first = ctx.packed_kv(16, widens)
    assert (first is not None) == gathers
    assert ctx.packed_kv(16, widens) is first and len(asked) == 1  # every other layer reuses the decision and the index
    if gathers:
        assert torch.equal(first.slots, torch.arange(4096))

"""The SDPA prefill path (kernels/sdpa_prefill.py) against paged_attention_ref: batches mixing prefill rows (with
and without a cached prefix, lengths off the page boundaries) with decode / verify rows and sequences without new
tokens, GQA 8/2 and 12/1, bf16 and FP8 KV with scales, both prefix modes. On CPU SDPA runs its CPU kernels (the
same calls as on GPU); the GPU test checks a real shape."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import sdpa_prefill
from kernels.attention import paged_attention_ref
from kernels.sdpa_prefill import gather_kv, paged_attention_prefill_sdpa, prefill_attention_sdpa
from kernel_helpers import rel_err
from test_kernels_attention import make_batch

FP8 = torch.float8_e4m3fn


class Spy:
    """`rest` that records which rows it was given and answers with the reference."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int], list[int]]] = []

    def __call__(self, q, k_cache, v_cache, bt, lens, qsl, scale, k_scale, v_scale, **hints):
        self.calls.append((q.shape[0], qsl.tolist(), lens.tolist()))
        return paged_attention_ref(q, k_cache, v_cache, bt, lens, qsl, scale, k_scale, v_scale)


def _tol(q: torch.Tensor) -> float:
    return 1e-5 if q.dtype == torch.float32 else 8e-3


# (seq_len, new tokens) per sequence; prefill rows are those with >= 24 new tokens (min_prefill_tokens below)
MIXED = [
    ([(45, 45), (1, 1), (130, 37), (77, 1), (60, 4), (33, 0), (24, 24)], "no prefix + prefix + decode + verify"),
    ([(200, 1), (97, 60), (50, 1)], "a prefill between decodes (two row ranges for rest)"),
    ([(64, 64), (300, 31)], "prefill rows only"),
]


@pytest.mark.parametrize("seqs,why", MIXED, ids=[w for _, w in MIXED])
@pytest.mark.parametrize("hq,hk", [(8, 2), (12, 1)])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("prefix_mode", ["merge", "pad"])
def test_mixed_batch_matches_reference(seqs, why, hq, hk, cache_dtype, prefix_mode):
    d, bs = 64, 16
    lens, qlens = [s for s, _ in seqs], [n for _, n in seqs]
    qdtype = torch.float32 if cache_dtype == torch.bfloat16 and hq == 8 else torch.bfloat16
    q, kc, vc, bt, sl, qsl, ks, vs = make_batch(lens, qlens, hq, hk, d, bs, cache_dtype, "cpu", qdtype)
    spy = Spy()
    out = paged_attention_prefill_sdpa(q, kc, vc, bt, sl, qsl, d ** -0.5, ks, vs, rest=spy, min_prefill_tokens=24,
                                       prefix_mode=prefix_mode)
    ref = paged_attention_ref(q, kc, vc, bt, sl, qsl, d ** -0.5, ks, vs)
    assert rel_err(out, ref) < _tol(q)
    for b, (a, e) in enumerate(zip(qsl.tolist(), qsl.tolist()[1:])):  # every sequence's rows, not only the sum
        if e > a:
            assert rel_err(out[a:e], ref[a:e]) < _tol(q), (b, lens[b], qlens[b])
    others = [b for b, n in enumerate(qlens) if 0 < n < 24]
    if others:  # the non-prefill rows went to `rest`, as one sub-batch of exactly those sequences
        starts = [0]
        for b in others:
            starts.append(starts[-1] + qlens[b])
        assert spy.calls == [(starts[-1], starts, [lens[b] for b in others])]
    else:
        assert spy.calls == []


def test_no_prefill_row_is_all_rest():
    q, kc, vc, bt, sl, qsl, ks, vs = make_batch([40, 9], [3, 1], 4, 2, 32, 16, torch.bfloat16, "cpu")
    spy = Spy()
    out = paged_attention_prefill_sdpa(q, kc, vc, bt, sl, qsl, 0.2, rest=spy)  # default threshold: >= 3584
    assert spy.calls == [(4, [0, 3, 4], [40, 9])]
    assert torch.equal(out, paged_attention_ref(q, kc, vc, bt, sl, qsl, 0.2))


def test_threshold_is_read_at_call_time(monkeypatch):
    monkeypatch.setattr(sdpa_prefill, "SDPA_FROM_TOKENS", ((1, 5),))
    q, kc, vc, bt, sl, qsl, ks, vs = make_batch([40, 9], [6, 1], 4, 2, 32, 16, torch.bfloat16, "cpu")
    spy = Spy()
    paged_attention_prefill_sdpa(q, kc, vc, bt, sl, qsl, 0.2, rest=spy)
    assert spy.calls == [(1, [0, 1], [9])]


def test_threshold_depends_on_the_heads_per_rank(monkeypatch):
    """Wide head layouts (TP1/TP2) take SDPA from fewer new tokens than the TP8 shard; the default threshold of a
    call follows q's head count."""
    assert sdpa_prefill.sdpa_from_tokens(96) == sdpa_prefill.sdpa_from_tokens(48) == 3584
    assert sdpa_prefill.sdpa_from_tokens(24) == 6144
    assert sdpa_prefill.sdpa_from_tokens(12) == sdpa_prefill.sdpa_from_tokens(1) == 8192
    monkeypatch.setattr(sdpa_prefill, "SDPA_FROM_TOKENS", ((4, 30), (1, 8)))
    for heads, rest_calls in ((4, [(20, [0, 20], [40])]), (2, [])):  # a 20-token row: SDPA only below 4 heads
        q, kc, vc, bt, sl, qsl, ks, vs = make_batch([40], [20], heads, 1, 32, 16, torch.bfloat16, "cpu")
        spy = Spy()
        paged_attention_prefill_sdpa(q, kc, vc, bt, sl, qsl, 0.2, rest=spy)
        assert spy.calls == rest_calls


def test_top_left_causal_would_be_wrong(monkeypatch):
    """Why the prefix needs care: SDPA's is_causal=True over [n, kv_len] with a cached prefix is top-left aligned
    and differs from our (bottom-right) semantics; both prefix modes match the explicit bottom-right answer (the
    merge in 7-row passes here)."""
    monkeypatch.setattr(sdpa_prefill, "MERGE_ROWS", 7)
    g = torch.Generator().manual_seed(0)
    n, p, hq, hk, d = 20, 13, 4, 2, 32
    q = torch.randn(n, hq, d, generator=g)
    k = torch.randn(p + n, hk, d, generator=g)
    v = torch.randn(p + n, hk, d, generator=g)
    mask = torch.ones(n, p + n, dtype=torch.bool).tril(p)
    expect = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(2, 0),
                                            v.transpose(0, 1).repeat_interleave(2, 0), attn_mask=mask,
                                            scale=0.2).transpose(0, 1)
    top_left = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                              v.transpose(0, 1)[None], is_causal=True, scale=0.2,
                                              enable_gqa=True)[0].transpose(0, 1)
    assert rel_err(top_left, expect) > 0.1
    for mode in ("merge", "pad"):
        assert rel_err(prefill_attention_sdpa(q, k, v, 0.2, mode), expect) < 1e-5, mode
    with pytest.raises(ValueError, match="prefix_mode"):
        prefill_attention_sdpa(q, k, v, 0.2, "bottom_right")


def test_gather_kv_pages_and_scale():
    kc = torch.arange(5 * 4 * 2 * 3, dtype=torch.float32).view(5, 4, 2, 3)
    row = torch.tensor([3, 0, 4, 0], dtype=torch.int32)
    x = gather_kv(kc, row, 10, torch.float32, 0.5)
    want = torch.cat([kc[3], kc[0], kc[4]])[:10] * 0.5
    assert torch.equal(x, want) and x.is_contiguous()
    assert kc[3, 0, 0, 1] == 73.0  # the cache itself is untouched
    f8 = (kc / 4).to(FP8)
    assert torch.equal(gather_kv(f8, row, 7, torch.bfloat16), torch.cat([f8[3], f8[0]])[:7].to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hq,hk", [(96, 8), (12, 1)])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("prefix_mode", ["merge", "pad"])
def test_sdpa_prefill_gpu(hq, hk, cache_dtype, prefix_mode):
    """Real shapes: a 4096-token prompt, a 2000-token chunk after 3000 cached tokens, decode and verify rows."""
    d, bs = 128, 16
    lens, qlens = [4096, 5000, 777, 300], [4096, 2000, 1, 4]
    q, kc, vc, bt, sl, qsl, ks, vs = make_batch(lens, qlens, hq, hk, d, bs, cache_dtype, "cuda")
    out = paged_attention_prefill_sdpa(q, kc, vc, bt, sl, qsl, d ** -0.5, ks, vs, rest=kernels.paged_attention,
                                       prefix_mode=prefix_mode)
    ref = paged_attention_ref(q, kc, vc, bt, sl, qsl, d ** -0.5, ks, vs)
    for a, e in zip(qsl.tolist(), qsl.tolist()[1:]):
        assert rel_err(out[a:e], ref[a:e]) < 1.5e-2, (a, e)
    if prefix_mode == "merge":
        assert sdpa_prefill._LSE_OP["cuda"] == "cudnn"  # the cuDNN LSE op ran (no fallback to flash)

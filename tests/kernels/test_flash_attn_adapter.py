"""kernels.flash_attn_adapter against paged_attention_ref, through fake flash_attn modules (tests/fake_flash_attn.py)
that keep the real signatures and assert the layouts the real library requires. flash_attn itself is not
installed anywhere these tests run."""
from __future__ import annotations

import sys
import types

import fake_flash_attn
import pytest
import torch
from kernel_helpers import rel_err

from kernels import flash_attn_adapter as fa
from kernels.attention import paged_attention_ref


def make_batch(seq_lens, q_lens, hq, hk, d, bs, dtype=torch.bfloat16, device="cpu"):
    """Random paged caches with shuffled pages (a few unused), block tables padded with 0, caches in dtype."""
    b = len(seq_lens)
    pages = [-(-s // bs) for s in seq_lens]
    nb = sum(pages) + 3
    perm = torch.randperm(nb)
    bt = torch.zeros(b, max(pages) + 2, dtype=torch.int32)
    off = 0
    for i, p in enumerate(pages):
        bt[i, :p] = perm[off:off + p].to(torch.int32)
        off += p
    kc = torch.randn(nb, bs, hk, d).to(dtype)
    vc = torch.randn(nb, bs, hk, d).to(dtype)
    qsl = torch.zeros(b + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    q = torch.randn(int(qsl[-1]), hq, d).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return tuple(t.to(device) for t in (q, kc, vc, bt, lens, qsl))


def _run(seq_lens, q_lens, hq, hk, d, bs, hints=True):
    q, kc, vc, bt, lens, qsl = make_batch(seq_lens, q_lens, hq, hk, d, bs)
    scale = d**-0.5
    kw = {"max_query_len": max(q_lens), "max_seq_len": max(seq_lens)} if hints else {}
    out = fa.paged_attention_fa(q, kc, vc, bt, lens, qsl, scale, **kw)
    ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    return rel_err(out, ref)


TOL = 6e-3  # bf16 output rounding


@pytest.mark.parametrize("kind", ["fa3", "fa2"])
def test_available_follows_import(monkeypatch, kind):
    fake_flash_attn.hide(monkeypatch)
    assert not fa.available() and fa.library() is None
    fake_flash_attn.install(monkeypatch, kind)
    assert fa.available() and fa.library()[0] == kind


def test_flash_attn_4s_package_is_not_fa2(monkeypatch):
    """flash-attn-4 installs a `flash_attn` package holding only `flash_attn.cute` (our fa4 prefill backend):
    it imports, but it is not FlashAttention-2 (on the GPU machine the adapter took it for FA2 and failed with
    AttributeError: flash_attn_with_kvcache)."""
    fake_flash_attn.hide(monkeypatch)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert not fa.available() and fa.library() is None
    assert "neither" in fa.unsupported_reason("cuda", torch.bfloat16, 128, torch.bfloat16, 256)


@pytest.mark.parametrize("seq_lens,hq,hk,d,bs", [
    ([1, 17, 40, 300], 8, 2, 64, 16),
    ([70, 5], 8, 1, 128, 16),
    ([33, 2, 129], 6, 3, 32, 64),
])
def test_fa3_decode(monkeypatch, seq_lens, hq, hk, d, bs):
    calls = fake_flash_attn.install(monkeypatch, "fa3")
    assert _run(seq_lens, [1] * len(seq_lens), hq, hk, d, bs) < TOL
    assert calls == [("fa3.flash_attn_with_kvcache", (len(seq_lens), 1, hq, d))]  # batched decode form


@pytest.mark.parametrize("seq_lens,q_lens,bs", [
    ([40, 17, 64, 5], [40, 3, 1, 5], 16),  # full prompt, extend after a cached prefix, a decode, a short prompt
    ([300, 31], [257, 31], 16),  # long extend over many pages
    ([9, 100, 1], [2, 1, 1], 8),  # speculative-style 2-token extend among decodes
    ([50], [50], 1),  # page size 1
])
@pytest.mark.parametrize("hints", [True, False])
def test_fa3_extend_with_cached_prefix(monkeypatch, seq_lens, q_lens, bs, hints):
    calls = fake_flash_attn.install(monkeypatch, "fa3")
    assert _run(seq_lens, q_lens, 8, 2, 64, bs, hints) < TOL
    assert calls == [("fa3.flash_attn_with_kvcache", (sum(q_lens), 8, 64))]  # packed varlen q


def test_fa3_decode_with_an_empty_sequence_uses_varlen(monkeypatch):
    calls = fake_flash_attn.install(monkeypatch, "fa3")
    assert _run([12, 30, 7], [1, 0, 1], 4, 2, 32, 16) < TOL
    assert calls[0][1] == (2, 4, 32)


def test_fa2_decode_and_extend(monkeypatch):
    calls = fake_flash_attn.install(monkeypatch, "fa2")
    assert _run([1, 300, 600], [1, 1, 1], 8, 2, 64, 256) < TOL
    assert _run([300, 40, 513], [45, 40, 1], 8, 2, 64, 256) < TOL
    assert _run([300, 40, 7], [1, 0, 1], 8, 2, 64, 256) < TOL  # max_query_len 1 but not one token per sequence
    assert [c[0] for c in calls] == [
        "fa2.flash_attn_with_kvcache", "fa2.flash_attn_varlen_func", "fa2.flash_attn_varlen_func",
    ]


def test_fa2_refuses_small_pages(monkeypatch):
    fake_flash_attn.install(monkeypatch, "fa2")
    with pytest.raises(ValueError, match="divisible by 256"):
        _run([20, 3], [1, 1], 4, 2, 32, 16)
    assert "divisible by 256" in fa.unsupported_reason("cuda", torch.bfloat16, 128, torch.bfloat16, 16)
    assert fa.unsupported_reason("cuda", torch.bfloat16, 128, torch.bfloat16, 256) is None


def test_fp8_kv_is_refused(monkeypatch):
    fake_flash_attn.install(monkeypatch, "fa3")
    q, kc, vc, bt, lens, qsl = make_batch([20, 3], [1, 1], 4, 2, 32, 16)
    with pytest.raises(ValueError, match="bf16/fp16 KV caches only"):
        fa.paged_attention_fa(q, kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn), bt, lens, qsl, 0.1,
                              0.02, 0.03, max_query_len=1)
    reason = fa.unsupported_reason("cuda", torch.bfloat16, 128, torch.float8_e4m3fn, 16)
    assert "FP8" in reason and "triton" in reason


def test_unsupported_reasons(monkeypatch):
    fake_flash_attn.hide(monkeypatch)
    assert "flash_attn_interface" in fa.unsupported_reason("cuda", torch.bfloat16, 128)
    fake_flash_attn.install(monkeypatch, "fa3")
    assert "CUDA only" in fa.unsupported_reason("cpu", torch.bfloat16, 128)
    assert "float32" in fa.unsupported_reason("cuda", torch.float32, 128)
    assert "head_dim" in fa.unsupported_reason("cuda", torch.bfloat16, 100)
    assert fa.unsupported_reason("cuda", torch.bfloat16, 128, torch.bfloat16, 16) is None  # FA3: any page size
    assert fa.unsupported_reason("cuda", torch.float16, 128, torch.float16, 1) is None


def test_fake_library_catches_wrong_layouts(monkeypatch):
    """The fake's checks bite: an adapter that passed int64 page tables or a strided q would fail here."""
    fake_flash_attn.install(monkeypatch, "fa3")
    import flash_attn_interface

    q, kc, vc, bt, lens, qsl = make_batch([20, 3], [1, 1], 4, 2, 32, 16)
    with pytest.raises(AssertionError, match="int32"):
        flash_attn_interface.flash_attn_with_kvcache(q.view(2, 1, 4, 32), kc, vc, cache_seqlens=lens,
                                                     page_table=bt.long(), softmax_scale=0.1, causal=True)
    strided = torch.zeros(2, 1, 4, 64, dtype=q.dtype)[..., ::2]  # last-dim stride 2
    with pytest.raises(AssertionError, match="contiguous last dimension"):
        flash_attn_interface.flash_attn_with_kvcache(strided, kc, vc, cache_seqlens=lens, page_table=bt,
                                                     softmax_scale=0.1, causal=True)
    with pytest.raises(TypeError):
        flash_attn_interface.flash_attn_with_kvcache(q.view(2, 1, 4, 32), kc, vc, cache_seqlens=lens,
                                                     block_table=bt, softmax_scale=0.1, causal=True)  # FA2 name
    with pytest.raises(AssertionError, match="fp16 and bf16"):
        flash_attn_interface.flash_attn_with_kvcache(q.float().view(2, 1, 4, 32), kc.float(), vc.float(),
                                                     cache_seqlens=lens, page_table=bt, softmax_scale=0.1,
                                                     causal=True)
    # and the causal corner: top-left alignment (the pre-2.1 behaviour) would give a different answer
    q, kc, vc, bt, lens, qsl = make_batch([30], [4], 4, 2, 32, 16)
    out = flash_attn_interface.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, page_table=bt,
                                                       cu_seqlens_q=qsl, max_seqlen_q=4, softmax_scale=0.2,
                                                       causal=True)
    assert rel_err(out, paged_attention_ref(q, kc, vc, bt, lens, qsl, 0.2)) < TOL


@pytest.mark.gpu
@pytest.mark.skipif(not fa.available(), reason="flash_attn is not installed (it is not, on the lent GPU machine)")
@pytest.mark.parametrize("bs", [16, 256])
def test_real_library_gpu(bs):
    """The real library, where installed: decode and extend over a cached prefix vs the reference."""
    if fa.unsupported_reason("cuda", torch.bfloat16, 128, torch.bfloat16, bs):
        pytest.skip(fa.unsupported_reason("cuda", torch.bfloat16, 128, torch.bfloat16, bs))
    for seq_lens, q_lens in (([1, 100, 4096, 8191, 333], [1] * 5), ([1, 100, 1000, 8191, 333], [1, 100, 37, 8191, 4])):
        q, kc, vc, bt, lens, qsl = make_batch(seq_lens, q_lens, 24, 2, 128, bs, device="cuda")
        out = fa.paged_attention_fa(q, kc, vc, bt, lens, qsl, 128**-0.5, max_query_len=max(q_lens),
                                    max_seq_len=max(seq_lens))
        assert rel_err(out, paged_attention_ref(q, kc, vc, bt, lens, qsl, 128**-0.5)) < 1.5e-2

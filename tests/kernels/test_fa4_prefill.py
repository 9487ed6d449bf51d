"""kernels/fa4_prefill.py: the call into FlashAttention-4 against the attention reference (CPU, with the fake
`flash_attn.cute.interface` of tests/fake_flash_attn.py that checks the real argument layout), the backend's
availability rules, and on the GPU the real library at real shapes where it is installed."""
from __future__ import annotations

import functools

import pytest
import torch

import fake_flash_attn
from kernels import fa4_prefill
from kernels.attention import paged_attention_ref
from kernels.packed_kv import pack_index
from model.attention import prefill_kernel, resolve_prefill_attention_backend
from test_flash_attn_adapter import make_batch


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("seq_lens,q_lens,hq,hk", [
    ([300, 40, 17], [300, 1, 5], 8, 2),      # a prompt without a prefix, a decode row, a short chunk
    ([70, 129], [30, 129], 6, 3),            # a chunk after a 40-token prefix
    ([33], [33], 4, 1),
])
def test_matches_the_reference(monkeypatch, seq_lens, q_lens, hq, hk):
    calls = fake_flash_attn.install_fa4(monkeypatch)
    q, kc, vc, bt, lens, qsl = make_batch(seq_lens, q_lens, hq, hk, 64, 16)
    bt = bt.to(torch.int64)  # the engine's tables may be int64: the call converts them
    out = fa4_prefill.paged_attention_prefill_fa4(q, kc, vc, bt, lens, qsl, 0.125, max_query_len=max(q_lens))
    ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, 0.125)
    assert calls == [("fa4.flash_attn_varlen_func", tuple(q.shape))]  # every row in one launch
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel_err(out, ref) < 6e-3
    out2 = fa4_prefill.paged_attention_prefill_fa4(q, kc, vc, bt, lens, qsl, 0.125)  # no hint: read from qsl
    assert torch.equal(out, out2)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("seq_lens,q_lens,hq,hk", [
    ([300, 40, 17], [300, 1, 5], 8, 2),
    ([70, 129], [30, 129], 6, 3),
])
def test_packed_kv_matches_the_reference(monkeypatch, kv_dtype, seq_lens, q_lens, hq, hk):
    """Gathered into packed K/V (any cache dtype, FP8 with its scales): the reference's numbers, one launch."""
    calls = fake_flash_attn.install_fa4(monkeypatch)
    q, kc, vc, bt, lens, qsl = make_batch(seq_lens, q_lens, hq, hk, 64, 16)
    kc, vc = kc.to(kv_dtype), vc.to(kv_dtype)
    ks, vs = (0.5, 2.0) if kv_dtype != torch.bfloat16 else (1.0, 1.0)
    packed = pack_index(bt, seq_lens, 16)
    out = fa4_prefill.paged_attention_prefill_fa4(q, kc, vc, bt, lens, qsl, 0.125, ks, vs, packed=packed)
    ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, 0.125, ks, vs)
    assert calls == [("fa4.flash_attn_varlen_func[packed]", tuple(q.shape))]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel_err(out, ref) < 6e-3


def test_gathers_where_the_keys_are_few_next_to_the_score_work():
    m = fa4_prefill.GATHER_MIN_PAIRS
    fp8 = functools.partial(fa4_prefill.gathers, widens=True)
    assert fp8([0, 2 * m], [2 * m], 10**6)  # a prompt: (n + 1) / 2 pairs per key
    assert not fp8([0, 2 * m - 2], [2 * m - 2], 10**6)
    assert not fp8([0, 2 * m], [2 * m], 2 * m - 1)  # more keys than the reserve
    assert fp8([0, 2 * m], [10 * m], 10**6)  # a chunk after a long prefix: ~n pairs per key
    assert not fp8([0, m], [10 * m], 10**6)
    # a prompt next to long-context decode rows: their keys outweigh its work
    assert not fp8([0, 4096, 4097, 4098], [4096, 100_000, 100_000], 10**6)
    assert not fp8([0, 0], [0], 10**6)


def test_16_bit_pages_are_gathered_only_for_steps_that_attend_cached_keys():
    m = fa4_prefill.GATHER_MIN_PAIRS
    assert not fa4_prefill.gathers([0, 2 * m], [2 * m], 10**6)  # a prompt alone: pages
    assert not fa4_prefill.gathers([0, 2 * m, 4 * m], [2 * m, 2 * m], 10**6)
    assert fa4_prefill.gathers([0, 2 * m], [4 * m], 10**6)  # a chunk after a prefix
    assert fa4_prefill.gathers([0, 4 * m, 4 * m + 1], [4 * m, 64], 10**6)  # a prompt next to a short decode row
    assert not fa4_prefill.gathers([0, m], [10 * m], 10**6)  # too few pairs per key either way


def test_refuses_fp8_pages(monkeypatch):
    fake_flash_attn.install_fa4(monkeypatch)
    q, kc, vc, bt, lens, qsl = make_batch([40], [40], 4, 1, 64, 16)
    with pytest.raises(ValueError, match="gathered"):
        fa4_prefill.paged_attention_prefill_fa4(q, kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn), bt, lens,
                                                qsl, 0.125)
    assert prefill_kernel("fa4", torch.float8_e4m3fn, torch.bfloat16) == "sdpa"
    assert prefill_kernel("fa4", torch.bfloat16, torch.bfloat16) == "fa4"
    assert prefill_kernel("sdpa", torch.bfloat16, torch.bfloat16) == "sdpa"


def test_unsupported_reasons(monkeypatch):
    fake_flash_attn.hide_fa4(monkeypatch)
    assert "pip install flash-attn-4" in fa4_prefill.unsupported_reason("cuda", torch.bfloat16, 128)
    with pytest.raises(RuntimeError, match="flash-attn-4"):
        q, kc, vc, bt, lens, qsl = make_batch([40], [40], 4, 1, 64, 16)
        fa4_prefill.paged_attention_prefill_fa4(q, kc, vc, bt, lens, qsl, 0.125)
    fake_flash_attn.install_fa4(monkeypatch)
    monkeypatch.setattr(fa4_prefill, "device_supported", lambda device: torch.device(device).type == "cuda")
    assert "Hopper" in fa4_prefill.unsupported_reason("cpu", torch.bfloat16, 128)
    assert "bfloat16 or float16" in fa4_prefill.unsupported_reason("cuda", torch.float32, 128)
    assert "head_dim" in fa4_prefill.unsupported_reason("cuda", torch.bfloat16, 300)
    assert fa4_prefill.unsupported_reason("cuda", torch.bfloat16, 128) is None


def test_auto_takes_fa4_where_it_runs(monkeypatch):
    fake_flash_attn.install_fa4(monkeypatch)
    monkeypatch.setattr(fa4_prefill, "device_supported", lambda device: True)
    assert resolve_prefill_attention_backend("auto", "cuda") == "fa4"
    assert resolve_prefill_attention_backend("auto", "cpu") == "triton"  # the CPU reference path, always
    monkeypatch.setattr(fa4_prefill, "device_supported", lambda device: False)  # e.g. an Ampere GPU
    assert resolve_prefill_attention_backend("auto", "cuda") == "sdpa"
    fake_flash_attn.hide_fa4(monkeypatch)
    monkeypatch.setattr(fa4_prefill, "device_supported", lambda device: True)
    assert resolve_prefill_attention_backend("auto", "cuda") == "sdpa"
    assert resolve_prefill_attention_backend("fa4", "cuda") == "fa4"


def _prompt_qkv(n, hq, hk, d, device="cpu"):
    """q and a prompt's own K/V as the prologue leaves them (v a column slice of the QKV projection), and the same
    K/V in a paged cache (one sequence, all keys new) for the reference."""
    qkv = torch.randn(n, (hq + 2 * hk) * d, device=device).to(torch.bfloat16)
    q, k, v = (t.reshape(n, -1, d) for t in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    k = k.contiguous()  # the RoPE kernel writes a new k
    pages = -(-n // 16)
    kc = torch.zeros(pages * 16, hk, d, device=device, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    kc[:n], vc[:n] = k, v
    bt = torch.arange(pages, device=device, dtype=torch.int32)[None]
    lens = torch.tensor([n], device=device, dtype=torch.int32)
    qsl = torch.tensor([0, n], device=device, dtype=torch.int32)
    ref = paged_attention_ref(q.contiguous(), kc.view(pages, 16, hk, d), vc.view(pages, 16, hk, d), bt, lens, qsl,
                              d ** -0.5)
    return q.contiguous(), k, v, ref


@pytest.mark.parametrize("n,hq,hk", [(37, 8, 2), (130, 6, 1)])
def test_prompt_alone_attends_its_own_kv(monkeypatch, n, hq, hk):
    """One sequence without cached keys: FA4's batch entry point over the fresh K/V (v strided as it comes out of
    the projection), the reference's numbers."""
    calls = fake_flash_attn.install_fa4(monkeypatch)
    q, k, v, ref = _prompt_qkv(n, hq, hk, 64)
    assert not v.is_contiguous()
    out = fa4_prefill.prompt_attention_fa4(q, k, v, 64 ** -0.5)
    assert calls == [("fa4.flash_attn_func", (1, n, hq, 64))]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel_err(out, ref) < 6e-3
    with pytest.raises(ValueError, match="one dtype"):
        fa4_prefill.prompt_attention_fa4(q, k.to(torch.float16), v, 64 ** -0.5)


def test_takes_steps_from_the_threshold():
    assert not fa4_prefill.takes(fa4_prefill.FROM_TOKENS - 1)
    assert fa4_prefill.takes(fa4_prefill.FROM_TOKENS)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk", [(96, 8), (12, 1)])
@pytest.mark.parametrize("seq_lens,q_lens", [([4096], [4096]), ([8192, 4100, 2000], [4096, 1, 2000])])
def test_real_library_gpu(hq, hk, seq_lens, q_lens):
    if fa4_prefill.unsupported_reason("cuda", torch.bfloat16, 128):
        pytest.skip(fa4_prefill.unsupported_reason("cuda", torch.bfloat16, 128))
    q, kc, vc, bt, lens, qsl = make_batch(seq_lens, q_lens, hq, hk, 128, 16, device="cuda")
    out = fa4_prefill.paged_attention_prefill_fa4(q, kc, vc, bt, lens, qsl, 128 ** -0.5, max_query_len=max(q_lens))
    ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, 128 ** -0.5)
    assert _rel_err(out, ref) < 1e-2
    packed = pack_index(bt, seq_lens, 16)
    for kv_dtype, ks, vs in ((torch.bfloat16, 1.0, 1.0), (torch.float8_e4m3fn, 0.5, 2.0)):
        kq, vq = kc.to(kv_dtype), vc.to(kv_dtype)
        out = fa4_prefill.paged_attention_prefill_fa4(q, kq, vq, bt, lens, qsl, 128 ** -0.5, ks, vs,
                                                      max_query_len=max(q_lens), packed=packed)
        ref = paged_attention_ref(q, kq, vq, bt, lens, qsl, 128 ** -0.5, ks, vs)
        assert _rel_err(out, ref) < 1e-2, kv_dtype
    if len(seq_lens) == 1:  # a prompt alone over its own K/V (v a strided slice, as the engine passes it)
        q, k, v, ref = _prompt_qkv(seq_lens[0], hq, hk, 128, device="cuda")
        assert _rel_err(fa4_prefill.prompt_attention_fa4(q, k, v, 128 ** -0.5), ref) < 1e-2

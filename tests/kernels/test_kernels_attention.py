import pytest
import torch

from kernels.attention import paged_attention_ref
from kernels.triton_attention import paged_attention
from kernel_helpers import fp32_dot_tol, poison, poisoned_empty, rel_err


def make_batch(seq_lens, q_lens, hq, hk, d, bs, cache_dtype, device, qdtype=torch.bfloat16):
    """Random paged caches (pages shuffled, extra pages unused), block tables padded with 0."""
    b = len(seq_lens)
    pages = [-(-s // bs) for s in seq_lens]
    nb = sum(pages) + 3
    perm = torch.randperm(nb, device=device)
    bt = torch.zeros(b, max(pages) + 1, dtype=torch.int32, device=device)
    off = 0
    for i, p in enumerate(pages):
        bt[i, :p] = perm[off:off + p].to(torch.int32)
        off += p
    kc = torch.randn(nb, bs, hk, d, device=device)
    vc = torch.randn(nb, bs, hk, d, device=device)
    ks = vs = 1.0
    if cache_dtype == torch.float8_e4m3fn:
        ks, vs = 0.02, 0.03
        kc, vc = (kc * 20).clamp(-448, 448), (vc * 30).clamp(-448, 448)
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    qsl = torch.zeros(b + 1, dtype=torch.int32, device=device)
    qsl[1:] = torch.tensor(q_lens, device=device).cumsum(0)
    q = torch.randn(int(qsl[-1]), hq, d, device=device, dtype=qdtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q, kc, vc, bt, lens, qsl, ks, vs


def _tol(q):
    return 1e-5 if q.dtype == torch.float32 else 6e-3


@pytest.mark.parametrize("seq_lens,hq,hk,d,bs", [
    ([1, 17, 40], 4, 2, 32, 16),
    ([70, 5], 8, 1, 128, 16),
    ([33], 6, 3, 64, 8),
])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_decode(device, seq_lens, hq, hk, d, bs, cache_dtype, splits):
    q, kc, vc, bt, lens, qsl, ks, vs = make_batch(seq_lens, [1] * len(seq_lens), hq, hk, d, bs, cache_dtype, device)
    absmax = poison(torch.empty(len(seq_lens), hq, device=device))
    with poisoned_empty():
        out = paged_attention(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs, max_query_len=1,
                              max_seq_len=max(seq_lens), num_splits=splits, absmax_out=absmax)
    ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs)
    assert rel_err(out, ref) < _tol(q)
    assert torch.equal(absmax, out.float().abs().amax(-1))  # max |o| per head, of the stored values


def test_absmax_out_on_every_path(device):
    """absmax_out is filled on the extend path (prefill) and by the reference too."""
    import kernels
    from kernels.dispatch import kernel_backend

    q, kc, vc, bt, lens, qsl, ks, vs = make_batch([9, 30], [4, 3], 4, 2, 32, 16, torch.bfloat16, device)
    for backend in ("triton", "ref"):
        absmax = poison(torch.empty(q.shape[0], 4, device=device))
        with kernel_backend(backend):
            out = kernels.paged_attention(q, kc, vc, bt, lens, qsl, 0.2, max_query_len=4, absmax_out=absmax)
        assert torch.equal(absmax, out.float().abs().amax(-1)), backend


def test_decode_fp32(device):
    q, kc, vc, bt, lens, qsl, ks, vs = make_batch([9, 30], [1, 1], 4, 2, 32, 16, torch.float32, device, torch.float32)
    with poisoned_empty():
        out = paged_attention(q, kc, vc, bt, lens, qsl, 0.2, max_query_len=1, num_splits=2)
    assert rel_err(out, paged_attention_ref(q, kc, vc, bt, lens, qsl, 0.2)) < fp32_dot_tol(device)


@pytest.mark.parametrize("seq_lens,q_lens", [
    ([20, 50, 7], [20, 9, 0]),       # full prefill, extend over a cached prefix, a sequence with no new tokens
    ([80], [80]),                    # several q blocks, causal within the new tokens
    ([40, 33], [4, 1]),              # speculative verification (k+1 tokens) mixed with decode
    ([150, 70], [30, 64]),           # 64-row blocks with unmasked (below-diagonal) prefix tiles
    ([300, 150], [200, 150]),        # 128-row blocks: unmasked tiles, ragged last block, a prefix
])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_extend(device, seq_lens, q_lens, cache_dtype):
    hq, hk, d, bs = 6, 2, 128, 16
    q, kc, vc, bt, lens, qsl, ks, vs = make_batch(seq_lens, q_lens, hq, hk, d, bs, cache_dtype, device)
    with poisoned_empty():
        out = paged_attention(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs, max_query_len=max(q_lens))
    ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs)
    assert rel_err(out, ref) < _tol(q)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk", [(96, 8), (24, 2), (12, 1)])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_attention_gpu(hq, hk, cache_dtype):
    d, bs = 128, 16
    seq_lens = [1, 100, 4096, 8191, 333]
    q, kc, vc, bt, lens, qsl, ks, vs = make_batch(seq_lens, [1] * 5, hq, hk, d, bs, cache_dtype, "cuda")
    with poisoned_empty():
        out = paged_attention(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs, max_query_len=1, max_seq_len=8191)
    ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs)
    assert rel_err(out, ref) < 1.5e-2
    q_lens = [1, 100, 1000, 8191, 4]
    q, kc, vc, bt, lens, qsl, ks, vs = make_batch(seq_lens[:4] + [333], q_lens, hq, hk, d, bs, cache_dtype, "cuda")
    with poisoned_empty():
        out = paged_attention(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs, max_query_len=8191)
    ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs)
    assert rel_err(out, ref) < 1.5e-2


def test_decode_config_rules():
    """The decode launch defaults the H200 sweeps chose (bench/RESULTS.md, Kernels, session 5): bf16 pages keep
    64-token tiles and about two waves of programs; FP8 pages take 64-token tiles only for a handful of
    (sequence, KV head) pairs, one wave of splits from 128 pairs, 3 stages from 64."""
    from kernels.triton_attention import decode_config

    long = 202752  # graphs pass max_model_len
    assert decode_config(1, 8, long, 132, False) == {"block_n": 64, "splits": 33, "stages": 2}
    assert decode_config(64, 8, long, 132, False) == {"block_n": 64, "splits": 1, "stages": 2}
    assert decode_config(1, 2, long, 132, True) == {"block_n": 64, "splits": 64, "stages": 2}
    assert decode_config(1, 8, long, 132, True) == {"block_n": 128, "splits": 33, "stages": 2}
    assert decode_config(64, 2, long, 132, True) == {"block_n": 128, "splits": 2, "stages": 3}
    assert decode_config(8, 8, long, 132, True) == {"block_n": 128, "splits": 5, "stages": 3}
    assert decode_config(1, 2, 100, 132, True)["splits"] == 1  # a split covers at least two tiles

"""The verify attention kernel (1 < max_query_len <= 16: speculative verification of k+1 tokens per sequence)
against paged_attention_ref: uniform chains (the CUDA-graph layout), ragged ones (0 .. max tokens per
sequence), GQA groups of 1-12 heads, bf16 and FP8 pages, split-K, padding rows."""
import pytest
import torch

from kernels.attention import paged_attention_ref
from kernels.triton_attention import attention_path, paged_attention, verify_config, verify_splits
from kernel_helpers import poison, poisoned_empty, rel_err
from test_kernels_attention import make_batch

CASES = [
    # seq_lens, q_lens, hq, hk
    ([4, 37, 66], [4, 4, 4], 4, 2),          # uniform chains, G = 2, a sequence that is all chain; keys
                                             # 0..62 of the 66-key one are seen by all rows: 62 + 1 < 64
    ([70, 9], [4, 4], 12, 1),                # G = 12 (GLM-4.7 at TP8): 48 rows in one 64-row block
    ([40, 33, 20, 50], [4, 1, 0, 3], 6, 2),  # ragged: decode row, a sequence without new tokens, G = 3
    ([16, 100], [16, 7], 24, 2),             # 16 x 12 rows: two 128-row blocks, the second empty for seq 1
]


def _run(seq_lens, q_lens, hq, hk, cache_dtype, device, d=32, bs=16, **kw):
    q, kc, vc, bt, lens, qsl, ks, vs = make_batch(seq_lens, q_lens, hq, hk, d, bs, cache_dtype, device)
    assert attention_path(max(q_lens), q.shape[0], len(seq_lens)) == "verify"
    absmax = poison(torch.empty(q.shape[0], hq, device=device))
    with poisoned_empty():
        out = paged_attention(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs, max_query_len=max(q_lens),
                              max_seq_len=max(seq_lens), absmax_out=absmax, **kw)
    ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs)
    return out, ref, absmax


@pytest.mark.parametrize("seq_lens,q_lens,hq,hk", CASES)
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("splits", [None, 1, 5])
def test_verify(device, seq_lens, q_lens, hq, hk, cache_dtype, splits):
    out, ref, absmax = _run(seq_lens, q_lens, hq, hk, cache_dtype, device, num_splits=splits)
    assert rel_err(out, ref) < 6e-3
    assert torch.equal(absmax, out.float().abs().amax(-1))  # max |o| per head, of the stored values


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 32), (64, 16)])
def test_verify_small_blocks(device, block_m, block_n):
    """Row blocks that split a chain's rows mid-query (12 heads over 16-row blocks), splits of one tile whose
    last one holds only keys past the first rows' limits (67 keys, 4 queries: row 0 sees keys 0..63), a tile
    end right after the keys every row sees (66 keys, 4 queries: keys 0..62, tile 48..63 needs the mask)."""
    out, ref, _ = _run([67, 30, 66], [4, 2, 4], 12, 1, torch.bfloat16, device, block_m=block_m, block_n=block_n,
                       num_splits=5)
    assert rel_err(out, ref) < 6e-3


def test_verify_padding_rows_stay_local(device):
    """The last rows of a chain may be padding whose K/V were never stored (slot -1) but which seq_len counts:
    even NaN in those slots must not reach the real rows (which never see those keys)."""
    hq, hk, d, bs = 8, 2, 32, 16
    seq_lens, q_lens = [45, 70], [4, 4]
    q, kc, vc, bt, lens, qsl, ks, vs = make_batch(seq_lens, q_lens, hq, hk, d, bs, torch.bfloat16, device)
    pad = [(0, 43), (0, 44), (1, 69)]  # (sequence, key position) of padding rows: seq 0 has 2, seq 1 has 1
    for b, pos in pad:
        page = bt[b, pos // bs].long()
        kc[page, pos % bs] = 0
        vc[page, pos % bs] = 0
    ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, d ** -0.5)
    for b, pos in pad:
        page = bt[b, pos // bs].long()
        kc[page, pos % bs] = float("nan")
        vc[page, pos % bs] = float("inf")
    real = torch.tensor([1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool, device=device)
    for splits in (1, 3):
        out = paged_attention(q, kc, vc, bt, lens, qsl, d ** -0.5, max_query_len=4, max_seq_len=70,
                              num_splits=splits, block_n=16)
        assert rel_err(out[real], ref[real]) < 6e-3


def test_verify_matches_decode_for_single_tokens(device):
    """Forced onto a decode batch (q_len 1 everywhere) the verify kernel gives the decode kernel's result."""
    q, kc, vc, bt, lens, qsl, ks, vs = make_batch([50, 7, 33], [1, 1, 1], 12, 1, 32, 16, torch.bfloat16, device)
    dec = paged_attention(q, kc, vc, bt, lens, qsl, 0.2, max_query_len=1, max_seq_len=50, path="decode")
    ver = paged_attention(q, kc, vc, bt, lens, qsl, 0.2, max_query_len=1, max_seq_len=50, path="verify")
    ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, 0.2)
    assert rel_err(dec, ref) < 6e-3 and rel_err(ver, ref) < 6e-3


def test_attention_path_rules():
    assert attention_path(1, 8, 8) == "decode"
    assert attention_path(1, 7, 8) == "verify"  # a sequence without a new token
    assert attention_path(2, 16, 8) == "verify"
    assert attention_path(16, 100, 8) == "verify"
    assert attention_path(17, 17, 1) == "extend"


def test_verify_config_rules():
    cfg = verify_config(1, 8, 12, 4, 4096, 132, False)  # 48 rows: one 64-row block, 4 warps
    assert (cfg["block_m"], cfg["row_blocks"], cfg["warps"]) == (64, 1, 4) and cfg["splits"] > 1
    cfg = verify_config(64, 8, 12, 16, 4096, 132, True)  # 192 rows: two 128-row blocks, 8 warps
    assert (cfg["block_m"], cfg["row_blocks"], cfg["warps"]) == (128, 2, 8)
    assert verify_config(4, 2, 1, 2, 100, 132, False)["block_m"] == 16
    # splits: all programs in one wave (2 resident per SM up to 64 rows, 1 above), splits >= 2 tiles, <= 64
    assert verify_splits(32, 4096, 132, 128, 1) == 4
    assert verify_splits(128, 4096, 132, 64, 2) == 2
    assert verify_splits(512, 4096, 132, 64, 2) == 1
    assert verify_splits(1, 4096, 132, 64, 2) == 32 and verify_splits(1, 1 << 20, 132, 64, 2) == 64
    assert verify_splits(1, 100, 132, 64, 2) == 1


def _graph_case(hq, hk, cache_dtype, q_len, batch, max_len):
    d, bs = 128, 16
    seq_lens = [max_len] * batch
    return make_batch(seq_lens, [q_len] * batch, hq, hk, d, bs, cache_dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk", [(96, 8), (24, 2), (12, 1)])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_verify_gpu(hq, hk, cache_dtype):
    d, bs = 128, 16
    seq_lens = [5, 100, 4096, 8191, 333, 16]
    for q_lens in ([4] * 6, [5, 8, 16, 3, 0, 1]):
        q, kc, vc, bt, lens, qsl, ks, vs = make_batch(seq_lens, q_lens, hq, hk, d, bs, cache_dtype, "cuda")
        absmax = poison(torch.empty(q.shape[0], hq, device="cuda"))
        with poisoned_empty():
            out = paged_attention(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs, max_query_len=max(q_lens),
                                  max_seq_len=8191, absmax_out=absmax)
        ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs)
        assert rel_err(out, ref) < 1.5e-2, q_lens
        assert torch.equal(absmax, out.float().abs().amax(-1))
        ext = paged_attention(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs, max_query_len=max(q_lens), path="extend")
        assert rel_err(out, ext) < 1.5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_verify_cuda_graph(cache_dtype):
    """Captured once for (B, q_len, max_seq_len), replayed with other lengths (split bounds follow them)."""
    hq, hk, d, q_len, batch, max_len = 96, 8, 128, 4, 4, 8192
    q, kc, vc, bt, lens, qsl, ks, vs = _graph_case(hq, hk, cache_dtype, q_len, batch, max_len)

    def step():
        return paged_attention(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs, max_query_len=q_len,
                               max_seq_len=max_len)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    for new_lens in ([8192, 4, 100, 5000], [17, 4096, 8000, 63]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.normal_()
        g.replay()
        torch.cuda.synchronize()
        ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, vs)
        assert rel_err(out, ref) < 1.5e-2, new_lens

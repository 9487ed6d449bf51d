import pytest
import torch

from kernels.fp8_linear import fp8_linear_block_ref, fp8_linear_channel_ref
from kernels.quant import quant_fp8_weight_per_block, quant_fp8_weight_per_channel
from kernels.triton_fp8_gemm import fp8_linear_block, fp8_linear_channel
from kernel_helpers import poisoned_empty, rel_err


def _check(out, ref, gpu=False):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out.float()).any()
    if gpu:
        # on GPU the accumulation order differs and a few activation FP8 roundings flip (Triton's division is
        # not torch's): bound the norm error and the largest element error instead of every element
        assert rel_err(out, ref) < 3e-3
        assert (out.float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max()
        return
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=1e-3 * ref.float().abs().max().item())
    assert rel_err(out, ref) < 2e-3


CFGS = [
    None,  # heuristic (split-K for small M)
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=3, GROUP_M=1, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, GROUP_M=2, num_warps=4, num_stages=2),
]


@pytest.mark.parametrize("m,n,k", [(1, 96, 320), (5, 200, 256), (37, 64, 192)])
@pytest.mark.parametrize("cfg", range(len(CFGS)))
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_channel(device, m, n, k, cfg, bias):
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w, ws = quant_fp8_weight_per_channel(torch.randn(n, k, device=device) * 0.05)
    b = torch.randn(n, device=device, dtype=torch.bfloat16) if bias else None
    with poisoned_empty():
        y = fp8_linear_channel(x, w, ws, b, config=CFGS[cfg])
    _check(y, fp8_linear_channel_ref(x, w, ws, b))


@pytest.mark.parametrize("m,n,k", [(1, 160, 384), (6, 256, 320), (33, 100, 128)])
@pytest.mark.parametrize("cfg", [0, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_block(device, m, n, k, cfg, bias):
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w, ws = quant_fp8_weight_per_block(torch.randn(n, k, device=device) * 0.05)
    b = torch.randn(n, device=device, dtype=torch.bfloat16) if bias else None
    with poisoned_empty():
        y = fp8_linear_block(x, w, ws, b, config=CFGS[cfg])
    _check(y, fp8_linear_block_ref(x, w, ws, b))


def test_split_k_counters_reset(device):
    """Self-resetting tickets: repeated split-K launches stay correct."""
    x = torch.randn(3, 512, device=device, dtype=torch.bfloat16)
    w, ws = quant_fp8_weight_per_channel(torch.randn(64, 512, device=device) * 0.05)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=8, GROUP_M=1, num_warps=4, num_stages=2)
    ref = fp8_linear_channel_ref(x, w, ws)
    for _ in range(3):
        _check(fp8_linear_channel(x, w, ws, config=cfg), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64, 300, 4096])
@pytest.mark.parametrize("n,k", [(1536, 5120), (5120, 1536), (14336, 5120)])
def test_fp8_linear_gpu(m, n, k):
    from kernels.triton_fp8_gemm import fp8_linear_channel_auto

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w, ws = quant_fp8_weight_per_channel(torch.randn(n, k, device="cuda") * 0.05)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ref = fp8_linear_channel_ref(x, w, ws, b)
    with poisoned_empty():
        y = fp8_linear_channel(x, w, ws, b)
        y_auto = fp8_linear_channel_auto(x, w, ws, b)  # cuBLAS _scaled_mm above the crossover
    _check(y, ref, gpu=True)
    _check(y_auto, ref, gpu=True)
    wb, wbs = quant_fp8_weight_per_block(torch.randn(n, k, device="cuda") * 0.05)
    with poisoned_empty():
        y = fp8_linear_block(x, wb, wbs)
    _check(y, fp8_linear_block_ref(x, wb, wbs), gpu=True)


SWAP_CFGS = [
    None,  # heuristic
    dict(BLOCK_W=32, BLOCK_K=64, SPLIT_K=3, num_warps=4, num_stages=2),  # split-K with a ragged last split
    dict(BLOCK_W=64, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=3),  # masked K tail, partial weight tile
]


@pytest.mark.parametrize("m", [1, 3, 16, 37, 64])
@pytest.mark.parametrize("n,k", [(96, 320), (200, 256)])
@pytest.mark.parametrize("cfg", range(len(SWAP_CFGS)))
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_gemm_swap(device, m, n, k, cfg, bias):
    from kernels.triton_fp8_gemm_swap import fp8_gemm_swap
    from kernels.triton_quant import quant_fp8_per_token

    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w, ws = quant_fp8_weight_per_channel(torch.randn(n, k, device=device) * 0.05)
    b = torch.randn(n, device=device, dtype=torch.bfloat16) if bias else None
    xq, xs = quant_fp8_per_token(x)
    for _ in range(2):  # split-K tickets re-arm themselves
        with poisoned_empty():
            y = fp8_gemm_swap(xq, xs, w, ws, b, torch.bfloat16, config=SWAP_CFGS[cfg])
            # x_scale None: the kernel quantizes the bf16 x itself, to the same codes and scales
            y_q = fp8_gemm_swap(x, None, w, ws, b, torch.bfloat16, config=SWAP_CFGS[cfg])
        _check(y, fp8_linear_channel_ref(x, w, ws, b))
        assert torch.equal(y_q, y)


@pytest.mark.parametrize("parts", [1, 3, 8])
def test_fp8_gemm_swap_scale_from_absmax_parts(device, parts):
    """Given max |x| per slice of each row (as decode attention gives per head), the in-kernel quantization
    takes its per-token scale from them: the same codes as quantizing the whole row."""
    from kernels.triton_fp8_gemm_swap import fp8_gemm_swap
    from kernels.triton_quant import quant_fp8_per_token

    m, k = 3, 48 * parts
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    x[1] *= 50
    w, ws = quant_fp8_weight_per_channel(torch.randn(40, k, device=device) * 0.05)
    amax_parts = x.float().abs().view(m, parts, k // parts).amax(-1)
    y = fp8_gemm_swap(*quant_fp8_per_token(x), w, ws, None, torch.bfloat16)
    with poisoned_empty():
        y_p = fp8_gemm_swap(x, None, w, ws, None, torch.bfloat16, x_absmax_parts=amax_parts)
    assert torch.equal(y_p, y)
    # the parts are what sets the scale (a kernel that re-read x would not notice a larger hint)
    y_big = fp8_gemm_swap(x, None, w, ws, None, torch.bfloat16, x_absmax_parts=amax_parts * 3)  # not a power of 2: other codes
    assert not torch.equal(y_big, y)


def test_fp8_gemm_swap_quantizes_rows_with_distinct_scales(device):
    """In-kernel quantization keeps each token's own scale (rows 100x apart, one all-zero row, a row whose
    amax sits in the last element of a ragged tail)."""
    from kernels.triton_fp8_gemm_swap import fp8_gemm_swap
    from kernels.triton_quant import quant_fp8_per_token

    k = 2500  # two amax loads, the second ragged
    x = torch.randn(4, k, device=device, dtype=torch.bfloat16)
    x[1] *= 100
    x[2] = 0
    x[3, -1] = 1000
    w, ws = quant_fp8_weight_per_channel(torch.randn(64, k, device=device) * 0.05)
    xq, xs = quant_fp8_per_token(x)
    y = fp8_gemm_swap(xq, xs, w, ws, None, torch.bfloat16)
    y_q = fp8_gemm_swap(x, None, w, ws, None, torch.bfloat16)
    assert torch.equal(y_q, y)
    assert not torch.equal(y[0], y[1] / 100)  # distinct rows (guards a test that compares zeros)


def test_fp8_gemm_swap_rejects_large_m(device):
    from kernels.triton_fp8_gemm_swap import fp8_gemm_swap
    from kernels.triton_quant import quant_fp8_per_token

    w, ws = quant_fp8_weight_per_channel(torch.randn(64, 128, device=device) * 0.05)
    xq, xs = quant_fp8_per_token(torch.randn(65, 128, device=device, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="at most 64 tokens"):
        fp8_gemm_swap(xq, xs, w, ws, None, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 64])
@pytest.mark.parametrize("n,k", [(14336, 5120), (5120, 12288), (24576, 5120), (1536, 5120), (5120, 1536),
                                 (3584, 5120), (5120, 3072)])
def test_fp8_gemm_swap_gpu(m, n, k):
    from kernels.triton_fp8_gemm_swap import fp8_gemm_swap
    from kernels.triton_quant import quant_fp8_per_token

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w, ws = quant_fp8_weight_per_channel(torch.randn(n, k, device="cuda") * 0.05)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    xq, xs = quant_fp8_per_token(x)
    with poisoned_empty():
        y = fp8_gemm_swap(xq, xs, w, ws, b, torch.bfloat16)
        y_q = fp8_gemm_swap(x, None, w, ws, b, torch.bfloat16)
    _check(y, fp8_linear_channel_ref(x, w, ws, b), gpu=True)
    assert torch.equal(y_q, y)


def test_swap_linear_routing_follows_the_table():
    """Up to 16 tokens every shape takes the swap-AB GEMM; 17-64 only the shapes swept there (the TP shards, where
    it beat cuBLAS); the full TP1 shapes keep cuBLAS above 16; nothing above the kernel's 64."""
    from kernels.triton_fp8_gemm import swap_linear_config, tuned_swap

    h200 = "NVIDIA_H200"
    for m in (1, 4, 16):
        assert swap_linear_config(h200, 14336, 5120, m)[0]
        assert swap_linear_config("Some_Other_GPU", 14336, 5120, m) == (True, None)  # heuristic config
    assert not swap_linear_config(h200, 14336, 5120, 17)[0]  # TP1 qkv: not swept above 16
    assert not swap_linear_config("Some_Other_GPU", 3584, 5120, 32)[0]
    for n, k in ((3584, 5120), (5120, 3072), (1792, 5120), (5120, 1536)):
        ok, cfg = swap_linear_config(h200, n, k, 40)
        assert ok and cfg == tuned_swap(h200, n, k, 64) and cfg is not None
        assert swap_linear_config(h200, n, k, 64)[0] and not swap_linear_config(h200, n, k, 65)[0]
    assert swap_linear_config(h200, 3584, 5120, 0) == (False, None)

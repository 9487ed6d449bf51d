import pytest
import torch

from kernels.attention import store_kv_ref
from kernels.rope import qk_norm_rope_ref, rope_cos_sin_cache
from kernels.triton_kv_store import store_kv
from kernels.triton_rope import qk_norm_rope
from kernel_helpers import poison, poisoned_empty


def _close_bf16(out, ref, max_frac=2e-3):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out.float()).any()
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        return
    frac = (out.float() != ref.float()).float().mean().item()
    assert frac <= max_frac, frac
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -6, atol=2 ** -6)


def _qkv(t, hq, hk, d, dtype, device, strided=True):
    """q, k, v as strided views of one fused qkv row, like the model's split."""
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=device, dtype=dtype) * 2
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.reshape(t, hq, d), k.reshape(t, hk, d), v.reshape(t, hk, d)
    if not strided:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v


@pytest.mark.parametrize(
    "t,hq,hk,d,rot,norm",
    [(1, 4, 2, 32, 16, True), (5, 12, 1, 128, 64, True), (3, 6, 3, 128, 64, False), (2, 4, 4, 64, 64, True)],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qk_norm_rope(device, t, hq, hk, d, rot, norm, dtype):
    q, k, _ = _qkv(t, hq, hk, d, dtype, device)
    cs = rope_cos_sin_cache(rot, 4096, 1e6, device)
    pos = torch.randint(0, 4096, (t,), device=device)
    qw = (torch.rand(d, device=device) + 0.5).to(dtype) if norm else None
    kw = (torch.rand(d, device=device) + 0.5).to(dtype) if norm else None
    with poisoned_empty():
        qo, ko = qk_norm_rope(q, k, qw, kw, cs, pos, 1e-5)
    qr, kr = qk_norm_rope_ref(q, k, qw, kw, cs, pos, 1e-5)
    _close_bf16(qo, qr)
    _close_bf16(ko, kr)


def _caches(nb, bs, hk, d, dtype, device):
    kc = poison(torch.empty(nb, bs, hk, d, device=device, dtype=dtype))
    vc = poison(torch.empty(nb, bs, hk, d, device=device, dtype=dtype))
    return kc, vc


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_qk_norm_rope_fused_store(device, cache_dtype):
    t, hq, hk, d, rot, bs, nb = 6, 8, 2, 128, 64, 16, 4
    q, k, v = _qkv(t, hq, hk, d, torch.bfloat16, device)
    cs = rope_cos_sin_cache(rot, 256, 1e6, device)
    pos = torch.arange(t, device=device) + 17
    qw = torch.rand(d, device=device, dtype=torch.bfloat16) + 0.5
    kw = torch.rand(d, device=device, dtype=torch.bfloat16) + 0.5
    slots = torch.randperm(nb * bs, device=device)[:t].to(torch.int64)
    slots[2] = -1
    ks, vs = (0.05, 0.02) if cache_dtype == torch.float8_e4m3fn else (1.0, 1.0)
    kc, vc = _caches(nb, bs, hk, d, cache_dtype, device)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    with poisoned_empty():
        qo, ko = qk_norm_rope(q, k, qw, kw, cs, pos, 1e-5, v=v, k_cache=kc, v_cache=vc, slot_mapping=slots,
                              k_scale=ks, v_scale=vs)
    qr, kr = qk_norm_rope_ref(q, k, qw, kw, cs, pos, 1e-5)
    _close_bf16(qo, qr)
    _close_bf16(ko, kr)
    store_kv_ref(ko, v, kc_ref, vc_ref, slots, ks, vs)  # what the unfused path would write given our k
    assert torch.equal(kc.view(torch.uint8), kc_ref.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), vc_ref.view(torch.uint8))


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32])
def test_store_kv(device, cache_dtype):
    t, hk, d, bs, nb = 7, 3, 32, 16, 3
    _, k, v = _qkv(t, 1, hk, d, torch.bfloat16, device)
    slots = torch.randperm(nb * bs, device=device)[:t].to(torch.int32)
    slots[0] = -1
    ks, vs = (0.03, 0.01) if cache_dtype == torch.float8_e4m3fn else (1.0, 1.0)
    kc, vc = _caches(nb, bs, hk, d, cache_dtype, device)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    store_kv(k, v, kc, vc, slots, ks, vs)
    store_kv_ref(k, v, kc_ref, vc_ref, slots, ks, vs)
    assert torch.equal(kc.view(torch.uint8), kc_ref.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), vc_ref.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk", [(96, 8), (24, 2), (12, 1)])
@pytest.mark.parametrize("t", [1, 77, 4096])
def test_qk_norm_rope_gpu(hq, hk, t):
    d, rot = 128, 64
    q, k, v = _qkv(t, hq, hk, d, torch.bfloat16, "cuda")
    cs = rope_cos_sin_cache(rot, 131072, 1e6, "cuda")
    pos = torch.randint(0, 131072, (t,), device="cuda")
    qw = torch.rand(d, device="cuda", dtype=torch.bfloat16) + 0.5
    kw = torch.rand(d, device="cuda", dtype=torch.bfloat16) + 0.5
    nb, bs = (t + 15) // 16 + 2, 16
    kc, vc = _caches(nb, bs, hk, d, torch.float8_e4m3fn, "cuda")
    kc_ref, vc_ref = kc.clone(), vc.clone()
    slots = torch.randperm(nb * bs, device="cuda")[:t]
    with poisoned_empty():
        qo, ko = qk_norm_rope(q, k, qw, kw, cs, pos, 1e-5, v=v, k_cache=kc, v_cache=vc, slot_mapping=slots,
                              k_scale=0.05, v_scale=0.05)
    qr, kr = qk_norm_rope_ref(q, k, qw, kw, cs, pos, 1e-5)
    _close_bf16(qo, qr, 1e-2)
    _close_bf16(ko, kr, 1e-2)
    store_kv_ref(ko, v, kc_ref, vc_ref, slots, 0.05, 0.05)
    assert (kc.view(torch.uint8) != kc_ref.view(torch.uint8)).float().mean() < 1e-4
    assert torch.equal(vc.view(torch.uint8), vc_ref.view(torch.uint8))

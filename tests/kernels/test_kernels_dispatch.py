"""The dispatch glue: every public op routed to its Triton kernel (forced backend under the interpreter on
CPU) agrees with the reference; the default backend keeps CPU tensors on the reference."""
import pytest
import torch

import kernels
from kernels import dispatch
from kernels.attention import paged_attention_ref, store_kv_ref
from kernels.fp8_linear import fp8_linear_block_ref, fp8_linear_channel_ref
from kernels.fused_moe import fused_moe_ref
from kernels.moe_routing import moe_route_ref
from kernels.norm import add_rms_norm_ref, rms_norm_ref
from kernels.quant import quant_fp8_weight_per_block, quant_fp8_weight_per_channel
from kernels.rope import qk_norm_rope_ref, rope_cos_sin_cache
from kernel_helpers import rel_err


@pytest.fixture
def forced_triton(device):
    with dispatch.kernel_backend("triton" if device.type == "cpu" else "auto"):
        yield


def test_default_backend_keeps_cpu_on_reference(monkeypatch):
    assert dispatch.get_backend() == "auto"
    called = []
    monkeypatch.setattr(dispatch, "_triton", lambda mod: called.append(mod))
    x = torch.randn(3, 64)
    w = torch.ones(64)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
    assert not called


def test_dispatch_all_ops(device, forced_triton):
    bf = torch.bfloat16
    t, h = 5, 256
    x = torch.randn(t, h, device=device, dtype=bf)
    r = torch.randn(t, h, device=device, dtype=bf)
    w = torch.rand(h, device=device, dtype=bf) + 0.5
    assert rel_err(kernels.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)) < 4e-3
    y, s = kernels.add_rms_norm(x, r, w, 1e-5)
    yr, sr = add_rms_norm_ref(x, r, w, 1e-5)
    assert rel_err(y, yr) < 4e-3 and torch.equal(s, sr)
    assert rel_err(kernels.silu_mul(x), torch.nn.functional.silu(x[:, :128]) * x[:, 128:]) < 4e-3

    wq, ws = quant_fp8_weight_per_channel(torch.randn(96, h, device=device) * 0.05)
    bias = torch.randn(96, device=device, dtype=bf)
    assert rel_err(kernels.fp8_linear_channel(x, wq, ws, bias), fp8_linear_channel_ref(x, wq, ws, bias)) < 4e-3
    wb, wbs = quant_fp8_weight_per_block(torch.randn(96, h, device=device) * 0.05)
    assert rel_err(kernels.fp8_linear_block(x, wb, wbs), fp8_linear_block_ref(x, wb, wbs)) < 4e-3

    logits = torch.randn(t, 16, device=device)
    cb = torch.randn(16, device=device) * 0.1
    tw, ti = kernels.moe_route(logits, cb, 2, 1, 1, True, 2.5, 1)
    twr, tir = moe_route_ref(logits, cb, 2, 1, 1, True, 2.5, 1)
    assert torch.equal(ti.sort(1).values, tir.sort(1).values)
    w13, _ = quant_fp8_weight_per_channel(torch.randn(17 * 64, h, device=device) * 0.05)
    w13s = _.view(17, 64, 1)
    w2, w2s = quant_fp8_weight_per_channel(torch.randn(17 * h, 32, device=device) * 0.2)
    w13, w2, w2s = w13.view(17, 64, h), w2.view(17, h, 32), w2s.view(17, h, 1)
    out = kernels.fused_moe(x, w13, w2, tw, ti, w13s, w2s, "fp8_channel")
    assert rel_err(out, fused_moe_ref(x, w13, w2, twr, tir, w13s, w2s, "fp8_channel")) < 2e-2

    hq, hk, d, bs = 4, 2, 32, 16
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=device, dtype=bf)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], -1)
    q, k, v = q.reshape(t, hq, d), k.reshape(t, hk, d), v.reshape(t, hk, d)
    cs = rope_cos_sin_cache(16, 64, 1e4, device)
    pos = torch.arange(t, device=device)
    qn = torch.rand(d, device=device, dtype=bf) + 0.5
    kc = torch.zeros(4, bs, hk, d, device=device, dtype=bf)
    vc = torch.zeros_like(kc)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    slots = torch.arange(t, device=device) + 3
    qo, ko = kernels.qk_norm_rope(q, k, qn, qn, cs, pos, 1e-5, v=v, k_cache=kc, v_cache=vc, slot_mapping=slots)
    qr, kr = qk_norm_rope_ref(q, k, qn, qn, cs, pos, 1e-5)
    assert rel_err(qo, qr) < 4e-3 and rel_err(ko, kr) < 4e-3
    store_kv_ref(kr, v, kc_ref, vc_ref, slots)
    assert rel_err(kc, kc_ref) < 4e-3 and torch.equal(vc, vc_ref)
    kernels.store_kv(kr, v, kc, vc, slots)
    assert torch.equal(kc, kc_ref)

    bt = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32, device=device)
    lens = torch.tensor([t + 3], dtype=torch.int32, device=device)
    qsl = torch.tensor([0, t], dtype=torch.int32, device=device)
    o = kernels.paged_attention(qo, kc, vc, bt, lens, qsl, d ** -0.5, max_query_len=t, max_seq_len=t + 3)
    assert rel_err(o, paged_attention_ref(qo, kc, vc, bt, lens, qsl, d ** -0.5)) < 6e-3
    o = kernels.paged_attention(qo[-1:], kc, vc, bt, lens, qsl[:2].clamp(max=1), d ** -0.5, max_query_len=1)
    assert rel_err(o, paged_attention_ref(qo[-1:], kc, vc, bt, lens, qsl[:2].clamp(max=1), d ** -0.5)) < 6e-3


def test_kernel_backend_is_scoped(monkeypatch):
    called = []
    monkeypatch.setattr(dispatch, "_triton", lambda mod: called.append(mod) or pytest.fail("Triton called"))
    x = torch.randn(2, 32)
    w = torch.ones(32)
    with dispatch.kernel_backend("ref"):
        assert dispatch.get_backend() == "ref"
        with dispatch.kernel_backend("triton", ops=set()):  # no op allowed on Triton: all stay on the reference
            assert torch.equal(kernels.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
        assert dispatch.get_backend() == "ref"
    assert dispatch.get_backend() == "auto" and not called
    with pytest.raises(ValueError, match="unknown kernel backend"), dispatch.kernel_backend("cuda"):
        pass
    with pytest.raises(ValueError, match="no Triton kernel"), dispatch.kernel_backend("triton", ops={"not_an_op"}):
        pass

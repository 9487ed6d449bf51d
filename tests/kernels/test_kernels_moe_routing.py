import pytest
import torch

from kernels.moe_routing import moe_route_ref
from kernels.triton_moe_routing import moe_gate_route, moe_route
from kernel_helpers import poisoned_empty


def _check(w, ids, wr, idr):
    assert w.shape == wr.shape and ids.shape == idr.shape and ids.dtype == torch.int32
    assert not torch.isnan(w).any()
    si, oi = ids.sort(dim=1)
    sr, orr = idr.sort(dim=1)
    assert torch.equal(si, sr)
    torch.testing.assert_close(w.gather(1, oi), wr.gather(1, orr), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "t,e,k,ng,tg,shared",
    [(1, 16, 4, 1, 1, 0), (7, 160, 8, 1, 1, 1), (5, 64, 6, 8, 3, 0), (33, 20, 2, 4, 2, 1), (3, 24, 3, 1, 1, 0)],
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("renorm", [True, False])
def test_moe_route(device, t, e, k, ng, tg, shared, bias, renorm):
    logits = torch.randn(t, e, device=device) * 2
    b = torch.randn(e, device=device) * 0.5 if bias else None
    with poisoned_empty():
        w, ids = moe_route(logits, b, k, ng, tg, renorm, 2.5, shared)
    wr, idr = moe_route_ref(logits, b, k, ng, tg, renorm, 2.5, shared)
    _check(w, ids, wr, idr)
    if shared:
        assert (ids[:, -1] == e).all() and (w[:, -1] == 1.0).all()


@pytest.mark.parametrize("t,e,ng,tg,shared", [(5, 160, 1, 1, 1), (33, 64, 8, 3, 0), (2, 20, 1, 1, 0)])
@pytest.mark.parametrize("parts", [2, 3])
def test_moe_route_sums_partial_logits(device, t, e, ng, tg, shared, parts):
    """parts > 1 (the split router GEMM's output): the kernel sums the partial vectors in part order and routes
    the sum -- the same ids and weights as routing torch's ((p0 + p1) + p2). The parts are large and of mixed
    sign so that a different summation order would change low bits of the logits."""
    p = [torch.randn(t, e, device=device) * 8 for _ in range(parts)]
    b = torch.randn(e, device=device) * 0.5
    total = p[0]
    for q in p[1:]:
        total = total + q
    with poisoned_empty():
        w, ids = moe_route(torch.cat(p, 1), b, 8, ng, tg, True, 2.5, shared, parts=parts)
    wr, idr = moe_route(total, b, 8, ng, tg, True, 2.5, shared)
    assert torch.equal(ids, idr)
    assert torch.equal(w, wr)
    _check(w, ids, *moe_route_ref(total, b, 8, ng, tg, True, 2.5, shared))


def test_split_bf16_stacked_matches_torch(device):
    """The one-launch split equals cat(split_bf16_exact(w)) bit for bit (ties of the nearest-even rounding
    included: the weights carry values halfway between bf16 neighbours)."""
    from kernels.triton_moe_routing import split_bf16_exact, split_bf16_stacked

    w = torch.randn(20, 300, device=device) * torch.logspace(-6, 3, 300, device=device)
    halfway = (torch.randn(20, 1, device=device).to(torch.bfloat16).float().view(torch.int32) | 0x8000)
    w[:, :1] = halfway.view(torch.float32)  # exactly between two bf16 values
    got = split_bf16_stacked(w)
    assert got.shape == (60, 300) and got.dtype == torch.bfloat16
    assert torch.equal(got, torch.cat(split_bf16_exact(w)))
    assert torch.equal((got[:20].float() + got[20:40].float()) + got[40:].float(), w)


@pytest.mark.parametrize("e,k", [(64, 8), (20, 8), (160, 8)])
def test_moe_route_ties_go_to_the_lowest_id_in_score_order(device, e, k):
    """Integer logits: many exact ties. Ids come out in descending score, ties by ascending expert id (a stable
    sort), and each weight is its own expert's score -- also across padding lanes (e = 20 of 32). The uniform
    bias makes some choices negative and some positive (the key's sign handling) without changing the order."""
    t = 9
    logits = torch.randint(-2, 3, (t, e), device=device).float()
    w, ids = moe_route(logits, torch.full((e,), -0.75, device=device), k, 1, 1, False, 1.0, 1)
    want = torch.sort(-logits, dim=1, stable=True).indices[:, :k].to(torch.int32)
    assert torch.equal(ids[:, :k], want), (ids, want)
    assert (ids[:, k] == e).all() and (w[:, k] == 1.0).all()
    torch.testing.assert_close(w[:, :k], logits.sigmoid().gather(1, want.long()), rtol=1e-6, atol=0)
    x = torch.randn(t, 64, device=device)
    gw = torch.zeros(e, 64, device=device)  # all logits 0: one big tie, the fused router takes ids 0..k-1
    wg, idg = moe_gate_route(x[:4].contiguous(), gw, None, k, 1, 1, True, 1.0, 0)
    assert torch.equal(idg, torch.arange(k, dtype=torch.int32, device=device).expand(4, k))
    torch.testing.assert_close(wg, torch.full((4, k), 1.0 / k, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 4096])
@pytest.mark.parametrize("shared", [0, 1])
def test_moe_route_gpu(t, shared):
    logits = torch.randn(t, 160, device="cuda") * 2
    b = torch.randn(160, device="cuda") * 0.1
    with poisoned_empty():
        w, ids = moe_route(logits, b, 8, 1, 1, True, 2.5, shared)
    wr, idr = moe_route_ref(logits, b, 8, 1, 1, True, 2.5, shared)
    _check(w, ids, wr, idr)


@pytest.mark.parametrize(
    "t,e,h,k,ng,tg,shared,cfg",
    [
        (1, 16, 96, 4, 1, 1, 0, dict(BLOCK_E=4, BLOCK_H=32, H_PER_SPLIT=32)),  # 3 hidden slices, 4 expert blocks
        (3, 24, 200, 3, 4, 2, 1, dict(BLOCK_E=8, BLOCK_H=64, H_PER_SPLIT=128)),  # ragged last slice, t < 4
        (4, 20, 64, 2, 1, 1, 1, None),  # default config (one slice)
        (2, 64, 130, 6, 8, 3, 0, dict(BLOCK_E=16, BLOCK_H=16, H_PER_SPLIT=48)),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_moe_gate_route(device, t, e, h, k, ng, tg, shared, cfg, bias):
    from kernels.moe_routing import moe_gate_route_ref
    from kernels.triton_moe_routing import moe_gate_route

    x = torch.randn(t, h, device=device, dtype=torch.bfloat16)
    gw = torch.randn(e, h, device=device) / h**0.5 * 3
    b = torch.randn(e, device=device) * 0.5 if bias else None
    for _ in range(2):  # the ticket re-arms itself
        with poisoned_empty():
            w, ids = moe_gate_route(x, gw, b, k, ng, tg, True, 2.5, shared, config=cfg)
        wr, idr = moe_gate_route_ref(x, gw, b, k, ng, tg, True, 2.5, shared)
        _check(w, ids, wr, idr)


def test_moe_gate_route_large_t_falls_back(device):
    from kernels.moe_routing import moe_gate_route_ref
    from kernels.triton_moe_routing import GATE_ROUTE_MAX_T, moe_gate_route

    x = torch.randn(GATE_ROUTE_MAX_T + 3, 64, device=device, dtype=torch.bfloat16)
    gw = torch.randn(32, 64, device=device) / 8
    w, ids = moe_gate_route(x, gw, None, 4)
    _check(w, ids, *moe_gate_route_ref(x, gw, None, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 2, 4, 64])
@pytest.mark.parametrize("shared", [0, 1])
def test_moe_gate_route_gpu(t, shared):
    """GLM-4.7 widths: 160 experts, hidden 5120, top-8, fp32 gate weights."""
    from kernels.moe_routing import moe_gate_route_ref
    from kernels.triton_moe_routing import moe_gate_route

    x = torch.randn(t, 5120, device="cuda", dtype=torch.bfloat16)
    gw = torch.randn(160, 5120, device="cuda") / 5120**0.5
    b = torch.randn(160, device="cuda") * 0.1
    w, ids = moe_gate_route(x, gw, b, 8, 1, 1, True, 2.5, shared)
    wr, idr = moe_gate_route_ref(x, gw, b, 8, 1, 1, True, 2.5, shared)
    _check(w, ids, wr, idr)


def _check_norm_route(out, x, res, nw, gw, b, k, ng, tg, shared, quant):
    """The fused norm + router against the references: x + residual exact, y within 2 bf16 ulps of
    add_rms_norm_ref (the kernel sums squares in another order), y_fp8 / scale exactly the per-token
    quantization of the returned y, and the routing of the returned y."""
    from kernels.moe_routing import moe_gate_route_ref
    from kernels.norm import add_rms_norm_ref
    from kernels.quant import quant_fp8_per_token_ref

    y, summed, yq, w, ids = out
    y_ref, s_ref = add_rms_norm_ref(x, res, nw, 1e-6)
    assert torch.equal(summed, s_ref)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2**-7, atol=1e-6)
    if quant:
        q_ref, qs_ref = quant_fp8_per_token_ref(y)
        assert torch.equal(yq[1], qs_ref)
        assert torch.equal(yq[0].float(), q_ref.float())
    else:
        assert yq is None
    _check(w, ids, *moe_gate_route_ref(y, gw, b, k, ng, tg, True, 2.5, shared))


@pytest.mark.parametrize(
    "t,e,h,k,ng,tg,shared,cfg",
    [
        (1, 16, 96, 4, 1, 1, 0, dict(BLOCK_E=4, BLOCK_H=32, H_PER_SPLIT=32)),  # 3 hidden slices, 4 expert blocks
        (3, 24, 200, 3, 4, 2, 1, dict(BLOCK_E=8, BLOCK_H=64, H_PER_SPLIT=128)),  # ragged last slice, t < 4
        (4, 20, 64, 2, 1, 1, 1, None),  # default config (one slice)
    ],
)
@pytest.mark.parametrize("quant", [True, False])
def test_rms_norm_gate_route(device, t, e, h, k, ng, tg, shared, cfg, quant):
    from kernels.triton_moe_routing import rms_norm_gate_route

    x = torch.randn(t, h, device=device, dtype=torch.bfloat16)
    res = torch.randn(t, h, device=device, dtype=torch.bfloat16) * 3
    res[0] *= 50  # rows of different scale
    nw = (1 + 0.1 * torch.randn(h, device=device)).to(torch.bfloat16)
    gw = torch.randn(e, h, device=device) / h**0.5 * 3
    b = torch.randn(e, device=device) * 0.5
    for _ in range(2):  # the ticket re-arms itself
        with poisoned_empty():
            out = rms_norm_gate_route(x, res, nw, 1e-6, quant, gw, b, k, ng, tg, True, 2.5, shared, config=cfg)
        _check_norm_route(out, x, res, nw, gw, b, k, ng, tg, shared, quant)


def test_rms_norm_gate_route_rejects_what_it_cannot_fuse(device):
    from kernels.triton_moe_routing import GATE_ROUTE_MAX_T, rms_norm_gate_route

    gw = torch.randn(8, 64, device=device)
    nw = torch.ones(64, device=device, dtype=torch.bfloat16)
    for x in (torch.randn(GATE_ROUTE_MAX_T + 1, 64, device=device, dtype=torch.bfloat16),
              torch.randn(2, 64, device=device)):
        with pytest.raises(ValueError, match="1..4 tokens of bf16"):
            rms_norm_gate_route(x, x.clone(), nw, 1e-6, True, gw, None, 2)


@pytest.mark.parametrize("t", [2, 9])
def test_rms_norm_gate_route_dispatch(device, t):
    """kernels.rms_norm_gate_route: fused at decode sizes, norm op + moe_gate_route above (same contract)."""
    import kernels
    from kernels.dispatch import kernel_backend

    h, e = 64, 16
    x = torch.randn(t, h, device=device, dtype=torch.bfloat16)
    res = torch.randn(t, h, device=device, dtype=torch.bfloat16)
    nw = torch.ones(h, device=device, dtype=torch.bfloat16)
    gw = torch.randn(e, h, device=device) / 8
    with kernel_backend("triton"):
        out = kernels.rms_norm_gate_route(x, res, nw, 1e-6, True, gw, None, 4, 1, 1, True, 2.5, 1)
    _check_norm_route(out, x, res, nw, gw, None, 4, 1, 1, 1, True)
    with kernel_backend("ref"):
        y, summed, yq, w, ids = kernels.rms_norm_gate_route(x, res, nw, 1e-6, True, gw, None, 4, 1, 1, True, 2.5, 1)
    assert yq is None  # the reference leaves the quantization to the consumer


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 4])
@pytest.mark.parametrize("quant", [True, False])
def test_rms_norm_gate_route_gpu(t, quant):
    """GLM-4.7 widths: hidden 5120, 160 experts + the fused shared one, top-8, fp32 gate weights."""
    from kernels.triton_moe_routing import rms_norm_gate_route

    x = torch.randn(t, 5120, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(t, 5120, device="cuda", dtype=torch.bfloat16) * 4
    nw = (1 + 0.1 * torch.randn(5120, device="cuda")).to(torch.bfloat16)
    gw = torch.randn(160, 5120, device="cuda") / 5120**0.5
    b = torch.randn(160, device="cuda") * 0.1
    with poisoned_empty():
        out = rms_norm_gate_route(x, res, nw, 1e-6, quant, gw, b, 8, 1, 1, True, 2.5, 1)
    _check_norm_route(out, x, res, nw, gw, b, 8, 1, 1, 1, quant)


def test_split_bf16_exact():
    """The three bf16 parts of an fp32 router weight sum back to it exactly, across magnitudes."""
    from kernels.triton_moe_routing import split_bf16_exact

    w = torch.randn(160, 512) * torch.logspace(-6, 3, 512)
    hi, mid, lo = split_bf16_exact(w)
    assert hi.dtype == mid.dtype == lo.dtype == torch.bfloat16
    assert torch.equal((hi.float() + mid.float()) + lo.float(), w)
    assert not torch.equal(hi.float(), w)  # an fp32 weight really needs the lower parts


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1024, 4096])
def test_router_logits_split_gpu(t):
    """The split bf16 tensor-core router GEMM against the float64 truth. Measured on H200: max error 3e-5 at
    4096 tokens (the fp32 CUDA-core GEMM: 4e-6) on logits of magnitude ~1-5 -- the tensor cores' fp32
    accumulation rounds more; it is far below the bf16 rounding of the router's input (~4e-3 relative)."""
    from kernels.triton_moe_routing import ROUTER_SPLIT_MIN_T, _mm_out_dtype_ok, router_logits

    assert t >= ROUTER_SPLIT_MIN_T and _mm_out_dtype_ok("cuda:0")  # the split path really runs
    x = torch.randn(t, 5120, device="cuda", dtype=torch.bfloat16)
    gw = torch.randn(160, 5120, device="cuda") / 5120**0.5
    ref = torch.nn.functional.linear(x.double(), gw.double())
    got = router_logits(x, gw)
    assert got.dtype == torch.float32
    err = (got.double() - ref).abs().max().item()
    assert err < 1e-4, err
    bf16_noise = (torch.nn.functional.linear(x.double() * (1 + 2**-9), gw.double()) - ref).abs().max().item()
    assert err < bf16_noise / 10, (err, bf16_noise)

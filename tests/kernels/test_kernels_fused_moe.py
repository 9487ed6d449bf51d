import pytest
import torch

from kernels.fused_moe import fused_moe_ref
from kernels.moe_routing import moe_route_ref
from kernels.quant import quant_fp8_weight_per_block, quant_fp8_weight_per_channel
from kernels.triton_moe import fused_moe
from kernel_helpers import fp32_dot_tol, poisoned_empty, rel_err


def make_experts(e, h, inter, quant, device, dtype=torch.bfloat16):
    w13 = torch.randn(e, 2 * inter, h, device=device) / h ** 0.5
    w2 = torch.randn(e, h, inter, device=device) / inter ** 0.5
    if quant == "none":
        return w13.to(dtype), w2.to(dtype), None, None
    fn = quant_fp8_weight_per_channel if quant == "fp8_channel" else quant_fp8_weight_per_block
    q13 = [fn(w) for w in w13]
    q2 = [fn(w) for w in w2]
    return (torch.stack([a for a, _ in q13]), torch.stack([a for a, _ in q2]),
            torch.stack([s for _, s in q13]), torch.stack([s for _, s in q2]))


def routing(t, e, k, device, shared=False, unused=0):
    """Random top-k over the first e - unused experts (the rest get no tokens); shared: expert e-1 for all."""
    routed = e - 1 if shared else e
    logits = torch.randn(t, routed, device=device)
    if unused:
        logits[:, -unused:] = -30.0
    return moe_route_ref(logits, None, k, 1, 1, True, 2.5, 1 if shared else 0)


def _tol(quant, gpu=False):
    # CPU (interpreter) reproduces the reference's roundings exactly; on GPU the accumulation order differs and
    # an FP8 rounding of the intermediate can flip
    if not gpu:
        return 2e-3
    return 5e-3 if quant == "none" else 3e-2


# (tokens, experts, hidden, intermediate, top_k): M = 1, ragged, experts with no tokens, partial blocks
SHAPES = [(1, 8, 128, 64, 2), (5, 6, 256, 96, 3), (19, 9, 192, 64, 4)]
# aligned (no pair mode) + split-K + fused top-k reduce; aligned + separate reduce kernel
CFG_SPLIT = dict(BLOCK_M=16, BLOCK_N1=32, BLOCK_K1=64, SPLIT_K1=2, W1=4, S1=2, BLOCK_N2=64, BLOCK_K2=64, W2=4, S2=2,
                 PAIR_MAX=0, N_LOOP2=3)
CFG_BIG = dict(BLOCK_M=32, BLOCK_N1=64, BLOCK_K1=128, SPLIT_K1=1, W1=4, S1=2, BLOCK_N2=32, BLOCK_K2=128, W2=4, S2=2,
               PAIR_MAX=0, FUSE_REDUCE_MAX_T=0)
# accumulation inside the MMA across K tiles (the prefill configs)
CFG_FAST = dict(CFG_BIG, FAST_ACC=True)
# + tiles by tensor descriptors (TMA): weights in gate_up, act and weights in down (FP8 per channel only)
CFG_TMA = dict(CFG_FAST, TMA1=True, TMA2=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant", ["none", "fp8_channel", "fp8_block"])
@pytest.mark.parametrize("cfg", [None, CFG_SPLIT, CFG_BIG, CFG_FAST])
def test_fused_moe(device, shape, quant, cfg):
    t, e, h, inter, k = shape
    if quant == "fp8_block" and cfg is not None and cfg["BLOCK_K1"] != 128:
        cfg = dict(cfg, BLOCK_K1=128, BLOCK_K2=128)
    x = torch.randn(t, h, device=device, dtype=torch.bfloat16)
    w13, w2, s13, s2 = make_experts(e, h, inter, quant, device)
    tw, ti = routing(t, e, k, device, unused=2)
    with poisoned_empty():
        out = fused_moe(x, w13, w2, tw, ti, s13, s2, quant, config=cfg)
    ref = fused_moe_ref(x, w13, w2, tw, ti, s13, s2, quant)
    assert rel_err(out, ref) < _tol(quant)


# I not a multiple of BLOCK_K2 (the descriptor zero-fills K past I) nor of BLOCK_N1 (the gate tile's last
# columns read up rows, the up tile's read the next expert's: masked at the store); experts without tokens
@pytest.mark.parametrize("shape", [(19, 9, 192, 96, 4), (70, 6, 256, 64, 2), (33, 5, 128, 160, 3)])
@pytest.mark.parametrize("cfg", [CFG_TMA, dict(CFG_TMA, BLOCK_M=16, BLOCK_N1=32, BLOCK_K1=64, BLOCK_N2=64,
                                               BLOCK_K2=64, FUSE_REDUCE_MAX_T=1 << 20)])
def test_fused_moe_tma(device, shape, cfg, monkeypatch):
    import kernels.triton_moe as tm

    made = []
    real = tm._desc
    monkeypatch.setattr(tm, "_desc", lambda t, block: made.append(tuple(block)) or real(t, block))
    t, e, h, inter, k = shape
    x = torch.randn(t, h, device=device, dtype=torch.bfloat16)
    w13, w2, s13, s2 = make_experts(e, h, inter, "fp8_channel", device)
    tw, ti = routing(t, e, k, device, unused=1)
    with poisoned_empty():
        out = fused_moe(x, w13, w2, tw, ti, s13, s2, "fp8_channel", config=cfg, quant_in_kernel=False)
    ref = fused_moe_ref(x, w13, w2, tw, ti, s13, s2, "fp8_channel")
    assert rel_err(out, ref) < _tol("fp8_channel")
    bm, bk1, bk2 = cfg["BLOCK_M"], cfg["BLOCK_K1"], cfg["BLOCK_K2"]
    assert made == [(cfg["BLOCK_N1"], bk1), (bm, bk2), (cfg["BLOCK_N2"], bk2)]  # the descriptor path ran


@pytest.mark.parametrize("shape", [(19, 9, 192, 96, 4), (70, 6, 256, 64, 2), (33, 5, 128, 160, 3)])
@pytest.mark.parametrize("tiles", [dict(), dict(BLOCK_M=16, BLOCK_N2=64, BLOCK_K2=64, FAST_ACC=False)])
def test_fused_moe_persistent_down(device, shape, tiles, monkeypatch):
    """The persistent down GEMM (PERSIST2): equal to the one-tile-per-program down kernel on the same tiles (same
    products and roundings per tile), within the reference's tolerance; more tiles than programs (4 in the
    interpreter), I not a multiple of BLOCK_K2, experts without tokens, H not a multiple of BLOCK_N2."""
    import kernels.triton_moe_persistent as tp

    calls = []
    real = tp._moe_down_persistent_kernel
    monkeypatch.setattr(tp, "_moe_down_persistent_kernel",
                        type("Spy", (), {"__getitem__": lambda self, g: calls.append(g) or real[g]})())
    t, e, h, inter, k = shape
    x = torch.randn(t, h, device=device, dtype=torch.bfloat16)
    w13, w2, s13, s2 = make_experts(e, h, inter, "fp8_channel", device)
    tw, ti = routing(t, e, k, device, unused=1)
    cfg = dict(CFG_TMA, **tiles)
    with poisoned_empty():
        out = fused_moe(x, w13, w2, tw, ti, s13, s2, "fp8_channel", config=dict(cfg, PERSIST2=True),
                        quant_in_kernel=False)
        plain = fused_moe(x, w13, w2, tw, ti, s13, s2, "fp8_channel", config=cfg, quant_in_kernel=False)
    assert len(calls) == 1  # the persistent kernel ran (once), the plain call did not take it
    assert torch.equal(out, plain)
    assert rel_err(out, fused_moe_ref(x, w13, w2, tw, ti, s13, s2, "fp8_channel")) < _tol("fp8_channel")


@pytest.mark.parametrize("quant", ["fp8_channel", "fp8_block"])
def test_fused_moe_prequantized_and_shared(device, quant):
    """Separate activation-quant kernel path (large-T path) and the fused shared expert (top-(k+1), w = 1)."""
    t, e, h, inter, k = 23, 7, 256, 64, 2
    x = torch.randn(t, h, device=device, dtype=torch.bfloat16)
    w13, w2, s13, s2 = make_experts(e, h, inter, quant, device)
    tw, ti = routing(t, e, k, device, shared=True)
    with poisoned_empty():
        out = fused_moe(x, w13, w2, tw, ti, s13, s2, quant, quant_in_kernel=False)
    ref = fused_moe_ref(x, w13, w2, tw, ti, s13, s2, quant)
    assert rel_err(out, ref) < _tol(quant)


def test_fused_moe_pair_mode_split_prequantized(device):
    """Decode path: pairs without alignment, split-K gate_up, fused reduce, x quantized by the caller."""
    from kernels.triton_quant import quant_fp8_per_token

    t, e, h, inter, k = 3, 10, 256, 64, 4
    x = torch.randn(t, h, device=device, dtype=torch.bfloat16)
    w13, w2, s13, s2 = make_experts(e, h, inter, "fp8_channel", device)
    tw, ti = routing(t, e, k, device, shared=True)
    cfg = dict(CFG_SPLIT, PAIR_MAX=64, SPLIT_K1=3, N_LOOP2=2)
    xq, xs = quant_fp8_per_token(x)
    with poisoned_empty():
        out = fused_moe(x, w13, w2, tw, ti, s13, s2, "fp8_channel", config=cfg, x_fp8=xq, x_scale=xs)
    ref = fused_moe_ref(x, w13, w2, tw, ti, s13, s2, "fp8_channel")
    assert rel_err(out, ref) < _tol("fp8_channel")


def test_fused_moe_fp32(device):
    t, e, h, inter, k = 4, 5, 64, 32, 2
    x = torch.randn(t, h, device=device)
    w13, w2, _, _ = make_experts(e, h, inter, "none", device, torch.float32)
    tw, ti = routing(t, e, k, device)
    with poisoned_empty():
        out = fused_moe(x, w13, w2, tw, ti)
    assert rel_err(out, fused_moe_ref(x, w13, w2, tw, ti)) < fp32_dot_tol(device)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 4096])
@pytest.mark.parametrize("e,inter", [(161, 192), (161, 384), (160, 1536)])
@pytest.mark.parametrize("quant", ["fp8_channel", "fp8_block"])
def test_fused_moe_gpu(t, e, inter, quant):
    if quant == "fp8_block" and inter % 128:
        inter = 256  # block-FP8 checkpoints need I % 128 == 0 per shard
    h, k = 5120, 8
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w13, w2, s13, s2 = make_experts(e, h, inter, quant, "cuda")
    tw, ti = routing(t, e, k, "cuda", shared=e == 161)
    with poisoned_empty():
        out = fused_moe(x, w13, w2, tw, ti, s13, s2, quant)
    ref = fused_moe_ref(x, w13, w2, tw, ti, s13, s2, quant)
    assert rel_err(out, ref) < _tol(quant, gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1024, 4096])
@pytest.mark.parametrize("e,inter", [(161, 192), (161, 384), (160, 1536)])
@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("persist", [False, True])
def test_fused_moe_tma_gpu(t, e, inter, big, persist):
    """The prefill configs with descriptor tiles (TMA1 / TMA2) at real shapes, table tiles and 128 x 256 ones, the
    down GEMM one tile per program or persistent (PERSIST2)."""
    from kernels.triton_moe import moe_config

    h, k = 5120, 8
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w13, w2, s13, s2 = make_experts(e, h, inter, "fp8_channel", "cuda")
    tw, ti = routing(t, e, k, "cuda", shared=e == 161)
    cfg = dict(moe_config(t, e, inter, h, "fp8_channel", x.device), TMA1=True, TMA2=True, PERSIST2=persist)
    if big:
        cfg.update(BLOCK_M=128, BLOCK_N1=128, W1=8, S1=3, BLOCK_N2=256, W2=8, S2=3, N_LOOP2=1)
    with poisoned_empty():
        out = fused_moe(x, w13, w2, tw, ti, s13, s2, "fp8_channel", config=cfg)
    ref = fused_moe_ref(x, w13, w2, tw, ti, s13, s2, "fp8_channel")
    assert rel_err(out, ref) < _tol("fp8_channel", gpu=True)

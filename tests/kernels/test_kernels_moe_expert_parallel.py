"""Expert parallelism in the fused MoE: a rank holds a slice of the experts, its ids are kernels.moe_local_ids's (-1
for another rank's expert), and fused_moe(remote_ids=True) computes only its pairs. Each rank's output equals the
reference on the same ids, a token with no local pair gets exactly 0, and the ranks' outputs sum to the whole MoE."""
import pytest
import torch

from kernels.fused_moe import fused_moe_ref
from kernels.moe_routing import moe_local_ids_ref
from kernels.triton_moe_routing import moe_local_ids
from kernels.triton_moe import fused_moe
from kernel_helpers import poisoned_empty, rel_err
from test_kernels_fused_moe import CFG_BIG, CFG_SPLIT, CFG_TMA, make_experts, routing


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_moe_local_ids(device, impl):
    f = moe_local_ids_ref if impl == "ref" else moe_local_ids
    ids = torch.tensor([[0, 3, 4, 7], [5, 6, 2, 1]], dtype=torch.int32, device=device)
    assert f(ids, 4, 4).tolist() == [[-1, -1, 0, 3], [1, 2, -1, -1]]
    assert f(ids, 0, 4).tolist() == [[0, 3, -1, -1], [-1, -1, 2, 1]]
    assert f(ids, 0, 4).dtype == torch.int32
    # the fused shared expert (id 8 in the last column): local expert `count` on rank t % ranks only
    ids = torch.tensor([[1, 5, 8], [6, 2, 8], [0, 7, 8]], dtype=torch.int32, device=device)
    assert f(ids, 4, 4, (1, 2)).tolist() == [[-1, 1, -1], [2, -1, 4], [-1, 3, -1]]
    assert f(ids, 0, 4, (0, 2)).tolist() == [[1, -1, 4], [-1, 2, -1], [0, -1, 4]]


def test_moe_local_ids_many_tokens(device):
    """More tokens than one program's block, k not a power of two: the kernel equals the reference."""
    ids = torch.randint(0, 161, (300, 9), dtype=torch.int32, device=device)
    ids[:, -1] = 160
    for owner in (None, (3, 8)):
        assert torch.equal(moe_local_ids(ids, 60, 20, owner), moe_local_ids_ref(ids, 60, 20, owner))


# (path, config, quant): every way fused_moe reduces the top-k set
CASES = [
    ("pairs, fused reduce", dict(CFG_SPLIT, PAIR_MAX=64), "fp8_channel"),
    ("aligned, fused reduce", CFG_SPLIT, "none"),
    ("aligned, fused reduce", CFG_SPLIT, "fp8_channel"),
    ("aligned, top-k sum kernel", CFG_BIG, "fp8_block"),
    ("aligned, top-k sum kernel", CFG_BIG, "fp8_channel"),
    ("persistent down, top-k sum kernel", dict(CFG_TMA, PERSIST2=True), "fp8_channel"),
]


@pytest.mark.parametrize("path,cfg,quant", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_expert_parallel_ranks_sum_to_the_whole(device, path, cfg, quant):
    t, e, h, inter, k, ranks = 21, 8, 128, 64, 3, 2
    per = e // ranks
    x = torch.randn(t, h, device=device, dtype=torch.bfloat16)
    w13, w2, s13, s2 = make_experts(e, h, inter, quant, device)
    tw, ti = routing(t, e, k, device)
    ti[0] = torch.arange(per, per + k, device=device, dtype=ti.dtype)  # token 0: rank 1's experts only
    whole = fused_moe_ref(x, w13, w2, tw, ti, s13, s2, quant)
    total = torch.zeros(t, h, device=device)
    for r in range(ranks):
        sl = slice(r * per, (r + 1) * per)
        local = moe_local_ids(ti, r * per, per)
        args = (w13[sl], w2[sl], tw, local, None if s13 is None else s13[sl], None if s2 is None else s2[sl], quant)
        with poisoned_empty():  # a y row of another rank's pair, read by mistake, would be NaN
            out = fused_moe(x, *args, config=cfg, quant_in_kernel=False if "persistent" in path else None,
                            remote_ids=True)
        assert rel_err(out, fused_moe_ref(x, *args)) < 2e-3
        if r == 0:
            assert torch.equal(out[0], torch.zeros_like(out[0]))
        total += out.float()
    assert rel_err(total, whole.float()) < 1e-2  # two bf16 roundings instead of one


@pytest.mark.parametrize("path,cfg", [("pairs", dict(CFG_SPLIT, PAIR_MAX=64)), ("top-k sum", CFG_BIG)])
def test_expert_parallel_fused_shared_expert(device, path, cfg):
    """The shared expert fused (moe_route's id E in the last column), stored whole on each rank as local expert
    `count`: rank t % ranks computes token t's shared pair, so the ranks still sum to the whole MoE."""
    t, e, h, inter, k, ranks = 21, 8, 128, 64, 2, 2
    per = e // ranks
    x = torch.randn(t, h, device=device, dtype=torch.bfloat16)
    w13, w2, s13, s2 = make_experts(e + 1, h, inter, "fp8_channel", device)  # expert e: the shared one
    tw, ti = routing(t, e + 1, k, device, shared=True)
    whole = fused_moe_ref(x, w13, w2, tw, ti, s13, s2, "fp8_channel")
    total = torch.zeros(t, h, device=device)
    for r in range(ranks):
        keep = list(range(r * per, (r + 1) * per)) + [e]
        local = moe_local_ids_ref(ti, r * per, per, (r, ranks))
        assert (local[:, -1] >= 0).sum() == len(range(r, t, ranks))
        with poisoned_empty():
            out = fused_moe(x, w13[keep], w2[keep], tw, local, s13[keep], s2[keep], "fp8_channel", config=cfg,
                            remote_ids=True)
        total += out.float()
    assert rel_err(total, whole.float()) < 1e-2


def test_persistent_case_takes_the_persistent_kernel(device, monkeypatch):
    """The persistent row of CASES runs the persistent down GEMM (not the one-tile-per-program kernel)."""
    import kernels.triton_moe_persistent as tp

    calls = []
    real = tp._moe_down_persistent_kernel
    monkeypatch.setattr(tp, "_moe_down_persistent_kernel",
                        type("Spy", (), {"__getitem__": lambda self, g: calls.append(g) or real[g]})())
    t, e, h, inter, k = 21, 4, 128, 64, 3
    x = torch.randn(t, h, device=device, dtype=torch.bfloat16)
    w13, w2, s13, s2 = make_experts(e, h, inter, "fp8_channel", device)
    tw, ti = routing(t, e, k, device)
    local = moe_local_ids(ti, 2, 2)
    fused_moe(x, w13[2:], w2[2:], tw, local, s13[2:], s2[2:], "fp8_channel", config=dict(CFG_TMA, PERSIST2=True),
              quant_in_kernel=False, remote_ids=True)
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 256, 4096])
def test_expert_parallel_gpu(t):
    """Rank 2 of EP8 at the real widths: 20 of the 160 routed experts whole (width 1536), with the tables' configs
    (pairs / fused reduce / aligned + top-k sum, persistent down at prefill sizes)."""
    h, k, per, rank = 5120, 8, 20, 2
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w13, w2, s13, s2 = make_experts(per, h, 1536, "fp8_channel", "cuda")
    tw, ti = routing(t, 160, k, "cuda")
    local = moe_local_ids(ti, rank * per, per)
    with poisoned_empty():
        out = fused_moe(x, w13, w2, tw, local, s13, s2, "fp8_channel", remote_ids=True)
    ref = fused_moe_ref(x, w13, w2, tw, local, s13, s2, "fp8_channel")
    assert rel_err(out, ref) < 3e-2
    none_here = (local < 0).all(1)
    assert torch.equal(out[none_here], torch.zeros_like(out[none_here]))

"""The fused MoE's QuACK path (kernels/fused_moe_quack.py): its row bookkeeping, the scaled grouped GEMM's
reference and argument checks, the whole path on CPU through the reference GEMM, the CuTe-DSL kernel's sm90
compile (where quack-kernels is installed; no GPU needed) and, on a GPU, QuACK's kernel against the reference."""
import os
import subprocess
import sys

import pytest
import torch

import kernels.triton_moe as triton_moe
from kernels.fused_moe import fused_moe_ref
from kernels.fused_moe_quack import library
from kernels.scaled_grouped_gemm import check_args, scaled_grouped_gemm_ref
from kernels.triton_moe_segments import expert_segments, topk_sum
from kernels.triton_quant import quant_fp8_per_token
from kernel_helpers import compile_sm90, poisoned_empty, rel_err
from test_kernels_fused_moe import CFG_FAST, _tol, make_experts, routing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("t,e,k,unused", [(1, 4, 2, 0), (37, 9, 4, 3), (300, 16, 8, 5)])
def test_expert_segments(device, t, e, k, unused):
    _, ids = routing(t, e, k, device, unused=unused)
    xs = torch.rand(t, device=device) + 0.1
    with poisoned_empty():
        cu, tok, rs, row_of = expert_segments(ids, e, xs)
    flat = ids.reshape(-1).long().cpu()
    counts = torch.bincount(flat, minlength=e)
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + counts.cumsum(0).tolist()
    row_of = row_of.long().cpu()
    assert torch.equal(row_of.sort().values, torch.arange(t * k))  # every pair has its own row
    cu = cu.long().cpu()
    pairs = torch.arange(t * k)
    assert torch.all((cu[flat] <= row_of) & (row_of < cu[flat + 1]))  # in its expert's segment
    assert torch.equal(tok.long().cpu()[row_of], pairs // k)
    assert torch.equal(rs.cpu()[row_of], xs.cpu()[pairs // k])


def test_mapped_topk_sum(device):
    t, k, h = 5, 3, 200
    y = torch.randn(t * k, h, device=device, dtype=torch.bfloat16)
    row_of = torch.randperm(t * k, device=device).to(torch.int32)
    w = torch.rand(t, k, device=device)
    with poisoned_empty():
        out = topk_sum(y, w, torch.empty(t, h, device=device, dtype=torch.bfloat16), row_of)
    ref = (y.float()[row_of.long()].view(t, k, h) * w[..., None]).sum(1)
    torch.testing.assert_close(out.float(), ref, rtol=8e-3, atol=1e-2)


def _grouped_inputs(device, rows_per_group, k=64, n=48, gather_from=None):
    groups = len(rows_per_group)
    rows = sum(rows_per_group)
    w = torch.randn(groups, n, k, device=device).to(torch.float8_e4m3fn)
    col = torch.rand(groups, n, device=device) + 0.5
    cu = torch.tensor([0] + torch.tensor(rows_per_group).cumsum(0).tolist(), dtype=torch.int32, device=device)
    a_rows = gather_from or rows
    a = (torch.randn(a_rows, k, device=device) * 4).to(torch.float8_e4m3fn)
    idx = torch.randint(0, a_rows, (rows,), device=device, dtype=torch.int32) if gather_from else None
    row = torch.rand(rows, device=device) + 0.5
    return a, w, row, col, cu, idx


@pytest.mark.parametrize("gather", [False, True])
def test_scaled_grouped_gemm_ref(device, gather):
    """The reference against dequantize-then-matmul group by group (an empty group included)."""
    a, w, row, col, cu, idx = _grouped_inputs(device, [3, 0, 5, 1], gather_from=7 if gather else None)
    out = scaled_grouped_gemm_ref(a, w, row, col, cu, torch.full((9, 48), float("nan"), device=device,
                                                                 dtype=torch.bfloat16), a_idx=idx)
    bounds = cu.tolist()
    for g in range(4):
        lo, hi = bounds[g], bounds[g + 1]
        if hi == lo:
            continue
        rows = a[idx[lo:hi].long()] if gather else a[lo:hi]
        # dequantize both operands first, then one fp32 matmul (a different order of the same math)
        expect = (rows.float() * row[lo:hi, None]) @ (w[g].float() * col[g][:, None]).t()
        torch.testing.assert_close(out[lo:hi].float(), expect.float(), rtol=8e-3, atol=1e-3)


def test_scaled_grouped_gemm_checks(device):
    a, w, row, col, cu, idx = _grouped_inputs(device, [2, 3], gather_from=4)
    out = torch.empty(5, 48, device=device, dtype=torch.bfloat16)
    check_args(a, w, row, col, cu, out, idx)  # the valid layout passes
    bad = [
        (dict(a=a.float()), TypeError, "float8_e4m3fn"),
        (dict(out=out.float()), ValueError, "out must be bf16"),
        (dict(row=row[:4]), ValueError, "row_scale"),
        (dict(col=col.t().contiguous().t()), ValueError, "col_scale"),
        (dict(cu=cu.long()), ValueError, "cu_seqlens"),
        (dict(idx=idx.long()), ValueError, "a_idx"),
        (dict(idx=None), ValueError, "without a_idx"),
        (dict(a=a[:, :40]), ValueError, "K-contiguous"),
    ]
    base = dict(a=a, w=w, row=row, col=col, cu=cu, out=out, idx=idx)
    for change, exc, words in bad:
        args = dict(base, **change)
        with pytest.raises(exc, match=words):
            check_args(args["a"], args["w"], args["row"], args["col"], args["cu"], args["out"], args["idx"])


@pytest.mark.parametrize("shape", [(19, 9, 192, 96, 4), (70, 6, 256, 64, 2), (33, 5, 128, 160, 3)])
@pytest.mark.parametrize("prequantized", [False, True])
def test_fused_moe_quack_path(device, shape, prequantized, monkeypatch):
    """config QUACK routes fused_moe through the path; here its GEMM is the reference (recorded)."""
    calls = []

    def recording(a, w, row_scale, col_scale, cu_seqlens, out, a_idx=None, tile=None):
        calls.append((cu_seqlens.clone(), a_idx is not None, tuple(out.shape)))
        return scaled_grouped_gemm_ref(a, w, row_scale, col_scale, cu_seqlens, out, a_idx, tile)

    monkeypatch.setattr(triton_moe, "grouped_gemm_for", lambda dev: recording)
    t, e, h, inter, k = shape
    x = torch.randn(t, h, device=device, dtype=torch.bfloat16)
    w13, w2, s13, s2 = make_experts(e, h, inter, "fp8_channel", device)
    tw, ti = routing(t, e, k, device, unused=1)
    xq = xs = None
    if prequantized:
        xq, xs = quant_fp8_per_token(x)
    with poisoned_empty():
        out = triton_moe.fused_moe(x, w13, w2, tw, ti, s13, s2, "fp8_channel", config=dict(CFG_FAST, QUACK=True),
                                   x_fp8=xq, x_scale=xs)
    ref = fused_moe_ref(x, w13, w2, tw, ti, s13, s2, "fp8_channel")
    assert rel_err(out, ref) < _tol("fp8_channel")
    assert [(g, s) for _, g, s in calls] == [(True, (t * k, 2 * inter)), (False, (t * k, h))]
    counts = torch.bincount(ti.reshape(-1).long().cpu(), minlength=e)
    assert calls[0][0].tolist() == [0] + counts.cumsum(0).tolist()
    assert counts[-1] == 0  # the unused expert: an empty group


def test_fused_moe_quack_only_where_it_applies(device, monkeypatch):
    """Not taken for fp16 activations, FP8 block weights, the pair (decode) mode or where no GEMM runs here; taken
    for the same call with bf16 x (the control)."""
    ran = []

    def recording(*args, **kwargs):
        ran.append(1)
        return scaled_grouped_gemm_ref(*args, **kwargs)

    monkeypatch.setattr(triton_moe, "grouped_gemm_for", lambda dev: recording)
    t, e, h, inter, k = 12, 4, 128, 64, 2
    x = torch.randn(t, h, device=device, dtype=torch.bfloat16)
    tw, ti = routing(t, e, k, device)
    w13, w2, s13, s2 = make_experts(e, h, inter, "fp8_channel", device)
    wb13, wb2, sb13, sb2 = make_experts(e, h, inter, "fp8_block", device)
    cfg = dict(CFG_FAST, QUACK=True)
    out = triton_moe.fused_moe(x.half(), w13, w2, tw, ti, s13, s2, "fp8_channel", config=cfg)
    assert rel_err(out, fused_moe_ref(x.half(), w13, w2, tw, ti, s13, s2, "fp8_channel")) < _tol("fp8_channel")
    triton_moe.fused_moe(x, w13, w2, tw, ti, s13, s2, "fp8_channel", config=dict(cfg, PAIR_MAX=64))
    triton_moe.fused_moe(x, wb13, wb2, tw, ti, sb13, sb2, "fp8_block", config=dict(cfg, BLOCK_K1=128, BLOCK_K2=128))
    assert ran == []
    triton_moe.fused_moe(x, w13, w2, tw, ti, s13, s2, "fp8_channel", config=cfg)
    assert ran == [1, 1]  # the control: both GEMMs went through it
    monkeypatch.setattr(triton_moe, "grouped_gemm_for", lambda dev: None)
    out = triton_moe.fused_moe(x, w13, w2, tw, ti, s13, s2, "fp8_channel", config=cfg)
    assert ran == [1, 1]
    assert rel_err(out, fused_moe_ref(x, w13, w2, tw, ti, s13, s2, "fp8_channel")) < _tol("fp8_channel")


def test_path_triton_kernels_compile_for_sm90():
    """The path's Triton kernels at real shapes (4096 tokens, N = 192 and 1536) compile for sm_90, no spills."""
    out = compile_sm90("moe_quack")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in ("_segment_rows_kernel", "_silu_mul_fp8_row_kernel", "_topk_sum_kernel"):
        lines = [line for line in out.stdout.splitlines() if line.startswith(name)]
        assert lines and all("LOCAL:0" in line for line in lines), (name, lines)


COMPILE_SCRIPT = """
from kernels.quack_grouped_gemm import GemmTile, compiled
for spec in ([128, 192, True, 1], [256, 128, False, 1], [128, 128, True, 2]):
    for gather in (True, False):
        compiled(GemmTile.parse(spec), gather)
print("compiled")
"""


@pytest.mark.skipif(library() is None, reason="quack-kernels / nvidia-cutlass-dsl not installed (the fa4 extra)")
def test_quack_scaled_gemm_compiles_for_sm90():
    """The CuTe-DSL kernel (our multiplying epilogue, FP8 fast accumulation, gathered and plain A) compiles for
    sm90a without a GPU; in a subprocess because the DSL reads its target from the environment once."""
    env = dict(os.environ, QUACK_ARCH="sm_90", CUTE_DSL_ARCH="sm_90a", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(library() is None, reason="quack-kernels not installed (bench/fa4_wheels.sh on the GPU machine)")
@pytest.mark.parametrize("spec", [None, [256, 128, False, 1], [128, 128, True, 2]])
@pytest.mark.parametrize("gather", [False, True])
def test_quack_scaled_gemm_gpu(spec, gather):
    """QuACK's kernel against the reference at a MoE-like shape with empty and ragged groups."""
    lib = library()
    sizes = [0, 300, 1, 129, 0, 517, 64]
    a, w, row, col, cu, idx = _grouped_inputs("cuda", sizes, k=512, n=384, gather_from=257 if gather else None)
    out = torch.full((sum(sizes), 384), float("nan"), device="cuda", dtype=torch.bfloat16)
    lib.scaled_grouped_gemm(a, w, row, col, cu, out, a_idx=idx, tile=lib.GemmTile.parse(spec))
    ref = scaled_grouped_gemm_ref(a, w, row, col, cu, torch.empty_like(out), a_idx=idx)
    assert rel_err(out, ref) < 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(library() is None, reason="quack-kernels not installed (bench/fa4_wheels.sh on the GPU machine)")
@pytest.mark.parametrize("t", [1024, 4096])
@pytest.mark.parametrize("e,inter", [(161, 192), (161, 1536)])
def test_fused_moe_quack_gpu(t, e, inter):
    """The whole path with QuACK's GEMMs at real shapes against the reference (shared expert fused, 3 unused)."""
    h, k = 5120, 8
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w13, w2, s13, s2 = make_experts(e, h, inter, "fp8_channel", "cuda")
    tw, ti = routing(t, e, k, "cuda", shared=True, unused=3)
    with poisoned_empty():
        out = triton_moe.fused_moe(x, w13, w2, tw, ti, s13, s2, "fp8_channel", config=dict(CFG_FAST, QUACK=True))
    ref = fused_moe_ref(x, w13, w2, tw, ti, s13, s2, "fp8_channel")
    assert rel_err(out, ref) < _tol("fp8_channel", gpu=True)

"""Batch-1 decode launch-config sweeps on the GPU: paged decode attention, the fused MoE and the router at one
token.

    python -m bench.decode_b1_sweep [--only attention|moe|router|fusions]

Attention: one sequence, 4096 tokens of bf16 KV in 16-token pages, GLM-4.7's 96/8 heads; every (BLOCK_N, splits,
warps, stages) in a small grid vs the default launch. MoE: 1 token, E = 161 (shared expert fused), N = 1536,
top-8 + shared, gate_up then down parameters swept around the tuned table's entry. Each time is a CUDA-graph
replay over rotated inputs (bench.kernels timing); HBM % uses the copy bandwidth measured in the run."""
from __future__ import annotations

import argparse

import torch

from bench import kernels as bk

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn


def _best_configs(run, cfgs, top: int, note=lambda t: "") -> list[tuple[float, dict]]:
    """Time run(cfg) for every cfg (one that does not build is skipped) and print the `top` fastest, each with
    note(seconds) after its time; returns (seconds, cfg) sorted fastest first."""
    out = []
    for cfg in cfgs:
        try:
            out.append((run(cfg), cfg))
        except Exception as exc:  # noqa: BLE001 - a config that does not build is skipped
            torch.cuda.synchronize()
            print(f"  skip {cfg}: {type(exc).__name__}")
    out.sort(key=lambda r: r[0])
    for t, cfg in out[:top]:
        print(f"  {t * 1e6:6.1f} us{note(t)} {cfg}", flush=True)
    return out


def sweep_attention(batch: int = 1, hq: int = 96, hk: int = 8, kv: str = "bf16", ctx: int = 4096) -> None:
    """Decode attention configs for `batch` sequences of `ctx` tokens, hq/hk heads (per rank), bf16 or fp8 KV."""
    from kernels.triton_attention import paged_attention

    d, bs = 128, 16
    dt = FP8 if kv == "fp8" else BF16
    cases = [bk._paged(batch, ctx, hk, d, bs, dt) for _ in range(4)]
    ks = 0.05 if dt == FP8 else 1.0
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=BF16)
    nbytes = batch * ctx * hk * d * 2 * (1 if dt == FP8 else 2)
    bw = bk.HW["bw"]

    def run(**kw) -> float:
        return bk.timeit([lambda c=c: paged_attention(q, c[0], c[1], c[2], lens, qsl, d ** -0.5, ks, ks,
                                                      max_query_len=1, max_seq_len=ctx, **kw) for c in cases])[0]

    base = run()
    print(f"attention B={batch} ctx={ctx} {hq}/{hk} {kv}: default {base * 1e6:.1f} us ({nbytes / base / bw:.0%} HBM)",
          flush=True)
    results = []
    split_grid = (8, 16, 32, 64) if batch == 1 else (1, 2, 3, 4, 6, 8, 12, 16)
    for block_n in (32, 64, 128):
        for splits in split_grid:
            if splits * block_n > ctx:
                continue
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    try:
                        t = run(block_n=block_n, num_splits=splits, num_warps=warps, num_stages=stages)
                    except Exception as exc:  # noqa: BLE001 - a config that does not build is skipped
                        print(f"  skip bn={block_n} s={splits} w={warps} st={stages}: {type(exc).__name__}")
                        torch.cuda.synchronize()
                        continue
                    results.append((t, block_n, splits, warps, stages))
    results.sort()
    for t, bn, s, w, st in results[:8]:
        print(f"  {t * 1e6:6.1f} us ({nbytes / t / bw:.0%})  BLOCK_N={bn} splits={s} warps={w} stages={st}")


def sweep_moe() -> None:
    from kernels.triton_moe import fused_moe, moe_config

    h, k, e, inter = 5120, 8, 161, 1536
    w13 = bk.fp8_weight(e, 2 * inter, h)
    w2 = bk.fp8_weight(e, h, inter)
    s13 = torch.rand(e, 2 * inter, 1, device="cuda") * 1e-3
    s2 = torch.rand(e, h, 1, device="cuda") * 1e-3
    x = torch.randn(1, h, device="cuda", dtype=BF16)
    routes = bk._routings(1, e, k, 8)
    from kernels.triton_quant import quant_fp8_per_token

    xq, xs = quant_fp8_per_token(x)
    nbytes = 9 * (3 * inter * h + (2 * inter + h) * 4)
    bw = bk.HW["bw"]
    base_cfg = moe_config(1, e, inter, h, "fp8_channel", x.device)

    def run(cfg) -> float:
        return bk.timeit([lambda w=w, ids=ids: fused_moe(x, w13, w2, w, ids, s13, s2, "fp8_channel", config=cfg,
                                                         x_fp8=xq, x_scale=xs) for w, ids in routes])[0]

    base = run(base_cfg)
    print(f"MoE T=1 N={inter}: table config {base * 1e6:.1f} us ({nbytes / base / bw:.0%} HBM) {base_cfg}", flush=True)
    # the down GEMM's input quantized by a separate per-token kernel instead of inside the kernel (its amax
    # prologue is a serial pass over the activation row before the weights stream)
    sep = bk.timeit([lambda w=w, ids=ids: fused_moe(x, w13, w2, w, ids, s13, s2, "fp8_channel", config=base_cfg,
                                                    x_fp8=xq, x_scale=xs, quant_in_kernel=False)
                     for w, ids in routes])[0]
    print(f"  act quantized outside the down kernel: {sep * 1e6:.1f} us ({nbytes / sep / bw:.0%} HBM)", flush=True)

    def best_of(cands, start):
        cfgs = [dict(start, **c) for c in cands]
        return _best_configs(run, cfgs, 4, lambda t: f" ({nbytes / t / bw:.0%})")[0][1]

    c1 = [dict(BLOCK_N1=bn, BLOCK_K1=bk_, SPLIT_K1=sk, W1=w, S1=st) for bn in (16, 32, 64) for bk_ in (128, 256)
          for sk in (1, 2) for st in (3, 4, 5) for w in (4, 8)]
    cfg = best_of(c1, base_cfg)
    c2 = [dict(BLOCK_N2=bn, BLOCK_K2=bk_, W2=w, S2=st) for bn in (32, 64, 128, 256) for bk_ in (64, 128, 256)
          for w in (4, 8) for st in (3, 4)]
    best_of(c2, cfg)


def sweep_router() -> None:
    """The single-launch router (moe_gate_route) at 1 token vs the three launches it replaced."""
    from kernels.triton_moe_routing import moe_gate_route, moe_route

    h, e = 5120, 160
    gws = [torch.randn(e, h, device="cuda") / h ** 0.5 for _ in range(8)]
    bias = torch.randn(e, device="cuda") * 0.1
    x = torch.randn(1, h, device="cuda", dtype=BF16)
    nbytes = e * h * 4
    bw = bk.HW["bw"]

    def run(cfg=None) -> float:
        return bk.timeit([lambda g=g: moe_gate_route(x, g, bias, 8, 1, 1, True, 2.5, 1, config=cfg) for g in gws])[0]

    def three() -> None:
        for g in gws:
            moe_route(torch.nn.functional.linear(x.float(), g), bias, 8, 1, 1, True, 2.5, 1)

    old = bk.timeit([three])[0] / len(gws)
    base = run()
    print(f"router T=1: copy + fp32 linear + moe_route {old * 1e6:.1f} us; moe_gate_route {base * 1e6:.1f} us "
          f"({nbytes / base / bw:.0%} HBM)", flush=True)
    cfgs = [dict(BLOCK_E=block_e, H_PER_SPLIT=per, BLOCK_H=bh, num_warps=warps)
            for block_e in (2, 4, 8, 16) for per in (512, 1024, 2560, 5120) for bh in (512, 1024)
            if bh <= per and block_e * bh <= 8192 for warps in (1, 4)]
    _best_configs(run, cfgs, 6, lambda t: f" ({nbytes / t / bw:.0%})")

    # the post-attention norm fused in front (rms_norm_gate_route, what decoder layers run): every program
    # normalizes the row itself, so fewer, longer programs may win here
    from kernels.triton_moe_routing import rms_norm_gate_route

    res = torch.randn(1, h, device="cuda", dtype=BF16)
    nw = torch.ones(h, device="cuda", dtype=BF16)

    def run_norm(cfg=None) -> float:
        return bk.timeit([lambda g=g: rms_norm_gate_route(x, res, nw, 1e-5, True, g, bias, 8, 1, 1, True, 2.5, 1,
                                                          config=cfg) for g in gws])[0]

    base = run_norm()
    print(f"norm + router T=1: default {base * 1e6:.1f} us", flush=True)
    cfgs = [dict(BLOCK_E=block_e, H_PER_SPLIT=per, BLOCK_H=min(per, 1024), num_warps=warps)
            for block_e in (4, 8, 16, 32) for per in (1024, 2560, 5120) if block_e * min(per, 1024) <= 16384
            for warps in (2, 4, 8)]
    _best_configs(run_norm, cfgs, 6)


def compare_fusions() -> None:
    """Each batch-1 fusion alone vs the launches it replaces, with the launch configs the engine uses (H200
    tables): o_proj with its input quantized in the GEMM, post-attention norm + router, qkv GEMM + QK-norm /
    RoPE / KV store."""
    from kernels.rope import rope_cos_sin_cache
    from kernels.triton_fp8_gemm import tuned_swap
    from kernels.triton_fp8_gemm_swap import fp8_gemm_swap, fp8_qkv_norm_rope
    from kernels.triton_moe_routing import moe_gate_route, rms_norm_gate_route
    from kernels.triton_norm import rms_norm_fp8
    from kernels.triton_quant import quant_fp8_per_token
    from kernels.triton_rope import qk_norm_rope

    dev = torch.cuda.get_device_name(0).replace(" ", "_")
    h = 5120

    def show(name: str, unfused: float, fused: float) -> None:
        print(f"{name}: unfused {unfused * 1e6:6.1f} us, fused {fused * 1e6:6.1f} us ({(unfused - fused) * 1e6:+.1f} us)",
              flush=True)

    # o_proj: quant kernel + GEMM vs the GEMM quantizing its input
    n, k = h, 12288
    r = bk.rotations(n * k)
    ws = [bk.fp8_weight(n, k) for _ in range(r)]
    wss = [torch.rand(n, 1, device="cuda") * 1e-3 for _ in range(r)]
    x = torch.randn(1, k, device="cuda", dtype=BF16)
    cfg = tuned_swap(dev, n, k, 1)
    two = bk.timeit([lambda w=w, s=s: fp8_gemm_swap(*quant_fp8_per_token(x), w, s, None, BF16, config=cfg)
                     for w, s in zip(ws, wss)])[0]
    one = bk.timeit([lambda w=w, s=s: fp8_gemm_swap(x, None, w, s, None, BF16, config=cfg) for w, s in zip(ws, wss)])[0]
    show("o_proj M=1 (quant + GEMM | GEMM quantizing x)", two, one)

    # post-attention norm + router
    e = 160
    gws = [torch.randn(e, h, device="cuda") / h ** 0.5 for _ in range(8)]
    bias = torch.randn(e, device="cuda") * 0.1
    xa = torch.randn(1, h, device="cuda", dtype=BF16)
    res = torch.randn(1, h, device="cuda", dtype=BF16)
    nw = torch.ones(h, device="cuda", dtype=BF16)

    def norm_then_route(g):
        y, _, _, _ = rms_norm_fp8(xa, nw, 1e-5, res)
        moe_gate_route(y, g, bias, 8, 1, 1, True, 2.5, 1)

    two = bk.timeit([lambda g=g: norm_then_route(g) for g in gws])[0]
    one = bk.timeit([lambda g=g: rms_norm_gate_route(xa, res, nw, 1e-5, True, g, bias, 8, 1, 1, True, 2.5, 1)
                     for g in gws])[0]
    show("norm + router T=1 (two launches | one)", two, one)

    # qkv GEMM + QK-norm / RoPE / KV store
    hq, hk, d = 96, 8, 128
    n, k = (hq + 2 * hk) * d, h
    r = bk.rotations(n * k)
    ws = [bk.fp8_weight(n, k) for _ in range(r)]
    wss = [torch.rand(n, 1, device="cuda") * 1e-3 for _ in range(r)]
    b = torch.randn(n, device="cuda", dtype=BF16)
    xq, xs = quant_fp8_per_token(torch.randn(1, k, device="cuda", dtype=BF16))
    cs = rope_cos_sin_cache(64, 8192, 1e6, "cuda")
    pos = torch.full((1,), 4095, dtype=torch.int64, device="cuda")
    slot = torch.full((1,), 7, dtype=torch.int64, device="cuda")
    kc = torch.zeros(64, 16, hk, d, device="cuda", dtype=BF16)
    vc = torch.zeros_like(kc)
    qn = torch.ones(d, device="cuda", dtype=BF16)
    cfg = tuned_swap(dev, n, k, 1)

    def gemm_then_rope(w, s):
        qkv = fp8_gemm_swap(xq, xs, w, s, b, BF16, config=cfg)
        q, kk, v = qkv.split([hq * d, hk * d, hk * d], -1)
        qk_norm_rope(q.view(1, hq, d), kk.view(1, hk, d), qn, qn, cs, pos, 1e-5, v=v.view(1, hk, d), k_cache=kc,
                     v_cache=vc, slot_mapping=slot)

    two = bk.timeit([lambda w=w, s=s: gemm_then_rope(w, s) for w, s in zip(ws, wss)])[0]
    one = bk.timeit([lambda w=w, s=s: fp8_qkv_norm_rope(xq, xs, w, s, b, BF16, hq, hk, qn, qn, cs, pos, 1e-5, kc, vc,
                                                        slot, config=cfg) for w, s in zip(ws, wss)])[0]
    show("qkv M=1 (GEMM + qk_norm_rope | fused)", two, one)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("attention", "moe", "router", "fusions"))
    ap.add_argument("--attention-cases", default="1:96/8:bf16",
                    help="decode attention sweeps, BATCH:HQ/HK:KV[,...] (KV bf16|fp8), e.g. 64:24/2:fp8")
    args = ap.parse_args(argv)
    bk.HW.update(bk.measure_hw())
    print(f"{torch.cuda.get_device_name(0)}: copy bandwidth {bk.HW['bw'] / 1e12:.2f} TB/s", flush=True)
    if args.only in (None, "attention"):
        for case in args.attention_cases.split(","):
            b, heads, kv = case.split(":")
            hq, hk = (int(v) for v in heads.split("/"))
            sweep_attention(int(b), hq, hk, kv)
    if args.only in (None, "moe"):
        sweep_moe()
    if args.only in (None, "router"):
        sweep_router()
    if args.only in (None, "fusions"):
        compare_fusions()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

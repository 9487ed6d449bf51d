"""Batch-1 decode launch-config sweeps on the GPU: paged decode attention and the fused MoE at one token.

    python -m bench.decode_b1_sweep [--only attention|moe]

Attention: one sequence, 4096 tokens of bf16 KV in 16-token pages, GLM-4.7's 96/8 heads; every (BLOCK_N, splits,
warps, stages) in a small grid vs the default launch. MoE: 1 token, E = 161 (shared expert fused), N = 1536,
top-8 + shared, gate_up then down parameters swept around the tuned table's entry. Each time is a CUDA-graph
replay over rotated inputs (bench.kernels timing); HBM % uses the copy bandwidth measured in the run."""
from __future__ import annotations

import argparse

import torch

from bench import kernels as bk

BF16 = torch.bfloat16


def sweep_attention() -> None:
    from kernels.triton_attention import paged_attention

    hq, hk, d, bs, ctx = 96, 8, 128, 16, 4096
    cases = [bk._paged(1, ctx, hk, d, bs, BF16) for _ in range(4)]
    lens = torch.full((1,), ctx, dtype=torch.int32, device="cuda")
    qsl = torch.arange(2, dtype=torch.int32, device="cuda")
    q = torch.randn(1, hq, d, device="cuda", dtype=BF16)
    nbytes = ctx * hk * d * 2 * 2
    bw = bk.HW["bw"]

    def run(**kw) -> float:
        return bk.timeit([lambda c=c: paged_attention(q, c[0], c[1], c[2], lens, qsl, d ** -0.5, max_query_len=1,
                                                      max_seq_len=ctx, **kw) for c in cases])[0]

    base = run()
    print(f"attention B=1 ctx={ctx} 96/8 bf16: default {base * 1e6:.1f} us ({nbytes / base / bw:.0%} HBM)", flush=True)
    results = []
    for block_n in (32, 64, 128):
        for splits in (8, 16, 32, 64):
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

    def best_of(cands, start):
        out = []
        for c in cands:
            cfg = dict(start, **c)
            try:
                out.append((run(cfg), cfg))
            except Exception as exc:  # noqa: BLE001
                torch.cuda.synchronize()
                print(f"  skip {c}: {type(exc).__name__}")
        out.sort(key=lambda r: r[0])
        for t, cfg in out[:4]:
            print(f"  {t * 1e6:6.1f} us ({nbytes / t / bw:.0%}) {cfg}", flush=True)
        return out[0][1]

    c1 = [dict(BLOCK_N1=bn, BLOCK_K1=bk_, SPLIT_K1=sk, W1=4, S1=st) for bn in (16, 32, 64) for bk_ in (128, 256)
          for sk in (1, 2) for st in (3, 5)]
    cfg = best_of(c1, base_cfg)
    c2 = [dict(BLOCK_N2=bn, BLOCK_K2=bk_, W2=w, S2=3) for bn in (32, 64, 128, 256) for bk_ in (64, 128, 256)
          for w in (4, 8)]
    best_of(c2, cfg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("attention", "moe"))
    args = ap.parse_args(argv)
    bk.HW.update(bk.measure_hw())
    print(f"{torch.cuda.get_device_name(0)}: copy bandwidth {bk.HW['bw'] / 1e12:.2f} TB/s", flush=True)
    if args.only in (None, "attention"):
        sweep_attention()
    if args.only in (None, "moe"):
        sweep_moe()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

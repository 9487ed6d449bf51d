"""Swap-AB FP8 GEMM (kernels/triton_fp8_gemm_swap.py) vs the small-M FP8 GEMM with its tuned configs.

    python -m bench.fp8_swap_sweep [--sweep] [--ms 1,4,16] [--shapes 14336x5120,5120x12288]

Per GLM-4.7 linear shape (N, K) and decode M: both kernels (and cuBLAS `_scaled_mm`) on the same pre-quantized input, in a CUDA graph
over rotated weights (bench.kernels timing), as µs and % of the copy bandwidth measured in the run. --sweep also
times a grid of swap configs and prints the best per (shape, M) as JSON (the `small_m_swap` table format); the
swap baseline is the table's config where it has one (else the heuristic), so "best" is never worse."""
from __future__ import annotations

import argparse
import json

import torch

from bench import kernels as bk
from kernels.triton_common import cdiv

BF16 = torch.bfloat16


def swap_candidates(n: int, k: int, sms: int, m: int = 1) -> list[dict]:
    out = {}
    big = m > 16  # 32/64-token tiles: fewer splits and stages (the token tile takes shared memory too)
    for bw in (64, 128):
        for bk_ in (128, 256):
            for split in (1, 2, 4) if big else (1, 2, 3, 4, 6, 8):  # 3 and 6: one full wave for the 40-tile o_proj
                if cdiv(k, bk_) < split * 2:
                    continue
                for st in (3, 4) if big else (3, 4, 6):
                    for warps in (4, 8):
                        cfg = dict(BLOCK_W=bw, BLOCK_K=bk_, SPLIT_K=split, num_warps=warps, num_stages=st)
                        out[json.dumps(cfg, sort_keys=True)] = cfg
    return list(out.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--shapes", default=None, help="only these N x K, e.g. 14336x5120,5120x12288")
    args = ap.parse_args(argv)
    from kernels.triton_fp8_gemm import fp8_gemm
    from kernels.triton_fp8_gemm import scaled_mm_linear, tuned_swap
    from kernels.triton_fp8_gemm_swap import fp8_gemm_swap
    from kernels.triton_quant import quant_fp8_per_token

    bk.HW.update(bk.measure_hw())  # copy bandwidth, L2 size (for the weight rotations)
    bw = bk.HW["bw"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name(0)}: copy bandwidth {bw / 1e12:.2f} TB/s, {sms} SMs", flush=True)
    best_cfgs: dict[str, dict] = {}
    shapes = bk.LINEAR_TUNE_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    for n, k in shapes:
        r = bk.rotations(n * k)
        ws = [bk.fp8_weight(n, k) for _ in range(r)]
        wss = [torch.rand(n, 1, device="cuda") * 1e-3 for _ in range(r)]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=BF16)
            xq, xs = quant_fp8_per_token(x)
            nbytes = n * k + n * 4 + m * (k + 2 * n)

            def swap(cfg=None):
                return bk.timeit([lambda w=w, s=s: fp8_gemm_swap(xq, xs, w, s, None, BF16, config=cfg, num_sms=sms)
                                  for w, s in zip(ws, wss)])[0]

            gemm = bk.timeit([lambda w=w, s=s: fp8_gemm(xq, xs, w, s, None, BF16, False) for w, s in zip(ws, wss)])[0]
            cublas = bk.timeit([lambda w=w, s=s: scaled_mm_linear(xq, xs, w, s, None, BF16) for w, s in zip(ws, wss)])[0]
            table = tuned_swap(torch.cuda.get_device_name(0).replace(" ", "_"), n, k, m)
            t_swap = swap(table)
            line = (f"N={n:6d} K={k:6d} M={m:2d}: cuBLAS {cublas * 1e6:6.1f} us ({nbytes / cublas / bw:4.0%})  "
                    f"gemm {gemm * 1e6:6.1f} us ({nbytes / gemm / bw:4.0%})  "
                    f"swap ({'table' if table else 'heuristic'}) {t_swap * 1e6:6.1f} us ({nbytes / t_swap / bw:4.0%})  speedup {gemm / t_swap:.2f}x")
            if args.sweep:
                best = (t_swap, table)
                for cfg in swap_candidates(n, k, sms, m):
                    try:
                        t = swap(cfg)
                    except Exception as exc:  # noqa: BLE001 - a config that does not build is skipped
                        torch.cuda.synchronize()
                        print(f"    skip {cfg}: {type(exc).__name__}", flush=True)
                        continue
                    if t < best[0]:
                        best = (t, cfg)
                if best[1] is not None:
                    best_cfgs.setdefault(f"{n},{k}", {})[str(m)] = best[1]
                line += f"  | best {best[0] * 1e6:6.1f} us ({nbytes / best[0] / bw:4.0%}) {best[1] or 'default'}"
            print(line, flush=True)
    if args.sweep:
        print(json.dumps(best_cfgs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

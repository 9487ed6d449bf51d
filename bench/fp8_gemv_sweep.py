"""FP8 GEMV (kernels/triton_fp8_gemv.py) vs the tensor-core FP8 GEMM (tuned small-M configs) at decode M.

    python -m bench.fp8_gemv_sweep [--sweep]

Per GLM-4.7 linear shape (N, K) and M in (1, 2, 4): both kernels on the same pre-quantized input, captured in
a CUDA graph over rotated weights (bench.kernels timing), as µs and % of the copy bandwidth measured in the
run. --sweep also times a grid of GEMV configs at M = 1 on the TP1 decode shapes and prints the best."""
from __future__ import annotations

import argparse
import json

import torch

from bench import kernels as bk
from kernels.triton_common import cdiv, next_pow2

BF16 = torch.bfloat16
# the batch-1 decode linears at TP1: qkv, o_proj / dense down, dense gate_up
SWEEP_SHAPES = {(14336, 5120), (5120, 12288), (24576, 5120)}


def gemv_candidates(m: int, n: int, k: int, sms: int) -> list[dict]:
    out = []
    for bn in (8, 16, 32):
        for bk_ in (128, 256, 512, 1024):
            if next_pow2(m) * bn * bk_ > 16384:
                continue
            for progs_per_sm in (2, 4, 8):
                k_iters = cdiv(k, bk_)
                split = max(1, min(k_iters, cdiv(progs_per_sm * sms, cdiv(n, bn)), 16))
                per = cdiv(k_iters, split)
                split = cdiv(k_iters, per)
                for w in (4, 8):
                    out.append(dict(BLOCK_N=bn, BLOCK_K=bk_, SPLIT_K=split, K_PER_SPLIT=per * bk_, num_warps=w,
                                    num_stages=1))
    uniq = {json.dumps(c, sort_keys=True): c for c in out}
    return list(uniq.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args(argv)
    from kernels.triton_fp8_gemm import fp8_gemm
    from kernels.triton_fp8_gemv import fp8_gemv
    from kernels.triton_quant import quant_fp8_per_token

    bk.HW.update(bk.measure_hw())  # copy bandwidth, L2 size (for the weight rotations)
    bw = bk.HW["bw"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name(0)}: copy bandwidth {bw / 1e12:.2f} TB/s, {sms} SMs", flush=True)
    best_cfgs = {}
    for n, k in bk.LINEAR_TUNE_SHAPES:
        r = bk.rotations(n * k)
        ws = [bk.fp8_weight(n, k) for _ in range(r)]
        wss = [torch.rand(n, 1, device="cuda") * 1e-3 for _ in range(r)]
        for m in (1, 2, 4):
            x = torch.randn(m, k, device="cuda", dtype=BF16)
            xq, xs = quant_fp8_per_token(x)
            nbytes = n * k + n * 4 + m * (k + 2 * n)
            gemm, _ = bk.timeit([lambda w=w, s=s: fp8_gemm(xq, xs, w, s, None, BF16, False) for w, s in zip(ws, wss)])
            gemv, _ = bk.timeit([lambda w=w, s=s: fp8_gemv(xq, xs, w, s, None, BF16) for w, s in zip(ws, wss)])
            line = (f"N={n:6d} K={k:6d} M={m}: gemm {gemm * 1e6:7.1f} us ({nbytes / gemm / bw:4.0%})  "
                    f"gemv {gemv * 1e6:7.1f} us ({nbytes / gemv / bw:4.0%})  speedup {gemm / gemv:.2f}x")
            if args.sweep and m == 1 and (n, k) in SWEEP_SHAPES:
                best = (gemv, None)
                for cfg in gemv_candidates(m, n, k, sms):
                    try:
                        t, _ = bk.timeit([lambda w=w, s=s, c=cfg: fp8_gemv(xq, xs, w, s, None, BF16, config=c)
                                          for w, s in zip(ws, wss)])
                    except Exception as exc:  # noqa: BLE001 - an unbuildable config (registers) is skipped
                        print(f"    skip {cfg}: {type(exc).__name__}", flush=True)
                        continue
                    if t < best[0]:
                        best = (t, cfg)
                best_cfgs[f"{n},{k},{m}"] = best[1]
                line += f"  | best {best[0] * 1e6:7.1f} us ({nbytes / best[0] / bw:4.0%}) {best[1]}"
            print(line, flush=True)
    if args.sweep:
        print(json.dumps(best_cfgs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

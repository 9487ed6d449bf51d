"""Launch configs of our Triton extend (prefill) attention kernel per head layout and length: which tiles win where.

    python -m bench.extend_tiles [--heads 12/1,24/2,96/8] [--lengths 2048,4096,8192,16384] [--prefixes 0,4096]

kernels.triton_attention.extend_config picks 128 x 128 tiles on 8 warps for every prompt above 1K tokens, whatever
the head count; on the TP4 / TP8 shards (24/2, 12/1 heads per rank), where this kernel serves prefills below the
SDPA threshold, a 4K prompt makes only 12 x 32 programs for 132 SMs. Per case: every config's time (CUDA-graph
replay, bench.kernels' timing), bf16 or FP8 paged KV with 16-token pages, % of the bf16 dense peak, and the best one.
"""
from __future__ import annotations

import argparse

import torch

from bench.kernels import BF16, FP8, _graph_time, _paged
from kernels.triton_attention import extend_config, paged_attention

PEAK = 989e12
D, BS = 128, 16
# (BLOCK_M, BLOCK_N, warps, stages)
CONFIGS = [(128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 4, 2), (64, 64, 4, 2), (64, 128, 4, 2), (128, 128, 8, 3),
           (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="12/1,24/2,96/8")
    ap.add_argument("--lengths", default="2048,4096,8192,16384")
    ap.add_argument("--prefixes", default="0,4096")
    ap.add_argument("--kv", default="bf16", help="bf16,fp8: KV cache dtypes (FP8 pages with scale 0.05)")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(0), flush=True)
    for kv_name, heads in ((kv, h) for kv in args.kv.split(",") for h in args.heads.split(",")):
        kv_dt, ks = (FP8, 0.05) if kv_name == "fp8" else (BF16, 1.0)
        hq, hk = (int(x) for x in heads.split("/"))
        for n in (int(x) for x in args.lengths.split(",")):
            for p in (int(x) for x in args.prefixes.split(",")):
                ctx = n + p
                q = torch.randn(n, hq, D, device="cuda", dtype=BF16)
                kc, vc, bt = _paged(1, ctx, hk, D, BS, kv_dt)
                lens = torch.tensor([ctx], dtype=torch.int32, device="cuda")
                qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
                flops = 4 * hq * D * (n * p + n * n / 2)
                dflt = extend_config(n, D)
                cells = []
                for bm, bn, w, s in CONFIGS:
                    def run(bm=bm, bn=bn, w=w, s=s):
                        paged_attention(q, kc, vc, bt, lens, qsl, D ** -0.5, ks, ks, max_query_len=n, max_seq_len=ctx,
                                        block_m=bm, block_n=bn, num_warps=w, num_stages=s, path="extend")
                    try:
                        ms = _graph_time([run]) * 1e3
                    except Exception as exc:  # noqa: BLE001 - a config that does not fit is a result
                        torch.cuda.synchronize()
                        cells.append(((bm, bn, w, s), float("inf"), f"failed {type(exc).__name__}"))
                        continue
                    cells.append(((bm, bn, w, s), ms, f"{ms:.3f} ms {100 * flops / (ms * 1e-3) / PEAK:.0f}%"))
                default = next((c for c in cells if c[0] == (dflt["BLOCK_M"], dflt["BLOCK_N"], dflt["W"], dflt["S"])),
                               None)
                best = min(cells, key=lambda c: c[1])
                gain = f"{default[1] / best[1]:.2f}x vs default" if default else ""
                print(f"{kv_name} {hq}/{hk} q {n:6} prefix {p:5} | best {best[0]} {best[2]} ({gain}) | "
                      + "  ".join(f"{c[0]}: {c[2]}" for c in cells), flush=True)
                del q, kc, vc
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

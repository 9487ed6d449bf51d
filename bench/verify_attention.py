"""Speculative-verify attention on the GPU: q_len = k+1 new tokens per sequence over a 4096-token paged context.

    python -m bench.verify_attention [--sweep] [--quick] [--out DIR]

For B in {1, 4, 16, 64}, q_len in {1, 4, 8}, heads 96/8 (TP1) and 12/1 (TP8), bf16 and FP8 KV it prints the time of
the default path (`paged_attention` with max_query_len = q_len: the decode kernel at 1, the verify kernel above),
of the extend kernel on the same batch, of q_len plain decode steps (q_len x one decode launch over B sequences),
and the HBM floor: K/V bytes read once / 4.0 TB/s (the copy bandwidth measured in the run is printed too). The
target: a verify of q_len 4 costs about one decode step (it reads the same K/V).

Timing is bench.kernels': CUDA-graph replays over R variants, each with its own block tables drawn at random
from a page pool of several times the L2 size, so small batches are not served from L2.

--sweep times verify launch configs (rows per block, tile, warps, stages, splits) at a few shapes instead.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys

import torch

from bench import kernels as bk
from kernels.triton_attention import decode_splits, paged_attention, verify_config

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
FLOOR_BW = 4.0e12
D, BS, CTX = 128, 16, 4096
DEV = "cuda"  # a dry run under TRITON_INTERPRET sets "cpu"


class Batch:
    """R variants of one (heads, KV dtype, B, q_len) case over one shared page pool."""

    def __init__(self, hq: int, hk: int, dt: torch.dtype, b: int, q_len: int, ctx: int = CTX):
        self.hq, self.hk, self.dt, self.b, self.q_len, self.ctx = hq, hk, dt, b, q_len, ctx
        elem = 1 if dt == FP8 else 2
        pages = math.ceil(ctx / BS)
        self.kv_bytes = b * ctx * hk * D * 2 * elem
        self.r = max(1, min(64, math.ceil(4 * bk.HW["l2_bytes"] / self.kv_bytes)))
        page_bytes = BS * hk * D * 2 * elem
        pool = max(b * pages, min(self.r * b * pages, (2 << 30) // page_bytes))
        self.kc = torch.randn(pool, BS, hk, D, device=DEV, dtype=BF16)
        self.vc = torch.randn(pool, BS, hk, D, device=DEV, dtype=BF16)
        self.ks = 1.0
        if dt == FP8:
            self.ks = 0.05
            self.kc, self.vc = (self.kc * 20).to(FP8), (self.vc * 20).to(FP8)
        self.bt = [torch.randperm(pool, device=DEV)[: b * pages].view(b, pages).to(torch.int32)
                   for _ in range(self.r)]
        self.lens = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
        self.qsl = torch.arange(b + 1, dtype=torch.int32, device=DEV) * q_len
        self.qsl1 = torch.arange(b + 1, dtype=torch.int32, device=DEV)
        self.q = [torch.randn(b * q_len, hq, D, device=DEV, dtype=BF16) for _ in range(self.r)]
        self.q1 = [x[:b] for x in self.q]

    def time(self, path: str | None = None, **kw) -> float:
        """Seconds per call of paged_attention on this batch (path None: the default for max_query_len)."""
        if path == "decode":
            fns = [lambda r=r: paged_attention(self.q1[r], self.kc, self.vc, self.bt[r], self.lens, self.qsl1,
                                               D ** -0.5, self.ks, self.ks, max_query_len=1, max_seq_len=self.ctx,
                                               **kw) for r in range(self.r)]
        else:
            fns = [lambda r=r: paged_attention(self.q[r], self.kc, self.vc, self.bt[r], self.lens, self.qsl,
                                               D ** -0.5, self.ks, self.ks, max_query_len=self.q_len,
                                               max_seq_len=self.ctx, path=path, **kw) for r in range(self.r)]
        return bk.timeit(fns)[0]


def sweep(quick: bool) -> None:
    """Verify launch configs around the defaults, the fastest five per shape."""
    shapes = [((96, 8), 1, 4), ((96, 8), 16, 4), ((96, 8), 64, 4), ((96, 8), 4, 8), ((12, 1), 1, 4),
              ((12, 1), 64, 8)]
    if quick:
        shapes = shapes[:2]
    cands = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
             for (bm, w), bn, st in itertools.product(((64, 4), (128, 8), (128, 4)), (64, 128), (2, 3))]
    sms = bk.HW["sms"]
    for (hq, hk), b, ql in shapes:
        for dt in (BF16, FP8):
            bat = Batch(hq, hk, dt, b, ql)
            dflt = verify_config(b, hk, hq // hk, ql, CTX, sms, dt == FP8)
            base = bat.time()
            res = []
            for c in cands:
                rb = math.ceil(ql * (hq // hk) / c["block_m"])
                one = decode_splits(b * rb, hk, CTX, sms, c["block_n"])
                for splits in sorted({max(1, one // 2), one, min(2 * one, math.ceil(CTX / c["block_n"]))}):
                    cfg = dict(c, num_splits=splits)
                    try:
                        res.append((bat.time(**cfg), cfg))
                    except Exception as exc:  # noqa: BLE001 - a config that does not build is skipped
                        torch.cuda.synchronize()
                        print(f"    skip {cfg}: {type(exc).__name__}", flush=True)
            res.sort(key=lambda x: x[0])
            kv = "fp8" if dt == FP8 else "bf16"
            print(f"sweep {hq}/{hk} {kv} B={b} q={ql}: default {base * 1e6:.1f}us {dflt}; floor "
                  f"{bat.kv_bytes / FLOOR_BW * 1e6:.1f}us", flush=True)
            for t, cfg in res[:5]:
                print(f"    {t * 1e6:7.1f}us {cfg}", flush=True)
            del bat
            torch.cuda.empty_cache()


def table(quick: bool) -> list[dict]:
    rows = []
    batches = (1, 16) if quick else (1, 4, 16, 64)
    print(f"{'heads':6s} {'KV':4s} {'B':>3s} {'q':>2s} | {'default':>8s} {'extend':>8s} {'q x dec':>8s} "
          f"{'decode':>8s} {'floor':>7s} | {'def/floor':>9s} {'def/dec':>7s} {'ext/def':>7s}  (us)")
    for (hq, hk), dt, b in itertools.product(((96, 8), (12, 1)), (BF16, FP8), batches):
        dec = None
        for ql in (1, 4, 8):
            bat = Batch(hq, hk, dt, b, ql)
            if dec is None:
                dec = bat.time("decode")
            ours = bat.time()
            ext = bat.time("extend")
            floor = bat.kv_bytes / FLOOR_BW
            kv = "fp8" if dt == FP8 else "bf16"
            row = dict(hq=hq, hk=hk, kv=kv, b=b, q_len=ql, us=ours * 1e6, extend_us=ext * 1e6,
                       q_decode_us=ql * dec * 1e6, decode_us=dec * 1e6, floor_us=floor * 1e6)
            rows.append(row)
            print(f"{hq:>2d}/{hk:<3d} {kv:4s} {b:3d} {ql:2d} | {ours * 1e6:8.1f} {ext * 1e6:8.1f} "
                  f"{ql * dec * 1e6:8.1f} {dec * 1e6:8.1f} {floor * 1e6:7.1f} | {ours / floor:9.2f} "
                  f"{ours / dec:7.2f} {ext / ours:7.2f}", flush=True)
            del bat
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", action="store_true", help="sweep verify launch configs instead of the table")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for verify_attention.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.verify_attention needs a CUDA GPU")
        return 0
    props = torch.cuda.get_device_properties(0)
    bk.HW.update(sms=props.multi_processor_count, l2_bytes=getattr(props, "L2_cache_size", 50 << 20),
                 bw=bk._copy_bw())
    print(f"# {torch.cuda.get_device_name(0)}: copy bandwidth {bk.HW['bw'] / 1e12:.2f} TB/s, floor at "
          f"{FLOOR_BW / 1e12:.1f} TB/s, ctx {CTX}, head_dim {D}, {BS}-token pages", flush=True)
    if args.sweep:
        sweep(args.quick)
        return 0
    rows = table(args.quick)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "verify_attention.json"), "w") as f:
            json.dump({"hw": bk.HW, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

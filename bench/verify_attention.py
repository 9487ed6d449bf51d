"""Speculative-verify attention on the GPU: q_len = k+1 new tokens per sequence over a 4096-token paged context.

    python -m bench.verify_attention [--tune] [--quick] [--q-lens 1,4,8] [--batches 1,4,16,64] [--out DIR]

For B in {1, 4, 16, 64}, q_len in {1, 4, 8}, heads 96/8 (TP1) and 12/1 (TP8), bf16 and FP8 KV it prints the time of
the default path (`paged_attention` with max_query_len = q_len: the decode kernel at 1, the verify kernel above),
of the extend kernel on the same batch, of q_len plain decode steps (q_len x one decode launch over B sequences),
and the HBM floor: K/V bytes read once / 4.0 TB/s (the copy bandwidth measured in the run is printed too). The
target: a verify of q_len 4 costs about one decode step (it reads the same K/V).

Timing is bench.kernels': CUDA-graph replays over R variants, each with its own block tables drawn at random
from a page pool of several times the L2 size, so small batches are not served from L2.

--tune also times verify launch configs around the default (tile, stages, splits, rows per block) per case.
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
from kernels.triton_attention import paged_attention, verify_config, verify_splits

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


def tune_grid(bat: Batch, dflt: dict) -> list[dict]:
    """Verify configs around the default: both tiles x 2 / 3 stages at the rule's splits, half and twice the
    splits at the default tile, and for more than 64 rows 64-row blocks (two per KV head)."""
    sms = bk.HW["sms"]
    rows = bat.q_len * (bat.hq // bat.hk)

    def cfg(bm: int, w: int, bn: int, st: int, mult: float = 1.0) -> dict:
        one = verify_splits(bat.b * bat.hk * math.ceil(rows / bm), bat.ctx, sms, bn, 1 if bm > 64 else 2)
        sp = max(1, min(int(one * mult), math.ceil(bat.ctx / bn)))
        return dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, num_splits=sp)

    bm, w, bn, st = dflt["block_m"], dflt["warps"], dflt["block_n"], dflt["stages"]
    out = [cfg(bm, w, n, s) for n, s in itertools.product((64, 128), (2, 3))]
    out += [cfg(bm, w, bn, st, 0.5), cfg(bm, w, bn, st, 2.0)]
    if bm > 64:
        out.append(cfg(64, 4, 64, 2))
    uniq = []
    for c in out:
        if c not in uniq:
            uniq.append(c)
    return uniq


def table(quick: bool, tune: bool, q_lens: tuple[int, ...] = (1, 4, 8),
          batches: tuple[int, ...] = (1, 4, 16, 64)) -> list[dict]:
    rows = []
    batches = (1, 16) if quick else batches
    print(f"{'heads':6s} {'KV':4s} {'B':>3s} {'q':>2s} | {'default':>8s} {'extend':>8s} {'q x dec':>8s} "
          f"{'decode':>8s} {'floor':>7s} | {'def/floor':>9s} {'def/dec':>7s} {'ext/def':>7s}  (us)", flush=True)
    for (hq, hk), dt, b in itertools.product(((96, 8), (12, 1)), (BF16, FP8), batches):
        dec = None
        for ql in q_lens:
            bat = Batch(hq, hk, dt, b, ql)
            if dec is None:
                dec = bat.time("decode")
            ours = bat.time()
            ext = bat.time("extend")
            floor = bat.kv_bytes / FLOOR_BW
            kv = "fp8" if dt == FP8 else "bf16"
            row = dict(hq=hq, hk=hk, kv=kv, b=b, q_len=ql, us=ours * 1e6, extend_us=ext * 1e6,
                       q_decode_us=ql * dec * 1e6, decode_us=dec * 1e6, floor_us=floor * 1e6)
            print(f"{hq:>2d}/{hk:<3d} {kv:4s} {b:3d} {ql:2d} | {ours * 1e6:8.1f} {ext * 1e6:8.1f} "
                  f"{ql * dec * 1e6:8.1f} {dec * 1e6:8.1f} {floor * 1e6:7.1f} | {ours / floor:9.2f} "
                  f"{ours / dec:7.2f} {ext / ours:7.2f}", flush=True)
            if tune and ql > 1:
                dflt = verify_config(b, hk, hq // hk, ql, CTX, bk.HW["sms"], dt == FP8)
                row["default_cfg"] = dflt
                row["tune"] = []
                for cfg in tune_grid(bat, dflt):
                    try:
                        row["tune"].append((bat.time(**cfg) * 1e6, cfg))
                    except Exception as exc:  # noqa: BLE001 - a config that does not build is skipped
                        torch.cuda.synchronize()
                        print(f"    skip {cfg}: {type(exc).__name__}", flush=True)
                row["tune"].sort(key=lambda x: x[0])
                for t, cfg in row["tune"][:3]:
                    print(f"    {t:8.1f} {cfg}", flush=True)
            rows.append(row)
            del bat
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tune", action="store_true", help="also time verify configs around the default per case")
    p.add_argument("--q-lens", default="1,4,8", help="comma list of q_len")
    p.add_argument("--batches", default="1,4,16,64", help="comma list of batch sizes")
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
    rows = table(args.quick, args.tune, tuple(int(x) for x in args.q_lens.split(",")),
                 tuple(int(x) for x in args.batches.split(",")))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "verify_attention.json"), "w") as f:
            json.dump({"hw": bk.HW, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

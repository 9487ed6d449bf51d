"""What a new prefill length costs the SDPA prefill path the first time: cuDNN builds an execution plan per shape
(torch caches it by shape), so under serving -- every prompt a different length -- a first call may pay a plan
build that the kernel benchmarks (the same shape replayed) never see. Per prompt length, the first and a repeated
call of the SDPA path (kernels/sdpa_prefill.py, paged K/V) and of our Triton extend kernel, one sequence, bf16 KV.

    python -m bench.sdpa_shapes --lengths 24 --heads 96/8,12/1
    python -m bench.sdpa_shapes --exact-plans      # torch's default: a cuDNN plan per exact length

"err" is the SDPA path's largest difference from the Triton kernel's output over the largest Triton value.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable

import torch

from kernels.sdpa_prefill import AVOID_RECOMPILE_ENV, paged_attention_prefill_sdpa
from kernels.triton_attention import paged_attention

BF16 = torch.bfloat16


def _timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


def _case(qlen: int, prefix: int, hq: int, hk: int, d: int = 128, bs: int = 16) -> dict[str, float]:
    ctx = qlen + prefix
    pages = -(-ctx // bs)
    k_cache = torch.randn(pages, bs, hk, d, device="cuda", dtype=BF16)
    v_cache = torch.randn(pages, bs, hk, d, device="cuda", dtype=BF16)
    q = torch.randn(qlen, hq, d, device="cuda", dtype=BF16)
    table = torch.arange(pages, device="cuda", dtype=torch.int32).view(1, -1)
    lens = torch.tensor([ctx], device="cuda", dtype=torch.int32)
    qsl = torch.tensor([0, qlen], device="cuda", dtype=torch.int32)
    args = (q, k_cache, v_cache, table, lens, qsl, d ** -0.5)
    hints = dict(max_query_len=qlen, max_seq_len=ctx)

    def sdpa():
        # min_prefill_tokens=1: the SDPA path for every length (the engine's threshold would send short ones to
        # Triton, and the table would compare Triton with itself)
        return paged_attention_prefill_sdpa(*args, rest=paged_attention, query_start_host=[0, qlen],
                                            seq_lens_host=[ctx], min_prefill_tokens=1)

    def triton():
        return paged_attention(*args, **hints)

    out = {"sdpa_first": _timed(sdpa), "sdpa_again": min(_timed(sdpa) for _ in range(3)),
           "triton_first": _timed(triton), "triton_again": min(_timed(triton) for _ in range(3))}
    ref = triton().float()
    out["err"] = float((sdpa().float() - ref).abs().max() / ref.abs().max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, default=24, help="distinct random prompt lengths per case")
    ap.add_argument("--min-len", type=int, default=512)
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--heads", default="96/8,12/1")
    ap.add_argument("--prefixes", default="0,4096")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exact-plans", action="store_true",
                    help=f"{AVOID_RECOMPILE_ENV}=0: torch's default, one cuDNN plan per exact length")
    args = ap.parse_args()
    if args.exact_plans:
        os.environ[AVOID_RECOMPILE_ENV] = "0"
    print(f"{AVOID_RECOMPILE_ENV}={os.environ.get(AVOID_RECOMPILE_ENV, '(unset: the SDPA path sets 1)')}", flush=True)
    rng = random.Random(args.seed)
    for heads in args.heads.split(","):
        hq, hk = (int(x) for x in heads.split("/"))
        _case(args.min_len, 0, hq, hk)  # Triton compiles and torch's first-use costs, outside the table
        _case(args.min_len, 256, hq, hk)
        for prefix in (int(p) for p in args.prefixes.split(",")):
            rows = []
            for qlen in rng.sample(range(args.min_len, args.max_len), args.lengths):
                r = _case(qlen, prefix, hq, hk)
                rows.append(r)
                print(f"{hq}/{hk} prefix {prefix:5} q {qlen:5}: sdpa first {r['sdpa_first']:7.2f} ms, again "
                      f"{r['sdpa_again']:7.2f} | triton first {r['triton_first']:7.2f}, again {r['triton_again']:7.2f}"
                      f" | err {r['err']:.1e}",
                      flush=True)
            extra = [r["sdpa_first"] - r["sdpa_again"] for r in rows]
            t_extra = [r["triton_first"] - r["triton_again"] for r in rows]
            print(f"== {hq}/{hk} prefix {prefix}: first-call extra over {len(rows)} new lengths: sdpa median "
                  f"{statistics.median(extra):.2f} ms (max {max(extra):.2f}), triton median "
                  f"{statistics.median(t_extra):.2f} ms (max {max(t_extra):.2f}); repeated: sdpa / triton median "
                  f"{statistics.median(r['sdpa_again'] / r['triton_again'] for r in rows):.2f}; "
                  f"err max {max(r['err'] for r in rows):.1e}", flush=True)


if __name__ == "__main__":
    main()

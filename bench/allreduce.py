"""The tensor-parallel decode all-reduce: NCCL against the one-shot kernels, per call, in CUDA graphs.

    torchrun --nproc-per-node N -m bench.allreduce [--batches 1,16,64] [--hidden 5120] [--check]
    (CPU smoke: GLINT_ALLREDUCE_DEVICE=cpu TRITON_INTERPRET=1 torchrun --nproc-per-node 2 -m bench.allreduce
     --batches 1 --calls 2 --replays 1)

What the model does after every row-parallel layer (o_proj, the MoE / dense MLP): sum the ranks' partial
hidden states [B, hidden] and feed the sum, plus the residual, to the next RMSNorm. Timed per call:

  nccl+norm        dist.all_reduce (NCCL ring) then the add + RMSNorm kernel: today's path
  nccl             the all-reduce alone
  torch_one_shot   torch's symmetric-memory one-shot all-reduce (copying x into its buffer), a baseline
  one_shot         ours, plain (kernels/triton_allreduce.py)
  fused            ours with the residual add + RMSNorm in the same kernel: --enable-allreduce-fusion
  fused+fp8        the same with the norm's per-token FP8 quantization (what an FP8 linear after it takes)

Each method is captured in a CUDA graph of --calls back-to-back calls (as decode steps replay them) and replayed
--replays times; the figure is the replay time / calls, median over ranks of rank-local timings. Inputs change
between calls so that a stale read would show in the check. `--check` (also run by every timing run) compares
the one-shot results with NCCL + the torch norm within bf16 rounding and checks that every rank got the same bits.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem

import kernels
from kernels.norm import add_rms_norm_ref
from model.one_shot_allreduce import MAX_BYTES, OneShotAllReduce


def _symm_one_shot(group: dist.ProcessGroup, nbytes: int, device: torch.device):
    """torch's one-shot all-reduce over its own symmetric buffer, or None where this torch lacks it."""
    op = getattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out", None)
    if op is None or device.type != "cuda":
        return None
    buf = symm_mem.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    symm_mem.rendezvous(buf, group)
    name = group.group_name

    def run(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return op(buf[: x.numel()], x.view(-1), "sum", name, out.view(-1))

    return run


def methods(group, one_shot: OneShotAllReduce, weight: torch.Tensor, eps: float, device: torch.device) -> dict:
    torch_one_shot = _symm_one_shot(group, one_shot.max_bytes, device)

    def nccl(x, r):
        dist.all_reduce(x, group=group)
        return x

    def nccl_norm(x, r):
        dist.all_reduce(x, group=group)
        return kernels.add_rms_norm(x, r, weight, eps)[0]

    out = {
        "nccl+norm": nccl_norm,
        "nccl": nccl,
        "one_shot": lambda x, r: one_shot.all_reduce(x),
        "fused": lambda x, r: one_shot.all_reduce_add_rms_norm(x, r, weight, eps, False)[0],
        "fused+fp8": lambda x, r: one_shot.all_reduce_add_rms_norm(x, r, weight, eps, True)[0],
    }
    if torch_one_shot is not None:
        out["torch_one_shot"] = lambda x, r: torch_one_shot(x, torch.empty_like(x))
    return out


def check(group, rank: int, world: int, one_shot: OneShotAllReduce, weight, eps, batch: int, hidden: int,
          device: torch.device) -> dict:
    """One-shot results against NCCL + the torch norm, on inputs that differ per rank; the same bits on every
    rank. Returns the largest relative error seen."""
    gen = torch.Generator(device="cpu").manual_seed(1000 * batch + rank)
    x = torch.randn(batch, hidden, generator=gen).to(device, torch.bfloat16)
    res = torch.randn(batch, hidden, generator=torch.Generator().manual_seed(batch)).to(device, torch.bfloat16)
    ref = x.clone()
    dist.all_reduce(ref, group=group)
    y_ref, s_ref = add_rms_norm_ref(ref, res, weight, eps)
    plain = one_shot.all_reduce(x.clone())
    y, s, q = one_shot.all_reduce_add_rms_norm(x.clone(), res, weight, eps, True)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    errs = {"plain": rel(plain, ref), "summed": rel(s, s_ref), "normed": rel(y, y_ref),
            "fp8": rel(q[0].float() * q[1], y)}
    digest = torch.stack([plain.float().sum(), y.float().sum(), s.float().sum()]).double()
    every = [torch.empty_like(digest) for _ in range(world)]
    dist.all_gather(every, digest, group=group)
    same = all(torch.equal(every[0], d) for d in every)
    ok = errs["plain"] < 1e-2 and errs["summed"] < 1e-2 and errs["normed"] < 2e-2 and errs["fp8"] < 5e-2 and same
    return {"batch": batch, "rel_err": errs, "same_on_every_rank": same, "ok": ok}


def time_method(fn, xs, res, calls: int, replays: int, device: torch.device) -> float:
    """Microseconds per call: a graph of `calls` calls (inputs rotating through xs; NCCL sums them in place, so
    their values grow without bound, which does not change its speed), replayed."""
    def body():
        for i in range(calls):
            fn(xs[i % len(xs)], res)

    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(replays):
            body()
        return (time.perf_counter() - t0) * 1e6 / (calls * replays)
    body()  # warm-up: compiles, NCCL's first call
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64", help="rows per all-reduce (decode batch x rows per request)")
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--calls", type=int, default=50, help="all-reduces per captured graph")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--check", action="store_true", help="only the correctness checks")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device_type = os.environ.get("GLINT_ALLREDUCE_DEVICE", "cuda")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    group = dist.group.WORLD
    batches = [int(b) for b in args.batches.split(",")]
    # large enough for every batch asked for, so that the table shows where NCCL's ring overtakes (the engine
    # goes one-shot up to MAX_BYTES only)
    one_shot = OneShotAllReduce(group, rank, world, device, max(MAX_BYTES, max(batches) * args.hidden * 2))
    eps = 1e-5
    weight = (1 + 0.1 * torch.randn(args.hidden, generator=torch.Generator().manual_seed(7))).to(device, torch.bfloat16)
    result: dict = {"world": world, "hidden": args.hidden, "device": torch.cuda.get_device_name() if
                    device.type == "cuda" else "cpu", "checks": [], "us_per_call": {}}
    ok = True
    for b in batches:
        if b * args.hidden * 2 > MAX_BYTES and rank == 0:
            print(f"batch {b}: {b * args.hidden * 2} bytes is over the engine's one-shot limit ({MAX_BYTES}); it "
                  f"takes NCCL there (timed here to see where the ring overtakes)", flush=True)
        c = check(group, rank, world, one_shot, weight, eps, b, args.hidden, device)
        result["checks"].append(c)
        ok = ok and c["ok"]
        if rank == 0:
            print(f"check batch {b}: {'ok' if c['ok'] else 'FAILED'} {json.dumps(c)}", flush=True)
    if not args.check:
        fns = methods(group, one_shot, weight, eps, device)
        for b in batches:
            gen = torch.Generator().manual_seed(rank)
            xs = [torch.randn(b, args.hidden, generator=gen).to(device, torch.bfloat16) for _ in range(4)]
            res = torch.randn(b, args.hidden, generator=gen).to(device, torch.bfloat16)
            row = {}
            for name, fn in fns.items():
                us = time_method(fn, xs, res, args.calls, args.replays, device)
                every = [None] * world
                dist.all_gather_object(every, us, group=group)
                row[name] = statistics.median(every)
            result["us_per_call"][b] = row
            if rank == 0:
                base = row["nccl+norm"]
                cells = "  ".join(f"{k} {v:7.2f} us ({base / v:4.2f}x)" for k, v in row.items())
                print(f"TP{world} batch {b:3d}: {cells}", flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier(group=group)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

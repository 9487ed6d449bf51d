"""Tensor-parallel step times at real GLM-4.7 widths (dummy weights), with the all-reduce share of each step.

    python -m bench.tp_decode --tp 2 [--layers 8] [--dense-layers 3] [--batches 1,16,64] [--context 4096]
                              [--prefill 4096] [--out FILE.json]

Builds LLM(tensor_parallel_size=N) (ranks spawned by the engine, NCCL), then times rank 0's
`worker.execute(step)` — which also broadcasts the step to the other ranks, so our control-plane cost is
included — for decode steps of B sequences at `--context` tokens (CUDA graphs) and one prefill of `--prefill`
tokens (TTFT of a lone request, minus scheduling). The all-reduce share comes from a torch.profiler trace of
rank 0: time in NCCL kernels / time in all kernels, over a few eager decode steps.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from bench.engine import decode_inputs, prefill_inputs, time_fn
from bench.real_shape import real_shape_model_dir
from engine import LLM


def allreduce_share(worker, inp, steps: int = 5) -> dict:
    from torch.profiler import ProfilerActivity, profile

    graphs, worker.runner.graphs = worker.runner.graphs, None  # eager: kernels are visible one by one
    try:
        worker.execute(inp)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                worker.execute(inp)
            torch.cuda.synchronize()
    finally:
        worker.runner.graphs = graphs
    total = nccl = 0.0
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if evt.device_type is not None and "cuda" in str(evt.device_type).lower():
            total += t
            if "nccl" in evt.key.lower():
                nccl += t
    return {"nccl_us_per_step": nccl / steps, "kernel_us_per_step": total / steps,
            "share": nccl / total if total else float("nan")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dense-layers", type=int, default=3)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    path = real_shape_model_dir(args.layers, args.dense_layers)
    bs = 16
    blocks = max(batches) * (-(-(args.context + 1) // bs)) + 2
    t0 = time.time()
    llm = LLM(str(path), device="cuda", load_format="dummy", tensor_parallel_size=args.tp,
              max_model_len=args.context + 64, num_kv_blocks=blocks, max_num_seqs=max(batches),
              max_num_batched_tokens=max(args.prefill, 8192))
    worker = llm.engine.worker
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)
    result = {"tp": args.tp, "layers": args.layers, "dense_layers": args.dense_layers, "context": args.context,
              "startup_s": time.time() - t0, "device": torch.cuda.get_device_name(), "decode": {}}
    print(f"TP{args.tp}, {args.layers} layers ({args.dense_layers} dense), start-up {result['startup_s']:.0f} s")
    for b in batches:
        inp, shared = decode_inputs(b, args.context, bs, blocks, vocab, rng)
        t = time_fn(lambda: worker.execute(inp), worker.device, warmup=3, iters=20)
        share = allreduce_share(worker, inp)
        result["decode"][b] = {**t, "pages_shared": shared, "allreduce": share}
        print(f"decode B={b:3d} ctx={args.context}: {t['median_ms']:.3f} ms/step (graphs); all-reduce "
              f"{share['share']:.0%} of eager kernel time ({share['nccl_us_per_step']:.0f} us/step)")
    inp, _ = prefill_inputs(args.prefill, bs, blocks, vocab, rng)
    t = time_fn(lambda: worker.execute(inp), worker.device, warmup=1, iters=5)
    result["prefill"] = {"tokens": args.prefill, **t}
    print(f"prefill {args.prefill} tokens: {t['median_ms']:.1f} ms")
    llm.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

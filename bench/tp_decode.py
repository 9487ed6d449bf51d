"""Tensor-parallel step times at real GLM-4.7 widths (dummy weights), against the per-GPU HBM / compute floors,
with the all-reduce share of each step and a lone request's end-to-end TTFT and TPOT.

    python -m bench.tp_decode --tp 4 --layers 92 [--dense-layers 3] [--batches 1,16,64] [--context 4096]
                              [--prefill 4096] [--kv-cache-dtype fp8_e4m3] [--enable-shared-experts-fusion]
                              [--enable-fused-qk-norm-rope] [--tpot-tokens 128] [--out FILE.json]
                              [--device cpu --set hidden_size=64 ...]   (a CPU smoke run: gloo, tiny widths)

Builds LLM(tensor_parallel_size=N) (ranks spawned by the engine, NCCL), then:
- decode: times rank 0's `worker.execute(step)` — which also broadcasts the step to the other ranks, so our
  control-plane cost is included — for B sequences at `--context` tokens (CUDA graphs). The floor is the bytes
  rank 0 reads in that step (its weight shard, the experts the batch touches, its KV heads) / the measured copy
  bandwidth: every rank reads its own shard in parallel, and the floor leaves the all-reduces out;
- the all-reduce share: a torch.profiler trace of rank 0, NCCL kernel time / all kernel time, over a few eager
  decode steps;
- prefill: one `--prefill`-token step (TTFT of a lone request minus scheduling) against FLOPs / TP / the
  measured FP8 (or bf16) peak;
- end to end: LLM.generate of one `--context`-token prompt with max_tokens=1 (TTFT) and with
  1 + `--tpot-tokens` (TPOT = the engine's decode step time in those runs), prefix caching off so both prefill.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import time
from pathlib import Path

import torch

from bench.engine import (
    _profile_step,
    decode_bytes,
    decode_inputs,
    measure_bandwidth,
    measure_peaks,
    measured_distinct_experts,
    model_is_fp8,
    prefill_flops,
    prefill_inputs,
    time_fn,
)
from bench.real_shape import parse_overrides, real_shape_model_dir
from engine import LLM, SamplingParams


def allreduce_share(worker, inp, steps: int = 5) -> dict:
    from torch.profiler import ProfilerActivity, profile

    if worker.device.type != "cuda":
        return {
            "nccl_us_per_step": float("nan"),
            "kernel_us_per_step": float("nan"),
            "nccl_calls_per_step": 0,
            "share": float("nan"),
        }

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
    calls = 0
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if evt.device_type is not None and "cuda" in str(evt.device_type).lower():
            total += t
            if "nccl" in evt.key.lower() or "_one_shot_kernel" in evt.key:  # the fused kernel includes a norm
                nccl += t
                calls += evt.count
    return {
        "nccl_us_per_step": nccl / steps,
        "kernel_us_per_step": total / steps,
        "nccl_calls_per_step": calls / steps,
        "share": nccl / total if total else float("nan"),
    }


class BroadcastingRunner:
    """Runner-shaped view of rank 0's worker for helpers that call `runner.run` and toggle `runner.graphs`:
    each run goes through `worker.execute`, so the other ranks run the step too (their all-reduces match)."""

    def __init__(self, worker) -> None:
        self.worker = worker

    @property
    def graphs(self):
        return self.worker.runner.graphs

    @graphs.setter
    def graphs(self, value) -> None:
        self.worker.runner.graphs = value

    def run(self, inp):
        return self.worker.execute(inp)


def end_to_end(llm: LLM, context: int, tpot_tokens: int, vocab: int) -> dict:
    """One lone request through LLM.generate: TTFT (max_tokens=1, best of 3) and TPOT over `tpot_tokens` more
    tokens: the engine's decode steps of those runs (step accounting: each step() call's wall, one token each for a
    lone request). Not the difference of two runs' wall times: on a loaded host their noise exceeds a few tokens'
    time and the difference came out negative (CPU TP2 smoke test, 4 tokens)."""
    rng = random.Random(1)
    prompt = {"prompt_token_ids": [rng.randrange(vocab) for _ in range(context)]}

    def timed(n: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        out = llm.generate([prompt], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        assert len(out[0].outputs[0].token_ids) == n, "ignore_eos: every token must come out"
        return dt

    timed(2)  # warm-up
    ttft = min(timed(1) for _ in range(3))
    before = llm.stats()
    for _ in range(2):
        timed(1 + tpot_tokens)
    after = llm.stats()
    steps = after["steps_decode_steps"] - before["steps_decode_steps"]
    seconds = after["steps_decode_seconds"] - before["steps_decode_seconds"]
    return {"ttft_ms": ttft * 1e3, "tpot_ms": seconds * 1e3 / max(steps, 1), "tpot_tokens": tpot_tokens,
            "decode_steps": steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dense-layers", type=int, default=3)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3"])
    ap.add_argument("--enable-shared-experts-fusion", action="store_true")
    ap.add_argument("--enable-fused-qk-norm-rope", action="store_true")
    ap.add_argument("--enable-expert-parallel", action="store_true",
                    help="MoE experts split across the ranks whole (see bench.moe_parallel for one layer)")
    ap.add_argument("--enable-allreduce-fusion", action="store_true",
                    help="one-shot all-reduce fused with the norms (its kernel counts as all-reduce time)")
    ap.add_argument("--tpot-tokens", type=int, default=128, help="0: skip the end-to-end TTFT/TPOT")
    ap.add_argument("--profile", action="store_true", help="per-kernel breakdown of rank 0's eager decode steps")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config.json key (smoke runs)"
    )
    ap.add_argument("--model-root", default=None, help="parent of the generated model folder")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    path = real_shape_model_dir(args.layers, args.dense_layers, args.model_root, parse_overrides(args.set))
    bs = 16
    device = torch.device(args.device)
    hw = {"bandwidth": measure_bandwidth(device)}
    hw["peaks"] = measure_peaks(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    gbps = hw["bandwidth"]["GBps"]
    per_seq = -(-(args.context + 1 + args.tpot_tokens) // bs)
    blocks = max(batches) * per_seq + 2
    t0 = time.time()
    llm = LLM(
        str(path),
        device=device.type,
        load_format="dummy",
        tensor_parallel_size=args.tp,
        max_model_len=args.context + args.tpot_tokens + 64,
        num_kv_blocks=blocks,
        max_num_seqs=max(batches),
        max_num_batched_tokens=max(args.prefill, 8192),
        enable_prefix_caching=False,
        kv_cache_dtype=args.kv_cache_dtype,
        enable_shared_experts_fusion=args.enable_shared_experts_fusion,
        enable_fused_qk_norm_rope=args.enable_fused_qk_norm_rope,
        allreduce_fusion=args.enable_allreduce_fusion,
        enable_expert_parallel=args.enable_expert_parallel,
    )
    worker = llm.engine.worker
    model, mcfg = worker.model, llm.engine.model_config
    kv = worker.runner.kv_caches
    vocab = mcfg.vocab_size
    rng = random.Random(0)
    result = {
        "tp": args.tp,
        "layers": args.layers,
        "dense_layers": args.dense_layers,
        "context": args.context,
        "startup_s": time.time() - t0,
        "hardware": hw,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "flags": {
            k: getattr(args, k)
            for k in ("kv_cache_dtype", "enable_shared_experts_fusion", "enable_fused_qk_norm_rope",
                      "enable_allreduce_fusion", "enable_expert_parallel")
        },
        "weight_bytes_per_gpu": sum(p.numel() * p.element_size() for p in model.parameters()),
        "memory_allocated_GiB_rank0": torch.cuda.memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "decode": {},
    }
    print(
        f"TP{args.tp}, {args.layers} layers ({args.dense_layers} dense), start-up {result['startup_s']:.0f} s, "
        f"{result['weight_bytes_per_gpu'] / 2**30:.1f} GiB of weights per GPU, copy {gbps / 1e3:.2f} TB/s",
        flush=True,
    )
    for b in batches:
        inp, shared = decode_inputs(b, args.context, bs, blocks, vocab, rng)
        t = time_fn(
            functools.partial(worker.execute, inp),
            worker.device,
            warmup=3,
            iters=20 if device.type == "cuda" else 3,
        )
        share = allreduce_share(worker, inp)
        seen = measured_distinct_experts(BroadcastingRunner(worker), inp, mcfg.n_routed_experts)
        nbytes = decode_bytes(model, mcfg, b, args.context, kv, distinct_experts=seen)
        floor = nbytes["total"] / (gbps * 1e9) * 1e3
        result["decode"][b] = {
            **t,
            "pages_shared": shared,
            "allreduce": share,
            "bytes_rank0": nbytes,
            "floor_ms": floor,
            "ratio_vs_floor": t["median_ms"] / floor,
        }
        print(
            f"decode B={b:3d} ctx={args.context}: {t['median_ms']:.3f} ms/step (graphs), HBM floor {floor:.3f} ms "
            f"({t['median_ms'] / floor:.2f}x); all-reduce {share['share']:.0%} of eager kernel time "
            f"({share['nccl_us_per_step']:.0f} us/step in {share['nccl_calls_per_step']:.0f} calls)",
            flush=True,
        )
        if args.profile and device.type == "cuda":
            _profile_step(f"decode B={b} (rank 0, eager)", BroadcastingRunner(worker), inp, result["decode"][b],
                          "profile", lambda: None)
    inp, _ = prefill_inputs(args.prefill, bs, blocks, vocab, rng)
    t = time_fn(
        functools.partial(worker.execute, inp),
        worker.device,
        warmup=1,
        iters=5 if device.type == "cuda" else 2,
    )
    flops = prefill_flops(mcfg, args.prefill)
    lin_peak = (
        hw["peaks"]["fp8_tflops"]
        if model_is_fp8(model) and hw["peaks"].get("fp8_tflops")
        else hw["peaks"]["mm_tflops"]
    )
    floor = (
        (flops["linear"] / (lin_peak * 1e12) + flops["attention"] / (hw["peaks"]["mm_tflops"] * 1e12))
        * 1e3
        / args.tp
    )
    result["prefill"] = {
        "tokens": args.prefill,
        **t,
        "floor_ms": floor,
        "ratio_vs_floor": t["median_ms"] / floor,
        "linear_peak_tflops": lin_peak,
    }
    print(
        f"prefill {args.prefill} tokens: {t['median_ms']:.1f} ms (min {t['min_ms']:.1f} of {t['samples']}), "
        f"compute floor {floor:.1f} ms ({t['median_ms'] / floor:.2f}x)",
        flush=True,
    )
    if args.profile and device.type == "cuda":  # issue 19 item 2: which kernels differ between two processes
        _profile_step(f"prefill {args.prefill} (rank 0)", BroadcastingRunner(worker), inp, result["prefill"],
                      "profile", lambda: None)
    if args.tpot_tokens > 0:
        result["end_to_end"] = end_to_end(llm, args.context, args.tpot_tokens, vocab)
        e = result["end_to_end"]
        print(
            f"one request, {args.context}-token prompt: TTFT {e['ttft_ms']:.1f} ms, TPOT {e['tpot_ms']:.2f} ms "
            f"(over {args.tpot_tokens} tokens)",
            flush=True,
        )
    llm.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str, allow_nan=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One MoE layer per GPU under tensor vs expert parallelism, one GPU standing in for each rank in turn.

    python -m bench.moe_parallel [--tp 8] [--tokens 1,16,64,1024,4096,16384] [--routings 4] [--json OUT]

Every rank of a TP group runs the MoE layer on the same tokens (attention's output is replicated by its
all-reduce); what a rank computes differs. Tensor parallel: a 1/tp slice of every expert's width (192 at TP8),
the shared expert fused as expert 160 (the optimized preset). Expert parallel (--enable-expert-parallel): 1/tp of
the routed experts whole (20 at TP8, width 1536), the shared expert fused too: whole on every rank, each rank
computing it for 1/tp of the tokens. This builds model.moe.MoE for the ranks (the real GLM-4.7 widths from
configs/glm47-fp8, dummy FP8 per-channel weights, one router shared by all ranks), times each rank's forward
(router, routing, id mapping, fused MoE; x quantized per token beforehand, as the norm before the MoE does in
the model) by CUDA-graph replay, and reports the slowest rank, which the all-reduce after the layer waits for.
Tensor-parallel ranks are alike (rank 0 is timed); expert-parallel ranks differ by the pairs the routing sends
them, so each is timed, over --routings different token batches at decode sizes. The all-reduce (the same
[T, 5120] message either way) is not timed. % peak: the rank's own FLOPs over the FP8 datasheet peak (1,979 TFLOP/s).
The routing is that of random tokens through a random router (about uniform over the experts): a real model's
skew would load some expert-parallel ranks more than this shows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import kernels
from bench.kernels import timeit  # CUDA-graph replay timing, as the kernel benchmarks time
from kernels.quant import quant_fp8_per_token_ref
from model.config import ModelConfig, load_model_config
from model.moe import MoE
from model.parallel import TPGroup
from model.quant_plan import QuantPlan

ROOT = Path(__file__).resolve().parent.parent
FP8_PEAK = 1979e12


def build_rank(cfg: ModelConfig, tp: int, rank: int, expert_parallel: bool, device: torch.device,
               router: torch.Tensor) -> MoE:
    """Rank `rank`'s MoE layer with dummy FP8 per-channel weights and the shared router weight."""
    plan = QuantPlan(cfg, "fp8_channel", None, fuse_shared_experts=True, expert_parallel=expert_parallel)
    with torch.device(device):
        moe = MoE(cfg, TPGroup(rank, tp), plan, "model.layers.3.mlp", torch.bfloat16, device)
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    for name, p in moe.named_parameters():
        if name == "gate.weight":
            p.copy_(router)
        elif name == "gate.e_score_correction_bias":
            p.zero_()
        elif p.dtype == torch.float8_e4m3fn:
            for chunk in p.view(-1, p.shape[-1]).split(4096):  # bounded temporaries for the stacked experts
                chunk.copy_((torch.randn(chunk.shape, device=device, generator=gen) * 0.5).to(p.dtype))
        elif p.dtype == torch.float32:  # weight scales
            p.fill_(0.01)
        else:
            p.copy_(torch.randn(p.shape, device=device, generator=gen) * 0.02)
    return moe


def rank_work(moe: MoE, x: torch.Tensor) -> tuple[int, float]:
    """(routed pairs this rank computes, its FLOPs) for the tokens x."""
    _, ids = moe.route(x)
    part = moe.partition
    routed = ids[:, : moe.cfg.num_experts_per_tok]
    if part.expert_parallel:
        routed = kernels.moe_local_ids(routed, part.start, part.count)
    pairs = int((routed >= 0).sum())
    t, h = x.shape
    shared_width = moe.cfg.moe_intermediate_size * moe.cfg.n_shared_experts // moe.tp.size
    return pairs, 6.0 * h * (pairs * part.width + t * shared_width)


def time_forward(moe: MoE, x: torch.Tensor, reps: int = 2) -> float:
    """Median seconds of moe(x, x_fp8): CUDA-graph replays on a GPU (bench.kernels.timeit), plain calls on the CPU."""
    xq = quant_fp8_per_token_ref(x)
    if x.device.type == "cuda":
        return timeit([lambda: moe(x, xq)])[0]
    moe(x, xq)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        moe(x, xq)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile(cfg: ModelConfig, tp: int, t: int, device: torch.device) -> None:
    """Kernel times of rank 0's forward at t tokens, tensor vs expert parallel (torch profiler, 5 eager calls; with
    programmatic dependent launch a kernel's time includes its wait for the one before it)."""
    h = cfg.hidden_size
    gen = torch.Generator(device=device).manual_seed(0)
    router = torch.randn(cfg.n_routed_experts, h, device=device, generator=gen) / h ** 0.5
    x = torch.randn(t, h, device=device, generator=gen).to(torch.bfloat16)
    xq = quant_fp8_per_token_ref(x)
    for ep in (False, True):
        moe = build_rank(cfg, tp, 0, ep, device, router)
        moe(x, xq)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                moe(x, xq)
            torch.cuda.synchronize()
        print(f"--- {'EP' if ep else 'TP'}{tp} rank 0, {t} tokens: kernel time per forward")
        rows = [(e.device_time_total / 5, e.count // 5, e.key) for e in prof.key_averages() if e.device_time_total > 0]
        for us, n, key in sorted(rows, reverse=True)[:14]:
            print(f"  {us:9.1f} us  x{n:<3} {key[:100]}")
        print(f"  {sum(r[0] for r in rows):9.1f} us  total", flush=True)
        del moe
        torch.cuda.empty_cache()


def measure(cfg: ModelConfig, tp: int, tokens: list[int], routings: int, device: torch.device) -> list[dict]:
    h = cfg.hidden_size
    gen = torch.Generator(device=device).manual_seed(0)
    router = torch.randn(cfg.n_routed_experts, h, device=device, generator=gen) / h ** 0.5
    tp_rank0 = build_rank(cfg, tp, 0, False, device, router)
    ep_ranks = [build_rank(cfg, tp, r, True, device, router) for r in range(tp)]
    rows = []
    for t in tokens:
        batches = [torch.randn(t, h, device=device, generator=gen).to(torch.bfloat16)
                   for _ in range(routings if t <= 64 else 1)]
        tp_times, ep_max, ep_mean, ep_pairs, ep_flops, tp_flops = [], [], [], [], [], 0.0
        for x in batches:
            tp_times.append(time_forward(tp_rank0, x))
            tp_flops = rank_work(tp_rank0, x)[1]
            per_rank = [(time_forward(m, x), *rank_work(m, x)) for m in ep_ranks]
            assert sum(p for _, p, _ in per_rank) == t * cfg.num_experts_per_tok  # every pair on exactly one rank
            slow = max(per_rank)
            ep_max.append(slow[0])
            ep_mean.append(statistics.mean(r[0] for r in per_rank))
            ep_pairs.append(slow[1])
            ep_flops.append(slow[2])
        tp_us, ep_us = statistics.mean(tp_times) * 1e6, statistics.mean(ep_max) * 1e6
        row = {
            "tokens": t, "tp": tp, "routings": len(batches),
            "tp_us": tp_us, "tp_peak_pct": 100 * tp_flops / (tp_us * 1e-6) / FP8_PEAK,
            "ep_slowest_rank_us": ep_us, "ep_mean_rank_us": statistics.mean(ep_mean) * 1e6,
            "ep_slowest_rank_pairs": statistics.mean(ep_pairs),
            "pairs_per_rank_if_even": t * cfg.num_experts_per_tok / tp,
            "ep_peak_pct": 100 * statistics.mean(ep_flops) / (ep_us * 1e-6) / FP8_PEAK,
            "tp_over_ep": tp_us / ep_us,
        }
        rows.append(row)
        print(f"T={t:>6}  TP{tp} (width {tp_rank0.partition.width}): {tp_us:9.1f} us {row['tp_peak_pct']:5.1f}%  |  "
              f"EP{tp} ({ep_ranks[0].partition.count} experts x {ep_ranks[0].partition.width}): slowest rank "
              f"{ep_us:9.1f} us {row['ep_peak_pct']:5.1f}% ({row['ep_slowest_rank_pairs']:.0f} pairs, even "
              f"{row['pairs_per_rank_if_even']:.0f}), mean rank {row['ep_mean_rank_us']:9.1f} us  |  "
              f"TP/EP {row['tp_over_ep']:.2f}x", flush=True)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--tokens", default="1,16,64,1024,4096,16384")
    ap.add_argument("--routings", type=int, default=4, help="token batches per size up to 64 tokens")
    ap.add_argument("--model-dir", default=str(ROOT / "configs" / "glm47-fp8"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", type=int, default=0, help="only print rank 0's kernel times at this many tokens")
    args = ap.parse_args(argv)
    cfg = load_model_config(args.model_dir)
    device = torch.device(args.device)
    if args.profile:
        with torch.no_grad():
            profile(cfg, args.tp, args.profile, device)
        return 0
    with torch.no_grad():
        rows = measure(cfg, args.tp, [int(t) for t in args.tokens.split(",")], args.routings, device)
    if args.json:
        info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "rows": rows}
        Path(args.json).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A serving run's engine steps against their floor (issue 19: "the decode step time under that load against
its floor"), from the step accounting bench.serving saved (`server_steps`, engine/step_accounting.py).

    python -m bench.step_floor RESULT.json [...] --model MODEL_DIR [--bandwidth-gbps B] [--linear-tflops P]
                               [--attention-tflops P]
    (what is not given is measured once on this machine's GPU: run it where the server ran, with the GPU free)

Floors, per GPU (every rank reads its own shard in parallel; rank 0's shard stands for all):
- a decode step reads the weights every step reads, the expert slots the batch touches (uniform routing:
  E * (1 - (1 - k/E)^B) of E routed experts for B requests, plus any fused shared slot) and the KV of its
  sequences, at the measured copy bandwidth; the mean decode step is set against the floor of the mean batch
  and context (the expert term is concave in B, so at a varying batch this floor is a little high);
- a prefill step computes 2 x active parameters x tokens / TP at the measured FP8 peak (bf16 for a bf16 model)
  plus causal attention, 4 x layers x heads x head_dim x query-key pairs / TP, at the bf16 peak; and reads the
  weights at least once, decoding the requests it carries;
- the run: the sum of both against the steps' summed wall time.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from bench.engine import active_params_per_token, expected_distinct_experts, measure_bandwidth, measure_peaks
from model.config import load_model_config


def decode_floor_s(steps: dict, seqs: float, context: float, bandwidth: float) -> float:
    """Seconds one decode step of `seqs` requests over `context` KV tokens in all takes at `bandwidth` B/s."""
    routed, slots = steps["model_routed_experts"], steps["model_expert_slots"]
    touched = expected_distinct_experts(routed, steps["model_experts_per_token"], max(1, round(seqs))) if slots else 0
    expert = steps["model_expert_slot_bytes"] * (touched + max(0, slots - routed))
    nbytes = steps["model_other_weight_bytes"] + expert + steps["model_kv_bytes_per_token"] * context
    return nbytes / bandwidth


def floors(steps: dict, cfg, bandwidth: float, linear_flops: float, attention_flops: float) -> dict:
    """bandwidth in B/s; linear_flops / attention_flops: the peaks (FLOP/s) of the GEMMs and of attention."""
    tp = steps.get("tensor_parallel_size", 1)
    out: dict = {"tensor_parallel_size": tp, "bandwidth_GBps": bandwidth / 1e9,
                 "linear_peak_TFLOPs": linear_flops / 1e12, "attention_peak_TFLOPs": attention_flops / 1e12}
    n = steps["steps_decode_steps"]
    if n:
        seqs = steps["steps_decode_seqs"] / n
        context = steps["steps_decode_context_tokens"] / n
        measured = steps["steps_decode_seconds"] / n
        floor = decode_floor_s(steps, seqs, context, bandwidth)
        out["decode"] = {"steps": n, "mean_seqs": seqs, "mean_context_tokens": context, "ms": 1e3 * measured,
                         "floor_ms": 1e3 * floor, "ratio": measured / floor}
    m = steps["steps_prefill_steps"]
    if m:
        ap = active_params_per_token(cfg)
        linear = 2.0 * ap["body"] * steps["steps_prefill_tokens"] / tp
        attention = (4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
                     * steps["steps_prefill_attention_pairs"] / tp)
        compute = linear / linear_flops + attention / attention_flops
        # every prefill step also reads the weights once, and decodes the requests it carries
        decode_in = m * decode_floor_s(steps, steps["steps_prefill_decode_seqs"] / m,
                                       steps["steps_prefill_decode_context_tokens"] / m, bandwidth)
        floor = max(compute, decode_in)
        measured = steps["steps_prefill_seconds"]
        out["prefill"] = {"steps": m, "tokens": steps["steps_prefill_tokens"], "ms_per_step": 1e3 * measured / m,
                          "compute_floor_s": compute, "weights_floor_s": decode_in, "seconds": measured,
                          "floor_s": floor, "ratio": measured / floor}
    total = steps["steps_decode_seconds"] + steps["steps_prefill_seconds"]
    floor = out.get("decode", {}).get("floor_ms", 0) * n / 1e3 + out.get("prefill", {}).get("floor_s", 0)
    out["run"] = {"step_seconds": total, "floor_s": floor, "ratio": total / floor if floor else float("nan")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bench.serving JSON outputs")
    ap.add_argument("--model", required=True, help="the served model's folder (its config.json)")
    ap.add_argument("--bandwidth-gbps", type=float, default=None, help="default: measured on this GPU")
    ap.add_argument("--linear-tflops", type=float, default=None,
                    help="GEMM peak; default: measured (FP8 for an FP8 model, else bf16)")
    ap.add_argument("--attention-tflops", type=float, default=None, help="bf16 peak; default: measured")
    args = ap.parse_args(argv)
    cfg = load_model_config(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bandwidth = (args.bandwidth_gbps * 1e9 if args.bandwidth_gbps else measure_bandwidth(device)["GBps"] * 1e9)
    peaks = {}
    if args.linear_tflops is None or args.attention_tflops is None:
        peaks = measure_peaks(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    attention = args.attention_tflops or peaks["mm_tflops"]
    linear = args.linear_tflops or (peaks["fp8_tflops"] if cfg.quant.is_fp8 and peaks.get("fp8_tflops")
                                    else peaks["mm_tflops"])
    status = 0
    for path in args.results:
        with open(path) as f:
            steps = json.load(f).get("server_steps")
        if not steps:
            print(f"{path}: no server_steps (a server without glint's step accounting)", file=sys.stderr)
            status = 2
            continue
        report(path, floors(steps, cfg, bandwidth, linear * 1e12, attention * 1e12))
    return status


def report(path: str, out: dict) -> None:
    d, p, r = out.get("decode"), out.get("prefill"), out["run"]
    print(f"== {path} (TP{out['tensor_parallel_size']}, {out['bandwidth_GBps']:.0f} GB/s, "
          f"{out['linear_peak_TFLOPs']:.0f} / {out['attention_peak_TFLOPs']:.0f} TFLOP/s)")
    if d:
        print(f"decode steps: {d['steps']}, mean {d['mean_seqs']:.1f} requests over {d['mean_context_tokens']:.0f} "
              f"KV tokens: {d['ms']:.2f} ms/step, floor {d['floor_ms']:.2f} ms ({d['ratio']:.2f}x)")
    if p:
        print(f"prefill steps: {p['steps']} ({p['tokens']} prompt tokens): {p['seconds']:.2f} s, floor "
              f"{p['floor_s']:.2f} s (compute {p['compute_floor_s']:.2f}, weights + decodes "
              f"{p['weights_floor_s']:.2f}) ({p['ratio']:.2f}x)")
    print(f"all steps: {r['step_seconds']:.2f} s, floor {r['floor_s']:.2f} s ({r['ratio']:.2f}x)")
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())

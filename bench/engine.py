"""Engine benchmark at real GLM-4.7 shapes (dummy weights, fewer layers), as ratios measured in one run.

    python -m bench.engine [--device cuda|cpu] [--layers 15] [--dense-layers 3] [--batches 1,8,64]
                           [--context 4096] [--prefill 4096] [--hf-layers 3] [--hf-dense-layers 1]
                           [--gen-prompts 16] [--gen-input 128] [--gen-output 64] [--kv-cache-dtype auto]
                           [--hidden N] [--experts N] [--set KEY=VALUE ...] [--out FILE.json]

The model is configs/glm47-fp8/config.json with `--layers` layers (bench/real_shape.py) and
load_format="dummy", TP1. One run measures, in this order:

1. hardware: HBM bandwidth = 2 x bytes / time of a large device copy (read + write), and matmul peaks:
   `torch._scaled_mm` FP8 (row-wise scales) and `torch.mm` in the model dtype (8192^3 on CUDA).
2. decode steps: B sequences whose KV pages already hold `--context` tokens (pages taken from the worker's
   pool directly, contents left zero: attention cost does not depend on values), one new token each;
   `runner.run` timed with the worker's CUDA graphs and without them (eager). Floor = bytes touched by one
   step / measured bandwidth, bytes counted from the model's own tensors:
     all attention, dense-MLP, shared-expert, router, norm and LM-head tensors, B embedding rows, and
     E*(1-(1-k/E)^B) of the E routed experts per MoE layer (expected distinct experts for B tokens with
     uniform routing; each expert = its FP8 w13 + w2 + scales), plus the KV read:
     B * context * layers * 2 * kv_heads * head_dim * KV element size.
   The JSON also holds the same floor with the number of distinct experts the dummy router really picked
   (one extra eager run with the routing op observed).
3. prefill: one sequence of `--prefill` tokens in one eager step. Floor = linear FLOPs / linear peak +
   attention FLOPs / attention peak, linear = 2 * active params * T (active = attention + dense MLP or
   k routed + shared experts + router per layer; the LM head for the last token only), attention =
   2 * 2 * layers * heads * head_dim * T^2 / 2 (causal). The linear peak is the FP8 peak when the weights
   are FP8, else the model-dtype matmul peak; attention uses the model-dtype peak.
4. offline generate throughput on a second, smaller model (`--hf-layers` layers, `--hf-dense-layers` of them
   dense, same dummy weights): LLM.generate with token-id prompts, ignore_eos, detokenize=False, against
   HF transformers' Glm4MoeForCausalLM.generate on the same weights (dequantized, model dtype; sdpa).
5. overlap scheduling on vs off, when LLM(...) takes an overlap flag; otherwise reported as not implemented.

Every time is the median of several runs after warm-up, each run bracketed by device synchronization.
The JSON (schema "glint.bench.engine/1") is rewritten after every phase, so a run cut short keeps what it
measured. The table printed last gives ours vs floor / ours vs baseline with the targets of issue 6.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import math
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.emulated_rank import emulated_dist
from bench.host_profile import host_breakdown, print_host_breakdown
from bench.real_shape import parse_overrides, real_shape_model_dir
from engine.allocator_events import allocator_events
from engine.block_tables import BlockTables
from engine.logprobs import PromptRows
from kernels import fa4_prefill
from model.attention import PREFILL_ATTENTION_BACKENDS, resolve_prefill_attention_backend
from model.moe import MoE

SCHEMA = "glint.bench.engine/1"
# issue 6 item 5
TARGETS = {
    "decode_b1_vs_floor": 1.5,  # batch-1 decode <= 1.5x its HBM floor
    "decode_b64_vs_floor": 1.3,  # batch-64 decode <= 1.3x its HBM floor
    "prefill_vs_floor": 2.0,  # 4096-token prefill <= 2x its compute floor
    "graphs_speedup_b1": 3.0,  # graphs >= 3x faster than eager at batch 1
}
_WIDTH_FLAGS = {  # named config overrides (mostly for CPU smoke runs)
    "hidden": "hidden_size",
    "experts": "n_routed_experts",
    "topk": "num_experts_per_tok",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "intermediate": "intermediate_size",
    "moe_intermediate": "moe_intermediate_size",
    "vocab": "vocab_size",
}

log = logging.getLogger("bench.engine")


# ------------------------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int, inner: int = 1) -> dict:
    """Median/min/mean milliseconds per call of fn; each sample = `inner` calls between two syncs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(max(1, iters)):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3 / inner)
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "mean_ms": statistics.fmean(samples),
        "samples": len(samples),
    }


# ------------------------------------------------------------------------------------------------ hardware


def measure_bandwidth(device: torch.device) -> dict:
    """Device copy of a large buffer: (bytes read + bytes written) / time."""
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(
        functools.partial(dst.copy_, src), device, warmup=3, iters=10, inner=5 if device.type == "cuda" else 1
    )
    del src, dst
    gbps = 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9
    return {"bytes_copied": nbytes, "copy_ms": t["median_ms"], "GBps": gbps}


def _mm_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_fn(
        functools.partial(torch.mm, a, b), device, warmup=2, iters=5, inner=5 if device.type == "cuda" else 1
    )
    return 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12


def _fp8_peak(device: torch.device, n: int) -> tuple[float | None, str]:
    from kernels.quant import FP8_DTYPE

    a = torch.randn(n, n, device=device).to(FP8_DTYPE)
    b = torch.randn(n, n, device=device).to(FP8_DTYPE).t()  # column-major, as _scaled_mm wants
    for kind in ("rowwise", "tensorwise"):
        if kind == "rowwise":
            sa = torch.ones(n, 1, device=device, dtype=torch.float32)
            sb = torch.ones(1, n, device=device, dtype=torch.float32)
        else:
            sa = torch.ones((), device=device, dtype=torch.float32)
            sb = torch.ones((), device=device, dtype=torch.float32)
        fn = functools.partial(torch._scaled_mm, a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        try:
            fn()
        except (RuntimeError, TypeError) as exc:  # this torch build lacks this scaling
            log.warning("_scaled_mm %s scaling failed: %s", kind, exc)
            continue
        t = time_fn(fn, device, warmup=2, iters=5, inner=5)
        return 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12, kind
    return None, "unavailable"


def measure_peaks(device: torch.device, model_dtype: torch.dtype) -> dict:
    n = 8192 if device.type == "cuda" else 512
    out: dict[str, Any] = {"size": n, "model_dtype": str(model_dtype).removeprefix("torch.")}
    out["mm_tflops"] = _mm_peak(device, model_dtype, n)
    if device.type == "cuda":
        out["fp8_tflops"], out["fp8_scaling"] = _fp8_peak(device, n)
    else:
        out["fp8_tflops"], out["fp8_scaling"] = None, "cpu"
    return out


# ------------------------------------------------------------------------------------------------ floors


def expected_distinct_experts(num_experts: int, top_k: int, batch: int) -> float:
    """E * (1 - (1 - k/E)^B): expected number of distinct experts B tokens route to (uniform routing)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def decode_bytes(
    model: torch.nn.Module,
    cfg,
    batch: int,
    context: int,
    kv_caches: dict,
    distinct_experts: float | None = None,
) -> dict:
    """Bytes one decode step of `batch` sequences reads, by category, from the model's own tensors.
    `distinct_experts`: routed experts touched per MoE layer (default: the uniform-routing expectation). Under
    expert parallelism a rank holds `count` of the E experts, so it is expected to touch count / E of them (the
    mean rank; the slowest rank of a step touches more)."""
    cats: dict[str, float] = {}
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = expected_distinct_experts(e, k, batch) if distinct_experts is None else distinct_experts
    local = next((m.partition.count for m in model.modules() if isinstance(m, MoE)), e)
    touched_here = touched * local / e

    def add(cat: str, n: float) -> None:
        cats[cat] = cats.get(cat, 0.0) + n

    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name.startswith("mtp."):
            continue  # not run by a decode step
        if name.startswith("embed_tokens."):
            add("embedding_rows", nbytes * min(batch, p.shape[0]) / p.shape[0])
        elif ".mlp.experts." in name:
            slots = p.shape[0]
            per = nbytes / slots
            add("routed_experts", per * touched_here)
            if slots > local:  # shared expert fused as the slot after the routed ones
                add("shared_expert", per * (slots - local))
        elif name.startswith("lm_head."):
            add("lm_head", nbytes)
        elif ".self_attn." in name:
            add("attention", nbytes)
        elif ".mlp.gate." in name:
            add("router", nbytes)
        elif ".mlp.shared_experts." in name:
            add("shared_expert", nbytes)
        elif ".mlp." in name:
            add("dense_mlp", nbytes)
        else:
            add("norms", nbytes)
    kv_k = next(iter(kv_caches.values()))[0]
    kv_heads, head_dim, el = kv_k.shape[2], kv_k.shape[3], kv_k.element_size()
    add("kv_read", batch * context * len(kv_caches) * 2 * kv_heads * head_dim * el)
    cats["expected_distinct_experts"] = touched
    weights = sum(v for c, v in cats.items() if c not in ("kv_read", "expected_distinct_experts"))
    cats["weights_total"] = weights
    cats["total"] = weights + cats["kv_read"]
    return cats


def active_params_per_token(cfg) -> dict:
    """Linear parameters one token multiplies through (no embedding; LM head separate)."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = (
        h * (cfg.num_attention_heads * d + 2 * cfg.num_key_value_heads * d) + cfg.num_attention_heads * d * h
    )
    dense = 3 * h * cfg.intermediate_size
    moe = (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * h * cfg.moe_intermediate_size
    router = cfg.n_routed_experts * h
    n_dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
    n_moe = cfg.num_hidden_layers - n_dense
    body = cfg.num_hidden_layers * attn + n_dense * dense + n_moe * (moe + router)
    return {
        "attention_per_layer": attn,
        "dense_mlp_per_layer": dense,
        "moe_active_per_layer": moe + router,
        "body": body,
        "lm_head": cfg.vocab_size * h,
    }


def prefill_flops(cfg, tokens: int, prefix: int = 0) -> dict:
    ap = active_params_per_token(cfg)
    linear = 2.0 * ap["body"] * tokens + 2.0 * ap["lm_head"]  # LM head for the last token only
    # causal QK^T + PV: each new token sees the prefix and the new tokens before it
    attention = 2.0 * 2.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * (
        tokens * prefix + tokens**2 / 2)
    return {"linear": linear, "attention": attention, "active_params_body": ap["body"]}


def measured_distinct_experts(runner, inp, num_experts: int) -> float | None:
    """Mean number of distinct routed experts per MoE layer in one eager run of `inp` (None when the routing
    op cannot be observed)."""
    import kernels

    counts: list[int] = []
    # the MoE block's routing ops: norm + router (decoder layers), router alone (MoE called without routing)
    origs = {name: getattr(kernels, name) for name in ("rms_norm_gate_route", "moe_gate_route")}

    def observe(orig):
        def observed(*a, **kw):
            out = orig(*a, **kw)
            ids = out[-1]
            counts.append(int(ids[ids < num_experts].unique().numel()))
            return out
        return observed

    graphs, runner.graphs = runner.graphs, None
    for name, orig in origs.items():
        setattr(kernels, name, observe(orig))
    try:
        runner.run(inp)
    finally:
        for name, orig in origs.items():
            setattr(kernels, name, orig)
        runner.graphs = graphs
    return statistics.fmean(counts) if counts else None


def model_is_fp8(model: torch.nn.Module) -> bool:
    from kernels.quant import FP8_DTYPE

    return any(p.dtype == FP8_DTYPE for p in model.parameters())


# ------------------------------------------------------------------------------------------------ step inputs


def decode_inputs(batch: int, context: int, block_size: int, num_blocks: int, vocab: int, rng: random.Random):
    """StepInputs for `batch` sequences with `context` tokens already in their KV pages, one new token each.
    Pages 1.. are used (page 0 serves graph padding rows); wraps around, flagged, when the pool is short."""
    from engine.model_runner import StepInputs

    per = -(-(context + 1) // block_size)
    usable = num_blocks - 1
    shared = batch * per > usable
    tables = [[1 + (i * per + j) % usable for j in range(per)] for i in range(batch)]
    slots = [t[context // block_size] * block_size + context % block_size for t in tables]
    inp = StepInputs(
        input_ids=[rng.randrange(vocab) for _ in range(batch)],
        positions=[context] * batch,
        slot_mapping=slots,
        block_tables=BlockTables.build(tables),
        seq_lens=[context + 1] * batch,
        query_start_loc=list(range(batch + 1)),
        logits_rows=list(range(batch)),
    )
    return inp, shared


def prefill_inputs(tokens: int, block_size: int, num_blocks: int, vocab: int, rng: random.Random,
                   prefix: int = 0):
    """One sequence's prefill chunk of `tokens` new tokens after `prefix` cached ones (a prefix-cache hit or
    the chunks before it: their KV is whatever the pages hold)."""
    from engine.model_runner import StepInputs

    per = -(-(prefix + tokens) // block_size)
    usable = num_blocks - 1
    table = [1 + j % usable for j in range(per)]
    new = range(prefix, prefix + tokens)
    inp = StepInputs(
        input_ids=[rng.randrange(vocab) for _ in range(tokens)],
        positions=list(new),
        slot_mapping=[table[p // block_size] * block_size + p % block_size for p in new],
        block_tables=BlockTables.build([table]),
        seq_lens=[prefix + tokens],
        query_start_loc=[0, tokens],
        logits_rows=[tokens - 1],
    )
    return inp, per > usable


def mixed_inputs(decode: Any, prefill: Any) -> Any:
    """One step of `decode`'s one-token rows followed by `prefill`'s chunk (a mixed step under continuous
    batching): every decode row's logits and the chunk's last one."""
    from engine.model_runner import StepInputs

    b = len(decode.input_ids)
    return StepInputs(
        input_ids=decode.input_ids + prefill.input_ids,
        positions=decode.positions + prefill.positions,
        slot_mapping=decode.slot_mapping + prefill.slot_mapping,
        block_tables=BlockTables.build([t.row(i) for t in (decode.block_tables, prefill.block_tables)
                                        for i in range(t.rows)]),
        seq_lens=decode.seq_lens + prefill.seq_lens,
        query_start_loc=decode.query_start_loc + [b + q for q in prefill.query_start_loc[1:]],
        logits_rows=decode.logits_rows + [b + r for r in prefill.logits_rows],
    )


# ------------------------------------------------------------------------------------------------ phases


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _iters(device: torch.device, gpu: int, cpu: int) -> int:
    return gpu if device.type == "cuda" else cpu


def run_step_benchmarks(
    args,
    model_dir: Path,
    device: torch.device,
    peaks: dict,
    bw: dict,
    results: dict,
    save: Callable[[], None],
) -> None:
    """Decode (graphs and eager) and prefill on the main model."""
    from engine.config import EngineConfig
    from engine.distributed import single_process
    from engine.model_worker import ModelWorker

    bs = args.block_size
    batches = args.batches
    max_model_len = -(-max(args.context + 1, args.prefill_prefix + args.prefill) // bs) * bs
    per_seq = -(-(args.context + 1) // bs)
    need = 1 + max(max(batches) * per_seq, -(-(args.prefill_prefix + args.prefill) // bs))
    num_blocks = args.num_kv_blocks or (need if device.type == "cpu" else None)
    cfg = EngineConfig.create(
        model=str(model_dir),
        device=device.type,
        load_format="dummy",
        seed=args.seed,
        max_model_len=max_model_len,
        max_num_batched_tokens=max(args.prefill + args.mixed_decodes, max(batches)),
        max_num_seqs=max(max(batches), args.mixed_decodes),
        kv_block_size=bs,
        num_kv_blocks=num_blocks,
        enable_prefix_caching=False,
        kv_cache_dtype=args.kv_cache_dtype,
        mem_fraction_static=args.mem_fraction_static,
        enforce_eager=args.enforce_eager,
        enable_shared_experts_fusion=args.enable_shared_experts_fusion,
        enable_fused_qk_norm_rope=args.enable_fused_qk_norm_rope,
        enable_expert_parallel=args.enable_expert_parallel,
        prefill_attention_backend=args.prefill_attention_backend,
        **({} if args.piecewise_cuda_graph_max_tokens is None
           else {"piecewise_cuda_graph_max_tokens": args.piecewise_cuda_graph_max_tokens}),
    )
    t0 = time.perf_counter()
    # --emulate-tp N: rank 0 of a TP group of N alone (bench/emulated_rank.py): its shapes, no collectives
    worker = ModelWorker(cfg, single_process() if args.emulate_tp == 1 else emulated_dist(args.emulate_tp))
    load_s = time.perf_counter() - t0
    runner, model, mcfg = worker.runner, worker.model, cfg.model
    fp8 = model_is_fp8(model)
    kv = runner.kv_caches
    results["main_model"] = {
        "path": str(model_dir),
        "layers": mcfg.num_hidden_layers,
        "dense_layers": mcfg.first_k_dense_replace,
        "fp8_weights": fp8,
        "kv_cache_dtype": str(next(iter(kv.values()))[0].dtype).removeprefix("torch."),
        "num_kv_blocks": worker.num_blocks,
        "block_size": bs,
        "kv_capacity_tokens": worker.num_blocks * bs,
        "cuda_graphs": runner.graphs is not None,
        "shared_experts_fusion": args.enable_shared_experts_fusion,
        "fused_qk_norm_rope": args.enable_fused_qk_norm_rope,
        "emulated_tp": args.emulate_tp,
        "expert_parallel": args.enable_expert_parallel,
        "startup_s": load_s,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    if device.type == "cuda":
        results["main_model"]["memory_allocated_GiB"] = torch.cuda.memory_allocated(device) / 2**30
    save()
    rng = random.Random(args.seed)
    decode = []
    for b in batches:
        inp, shared = decode_inputs(b, args.context, bs, worker.num_blocks, mcfg.vocab_size, rng)
        row: dict[str, Any] = {"batch": b, "context": args.context, "kv_pages_shared": shared}
        run = functools.partial(runner.run, inp)
        if runner.graphs is not None:
            row["graph"] = time_fn(run, device, warmup=3, iters=_iters(device, 30, 3))
        graphs, runner.graphs = runner.graphs, None
        try:
            row["eager"] = time_fn(run, device, warmup=_iters(device, 3, 2), iters=_iters(device, 10, 3))
        finally:
            runner.graphs = graphs
        step = row.get("graph", row["eager"])["median_ms"]
        row["step_ms"] = step
        row["bytes"] = decode_bytes(model, mcfg, b, args.context, kv)
        row["floor_ms"] = row["bytes"]["total"] / (bw["GBps"] * 1e9) * 1e3
        seen = measured_distinct_experts(runner, inp, mcfg.n_routed_experts)
        if seen is not None:  # the same floor with the experts the dummy router actually picked
            row["measured_distinct_experts"] = seen
            measured = decode_bytes(model, mcfg, b, args.context, kv, distinct_experts=seen)["total"]
            row["floor_ms_measured_routing"] = measured / (bw["GBps"] * 1e9) * 1e3
        row["ratio_vs_floor"] = step / row["floor_ms"]
        row["eager_ratio_vs_floor"] = row["eager"]["median_ms"] / row["floor_ms"]
        if "graph" in row:
            row["graph_speedup"] = row["eager"]["median_ms"] / row["graph"]["median_ms"]
        decode.append(row)
        results["decode"] = decode
        save()
        print(f"decode B={b}: {step:.3f} ms (floor {row['floor_ms']:.3f} ms)", flush=True)
        if args.profile and device.type == "cuda":
            _profile_step(f"decode B={b} (eager, kernels only)", runner, inp, results, f"profile_decode_b{b}", save)

    if args.prefill > 0:  # 0: decode steps only
        inp, shared = prefill_inputs(args.prefill, bs, worker.num_blocks, mcfg.vocab_size, rng, args.prefill_prefix)
        t = time_fn(
            functools.partial(runner.run, inp), device, warmup=_iters(device, 2, 1), iters=_iters(device, 5, 2)
        )
        eager_prefill = None
        with _without_prefill_graphs(runner) as pieces:  # the same prefill without the piecewise graphs, in this run
            if pieces is not None:
                eager_prefill = time_fn(functools.partial(runner.run, inp), device, warmup=_iters(device, 2, 1),
                                        iters=_iters(device, 5, 2))
        # an emulated rank computes 1/N of the FLOPs (heads, widths, or under EP its experts on average)
        flops = {k: v / args.emulate_tp for k, v in prefill_flops(mcfg, args.prefill, args.prefill_prefix).items()}
        lin_peak = peaks["fp8_tflops"] if fp8 and peaks.get("fp8_tflops") else peaks["mm_tflops"]
        floor_ms = (flops["linear"] / (lin_peak * 1e12) + flops["attention"] / (peaks["mm_tflops"] * 1e12)) * 1e3
        results["prefill"] = {
            "tokens": args.prefill,
            "prefix": args.prefill_prefix,
            "attention_backend": resolve_prefill_attention_backend(args.prefill_attention_backend, worker.device),
            "time": t,
            "ms": t["median_ms"],
            "flops": flops,
            "linear_peak_tflops": lin_peak,
            "attention_peak_tflops": peaks["mm_tflops"],
            "floor_ms": floor_ms,
            "ratio_vs_floor": t["median_ms"] / floor_ms,
            "kv_pages_shared": shared,
            "achieved_tflops": (flops["linear"] + flops["attention"]) / (t["median_ms"] * 1e-3) / 1e12,
            "piecewise_graphs": eager_prefill is not None,
        }
        if eager_prefill is not None:
            results["prefill"].update(eager_time=eager_prefill, eager_ms=eager_prefill["median_ms"],
                                      piecewise_speedup=eager_prefill["median_ms"] / t["median_ms"])
            print(f"prefill {args.prefill}: {eager_prefill['median_ms']:.2f} ms eager, {t['median_ms']:.2f} ms through "
                  f"the piecewise graphs ({eager_prefill['median_ms'] / t['median_ms']:.2f}x)", flush=True)
        save()
        print(f"prefill {args.prefill}: {t['median_ms']:.2f} ms (floor {floor_ms:.2f} ms, "
              f"{t['median_ms'] / floor_ms:.2f}x; {args.prefill_prefix} tokens cached before it, "
              f"{args.prefill_attention_backend} attention)", flush=True)
        if args.profile and device.type == "cuda":
            _profile_step(f"prefill {args.prefill}", runner, inp, results, "profile_prefill", save)
        if args.prompt_logprobs is not None:
            results["prompt_logprobs"] = _time_prompt_logprobs(runner, inp, args.prompt_logprobs, mcfg, peaks, device,
                                                               t["median_ms"])
            save()
        if args.mixed_decodes:
            dec, _ = decode_inputs(args.mixed_decodes, args.context, bs, worker.num_blocks, mcfg.vocab_size, rng)
            results["mixed"] = _time_mixed(runner, dec, mixed_inputs(dec, inp), device)
            save()
            m = results["mixed"]
            print(f"mixed step, {args.mixed_decodes} decodes + {args.prefill} prefill tokens: " + ", ".join(
                f"{k} {m[k]['median_ms']:.2f} ms" for k in ("decode_only", "eager", "piecewise") if k in m), flush=True)
        if args.mixed_decodes and args.mixed_varying:
            dec, _ = decode_inputs(args.mixed_decodes, args.context, bs, worker.num_blocks, mcfg.vocab_size, rng)
            lengths = [rng.randint(max(1, args.prefill // 2), args.prefill) for _ in range(args.mixed_varying)]
            steps = [mixed_inputs(dec, prefill_inputs(n, bs, worker.num_blocks, mcfg.vocab_size, rng)[0])
                     for n in lengths]
            results["mixed_varying"] = _time_mixed_varying(runner, steps, device)
            save()
            for name, r in results["mixed_varying"].items():
                print(f"mixed steps of {args.mixed_decodes} decodes + {min(lengths)}-{max(lengths)} prefill tokens, "
                      f"{name}: mean {r['mean_ms']:.2f} / p50 {r['p50_ms']:.2f} / max {r['max_ms']:.2f} ms; "
                      f"allocator {r['allocator']}", flush=True)
        if args.host_profile:
            dump = str(Path(args.out).with_suffix(".prof")) if args.out else None
            res = host_breakdown(functools.partial(runner.run, inp), dump=dump)
            results["host_profile_prefill"] = res
            save()
            print_host_breakdown(f"prefill {args.prefill}", res)
    del worker, runner, model, kv
    _free(device)
    if device.type == "cuda":
        results["main_model"]["memory_after_free_GiB"] = torch.cuda.memory_allocated(device) / 2**30
        save()


def _time_prompt_logprobs(runner, inp, top_k: int, mcfg, peaks: dict, device, plain_ms: float) -> dict:
    """The same prefill with every position scored (prompt_logprobs=top_k, as lm-eval's loglikelihood asks): the LM
    head over all rows, log-softmax, the target's logprob and rank, the top k, a slice of rows at a time
    (engine/logprobs.py). Against the plain prefill and the scoring's floor: the LM head's FLOPs at the bf16 peak."""
    scored = dataclasses.replace(inp, prompt=PromptRows(list(range(len(inp.input_ids) - 1)), inp.input_ids[1:], top_k))
    scores = runner.run(scored).prompt_scores
    rows = len(scored.prompt.rows)
    if scores is None or scores.target_logprob.shape[0] != rows or scores.top_ids.shape != (rows, top_k):
        raise RuntimeError(f"the scored prefill returned no or misshapen prompt scores for {rows} rows")
    t = time_fn(functools.partial(runner.run, scored), device, warmup=_iters(device, 2, 1),
                iters=_iters(device, 5, 2))
    floor_ms = 2 * rows * mcfg.vocab_size * mcfg.hidden_size / (peaks["mm_tflops"] * 1e12) * 1e3
    extra = t["median_ms"] - plain_ms
    print(f"prefill {len(inp.input_ids)} with prompt_logprobs={top_k}: {t['median_ms']:.2f} ms (+{extra:.2f} ms over "
          f"the plain prefill; LM head floor {floor_ms:.2f} ms for {rows} rows, {runner.prompt_slice_rows} per slice)",
          flush=True)
    return {"top_k": top_k, "rows": rows, "time": t, "ms": t["median_ms"], "extra_ms": extra,
            "lm_head_floor_ms": floor_ms, "slice_rows": runner.prompt_slice_rows,
            "mean_target_logprob": float(scores.target_logprob.float().mean())}


@contextlib.contextmanager
def _without_prefill_graphs(runner):
    """The runner's steps run eagerly inside; yields its piecewise prefill graphs (None: it has none)."""
    pieces, runner.prefill_graphs = runner.prefill_graphs, None
    try:
        yield pieces
    finally:
        runner.prefill_graphs = pieces


def _time_mixed_varying(runner, steps: list, device: torch.device) -> dict:
    """Mixed steps of a different chunk length each, as serving makes them: each step timed alone (host prep to
    the device's finish), eager, then through the piecewise graphs, then eager again (the allocator's cache warm
    from the first pass), with the allocator's slow-path events of each pass."""
    passes = [("eager", False), ("piecewise", True), ("eager_again", False)]
    out: dict[str, dict] = {}
    for name, graphs in passes:
        if graphs and runner.prefill_graphs is None:
            continue
        with _without_prefill_graphs(runner) as pieces:
            runner.prefill_graphs = pieces if graphs else None
            before = allocator_events(device)
            times = []
            for inp in steps:
                _sync(device)
                t0 = time.perf_counter()
                runner.run(inp)
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            after = allocator_events(device)
        out[name] = {"mean_ms": statistics.fmean(times), "p50_ms": statistics.median(times),
                     "max_ms": max(times), "steps": len(times),
                     "allocator": {k: after[k] - before[k] for k in after}}
    return out


def _time_mixed(runner, decode, mixed, device: torch.device) -> dict:
    """A decode's step time alone (its CUDA graph where captured) and in a step that also prefills a chunk: eager,
    and through the piecewise prefill graphs where the engine has them (the inter-token latency a decode sees
    when a prompt chunk joins its step)."""
    timed = functools.partial(time_fn, device=device, warmup=_iters(device, 2, 1), iters=_iters(device, 5, 2))
    out = {"decode_only": timed(functools.partial(runner.run, decode))}
    with _without_prefill_graphs(runner) as pieces:
        out["eager"] = timed(functools.partial(runner.run, mixed))
    if pieces is not None:
        out["piecewise"] = timed(functools.partial(runner.run, mixed))
    return out


def overlap_flag() -> str | None:
    """The LLM(...) keyword that turns overlap scheduling on/off, if the engine has one."""
    from engine.config import engine_options

    names = [opt.name for opt in engine_options() if "overlap" in opt.name]
    return names[0] if names else None


def _close_llm(llm, device: torch.device) -> None:
    llm.shutdown()
    atexit.unregister(llm.shutdown)  # the registration holds the LLM (and its GPU memory) alive
    llm.engine = None
    _free(device)


def run_ours_generate(
    args, model_dir: Path, device: torch.device, prompts: list[list[int]], extra: dict[str, Any] | None = None
) -> dict:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    bs = args.block_size
    total = args.gen_input + args.gen_output
    max_model_len = -(-(total + 1) // bs) * bs
    blocks = len(prompts) * -(-max_model_len // bs) + 2
    t0 = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        device=device.type,
        load_format="dummy",
        seed=args.seed,
        max_model_len=max_model_len,
        max_num_seqs=len(prompts),
        num_kv_blocks=blocks,
        kv_block_size=bs,
        enable_prefix_caching=False,
        kv_cache_dtype=args.kv_cache_dtype,
        enforce_eager=args.enforce_eager,
        **(extra or {}),
    )
    startup = time.perf_counter() - t0
    try:
        reqs = [{"prompt_token_ids": p} for p in prompts]
        warm = SamplingParams(
            temperature=0.0, max_tokens=min(4, args.gen_output), ignore_eos=True, detokenize=False
        )
        llm.generate(reqs, warm, use_tqdm=False)
        sp = SamplingParams(temperature=0.0, max_tokens=args.gen_output, ignore_eos=True, detokenize=False)
        _sync(device)
        t0 = time.perf_counter()
        outs = llm.generate(reqs, sp, use_tqdm=False)
        _sync(device)
        dt = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    finally:
        _close_llm(llm, device)
    expected = len(prompts) * args.gen_output
    if n_out != expected:
        raise RuntimeError(f"generate produced {n_out} tokens, expected {expected} (ignore_eos)")
    return {
        "seconds": dt,
        "output_tokens": n_out,
        "output_tok_per_s": n_out / dt,
        "total_tok_per_s": (n_out + len(prompts) * args.gen_input) / dt,
        "startup_s": startup,
    }


def _dequantized(src, names: set[str], name: str, device: torch.device) -> torch.Tensor:
    from kernels.quant import FP8_DTYPE, dequant_fp8_per_block, dequant_fp8_per_channel

    w = src.read(name, None, None, device)
    if w.dtype != FP8_DTYPE:
        return w.float()
    module = name.removesuffix(".weight")
    if module + ".weight_scale" in names:
        return dequant_fp8_per_channel(
            w, src.read(module + ".weight_scale", None, None, device), torch.float32
        )
    return dequant_fp8_per_block(w, src.read(module + ".weight_scale_inv", None, None, device), torch.float32)


@torch.no_grad()
def build_hf_model(model_dir: Path, device: torch.device, dtype: torch.dtype, seed: int, attn: str):
    """HF transformers' Glm4MoeForCausalLM holding the engine's dummy weights (DummySource, same seed),
    dequantized to `dtype`."""
    from transformers import AutoConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeForCausalLM as HFGlm4Moe

    from model.config import load_model_config
    from model.dummy import DummySource
    from model.weight_map import checkpoint_schema

    cfg = load_model_config(model_dir)
    hf_cfg = AutoConfig.from_pretrained(model_dir)
    if hasattr(hf_cfg, "quantization_config"):
        del hf_cfg.quantization_config
    hf_cfg._attn_implementation = attn
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = HFGlm4Moe(hf_cfg)
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    src = DummySource(cfg, seed)
    names = set(src.names())
    schema = checkpoint_schema(cfg, include_mtp=False)
    covered: set[str] = set()
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for hf_name, t in tensors.items():
        if hf_name in schema:
            t.copy_(_dequantized(src, names, hf_name, device).view(t.shape))
            covered.add(hf_name)
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", hf_name)
        if not m:
            continue
        for e in range(t.shape[0]):
            p = f"model.layers.{m.group(1)}.mlp.experts.{e}"
            parts = ["gate_proj", "up_proj"] if m.group(2) == "gate_up_proj" else ["down_proj"]
            w = torch.cat([_dequantized(src, names, f"{p}.{x}.weight", device) for x in parts])
            t[e].copy_(w if t[e].shape == w.shape else w.t())
            covered.update(f"{p}.{x}.weight" for x in parts)
    missing = sorted(set(schema) - covered)
    if missing:
        raise RuntimeError(
            f"HF model left checkpoint tensors unfilled: {missing[:5]} ({len(missing)} in all)"
        )
    return model


@torch.no_grad()
def run_hf_generate(
    args, model_dir: Path, device: torch.device, dtype: torch.dtype, prompts: list[list[int]]
) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    model = build_hf_model(model_dir, device, dtype, args.seed, args.hf_attn)
    startup = time.perf_counter() - t0
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)

    gen = functools.partial(
        model.generate, ids, attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    try:
        n = min(2, args.gen_output)
        gen(max_new_tokens=n, min_new_tokens=n)
        _sync(device)
        t0 = time.perf_counter()
        out = gen(max_new_tokens=args.gen_output, min_new_tokens=args.gen_output)
        _sync(device)
        dt = time.perf_counter() - t0
        n_out = (out.shape[1] - ids.shape[1]) * out.shape[0]
    finally:
        del gen, model
        _free(device)
    return {
        "seconds": dt,
        "output_tokens": int(n_out),
        "output_tok_per_s": n_out / dt,
        "total_tok_per_s": (n_out + ids.numel()) / dt,
        "startup_s": startup,
        "attn_implementation": args.hf_attn,
    }


def run_generate_benchmarks(args, device: torch.device, overrides: dict, results: dict, save) -> None:
    from engine.config import EngineConfig

    model_dir = real_shape_model_dir(args.hf_layers, args.hf_dense_layers, args.model_root, overrides)
    vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    rng = random.Random(args.seed + 1)
    prompts = [[rng.randrange(vocab) for _ in range(args.gen_input)] for _ in range(args.gen_prompts)]
    gen: dict[str, Any] = {
        "model": str(model_dir),
        "layers": args.hf_layers,
        "dense_layers": min(3, args.hf_dense_layers, args.hf_layers),
        "prompts": args.gen_prompts,
        "input_len": args.gen_input,
        "output_len": args.gen_output,
    }
    results["generate"] = gen
    flag = overlap_flag()
    if flag is None:
        gen["ours"] = run_ours_generate(args, model_dir, device, prompts)
        results["overlap"] = {"implemented": False}
    else:
        on = not flag.startswith("disable")
        gen["ours"] = run_ours_generate(args, model_dir, device, prompts, {flag: on})
        save()
        off = run_ours_generate(args, model_dir, device, prompts, {flag: not on})
        results["overlap"] = {
            "implemented": True,
            "flag": flag,
            "on": gen["ours"],
            "off": off,
            "speedup": gen["ours"]["output_tok_per_s"] / off["output_tok_per_s"],
        }
    save()
    print(f"generate ours: {gen['ours']['output_tok_per_s']:.1f} output tok/s", flush=True)
    if args.no_hf:
        return
    dtype = EngineConfig.create(model=str(model_dir), device=device.type).torch_dtype
    gen["hf"] = run_hf_generate(args, model_dir, device, dtype, prompts)
    gen["hf"]["dtype"] = str(dtype).removeprefix("torch.")
    gen["ours_vs_hf"] = gen["ours"]["output_tok_per_s"] / gen["hf"]["output_tok_per_s"]
    save()
    print(f"generate HF: {gen['hf']['output_tok_per_s']:.1f} output tok/s", flush=True)


# ------------------------------------------------------------------------------------------------ report


def _fmt(x: float | None, unit: str = "", digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}{unit}"


def summary_rows(results: dict) -> list[dict]:
    """One row per compared quantity: ours, reference, ratio, target."""
    rows = []
    for d in results.get("decode", []):
        b = d["batch"]
        target = {1: TARGETS["decode_b1_vs_floor"], 64: TARGETS["decode_b64_vs_floor"]}.get(b)
        kind = "graphs" if "graph" in d else "eager"
        rows.append(
            {
                "name": f"decode B={b} ctx={d['context']} ({kind}) vs HBM floor",
                "ours": d["step_ms"],
                "ref": d["floor_ms"],
                "unit": "ms",
                "ratio": d["ratio_vs_floor"],
                "target": target,
                "better": "lower",
            }
        )
        if "graph" in d:
            rows.append(
                {
                    "name": f"decode B={b} eager vs graphs (speedup)",
                    "ours": d["eager"]["median_ms"],
                    "ref": d["graph"]["median_ms"],
                    "unit": "ms",
                    "ratio": d["graph_speedup"],
                    "target": TARGETS["graphs_speedup_b1"] if b == 1 else None,
                    "better": "higher",
                }
            )
    p = results.get("prefill")
    if p:
        rows.append(
            {
                "name": f"prefill {p['tokens']} tokens vs compute floor",
                "ours": p["ms"],
                "ref": p["floor_ms"],
                "unit": "ms",
                "ratio": p["ratio_vs_floor"],
                "target": TARGETS["prefill_vs_floor"],
                "better": "lower",
            }
        )
    g = results.get("generate", {})
    if "ours" in g and "hf" in g:
        rows.append(
            {
                "name": f"generate {g['prompts']}x{g['input_len']}/{g['output_len']} ours vs HF (tok/s)",
                "ours": g["ours"]["output_tok_per_s"],
                "ref": g["hf"]["output_tok_per_s"],
                "unit": "tok/s",
                "ratio": g["ours_vs_hf"],
                "target": None,
                "better": "higher",
            }
        )
    o = results.get("overlap")
    if o and o.get("implemented") and "on" in o:
        rows.append(
            {
                "name": "generate overlap on vs off (tok/s)",
                "ours": o["on"]["output_tok_per_s"],
                "ref": o["off"]["output_tok_per_s"],
                "unit": "tok/s",
                "ratio": o["speedup"],
                "target": None,
                "better": "higher",
            }
        )
    for r in rows:
        t = r["target"]
        r["met"] = None if t is None else (r["ratio"] <= t if r["better"] == "lower" else r["ratio"] >= t)
    return rows


def print_report(results: dict) -> None:
    hw = results.get("hardware", {})
    bw, pk = hw.get("bandwidth", {}), hw.get("peaks", {})
    print()
    print(
        f"device: {results['env'].get('device_name')}  |  measured: copy bandwidth {_fmt(bw.get('GBps'), ' GB/s')}, "
        f"{pk.get('model_dtype')} mm {_fmt(pk.get('mm_tflops'), ' TFLOP/s')}, "
        f"FP8 _scaled_mm {_fmt(pk.get('fp8_tflops'), ' TFLOP/s')} ({pk.get('fp8_scaling')})"
    )
    mm = results.get("main_model")
    if mm:
        print(
            f"model: {mm['layers']} layers ({mm['dense_layers']} dense), fp8 weights {mm['fp8_weights']}, "
            f"KV {mm['kv_cache_dtype']}, {mm['kv_capacity_tokens']} KV tokens, CUDA graphs {mm['cuda_graphs']}, "
            f"shared-expert fusion {mm.get('shared_experts_fusion', False)}, "
            f"fused QK-norm/RoPE {mm.get('fused_qk_norm_rope', False)}"
        )
    header = f"{'quantity':58s} {'ours':>12s} {'floor/base':>12s} {'ratio':>8s} {'target':>8s}  met"
    print(header)
    print("-" * len(header))
    for r in summary_rows(results):
        t = r["target"]
        tgt = "-" if t is None else (f"<={t:g}x" if r["better"] == "lower" else f">={t:g}x")
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        print(
            f"{r['name']:58s} {_fmt(r['ours']):>12s} {_fmt(r['ref']):>12s} "
            f"{r['ratio']:>7.2f}x {tgt:>8s}  {met}   [{r['unit']}]"
        )
    for d in results.get("decode", []):
        if "measured_distinct_experts" in d:
            print(
                f"routing B={d['batch']}: {d['measured_distinct_experts']:.1f} distinct experts per MoE layer "
                f"(uniform {d['bytes']['expected_distinct_experts']:.1f}); floor with them "
                f"{_fmt(d['floor_ms_measured_routing'])} ms"
            )
        if d.get("kv_pages_shared"):
            print(f"note: decode B={d['batch']} reused KV pages (pool too small for distinct pages)")
    o = results.get("overlap")
    if o is not None and not o.get("implemented"):
        print("overlap: not implemented (LLM(...) has no overlap flag yet)")
    print(flush=True)


# ------------------------------------------------------------------------------------------------ main


def _profile_step(title: str, runner, inp, results: dict, key: str, save) -> None:
    """Per-kernel breakdown of one eager step (graphs off: the profiler sees each kernel)."""
    from bench.kernel_profile import kernel_breakdown, print_breakdown

    graphs, runner.graphs = runner.graphs, None
    try:
        rows = kernel_breakdown(functools.partial(runner.run, inp))
    finally:
        runner.graphs = graphs
    results[key] = rows[:40]
    save()
    print_breakdown(title, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--layers", type=int, default=15, help="layers of the main model (dense + MoE)")
    ap.add_argument("--dense-layers", type=int, default=3, help="dense layers first (at most 3)")
    ap.add_argument("--batches", default="1,8,64", help="decode batch sizes, comma separated")
    ap.add_argument("--context", type=int, default=4096, help="tokens already in each decode sequence's KV")
    ap.add_argument("--prefill", type=int, default=4096, help="prefill length (one sequence; 0: decode steps only)")
    ap.add_argument("--prefill-prefix", type=int, default=0,
                    help="tokens already cached before the prefill (a prefix hit, or the chunks before this one)")
    ap.add_argument("--prefill-attention-backend", default="auto", choices=list(PREFILL_ATTENTION_BACKENDS))
    ap.add_argument("--prompt-logprobs", type=int, default=None, metavar="K",
                    help="also time the prefill with every position scored (prompt_logprobs=K)")
    ap.add_argument("--fa4-gather-min-pairs", type=int, default=None,
                    help="FA4's packed-K/V rule (kernels/fa4_prefill.py GATHER_MIN_PAIRS); 1e9: always the pages")
    ap.add_argument("--fa4-paged-prompts", action="store_true",
                    help="a prompt alone reads the pages too (kernels/fa4_prefill.py FRESH_PROMPTS off, as before)")
    ap.add_argument(
        "--hf-layers", type=int, default=3, help="layers of the generate/HF model; 0 skips generate"
    )
    ap.add_argument("--hf-dense-layers", type=int, default=1, help="dense layers of the generate/HF model")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    ap.add_argument("--gen-prompts", type=int, default=16)
    ap.add_argument("--gen-input", type=int, default=128)
    ap.add_argument("--gen-output", type=int, default=64)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3"])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-kv-blocks", type=int, default=None, help="default: sized from memory (CUDA)")
    ap.add_argument("--mem-fraction-static", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--mixed-decodes", type=int, default=0,
                    help="also time a mixed step: this many decodes (at --context) + the prefill chunk, eager and "
                         "through the piecewise graphs, against the decodes alone")
    ap.add_argument("--mixed-varying", type=int, default=0,
                    help="with --mixed-decodes: also this many mixed steps of chunk lengths drawn from "
                         "[prefill/2, prefill] (a new shape each, as in serving), each timed, eager / piecewise graphs "
                         "/ eager again, with the CUDA allocator's cudaMalloc / cudaFree / retry counts of each pass")
    ap.add_argument("--piecewise-cuda-graph-max-tokens", type=int, default=None,
                    help="prefill steps of up to this many tokens replay piecewise graphs (default: the engine's; "
                         "the prefill is also timed without them, same run; 0 = none)")
    ap.add_argument("--profile", action="store_true", help="print a per-kernel breakdown of each step (GPU)")
    ap.add_argument("--host-profile", action="store_true",
                    help="the prefill's host enqueue time against its finish, and where the host time goes (cProfile)")
    ap.add_argument("--enable-shared-experts-fusion", action="store_true", help="shared expert as expert E")
    ap.add_argument("--emulate-tp", type=int, default=1,
                    help="build and time rank 0 of a TP group of this size alone (its heads, widths or experts; no "
                         "collectives, floors per rank); with --enable-expert-parallel the MoE layers split experts")
    ap.add_argument("--enable-expert-parallel", action="store_true",
                    help="MoE experts split across the (emulated) ranks whole, not sliced")
    ap.add_argument("--enable-fused-qk-norm-rope", action="store_true", help="QK-norm + RoPE + KV store fused")
    ap.add_argument("--seed", type=int, default=0)
    for flag, key in _WIDTH_FLAGS.items():
        ap.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None, help=f"override {key}")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config.json key")
    ap.add_argument(
        "--model-root",
        default=None,
        help="parent of the generated model folders (default $GLINT_CACHE_DIR/real-shape)",
    )
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not args.batches or min(args.batches) < 1:
        ap.error("--batches needs positive batch sizes")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    overrides = parse_overrides(args.set)
    if args.fa4_gather_min_pairs is not None:  # this process's engine reads it per step
        fa4_prefill.GATHER_MIN_PAIRS = args.fa4_gather_min_pairs
    if args.fa4_paged_prompts:
        fa4_prefill.FRESH_PROMPTS = False
    for flag, key in _WIDTH_FLAGS.items():
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": {k: v for k, v in vars(args).items()},
        "config_overrides": overrides,
        "targets": TARGETS,
        "env": {
            "device": device.type,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "git_commit": _git_commit(),
        },
    }
    out = Path(args.out) if args.out else None

    def save() -> None:
        if out is not None:
            results["summary"] = summary_rows(results)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(
                json.dumps(_finite(results), indent=2, default=_json_default, allow_nan=False) + "\n"
            )

    from engine.config import EngineConfig

    model_dir = real_shape_model_dir(args.layers, args.dense_layers, args.model_root, overrides)
    model_dtype = EngineConfig.create(model=str(model_dir), device=device.type).torch_dtype
    results["hardware"] = {"bandwidth": measure_bandwidth(device)}
    results["hardware"]["peaks"] = measure_peaks(device, model_dtype)
    save()
    run_step_benchmarks(
        args, model_dir, device, results["hardware"]["peaks"], results["hardware"]["bandwidth"], results, save
    )
    if args.hf_layers > 0:
        run_generate_benchmarks(args, device, overrides, results, save)
    else:
        results["overlap"] = {"implemented": overlap_flag() is not None, "skipped": True}
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    print_report(results)
    return 0


def _finite(x: Any) -> Any:
    """NaN / inf -> None (JSON has no such numbers)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def _git_commit() -> str | None:
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (head.parent / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())

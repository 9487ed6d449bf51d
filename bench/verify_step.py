"""Speculative verify steps against plain decode steps of the same token count, in one run.

A verify step of B requests x (1 + k) rows reads the weights a decode step of B(1 + k) sequences reads (the MoE
touches the experts of as many tokens) but the KV of only B sequences. Target (issue #15): a verify step of
B x 4 costs <= 1.1x a plain decode step of 4B sequences at the same context, for B = 1, 4, 16, on the
real-width model with dummy weights; CUDA-graph and eager verify pick the same tokens.

    python -m bench.verify_step --layers 27 --batches 1,4,16 --drafts 3 --context 4096 \
        --kv-cache-dtype fp8_e4m3 --enable-fused-qk-norm-rope --enable-shared-experts-fusion
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch

from bench.engine import decode_bytes, decode_inputs, measure_bandwidth, time_fn
from bench.real_shape import real_shape_model_dir
from engine.block_tables import BlockTables
from engine.config import EngineConfig
from engine.distributed import single_process
from engine.model_runner import StepInputs
from engine.model_worker import ModelWorker

TARGET = 1.1


def verify_inputs(batch: int, rows: int, context: int, block_size: int, num_blocks: int, vocab: int,
                  rng: random.Random) -> StepInputs:
    """`batch` sequences with `context` tokens in their KV pages, each verifying a chain of `rows` tokens."""
    per = -(-(context + rows) // block_size)
    usable = num_blocks - 1
    tables = [[1 + (i * per + j) % usable for j in range(per)] for i in range(batch)]
    positions = [context + j for _ in range(batch) for j in range(rows)]
    slots = [tables[i][p // block_size] * block_size + p % block_size
             for i in range(batch) for p in range(context, context + rows)]
    return StepInputs(
        input_ids=[rng.randrange(vocab) for _ in range(batch * rows)], positions=positions, slot_mapping=slots,
        block_tables=BlockTables.build(tables), seq_lens=[context + rows] * batch,
        query_start_loc=list(range(0, (batch + 1) * rows, rows)), logits_rows=list(range(batch * rows)),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.verify_step", description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--dense-layers", type=int, default=3)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--drafts", type=int, default=3, help="draft tokens per request (rows = drafts + 1)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3"])
    ap.add_argument("--enable-fused-qk-norm-rope", action="store_true")
    ap.add_argument("--enable-shared-experts-fusion", action="store_true")
    ap.add_argument("--mem-fraction-static", type=float, default=0.9)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = args.drafts + 1
    bs = 16
    model_dir = real_shape_model_dir(args.layers, args.dense_layers, None, {}) if device.type == "cuda" else \
        real_shape_model_dir(2, 1, None, {"hidden_size": 256, "moe_intermediate_size": 64,
                                          "intermediate_size": 512, "n_routed_experts": 16,
                                          "num_attention_heads": 4, "num_key_value_heads": 2})
    max_len = -(-(args.context + rows + 1) // bs) * bs
    cfg = EngineConfig.create(
        model=str(model_dir), device=device.type, load_format="dummy", max_model_len=max_len,
        max_num_seqs=rows * max(batches), max_num_batched_tokens=max(4096, rows * max(batches)),
        kv_block_size=bs, enable_prefix_caching=False, kv_cache_dtype=args.kv_cache_dtype,
        mem_fraction_static=args.mem_fraction_static,
        num_kv_blocks=None if device.type == "cuda" else 1 + rows * max(batches) * (max_len // bs),
        enable_fused_qk_norm_rope=args.enable_fused_qk_norm_rope,
        enable_shared_experts_fusion=args.enable_shared_experts_fusion,
        speculative_config={"method": "suffix", "num_speculative_tokens": args.drafts},
    )
    worker = ModelWorker(cfg, single_process())
    runner, mcfg = worker.runner, cfg.model
    bw = measure_bandwidth(device)["GBps"] * 1e9
    rng = random.Random(0)
    iters = 30 if device.type == "cuda" else 2
    results: list[dict[str, Any]] = []
    print(f"{'B':>4} {'rows':>4} | {'verify ms':>9} {'floor ms':>8} {'x floor':>7} | {'decode(B*rows) ms':>17} "
          f"{'floor ms':>8} | {'verify/decode':>13} {'target':>6} | {'eager==graph':>12}")
    for b in batches:
        vin = verify_inputs(b, rows, args.context, bs, worker.num_blocks, mcfg.vocab_size, rng)
        din, _ = decode_inputs(b * rows, args.context, bs, worker.num_blocks, mcfg.vocab_size, rng)
        v = time_fn(lambda: runner.run(vin), device, warmup=3, iters=iters)
        d = time_fn(lambda: runner.run(din), device, warmup=3, iters=iters)
        graph_tokens = runner.run(vin).logits.argmax(-1)
        graphs, runner.graphs = runner.graphs, None
        try:
            eager_tokens = runner.run(vin).logits.argmax(-1)
        finally:
            runner.graphs = graphs
        same = bool(torch.equal(graph_tokens, eager_tokens))
        wb = decode_bytes(runner.model, mcfg, b * rows, args.context, runner.kv_caches)
        v_floor = (wb["weights_total"] + wb["kv_read"] * (args.context + rows) / (rows * args.context)) / bw * 1e3
        d_floor = wb["total"] / bw * 1e3
        ratio = v["median_ms"] / d["median_ms"]
        row = dict(batch=b, rows=rows, verify_ms=v["median_ms"], verify_floor_ms=v_floor,
                   decode_ms=d["median_ms"], decode_floor_ms=d_floor, ratio=ratio, eager_equals_graph=same,
                   graphs=graphs is not None)
        results.append(row)
        print(f"{b:>4} {rows:>4} | {v['median_ms']:>9.3f} {v_floor:>8.3f} {v['median_ms'] / v_floor:>7.2f} | "
              f"{d['median_ms']:>17.3f} {d_floor:>8.3f} | {ratio:>13.3f} {'<=' + str(TARGET):>6} | {str(same):>12}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

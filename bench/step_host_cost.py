"""Host cost of a decode step's block tables, by context length: the page lists each step ships to the device and,
under TP, to every rank through the control plane (engine/distributed.broadcast_object pickles the StepInputs).

    python -m bench.step_host_cost [--batch 64] [--contexts 4096,34000,100000] [--block-size 16] [--reps 20]

Per context, in one run (ms a step, median of --reps):
  lists       the tables as padded lists of Python ints (what StepInputs carried before session 33): building them,
              a pickle round trip (what a TP rank receives), torch.tensor of the nested lists (the CUDA-graph
              decode path; eager steps flattened them through a C array first)
  arrays      BlockTables.build over the requests' int32 page arrays, the pickle round trip, the tensor view
  prepare     the whole prepare_step of the decode step (ids, positions, slots, tables) with the arrays
Against the GPU side: the KV one decode step reads for those pages at the TP8 shard of GLM-4.7 (1 KV head of 128,
FP8, 92 layers), at --hbm-tbps. CPU only; no model.

    python -m bench.step_host_cost --engine [--batch 32] [--contexts 4096,34000]

--engine: the whole EngineCore.step() of decode steps (the tiny checkpoint, overlap scheduling on as on CUDA), the
worker's forward replaced by what the runner does on the host before the model (`build_context`: the step's lists
to tensors) and, for the "TP" column, the pickle round trip every step's inputs take to the other ranks; `--batch`
requests whose prompts are `context` tokens long, median step time over 64 decode steps.
"""
from __future__ import annotations

import argparse
import pickle
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from engine import LLM
from engine.block_tables import BlockTables, page_array, table_width
from engine.model_runner import StepOutput, prepare_step
from engine.request import Request, Status
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRequest
from model.tiny import write_tiny_checkpoint


def _ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _decoding(batch: int, context: int, block_size: int) -> list[ScheduledRequest]:
    """`batch` requests of `context` known tokens, each decoding its next one (pages spread over the pool)."""
    pages = -(-(context + 1) // block_size)
    out = []
    for i in range(batch):
        req = Request(f"r{i}", 0, [7] * context, SamplingParams(max_tokens=8), 8)
        req.status = Status.RUNNING
        req.block_ids = page_array(range(i * pages, (i + 1) * pages))
        req.num_computed_tokens = context - 1
        out.append(ScheduledRequest(req, context - 1, 1))
    return out


def lists_path(page_lists: list[list[int]]) -> torch.Tensor:
    width = table_width(max(len(t) for t in page_lists))
    tables = [t + [0] * (width - len(t)) for t in page_lists]
    return torch.tensor(pickle.loads(pickle.dumps(tables)), dtype=torch.int32)


def arrays_path(page_arrays: list) -> torch.Tensor:
    return pickle.loads(pickle.dumps(BlockTables.build(page_arrays))).tensor()


def engine_step_ms(model: str, batch: int, context: int, tp: bool, steps: int = 64) -> float:
    """Median EngineCore.step() time of decode steps, the forward stubbed (see --engine)."""
    llm = LLM(model, device="cpu", max_model_len=context + steps + 16, max_num_seqs=batch, overlap_scheduling=True,
              kernel_warmup=False, num_kv_blocks=batch * (-(-(context + steps + 16) // 16)) + 8,
              max_num_batched_tokens=max(2048, context))
    eng = llm.engine
    vocab = eng.config.model.vocab_size

    def forward(inp: Any, prev_tokens: Any = None) -> StepOutput:
        if tp:  # what broadcast_object does to reach the other ranks, and what they do with it
            inp = pickle.loads(pickle.dumps(inp))
        eng.worker.runner.build_context(inp)
        logits = torch.zeros(len(inp.logits_rows), vocab)
        logits[:, 11] = 1.0
        return StepOutput(logits, None)

    eng.worker.execute = forward
    sp = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"r{i}", [(i * 31 + j) % 900 + 10 for j in range(context)], sp)
    times = []
    while eng.has_unfinished_requests():
        decoding = not eng.scheduler.waiting and all(r.num_computed_tokens >= context for r in eng.scheduler.running)
        t0 = time.perf_counter()
        eng.step()
        if decoding:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--contexts", default="4096,34000,100000")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--hbm-tbps", type=float, default=4.8, help="HBM bandwidth for the KV-read column (H200: 4.8)")
    ap.add_argument("--engine", action="store_true", help="time EngineCore.step() instead (see the module doc)")
    args = ap.parse_args()
    if args.engine:
        model = "/tmp/glint-tiny-step-host-cost"
        write_tiny_checkpoint(model, fmt="bf16")
        for context in (int(c) for c in args.contexts.split(",")):
            one, tp = (engine_step_ms(model, args.batch, context, tp) for tp in (False, True))
            print(f"engine step, {args.batch} requests decoding at {context} tokens: {one:.2f} ms (TP1), {tp:.2f} ms "
                  "(TP: + the inputs' pickle round trip), medians", flush=True)
        return
    print(f"batch {args.batch}, {args.block_size}-token pages; ms per decode step (median of {args.reps})")
    print(f"{'context':>8} {'pages':>8} {'lists':>8} {'arrays':>8} {'speedup':>8} {'prepare':>8} {'TP8 KV read':>12}")
    for context in (int(c) for c in args.contexts.split(",")):
        batch = _decoding(args.batch, context, args.block_size)
        arrays = [s.request.block_ids for s in batch]
        lists = [list(a) for a in arrays]
        assert torch.equal(lists_path(lists), arrays_path(arrays))  # the same table either way
        old = _ms(lambda: lists_path(lists), args.reps)
        new = _ms(lambda: arrays_path(arrays), args.reps)
        prep = _ms(lambda: prepare_step(batch, args.block_size), args.reps)
        kv_bytes = args.batch * (context + 1) * 92 * 2 * 128  # K and V, one head, FP8, 92 layers
        gpu = kv_bytes / (args.hbm_tbps * 1e12) * 1e3
        pages = sum(len(a) for a in arrays)
        print(f"{context:>8} {pages:>8} {old:>8.2f} {new:>8.2f} {old / new:>7.1f}x {prep:>8.2f} {gpu:>12.2f}",
              flush=True)


if __name__ == "__main__":
    main()

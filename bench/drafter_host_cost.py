"""Host cost of one engine step per speculative method, with the model forward stubbed out (CPU).

    python -m bench.drafter_host_cost [--model DIR] [--methods none,mtp,suffix,hybrid] [--requests 8]
                                      [--output-len 400] [--rounds 3]

On the small trained model a decode step is host-bound (~0.4 ms on the H200 machine), so whatever a drafter adds
to every step shows up in TPOT: the session-16 table measured MTP +7.7% over none at batch 1 with nearly every
request retired from MTP, and hybrid 2-5% over suffix. Here the worker's forward returns random logits at once
(tokens that never repeat: suffix decoding finds nothing to draft, as on plain code), overlap scheduling is on as on
CUDA, and MTP / hybrid requests are retired from MTP at admission, so what is timed is each method's bookkeeping on
a plain step. Requests run one at a time (--batch 1) or that many together; methods alternate per round. Prints the median and the mean
(slowest 1% left out) step() time per method and their differences from none (mtp) or suffix (hybrid).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import torch

from engine import LLM, SamplingParams
from engine.model_runner import StepOutput
from model.tiny import write_tiny_checkpoint

SPEC: dict[str, dict[str, Any] | None] = {
    "none": None,
    "mtp": {"method": "mtp", "num_speculative_tokens": 3},
    "suffix": {"method": "suffix", "num_speculative_tokens": 16},
    "hybrid": {"method": "hybrid", "num_speculative_tokens": 16, "num_mtp_tokens": 3},
}
BASELINE = {"mtp": "none", "hybrid": "suffix"}


def build(model: str, method: str, seed: int) -> LLM:
    llm = LLM(model, device="cpu", max_model_len=2048, speculative_config=SPEC[method], overlap_scheduling=True,
              kernel_warmup=False)
    vocab = llm.engine.config.model.vocab_size
    rng = random.Random(seed)

    def forward(inp: Any, prev_tokens: Any = None) -> StepOutput:
        logits = torch.zeros(len(inp.logits_rows), vocab)
        for i in range(len(inp.logits_rows)):
            logits[i, rng.randrange(10, vocab - 10)] = 1.0
        return StepOutput(logits, None)

    llm.engine.worker.execute = forward  # the forward stubbed: only the engine's own work is timed
    return llm


def run(llm: LLM, method: str, tag: str, requests: int, output_len: int, batch: int = 1) -> list[float]:
    """Step times (s) of `requests` requests, `batch` at a time."""
    eng = llm.engine
    mtp = {"mtp": eng.drafter, "hybrid": getattr(eng.drafter, "mtp", None)}.get(method)
    sp = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    times = []
    for first in range(0, requests, batch):
        for i in range(first, min(first + batch, requests)):
            eng.add_request(f"{tag}-{i}", [(i * 31 + j) % 900 + 10 for j in range(64)], sp)
        if mtp is not None:  # retired at admission, as the budget retires them on plain code
            for req in eng.scheduler.waiting:
                mtp.retire(req.seq_key)
        while eng.has_unfinished_requests():
            t = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a checkpoint with an MTP layer (default: the tiny one)")
    ap.add_argument("--methods", default="none,mtp,suffix,hybrid")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="requests decoding together")
    args = ap.parse_args()
    model = args.model
    if model is None:
        model = "/tmp/glint-tiny-host-cost"
        write_tiny_checkpoint(model, fmt="bf16")
    methods = args.methods.split(",")
    engines = {m: build(model, m, seed=k) for k, m in enumerate(methods)}
    for m, llm in engines.items():  # warm-up: first-call costs outside the timing
        run(llm, m, "warmup", 1, 32)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for m in methods[r % len(methods):] + methods[: r % len(methods)]:
            times[m] += run(engines[m], m, f"r{r}", args.requests, args.output_len, args.batch)
    med = {m: 1e6 * statistics.median(t) for m, t in times.items()}
    # mean without the slowest 1% (a collector pause, the OS): the drafting steps count here, the median misses them
    mean = {m: 1e6 * statistics.fmean(sorted(t)[: int(0.99 * len(t))]) for m, t in times.items()}
    for m in methods:
        base = BASELINE.get(m)
        vs = f"  {med[m] - med[base]:+6.1f} / {mean[m] - mean[base]:+6.1f} us vs {base}" if base in med else ""
        print(f"{m:<7} step median {med[m]:7.1f} us, mean {mean[m]:7.1f} us over {len(times[m])} steps{vs}")


if __name__ == "__main__":
    main()

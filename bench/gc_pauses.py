"""What a garbage collection of the oldest generation costs a loaded engine, with and without the start-up freeze
(engine/gc_control.py; the server's engine process freezes).

    python -m bench.gc_pauses [--model DIR] [--device cpu|cuda] [--requests 256] [--repeat 5]

In one process: build the engine, serve a batch of requests (so that serving's own objects exist), time forced
full collections (the stop-the-world pause a natural one costs), then freeze the heap, serve again and time
them again. Also reports how many full collections the serving runs triggered on their own. Without --model it
writes the tiny checkpoint (model/tiny.py).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

from engine.gc_control import GcPauses, freeze_startup_heap
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from model.tiny import write_tiny_checkpoint


def full_collection_ms(repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        gc.collect()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def serve(llm: LLM, requests: int) -> tuple[float, int]:
    """(seconds, natural full collections) for `requests` prompts of 64-96 tokens, 32 new tokens each."""
    prompts = [{"prompt_token_ids": [10 + (i * 7 + j) % 900 for j in range(64 + i % 32)]} for i in range(requests)]
    pauses = GcPauses()
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    took = time.perf_counter() - start
    pauses.close()
    return took, pauses.collections[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    model = args.model or str(write_tiny_checkpoint(tempfile.mkdtemp(prefix="glint-gc-"), fmt="bf16"))
    llm = LLM(model, device=args.device, max_model_len=1024)
    rows = []
    for frozen in (False, True):
        if frozen:
            freeze_startup_heap()
        took, natural = serve(llm, args.requests)
        rows.append((frozen, len(gc.get_objects()), gc.get_freeze_count(), full_collection_ms(args.repeat), took,
                     natural))
    print(f"{'heap':10} {'tracked':>9} {'frozen':>9} {'full collection ms':>19} {'serve s':>8} {'natural full':>12}")
    for frozen, tracked, count, ms, took, natural in rows:
        print(f"{'frozen' if frozen else 'as is':10} {tracked:9d} {count:9d} {ms:19.2f} {took:8.2f} {natural:12d}")
    llm.shutdown()


if __name__ == "__main__":
    main()

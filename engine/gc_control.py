"""The cyclic garbage collector in a serving process: freeze the start-up heap, and account its pauses.

A collection of Python's oldest generation walks every tracked object, and a loaded engine holds a couple of
hundred thousand (model modules, tokenizer, Triton's and torch's caches, the KV pool's pages): 112 ms per
collection on our CI machine's CPU for the tiny model (bench/RESULTS.md, session 14), a stall of every running
decode whenever one fires in the middle of serving. Nothing the serving loop allocates later needs those
objects walked: `gc.freeze()` after start-up moves them to the permanent generation, which collections skip
(vLLM freezes its engine core and workers after start-up, SGLang its processes after warm-up). Objects that
start-up leaves behind and that later become garbage are then never collected: a bounded leak, the trade both
engines make. So only processes that exist to serve freeze: the server's engine process once its EngineCore is
built (server/engine_process.py) and tensor-parallel ranks > 0 once their worker is (engine/model_worker.py); an
in-process `LLM(...)` leaves its caller's heap alone (a script that builds and drops engines would leak them).
"""
from __future__ import annotations

import gc
import time
from typing import Any


def freeze_startup_heap() -> int:
    """Collect what start-up left as garbage, then move every live object to the permanent generation; the
    number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """Counts the collector's runs in this process by generation and their stop-the-world time (gc.callbacks),
    from construction until close()."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.max_seconds = 0.0
        self.frozen_objects = 0  # what freeze_startup_heap froze through this object
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def freeze_startup_heap(self) -> int:
        """freeze_startup_heap(), remembering the count for stats(): gc.get_freeze_count() walks every frozen
        object (~40 ms at a loaded real-width engine's half a million), too slow for stats() that the server's
        engine loop sends after every step."""
        self.frozen_objects = freeze_startup_heap()
        return self.frozen_objects

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        gen = min(int(info.get("generation", 2)), 2)
        self.collections[gen] += 1
        self.seconds[gen] += took
        self.max_seconds = max(self.max_seconds, took)

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def stats(self) -> dict[str, float]:
        return {
            "gc_collections_gen2": self.collections[2],
            "gc_pause_seconds_total": sum(self.seconds),
            "gc_pause_gen2_seconds_total": self.seconds[2],
            "gc_pause_max_seconds": self.max_seconds,
            "gc_frozen_objects": self.frozen_objects,
        }


__all__ = ["GcPauses", "freeze_startup_heap"]

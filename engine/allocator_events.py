"""The CUDA caching allocator's slow paths, counted since the process started: cudaMalloc and cudaFree calls (a
free synchronizes the device) and retries after a failed allocation (every cached block freed, then the
allocation tried again). An eager step of a new shape near a full GPU can take them; CUDA-graph replays never do.
The slow-step log names the ones since the last slow step, and `bench.engine --mixed-varying` counts them per pass.
Reading them builds torch's whole statistics dict, so callers read them rarely (not per step)."""
from __future__ import annotations

import torch

ALLOCATOR_EVENTS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_ooms")


def allocator_events(device: torch.device) -> dict[str, int]:
    """The counters on a CUDA device; {} elsewhere."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {k: int(stats.get(k, 0)) for k in ALLOCATOR_EVENTS}


def events_since(before: dict[str, int], after: dict[str, int]) -> str:
    """'' when nothing happened, else e.g. '3 num_device_alloc, 1 num_alloc_retries'."""
    moved = [(k, after[k] - before.get(k, 0)) for k in after]
    return ", ".join(f"{n} {k}" for k, n in moved if n)

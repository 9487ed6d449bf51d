"""Per-kernel GPU time of a callable (torch.profiler), aggregated by kernel name: where a step's time goes."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_breakdown(fn: Callable[[], object], reps: int = 3) -> list[dict]:
    """[{name, us_per_call, launches_per_call}] sorted by time, for fn() run reps times after one warm-up.
    Kernels launch without programmatic dependent launch here (GLINT_PDL=0): a PDL kernel starts before the
    one ahead of it ends, and the profiler would count its wait as its own time."""
    saved = os.environ.get("GLINT_PDL")
    os.environ["GLINT_PDL"] = "0"
    try:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
    finally:
        if saved is None:
            os.environ.pop("GLINT_PDL", None)
        else:
            os.environ["GLINT_PDL"] = saved
    rows = []
    for ev in prof.key_averages():
        if ev.device_time_total > 0 and ev.count:
            rows.append({"name": ev.key[:80], "us_per_call": ev.device_time_total / reps,
                         "launches_per_call": ev.count / reps})
    return sorted(rows, key=lambda r: -r["us_per_call"])


def print_breakdown(title: str, rows: list[dict], top: int = 20) -> None:
    total = sum(r["us_per_call"] for r in rows)
    launches = sum(r["launches_per_call"] for r in rows)
    print(f"-- {title}: {total / 1e3:.3f} ms of kernels in {launches:.0f} launches", flush=True)
    for r in rows[:top]:
        print(f"   {r['us_per_call']:9.1f} us {100 * r['us_per_call'] / total:5.1f}%  x{r['launches_per_call']:<5.0f} "
              f"{r['name']}", flush=True)

"""Host (Python) time of a callable that launches GPU work: how long the host takes to enqueue one call, against
how long the call takes to finish, and which functions the host time goes to (cProfile). An eager prefill whose
enqueue time exceeds its kernels' time is host-bound: the GPU waits for Python."""
from __future__ import annotations

import cProfile
import pstats
import time
from collections.abc import Callable

import torch


def host_breakdown(fn: Callable[[], object], reps: int = 3, top: int = 40, dump: str | None = None) -> dict:
    """{enqueue_ms, finish_ms, functions: [{name, calls, tottime_ms, cumtime_ms}]}, per call, after one warm-up.
    enqueue_ms: until fn() returns (no synchronize); finish_ms: until the device is idle again. The cProfile
    pass is separate (it slows the host further); dump: a path for its raw pstats (`python -m pstats`)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    enqueue, finish = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        enqueue.append((t1 - t0) * 1e3)
        finish.append((t2 - t0) * 1e3)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    prof.disable()
    sync()
    if dump:
        prof.dump_stats(dump)
    stats = pstats.Stats(prof)
    rows = []
    for (path, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        short = "/".join(path.split("/")[-2:])
        rows.append({"name": f"{short}:{line}({name})", "calls": calls / reps,
                     "tottime_ms": tottime * 1e3 / reps, "cumtime_ms": cumtime * 1e3 / reps})
    by_self = sorted(rows, key=lambda r: -r["tottime_ms"])[:top]
    by_cum = sorted(rows, key=lambda r: -r["cumtime_ms"])[:top]
    return {"enqueue_ms": sorted(enqueue)[len(enqueue) // 2], "finish_ms": sorted(finish)[len(finish) // 2],
            "by_self": by_self, "by_cumulative": by_cum}


def print_host_breakdown(title: str, res: dict) -> None:
    print(f"-- {title}: host enqueue {res['enqueue_ms']:.2f} ms, finished after {res['finish_ms']:.2f} ms "
          "(cProfile below: per call, profiled run)", flush=True)
    for key in ("by_self", "by_cumulative"):
        print(f"   {key}: {'self ms':>8} {'cum ms':>8} {'calls':>7}  function")
        for r in res[key]:
            print(f"   {'':{len(key)}}  {r['tottime_ms']:8.3f} {r['cumtime_ms']:8.3f} {r['calls']:7.0f}  {r['name'][:90]}")

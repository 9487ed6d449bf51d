"""Host (Python) time of a callable that launches GPU work: how long the host takes to enqueue one call, against
how long the call takes to finish, and which functions the host time goes to. An eager prefill whose enqueue
time exceeds its kernels' time is host-bound: the GPU waits for Python.

Two views of where it goes: cProfile (exact call counts, but its per-call cost inflates code made of many small
Python calls 1.5-3.5x against C-heavy code: session 31) and a sampler (a thread reads the calling thread's stack
every ~0.2 ms: shares of the unprofiled run, attributed at Python frame granularity; a long C call counts for
the Python frame that made it)."""
from __future__ import annotations

import cProfile
import collections
import pstats
import sys
import threading
import time
from collections.abc import Callable

import torch


def host_breakdown(fn: Callable[[], object], reps: int = 3, top: int = 40, dump: str | None = None) -> dict:
    """{enqueue_ms, finish_ms, by_self / by_cumulative: [{name, calls, tottime_ms, cumtime_ms}] (cProfile), sampled:
    sampled_breakdown's}, per call, after one warm-up.
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
    enqueue_ms = sorted(enqueue)[len(enqueue) // 2]
    return {"enqueue_ms": enqueue_ms, "finish_ms": sorted(finish)[len(finish) // 2],
            "by_self": by_self, "by_cumulative": by_cum, "sampled": sampled_breakdown(fn, sync, enqueue_ms, top)}


def _frame_name(code) -> str:
    return f"{'/'.join(code.co_filename.split('/')[-2:])}:{code.co_firstlineno}({code.co_name})"


def sampled_breakdown(fn: Callable[[], object], sync: Callable[[], None], enqueue_ms: float, top: int = 40,
                      reps: int = 10, interval_s: float = 2e-4) -> dict:
    """Shares of fn()'s host time by function from stack samples: {samples, by_self, by_cumulative} with each
    row's ms = its share x enqueue_ms (the unprofiled median). Self: the innermost Python frame; cumulative:
    every function on the stack once per sample."""
    target = threading.get_ident()
    self_n: collections.Counter = collections.Counter()
    cum_n: collections.Counter = collections.Counter()
    total = 0
    running = threading.Event()
    done = threading.Event()

    def sample() -> None:
        nonlocal total
        running.wait()
        while not done.is_set():
            frame = sys._current_frames().get(target)
            if frame is not None and running.is_set():
                total += 1
                self_n[_frame_name(frame.f_code)] += 1
                seen = set()
                while frame is not None:
                    name = _frame_name(frame.f_code)
                    if name not in seen:
                        seen.add(name)
                        cum_n[name] += 1
                    frame = frame.f_back
            time.sleep(interval_s)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)  # let the sampler in at about its own rate
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        for _ in range(reps):
            running.set()
            fn()
            running.clear()
            sync()
    finally:
        done.set()
        running.set()
        thread.join()
        sys.setswitchinterval(switch)
    here = _frame_name(sampled_breakdown.__code__)

    def rows(counter: collections.Counter) -> list[dict]:
        return [{"name": k, "share": v / total, "ms": v / total * enqueue_ms}
                for k, v in counter.most_common(top + 2) if k != here and "threading.py" not in k][:top]

    return {"samples": total, "by_self": rows(self_n) if total else [], "by_cumulative": rows(cum_n) if total else []}


def print_host_breakdown(title: str, res: dict) -> None:
    print(f"-- {title}: host enqueue {res['enqueue_ms']:.2f} ms, finished after {res['finish_ms']:.2f} ms "
          "(cProfile below: per call, profiled run)", flush=True)
    for key in ("by_self", "by_cumulative"):
        print(f"   {key}: {'self ms':>8} {'cum ms':>8} {'calls':>7}  function")
        for r in res[key]:
            name = r["name"][:90]
            print(f"   {'':{len(key)}}  {r['tottime_ms']:8.3f} {r['cumtime_ms']:8.3f} {r['calls']:7.0f}  {name}")
    sampled = res.get("sampled") or {}
    print(f"   sampled ({sampled.get('samples', 0)} stack samples; ms = share x the unprofiled enqueue time):")
    for key in ("by_self", "by_cumulative"):
        print(f"   {key}: {'ms':>8} {'share':>7}  function")
        for r in sampled.get(key, []):
            print(f"   {'':{len(key)}}  {r['ms']:8.3f} {r['share']:7.1%}  {r['name'][:90]}")

"""Host time an engine spends inside its drafter's hooks, for benchmarks that compare speculative methods step by
step (bench/spec_budget.py): which part of a step's host time a drafter adds.

`HookTimer.attach(drafter)` wraps the public per-step hooks of that drafter instance (the engine calls them, a
hybrid drafter's calls into its own parts are inside its hooks' time) so that each call adds its perf_counter
duration to `seconds[name]` and one to `calls[name]`. Benchmark-only: the engine never installs it."""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

# the hooks EngineCore calls on a drafter during a step (spec/drafter.py)
HOOKS = ("wants_sync", "propose", "verify", "accepted", "after_step", "observe_step", "needs_hidden",
         "any_needs_hidden", "add", "finish")


class HookTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @classmethod
    def attach(cls, drafter: Any) -> "HookTimer":
        timer = cls()
        for name in HOOKS:
            fn = getattr(drafter, name, None)
            if callable(fn):
                setattr(drafter, name, timer._wrap(name, fn))
        return timer

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.seconds.setdefault(name, 0.0)
        self.calls.setdefault(name, 0)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1
        return timed

    def total_seconds(self) -> float:
        return sum(self.seconds.values())

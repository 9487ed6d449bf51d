"""Tensor-parallel ranks spawned without torchrun re-import the main module (multiprocessing "spawn"). A script
that creates a TP engine at module level, without an `if __name__ == "__main__":` guard, then starts the engine
again inside each rank while it boots; the rank dies there, and rank 0 used to wait for it in the process group's
rendezvous for minutes (DistStoreError). Here each rank reports when its target starts, rank 0 waits for that
(or for the rank's death) before the rendezvous, and both sides say what to fix."""
from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections.abc import Callable
from typing import Any

START_TIMEOUT_S = 600.0  # a rank's interpreter + re-import of the main module; only a hang takes this long


def _main_script() -> str:
    main = sys.modules.get("__mp_main__") or sys.modules.get("__main__")  # a spawned process: the re-import
    return str(getattr(main, "__file__", None) or "the main module")


def guard_message() -> str:
    return (
        "tensor_parallel_size > 1 without torchrun spawns one process per extra rank, and each re-imports the main "
        f"module ({_main_script()}); create the LLM (or engine) under `if __name__ == \"__main__\":` in that script, "
        "or launch it with torchrun"
    )


def refuse_while_bootstrapping() -> None:
    """In a spawned process still importing the parent's main module: starting ranks here would recurse."""
    if getattr(mp.current_process(), "_inheriting", False):  # set by multiprocessing.spawn while it boots
        raise RuntimeError(f"a spawned tensor-parallel rank tried to start its own ranks: {guard_message()}")


def run_started(started: Any, target: Callable[..., None], *args: Any) -> None:
    """A spawned rank's process target: say it got past the main module's re-import, then run `target`."""
    started.set()
    target(*args)


def wait_until_started(procs: list[mp.Process], events: list[Any], timeout: float = START_TIMEOUT_S) -> None:
    """Until every spawned rank's target has started; RuntimeError (with the fix) if one dies before that."""
    deadline = time.monotonic() + timeout
    for rank, (p, started) in enumerate(zip(procs, events), start=1):
        while not started.wait(0.05):
            if p.exitcode is not None:
                raise RuntimeError(
                    f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {p.exitcode} while starting, "
                    f"before it could join the process group (its error is above): {guard_message()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel rank {rank} (pid {p.pid}) did not start within {timeout:.0f} s")

"""The engine-core process: owns the EngineCore and runs its loop, talking to the front end over ZMQ.

Started with multiprocessing "spawn" by `server.engine_client.EngineClient` (or by anything else that speaks
the same messages: tensor-parallel rank 0, a disaggregation role). The front end binds two PUSH/PULL
endpoints; this process connects to both.

Front end -> engine (pickled tuples):
    ("add", request_id, prompt_token_ids, SamplingParams, prompt_text | None, tenant, DisaggParams | None)
    ("abort", request_id)
    ("shutdown",)
Engine -> front end:
    ("hello", {"pid", "pgid"})              first thing: the process group the front end kills if it must
    ("ready", info)                         once the model is loaded; info has max_model_len, stats, ...
    ("startup_error", message)              loading failed; the process exits
    ("ack", request_id)                     add_request accepted the request
    ("reject", request_id, message, kind)   add_request refused it (kind "invalid": a ValueError naming the
                                            field; "internal": anything else)
    ("deltas", [RequestDelta, ...], stats)  after every step that changed something
    ("stats", stats)                        after aborts, and whenever a second passed without a message
    ("fatal", message)                      the loop crashed (or a TP rank died); the process exits

Heartbeat: once ready, the loop sends a message at least every HEARTBEAT_S seconds (deltas when steps produce
them, else stats), from the loop itself, so a silent engine is a stuck loop (SIGSTOP, a hung collective, an
endless step) and the front end's watchdog (--engine-stall-timeout) kills it.

Loop: drain the input socket (blocking up to a second when there is no work), apply adds/aborts, run one
`core.step()`, push the deltas. The process exits when told to or when its parent dies; SIGINT and SIGTERM
are ignored so that a Ctrl-C (or a SIGTERM to the process group) lets the front end shut things down in order.
The process leads its own process group (the TP ranks it spawns join it), so the front end can kill it and its
ranks together when it stalls or dies.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import zmq

from disagg.connector import build_kv_connector
from engine import EngineConfig, EngineCore
from server.log_safety import SafeFormatter

logger = logging.getLogger("glint.engine")

IDLE_POLL_MS = 1000
HEARTBEAT_S = 1.0  # the longest the loop stays silent (a single step longer than this delays it)


@dataclass(frozen=True)
class EngineProcessSpec:
    engine_kwargs: dict[str, Any]
    input_addr: str  # front end -> engine
    output_addr: str  # engine -> front end
    parent_pid: int
    log_level: str = "info"
    # "module:callable" building the core from EngineConfig.create(**engine_kwargs) kwargs; tests point it at
    # a wrapper (tests/server/scripted_engine.py). Default: the real engine.
    core_factory: str = "server.engine_process:build_engine_core"
    extra: dict[str, Any] = field(default_factory=dict)


def build_engine_core(engine_kwargs: dict[str, Any], extra: dict[str, Any] | None = None) -> EngineCore:
    config = EngineConfig.create(**engine_kwargs)
    core = EngineCore(config, kv_connector=build_kv_connector(config))
    if config.gc_freeze:  # this process exists to serve: its start-up heap is never garbage
        logger.info("froze %d start-up objects out of garbage collection", core.gc_pauses.freeze_startup_heap())
    return core


def shutdown_core(core: Any) -> None:
    """Stop what the core started. Under torchrun the other ranks are `python -m server` processes serving
    steps until told to stop (server/launch.py run_tp_worker), so they get the stop message too."""
    try:
        core.shutdown(stop_torchrun_ranks=True)
    except Exception:
        logger.exception("error while shutting the engine down")


def _load_factory(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        SafeFormatter("%(asctime)s %(levelname)s [engine] %(name)s: %(message)s", "%H:%M:%S")
    )
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)


def engine_info(core: Any) -> dict[str, Any]:
    """What the front end needs to know about the loaded engine."""
    return {**core.info(), "pid": os.getpid()}


def run_engine_process(spec: EngineProcessSpec) -> None:
    """Process entry point (must stay importable at module level for "spawn")."""
    _setup_logging(spec.log_level)
    # The front end decides when the engine stops (a "shutdown" message, or its own death, noticed within a
    # second): a Ctrl-C or a SIGTERM sent to the whole process group must not kill the engine first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.setpgrp()
    except OSError:
        pass

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    pull.connect(spec.input_addr)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(spec.output_addr)
    push.send_pyobj(("hello", {"pid": os.getpid(), "pgid": os.getpgrp()}))

    try:
        core = _load_factory(spec.core_factory)(spec.engine_kwargs, spec.extra)
        info = engine_info(core)
    except BaseException as e:  # noqa: BLE001 - report every start-up failure to the front end
        logger.error("engine start-up failed:\n%s", traceback.format_exc())
        push.send_pyobj(("startup_error", f"{type(e).__name__}: {e}"))
        pull.close(linger=0)
        push.close(linger=2000)
        ctx.term()
        sys.exit(1)
    push.send_pyobj(("ready", info))

    try:
        _loop(core, pull, push, spec.parent_pid)
    except Exception as e:
        logger.error("engine loop crashed:\n%s", traceback.format_exc())
        try:
            push.send_pyobj(("fatal", f"{type(e).__name__}: {e}"))
        except Exception:
            pass
        shutdown_core(core)
        pull.close(linger=0)
        push.close(linger=2000)
        ctx.term()
        sys.exit(1)
    shutdown_core(core)
    push.close(linger=500)
    pull.close(linger=0)
    ctx.term()


def _loop(core: Any, pull: Any, push: Any, parent_pid: int) -> None:
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    for sock in getattr(core, "wake_sockets", list)():  # a prefill instance's handshake socket
        poller.register(sock, zmq.POLLIN)
    last_stats = 0.0
    check_health = getattr(core, "check_health", None)  # raises when a tensor-parallel rank is gone
    while True:
        if os.getppid() != parent_pid:
            logger.warning("front-end process %d is gone; engine exiting", parent_pid)
            return
        busy = core.has_unfinished_requests()
        events = dict(poller.poll(0 if busy else IDLE_POLL_MS))
        changed = False
        while pull in events or _has_more(pull):
            events = {}
            msg = pull.recv_pyobj()
            kind = msg[0]
            if kind == "add":
                _, rid, ids, params, prompt, tenant, disagg = msg
                try:
                    core.add_request(rid, ids, params, prompt=prompt, tenant=tenant, disagg=disagg)
                except ValueError as e:
                    push.send_pyobj(("reject", rid, str(e), "invalid"))
                except Exception as e:  # noqa: BLE001 - a bad request must not take the loop down
                    logger.error("add_request(%s) failed:\n%s", rid, traceback.format_exc())
                    push.send_pyobj(("reject", rid, f"{type(e).__name__}: {e}", "internal"))
                else:
                    push.send_pyobj(("ack", rid))
            elif kind == "abort":
                core.abort_request(msg[1])
                changed = True
            elif kind == "shutdown":
                logger.info("engine shutting down")
                return
            else:
                logger.error("unknown message %r", kind)
        if core.has_unfinished_requests():
            deltas = core.step()
            if deltas:
                push.send_pyobj(("deltas", deltas, core.stats()))
                last_stats = time.monotonic()
                continue
        now = time.monotonic()
        if changed or now - last_stats >= HEARTBEAT_S:
            if callable(check_health):
                check_health()
            push.send_pyobj(("stats", core.stats()))
            last_stats = now


def _has_more(sock: Any) -> bool:
    return bool(sock.poll(0, zmq.POLLIN))

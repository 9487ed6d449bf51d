"""Start-up and shutdown: logging, model resolution, the FastAPI app under uvicorn, exit codes.

The HTTP front end runs in this process; the engine core runs in a spawned child (server/engine_process.py).
SIGTERM or Ctrl-C (SIGINT) drain the server (server/drain.py: 503 for new requests, requests in flight may
run for --shutdown-timeout seconds, then end with an error event), then stop uvicorn, whose lifespan shutdown
tells the engine process to exit (it ignores SIGINT itself so the order is always front end first); exit code
0. If the engine fails to start, or dies or stalls with no --engine-restart left, the server stops with exit
code 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

import uvicorn

from disagg.connector import kv_worker_factory
from engine import EngineConfig
from engine.distributed import init_distributed, launched_by_torchrun
from engine.model_worker import ModelWorker, leave_process_group
from model.tiny import tiny_model_dir
from server.app import build_app
from server.engine_args import engine_kwargs
from server.config import ServerConfig
from server.log_safety import SafeFormatter

logger = logging.getLogger("glint.server")

TINY_MODEL_NAME = "glint-tiny"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        SafeFormatter("%(asctime)s %(levelname)s [server] %(name)s: %(message)s", "%H:%M:%S")
    )
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def resolve_model(config: ServerConfig) -> ServerConfig:
    """No --model: the built-in tiny checkpoint on CPU (written on first use)."""
    if config.model is not None:
        path = Path(config.model).expanduser()
        if not (path / "config.json").is_file():
            raise SystemExit(
                f"glint: error: --model {config.model!r} is not a checkpoint folder (no config.json)"
            )
        return dataclasses.replace(config, model=str(path))
    path = tiny_model_dir("bf16")
    logger.info(
        "no --model given: serving the built-in tiny model at %s (random weights, gibberish output)", path
    )
    engine = dict(config.engine)
    if engine.get("device", "auto") == "auto":
        engine["device"] = "cpu"
    return dataclasses.replace(
        config, model=str(path), engine=engine, served_model_name=config.served_model_name or (TINY_MODEL_NAME,)
    )


def run_tp_worker(config: ServerConfig) -> int:
    """`torchrun --nproc-per-node N -m server --tp-size N ...`: ranks > 0 run the model worker loop (rank 0's
    engine process broadcasts every step to them) until the server stops."""
    setup_logging(config.log_level)
    config = resolve_model(config)
    econfig = EngineConfig.create(**engine_kwargs(config))
    # Ctrl-C reaches every torchrun rank; this one waits for rank 0's orderly STOP instead of dying mid-step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    info = init_distributed(econfig.parallel.tensor_parallel_size, econfig.device, parallel=econfig.parallel)
    logger.info("tensor-parallel rank %d/%d serving model steps", info.rank, info.world_size)
    worker = None
    try:
        worker = ModelWorker(econfig, info, kv_worker_factory(econfig))  # disaggregation: this rank's KV shard
        worker.serve_forever()
    except RuntimeError as exc:
        logger.error(
            "tensor-parallel rank %d: lost rank 0 (%s); exiting", info.rank, str(exc).splitlines()[0]
        )
        return 1
    finally:
        leave_process_group(worker)
    logger.info("tensor-parallel rank %d stopped", info.rank)
    return 0


def is_torchrun_worker(config: ServerConfig) -> bool:
    tp = config.engine.get("tensor_parallel_size", 1)
    return tp > 1 and launched_by_torchrun() and int(os.environ.get("RANK", "0")) != 0


def _quiet_uvicorn_server(config, drain: Callable[[], bool] | None = None):
    """uvicorn.Server whose shutdown on Ctrl-C / SIGTERM is always the graceful one and never re-raises the
    signal afterwards. A signal first starts the app's drain (`drain()`, which sets should_exit when it is
    over; a second signal hurries it); without one (no running loop yet) uvicorn stops directly. Plain
    uvicorn (>= 0.29) re-raises the captured signal once shut down, and a second SIGINT (Ctrl-C twice, or a
    wrapper like `timeout` forwarding it) skips the lifespan shutdown; either way the lifespan task is
    cancelled mid-receive and a traceback is logged at ERROR level on a clean stop. Our exit code says how it
    ended."""
    class QuietServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # not recorded, so capture_signals re-raises nothing
            if drain is None or self.should_exit or not drain():
                self.should_exit = True

    return QuietServer(config)


def run_server(config: ServerConfig) -> int:
    if is_torchrun_worker(config):
        return run_tp_worker(config)

    setup_logging(config.log_level)
    non_default = config.non_default_args()
    logger.info("glint server, non-default args: %s", non_default or "(none)")
    config = resolve_model(config)
    if config.engine_restart and config.engine.get("tensor_parallel_size", 1) > 1 and launched_by_torchrun():
        logger.warning(
            "--engine-restart is not available under torchrun (the other ranks cannot rejoin): ignored"
        )
        config = dataclasses.replace(config, engine_restart=0)
    kwargs = engine_kwargs(config)
    try:  # every engine option's check (FP8 KV on CPU, fa3 without flash_attn, ...) before the port is bound
        EngineConfig.create(**kwargs)
    except (OSError, ValueError, TypeError) as e:
        logger.error("cannot start: %s", e)
        return 1
    exit_code = {"code": 0}
    holder: dict[str, uvicorn.Server] = {}

    async def on_ready(state) -> None:
        server = holder.get("server")
        while server is not None and not server.started and not server.should_exit:
            await asyncio.sleep(0.05)
        host = f"[{config.host}]" if ":" in config.host else config.host
        logger.info(
            "glint server ready at http://%s:%d (model %s served as %s)",
            host,
            config.port,
            state.model_path,
            ", ".join(state.served_model_names),
        )

    def on_fatal(reason: str) -> None:
        logger.error("stopping the server (exit code 1) so that its supervisor can start a fresh one")
        exit_code["code"] = 1
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

    def on_drained() -> None:
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

    try:
        app = build_app(config, kwargs, on_ready=on_ready, on_fatal=on_fatal, on_drained=on_drained)
    except (OSError, ValueError) as e:
        logger.error("cannot start: %s", e)
        return 1
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_config=None,
        log_level=config.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,  # after the drain: responses are complete or ended by then
        lifespan="on",
    )
    server = _quiet_uvicorn_server(uv_config, drain=app.state.drainer.request)
    holder["server"] = server
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started and exit_code["code"] == 0:
        exit_code["code"] = 1  # e.g. the port was taken
    logger.info("glint server stopped")
    return exit_code["code"]

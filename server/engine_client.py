"""Front-end side of the engine-core process: spawn it, send requests and aborts, route deltas to requests.

One `EngineClient` per server. `add_request()` registers a `RequestStream` (an asyncio queue of delta batches
for one request, all n choices), sends the request and waits for the engine's ack, so that a parameter the
engine refuses becomes a 400 before any response byte is sent. A background task receives the engine's
messages and routes them; a reader on the process sentinel notices when the engine dies, fails every pending
request with `EngineDeadError` (served as 503) and logs it once.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from collections import defaultdict
from typing import Any, Callable

import zmq
import zmq.asyncio

from server.engine_process import EngineProcessSpec, run_engine_process

logger = logging.getLogger("glint.server")


class EngineDeadError(RuntimeError):
    """The engine process is not running (crashed, or still starting / shutting down)."""


class EngineStartupError(RuntimeError):
    pass


class EngineRequestError(Exception):
    """The engine refused a request. kind: "invalid" (a bad parameter -> 400) or "internal" (-> 500)."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


class RequestStream:
    """Delta batches of one engine request, in order. `finished` once all n sequences finished."""

    def __init__(self, request_id: str, n: int) -> None:
        self.request_id = request_id
        self.n = n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished_indices: set[int] = set()
        self.ack: asyncio.Future = asyncio.get_running_loop().create_future()
        self.arrival = time.monotonic()

    @property
    def finished(self) -> bool:
        return len(self.finished_indices) >= self.n

    async def next_batch(self, timeout: float | None = None) -> list[Any] | None:
        """The next list of RequestDelta, or None after `timeout` seconds without one."""
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout) if timeout else await self.queue.get()
        except asyncio.TimeoutError:
            return None
        if isinstance(item, BaseException):
            raise item
        return item


class EngineClient:
    def __init__(
        self,
        engine_kwargs: dict[str, Any],
        *,
        log_level: str = "info",
        core_factory: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.engine_kwargs = dict(engine_kwargs)
        self.log_level = log_level
        self.core_factory = core_factory
        self.extra = dict(extra or {})
        self.info: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}
        self.stats_time = 0.0
        self.ready = False
        self.dead_reason: str | None = None
        self.process: multiprocessing.process.BaseProcess | None = None
        self._streams: dict[str, RequestStream] = {}
        self._ready_event = asyncio.Event()
        self._startup_error: str | None = None
        self._stats_listeners: list[Callable[[dict[str, Any]], None]] = []
        self._death_listeners: list[Callable[[str], None]] = []
        self._closing = False
        self._death_reported = False
        self._tmpdir: str | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sync_ctx: zmq.Context | None = None
        self._recv_task: asyncio.Task | None = None
        self._sender: Any = None
        self._receiver: Any = None
        self.num_unacked = 0

    # ------------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix=f"glint-{os.getpid()}-")
        input_addr = f"ipc://{self._tmpdir}/input.sock"
        output_addr = f"ipc://{self._tmpdir}/output.sock"
        self._sync_ctx = zmq.Context()
        self._sender = self._sync_ctx.socket(zmq.PUSH)
        self._sender.setsockopt(zmq.SNDHWM, 0)
        self._sender.setsockopt(zmq.LINGER, 0)
        self._sender.bind(input_addr)
        self._ctx = zmq.asyncio.Context()
        self._receiver = self._ctx.socket(zmq.PULL)
        self._receiver.setsockopt(zmq.RCVHWM, 0)
        self._receiver.setsockopt(zmq.LINGER, 0)
        self._receiver.bind(output_addr)
        spec = EngineProcessSpec(
            engine_kwargs=self.engine_kwargs,
            input_addr=input_addr,
            output_addr=output_addr,
            parent_pid=os.getpid(),
            log_level=self.log_level,
            extra=self.extra,
            **({"core_factory": self.core_factory} if self.core_factory else {}),
        )
        mp = multiprocessing.get_context("spawn")
        self.process = mp.Process(target=run_engine_process, args=(spec,), name="glint-engine", daemon=False)
        self.process.start()
        logger.info("engine process started (pid %d)", self.process.pid)
        loop = asyncio.get_running_loop()
        loop.add_reader(self.process.sentinel, self._on_process_exit)
        self._recv_task = asyncio.create_task(self._recv_loop(), name="glint-engine-recv")

    async def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        await asyncio.wait_for(self._ready_event.wait(), timeout)
        if self._startup_error is not None:
            raise EngineStartupError(self._startup_error)
        return self.info

    async def shutdown(self, timeout: float = 10.0) -> None:
        self._closing = True
        proc = self.process
        if proc is not None:
            try:
                asyncio.get_running_loop().remove_reader(proc.sentinel)
            except Exception:
                pass
            if proc.is_alive():
                try:
                    self._sender.send_pyobj(("shutdown",), flags=zmq.NOBLOCK)
                except Exception:
                    pass
                deadline = time.monotonic() + timeout
                while proc.is_alive() and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if proc.is_alive():
                    logger.warning("engine process did not exit in %.0fs; killing it", timeout)
                    proc.kill()
                    proc.join(5)
        self._fail_all(EngineDeadError("server is shutting down"))
        if self._recv_task is not None:
            self._recv_task.cancel()
            try:
                await self._recv_task
            except BaseException:
                pass
        for sock in (self._sender, self._receiver):
            if sock is not None:
                sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        if self._sync_ctx is not None:
            self._sync_ctx.term()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self.process is not None and self.process.is_alive()

    def add_stats_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self._stats_listeners.append(fn)

    def add_death_listener(self, fn: Callable[[str], None]) -> None:
        self._death_listeners.append(fn)

    # ------------------------------------------------------------------------------------------- requests

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: Any, prompt: str | None = None
    ) -> RequestStream:
        if not self.ready or not self.alive:
            raise EngineDeadError(self.dead_reason or "the engine is not ready")
        if request_id in self._streams:
            raise EngineRequestError(f"duplicate request id {request_id!r}")
        stream = RequestStream(request_id, getattr(params, "n", 1) or 1)
        self._streams[request_id] = stream
        try:
            self._sender.send_pyobj(
                ("add", request_id, list(prompt_token_ids), params, prompt), flags=zmq.NOBLOCK
            )
        except zmq.ZMQError as e:
            self._streams.pop(request_id, None)
            raise EngineDeadError(f"cannot reach the engine process: {e}") from e
        self.num_unacked += 1
        try:
            await stream.ack
        except BaseException:
            self._streams.pop(request_id, None)
            if not stream.ack.done() or stream.ack.cancelled():
                self.abort(request_id)  # cancelled while waiting: the engine may still have taken it
            raise
        finally:
            self.num_unacked -= 1
        return stream

    def abort(self, request_id: str) -> None:
        """Idempotent; unknown or finished ids are fine (the engine ignores them)."""
        self._streams.pop(request_id, None)
        if not self.alive:
            return
        try:
            self._sender.send_pyobj(("abort", request_id), flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.error("could not send abort for %s: %s", request_id, e)

    def release(self, request_id: str) -> None:
        """Forget a finished request (no abort sent)."""
        self._streams.pop(request_id, None)

    # ------------------------------------------------------------------------------------------- receiving

    async def _recv_loop(self) -> None:
        while True:
            try:
                msg = await self._receiver.recv_pyobj()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError:
                if self._closing:
                    return
                raise
            try:
                self._dispatch(msg)
            except Exception:
                logger.exception("error while routing an engine message")

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "deltas":
            self._update_stats(msg[2])
            groups: dict[str, list[Any]] = defaultdict(list)
            for d in msg[1]:
                groups[d.request_id].append(d)
            for rid, deltas in groups.items():
                stream = self._streams.get(rid)
                if stream is None:
                    continue  # aborted by the front end already
                for d in deltas:
                    if d.finished:
                        stream.finished_indices.add(d.index)
                stream.queue.put_nowait(deltas)
                if stream.finished:
                    self._streams.pop(rid, None)
        elif kind == "stats":
            self._update_stats(msg[1])
        elif kind == "ack":
            stream = self._streams.get(msg[1])
            if stream is not None and not stream.ack.done():
                stream.ack.set_result(None)
        elif kind == "reject":
            stream = self._streams.pop(msg[1], None)
            if stream is not None and not stream.ack.done():
                stream.ack.set_exception(EngineRequestError(msg[2], msg[3]))
        elif kind == "ready":
            self.info = msg[1]
            self._update_stats(self.info.get("stats") or {})
            self.ready = True
            self._ready_event.set()
        elif kind == "startup_error":
            self._startup_error = msg[1]
            self.dead_reason = f"engine start-up failed: {msg[1]}"
            self._ready_event.set()
        elif kind == "fatal":
            self._mark_dead(f"engine loop crashed: {msg[1]}")
        else:
            logger.error("unknown engine message %r", kind)

    def _update_stats(self, stats: dict[str, Any]) -> None:
        self.stats = stats
        self.stats_time = time.monotonic()
        for fn in self._stats_listeners:
            try:
                fn(stats)
            except Exception:
                logger.exception("stats listener failed")

    def _on_process_exit(self) -> None:
        proc = self.process
        try:
            asyncio.get_running_loop().remove_reader(proc.sentinel)
        except Exception:
            pass
        proc.join(0)
        if self._closing:
            return
        code = proc.exitcode
        if self._startup_error is None and not self.ready:
            self._startup_error = f"engine process exited during start-up (exit code {code})"
            self._ready_event.set()
        self._mark_dead(self.dead_reason or f"engine process exited unexpectedly (exit code {code})")

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is None:
            self.dead_reason = reason
        self.ready = False
        if not self._death_reported and not self._closing:
            self._death_reported = True
            logger.error("ENGINE DIED: %s -- all requests now fail with 503; restart the server", reason)
            for fn in self._death_listeners:
                try:
                    fn(reason)
                except Exception:
                    logger.exception("death listener failed")
        self._fail_all(EngineDeadError(reason))

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            if not stream.ack.done():
                stream.ack.set_exception(exc)
                stream.ack.exception()  # mark retrieved
            stream.queue.put_nowait(exc)


def new_request_id(prefix: str) -> str:
    """prefix-<hex>, or prefix<hex> when the prefix ends with "_" (msg_..., as Anthropic spells ids)."""
    return f"{prefix}{uuid.uuid4().hex}" if prefix.endswith("_") else f"{prefix}-{uuid.uuid4().hex}"

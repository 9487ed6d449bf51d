"""Front-end side of the engine-core process: spawn it, send requests and aborts, route deltas to requests.

One `EngineClient` per server. `add_request()` registers a `RequestStream` (an asyncio queue of delta batches
for one request, all n choices), sends the request and waits for the engine's ack, so that a parameter the
engine refuses becomes a 400 before any response byte is sent. A background task receives the engine's
messages and routes them.

Supervision: a reader on the process sentinel notices at once when the engine process exits (it is reaped, so
its exit code is known), and a watchdog notices when a ready engine stops sending messages (it sends stats at
least once a second, see server/engine_process.py) for longer than `stall_timeout` (SIGSTOP, a hung
collective...). Either way the engine is dead: every pending request fails with `EngineDeadError` (served as
503, or an error event on a stream), `ready` drops at once (/health 503), the engine's process group is killed
(its spawned tensor-parallel ranks with it), and `wait_dead()` returns, so that the server can `restart()` the
engine or exit (server/app.py decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
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


class ServerShuttingDown(EngineDeadError):
    """The server is draining and ended this request before it finished."""


class EngineStartupError(RuntimeError):
    pass


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


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
        stall_timeout: float = 0.0,
    ) -> None:
        self.engine_kwargs = dict(engine_kwargs)
        self.stall_timeout = stall_timeout  # seconds without a message from a ready engine; 0: not watched
        self.last_message = 0.0  # monotonic time of the engine's last message (its heartbeat)
        self.restarts = 0
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
        self._dead_event = asyncio.Event()
        self._pgid: int | None = None  # the engine's own process group (it calls setpgrp first thing)
        self._incarnation = 0
        self._watchdog_task: asyncio.Task | None = None
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
        self._sync_ctx = zmq.Context()
        self._ctx = zmq.asyncio.Context()
        self._spawn()
        if self.stall_timeout > 0:
            self._watchdog_task = asyncio.create_task(self._watchdog(), name="glint-engine-watchdog")

    def _spawn(self) -> None:
        """A fresh engine process on fresh sockets (nothing queued for a dead engine reaches the next one)."""
        self._incarnation += 1
        input_addr = f"ipc://{self._tmpdir}/input-{self._incarnation}.sock"
        output_addr = f"ipc://{self._tmpdir}/output-{self._incarnation}.sock"
        self._sender = self._sync_ctx.socket(zmq.PUSH)
        self._sender.setsockopt(zmq.SNDHWM, 0)
        self._sender.setsockopt(zmq.LINGER, 0)
        self._sender.bind(input_addr)
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

    async def restart(self) -> None:
        """Replace a dead engine process by a new one (its requests failed already); wait_ready() again."""
        self._kill_engine()
        await self._reap(5.0)
        await self._close_io()
        self.restarts += 1
        self.ready = False
        self.dead_reason = None
        self._startup_error = None
        self._death_reported = False
        self._pgid = None
        self.info, self.stats = {}, {}
        self._ready_event = asyncio.Event()
        self._dead_event = asyncio.Event()
        self._spawn()

    def kill(self, reason: str) -> None:
        """Declare the engine dead (its requests fail) and kill its processes."""
        self._mark_dead(reason)
        self._kill_engine()

    async def wait_dead(self) -> str:
        """Returns once the current engine process is dead (crashed, exited, stalled and killed)."""
        await self._dead_event.wait()
        return self.dead_reason or "the engine is gone"

    def fail_in_flight(self, exc: EngineDeadError) -> int:
        """End every request in flight with `exc` and abort them in the engine; returns how many."""
        ids = list(self._streams)
        self._fail_all(exc)
        for rid in ids:
            self._send_abort(rid)
        return len(ids)

    async def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        await asyncio.wait_for(self._ready_event.wait(), timeout)
        if self._startup_error is not None:
            raise EngineStartupError(self._startup_error)
        return self.info

    async def shutdown(self, timeout: float = 10.0) -> None:
        self._closing = True
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
            with contextlib.suppress(BaseException):
                await self._watchdog_task
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
                    self._kill_engine()
                    await self._reap(5.0)
            else:
                self._kill_engine()  # a dead engine's orphaned tensor-parallel ranks
            proc.join(0)
        self._fail_all(ServerShuttingDown("server is shutting down"))
        await self._close_io()
        if self._ctx is not None:
            self._ctx.term()
        if self._sync_ctx is not None:
            self._sync_ctx.term()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def _close_io(self) -> None:
        if self._recv_task is not None:
            self._recv_task.cancel()
            with contextlib.suppress(BaseException):
                await self._recv_task
            self._recv_task = None
        for sock in (self._sender, self._receiver):
            if sock is not None:
                sock.close(linger=0)
        self._sender = self._receiver = None

    def _kill_engine(self) -> None:
        """SIGKILL the engine's process group (the engine and the TP ranks it spawned), or the engine alone
        when it never reported its group. A stopped (SIGSTOP) process dies of SIGKILL too."""
        proc = self.process
        if proc is None:
            return
        pgid, self._pgid = self._pgid, None  # once: the group id could be reused after the group is gone
        if pgid is not None and pgid != os.getpgrp():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        if proc.exitcode is None:
            with contextlib.suppress(Exception):
                proc.kill()

    async def _reap(self, timeout: float) -> None:
        """Wait (without blocking the loop) until the engine process is reaped, so its exit code is known."""
        proc = self.process
        if proc is None:
            return
        deadline = time.monotonic() + timeout
        while proc.exitcode is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _watchdog(self) -> None:
        interval = min(1.0, self.stall_timeout / 4)
        strikes = 0
        while True:
            await asyncio.sleep(interval)
            if not self.ready or self.dead_reason is not None or self._closing:
                strikes = 0
                continue
            gap = time.monotonic() - self.last_message
            if gap <= self.stall_timeout:
                strikes = 0
                continue
            strikes += 1
            if strikes < 2:
                continue  # one more tick first: the receive task drains what queued while this loop was busy
            pid = self.process.pid if self.process is not None else None
            self._mark_dead(
                f"engine process {pid} stalled: no heartbeat for {gap:.1f}s "
                f"(--engine-stall-timeout {self.stall_timeout:g}); killed it"
            )
            self._kill_engine()
            await self._reap(5.0)

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
        self, request_id: str, prompt_token_ids: list[int], params: Any, prompt: str | None = None,
        tenant: str = "", disagg: Any = None,
    ) -> RequestStream:
        """disagg: the router's handover (engine.kv_connector.DisaggParams) on a prefill or decode instance."""
        if not self.ready or not self.alive:
            raise EngineDeadError(self.dead_reason or "the engine is not ready")
        if request_id in self._streams:
            raise EngineRequestError(f"duplicate request id {request_id!r}")
        stream = RequestStream(request_id, getattr(params, "n", 1) or 1)
        self._streams[request_id] = stream
        try:
            self._sender.send_pyobj(
                ("add", request_id, list(prompt_token_ids), params, prompt, tenant, disagg), flags=zmq.NOBLOCK
            )
        except zmq.ZMQError as e:
            self._streams.pop(request_id, None)
            raise EngineDeadError(f"cannot reach the engine process: {e}") from e
        self.num_unacked += 1
        try:
            await stream.ack
        except BaseException:
            if not stream.ack.done() or stream.ack.cancelled():
                self.abort(request_id)  # cancelled while waiting: the engine may still have taken it
            self._streams.pop(request_id, None)
            raise
        finally:
            self.num_unacked -= 1
        return stream

    def abort(self, request_id: str) -> None:
        """Idempotent. Only requests still in flight are sent to the engine: a finished one needs nothing, and
        one failed by an engine death belonged to an engine process that is gone."""
        if self._streams.pop(request_id, None) is not None:
            self._send_abort(request_id)

    def _send_abort(self, request_id: str) -> None:
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
            except Exception as e:  # a socket error or a message that does not unpickle
                if self._closing:
                    return
                # Nothing else reads the engine's messages: without this loop every open request would wait
                # for the stall watchdog (or forever with it off). Fail them now and let the server restart.
                self._mark_dead(f"lost the engine's message stream: {e!r}")
                self._kill_engine()
                return
            try:
                self._dispatch(msg)
            except Exception:
                logger.exception("error while routing an engine message")

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        self.last_message = time.monotonic()
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
        elif kind == "hello":
            if msg[1].get("pgid") == msg[1].get("pid"):
                self._pgid = int(msg[1]["pgid"])
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
        # The sentinel fires when the child closes its last descriptor, a moment before it can be reaped: wait
        # for that (briefly) so the exit code is known and no zombie stays behind.
        proc.join(1.0)
        self._kill_engine()  # tensor-parallel ranks it spawned would otherwise wait for it forever
        if self._closing:
            return
        how = describe_exit(proc.exitcode)
        if self._startup_error is None and not self.ready:
            self._startup_error = f"engine process exited during start-up ({how})"
            self._ready_event.set()
        self._mark_dead(self.dead_reason or f"engine process {proc.pid} exited unexpectedly ({how})")

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is None:
            self.dead_reason = reason
        self.ready = False
        self._dead_event.set()
        if not self._death_reported and not self._closing:
            self._death_reported = True
            logger.error("ENGINE DIED: %s", reason)
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

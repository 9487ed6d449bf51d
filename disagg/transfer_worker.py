"""Every TP rank's side of disaggregation: its KV shard registered with a transfer agent, and (prefill) a
transfer thread that posts page writes.

Async transfer: `after_forward(sends)` is called right after the rank enqueued the forward that writes those
pages; it records a CUDA event on the current stream and queues (event, sends). The thread waits for the event
(the GPU work is done, not the next step's launch) and posts one write per send. Sync transfer: rank 0's
connector sends `PostSends` after the step's tokens are on the host, and the write is posted then.
Rank 0 polls write states with `PollWrites` and cancels a room's writes with `CancelRoom`.

NIXL moves a write, and sends its notification once the data landed, only while the initiator polls it. The
engine polls once per step, which on a busy prefill instance is once per long prefill chunk (~150 ms at 8K
tokens); so the transfer thread also polls every write in flight, every `PROGRESS_S`, and a chunk's pages (and
the decode side's notification) do not wait for the prefill instance's next step.
"""
from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from disagg.kv_layout import KVPageRegions
from disagg.protocol import (
    AddPeer,
    CancelRoom,
    GetMetadata,
    PollWrites,
    PostSends,
    QueueSends,
    TakeNotifications,
    WriteStates,
    parse_notification,
    write_notification,
)
from disagg.transfer import NIXL_AVAILABLE, FailureKind, Status, TransferAgent, TransferHandle, create_transfer_agent
from disagg.transfer_base import FailedHandle
from engine.config import DisaggregationConfig, EngineConfig
from engine.kv_connector import KVConnectorWorker, KVSend

log = logging.getLogger(__name__)

PROGRESS_S = 0.001  # how often the transfer thread polls the writes in flight
# Async prefill: the transfer thread needs the GIL to post and poll writes while the scheduler thread launches
# the next chunk; at CPython's default 5 ms switch interval each of its turns can wait that long (session 12
# measured 5.9 ms from the pages being written to their write posted, 0.7 ms with sync transfer).
ASYNC_SWITCH_INTERVAL_S = 0.0005
_WAKE: tuple[Any, list[KVSend], float] = (None, [], 0.0)  # a write was posted by another thread: poll it now


@dataclass
class _Write:
    room: int
    seq: int
    handle: TransferHandle
    posted_at: float  # time.perf_counter() when the write was posted


@dataclass
class _Timings:
    """Where a rank's writes spent their time (seconds, summed over writes; reported and reset by PollWrites):
    waiting for the GPU work that wrote the pages (async: queued -> CUDA event done), waiting to be posted (that
    -> the write posted: the transfer thread waiting for the GIL or the lock), and in flight (posted -> the first
    poll that saw it done)."""

    gpu_wait: float = 0.0
    post_delay: float = 0.0
    flight: float = 0.0
    done: int = 0

    def take(self) -> tuple[float, float, float, int]:
        out = (self.gpu_wait, self.post_delay, self.flight, self.done)
        self.gpu_wait = self.post_delay = self.flight = 0.0
        self.done = 0
        return out


def resolve_backend(name: str) -> str:
    return ("nixl" if NIXL_AVAILABLE else "local") if name == "auto" else name


class TransferWorker(KVConnectorWorker):
    def __init__(self, config: DisaggregationConfig) -> None:
        self.config = config
        self.backend = resolve_backend(config.transfer_backend)
        self.agent: TransferAgent | None = None
        self.rank = 0
        self._peers: dict[str, str] = {}  # peer instance -> its agent's name (this rank's counterpart)
        self._lock = threading.Lock()
        self._writes: list[_Write] = []  # pending or unreported
        self._timings = _Timings()
        self._cancelled: set[int] = set()
        self._queued = 0  # sends handed to the transfer thread, not posted yet (they count as in flight)
        self._queue: queue.Queue[tuple[Any, list[KVSend], float] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def register(self, kv_caches: dict[int, tuple[Any, Any]], rank: int) -> None:
        self.rank = rank
        regions = KVPageRegions.from_kv_caches(kv_caches)
        name = f"{self.config.mode}-{uuid.uuid4().hex[:12]}-tp{rank}"
        self.agent = create_transfer_agent(self.backend, name, regions)
        if self.config.mode == "prefill":
            if self.config.async_transfer:
                sys.setswitchinterval(min(sys.getswitchinterval(), ASYNC_SWITCH_INTERVAL_S))
            self._thread = threading.Thread(target=self._send_loop, name=f"kv-send-tp{rank}", daemon=True)
            self._thread.start()

    # -- control messages from rank 0 ---------------------------------------------------------------
    def handle(self, message: Any) -> Any:
        if isinstance(message, GetMetadata):
            return self.agent.metadata()
        if isinstance(message, AddPeer):
            name = self.agent.add_peer(message.metadata[self.rank])
            self._peers[message.instance] = name
            return name
        if isinstance(message, PostSends):
            if torch.cuda.is_available() and self.agent.regions.device.type == "cuda":
                torch.cuda.current_stream(self.agent.regions.device).synchronize()
            ready = time.perf_counter()
            for send in message.sends:
                self._post(send, ready)
            self._queue.put(_WAKE)
            return None
        if isinstance(message, QueueSends):
            self.after_forward(list(message.sends))
            return None
        if isinstance(message, PollWrites):
            return self._poll()
        if isinstance(message, CancelRoom):
            return self._cancel(message.room)
        if isinstance(message, TakeNotifications):
            notes = (parse_notification(n.message) for n in self.agent.take_notifications())
            return [n for n in notes if n is not None]
        raise TypeError(f"unknown connector message {message!r}")

    def after_forward(self, sends: list[KVSend]) -> None:
        event = None
        if self.agent.regions.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.agent.regions.device))
        with self._lock:
            self._queued += len(sends)
        self._queue.put((event, list(sends), time.perf_counter()))

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None
        if self.agent is not None:
            self.agent.close()
            self.agent = None

    # -- internals ----------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=PROGRESS_S if self._progress() else None)
            except queue.Empty:
                continue
            if item is None:
                return
            event, sends, queued_at = item
            if event is not None:
                event.synchronize()  # the forward that wrote these pages has run
            ready = time.perf_counter()
            if sends:
                with self._lock:
                    self._timings.gpu_wait += (ready - queued_at) * len(sends)
            for send in sends:
                try:
                    self._post(send, ready)
                except Exception:  # a bug in one send must not kill the thread (the room fails by deadline)
                    log.exception("posting KV write of room %d failed", send.room)
                finally:
                    with self._lock:
                        self._queued -= 1

    def _post(self, send: KVSend, ready: float) -> None:
        """ready: when the pages were written (the GPU work done), for the post-delay timing."""
        with self._lock:
            if send.room in self._cancelled:
                return
            peer = self._peers.get(send.peer, send.peer)
            timeout = max(send.deadline - time.monotonic(), 0.001)
            try:
                handle = self.agent.write(peer, send.src_pages, send.dst_pages,
                                          notification=write_notification(send.room, send.seq), timeout_s=timeout)
            except ValueError as exc:  # the peer's Reserve named pages outside its pool: fail the room, not us
                handle = FailedHandle(peer, FailureKind.ERROR, str(exc))
            now = time.perf_counter()
            self._timings.post_delay += now - ready
            self._writes.append(_Write(send.room, send.seq, handle, now))

    def _sweep(self, drop_failed: bool) -> tuple[list[tuple[int, str]], bool]:
        """Poll every write (that is what moves it; call under the lock). Writes seen done leave the list, their
        flight time counted; failed ones are returned, and leave it only with drop_failed. Returns (failures,
        whether any write is still going)."""
        failed, keep, going = [], [], False
        now = time.perf_counter()
        for w in self._writes:
            st = w.handle.poll()
            if st.done:
                self._timings.flight += now - w.posted_at
                self._timings.done += 1
                continue
            if st.failed:
                failed.append((w.room, f"KV write to the decode instance failed ({st.kind.value}: {st.reason})"))
                if drop_failed:
                    continue
            going |= not st.failed
            keep.append(w)
        self._writes = keep
        return failed, going

    def _progress(self) -> bool:
        """The transfer thread's poll: True while any write is still going (failed ones stay for _poll)."""
        with self._lock:
            return self._sweep(drop_failed=False)[1]

    def _poll(self) -> WriteStates:
        with self._lock:
            failed, _ = self._sweep(drop_failed=True)
            return WriteStates(tuple(failed), len(self._writes) + self._queued, self._timings.take())

    def _cancel(self, room: int) -> int:
        """Stop the room's writes: queued ones are never posted; posted ones run on until done or failed (their
        deadline), since releasing a handle does not stop bytes already on their way into the peer's pages.
        Returns how many are still in flight (the peer may reuse its pages once none is)."""
        with self._lock:
            self._cancelled.add(room)
            if len(self._cancelled) > 100_000:
                self._cancelled = {room}
            return sum(1 for w in self._writes if w.room == room and w.handle.poll().status is Status.PENDING)


def build_transfer_worker(config: EngineConfig, rank: int) -> TransferWorker:
    """The KVWorkerFactory every rank calls (module-level: picklable for spawned ranks)."""
    return TransferWorker(config.disaggregation)

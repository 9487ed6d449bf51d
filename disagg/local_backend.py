"""In-tree fallback transfer agent over TCP sockets, for machines without NIXL. Same interface and semantics as
the NIXL agent (one write per request, notification after the data, deadline, typed failures), but it copies
through the host: the sender gathers the pages (region-major) into one buffer, the receiver's thread scatters
them into its pool (through a host staging buffer for CUDA pools) and then acknowledges.

Threads: the receiver has a listener and one reader per inbound connection; the sender has, per peer, one
thread that sends queued writes in order and one that reads acknowledgements. A write whose deadline passes
while it is stuck in the socket (a hung peer) drops the connection: the next write reconnects, and the receiver
discards the half-read frame when the old connection dies.
"""
from __future__ import annotations

import collections
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from disagg import wire
from disagg.kv_layout import KVPageRegions
from disagg.transfer_base import (
    DONE,
    PENDING,
    FailedHandle,
    FailureKind,
    Notification,
    Status,
    TransferAgent,
    TransferHandle,
    TransferState,
    check_layout,
)

_HELLO = struct.Struct("<8sI")  # magic, name length; then the sender's name
_MAGIC = b"GLINTKV1"
_FRAME = struct.Struct("<QII")  # transfer id, number of pages, notification length; then pages, notif, payload
_ACK = struct.Struct("<QBI")  # transfer id, ok, error message length; then the message
_STAGING_BYTES = 8 << 20
_IO_SLICE_S = 0.1  # socket timeout slice: how often a blocked send re-checks deadline / removal


class _Closed(Exception):
    pass


def _recv_exact(sock: socket.socket, view: memoryview, alive: Callable[[], bool] | None = None) -> None:
    """Fill view; on a socket with a timeout, keep waiting while alive() says so."""
    got = 0
    while got < len(view):
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            if alive is None or alive():
                continue
            raise _Closed("stopped waiting") from None
        if n == 0:
            raise _Closed("connection closed")
        got += n


def _recv_bytes(sock: socket.socket, n: int, alive: Callable[[], bool] | None = None) -> bytes:
    buf = bytearray(n)
    _recv_exact(sock, memoryview(buf), alive)
    return bytes(buf)


def _shutdown(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class _LocalHandle(TransferHandle):
    def __init__(self, peer: str, deadline: float, forget: Callable[[], None]) -> None:
        super().__init__(peer, deadline)
        self.result: TransferState = PENDING  # set by the peer's threads
        self._forget = forget

    def _check(self) -> TransferState:
        return self.result

    def _release_engine(self, st: TransferState) -> None:
        self._forget()  # a queued job is dropped; one stuck mid-send is abandoned by the sender thread


class _Job:
    def __init__(self, xid: int, handle: _LocalHandle, src: np.ndarray, dst: np.ndarray, notif: bytes) -> None:
        self.xid, self.handle, self.src, self.dst, self.notif = xid, handle, src, dst, notif

    def finish(self, st: TransferState) -> None:
        if self.handle.result.status is Status.PENDING:
            self.handle.result = st


class _Peer:
    """Sending side of one peer: a queue, a sender thread, the current connection and its ack reader."""

    def __init__(self, agent: LocalTransferAgent, md: dict[str, Any]) -> None:
        self.agent = agent
        self.name: str = md["name"]
        self.addr = (md["host"], md["port"])
        self.num_pages: int = md["num_pages"]
        self.cv = threading.Condition()
        self.queue: collections.deque[_Job] = collections.deque()
        self.in_flight: dict[int, _Job] = {}  # sent, waiting for the ack
        self.sock: socket.socket | None = None
        self.removed = False
        threading.Thread(target=self._send_loop, name=f"kv-send-{self.name}", daemon=True).start()

    def submit(self, job: _Job) -> None:
        with self.cv:
            self.queue.append(job)
            self.cv.notify()

    def forget(self, xid: int) -> None:
        with self.cv:
            self.in_flight.pop(xid, None)
            for j in self.queue:
                if j.xid == xid:
                    self.queue.remove(j)
                    break

    def count(self) -> int:
        with self.cv:
            return len(self.queue) + len(self.in_flight)

    def remove(self) -> list[_Job]:
        with self.cv:
            self.removed = True
            jobs = [*self.queue, *self.in_flight.values()]
            self.queue.clear()
            self.in_flight.clear()
            sock, self.sock = self.sock, None
            self.cv.notify()
        _shutdown(sock)
        return jobs

    def _drop_connection(self, sock: socket.socket, reason: str) -> None:
        """Fail everything sent on `sock` and forget it (the next write reconnects)."""
        with self.cv:
            if self.sock is sock:
                self.sock = None
            jobs = list(self.in_flight.values())
            self.in_flight.clear()
        _shutdown(sock)
        for j in jobs:
            j.finish(TransferState(Status.FAILED, FailureKind.PEER_DISCONNECTED, reason))

    def _connect(self, deadline: float) -> socket.socket:
        s = socket.create_connection(self.addr, timeout=max(0.05, min(2.0, deadline - time.monotonic())))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        name = self.agent.name.encode()
        s.sendall(_HELLO.pack(_MAGIC, len(name)) + name)
        s.settimeout(_IO_SLICE_S)  # for good: the sender and the ack reader share it (timeouts are per socket)
        return s

    def _send_loop(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.removed:
                    self.cv.wait()
                if self.removed:
                    return
                job = self.queue.popleft()
                sock = self.sock
            if job.handle.state.status is not Status.PENDING:
                continue  # already failed (deadline / release) while queued
            if sock is None:
                try:
                    sock = self._connect(job.handle.deadline)
                except OSError as e:
                    job.finish(TransferState(Status.FAILED, FailureKind.PEER_DISCONNECTED, f"cannot connect: {e}"))
                    continue
                with self.cv:
                    if self.removed:
                        _shutdown(sock)
                        return
                    self.sock = sock
                threading.Thread(target=self._ack_loop, args=(sock,), name=f"kv-ack-{self.name}", daemon=True).start()
            try:
                payload = self.agent.gather_pages(job.src)
            except Exception as e:  # noqa: BLE001 - e.g. a CUDA error: fail this write, keep the thread
                job.finish(TransferState(Status.FAILED, FailureKind.ERROR, f"gather failed: {e}"))
                continue
            if len(payload) > 1:  # many small per-layer parts: one send, not one per region
                payload = [np.concatenate(payload)]
            head = _FRAME.pack(job.xid, job.dst.size, len(job.notif)) + job.dst.astype("<i8").tobytes() + job.notif
            with self.cv:  # forget() (handle released) takes cv too: either it sees the entry or we see the state
                if job.handle.state.status is not Status.PENDING:
                    continue
                self.in_flight[job.xid] = job
            try:
                for part in (head, *payload):
                    self._send_all(sock, memoryview(part).cast("B"), job)
            except (OSError, _Closed) as e:
                job.finish(TransferState(Status.FAILED, FailureKind.PEER_DISCONNECTED, f"send failed: {e}"))
                self._drop_connection(sock, f"connection dropped: {e}")

    def _send_all(self, sock: socket.socket, view: memoryview, job: _Job) -> None:
        while len(view):
            try:
                view = view[sock.send(view):]
            except TimeoutError:
                if self.removed:
                    raise _Closed("peer removed") from None
                if time.monotonic() >= job.handle.deadline or job.handle.state.status is not Status.PENDING:
                    job.finish(TransferState(Status.FAILED, FailureKind.DEADLINE, "peer stopped reading"))
                    raise _Closed("a write was stuck past its deadline") from None

    def _ack_loop(self, sock: socket.socket) -> None:
        def alive() -> bool:
            return not self.removed and self.sock is sock

        try:
            while True:
                xid, ok, n = _ACK.unpack(_recv_bytes(sock, _ACK.size, alive))
                msg = _recv_bytes(sock, n, alive).decode(errors="replace")
                with self.cv:
                    job = self.in_flight.pop(xid, None)
                if job is not None:
                    job.finish(DONE if ok else TransferState(Status.FAILED, FailureKind.ERROR, msg))
        except (OSError, _Closed, struct.error) as e:
            if not self.removed:
                self._drop_connection(sock, f"peer disconnected: {e}")


class LocalTransferAgent(TransferAgent):
    backend = "local"

    def __init__(self, name: str, regions: KVPageRegions, host: str = "127.0.0.1") -> None:
        super().__init__(name, regions)
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        self._notifs: collections.deque[Notification] = collections.deque()
        self._inbound: set[socket.socket] = set()
        self._next_id = 0
        self._closed = False
        self._listener = socket.create_server((host, 0))
        self._addr = self._listener.getsockname()[:2]
        threading.Thread(target=self._accept_loop, name=f"kv-listen-{name}", daemon=True).start()

    # -- setup ----------------------------------------------------------------------------------------------
    def metadata(self) -> bytes:
        return pickle.dumps({"backend": self.backend, "name": self.name, "host": self._addr[0],
                             "port": self._addr[1], "page_bytes": self.regions.page_bytes,
                             "num_pages": self.regions.num_pages})

    def add_peer(self, metadata: bytes) -> str:
        md: dict[str, Any] = wire.loads(metadata)
        if md.get("backend") != self.backend:
            raise ValueError(f"peer metadata is for backend {md.get('backend')!r}, not {self.backend!r}")
        check_layout(self.regions, md["page_bytes"], md["name"])
        self.remove_peer(md["name"])
        with self._lock:
            self._peers[md["name"]] = _Peer(self, md)
        return md["name"]

    def remove_peer(self, peer: str) -> None:
        with self._lock:
            p = self._peers.pop(peer, None)
        if p is None:
            return
        for j in p.remove():
            j.handle.fail(FailureKind.PEER_REMOVED, f"peer {peer!r} removed")

    def peer_num_pages(self, peer: str) -> int | None:
        p = self._peers.get(peer)
        return None if p is None else p.num_pages

    # -- sending --------------------------------------------------------------------------------------------
    def _post(self, peer: str, src: np.ndarray, dst: np.ndarray, notification: bytes,
              deadline: float) -> TransferHandle:
        with self._lock:
            p = self._peers.get(peer)
            self._next_id += 1
            xid = self._next_id
        if p is None:
            return FailedHandle(peer, FailureKind.PEER_REMOVED, f"unknown peer {peer!r}")
        h = _LocalHandle(peer, deadline, lambda: p.forget(xid))
        p.submit(_Job(xid, h, src, dst, notification))
        return h

    def gather_pages(self, src: np.ndarray) -> list[np.ndarray]:
        """The registered regions' rows `src` (pages), one flat host array per region: what a write sends."""
        if self.regions.device.type == "cpu":  # numpy's row gather: ~6x torch's uint8 index_select here
            return [r.numpy()[src].reshape(-1) for r in self.regions.regions]
        idx = torch.from_numpy(src).to(self.regions.device)
        return [r.index_select(0, idx).cpu().reshape(-1).numpy() for r in self.regions.regions]

    def num_in_flight(self) -> int:
        with self._lock:
            peers = list(self._peers.values())
        return sum(p.count() for p in peers)

    # -- receiving ------------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    _shutdown(conn)
                    return
                self._inbound.add(conn)
            threading.Thread(target=self._recv_loop, args=(conn,), name=f"kv-recv-{self.name}", daemon=True).start()

    def _recv_loop(self, conn: socket.socket) -> None:
        staging = torch.empty(_STAGING_BYTES, dtype=torch.uint8)
        try:
            magic, n = _HELLO.unpack(_recv_bytes(conn, _HELLO.size))
            if magic != _MAGIC:
                return
            sender = _recv_bytes(conn, n).decode()
            while True:
                xid, npages, nnotif = _FRAME.unpack(_recv_bytes(conn, _FRAME.size))
                dst = np.frombuffer(_recv_bytes(conn, 8 * npages), dtype="<i8").astype(np.int64)
                notif = _recv_bytes(conn, nnotif)
                err = ""
                if npages and (dst.min() < 0 or dst.max() >= self.regions.num_pages):
                    err = f"destination page out of range [0, {self.regions.num_pages})"
                for region in self.regions.regions:
                    staging = self._scatter(conn, region, dst, staging, write=not err)
                if self.regions.device.type == "cuda":
                    torch.cuda.current_stream(self.regions.device).synchronize()
                if not err:
                    self._notifs.append(Notification(sender, notif))
                msg = err.encode()
                conn.sendall(_ACK.pack(xid, 0 if err else 1, len(msg)) + msg)
        except (OSError, _Closed, struct.error, UnicodeDecodeError):
            pass  # sender gone or stream cut mid-frame: drop what was half-read
        finally:
            with self._lock:
                self._inbound.discard(conn)
            _shutdown(conn)

    def _scatter(self, conn: socket.socket, region: torch.Tensor, dst: np.ndarray, staging: torch.Tensor,
                 write: bool) -> torch.Tensor:
        pb = region.shape[1]
        if staging.numel() < pb:
            staging = torch.empty(pb, dtype=torch.uint8)
        per = staging.numel() // pb
        host = region.numpy() if region.device.type == "cpu" else None
        for i in range(0, dst.size, per):
            rows = dst[i:i + per]
            chunk = staging[:rows.size * pb]
            _recv_exact(conn, memoryview(chunk.numpy()).cast("B"))
            if not write:
                continue
            if host is not None:  # numpy's row scatter (torch's uint8 index_put is ~8x slower on CPU)
                host[rows] = chunk.numpy().reshape(rows.size, pb)
            else:
                region.index_copy_(0, torch.from_numpy(rows).to(region.device), chunk.view(rows.size, pb).to(region.device))
        return staging

    def take_notifications(self) -> list[Notification]:
        out = []
        while self._notifs:
            out.append(self._notifs.popleft())
        return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            peers = list(self._peers)
            inbound = list(self._inbound)
        for peer in peers:
            self.remove_peer(peer)
        _shutdown(self._listener)
        for c in inbound:
            _shutdown(c)

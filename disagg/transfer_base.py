"""The KV page transfer interface every backend implements (NIXL, the in-tree socket fallback).

One agent per process and TP rank registers its KV pool once (KVPageRegions), exposes picklable metadata for the
peer (sent over the caller's own control channel), adds peers from their metadata, and then per request posts
ONE write naming page indices (src pages here -> dst pages there) that moves every region of those pages, with a
notification delivered to the target after the data. The caller polls without blocking; every transfer has a
deadline after which it is released and reported failed. Failures are values (a failed handle), not exceptions:
only caller bugs (bad page indices, a metadata layout that does not match) raise.
"""
from __future__ import annotations

import abc
import enum
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from disagg.kv_layout import KVPageRegions


class Status(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class FailureKind(enum.Enum):
    PEER_DISCONNECTED = "peer_disconnected"  # the peer died or closed its end (typed error from the engine)
    DEADLINE = "deadline"  # still not done at its deadline (a hung peer is never reported otherwise)
    PEER_REMOVED = "peer_removed"  # the peer was removed (or never added) before the transfer finished
    ERROR = "error"  # any other engine error


@dataclass(frozen=True)
class TransferState:
    status: Status
    kind: FailureKind | None = None
    reason: str = ""

    @property
    def done(self) -> bool:
        return self.status is Status.DONE

    @property
    def failed(self) -> bool:
        return self.status is Status.FAILED


PENDING = TransferState(Status.PENDING)
DONE = TransferState(Status.DONE)


class TransferError(Exception):
    """A setup error that cannot be a transfer's state (e.g. a peer's pool layout does not match ours)."""


class LayoutMismatch(TransferError):
    pass


@dataclass(frozen=True)
class Notification:
    peer: str  # the sending agent's name
    message: bytes


class TransferHandle(abc.ABC):
    """One posted write. poll() never blocks; once DONE or FAILED the engine's resources are released and the
    state stays final. release() gives up on a pending transfer early (reported FAILED/ERROR "released")."""

    def __init__(self, peer: str, deadline: float) -> None:
        self.peer = peer
        self.deadline = deadline  # time.monotonic() seconds
        self._state = PENDING
        self._lock = threading.Lock()

    @property
    def state(self) -> TransferState:
        return self._state

    def poll(self) -> TransferState:
        with self._lock:
            if self._state.status is Status.PENDING:
                st = self._check()
                if st.status is Status.PENDING and time.monotonic() >= self.deadline:
                    st = TransferState(Status.FAILED, FailureKind.DEADLINE, "transfer not done by its deadline")
                if st.status is not Status.PENDING:
                    self._finish(st)
            return self._state

    def fail(self, kind: FailureKind, reason: str) -> None:
        """End a pending transfer as failed (peer removal, release, engine shutdown)."""
        with self._lock:
            if self._state.status is Status.PENDING:
                self._finish(TransferState(Status.FAILED, kind, reason))

    def release(self) -> None:
        self.fail(FailureKind.ERROR, "released by the caller")

    def _finish(self, st: TransferState) -> None:
        self._state = st
        self._release_engine(st)

    @abc.abstractmethod
    def _check(self) -> TransferState:
        """The engine's view: PENDING, DONE or FAILED (called under the lock while pending)."""

    @abc.abstractmethod
    def _release_engine(self, st: TransferState) -> None:
        """Free the engine's request (cancel it if still in flight); must not block."""


class FailedHandle(TransferHandle):
    """A transfer that failed before it was posted (unknown peer, engine refused it)."""

    def __init__(self, peer: str, kind: FailureKind, reason: str) -> None:
        super().__init__(peer, 0.0)
        self._state = TransferState(Status.FAILED, kind, reason)

    def _check(self) -> TransferState:
        return self._state

    def _release_engine(self, st: TransferState) -> None:
        pass


class TransferAgent(abc.ABC):
    """One per process and TP rank; see the module docstring. Thread-safe: the scheduler loop and a transfer
    thread may call it concurrently."""

    backend: str

    def __init__(self, name: str, regions: KVPageRegions) -> None:
        self.name = name
        self.regions = regions

    @abc.abstractmethod
    def metadata(self) -> bytes:
        """Picklable bytes the peer passes to add_peer (carries the pool layout and the engine's address)."""

    @abc.abstractmethod
    def add_peer(self, metadata: bytes) -> str:
        """Make a peer writable; returns its name. Re-adding a known name replaces it (a restarted peer)."""

    @abc.abstractmethod
    def remove_peer(self, peer: str) -> None:
        """Fail the peer's pending transfers (PEER_REMOVED), forget it, disconnect. Returns at once."""

    @abc.abstractmethod
    def _post(self, peer: str, src: np.ndarray, dst: np.ndarray, notification: bytes,
              deadline: float) -> TransferHandle:
        """Post one write of src pages (local) to dst pages (peer's); arrays validated int64."""

    @abc.abstractmethod
    def peer_num_pages(self, peer: str) -> int | None:
        """The peer's pool size in pages, None if the peer is unknown."""

    @abc.abstractmethod
    def take_notifications(self) -> list[Notification]:
        """Notifications of writes into OUR pool that have fully landed, oldest first (each returned once)."""

    @abc.abstractmethod
    def num_in_flight(self) -> int:
        """Engine requests not yet released (for leak checks)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Remove every peer and release the engine; the agent is unusable afterwards."""

    def write(self, peer: str, src_pages: Sequence[int] | np.ndarray, dst_pages: Sequence[int] | np.ndarray,
              notification: bytes = b"", timeout_s: float = 30.0) -> TransferHandle:
        """Post one transfer: every region of local page src_pages[i] -> the peer's page dst_pages[i].
        Pass pages in block-table order: runs adjacent on both sides move as one descriptor."""
        src = np.asarray(src_pages, dtype=np.int64).reshape(-1)
        dst = np.asarray(dst_pages, dtype=np.int64).reshape(-1)
        if src.shape != dst.shape:
            raise ValueError(f"{src.size} source pages but {dst.size} destination pages")
        if src.size and (src.min() < 0 or src.max() >= self.regions.num_pages):
            raise ValueError(f"source page out of range [0, {self.regions.num_pages})")
        n_remote = self.peer_num_pages(peer)
        if n_remote is None:
            return FailedHandle(peer, FailureKind.PEER_REMOVED, f"unknown peer {peer!r}")
        if dst.size and (dst.min() < 0 or dst.max() >= n_remote):
            raise ValueError(f"destination page out of range [0, {n_remote})")
        return self._post(peer, src, dst, bytes(notification), time.monotonic() + timeout_s)


def check_layout(ours: KVPageRegions, page_bytes: list[int], peer: str) -> None:
    if list(page_bytes) != ours.page_bytes:
        raise LayoutMismatch(
            f"peer {peer!r} has regions of {page_bytes} bytes per page, we have {ours.page_bytes} "
            "(same model, TP head layout, KV dtype, block size and pool layout are required on both sides)")

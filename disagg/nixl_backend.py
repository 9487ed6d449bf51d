"""NIXL (UCX) transfer agent: the production path (nixl-cu13 on PyPI; same code for host and CUDA memory).

We drive NIXL's pybind layer (`nixl_cuXX._bindings`) rather than its Python wrapper because the wrapper pins the
progress thread's delay to 0: a spinning thread per agent. On our 2-core machine (two agents, one page of 368 KiB,
median of 40): delay 0 us -> 0.2 core per idle agent and 3-12 ms per transfer (the spinners starve the rest);
1, 100, 1000 or 3000 us -> 0.01-0.02 core idle and 0.15-0.3 ms. Facts this file relies on
(shared/reference/kv_transfer.md, re-checked here):
* one prepared descriptor list per side, built once: entry r * num_pages + p is page p of region r; a request
  names indices, and NIXL merges entries adjacent on both sides into one descriptor;
* the agent runs in STRICT sync mode, so a transfer thread and the scheduler loop may share it;
* a peer killed with SIGKILL surfaces as nixlRemoteDisconnectError; a hung (SIGSTOPped) peer is never reported,
  so the deadline in TransferHandle.poll is the only way such a transfer ends;
* UCX reads its environment when the agent is created: loopback tests want UCX_NET_DEVICES=lo, a single GPU
  without NVLink wants UCX_CUDA_IPC_ENABLE_GET_ZCOPY=yes (else CUDA-IPC reads fall back to TCP, 0.5 GB/s).
* VRAM: register the page-major pool (one allocation). On the H200, a per-layer pool of 184 small tensors failed
  at the first write (UCX cuda_ipc "cuMemcpyDtoDAsync ... invalid argument"), probably because the caching
  allocator packs several of them into one CUDA segment; CUDA IPC also does not work on memory from
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.
"""
from __future__ import annotations

import contextlib
import pickle
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

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

try:
    import nixl_cu13._bindings as nixl_bind
except ImportError:
    try:
        import nixl_cu12._bindings as nixl_bind
    except ImportError:
        nixl_bind = None

NIXL_AVAILABLE = nixl_bind is not None
# the typed errors the bindings raise (NIXL_ERR_* statuses); anything else is a bug and propagates
NIXL_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(nixl_bind, n) for n in dir(nixl_bind) if n.startswith("nixl") and n.endswith("Error")
) if NIXL_AVAILABLE else ()
DEFAULT_PROGRESS_DELAY_US = 100


def _failure_of(exc: BaseException) -> tuple[FailureKind, str]:
    if NIXL_AVAILABLE and isinstance(exc, nixl_bind.nixlRemoteDisconnectError):
        return FailureKind.PEER_DISCONNECTED, f"peer disconnected ({exc})"
    return FailureKind.ERROR, f"{type(exc).__name__}: {exc}"


def _descriptors(layout: list[tuple[int, int, int]], num_pages: int, device_id: int) -> np.ndarray:
    """Nx3 (address, length, device) rows: row r * num_pages + p = page p of region r."""
    pages = np.arange(num_pages, dtype=np.uint64)
    rows = [np.stack([np.uint64(base) + pages * np.uint64(stride), np.full(num_pages, pb, dtype=np.uint64),
                      np.full(num_pages, device_id, dtype=np.uint64)], axis=1)
            for base, stride, pb in layout]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def _indices(pages: np.ndarray, num_regions: int, num_pages: int) -> np.ndarray:
    return (np.arange(num_regions, dtype=np.int64)[:, None] * num_pages + pages[None, :]).reshape(-1).astype(np.int32)


@dataclass
class _Peer:
    name: str
    dlist: int  # prepared remote descriptor list handle
    num_pages: int
    handles: set[_NixlHandle]


class _NixlHandle(TransferHandle):
    def __init__(self, agent: NixlTransferAgent, peer: str, req: int, deadline: float) -> None:
        super().__init__(peer, deadline)
        self._agent = agent
        self._req = req

    def post(self, notification: bytes) -> None:
        with self._lock:  # a concurrent remove_peer releases the request under this lock: never both
            if self._state.status is not Status.PENDING:
                return
            try:
                st = self._agent._nixl.postXferReq(self._req, notification)
            except NIXL_ERRORS as e:
                self._finish(TransferState(Status.FAILED, *_failure_of(e)))
                return
            if st != nixl_bind.NIXL_SUCCESS and st != nixl_bind.NIXL_IN_PROG:
                self._finish(TransferState(Status.FAILED, FailureKind.ERROR, f"NIXL post status {st}"))

    def _check(self) -> TransferState:
        try:
            st = self._agent._nixl.getXferStatus(self._req)
        except NIXL_ERRORS as e:  # the bindings raise typed errors (disconnect, backend error)
            return TransferState(Status.FAILED, *_failure_of(e))
        if st == nixl_bind.NIXL_SUCCESS:
            return DONE
        if st == nixl_bind.NIXL_IN_PROG:
            return PENDING
        return TransferState(Status.FAILED, FailureKind.ERROR, f"NIXL status {st}")

    def _release_engine(self, st: TransferState) -> None:
        self._agent._release_request(self)


class NixlTransferAgent(TransferAgent):
    backend = "nixl"

    def __init__(self, name: str, regions: KVPageRegions, progress_delay_us: int = DEFAULT_PROGRESS_DELAY_US,
                 backend_params: dict[str, str] | None = None) -> None:
        if not NIXL_AVAILABLE:
            raise RuntimeError("NIXL is not installed (pip install nixl-cu13)")
        super().__init__(name, regions)
        cfg = nixl_bind.nixlAgentConfig()
        cfg.useProgThread = True
        cfg.useListenThread = False  # metadata travels over the caller's control channel
        cfg.syncMode = nixl_bind.NIXL_THREAD_SYNC_STRICT
        cfg.pthrDelay = int(progress_delay_us)
        cfg.captureTelemetry = False
        self._nixl = nixl_bind.nixlAgent(name, cfg)
        self._ucx = self._nixl.createBackend("UCX", dict(backend_params or {}))
        dev = regions.device
        self._mem = nixl_bind.VRAM_SEG if dev.type == "cuda" else nixl_bind.DRAM_SEG
        self._dev_id = (dev.index or 0) if dev.type == "cuda" else 0
        self._reg = nixl_bind.nixlRegDList(self._mem, [(a, n, self._dev_id, "") for a, n in regions.spans()])
        self._nixl.registerMem(self._reg, [self._ucx])
        local = _descriptors(regions.layout(), regions.num_pages, self._dev_id)
        self._local = self._nixl.prepXferDlist(nixl_bind.NIXL_INIT_AGENT, nixl_bind.nixlXferDList(self._mem, local),
                                               [self._ucx])
        self._lock = threading.RLock()
        self._peers: dict[str, _Peer] = {}
        self._stuck: list[int] = []  # requests NIXL refused to release (still active); retried later
        self._closed = False

    # -- setup ----------------------------------------------------------------------------------------------
    def metadata(self) -> bytes:
        return pickle.dumps({
            "backend": self.backend, "name": self.name, "nixl": self._nixl.getLocalMD(),
            "mem": "VRAM" if self._mem == nixl_bind.VRAM_SEG else "DRAM", "device": self._dev_id,
            "layout": self.regions.layout(), "num_pages": self.regions.num_pages,
        })

    def add_peer(self, metadata: bytes) -> str:
        md: dict[str, Any] = wire.loads(metadata)
        if md.get("backend") != self.backend:
            raise ValueError(f"peer metadata is for backend {md.get('backend')!r}, not {self.backend!r}")
        check_layout(self.regions, [pb for _, _, pb in md["layout"]], md["name"])
        mem = nixl_bind.VRAM_SEG if md["mem"] == "VRAM" else nixl_bind.DRAM_SEG
        with self._lock:
            if md["name"] in self._peers:
                self.remove_peer(md["name"])
            raw = self._nixl.loadRemoteMD(md["nixl"])
            name = raw.decode() if isinstance(raw, bytes) else raw
            rows = _descriptors(md["layout"], md["num_pages"], md["device"])
            dlist = self._nixl.prepXferDlist(name, nixl_bind.nixlXferDList(mem, rows), [self._ucx])
            self._peers[name] = _Peer(name, dlist, md["num_pages"], set())
            return name

    def remove_peer(self, peer: str) -> None:
        with self._lock:
            p = self._peers.pop(peer, None)
        if p is None:
            return
        for h in list(p.handles):  # outside our lock: a handle takes its own lock, then ours
            h.fail(FailureKind.PEER_REMOVED, f"peer {peer!r} removed")
        with self._lock:
            self._retry_stuck()
            self._nixl.releasedDlistH(p.dlist)
            with contextlib.suppress(*NIXL_ERRORS):  # already gone on the engine side
                self._nixl.invalidateRemoteMD(peer)

    def peer_num_pages(self, peer: str) -> int | None:
        p = self._peers.get(peer)
        return None if p is None else p.num_pages

    # -- transfers ------------------------------------------------------------------------------------------
    def _post(self, peer: str, src: np.ndarray, dst: np.ndarray, notification: bytes,
              deadline: float) -> TransferHandle:
        nreg = len(self.regions.regions)
        with self._lock:
            p = self._peers.get(peer)
            if p is None:
                return FailedHandle(peer, FailureKind.PEER_REMOVED, f"unknown peer {peer!r}")
            try:
                req = self._nixl.makeXferReq(nixl_bind.NIXL_WRITE, self._local,
                                             _indices(src, nreg, self.regions.num_pages), p.dlist,
                                             _indices(dst, nreg, p.num_pages), notification, [self._ucx], False)
            except NIXL_ERRORS as e:
                return FailedHandle(peer, *_failure_of(e))
            h = _NixlHandle(self, peer, req, deadline)
            p.handles.add(h)
        h.post(notification)  # outside our lock: over TCP/CMA the post may run the whole transfer
        return h

    def _release_request(self, h: _NixlHandle) -> None:
        with self._lock:
            p = self._peers.get(h.peer)
            if p is not None:
                p.handles.discard(h)
            try:
                self._nixl.releaseXferReq(h._req)
            except NIXL_ERRORS:  # an active request NIXL could not cancel: keep it, retry on removal / close
                self._stuck.append(h._req)

    def _retry_stuck(self) -> None:
        left = []
        for req in self._stuck:
            try:
                self._nixl.releaseXferReq(req)
            except NIXL_ERRORS:
                left.append(req)
        self._stuck = left

    def num_in_flight(self) -> int:
        with self._lock:
            return sum(len(p.handles) for p in self._peers.values()) + len(self._stuck)

    def take_notifications(self) -> list[Notification]:
        got = self._nixl.getNotifs({}, [])  # STRICT sync mode: NIXL serialises its own calls
        out = []
        for peer, msgs in got.items():
            name = peer.decode() if isinstance(peer, bytes) else peer
            out.extend(Notification(name, bytes(m)) for m in msgs)
        return out

    def close(self) -> None:
        if self._closed:
            return
        for peer in list(self._peers):
            self.remove_peer(peer)
        with self._lock:
            self._retry_stuck()
            self._nixl.releasedDlistH(self._local)
            self._nixl.deregisterMem(self._reg, [self._ucx])
            self._closed = True

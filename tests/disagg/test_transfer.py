"""KV page transfer between two processes over loopback, for every backend (NIXL, the socket fallback):
bytes verified, scattered pages, both pool layouts, concurrency, notifications, and the failure paths (a killed
peer, a hung peer, a removed peer)."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from disagg.kv_layout import KVPageRegions
from disagg.peer_process import LAYOUTS, PeerProcess, PoolSpec, fill, page_bytes_of, wait_done
from disagg.transfer import (
    BACKENDS,
    FailureKind,
    LayoutMismatch,
    Status,
    TransferAgent,
    create_transfer_agent,
)

ENV = {"UCX_NET_DEVICES": "lo"}  # NIXL: keep UCX on loopback (read when an agent is created)
SPECS = {layout: PoolSpec(layout=layout, num_layers=4, num_pages=64) for layout in LAYOUTS}


class Side:
    """The main process's agent for one (backend, layout) and the peer process it talks to."""

    def __init__(self, backend: str, layout: str, peer: PeerProcess) -> None:
        spec = SPECS[layout]
        self.regions = KVPageRegions.from_kv_caches(spec.allocate())
        fill(self.regions, seed=1)
        self.agent: TransferAgent = create_transfer_agent(backend, f"main-{backend}-{layout}", self.regions)
        self.proc = peer.wait_ready()
        self.peer = self.agent.add_peer(peer.metadata)
        assert self.proc.call("add_peer", self.agent.metadata()) == self.agent.name


@pytest.fixture(scope="module")
def world():
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    procs: dict[tuple[str, str], PeerProcess] = {}
    for b in BACKENDS:  # start every child first: their imports overlap
        for layout in LAYOUTS:
            procs[b, layout] = PeerProcess(b, f"peer-{b}-{layout}", SPECS[layout], env=ENV, wait=False)
        for role in ("stop", "kill"):
            procs[b, role] = PeerProcess(b, f"victim-{b}-{role}", SPECS["page_major"], env=ENV, wait=False)
    sides: dict[tuple[str, str], Side] = {}
    try:
        for b in BACKENDS:
            for layout in LAYOUTS:
                sides[b, layout] = Side(b, layout, procs[b, layout])
        yield sides, procs
    finally:
        for p in procs.values():
            try:
                os.kill(p.pid, signal.SIGCONT)
            except (ProcessLookupError, TypeError):
                pass
            p.stop()
        for s in sides.values():
            s.agent.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop(pid: int) -> None:
    """SIGSTOP and wait until the process is really stopped (a write posted before that could still land)."""
    os.kill(pid, signal.SIGSTOP)
    end = time.monotonic() + 5
    while time.monotonic() < end:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop")


def _write_and_check(side: Side, writes: list[tuple[list[int], list[int]]], tag: str) -> None:
    """Post all writes at once, wait, and check the peer's pool: dst pages hold our src pages' bytes, every
    other page is unchanged, and each write's notification arrived once, from us. Destinations are disjoint."""
    n = side.regions.num_pages
    before = side.proc.call("pages", list(range(n)))
    handles = [side.agent.write(side.peer, s, d, f"{tag}-{i}".encode(), timeout_s=20) for i, (s, d) in
               enumerate(writes)]
    states = wait_done(handles, 30)
    assert [st.status for st in states] == [Status.DONE] * len(writes), states
    notes = side.proc.call("notifications", len(writes), 10)
    assert sorted((p, m) for p, m, _ in notes) == sorted((side.agent.name, f"{tag}-{i}".encode())
                                                          for i in range(len(writes)))
    after = side.proc.call("pages", list(range(n)))
    expect = bytearray(before)  # the peer answers region-major: region 0's rows of all pages, then region 1's...
    for s_pages, d_pages in writes:
        for sp, dp in zip(s_pages, d_pages):
            off = 0
            for region in side.regions.regions:
                rpb = region.shape[1]
                expect[off + dp * rpb: off + (dp + 1) * rpb] = region[sp].numpy().tobytes()
                off += n * rpb
    assert after == bytes(expect)
    assert side.agent.num_in_flight() == 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scattered_pages_arrive_byte_exact(world, backend, layout):
    side = world[0][backend, layout]
    rng = np.random.default_rng(7)
    scattered = (rng.permutation(64)[:20].tolist(), rng.permutation(64)[:20].tolist())
    _write_and_check(side, [scattered], f"{backend}-{layout}-a")
    runs = ([10, 11, 12, 13, 40, 41], [50, 51, 52, 53, 0, 1])  # adjacent on both sides: merged descriptors
    _write_and_check(side, [runs, ([63], [63]), ([0], [20])], f"{backend}-{layout}-b")


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_transfers_from_two_threads(world, backend):
    side = world[0][backend, "page_major"]
    rng = np.random.default_rng(11)
    dst = rng.permutation(64)
    writes = [(rng.permutation(64)[:4].tolist(), dst[4 * i: 4 * i + 4].tolist()) for i in range(16)]
    n = side.regions.num_pages
    before = side.proc.call("pages", list(range(n)))
    handles: list = [None] * 16

    def post(ix: range) -> None:
        for i in ix:
            handles[i] = side.agent.write(side.peer, *writes[i], f"c-{i}".encode(), timeout_s=20)

    t = threading.Thread(target=post, args=(range(0, 16, 2),))
    t.start()
    post(range(1, 16, 2))
    t.join()
    assert all(st.done for st in wait_done(handles, 30))
    notes = side.proc.call("notifications", 16, 10)
    assert sorted(m for _, m, _ in notes) == sorted(f"c-{i}".encode() for i in range(16))
    after = side.proc.call("pages", list(range(n)))
    assert after != before
    for s, d in writes:
        assert side.proc.call("pages", d) == page_bytes_of(side.regions, s)
    assert side.agent.num_in_flight() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_peer_writes_into_our_pool_and_we_get_the_notification(world, backend):
    side = world[0][backend, "page_major"]
    src, dst = [5, 6, 30], [60, 2, 3]
    peer_bytes = side.proc.call("pages", src)
    assert side.proc.call("write", [(side.agent.name, src, dst, b"reverse")], 10) == [("done", None)]
    end = time.monotonic() + 10
    notes = []
    while not notes and time.monotonic() < end:
        notes = side.agent.take_notifications()
        time.sleep(0.001)
    assert [(n.peer, n.message) for n in notes] == [(side.proc.name, b"reverse")]
    assert page_bytes_of(side.regions, dst) == peer_bytes


@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_peer_fails_in_flight_and_new_transfers_with_a_typed_error(world, backend):
    sides, procs = world
    side, victim = sides[backend, "page_major"], procs[backend, "kill"].wait_ready()
    name = side.agent.add_peer(victim.metadata)
    assert wait_done([side.agent.write(name, [1, 2], [3, 4], b"warm", 10)], 10)[0].done
    _stop(victim.pid)  # so that the next write is surely still in flight when it dies
    in_flight = side.agent.write(name, list(range(64)), list(range(64)), b"x", timeout_s=30)
    time.sleep(0.3)
    assert in_flight.poll().status is Status.PENDING
    t0 = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    st = wait_done([in_flight], 30)[0]
    assert st.failed and st.kind is FailureKind.PEER_DISCONNECTED, st
    assert time.monotonic() - t0 < 10  # reported by the engine, not by our 30 s deadline
    time.sleep(0.2)
    st = wait_done([side.agent.write(name, [0], [0], b"y", timeout_s=30)], 30)[0]
    assert st.failed and st.kind is FailureKind.PEER_DISCONNECTED, st
    assert side.agent.num_in_flight() == 0
    side.agent.remove_peer(name)
    st = side.agent.write(name, [0], [0], b"z").poll()
    assert st.failed and st.kind is FailureKind.PEER_REMOVED


@pytest.mark.parametrize("backend", BACKENDS)
def test_hung_peer_fails_at_the_deadline_and_the_handle_is_released(world, backend):
    sides, procs = world
    side, victim = sides[backend, "page_major"], procs[backend, "stop"].wait_ready()
    name = side.agent.add_peer(victim.metadata)
    assert wait_done([side.agent.write(name, [1, 2], [3, 4], b"warm", 10)], 10)[0].done
    _stop(victim.pid)
    t0 = time.monotonic()
    small = side.agent.write(name, [7], [8], b"s", timeout_s=1.0)
    big = side.agent.write(name, list(range(64)), list(range(64)), b"b", timeout_s=1.0)
    time.sleep(0.5)
    assert small.poll().status is Status.PENDING and big.poll().status is Status.PENDING
    states = wait_done([small, big], 10)
    waited = time.monotonic() - t0
    assert [s.kind for s in states] == [FailureKind.DEADLINE] * 2, states
    assert 1.0 <= waited < 3.0
    assert side.agent.num_in_flight() == 0
    # a pending transfer ends at once when its peer is removed
    late = side.agent.write(name, [9], [9], b"l", timeout_s=60)
    assert late.poll().status is Status.PENDING
    t0 = time.monotonic()
    side.agent.remove_peer(name)
    st = late.poll()
    assert st.failed and st.kind is FailureKind.PEER_REMOVED
    assert time.monotonic() - t0 < 1.0
    assert side.agent.num_in_flight() == 0
    os.kill(victim.pid, signal.SIGCONT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_layout_and_bad_pages_are_refused(world, backend):
    side = world[0][backend, "page_major"]
    other = world[0][backend, "per_layer"]
    with pytest.raises(LayoutMismatch):
        side.agent.add_peer(other.agent.metadata())
    with pytest.raises(ValueError):
        side.agent.write(side.peer, [0, 1], [2])
    with pytest.raises(ValueError):
        side.agent.write(side.peer, [64], [0])
    with pytest.raises(ValueError):
        side.agent.write(side.peer, [0], [64])
    wrong = "nixl" if backend == "local" else "local"
    with pytest.raises(ValueError):
        side.agent.add_peer(world[0][wrong, "page_major"].agent.metadata())

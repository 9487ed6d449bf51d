"""A KV pool and its transfer agent in a child process, driven over a pipe: the other side of the two-process
tests and of bench.kv_transfer. Not used by the server."""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from disagg.kv_layout import KVCaches, KVPageRegions, allocate_page_major_kv
from disagg.transfer import TransferAgent, create_transfer_agent

LAYOUTS = ("page_major", "per_layer")


@dataclass(frozen=True)
class PoolSpec:
    layout: str = "page_major"  # or "per_layer": engine/kv_cache.py's one tensor per layer and K/V
    num_layers: int = 4
    num_pages: int = 64
    block_size: int = 16
    kv_heads: int = 1
    head_dim: int = 128
    dtype: str = "bfloat16"
    device: str = "cpu"

    def allocate(self) -> KVCaches:
        dt = getattr(torch, self.dtype)
        if self.layout == "page_major":
            return allocate_page_major_kv(list(range(self.num_layers)), self.num_pages, self.block_size,
                                          self.kv_heads, self.head_dim, dt, self.device).kv_caches
        if self.layout == "per_layer":
            shape = (self.num_pages, self.block_size, self.kv_heads, self.head_dim)
            return {i: (torch.zeros(shape, dtype=dt, device=self.device),
                        torch.zeros(shape, dtype=dt, device=self.device)) for i in range(self.num_layers)}
        raise ValueError(f"unknown layout {self.layout!r}")

    @property
    def page_bytes(self) -> int:
        return 2 * self.num_layers * self.block_size * self.kv_heads * self.head_dim * getattr(torch, self.dtype).itemsize


def fill(regions: KVPageRegions, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for r in regions.regions:
        r.copy_(torch.randint(0, 256, tuple(r.shape), generator=g, dtype=torch.uint8).to(r.device))


def page_bytes_of(regions: KVPageRegions, pages: list[int]) -> bytes:
    """Every region's bytes of the given pages, region-major: what a correct transfer must reproduce."""
    idx = torch.tensor(pages, dtype=torch.long, device=regions.device)
    return b"".join(r.index_select(0, idx).cpu().numpy().tobytes() for r in regions.regions)


def wait_done(handles: list, timeout_s: float) -> list:
    """Poll until every handle is final (or timeout_s passes); returns their states."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and any(h.poll().status.value == "pending" for h in handles):
        time.sleep(0.0005)
    return [h.poll() for h in handles]


def _serve(conn: Connection, backend: str, name: str, spec: PoolSpec, seed: int | None, env: dict[str, str],
           options: dict[str, Any]) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    kv = spec.allocate()
    regions = KVPageRegions.from_kv_caches(kv)
    if seed is not None:
        fill(regions, seed)
    agent: TransferAgent = create_transfer_agent(backend, name, regions, **options)
    conn.send(("ready", os.getpid(), agent.metadata()))
    notes: list = []
    while True:
        cmd, *args = conn.recv()
        if cmd == "stop":
            agent.close()
            conn.send(("ok",))
            return
        if cmd == "add_peer":
            conn.send(("ok", agent.add_peer(args[0])))
        elif cmd == "remove_peer":
            agent.remove_peer(args[0])
            conn.send(("ok",))
        elif cmd == "pages":
            conn.send(("ok", page_bytes_of(regions, args[0])))
        elif cmd == "notifications":  # wait until `count` arrived (or timeout), return and forget them
            count, timeout_s = args
            end = time.monotonic() + timeout_s
            while len(notes) < count and time.monotonic() < end:
                notes.extend((n.peer, n.message, time.perf_counter()) for n in agent.take_notifications())
                time.sleep(0.0002)
            conn.send(("ok", notes[:]))
            notes.clear()
        elif cmd == "write":  # post writes and wait: [(peer, src, dst, notification)], timeout -> states
            jobs, timeout_s = args
            hs = [agent.write(p, np.asarray(s), np.asarray(d), n, timeout_s) for p, s, d, n in jobs]
            states = wait_done(hs, timeout_s + 5)
            conn.send(("ok", [(s.status.value, s.kind.value if s.kind else None) for s in states]))
        elif cmd == "in_flight":
            conn.send(("ok", agent.num_in_flight()))
        elif cmd == "cpu_seconds":  # this process's CPU time (an idle agent's progress thread shows here)
            conn.send(("ok", time.process_time()))
        else:
            conn.send(("error", f"unknown command {cmd}"))


class PeerProcess:
    """Start with PeerProcess(backend, name, spec, seed); .call(cmd, *args) returns the reply's payload."""

    def __init__(self, backend: str, name: str, spec: PoolSpec, seed: int | None = None,
                 env: dict[str, str] | None = None, options: dict[str, Any] | None = None,
                 wait: bool = True) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, backend, name, spec, seed, env or {}, options or {}),
                                daemon=True)
        self.proc.start()
        child.close()
        self.pid = self.proc.pid
        self.metadata = b""
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = 120.0) -> PeerProcess:
        """Wait for the child's agent (start several with wait=False, then wait: their imports overlap)."""
        if not self.metadata:
            if not self.conn.poll(timeout_s):
                self.kill()
                raise TimeoutError(f"peer process {self.name} did not start")
            _, self.pid, self.metadata = self.conn.recv()
        return self

    def call(self, cmd: str, *args: Any, timeout_s: float = 60.0) -> Any:
        self.send(cmd, *args)
        return self.reply(cmd, timeout_s)

    def send(self, cmd: str, *args: Any) -> None:
        """Start a command without waiting (e.g. "notifications" before posting the write it waits for)."""
        self.conn.send((cmd, *args))

    def reply(self, cmd: str = "", timeout_s: float = 60.0) -> Any:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"peer {self.name} did not answer {cmd}")
        status, *rest = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"peer {self.name}: {rest}")
        return rest[0] if rest else None

    def stop(self) -> None:
        if self.proc.is_alive() and self.metadata:  # never waited for: its pipe still holds "ready"; just kill
            try:
                self.call("stop", timeout_s=10)
            except (TimeoutError, OSError, EOFError):
                pass
        self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)

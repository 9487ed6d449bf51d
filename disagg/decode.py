"""The decode instance's side of the handover (rank 0).

A request arrives from the router with a room and its prefill instance's bootstrap address. Once the control
connection to that instance is up (Hello -> Welcome: the prefill side added our transfer agents on every rank),
the request reserves pages for its whole prompt and a seat (`Scheduler.reserve_for_transfer`; it waits in
`receiving`, never scheduled; full prompt pages in our own prefix cache are reused and not sent again) and sends
Reserve(room, pages, skip). The prefill side's Done(room, token, num_writes)
brings the first token; once every rank's notifications of writes 0 .. num_writes - 1 have come (the data has
landed), the request starts decoding and we Ack. If we give up (deadline, client gone,
the prefill side's Abort), the reserved pages are quarantined — referenced by the connector, so nothing reuses
them — until the prefill side confirms that no write into them is in flight (AbortAck) or the deadline passes.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from disagg.bootstrap import BootstrapClients
from disagg.prefill import prompt_hash
from disagg.protocol import (
    Abort,
    AbortAck,
    Ack,
    Done,
    GetMetadata,
    Hello,
    Reserve,
    TakeNotifications,
    Unknown,
    Welcome,
)
from disagg.transfer_worker import build_transfer_worker, resolve_backend
from engine.block_pool import BlockPool
from engine.config import DisaggregationConfig
from engine.kv_connector import ConnectorUpdate, DisaggParams, KVConnector, KVSend, RankChannel
from engine.outputs import LogprobsDict
from engine.request import Request
from engine.scheduler import ScheduledRequest, Scheduler

log = logging.getLogger(__name__)


@dataclass
class _Room:
    req: Request
    addr: str  # the prefill instance's bootstrap address
    deadline: float  # time.monotonic()
    reserved: bool = False
    added_at: float = 0.0  # time.monotonic()
    done: Done | None = None  # the prefill side's first token and write count
    done_at: float = 0.0  # time.monotonic() when Done came
    landed: list[set[int]] = field(default_factory=list)  # per rank: the writes whose notification came


@dataclass
class _Link:
    """The control connection to one prefill instance."""

    welcomed: bool = False
    hello_sent_at: float = 0.0
    error: str = ""


class DecodeConnector(KVConnector):
    mode = "decode"

    def __init__(self, config: DisaggregationConfig) -> None:
        self.config = config
        self.async_transfer = config.async_transfer
        self.backend = resolve_backend(config.transfer_backend)
        self.name = f"decode-{uuid.uuid4().hex[:12]}"
        self.clients = BootstrapClients(self.name)
        self._rooms: dict[int, _Room] = {}
        self._room_of: dict[int, int] = {}  # request seq_key -> room
        self._links: dict[str, _Link] = {}
        self._quarantine: dict[int, tuple[list[int], float]] = {}  # room -> (pages we hold, until)
        self._metadata: tuple[bytes, ...] = ()
        self._ranks: RankChannel | None = None
        self._scheduler: Scheduler | None = None
        self._pool: BlockPool | None = None
        self.num_received = 0
        self.num_failed = 0
        self.wait_seconds = 0.0  # request added -> KV and first token here, summed
        # Done (the first token is sampled, every write posted) -> every page landed here, summed: the transfer
        # time a request waits for after its prefill (seen at this instance's poll, once per decode step)
        self.landing_seconds = 0.0

    def worker_factory(self):
        return build_transfer_worker

    def bind(self, scheduler: Scheduler, pool: BlockPool, ranks: RankChannel) -> None:
        self._scheduler, self._pool, self._ranks = scheduler, pool, ranks
        self._metadata = tuple(ranks.connector_call(GetMetadata()))

    def stats(self) -> dict[str, float]:
        return {
            "disagg_rooms_active": len(self._rooms), "disagg_received_total": self.num_received,
            "disagg_failed_total": self.num_failed, "disagg_wait_seconds_total": self.wait_seconds,
            "disagg_landing_seconds_total": self.landing_seconds,
            "disagg_quarantined_pages": sum(len(p) for p, _ in self._quarantine.values()),
        }

    def info(self) -> dict[str, Any]:
        return {"mode": self.mode, "bootstrap_addr": None, "transfer_backend": self.backend,
                "async_transfer": self.async_transfer}

    # -- requests -----------------------------------------------------------------------------------
    def add(self, req: Request, params: DisaggParams) -> None:
        if not params.bootstrap_addr:
            raise ValueError("a request to a decode instance needs its prefill instance's bootstrap address")
        if params.room in self._rooms:
            raise ValueError(f"disaggregation room {params.room} is already in use on this decode instance")
        self._rooms[params.room] = _Room(req, params.bootstrap_addr, time.monotonic() + self.config.timeout_s,
                                         added_at=time.monotonic(), landed=[set() for _ in self._metadata])
        self._room_of[req.seq_key] = params.room
        self._link(params.bootstrap_addr)

    def abort(self, req: Request) -> None:
        room_id = self._room_of.get(req.seq_key, -1)
        room = self._rooms.get(room_id)
        if room is not None and room.req is req:
            self._give_up(room_id, "the request ended on the decode instance (client gone or error)")

    def first_token(self, req: Request, token: int, logprobs: LogprobsDict | None) -> None:
        pass

    def plan_sends(self, scheduled: list[ScheduledRequest]) -> list[KVSend]:
        return []

    def after_step(self, sends: list[KVSend]) -> None:
        pass

    def held_pages(self) -> list[int]:
        return [pid for pages, _ in self._quarantine.values() for pid in pages]

    def has_work(self) -> bool:
        return bool(self._rooms or self._quarantine)

    def wait(self, timeout_s: float) -> None:
        self.clients.wait(timeout_s)

    def close(self) -> None:
        for room_id in list(self._rooms):
            self._give_up(room_id, "the decode instance is shutting down")
        self.clients.close()

    # -- the step's poll ----------------------------------------------------------------------------
    def poll(self) -> ConnectorUpdate:
        update = ConnectorUpdate()
        for addr, msg in self.clients.receive():
            self._on_message(addr, msg, update)
        if any(room.reserved for room in self._rooms.values()):
            self._collect_landed(update)
        now = time.monotonic()
        for room_id, room in list(self._rooms.items()):
            link = self._links[room.addr]
            if now > room.deadline:
                self._fail(room_id, f"no KV from the prefill instance {room.addr} within "
                                    f"{self.config.timeout_s:g} s (disaggregation_timeout)", update)
            elif link.error:
                self._fail(room_id, f"the prefill instance {room.addr} refused this instance: {link.error}", update)
            elif not link.welcomed:
                if now - link.hello_sent_at > 1.0:  # a lost Hello (the prefill side was not up yet): again
                    self._hello(room.addr)
            elif not room.reserved:
                cached = self._scheduler.reserve_for_transfer(room.req)
                if cached is not None:
                    room.reserved = True
                    req = room.req
                    self.clients.send(room.addr, Reserve(
                        room_id, tuple(req.block_ids), cached, req.num_prompt_tokens,
                        prompt_hash(req.prompt_token_ids), max(0.0, room.deadline - now)))
        for room_id, (pages, until) in list(self._quarantine.items()):
            if now > until:  # the prefill side never confirmed; its writes cannot outlive its own deadline
                self._release_quarantine(room_id)
        return update

    def _on_message(self, addr: str, msg: Any, update: ConnectorUpdate) -> None:
        if isinstance(msg, Welcome):
            link = self._links.setdefault(addr, _Link())
            link.welcomed, link.error = not msg.error, msg.error
        elif isinstance(msg, Unknown):  # the prefill instance restarted: Hello again, then Reserve again
            self._links[addr] = _Link()
            self._hello(addr)
            room = self._rooms.get(msg.room)
            if room is not None and room.reserved:
                self._scheduler.cancel_reservation(room.req)  # no write came: reserved afresh after the Welcome
                room.reserved = False
        elif isinstance(msg, Done):
            room = self._rooms.get(msg.room)
            if room is None:  # we gave up on it: the source pages may go (our Abort cancels its writes)
                self.clients.send(addr, Ack(msg.room))
                return
            room.done, room.done_at = msg, time.monotonic()
        elif isinstance(msg, Abort):
            if msg.room in self._rooms:
                self._fail(msg.room, f"the prefill instance gave up: {msg.reason}", update, tell_peer=False)
        elif isinstance(msg, AbortAck):
            self._release_quarantine(msg.room)

    def _collect_landed(self, update: ConnectorUpdate) -> None:
        """Every rank's landed writes; a room whose Done came and whose writes all landed on every rank starts."""
        for rank, notes in enumerate(self._ranks.connector_call(TakeNotifications())):
            for room_id, seq in notes:
                room = self._rooms.get(room_id)
                if room is not None:
                    room.landed[rank].add(seq)
        for room_id, room in list(self._rooms.items()):
            done = room.done
            if done is None or any(len(got) < done.num_writes for got in room.landed):
                continue
            del self._rooms[room_id]
            self._room_of.pop(room.req.seq_key, None)
            self.clients.send(room.addr, Ack(room_id))
            self.num_received += 1
            now = time.monotonic()
            self.wait_seconds += now - room.added_at
            self.landing_seconds += now - room.done_at
            update.arrived.append((room.req, done.token, done.logprobs, done.drafts))

    # -- helpers ------------------------------------------------------------------------------------
    def _link(self, addr: str) -> _Link:
        link = self._links.get(addr)
        if link is None or link.error:
            link = self._links[addr] = _Link()
            self._hello(addr)
        return link

    def _hello(self, addr: str) -> None:
        self._links[addr].hello_sent_at = time.monotonic()
        self.clients.send(addr, Hello(self.name, self._metadata, self.backend))

    def _fail(self, room_id: int, reason: str, update: ConnectorUpdate, tell_peer: bool = True) -> None:
        room = self._rooms.get(room_id)
        if room is None:
            return
        update.failed.append((room.req, reason))
        self._give_up(room_id, reason, tell_peer)

    def _give_up(self, room_id: int, reason: str, tell_peer: bool = True) -> None:
        """Forget the room; quarantine its reserved pages until no write can land in them."""
        room = self._rooms.pop(room_id)
        self._room_of.pop(room.req.seq_key, None)
        self.num_failed += 1
        log.warning("disaggregation room %d (%s) failed: %s", room_id, room.req.seq_id, reason)
        if room.reserved and room.req.block_ids:
            self._pool.touch(room.req.block_ids)  # the request frees its own references; these stay
            self._quarantine[room_id] = (list(room.req.block_ids), time.monotonic() + self.config.timeout_s)
        if tell_peer:
            self.clients.send(room.addr, Abort(room_id, reason))

    def _release_quarantine(self, room_id: int) -> None:
        entry = self._quarantine.pop(room_id, None)
        if entry is not None:
            self._pool.free(entry[0])

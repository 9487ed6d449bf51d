"""The prefill instance's side of the handover (rank 0).

A request arrives from the router with a room; it waits (HANDSHAKE, no pages) until the decode instance's
Reserve for that room names the destination pages, then it is scheduled like any prompt (chunked, prefix cache).
Each step that completes pages plans one write of them (`plan_sends`); the connector takes a reference on every
page it sends, so preemption or the request's end never frees a page a write may still read. Once the first
token is sampled and every write is planned, Done(room, token, num_writes) goes to the decode side, which starts
the request once every rank's write notifications have landed and answers Ack, which releases the pages. A failed write, an Abort from the decode side, or the deadline ends the request on both sides.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from disagg.bootstrap import BootstrapServer
from disagg.protocol import (
    Abort,
    AbortAck,
    Ack,
    AddPeer,
    CancelRoom,
    Done,
    GetMetadata,
    Hello,
    PollWrites,
    PostSends,
    QueueSends,
    Reserve,
    Unknown,
    Welcome,
    WriteStates,
)
from disagg.transfer_worker import build_transfer_worker, resolve_backend
from engine.block_pool import BlockPool
from engine.config import DisaggregationConfig
from engine.kv_connector import ConnectorUpdate, DisaggParams, KVConnector, KVSend, RankChannel
from engine.outputs import LogprobsDict
from engine.request import Request
from engine.scheduler import ScheduledRequest, Scheduler

log = logging.getLogger(__name__)


def prompt_hash(tokens: list[int]) -> int:
    return hash(tuple(tokens)) & ((1 << 62) - 1)


@dataclass
class _Room:
    req: Request
    deadline: float  # time.monotonic()
    decode: bytes = b""  # the decode instance's identity (set by its Reserve)
    reserve: Reserve | None = None
    sent_pages: int = 0  # pages of the prompt already planned into writes
    next_seq: int = 0
    held: list[int] = field(default_factory=list)  # page references the connector holds
    token: tuple[int, LogprobsDict | None] | None = None
    drafts: tuple[int, ...] = ()  # MTP: the NextN drafts for the decode side's first step
    admitted_at: float = 0.0  # time.monotonic() when scheduled (0: not yet)
    token_at: float = 0.0  # when the first token was sampled
    done_sent: bool = False


class PrefillConnector(KVConnector):
    mode = "prefill"

    def __init__(self, config: DisaggregationConfig) -> None:
        self.config = config
        self.async_transfer = config.async_transfer
        self.backend = resolve_backend(config.transfer_backend)
        self.name = f"prefill-{uuid.uuid4().hex[:12]}"
        self.server = BootstrapServer(config.bootstrap_host, config.bootstrap_port)
        self._rooms: dict[int, _Room] = {}
        self._early: dict[int, tuple[bytes, Reserve, float]] = {}  # Reserves that came before their request
        self._peers: dict[bytes, str] = {}  # decode identity -> its instance name (Hello applied)
        self._hellos: dict[bytes, Hello] = {}
        self._cancelling: dict[int, tuple[bytes, float]] = {}  # decode-aborted rooms: writes being cancelled
        self._room_of: dict[int, int] = {}  # request seq_key -> room
        self._ended: dict[int, tuple[str, float]] = {}  # rooms dropped before their Reserve came: (why, until)
        self._writes_in_flight = False  # some rank may hold a write not yet reported done
        self._scheduler: Scheduler | None = None
        self._pool: BlockPool | None = None
        self._ranks: RankChannel | None = None
        self._num_ranks = 1
        self.num_handed_over = 0
        self.num_failed = 0
        self.num_pages_sent = 0
        self.prefill_seconds = 0.0  # admitted -> first token, summed over handed-over rooms
        self.transfer_tail_seconds = 0.0  # first token -> the decode side acknowledged every page
        # every rank's writes, summed (transfer_worker._Timings): GPU wait, post delay, flight; writes done
        self.write_timings = [0.0, 0.0, 0.0, 0]

    def worker_factory(self):
        return build_transfer_worker

    def bind(self, scheduler: Scheduler, pool: BlockPool, ranks: RankChannel) -> None:
        self._scheduler, self._pool, self._ranks = scheduler, pool, ranks
        self._num_ranks = len(ranks.connector_call(GetMetadata()))

    def stats(self) -> dict[str, float]:
        return {
            "disagg_rooms_active": len(self._rooms), "disagg_handovers_total": self.num_handed_over,
            "disagg_failed_total": self.num_failed, "disagg_pages_sent_total": self.num_pages_sent,
            "disagg_prefill_seconds_total": self.prefill_seconds,
            "disagg_transfer_tail_seconds_total": self.transfer_tail_seconds,
            "disagg_write_gpu_wait_seconds_total": self.write_timings[0],
            "disagg_write_post_delay_seconds_total": self.write_timings[1],
            "disagg_write_flight_seconds_total": self.write_timings[2],
            "disagg_writes_done_total": self.write_timings[3],
        }

    def info(self) -> dict[str, Any]:
        return {"mode": self.mode, "bootstrap_addr": self.server.address, "transfer_backend": self.backend,
                "async_transfer": self.async_transfer, "async_last_chunk_sync": self.config.async_last_chunk_sync}

    # -- requests -----------------------------------------------------------------------------------
    def add(self, req: Request, params: DisaggParams) -> None:
        if params.room in self._rooms:
            raise ValueError(f"disaggregation room {params.room} is already in use on this prefill instance")
        room = _Room(req, time.monotonic() + self.config.timeout_s)
        self._rooms[params.room] = room
        self._room_of[req.seq_key] = params.room
        early = self._early.pop(params.room, None)
        if early is not None:
            self._accept_reserve(room, *early)

    def _room(self, req: Request) -> tuple[int, _Room | None]:
        room_id = self._room_of.get(req.seq_key, -1)
        room = self._rooms.get(room_id)
        return room_id, (room if room is not None and room.req is req else None)

    def abort(self, req: Request) -> None:
        room_id, room = self._room(req)
        if room is not None:
            self._drop(room_id, "the request ended on the prefill instance (client gone or error)")

    def first_token(self, req: Request, token: int, logprobs: LogprobsDict | None) -> None:
        _, room = self._room(req)
        if room is not None and room.token is None:
            room.token = (token, logprobs)
            room.token_at = time.monotonic()

    def first_drafts(self, req: Request, drafts: tuple[int, ...]) -> None:
        _, room = self._room(req)
        if room is not None:
            room.drafts = drafts

    def plan_sends(self, scheduled: list[ScheduledRequest]) -> list[KVSend]:
        sends = []
        bs = self._pool.block_size
        for s in scheduled:
            req = s.request
            room_id, room = self._room(req)
            if room is None or room.reserve is None:
                continue
            n_prompt = req.num_prompt_tokens
            upto = -(-n_prompt // bs) if s.end >= n_prompt else min(s.end, n_prompt) // bs
            if upto <= room.sent_pages:
                continue
            src = req.block_ids[room.sent_pages : upto]
            dst = room.reserve.pages[room.sent_pages : upto]
            self._pool.touch(src)  # ours until the decode side acknowledged (or the room failed)
            room.held.extend(src)
            send = KVSend(room_id, self._peers[room.decode], room.next_seq, tuple(src), tuple(dst), room.deadline,
                          last=upto == -(-n_prompt // bs))
            room.next_seq += 1
            room.sent_pages = upto
            self._writes_in_flight = True
            self.num_pages_sent += len(src)
            sends.append(send)
        return sends

    def _in_step_order(self, send: KVSend) -> bool:
        """Posted after its step like sync transfer's: every send without async transfer; with it, a request's
        last write where async_last_chunk_sync asks for it."""
        return not self.async_transfer or (self.config.async_last_chunk_sync and send.last)

    def rides_on_step(self, send: KVSend) -> bool:
        return not self._in_step_order(send)

    def posts_before_next_step(self, sends: list[KVSend]) -> bool:
        return self.async_transfer and any(self._in_step_order(s) for s in sends)

    def after_step(self, sends: list[KVSend]) -> None:
        """Sends that did not ride on the step's inputs: sync transfer posts them now (the step has run), as
        async transfer does a last write with async_last_chunk_sync; other async sends (with MTP, whose NextN
        extend writes the pages' last layer after the step) are queued behind a CUDA event recorded now, after
        that extend."""
        if not sends:
            return
        queued = tuple(s for s in sends if not self._in_step_order(s))
        posted = tuple(s for s in sends if self._in_step_order(s))
        if queued:
            self._ranks.connector_call(QueueSends(queued))
        if posted:
            self._ranks.connector_call(PostSends(posted))
        # poll them from the next step on: with overlap this runs after the step's poll, which may have
        # cleared the flag, and NIXL moves a write only while it is polled
        self._writes_in_flight = True

    def held_pages(self) -> list[int]:
        return [pid for room in self._rooms.values() for pid in room.held]

    def has_work(self) -> bool:
        return bool(self._rooms or self._early or self._cancelling or self._writes_in_flight) \
            or self.server.has_pending()

    def wake_sockets(self) -> list[Any]:
        return [self.server.socket]

    def wait(self, timeout_s: float) -> None:
        self.server.wait(timeout_s)

    def close(self) -> None:
        """Tell the decode side, then let go: no call to the ranks (after a failure they may be gone, and a
        collective would wait its full timeout); the pool goes with the engine."""
        for room_id, room in self._rooms.items():
            if room.decode:
                self.server.send(room.decode, Abort(room_id, "the prefill instance is shutting down"))
        self._rooms.clear()
        self._room_of.clear()
        self.server.close()

    # -- the step's poll ----------------------------------------------------------------------------
    def poll(self) -> ConnectorUpdate:
        update = ConnectorUpdate()
        for identity, msg in self.server.receive():
            self._on_message(identity, msg, update)
        if self._writes_in_flight or self._cancelling:
            self._collect_writes(update)
        now = time.monotonic()
        for room_id, room in list(self._rooms.items()):
            if room.token is not None and not room.done_sent and room.reserve is not None \
                    and room.sent_pages >= len(room.reserve.pages):
                # every write is planned: the decode side starts once their notifications have landed
                self.server.send(room.decode, Done(room_id, *room.token, room.next_seq, room.drafts))
                room.done_sent = True
                self.prefill_seconds += room.token_at - room.admitted_at
            if now > room.deadline:
                self._fail(room_id, f"handover not finished within {self.config.timeout_s:g} s "
                                    f"(disaggregation_timeout)", update)
        for room_id, (_, until) in list(self._ended.items()):
            if now > until:
                del self._ended[room_id]
        for room_id, (identity, _, expires) in list(self._early.items()):
            if now > expires:
                del self._early[room_id]
                self._refuse(identity, room_id, "the prefill instance never got this request")
        for room in self._rooms.values():
            if room.reserve is not None and not room.admitted_at:
                room.admitted_at = time.monotonic()
                update.admit.append(room.req)
        return update

    def _on_message(self, identity: bytes, msg: Any, update: ConnectorUpdate) -> None:
        if isinstance(msg, Hello):
            self.server.send(identity, self._hello(identity, msg))
        elif isinstance(msg, Reserve):
            if identity not in self._peers:
                self.server.send(identity, Unknown(msg.room))
                return
            room = self._rooms.get(msg.room)
            ended = self._ended.pop(msg.room, None)
            gives_up_at = time.monotonic() + msg.time_left_s  # the decode side's deadline, on our clock
            if ended is not None:
                self._refuse(identity, msg.room, ended[0])
            elif room is None:
                self._early[msg.room] = (identity, msg, gives_up_at)
            else:
                self._accept_reserve(room, identity, msg, gives_up_at)
        elif isinstance(msg, Ack):
            room = self._rooms.pop(msg.room, None)
            if room is not None:
                self._room_of.pop(room.req.seq_key, None)
                self._release(room)
                self.num_handed_over += 1
                # first token -> the decode side has every page (what async transfer shortens)
                self.transfer_tail_seconds += time.monotonic() - room.token_at
        elif isinstance(msg, Abort):
            self._early.pop(msg.room, None)
            room = self._rooms.get(msg.room)
            if room is not None:
                reason = f"the decode instance gave up: {msg.reason}"
                if room.req.is_finished:
                    self._drop(msg.room, reason, tell_peer=False)
                else:
                    self._fail(msg.room, reason, update, tell_peer=False)
            self._cancel_writes(msg.room, identity)

    def _hello(self, identity: bytes, msg: Hello) -> Welcome:
        if self._hellos.get(identity) == msg:  # a resent Hello (our Welcome was slow): re-adding would drop
            return Welcome(self.name)          # the peer's in-flight writes
        if msg.backend != self.backend:
            return Welcome(self.name, f"transfer backend {msg.backend!r} on the decode side, {self.backend!r} here")
        if len(msg.metadata) != self._num_ranks:
            return Welcome(self.name, f"tensor-parallel size {len(msg.metadata)} on the decode side, "
                                      f"{self._num_ranks} here: both sides need the same TP size (each rank "
                                      "sends its own KV head shard to its counterpart)")
        try:
            self._ranks.connector_call(AddPeer(msg.decode, msg.metadata))
        except Exception as exc:  # layout mismatch (model, TP heads, KV dtype, page size), unreachable agent
            log.error("decode instance %s refused: %s", msg.decode, exc)
            return Welcome(self.name, f"{type(exc).__name__}: {exc}")
        self._peers[identity] = msg.decode
        self._hellos[identity] = msg
        return Welcome(self.name)

    def _accept_reserve(self, room: _Room, identity: bytes, msg: Reserve, gives_up_at: float) -> None:
        req = room.req
        need = -(-req.num_prompt_tokens // self._pool.block_size)
        room.decode = identity
        if msg.num_prompt_tokens != req.num_prompt_tokens or msg.prompt_hash != prompt_hash(req.prompt_token_ids) \
                or len(msg.pages) != need or not 0 <= msg.skip_pages <= need:
            room.deadline = 0.0  # fails at this poll's deadline check, telling the decode side
            log.error("room %d: the decode side's prompt (%d tokens, %d pages) is not ours (%d tokens)",
                      msg.room, msg.num_prompt_tokens, len(msg.pages), req.num_prompt_tokens)
            return
        room.reserve = msg
        room.sent_pages = msg.skip_pages  # the decode side's prefix cache has those
        room.deadline = min(room.deadline, gives_up_at)

    def _collect_writes(self, update: ConnectorUpdate) -> None:
        states: list[WriteStates] = self._ranks.connector_call(PollWrites())
        self._writes_in_flight = any(st.in_flight for st in states)
        failed: dict[int, str] = {}
        for st in states:
            self.write_timings = [a + b for a, b in zip(self.write_timings, st.timings)]
            for room_id, reason in st.failed:
                failed.setdefault(room_id, reason)
        for room_id, reason in failed.items():
            if room_id in self._rooms:
                self._fail(room_id, reason, update)
        for room_id, (identity, expires) in list(self._cancelling.items()):
            left = sum(self._ranks.connector_call(CancelRoom(room_id)))
            if left == 0 or time.monotonic() > expires:
                del self._cancelling[room_id]
                self.server.send(identity, AbortAck(room_id))

    # -- endings ------------------------------------------------------------------------------------
    def _fail(self, room_id: int, reason: str, update: ConnectorUpdate, tell_peer: bool = True) -> None:
        room = self._rooms.get(room_id)
        if room is None:
            return
        if not room.req.is_finished:
            update.failed.append((room.req, reason))
        self._drop(room_id, reason, tell_peer)

    def _drop(self, room_id: int, reason: str, tell_peer: bool = True) -> None:
        """End the room here: cancel its writes, tell the decode side, release the pages we hold."""
        room = self._rooms.pop(room_id, None)
        if room is None:
            return
        self._room_of.pop(room.req.seq_key, None)
        self.num_failed += 1
        log.warning("disaggregation room %d (%s) failed: %s", room_id, room.req.seq_id, reason)
        if room.next_seq:
            self._ranks.connector_call(CancelRoom(room_id))
        if room.decode:
            if tell_peer:
                self.server.send(room.decode, Abort(room_id, reason))
            self._cancel_writes(room_id, room.decode)  # its pages stay quarantined there until our AbortAck
        elif tell_peer:  # no Reserve yet: answer it with the Abort when it comes
            self._ended[room_id] = (reason, time.monotonic() + self.config.timeout_s)
        self._release(room)

    def _refuse(self, identity: bytes, room_id: int, reason: str) -> None:
        """Answer a Reserve we never acted on: Abort, and AbortAck at once (no write into its pages was posted)."""
        self.server.send(identity, Abort(room_id, reason))
        self.server.send(identity, AbortAck(room_id))

    def _cancel_writes(self, room_id: int, identity: bytes) -> None:
        """Either side's Abort: answer AbortAck once no write of the room is in flight on any rank."""
        self._cancelling[room_id] = (identity, time.monotonic() + self.config.timeout_s)

    def _release(self, room: _Room) -> None:
        if room.held:
            self._pool.free(room.held)
            room.held = []

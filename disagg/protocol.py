"""Messages of the disaggregation protocol.

Between instances (pickled over the bootstrap ZMQ sockets; the prefill instance listens, each decode instance
connects to it):

    decode -> prefill   Hello(decode, metadata)      once per connection: the decode instance's transfer agents
                        Reserve(room, pages, ...)    the pages the prompt's KV goes to (reserved already)
                        Ack(room)                    the KV and the first token arrived: free the source pages
                        Abort(room, reason)          the decode side gave up on the request
    prefill -> decode   Welcome(prefill)             the Hello was applied (peers added on every rank)
                        Done(room, token, logprobs, num_writes)
                                                     the first token, and how many writes each rank makes
                        Abort(room, reason)          the prefill side gave up (error, client gone, deadline)
                        AbortAck(room)               after either side's Abort: no write of this room is in flight
                        Unknown(room)                a Reserve before any Hello (the prefill side restarted)

Between rank 0's connector and every TP rank's transfer worker (RankChannel.call): GetMetadata, AddPeer,
PostSends (sync transfer), PollWrites, CancelRoom; decode side: TakeNotifications.

A write's data is known to have landed when its NIXL notification ("room:seq") reaches the decode rank it was
written to: the decode instance starts a request once it has the Done and every rank's notifications for writes
0 .. num_writes - 1, independent of the prefill instance's step cadence.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.kv_connector import KVSend
from engine.outputs import Logprob, LogprobsDict


# -- instance <-> instance ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    decode: str  # the decode instance's name
    metadata: tuple[bytes, ...]  # per TP rank: its transfer agent's metadata
    backend: str  # the transfer backend, which must match


@dataclass(frozen=True)
class Welcome:
    prefill: str
    error: str = ""  # non-empty: the prefill side refused the peer (layout, TP size, backend)


@dataclass(frozen=True)
class Reserve:
    room: int
    pages: tuple[int, ...]  # the decode side's pages, in block-table order, covering the whole prompt
    skip_pages: int  # leading pages the decode side has already (its prefix cache): not sent
    num_prompt_tokens: int
    prompt_hash: int  # both sides check they talk about the same prompt
    time_left_s: float  # seconds the decode side still waits, at sending (two hosts' clocks are never compared)


@dataclass(frozen=True)
class Ack:
    room: int


@dataclass(frozen=True)
class Abort:
    room: int
    reason: str


@dataclass(frozen=True)
class AbortAck:
    room: int


@dataclass(frozen=True)
class Unknown:
    """Prefill -> decode: a Reserve from an instance whose Hello this prefill instance never got (it restarted):
    say Hello again, then resend the Reserve."""

    room: int


@dataclass(frozen=True)
class Done:
    room: int
    token: int
    logprobs: LogprobsDict | None
    num_writes: int  # writes every prefill rank makes for the room (their notifications say when they landed)
    drafts: tuple[int, ...] = ()  # MTP: the drafts for the decode side's first step


# what a frame on the bootstrap socket may hold (disagg/wire.py)
INSTANCE_MESSAGES: tuple[type, ...] = (Hello, Welcome, Reserve, Ack, Abort, AbortAck, Unknown, Done, Logprob)


# -- rank 0 -> every TP rank ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GetMetadata:
    pass


@dataclass(frozen=True)
class AddPeer:
    instance: str  # the peer instance's name
    metadata: tuple[bytes, ...]  # per TP rank; rank r adds metadata[r]


@dataclass(frozen=True)
class PostSends:
    sends: tuple[KVSend, ...]


@dataclass(frozen=True)
class QueueSends:
    """Async transfer: hand these sends to the transfer thread behind a CUDA event recorded now."""

    sends: tuple[KVSend, ...]


@dataclass(frozen=True)
class PollWrites:
    pass


@dataclass(frozen=True)
class CancelRoom:
    room: int


@dataclass(frozen=True)
class TakeNotifications:
    """Decode side: the (room, seq) of every write into this rank's pool that has landed since the last call."""


def write_notification(room: int, seq: int) -> bytes:
    return f"{room}:{seq}".encode()


def parse_notification(message: bytes) -> tuple[int, int] | None:
    try:
        room, seq = message.decode().split(":")
        return int(room), int(seq)
    except ValueError:
        return None


@dataclass(frozen=True)
class WriteStates:
    """A rank's answer to PollWrites: the writes that failed since the last poll, and how many are still going
    (posted or queued: NIXL moves a write only while it is polled)."""

    failed: tuple[tuple[int, str], ...]  # (room, reason)
    in_flight: int
    # since the last poll, summed over writes (seconds): GPU wait, post delay, flight; writes done
    timings: tuple[float, float, float, int] = (0.0, 0.0, 0.0, 0)

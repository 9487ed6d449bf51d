"""The engine's side of prefill/decode disaggregation: the interfaces a KV connector implements (disagg/ builds
them; the engine imports nothing from there) and the per-request handover parameters.

Rank 0 (EngineCore) owns one `KVConnector`, which runs the handshake with the peer instance and decides when a
request may run, which pages to send and when a request's KV has arrived. Every TP rank's ModelWorker owns one
`KVConnectorWorker`: its shard of the KV pool registered with a transfer agent. The connector reaches every rank
through a `RankChannel`: `connector_call(message)` runs `KVConnectorWorker.handle(message)` on every rank and returns the
results in rank order (each rank moves its own head shard; nothing is funnelled through rank 0). Page sends
planned for a step ride on that step's inputs (`StepInputs.kv_sends`): every rank hands its shard's write to its
transfer thread right after enqueuing the forward that writes those pages (async transfer), or the connector
sends them after the step (sync). With MTP the NextN layer writes its layer of those pages after the step (the
extend), so the sends go after that: `after_step(sends)` queues them behind a CUDA event recorded then (async)
or posts them (sync), and a request its first token ended lives until that extend ran.

The engine calls, in a step: `poll()` first (handshakes, arrivals, acknowledgements, deadlines), then
`plan_sends(scheduled)` for the step it launches, `after_step(...)` once the step's tokens are known; plus
`add` / `abort` / `request_finished` as requests come and go.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Protocol

from engine.outputs import LogprobsDict
from engine.request import Request


@dataclass(frozen=True)
class DisaggParams:
    """Per request, from the router: `room` names the handover on both sides (unique per prefill instance);
    the decode side also gets the prefill instance's bootstrap address (tcp://host:port)."""

    room: int
    bootstrap_addr: str = ""


@dataclass(frozen=True)
class KVSend:
    """One write of a request's pages (local page ids -> the peer's page ids), posted by every rank for its
    own shard. `seq` numbers the request's writes from 0."""

    room: int
    peer: str  # the decode instance's name; rank r writes to that instance's rank-r agent
    seq: int
    src_pages: tuple[int, ...]
    dst_pages: tuple[int, ...]
    deadline: float  # time.monotonic() seconds (one host's clock: rank processes share it)
    last: bool = False  # the request's last write (its step completes the prompt's pages)


@dataclass
class ConnectorUpdate:
    """What the connector hands the engine at the start of a step."""

    admit: list[Request] = field(default_factory=list)  # prefill: handshake done, schedule it
    # decode: KV + first token (+ the prefill side's MTP drafts for the first step)
    arrived: list[tuple[Request, int, LogprobsDict | None, tuple[int, ...]]] = field(default_factory=list)
    failed: list[tuple[Request, str]] = field(default_factory=list)  # end it with an error, saying why


class RankChannel(Protocol):
    def connector_call(self, message: Any) -> list[Any]:
        """Run KVConnectorWorker.handle(message) on every TP rank; the results in rank order."""


class KVConnectorWorker(abc.ABC):
    """Every TP rank: its shard of the KV pool and its transfer agent."""

    @abc.abstractmethod
    def register(self, kv_caches: dict[int, tuple[Any, Any]], rank: int) -> None:
        """Register this rank's KV pool (once, after allocation)."""

    @abc.abstractmethod
    def handle(self, message: Any) -> Any:
        """A typed control message from rank 0's connector; the result goes back to rank 0."""

    @abc.abstractmethod
    def after_forward(self, sends: list[KVSend]) -> None:
        """The step that writes these pages is enqueued on the device: send them once it has run."""

    @abc.abstractmethod
    def close(self) -> None: ...


class KVConnector(abc.ABC):
    """Rank 0: one instance's side of the handover protocol (see the module docstring)."""

    mode: str  # "prefill" | "decode"
    async_transfer: bool

    @abc.abstractmethod
    def worker_factory(self) -> Callable[[Any, int], KVConnectorWorker]:
        """A picklable callable (EngineConfig, rank) -> the rank's KVConnectorWorker (spawned ranks build theirs)."""

    @abc.abstractmethod
    def bind(self, scheduler: Any, pool: Any, ranks: RankChannel) -> None:
        """Called once by the engine before the first request."""

    @abc.abstractmethod
    def add(self, req: Request, params: DisaggParams) -> None:
        """A new request of this role; the connector owns it until poll() admits, hands over or fails it."""

    @abc.abstractmethod
    def abort(self, req: Request) -> None:
        """The request ended on this side (client gone, error): tell the peer, release what it holds."""

    @abc.abstractmethod
    def poll(self) -> ConnectorUpdate: ...

    @abc.abstractmethod
    def plan_sends(self, scheduled: list[Any]) -> list[KVSend]:
        """Prefill: the page writes the step being launched makes possible (pages it completes)."""

    @abc.abstractmethod
    def after_step(self, sends: list[KVSend]) -> None:
        """The step ran (its tokens are on the host): sync transfer posts the step's sends now."""

    def rides_on_step(self, send: KVSend) -> bool:
        """Whether the send goes with the step's forward (async transfer: a CUDA event recorded after it, then
        the rank's transfer thread posts it); else after_step takes it once the step ran."""
        return self.async_transfer

    def posts_before_next_step(self, sends: list[KVSend]) -> bool:
        """Whether the step whose after_step takes these sends must not overlap the next step, so that their
        writes are posted before the next step's kernels are submitted."""
        return False

    @abc.abstractmethod
    def first_token(self, req: Request, token: int, logprobs: LogprobsDict | None) -> None:
        """Prefill: the request's first token, to hand over once its pages have landed."""

    def first_drafts(self, req: Request, drafts: tuple[int, ...]) -> None:
        """Prefill with MTP: the drafts the NextN layer made from the prompt's last hidden state, handed over
        with the first token (the decode side has no hidden state to draft its first step from)."""

    @abc.abstractmethod
    def held_pages(self) -> list[int]:
        """Page references the connector holds (pages being sent), for the engine's leak checks."""

    @abc.abstractmethod
    def has_work(self) -> bool:
        """Anything in flight (the engine loop keeps stepping while true)."""

    def wake_sockets(self) -> list[Any]:
        """ZMQ sockets whose messages must wake an idle engine loop (a prefill instance's handshake socket)."""
        return []

    @abc.abstractmethod
    def wait(self, timeout_s: float) -> None:
        """Block up to timeout_s for a message from a peer (a step with nothing to run calls this, not a spin)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, float]:
        """Counters merged into the engine's stats (names start with disagg_)."""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """What the router needs (role, bootstrap address)."""

    @abc.abstractmethod
    def close(self) -> None: ...

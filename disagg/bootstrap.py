"""The control connection between a prefill instance and its decode peers (ZMQ, pickled disagg.protocol
messages). The prefill instance binds a ROUTER socket at its bootstrap address; each decode instance connects
one DEALER socket (identity = its instance name) per prefill instance it uses. Nothing here blocks: the engine
loop polls. A peer that dies is not reported by ZMQ; both sides' per-request deadlines end its requests.
"""
from __future__ import annotations

import logging
import pickle
import socket
from typing import Any

import zmq

from disagg import wire
from disagg.protocol import INSTANCE_MESSAGES

log = logging.getLogger(__name__)

MAX_MESSAGES_PER_POLL = 1024


def _loads(frame: bytes) -> Any:
    return wire.loads(frame, INSTANCE_MESSAGES)


def _message(frames: list[bytes]) -> tuple[bytes, Any] | None:
    """(identity, message) from a ROUTER socket's frames; None (logged) for anything else that reached it."""
    try:
        identity, frame = frames
        return identity, _loads(frame)
    except Exception as exc:  # noqa: BLE001 - not our peer (a scan, a stray client): drop it, keep serving
        log.warning("dropped a malformed message on the bootstrap socket (%d frames): %s: %s", len(frames),
                    type(exc).__name__, exc)
        return None


class BootstrapServer:
    """Prefill side: receives from every decode instance, replies by its identity."""

    def __init__(self, host: str, port: int) -> None:
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a message to a gone peer is dropped, never blocks
        if port == 0:
            port = self._sock.bind_to_random_port(f"tcp://{host}")
        else:
            self._sock.bind(f"tcp://{host}:{port}")
        # the address decode instances connect to: a wildcard bind is advertised as this host's address
        advertised = socket.gethostbyname(socket.gethostname()) if host in ("0.0.0.0", "*", "") else host
        self.address = f"tcp://{advertised}:{port}"

    def receive(self) -> list[tuple[bytes, Any]]:
        out = []
        while len(out) < MAX_MESSAGES_PER_POLL:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            message = _message(frames)
            if message is not None:
                out.append(message)
        return out

    def send(self, identity: bytes, message: Any) -> None:
        try:
            self._sock.send_multipart([identity, pickle.dumps(message)], zmq.NOBLOCK)
        except zmq.Again:
            pass  # the peer's queue is full (it is not reading): its requests end by deadline

    def wait(self, timeout_s: float) -> None:
        self._sock.poll(int(timeout_s * 1000))

    def has_pending(self) -> bool:
        return bool(self._sock.poll(0))

    @property
    def socket(self) -> zmq.Socket:
        return self._sock

    def close(self) -> None:
        self._sock.close(0)


class BootstrapClients:
    """Decode side: one DEALER per prefill instance, created on first use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ctx = zmq.Context.instance()
        self._socks: dict[str, zmq.Socket] = {}
        self._poller = zmq.Poller()

    def connected(self, addr: str) -> bool:
        return addr in self._socks

    def send(self, addr: str, message: Any) -> None:
        sock = self._socks.get(addr)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, self.name.encode())
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.connect(addr)
            self._socks[addr] = sock
            self._poller.register(sock, zmq.POLLIN)
        try:
            sock.send(pickle.dumps(message), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the prefill instance is not reading: its requests end by deadline

    def receive(self) -> list[tuple[str, Any]]:
        out = []
        for addr, sock in self._socks.items():
            while len(out) < MAX_MESSAGES_PER_POLL:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                out.append((addr, _loads(frame)))
        return out

    def drop(self, addr: str) -> None:
        """Forget a prefill instance's socket (it restarted or went away): the next send reconnects afresh."""
        sock = self._socks.pop(addr, None)
        if sock is not None:
            self._poller.unregister(sock)
            sock.close(0)

    def wait(self, timeout_s: float) -> None:
        if self._socks:
            self._poller.poll(int(timeout_s * 1000))

    def close(self) -> None:
        for addr in list(self._socks):
            self.drop(addr)

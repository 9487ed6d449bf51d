"""The router's view of its instances: health, role, bootstrap address and load, and the choice of one instance of a
role per request. A router serves either prefill/decode pairs or colocated instances (plain glint servers, no
disaggregation: the router then only spreads requests, e.g. as the same-GPU-count baseline of a disaggregated setup).

An instance is healthy when `GET /health` answers 200 and `GET /disagg/info` reports the role it was given (and, for
a prefill instance, a bootstrap address). Requests go to the healthy instance with the fewest outstanding requests
(ties: the one sent fewer requests so far, i.e. round robin). A prefill instance may instead be chosen by prompt
prefix (rendezvous hashing of the prompt's first characters), so that requests sharing a prefix meet the same
prefix cache, unless that instance has more than `affinity_slack` requests more outstanding than the least loaded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

logger = logging.getLogger("glint.router")

ROLES = ("prefill", "decode")
COLOCATED = "colocated"
_MODE = {"prefill": "prefill", "decode": "decode", COLOCATED: "null"}  # what /disagg/info reports per role
# The request fields a prompt's first tokens come from, in the order a chat template lays them out.
_PREFIX_FIELDS = ("model", "tools", "system", "instructions", "messages", "prompt", "input")


class RouterStartupError(Exception):
    """The configured instances cannot serve as given (wrong role, never came up, different models)."""


@dataclass
class Instance:
    url: str  # base URL without a trailing slash
    role: str
    healthy: bool = False
    reason: str = "not checked yet"
    bootstrap_addr: str | None = None
    models: list[str] = field(default_factory=list)
    in_flight: int = 0
    sent: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "role": self.role,
            "healthy": self.healthy,
            "reason": None if self.healthy else self.reason,
            "bootstrap_addr": self.bootstrap_addr,
            "models": self.models,
            "in_flight": self.in_flight,
        }


@dataclass
class Probe:
    ok: bool
    reason: str = ""
    fatal: str | None = None  # a misconfiguration that waiting will not fix
    bootstrap_addr: str | None = None
    models: list[str] = field(default_factory=list)


async def probe(client: httpx.AsyncClient, inst: Instance, headers: dict[str, bytes]) -> Probe:
    """One health and role check of an instance."""
    try:
        health = await client.get(f"{inst.url}/health", headers=headers)
        if health.status_code != 200:
            return Probe(False, f"/health answered {health.status_code}")
        info = await client.get(f"{inst.url}/disagg/info", headers=headers)
    except httpx.HTTPError as e:
        return Probe(False, f"unreachable ({type(e).__name__}: {e})")
    if info.status_code == 404:
        reason = "/disagg/info answered 404"
        return Probe(False, reason, fatal=f"{inst.url}: {reason}: not a glint server started with "
                     f"--disaggregation-mode {inst.role}?")
    if info.status_code in (401, 403):
        reason = f"/disagg/info answered {info.status_code}"
        return Probe(False, reason, fatal=f"{inst.url}: {reason}: pass the instances' key as --upstream-api-key")
    if info.status_code != 200:
        return Probe(False, f"/disagg/info answered {info.status_code}")
    try:
        data = info.json()
    except ValueError:
        return Probe(False, "/disagg/info did not answer JSON")
    mode = data.get("mode")
    if mode != _MODE[inst.role]:
        start = "without --disaggregation-mode" if inst.role == COLOCATED else f"with --disaggregation-mode {inst.role}"
        other = next((r for r, m in _MODE.items() if m == mode), None)
        return Probe(
            False,
            f"role mismatch: reports mode {mode!r}",
            fatal=f"{inst.url} was given as a {inst.role} instance but reports --disaggregation-mode {mode!r}; "
            f"start it {start}" + (f" or pass it as --{other} to the router" if other else ""),
        )
    addr = data.get("bootstrap_addr")
    if inst.role == "prefill" and not addr:
        return Probe(False, "no bootstrap_addr", fatal=f"prefill instance {inst.url} reports no bootstrap_addr")
    return Probe(True, bootstrap_addr=addr, models=[str(m) for m in data.get("models") or []])


def prefix_key(body: bytes, n_chars: int) -> str | None:
    """The first n_chars of a request's prompt-bearing fields, or None (affinity off or not a JSON object)."""
    if n_chars <= 0:
        return None
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            return None
        text = json.dumps([data.get(k) for k in _PREFIX_FIELDS], ensure_ascii=False, separators=(",", ":"))
    except (ValueError, RecursionError):  # RecursionError: nested too deep; the instances answer such a body
        return None
    return text[:n_chars]


def _rendezvous(key: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{url}\0{key}".encode(), digest_size=8).digest(), "big")


class InstancePool:
    def __init__(
        self, prefill: Iterable[str], decode: Iterable[str], affinity_slack: int = 2, colocated: Iterable[str] = ()
    ) -> None:
        self.instances = [Instance(u.rstrip("/"), "prefill") for u in prefill]
        self.instances += [Instance(u.rstrip("/"), "decode") for u in decode]
        self.instances += [Instance(u.rstrip("/"), COLOCATED) for u in colocated]
        self.affinity_slack = affinity_slack
        self.colocated = any(i.role == COLOCATED for i in self.instances)

    def of_role(self, role: str) -> list[Instance]:
        return [i for i in self.instances if i.role == role]

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles a request needs one healthy instance of."""
        return (COLOCATED,) if self.colocated else ROLES

    @property
    def answering_role(self) -> str:
        """The role that answers requests that generate nothing (models, token counts)."""
        return COLOCATED if self.colocated else "decode"

    def ready(self) -> bool:
        return all(any(i.healthy for i in self.of_role(r)) for r in self.roles)

    def pick(self, role: str, key: str | None = None, exclude: Iterable[Instance] = ()) -> Instance | None:
        skip = set(map(id, exclude))
        cands = [i for i in self.of_role(role) if i.healthy and id(i) not in skip]
        if not cands:
            return None
        least = min(cands, key=lambda i: (i.in_flight, i.sent))
        if key is not None:
            preferred = max(cands, key=lambda i: _rendezvous(key, i.url))
            if preferred.in_flight <= least.in_flight + self.affinity_slack:
                return preferred
        return least

    def acquire(self, inst: Instance) -> None:
        inst.in_flight += 1
        inst.sent += 1

    def release(self, inst: Instance) -> None:
        inst.in_flight -= 1

    def mark_down(self, inst: Instance, reason: str) -> None:
        if inst.healthy:
            logger.warning("%s instance %s marked unhealthy: %s", inst.role, inst.url, reason)
        inst.healthy = False
        inst.reason = reason

    def apply(self, inst: Instance, p: Probe) -> None:
        if p.ok and not inst.healthy:
            logger.info("%s instance %s is healthy", inst.role, inst.url)
        elif not p.ok and inst.healthy:
            logger.warning("%s instance %s is unhealthy: %s", inst.role, inst.url, p.reason)
        inst.healthy, inst.reason = p.ok, p.reason
        if p.ok:
            inst.bootstrap_addr, inst.models = p.bootstrap_addr, p.models

    async def refresh(self, client: httpx.AsyncClient, headers: dict[str, bytes]) -> list[Probe]:
        probes = await asyncio.gather(*(probe(client, i, headers) for i in self.instances))
        for inst, p in zip(self.instances, probes):
            self.apply(inst, p)
        return list(probes)

    async def wait_ready(
        self, client: httpx.AsyncClient, headers: dict[str, bytes], timeout: float, interval: float = 0.5
    ) -> None:
        """Wait until every instance is up (or, after `timeout` seconds, at least one of each role).

        Raises RouterStartupError at once on a role mismatch, and at the deadline if a role has no instance up.
        """
        deadline = time.monotonic() + timeout
        while True:
            probes = await self.refresh(client, headers)
            fatal = [p.fatal for p in probes if p.fatal]
            if fatal:
                raise RouterStartupError("; ".join(fatal))
            if all(p.ok for p in probes):
                break
            if time.monotonic() >= deadline:
                down = [f"{i.role} {i.url}: {i.reason}" for i in self.instances if not i.healthy]
                if not self.ready():
                    raise RouterStartupError(
                        f"instances not up after {timeout:g} s (--startup-timeout): " + "; ".join(down)
                    )
                logger.warning("starting without instances that are not up yet: %s", "; ".join(down))
                break
            await asyncio.sleep(interval)
        self._check_models()

    def _check_models(self) -> None:
        up = [i for i in self.instances if i.healthy and i.models]
        if up and any(set(i.models) != set(up[0].models) for i in up):
            served = "; ".join(f"{i.role} {i.url}: {i.models}" for i in up)
            raise RouterStartupError(f"instances serve different models: {served}")

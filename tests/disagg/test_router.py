"""The disaggregation router (disagg/router*.py) against fake prefill and decode instances: raw ASGI apps on
uvicorn in threads, which record what they receive and answer canned JSON or SSE."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

import disagg.router_proxy
from disagg.router import RouterConfig, build_app, check_instances, parse_args
from disagg.router_pool import InstancePool, RouterStartupError, prefix_key
from disagg.router_proxy import BOOTSTRAP_HEADER, ROOM_HEADER

ROOT = Path(__file__).resolve().parents[2]
ROOM = ROOM_HEADER.lower()
BOOT = BOOTSTRAP_HEADER.lower()
CHAT = {"model": "glm", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


async def _until_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass
class FakeInstance:
    """A glint instance's HTTP surface as far as the router sees it."""

    role: str
    name: str
    report_mode: str | None = None  # what /disagg/info says (default: role; "" for no such route)
    models: list[str] = field(default_factory=lambda: ["glm"])
    status: int = 200
    key: str | None = None  # /disagg/info needs "Authorization: Bearer <key>" (as on a glint server with --api-key)
    healthy: bool = True
    hang: bool = False  # accept the request, never answer
    die_midstream: bool = False  # after the first SSE event, drop the connection
    gate: threading.Event | None = None  # when given, answers wait for it (streams: after the first event)
    error_after: threading.Event | None = None  # when given, an error status (status != 200) waits for it
    seen: list[Seen] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def bootstrap(self) -> str:
        return f"tcp://10.0.0.1:{5000 + sum(map(ord, self.name))}"

    def json_body(self) -> bytes:  # odd spacing and an escape: a re-serialisation would differ
        return f'{{"id": "{self.name}",  "object":"chat.completion", "note":"d\\u00e9code"}}\n'.encode()

    def events(self) -> list[bytes]:
        return [f'data: {{"from":"{self.name}","n":{i}}}\n\n'.encode() for i in range(3)] + [b"data: [DONE]\n\n"]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path, method = scope["path"], scope["method"]
        if method == "GET":
            if path == "/health":
                return await self._send(send, 200 if self.healthy else 503, b"")
            auth = dict(scope["headers"]).get(b"authorization", b"").decode()
            if path == "/disagg/info" and self.key and auth != f"Bearer {self.key}":
                return await self._send(send, 401, b"{}")
            if path == "/disagg/info" and self.report_mode != "":
                info = {"mode": self.report_mode or self.role, "models": self.models,
                        "bootstrap_addr": self.bootstrap if self.role == "prefill" else None}
                return await self._send(send, 200, json.dumps(info).encode())
            if path == "/v1/models":
                return await self._send(send, 200, b'{"object": "list", "data": [{"id": "glm"}]}')
            return await self._send(send, 404, b"{}")
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.seen.append(Seen(path, {k.decode(): v.decode() for k, v in scope["headers"]}, body))
        if self.hang:
            await _until_disconnect(receive)
            self.cancelled.set()
            return
        if self.status != 200:
            if self.error_after is not None:
                await asyncio.to_thread(self.error_after.wait, 10)
            err = {"error": {"message": f"{self.name} refused", "type": "server_error", "code": "x"}}
            extra = ((b"retry-after", b"30"), (b"x-request-id", f"req-{self.name}".encode()))
            return await self._send(send, self.status, json.dumps(err).encode(), extra)
        try:
            stream = json.loads(body).get("stream")
        except (ValueError, RecursionError):  # as a glint server would: a 400
            return await self._send(send, 400, b'{"error": {"message": "not JSON", "type": "invalid_request_error"}}')
        if stream:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream"), (b"x-from", self.name.encode())]})
            events = self.events()
            await send({"type": "http.response.body", "body": events[0], "more_body": True})
            if self.die_midstream:
                raise RuntimeError("fake instance dies")
            if not await self._hold(receive):
                return
            for e in events[1:]:
                await send({"type": "http.response.body", "body": e, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if await self._hold(receive):
            await self._send(send, 200, self.json_body(), ((b"x-request-id", f"req-{self.name}".encode()),))

    async def _hold(self, receive: Any) -> bool:
        """Wait for the gate; False (and `cancelled` set) when the client went away first."""
        if self.gate is None:
            return True
        gone = asyncio.ensure_future(_until_disconnect(receive))
        try:
            while not self.gate.is_set():
                if gone.done():
                    self.cancelled.set()
                    return False
                await asyncio.sleep(0.01)
            return True
        finally:
            gone.cancel()

    async def _send(self, send: Any, status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        headers = [(b"content-type", b"application/json"), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class ServerThread:
    def __init__(self, app: Any, lifespan: str = "off") -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan=lifespan, timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def cluster() -> Iterator[Any]:
    servers: list[ServerThread] = []

    class Cluster:
        def instance(self, fake: FakeInstance) -> str:
            servers.append(ServerThread(fake))
            return servers[-1].url

        def router(self, prefill: list[str], decode: list[str], **kw: Any) -> tuple[str, InstancePool]:
            opts: dict[str, Any] = {"health_interval": 60.0, "startup_timeout": 5.0, "read_timeout": 5.0}
            config = RouterConfig(prefill=prefill, decode=decode, **{**opts, **kw})
            pool = InstancePool(prefill, decode, config.prefill_affinity_slack, config.colocated)
            asyncio.run(check_instances(config, pool))
            servers.append(ServerThread(build_app(config, pool), lifespan="on"))
            return servers[-1].url, pool

        def stop(self, url: str) -> None:
            next(s for s in servers if s.url == url).stop()

    yield Cluster()
    for s in reversed(servers):
        if s.thread.is_alive():
            s.stop()


def _eventually(done: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for what runs beside the answer (the dropped prefill request, the in-flight release) to happen."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "did not happen within the timeout"
        time.sleep(0.01)


def _pair(cluster: Any, **decode_kw: Any) -> tuple[FakeInstance, FakeInstance, str]:
    p, d = FakeInstance("prefill", "P"), FakeInstance("decode", "D", **decode_kw)
    url, _ = cluster.router([cluster.instance(p)], [cluster.instance(d)])
    return p, d, url


def test_same_body_and_room_to_both_and_decode_answer_byte_for_byte(cluster: Any) -> None:
    p, d, url = _pair(cluster)
    body = json.dumps(CHAT).encode()
    headers = {"authorization": "Bearer sk-1", "anthropic-version": "2023-06-01", "content-type": "application/json",
               "x-private": "not for upstream", ROOM: "12345"}
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers, timeout=10)
    assert r.status_code == 200
    assert r.content == d.json_body()
    assert r.headers["content-type"] == "application/json" and r.headers["x-request-id"] == "req-D"
    _eventually(lambda: len(p.seen) == 1)  # the prefill answer is dropped; it may land just after the decode one
    assert len(p.seen) == 1 and len(d.seen) == 1
    ps, ds = p.seen[0], d.seen[0]
    assert ps.body == body and ds.body == body and ps.path == ds.path == "/v1/chat/completions"
    assert ps.headers[ROOM] == ds.headers[ROOM] != "12345"
    assert 0 <= int(ds.headers[ROOM]) < 2**63
    assert ds.headers[BOOT] == p.bootstrap and BOOT not in ps.headers
    for h in (ps.headers, ds.headers):
        assert h["authorization"] == "Bearer sk-1" and h["anthropic-version"] == "2023-06-01"
        assert "x-private" not in h and h["content-length"] == str(len(body))
        assert h["host"] != url.split("//")[1]  # the upstream's own host, not the router's
    assert r.headers[ROOM] == ds.headers[ROOM]
    # a second request draws another room
    httpx.post(f"{url}/v1/chat/completions", content=body, timeout=10)
    assert d.seen[1].headers[ROOM] != ds.headers[ROOM]


def test_sse_passes_through_chunk_by_chunk_before_upstream_ends(cluster: Any) -> None:
    gate = threading.Event()
    _, d, url = _pair(cluster, gate=gate)
    got = b""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=5) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        assert r.headers["x-from"] == "D"
        chunks = r.iter_raw()
        while len(got) < len(d.events()[0]):
            got += next(chunks)  # a buffering router would time out here: the decode side waits on the gate
        assert got == d.events()[0]
        gate.set()
        for c in chunks:
            got += c
    assert got == b"".join(d.events())


def test_load_spreads_over_two_decode_instances(cluster: Any) -> None:
    gate = threading.Event()
    p = FakeInstance("prefill", "P")
    d1, d2 = FakeInstance("decode", "D1", gate=gate), FakeInstance("decode", "D2", gate=gate)
    url, pool = cluster.router([cluster.instance(p)], [cluster.instance(d1), cluster.instance(d2)])
    with httpx.Client(timeout=5) as c:
        streams = []
        for _ in range(2):  # two held streams: the second goes to the idle instance
            s = c.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True})
            r = s.__enter__()
            chunks = r.iter_raw()  # kept: dropping the iterator closes the response
            next(chunks)
            streams.append((s, r, chunks))
        assert {r.headers["x-from"] for _, r, _ in streams} == {"D1", "D2"}
        assert [i.in_flight for i in pool.of_role("decode")] == [1, 1]
        gate.set()
        for s, r, chunks in streams:
            assert b"".join(chunks).endswith(b"data: [DONE]\n\n")
            s.__exit__(None, None, None)
        for _ in range(6):
            assert c.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200
    assert len(d1.seen) == len(d2.seen) == 4
    assert [i.in_flight for i in pool.of_role("decode")] == [0, 0]


def test_dead_decode_is_skipped_and_traffic_moves(cluster: Any) -> None:
    p = FakeInstance("prefill", "P")
    d1, d2 = FakeInstance("decode", "D1"), FakeInstance("decode", "D2")
    u1 = cluster.instance(d1)
    url, _ = cluster.router([cluster.instance(p)], [u1, cluster.instance(d2)])
    cluster.stop(u1)
    t0 = time.monotonic()
    for _ in range(4):
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 200 and r.content == d2.json_body()
    assert time.monotonic() - t0 < 5
    assert len(d1.seen) == 0 and len(d2.seen) == 4
    h = httpx.get(f"{url}/health").json()
    assert [i["healthy"] for i in h["decode"]] == [False, True] and "connect" in h["decode"][0]["reason"]
    metrics = httpx.get(f"{url}/metrics").text
    assert f'glint_router_upstream_errors_total{{instance="{u1}",kind="connect",role="decode"}} 1.0' in metrics


def test_dead_prefill_is_skipped_with_a_fresh_room(cluster: Any) -> None:
    p1, p2, d = FakeInstance("prefill", "P1"), FakeInstance("prefill", "P2"), FakeInstance("decode", "D")
    u1, u2 = cluster.instance(p1), cluster.instance(p2)
    url, pool = cluster.router([u1, u2], [cluster.instance(d)], prefill_affinity_chars=0)
    cluster.stop(u1)
    for _ in range(4):  # the first goes to P1 (least loaded, first listed), fails to connect, is retried
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200
    _eventually(lambda: len(p2.seen) == 4)
    metrics = httpx.get(f"{url}/metrics").text
    assert f'glint_router_upstream_errors_total{{instance="{u1}",kind="connect",role="prefill"}} 1.0' in metrics
    assert len(p2.seen) == 4 and not pool.of_role("prefill")[0].healthy
    served = [s for s in d.seen if s.headers[BOOT] == p2.bootstrap]  # decode requests paired with the live one
    assert {s.headers[ROOM] for s in served} == {s.headers[ROOM] for s in p2.seen}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_only_decode_dead_gives_502_in_route_shape_and_health_503(cluster: Any, path: str) -> None:
    p, d = FakeInstance("prefill", "P"), FakeInstance("decode", "D")
    ud = cluster.instance(d)
    url, _ = cluster.router([cluster.instance(p)], [ud])
    cluster.stop(ud)
    t0 = time.monotonic()
    r = httpx.post(f"{url}{path}", json=CHAT, timeout=10)
    assert time.monotonic() - t0 < 3
    assert r.status_code == 502
    if path == "/v1/messages":
        assert r.json()["type"] == "error" and ud in r.json()["error"]["message"]
    else:
        assert r.json()["error"]["code"] == "upstream_connect" and ud in r.json()["error"]["message"]
    # now down: no healthy decode instance
    r = httpx.post(f"{url}{path}", json=CHAT, timeout=10)
    assert r.status_code == 503
    h = httpx.get(f"{url}/health")
    assert h.status_code == 503 and any(ud in x for x in h.json()["down"])


def test_silent_decode_times_out_with_502_and_is_closed(cluster: Any) -> None:
    p, d = FakeInstance("prefill", "P"), FakeInstance("decode", "D", hang=True)
    url, _ = cluster.router([cluster.instance(p)], [cluster.instance(d)], read_timeout=1.0)
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={"model": "glm", "prompt": "x"}, timeout=10)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_timeout"
    assert 0.9 < time.monotonic() - t0 < 3
    assert d.cancelled.wait(3)


def test_client_disconnect_cancels_both_upstream_requests(cluster: Any) -> None:
    gate = threading.Event()
    p, d = FakeInstance("prefill", "P", gate=gate), FakeInstance("decode", "D", gate=gate)
    url, pool = cluster.router([cluster.instance(p)], [cluster.instance(d)])
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=5) as r:
        next(r.iter_raw())
    assert d.cancelled.wait(5) and p.cancelled.wait(5)
    deadline = time.monotonic() + 5
    while any(i.in_flight for i in pool.instances):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "glint_router_client_disconnects_total" in httpx.get(f"{url}/metrics").text


@pytest.mark.parametrize("path,marker", [("/v1/chat/completions", b'data: {"error"'),
                                         ("/v1/messages", b"event: error\ndata: {\"type\": \"error\"")])
def test_decode_dying_midstream_ends_stream_with_error_event(cluster: Any, path: str, marker: bytes) -> None:
    _, d, url = _pair(cluster, die_midstream=True)
    t0 = time.monotonic()
    with httpx.stream("POST", f"{url}{path}", json={**CHAT, "stream": True}, timeout=5) as r:
        body = r.read()
    assert time.monotonic() - t0 < 3
    assert body.startswith(d.events()[0]) and marker in body[len(d.events()[0]):]


def test_prefill_failure_ends_request_with_its_error_and_cancels_decode(cluster: Any) -> None:
    gate = threading.Event()
    p, d = FakeInstance("prefill", "P", status=500), FakeInstance("decode", "D", gate=gate)
    url, _ = cluster.router([cluster.instance(p)], [cluster.instance(d)])
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=5)
    assert r.status_code == 500 and r.json()["error"]["message"] == "P refused"
    assert r.headers["retry-after"] == "30" and r.headers["x-request-id"] == "req-P"  # its headers too
    assert d.cancelled.wait(3)


def test_client_giving_up_on_a_non_streaming_request_cancels_it(cluster: Any) -> None:
    gate = threading.Event()
    _, d, url = _pair(cluster, gate=gate)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"model": "glm", "prompt": "x"}, timeout=0.5)
    assert d.cancelled.wait(3)


def test_decode_error_status_passes_through(cluster: Any) -> None:
    _, _, url = _pair(cluster, status=400)
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["message"] == "D refused"
    assert r.headers["retry-after"] == "30" and r.headers["x-request-id"] == "req-D"


def test_token_routes_go_to_a_decode_instance_only(cluster: Any) -> None:
    """/v1/messages/count_tokens, /tokenize and /detokenize (with /v1/) tokenize and never generate: one decode
    instance answers, the prefill instance sees nothing, the path and body pass through, the API key holds."""
    p, d = FakeInstance("prefill", "P", key="k1"), FakeInstance("decode", "D", key="k1")
    url, _ = cluster.router([cluster.instance(p)], [cluster.instance(d)], api_keys=("k1",))
    paths = ["/v1/messages/count_tokens", "/tokenize", "/v1/tokenize", "/detokenize", "/v1/detokenize"]
    for path in paths:
        assert httpx.post(f"{url}{path}", json={"prompt": "a"}, timeout=5).status_code == 401
        r = httpx.post(f"{url}{path}", json={"prompt": "a"}, headers={"x-api-key": "k1"}, timeout=5)
        assert r.status_code == 200 and r.json()["id"] == "D", (path, r.text)
    assert [s.path for s in d.seen] == paths and all(json.loads(s.body) == {"prompt": "a"} for s in d.seen)
    assert p.seen == []


def test_models_metrics_and_api_key(cluster: Any) -> None:
    p, d = FakeInstance("prefill", "P", key="k1"), FakeInstance("decode", "D", key="k1")
    ud = cluster.instance(d)
    url, _ = cluster.router([cluster.instance(p)], [ud], api_keys=("k1",))
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 401
    r = httpx.post(f"{url}/v1/messages", json=CHAT)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    m = httpx.get(f"{url}/v1/models", headers={"x-api-key": "k1"})
    assert m.status_code == 200 and m.content == b'{"object": "list", "data": [{"id": "glm"}]}'
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer k1"}, timeout=5)
    assert r.status_code == 200 and d.seen[-1].headers["authorization"] == "Bearer k1"
    h = httpx.get(f"{url}/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    text = httpx.get(f"{url}/metrics").text
    key = f'instance="{ud}",role="decode",route="/v1/chat/completions"'
    assert f"glint_router_requests_total{{{key}}} 1.0" in text
    assert f'glint_router_in_flight{{instance="{ud}",role="decode"}} 0.0' in text
    assert f'glint_router_instance_healthy{{instance="{ud}",role="decode"}} 1.0' in text


def test_health_poller_takes_instance_out_and_back(cluster: Any) -> None:
    p = FakeInstance("prefill", "P")
    d1, d2 = FakeInstance("decode", "D1"), FakeInstance("decode", "D2")
    url, pool = cluster.router([cluster.instance(p)], [cluster.instance(d1), cluster.instance(d2)],
                               health_interval=0.1)
    d1.healthy = False
    deadline = time.monotonic() + 5
    while pool.of_role("decode")[0].healthy:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for _ in range(3):
        httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=5)
    assert len(d1.seen) == 0 and len(d2.seen) == 3
    d1.healthy = True
    while not pool.of_role("decode")[0].healthy:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for _ in range(4):
        httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=5)
    assert len(d1.seen) >= 1


def test_startup_refuses_role_mismatch_and_different_models(cluster: Any) -> None:
    wrong = cluster.instance(FakeInstance("prefill", "W", report_mode="decode"))
    d = cluster.instance(FakeInstance("decode", "D"))
    config = RouterConfig(prefill=[wrong], decode=[d], startup_timeout=5)
    with pytest.raises(RouterStartupError, match=f"{wrong} was given as a prefill instance but reports"):
        asyncio.run(check_instances(config, InstancePool([wrong], [d])))
    other = cluster.instance(FakeInstance("prefill", "P", models=["other"]))
    with pytest.raises(RouterStartupError, match="different models"):
        asyncio.run(check_instances(config, InstancePool([other], [d])))
    colocated = cluster.instance(FakeInstance("prefill", "C", report_mode="null"))
    with pytest.raises(RouterStartupError, match="reports --disaggregation-mode 'null'; start it with"):
        asyncio.run(check_instances(config, InstancePool([colocated], [d])))
    keyed = cluster.instance(FakeInstance("prefill", "K", key="k9"))
    with pytest.raises(RouterStartupError, match="answered 401: pass the instances' key as --upstream-api-key"):
        asyncio.run(check_instances(config, InstancePool([keyed], [d])))
    config_k = RouterConfig(prefill=[keyed], decode=[d], startup_timeout=5, upstream_api_key="k9")
    asyncio.run(check_instances(config_k, InstancePool([keyed], [d])))
    plain = cluster.instance(FakeInstance("prefill", "N", report_mode=""))
    with pytest.raises(RouterStartupError, match="/disagg/info answered 404"):
        asyncio.run(check_instances(config, InstancePool([plain], [d])))
    dead = "http://127.0.0.1:9"
    config = RouterConfig(prefill=[dead], decode=[d], startup_timeout=0.3)
    with pytest.raises(RouterStartupError, match="not up after 0.3 s"):
        asyncio.run(check_instances(config, InstancePool([dead], [d])))


def test_prefill_affinity_is_stable_and_yields_to_load() -> None:
    pool = InstancePool([f"http://p{i}" for i in range(3)], ["http://d"], affinity_slack=2)
    for inst in pool.instances:
        inst.healthy = True
    prompts = [json.dumps({"messages": [{"role": "user", "content": f"doc {i} " * 50}]}).encode() for i in range(60)]
    keys = [prefix_key(b, 2048) for b in prompts]
    first = [pool.pick("prefill", k) for k in keys]
    assert all(pool.pick("prefill", k) is f for k, f in zip(keys, first))  # same prefix, same instance
    assert len({id(f) for f in first}) == 3  # different prefixes spread over all three
    # a longer conversation with the same first 2048 characters keeps its instance
    long = json.loads(prompts[0])
    long["messages"] += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    assert pool.pick("prefill", prefix_key(json.dumps(long).encode(), 40)) is pool.pick("prefill", keys[0][:40])
    # an instance going down moves only its own keys
    gone = first[0]
    gone.healthy = False
    moved = [pool.pick("prefill", k) for k in keys]
    assert all(m is f for m, f in zip(moved, first) if f is not gone) and all(m is not gone for m in moved)
    gone.healthy = True
    # too much load on the preferred instance: the least loaded one instead
    first[0].in_flight = 3
    assert pool.pick("prefill", keys[0]) is not first[0]
    first[0].in_flight = 2
    assert pool.pick("prefill", keys[0]) is first[0]
    assert prefix_key(b"not json", 100) is None and prefix_key(prompts[0], 0) is None


def test_cli_starts_serves_and_refuses_mismatch(cluster: Any) -> None:
    p, d = FakeInstance("prefill", "P"), FakeInstance("decode", "D")
    up, ud = cluster.instance(p), cluster.instance(d)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "disagg.router", "--prefill", up, "--decode", ud, "--port", str(port)]
    proc = subprocess.Popen(cmd + ["--log-level", "warning"], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=5)
        assert r.content == d.json_body()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    bad = subprocess.run(
        [sys.executable, "-m", "disagg.router", "--prefill", ud, "--decode", ud, "--port", str(port)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False,
    )
    assert bad.returncode == 2
    assert f"{ud} was given as a prefill instance but reports --disaggregation-mode 'decode'" in bad.stderr


def _colocated(cluster: Any, n: int, router_kw: dict[str, Any] | None = None,
               **kw: Any) -> tuple[list[FakeInstance], str, InstancePool]:
    fakes = [FakeInstance("colocated", f"C{i}", report_mode="null", **kw) for i in range(n)]
    url, pool = cluster.router([], [], colocated=[cluster.instance(f) for f in fakes], **(router_kw or {}))
    return fakes, url, pool


def test_colocated_instances_answer_alone_byte_for_byte_and_share_the_load(cluster: Any) -> None:
    gate = threading.Event()
    fakes, url, pool = _colocated(cluster, 2, {"prefill_affinity_chars": 0}, gate=gate)
    body = json.dumps({**CHAT, "stream": True}).encode()
    with httpx.Client(timeout=5) as c:
        streams = []
        for _ in range(2):  # two held streams, no prefix affinity: the second goes to the idle instance
            s = c.stream("POST", f"{url}/v1/chat/completions", content=body, headers={"authorization": "Bearer k"})
            r = s.__enter__()
            chunks = r.iter_raw()
            first = next(chunks)
            streams.append((s, r, chunks, first))
        assert {r.headers["x-from"] for _, r, _, _ in streams} == {"C0", "C1"}
        assert all(ROOM not in r.headers for _, r, _, _ in streams)  # no room: nothing was disaggregated
        assert [i.in_flight for i in pool.of_role("colocated")] == [1, 1]
        gate.set()
        for s, r, chunks, first in streams:
            name = r.headers["x-from"]
            assert first + b"".join(chunks) == b"".join(next(f for f in fakes if f.name == name).events())
            s.__exit__(None, None, None)
        plain = json.dumps(CHAT).encode()
        r = c.post(f"{url}/v1/chat/completions", content=plain, headers={"authorization": "Bearer k"})
        assert r.status_code == 200 and r.content in {f.json_body() for f in fakes}
        assert c.get(f"{url}/v1/models").status_code == 200  # answered by a colocated instance
        health = c.get(f"{url}/health").json()
    for f in fakes:
        for seen in f.seen:
            assert seen.body in (body, plain)
            assert ROOM not in seen.headers and BOOT not in seen.headers
            assert seen.headers["authorization"] == "Bearer k"
    assert sum(len(f.seen) for f in fakes) == 3
    assert health["status"] == "ok" and [i["url"] for i in health["colocated"]] == [i.url for i in pool.instances]
    assert "prefill" not in health and [i.in_flight for i in pool.of_role("colocated")] == [0, 0]


def test_colocated_prefix_affinity_and_a_dead_instance(cluster: Any) -> None:
    fakes, url, pool = _colocated(cluster, 2)
    # the prefix -> instance hash covers the instances' (random) ports: choose prompts that prefer each instance
    names = {i.url: f.name for i, f in zip(pool.instances, fakes)}
    chats: list[dict[str, Any]] = []
    preferred: list[str] = []
    for i in range(200):
        m = {**CHAT, "messages": [{"role": "user", "content": f"doc {i} " * 40}]}
        inst = pool.pick("colocated", prefix_key(json.dumps(m).encode(), 2048))
        assert inst is not None
        if preferred.count(names[inst.url]) < 4:
            chats.append(m)
            preferred.append(names[inst.url])
    assert sorted(preferred) == ["C0"] * 4 + ["C1"] * 4
    with httpx.Client(timeout=5) as c:
        first = [c.post(f"{url}/v1/chat/completions", json=m).json()["id"] for m in chats]
        again = [c.post(f"{url}/v1/chat/completions", json=m).json()["id"] for m in chats]
        assert first == again == preferred  # same prefix, same instance; both used
        cluster.stop(pool.instances[0].url)  # C0 goes away: its prompts move, nothing fails
        moved = [c.post(f"{url}/v1/chat/completions", json=m) for m in chats]
        assert all(r.status_code == 200 and r.json()["id"] == "C1" for r in moved)
        cluster.stop(pool.instances[1].url)
        r = c.post(f"{url}/v1/chat/completions", json=CHAT)
        assert r.status_code in (502, 503) and r.json()["error"]["code"] in ("upstream_connect", "no_healthy_instance")
        assert c.get(f"{url}/health").status_code == 503


def test_colocated_role_is_checked_and_cannot_be_mixed(cluster: Any) -> None:
    d = cluster.instance(FakeInstance("decode", "D"))
    config = RouterConfig(prefill=[], decode=[], colocated=[d], startup_timeout=5.0)
    with pytest.raises(RouterStartupError, match="given as a colocated instance but reports --disaggregation-mode "
                                                 "'decode'; start it without --disaggregation-mode or pass it as "
                                                 "--decode"):
        asyncio.run(check_instances(config, InstancePool([], [], colocated=[d])))
    plain = cluster.instance(FakeInstance("colocated", "C", report_mode="null"))
    with pytest.raises(RouterStartupError, match="given as a decode instance but reports --disaggregation-mode "
                                                 "'null'; start it with --disaggregation-mode decode or pass it as "
                                                 "--colocated to the router"):
        asyncio.run(check_instances(config, InstancePool([d], [plain])))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["--colocated", plain, "--decode", d], ["--prefill", d]):
        bad = subprocess.run([sys.executable, "-m", "disagg.router", *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=30, check=False)
        assert bad.returncode == 2 and ("cannot be mixed" in bad.stderr or "give at least one" in bad.stderr)


def test_non_ascii_header_values_pass_through_unchanged(cluster: Any) -> None:
    # header values may carry any byte from 0x80 up (a UTF-8 user agent or request id); httpx encodes a str value
    # as ASCII, so the router used to answer 500 and leak the prefill instance's in-flight count
    p, d = FakeInstance("prefill", "P"), FakeInstance("decode", "D")
    url, pool = cluster.router([cluster.instance(p)], [cluster.instance(d)])
    headers = {"user-agent": "café/1.0".encode(), "x-request-id": "req-é".encode()}
    for body in (CHAT, {**CHAT, "stream": True}):
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=5)
        assert r.status_code == 200
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=5)
    assert models.status_code == 200
    _eventually(lambda: len(p.seen) == 2 and not any(i.in_flight for i in pool.instances))
    assert len(p.seen) == len(d.seen) == 2
    for seen in p.seen + d.seen:
        assert seen.headers["user-agent"] == "café/1.0" and seen.headers["x-request-id"] == "req-é"
    assert [i.in_flight for i in pool.instances] == [0, 0]


def test_non_ascii_api_key(cluster: Any) -> None:
    # a key given as --api-key is text; clients send it UTF-8 encoded, as the instances expect (server/middleware.py)
    key = "clé-ü"
    p, d = FakeInstance("prefill", "P", key=key), FakeInstance("decode", "D", key=key)
    url, _ = cluster.router([cluster.instance(p)], [cluster.instance(d)], api_keys=(key,))
    good = {"authorization": f"Bearer {key}".encode()}
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=good, timeout=5)
    assert r.status_code == 200 and d.seen[-1].headers["authorization"] == f"Bearer {key}"
    assert httpx.get(f"{url}/v1/models", headers={"x-api-key": key.encode()}, timeout=5).status_code == 200
    bad = {"authorization": f"Bearer {key}".encode("latin-1")}  # other bytes, same text once decoded as latin-1
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=bad, timeout=5).status_code == 401


def test_deeply_nested_json_body_reaches_the_instances(cluster: Any) -> None:
    # json.loads raises RecursionError (not ValueError) on deep nesting: the prompt-prefix key must not crash on it
    _, _, url = _pair(cluster)
    for body in (b"[" * 100_000, b"not json", b'{"messages": ' + b"[" * 100_000 + b"}"):
        r = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=5)
        assert r.status_code == 400 and r.json()["error"]["message"] == "not JSON"


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_one_cut_off_response_does_not_take_the_instance_out(cluster: Any, role: str) -> None:
    # a connection cut mid-response may be that request's failure alone (e.g. an exception in its handler after
    # the headers went out); a dead instance is taken out by its refused connections and its health checks
    p, d = FakeInstance("prefill", "P"), FakeInstance("decode", "D")
    dying = p if role == "prefill" else d
    dying.die_midstream = True
    if role == "prefill":
        d.gate = threading.Event()  # the decode stream waits, so the prefill failure is seen while it is open
    up, ud = cluster.instance(p), cluster.instance(d)
    url, pool = cluster.router([up], [ud])
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=5) as r:
        assert b"error" in r.read()
    dying.die_midstream = False
    if d.gate is not None:
        d.gate.set()
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=5)
    assert r.status_code == 200 and r.content == d.json_body()
    assert all(i.healthy for i in pool.instances)
    metrics = httpx.get(f"{url}/metrics").text
    dead_url = up if role == "prefill" else ud
    assert f'glint_router_upstream_errors_total{{instance="{dead_url}",kind="transport",role="{role}"}}' in metrics


def test_unknown_route_and_wrong_method_answer_in_the_route_error_shape(cluster: Any) -> None:
    _, _, url = _pair(cluster)
    r = httpx.post(f"{url}/v1/embeddings", json={"input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found" and "/v1/embeddings" in r.text
    r = httpx.get(f"{url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["allow"] == "POST"
    r = httpx.get(f"{url}/v1/messages")
    assert r.status_code == 405 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_a_response_that_ended_is_not_a_client_disconnect(cluster: Any) -> None:
    # once the response's last byte is out, the client's receive() says http.disconnect (uvicorn): the router
    # must not take that for the client going away while it still cancels the prefill side
    gate = threading.Event()  # the prefill side never answers
    p, d = FakeInstance("prefill", "P", gate=gate), FakeInstance("decode", "D", die_midstream=True)
    url, pool = cluster.router([cluster.instance(p)], [cluster.instance(d)])
    with httpx.Client(timeout=5) as c:
        for _ in range(3):
            with c.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert b"error" in r.read()
        d.status = 400
        for _ in range(3):
            assert c.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 400
    assert p.cancelled.wait(3)
    _eventually(lambda: not any(i.in_flight for i in pool.instances))
    assert "glint_router_client_disconnects_total{" not in httpx.get(f"{url}/metrics").text


def test_prefill_failure_after_the_stream_started_names_its_error(cluster: Any) -> None:
    # the decode stream is open (its 200 went out) when the prefill instance answers 503: the error event says
    # what the prefill instance said, not only its status
    refuse = threading.Event()
    p = FakeInstance("prefill", "P", status=503, error_after=refuse)
    d = FakeInstance("decode", "D", gate=threading.Event())
    url, _ = cluster.router([cluster.instance(p)], [cluster.instance(d)])
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=5) as r:
        assert r.status_code == 200
        refuse.set()  # the prefill instance answers 503 once the client has the decode stream's 200
        text = r.read().decode()
    assert "answered 503: P refused" in text, text
    assert d.cancelled.wait(3)


def test_one_request_id_reaches_both_instances(cluster: Any) -> None:
    p, d, url = _pair(cluster)
    httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=5)
    httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"x-request-id": "mine-1"}, timeout=5)
    _eventually(lambda: len(p.seen) == 2)
    made, given = (s.headers.get("x-request-id") for s in p.seen)
    assert made and len(made) == 32 and given == "mine-1"  # the router's own id when the client sent none
    assert [s.headers["x-request-id"] for s in d.seen] == [made, given]


def test_a_body_over_the_cap_is_413_and_never_forwarded(cluster: Any) -> None:
    p, d = FakeInstance("prefill", "P"), FakeInstance("decode", "D")
    url, _ = cluster.router([cluster.instance(p)], [cluster.instance(d)], max_request_bytes=1000)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=big, timeout=5)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunks = iter([json.dumps(big).encode()[i:i + 100] for i in range(0, 2100, 100)])  # no content-length
    r = httpx.post(f"{url}/v1/messages", content=chunks, timeout=5)
    assert r.status_code == 413 and r.json()["type"] == "error"
    assert httpx.post(f"{url}/v1/messages/count_tokens", json=big, timeout=5).status_code == 413
    assert p.seen == [] and d.seen == []
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=5).status_code == 200


def test_a_router_bug_answers_in_the_route_error_shape(cluster: Any, monkeypatch: Any) -> None:
    _, _, url = _pair(cluster)

    def broken(body: bytes, n_chars: int) -> str:
        raise RuntimeError("bug")
    monkeypatch.setattr(disagg.router_proxy, "prefix_key", broken)
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=5)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    r = httpx.post(f"{url}/v1/messages", json=CHAT, timeout=5)
    assert r.status_code == 500 and r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"


@pytest.mark.parametrize("flag,value", [("--connect-retries", "-1"), ("--read-timeout", "0"),
                                        ("--max-request-bytes", "0"), ("--prefill-affinity-chars", "-5"),
                                        ("--port", "-1"), ("--port", "70000")])
def test_out_of_range_router_options_are_refused(flag: str, value: str, capsys: Any) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(["--prefill", "p:1", "--decode", "d:2", flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err
    with pytest.raises(ValueError, match="connect_retries"):
        RouterConfig(prefill=["p"], decode=["d"], connect_retries=-1)

"""One disaggregated request: the same body to a prefill and a decode instance under one room, and the decode
instance's response passed through to the client chunk by chunk as it arrives. Behind a router of colocated
instances a request goes to one of them alone (no room), and its response passes through the same way.

Failure rules:
- A connection that could not be made (nothing was sent) marks the instance down and retries the pair once with a
  fresh room (`connect_retries`), as long as the client's response has not started.
- Any other upstream failure before the response started is a 502 in the route's error shape; a failure after it
  started ends the stream (an SSE error event in the route's format, then the end; a non-SSE body is cut off by
  closing the connection, so the client cannot take a truncated body for a whole one).
- The prefill instance's response is read and dropped. If it fails (error status or transport error) while the
  decode response is still coming, the KV will never arrive, so the request ends with the prefill's error.
  When the decode instance answers with an error status the prefill request is cancelled.
- A client that goes away cancels both upstream requests (their connections are closed, and the instances abort).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from disagg.router_metrics import RouterMetrics
from disagg.router_pool import COLOCATED, Instance, InstancePool, prefix_key

logger = logging.getLogger("glint.router")

ROOM_HEADER = "X-Glint-Disagg-Room"
BOOTSTRAP_HEADER = "X-Glint-Disagg-Bootstrap"
# Client headers passed upstream; anything else (host, content-length, cookies, spoofed room headers) is not.
FORWARD_HEADERS = (
    "authorization", "x-api-key", "anthropic-version", "anthropic-beta", "content-type", "accept",
    "x-request-id", "user-agent",
)
# Upstream response headers not passed to the client (hop by hop, or set by the router's own server).
_DROP_RESPONSE_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server", b"te",
     b"trailer", b"upgrade", b"proxy-connection", ROOM_HEADER.lower().encode()}
)
_OPENAI_TYPES = {401: "authentication_error", 404: "not_found_error"}
_ANTHROPIC_TYPES = {401: "authentication_error", 404: "not_found_error", 503: "overloaded_error"}


def forward_headers(headers: Mapping[str, str]) -> dict[bytes, bytes]:
    # as bytes, the client's own: Starlette decodes values as latin-1, and httpx would encode a str value as ASCII
    # and raise on a byte from 0x80 up (a UTF-8 user agent, request id or API key)
    out = {k.encode(): headers[k].encode("latin-1") for k in FORWARD_HEADERS if k in headers}
    out[b"accept-encoding"] = b"identity"  # bodies pass through byte for byte, never re-encoded
    return out


def upstream_message(body: bytes) -> str:
    """The message of an instance's error body (OpenAI or Anthropic shape), or "" when it has none."""
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        return ""
    msg = err.get("message") if isinstance(err, dict) else err
    return msg if isinstance(msg, str) else ""


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_body(path: str, status: int, message: str, code: str) -> dict[str, Any]:
    if is_anthropic(path):
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(path: str, status: int, message: str, code: str) -> JSONResponse:
    headers = {"Retry-After": "5"} if status == 503 else None
    return JSONResponse(error_body(path, status, message, code), status_code=status, headers=headers)


def sse_error(path: str, message: str, code: str) -> bytes:
    """An error event after a stream started, in the format of the route's own stream."""
    if is_anthropic(path):
        text = f"event: error\ndata: {json.dumps(error_body(path, 502, message, code))}\n\n"
    elif path.startswith("/v1/responses"):
        payload = {"type": "error", "code": code, "message": message, "param": None}
        text = f"event: error\ndata: {json.dumps(payload)}\n\n"
    else:
        text = f"data: {json.dumps(error_body(path, 502, message, code))}\n\ndata: [DONE]\n\n"
    return text.encode()


class UpstreamError(Exception):
    def __init__(
        self, inst: Instance, kind: str, message: str, status: int | None = None, body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(f"{inst.role} instance {inst.url}: {message}")
        self.inst, self.kind, self.message = inst, kind, message
        self.status, self.body, self.headers = status, body, headers or []  # headers: of an error status


class _Retry(Exception):
    def __init__(self, error: UpstreamError) -> None:
        self.error = error


class _AbortConnection(Exception):
    """Raised out of the ASGI app so that the server closes a connection whose body was cut off."""


@dataclass
class RouterState:
    pool: InstancePool
    metrics: RouterMetrics
    client: httpx.AsyncClient
    affinity_chars: int = 0
    connect_retries: int = 1
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def failure(self, inst: Instance, exc: httpx.HTTPError) -> UpstreamError:
        """Classify a transport error; a connection that could not be made takes the instance out of routing."""
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            kind = "connect"
        elif isinstance(exc, httpx.TimeoutException):
            kind = "timeout"
        else:
            kind = "transport"
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        message = f"{kind} error ({detail})"
        # Not a timeout, nor a connection cut mid-request: that can be one request's failure alone (its handler
        # raised after the headers went out), and taking the instance out would 503 everything meanwhile. A dead
        # instance refuses the next connection (then it is taken out, the pair retried) and fails its health check.
        if kind == "connect":
            self.pool.mark_down(inst, message)
        self.metrics.upstream_errors.labels(inst.role, inst.url, kind).inc()
        return UpstreamError(inst, kind, message)


def _response_headers(resp: httpx.Response) -> list[tuple[bytes, bytes]]:
    return [(k.lower(), v) for k, v in resp.headers.raw if k.lower() not in _DROP_RESPONSE_HEADERS]


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _cancel(task: asyncio.Task[Any]) -> None:
    if not task.done():
        task.cancel()
        await asyncio.wait({task})


class DisaggResponse(Response):
    """The ASGI response of one generation request; all upstream work runs inside `__call__`, next to a
    listener for the client's disconnect, which cancels it."""

    def __init__(self, state: RouterState, path: str, body: bytes, headers: Mapping[str, str]) -> None:
        super().__init__()
        self.state, self.path, self.body_bytes = state, path, body
        self.client_headers = forward_headers(headers)
        # one id for the request on every instance it touches (their logs are joined by it), unless the client
        # named one
        self.client_headers.setdefault(b"x-request-id", uuid.uuid4().hex.encode())
        self.room = 0
        self.tail = b"\n\n"  # the last bytes sent, to start an error event on a fresh line
        self.ended = False  # the response's last message went out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.monotonic()

        async def send_tracked(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.ended = True

        work = asyncio.ensure_future(self._serve(send_tracked))
        listener = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({work, listener}, return_when=asyncio.FIRST_COMPLETED)
            # once the response ended, receive() says http.disconnect (uvicorn) although the client is still
            # there: the work is only cleaning up (e.g. cancelling the prefill side) and must not be cut short
            if not work.done() and not self.ended:
                self.state.metrics.client_disconnects.labels(self.path).inc()
                await _cancel(work)
                return
            await work
        finally:
            await _cancel(listener)
            await _cancel(work)
            self.state.metrics.duration.labels(self.path).observe(time.monotonic() - start)

    async def _serve(self, send: Send) -> None:
        pool = self.state.pool
        key = prefix_key(self.body_bytes, self.state.affinity_chars)
        tried: list[Instance] = []
        last: UpstreamError | None = None
        for attempt in range(self.state.connect_retries + 1):
            may_retry = attempt < self.state.connect_retries
            # colocated: the prefix-affine instance answers alone; disaggregated: a prefill and a decode instance
            pair = [pool.pick(COLOCATED, key, tried)] if pool.colocated else \
                [pool.pick("prefill", key, tried), pool.pick("decode", None, tried)]
            if None in pair:
                if last is not None:  # the retry found no other instance: report the failure itself
                    await self._send_upstream_error(send, last)
                    return
                role = pool.roles[pair.index(None)]
                await self._send_error(send, 503, f"no healthy {role} instance", "no_healthy_instance")
                return
            try:
                if pool.colocated:
                    await self._forward(send, pair[0], may_retry)
                else:
                    await self._exchange(send, pair[0], pair[1], may_retry)
                return
            except _Retry as r:
                tried.append(r.error.inst)
                last = r.error

    async def _forward(self, send: Send, c: Instance, may_retry: bool) -> None:
        """Colocated: the request to one instance, its response passed through."""
        st = self.state
        st.pool.acquire(c)
        st.metrics.requests.labels(self.path, c.role, c.url).inc()
        resp: httpx.Response | None = None
        try:
            req = st.client.build_request("POST", c.url + self.path, content=self.body_bytes,
                                          headers=self.client_headers)
            try:
                resp = await st.client.send(req, stream=True)
            except httpx.HTTPError as e:
                err = st.failure(c, e)
                if err.kind == "connect" and may_retry:
                    raise _Retry(err) from e
                await self._send_upstream_error(send, err)
                return
            no_prefill: asyncio.Future[UpstreamError | None] = asyncio.get_running_loop().create_future()
            no_prefill.set_result(None)  # nothing else can fail this response
            await self._stream(send, resp, no_prefill, c)
        finally:
            if resp is not None:
                await resp.aclose()
            st.pool.release(c)

    async def _exchange(self, send: Send, p: Instance, d: Instance, may_retry: bool) -> None:
        st = self.state
        self.room = secrets.randbits(63)
        p_headers = {**self.client_headers, ROOM_HEADER.encode(): str(self.room).encode()}
        d_headers = {**p_headers, BOOTSTRAP_HEADER.encode(): (p.bootstrap_addr or "").encode()}
        for inst in (p, d):
            st.pool.acquire(inst)
            st.metrics.requests.labels(self.path, inst.role, inst.url).inc()
        prefill = asyncio.ensure_future(self._prefill(p, p_headers))
        resp: httpx.Response | None = None
        detach = False
        try:
            try:
                resp = await self._open_decode(d, d_headers, prefill)
            except UpstreamError as e:
                if e.kind == "connect" and may_retry:
                    raise _Retry(e) from e
                await self._send_upstream_error(send, e)
                return
            detach = await self._stream(send, resp, prefill, d) and resp.status_code < 400
        finally:
            if resp is not None:
                await resp.aclose()
            st.pool.release(d)
            if detach and not prefill.done():  # the decode side is done; let the prefill side finish on its own
                st.background.add(prefill)
                prefill.add_done_callback(st.background.discard)
            else:
                await _cancel(prefill)

    async def _prefill(self, p: Instance, headers: dict[bytes, bytes]) -> UpstreamError | None:
        """Send to the prefill instance and drop its answer; returns the failure, if any."""
        st = self.state
        try:
            req = st.client.build_request("POST", p.url + self.path, content=self.body_bytes, headers=headers)
            resp = await st.client.send(req, stream=True)
            data = b""
            try:
                async for chunk in resp.aiter_raw():
                    if resp.status_code >= 400 and len(data) < 1 << 16:
                        data += chunk
            finally:
                await resp.aclose()
            if resp.status_code < 400:
                return None
            st.metrics.upstream_errors.labels(p.role, p.url, "status").inc()
            logger.warning(
                "prefill instance %s answered %d (room %d): %s", p.url, resp.status_code, self.room, data[:500]
            )
            said = upstream_message(data)
            return UpstreamError(p, "status", f"answered {resp.status_code}" + (f": {said}" if said else ""),
                                 resp.status_code, data, _response_headers(resp))
        except httpx.HTTPError as e:
            err = st.failure(p, e)
            logger.warning("prefill request failed (room %d): %s", self.room, err)
            return err
        finally:
            st.pool.release(p)

    async def _open_decode(
        self, d: Instance, headers: dict[bytes, bytes], prefill: asyncio.Task[UpstreamError | None]
    ) -> httpx.Response:
        """The decode instance's response (status and headers), unless the prefill side fails first."""
        st = self.state
        req = st.client.build_request("POST", d.url + self.path, content=self.body_bytes, headers=headers)
        opening = asyncio.ensure_future(st.client.send(req, stream=True))
        try:
            while True:
                waiting = {opening} if prefill.done() else {opening, prefill}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if prefill.done() and prefill.result() is not None:
                    raise prefill.result()  # type: ignore[misc]
                if opening.done():
                    return opening.result()
        except httpx.HTTPError as e:
            raise st.failure(d, e) from e
        finally:
            if not opening.done():
                await _cancel(opening)
            elif not opening.cancelled() and opening.exception() is None and prefill.done() and prefill.result():
                await opening.result().aclose()  # both finished together and the prefill side failed

    async def _stream(
        self, send: Send, resp: httpx.Response, prefill: asyncio.Future[UpstreamError | None], d: Instance
    ) -> bool:
        """Pass the decode (or colocated) response through; True when it ended normally."""
        room = [(ROOM_HEADER.lower().encode(), str(self.room).encode())] if self.room else []
        headers = _response_headers(resp) + room
        await send({"type": "http.response.start", "status": resp.status_code, "headers": headers})
        self.state.metrics.responses.labels(self.path, str(resp.status_code)).inc()
        pump = asyncio.ensure_future(self._pump(send, resp, d))
        failure: UpstreamError | None = None
        try:
            while not pump.done():
                waiting = {pump} if prefill.done() else {pump, prefill}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if not pump.done() and prefill.done() and prefill.result() and resp.status_code < 400:
                    failure = prefill.result()
                    break
            if failure is None and pump.exception() is not None:
                exc = pump.exception()
                if not isinstance(exc, UpstreamError):
                    raise exc  # type: ignore[misc]
                failure = exc
        finally:
            await _cancel(pump)
        if failure is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return True
        message = f"{failure.inst.role} instance {failure.inst.url} failed mid-response: {failure.message}"
        logger.warning("room %d: %s", self.room, message)
        if not resp.headers.get("content-type", "").startswith("text/event-stream"):
            raise _AbortConnection(message)
        lead = b"" if self.tail.endswith(b"\n\n") else b"\n\n"
        event = lead + sse_error(self.path, message, f"upstream_{failure.kind}")
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return False

    async def _pump(self, send: Send, resp: httpx.Response, d: Instance) -> None:
        try:
            async for chunk in resp.aiter_raw():
                if chunk:
                    self.tail = (self.tail + chunk)[-2:]
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as e:
            raise self.state.failure(d, e) from e

    async def _send_upstream_error(self, send: Send, e: UpstreamError) -> None:
        if e.status is not None:  # the instance answered with an error: pass it through, with its headers
            # (Retry-After, x-should-retry, x-request-id), as a decode instance's error passes through
            await send({"type": "http.response.start", "status": e.status, "headers": e.headers})
            await send({"type": "http.response.body", "body": e.body, "more_body": False})
            self.state.metrics.responses.labels(self.path, str(e.status)).inc()
            return
        message = f"{e.inst.role} instance {e.inst.url} failed: {e.message}"
        await self._send_error(send, 502, message, f"upstream_{e.kind}")

    async def _send_error(self, send: Send, status: int, message: str, code: str) -> None:
        self.state.metrics.responses.labels(self.path, str(status)).inc()
        resp = error_response(self.path, status, message, code)
        await send({"type": "http.response.start", "status": status, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body, "more_body": False})


async def simple_proxy(
    state: RouterState, method: str, path: str, body: bytes, headers: Mapping[str, str]
) -> Response:
    """A non-generating request (models, token counts) answered by one healthy decode (or colocated) instance."""
    tried: list[Instance] = []
    role = state.pool.answering_role
    while True:
        d = state.pool.pick(role, None, tried)
        if d is None:
            return error_response(path, 503, f"no healthy {role} instance", "no_healthy_instance")
        state.pool.acquire(d)
        state.metrics.requests.labels(path, d.role, d.url).inc()
        try:
            r = await state.client.request(
                method, d.url + path, content=body or None, headers=forward_headers(headers)
            )
        except httpx.HTTPError as e:
            err = state.failure(d, e)
            if err.kind == "connect":
                tried.append(d)
                continue
            message = f"{role} instance {d.url} failed: {err.message}"
            return error_response(path, 502, message, f"upstream_{err.kind}")
        finally:
            state.pool.release(d)
        kept = {k.decode("latin-1"): v.decode("latin-1") for k, v in _response_headers(r)}
        return Response(r.content, status_code=r.status_code, headers=kept)

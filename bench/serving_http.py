"""A small HTTP/1.1 client with Server-Sent-Events parsing, on asyncio streams (stdlib only).

The serving benchmark must not depend on aiohttp/httpx, so this file does the little it needs:
one connection per request (``Connection: close``), a JSON POST or a GET, a response body that is
chunked, length-delimited or read to EOF, and an incremental SSE decoder that hands out every
``data:`` payload with the time its bytes arrived.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from dataclasses import dataclass, field
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 64 * 1024
MAX_ERROR_BODY = 64 * 1024
_EOL = re.compile(rb"\r\n|\r|\n")


class HTTPError(Exception):
    """Transport or protocol failure (connection refused, reset, malformed response)."""


class IncompleteBody(HTTPError):
    """The peer closed the connection before the response body was complete."""


@dataclass
class Endpoint:
    scheme: str
    host: str
    port: int
    base_path: str  # path prefix of the base URL, without trailing slash

    @classmethod
    def parse(cls, base_url: str) -> "Endpoint":
        u = urlsplit(base_url if "://" in base_url else "http://" + base_url)
        if u.scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme {u.scheme!r} in {base_url!r}")
        port = u.port or (443 if u.scheme == "https" else 80)
        return cls(u.scheme, u.hostname or "127.0.0.1", port, u.path.rstrip("/"))

    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    _body_iter: AsyncIterator[bytes] | None = field(default=None, repr=False)

    def iter_body(self) -> AsyncIterator[bytes]:
        """Raw body bytes as they arrive, with chunked transfer coding removed."""
        if self._body_iter is None:
            self._body_iter = _body_chunks(self.reader, self.headers)
        return self._body_iter

    async def read(self, limit: int | None = None) -> bytes:
        buf = bytearray()
        async for piece in self.iter_body():
            buf += piece
            if limit is not None and len(buf) >= limit:
                del buf[limit:]
                break
        return bytes(buf)

    async def close(self) -> None:
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - best effort on teardown
            pass


async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    te = headers.get("transfer-encoding", "").lower()
    if "chunked" in te:
        while True:
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise IncompleteBody("connection closed inside a chunk header")
            size_txt = line.split(b";", 1)[0].strip()
            try:
                size = int(size_txt, 16)
            except ValueError as e:
                raise HTTPError(f"bad chunk size line {line[:80]!r}") from e
            if size == 0:
                # trailers until an empty line (or EOF, which we tolerate after the last chunk)
                while True:
                    t = await reader.readline()
                    if t in (b"\r\n", b"\n", b""):
                        return
            remaining = size
            while remaining:
                piece = await reader.read(min(remaining, 65536))
                if not piece:
                    raise IncompleteBody("connection closed inside a chunk")
                remaining -= len(piece)
                yield piece
            crlf = await reader.readline()
            if crlf not in (b"\r\n", b"\n"):
                raise IncompleteBody("missing CRLF after chunk data")
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining:
            piece = await reader.read(min(remaining, 65536))
            if not piece:
                raise IncompleteBody(f"connection closed with {remaining} body bytes missing")
            remaining -= len(piece)
            yield piece
    else:
        while True:
            piece = await reader.read(65536)
            if not piece:
                return
            yield piece


async def request(
    endpoint: Endpoint,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """Open a connection, send one request, read status line and headers. Caller closes."""
    ssl_ctx = ssl.create_default_context() if endpoint.scheme == "https" else None
    try:
        reader, writer = await asyncio.open_connection(
            endpoint.host, endpoint.port, ssl=ssl_ctx, limit=MAX_HEADER_BYTES
        )
    except OSError as e:
        raise HTTPError(f"connect to {endpoint.host}:{endpoint.port} failed: {e}") from e
    try:
        lines = [
            f"{method} {endpoint.base_path}{path} HTTP/1.1",
            f"Host: {endpoint.host_header()}",
            "User-Agent: glint-bench/0.1",
            "Connection: close",
        ]
        hdrs = dict(headers or {})
        if body is not None:
            hdrs.setdefault("Content-Type", "application/json")
            hdrs["Content-Length"] = str(len(body))
        lines += [f"{k}: {v}" for k, v in hdrs.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if body:
            writer.write(body)
        await writer.drain()

        status_line = await reader.readline()
        if not status_line:
            raise IncompleteBody("connection closed before the status line")
        parts = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise HTTPError(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        resp_headers: dict[str, str] = {}
        total = 0
        while True:
            line = await reader.readline()
            total += len(line)
            if total > MAX_HEADER_BYTES:
                raise HTTPError("response headers too large")
            if not line:
                raise IncompleteBody("connection closed inside the headers")
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("latin-1").partition(":")
            key = name.strip().lower()
            value = value.strip()
            resp_headers[key] = f"{resp_headers[key]}, {value}" if key in resp_headers else value
        return Response(status, reason, resp_headers, reader, writer)
    except (OSError, ValueError, asyncio.LimitOverrunError) as e:
        writer.close()
        raise HTTPError(f"{type(e).__name__}: {e}") from e
    except BaseException:
        writer.close()
        raise


async def get_json(endpoint: Endpoint, path: str, headers: dict[str, str] | None = None,
                   timeout: float = 30.0) -> tuple[int, object]:
    """GET a JSON document. Returns (status, parsed body or raw text)."""

    async def go() -> tuple[int, object]:
        resp = await request(endpoint, "GET", path, headers=headers)
        try:
            raw = await resp.read(limit=16 * 1024 * 1024)
        finally:
            await resp.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode("utf-8", "replace")

    return await asyncio.wait_for(go(), timeout)


class SSEDecoder:
    """Incremental text/event-stream decoder.

    ``feed(bytes)`` returns the data payloads of the events completed by those bytes. Lines may end in
    CR, LF or CRLF (also split across feeds); ``:`` lines are comments; several ``data:`` lines of one
    event are joined with ``\\n``; ``event``/``id``/``retry`` fields are ignored.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._pending_cr = False  # the last feed ended in CR: a leading LF of the next one belongs to it

    def feed(self, chunk: bytes) -> list[str]:
        out: list[str] = []
        if not chunk:
            return out
        if self._pending_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._pending_cr = False
        buf = self._buf + chunk
        pos = 0
        for m in _EOL.finditer(buf):
            self._line(buf[pos:m.start()].decode("utf-8", "replace"), out)
            pos = m.end()
        self._pending_cr = pos == len(buf) and buf.endswith(b"\r")
        self._buf = buf[pos:]
        return out

    def flush(self) -> list[str]:
        """End of stream: a final event without its blank line still counts."""
        out: list[str] = []
        if self._buf:
            self._line(bytes(self._buf).decode("utf-8", "replace"), out)
            self._buf = b""
        self._line("", out)
        return out

    def _line(self, line: str, out: list[str]) -> None:
        if line == "":
            if self._data:
                out.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(":"):
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)


async def iter_sse(resp: Response) -> AsyncIterator[tuple[float, str]]:
    """Yield (arrival time from time.perf_counter(), data payload) for each SSE event."""
    dec = SSEDecoder()
    async for piece in resp.iter_body():
        now = time.perf_counter()
        for data in dec.feed(piece):
            yield now, data
    now = time.perf_counter()
    for data in dec.flush():
        yield now, data

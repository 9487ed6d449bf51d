"""Server-sent events and client-disconnect handling at the ASGI level.

`SSEResponse` runs the event iterator and a listener for `http.disconnect` side by side: when the client goes
away the iterator is cancelled and closed (its `finally` aborts the engine request), whatever the server's
ASGI spec version does with sends after a disconnect. `run_or_disconnect` does the same for non-streaming
handlers. Both read the raw ASGI receive channel, which is why every middleware here is plain ASGI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger("glint.server")

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"


def sse_data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_event(event: str, obj: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(StreamingResponse):
    def __init__(
        self,
        iterator: AsyncIterator[str],
        headers: dict[str, str] | None = None,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            iterator,
            status_code=200,
            headers={**SSE_HEADERS, **(headers or {})},
            media_type="text/event-stream",
        )
        self.on_disconnect = on_disconnect
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        iterator = self.body_iterator

        async def produce() -> None:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in iterator:
                await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        producer = asyncio.ensure_future(produce())
        listener = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({producer, listener}, return_when=asyncio.FIRST_COMPLETED)
            if producer not in done:
                self.disconnected = True
                producer.cancel()
                with contextlib.suppress(BaseException):
                    await producer
                if self.on_disconnect is not None:
                    self.on_disconnect()
            else:
                producer.result()
        finally:
            for task in (producer, listener):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            with contextlib.suppress(BaseException):
                await iterator.aclose()  # type: ignore[attr-defined]


async def run_or_disconnect(receive: Receive, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, or cancel it and raise ClientDisconnected when the client goes away first."""
    task = asyncio.ensure_future(awaitable)
    listener = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ClientDisconnected()
    finally:
        for t in (task, listener):
            if not t.done():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t

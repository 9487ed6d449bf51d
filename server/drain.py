"""Graceful drain on SIGTERM / SIGINT.

The first signal stops taking work (new requests and /health get 503 with Retry-After) and lets the requests
in flight run for up to --shutdown-timeout seconds. Whatever is still running then is ended the clean way: the
engine request is aborted and the client gets an error (on a stream: an error event, then `data: [DONE]` or
`message_stop`). A second signal skips the rest of the wait. Once every response went out, `on_done` tells
uvicorn to stop; the lifespan shutdown then stops the engine process.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from server.engine_client import ServerShuttingDown
from server.serving import ServerState

logger = logging.getLogger("glint.server")

RESPONSE_GRACE_S = 5.0  # after ending the last requests: time for their final events to be written


class Drainer:
    def __init__(self, state: ServerState, on_done: Callable[[], None]) -> None:
        self.state = state
        self.on_done = on_done
        self.loop: asyncio.AbstractEventLoop | None = None  # set by the app's lifespan
        self.task: asyncio.Task | None = None
        self.hurry = asyncio.Event()

    def request(self) -> bool:
        """Signal-handler safe. The first call starts the drain, later ones end it at once. False when there
        is no running loop to drain on (the caller stops the server directly)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return False
        loop.call_soon_threadsafe(self._start)
        return True

    def _start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run(), name="glint-drain")
        else:
            self.hurry.set()

    async def _run(self) -> None:
        try:
            await drain(self.state, self.state.config.shutdown_timeout, self.hurry)
        except Exception:  # noqa: BLE001 - the server must stop whatever happened here
            logger.exception("error while draining")
        finally:
            self.on_done()


async def drain(state: ServerState, timeout: float, hurry: asyncio.Event) -> None:
    state.draining = True
    loop = asyncio.get_running_loop()
    active = state.requests.active
    logger.info(
        "shutting down: new requests get 503; waiting up to %gs for %d request(s) in flight", timeout, active
    )
    deadline = loop.time() + timeout
    while state.requests.active > 0 and not hurry.is_set() and loop.time() < deadline:
        try:
            await asyncio.wait_for(hurry.wait(), 0.05)
        except asyncio.TimeoutError:
            pass
    ended = state.client.fail_in_flight(
        ServerShuttingDown("the server is shutting down; this request was ended before it finished")
    )
    if ended:
        logger.warning(
            "ended %d request(s) still running at shutdown (--shutdown-timeout %gs)", ended, timeout
        )
    grace = loop.time() + RESPONSE_GRACE_S
    while state.requests.active > 0 and loop.time() < grace:
        await asyncio.sleep(0.02)
    if state.requests.active:
        logger.warning("%d response(s) still being written at shutdown", state.requests.active)

"""Plain-ASGI middleware (no BaseHTTPMiddleware, which hides client disconnects).

One layer does, per HTTP request: the request id (`X-Request-Id` echoed from the client when sane, else made
up; always on the response), API-key auth (Bearer or `x-api-key`; only /health, /version and HEAD / are
exempt, /metrics too with --metrics-public, OPTIONS too when CORS is on), the request-size limit (413 from
Content-Length before reading, or as soon as a chunked body passes the limit), turning any unhandled
exception into a JSON 500 without a stack trace, a client that hangs up before its body is read into a quiet
499, and one log line per request with what the route recorded in `scope["state"]["glint_log"]` (token counts,
finish reason, TTFT...; never the prompt unless --log-requests full). Control characters in logged values are
escaped, so a request cannot forge log lines or drive the operator's terminal.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from typing import Any, Callable

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_response
from server.log_safety import escape_controls, has_controls

logger = logging.getLogger("glint.requests")

AUTH_EXEMPT = {"/health", "/version"}
QUIET_PATHS = {"/health", "/metrics"}
_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_NEEDS_QUOTES = re.compile(r'[\s"\\=]')


class RequestCounter:
    """HTTP requests being served (the graceful drain waits for it to reach 0)."""

    def __init__(self) -> None:
        self.active = 0


class RequestTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than this server accepts ({limit} bytes; see --max-request-bytes)",
            code="request_too_large",
        )


class GlintMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: tuple[str, ...] = (),
        metrics_public: bool = False,
        cors: bool = False,
        max_body: Callable[[], int] | None = None,
        counter: RequestCounter | None = None,
        log_requests: str = "meta",
        log_format: str = "text",
        max_log_chars: int = 2000,
    ) -> None:
        self.app = app
        self.api_keys = tuple(k.encode() for k in api_keys)
        self.exempt = AUTH_EXEMPT | ({"/metrics"} if metrics_public else set())
        self.cors = cors
        self.max_body = max_body
        self.counter = counter or RequestCounter()
        self.log_requests = log_requests
        self.log_format = log_format
        self.max_log_chars = max_log_chars

    def _needs_key(self, method: str, path: str) -> bool:
        if not self.api_keys or path in self.exempt:
            return False
        if method == "HEAD" and path == "/":
            return False
        return not (method == "OPTIONS" and self.cors)  # a CORS preflight carries no credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _ID_RE.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        log: dict[str, Any] = state.setdefault("glint_log", {})
        path, method = scope.get("path", ""), scope.get("method", "")
        status = {"code": 0, "started": False}
        rid_header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["started"] = True
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), rid_header]}
            await send(message)

        self.counter.active += 1
        try:
            tenant = self._tenant(headers)
            if tenant:
                state["tenant"] = tenant
            if self._needs_key(method, path) and not tenant:
                err = APIError(
                    401,
                    "invalid or missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
                log["error"] = "missing API key" if not headers.get("authorization") and "x-api-key" not in headers \
                    else "invalid API key"
                await error_response(err, path)(scope, receive, send_with_id)
                return
            limit = self.max_body() if self.max_body is not None else None
            if limit is not None:
                length = headers.get("content-length", "")
                if length.isdigit() and int(length) > limit:
                    log["request_bytes"] = int(length)
                    log["error"] = f"request body larger than {limit} bytes"
                    await error_response(RequestTooLarge(limit), path)(scope, receive, send_with_id)
                    return
                receive = _limited(receive, limit)
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # the client hung up before its body arrived: nothing to answer, nothing went wrong here
            log["disconnected"] = True
            if not status["started"]:
                status["code"] = 499
        except Exception as e:  # noqa: BLE001 - never a stack trace in a response body
            logger.exception(
                "unhandled error in %s %s (request %s)",
                escape_controls(method),
                escape_controls(path),
                request_id,
            )
            log.setdefault("error", type(e).__name__)
            if not status["started"]:
                await error_response(APIError(500, "internal server error"), path)(
                    scope, receive, send_with_id
                )
        finally:
            self.counter.active -= 1
            if self.log_requests != "off" and path not in QUIET_PATHS:
                self._log(request_id, scope, method, path, status["code"], time.monotonic() - t0, log)

    def _tenant(self, headers: dict[str, str]) -> str:
        """The tenant of an authorized request: a digest of the API key it presented ("" when no key matched
        or auth is off). Scopes cross-request state, such as the suffix decoder's global trees."""
        candidates = []
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            candidates.append(auth[7:].strip())
        if "x-api-key" in headers:
            candidates.append(headers["x-api-key"].strip())
        found = b""
        for c in candidates:
            cb = c.encode("latin-1")  # the bytes as sent (headers were decoded as latin-1): a UTF-8 key matches
            for key in self.api_keys:
                if hmac.compare_digest(cb, key):
                    found = key
        return hashlib.sha256(found).hexdigest()[:16] if found else ""

    def _log(
        self,
        request_id: str,
        scope: Scope,
        method: str,
        path: str,
        code: int,
        latency: float,
        fields: dict[str, Any],
    ) -> None:
        client = scope.get("client")
        record: dict[str, Any] = {
            "request_id": request_id,
            "client": f"{client[0]}:{client[1]}" if client else None,
            "method": method,
            "path": path,
            "status": code,
            "latency_s": round(latency, 4),
        }
        for k, v in fields.items():
            if k in ("prompt", "output") and isinstance(v, str) and len(v) > self.max_log_chars:
                v = v[: self.max_log_chars] + f"...[{len(v) - self.max_log_chars} more chars]"
            record[k] = v
        if self.log_format == "json":
            logger.info(escape_controls(json.dumps(record, ensure_ascii=False, default=str)))
        else:
            head = (
                f'{record.pop("client")} "{escape_controls(method)} {escape_controls(path)}" {code} '
                f"{record.pop('latency_s')}s"
            )
            record.pop("method"), record.pop("path"), record.pop("status")
            logger.info("%s %s", head, " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if v is not None))


def _limited(receive: Receive, limit: int) -> Receive:
    """`receive` that raises RequestTooLarge (a 413) once the body passes `limit` bytes."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise RequestTooLarge(limit)
        return message

    return wrapped


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        if not v or _NEEDS_QUOTES.search(v) or has_controls(v):
            return escape_controls(json.dumps(v, ensure_ascii=False))
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list, tuple)):
        return escape_controls(json.dumps(v, ensure_ascii=False, default=str, separators=(",", ":")))
    return escape_controls(str(v))

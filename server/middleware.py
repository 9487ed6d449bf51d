"""Plain-ASGI middleware (no BaseHTTPMiddleware, which hides client disconnects).

One layer does, per HTTP request: the request id (`X-Request-Id` echoed from the client when sane, else made
up; always on the response), API-key auth (Bearer or `x-api-key`; /health*, /metrics, / and OPTIONS are
exempt), turning any unhandled exception into a JSON 500 without a stack trace, and one log line per request
with what the route recorded in `scope["state"]["glint_log"]` (token counts, finish reason, TTFT...; never the
prompt unless --log-requests full).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_response

logger = logging.getLogger("glint.requests")

AUTH_EXEMPT = {"/", "/health", "/health_generate", "/metrics", "/ping", "/version"}
QUIET_PATHS = {"/health", "/metrics", "/ping"}
_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class GlintMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: tuple[str, ...] = (),
        log_requests: str = "meta",
        log_format: str = "text",
        max_log_chars: int = 2000,
    ) -> None:
        self.app = app
        self.api_keys = tuple(k.encode() for k in api_keys)
        self.log_requests = log_requests
        self.log_format = log_format
        self.max_log_chars = max_log_chars

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

        try:
            if (
                self.api_keys
                and method != "OPTIONS"
                and path not in AUTH_EXEMPT
                and not self._authorized(headers)
            ):
                err = APIError(
                    401,
                    "invalid or missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
                await error_response(err, path)(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        except Exception as e:  # noqa: BLE001 - never a stack trace in a response body
            logger.exception("unhandled error in %s %s (request %s)", method, path, request_id)
            log.setdefault("error", type(e).__name__)
            if not status["started"]:
                await error_response(APIError(500, "internal server error"), path)(
                    scope, receive, send_with_id
                )
        finally:
            if self.log_requests != "off" and path not in QUIET_PATHS:
                self._log(request_id, scope, method, path, status["code"], time.monotonic() - t0, log)

    def _authorized(self, headers: dict[str, str]) -> bool:
        candidates = []
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            candidates.append(auth[7:].strip())
        if "x-api-key" in headers:
            candidates.append(headers["x-api-key"].strip())
        ok = False
        for c in candidates:
            cb = c.encode("utf-8", "replace")
            for key in self.api_keys:
                ok |= hmac.compare_digest(cb, key)
        return ok

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
            logger.info(json.dumps(record, ensure_ascii=False, default=str))
        else:
            head = f'{record.pop("client")} "{method} {path}" {code} {record.pop("latency_s")}s'
            record.pop("method"), record.pop("path"), record.pop("status")
            logger.info("%s %s", head, " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if v is not None))


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False) if (" " in v or not v or "\n" in v) else v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, ensure_ascii=False, default=str, separators=(",", ":"))
    return str(v)

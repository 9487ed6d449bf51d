"""Error responses: OpenAI's nested shape everywhere, Anthropic's envelope on /v1/messages routes.

Every failure a client can cause is a 4xx with `{"error": {"message", "type", "param", "code"}}` (string codes);
nothing ever returns FastAPI's 422 or a stack trace.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        anthropic_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _OPENAI_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        # Anthropic's wording where Anthropic clients match on it (else `message`)
        self.anthropic_message = anthropic_message

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        kind = _ANTHROPIC_TYPES.get(
            self.status, "api_error" if self.status >= 500 else "invalid_request_error"
        )
        return {"type": "error", "error": {"type": kind, "message": self.anthropic_message or self.message}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_supported(feature: str, param: str | None = None) -> APIError:
    return APIError(
        400, f"{feature} is not supported yet by this server", param=param, code="unsupported_parameter"
    )


def unavailable(message: str, retry_after: int = 5) -> APIError:
    return APIError(503, message, code="service_unavailable", headers={"Retry-After": str(retry_after)})


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(err: APIError, path: str = "") -> JSONResponse:
    body = err.anthropic_body() if is_anthropic_path(path) else err.openai_body()
    headers = dict(err.headers)
    if err.status >= 500 and "x-should-retry" not in {k.lower() for k in headers} and err.status != 503:
        headers["x-should-retry"] = "false"
    return JSONResponse(body, status_code=err.status, headers=headers)


def sse_error_event(err: APIError) -> str:
    """An error after a stream has started: a data line the OpenAI SDK turns into APIError."""
    return f"data: {json.dumps(err.openai_body())}\n\n"

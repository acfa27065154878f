"""Errors a client can act on, one class per outcome, each with its HTTP status, its gRPC
status code and OpenAI's error JSON shape. The HTTP layer (``api.py``) and the gRPC layer
(``grpc_service.py``) both raise and translate these, so one request gets the same answer
over either protocol.

``describe_validation`` turns pydantic's error list into one sentence that names the field
and says what to send instead.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Base: ``status`` (HTTP), ``grpc_code`` (a ``grpc.StatusCode`` name), OpenAI's ``type``."""

    status = 400
    grpc_code = "INVALID_ARGUMENT"
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class BadRequest(ApiError):
    pass


class ModelNotFound(ApiError):
    status, grpc_code, type = 404, "NOT_FOUND", "invalid_request_error"


class NotFound(ApiError):
    """A named thing (an instance id) does not exist."""

    status, grpc_code, type = 404, "NOT_FOUND", "invalid_request_error"


class Unauthenticated(ApiError):
    status, grpc_code, type = 401, "UNAUTHENTICATED", "authentication_error"


class Forbidden(ApiError):
    status, grpc_code, type = 403, "PERMISSION_DENIED", "permission_error"


class PayloadTooLarge(ApiError):
    status, grpc_code, type = 413, "RESOURCE_EXHAUSTED", "invalid_request_error"


class Overloaded(ApiError):
    """A pool's queue is full: retry after ``retry_after_s`` (HTTP ``Retry-After``)."""

    status, grpc_code, type = 429, "RESOURCE_EXHAUSTED", "overloaded_error"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(f"{message}; retry in {retry_after_s} s", code="queue_full",
                         headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


class ServiceUnavailable(ApiError):
    status, grpc_code, type = 503, "UNAVAILABLE", "server_error"


class RequestTimeout(ApiError):
    """The server's per-request time limit passed (router.request_timeout_s)."""

    status, grpc_code, type = 504, "DEADLINE_EXCEEDED", "timeout_error"


class ClientTimeout(RequestTimeout):
    """The time limit the client asked for (X-Request-Timeout) passed: its choice, hence 4xx."""

    status = 408


class InternalError(ApiError):
    status, grpc_code, type = 500, "INTERNAL", "server_error"


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _path(loc: tuple) -> str:
    """('messages', 0, 'content') → 'messages[0].content'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for the first of pydantic's / FastAPI's validation errors."""
    if not errors:
        return "the request is invalid", None
    e = errors[0]
    loc = tuple(e.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    kind = e.get("type", "")
    if kind == "json_invalid":
        pos = loc[0] if loc and isinstance(loc[0], int) else None
        where = f" at character {pos}" if pos is not None else ""
        err = (e.get("ctx") or {}).get("error", "malformed JSON")
        return f"the request body is not valid JSON ({err}{where}); send a JSON object", None
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    if loc and loc[0] in ("header", "query") and len(loc) == 2:
        return f"the {loc[1]} {loc[0]}: {msg} (got {_short(e.get('input'))})", str(loc[1])
    if not loc:
        if kind == "missing":
            return "the request body is empty; send a JSON object with the request's fields", None
        if kind == "value_error":  # a check across fields
            return msg, None
        return "the request body must be a JSON object with the request's fields", None
    path = _path(loc)
    if kind == "missing":
        msg = "this field is required"
    wrong_type = kind.endswith(("_type", "_parsing")) and "input" in e
    extra = f" (got {_short(e['input'])})" if wrong_type else ""
    return f"{path}: {msg}{extra}", path


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

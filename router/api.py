"""The router's HTTP API: OpenAI-compatible completions and chat completions (SSE streaming
and non-streaming), models, health, and the admin stats. The Serve ingress deployment in
``ingress.py`` mounts it; the request logic shared with gRPC lives in ``frontend.py``.

Every error is OpenAI's JSON error shape with a status a client can act on: 400 (what to fix),
401 (key), 403 (admin disabled), 404 (model or path), 408 (the client's ``X-Request-Timeout``
passed), 413 (body size), 429 (+ ``Retry-After``), 503, 504 (the server's time limit passed).
Nothing a client sends can crash the router.

Order of checks for each request (``Guard``, a plain ASGI middleware, runs before routing and
before the body is parsed, so an unauthenticated client learns nothing about the schema):
    API key (/v1/...) or admin token (/admin/...)  →  body size  →  JSON schema (protocol.py)
    →  model, context and vocabulary (frontend.py)  →  admission (admission.py)  →  generation

A streaming request answers with its status only once its first token exists, so that
overload, unavailability and pool errors before the first token are real status codes, not
errors inside a 200 stream. A client that goes away aborts its request on every instance.
"""

from __future__ import annotations

import json
import logging
import resource
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from pdserve.workers.messages import Job
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve import __version__

from .errors import (
    ApiError,
    BadRequest,
    InternalError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    describe_validation,
    error_body,
)
from .frontend import Frontend, Piece
from .protocol import ChatCompletionRequest, CompletionRequest, now

__all__ = ["Frontend", "build_fastapi"]

log = logging.getLogger(__name__)

_ERROR_RESPONSES = {s: {"description": d} for s, d in [
    (400, "invalid request (the message says what to fix)"), (401, "missing or invalid API key"),
    (404, "unknown model"), (408, "the X-Request-Timeout passed"), (413, "body too large"),
    (429, "a pool's queue is full (Retry-After)"), (503, "no instance can take the request"),
    (504, "the server's time limit passed")]}


# Optional, but typed ``float`` rather than ``float | None``: the OpenAPI document must not
# offer null, which a header cannot carry.
_TIMEOUT_HEADER = Header(None, gt=0, description="seconds: a time limit for this request, "
                         "below the server's (router.request_timeout_s)")


def _json_error(e: ApiError) -> JSONResponse:
    headers = dict(e.headers)
    if e.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _route_path(scope) -> str:
    """The path inside the app (Serve mounts the app under its route prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class Guard:
    """ASGI middleware: authentication and the body size limit (see module doc)."""

    def __init__(self, app, front_getter: Callable[[], Frontend]) -> None:
        self.app = app
        self.front_getter = front_getter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            front = _front(self.front_getter)
            if path.startswith("/admin"):
                front.auth.check_admin(headers.get("authorization"))
            elif path.startswith("/v1"):
                front.auth.check_key(headers.get("authorization"))
            limit = front.max_body_bytes
            length = headers.get("content-length")
            if length is not None and not length.isdigit():
                raise BadRequest(f"Content-Length {length!r} is not a number of bytes")
            if length is not None and int(length) > limit:
                raise PayloadTooLarge(f"the request body has {length} bytes; the limit is "
                                      f"{limit} (router.max_body_bytes)")
        except ApiError as e:
            await _json_error(e)(scope, receive, send)
            return
        await self.app(scope, _capped(receive, limit), send)


def _capped(receive, limit: int):
    """``receive`` that refuses bodies over ``limit`` bytes even without a Content-Length."""
    seen = 0

    async def wrapped():
        nonlocal seen
        msg = await receive()
        if msg["type"] == "http.request":
            seen += len(msg.get("body", b""))
            if seen > limit:
                # FastAPI lets HTTPException through from body reading (other errors become a
                # generic 400); the handler below renders it in OpenAI's shape.
                raise StarletteHTTPException(413, f"the request body exceeds the limit of "
                                                  f"{limit} bytes (router.max_body_bytes)")
        return msg

    return wrapped


def _front(front_getter: Callable[[], Frontend]) -> Frontend:
    try:
        return front_getter()
    except RuntimeError:
        raise ServiceUnavailable("the router is still starting; retry in a few seconds") from None


def build_fastapi(front_getter: Callable[[], Frontend]) -> FastAPI:
    """``front_getter()`` returns the ``Frontend`` (created in the replica's constructor)."""
    app = FastAPI(title="pdserve", version=__version__,
                  description="OpenAI-compatible API of pdserve. Send `Authorization: Bearer "
                              "<key>` when the server has API keys.")
    app.add_middleware(Guard, front_getter=front_getter)
    from .console import build_console

    app.include_router(build_console(front_getter))
    generic_openapi = app.openapi

    def openapi() -> dict:
        """The OpenAPI document with the served model's limits (context, vocabulary) filled in,
        once the router is up, so a client or fuzzer reading it knows them."""
        if app.openapi_schema is None:
            schema = generic_openapi()
            try:
                _model_limits(schema, front_getter())
            except RuntimeError:  # still starting: serve the generic one, retry next time
                app.openapi_schema = None
                return schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _json_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = describe_validation(list(exc.errors()))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (f"no such endpoint: {request.method} {_route_path(request.scope)}; the "
                       "API is POST /v1/completions, POST /v1/chat/completions, GET /v1/models")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {_route_path(request.scope)}"
        elif isinstance(exc.__cause__, UnicodeDecodeError):
            message = f"the request body is not valid UTF-8 ({exc.__cause__.reason} at byte " \
                      f"{exc.__cause__.start}); send JSON encoded as UTF-8"
        elif exc.status_code == 400 and "parsing the body" in message:
            message = "the request body could not be parsed; send a JSON object"
        return JSONResponse(error_body(message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _json_error(InternalError(f"internal error ({type(exc).__name__}); the request "
                                         "was not completed, retrying may succeed"))

    @app.get("/health")
    async def health():
        _front(front_getter)
        return {"status": "ok"}

    @app.get("/v1/models", responses={401: _ERROR_RESPONSES[401]})
    async def models():
        f = _front(front_getter)
        return {"object": "list", "data": [{"id": f.model_name, "object": "model",
                                            "created": now(), "owned_by": "pdserve",
                                            "max_model_len": f.max_model_len}]}

    @app.post("/v1/completions", responses=_ERROR_RESPONSES)
    async def completions(body: CompletionRequest, x_request_timeout: float = _TIMEOUT_HEADER):
        f = _front(front_getter)
        return await _respond(f, f.completion_job(body), body, False, x_request_timeout)

    @app.post("/v1/chat/completions", responses=_ERROR_RESPONSES)
    async def chat(body: ChatCompletionRequest, x_request_timeout: float = _TIMEOUT_HEADER):
        f = _front(front_getter)
        return await _respond(f, f.chat_job(body), body, True, x_request_timeout)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        """Prometheus text format (unauthenticated, like most scrape endpoints)."""
        from fastapi.responses import Response

        from .metrics import observe_migration, render

        f = _front(front_getter)
        if f.orch.migrator is not None:  # fresh at every scrape, not only on console ticks
            observe_migration(f.orch.migrator.snapshot())
        return Response(render(dict(f.orch.stats)), media_type="text/plain; version=0.0.4")

    @app.post("/admin/drain", responses={401: _ERROR_RESPONSES[401]})
    async def admin_drain(body: DrainRequest):
        """Scale-in of one decode instance: it stops taking requests and its requests move
        to the other decode instances (live migration; recompute where that fails)."""
        m = _migrator(_front(front_getter))
        try:
            n, dests = await m.drain(body.instance_id)
        except KeyError as e:
            raise NotFound(str(e.args[0])) from None
        except TimeoutError as e:
            raise ServiceUnavailable(str(e)) from None
        return {"instance_id": body.instance_id, "migrated": n, "to": dests}

    @app.post("/admin/migration", responses={401: _ERROR_RESPONSES[401]})
    async def admin_migration(body: MigrationSwitch):
        """Switch the automatic migration triggers (imbalance, memory pressure) on or off."""
        m = _migrator(_front(front_getter))
        m.enabled = body.enabled
        return m.snapshot()

    @app.get("/admin/stats", responses={401: _ERROR_RESPONSES[401]})
    async def admin_stats():
        """Admission queues and request counters (needs the admin token)."""
        f = _front(front_getter)
        mig = f.orch.migrator.snapshot() if f.orch.migrator is not None else None
        return {"admission": f.admission.stats(), "orchestrator": dict(f.orch.stats),
                "migration": mig,
                "router_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    return app


class DrainRequest(BaseModel):
    instance_id: str


class MigrationSwitch(BaseModel):
    enabled: bool


def _migrator(f: Frontend):
    if f.orch.migrator is None:
        raise BadRequest("live migration needs a disaggregated deployment (mode: disaggregated)")
    return f.orch.migrator


def _model_limits(schema: dict, f: Frontend) -> None:
    comps = schema.get("components", {}).get("schemas", {})
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = comps.get(name, {}).get("properties", {})
        for key in ("max_tokens", "max_completion_tokens"):
            if key in props:
                props[key]["maximum"] = f.max_model_len - 1
        if "prompt" in props:
            props["prompt"]["items"] = {"minimum": 0, "maximum": f.vocab_size - 1}
            props["prompt"]["maxItems"] = f.max_model_len - 1


class _AdmittedStream(StreamingResponse):
    """An SSE response that owns its request: however the response ends (finished, client
    gone, never started), the request's stream is closed and its admission ticket returned."""

    def __init__(self, body: AsyncIterator[str], pieces, ticket) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._pieces, self._ticket = pieces, ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._pieces.aclose()
            self._ticket.close()


async def _respond(f: Frontend, job: Job, body, chat: bool, timeout_s: float | None):
    deadline = f.deadline(timeout_s)
    ticket = await f.admit(deadline)
    pieces = f.stream(job, ticket, deadline)
    try:
        first = await anext(pieces, None)
    except BaseException:
        await pieces.aclose()
        ticket.close()
        raise
    out = _Shaper(f, job, body, chat)
    if body.stream:
        return _AdmittedStream(out.sse(first, pieces), pieces, ticket)
    try:
        got = [] if first is None else [first]
        async for p in pieces:
            got.append(p)
    finally:
        await pieces.aclose()
        ticket.close()
    return out.whole(got)


class _Shaper:
    """Pieces → OpenAI's response objects (chat or text completion, chunks or whole)."""

    def __init__(self, f: Frontend, job: Job, body, chat: bool) -> None:
        self.f, self.job, self.chat = f, job, chat
        self.created = now()
        self.want_lp = job.params.logprobs is not None
        self.usage_wanted = bool(body.stream_options and body.stream_options.include_usage)
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def usage(self, n_out: int) -> dict:
        p = len(self.job.prompt_ids)
        return {"prompt_tokens": p, "completion_tokens": n_out, "total_tokens": p + n_out}

    @staticmethod
    def lp_chat(entries: list[dict]) -> dict:
        return {"content": [{"token": e["token"], "logprob": e["logprob"],
                             "bytes": list(e["token"].encode()),
                             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                              for t, v in e["top"].items()]} for e in entries]}

    @staticmethod
    def lp_cmpl(entries: list[dict]) -> dict:
        return {"tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries]}

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.job.request_id, "object": obj, "created": self.created,
                "model": self.f.model_name, "choices": choices}

    def whole(self, pieces: list[Piece]) -> dict:
        text = "".join(p.text for p in pieces)
        entries = [e for p in pieces for e in p.logprobs]
        reason = next((p.finish_reason for p in reversed(pieces) if p.finish_reason), None)
        n_out = pieces[-1].num_output_tokens if pieces else 0
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": reason,
                      "logprobs": self.lp_chat(entries) if self.want_lp else None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason,
                      "logprobs": self.lp_cmpl(entries) if self.want_lp else None}
        out = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        out["usage"] = self.usage(n_out)
        return out

    def _chunk(self, p: Piece) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": {"content": p.text} if p.text else {},
                      "finish_reason": p.finish_reason}
            if self.want_lp:
                choice["logprobs"] = self.lp_chat(p.logprobs)
        else:
            choice = {"index": 0, "text": p.text, "finish_reason": p.finish_reason,
                      "logprobs": self.lp_cmpl(p.logprobs) if self.want_lp else None}
        chunk = self._envelope(self.chunk_object, [choice])
        if self.usage_wanted:
            chunk["usage"] = None
        return chunk

    async def sse(self, first: Piece | None, rest: AsyncIterator[Piece]) -> AsyncIterator[str]:
        def event(d: dict) -> str:
            return f"data: {json.dumps(d)}\n\n"

        n_out = 0
        try:
            if self.chat:
                head = self._envelope(self.chunk_object, [{"index": 0, "delta": {
                    "role": "assistant", "content": ""}, "finish_reason": None}])
                if self.usage_wanted:
                    head["usage"] = None
                yield event(head)
            pending = [first] if first is not None else []
            while True:
                p = pending.pop() if pending else await anext(rest, None)
                if p is None:
                    break
                n_out = p.num_output_tokens
                if p.text or p.finish_reason or p.logprobs:
                    yield event(self._chunk(p))
            if self.usage_wanted:
                tail = self._envelope(self.chunk_object, [])
                tail["usage"] = self.usage(n_out)
                yield event(tail)
            yield "data: [DONE]\n\n"
        except ApiError as e:  # headers are sent: report in-band, OpenAI-style
            yield event(e.body())
        except Exception as e:
            log.exception("request %s failed mid-stream", self.job.request_id)
            yield event(InternalError(f"generation failed ({type(e).__name__})").body())
        finally:
            await rest.aclose()

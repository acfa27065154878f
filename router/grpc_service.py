"""The gRPC API (``proto/pdserve.proto``), served by the router replica itself with grpcio.

``GrpcServer`` runs a ``grpc.aio`` server on ``router.host:router.grpc_port`` on the router
replica's event loop, next to the HTTP app, sharing its ``Frontend``: validation (the request
is converted into the HTTP schema's pydantic model), admission, time limits and errors are
exactly those of the HTTP API, mapped to gRPC status codes.

Why not Ray Serve's gRPC proxy (checked with Ray 2.60, see tests/router/test_grpc_api.py's
history in the report): it does stream token by token, but a client's cancellation reaches
the replica only if it arrives while the proxy awaits the next token; when it arrives while
the proxy is writing a message (most of the time at a fast token rate) the replica's
generator runs on to max_tokens, holding its KV blocks (3 of 9 cancellations lost in a row).
It also listens on ``[::]`` (every interface, no host option), which breaks "no keys,
loopback only". Here a cancelled or expired call cancels the handler, whose ``finally``
closes the request's stream, which aborts it on every instance.

Metadata: ``authorization: Bearer <key>``; ``x-request-timeout: <seconds>`` (a limit below
the server's; the call's own deadline counts too).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from pydantic import ValidationError

from .errors import ApiError, BadRequest, InternalError, describe_validation
from .frontend import Deadline, Frontend, Piece
from .proto import pdserve_pb2 as pb
from .proto import pdserve_pb2_grpc as pbg
from .protocol import ChatCompletionRequest, CompletionRequest

__all__ = ["GrpcServer", "PdServeService", "request_body"]

log = logging.getLogger(__name__)


def request_body(req: pb.GenerateRequest) -> CompletionRequest | ChatCompletionRequest:
    """The proto request as the HTTP schema's model (same checks, same messages)."""
    which = req.WhichOneof("input")
    d: dict[str, Any] = {"model": req.model or None, "top_k": req.top_k,
                         "stop": list(req.stop) or None, "ignore_eos": req.ignore_eos}
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if req.HasField(name):
            d[name] = getattr(req, name)
    cls: type[CompletionRequest | ChatCompletionRequest]
    if which == "messages":
        cls = ChatCompletionRequest
        d["messages"] = [{"role": m.role, "content": m.content} for m in req.messages.messages]
        if req.HasField("logprobs"):
            d["logprobs"], d["top_logprobs"] = True, req.logprobs
    elif which in ("prompt", "prompt_ids"):
        cls = CompletionRequest
        d["prompt"] = req.prompt if which == "prompt" else list(req.prompt_ids.ids)
        if req.HasField("logprobs"):
            d["logprobs"] = req.logprobs
    else:
        raise BadRequest("the request has no input: set prompt, prompt_ids or messages", "input")
    if req.chunks or req.chunk_ids:
        d["pdserve"] = {"chunks": list(req.chunks) + [list(t.ids) for t in req.chunk_ids]}
        if req.HasField("recompute_ratio"):
            d["pdserve"]["recompute_ratio"] = req.recompute_ratio
    try:
        return cls.model_validate(d)
    except ValidationError as e:
        message, param = describe_validation(list(e.errors()))
        raise BadRequest(message, param) from None


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ())
            if isinstance(v, str)}


def _timeout(md: dict[str, str], context: grpc.aio.ServicerContext) -> float | None:
    """The shorter of the ``x-request-timeout`` metadata and the call's deadline."""
    raw = md.get("x-request-timeout")
    asked = None
    if raw is not None:
        try:
            asked = float(raw)
        except ValueError:
            asked = -1.0
        if not 0 < asked < float("inf"):
            raise BadRequest(f"x-request-timeout={raw!r}: send a positive number of seconds")
    left = context.time_remaining()
    if left is not None:
        asked = left if asked is None else min(asked, left)
    return asked


async def _abort(context: grpc.aio.ServicerContext, e: ApiError) -> None:
    """End the call with ``e``'s status (raises, as ``context.abort`` does)."""
    trailers = (("retry-after-s", e.headers["Retry-After"]),) if "Retry-After" in e.headers \
        else ()
    await context.abort(getattr(grpc.StatusCode, e.grpc_code), e.message, trailers)


def _logprobs(entries: list[dict]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token=e["token"], logprob=e["logprob"],
                            top_logprobs=[pb.TopLogprob(token=t, logprob=v)
                                          for t, v in e["top"].items()]) for e in entries]


def _usage(prompt_tokens: int, n_out: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=n_out,
                    total_tokens=prompt_tokens + n_out)


class PdServeService(pbg.PdServeServicer):
    """The RPCs of ``pdserve.v1.PdServe`` over a ``Frontend``."""

    def __init__(self, front: Frontend) -> None:
        self.front = front

    def _begin(self, request: pb.GenerateRequest, context) -> tuple[Any, Deadline]:
        f = self.front
        md = _metadata(context)
        f.auth.check_key(md.get("authorization"))
        body = request_body(request)
        job = f.chat_job(body) if isinstance(body, ChatCompletionRequest) else \
            f.completion_job(body)
        return job, f.deadline(_timeout(md, context))

    async def Generate(self, request: pb.GenerateRequest, context) -> None:
        ticket = pieces = None
        try:
            job, deadline = self._begin(request, context)
            ticket = await self.front.admit(deadline)
            pieces = self.front.stream(job, ticket, deadline)
            async for p in pieces:
                if p.text or p.finish_reason or p.logprobs:
                    await context.write(self._message(job, p))
        except ApiError as e:
            await _abort(context, e)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            log.exception("gRPC Generate failed")
            await _abort(context, InternalError(f"generation failed ({type(e).__name__})"))
        finally:  # also on cancellation (client gone, deadline): aborts the request everywhere
            if pieces is not None:
                await pieces.aclose()
            if ticket is not None:
                ticket.close()

    @staticmethod
    def _message(job, p: Piece) -> pb.GenerateResponse:
        m = pb.GenerateResponse(request_id=job.request_id, text=p.text,
                                logprobs=_logprobs(p.logprobs), finish_reason=p.finish_reason or "")
        if p.finish_reason:
            m.usage.CopyFrom(_usage(len(job.prompt_ids), p.num_output_tokens))
        return m

    async def Complete(self, request: pb.GenerateRequest, context) -> pb.CompleteResponse:
        ticket = pieces = None
        try:
            job, deadline = self._begin(request, context)
            ticket = await self.front.admit(deadline)
            pieces = self.front.stream(job, ticket, deadline)
            got = [p async for p in pieces]
        except ApiError as e:
            await _abort(context, e)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            log.exception("gRPC Complete failed")
            await _abort(context, InternalError(f"generation failed ({type(e).__name__})"))
        finally:
            if pieces is not None:
                await pieces.aclose()
            if ticket is not None:
                ticket.close()
        n_out = got[-1].num_output_tokens if got else 0
        return pb.CompleteResponse(
            request_id=job.request_id, model=self.front.model_name,
            text="".join(p.text for p in got),
            finish_reason=next((p.finish_reason for p in reversed(got) if p.finish_reason), ""),
            logprobs=_logprobs([e for p in got for e in p.logprobs]),
            usage=_usage(len(job.prompt_ids), n_out))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        try:
            self.front.auth.check_key(_metadata(context).get("authorization"))
        except ApiError as e:
            await _abort(context, e)
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=self.front.model_name,
                                                          max_model_len=self.front.max_model_len)])

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        return pb.HealthResponse(status="ok")


class GrpcServer:
    """The gRPC service on ``host:port``. ``start`` must run on the event loop that serves
    it (the router replica's: Serve runs the constructor there); the port is bound before
    ``start`` returns, so a port in use fails the replica's start with a clear message.
    ``SO_REUSEPORT`` lets several router replicas on one node share the port."""

    def __init__(self, front: Frontend, host: str, port: int) -> None:
        self.front, self.host, self.port = front, host, port
        self._server: grpc.aio.Server | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> GrpcServer:
        loop = asyncio.get_running_loop()
        self._server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 1),
            # the same request-size limit as HTTP (grpc answers RESOURCE_EXHAUSTED beyond it)
            ("grpc.max_receive_message_length", self.front.max_body_bytes if self.front else -1),
        ])
        pbg.add_PdServeServicer_to_server(PdServeService(self.front), self._server)
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            bound = self._server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises (or, in older versions, returns 0)
            bound = 0
        if bound != self.port:
            raise RuntimeError(f"router.grpc_port: cannot listen on {address} (is the port in "
                               "use?); choose another port")
        self._task = loop.create_task(self._server.start())
        self._task.add_done_callback(self._started)
        log.info("pdserve gRPC API on %s", address)
        return self

    def _started(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the gRPC server failed to start: %s", task.exception())

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)

"""The gRPC API (``proto/pdserve.proto``), served through Ray Serve's gRPC proxy.

The proxy calls the ingress deployment's methods by RPC name (``Generate``, ``Complete``,
``ListModels``, ``Health``), passing the request message and a ``grpc_context`` that carries
the metadata in and the status code out. ``PdServeGrpc`` is a mixin for that deployment
(``ingress.Router``); it relies on ``self.front`` (a ``frontend.Frontend``), so validation,
admission, timeouts and errors are exactly those of the HTTP API: the request is converted
into the HTTP schema's pydantic model and goes through the same ``Frontend``.

Checked with Ray Serve 2.60 (tests/router/test_grpc.py): server-streaming responses arrive
token by token; a client that cancels, or whose deadline passes, cancels the replica's
generator, which aborts the request on every instance. One caveat: the proxy listens on
``[::]:<port>`` (every interface; Serve has no host option for gRPC), which is why the config
refuses a gRPC port without API keys unless explicitly allowed.

Metadata: ``authorization: Bearer <key>``; ``x-request-timeout: <seconds>`` (less than the
server's limit); ``application: <name>`` is read by the proxy when several apps run.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from .errors import ApiError, BadRequest, InternalError, describe_validation
from .frontend import Frontend, Piece
from .proto import SERVICER_FUNCTION
from .proto import pdserve_pb2 as pb
from .protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)

__all__ = ["SERVICER_FUNCTION", "PdServeGrpc", "request_body"]


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
    try:
        return cls.model_validate(d)
    except ValidationError as e:
        message, param = describe_validation(list(e.errors()))
        raise BadRequest(message, param) from None


def _metadata(ctx) -> dict[str, str]:
    if ctx is None:
        return {}
    return {k.lower(): v for k, v in ctx.invocation_metadata() if isinstance(v, str)}


def _timeout(md: dict[str, str]) -> float | None:
    raw = md.get("x-request-timeout")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise BadRequest(f"x-request-timeout={raw!r}: send a positive number of seconds")
    return value


class CallFailed(RuntimeError):
    """Raised from a streaming RPC after its status is set (see ``_fail``)."""


def _fail(ctx, e: ApiError) -> None:
    """Set ``e`` as the call's status. A unary method then returns an empty message and the
    proxy sends the status. A streaming one must raise ``CallFailed`` after this: the proxy
    copies a replica's status only along with a message or an exception, never at the end of
    a stream, and for an exception it keeps the status that was set here."""
    if ctx is None:
        raise e
    import grpc

    ctx.set_code(getattr(grpc.StatusCode, e.grpc_code))
    ctx.set_details(e.message)
    if "Retry-After" in e.headers:
        ctx.set_trailing_metadata([("retry-after-s", e.headers["Retry-After"])])


def _logprobs(entries: list[dict]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token=e["token"], logprob=e["logprob"],
                            top_logprobs=[pb.TopLogprob(token=t, logprob=v)
                                          for t, v in e["top"].items()]) for e in entries]


def _usage(prompt_tokens: int, n_out: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=n_out,
                    total_tokens=prompt_tokens + n_out)


class PdServeGrpc:
    """The RPCs of ``pdserve.v1.PdServe`` as deployment methods (see module doc)."""

    front: Frontend  # set by the deployment's constructor

    def _begin(self, request, grpc_context):
        f = self.front
        md = _metadata(grpc_context)
        f.auth.check_key(md.get("authorization"))
        body = request_body(request)
        job = f.chat_job(body) if isinstance(body, ChatCompletionRequest) else \
            f.completion_job(body)
        return f, job, f.deadline(_timeout(md))

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None):
        ticket = pieces = None
        try:
            f, job, deadline = self._begin(request, grpc_context)
            ticket = await f.admit(deadline)
            pieces = f.stream(job, ticket, deadline)
            async for p in pieces:
                if p.text or p.finish_reason or p.logprobs:
                    yield self._message(job, p)
        except ApiError as e:
            _fail(grpc_context, e)
            raise CallFailed(e.message) from None
        except Exception as e:
            log.exception("gRPC Generate failed")
            _fail(grpc_context, InternalError(f"generation failed ({type(e).__name__})"))
            raise CallFailed(str(e)) from None
        finally:
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

    async def Complete(self, request: pb.GenerateRequest, grpc_context=None) -> pb.CompleteResponse:
        ticket = pieces = None
        try:
            f, job, deadline = self._begin(request, grpc_context)
            ticket = await f.admit(deadline)
            pieces = f.stream(job, ticket, deadline)
            got = [p async for p in pieces]
        except ApiError as e:
            _fail(grpc_context, e)
            return pb.CompleteResponse()
        except Exception as e:
            log.exception("gRPC Complete failed")
            _fail(grpc_context, InternalError(f"generation failed ({type(e).__name__})"))
            return pb.CompleteResponse()
        finally:
            if pieces is not None:
                await pieces.aclose()
            if ticket is not None:
                ticket.close()
        n_out = got[-1].num_output_tokens if got else 0
        return pb.CompleteResponse(
            request_id=job.request_id, model=f.model_name, text="".join(p.text for p in got),
            finish_reason=next((p.finish_reason for p in reversed(got) if p.finish_reason), ""),
            logprobs=_logprobs([e for p in got for e in p.logprobs]),
            usage=_usage(len(job.prompt_ids), n_out))

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None
                         ) -> pb.ListModelsResponse:
        try:
            self.front.auth.check_key(_metadata(grpc_context).get("authorization"))
        except ApiError as e:
            _fail(grpc_context, e)
            return pb.ListModelsResponse()
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=self.front.model_name,
                                                          max_model_len=self.front.max_model_len)])

    async def Health(self, request: pb.HealthRequest, grpc_context=None) -> pb.HealthResponse:
        return pb.HealthResponse(status="ok")

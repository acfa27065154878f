"""A small Python client for a pdserve server: the same calls over gRPC or HTTP, sync or async.

    from pdserve.client import Client, AsyncClient

    with Client("grpc://127.0.0.1:9000", api_key="...") as c:        # or http://host:8000
        print(c.complete("The capital of France is", max_tokens=8).text)
        for chunk in c.stream(messages=[{"role": "user", "content": "Hi!"}]):
            print(chunk.text, end="", flush=True)

    async with AsyncClient("http://127.0.0.1:8000") as c:
        print((await c.complete([1, 2, 3], max_tokens=4, temperature=0)).text)

A ``prompt`` (text or token ids) makes a completion, ``messages`` a chat completion (the
server applies the model's chat template). Sampling keywords: ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``ignore_eos``; ``timeout_s``
bounds the request on both sides (gRPC deadline / ``X-Request-Timeout``).

Every failure raises ``PdServeError`` with ``code`` (a gRPC status name for either
protocol: INVALID_ARGUMENT, UNAUTHENTICATED, RESOURCE_EXHAUSTED, ...), the server's message,
and ``retry_after_s`` when the server is overloaded. Leaving a stream early (``break``, or
closing it) cancels the request on the server, which frees its resources.

``api_key`` defaults to ``PDSERVE_API_KEY``. The gRPC URL is the router's ``router.grpc_port``;
an HTTP URL may carry the app's route prefix (``http://host:8000/myapp``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import urlparse

from pdserve import envs

__all__ = ["AsyncClient", "Chunk", "Client", "Completion", "PdServeError", "Usage"]

_HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
               404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED",
               500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    usage: Usage | None
    request_id: str


@dataclass(frozen=True)
class Chunk:
    text: str  # new text since the previous chunk
    finish_reason: str | None = None  # set on the last chunk
    usage: Usage | None = None  # set on the last chunk


class PdServeError(Exception):
    def __init__(self, code: str, message: str, http_status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message
        self.http_status, self.retry_after_s = http_status, retry_after_s


def _check(prompt, messages, params: dict[str, Any]) -> None:
    if (prompt is None) == (messages is None):
        raise ValueError("pass either prompt (text or token ids) or messages")
    unknown = set(params) - set(_PARAMS)
    if unknown:
        raise TypeError(f"unknown parameters: {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(_PARAMS)}, timeout_s")


# ---- HTTP -----------------------------------------------------------------------------------
def _http_request(prompt, messages, params: dict[str, Any], stream: bool) -> tuple[str, dict]:
    _check(prompt, messages, params)
    body = {k: v for k, v in params.items() if v is not None}
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    if messages is not None:
        body["messages"] = messages
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


def _http_error(status: int, text: str, headers) -> PdServeError:
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:500] or f"HTTP {status}"
    retry = headers.get("retry-after")
    return PdServeError(_HTTP_CODES.get(status, "UNKNOWN"), message, status,
                        float(retry) if retry and retry.isdigit() else None)


def _usage(d: dict | None) -> Usage | None:
    if not d:
        return None
    return Usage(d["prompt_tokens"], d["completion_tokens"], d["total_tokens"])


_ERROR_TYPES = {"timeout_error": "DEADLINE_EXCEEDED", "overloaded_error": "RESOURCE_EXHAUSTED",
                "invalid_request_error": "INVALID_ARGUMENT", "server_error": "INTERNAL"}


def _sse_chunk(line: str) -> Chunk | None:
    """One SSE line → a chunk (None for blank lines and [DONE]); in-band errors raise."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    d = json.loads(line[6:])
    if "error" in d:
        e = d["error"]
        raise PdServeError(_ERROR_TYPES.get(e.get("type"), "INTERNAL"),
                           e.get("message", "the stream failed"))
    if not d["choices"]:
        return Chunk("", None, _usage(d.get("usage")))
    c = d["choices"][0]
    text = c["delta"].get("content") if "delta" in c else c.get("text")
    return Chunk(text or "", c.get("finish_reason"), None)


def _http_completion(d: dict) -> Completion:
    c = d["choices"][0]
    text = c["message"]["content"] if "message" in c else c["text"]
    return Completion(text, c.get("finish_reason"), _usage(d.get("usage")), d["id"])


class _UsageFold:
    """HTTP sends usage in an event of its own after the finishing chunk; gRPC puts it on the
    finishing message. This holds the finishing chunk back to fold the usage into it."""

    def __init__(self) -> None:
        self.held: Chunk | None = None

    def feed(self, ch: Chunk) -> list[Chunk]:
        out: list[Chunk] = []
        if self.held is not None:
            held, self.held = self.held, None
            if ch.usage is not None and not ch.text and not ch.finish_reason:
                return [Chunk(held.text, held.finish_reason, ch.usage)]
            out.append(held)
        if ch.finish_reason and ch.usage is None:
            self.held = ch
        else:
            out.append(ch)
        return out

    def flush(self) -> list[Chunk]:
        held, self.held = self.held, None
        return [held] if held is not None else []


# ---- gRPC -----------------------------------------------------------------------------------
def _grpc_request(prompt, messages, params: dict[str, Any]):
    from pdserve.router.proto import pdserve_pb2 as pb

    _check(prompt, messages, params)
    kw = {k: v for k, v in params.items() if v is not None}
    if isinstance(kw.get("stop"), str):
        kw["stop"] = [kw["stop"]]
    if messages is not None:
        kw["messages"] = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages])
    elif isinstance(prompt, str):
        kw["prompt"] = prompt
    else:
        kw["prompt_ids"] = pb.TokenIds(ids=list(prompt))
    return pb.GenerateRequest(**kw)


def _grpc_chunk(m) -> Chunk:
    u = m.usage if m.HasField("usage") else None
    return Chunk(m.text, m.finish_reason or None,
                 Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens) if u else None)


def _grpc_completion(r) -> Completion:
    u = r.usage
    return Completion(r.text, r.finish_reason or None,
                      Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens), r.request_id)


def _grpc_error(e) -> PdServeError:
    code = e.code()
    retry = None
    for k, v in (e.trailing_metadata() or ()):
        if k == "retry-after-s":
            retry = float(v)
    return PdServeError(code.name if code is not None else "UNKNOWN", e.details() or "", None,
                        retry)


class _Unreachable:
    """Context manager: an HTTP transport failure (refused, reset, timed out) → PdServeError."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> None:
        import httpx

        if isinstance(exc, httpx.TimeoutException):
            raise PdServeError("DEADLINE_EXCEEDED", f"{self.target}: {exc}") from exc
        if isinstance(exc, httpx.TransportError):
            raise PdServeError("UNAVAILABLE", f"cannot reach {self.target}: {exc}") from exc


class _Base:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        u = urlparse(url)
        if u.scheme not in ("grpc", "http", "https") or not u.netloc:
            raise ValueError(f"url {url!r}: use grpc://host:port or http(s)://host:port[/prefix]")
        self.grpc = u.scheme == "grpc"
        self.target = u.netloc if self.grpc else url.rstrip("/")
        self.api_key = api_key if api_key is not None else envs.client_api_key()
        self.timeout_s = timeout_s

    def _headers(self, timeout_s: float | None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if timeout_s is not None:
            h["X-Request-Timeout"] = str(timeout_s)
        return h

    def _metadata(self, timeout_s: float | None) -> list[tuple[str, str]]:
        md = []
        if self.api_key:
            md.append(("authorization", f"Bearer {self.api_key}"))
        if timeout_s is not None:
            md.append(("x-request-timeout", str(timeout_s)))
        return md


class Client(_Base):
    """Blocking client (see module doc)."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        super().__init__(url, api_key, timeout_s)
        if self.grpc:
            import grpc

            from pdserve.router.proto import pdserve_pb2_grpc

            self._channel = grpc.insecure_channel(self.target)
            self._stub = pdserve_pb2_grpc.PdServeStub(self._channel)
        else:
            import httpx

            self._http = httpx.Client(base_url=self.target, timeout=timeout_s)

    def close(self) -> None:
        (self._channel if self.grpc else self._http).close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def complete(self, prompt: str | list[int] | None = None, *,
                 messages: list[dict[str, str]] | None = None, timeout_s: float | None = None,
                 **params) -> Completion:
        if self.grpc:
            import grpc

            try:
                return _grpc_completion(self._stub.Complete(
                    _grpc_request(prompt, messages, params), metadata=self._metadata(timeout_s),
                    timeout=timeout_s or self.timeout_s))
            except grpc.RpcError as e:
                raise _grpc_error(e) from None
        path, body = _http_request(prompt, messages, params, stream=False)
        with _Unreachable(self.target):
            r = self._http.post(path, json=body, headers=self._headers(timeout_s))
        if r.status_code != 200:
            raise _http_error(r.status_code, r.text, r.headers)
        return _http_completion(r.json())

    def stream(self, prompt: str | list[int] | None = None, *,
               messages: list[dict[str, str]] | None = None, timeout_s: float | None = None,
               **params) -> Iterator[Chunk]:
        if self.grpc:
            return self._grpc_stream(_grpc_request(prompt, messages, params), timeout_s)
        return self._http_stream(*_http_request(prompt, messages, params, True), timeout_s)

    def _grpc_stream(self, req, timeout_s: float | None) -> Iterator[Chunk]:
        import grpc

        call = self._stub.Generate(req, metadata=self._metadata(timeout_s),
                                   timeout=timeout_s or self.timeout_s)
        try:
            for m in call:
                yield _grpc_chunk(m)
        except grpc.RpcError as e:
            raise _grpc_error(e) from None
        finally:
            call.cancel()  # no-op when finished; aborts the request when the caller stops early

    def _http_stream(self, path: str, body: dict, timeout_s: float | None) -> Iterator[Chunk]:
        with _Unreachable(self.target), \
                self._http.stream("POST", path, json=body, headers=self._headers(timeout_s)) as r:
            if r.status_code != 200:
                r.read()
                raise _http_error(r.status_code, r.text, r.headers)
            fold = _UsageFold()
            for line in r.iter_lines():
                ch = _sse_chunk(line)
                if ch is not None:
                    yield from fold.feed(ch)
            yield from fold.flush()

    def models(self) -> list[str]:
        if self.grpc:
            import grpc

            from pdserve.router.proto import pdserve_pb2 as pb

            try:
                r = self._stub.ListModels(pb.ListModelsRequest(), metadata=self._metadata(None),
                                          timeout=self.timeout_s)
            except grpc.RpcError as e:
                raise _grpc_error(e) from None
            return [m.id for m in r.models]
        with _Unreachable(self.target):
            r = self._http.get("/v1/models", headers=self._headers(None))
        if r.status_code != 200:
            raise _http_error(r.status_code, r.text, r.headers)
        return [m["id"] for m in r.json()["data"]]


class AsyncClient(_Base):
    """asyncio client (see module doc); ``stream`` is an async iterator."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        super().__init__(url, api_key, timeout_s)
        if self.grpc:
            import grpc

            from pdserve.router.proto import pdserve_pb2_grpc

            self._channel = grpc.aio.insecure_channel(self.target)
            self._stub = pdserve_pb2_grpc.PdServeStub(self._channel)
        else:
            import httpx

            self._http = httpx.AsyncClient(base_url=self.target, timeout=timeout_s)

    async def close(self) -> None:
        if self.grpc:
            await self._channel.close()
        else:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def complete(self, prompt: str | list[int] | None = None, *,
                       messages: list[dict[str, str]] | None = None,
                       timeout_s: float | None = None, **params) -> Completion:
        if self.grpc:
            import grpc

            try:
                return _grpc_completion(await self._stub.Complete(
                    _grpc_request(prompt, messages, params), metadata=self._metadata(timeout_s),
                    timeout=timeout_s or self.timeout_s))
            except grpc.RpcError as e:
                raise _grpc_error(e) from None
        path, body = _http_request(prompt, messages, params, stream=False)
        with _Unreachable(self.target):
            r = await self._http.post(path, json=body, headers=self._headers(timeout_s))
        if r.status_code != 200:
            raise _http_error(r.status_code, r.text, r.headers)
        return _http_completion(r.json())

    async def stream(self, prompt: str | list[int] | None = None, *,
                     messages: list[dict[str, str]] | None = None,
                     timeout_s: float | None = None, **params) -> AsyncIterator[Chunk]:
        if self.grpc:
            import grpc

            call = self._stub.Generate(_grpc_request(prompt, messages, params),
                                       metadata=self._metadata(timeout_s),
                                       timeout=timeout_s or self.timeout_s)
            try:
                async for m in call:
                    yield _grpc_chunk(m)
            except grpc.RpcError as e:
                raise _grpc_error(e) from None
            finally:
                call.cancel()
            return
        path, body = _http_request(prompt, messages, params, stream=True)
        fold = _UsageFold()
        with _Unreachable(self.target):
            async with self._http.stream("POST", path, json=body,
                                         headers=self._headers(timeout_s)) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise _http_error(r.status_code, r.text, r.headers)
                async for line in r.aiter_lines():
                    ch = _sse_chunk(line)
                    for out in fold.feed(ch) if ch is not None else ():
                        yield out
        for out in fold.flush():
            yield out

    async def models(self) -> list[str]:
        if self.grpc:
            import grpc

            from pdserve.router.proto import pdserve_pb2 as pb

            try:
                r = await self._stub.ListModels(pb.ListModelsRequest(),
                                                metadata=self._metadata(None),
                                                timeout=self.timeout_s)
            except grpc.RpcError as e:
                raise _grpc_error(e) from None
            return [m.id for m in r.models]
        with _Unreachable(self.target):
            r = await self._http.get("/v1/models", headers=self._headers(None))
        if r.status_code != 200:
            raise _http_error(r.status_code, r.text, r.headers)
        return [m["id"] for m in r.json()["data"]]


# ---- ``pdserve client`` ---------------------------------------------------------------------
def add_cli_arguments(p) -> None:
    """The arguments of ``pdserve client`` (an ``argparse`` subparser)."""
    p.add_argument("prompt", nargs="?", help="the prompt (with --chat: the user's message)")
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="grpc://host:port or http(s)://host:port[/prefix] (default: %(default)s)")
    p.add_argument("--api-key", default=None, help=f"default: ${envs.PDSERVE_API_KEY}")
    p.add_argument("--chat", action="store_true", help="send the prompt as a chat message")
    p.add_argument("--system", default=None, help="with --chat: a system message first")
    p.add_argument("--no-stream", action="store_true", help="print the whole completion at once")
    p.add_argument("--models", action="store_true", help="list the served models and exit")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=None, help="seconds for this request")


def run_cli(args) -> int:
    """``pdserve client``: text to stdout, finish reason and usage to stderr; exit 1 on error."""
    import sys

    if not args.models and not args.prompt:
        print("pdserve client: give a prompt (or --models)", file=sys.stderr)
        return 2
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature,
              "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed, "stop": args.stop}
    params = {k: v for k, v in params.items() if v is not None}
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        kw: dict[str, Any] = {"messages": [*messages, {"role": "user", "content": args.prompt}]}
    else:
        kw = {"prompt": args.prompt}
    try:
        with Client(args.url, args.api_key) as c:
            if args.models:
                print("\n".join(c.models()))
                return 0
            if args.no_stream:
                r = c.complete(**kw, timeout_s=args.timeout, **params)
                sys.stdout.write(r.text + "\n")
                reason, usage = r.finish_reason, r.usage
            else:
                reason, usage = None, None
                for ch in c.stream(**kw, timeout_s=args.timeout, **params):
                    sys.stdout.write(ch.text)
                    sys.stdout.flush()
                    reason, usage = ch.finish_reason or reason, ch.usage or usage
                sys.stdout.write("\n")
    except PdServeError as e:
        print(f"pdserve client: {e.code}: {e.message}", file=sys.stderr)
        return 1
    if usage is not None:
        print(f"[finish_reason={reason} prompt_tokens={usage.prompt_tokens} "
              f"completion_tokens={usage.completion_tokens}]", file=sys.stderr)
    return 0

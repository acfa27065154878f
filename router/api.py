"""The router's HTTP API: OpenAI-compatible completions and chat completions (SSE streaming
and non-streaming), models, health. The Serve ingress deployment in ``ingress.py`` mounts it.

Tokenizing, the chat template, incremental detokenization and stop strings happen here; the
pools only see token ids. Errors use OpenAI's JSON error shape with a message saying what to
fix; nothing a client sends can crash the router.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from pdserve.workers.detokenizer import Detokenizer
from pdserve.workers.messages import Job
from pdserve.workers.request import SamplingParams

from .orchestrator import Orchestrator, Unavailable
from .protocol import ChatCompletionRequest, CompletionRequest, error_body, new_id, now

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Frontend:
    """Everything the HTTP handlers need: the tokenizer, limits and the orchestrator."""

    def __init__(self, tokenizer, model_name: str, max_model_len: int, vocab_size: int,
                 orchestrator: Orchestrator) -> None:
        self.tok = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.orch = orchestrator

    # ---- request → job -----------------------------------------------------------------------
    def _params(self, body, prompt_len: int, default_max: int | None, logprobs: int | None
                ) -> SamplingParams:
        if body.model not in (None, self.model_name):
            raise BadRequest(f"model {body.model!r} is not served here; use {self.model_name!r}",
                             "model")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise BadRequest(f"the prompt has {prompt_len} tokens but this model's context is "
                             f"{self.max_model_len} tokens; shorten the prompt", "messages")
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        if max_tokens > room:
            raise BadRequest(f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens "
                             f"exceeds the context of {self.max_model_len}; use at most {room}",
                             "max_tokens")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                              top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                              stop=tuple(body.stop), ignore_eos=body.ignore_eos, logprobs=logprobs)

    def completion_job(self, body: CompletionRequest) -> Job:
        if isinstance(body.prompt, str):
            ids = self.tok(body.prompt)["input_ids"]
        else:
            ids = list(body.prompt)
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise BadRequest(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        if not ids:
            raise BadRequest("the prompt tokenizes to nothing", "prompt")
        return Job(new_id("cmpl"), ids, self._params(body, len(ids), 16, body.logprobs))

    def chat_job(self, body: ChatCompletionRequest) -> Job:
        msgs = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                for m in body.messages]
        try:
            ids = list(self.tok.apply_chat_template(msgs, add_generation_prompt=True,
                                                    tokenize=True, return_dict=False))
        except Exception as e:  # noqa: BLE001 - template errors are the client's input
            raise BadRequest(f"the messages do not fit the model's chat template: {e}",
                             "messages") from None
        lp = (body.top_logprobs or 0) if body.logprobs else None
        return Job(new_id("chatcmpl"), ids, self._params(body, len(ids), None, lp))

    # ---- streaming text ------------------------------------------------------------------------
    async def text_stream(self, job: Job) -> AsyncIterator[tuple[str, list, int, str | None]]:
        """Yields (text delta, new logprob entries, output tokens so far, finish_reason)."""
        detok = Detokenizer(self.tok, job.prompt_ids, job.params.stop)
        gen = self.orch.run(job)
        n_out = 0
        try:
            async for c in gen:
                n_out = c.num_output_tokens
                text = detok.add(c.token_ids, final=c.finished)
                lps = [self._lp_entry(t, lp) for t, lp in zip(c.token_ids, c.logprobs)]
                if detok.stopped:
                    yield text, lps, n_out, "stop"
                    return
                yield text, lps, n_out, (c.finish_reason if c.finished else None)
                if c.finished:
                    return
        finally:
            await gen.aclose()

    def _lp_entry(self, token: int, lp: dict[int, float]) -> dict:
        return {"token": self.tok.decode([token]), "logprob": lp.get(token, 0.0),
                "top": {self.tok.decode([t]): v for t, v in lp.items() if t != token or len(lp) > 1}}


def _err(status: int, message: str, type_: str = "invalid_request_error", param=None):
    return JSONResponse(error_body(message, type_, param), status_code=status)


def build_fastapi(front_getter) -> FastAPI:
    """``front_getter()`` returns the ``Frontend`` (created in the replica's constructor)."""
    app = FastAPI(title="pdserve", description="OpenAI-compatible API of pdserve")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        msg = first.get("msg", "invalid request")
        return _err(400, f"{loc}: {msg}" if loc else msg, param=loc or None)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        f = front_getter()
        return {"object": "list", "data": [{"id": f.model_name, "object": "model",
                                            "created": now(), "owned_by": "pdserve",
                                            "max_model_len": f.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        f = front_getter()
        try:
            job = f.completion_job(body)
        except BadRequest as e:
            return _err(400, str(e), param=e.param)
        return await _respond(f, job, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        f = front_getter()
        try:
            job = f.chat_job(body)
        except BadRequest as e:
            return _err(400, str(e), param=e.param)
        return await _respond(f, job, body, chat=True)

    return app


async def _respond(f: Frontend, job: Job, body, chat: bool):
    created = now()
    obj = "chat.completion" if chat else "text_completion"
    usage_wanted = bool(body.stream_options and body.stream_options.include_usage)
    want_lp = job.params.logprobs is not None

    def usage(n_out: int) -> dict:
        p = len(job.prompt_ids)
        return {"prompt_tokens": p, "completion_tokens": n_out, "total_tokens": p + n_out}

    def lp_chat(entries: list[dict]) -> dict:
        return {"content": [{"token": e["token"], "logprob": e["logprob"],
                             "bytes": list(e["token"].encode()),
                             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                              for t, v in e["top"].items()]} for e in entries]}

    def lp_cmpl(entries: list[dict]) -> dict:
        return {"tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries]}

    if body.stream:
        async def sse():
            t0 = time.monotonic()
            n_out = 0
            try:
                if chat:
                    head = {"id": job.request_id, "object": "chat.completion.chunk",
                            "created": created, "model": f.model_name,
                            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]}
                    yield f"data: {json.dumps(head)}\n\n"
                async for text, lps, n_out, reason in f.text_stream(job):
                    if not text and reason is None and not lps:
                        continue
                    if chat:
                        choice = {"index": 0, "delta": {"content": text} if text else {},
                                  "finish_reason": reason}
                        if want_lp:
                            choice["logprobs"] = lp_chat(lps)
                        chunk = {"id": job.request_id, "object": "chat.completion.chunk",
                                 "created": created, "model": f.model_name, "choices": [choice]}
                    else:
                        choice = {"index": 0, "text": text, "finish_reason": reason,
                                  "logprobs": lp_cmpl(lps) if want_lp else None}
                        chunk = {"id": job.request_id, "object": "text_completion",
                                 "created": created, "model": f.model_name, "choices": [choice]}
                    if usage_wanted:
                        chunk["usage"] = None
                    yield f"data: {json.dumps(chunk)}\n\n"
                if usage_wanted:
                    tail = {"id": job.request_id, "object": chunk["object"], "created": created,
                            "model": f.model_name, "choices": [], "usage": usage(n_out)}
                    yield f"data: {json.dumps(tail)}\n\n"
                yield "data: [DONE]\n\n"
            except Unavailable as e:
                yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
            except Exception as e:  # noqa: BLE001 - report in-band; headers are already sent
                log.exception("request %s failed after %.2fs", job.request_id, time.monotonic() - t0)
                yield f"data: {json.dumps(error_body(f'generation failed: {e}', 'server_error'))}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": job.request_id})

    parts: list[str] = []
    entries: list[dict] = []
    reason = None
    n_out = 0
    try:
        async for text, lps, n_out, r in f.text_stream(job):
            parts.append(text)
            entries += lps
            reason = r or reason
    except Unavailable as e:
        return _err(503, str(e), "server_error")
    except ValueError as e:
        return _err(400, str(e))
    text = "".join(parts)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": reason, "logprobs": lp_chat(entries) if want_lp else None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason,
                  "logprobs": lp_cmpl(entries) if want_lp else None}
    return {"id": job.request_id, "object": obj, "created": created, "model": f.model_name,
            "choices": [choice], "usage": usage(n_out)}

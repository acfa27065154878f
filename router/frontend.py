"""What HTTP and gRPC requests share: request → ``Job``, admission, and the text stream.

``Frontend`` tokenizes (applying the model's chat template to messages), checks the request
against the model (name, context length, vocabulary), admits it through the pools' bounded
queues, and turns the orchestrator's token chunks into text pieces (incremental
detokenization, stop strings) under the request's deadline. Everything that can go wrong is
raised as an ``errors.ApiError`` subclass; the protocol layers only translate those.

Lifetime of one request::

    job = front.completion_job(body)            # BadRequest / ModelNotFound
    deadline = front.deadline(requested_s)      # the server's limit, or less if asked
    ticket = await front.admit(deadline)        # Overloaded (429), holds no slot on error
    async for piece in front.stream(job, ticket, deadline):   # RequestTimeout, ...
        ...
    # closing the stream (or letting it end) aborts the request everywhere and closes the
    # ticket; the caller also closes the ticket itself, in case the stream never started.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pdserve.workers.detokenizer import Detokenizer
from pdserve.workers.messages import Job
from pdserve.workers.request import SamplingParams

from .admission import Admission, AdmissionConfig, Ticket
from .auth import Auth
from .chunks import split_ids, split_text
from .errors import (
    ApiError,
    BadRequest,
    ClientTimeout,
    InternalError,
    ModelNotFound,
    Overloaded,
    RequestTimeout,
    ServiceUnavailable,
)
from .metrics import RequestTimer
from .protocol import ChatCompletionRequest, CompletionRequest, new_id

log = logging.getLogger(__name__)

# Below this a temperature divides logits into overflow (inf/NaN probabilities); such
# requests are sampled greedily, which is what they ask for in the limit.
MIN_TEMPERATURE = 1e-5
# The sampler works in float32, where a top_p below ~1e-45 is 0 and would drop every token
# (found by the OpenAPI fuzz test). Any top_p this small keeps only the most likely token.
MIN_TOP_P = 1e-6
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class Deadline:
    at: float  # event-loop time (``loop.time()``)
    limit_s: float  # the time limit it was made from, for messages
    client_set: bool = False  # the client asked for this limit (shorter than the server's)

    def left(self) -> float:
        return max(0.0, self.at - asyncio.get_running_loop().time())


@dataclass(frozen=True)
class Piece:
    """New text of one request since the previous piece."""

    text: str
    logprobs: list[dict] = field(default_factory=list)  # per token: token, logprob, top{}
    num_output_tokens: int = 0  # generated so far
    finish_reason: str | None = None  # set on the last piece: stop | length


class Frontend:
    def __init__(self, tokenizer, model_name: str, max_model_len: int, vocab_size: int,
                 orchestrator, admission: Admission | None = None, auth: Auth | None = None,
                 request_timeout_s: float = 600.0, max_body_bytes: int = 4 << 20) -> None:
        self.tok = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.orch = orchestrator
        self.admission = admission or Admission({}, AdmissionConfig())
        self.auth = auth or Auth()
        self.request_timeout_s = request_timeout_s
        self.max_body_bytes = max_body_bytes

    @classmethod
    def for_app(cls, app_config: dict, tokenizer, model_name: str, max_model_len: int,
                vocab_size: int, orchestrator) -> Frontend:
        r = app_config["router"]
        return cls(tokenizer, model_name, max_model_len, vocab_size, orchestrator,
                   Admission.for_app(app_config), Auth.from_config(r), r["request_timeout_s"],
                   r["max_body_bytes"])

    # ---- request → job -----------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model not in (None, "", self.model_name):
            raise ModelNotFound(f"model {model!r} is not served here; this server serves "
                                f"{self.model_name!r} (see /v1/models)", "model",
                                "model_not_found")

    def _params(self, body, prompt_len: int, max_tokens: int | None, default_max: int | None,
                logprobs: int | None, prompt_param: str) -> SamplingParams:
        self.check_model(body.model)
        room = self.max_model_len - prompt_len
        if room < 1:
            raise BadRequest(f"the prompt has {prompt_len} tokens but this model's context is "
                             f"{self.max_model_len} tokens (prompt and output together); "
                             f"shorten the prompt to at most {self.max_model_len - 1} tokens",
                             prompt_param, "context_length_exceeded")
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        if max_tokens > room:
            raise BadRequest(f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens "
                             f"exceeds the model's context of {self.max_model_len} tokens; ask "
                             f"for at most {room}", "max_tokens", "context_length_exceeded")
        temperature = body.temperature_value
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0
        return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                              top_p=max(body.top_p_value, MIN_TOP_P),
                              top_k=min(body.top_k, self.vocab_size),
                              seed=body.seed, stop=tuple(body.stop_list),
                              ignore_eos=body.ignore_eos, logprobs=logprobs)

    def completion_job(self, body: CompletionRequest) -> Job:
        if isinstance(body.prompt, str):
            ids = list(self.tok(body.prompt)["input_ids"])
        else:
            ids = list(body.prompt)
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise BadRequest(f"prompt token id {bad} is outside this model's vocabulary; "
                                 f"ids must be in [0, {self.vocab_size})", "prompt")
        chunks, ext = None, body.pdserve
        if ext is not None and ext.chunks:  # RAG chunks: see router/chunks.py
            if isinstance(body.prompt, str):
                ids, chunks = split_text(self.tok, body.prompt, ext.chunks, "prompt",
                                         ext.recompute_ratio, self.tok("")["input_ids"])
            else:
                chunks = split_ids(ids, ext.chunks, ext.recompute_ratio)
        if not ids:
            raise BadRequest("the prompt tokenizes to nothing; send some text", "prompt")
        params = self._params(body, len(ids), body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS,
                              body.logprobs, "prompt")
        return Job(new_id("cmpl"), ids, params, chunks)

    def chat_job(self, body: ChatCompletionRequest) -> Job:
        msgs = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                for m in body.messages]
        try:
            ids = list(self.tok.apply_chat_template(msgs, add_generation_prompt=True,
                                                    tokenize=True, return_dict=False))
        except Exception as e:  # noqa: BLE001 - template errors are the client's input
            raise BadRequest(f"the messages do not fit the model's chat template: {e}",
                             "messages") from None
        chunks, ext = None, body.pdserve
        if ext is not None and ext.chunks:  # RAG chunks: see router/chunks.py
            text = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids, chunks = split_text(self.tok, text, ext.chunks, "messages", ext.recompute_ratio)
        lp = (body.top_logprobs or 0) if body.logprobs else None
        params = self._params(body, len(ids), body.max_tokens_value, None, lp, "messages")
        return Job(new_id("chatcmpl"), ids, params, chunks)

    # ---- admission and the stream -------------------------------------------------------------
    def deadline(self, requested_s: float | None = None) -> Deadline:
        """The request's deadline: the server's limit, or less if the client asks for less."""
        client_set = requested_s is not None and requested_s < self.request_timeout_s
        limit = requested_s if client_set else self.request_timeout_s
        return Deadline(asyncio.get_running_loop().time() + limit, limit, client_set)

    async def admit(self, deadline: Deadline) -> Ticket:
        return await self.admission.admit(deadline.left())

    async def stream(self, job: Job, ticket: Ticket, deadline: Deadline) -> AsyncIterator[Piece]:
        """The request's text; raises ``ApiError``s. Closing it aborts the request."""
        detok = Detokenizer(self.tok, job.prompt_ids, job.params.stop)
        gen = self.orch.run(job)
        first = True
        timer = RequestTimer()
        outcome = "error"
        try:
            while True:
                # The deadline covers each wait on the pools, never the consumer's own time
                # (a timeout spanning a ``yield`` would cancel whatever the consumer does).
                try:
                    async with asyncio.timeout_at(deadline.at) as tm:
                        c = await anext(gen)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if not tm.expired():
                        raise
                    raise (ClientTimeout if deadline.client_set else RequestTimeout)(
                        f"the request did not finish within its time limit of "
                        f"{deadline.limit_s:g} s; ask for fewer tokens or allow more time "
                        "(router.request_timeout_s; per request: the X-Request-Timeout header "
                        "or x-request-timeout gRPC metadata, in seconds)") from None
                if first:
                    ticket.release("prefill")  # the prompt is done: the next one may prefill
                    first = False
                timer.tokens_out(c.num_output_tokens)
                text = detok.add(c.token_ids, final=c.finished)
                lps = [self._lp_entry(t, lp) for t, lp in zip(c.token_ids, c.logprobs)]
                if detok.stopped:
                    outcome = "ok"
                    yield Piece(text, lps, c.num_output_tokens, "stop")
                    return
                if c.finished:
                    outcome = "ok"
                yield Piece(text, lps, c.num_output_tokens, c.finish_reason if c.finished else None)
                if c.finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled" if outcome != "ok" else outcome
            raise
        except ApiError:
            raise
        except Exception as e:
            raise translate(e, self.admission.cfg.retry_after_s, job.request_id) from e
        finally:
            timer.finish(outcome)
            await gen.aclose()
            ticket.close()

    def _lp_entry(self, token: int, lp: dict[int, float]) -> dict:
        top = {self.tok.decode([t]): v for t, v in lp.items() if t != token or len(lp) > 1}
        return {"token": self.tok.decode([token]), "logprob": lp.get(token, 0.0), "top": top}


def translate(e: BaseException, retry_after_s: int, request_id: str = "") -> ApiError:
    """A failure from the pools → the ``ApiError`` the client sees."""
    from pdserve.workers.instance import NoCapacity
    from pdserve.workers.scheduler import QueueFull

    from .orchestrator import Unavailable

    root = _cause(e)
    if isinstance(root, ApiError):
        return root
    if isinstance(root, QueueFull):
        return Overloaded(f"an instance's waiting queue is full ({root})", retry_after_s)
    if isinstance(root, (Unavailable, NoCapacity)):
        return ServiceUnavailable(f"{root}; retry later")
    if isinstance(root, ValueError):
        return BadRequest(str(root))
    log.error("request %s failed: %s: %s", request_id, type(root).__name__, root)
    return InternalError(f"generation failed ({type(root).__name__}: {root}); the request was "
                         "aborted, retrying may succeed")


def _cause(e: BaseException) -> BaseException:
    """The user-level exception inside Ray's wrappers (``RayTaskError.cause``)."""
    seen = 0
    while getattr(e, "cause", None) is not None and seen < 8:
        e = e.cause  # type: ignore[assignment]
        seen += 1
    return e



"""A table of bad inputs, each with the status and message fragment it must get, in OpenAI's
error shape; afterwards the server still gives the same answer as before. Runs against the
``small`` app (a 128-token context, so context limits are cheap to hit)."""

from __future__ import annotations

import httpx
import pytest
from router_apps import idle, wait_idle

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def chat(**kw) -> dict:
    return {"messages": USER, **kw}


def cmpl(**kw) -> dict:
    return {"prompt": "x", **kw}


# (id, method, path, json body | raw bytes, extra headers, status, message fragment)
CASES = [
    ("malformed-json", "POST", CMPL, b'{"prompt": "x",', {}, 400, "not valid JSON"),
    ("body-not-object", "POST", CMPL, [1, 2], {}, 400, "must be a JSON object"),
    ("empty-body", "POST", CMPL, b"", {}, 400, "body is empty"),
    ("invalid-utf8", "POST", CMPL, b'{"prompt": "\xff\xfe"}', {}, 400, "not valid UTF-8"),
    ("nan-temperature", "POST", CMPL, b'{"prompt": "x", "temperature": NaN}', {}, 400,
     "temperature: Input should be a finite number"),
    ("missing-prompt", "POST", CMPL, {"max_tokens": 3}, {}, 400, "prompt: this field is required"),
    ("prompt-wrong-type", "POST", CMPL, {"prompt": 5}, {}, 400,
     "prompt must be a string or a list of token ids"),
    ("prompt-bools", "POST", CMPL, {"prompt": [True, 1]}, {}, 400,
     "prompt must be a string or a list of token ids"),
    ("batched-prompts", "POST", CMPL, {"prompt": ["a", "b"]}, {}, 400,
     "batched prompts are not supported"),
    ("empty-prompt", "POST", CMPL, {"prompt": ""}, {}, 400, "prompt must not be empty"),
    ("token-out-of-vocab", "POST", CMPL, {"prompt": [1, 10**6]}, {}, 400,
     "outside this model's vocabulary"),
    ("negative-token", "POST", CMPL, {"prompt": [-1]}, {}, 400, "outside this model's vocabulary"),
    ("temperature-high", "POST", CMPL, cmpl(temperature=2.5), {}, 400,
     "temperature: Input should be less than or equal to 2"),
    ("temperature-negative", "POST", CMPL, cmpl(temperature=-0.1), {}, 400,
     "temperature: Input should be greater than or equal to 0"),
    ("temperature-string", "POST", CMPL, cmpl(temperature="hot"), {}, 400,
     "temperature: Input should be a valid number"),
    ("top-p-zero", "POST", CMPL, cmpl(top_p=0), {}, 400, "top_p: Input should be greater than 0"),
    ("top-p-high", "POST", CMPL, cmpl(top_p=1.5), {}, 400, "top_p: Input should be less than"),
    ("max-tokens-zero", "POST", CMPL, cmpl(max_tokens=0), {}, 400,
     "max_tokens: Input should be greater than or equal to 1"),
    ("max-tokens-string", "POST", CMPL, cmpl(max_tokens="10"), {}, 400,
     "max_tokens: Input should be a valid integer"),
    ("max-tokens-fraction", "POST", CMPL, cmpl(max_tokens=2.5), {}, 400,
     "max_tokens: Input should be a valid integer"),
    ("max-tokens-beyond-context", "POST", CMPL, cmpl(max_tokens=500), {}, 400,
     "exceeds the model's context of 128 tokens; ask for at most 127"),
    ("prompt-beyond-context", "POST", CMPL, {"prompt": [5] * 200}, {}, 400,
     "the prompt has 200 tokens but this model's context is 128 tokens"),
    ("unknown-model", "POST", CMPL, cmpl(model="gpt-4"), {}, 404, "is not served here"),
    ("n-negative", "POST", CMPL, cmpl(n=-1), {}, 400,
     "n: Input should be greater than or equal to 1"),
    ("n-two", "POST", CHAT, chat(n=2), {}, 400, "only n=1 is supported"),
    ("huge-stop-list", "POST", CMPL, cmpl(stop=["a"] * 100), {}, 400, "at most 16 stop strings"),
    ("stop-too-long", "POST", CMPL, cmpl(stop=["a" * 300]), {}, 400, "1 to 256 characters"),
    ("stop-wrong-type", "POST", CMPL, cmpl(stop=5), {}, 400,
     "stop must be a string or a list of strings"),
    ("logprobs-too-many", "POST", CMPL, cmpl(logprobs=50), {}, 400,
     "logprobs: Input should be less than or equal to 20"),
    ("presence-penalty", "POST", CMPL, cmpl(presence_penalty=1.0), {}, 400,
     "presence_penalty is not supported"),
    ("echo", "POST", CMPL, cmpl(echo=True), {}, 400, "echo=true is not supported"),
    ("stream-not-bool", "POST", CMPL, cmpl(stream="yes"), {}, 400,
     "stream: Input should be a valid boolean"),
    ("stream-options-without-stream", "POST", CMPL, cmpl(stream_options={"include_usage": True}),
     {}, 400, "stream_options is only allowed with stream=true"),
    ("seed-too-big", "POST", CMPL, cmpl(seed=2**70), {}, 400,
     "seed: Input should be less than or equal to"),
    ("empty-messages", "POST", CHAT, {"messages": []}, {}, 400,
     "messages must contain at least one message"),
    ("messages-not-list", "POST", CHAT, {"messages": "hi"}, {}, 400,
     "messages: Input should be a valid list"),
    ("unknown-role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, {}, 400,
     "messages[0].role: Input should be 'system'"),
    ("content-not-string", "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, {}, 400,
     "content must be a string or a list of text parts"),
    ("content-part-not-string", "POST", CHAT,
     {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, {}, 400,
     "content part 0: text must be a string"),
    ("image-part", "POST", CHAT,
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, {},
     400, "only 'text' parts are supported"),
    ("user-without-content", "POST", CHAT, {"messages": [{"role": "user"}]}, {}, 400,
     "content is required for a 'user' message"),
    ("top-logprobs-alone", "POST", CHAT, chat(top_logprobs=2), {}, 400,
     "top_logprobs requires logprobs=true"),
    ("tools", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), {}, 400,
     "tools (function calling) are not supported"),
    ("json-mode", "POST", CHAT, chat(response_format={"type": "json_object"}), {}, 400,
     "response_format type 'json_object' is not supported"),
    ("chat-beyond-context", "POST", CHAT,
     {"messages": [{"role": "user", "content": "Serving models. " * 80}]}, {}, 400,
     "but this model's context is 128 tokens"),
    ("chat-max-tokens-beyond", "POST", CHAT, chat(max_completion_tokens=1000), {}, 400,
     "ask for at most"),
    ("bad-timeout-header", "POST", CMPL, cmpl(), {"X-Request-Timeout": "abc"}, 400,
     "x-request-timeout"),
    ("wrong-method", "GET", CMPL, None, {}, 405, "GET is not allowed on /v1/completions"),
    ("unknown-path", "POST", "/v1/engines", cmpl(), {}, 404, "no such endpoint"),
]


async def _greedy(c: httpx.AsyncClient) -> str:
    r = await c.post(CMPL, json={"prompt": "The quick", "max_tokens": 8, "temperature": 0,
                                 "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


async def test_bad_inputs_table(small_app):
    assert len(CASES) >= 30
    async with httpx.AsyncClient(base_url=small_app.url, timeout=60) as c:
        before = await _greedy(c)
        failures = []
        for name, method, path, body, headers, status, fragment in CASES:
            kw: dict = {"headers": headers}
            if isinstance(body, bytes):
                kw["content"] = body
                kw["headers"] = {"Content-Type": "application/json", **headers}
            elif body is not None:
                kw["json"] = body
            r = await c.request(method, path, **kw)
            try:
                err = r.json()["error"]
                ok = (r.status_code == status and fragment in err["message"]
                      and set(err) == {"message", "type", "param", "code"})
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                failures.append((name, r.status_code, r.text[:300]))
        assert not failures, "\n".join(map(str, failures))
        assert (await c.get("/health")).json() == {"status": "ok"}
        assert await _greedy(c) == before  # still healthy, and still correct
    assert idle(await wait_idle(small_app.name))


async def test_accepted_edge_values(small_app):
    """Values at the edges of what is allowed are served, not refused."""
    ok_bodies = [
        (CMPL, cmpl(max_tokens=127)),  # exactly fills the context (prompt "x" is 1 token)
        (CMPL, cmpl(temperature=2.0, top_p=1e-9, seed=-(2**63), max_tokens=2)),
        (CMPL, cmpl(temperature=1e-30, max_tokens=2)),  # tiny temperature: sampled greedily
        (CMPL, cmpl(top_p=5e-324, max_tokens=2)),  # 0 in float32: would drop every token
        (CMPL, cmpl(top_k=10**9, temperature=1.0, max_tokens=2)),  # top_k beyond the vocabulary
        (CMPL, {"prompt": [5.0, 6], "max_tokens": 2.0}),  # JSON's 5.0 is the integer 5
        (CMPL, cmpl(stop=["a"] * 16, n=None, temperature=None, stop_token_ids=[1], max_tokens=2)),
        (CHAT, chat(max_tokens=2, logprobs=True, top_logprobs=20, presence_penalty=0,
                    tool_choice="none", response_format={"type": "text"}, user="u1")),
        (CHAT, {"messages": [{"role": "developer", "content": "d"},
                             {"role": "user", "content": [{"type": "text", "text": "a"},
                                                          {"type": "text", "text": "b"}]},
                             {"role": "assistant", "content": None},
                             {"role": "tool", "content": "t"}], "max_tokens": 2}),
    ]
    async with httpx.AsyncClient(base_url=small_app.url, timeout=60) as c:
        for path, body in ok_bodies:
            r = await c.post(path, json=body)
            assert r.status_code == 200, (body, r.text)

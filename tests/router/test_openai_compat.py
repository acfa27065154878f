"""The real ``openai`` package, unchanged, against a local pdserve app: completions and chat
completions, streamed and not, with usage, logprobs, stop, seed and OpenAI-shaped errors."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Un café crème, s'il vous plaît."}]
GREEDY = {"max_tokens": 10, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture
async def client(api_app):
    c = openai.AsyncOpenAI(base_url=f"{api_app.url}/v1", api_key=api_app.key, max_retries=0)
    yield c
    await c.close()


@pytest.fixture(scope="module")
def tok(cluster_model):
    return AutoTokenizer.from_pretrained(str(cluster_model))


async def test_completions_stream_and_not(client, api_app):
    r = await client.completions.create(model=api_app.model, prompt="The quick brown fox",
                                        **GREEDY)
    assert r.object == "text_completion" and r.model == api_app.model
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    parts, reasons, usage = [], [], None
    stream = await client.completions.create(model=api_app.model, prompt="The quick brown fox",
                                             stream=True, stream_options={"include_usage": True},
                                             **GREEDY)
    async for ch in stream:
        if ch.choices:
            parts.append(ch.choices[0].text)
            reasons.append(ch.choices[0].finish_reason)
        if ch.usage:
            usage = ch.usage
    assert "".join(parts) == r.choices[0].text
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}
    assert usage is not None and usage.model_dump() == r.usage.model_dump()


async def test_chat_stream_and_not_use_the_chat_template(client, api_app, tok):
    r = await client.chat.completions.create(model=api_app.model, messages=MESSAGES,
                                             max_completion_tokens=10, temperature=0,
                                             extra_body={"ignore_eos": True})
    msg = r.choices[0].message
    assert r.object == "chat.completion" and msg.role == "assistant"
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert r.usage.prompt_tokens == len(ids)
    # the same ids sent as a plain completion give the same text: the template was applied
    same = await client.completions.create(model=api_app.model, prompt=list(ids), **GREEDY)
    assert msg.content == same.choices[0].text
    stream = await client.chat.completions.create(model=api_app.model, messages=MESSAGES,
                                                  max_tokens=10, temperature=0, stream=True,
                                                  stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
    roles, parts, usage, reason = [], [], None, None
    async for ch in stream:
        if ch.choices:
            d = ch.choices[0].delta
            roles += [d.role] if d.role else []
            parts.append(d.content or "")
            reason = ch.choices[0].finish_reason or reason
        if ch.usage:
            usage = ch.usage
    assert roles == ["assistant"] and "".join(parts) == msg.content and reason == "length"
    assert usage.completion_tokens == 10 and usage.prompt_tokens == len(ids)


async def test_logprobs_seed_and_stop(client, api_app):
    r = await client.chat.completions.create(model=api_app.model, messages=MESSAGES,
                                             max_tokens=5, temperature=0, logprobs=True,
                                             top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob <= 0 and c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob
               for c in content)
    c = await client.completions.create(model=api_app.model, prompt="x", max_tokens=4,
                                        temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    # keyed by token text, so two tokens that decode alike (partial UTF-8) share an entry
    assert all(1 <= len(t) <= 2 and max(t.values()) <= 0 for t in lp.top_logprobs)
    # seeded sampling repeats; another seed (almost surely) differs somewhere over 3 tries
    kw = {"model": api_app.model, "prompt": "The", "max_tokens": 12, "temperature": 1.0,
          "extra_body": {"ignore_eos": True}}
    a = await client.completions.create(seed=7, **kw)
    b = await client.completions.create(seed=7, **kw)
    assert a.choices[0].text == b.choices[0].text
    others = [(await client.completions.create(seed=s, **kw)).choices[0].text for s in (8, 9, 10)]
    assert any(o != a.choices[0].text for o in others)
    # stop: the text ends before the stop string, finish_reason "stop"
    full = (await client.completions.create(model=api_app.model, prompt="The", max_tokens=12,
                                            temperature=0, extra_body={"ignore_eos": True}))
    text = full.choices[0].text
    stop = text[3:6]
    assert stop.strip(), text
    cut = await client.completions.create(model=api_app.model, prompt="The", max_tokens=12,
                                          temperature=0, stop=[stop],
                                          extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]


async def test_openai_errors_are_typed(client, api_app):
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model=api_app.model, messages=MESSAGES, n=2)
    assert "only n=1 is supported" in e.value.message
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError) as e:
        await client.completions.create(model="gpt-4o", prompt="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        await client.completions.create(model=api_app.model, prompt="x", max_tokens=9000)
    assert "ask for at most" in e.value.message
    bad = openai.AsyncOpenAI(base_url=f"{api_app.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        await bad.models.list()
    assert "invalid API key" in e.value.message
    await bad.close()
    models = await client.models.list()
    assert [m.id for m in models.data] == [api_app.model]

"""``pdserve.client`` (sync and async, gRPC and HTTP) and ``pdserve client`` against the
``api`` app: the four ways give the same text, errors carry status codes, and leaving a stream
early cancels the request on the server."""

from __future__ import annotations

import asyncio

import pytest
from pdserve.cluster.cli import main
from router_apps import idle, wait_idle

from pdserve.client import AsyncClient, Chunk, Client, PdServeError, _UsageFold

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

GREEDY = {"max_tokens": 9, "temperature": 0, "ignore_eos": True}


def urls(app) -> dict[str, str]:
    return {"grpc": f"grpc://{app.grpc}", "http": app.url}


async def test_four_ways_agree(api_app):
    texts = {}
    for proto, url in urls(api_app).items():
        async with AsyncClient(url, api_app.key) as c:
            done = await c.complete("The quick brown fox", **GREEDY)
            chunks = [ch async for ch in c.stream("The quick brown fox", **GREEDY)]
            chat = await c.complete(messages=[{"role": "user", "content": "hi"}], **GREEDY)
            assert await c.models() == [api_app.model]
        assert "".join(ch.text for ch in chunks) == done.text
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage == done.usage
        assert all(ch.usage is None for ch in chunks[:-1])
        assert done.usage.completion_tokens == 9 and chat.usage.completion_tokens == 9
        texts[f"async-{proto}"] = (done.text, chat.text)

        def sync_calls(url=url):
            with Client(url, api_app.key) as c:
                done = c.complete("The quick brown fox", **GREEDY)
                streamed = "".join(ch.text for ch in c.stream("The quick brown fox", **GREEDY))
                chat = c.complete(messages=[{"role": "user", "content": "hi"}], **GREEDY)
                return done.text, streamed, chat.text

        s_done, s_streamed, s_chat = await asyncio.to_thread(sync_calls)
        assert s_streamed == s_done
        texts[f"sync-{proto}"] = (s_done, s_chat)
    assert len(set(texts.values())) == 1, texts


async def test_errors_carry_status_codes(api_app):
    for proto, url in urls(api_app).items():
        async with AsyncClient(url, "wrong-key") as c:
            with pytest.raises(PdServeError) as e:
                await c.complete("x", max_tokens=2)
            assert e.value.code == "UNAUTHENTICATED", proto
        async with AsyncClient(url, api_app.key) as c:
            with pytest.raises(PdServeError) as e:
                await c.complete("x", temperature=9.0)
            assert e.value.code == "INVALID_ARGUMENT" and "temperature" in e.value.message
            with pytest.raises(PdServeError) as e:
                async for _ch in c.stream("x", max_tokens=4000, temperature=0, ignore_eos=True,
                                          timeout_s=0.7):
                    pass
            assert e.value.code == "DEADLINE_EXCEEDED", (proto, e.value)
    with pytest.raises(PdServeError) as e:
        async with AsyncClient("http://127.0.0.1:9", api_app.key) as c:  # nothing listens
            await c.complete("x")
    assert e.value.code == "UNAVAILABLE"
    with pytest.raises(ValueError, match="prompt"):
        Client(api_app.url).complete()


async def test_leaving_a_stream_early_frees_the_request(api_app):
    for url in urls(api_app).values():
        async with AsyncClient(url, api_app.key) as c:
            n = 0
            async for _ch in c.stream("x", max_tokens=4000, temperature=0, ignore_eos=True):
                n += 1
                if n == 3:
                    break
        assert idle(await wait_idle(api_app.name)), url

        def sync_break(url=url):
            with Client(url, api_app.key) as c:
                stream = c.stream("x", max_tokens=4000, temperature=0, ignore_eos=True)
                for i, _ch in enumerate(stream):
                    if i == 2:
                        break
                stream.close()

        await asyncio.to_thread(sync_break)
        assert idle(await wait_idle(api_app.name)), url


async def test_cli_client(api_app, capsys):
    base = ["client", "--api-key", api_app.key, "--max-tokens", "9", "--temperature", "0"]
    async with AsyncClient(api_app.url, api_app.key) as c:
        want = (await c.complete("The quick brown fox", max_tokens=9, temperature=0)).text
    for url in urls(api_app).values():
        for extra in ([], ["--no-stream"]):
            rc = await asyncio.to_thread(main, [*base, "--url", url, *extra,
                                                "The quick brown fox"])
            out = capsys.readouterr()
            assert rc == 0, out.err
            assert out.out == want + "\n" and "completion_tokens=" in out.err
    rc = await asyncio.to_thread(main, ["client", "--url", api_app.url, "--api-key", "nope", "x"])
    err = capsys.readouterr().err
    assert rc == 1 and "UNAUTHENTICATED" in err and "invalid API key" in err
    rc = await asyncio.to_thread(main, ["client", "--url", api_app.url, "--api-key",
                                        api_app.key, "--models"])
    assert rc == 0 and capsys.readouterr().out.strip() == api_app.model


def test_usage_fold_merges_the_http_usage_event():
    fold = _UsageFold()
    out = fold.feed(Chunk("a")) + fold.feed(Chunk("b", "length"))
    assert out == [Chunk("a")]
    usage_event = Chunk("", None, object())  # what the separate usage event parses to
    merged = fold.feed(usage_event)
    assert len(merged) == 1 and merged[0].text == "b" and merged[0].usage is usage_event.usage
    assert fold.flush() == []
    assert fold.feed(Chunk("c", "stop")) == [] and fold.flush() == [Chunk("c", "stop")]

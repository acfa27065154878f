"""Incremental detokenization: multi-byte characters across tokens, stop strings across tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pdserve.workers.detokenizer import Detokenizer


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(str(tiny_llama))


TEXTS = ["日本語のテキストとキャッシュ。", "Emoji 🚀🔥 and ∑∫√", "Un café crème", "a b  c\n\td"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode_and_is_never_broken(tok, text):
    prompt = tok("Hello")["input_ids"]
    ids = tok(text)["input_ids"]
    # the fixture's byte-level BPE splits these characters over several tokens
    if any(ord(ch) > 127 for ch in text):
        assert any("\ufffd" in tok.decode([i]) for i in ids), "test needs a split character"
    d = Detokenizer(tok, prompt)
    pieces = [d.add([i]) for i in ids] + [d.add([], final=True)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)


def test_stop_string_spanning_tokens_is_cut(tok):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok(text)["input_ids"]
    d = Detokenizer(tok, [], stop=["fox jumps", "zzz"])
    out = ""
    for i in ids:
        out += d.add([i])
        if d.stopped:
            break
    assert d.stopped
    assert out == "The quick brown "
    assert "fox" not in out


def test_held_back_text_is_flushed_on_finish(tok):
    ids = tok("abc fox")["input_ids"]
    d = Detokenizer(tok, [], stop=["fox jumps"])
    out = "".join(d.add([i]) for i in ids)
    assert len(out) < len("abc fox")  # a possible stop prefix is held back
    out += d.add([], final=True)
    assert out == "abc fox" and not d.stopped

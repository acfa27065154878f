"""A request's ``pdserve.chunks`` → prompt token ids with chunk spans (``workers.Chunks``).

A chunk's KV can only be reused if its tokens are the same in every prompt, so a chunk is
tokenized on its own and the text between chunks separately; the prompt's ids are the
concatenation::

    text   "Docs: " │ "Paris is the capital…" │ "\n" │ "The Seine…" │ "\nQ: …"
    ids    tok(..)    tok(chunk 0) = span 0     tok   tok(chunk 1)   tok(..)

(so a prompt with chunks may tokenize slightly differently at chunk edges than the same
text without them; without ``chunks`` nothing changes). Chunks are found in order, each
after the previous one; a chunk that does not occur is the client's error.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.workers.chunk_cache import chunk_hash
from pdserve.workers.request import Chunks

from .errors import BadRequest

__all__ = ["held_chunk_tokens", "split_ids", "split_text"]

PARAM = "pdserve.chunks"


def _missing(i: int, where: str) -> BadRequest:
    return BadRequest(f"pdserve.chunks[{i}] does not occur in the {where} after the previous "
                      "chunk; each chunk must be an exact part of the prompt, listed in prompt "
                      "order", PARAM)


def split_text(tok, text: str, chunks: Sequence[str | list[int]], where: str,
               ratio: float | None, specials: Sequence[int] = ()) -> tuple[list[int], Chunks]:
    """Token ids of ``text`` (after ``specials``, e.g. a BOS the tokenizer would add) with
    each chunk tokenized on its own."""
    def enc(s: str) -> list[int]:
        return list(tok(s, add_special_tokens=False)["input_ids"]) if s else []

    ids, spans, pos = list(specials), [], 0
    for i, c in enumerate(chunks):
        if not isinstance(c, str):
            raise BadRequest(f"pdserve.chunks[{i}] is a token list but the prompt is text; "
                             "send chunks as strings", PARAM)
        at = text.find(c, pos)
        if at < 0:
            raise _missing(i, where)
        ids += enc(text[pos:at])
        start = len(ids)
        ids += enc(c)
        if len(ids) == start:
            raise BadRequest(f"pdserve.chunks[{i}] has no tokens of its own; send the "
                             "document's text", PARAM)
        spans.append((start, len(ids)))
        pos = at + len(c)
    ids += enc(text[pos:])
    return ids, Chunks(tuple(spans), ratio)


def split_ids(ids: list[int], chunks: Sequence[str | list[int]], ratio: float | None) -> Chunks:
    """Spans of token-id ``chunks`` found in order in a token-id prompt."""
    spans, pos = [], 0
    for i, c in enumerate(chunks):
        if isinstance(c, str):
            raise BadRequest(f"pdserve.chunks[{i}] is text but the prompt is token ids; send "
                             "chunks as token-id lists", PARAM)
        n = len(c)
        at = next((j for j in range(pos, len(ids) - n + 1) if ids[j:j + n] == c), -1)
        if at < 0:
            raise _missing(i, "prompt")
        spans.append((at, at + n))
        pos = at + n
    return Chunks(tuple(spans), ratio)


def held_chunk_tokens(index, root: int, job) -> dict[str, int]:
    """Per live instance, how many of ``job``'s chunk tokens its chunk store holds (one
    Redis round trip; ``index`` is a ``cluster.metadata.MetadataStore``). The router counts
    them like cached prefix tokens: a request with chunks never uses the prefix cache."""
    spans = job.chunks.spans
    held = index.chunk_holders([chunk_hash(root, job.prompt_ids[s:e]) for s, e in spans])
    return {i: sum(spans[j][1] - spans[j][0] for j in idx) for i, idx in held.items()}

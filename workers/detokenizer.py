"""Incremental detokenization with stop strings.

Decoding one token at a time breaks multi-byte characters (a UTF-8 character can span
tokens) and loses word-boundary spaces; decoding everything each step is quadratic. So the
decoder keeps a short window: ``ids[prefix:read]`` is text already emitted (kept as context
so spaces come out right), ``ids[read:]`` is new. New text is emitted only when it does not
end in U+FFFD (an incomplete character).

Stop strings may span tokens, so the last ``max(len(stop)) - 1`` characters are held back
until the next token proves they do not begin a stop string; on a match the text is cut
before the stop string and the request finishes.
"""

from __future__ import annotations

from collections.abc import Sequence

CONTEXT_TOKENS = 6  # prompt tokens used as left context for the first output tokens


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self.tok = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # all output text decoded so far (after a stop: cut before it)
        self.emitted = 0  # characters of ``text`` already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, new_ids: Sequence[int], final: bool = False) -> str:
        """Feed tokens; returns the text that is safe to send now. ``final`` flushes."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            search_from = max(0, len(self.text) - self.hold)
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            if self.stop:
                hit = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
                if hit:
                    self.text = self.text[: min(hit)]
                    self.stopped = True
        safe = len(self.text) if (final or self.stopped) else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : safe]
        self.emitted = safe
        return out

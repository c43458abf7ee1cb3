"""Incremental detokenisation with stop strings, for streaming.

Decoding the whole output again for every token costs O(T) per token; instead we decode a short
window: the text of ``ids[prefix:]`` minus the text of ``ids[prefix:read]``. Keeping a few tokens
of context before ``read`` lets tokenizers that depend on the previous token (leading spaces,
multi-byte characters split across tokens) come out right.
"""

from __future__ import annotations

from typing import Sequence

from dsla.model.tokenizer import Tokenizer

CONTEXT_TOKENS = 4  # prompt tokens kept as decoding context for the first output tokens


class Detokenizer:
    """Turns output token ids into text deltas, holding back what could still become a stop string.

    ``push`` returns the text that is now safe to emit; ``stopped`` says a stop string was found
    (the text ends just before it); ``flush`` returns what was held back once the request ends.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)
        self.stop = tuple(stop)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # all output text decoded so far (cut at a stop string once stopped)
        self.emitted = 0  # characters of ``text`` already returned
        self.stopped = False

    def _decode_new(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix: self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if after.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):] if after.startswith(before) else after

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        new = self._decode_new(token_id)
        if not new:
            return ""
        search_from = max(0, len(self.text) - self.holdback)
        self.text += new
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i != -1:
                self.text, self.stopped = self.text[:i], True
        if self.stopped:
            return self.flush()
        safe = len(self.text) - self.holdback
        if safe <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted: safe], safe
        return delta

    def flush(self) -> str:
        delta, self.emitted = self.text[self.emitted:], len(self.text)
        return delta

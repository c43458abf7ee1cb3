"""Incremental detokenisation with stop strings, for streaming.

``tokenizers``' own ``DecodeStream`` turns one token at a time into text in O(1) per token; it
holds back an incomplete UTF-8 sequence until the next token completes it, and a few prompt
tokens given as its starting context make the first output tokens decode as they would in the
middle of the text (leading spaces, byte-level pieces).
"""

from __future__ import annotations

from typing import Sequence

from tokenizers.decoders import DecodeStream

from dsla.model.tokenizer import Tokenizer

CONTEXT_TOKENS = 4  # prompt tokens kept as decoding context for the first output tokens


class Detokenizer:
    """Turns output token ids into text deltas, holding back what could still become a stop string.

    ``push`` returns the text that is now safe to emit; ``stopped`` says a stop string was found
    (the text ends just before it); ``flush`` returns what was held back once the request ends.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        # The wrapped ``tokenizers.Tokenizer``: DecodeStream needs it (Tokenizer has no public accessor yet).
        self.raw = tokenizer._tok
        self.stream = DecodeStream(ids=list(prompt_ids[-CONTEXT_TOKENS:]), skip_special_tokens=True)
        self.stop = tuple(stop)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # all output text decoded so far (cut at a stop string once stopped)
        self.emitted = 0  # characters of ``text`` already returned
        self.stopped = False

    def _decode_new(self, token_id: int) -> str:
        return self.stream.step(self.raw, token_id) or ""  # None: an incomplete UTF-8 sequence so far

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

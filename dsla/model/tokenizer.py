"""A light tokenizer: ``tokenizers`` for the vocabulary plus the checkpoint's Jinja chat template.

Avoids importing transformers on the serving path. Reads tokenizer.json and tokenizer_config.json
from a Hugging Face checkpoint directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        f = path / "tokenizer.json"
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: the teacher directory needs a tokenizer.json")
        self._tok = _Tok.from_file(str(f))
        cfg_file = path / "tokenizer_config.json"
        self.config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.chat_template: str | None = self.config.get("chat_template")
        jinja_file = path / "chat_template.jinja"
        if self.chat_template is None and jinja_file.is_file():
            self.chat_template = jinja_file.read_text()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def special(self, name: str) -> str | None:
        """A special token's text from tokenizer_config.json (e.g. 'eos_token')."""
        tok = self.config.get(name)
        return tok.get("content") if isinstance(tok, dict) else tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the checkpoint's template (as transformers does)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template: use a plain prompt instead of chat messages")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.special("bos_token") or "", eos_token=self.special("eos_token") or "")


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters."""

    def __init__(self, tokenizer: Tokenizer, prefix_ids: Sequence[int] = ()) -> None:
        self.tok = tokenizer
        self.ids: list[int] = list(prefix_ids)
        self.text = tokenizer.decode(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # incomplete UTF-8 sequence: wait for the next token
            return ""
        delta, self.text = text[len(self.text):], text
        return delta

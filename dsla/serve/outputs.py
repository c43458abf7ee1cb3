"""What the engine hands back for a request: ``RequestOutput`` deltas, and a collecting sink.

Engine-independent so the HTTP layer, tests and scripts can share it without the engine's imports.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Callable

from dsla.serve.request import FinishReason, TokenLogprob


@dataclass(frozen=True)
class RequestOutput:
    """What happened to one request since its previous output (deltas, not totals)."""

    request_id: str
    text: str  # new text, safe to show (stop strings held back until resolved)
    token_ids: tuple[int, ...]  # new output tokens
    logprobs: tuple[TokenLogprob, ...]  # one per new token (+ the stop token's at the end), when asked for
    prompt_logprobs: tuple[TokenLogprob, ...] | None  # in the first output, when asked for
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int  # so far
    error: str | None = None


Sink = Callable[[RequestOutput], None]


class Collector:
    """A sink for synchronous callers (tests, scripts): gathers a request's outputs."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self.outputs: list[RequestOutput] = []

    def __call__(self, out: RequestOutput) -> None:
        self._q.put(out)

    def wait(self, timeout: float = 60.0) -> list[RequestOutput]:
        """Block until the request finishes; return all its outputs."""
        deadline = time.monotonic() + timeout
        while not (self.outputs and self.outputs[-1].finished):
            self.outputs.append(self._q.get(timeout=max(0.0, deadline - time.monotonic())))
        return self.outputs

    @property
    def token_ids(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

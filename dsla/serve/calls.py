"""One completion call after validation: its requests in the engine (``Submission``) and its
response, whole or as a stream of server-sent events (``CompletionCall``, ``ChatCall``), framed by
the one ``envelope`` both endpoints share.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from dsla.sampling import SamplingParams
from dsla.serve.engine import Engine, EngineOverloaded, RequestOutput
from dsla.serve.protocol import (ChatCompletionRequest, CompletionRequest, OpenAIError, TokenText, chat_logprobs,
                                 completion_logprobs, echo_logprobs, usage)

log = logging.getLogger(__name__)
DISCONNECTED = object()  # put on a request's output queue when its client goes away


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def envelope(rid: str, object_: str, model: str, choices: list, usage_: dict | None = None,
             with_usage: bool = True) -> dict[str, Any]:
    """The frame every completion response and stream chunk shares."""
    obj = {"id": rid, "object": object_, "created": int(time.time()), "model": model, "choices": choices}
    if with_usage:
        obj["usage"] = usage_
    return obj


def stream(gen: AsyncIterator[str]) -> StreamingResponse:
    """An SSE response that always ends with ``[DONE]``, after an error event if something failed."""
    async def body() -> AsyncIterator[str]:
        try:
            async for piece in gen:
                yield piece
        except OpenAIError as e:
            yield sse(e.body())
        except Exception as e:  # the headers went out already: the error can only be an event
            log.exception("a stream failed")
            yield sse(OpenAIError(500, f"internal error: {type(e).__name__}", type_="server_error").body())
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class Submission:
    """Requests queued for one HTTP call, their outputs arriving on an asyncio queue."""

    def __init__(self, engine: Engine, jobs: list[tuple[list[int], SamplingParams]], retry_after_s: int) -> None:
        loop, self.q = asyncio.get_running_loop(), asyncio.Queue()
        self.engine, self.ids, self.disconnected = engine, [], False
        try:  # all or none
            for i, (prompt_ids, opts) in enumerate(jobs):
                sink = lambda out, i=i: loop.call_soon_threadsafe(self.q.put_nowait, (i, out))  # noqa: E731
                self.ids.append(engine.submit(prompt_ids, opts, sink))
        except EngineOverloaded as e:
            self.abort_all()
            raise OpenAIError(503, str(e), type_="server_error", code="overloaded",
                              headers={"Retry-After": str(retry_after_s)}) from None
        except ValueError as e:
            self.abort_all()
            raise OpenAIError(400, str(e), code="invalid_value") from None

    def abort_all(self) -> None:
        for rid in self.ids:
            self.engine.abort(rid)

    async def _watch(self, request: Request) -> None:
        """Wait for the client to go away (the body is read: the next message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.q.put_nowait(DISCONNECTED)

    async def outputs(self, request: Request | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield (choice index, output) until every request finished; abort the rest on exit.

        With ``request`` (non-streaming calls) a client that disconnects ends the iteration at once,
        mid-generation included, and sets ``disconnected``. Streams need no watcher: the server
        closes their generator on disconnect.
        """
        left = set(range(len(self.ids)))
        watch = asyncio.create_task(self._watch(request)) if request is not None else None
        try:
            while left:
                item = await self.q.get()
                if item is DISCONNECTED:
                    self.disconnected = True
                    return
                i, out = item
                if out.finished:
                    left.discard(i)
                if out.error is not None:
                    if not self.engine.admitting:
                        raise OpenAIError(503, f"generation stopped: {out.error}", type_="server_error",
                                          code="shutting_down")
                    raise OpenAIError(500, f"generation failed: {out.error}", type_="server_error")
                yield i, out
        finally:
            if watch is not None:
                watch.cancel()
            for i in left:
                self.engine.abort(self.ids[i])


class CompletionCall:
    """One /v1/completions call after validation: its stream chunks or its whole response."""

    def __init__(self, model: str, text_of: TokenText, req: CompletionRequest, sub: Submission, jobs: list,
                 texts: list[str]) -> None:
        self.model, self.text_of, self.req, self.sub, self.jobs, self.texts = model, text_of, req, sub, jobs, texts
        self.rid = f"cmpl-{uuid.uuid4().hex}"
        self.with_lp, self.top = req.logprobs is not None, bool(req.logprobs)

    def frame(self, choices: list, usage_: dict | None = None, with_usage: bool = False) -> dict:
        return envelope(self.rid, "text_completion", self.model, choices, usage_, with_usage)

    def lp_obj(self, i: int, out: RequestOutput, offset: int) -> dict | None:
        if not self.with_lp:
            return None
        text_of = self.text_of
        if self.req.echo and out.prompt_logprobs is not None:
            pre = echo_logprobs(text_of, self.jobs[i][0], out.prompt_logprobs, self.top)
            lp = completion_logprobs(text_of, out.logprobs, offset + len(self.texts[i]), self.top)
            return {k: pre[k] + lp[k] for k in lp}
        return completion_logprobs(text_of, out.logprobs, offset, self.top)

    async def chunks(self) -> AsyncIterator[str]:
        n = len(self.jobs)
        n_prompt, n_out, offsets, started = [0] * n, [0] * n, [0] * n, [False] * n
        use = self.req.include_usage
        async for i, out in self.sub.outputs():
            text = (self.texts[i] if self.req.echo and not started[i] else "") + out.text
            reason = out.finish_reason.value if out.finished else None
            if text or reason or (self.with_lp and out.token_ids):
                yield sse(self.frame([{"index": i, "text": text, "logprobs": self.lp_obj(i, out, offsets[i]),
                                       "finish_reason": reason}], with_usage=use))
            started[i], offsets[i] = True, offsets[i] + len(text)
            n_prompt[i], n_out[i] = out.num_prompt_tokens, out.num_output_tokens
        if use:
            yield sse(self.frame([], usage(sum(n_prompt), sum(n_out)), with_usage=True))

    async def whole(self, request: Request) -> Any:
        n = len(self.jobs)
        choices = [{"index": i, "text": self.texts[i] if self.req.echo else "", "logprobs": None,
                    "finish_reason": None} for i in range(n)]
        outs: list[list[RequestOutput]] = [[] for _ in range(n)]
        n_prompt = n_out = 0
        async for i, out in self.sub.outputs(request):
            outs[i].append(out)
            choices[i]["text"] += out.text
            if out.finished:
                choices[i]["finish_reason"] = out.finish_reason.value
                n_prompt, n_out = n_prompt + out.num_prompt_tokens, n_out + out.num_output_tokens
        if self.sub.disconnected:
            return Response(status_code=499)  # nobody is listening; the status is for the access log
        if self.with_lp:
            for i, o in enumerate(outs):
                merged = RequestOutput(self.sub.ids[i], "", (), tuple(lp for x in o for lp in x.logprobs),
                                       next((x.prompt_logprobs for x in o if x.prompt_logprobs is not None), None),
                                       True, None, 0, 0)
                choices[i]["logprobs"] = self.lp_obj(i, merged, 0)
        return self.frame(choices, usage(n_prompt, n_out), with_usage=True)


class ChatCall:
    """One /v1/chat/completions call after validation."""

    def __init__(self, model: str, text_of: TokenText, req: ChatCompletionRequest, sub: Submission) -> None:
        self.model, self.text_of, self.req, self.sub = model, text_of, req, sub
        self.rid = f"chatcmpl-{uuid.uuid4().hex}"

    def frame(self, delta: dict | None, reason: str | None, lp: dict | None = None,
              usage_: dict | None = None) -> dict:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}]
        return envelope(self.rid, "chat.completion.chunk", self.model, choices, usage_,
                        self.req.include_usage)

    async def chunks(self) -> AsyncIterator[str]:
        yield sse(self.frame({"role": "assistant", "content": ""}, None))
        n_prompt = n_out = 0
        async for _, out in self.sub.outputs():
            reason = out.finish_reason.value if out.finished else None
            lp = chat_logprobs(self.text_of, out.logprobs) if self.req.logprobs else None
            if out.text or reason or lp:
                yield sse(self.frame({"content": out.text} if out.text else {}, reason, lp))
            n_prompt, n_out = out.num_prompt_tokens, out.num_output_tokens
        if self.req.include_usage:
            yield sse(self.frame(None, None, usage_=usage(n_prompt, n_out)))

    async def whole(self, request: Request) -> Any:
        text, lps, last = "", [], None
        async for _, out in self.sub.outputs(request):
            text, lps, last = text + out.text, lps + list(out.logprobs), out
        if self.sub.disconnected or last is None or not last.finished:
            return Response(status_code=499)  # the client went away, maybe after partial output
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": chat_logprobs(self.text_of, lps) if self.req.logprobs else None,
                  "finish_reason": last.finish_reason.value}
        return envelope(self.rid, "chat.completion", self.model, [choice],
                        usage(last.num_prompt_tokens, last.num_output_tokens))

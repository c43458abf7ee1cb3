"""OpenAI-compatible HTTP API over an ``Engine`` (FastAPI; imported only by `dsla serve`).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics, and GET/POST /v1/dsla/plan (the layer plan: which layers run DSLA, the order, the
policy, recent changes; POST forces a ratio or a layer list). /v1/* needs
``Authorization: Bearer <key>`` when an API key is set; /health and
/metrics stay open for probes and scrapers. A request whose client disconnects is aborted (its
cache is freed at the engine's next step).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsla.serve.dashboard import add_dashboard
from dsla.serve.engine import Engine, EngineOverloaded, RequestOutput
from dsla.serve.protocol import (ChatCompletionRequest, CompletionRequest, OpenAIError, TokenText, chat_logprobs,
                                 completion_logprobs, echo_logprobs, parse, usage)
from dsla.serve.request import SamplingOptions

DISCONNECT_POLL_S = 1.0  # how often a waiting non-streaming request checks that its client is still there
PLAN_CHANGE_TIMEOUT_S = 120.0  # a forced plan change waits this long for the engine's next step boundary


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413 before parsing them."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        chunks, size, more = [], 0, True
        while more and not too_big:
            msg = await receive()
            if msg["type"] != "http.request":
                chunks.append(msg)
                break
            chunks.append(msg)
            size += len(msg.get("body", b""))
            more = msg.get("more_body", False)
            too_big = size > self.max_bytes
        if too_big:
            err = OpenAIError(413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large")
            body = json.dumps(err.body()).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return

        async def replay():
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, retry_after_s: int = 1) -> FastAPI:
    """The FastAPI app serving ``engine`` under the model id ``model_name``."""
    app = FastAPI(title="dsla", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    add_dashboard(app, engine, model_name, api_key)  # GET /dashboard, /v1/dsla/dashboard; --no-plan-control
    tok = engine.tokenizer
    text_of = TokenText(tok)
    created = int(time.time())

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        err = OpenAIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code)

    def check_auth(request: Request) -> None:
        if api_key is not None:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                raise OpenAIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OpenAIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    async def prepare(request: Request, model: type) -> Any:
        check_auth(request)
        req = parse(model, await read_json(request))
        if req.model != model_name:
            raise OpenAIError(400, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                              param="model", code="model_not_found")
        if not engine.is_alive:
            raise OpenAIError(503, "the engine is not running", type_="server_error", headers={"Retry-After": "5"})
        return req

    def check_prompt(ids: list[int], max_tokens: int | None, default: int | None) -> int:
        """Validate the prompt length; return max_tokens clipped to the context that is left."""
        ctx = engine.max_model_len
        if not ids:
            raise OpenAIError(400, "the prompt is empty: give at least one token", param="prompt")
        if len(ids) >= ctx:
            raise OpenAIError(400, f"the prompt has {len(ids)} tokens but the model's context is {ctx}: "
                                   "shorten it", param="prompt", code="context_length_exceeded")
        want = max_tokens if max_tokens is not None else (default if default is not None else ctx)
        return min(want, ctx - len(ids))

    def submit(jobs: list[tuple[list[int], SamplingOptions]]) -> tuple[list[str], asyncio.Queue]:
        """Queue every job with the engine (all or none); outputs arrive as (index, output)."""
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        ids: list[str] = []
        try:
            for i, (prompt_ids, opts) in enumerate(jobs):
                sink = lambda out, i=i: loop.call_soon_threadsafe(q.put_nowait, (i, out))  # noqa: E731
                ids.append(engine.submit(prompt_ids, opts, sink))
        except EngineOverloaded as e:
            for rid in ids:
                engine.abort(rid)
            raise OpenAIError(503, str(e), type_="server_error", code="overloaded",
                              headers={"Retry-After": str(retry_after_s)}) from None
        except ValueError as e:
            for rid in ids:
                engine.abort(rid)
            raise OpenAIError(400, str(e)) from None
        return ids, q

    async def outputs(request: Request, ids: list[str], q: asyncio.Queue,
                      poll_disconnect: bool) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield (choice index, output) until every request finished; abort the rest on exit."""
        left = set(range(len(ids)))
        try:
            while left:
                try:
                    i, out = await asyncio.wait_for(q.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if poll_disconnect and await request.is_disconnected():
                        return
                    continue
                if out.finished:
                    left.discard(i)
                if out.error is not None:
                    raise OpenAIError(500, f"generation failed: {out.error}", type_="server_error")
                yield i, out
        finally:
            for i in left:
                engine.abort(ids[i])

    def stream(gen: AsyncIterator[str]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for piece in gen:
                    yield piece
            except OpenAIError as e:
                yield sse(e.body())
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- /v1/completions --------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await prepare(request, CompletionRequest)
        if req.max_tokens == 0 and not req.echo:
            raise OpenAIError(400, "max_tokens=0 is only allowed with echo=true (scoring the prompt)",
                              param="max_tokens")
        jobs, texts = [], []
        for p in req.prompts():
            ids = tok.encode(p) if isinstance(p, str) else list(p)
            max_tokens = check_prompt(ids, req.max_tokens, 16)
            opts = req.options(max_tokens, req.logprobs, prompt_logprobs=req.echo and (
                req.logprobs is not None or max_tokens == 0))
            jobs.append((ids, opts))
            texts.append(p if isinstance(p, str) else tok.decode(ids))
        rid = f"cmpl-{uuid.uuid4().hex}"
        ids, q = submit(jobs)
        with_lp, top = req.logprobs is not None, bool(req.logprobs)

        def lp_obj(i: int, out: RequestOutput, offset: int) -> dict | None:
            if not with_lp:
                return None
            if req.echo and out.prompt_logprobs is not None:
                pre = echo_logprobs(text_of, jobs[i][0], out.prompt_logprobs, top)
                lp = completion_logprobs(text_of, out.logprobs, offset + len(texts[i]), top)
                return {k: pre[k] + lp[k] for k in lp}
            return completion_logprobs(text_of, out.logprobs, offset, top)

        def chunk(choices: list, use: dict | None = None) -> dict:
            obj = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                   "choices": choices}
            if req.include_usage:
                obj["usage"] = use
            return obj

        if req.stream:
            async def gen() -> AsyncIterator[str]:
                n_prompt, n_out = [0] * len(jobs), [0] * len(jobs)
                offsets, started = [0] * len(jobs), [False] * len(jobs)
                async for i, out in outputs(request, ids, q, poll_disconnect=False):
                    text = (texts[i] if req.echo and not started[i] else "") + out.text
                    reason = out.finish_reason.value if out.finished else None
                    if text or reason or (with_lp and out.token_ids):
                        yield sse(chunk([{"index": i, "text": text, "logprobs": lp_obj(i, out, offsets[i]),
                                          "finish_reason": reason}]))
                    started[i], offsets[i] = True, offsets[i] + len(text)
                    n_prompt[i], n_out[i] = out.num_prompt_tokens, out.num_output_tokens
                if req.include_usage:
                    yield sse(chunk([], usage(sum(n_prompt), sum(n_out))))
            return stream(gen())

        choices: list[dict] = [{"index": i, "text": texts[i] if req.echo else "", "logprobs": None,
                                "finish_reason": None} for i in range(len(jobs))]
        lps: list[list] = [[] for _ in jobs]
        n_prompt, n_out = 0, 0
        async for i, out in outputs(request, ids, q, poll_disconnect=True):
            lps[i].append(out)
            choices[i]["text"] += out.text
            if out.finished:
                choices[i]["finish_reason"] = out.finish_reason.value
                n_prompt, n_out = n_prompt + out.num_prompt_tokens, n_out + out.num_output_tokens
        if with_lp:
            for i, outs in enumerate(lps):
                merged = RequestOutput(ids[i], "", (), tuple(lp for o in outs for lp in o.logprobs),
                                       next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None),
                                       True, None, 0, 0)
                choices[i]["logprobs"] = lp_obj(i, merged, 0)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": usage(n_prompt, n_out)}

    # ---- /v1/chat/completions ---------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await prepare(request, ChatCompletionRequest)
        try:
            prompt = tok.apply_chat_template(req.chat_messages())
        except Exception as e:  # no template, or the template refused the messages
            raise OpenAIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        prompt_ids = tok.encode(prompt)
        max_tokens = check_prompt(prompt_ids, req.max_completion_tokens or req.max_tokens, None)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        ids, q = submit([(prompt_ids, req.options(max_tokens, logprobs))])
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(delta: dict | None, reason: str | None, lp: dict | None = None, use: dict | None = None) -> dict:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}]
            obj = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                   "choices": choices}
            if req.include_usage:
                obj["usage"] = use
            return obj

        if req.stream:
            async def gen() -> AsyncIterator[str]:
                yield sse(chunk({"role": "assistant", "content": ""}, None))
                n_prompt = n_out = 0
                async for _, out in outputs(request, ids, q, poll_disconnect=False):
                    reason = out.finish_reason.value if out.finished else None
                    lp = chat_logprobs(text_of, out.logprobs) if req.logprobs else None
                    if out.text or reason or lp:
                        yield sse(chunk({"content": out.text} if out.text else {}, reason, lp))
                    n_prompt, n_out = out.num_prompt_tokens, out.num_output_tokens
                if req.include_usage:
                    yield sse(chunk(None, None, use=usage(n_prompt, n_out)))
            return stream(gen())

        text, lps, last = "", [], None
        async for _, out in outputs(request, ids, q, poll_disconnect=True):
            text += out.text
            lps += out.logprobs
            last = out
        if last is None:  # the client went away
            return JSONResponse({}, status_code=499)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": chat_logprobs(text_of, lps) if req.logprobs else None,
                             "finish_reason": last.finish_reason.value}],
                "usage": usage(last.num_prompt_tokens, last.num_output_tokens)}

    # ---- the rest ---------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dsla", "max_model_len": engine.max_model_len}]}

    @app.get("/v1/dsla/plan")
    async def get_plan(request: Request):
        check_auth(request)
        return engine.plan_view()

    @app.post("/v1/dsla/plan")
    async def force_plan(request: Request):
        """Body: {"ratio": R} (the first round(R * layers) of the order) or {"layers": [...]};
        optional "reason". Conversions fold in-flight KV; reverts apply to new requests."""
        check_auth(request)
        layers, what = plan_request(engine, await read_json(request))
        if not engine.is_alive:
            raise OpenAIError(503, "the engine is not running", type_="server_error", headers={"Retry-After": "5"})
        reason = f"forced via API: {what}"
        fut = engine.run_between_steps(lambda e: e.set_plan(layers, reason, source="api"))
        try:
            change = await asyncio.wait_for(asyncio.wrap_future(fut), PLAN_CHANGE_TIMEOUT_S)
        except ValueError as e:  # a layer without a DSLA module: nothing changed
            raise OpenAIError(400, str(e), param="layers", code="invalid_value") from None
        except asyncio.TimeoutError:
            raise OpenAIError(503, f"the engine did not reach a step boundary within {PLAN_CHANGE_TIMEOUT_S:.0f} s",
                              type_="server_error", headers={"Retry-After": "5"}) from None
        return {**engine.plan_view(), "change": change}

    @app.get("/health")
    async def health():
        if not engine.is_alive:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def plan_request(engine: Engine, body: Any) -> tuple[list[int], str]:
    """Validate a POST /v1/dsla/plan body; return the layers and a description (400 otherwise)."""
    if not isinstance(body, dict):
        raise OpenAIError(400, 'the body must be a JSON object: {"ratio": R} or {"layers": [...]}')
    given = [k for k in ("ratio", "layers") if body.get(k) is not None]
    if len(given) != 1:
        raise OpenAIError(400, 'give exactly one of "ratio" (0..1) or "layers" (a list of layer indices)',
                          param="ratio" if not given else None, code="invalid_value")
    extra = body.get("reason")
    if extra is not None and not isinstance(extra, str):
        raise OpenAIError(400, f"reason must be a string, got {extra!r}", param="reason", code="invalid_value")
    note = f" ({extra[:200]})" if extra else ""
    if given == ["ratio"]:
        r = body["ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise OpenAIError(400, f"ratio must be a number in [0, 1], got {r!r}", param="ratio", code="invalid_value")
        try:
            return engine.layers_for_ratio(float(r)), f"ratio {r:.4g}{note}"
        except ValueError as e:
            raise OpenAIError(400, str(e), param="ratio", code="invalid_value") from None
    layers, n = body["layers"], engine.num_layers
    if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise OpenAIError(400, f"layers must be a list of integers, got {layers!r}"[:300], param="layers",
                          code="invalid_value")
    bad = [i for i in layers if not 0 <= i < n]
    if bad or len(set(layers)) != len(layers):
        msg = (f"layer {bad[0]} is out of range for a {n}-layer model" if bad
               else f"layers {layers} names a layer twice")
        raise OpenAIError(400, msg, param="layers", code="invalid_value")
    return layers, f"layers {layers}{note}"

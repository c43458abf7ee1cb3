"""OpenAI-compatible HTTP API over an ``Engine`` (FastAPI; imported only by `dsla serve`).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics, and GET/POST /v1/dsla/plan (the layer plan: which layers run DSLA, the order, the
policy, recent changes; POST forces a ratio or a layer list). /v1/* needs
``Authorization: Bearer <key>`` when an API key is set; /health and /metrics stay open for probes
and scrapers. Every error, including an unexpected one, is an OpenAI-shaped JSON body. A request
whose client disconnects is aborted (its cache is freed at the engine's next step).

The edge validates, the engine trusts: ``Edge`` (dsla.serve.edge) checks Host, content type and
size; the pydantic models (dsla.serve.protocol) check each field's type and range; the handlers
check what needs the model (vocabulary, context length, queue size). What happens after that
(submission, streaming, the response frames) is dsla.serve.calls.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsla.serve.calls import ChatCall, CompletionCall, Submission, stream
from dsla.serve.dashboard import add_dashboard
from dsla.serve.edge import Edge, read_json
from dsla.serve.engine import Engine
from dsla.serve.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, TokenText, parse, short_repr

PLAN_CHANGE_TIMEOUT_S = 120.0  # a forced plan change waits this long for the engine's next step boundary


@dataclass(frozen=True)
class ApiConfig:
    """How the HTTP layer treats clients (the engine's limits live in ``SchedulerConfig``)."""

    model_name: str  # the model id clients must send
    api_key: str | None = None  # require 'Authorization: Bearer KEY' on /v1/*; None: open
    max_body_bytes: int = 1 << 20  # request bodies over this get 413
    retry_after_s: int = 1  # Retry-After of a 503 for a full queue
    allowed_hosts: tuple[str, ...] | None = None  # Host header names answered; None: any

    def __post_init__(self) -> None:
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes={self.max_body_bytes} must be positive (--max-body-kb)")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s={self.retry_after_s} must be >= 0")
        if self.allowed_hosts is not None and not self.allowed_hosts:
            raise ValueError("allowed_hosts is empty: no request could be answered (give names, or '*' for any)")


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON with non-ASCII escaped: a client's lone surrogate echoed back cannot break the encoding."""
    return Response(json.dumps(obj), status_code=status, headers=headers, media_type="application/json")


def error_response(err: OpenAIError) -> Response:
    return json_response(err.body(), err.status, err.headers)


class Gate:
    """Checks shared by the handlers: auth, engine liveness, the prompt against model and queue."""

    def __init__(self, engine: Engine, cfg: ApiConfig) -> None:
        self.engine, self.cfg = engine, cfg

    def auth(self, request: Request) -> None:
        key = self.cfg.api_key
        if key is not None:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
                raise OpenAIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")

    def alive(self) -> None:
        if not self.engine.is_alive:
            raise OpenAIError(503, "the engine is not running", type_="server_error", headers={"Retry-After": "5"})
        if not self.engine.admitting:
            raise OpenAIError(503, "the server is shutting down", type_="server_error", code="shutting_down",
                              headers={"Retry-After": "5"})

    async def parse(self, request: Request, model: type) -> Any:
        self.auth(request)
        req = parse(model, read_json(await request.body()))
        if req.model != self.cfg.model_name:
            raise OpenAIError(400, f"model {short_repr(req.model)} is not served here; this server serves "
                                   f"{self.cfg.model_name!r}", param="model", code="model_not_found")
        self.alive()
        return req

    def token_ids(self, ids: Sequence[int], param: str) -> list[int]:
        vocab = self.engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise OpenAIError(400, f"{param}: token id {short_repr(bad)} is outside the vocabulary [0, {vocab})",
                              param=param, code="invalid_value")
        return list(ids)

    def max_tokens(self, n_prompt: int, asked: int | None, default: int | None, param: str = "max_tokens") -> int:
        """Check the prompt length; return the output budget: ``asked`` (which must fit the context)
        or else ``default`` clipped to the context that is left."""
        ctx = self.engine.max_model_len
        if not n_prompt:
            raise OpenAIError(400, "the prompt is empty: give at least one token", param="prompt")
        if n_prompt >= ctx:
            raise OpenAIError(400, f"the prompt has {n_prompt} tokens but the model's context is {ctx}: "
                                   "shorten it", param="prompt", code="context_length_exceeded")
        if asked is not None and n_prompt + asked > ctx:
            raise OpenAIError(400, f"{param}={asked} plus the prompt's {n_prompt} tokens is more than the model's "
                                   f"context length of {ctx} tokens: ask for at most {ctx - n_prompt}",
                              param=param, code="context_length_exceeded")
        return asked if asked is not None else min(default if default is not None else ctx, ctx - n_prompt)

    def stop_ids(self, ids: Sequence[int] | None) -> None:
        if ids:
            self.token_ids(ids, "stop_token_ids")

    def batch(self, n: int) -> None:
        limit = self.engine.config.max_waiting
        if n > limit:
            raise OpenAIError(400, f"prompt: {n} prompts in one request is more than this server queues "
                                   f"({limit}): send at most {limit}", param="prompt", code="invalid_value")


# ---- handlers -----------------------------------------------------------------------------------
class Handlers:
    """One method per route; they share ``Gate`` (checks), ``Submission`` (engine I/O) and ``envelope``."""

    def __init__(self, engine: Engine, cfg: ApiConfig) -> None:
        self.engine, self.cfg, self.gate = engine, cfg, Gate(engine, cfg)
        self.tok, self.text_of, self.created = engine.tokenizer, TokenText(engine.tokenizer), int(time.time())

    def _encode(self, text: str, param: str) -> list[int]:
        try:
            return self.tok.encode(text)
        except Exception as e:  # the tokenizer refused the text
            raise OpenAIError(400, f"{param}: cannot tokenize: {e}"[:300], param=param, code="invalid_value") from None

    # ---- /v1/completions ----------------------------------------------------------------------
    async def completions(self, request: Request) -> Any:
        req: CompletionRequest = await self.gate.parse(request, CompletionRequest)
        if req.max_tokens == 0 and not req.echo:
            raise OpenAIError(400, "max_tokens=0 is only allowed with echo=true (scoring the prompt)",
                              param="max_tokens")
        prompts = req.prompts()
        self.gate.batch(len(prompts))
        self.gate.stop_ids(req.stop_token_ids)
        jobs, texts = [], []
        for p in prompts:
            ids = self._encode(p, "prompt") if isinstance(p, str) else list(p)
            max_tokens = self.gate.max_tokens(len(ids), req.max_tokens, 16)
            self.gate.token_ids(ids, "prompt")  # before decode(), which would choke on a bad id
            opts = req.options(max_tokens, req.logprobs, prompt_logprobs=req.echo and (
                req.logprobs is not None or max_tokens == 0))
            jobs.append((ids, opts))
            texts.append(p if isinstance(p, str) else self.tok.decode(ids))
        sub = Submission(self.engine, jobs, self.cfg.retry_after_s)
        call = CompletionCall(self.cfg.model_name, self.text_of, req, sub, jobs, texts)
        return stream(call.chunks()) if req.stream else await call.whole(request)

    # ---- /v1/chat/completions -----------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Any:
        req: ChatCompletionRequest = await self.gate.parse(request, ChatCompletionRequest)
        self.gate.stop_ids(req.stop_token_ids)
        try:
            prompt = self.tok.apply_chat_template(req.chat_messages())
        except Exception as e:  # no template, or the template refused the messages
            raise OpenAIError(400, f"cannot apply the chat template: {e}"[:300], param="messages") from None
        prompt_ids = self._encode(prompt, "messages")
        asked, param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens
                        else (req.max_tokens, "max_tokens"))
        max_tokens = self.gate.max_tokens(len(prompt_ids), asked, None, param)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        sub = Submission(self.engine, [(prompt_ids, req.options(max_tokens, logprobs))], self.cfg.retry_after_s)
        call = ChatCall(self.cfg.model_name, self.text_of, req, sub)
        return stream(call.chunks()) if req.stream else await call.whole(request)

    # ---- the rest -----------------------------------------------------------------------------
    async def models(self, request: Request) -> Any:
        self.gate.auth(request)
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": self.created,
                                            "owned_by": "dsla", "max_model_len": self.engine.max_model_len}]}

    async def get_plan(self, request: Request) -> Any:
        self.gate.auth(request)
        return self.engine.plan_view()

    async def force_plan(self, request: Request) -> Any:
        """Body: {"ratio": R} (the first round(R * layers) of the order) or {"layers": [...]};
        optional "reason". Conversions fold in-flight KV; reverts apply to new requests."""
        self.gate.auth(request)
        layers, what = plan_request(self.engine, read_json(await request.body()))
        self.gate.alive()
        reason = f"forced via API: {what}"
        fut = self.engine.run_between_steps(lambda e: e.set_plan(layers, reason, source="api"))
        try:
            change = await asyncio.wait_for(asyncio.wrap_future(fut), PLAN_CHANGE_TIMEOUT_S)
        except ValueError as e:  # a layer without a DSLA module: nothing changed
            raise OpenAIError(400, str(e), param="layers", code="invalid_value") from None
        except asyncio.TimeoutError:
            raise OpenAIError(503, f"the engine did not reach a step boundary within {PLAN_CHANGE_TIMEOUT_S:.0f} s",
                              type_="server_error", headers={"Retry-After": "5"}) from None
        return {**self.engine.plan_view(), "change": change}

    async def health(self) -> Any:
        if not self.engine.is_alive:
            return json_response({"status": "engine not running"}, 503)
        if not self.engine.admitting:
            return json_response({"status": "shutting down"}, 503)
        return {"status": "ok"}

    async def metrics(self) -> Any:
        return PlainTextResponse(self.engine.metrics.render(), media_type="text/plain; version=0.0.4")


# ---- the app ------------------------------------------------------------------------------------
def add_routes(app: FastAPI, h: Handlers) -> None:
    app.add_api_route("/v1/completions", h.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", h.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", h.models, methods=["GET"])
    app.add_api_route("/v1/dsla/plan", h.get_plan, methods=["GET"])
    app.add_api_route("/v1/dsla/plan", h.force_plan, methods=["POST"])
    app.add_api_route("/health", h.health, methods=["GET"])
    app.add_api_route("/metrics", h.metrics, methods=["GET"])


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI-shaped JSON body, the unexpected ones included."""
    async def openai_error(_: Request, e: OpenAIError) -> Response:
        return error_response(e)

    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(OpenAIError(e.status_code, str(e.detail), code=code))

    async def unexpected(_: Request, e: Exception) -> Response:  # a bug: say so, never a plain-text 500
        return error_response(OpenAIError(500, f"internal error ({type(e).__name__}); the server logged it",
                                          type_="server_error", code="internal_error"))

    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               retry_after_s: int = 1, allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` under the model id ``model_name``."""
    cfg = ApiConfig(model_name, api_key, max_body_bytes, retry_after_s,
                    None if allowed_hosts is None else tuple(allowed_hosts))
    app = FastAPI(title="dsla", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Edge, max_bytes=cfg.max_body_bytes, allowed_hosts=cfg.allowed_hosts)
    add_error_handlers(app)
    add_routes(app, Handlers(engine, cfg))
    add_dashboard(app, engine, model_name, api_key)  # GET /dashboard, /v1/dsla/dashboard; --no-plan-control
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
        raise OpenAIError(400, f"reason must be a string, got {short_repr(extra)}", param="reason",
                          code="invalid_value")
    note = f" ({extra[:200]})" if extra else ""
    if given == ["ratio"]:
        r = body["ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise OpenAIError(400, f"ratio must be a number in [0, 1], got {short_repr(r)}", param="ratio",
                              code="invalid_value")
        if not -1 <= r <= 2:  # (also keeps a huge integer away from float())
            raise OpenAIError(400, f"ratio {short_repr(r)} must be in [0, 1]", param="ratio", code="invalid_value")
        try:
            return engine.layers_for_ratio(float(r)), f"ratio {r:.4g}{note}"
        except ValueError as e:
            raise OpenAIError(400, str(e), param="ratio", code="invalid_value") from None
    layers, n = body["layers"], engine.num_layers
    if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise OpenAIError(400, f"layers must be a list of integers, got {short_repr(layers)}", param="layers",
                          code="invalid_value")
    bad = [i for i in layers if not 0 <= i < n]
    if bad or len(set(layers)) != len(layers):
        msg = (f"layer {short_repr(bad[0])} is out of range for a {n}-layer model" if bad
               else f"layers {short_repr(layers)} names a layer twice")
        raise OpenAIError(400, msg, param="layers", code="invalid_value")
    return layers, f"layers {layers}{note}"

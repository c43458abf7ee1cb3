"""OpenAI wire format: request models with validation, error bodies, response pieces.

Validation happens here so the API handlers only see well-formed requests; every failure becomes
an ``OpenAIError`` whose body is ``{"error": {"message", "type", "param", "code"}}``. Unknown
fields are ignored (clients send many); known options that this server does not implement are
refused with a 400 that says so, rather than silently ignored.
"""

from __future__ import annotations

import reprlib
from typing import Annotated, Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, ValidationError

from dsla.model.tokenizer import Tokenizer
from dsla.sampling import MIN_TEMPERATURE, SEED_MAX, SEED_MIN, SamplingParams
from dsla.serve.request import TokenLogprob

MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string
MAX_STOP_TOKEN_IDS = 64  # stop token ids per request
MAX_LOGPROBS = 20  # top alternatives per token

# JSON types without pydantic's lax coercions: `true` is not an integer, `1` or "yes" not a boolean.
Int = StrictInt
Bool = StrictBool
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # an integer is still a number
_short = reprlib.Repr()  # (keyword arguments need Python 3.12)
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlist, _short.maxdict = 3, 60, 60, 8, 8
_short.maxlong = 40


def short_repr(value: Any) -> str:
    """A bounded repr for error messages (never deep: a client's nesting must not recurse here)."""
    return _short.repr(value)


class OpenAIError(Exception):
    """An error to send to the client as an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError | Sequence[dict]) -> OpenAIError:
    """The first pydantic error as a 400 naming the field."""
    errs = e.errors() if isinstance(e, ValidationError) else list(e)
    err = errs[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    if err.get("type") == "json_invalid":
        return OpenAIError(400, f"the request body is not valid JSON: {err.get('msg')}", code="invalid_json")
    # For a union pydantic reports one error per alternative: name the field and say so.
    param = loc[0] if loc else None
    alternatives = sum(1 for x in errs if [str(p) for p in x.get("loc", ())][:1] == loc[:1])
    if alternatives > 1:
        msg = f"{param}: none of the accepted types matches (got {short_repr(err.get('input'))})"
    else:
        msg = f"{'.'.join(loc) or 'body'}: {err.get('msg')} (got {short_repr(err.get('input'))})"
    return OpenAIError(400, msg[:500], param=param,
                       code="invalid_value" if err.get("type") != "missing" else "missing_field")


class StreamOptions(BaseModel):
    include_usage: Bool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: Int | None = Field(None, ge=0)
    temperature: Float = Field(1.0, ge=0.0, le=2.0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=-1)  # -1 or 0: disabled (vLLM spells it -1)
    seed: Int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # the range a torch generator takes
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[Int] | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: Bool = False  # extension (vLLM's): benchmarks need fixed output lengths
    n: Int = Field(1, ge=1)
    presence_penalty: Float = 0.0
    frequency_penalty: Float = 0.0
    logit_bias: dict[str, Float] | None = None
    user: StrictStr | None = None

    def check_supported(self) -> None:
        unsupported = {
            "n": self.n != 1,
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
        }
        for name, bad in unsupported.items():
            if bad:
                raise OpenAIError(400, f"{name}={getattr(self, name)!r} is not supported by this server "
                                       f"(leave it at its default)", param=name, code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise OpenAIError(400, f"temperature={self.temperature!r} is too small to sample with: use 0 for "
                                   f"greedy decoding or a value of at least {MIN_TEMPERATURE}",
                              param="temperature", code="invalid_value")
        self.stop_list()
        if len(self.stop_token_ids or ()) > MAX_STOP_TOKEN_IDS:
            raise OpenAIError(400, f"stop_token_ids has {len(self.stop_token_ids)} entries; at most "
                                   f"{MAX_STOP_TOKEN_IDS} are allowed", param="stop_token_ids", code="invalid_value")

    def stop_list(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise OpenAIError(400, f"stop must be at most {MAX_STOP} strings of 1 to {MAX_STOP_CHARS} characters "
                                   f"(got {len(stop)}, longest {max(map(len, stop), default=0)})",
                              param="stop", code="invalid_value")
        return tuple(stop)

    def options(self, max_tokens: int, logprobs: int | None, prompt_logprobs: bool = False) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                top_k=max(self.top_k, 0), seed=self.seed, stop=self.stop_list(),
                stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        except ValueError as e:  # the edge checked every field already: this is a last line
            raise OpenAIError(400, str(e), code="invalid_value") from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: StrictStr | list[Int] | list[StrictStr] | list[list[Int]]
    echo: Bool = False
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Int | None = None
    suffix: StrictStr | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, 1):
            raise OpenAIError(400, f"best_of={self.best_of} is not supported by this server", param="best_of",
                              code="unsupported_parameter")
        if self.suffix:
            raise OpenAIError(400, "suffix is not supported by this server", param="suffix",
                              code="unsupported_parameter")
        if isinstance(self.prompt, list) and not self.prompt:
            raise OpenAIError(400, "prompt must not be an empty list", param="prompt")

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class ContentPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise OpenAIError(400, "tools are not supported by this server", param="tools",
                              code="unsupported_parameter")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise OpenAIError(400, "response_format other than text is not supported by this server",
                              param="response_format", code="unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if self.max_tokens == 0:
            raise OpenAIError(400, "max_tokens must be at least 1 for chat completions", param="max_tokens")

    def chat_messages(self) -> list[dict[str, str]]:
        role = {"developer": "system"}
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]


def parse(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    req.check_supported()
    return req


# ---- response pieces ------------------------------------------------------------------------
class TokenText:
    """Token id -> its text (cached: logprob responses repeat the same tokens a lot)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.cache[token_id] = self.tok.decode([token_id], skip_special_tokens=False)
        return s


def completion_logprobs(text_of: TokenText, lps: Sequence[TokenLogprob | None], offset: int,
                        with_top: bool) -> dict[str, list]:
    """The legacy completions ``logprobs`` object; ``None`` entries (the first prompt token) stay null."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        if lp is None:
            continue
        s = text_of(lp.token_id)
        out["tokens"].append(s)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({text_of(t): v for t, v in lp.top} if with_top else None)
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def echo_logprobs(text_of: TokenText, prompt_ids: Sequence[int], prompt_lps: Sequence[TokenLogprob],
                  with_top: bool) -> dict[str, list]:
    """Logprobs of an echoed prompt: the first token has none (no context)."""
    first = text_of(prompt_ids[0])
    rest = completion_logprobs(text_of, prompt_lps, len(first), with_top)
    return {"tokens": [first] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
            "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}


def chat_logprobs(text_of: TokenText, lps: Sequence[TokenLogprob]) -> dict[str, list]:
    def entry(t: int, v: float) -> dict[str, Any]:
        s = text_of(t)
        return {"token": s, "logprob": v, "bytes": list(s.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

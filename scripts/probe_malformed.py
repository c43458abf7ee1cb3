"""Send malformed requests to a running `dsla serve` and count the answers by class.

Every request here is one a client should get a JSON 4xx for, in OpenAI's error shape
({"error": {"message", "type", "param", "code"}}). After each request /health must still say ok.
Prints one line per request and a summary table (markdown), and exits 1 unless every answer was
a well-shaped 4xx and /health stayed ok.

    python scripts/probe_malformed.py --url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
from collections import Counter
from urllib.parse import urlparse

import httpx


def cases(model: str) -> list[tuple[str, str, str, bytes, dict]]:
    """(name, method, path, body, extra headers)."""
    J = {"content-type": "application/json"}

    def c(name, body, path="/v1/completions", headers=None, method="POST"):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return (name, method, path, raw, {**J, **(headers or {})})

    def cmp(**kw):
        return {"model": model, "prompt": "Hi", "max_tokens": 2, **kw}

    def chat(**kw):
        return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **kw}

    out = [
        # JSON itself
        c("malformed json", b"{not json"), c("truncated json", b'{"model": "x"'), c("empty body", b""),
        c("not an object", b"[1, 2]"), c("a bare string", b'"hi"'), c("invalid utf-8", b"\xff\xfe\xfd"),
        c("NaN constant", b'{"model": "m", "prompt": "x", "temperature": NaN}'),
        c("Infinity constant", b'{"model": "m", "prompt": "x", "top_p": Infinity}'),
        c("4300+ digit integer", b'{"model": "m", "prompt": "x", "seed": ' + b"9" * 5000 + b"}"),
        c("deep nesting (completions)", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
        c("deep nesting (chat)", b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", "/v1/chat/completions"),
        c("deep nesting (plan)", b'{"layers": ' + b"[" * 100000 + b"]" * 100000 + b"}", "/v1/dsla/plan"),
        c("lone surrogate in prompt", b'{"model": "%s", "prompt": "\\ud800"}' % model.encode()),
        c("lone surrogate in chat", b'{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}]}'
          % model.encode(), "/v1/chat/completions"),
        c("lone surrogate as a key", b'{"\\ud800": 1, "model": "%s", "prompt": "x"}' % model.encode()),
        # fields: presence and type
        c("missing model", {"prompt": "x"}), c("missing prompt", {"model": model}),
        c("unknown model", cmp(model="gpt-9")), c("model not a string", cmp(model=5)),
        c("prompt a number", cmp(prompt=5)), c("prompt a dict", cmp(prompt={"a": 1})),
        c("prompt empty string", cmp(prompt="")), c("prompt empty list", cmp(prompt=[])),
        c("prompt list of mixed", cmp(prompt=["a", 1])),
        c("max_tokens a string", cmp(max_tokens="many")), c("max_tokens true", cmp(max_tokens=True)),
        c("max_tokens negative", cmp(max_tokens=-1)), c("max_tokens a float", cmp(max_tokens=2.5)),
        c("max_tokens 0 without echo", cmp(max_tokens=0)),
        c("max_tokens beyond the context", cmp(max_tokens=10**6)),
        c("stream 1", cmp(stream=1)), c("stream 'yes'", cmp(stream="yes")), c("echo 'true'", cmp(echo="true")),
        c("stream_options without stream", cmp(stream_options={"include_usage": True})),
        c("temperature a string", cmp(temperature="hot")), c("temperature true", cmp(temperature=True)),
        c("temperature 7", cmp(temperature=7)), c("temperature negative", cmp(temperature=-1)),
        c("temperature 1e-300", cmp(temperature=1e-300)),
        c("top_p 0", cmp(top_p=0)), c("top_p 2", cmp(top_p=2)), c("top_k -5", cmp(top_k=-5)),
        c("seed 2**64", cmp(temperature=1, seed=2**64)), c("seed -2**63-1", cmp(temperature=1, seed=-(2**63) - 1)),
        c("seed a string", cmp(seed="abc")),
        c("logprobs 50", cmp(logprobs=50)), c("logprobs false", cmp(logprobs=False)),
        c("n 2", cmp(n=2)), c("best_of 3", cmp(best_of=3)), c("presence_penalty", cmp(presence_penalty=0.5)),
        c("logit_bias", cmp(logit_bias={"5": 1})), c("suffix", cmp(suffix="end")),
        # token ids
        c("token id negative", cmp(prompt=[5, -1])), c("token id >= 2**63", cmp(prompt=[5, 2**63])),
        c("token id beyond vocab", cmp(prompt=[5, 10**7])), c("token id a bool", cmp(prompt=[True, 5])),
        c("prompt too long", cmp(prompt=[5] * 20000)),
        c("prompt list too large", cmp(prompt=["x"] * 5000)),
        # stops
        c("stop too long", cmp(stop=["x" * 10000])), c("too many stops", cmp(stop=["a"] * 17)),
        c("empty stop", cmp(stop=[""])), c("stop a number", cmp(stop=5)),
        c("stop_token_ids too many", cmp(stop_token_ids=list(range(100)))),
        c("stop_token_ids out of vocab", cmp(stop_token_ids=[10**9])),
        # chat
        c("chat no messages", chat(messages=[]), "/v1/chat/completions"),
        c("chat bad role", chat(messages=[{"role": "wizard", "content": "x"}]), "/v1/chat/completions"),
        c("chat content a number", chat(messages=[{"role": "user", "content": 5}]), "/v1/chat/completions"),
        c("chat tools", chat(tools=[{"type": "function"}]), "/v1/chat/completions"),
        c("chat json response_format", chat(response_format={"type": "json_object"}), "/v1/chat/completions"),
        c("chat max_tokens 0", chat(max_tokens=0), "/v1/chat/completions"),
        c("chat top_logprobs without logprobs", chat(top_logprobs=2), "/v1/chat/completions"),
        c("chat max_completion_tokens beyond context", chat(max_completion_tokens=10**6), "/v1/chat/completions"),
        # plan
        c("plan empty", {}, "/v1/dsla/plan"), c("plan both", {"ratio": 0.5, "layers": [1]}, "/v1/dsla/plan"),
        c("plan ratio a string", {"ratio": "half"}, "/v1/dsla/plan"),
        c("plan ratio 1.5", {"ratio": 1.5}, "/v1/dsla/plan"), c("plan ratio true", {"ratio": True}, "/v1/dsla/plan"),
        c("plan ratio 1e400-ish int", {"ratio": 10**400}, "/v1/dsla/plan"),
        c("plan layers a string", {"layers": "1,2"}, "/v1/dsla/plan"),
        c("plan layer twice", {"layers": [1, 1]}, "/v1/dsla/plan"),
        c("plan layer out of range", {"layers": [999]}, "/v1/dsla/plan"),
        c("plan reason a number", {"layers": [0], "reason": 3}, "/v1/dsla/plan"),
        # the edge: content type, host, method, route, size
        c("text/plain body", cmp(), headers={"content-type": "text/plain"}),
        c("form body", cmp(), headers={"content-type": "application/x-www-form-urlencoded"}),
        c("text/plain plan", {"ratio": 0}, "/v1/dsla/plan", headers={"content-type": "text/plain"}),
        c("foreign Host", cmp(), headers={"host": "evil.example"}),
        c("rebinding Host on GET", b"", "/v1/dsla/plan", headers={"host": "attacker.test:8000"}, method="GET"),
        c("unknown route", cmp(), "/v1/nothing"),
        c("wrong method", b"", "/v1/completions", method="GET"),
        c("body over the limit", cmp(prompt="x" * (2 << 20))),
    ]
    return out


def send(url: str, method: str, path: str, body: bytes, headers: dict, api_key: str | None,
         timeout: float) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP/1.1 request (so Host and odd bodies go out exactly as given)."""
    u = urlparse(url)
    host_header = headers.pop("host", f"{u.hostname}:{u.port}")
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    head = [f"{method} {path} HTTP/1.1", f"Host: {host_header}", "Connection: close",
            f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        # A server may refuse a large body from its Content-Length alone and close: read that
        # answer before writing the body (as curl's Expect: 100-continue does), or the close resets us.
        if len(body) < 1 << 16 or not select.select([s], [], [], 2.0)[0]:
            s.sendall(body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_raw, _, rest = data.partition(b"\r\n\r\n")
    lines = head_raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    if hdrs.get("transfer-encoding") == "chunked":
        out, buf = b"", rest
        while buf:
            size_s, _, buf = buf.partition(b"\r\n")
            size = int(size_s, 16)
            if not size:
                break
            out, buf = out + buf[:size], buf[size + 2:]
        rest = out
    return status, hdrs, rest


def classify(status: int, headers: dict[str, str], body: bytes) -> str:
    if status >= 500:
        return "5xx"
    if status < 400:
        return f"{status // 100}xx (accepted)"
    if not headers.get("content-type", "").startswith("application/json"):
        return "4xx not JSON"
    try:
        err = json.loads(body)["error"]
        ok = set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    except (ValueError, KeyError, TypeError):
        ok = False
    return "4xx JSON, OpenAI shape" if ok else "4xx JSON, other shape"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True, help="the served model id")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    counts: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    health_bad = 0
    for name, method, path, body, headers in cases(args.model):
        try:
            status, hdrs, resp = send(args.url, method, path, body, dict(headers), args.api_key, args.timeout)
            kind = classify(status, hdrs, resp)
        except OSError as e:
            status, kind, resp = 0, "no answer", str(e).encode()
        counts[kind] += 1
        statuses[status] += 1
        health = httpx.get(args.url + "/health", timeout=args.timeout)
        healthy = health.status_code == 200 and health.json() == {"status": "ok"}
        health_bad += not healthy
        print(f"{status:3d}  {kind:24s} health {'ok' if healthy else 'BAD'}  {name}: {resp[:110]!r}")
    total = sum(counts.values())
    print("\n| answer | count |\n| --- | --- |")
    for kind, n in sorted(counts.items()):
        print(f"| {kind} | {n} |")
    print(f"| **total** | **{total}** |")
    print(f"\nstatus codes: {dict(sorted(statuses.items()))}; /health not ok after {health_bad} of {total}")
    good = counts["4xx JSON, OpenAI shape"] == total and not health_bad
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())

"""What every HTTP request passes before a handler sees it (pure ASGI, no FastAPI).

``Edge`` refuses, each with an OpenAI-shaped JSON error: a ``Host`` header that does not name
this server (DNS rebinding: a web page whose name resolves to 127.0.0.1 would otherwise reach a
loopback server), a POST whose body is not declared ``application/json`` (a page may POST
``text/plain`` cross-origin without a CORS preflight; JSON needs one), and a body over the size
limit (before it is parsed). ``read_json`` turns a body into JSON values or a 400.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from dsla.serve.protocol import OpenAIError, short_repr

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def default_allowed_hosts(bind: str) -> tuple[str, ...] | None:
    """The ``Host`` names a server bound to ``bind`` answers to; None (any) for a wildcard bind."""
    if bind in ("0.0.0.0", "::", ""):
        return None
    if bind in LOOPBACK_HOSTS:
        return LOOPBACK_HOSTS
    return (bind,)


def host_name(host_header: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


async def send_error(send, err: OpenAIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Edge:
    """ASGI middleware: Host check, JSON content type on POST, body size limit (413)."""

    def __init__(self, app, max_bytes: int, allowed_hosts: Sequence[str] | None = None) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    def refusal(self, scope) -> OpenAIError | None:
        headers = dict(scope.get("headers") or [])
        if self.allowed is not None and "*" not in self.allowed:
            host = headers.get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.allowed:
                return OpenAIError(400, f"Host {short_repr(host)} is not served here: use one of "
                                        f"{sorted(self.allowed)} (or start the server with --allowed-hosts)",
                                   code="invalid_host")
        if scope["method"] == "POST":
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if ctype != "application/json":
                return OpenAIError(415, f"the body must be sent as Content-Type: application/json, "
                                        f"got {short_repr(ctype or None)}", code="unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        err = self.refusal(scope)
        if err is not None:
            return await send_error(send, err)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        chunks, size, more = [], 0, True
        while more and not too_big:
            msg = await receive()
            chunks.append(msg)
            if msg["type"] != "http.request":
                break
            size += len(msg.get("body", b""))
            more = msg.get("more_body", False)
            too_big = size > self.max_bytes
        if too_big:
            return await send_error(send, OpenAIError(413, f"the request body is larger than {self.max_bytes} "
                                                           "bytes", code="request_too_large"))

        async def replay():
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json(body: bytes) -> Any:
    """Parse a request body; OpenAIError 400 for anything that is not plain, UTF-8-clean JSON."""
    try:
        value = json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise OpenAIError(400, "the request body nests too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity, an integer of 4300+ digits
        raise OpenAIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    where = _unencodable(value)
    if where is not None:
        raise OpenAIError(400, f"{where or 'body'}: a string holds a lone UTF-16 surrogate (e.g. \\ud800), which "
                               "is not text: send valid Unicode", param=where or None, code="invalid_value")
    return value


def _unencodable(value: Any) -> str | None:
    """The top-level key (or "" at the top) of the first string that is not valid Unicode; None if all are.

    Iterative, so any depth json.loads accepted is fine here.
    """
    stack = [(value, "")]
    while stack:
        v, top = stack.pop()
        if isinstance(v, str):
            if not _is_text(v):
                return top
        elif isinstance(v, list):
            stack += [(x, top) for x in v]
        elif isinstance(v, dict):
            stack += [(k, top) for k in v]  # a bad key at the top level has no name to give
            stack += [(x, top or (k if _is_text(k) else "")) for k, x in v.items()]
    return None


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

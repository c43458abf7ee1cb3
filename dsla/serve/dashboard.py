"""The live page of `dsla serve`: plan, load, timeline, quality and memory, and a plan control.

``add_dashboard(app, engine, model_name, api_key)`` adds:

- ``GET /`` (a redirect) and ``GET /dashboard``: the page, and ``GET /dashboard/{asset}`` its
  script and style, packaged under ``dsla/serve/static/`` (no CDN, no build step). They carry no
  data, so they are open; the page forbids framing and any origin but its own (CSP).
- ``GET /v1/dsla/dashboard?since=T``: what the page polls about once a second: the plan view
  (``Engine.plan_view``) with the plan changes, and the timeline samples, newer than ``T``
  (wall-clock seconds; everything kept, ten minutes of samples, without it). Like every /v1 route
  it needs the API key when one is set.
- The plan control guard: with ``set_plan_control(app, False)`` (``dsla serve --no-plan-control``)
  ``POST /v1/dsla/plan`` answers a JSON 403 and the page shows the plan read-only.

The page forces plans through the ordinary ``POST /v1/dsla/plan`` (a JSON body, so no other site
can send it without a CORS preflight this server never grants).
"""

from __future__ import annotations

import hmac
import json
import math
import time
from importlib import resources
from typing import Any

from fastapi import Request
from fastapi.responses import RedirectResponse, Response

from dsla.serve.protocol import OpenAIError

ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def read_asset(name: str) -> bytes:
    """A packaged file of the page (``dsla/serve/static/NAME``)."""
    return resources.files("dsla.serve").joinpath("static", name).read_bytes()


def set_plan_control(app, enabled: bool) -> None:
    """Allow (default) or refuse, with a JSON 403, forced plan changes (POST /v1/dsla/plan)."""
    app.state.plan_control = enabled


class PlanControlGuard:
    """ASGI middleware: POST /v1/dsla/plan gets a 403 while ``state.plan_control`` is false."""

    def __init__(self, app, state) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/dsla/plan"
                and not getattr(self.state, "plan_control", True)):
            err = OpenAIError(403, "plan control is off on this server (dsla serve --no-plan-control): the plan "
                                   "is read-only", type_="permission_error", code="plan_control_disabled")
            body = json.dumps(err.body()).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def check_key(request, api_key: str | None) -> None:
    """The same rule as /v1/*: ``Authorization: Bearer <key>`` when a key is set (401 otherwise)."""
    if api_key is not None:
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise OpenAIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def parse_since(raw: str | None) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        t = float(raw)
    except ValueError:
        t = math.nan
    if not math.isfinite(t):
        raise OpenAIError(400, f"since must be a time in seconds since the epoch, got {raw[:40]!r}", param="since",
                          code="invalid_value")
    return t


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dashboard_data(engine, model_name: str, since: float | None, plan_control: bool) -> dict[str, Any]:
    """The body of GET /v1/dsla/dashboard: with ``since``, only the samples and plan changes after it.

    Samples are read before the plan: both are recorded on the engine thread, so every change
    older than the newest sample returned is in this answer's history, and a poll from that
    sample on misses nothing.
    """
    samples = engine.timeline.since(since)
    plan = engine.plan_view()
    if since is not None:
        plan["history"] = [e for e in plan["history"] if e["time"] > since]
    return finite({"object": "dsla.dashboard", "model": model_name, "server_time": time.time(),
                   "plan_control": plan_control, "alive": engine.is_alive, "plan": plan, "samples": samples})


def add_dashboard(app, engine, model_name: str, api_key: str | None = None) -> None:
    """Add the page, its data route and the plan control guard to ``app`` (see the module doc)."""
    page = read_asset("dashboard.html")
    assets = {name: read_asset(name) for name in ASSETS}
    app.state.plan_control = True
    app.add_middleware(PlanControlGuard, state=app.state)

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/dashboard", status_code=307)

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page():
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/dashboard/{name}", include_in_schema=False)
    async def dashboard_asset(name: str):
        if name not in assets:
            raise OpenAIError(404, f"no such file: {name[:80]!r}", code="not_found")
        return Response(assets[name], media_type=ASSETS[name], headers=PAGE_HEADERS)

    @app.get("/v1/dsla/dashboard")
    async def dashboard_json(request: Request):
        check_key(request, api_key)
        since = parse_since(request.query_params.get("since"))
        return Response(json.dumps(dashboard_data(engine, model_name, since, app.state.plan_control), allow_nan=False),
                        media_type="application/json", headers={"Cache-Control": "no-store"})

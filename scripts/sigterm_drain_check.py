"""Graceful shutdown of a running `dsla serve` (its pid given): start a long stream, send SIGTERM,
check that a new request gets 503 while the server drains, and that the stream ends with [DONE]
(after an error event once --shutdown-timeout-s has passed), then that the process exits.

    python scripts/sigterm_drain_check.py --pid PID --url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import httpx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pid", type=int, required=True, help="the server's process id (it gets SIGTERM)")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-tokens", type=int, default=4000, help="long enough to outlast the drain timeout")
    args = ap.parse_args()
    body = {"model": args.model, "prompt": "Once upon a time", "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    t0 = time.monotonic()
    with httpx.Client(timeout=600) as c, c.stream("POST", args.url + "/v1/completions", json=body) as s:
        lines = s.iter_lines()
        next(ln for ln in lines if ln)
        os.kill(args.pid, signal.SIGTERM)
        print(f"SIGTERM sent at {time.monotonic() - t0:.1f}s")
        time.sleep(1)
        r = httpx.post(args.url + "/v1/completions", json={"model": args.model, "prompt": "x", "max_tokens": 2},
                       timeout=10)
        print("new request during drain:", r.status_code, r.text[:150])
        print("health during drain:", httpx.get(args.url + "/health", timeout=10).status_code)
        rest = [ln for ln in lines if ln]
    print(f"stream ended at {time.monotonic() - t0:.1f}s: {len(rest) + 1} lines; last two: {rest[-2][:160]!r} "
          f"{rest[-1]!r}")
    for _ in range(60):
        try:
            os.kill(args.pid, 0)
        except ProcessLookupError:
            print(f"server exited at {time.monotonic() - t0:.1f}s")
            return 0 if rest[-1] == "data: [DONE]" and r.status_code == 503 else 1
        time.sleep(1)
    print("server still running")
    return 1


if __name__ == "__main__":
    sys.exit(main())

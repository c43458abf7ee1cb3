"""Issue 16's repro: while a healthy stream runs, other clients send a seed beyond 64 bits and an
underflowing temperature. Before the fix, both failed the shared engine step, and with it the
healthy stream; now they get 400s and the stream completes.

    python scripts/repro_sampling_isolation.py --url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import sys

import httpx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-tokens", type=int, default=64, help="length of the healthy stream")
    args = ap.parse_args()
    bad = {"seed": {"prompt": "Hi", "max_tokens": 2, "temperature": 1, "seed": 18446744073709551616},
           "temperature": {"prompt": "Hi", "max_tokens": 2, "temperature": 1e-300}}
    healthy = {"model": args.model, "prompt": "Once upon a time", "max_tokens": args.max_tokens, "temperature": 0,
               "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=args.url, timeout=300) as c:
        with c.stream("POST", "/v1/completions", json=healthy) as s:
            lines = s.iter_lines()
            got = [next(ln for ln in lines if ln)]  # the stream is running: now the bad requests
            for name, body in bad.items():
                r = c.post("/v1/completions", json={"model": args.model, **body})
                print(f"{name:12s} -> {r.status_code} {r.text[:160]}")
            got += [ln for ln in lines if ln]
    events = [json.loads(ln[6:]) for ln in got if ln != "data: [DONE]"]
    errors = [e["error"]["message"] for e in events if "error" in e]
    reasons = [ch["finish_reason"] for e in events for ch in e.get("choices", []) if ch.get("finish_reason")]
    done = got[-1] == "data: [DONE]"
    print(f"healthy stream: {len(events)} events, finish_reason {reasons}, errors {errors}, ends with [DONE]: {done}")
    return 0 if done and not errors and reasons == ["length"] else 1


if __name__ == "__main__":
    sys.exit(main())

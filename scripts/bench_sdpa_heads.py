"""Single-query decode SDPA on CPU by KV-head count: why a layer with one exact KV group decodes slowly.

    .venv/bin/python scripts/bench_sdpa_heads.py [--context 8192] [--threads 2]

CPU SDPA splits its work over (batch x KV heads), so one KV head runs on one thread. Prints JSON:
microseconds per call (bfloat16, 3 query heads per KV head as the engine's decode passes them) for
1, 2 and 3 KV heads. Run it on a quiet machine (docs/results/speed.md section 0c).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = {"context": args.context, "threads": args.threads, "us_per_call": {}}
    for heads in (1, 2, 3):
        q = torch.randn(1, heads, 3, 64, dtype=torch.bfloat16)
        k, v = (torch.randn(1, heads, args.context, 64, dtype=torch.bfloat16) for _ in range(2))
        for _ in range(10):
            F.scaled_dot_product_attention(q, k, v)
        t = time.perf_counter()
        for _ in range(args.calls):
            F.scaled_dot_product_attention(q, k, v)
        out["us_per_call"][heads] = round((time.perf_counter() - t) / args.calls * 1e6, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Time the DSLA ops on CPU against causal SDPA (GQA) at the SmolLM2-135M head shapes.

    .venv/bin/python scripts/bench_dsla_ops.py [--T 512 2048 8192 16384] [--chunks 32 64 128]

DSLA: B=1, H=3 KV heads, G=3 query heads per KV head, K=128 features, V=65 (64 + the ones
column the layer appends), S=2 states. SDPA: 9 query heads, 3 KV heads, head dim 64, causal.
Every contender runs once per round, rounds interleaved, and the minimum over rounds is kept:
on a shared machine the minimum is the least disturbed run. Milliseconds unless marked.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from dsla.ops.dsla import dsla_chunked, dsla_step

B, H, G, K, V, S, D = 1, 3, 3, 128, 65, 2, 64


def dsla_inputs(T: int, dtype: torch.dtype, gen: torch.Generator):
    """Feature-mapped-like inputs: q, k ≥ 0, log-gates from logsigmoid (mostly mild decay)."""
    q = torch.rand(B, H, G, T, K, generator=gen).to(dtype)
    k = torch.rand(B, H, T, K, generator=gen).to(dtype)
    v = torch.randn(B, H, T, V, generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(B, H, S, T, K, generator=gen) + 2)
    mix = torch.rand(H, G, S, generator=gen)
    return q, k, v, g, mix


def min_ms(fns: dict, rounds: int) -> dict:
    """Each fn once per round (interleaved) after one warm-up; the minimum per fn, in ms."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], 1e3 * (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    ap.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=0, help="0: 7 below T=8192, else 3")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'T':>6} {'dtype':>9} {'sdpa':>9} "
          + " ".join(f"{'dsla C=' + str(c):>11}" for c in args.chunks) + f" {'sdpa/best':>9}")
    states = {}
    with torch.inference_mode():
        for T in args.T:
            rounds = args.rounds or (7 if T < 8192 else 3)
            for name in args.dtypes:
                dtype = getattr(torch, name)
                qs = torch.randn(B, 3 * H, T, D, generator=gen).to(dtype)
                ks = torch.randn(B, H, T, D, generator=gen).to(dtype)
                vs = torch.randn(B, H, T, D, generator=gen).to(dtype)
                q, k, v, g, mix = dsla_inputs(T, dtype, gen)
                fns = {"sdpa": lambda: F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, enable_gqa=True)}
                for c in args.chunks:
                    fns[c] = lambda c=c: dsla_chunked(q, k, v, g, mix, chunk_size=c)
                ms = min_ms(fns, rounds)
                best = min(ms[c] for c in args.chunks)
                print(f"{T:>6} {name:>9} {ms['sdpa']:>9.1f} "
                      + " ".join(f"{ms[c]:>11.1f}" for c in args.chunks)
                      + f" {ms['sdpa'] / best:>8.1f}x", flush=True)
                states[T, name] = dsla_chunked(q, k, v, g, mix)[1]
        for (T, name), state in states.items():      # decode after a prefill of T tokens
            dtype = getattr(torch, name)
            q, k, v, g, mix = dsla_inputs(1, dtype, gen)
            us = 1e3 * min_ms({0: lambda: dsla_step(q, k, v, g, mix, state)}, 300)[0]
            print(f"dsla_step {name:>8} after T={T:>5}: {us:6.1f} us")


if __name__ == "__main__":
    main()

"""Time the DSLA ops on CPU against causal SDPA (GQA) at the SmolLM2-135M head shapes.

    .venv/bin/python scripts/bench_dsla_ops.py [--T 512 2048 8192 16384] [--chunks 32 64 128]

DSLA: B=1, H=3 KV heads, G=3 query heads per KV head, K=128 features, V=65 (64 + the ones
column the layer appends), S=2 states. SDPA: 9 query heads, 3 KV heads, head dim 64, causal.
Times are the minimum over repeats (the machine may be shared), in milliseconds.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dsla.ops.dsla import dsla_chunked, dsla_step

B, H, G, K, V, S, D = 1, 3, 3, 128, 65, 2, 64


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def dsla_inputs(T: int, dtype: torch.dtype, gen: torch.Generator):
    q = torch.rand(B, H, G, T, K, generator=gen).to(dtype)
    k = torch.rand(B, H, T, K, generator=gen).to(dtype)
    v = torch.randn(B, H, T, V, generator=gen).to(dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, H, S, T, K, generator=gen) + 2)
    mix = torch.rand(H, G, S, generator=gen)
    return q, k, v, g, mix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    ap.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'T':>6} {'dtype':>9} {'sdpa ms':>9} " + " ".join(f"{'C=' + str(c):>9}" for c in args.chunks)
          + f" {'best x':>7}")
    with torch.inference_mode():
        for T in args.T:
            reps = 3 if T >= 8192 else 7
            for name in args.dtypes:
                dtype = getattr(torch, name)
                qs = torch.randn(B, 3 * H, T, D, generator=gen).to(dtype)
                ks = torch.randn(B, H, T, D, generator=gen).to(dtype)
                vs = torch.randn(B, H, T, D, generator=gen).to(dtype)
                sdpa = best_ms(lambda: F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, enable_gqa=True), reps)
                q, k, v, g, mix = dsla_inputs(T, dtype, gen)
                ms = [best_ms(lambda: dsla_chunked(q, k, v, g, mix, chunk_size=c), reps)
                      for c in args.chunks]
                print(f"{T:>6} {name:>9} {sdpa:>9.1f} " + " ".join(f"{m:>9.1f}" for m in ms)
                      + f" {sdpa / min(ms):>6.1f}x", flush=True)
        for name in args.dtypes:
            dtype = getattr(torch, name)
            q, k, v, g, mix = dsla_inputs(1, dtype, gen)
            state = torch.randn(B, H, S, K, V, generator=gen)
            us = 1e3 * best_ms(lambda: dsla_step(q, k, v, g, mix, state), 200)
            print(f"dsla_step {name}: {us:.1f} us (B={B}, H={H}, G={G}, K={K}, V={V}, S={S})")


if __name__ == "__main__":
    main()

"""Decode attention for many requests at once: the formulations torch offers, timed as a decode step
meets them (each layer's cache in turn, so K and V come from memory, not from cache).

    .venv/bin/python scripts/bench_decode_attention.py [--requests 48] [--tokens 192] [--layers 30]

SmolLM2-135M shapes: 3 KV heads, 3 query heads each, head dim 64, bf16 caches of capacity
--capacity, request lengths drawn in [tokens/2, tokens] (one at tokens), masked past each length.
Prints one JSON line: microseconds per layer for each formulation, over --rounds rounds, interleaved.
`kernel` is ours (dsla.ops.cpu_kernels: every request's cache read where it is, no mask), on the same
caches laid out as KVBatch rows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--tokens", type=int, default=192)
    p.add_argument("--capacity", type=int, default=256)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if not 0 < a.tokens <= a.capacity or min(a.requests, a.layers, a.rounds, a.threads) < 1:
        p.error(f"need 0 < --tokens {a.tokens} <= --capacity {a.capacity} and positive counts")
    torch.set_num_threads(a.threads)
    from dsla.bench.common import cpu_model

    R, L, dt = a.requests, a.tokens, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    qs = [torch.randn(R, 3, 3, 64, generator=g).to(dt) for _ in range(a.layers)]
    kvs = [torch.randn(2, R, 3, a.capacity, 64, generator=g).to(dt) for _ in range(a.layers)]
    lengths = torch.randint(max(1, L // 2), L + 1, (R,), generator=g)
    lengths[0] = L
    keep = (torch.arange(L)[None] < lengths[:, None])[:, None, None]  # (R, 1, 1, L)
    add = torch.zeros(R, 1, 1, L).masked_fill_(~keep, float("-inf"))

    def sdpa(q, kv):
        return F.scaled_dot_product_attention(q, kv[0, :, :, :L], kv[1, :, :, :L], attn_mask=keep)

    def sdpa_no_mask(q, kv):
        return F.scaled_dot_product_attention(q, kv[0, :, :, :L], kv[1, :, :, :L])

    def math_bf16(q, kv):
        s = torch.matmul(q, kv[0, :, :, :L].transpose(-1, -2)).float().mul_(0.125).add_(add)
        return torch.matmul(torch.softmax(s, -1).to(dt), kv[1, :, :, :L])

    def math_fp32(q, kv):
        s = torch.matmul(q.float(), kv[0, :, :, :L].float().transpose(-1, -2)).mul_(0.125).add_(add)
        return torch.matmul(torch.softmax(s, -1), kv[1, :, :, :L].float()).to(dt)

    def sdpa_fp32_gqa(q, kv):
        return F.scaled_dot_product_attention(q.reshape(R, 9, 1, 64).float(), kv[0, :, :, :L].float(),
                                              kv[1, :, :, :L].float(), attn_mask=keep, enable_gqa=True)

    from dsla.ops.cpu_kernels import decode_attention_cpu, cpu_kernels_lib
    lib = cpu_kernels_lib()
    if lib is None:
        raise SystemExit("our decode-attention kernel did not build here (see the warning above)")
    metas = {}
    for kv in kvs:  # kv_meta's columns for each request's row (dsla.ops.cpu_kernels.kv_meta)
        base, es = kv.data_ptr(), kv.element_size()
        rows = [(base + r * kv.stride(1) * es, base + (kv.stride(0) + r * kv.stride(1)) * es, kv.stride(2),
                 int(lengths[r]), a.capacity, 3, 64, es) for r in range(R)]
        metas[id(kv)] = torch.tensor(rows, dtype=torch.int64)

    def kernel(q, kv):  # q (R, Hkv, G, D) -> the kernel's (Hq, R, D) view
        return decode_attention_cpu(lib, q.permute(1, 2, 0, 3).reshape(9, R, 64), metas[id(kv)], 3).view(R, 3, 3, 64)

    fns = {"sdpa_masked": sdpa, "sdpa_no_mask": sdpa_no_mask, "matmul_softmax_bf16": math_bf16,
           "matmul_softmax_fp32": math_fp32, "sdpa_fp32_gqa": sdpa_fp32_gqa, "kernel": kernel}
    ref = sdpa(qs[0], kvs[0]).float()
    for name, fn in fns.items():  # the same result, up to bf16 rounding (no-mask sees masked keys)
        if name != "sdpa_no_mask":
            err = (fn(qs[0], kvs[0]).float().reshape(ref.shape) - ref).abs().max().item()
            assert err < 0.05, f"{name} differs from SDPA by {err}"
    times: dict[str, list[float]] = {n: [] for n in fns}
    with torch.inference_mode():
        for _ in range(a.rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for q, kv in zip(qs, kvs):
                    fn(q, kv)
                times[name].append((time.perf_counter() - t0) / a.layers * 1e6)
    print(json.dumps({"cpu": cpu_model(), "threads": a.threads, "requests": R, "tokens": L, "capacity": a.capacity,
                      "layers": a.layers, "us_per_layer": {n: [round(t) for t in ts] for n, ts in times.items()}}))


if __name__ == "__main__":
    main()

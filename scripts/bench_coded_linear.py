"""Our coded linear (csrc/coded_linear.cpp) against oneDNN's packed bf16 linear, on SmolLM2-135M's
shapes, the two measured alternately in one run. Prints one JSON line per (shape, rows).

Each side cycles through copies of the weight (~300 MB in all), so that weights come from memory as
in a decode step, not from cache. The weights are built like a dequantised GGUF Q4_1 tensor (the
coded form of the default teacher's blocks); the two sides hold the same bf16 values.

    python scripts/bench_coded_linear.py [--rows 1,8,16,48,128,512] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from dsla.model.quant import GROUP_SIZE, CodedLinear, PackedLinear, dequantize_int4, pack_codes
from dsla.ops.cpu_kernels import coded_linear_kernel

SHAPES = {"q/o": (576, 576), "k,v": (384, 576), "gate,up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def q4_1_weight(N: int, K: int, g: torch.Generator) -> torch.Tensor:
    q = torch.randint(0, 16, (N, K // GROUP_SIZE, GROUP_SIZE), generator=g)
    q[..., 0], q[..., -1] = 0, 15  # both ends of each block reached, as GGUF's quantiser makes them
    d = (torch.rand(N, K // GROUP_SIZE, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(N, K // GROUP_SIZE, generator=g) * 0.1).half().float()
    return dequantize_int4(q.view(N, K), d, m)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,8,16,48,128,512")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if coded_linear_kernel() is None:
        raise SystemExit("the coded linear kernel does not run here (no compiler, kernels off, or no AVX-512 BF16)")
    g = torch.Generator().manual_seed(0)
    for name, (N, K) in SHAPES.items():
        w = q4_1_weight(N, K, g)
        copies = max(1, int(300e6 // (N * K * 2)))  # ~300 MB of bf16 weights a side: ~10x the L3
        coded = [CodedLinear(*pack_codes(w)) for _ in range(copies)]
        packed = [PackedLinear(w, torch.bfloat16) for _ in range(copies)]
        for M in (int(r) for r in a.rows.split(",")):
            x = torch.randn(M, K, generator=g).bfloat16()
            best = {"coded": float("inf"), "packed": float("inf")}
            for _ in range(a.rounds):
                for side, mods in (("packed", packed), ("coded", coded)):
                    mods[0](x)
                    t = time.perf_counter()
                    for mod in mods:
                        mod(x)
                    best[side] = min(best[side], (time.perf_counter() - t) / len(mods))
            print(json.dumps({"cpu": cpu_name(), "threads": a.threads, "shape": name, "N": N, "K": K, "rows": M,
                              "coded_ms": round(best["coded"] * 1e3, 4), "packed_ms": round(best["packed"] * 1e3, 4),
                              "coded_gflops": round(2 * M * N * K / best["coded"] / 1e9),
                              "packed_gflops": round(2 * M * N * K / best["packed"] / 1e9),
                              "speedup": round(best["packed"] / best["coded"], 3)}), flush=True)


if __name__ == "__main__":
    main()

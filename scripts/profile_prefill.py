"""Where one prefill's time goes: one T-token prefill of the prepared teacher, with a student's
layers for a ratio, timed, then run again under torch.profiler with the DSLA layer's parts marked.

    python scripts/profile_prefill.py --tokens 8192 --ratio 1 --student dsla/students/default
    python scripts/profile_prefill.py --tokens 4096 --ratio 1 --chunk 512   # as the server prefills

Prints one JSON line: tokens/s of the timed run and the seconds inside each marked part (the
exact KV groups' causal attention, the window's banded exact part, the chunked dual states, ...),
then, with --table N, the top N ops by self CPU time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# the parts of a DSLA layer's prefill to mark: (module, function names)
PARTS = {
    "dsla.ops.window": ["_band", "dsla_chunked", "_entering", "_combine"],  # called inside window_chunked
    "dsla.model.dsla": ["window_chunked", "causal_attention"],  # the latter: the exact KV groups' attention
    "dsla.model.llama": ["causal_attention"],  # the attention layers'
}


def mark(parts: dict[str, list[str]]) -> None:
    """Wrap each named function in a torch.profiler record_function "part:<module>.<name>" (module
    globals, so the callers in that module, which imported the name, see the wrapper)."""
    import importlib

    from torch.profiler import record_function

    for mod_name, names in parts.items():
        mod = importlib.import_module(mod_name)
        for name in names:
            fn = getattr(mod, name)

            def wrapped(*a, _fn=fn, _name=f"{mod_name.rsplit('.', 1)[-1]}.{name}", **k):
                with record_function("part:" + _name):
                    return _fn(*a, **k)
            setattr(mod, name, wrapped)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ratio", type=float, default=1.0, help="fraction of layers running DSLA, in the student's order")
    p.add_argument("--student", default="dsla/students/default", help="a student directory")
    p.add_argument("--weights", default="mixed", help="--weights preset (native, packed, int8, int4, mixed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table", type=int, default=0, help="also print the top N ops by self CPU time")
    p.add_argument("--chunk", type=int, default=0,
                   help="prefill in chunks of this many tokens through the cache, as a server step of "
                        "--max-num-batched-tokens does (default 0: one call)")
    p.add_argument("--no-coded", action="store_true",
                   help="keep oneDNN's packed bf16 copy where mixed would use our coded linear (an A/B switch)")
    a = p.parse_args()
    if a.tokens < 1 or not 0 <= a.ratio <= 1 or a.chunk < 0:
        p.error(f"--tokens {a.tokens} must be positive, --ratio {a.ratio} in [0, 1] and --chunk {a.chunk} ≥ 0")
    torch.set_num_threads(a.threads)
    from torch.profiler import ProfilerActivity, profile

    from dsla.bench.common import cpu_model
    from dsla.distill.artifact import load_student
    from dsla.model.loading import load_teacher, teacher_hash
    from dsla.model.quant import load_dtype, quantize_model
    from dsla.paths import default_teacher_dir
    from dsla.plan import layers_for_ratio

    model = load_teacher(default_teacher_dir(), dtype=load_dtype(a.weights, torch.bfloat16))
    m = load_student(model, a.student, teacher_hash(default_teacher_dir()))
    layers = sorted(layers_for_ratio(m["order"], model.cfg.num_hidden_layers, a.ratio, m["layers_done"]))
    if a.no_coded:
        import dsla.ops.cpu_kernels as kernels

        kernels.coded_linear_kernel = lambda: None  # dense_linear then packs for oneDNN
    quantize_model(model, a.weights, torch.bfloat16)
    mark(PARTS)
    ids = torch.randint(0, 1000, (a.tokens,), generator=torch.Generator().manual_seed(0))
    step = a.chunk or a.tokens

    def prefill() -> None:
        cache = model.new_cache(layers, a.tokens + 8)
        for t0 in range(0, a.tokens, step):
            n = min(step, a.tokens - t0)
            model(ids[t0: t0 + n], [n], [cache], logits_for=torch.tensor([n - 1]))

    with torch.inference_mode():
        prefill()  # warm-up
        t0 = time.perf_counter()
        prefill()
        s = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            prefill()
    events = prof.key_averages()
    parts = {e.key.removeprefix("part:"): round(e.cpu_time_total / 1e6, 3) for e in events if e.key.startswith("part:")}
    print(json.dumps({"cpu": cpu_model(), "threads": a.threads, "weights": a.weights, "tokens": a.tokens,
                      "chunk": a.chunk, "dsla_ratio": a.ratio, "dsla_layers": len(layers), "student": a.student, "coded": not a.no_coded, "seconds": round(s, 2),
                      "tokens_per_s": round(a.tokens / s, 1), "part_seconds_profiled": parts}))
    if a.table:
        print(events.table(sort_by="self_cpu_time_total", row_limit=a.table))


if __name__ == "__main__":
    main()

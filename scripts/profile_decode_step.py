"""Where one decode step's time goes: torch.profiler over batched decode steps of the prepared teacher.

    .venv/bin/python scripts/profile_decode_step.py --weights mixed --batch 8 --context 512 --ratio 0.5 --window 64

Builds `--batch` requests with a `--context`-token prefill each (random token ids; the first
round(ratio * layers) layers run DSLA, freshly initialised: speed only; with `--student DIR`, that
student's layers for the ratio in its order, with its window, sinks and exact KV groups), times `--steps` decode
steps, then profiles `--steps` more and prints JSON: ms per step, and the profiled CPU time split
into linear layers (oneDNN / int4 / int8 kernels), softmax attention (SDPA), the batched matmuls
of DSLA and the exact window (bmm), and everything else (the many small ops: copies, casts,
indexing). `--table N` also prints the top N ops. Run it on a quiet machine: 2 threads by default.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

LINEAR = ("mkldnn::_linear_pointwise", "dsla::coded_linear_cpu", "aten::linear", "aten::addmm", "aten::mm",
          "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
             "dsla::decode_attention_cpu")  # the last: our CPU kernel (dsla.ops.cpu_kernels)
BMM = ("aten::bmm",)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="native", help="--weights preset (native, packed, int8, int4, mixed)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.0, help="fraction of layers running DSLA (the first ones)")
    p.add_argument("--window", type=int, default=0, help="exact window of the DSLA layers")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table", type=int, default=0, help="also print the top N ops by self CPU time")
    p.add_argument("--compile", action="store_true", help="compile the DSLA decode step (torch.compile)")
    p.add_argument("--student", default=None,
                   help="a student directory (e.g. dsla/students/default): its trained layers, window, sinks and "
                        "exact KV groups, the ratio's layers taken in its order (default: fresh layers, the first ones)")
    p.add_argument("--no-coded", action="store_true",
                   help="keep oneDNN's packed bf16 copy where mixed would use our coded linear (an A/B switch)")
    a = p.parse_args()
    if a.batch < 1 or a.context < 1 or a.steps < 1 or not 0 <= a.ratio <= 1:
        p.error("--batch, --context and --steps must be positive and --ratio in [0, 1]")
    if a.student and a.window:
        p.error(f"--window {a.window} with --student {a.student}: the student's layers have their own window")
    torch.set_num_threads(a.threads)
    from torch.profiler import ProfilerActivity, profile

    from dsla.bench.common import cpu_model
    from dsla.config import DSLAConfig
    from dsla.model.loading import load_teacher
    from dsla.model.quant import load_dtype, quantize_model
    from dsla.paths import default_teacher_dir

    model = load_teacher(default_teacher_dir(), dtype=load_dtype(a.weights, torch.bfloat16))
    if a.student:
        from dsla.distill.artifact import load_student
        from dsla.plan import layers_for_ratio
        from dsla.model.loading import teacher_hash

        m = load_student(model, a.student, teacher_hash(default_teacher_dir()))
        layers = sorted(layers_for_ratio(m["order"], model.cfg.num_hidden_layers, a.ratio, m["layers_done"]))
        a.window = m["config"]["dsla"]["window"]
    else:
        layers = list(range(round(a.ratio * model.cfg.num_hidden_layers)))
        if layers:
            model.add_dsla(layers, DSLAConfig(window=a.window))
    if a.no_coded:
        import dsla.ops.cpu_kernels as kernels

        kernels.coded_linear_kernel = lambda: None  # dense_linear then packs for oneDNN
    quantize_model(model, a.weights, torch.bfloat16)
    if a.compile:
        from dsla.ops.compiled import use_compiled_decode
        use_compiled_decode(True)
    g = torch.Generator().manual_seed(0)
    caches = [model.new_cache(layers, a.context + 2 * a.steps + 8) for _ in range(a.batch)]
    with torch.inference_mode():
        for c in caches:
            model(torch.randint(0, 1000, (a.context,), generator=g), [a.context], [c],
                  logits_for=torch.tensor([a.context - 1]))

        def step() -> None:
            model(torch.randint(0, 1000, (a.batch,), generator=g), [1] * a.batch, caches,
                  logits_for=torch.arange(a.batch))

        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        ms = (time.perf_counter() - t0) / a.steps * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    split = {"linear": 0.0, "attention": 0.0, "bmm": 0.0, "other": 0.0}
    for e in events:
        kind = "linear" if e.key in LINEAR else "attention" if e.key in ATTENTION else "bmm" if e.key in BMM else "other"
        split[kind] += e.self_cpu_time_total
    ops = sum(e.count for e in events)
    print(json.dumps({
        "cpu": cpu_model(), "threads": a.threads, "weights": a.weights,
        "batch": a.batch, "context": a.context, "dsla_ratio": a.ratio, "dsla_layers": len(layers), "window": a.window, "compiled": a.compile, "student": a.student, "coded": not a.no_coded,
        "ms_per_step": round(ms, 2), "profiled_ms_per_step": round(total / a.steps / 1e3, 2),
        "ops_per_step": round(ops / a.steps), "share": {k: round(v / total, 3) for k, v in split.items()},
    }))
    if a.table:
        print(events.table(sort_by="self_cpu_time_total", row_limit=a.table))


if __name__ == "__main__":
    main()

"""`dsla bench decode`: prefill and decode speed of our HybridLM against transformers' Llama.

Both implementations load the same checkpoint (ours with ``load_teacher``, transformers'
``LlamaForCausalLM.from_pretrained(..., attn_implementation="sdpa")``) and run in each dtype of
``--dtype-list``, with no gradients, on random token ids from a seeded generator.

One JSON row per measurement, ``{"impl", "weights", "dtype", "batch", "context", "dsla_ratio",
"prefill_tokens_per_s", "decode_ms_per_token", ...}``; two kinds of rows:

- **prefill** rows: ``batch`` = 1, ``context`` = T (prompt length), ``prefill_tokens_per_s`` =
  T / seconds of one forward over T tokens into an empty cache (logits for the last token only,
  as a server computes them), ``decode_ms_per_token`` = null.
- **decode** rows: ``batch`` = B requests, ``context`` = C, ``prefill_tokens_per_s`` = null,
  ``decode_ms_per_token`` = milliseconds per decode step (one new token for each of the B
  requests: the per-token latency each request sees), ``decode_tokens_per_s`` = B * 1000 / that.
  Each request's cache is prefilled (untimed) with C - warmup - steps tokens, so the timed steps
  run at contexts up to C and never pass the model's position limit; the value is the median over
  the ``--steps`` timed steps. Ours runs B requests as one flattened forward with one cache each
  (``model(ids, [1] * B, caches)``); transformers runs a (B, 1) input with a ``DynamicCache``.
  One prefill per context is copied B times (same speed as B different prompts of that length);
  where C is also a prefill length, it is the timed prefill's cache, cropped to C - warmup - steps.

Both kinds also carry the same quantity from process CPU time (``prefill_cpu_tokens_per_s``,
``decode_cpu_ms_per_token``): with ``--threads 1`` on a machine other processes keep busy it is
close to what an idle core would take, while wall time also counts waiting for a core.

``weights`` (ours only; transformers rows have "native"): the linear-layer storage of
``--weights-list`` (``dsla.model.quant``: native, packed, int8, int4, mixed; auto resolved for the machine and
dtype, a combination it refuses, e.g. int4 with float32, is skipped and listed in ``skipped``).
Each preset is its own loaded model and takes turns with the others like the implementations;
``weights_mb`` is its parameter and buffer bytes.

``dsla_ratio`` (ours only; transformers rows have 0): the first round(ratio * L) layers, in layer
order, run DSLA (untrained: fine for speed); with ``--student DIR``, that student's trained layers
(its window and exact KV groups, which a fresh layer lacks) in its conversion order. Prefill rows
run those layers' chunked form from an empty ``new_cache(layers)``; decode caches get them by
folding the prefilled KV cache (``convert_layer``, the engine's conversion path), which gives the
same state shapes as a DSLA prefill.

Fair comparisons on a shared machine: the variants of one configuration (each implementation,
and each DSLA ratio of ours; all are loaded for a dtype) take turns call by call - prefill A,
prefill B, ..., or decode step A, step B, ... - so a busy neighbour slows every side alike.
``load_1m`` (1-minute load average when the row finished) shows when the machine was busy.

**llama.cpp** (``--impl llamacpp``, a peer: never a dependency) runs in its own venv behind a
worker subprocess (``dsla.bench.llamacpp``). Its rows have ``impl`` "llamacpp", ``dtype`` the GGUF
type (``--llamacpp-gguf``: q4_1, f16, bf16, f32 or a path), ``threads`` and ``group_dtype``: the
dtype whose rows it took turns with (bf16 with bfloat16, the others with float32), call by call
like the rest. Prefill: one ``llama_decode`` of T tokens (micro-batches of 512) into an empty
context, logits for the last. Decode: B sequences in one context, one KV stream each
(``kv_unified`` off), the prompt prefilled once and copied to all; each step is one
``llama_decode`` of B tokens (one per sequence). Time and memory are measured by the worker in
its own process (its CPU time covers llama.cpp's threads), so the pipe is not counted.

Memory, per row (Linux; the peak RSS is reset before every call, ``clear_refs``):
``rss_delta_mb`` = resident memory that building the row's own caches added (decode rows: B
copies of the prompt cache, DSLA layers folded) + the largest rise of RSS during one of its
calls (activations, cache growth); compare implementations by it. ``peak_rss_mb`` = the highest
process RSS during one of its calls: it includes every loaded model and every variant's caches
of that configuration, so it is an upper bound, not the row's own footprint. Where the peak
cannot be reset (``machine.peak_rss_per_row`` false) peaks are process-wide and only grow.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dsla.bench.common import (MemoryTracker, format_table, machine_info, measure_alternating, parse_list,
                               release_freed_memory, reset_peak_rss, setup_rss_mb, write_json_atomic)
from dsla.model.state import KVState

log = logging.getLogger(__name__)

IMPLS = ("ours", "hf", "llamacpp")
WEIGHT_ORDER = ("native", "packed", "int8", "int4", "mixed")  # resolved presets (dsla.model.quant.WEIGHT_PRESETS), in row order


@dataclass(frozen=True)
class DecodeSettings:
    """What to measure (recorded in the JSON next to the results)."""

    impls: tuple[str, ...] = ("ours", "hf")  # "ours" (HybridLM), "hf" (transformers), "llamacpp" (peer venv)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")  # weight/activation dtypes
    prefill_lengths: tuple[int, ...] = (512, 2048, 8192)  # tokens per prefill row (batch 1)
    contexts: tuple[int, ...] = (512, 2048, 8192)  # cache length reached by the decode steps
    batches: tuple[int, ...] = (1, 8)  # requests decoded together
    dsla_ratios: tuple[float, ...] = (0.0,)  # fraction of layers running DSLA (ours only)
    dsla_window: int = 0  # exact window W of the DSLA layers (DSLAConfig.window; the shipped student's for its cost)
    compile_decode: bool = False  # DSLA decode steps through torch.compile (dsla.ops.compiled.use_compiled_decode)
    cpu_kernels: str = "auto"  # auto: our C++ CPU kernels where they build; off: torch's ops (dsla.ops.cpu_kernels)
    student: str | None = None  # a student directory: its trained DSLA layers (window, exact KV groups) and its
    # conversion order instead of fresh layers converted first to last (ours only)
    weights: tuple[str, ...] = ("native",)  # linear-layer storage of ours: auto, native, packed, int8, int4, mixed
    steps: int = 16  # timed decode steps per decode row (median reported)
    warmup_steps: int = 2  # untimed decode steps before them
    prefill_repeats: int = 3  # timed prefills per prefill row (median reported) ...
    prefill_budget_s: float = 20.0  # ... but no more once the timed ones took this many seconds
    seed: int = 0  # token ids
    llamacpp_ggufs: tuple[str, ...] = ("bf16",)  # --impl llamacpp: GGUF names (q4_1, f16, bf16, f32) or paths
    llamacpp_threads: int | None = None  # llama.cpp threads (None: torch's thread count, as ours uses)
    llamacpp_flash_attn: bool = False  # llama.cpp's flash attention (off: llama-cpp-python's default)
    llamacpp_pause: bool = True  # stop the llama.cpp worker between its calls (dsla.bench.llamacpp)

    def __post_init__(self) -> None:
        bad = [i for i in self.impls if i not in IMPLS]
        if bad:
            raise ValueError(f"unknown --impl {bad}: choose from {', '.join(IMPLS)}")
        from dsla.model.quant import WEIGHT_CHOICES

        bad = [w for w in self.weights if w not in WEIGHT_CHOICES]
        if bad or not self.weights:
            raise ValueError(f"--weights-list {bad or '(empty)'}: choose from {', '.join(WEIGHT_CHOICES)}")
        for r in self.dsla_ratios:
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"--dsla-ratios value {r} must lie in [0, 1]")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps} must be at least 1")
        if self.dsla_window < 0:
            raise ValueError(f"--dsla-window {self.dsla_window} must be >= 0 (0: pure DSLA)")
        if self.student is not None and "ours" not in self.impls:
            raise ValueError(f"--student {self.student} measures our engine: add ours to --impl")
        if self.student is not None and self.dsla_window:
            raise ValueError(f"--dsla-window {self.dsla_window} with --student {self.student}: the student's "
                             "layers keep their own window; drop --dsla-window")
        for name in ("prefill_lengths", "contexts", "batches"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must all be positive")
        if self.llamacpp_threads is not None and self.llamacpp_threads < 1:
            raise ValueError(f"--llamacpp-threads {self.llamacpp_threads} must be at least 1")
        if "llamacpp" in self.impls:
            from dsla.bench.llamacpp import GGUF_NAMES

            bad = [g for g in self.llamacpp_ggufs if g not in GGUF_NAMES and not g.endswith(".gguf")]
            if bad or not self.llamacpp_ggufs:
                raise ValueError(f"--llamacpp-gguf {bad or '(empty)'}: give names from {', '.join(GGUF_NAMES)} "
                                 "or paths ending in .gguf")
        short = [c for c in self.contexts if c <= self.steps + self.warmup_steps]
        if short:
            raise ValueError(f"contexts {short} leave no prefill before {self.warmup_steps} + {self.steps} "
                             "decode steps: use larger --contexts or fewer --steps")


# ---- the two implementations behind one small interface ------------------------------------------
class OursRunner:
    """HybridLM: flattened batch, one RequestCache per request; ``weights`` a resolved preset
    (dsla.model.quant), applied once the DSLA modules are attached (``add_dsla``), as a server does."""

    def __init__(self, teacher_dir: Path, dtype: torch.dtype, weights: str = "native", window: int = 0,
                 student: str | Path | None = None) -> None:
        from dsla.model.loading import load_teacher, teacher_hash
        from dsla.model.quant import load_dtype

        self.model = load_teacher(teacher_dir, dtype=load_dtype(weights, dtype))  # float32 until quantised
        self.dtype, self.weights, self.window = dtype, weights, window
        self.num_layers = self.model.cfg.num_hidden_layers
        self.vocab_size = self.model.cfg.vocab_size
        self.student: dict[str, Any] | None = None
        if student is not None:  # its layers, as the server loads them (before quantising)
            from dsla.distill.artifact import load_student

            self.student = load_student(self.model, student, teacher_hash(teacher_dir))

    def ratio_layers(self, ratio: float) -> list[int]:
        """The layers running DSLA at ``ratio``: the student's order (``dsla.plan``), or else the first ones."""
        from dsla.plan import layer_count, layers_for_ratio

        if self.student is None:
            return list(range(layer_count(ratio, self.num_layers)))
        return layers_for_ratio(self.student["order"], self.num_layers, ratio, self.student["layers_done"])

    def add_dsla(self, layers: Sequence[int]) -> None:
        from dsla.model.quant import quantize_model

        missing = [i for i in layers if i not in self.model.dsla_layers()]
        if missing:
            from dsla.config import DSLAConfig

            self.model.add_dsla(missing, DSLAConfig(window=self.window))
        if self.model.weights != self.weights:
            quantize_model(self.model, self.weights, self.dtype)

    def weights_mb(self) -> float:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 3)

    def prefill(self, ids: torch.Tensor, dsla_layers: Sequence[int] = ()) -> Any:
        """One request's cache after a prefill of ``ids`` (logits for the last token only)."""
        cache = self.model.new_cache(dsla_layers)
        self.model(ids, [len(ids)], [cache], logits_for=torch.tensor([len(ids) - 1]))
        return cache

    @staticmethod
    def crop(cache: Any, length: int) -> Any:
        """Forget all but the first ``length`` tokens of an all-attention cache (storage is kept)."""
        for state in cache.layers:
            if not isinstance(state, KVState):
                raise ValueError("only an all-attention cache can be cropped")
            state.length = length
        cache.num_tokens = length
        return cache

    def batch_caches(self, base: Any, dsla_layers: Sequence[int], batch: int) -> list:
        """``batch`` copies of a prefilled all-attention cache, with ``dsla_layers`` folded to DSLA."""
        one = copy.deepcopy(base)
        for i in dsla_layers:
            self.model.convert_layer(one, i)
        return [copy.deepcopy(one) for _ in range(batch)]

    def decode(self, caches: list, tokens: torch.Tensor) -> None:
        self.model(tokens, [1] * len(caches), caches)


class HFRunner:
    """transformers' LlamaForCausalLM with SDPA attention and a DynamicCache."""

    weights = "native"

    def __init__(self, teacher_dir: Path, dtype: torch.dtype) -> None:
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(teacher_dir, dtype=dtype, attn_implementation="sdpa").eval()
        self.num_layers = self.model.config.num_hidden_layers
        self.vocab_size = self.model.config.vocab_size

    def add_dsla(self, layers: Sequence[int]) -> None:
        if layers:
            raise ValueError("transformers' Llama has no DSLA layers")

    def prefill(self, ids: torch.Tensor, dsla_layers: Sequence[int] = ()) -> Any:
        from transformers import DynamicCache

        self.add_dsla(dsla_layers)
        cache = DynamicCache(config=self.model.config)
        self.model(ids[None], cache=cache, use_cache=True, logits_to_keep=1)
        return cache

    @staticmethod
    def crop(cache: Any, length: int) -> Any:
        cache.crop(length - cache.get_seq_length())  # a negative argument drops that many tokens
        return cache

    def batch_caches(self, base: Any, dsla_layers: Sequence[int], batch: int) -> Any:
        self.add_dsla(dsla_layers)
        cache = copy.deepcopy(base)
        cache.batch_repeat_interleave(batch)
        return cache

    def weights_mb(self) -> float:
        return round(sum(t.numel() * t.element_size() for t in self.model.parameters()) / 2**20, 3)

    def decode(self, cache: Any, tokens: torch.Tensor) -> None:
        self.model(tokens[:, None], cache=cache, use_cache=True)


# ---- measuring ---------------------------------------------------------------------------------
def runner_key(impl: str, weights: str) -> str:
    """The name of one loaded model: "ours", "ours:int4", "hf"."""
    return impl if weights == "native" else f"{impl}:{weights}"


def _row(key: str, dtype: str, batch: int, context: int, ratio: float, **fields: Any) -> dict[str, Any]:
    impl, _, weights = key.partition(":")
    row = {"impl": impl, "weights": weights or "native", "dtype": dtype, "batch": batch, "context": context,
           "dsla_ratio": ratio,
           "prefill_tokens_per_s": None, "decode_ms_per_token": None, "decode_tokens_per_s": None}
    row.update(fields)
    return row


def _runner_row(runner: Any, name: str, dtype: str, batch: int, context: int, ratio: float,
                **fields: Any) -> dict[str, Any]:
    """A row of runner ``name`` measured with ``dtype``'s configurations. A peer runner (llama.cpp)
    names its own impl and dtype (the GGUF type), adds its own fields and records ``group_dtype``."""
    if hasattr(runner, "weights_mb"):
        fields.setdefault("weights_mb", runner.weights_mb())
    if not hasattr(runner, "row_dtype"):
        return _row(name, dtype, batch, context, ratio, **fields)
    return _row(runner.impl, runner.row_dtype, batch, context, ratio, group_dtype=dtype, **runner.row_extra, **fields)


def _start_reports(runners: dict[str, Any]) -> None:
    """Forget what peer workers reported so far: the next measurement's calls are its own."""
    from dsla.bench.llamacpp import WorkerReports

    for r in runners.values():
        if hasattr(r, "reports"):
            r.reports = WorkerReports()


def _use_reports(runners: dict[str, Any], variants: Sequence[tuple[str, float]], timings: list, mems: list) -> None:
    """For peer runners, replace this process's clocks and memory readings (which saw only the
    pipe and an idle parent) with what the worker measured in its own process, in place."""
    for i, (name, _) in enumerate(variants):
        reports = getattr(runners[name], "reports", None)
        if reports is not None:
            timings[i] = reports.timing(timings[i].repeats)
            mems[i] = reports


def bench_dtype(runners: dict[str, OursRunner | HFRunner], dtype: str, s: DecodeSettings,
                on_row: Callable[[dict[str, Any]], None] = lambda r: None) -> list[dict[str, Any]]:
    """All rows of one dtype. Within a prefill length or a (context, batch), the variants (each
    implementation and DSLA ratio) take turns call by call, so a busy neighbour on a shared
    machine slows every side of a comparison alike."""
    any_runner = next(iter(runners.values()))
    variants = [(impl, r) for impl in runners for r in (s.dsla_ratios if impl.startswith("ours") else (0.0,))]
    layers = {(impl, r): runners[impl].ratio_layers(r) if impl.startswith("ours") else []
              for impl, r in variants}  # the others run ratio 0 only
    gen = torch.Generator().manual_seed(s.seed)
    ids = torch.randint(0, any_runner.vocab_size, (max(*s.prefill_lengths, *s.contexts),), generator=gen)
    tokens = {B: torch.randint(0, any_runner.vocab_size, (B,), generator=gen) for B in s.batches}
    rows = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        on_row(row)

    with torch.no_grad():
        for impl, runner in runners.items():
            runner.add_dsla(max((layers[v] for v in variants if v[0] == impl), key=len))
            runner.prefill(ids[: min(s.prefill_lengths)])  # warm-up: first-call allocations and kernels
        # Decode caches: one untimed all-attention prefill of C - warmup - steps tokens per context
        # and implementation, copied for every batch size and ratio. Where C is also a prefill
        # length, the timed all-attention prefill's cache is cropped instead (saves a prefill).
        prompt_len = {C: C - s.warmup_steps - s.steps for C in s.contexts}
        bases: dict[int, dict[str, Any]] = {C: {} for C in s.contexts}
        for T in s.prefill_lengths:
            last: dict[tuple[str, float], Any] = {}

            def prefill(v: tuple[str, float]) -> Callable[[], None]:
                def fn() -> None:
                    last[v] = runners[v[0]].prefill(ids[:T], layers[v])
                return fn

            # Before each call (untimed): drop the previous call's cache and return freed memory
            # to the OS, so the call's rise in RSS is its whole footprint.
            mems = [MemoryTracker(release=True, on_before=lambda v=v: last.pop(v, None)) for v in variants]
            _start_reports(runners)
            timings = measure_alternating([prefill(v) for v in variants], warmup=0, repeats=s.prefill_repeats,
                                          max_seconds=s.prefill_budget_s, trackers=mems)
            _use_reports(runners, variants, timings, mems)
            for (impl, ratio), timing, mem in zip(variants, timings, mems):
                add(_runner_row(runners[impl], impl, dtype, 1, T, ratio,
                                prefill_tokens_per_s=round(T / timing.median, 1),
                         prefill_cpu_tokens_per_s=round(T / timing.cpu_median, 1), repeats=timing.repeats,
                         **mem.fields(), load_1m=round(os.getloadavg()[0], 2)))
                if T in bases and ratio == 0.0:
                    bases[T][impl] = runners[impl].crop(last[(impl, ratio)], prompt_len[T])
            last.clear()  # drop this length's caches before the next
        for C in s.contexts:
            for impl, runner in runners.items():
                if impl not in bases[C]:
                    bases[C][impl] = runner.prefill(ids[: prompt_len[C]])
            for B in s.batches:
                caches, mems = [], []
                _start_reports(runners)
                for impl, ratio in variants:
                    c, mb = setup_rss_mb(lambda: runners[impl].batch_caches(bases[C][impl], layers[(impl, ratio)], B))
                    caches.append(c)
                    mems.append(MemoryTracker(setup_mb=mb))
                steps = [lambda runner=runners[impl], c=c: runner.decode(c, tokens[B])
                         for (impl, _), c in zip(variants, caches)]
                timings = measure_alternating(steps, warmup=s.warmup_steps, repeats=s.steps, trackers=mems)
                _use_reports(runners, variants, timings, mems)
                for (impl, ratio), timing, mem in zip(variants, timings, mems):
                    ms = timing.median * 1e3
                    add(_runner_row(runners[impl], impl, dtype, B, C, ratio, decode_ms_per_token=round(ms, 2),
                             decode_tokens_per_s=round(B * 1e3 / ms, 1),
                             decode_cpu_ms_per_token=round(timing.cpu_median * 1e3, 2),
                             repeats=timing.repeats, **mem.fields(), load_1m=round(os.getloadavg()[0], 2)))
                del caches, steps
            del bases[C]
    return rows


def make_runners(teacher_dir: Path, dtype: str, s: DecodeSettings, skipped: list[str]) -> dict[str, Any]:
    """The runners of one dtype's configurations: ours (one per resolved ``--weights`` preset) and/or
    transformers in that dtype, and a llama.cpp worker for each GGUF grouped with it
    (``dsla.bench.llamacpp.group_ggufs``). Weight presets refused for this dtype go to ``skipped``."""
    from dsla.cli import DTYPES
    from dsla.config import LlamaConfig
    from dsla.model.quant import resolve_weights

    runners: dict[str, Any] = {}
    try:
        for impl in s.impls:
            if impl == "hf":
                runners["hf"] = HFRunner(teacher_dir, DTYPES[dtype])
            elif impl == "ours":
                for requested in s.weights:
                    try:
                        preset, why = resolve_weights(requested, DTYPES[dtype], LlamaConfig.from_dir(teacher_dir))
                    except ValueError as e:
                        skipped.append(f"{dtype} --weights {requested}: {e}")
                        log.warning("skipped: %s", skipped[-1])
                        continue
                    log.info("%s --weights %s -> %s (%s)", dtype, requested, preset, why)
                    if runner_key(impl, preset) not in runners:
                        runner = OursRunner(teacher_dir, DTYPES[dtype], preset, s.dsla_window, s.student)
                        for r in s.dsla_ratios:  # a ratio the student cannot serve fails before any peer loads
                            runner.ratio_layers(r)
                        runners[runner_key(impl, preset)] = runner
        if "llamacpp" in s.impls:
            from dsla.bench.llamacpp import LlamaCppRunner, group_ggufs

            threads = s.llamacpp_threads or torch.get_num_threads()
            for g in group_ggufs(s.llamacpp_ggufs, s.dtypes)[dtype]:
                runners[f"llamacpp-{g}"] = LlamaCppRunner(g, threads, s.warmup_steps + s.steps, s.llamacpp_flash_attn,
                                                              pause=s.llamacpp_pause)
    except BaseException:
        for r in runners.values():
            if hasattr(r, "close"):
                r.close()
        raise
    return runners


def _weight_rank(weights: str) -> int:
    """Row order of a weights value: our presets first, in WEIGHT_ORDER, then anything else."""
    return WEIGHT_ORDER.index(weights) if weights in WEIGHT_ORDER else len(WEIGHT_ORDER)


def run_benchmark(teacher_dir: str | Path, s: DecodeSettings,
                  on_row: Callable[[dict[str, Any]], None] = lambda r: None) -> dict[str, Any]:
    """Every dtype in turn, with all implementations of that dtype loaded; returns the JSON document."""
    from dsla.ops.compiled import use_compiled_decode

    from dsla.ops.cpu_kernels import cpu_kernels_lib, use_cpu_kernels

    use_compiled_decode(s.compile_decode)  # process-wide switches: set per run, back to the defaults at the end
    use_cpu_kernels(s.cpu_kernels)
    cpu_kernels_lib()  # built (the first time on a machine) before anything is timed
    try:
        return _run_benchmark(teacher_dir, s, on_row)
    finally:
        use_compiled_decode(False)
        use_cpu_kernels("auto")


def _run_benchmark(teacher_dir: str | Path, s: DecodeSettings, on_row: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    from dsla.cli import DTYPES

    bad = [d for d in s.dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"unknown dtype {bad}: choose from {', '.join(DTYPES)}")
    can_reset = reset_peak_rss()
    start = machine_info(peak_rss_per_row=can_reset)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for dtype in s.dtypes:
        log.info("decode bench: %s, %s", dtype, ", ".join(s.impls))
        runners = make_runners(Path(teacher_dir), dtype, s, skipped)
        if not runners:
            continue
        try:
            rows += bench_dtype(runners, dtype, s, on_row)
        finally:
            for r in runners.values():
                if hasattr(r, "close"):
                    r.close()
        del runners
        release_freed_memory()
    order = {impl: i for i, impl in enumerate(s.impls)}
    rows.sort(key=lambda r: (order[r["impl"]], s.dtypes.index(r.get("group_dtype", r["dtype"])), r["dtype"],
                             _weight_rank(r["weights"]), r["dsla_ratio"],
                             r["decode_ms_per_token"] is not None, r["batch"], r["context"]))
    machine = machine_info(peak_rss_per_row=can_reset)  # now transformers is imported, if it ran
    machine["load_average_1m_at_start"] = start.get("load_average_1m")
    from dsla.model.quant import BF16_CPU_FLAGS, cpu_flags

    machine["cpu_bf16_flags"] = sorted(set(BF16_CPU_FLAGS) & cpu_flags())  # what --weights auto looks at
    doc = {"machine": machine, "teacher": str(teacher_dir), "settings": asdict(s), "results": rows,
           "skipped": skipped, "summary": summarise(rows)}
    if s.student is not None:  # what was measured, not only the path (a shipped student changes by commit)
        from dsla.distill.artifact import read_manifest

        m = read_manifest(Path(s.student))
        doc["student"] = {"dir": str(Path(s.student).resolve()), "window": m["config"]["dsla"]["window"],
                          "exact_groups": m["config"].get("exact_groups", ""), "order": m["order"],
                          "layers_done": m["layers_done"]}
    return doc


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratios the targets are stated in, one entry per decode (weights, dtype, batch, context) of
    ours, from wall time and (``*_cpu``) from CPU time. Each ratio is > 1 when the first-named side
    wins: ``hf_over_ours`` (transformers' ms over ours), ``throughput_over_batch1`` (tokens/s at this
    batch over batch 1), ``dsla{r}_throughput_over_attention`` (ratio r against all attention),
    ``native_over_{weights}`` (the same dtype's native weights' ms over these quantised ones),
    ``llamacpp_{gguf}_over_ours`` (llama.cpp's ms over ours, for each GGUF measured with this
    dtype's rows; its CPU time is the worker process's)."""
    def key(r: dict[str, Any]) -> tuple:
        return r["impl"], r["weights"], r["dtype"], r["batch"], r["context"], r["dsla_ratio"]

    decode = [r for r in rows if r["decode_ms_per_token"] is not None]
    wall = {key(r): r["decode_ms_per_token"] for r in decode}
    cpu = {key(r): r["decode_cpu_ms_per_token"] for r in decode}
    peer_group = {r["dtype"]: r["group_dtype"] for r in rows if r["impl"] == "llamacpp"}
    out = []
    for k in sorted((k for k in wall if k[0] == "ours" and k[5] == 0.0),
                    key=lambda k: (WEIGHT_ORDER.index(k[1]), k[2:])):
        _, w, dtype, B, C, _ = k
        entry: dict[str, Any] = {"weights": w, "dtype": dtype, "batch": B, "context": C, "ours_ms": wall[k]}

        def ratios(name: str, num: tuple, den: tuple, scale: float = 1.0) -> None:
            if num in wall and den in wall:
                entry[name] = round(scale * wall[num] / wall[den], 3)
                entry[name + "_cpu"] = round(scale * cpu[num] / cpu[den], 3)

        hf = ("hf", "native", dtype, B, C, 0.0)
        if hf in wall:
            entry["hf_ms"] = wall[hf]
        ratios("hf_over_ours", hf, k)
        if w != "native":
            ratios(f"native_over_{w}", ("ours", "native", dtype, B, C, 0.0), k)
        if B != 1:
            ratios("throughput_over_batch1", ("ours", w, dtype, 1, C, 0.0), k, scale=B)
        for k2 in sorted(k2 for k2 in wall if k2[:5] == k[:5] and k2[5] != 0.0):
            entry[f"dsla{k2[5]:g}_ms"] = wall[k2]
            ratios(f"dsla{k2[5]:g}_throughput_over_attention", k, k2)
        for gguf in sorted(g for g, d in peer_group.items() if d == dtype):
            peer = ("llamacpp", "native", gguf, B, C, 0.0)
            if peer in wall:
                entry[f"llamacpp_{gguf}_ms"] = wall[peer]
                ratios(f"llamacpp_{gguf}_over_ours", peer, k)
        out.append(entry)
    return out


# ---- CLI -----------------------------------------------------------------------------------------
TABLE = ["impl", "weights", "dtype", "threads", "dsla_ratio", "batch", "context", "prefill_tokens_per_s", "decode_ms_per_token",
         "decode_tokens_per_s", "prefill_cpu_tokens_per_s", "decode_cpu_ms_per_token", "peak_rss_mb", "rss_delta_mb",
         "load_1m"]
QUICK = dict(prefill_lengths=(128,), contexts=(256,), batches=(1, 4), steps=4, prefill_repeats=1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dsla.cli import add_model_arguments
    from dsla.cliargs import add_compile_argument

    add_model_arguments(p)
    p.set_defaults(dtype=None)  # here --dtype X is shorthand for --dtype-list X
    d = DecodeSettings()
    p.add_argument("--json", required=True, type=Path, help="write the results here (atomically)")
    p.add_argument("--impl", default=",".join(d.impls), help=f"comma list of: {', '.join(IMPLS)} (llamacpp: "
                   "the peer venv of scripts/peers/setup_llamacpp.sh)")
    p.add_argument("--dtype-list", default=None, help=f"comma list (default {','.join(d.dtypes)})")
    p.add_argument("--prefill-lengths", default=None, help="prompt lengths T of the prefill rows")
    p.add_argument("--contexts", default=None, help="contexts C of the decode rows")
    p.add_argument("--batches", default=None, help="requests per decode step")
    p.add_argument("--weights-list", default="native",
                   help="comma list of linear-layer weights for ours: auto, native, packed, int8, int4, mixed "
                        "(dsla.model.quant; int8/int4/mixed need bfloat16, and are skipped for float32)")
    p.add_argument("--dsla-window", type=int, default=d.dsla_window,
                   help="exact window W of the DSLA layers (0: pure DSLA; the shipped student's W measures its cost)")
    add_compile_argument(p)
    p.add_argument("--dsla-ratios", default="0", help="fractions of layers running DSLA (ours only), e.g. 0,0.5,1")
    p.add_argument("--student", type=Path, default=None,
                   help="measure this student's DSLA layers (trained, with their window and exact KV groups) in its "
                        "conversion order, e.g. dsla/students/default (default: fresh layers, the first ones)")
    p.add_argument("--steps", type=int, default=None, help=f"timed decode steps per row (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--llamacpp-gguf", default=",".join(d.llamacpp_ggufs),
                   help="--impl llamacpp: comma list of GGUF files, names (q4_1, f16, bf16, f32: the setup script's "
                        "files) or paths; bf16 takes turns with the bfloat16 rows, the others with float32")
    p.add_argument("--llamacpp-threads", type=int, default=None,
                   help="llama.cpp threads (default: --threads, else torch's thread count)")
    p.add_argument("--llamacpp-flash-attn", action="store_true", help="turn on llama.cpp's flash attention")
    p.add_argument("--llamacpp-no-pause", action="store_true",
                   help="leave the llama.cpp worker running between its calls (by default it is stopped, so "
                        "its idle threads take no CPU from our rows; each row says stopped_between_calls)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a sanity run (explicit size flags still win)")


def settings_from_args(args: argparse.Namespace) -> DecodeSettings:
    base = DecodeSettings(**QUICK) if args.quick else DecodeSettings()
    if args.dtype and args.dtype_list:
        raise ValueError("give --dtype or --dtype-list, not both")
    kw: dict[str, Any] = {"impls": tuple(parse_list(args.impl)), "seed": args.seed,
                          "dsla_ratios": tuple(parse_list(args.dsla_ratios, float)),
                          "weights": tuple(parse_list(args.weights_list)), "dsla_window": args.dsla_window,
                          "compile_decode": args.compile_decode, "cpu_kernels": args.cpu_kernels,
                          "student": str(args.student) if args.student else None}
    if args.dtype or args.dtype_list:
        kw["dtypes"] = tuple(parse_list(args.dtype or args.dtype_list))
    for name in ("prefill_lengths", "contexts", "batches"):
        if getattr(args, name):
            kw[name] = tuple(parse_list(getattr(args, name), int))
    if args.steps is not None:
        kw["steps"] = args.steps
    kw["llamacpp_ggufs"] = tuple(parse_list(args.llamacpp_gguf))
    kw["llamacpp_threads"] = args.llamacpp_threads or getattr(args, "threads", None)
    kw["llamacpp_flash_attn"] = args.llamacpp_flash_attn
    kw["llamacpp_pause"] = not args.llamacpp_no_pause
    return DecodeSettings(**{**asdict(base), **kw})


def run(args: argparse.Namespace) -> int:
    from dsla.paths import resolve_teacher

    s = settings_from_args(args)
    teacher = resolve_teacher(args.teacher)
    doc = run_benchmark(teacher, s, on_row=lambda r: log.info("%s", {k: r[k] for k in TABLE if r.get(k) is not None}))
    write_json_atomic(args.json, doc)
    print(format_table(doc["results"], TABLE))
    print(f"wrote {args.json}")
    return 0

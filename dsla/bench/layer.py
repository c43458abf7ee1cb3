"""`dsla bench layer`: one layer, softmax attention against DSLA: prefill, decode, memory, fold.

The layer has the default teacher's shapes (``dsla.config.LlamaConfig()``: hidden 576, 9 query
heads, 3 KV heads, head dim 64) with random weights: a ``LlamaAttention`` and a ``DSLAAttention``
built from it with ``DSLAConfig()`` defaults (``--window W`` sets its exact window). No checkpoint
is needed; speed does not depend on the weights. Each dtype of ``--dtype-list`` sets the modules'
and inputs' dtype (DSLA states stay float32 by design). Times are medians of repeated calls with no gradients; attention and DSLA
prefill calls alternate, so load from other processes hits both alike (decode steps are timed in
separate loops, see below). Process CPU time is recorded
beside wall time: with ``--threads 1`` on a busy machine it is close to what an idle core takes.

Rows (``results``), two kinds, per dtype:

- ``kind: "prefill"``, ``tokens`` = T: ``attention_ms`` (our LlamaAttention forward over T
  tokens: SDPA, causal), ``dsla_ms`` (DSLAAttention forward, chunked form), ``dsla_speedup`` =
  attention_ms / dsla_ms; and the same from process CPU time (``*_cpu_ms``, ``dsla_speedup_cpu``).
- ``kind: "decode"``, ``context`` = C: ``attention_step_ms`` (one new token against a KVState of
  C tokens), ``dsla_step_ms`` (one new token with the DSLAState made by folding those C tokens),
  ``kv_cache_bytes`` (K and V of C tokens) against ``dsla_state_bytes`` (``DSLAState.nbytes``;
  the same at every C) and their ratio, ``kv_allocated_bytes`` (``KVState.nbytes`` after the
  steps: what its growth policy actually holds), ``fold_ms`` (``DSLAAttention.fold``: KVState of
  C tokens -> DSLAState); CPU-time twins ``*_cpu_ms`` as for prefill.
  As in ``bench decode``, the states hold C - warmup - steps tokens before the timed steps, so
  the steps end at context C.

``summary`` per dtype: ``dsla_prefill_speedup`` by T and ``dsla_decode_ratio_last_over_first``
(DSLA step time at the largest C over the smallest: 1.0 means flat in the context).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dsla.bench.common import (format_table, machine_info, measure, measure_alternating, parse_list,
                               write_json_atomic)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSettings:
    """What to measure (recorded in the JSON next to the results)."""

    dtypes: tuple[str, ...] = ("float32", "bfloat16")  # module and input dtype
    prefill_lengths: tuple[int, ...] = (512, 2048, 8192, 16384)  # tokens T per prefill row
    contexts: tuple[int, ...] = (512, 2048, 8192, 16384)  # cached tokens C per decode row
    repeats: int = 5  # timed calls per prefill / fold measurement (median reported) ...
    budget_s: float = 10.0  # ... but no more once the timed ones took this many seconds
    steps: int = 128  # timed decode steps per decode row (median; sub-ms steps are noisy)
    warmup_steps: int = 8  # untimed decode steps before them
    seed: int = 0  # weights and inputs

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.steps < 1:
            raise ValueError(f"repeats={self.repeats} and steps={self.steps} must be at least 1")
        short = [c for c in self.contexts if c <= self.steps + self.warmup_steps]
        if short:
            raise ValueError(f"contexts {short} leave no cached tokens before {self.warmup_steps} + "
                             f"{self.steps} decode steps: use larger --contexts or fewer --steps")


def build_layer(dtype: torch.dtype, seed: int, llama_cfg: Any = None, dsla_cfg: Any = None):
    """A random LlamaAttention, the DSLAAttention built from it, and the RoPE inverse frequencies."""
    from dsla.config import DSLAConfig, LlamaConfig
    from dsla.model.dsla import DSLAAttention
    from dsla.model.llama import LlamaAttention
    from dsla.ops.rope import rope_inv_freq

    cfg = llama_cfg or LlamaConfig()
    torch.manual_seed(seed)
    attn = LlamaAttention(cfg)
    dsla = DSLAAttention(attn, dsla_cfg or DSLAConfig())
    attn.to(dtype).eval().requires_grad_(False)
    dsla.to(dtype).eval().requires_grad_(False)
    return attn, dsla, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


def bench_dtype(dtype_name: str, s: LayerSettings, llama_cfg: Any = None, dsla_cfg: Any = None,
                on_row: Callable[[dict[str, Any]], None] = lambda r: None) -> list[dict[str, Any]]:
    """The prefill and decode rows of one dtype."""
    from dsla.cli import DTYPES
    from dsla.ops.rope import rope_cos_sin

    if dtype_name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype_name!r}: choose from {', '.join(DTYPES)}")
    dtype = DTYPES[dtype_name]
    attn, dsla, inv_freq = build_layer(dtype, s.seed, llama_cfg, dsla_cfg)
    cfg = attn.cfg
    gen = torch.Generator().manual_seed(s.seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    rope = lambda start, n: rope_cos_sin(torch.arange(start, start + n), inv_freq)  # noqa: E731
    pair = lambda fa, fb: measure_alternating([fa, fb], warmup=1, repeats=s.repeats,  # noqa: E731
                                              max_seconds=s.budget_s)
    ms = lambda t, cpu=False: round((t.cpu_median if cpu else t.median) * 1e3, 4)  # noqa: E731
    rows = []
    with torch.no_grad():
        for T in s.prefill_lengths:
            x, (cos, sin) = randn(T, cfg.hidden_size), rope(0, T)
            a, d = pair(lambda: attn(x, cos, sin, [T]), lambda: dsla(x, cos, sin, [T]))
            rows.append({"kind": "prefill", "dtype": dtype_name, "tokens": T, "attention_ms": ms(a),
                         "dsla_ms": ms(d), "dsla_speedup": round(a.median / d.median, 3),
                         "attention_cpu_ms": ms(a, True), "dsla_cpu_ms": ms(d, True),
                         "dsla_speedup_cpu": round(a.cpu_median / d.cpu_median, 3)})
            on_row(rows[-1])
        for C in s.contexts:
            cached = C - s.warmup_steps - s.steps
            kv = attn.new_state(dtype, "cpu")
            # Keys are stored after RoPE, as a prefill leaves them (fold un-rotates them).
            cos, sin = rope(0, cached)
            _, k, v = attn.project_kv(randn(cached, cfg.hidden_size), cos, sin)  # (Hkv, cached, D) each
            kv.append(k, v)
            kv_bytes = 2 * cfg.num_key_value_heads * C * cfg.head_dim * kv.k.element_size()  # C tokens' K and V
            fold = measure(lambda: dsla.fold(kv, inv_freq), warmup=1, repeats=s.repeats, max_seconds=s.budget_s)
            state = dsla.fold(kv, inv_freq)
            x1 = randn(1, cfg.hidden_size)
            cos1, sin1 = rope(cached, 1)  # positions barely matter for speed; keep them plausible
            # Separate loops: alternating would let each attention step's scan of a long KV cache
            # evict the DSLA layer's weights from the CPU caches and bill DSLA for the context.
            a = measure(lambda: attn(x1, cos1, sin1, [1], [kv]), warmup=s.warmup_steps, repeats=s.steps)
            d = measure(lambda: dsla(x1, cos1, sin1, [1], [state]), warmup=s.warmup_steps, repeats=s.steps)
            rows.append({"kind": "decode", "dtype": dtype_name, "context": C,
                         "attention_step_ms": ms(a), "dsla_step_ms": ms(d),
                         "attention_step_cpu_ms": ms(a, True), "dsla_step_cpu_ms": ms(d, True),
                         "kv_cache_bytes": kv_bytes, "kv_allocated_bytes": kv.nbytes,
                         "dsla_state_bytes": state.nbytes,
                         "kv_over_state_bytes": round(kv_bytes / state.nbytes, 3), "fold_ms": ms(fold),
                         "fold_cpu_ms": ms(fold, True)})
            on_row(rows[-1])
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        pre = [r for r in rows if r["dtype"] == dtype and r["kind"] == "prefill"]
        dec = sorted((r for r in rows if r["dtype"] == dtype and r["kind"] == "decode"), key=lambda r: r["context"])
        entry: dict[str, Any] = {"dtype": dtype,
                                 "dsla_prefill_speedup": {str(r["tokens"]): r["dsla_speedup"] for r in pre},
                                 "dsla_prefill_speedup_cpu": {str(r["tokens"]): r["dsla_speedup_cpu"] for r in pre}}
        if len(dec) >= 2:
            first, last = dec[0], dec[-1]
            entry["dsla_decode_contexts"] = [first["context"], last["context"]]
            entry["dsla_decode_ratio_last_over_first"] = round(last["dsla_step_ms"] / first["dsla_step_ms"], 3)
            entry["dsla_decode_ratio_last_over_first_cpu"] = round(
                last["dsla_step_cpu_ms"] / first["dsla_step_cpu_ms"], 3)
            entry["attention_decode_ratio_last_over_first"] = round(
                last["attention_step_ms"] / first["attention_step_ms"], 3)
        out.append(entry)
    return out


def run_benchmark(s: LayerSettings, llama_cfg: Any = None, dsla_cfg: Any = None,
                  on_row: Callable[[dict[str, Any]], None] = lambda r: None) -> dict[str, Any]:
    """All dtypes; returns the JSON document."""
    from dsla.config import DSLAConfig, LlamaConfig

    rows: list[dict[str, Any]] = []
    for dtype in s.dtypes:
        log.info("layer bench: %s", dtype)
        rows += bench_dtype(dtype, s, llama_cfg, dsla_cfg, on_row)
    return {"machine": machine_info(), "settings": asdict(s),
            "llama_config": asdict(llama_cfg or LlamaConfig()), "dsla_config": asdict(dsla_cfg or DSLAConfig()),
            "results": rows, "summary": summarise(rows)}


# ---- CLI -----------------------------------------------------------------------------------------
PREFILL_TABLE = ["dtype", "tokens", "attention_ms", "dsla_ms", "dsla_speedup"]
DECODE_TABLE = ["dtype", "context", "attention_step_ms", "dsla_step_ms", "kv_cache_bytes", "dsla_state_bytes",
                "kv_over_state_bytes", "fold_ms"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = LayerSettings()
    p.add_argument("--json", required=True, type=Path, help="write the results here (atomically)")
    p.add_argument("--dtype-list", default=",".join(d.dtypes), help="comma list of float32, bfloat16")
    p.add_argument("--prefill-lengths", default=",".join(map(str, d.prefill_lengths)))
    p.add_argument("--contexts", default=",".join(map(str, d.contexts)))
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed prefill/fold calls (median)")
    p.add_argument("--steps", type=int, default=d.steps, help="timed decode steps (median)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--window", type=int, default=0,
                   help="exact window W of the DSLA layer (DSLAConfig.window; 0: pure DSLA)")


def run(args: argparse.Namespace) -> int:
    from dsla.config import DSLAConfig

    s = LayerSettings(dtypes=tuple(parse_list(args.dtype_list)),
                      prefill_lengths=tuple(parse_list(args.prefill_lengths, int)),
                      contexts=tuple(parse_list(args.contexts, int)),
                      repeats=args.repeats, steps=args.steps, seed=args.seed)
    doc = run_benchmark(s, dsla_cfg=DSLAConfig(window=args.window), on_row=lambda r: log.info("%s", r))
    write_json_atomic(args.json, doc)
    rows = doc["results"]
    print(format_table([r for r in rows if r["kind"] == "prefill"], PREFILL_TABLE))
    print()
    print(format_table([r for r in rows if r["kind"] == "decode"], DECODE_TABLE))
    print(f"wrote {args.json}")
    return 0

"""`dsla bench quant`: what the quantised weight paths (``--weights``, dsla.model.quant) cost in accuracy.

Paths: ``float32/native`` (the reference), ``bfloat16/native`` and ``bfloat16/<w>`` for each of
``--weights-list`` (the quantised kernels run with bfloat16 activations only). Sections of the
JSON document:

- ``gguf`` (when the teacher's GGUF is found; the default teacher's is): per Q4_1 tensor of the
  GGUF, whether re-deriving the blocks from the dequantised checkpoint (``quantize_int4``)
  recovers GGUF's q, d and m, and the largest weight error of the int4 kernel's bfloat16 scale and
  zero against GGUF's own dequantisation, beside that of plain bfloat16 weights.
- ``perplexity``: per path and corpus, exp(mean next-token loss) over the first ``--windows``
  non-overlapping ``--seq-len``-token windows of the test split (dsla.eval.ppl), and
  ``ratio_to_fp32`` (1.005 = +0.5%).
- ``greedy``: per path, ``--gen-tokens`` greedy tokens for each of the fixed chat prompts
  (``PROMPTS``), compared token for token to float32/native and bfloat16/native: the first
  position where they differ (null: identical) and how many prompts match entirely.

``mixed`` runs its packed bf16 copy for calls of more than ``MIXED_MAX_ROWS`` rows: its
perplexity windows measure packed bf16, its greedy decode steps the int4 kernels.

Speed is `dsla bench decode --dtype bfloat16 --weights-list native,int8,int4` (its rows alternate
the paths call by call); this command measures no time.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)

PROMPTS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "List three uses of a paperclip.",
    "What is 17 times 23?",
    "Translate 'good morning' into Spanish and German.",
    "Give me a short tip for learning to code.",
    "Who wrote Romeo and Juliet, and when?",
)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where two token lists differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def gguf_closeness(gguf_path: Path, teacher_dir: Path, max_tensors: int | None = None) -> dict[str, Any]:
    """Re-derived int4 blocks against the GGUF's own Q4_1 blocks (see the module doc)."""
    import gguf
    import numpy as np

    from dsla.config import LlamaConfig
    from dsla.model.loading import read_state_dict
    from dsla.model.quant import quantize_int4

    cfg = LlamaConfig.from_dir(teacher_dir)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}

    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    sd = read_state_dict(teacher_dir)
    reader = gguf.GGUFReader(str(gguf_path))
    tensors = [t for t in reader.tensors if t.tensor_type.name == "Q4_1"][:max_tensors]
    out: dict[str, Any] = {"path": str(gguf_path), "q4_1_tensors": len(tensors), "blocks": 0, "q_mismatches": 0,
                           "max_abs_d_diff": 0.0, "max_abs_m_diff": 0.0, "max_abs_err_int4_bf16_scales": 0.0,
                           "max_abs_err_bf16_weights": 0.0, "mean_abs_err_int4_bf16_scales": 0.0,
                           "mean_abs_err_bf16_weights": 0.0, "unmapped": []}
    sums = [0.0, 0.0]
    for t in tensors:
        blk, layer, kind, _ = t.name.split(".")
        if blk != "blk" or kind not in names:
            out["unmapped"].append(t.name)
            continue
        raw = np.asarray(t.data).reshape(-1, 20)  # Q4_1 block: f16 d, f16 m, 16 bytes of nibbles
        d = torch.from_numpy(raw[:, :2].copy().view(np.float16).astype(np.float32)[:, 0])
        m = torch.from_numpy(raw[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0])
        qs = raw[:, 4:]
        q = torch.from_numpy(np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int32))  # (blocks, 32)
        w = sd[f"model.layers.{layer}.{names[kind]}.weight"].float()
        if kind in heads:  # llama.cpp stores q/k rows in its own RoPE order: put the checkpoint's in it
            H = heads[kind]
            w = w.view(H, 2, w.shape[0] // H // 2, -1).transpose(1, 2).reshape(w.shape)
        q2, d2, m2 = (x.reshape(q.shape[0], -1) for x in quantize_int4(w))
        exact = q * d[:, None] + m[:, None]  # GGUF's own dequantisation, (blocks, 32)
        kernel = (q2 - 8) * d2.bfloat16().float() + (m2 + 8 * d2).bfloat16().float()  # what the kernel multiplies by
        out["blocks"] += q.shape[0]
        out["q_mismatches"] += int((q2 != q).sum())
        out["max_abs_d_diff"] = max(out["max_abs_d_diff"], float((d2[:, 0] - d).abs().max()))
        out["max_abs_m_diff"] = max(out["max_abs_m_diff"], float((m2[:, 0] - m).abs().max()))
        out["max_abs_err_int4_bf16_scales"] = max(out["max_abs_err_int4_bf16_scales"], float((kernel - exact).abs().max()))
        out["max_abs_err_bf16_weights"] = max(out["max_abs_err_bf16_weights"],
                                              float((exact.bfloat16().float() - exact).abs().max()))
        sums[0] += float((kernel - exact).abs().sum())
        sums[1] += float((exact.bfloat16().float() - exact).abs().sum())
    n = max(1, 32 * out["blocks"])
    out["mean_abs_err_int4_bf16_scales"], out["mean_abs_err_bf16_weights"] = sums[0] / n, sums[1] / n
    return out


def load_path(teacher_dir: Path, dtype: torch.dtype, weights: str):
    from dsla.model.loading import load_teacher
    from dsla.model.quant import load_dtype, quantize_model

    model = load_teacher(teacher_dir, dtype=load_dtype(weights, dtype))
    quantize_model(model, weights, dtype)
    return model


def greedy(model, tok, prompts: Sequence[str], max_tokens: int) -> list[list[int]]:
    from dsla.generate import generate
    from dsla.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]
    return [list(generate(model, x, params)) for x in ids]  # no stop ids: always max_tokens to compare


def run_check(teacher_dir: Path, weights: Sequence[str], corpora: Sequence[str], windows: int, seq_len: int,
              prompts: Sequence[str], gen_tokens: int, gguf_path: Path | None) -> dict[str, Any]:
    from dsla.bench.common import machine_info
    from dsla.eval.ppl import perplexity
    from dsla.model.tokenizer import Tokenizer

    tok = Tokenizer(teacher_dir)
    paths = [("float32", "native"), ("bfloat16", "native")] + [("bfloat16", w) for w in weights if w != "native"]
    ppl: dict[str, dict[str, float]] = {}
    gens: dict[str, list[list[int]]] = {}
    for dtype, w in paths:
        name = f"{dtype}/{w}"
        log.info("quant check: %s", name)
        model = load_path(teacher_dir, getattr(torch, dtype), w)
        with torch.no_grad():
            ppl[name] = perplexity(model, teacher_dir, [], corpora, "test", seq_len, windows * seq_len, batch_size=1)
        gens[name] = greedy(model, tok, prompts, gen_tokens)
        del model
    ref = ppl["float32/native"]
    doc: dict[str, Any] = {
        "machine": machine_info(), "teacher": str(teacher_dir),
        "settings": {"weights": list(weights), "corpora": list(corpora), "windows": windows, "seq_len": seq_len,
                     "prompts": list(prompts), "gen_tokens": gen_tokens},
        "perplexity": {n: {c: {"ppl": round(v, 4), "ratio_to_fp32": round(v / ref[c], 5)} for c, v in p.items()}
                       for n, p in ppl.items()},
        "greedy": {},
    }
    for n, g in gens.items():
        vs = {base: [first_divergence(a, b) for a, b in zip(g, gens[base])]
              for base in ("float32/native", "bfloat16/native")}
        doc["greedy"][n] = {"first_divergence_vs_fp32": vs["float32/native"],
                            "first_divergence_vs_bf16": vs["bfloat16/native"],
                            "identical_to_fp32": sum(d is None for d in vs["float32/native"]),
                            "identical_to_bf16": sum(d is None for d in vs["bfloat16/native"]),
                            "text": [tok.decode(t) for t in g]}
    if gguf_path is not None:
        doc["gguf"] = gguf_closeness(gguf_path, teacher_dir)
    return doc


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dsla.cliargs import add_model_arguments
    from dsla.data.corpora import ALL_CORPORA

    add_model_arguments(p)
    p.add_argument("--json", required=True, type=Path, help="write the results here (atomically)")
    p.add_argument("--weights-list", default="int8,int4", help="quantised presets to check (bfloat16 activations)")
    p.add_argument("--corpora", default=",".join(ALL_CORPORA), help="prepared corpora whose test split to score")
    p.add_argument("--windows", type=int, default=4, help="windows per corpus (each --seq-len tokens)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} fixed prompts")
    p.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--gguf", default="auto",
                   help="GGUF to compare the int4 blocks with ('auto': the default teacher's, when --teacher is "
                        "not given; 'none': skip)")


def run(args: argparse.Namespace) -> int:
    import json

    from dsla.bench.common import parse_list, write_json_atomic
    from dsla.model.quant import WEIGHT_PRESETS
    from dsla.paths import resolve_teacher

    weights = parse_list(args.weights_list)
    bad = [w for w in weights if w not in WEIGHT_PRESETS]
    if bad:
        raise ValueError(f"--weights-list {bad}: choose from {', '.join(WEIGHT_PRESETS)}")
    if args.windows < 1 or args.gen_tokens < 1 or not 1 <= args.prompts <= len(PROMPTS):
        raise ValueError(f"--windows {args.windows} and --gen-tokens {args.gen_tokens} must be >= 1, "
                         f"--prompts {args.prompts} in 1..{len(PROMPTS)}")
    gguf_path = None
    if args.gguf == "auto" and args.teacher is None:
        from dsla.data.teacher import find_default_gguf

        try:
            gguf_path = find_default_gguf()
        except (FileNotFoundError, ModuleNotFoundError, ImportError) as e:
            log.warning("no GGUF comparison: %s", e)
    elif args.gguf not in ("auto", "none"):
        gguf_path = Path(args.gguf)
    doc = run_check(resolve_teacher(args.teacher), weights, parse_list(args.corpora), args.windows, args.seq_len,
                    PROMPTS[: args.prompts], args.gen_tokens, gguf_path)
    write_json_atomic(args.json, doc)
    print(json.dumps({k: doc[k] for k in ("perplexity", "gguf") if k in doc}, indent=1))
    print(json.dumps({n: {k: v for k, v in g.items() if k != "text"} for n, g in doc["greedy"].items()}))
    print(f"wrote {args.json}")
    return 0

"""`dsla` command line: prepare | generate | bench (more commands register the same way).

Each subcommand is a pair of functions ``add(parser)`` and ``run(args) -> int`` named in the
tables below ("module:add:run"); modules keep heavy imports inside those functions.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

import torch

from dsla.cliargs import DTYPE_NAMES, add_model_arguments, add_weights_argument  # noqa: F401  (re-exported)

# name -> ("module:add_fn:run_fn", one-line help)
COMMANDS = {
    "prepare": ("dsla.data.prepare:add_arguments:run", "fetch and convert the default teacher and corpora into the cache"),
    "generate": ("dsla.cli:add_arguments:run", "generate text from a teacher (optionally with DSLA layers)"),
    "rank": ("dsla.distill.commands:add_rank_arguments:run_rank",
             "per-layer sensitivity (attention entropy, loss-delta, or the retrieval probe)"),
    "distill": ("dsla.distill.commands:add_distill_arguments:run_distill",
                "chained layer-wise distillation, then the end-to-end stage, into a resumable student directory"),
    "export": ("dsla.distill.commands:add_export_arguments:run_export",
               "write a compact copy of a student (q/o as bfloat16 deltas from the teacher) with its eval report"),
    "eval": ("dsla.eval.commands:add_arguments:run", "quality of a student at several conversion ratios"),
    "serve": ("dsla.serve.commands:add_arguments:run", "OpenAI-compatible HTTP server with continuous batching"),
}
BENCHES = {
    "decode": ("dsla.bench.decode:add_arguments:run", "prefill and decode speed of our model vs transformers"),
    "layer": ("dsla.bench.layer:add_arguments:run", "one layer: softmax attention vs DSLA, prefill/decode/memory/fold"),
    "serve": ("dsla.bench.serve:add_arguments:run",
              "open-loop load (Poisson or a replayed trace) against an OpenAI-compatible server"),
    "quant": ("dsla.bench.quant:add_arguments:run",
              "accuracy of the quantised weight paths (--weights): perplexity and greedy tokens vs float32"),
    "plot": ("dsla.bench.timeline:add_arguments:run", "plot the conversion ratio and queue of `bench serve` runs"),
    "chaos": ("dsla.bench.chaos:add_arguments:run",
              "concurrent streams with random forced conversions/reverts: check nothing breaks"),
}


def _resolve(spec: str):
    mod, add, run_ = spec.split(":")
    m = importlib.import_module(mod)
    return getattr(m, add), getattr(m, run_)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
assert set(DTYPES) == set(DTYPE_NAMES)


def add_arguments(p: argparse.ArgumentParser) -> None:  # `dsla generate`
    add_model_arguments(p)
    add_weights_argument(p)
    p.add_argument("prompt", help="the prompt text (with --chat: the user message)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:  # `dsla generate`
    from dsla.generate import generate
    from dsla.model.loading import load_teacher
    from dsla.model.tokenizer import IncrementalDecoder, Tokenizer
    from dsla.paths import resolve_teacher
    from dsla.sampling import SamplingParams, stop_token_ids

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens)
    teacher = resolve_teacher(args.teacher)
    tok = Tokenizer(teacher)
    from dsla.config import LlamaConfig
    from dsla.model.quant import load_dtype, quantize_model, resolve_weights

    preset, _ = resolve_weights(args.weights, DTYPES[args.dtype], LlamaConfig.from_dir(teacher))
    model = load_teacher(teacher, dtype=load_dtype(preset, DTYPES[args.dtype]))
    quantize_model(model, preset, DTYPES[args.dtype])
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        text = tok.apply_chat_template(msgs + [{"role": "user", "content": args.prompt}])
    else:
        text = args.prompt
    stop = stop_token_ids(model.cfg.eos_token_id, tok)
    dec = IncrementalDecoder(tok)
    for t in generate(model, tok.encode(text), params, stop_ids=stop):
        sys.stdout.write(dec.push(t))
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsla", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_commands(sub, COMMANDS)
    bench = sub.add_parser("bench", help="speed and memory benchmarks (print a table, write JSON)")
    _add_commands(bench.add_subparsers(dest="bench", required=True), BENCHES)
    return parser


def _add_commands(sub, table: dict[str, tuple[str, str]]) -> None:
    for name, (spec, help_) in table.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add, run_ = _resolve(spec)
        add(p)
        p.set_defaults(handler=run_)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.handler(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"dsla {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsla {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

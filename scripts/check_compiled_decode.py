"""Greedy text of the shipped student with the DSLA decode step eager vs compiled (--compile-decode).

    .venv/bin/python scripts/check_compiled_decode.py --ratio 0.5 --tokens 48

Loads the prepared teacher in bfloat16 with the shipped student (dsla/students/default) and the
`mixed` weights the server uses, converts round(ratio * layers) layers in the student's order,
and decodes greedily from a fixed set of prompts (chat template) once eagerly and once through
torch.compile. Prints JSON: per prompt whether the tokens match, and where they first differ.
"""

from __future__ import annotations

import argparse
import json

import torch

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in two sentences why the sky is blue.", "List three prime numbers.",
           "Give me a short recipe for pancakes.", "Who wrote Romeo and Juliet?"]


def greedy(model, ids: list[int], layers: list[int], n: int) -> list[int]:
    cache = model.new_cache(layers, len(ids) + n + 8)
    with torch.inference_mode():
        logits = model(torch.tensor(ids), [len(ids)], [cache], logits_for=torch.tensor([len(ids) - 1]))
        out = [int(logits[-1].argmax())]
        for _ in range(n - 1):
            logits = model(torch.tensor(out[-1:]), [1], [cache])
            out.append(int(logits[-1].argmax()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from dsla.distill.artifact import load_student, read_manifest
    from dsla.ops.compiled import use_compiled_decode
    from dsla.model.loading import load_teacher, teacher_hash
    from dsla.model.quant import load_dtype, quantize_model
    from dsla.model.tokenizer import Tokenizer
    from dsla.paths import SHIPPED_STUDENT_DIR, default_teacher_dir
    from dsla.plan import layers_for_ratio

    teacher = default_teacher_dir()
    model = load_teacher(teacher, dtype=load_dtype("mixed", torch.bfloat16))
    load_student(model, SHIPPED_STUDENT_DIR, teacher_hash(teacher))
    quantize_model(model, "mixed", torch.bfloat16)
    order = read_manifest(SHIPPED_STUDENT_DIR)["order"]
    layers = sorted(layers_for_ratio(order, model.cfg.num_hidden_layers, a.ratio))
    tok = Tokenizer(teacher)
    rows = []
    for prompt in PROMPTS:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]))
        use_compiled_decode(False)
        eager = greedy(model, ids, layers, a.tokens)
        use_compiled_decode(True)
        comp = greedy(model, ids, layers, a.tokens)
        diff = next((i for i, (x, y) in enumerate(zip(eager, comp)) if x != y), None)
        rows.append({"prompt": prompt, "same": diff is None, "first_difference": diff, "text": tok.decode(eager)})
    print(json.dumps({"ratio": a.ratio, "dsla_layers": len(layers), "tokens": a.tokens,
                      "same": sum(r["same"] for r in rows), "prompts": len(rows), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

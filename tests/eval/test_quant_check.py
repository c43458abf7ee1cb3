"""`dsla bench quant` on the tiny evaluation teacher: the documented JSON, fp32 the reference of itself."""

from __future__ import annotations

import pytest

from dsla.bench import quant as qcheck


def test_first_divergence():
    assert qcheck.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert qcheck.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert qcheck.first_divergence([1, 2], [1, 2, 3]) == 2


def test_quant_check_schema(eval_teacher):
    doc = qcheck.run_check(eval_teacher, ["int8"], ["wikipedia", "techdocs"], windows=1, seq_len=64,
                           prompts=qcheck.PROMPTS[:2], gen_tokens=4, gguf_path=None)
    assert set(doc["perplexity"]) == {"float32/native", "bfloat16/native", "bfloat16/int8"}
    for name, per_corpus in doc["perplexity"].items():
        assert set(per_corpus) == {"wikipedia", "techdocs"}
        for v in per_corpus.values():
            assert v["ppl"] > 1
            if name == "float32/native":
                assert v["ratio_to_fp32"] == 1.0
            else:  # a tiny random model: close, not equal
                assert v["ratio_to_fp32"] == pytest.approx(1.0, rel=0.1)
    fp32 = doc["greedy"]["float32/native"]
    assert fp32["first_divergence_vs_fp32"] == [None, None] and fp32["identical_to_fp32"] == 2
    q = doc["greedy"]["bfloat16/int8"]
    assert len(q["first_divergence_vs_bf16"]) == 2 and len(q["text"]) == 2
    assert all(d is None or 0 <= d < 4 for d in q["first_divergence_vs_bf16"])
    assert "gguf" not in doc

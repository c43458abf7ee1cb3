"""A report's runs by model label and ratio: the names report.md and the plots both read.

Kept apart from ``report`` so that ``plots`` (imported by ``report`` to draw) does not import it back.
"""

from __future__ import annotations

import re

TEACHER = "teacher"


def slug(text: str) -> str:
    """A file-name-safe version of a label."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def series(report: dict, label: str) -> list[dict]:
    """A student's runs by ratio, with the teacher's run standing in for ratio 0."""
    runs = [r for r in report["runs"] if r["model"] == label]
    base = [r for r in report["runs"] if r["model"] == TEACHER and r["ratio"] == 0]
    if label != TEACHER and not any(r["ratio"] == 0 for r in runs):
        runs = base + runs
    return sorted(runs, key=lambda r: r["ratio"])


def students(report: dict) -> list[str]:
    return [m["label"] for m in report["models"] if m["label"] != TEACHER]


def ood_label(report: dict, corpus: str) -> str:
    """``corpus``, marked "(out of domain)" when the report's ppl config lists it as such."""
    ood = report["config"].get("ppl", {}).get("out_of_domain", [])
    return f"{corpus} (out of domain)" if corpus in ood else corpus

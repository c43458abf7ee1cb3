"""The evaluation report: ``report.json`` (everything), ``report.md`` (tables) and PNG plots.

Every file is written atomically (temporary sibling, then rename), so an interrupted run leaves
the previous file or the new one, never half of one. ``report.json`` is rewritten after every
finished suite of a (model, ratio) run and every passkey cell with ``"complete": false``
(report.md too, and the plots after each finished run, drawn from the finished suites only), and a
last time with ``true``. A run interrupted inside
the passkey suite keeps its finished cells as ``"passkey_partial"`` (same layout as ``"passkey"``,
unfinished cells with n = 0) until a ``--resume`` finishes it.

Layout of report.json (``FORMAT``)::

    {"format", "complete", "created", "command", "wall_time_s",
     "config": {"teacher": {"path", "name", "sha256"}, "suites", "ratios", "seed", "limit", <suite>: {...}},
     "models": [{"label", "dir", "num_states", "layers_done", "order"}],   # the teacher first
     "notes": [str],
     "runs": [{"model", "ratio", "layers", "seconds": {suite: s}, <suite>: result}]}

A student's ratio-0 row is the teacher's run (label "teacher"), computed once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dsla.eval.runs import TEACHER, ood_label, slug, students
from dsla.fileio import atomic_write_json, atomic_write_text

FORMAT = "dsla-eval-report/1"

def read_report(path: str | Path) -> dict[str, Any]:
    """Load a report.json (or the report.json inside a directory); checks the format."""
    p = Path(path)
    p = p / "report.json" if p.is_dir() else p
    rep = json.loads(p.read_text("utf-8"))
    if rep.get("format") != FORMAT:
        raise ValueError(f"{p} has format {rep.get('format')!r}; this dsla reads {FORMAT!r}")
    return rep


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _run_rows(report: dict) -> list[dict]:
    """Runs in display order: the teacher, then each student by ratio."""
    return sorted(report["runs"], key=lambda r: (r["model"] != TEACHER, r["model"], r["ratio"]))


def _name(run: dict) -> list[str]:
    return [run["model"], f"{run['ratio']:.2f}", str(len(run["layers"]))]


def _corpora_note(cfg: dict) -> list[str]:
    """What each corpus is, and which ones the distillation never saw (reports that record it)."""
    if "corpora" not in cfg:
        return []
    ood = cfg.get("out_of_domain", [])
    lines = [f"- {c}: {d}" + (" — **out of domain**" if c in ood else "") for c, d in cfg["corpora"].items()]
    return ["Corpora (held-out documents; the out-of-domain ones were never used for distillation):", "",
            *lines, ""]


def _ppl_section(report: dict, runs: list[dict]) -> list[str]:
    cfg = report["config"]["ppl"]
    out = ["## Perplexity", "", f"Perplexity per corpus and split (windows of {cfg['seq_len']} tokens, first "
           f"{cfg['max_tokens']} tokens of each corpus); in brackets: over the teacher's.", "", *_corpora_note(cfg)]
    teacher = next((r for r in runs if r["model"] == TEACHER and "ppl" in r), None)
    for split in report["config"]["ppl"]["splits"]:
        corpora = list(next(r["ppl"][split] for r in runs if "ppl" in r))
        rows = []
        for r in runs:
            if "ppl" not in r:
                continue
            cells = []
            for c in corpora:
                v = r["ppl"][split][c]
                rel = f" ({v / teacher['ppl'][split][c]:.3f}x)" if teacher and r is not teacher else ""
                cells.append(f"{v:.2f}{rel}")
            rows.append(_name(r) + cells)
        header = ["model", "ratio", "DSLA layers", *(ood_label(report, c) for c in corpora)]
        out += [f"**{split}**", "", _table(header, rows), ""]
    return out + ["![perplexity against ratio](ppl.png)", ""]


def _position_section(report: dict, runs: list[dict]) -> list[str]:
    cfg = report["config"]["position"]
    how = ("documents of each corpus' test split **concatenated** (no single document is long enough)"
           if cfg.get("concatenated") else "single test-split documents (no concatenation)")
    out = ["## Loss by position", "",
           f"Mean next-token loss (nats) by position in {cfg['windows']} windows of {cfg['window']} tokens "
           f"cut from {how}; ± one standard error over windows. Windows: {', '.join(cfg['sources'])}.", ""]
    buckets = next(r["position"]["buckets"] for r in runs if "position" in r)
    rows = [_name(r) + [f"{v:.3f} ± {_f(s, 3)}" for v, s in zip(r["position"]["loss"], r["position"]["se"])]
            for r in runs if "position" in r]
    out += [_table(["model", "ratio", "DSLA layers", *buckets], rows), ""]
    out += [f"![loss by position, {m}](position_{slug(m)}.png)" for m in students(report) or [TEACHER]]
    return out + [""]


def _mc_section(report: dict, runs: list[dict]) -> list[str]:
    mc_runs = [r for r in runs if "mc" in r]
    tasks = list(mc_runs[0]["mc"])
    first = mc_runs[0]["mc"]
    out = ["## Multiple choice (BIG-bench, zero-shot, log-likelihood)", "",
           "Accuracy with its 95% Wilson interval; `norm` = length-normalised (log-likelihood per byte). "
           "n and chance per task: " + ", ".join(f"{t} n={first[t]['n']}, chance {first[t]['chance']:.3f}"
                                                 for t in tasks) + ".", ""]
    for key, title in (("acc", "acc"), ("acc_norm", "acc (norm)")):
        rows = []
        for r in mc_runs:
            cells = [f"{r['mc'][t][key]:.3f} [{r['mc'][t][key + '_ci'][0]:.2f}, {r['mc'][t][key + '_ci'][1]:.2f}]"
                     for t in tasks]
            mean = sum(r["mc"][t][key] for t in tasks) / len(tasks)
            rows.append(_name(r) + cells + [f"{mean:.3f}"])
        out += [f"**{title}**", "", _table(["model", "ratio", "DSLA layers", *tasks, "mean"], rows), ""]
    return out + ["![multiple-choice accuracy against ratio](mc.png)", ""]


def _passkey_section(report: dict, runs: list[dict]) -> list[str]:
    pk_runs = [r for r in runs if "passkey" in r]
    p0 = pk_runs[0]["passkey"]
    cfg = report["config"]["passkey"]
    out = ["## Passkey retrieval", "",
           f"A random 5-digit key in real filler text ({', '.join(cfg['filler'])} test splits), greedy answer, "
           f"{cfg['trials']} trials per cell; depth = share of the filler before the key. "
           f"Prompt format: {'chat template' if cfg['chat'] else 'plain text'}.", ""]
    header = ["model", "ratio", "DSLA layers", "mean"] + [f"{c} @ {d:.0%}" for c in p0["contexts"] for d in p0["depths"]]
    rows = [_name(r) + [f"{r['passkey']['mean_acc']:.2f}"] + [f"{v:.2f}" for row in r["passkey"]["acc"] for v in row]
            for r in pk_runs]
    out += [_table(header, rows), "", "![passkey accuracy against ratio](passkey.png)", ""]
    out += [f"![passkey heatmaps, {m}](passkey_{slug(m)}.png)" for m in students(report) or [TEACHER]]
    wrong = [w | {"model": r["model"], "ratio": r["ratio"]} for r in pk_runs for w in r["passkey"]["wrong_examples"][:2]]
    if wrong:
        out += ["", "Some wrong answers:", ""]
        out += [f"- {w['model']} @ {w['ratio']:.2f}, {w['context']} tokens, depth {w['depth']:.0%}: key {w['key']}, "
                f"said {json.dumps(w['answer'])}" for w in wrong[:12]]
    return out + [""]


def _cells_done(passkey: dict) -> str:
    """'k of n' finished cells of a (partial) passkey result."""
    n = [c for row in passkey["n"] for c in row]
    return f"{sum(c > 0 for c in n)} of {len(n)}"


def to_markdown(report: dict) -> str:
    """report.md: settings, then one section per suite that was run, then run times."""
    cfg = report["config"]
    runs = _run_rows(report)
    t = cfg["teacher"]
    out = ["# dsla evaluation report", "",
           f"{'Complete' if report.get('complete') else '**Incomplete** (interrupted or still running)'}; "
           f"created {report['created']}. Regenerate with:", "", "```", report["command"], "```", "",
           f"Teacher: {t['name']} (weights sha256 {t['sha256'][:12]}…). Suites: {', '.join(cfg['suites'])}. "
           f"Ratios: {', '.join(f'{r:g}' for r in cfg['ratios'])}. Seed {cfg['seed']}"
           + (f", limit {cfg['limit']}" if cfg.get("limit") else "") + ".", ""]
    if len(report["models"]) > 1:
        rows = [[m["label"], str(m.get("dir") or "–"), str(m.get("num_states") or "–"),
                 str(m.get("layers_done", "–")), " ".join(map(str, m.get("order") or [])) or "–"]
                for m in report["models"]]
        out += ["## Models", "", _table(["label", "directory", "states", "layers distilled", "order"], rows), ""]
    out += [f"- {n}" for n in report.get("notes", [])] + ([""] if report.get("notes") else [])
    sections = {"ppl": _ppl_section, "position": _position_section, "mc": _mc_section, "passkey": _passkey_section}
    for suite in cfg["suites"]:
        if any(suite in r for r in runs):
            out += sections[suite](report, runs)
    partial = [r for r in runs if "passkey_partial" in r]
    if partial:
        out += ["## In progress", ""]
        out += [f"- {r['model']} @ {r['ratio']:.2f}: passkey {_cells_done(r['passkey_partial'])} cells done "
                f"(mean so far {r['passkey_partial']['mean_acc']:.2f}; finish with `--resume`)" for r in partial]
        out += [""]
    suites = cfg["suites"]
    rows = [_name(r) + [_f(r.get("seconds", {}).get(s), 0) for s in suites] for r in runs]
    out += ["## Run time (seconds)", "", _table(["model", "ratio", "DSLA layers", *suites], rows), "",
            f"Total wall time {report.get('wall_time_s', 0):.0f} s.", ""]
    return "\n".join(out)


def write_report(out_dir: str | Path, report: dict, plots: bool = True) -> None:
    """Write report.json and report.md, then (``plots``) the plots of every finished suite, each atomically."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", to_markdown(report))
    if plots:
        from dsla.eval.plots import write_plots

        write_plots(out_dir, report)

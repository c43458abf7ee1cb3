"""The report writer: JSON round trip, Markdown sections, plots, and atomic (interrupt-safe) writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsla.eval import plots
from dsla.eval.report import FORMAT, read_report, to_markdown, write_report
from dsla.eval.runs import series


def fake_run(model: str, ratio: float, q: float) -> dict:
    return {
        "model": model, "ratio": ratio, "layers": list(range(round(ratio * 4))),
        "seconds": {"ppl": 1.0, "position": 2.0, "mc": 3.0, "passkey": 4.0},
        "ppl": {"test": {"wikipedia": 20 * q, "lee": 30 * q}},
        "position": {"buckets": ["0-256", "256-1k"], "loss": [3.0 * q, 2.5 * q], "se": [0.1, float("nan")],
                     "tokens": [512, 1536], "windows": 2},
        "mc": {"social_iqa": {"n": 10, "acc": 0.5 / q, "acc_ci": [0.2, 0.8], "acc_norm": 0.4, "acc_norm_ci": [0.1, 0.7],
                              "chance": 1 / 3}},
        "passkey": {"contexts": [1024, 2048], "depths": [0.1, 0.9], "acc": [[1.0, 0.9], [0.8 / q, 0.5]],
                    "n": [[20, 20], [20, 20]], "needle_position": [[0.1, 0.9], [0.1, 0.9]], "mean_acc": 0.8 / q,
                    "wrong_examples": [{"context": 2048, "depth": 0.9, "key": "12345", "answer": " 54321"}]},
    }


def fake_report(complete: bool = True) -> dict:
    return {
        "format": FORMAT, "complete": complete, "created": "2026-01-01T00:00:00+00:00",
        "command": "dsla eval --student s/a --student s/b --ratios 0,0.5,1 --out r", "wall_time_s": 12.0,
        "config": {"teacher": {"path": "/t", "name": "tiny", "sha256": "ab" * 32},
                   "suites": ["ppl", "position", "mc", "passkey"], "ratios": [0.0, 0.5, 1.0], "seed": 0, "limit": None,
                   "ppl": {"splits": ["test"], "seq_len": 1024, "max_tokens": 16384},
                   "position": {"window": 1024, "windows": 2, "sources": ["shakespeare/doc0@0", "wikipedia/doc1@0"],
                                "concatenated": False},
                   "mc": {"tasks": ["social_iqa"], "max_per_task": 10},
                   "passkey": {"contexts": [1024, 2048], "depths": [0.1, 0.9], "trials": 20,
                               "filler": ["wikipedia", "lee"], "chat": True}},
        "models": [{"label": "teacher", "dir": None},
                   {"label": "a", "dir": "s/a", "num_states": 2, "layers_done": 4, "order": [3, 1, 0, 2]},
                   {"label": "single state", "dir": "s/b", "num_states": 1, "layers_done": 4, "order": [3, 1, 0, 2]}],
        "notes": ["a note"],
        "runs": [fake_run("teacher", 0.0, 1.0), fake_run("a", 0.5, 1.1), fake_run("a", 1.0, 1.5),
                 fake_run("single state", 0.5, 1.3)],
    }


def test_round_trip_markdown_and_plots(tmp_path):
    rep = fake_report()
    write_report(tmp_path, rep)
    back = read_report(tmp_path)
    assert json.dumps(back, sort_keys=True) == json.dumps(rep, sort_keys=True)  # NaN compares unequal; text does not
    assert read_report(tmp_path / "report.json")["runs"][1]["model"] == "a"
    md = (tmp_path / "report.md").read_text()
    for heading in ("## Perplexity", "## Loss by position", "## Multiple choice", "## Passkey retrieval", "## Run time"):
        assert heading in md
    assert "| a | 0.50 | 2 | 22.00 (1.100x) | 33.00 (1.100x) |" in md
    assert "a note" in md and "Regenerate with" in md and rep["command"] in md
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert pngs == {"ppl.png", "mc.png", "passkey.png", "passkey_a.png", "passkey_single_state.png",
                    "position_a.png", "position_single_state.png"}
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({p.name})" in md or p.name in md
    assert not list(tmp_path.glob(".*tmp*"))


def test_series_uses_the_teacher_for_ratio_zero():
    rep = fake_report()
    assert [(r["model"], r["ratio"]) for r in series(rep, "a")] == [("teacher", 0.0), ("a", 0.5), ("a", 1.0)]
    assert [r["model"] for r in series(rep, "single state")] == ["teacher", "single state"]


def test_partial_report_says_incomplete_and_plots_only_finished_suites(tmp_path, monkeypatch):
    rep = fake_report(complete=False)
    last = rep["runs"][-1]
    pk = last.pop("passkey")
    last["passkey_partial"] = pk | {"n": [[3, 0]] + [[0, 0]] * (len(pk["n"]) - 1), "mean_acc": 0.123}
    write_report(tmp_path, rep, plots=False)
    md = (tmp_path / "report.md").read_text()
    assert "**Incomplete**" in md and f"{last['model']} @ {last['ratio']:.2f}: passkey 1 of " in md
    assert not list(tmp_path.glob("*.png"))

    drawn, real = [], plots._against_ratio

    def spy(report, suite, *a, **k):
        drawn.append((suite, [(r["model"], r["ratio"]) for r in report["runs"] if suite in r]))
        return real(report, suite, *a, **k)

    monkeypatch.setattr(plots, "_against_ratio", spy)
    write_report(tmp_path, rep)
    assert {p.name for p in tmp_path.glob("*.png")} >= {"ppl.png", "mc.png", "passkey.png", "passkey_a.png"}
    passkey_runs = dict(drawn)["passkey"]  # the unfinished passkey run is not drawn
    assert ("single state", 0.5) not in passkey_runs and ("a", 0.5) in passkey_runs
    assert ("single state", 0.5) in dict(drawn)["ppl"]


def test_interrupted_write_keeps_the_previous_report(tmp_path, monkeypatch):
    write_report(tmp_path, fake_report(), plots=False)
    before = (tmp_path / "report.json").read_bytes()
    real = Path.write_text

    def dies_halfway(self, text, *a, **k):
        real(self, text[: len(text) // 2], *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", dies_halfway)
    rep = fake_report()
    rep["runs"] = rep["runs"][:1]
    with pytest.raises(KeyboardInterrupt):
        write_report(tmp_path, rep, plots=False)
    monkeypatch.undo()
    assert (tmp_path / "report.json").read_bytes() == before
    assert len(read_report(tmp_path)["runs"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]


def test_read_report_checks_the_format(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="dsla-eval-report/1"):
        read_report(tmp_path)


def test_markdown_handles_a_teacher_only_report():
    rep = fake_report()
    rep["models"], rep["runs"] = rep["models"][:1], rep["runs"][:1]
    md = to_markdown(rep)
    assert "## Models" not in md and "| teacher | 0.00 | 0 |" in md

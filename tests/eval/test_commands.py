"""`dsla eval` end to end on a tiny model: several students side by side, the teacher once, the
report and plots; reproducibility; bad input; an interrupted run leaves a whole (partial) report."""

from __future__ import annotations

import json
import shlex

import pytest

from dsla.cli import build_parser, main
from dsla.data import bigbench
from dsla.eval import commands
from dsla.eval.report import read_report

from .conftest import make_student
from .test_mc import TOY


@pytest.fixture(autouse=True)
def toy_tasks(monkeypatch):
    """BIG-bench is not fetched in tests: every task name loads a small constructed task."""
    monkeypatch.setattr(bigbench, "load_task", lambda name, home=None: bigbench.parse_task(name, TOY))


@pytest.fixture(scope="module")
def students(eval_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    return (make_student(eval_teacher, root / "dual", 2, seed=0),
            make_student(eval_teacher, root / "single", 1, seed=1))


def small_args(teacher, out, *extra: str) -> list[str]:
    """Suites (the leading words of ``extra``), small settings, then the rest of ``extra``."""
    suites = [e for e in extra[: next((i for i, e in enumerate(extra) if e.startswith("--")), len(extra))]]
    return ["eval", *suites, "--teacher", str(teacher), "--out", str(out), "--limit", "2", "--seq-len", "64",
            "--position-window", "256", "--contexts", "200", "--depths", "0.5", "--tasks",
            "social_iqa,timedial", "--no-progress", *extra[len(suites):]]


def test_two_students_side_by_side(eval_teacher, students, tmp_path, capsys):
    out = tmp_path / "report"
    args = small_args(eval_teacher, out, "--student", str(students[0]), "--student", f"{students[1]}@0.5",
                      "--ratios", "0,0.5,1")
    assert main(args) == 0
    rep = read_report(out)
    assert rep["complete"] and [m["label"] for m in rep["models"]] == ["teacher", "dual", "single"]
    assert [m.get("num_states") for m in rep["models"]] == [None, 2, 1]
    assert [(r["model"], r["ratio"], len(r["layers"])) for r in rep["runs"]] == [
        ("teacher", 0.0, 0), ("dual", 0.5, 2), ("dual", 1.0, 3), ("single", 0.5, 2)]  # single: its own ratios
    assert rep["runs"][1]["layers"] == [2, 0]  # the first layers of the student's order
    for r in rep["runs"]:
        assert set(r["seconds"]) == {"ppl", "position", "mc", "passkey"}
        assert set(r["mc"]) == {"social_iqa", "timedial"} and r["mc"]["social_iqa"]["n"] == 2
        assert r["passkey"]["n"] == [[2]] and r["position"]["windows"] == 2
    # different students give different numbers; the same student agrees with itself at ratio 0
    assert rep["runs"][1]["ppl"] != rep["runs"][3]["ppl"]
    assert {p.name for p in out.glob("*.png")} >= {"ppl.png", "mc.png", "passkey.png", "passkey_dual.png",
                                                   "passkey_single.png", "position_dual.png", "position_single.png"}
    md = (out / "report.md").read_text()
    assert "| single | 0.50 | 2 |" in md and rep["command"].startswith("dsla eval ppl position mc passkey --teacher")
    assert f"--student {students[1]}@0.5" in rep["command"] and "--limit 2" in rep["command"]
    assert "dual @ 1.00 (3 DSLA layers)" in capsys.readouterr().out
    again = build_parser().parse_args(shlex.split(rep["command"])[1:])  # the recorded command re-parses
    assert again.student == [(students[0], None), (students[1], [0.5])] and again.limit == 2
    assert again.ratios == [0.0, 0.5, 1.0] and again.tasks == "social_iqa,timedial" and again.seq_len == 64


def test_results_are_reproducible_from_the_seed(eval_teacher, students, tmp_path):
    def once(name, seed):
        out = tmp_path / name
        assert main(small_args(eval_teacher, out, "mc", "passkey", "position", "--student", str(students[0]),
                               "--ratios", "0.5", "--seed", str(seed), "--no-plots")) == 0
        def timeless(x):
            if isinstance(x, dict):
                return {k: timeless(v) for k, v in x.items() if k != "seconds"}
            return x

        return [timeless(r) for r in read_report(out)["runs"]]

    a = once("a", 3)
    assert len(a) == 1 and a[0]["model"] == "dual"  # no ratio 0 asked: no teacher run
    assert once("b", 3) == a
    assert json.dumps(once("c", 4)) != json.dumps(a)


def test_teacher_alone(eval_teacher, tmp_path):
    out = tmp_path / "t"
    assert main(small_args(eval_teacher, out, "ppl", "--ratios", "0,0.5")) == 0
    rep = read_report(out)
    assert [(r["model"], r["ratio"]) for r in rep["runs"]] == [("teacher", 0.0)]
    assert any("only the teacher" in n for n in rep["notes"])


def test_ppl_reports_the_out_of_domain_corpus_beside_the_others(eval_teacher, students, tmp_path, monkeypatch):
    from dsla.eval import plots

    titles = []
    real = plots._against_ratio

    def spy(report, suite, panels, *a, title=str, **kw):
        titles.extend(title(p) for p in panels if suite == "ppl")
        return real(report, suite, panels, *a, title=title, **kw)

    monkeypatch.setattr(plots, "_against_ratio", spy)
    out = tmp_path / "ood"
    assert main(small_args(eval_teacher, out, "ppl", "--student", str(students[0]), "--ratios", "0,0.5",
                           "--splits", "validation,test")) == 0
    rep = read_report(out)
    for r in rep["runs"]:
        for split in ("validation", "test"):
            assert list(r["ppl"][split]) == ["wikipedia", "lee", "shakespeare", "techdocs"]
    assert rep["config"]["ppl"]["out_of_domain"] == ["techdocs"]
    md = (out / "report.md").read_text()
    assert "| techdocs (out of domain) |" in md and "Django 5.1.4 documentation" in md
    assert "techdocs (out of domain)" in titles and "wikipedia" in titles


@pytest.mark.parametrize("extra,message", [
    (["perplexity"], "unknown suite(s) ['perplexity']"),
    (["mc", "--tasks", "social_iqa,nope"], "unknown multiple-choice task(s) ['nope']"),
    (["passkey", "--contexts", "1024"], "exceed the model's context of 512"),
    (["ppl", "--filler", "news"], "bad --filler"),
    (["mc", "--mc-max", "-1"], "--mc-max must be 0"),
    (["passkey", "--trials", "0"], "--trials must be positive"),
])
def test_bad_input_is_a_clear_error(eval_teacher, tmp_path, capsys, extra, message):
    out = tmp_path / "r"
    assert main(small_args(eval_teacher, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("ratios", ["1.5", "-0.1", "a,b"])
def test_ratio_outside_unit_interval_is_refused(eval_teacher, tmp_path, capsys, ratios):
    with pytest.raises(SystemExit) as e:
        main(small_args(eval_teacher, tmp_path / "r", "--ratios", ratios))
    assert e.value.code == 2 and "--ratios" in capsys.readouterr().err


def test_student_of_another_teacher_is_refused(eval_teacher, tmp_path, capsys):
    other = make_student(eval_teacher, tmp_path / "other", sha="f" * 64)
    out = tmp_path / "r"
    assert main(small_args(eval_teacher, out, "ppl", "--student", str(other))) == 2
    assert "was distilled from teacher" in capsys.readouterr().err and not out.exists()


def test_ratio_beyond_the_distilled_layers_is_refused(eval_teacher, tmp_path, capsys):
    partial = make_student(eval_teacher, tmp_path / "partial", order=(2,))
    assert main(small_args(eval_teacher, tmp_path / "r", "ppl", "--student", str(partial), "--ratios", "1")) == 2
    assert "finish `dsla distill`" in capsys.readouterr().err


def test_interrupted_run_leaves_a_whole_partial_report_and_resumes(eval_teacher, students, tmp_path, monkeypatch,
                                                                   capsys):
    real = commands._run_suite
    calls = {"n": 0}

    def dies_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(commands, "_run_suite", dies_on_second)
    out = tmp_path / "r"
    assert main(small_args(eval_teacher, out, "ppl", "--student", str(students[0]), "--ratios", "0,1")) == 130
    rep = read_report(out)
    assert not rep["complete"] and [r["model"] for r in rep["runs"]] == ["teacher"]
    assert "**Incomplete**" in (out / "report.md").read_text()
    # nothing half-written; the plot of the finished suite is drawn
    assert sorted(p.name for p in out.iterdir()) == ["ppl.png", "report.json", "report.md"]

    monkeypatch.setattr(commands, "_run_suite", real)  # resume: the teacher's run is reused as it was
    assert main(small_args(eval_teacher, out, "ppl", "--student", str(students[0]), "--ratios", "0,1",
                           "--resume")) == 0
    again = read_report(out)
    assert again["complete"] and again["runs"][0] == rep["runs"][0] and again["runs"][1]["model"] == "dual"
    assert main(small_args(eval_teacher, out, "ppl", "--seed", "9", "--resume")) == 2  # other settings
    assert "made with other settings" in capsys.readouterr().err and read_report(out) == again


def test_interrupted_resume_keeps_the_finished_runs_it_had_not_reached(eval_teacher, students, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "r"
    assert main(small_args(eval_teacher, out, "ppl", "mc", "--student", str(students[0]), "--ratios", "1")) == 0
    finished = read_report(out)["runs"]
    assert [(r["model"], r["ratio"]) for r in finished] == [("dual", 1.0)]
    real, ran = commands._run_suite, []

    def spy(*a, **k):
        ran.append(a[6])  # the converted layers of the run
        if len(ran) == 2 and dies:
            raise KeyboardInterrupt
        return real(*a, **k)

    # the teacher's run (first in the plan) is interrupted after its first suite was saved
    dies = True
    monkeypatch.setattr(commands, "_run_suite", spy)
    args = small_args(eval_teacher, out, "ppl", "mc", "--student", str(students[0]), "--ratios", "0,1", "--resume")
    assert main(args) == 130
    kept = read_report(out)["runs"]
    assert [r for r in kept if r["model"] == "dual"] == finished  # still there
    assert [r for r in kept if r["model"] == "teacher"][0].keys() >= {"ppl"}

    ran.clear()
    dies = False
    assert main(args) == 0
    again = read_report(out)
    assert ran == [[]]  # only the teacher's mc ran: its ppl and the student's run were reused
    assert again["complete"] and [r for r in again["runs"] if r["model"] == "dual"] == finished


def test_interrupted_passkey_keeps_its_finished_cells_and_resumes_from_them(eval_teacher, tmp_path, monkeypatch):
    from dsla.eval import passkey

    args = small_args(eval_teacher, tmp_path / "whole", "ppl", "passkey", "--contexts", "150,200,250")
    assert main(args) == 0
    whole = read_report(tmp_path / "whole")["runs"][0]
    assert "passkey" in whole and "passkey_partial" not in whole  # the partial copy saved per cell is gone

    real, calls = passkey.greedy_answers, []

    def dies_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(passkey, "greedy_answers", dies_on_third)
    out = tmp_path / "r"
    args = small_args(eval_teacher, out, "ppl", "passkey", "--contexts", "150,200,250")
    assert main(args) == 130
    run = read_report(out)["runs"][0]
    assert "ppl" in run and "passkey" not in run and run["passkey_partial"]["n"] == [[2], [2], [0]]

    calls.clear()
    assert main(args + ["--resume"]) == 0
    assert len(calls) == 1  # only the unfinished cell ran again
    again = read_report(out)["runs"][0]
    assert "passkey_partial" not in again and again["ppl"] == whole["ppl"]
    for key in ("acc", "n", "needle_position", "wrong_examples", "mean_acc"):
        assert again["passkey"][key] == whole["passkey"][key]

"""`dsla eval [SUITE ...]`: quality of students at several conversion ratios, as a report.

Ratio r converts the first round(r * L) layers of a student's order. The teacher (ratio 0) is
evaluated once and stands for every student's ratio 0. Suite inputs (windows, questions, passkey
prompts) are built once from the seed, so every model sees exactly the same ones.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import time
from pathlib import Path

log = logging.getLogger(__name__)

SUITES = ("ppl", "position", "mc", "passkey")


def _floats(name: str, lo: float | None = None, hi: float | None = None):
    def parse(text: str) -> list[float]:
        try:
            vals = [float(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects comma-separated numbers, got {text!r}") from None
        bad = [v for v in vals if (lo is not None and v < lo) or (hi is not None and v > hi)]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"{name} must lie in [{lo}, {hi}], got {bad or text!r}")
        return vals
    return parse


def _ints(name: str):
    def parse(text: str) -> list[int]:
        try:
            vals = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects comma-separated integers, got {text!r}") from None
        if not vals or min(vals) <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive integers, got {text!r}")
        return vals
    return parse


_ratios = _floats("--ratios", 0.0, 1.0)


def _student(text: str) -> tuple[Path, list[float] | None]:
    """``DIR`` or ``DIR@R1,R2``: a student directory and, optionally, its own ratios."""
    head, at, tail = text.rpartition("@")
    if at and head:
        return Path(head), _floats(f"--student {text}: ratios after @", 0.0, 1.0)(tail)
    return Path(text), None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dsla.cli import add_model_arguments
    from dsla.data.bigbench import TASKS

    add_model_arguments(p)
    p.add_argument("suites", nargs="*", default=list(SUITES), help=f"suites to run (default: all of {SUITES})")
    p.add_argument("--student", type=_student, action="append", default=[], metavar="DIR[@RATIOS]",
                   help="student directory, optionally with its own ratios (DIR@0.5); repeat to compare "
                        "several side by side (omit: the teacher alone)")
    p.add_argument("--ratios", type=_ratios, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="conversion ratios in [0, 1]")
    p.add_argument("--out", type=Path, default=None, help="report directory (report.json, report.md, *.png)")
    p.add_argument("--seed", type=int, default=0, help="seed for question order, windows, keys and filler")
    p.add_argument("--limit", type=int, default=None,
                   help="quick run: at most N questions per task, passkey trials per cell, position "
                        "windows and ppl windows per corpus")
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs already in --out's report.json (same settings) instead of recomputing them")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g = p.add_argument_group("ppl")
    g.add_argument("--splits", default="test", help="comma-separated: validation,test")
    g.add_argument("--seq-len", type=int, default=1024, help="tokens per perplexity window")
    g.add_argument("--max-tokens", type=int, default=16384, help="tokens per corpus and split")
    g = p.add_argument_group("position")
    g.add_argument("--position-window", type=int, default=8192, help="tokens per window (capped at the context)")
    g.add_argument("--position-windows", type=int, default=8, help="number of windows")
    g = p.add_argument_group("mc")
    g.add_argument("--tasks", default=",".join(TASKS), help="comma-separated BIG-bench tasks")
    g.add_argument("--mc-max", type=int, default=500, help="questions per task, drawn with the seed (0: all)")
    g = p.add_argument_group("passkey")
    g.add_argument("--contexts", type=_ints("--contexts"), default=[1024, 2048, 4096, 8192], help="prompt lengths")
    g.add_argument("--depths", type=_floats("--depths", 0.0, 1.0), default=[0.1, 0.5, 0.9], help="key depths")
    g.add_argument("--trials", type=int, default=20, help="trials per (context, depth) cell")
    g.add_argument("--filler", default="wikipedia,lee", help="corpora whose test text is the filler")
    g.add_argument("--plain", action="store_true", help="plain-text passkey prompt instead of the chat template")


def _cap(value: int, limit: int | None) -> int:
    return value if limit is None else min(value, limit)


def _validate(args: argparse.Namespace) -> None:
    from dsla.data.bigbench import check_tasks
    from dsla.data.corpora import ALL_CORPORA

    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}: choose from {list(SUITES)}")
    args.suites = [s for s in SUITES if s in args.suites]  # canonical order, no repeats
    args.tasks = check_tasks(t for t in args.tasks.split(",") if t)
    args.filler = [c for c in args.filler.split(",") if c]
    args.splits = [s for s in args.splits.split(",") if s]
    bad = [c for c in args.filler if c not in ALL_CORPORA] + [s for s in args.splits if s not in ("validation", "test")]
    if bad or not args.filler or not args.splits:
        raise ValueError(f"bad --filler/--splits {bad}: corpora are {list(ALL_CORPORA)}, splits validation,test")
    for flag in ("limit", "trials", "position_windows", "position_window", "seq_len", "max_tokens"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {v}")
    if args.mc_max < 0:
        raise ValueError(f"--mc-max must be 0 (all questions) or positive, got {args.mc_max}")
    if len({p.resolve() for p, _ in args.student}) != len(args.student):
        raise ValueError("the same --student directory is given twice")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run: the suites plus every flag not at its default."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    parts = ["dsla", "eval", *args.suites]
    for action in defaults._actions:
        name, dest = (action.option_strings or [None])[-1], action.dest
        if name is None or dest in ("help", "suites", "threads", "resume", "no_progress") or not hasattr(args, dest):
            continue
        v, d = getattr(args, dest), action.default
        if dest in ("tasks", "filler", "splits") and isinstance(v, list):
            v = ",".join(v)
        if v == d:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            parts.append(name)
        elif dest == "student":
            parts += [x for p, rs in v for x in (name, str(p) + ("@" + ",".join(f"{r:g}" for r in rs) if rs else ""))]
        else:
            parts += [name, ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
                      if isinstance(v, list) else str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def _labels(dirs: list[Path]) -> list[str]:
    names = [d.resolve().name for d in dirs]
    return [f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(dirs, names)]


def _prepare_inputs(args, teacher: Path, tok, cfg) -> tuple[dict, dict, list[str]]:
    """Build every suite's inputs once; return (inputs, report config, notes)."""
    from dsla.data.corpora import ALL_CORPORA, CORPORA, DESCRIPTIONS, EVAL_CORPORA, load_documents, load_texts

    inputs, conf, notes = {}, {}, []
    lim = args.limit
    if "ppl" in args.suites:  # every corpus: the distillation's domains and the out-of-domain ones
        conf["ppl"] = {"splits": args.splits, "seq_len": args.seq_len,
                       "max_tokens": _cap(args.max_tokens, None if lim is None else lim * args.seq_len),
                       "corpora": {c: DESCRIPTIONS[c] for c in ALL_CORPORA}, "out_of_domain": list(EVAL_CORPORA)}
    if "position" in args.suites:
        from dsla.eval.position import select_windows

        window = min(args.position_window, cfg.max_position_embeddings)
        # the distillation corpora only, as in earlier reports (the out-of-domain one is a ppl matter)
        docs = {c: load_documents(teacher, c, "test") for c in CORPORA}
        w = select_windows(docs, window, _cap(args.position_windows, lim), args.seed)
        inputs["position"] = w
        conf["position"] = {"window": window, "windows": len(w.sources), "sources": list(w.sources),
                            "concatenated": w.concatenated}
        if w.concatenated:
            notes.append(f"position: no test document has {window} tokens, so each corpus' test documents "
                         "were concatenated and windows may span document boundaries")
    if "mc" in args.suites:
        from dsla.data.bigbench import load_task
        from dsla.eval.mc import build_items

        per_task = args.mc_max or None
        if lim is not None:
            per_task = min(per_task or lim, lim)
        inputs["mc"] = {t: build_items(load_task(t), tok.encode, per_task, args.seed) for t in args.tasks}
        conf["mc"] = {"tasks": args.tasks, "max_per_task": per_task, "source": "bigbench==1.0.0 sdist, zero-shot"}
    if "passkey" in args.suites:
        from dsla.eval.passkey import PasskeyBuilder, build_trials, filler_sentences

        too_long = [c for c in args.contexts if c > cfg.max_position_embeddings]
        if too_long:
            raise ValueError(f"passkey contexts {too_long} exceed the model's context of "
                             f"{cfg.max_position_embeddings} tokens: pass smaller --contexts")
        texts = [t for c in args.filler for t in load_texts(c, "test", teacher)]
        chat = not args.plain and tok.chat_template is not None
        if not args.plain and not chat:
            notes.append("passkey: the tokenizer has no chat template, so the prompt is plain text")
        builder = PasskeyBuilder(tok, filler_sentences(texts, tok.encode), chat=chat)
        trials = _cap(args.trials, lim)
        inputs["passkey"] = build_trials(builder, args.contexts, args.depths, trials, args.seed)
        conf["passkey"] = {"contexts": args.contexts, "depths": args.depths, "trials": trials,
                           "filler": args.filler, "chat": chat}
    return inputs, conf, notes


def _run_suite(suite: str, model, teacher: Path, tok, inputs: dict, conf: dict, layers: list[int],
               stop_ids: set[int], show: bool, partial: dict | None = None, on_cell=None) -> dict:
    """One suite's result for one model and plan (``partial``/``on_cell``: passkey cells, see run_passkey)."""
    if suite == "ppl":
        from dsla.eval.ppl import perplexity

        c = conf["ppl"]
        return {s: perplexity(model, teacher, layers, list(c["corpora"]), s, c["seq_len"], c["max_tokens"])
                for s in c["splits"]}
    if suite == "position":
        from dsla.eval.position import run_position

        return run_position(model, inputs["position"], layers, show)
    if suite == "mc":
        from dsla.eval.mc import run_mc

        return run_mc(model, inputs["mc"], layers, show)
    from dsla.eval.passkey import run_passkey

    return run_passkey(model, tok, inputs["passkey"], layers, stop_ids, show_progress=show, previous=partial,
                       on_cell=on_cell)


def _summary(run: dict) -> str:
    parts = [f"{run['model']} @ {run['ratio']:.2f} ({len(run['layers'])} DSLA layers):"]
    for split, v in run.get("ppl", {}).items():
        parts.append(f"ppl[{split}] " + " ".join(f"{c}={x:.2f}" for c, x in v.items()))
    if "position" in run:
        parts.append("loss by position " + " ".join(f"{b}={x:.3f}" for b, x in zip(run["position"]["buckets"], run["position"]["loss"])))
    if "mc" in run:
        parts.append("mc acc " + " ".join(f"{t.split('/')[-1]}={m['acc']:.3f}" for t, m in run["mc"].items()))
    if "passkey" in run:
        parts.append(f"passkey mean {run['passkey']['mean_acc']:.2f}")
    return "\n  ".join(parts)


def _resumable_runs(args: argparse.Namespace, report: dict) -> dict[tuple[str, float], dict]:
    """Runs (whole, or with some suites / passkey cells done) of the report already in --out that
    this invocation would repeat exactly."""
    from dsla.eval.report import read_report

    if args.out is None or not (args.out / "report.json").is_file():
        return {}
    old = read_report(args.out)
    same = {k: v for k, v in old["config"].items() if k != "ratios"} == \
        {k: v for k, v in json.loads(json.dumps(report["config"])).items() if k != "ratios"}
    if not same:
        raise ValueError(f"--resume: {args.out / 'report.json'} was made with other settings (suites, seed, "
                         "limits or teacher): use another --out or drop --resume")
    dirs = {m["label"]: m.get("dir") for m in report["models"]}
    old_dirs = {m["label"]: m.get("dir") for m in old["models"]}
    return {(r["model"], r["ratio"]): r for r in old["runs"]
            if r["model"] in dirs and dirs[r["model"]] == old_dirs.get(r["model"])}


def run(args: argparse.Namespace) -> int:
    from dsla.cli import DTYPES
    from dsla.distill.artifact import load_student, read_manifest
    from dsla.plan import layers_for_ratio
    from dsla.sampling import stop_token_ids
    from dsla.eval.report import TEACHER, FORMAT, write_report
    from dsla.model.loading import load_teacher, teacher_hash
    from dsla.model.tokenizer import Tokenizer
    from dsla.paths import resolve_teacher

    _validate(args)
    t_start = time.time()
    teacher = resolve_teacher(args.teacher)
    sha = teacher_hash(teacher)
    dirs = [d for d, _ in args.student]
    own = [sorted(set(rs if rs is not None else args.ratios)) for _, rs in args.student]
    manifests = [read_manifest(d) for d in dirs]
    for d, m in zip(dirs, manifests):  # fail before any work, not halfway through the report
        if m["teacher"]["sha256"] != sha:
            raise ValueError(f"student {d} was distilled from teacher {m['teacher']['name']} (sha256 "
                             f"{m['teacher']['sha256'][:12]}...) but --teacher {teacher} hashes to {sha[:12]}...: "
                             "use the matching --teacher or distill a new student")
    model = load_teacher(teacher, dtype=DTYPES[args.dtype])
    L = model.cfg.num_hidden_layers
    for d, m, rs in zip(dirs, manifests, own):
        for r in rs:
            layers_for_ratio(m["order"], L, r, m["layers_done"])
    tok = Tokenizer(teacher)
    stop_ids = set(stop_token_ids(model.cfg.eos_token_id, tok))
    labels = _labels(dirs)
    ratios = sorted(set(args.ratios).union(*own))
    notes = []
    if not dirs and any(r > 0 for r in ratios):
        notes.append("no --student given: only the teacher (ratio 0) was evaluated")
        log.warning(notes[-1])
    inputs, conf, more = _prepare_inputs(args, teacher, tok, model.cfg)
    notes += more
    report = {
        "format": FORMAT, "complete": False,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(args),
        "config": {"teacher": {"path": str(teacher), "name": teacher.name, "sha256": sha},
                   "suites": args.suites, "ratios": ratios if dirs else [0.0], "seed": args.seed,
                   "limit": args.limit, "dtype": args.dtype, **conf},
        "models": [{"label": TEACHER, "dir": None}] + [
            {"label": lab, "dir": str(d), "num_states": m["config"]["dsla"].get("num_states"),
             "layers_done": len(m["layers_done"]), "order": m["order"], "ratios": rs}
            for lab, d, m, rs in zip(labels, dirs, manifests, own)],
        "notes": notes, "runs": [],
    }
    plan = [(TEACHER, None, None, 0.0)] if not dirs or any(0.0 in rs for rs in own) else []
    plan += [(lab, d, m, r) for lab, d, m, rs in zip(labels, dirs, manifests, own) for r in rs if r > 0]
    done = _resumable_runs(args, report) if args.resume else {}
    show = not args.no_progress
    loaded = None

    plan_keys = [(label, r) for label, _, _, r in plan]

    def save(entry: dict, plots: bool = False) -> None:
        """Write the report with ``entry`` (the current run, as far as it got) as its last run, and the
        previous report's runs of this plan not reached yet, so an interruption now loses none of them."""
        if not report["runs"] or report["runs"][-1] is not entry:
            report["runs"].append(entry)
        report["wall_time_s"] = round(time.time() - t_start, 1)
        reached = {(e["model"], e["ratio"]) for e in report["runs"]}
        later = [done[k] for k in plan_keys if k in done and k not in reached]
        if args.out is not None:
            write_report(args.out, {**report, "runs": report["runs"] + later}, plots=plots and not args.no_plots)

    for i, (label, student_dir, m, r) in enumerate(plan):
        prev = done.get((label, r), {})
        todo = [s for s in args.suites if s not in prev]
        if not todo:
            report["runs"].append(prev)
            print(f"{label} @ {r:.2f}: reused from the previous report", flush=True)
            continue
        layers: list[int] = []
        if student_dir is not None:
            if loaded != student_dir:
                model.dsla.clear()  # the previous student's layers must not leak into this one
                load_student(model, student_dir, sha)
                loaded = student_dir
            layers = layers_for_ratio(m["order"], L, r, m["layers_done"])
        if prev:
            print(f"{label} @ {r:.2f}: resuming ({', '.join(todo)} to do)", flush=True)
        entry = {"model": label, "ratio": r, "layers": layers, "seconds": dict(prev.get("seconds", {})),
                 **{s: prev[s] for s in args.suites if s in prev}}
        if "passkey_partial" in prev and "passkey" not in prev:
            entry["passkey_partial"] = prev["passkey_partial"]

        def on_cell(partial: dict, entry: dict = entry) -> None:  # keep an interrupted run's passkey cells
            entry["passkey_partial"] = partial
            save(entry)

        for suite in todo:
            t0 = time.time()
            entry[suite] = _run_suite(suite, model, teacher, tok, inputs, report["config"], layers, stop_ids, show,
                                      entry.get("passkey_partial") if suite == "passkey" else None, on_cell)
            if suite == "passkey":  # its cells' times, those of an interrupted run included
                entry.pop("passkey_partial", None)  # finished: the partial copy saved on the way goes
                entry["seconds"][suite] = round(sum(map(sum, entry[suite]["seconds"])), 1)
            else:
                entry["seconds"][suite] = round(time.time() - t0, 1)
            # the figures follow every finished run (the last run's: with the finished report below)
            save(entry, plots=suite == todo[-1] and i < len(plan) - 1)
        print(_summary(entry), flush=True)
    report["complete"] = True
    report["wall_time_s"] = round(time.time() - t_start, 1)
    if args.out is not None:
        write_report(args.out, report, plots=not args.no_plots)
        print(f"report written to {args.out / 'report.md'}")
    return 0

"""PNG plots of an evaluation report (matplotlib, imported here only, Agg backend).

- ``ppl.png``: perplexity against conversion ratio, a panel per corpus (out-of-domain ones marked),
  a line per student.
- ``mc.png``: accuracy against ratio, a panel per task (95% interval as a band), chance dashed.
- ``passkey.png``: mean passkey accuracy against ratio; ``passkey_<student>.png``: a
  context x depth heatmap per ratio.
- ``position_<student>.png``: loss by position bucket, a line per ratio.
Each file is written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from dsla.eval.runs import TEACHER, ood_label, series, slug, students
from dsla.fileio import atomic_write


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    _plt().close(fig)


def _labels(report: dict) -> list[str]:
    return students(report) or [TEACHER]


def _legend(report: dict, label: str) -> str:
    """The label, with the number of states when the manifest says it (dual vs single ablations)."""
    n = next((m.get("num_states") for m in report["models"] if m["label"] == label), None)
    return f"{label} ({n}-state)" if n else label


def _grid(n: int, width: float = 3.6, height: float = 3.0):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = _plt().subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat[:n]


def _against_ratio(report: dict, suite: str, panels: list[str], value: Callable[[dict, str], float],
                   ylabel: str, path: Path, band: Callable[[dict, str], tuple[float, float]] | None = None,
                   hline: Callable[[str], float] | None = None, logy: bool = False,
                   title: Callable[[str], str] = str) -> None:
    fig, axes = _grid(len(panels))
    for ax, panel in zip(axes, panels):
        for label in _labels(report):
            runs = [r for r in series(report, label) if suite in r]
            if not runs:
                continue
            xs = [r["ratio"] for r in runs]
            line, = ax.plot(xs, [value(r, panel) for r in runs], marker="o", label=_legend(report, label))
            if band is not None:
                lo, hi = zip(*(band(r, panel) for r in runs))
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        if hline is not None:
            ax.axhline(hline(panel), color="gray", linestyle="--", linewidth=1, label="chance")
        ax.set_title(title(panel), fontsize=9)
        ax.set_xlabel("conversion ratio")
        ax.set_ylabel(ylabel)
        lo, hi = ax.get_ylim()
        if logy and lo > 0 and hi / lo > 4:  # wide ranges (a collapsed student) on a log axis, plain labels
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _first(report: dict, suite: str) -> dict:
    return next(r[suite] for r in report["runs"] if suite in r)


def plot_ppl(report: dict, out: Path) -> None:
    split = report["config"]["ppl"]["splits"][0]
    corpora = list(_first(report, "ppl")[split])
    _against_ratio(report, "ppl", corpora, lambda r, c: r["ppl"][split][c], f"{split} perplexity",
                   out / "ppl.png", logy=True, title=lambda c: ood_label(report, c))


def plot_mc(report: dict, out: Path) -> None:
    first = _first(report, "mc")
    tasks = list(first)
    mean = "mean over tasks"

    def get(r: dict, t: str, key: str = "acc"):
        if t == mean:
            return sum(r["mc"][k][key] for k in tasks) / len(tasks)
        return r["mc"][t][key]

    _against_ratio(report, "mc", tasks + [mean], get, "accuracy", out / "mc.png",
                   band=lambda r, t: (get(r, t), get(r, t)) if t == mean else tuple(r["mc"][t]["acc_ci"]),
                   hline=lambda t: get({"mc": first}, t, "chance"))


def plot_passkey(report: dict, out: Path) -> None:
    plt = _plt()
    _against_ratio(report, "passkey", ["passkey (mean over cells)"], lambda r, _: r["passkey"]["mean_acc"],
                   "accuracy", out / "passkey.png")
    for label in _labels(report):
        runs = [r for r in series(report, label) if "passkey" in r]
        if not runs:
            continue
        fig, axes = _grid(len(runs), width=3.4, height=3.0)
        cols = min(len(runs), 4)
        for k, (ax, r) in enumerate(zip(axes, runs)):
            p = r["passkey"]
            im = ax.imshow(p["acc"], vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(p["depths"])), [f"{d:.0%}" for d in p["depths"]])
            ax.set_yticks(range(len(p["contexts"])), [str(c) for c in p["contexts"]])
            for i, row in enumerate(p["acc"]):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if v < 0.6 else "black")
            ax.set_title(f"{r['model']} @ ratio {r['ratio']:.2f}", fontsize=9)
            ax.set_xlabel("depth")
            if k % cols == 0:
                ax.set_ylabel("context (tokens)")
            else:
                ax.tick_params(labelleft=False)
        fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy")
        _save(fig, out / f"passkey_{slug(label)}.png")
        plt.close("all")


def plot_position(report: dict, out: Path) -> None:
    plt = _plt()
    for label in _labels(report):
        runs = [r for r in series(report, label) if "position" in r]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for r in runs:
            p = r["position"]
            xs = range(len(p["buckets"]))
            ax.errorbar(xs, p["loss"], yerr=[0 if math.isnan(s) else s for s in p["se"]], marker="o",
                        capsize=3, label=f"{r['model']} @ {r['ratio']:.2f}")
            ax.set_xticks(list(xs), p["buckets"])
        ax.set_xlabel("token position")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"loss by position: {_legend(report, label)}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, out / f"position_{slug(label)}.png")


def write_plots(out_dir: str | Path, report: dict) -> list[Path]:
    """Draw every plot the report has data for into ``out_dir``; return the files written."""
    out = Path(out_dir)
    before = set(out.glob("*.png"))
    drawers = {"ppl": plot_ppl, "mc": plot_mc, "passkey": plot_passkey, "position": plot_position}
    for suite in report["config"]["suites"]:
        if any(suite in r for r in report["runs"]):
            drawers[suite](report, out)
    return sorted(set(out.glob("*.png")) - before) or sorted(out.glob("*.png"))

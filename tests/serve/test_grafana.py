"""docs/grafana/dsla.json references only metrics (and labels) that the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "dsla.json"


def exprs(dash: dict) -> list[str]:
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return out + [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label names in by (...) and {...} left out)."""
    return set(re.findall(r"\bdsla_\w+", re.sub(r"by \([^)]*\)|\{[^}]*\}", "", expr)))


def exported() -> tuple[set[str], set[str]]:
    """Series names (histograms with _bucket/_sum/_count) and label names /metrics can show."""
    from dsla.serve.metrics import Metrics

    m = Metrics()
    names, labels = set(), {"le"}
    for line in m.render().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    labels |= {label for _, label, _ in Metrics.LABELLED.values()} | {"finish_reason"}
    return names, labels


def test_every_metric_and_label_in_the_grafana_dashboard_is_exported():
    dash = json.loads(DASHBOARD.read_text())
    names, labels = exported()
    used = {n for e in exprs(dash) for n in metric_names(e)}
    assert len(used) >= 15 and used - names == set(), sorted(used - names)
    used_labels = {label for e in exprs(dash) for group in re.findall(r"by \(([^)]*)\)", e)
                   for label in re.split(r"\s*,\s*", group.strip())}
    used_labels |= {label for p in dash["panels"] for t in p["targets"]
                    for label in re.findall(r"\{\{(\w+)\}\}", t.get("legendFormat", ""))}
    assert used_labels - labels == set(), sorted(used_labels - labels)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_each_series_the_dashboard_uses_appears_in_the_metrics_text():
    """The same check against rendered series (labelled families once they have a value)."""
    from dsla.serve.metrics import Metrics

    m = Metrics()
    m.request_finished("stop")
    m.inc_labelled("generation_tokens_by_dsla_layers_total", 1)
    m.set_labelled("layer_is_dsla", 0, 1)
    text = m.render()
    series = {re.split(r"[{ ]", ln)[0] for ln in text.splitlines() if ln and not ln.startswith("#")}
    used = {n for e in exprs(json.loads(DASHBOARD.read_text())) for n in metric_names(e)}
    assert used - series == set(), sorted(used - series)

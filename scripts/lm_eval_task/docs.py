"""Loads dsla_mc.jsonl (beside this file) for lm-evaluation-harness, without the hub or a cache."""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(**_kwargs):
    """{"test": Dataset} of the hand-written questions; lm_eval passes task metadata, unused here."""
    import json

    import datasets

    rows = [json.loads(line) for line in (HERE / "dsla_mc.jsonl").read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}

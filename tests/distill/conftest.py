"""Distillation tests write their caches (the teacher's top-k logits) under a temporary DSLA_HOME."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSLA_HOME", str(tmp_path / "home"))

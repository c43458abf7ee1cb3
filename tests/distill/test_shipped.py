"""The shipped default student loads against the prepared default teacher, and refuses another."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dsla.data import teacher
from dsla.distill.artifact import load_student, read_manifest
from dsla.paths import SHIPPED_STUDENT_DIR, default_teacher_dir

REAL_TEACHER = default_teacher_dir(Path(os.environ.get("DSLA_HOME", Path.home() / ".cache" / "dsla")).expanduser())
pytestmark = pytest.mark.skipif(not (SHIPPED_STUDENT_DIR / "manifest.json").is_file(),
                                reason="no shipped student in this checkout")


def test_shipped_student_is_small_and_names_its_teacher():
    m = read_manifest(SHIPPED_STUDENT_DIR)
    assert len(m["teacher"]["sha256"]) == 64 and m["layers_done"]
    assert (SHIPPED_STUDENT_DIR / "dsla.safetensors").is_file(), "the shipped weights are missing (git-ignored?)"
    size = sum(f.stat().st_size for f in SHIPPED_STUDENT_DIR.iterdir())
    assert size <= 25_000_000, f"the shipped student is {size / 1e6:.2f} MB, over 25 MB"
    report = json.loads((SHIPPED_STUDENT_DIR / "report.json").read_text())
    assert any(r["ratio"] == 0 for r in report["runs"]), "its eval report needs the teacher's ratio-0 run"
    students = [x["label"] for x in report["models"] if x["label"] != "teacher"]
    assert len(students) == 1, f"the server reads the first student of a report: ship one with this student only, not {students}"


def test_make_test_setup_can_load_the_tiny_teacher_and_the_shipped_student_refuses_it(tiny_dir):
    from dsla.model.loading import load_teacher
    with pytest.raises(ValueError, match="distilled from teacher"):
        load_student(load_teacher(tiny_dir), SHIPPED_STUDENT_DIR, "0" * 64)


@pytest.mark.teacher
@pytest.mark.skipif(not teacher.is_complete(REAL_TEACHER), reason=f"no prepared teacher in {REAL_TEACHER}")
def test_shipped_student_loads_against_the_prepared_teacher():
    from dsla.model.loading import load_teacher, teacher_hash
    model = load_teacher(REAL_TEACHER, dtype=torch.bfloat16)
    m = load_student(model, SHIPPED_STUDENT_DIR, teacher_hash(REAL_TEACHER))
    with torch.no_grad():
        out = model(torch.arange(100, 164)[None], dsla_layers=m["layers_done"])
    assert torch.isfinite(out).all()

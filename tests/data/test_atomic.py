"""Crash-safe cache writes."""

from __future__ import annotations

import os

import pytest

from dsla.data.atomic import atomic_dir, remove_stale_temporaries


def test_success_replaces_target_as_a_whole(tmp_path):
    target = tmp_path / "corpus"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_failure_leaves_target_untouched(tmp_path):
    target = tmp_path / "corpus"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "half.npy").write_bytes(b"\0" * 10)
            raise KeyboardInterrupt
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "fresh"):
            raise RuntimeError("boom")
    assert not (tmp_path / "fresh").exists()


def test_leftovers_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / ".corpus.tmp-999999999-abc"  # no such pid
    alive = tmp_path / f".corpus.tmp-{os.getpid()}-abc"
    dead.mkdir()
    alive.mkdir()
    remove_stale_temporaries(tmp_path / "corpus")
    assert not dead.exists() and alive.exists()

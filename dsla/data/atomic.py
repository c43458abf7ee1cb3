"""Crash-safe writes into the cache: build in a temporary sibling, then rename into place.

A directory or file under ``$DSLA_HOME`` is either absent or complete: builders write into a
temporary directory next to the target (same filesystem, so the final ``os.replace`` is
atomic) and the target only ever appears fully written. Temporaries left by a killed process
are named ``.<target>.tmp-<pid>-*`` and are removed by the next build once that pid is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON (sorted keys, trailing newline)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> None:
    """Delete ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` siblings of dead processes."""
    if not target.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for p in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = p.name[len(f".{target.name}.{kind}-") :].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                log.info("removing leftover temporary %s", p)
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _default_permissions(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain mkdir/open would (mkdtemp uses 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``target`` when the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary directory is deleted and
    ``target`` is left exactly as it was. An existing ``target`` is replaced as a whole.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        if target.exists():
            prefix = f".{target.name}.old-{os.getpid()}-"
            old = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

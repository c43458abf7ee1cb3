"""Where dsla keeps its cache: teachers, corpora, students. Nothing here touches the network."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TEACHER_NAME = "SmolLM2-135M-Instruct"


def dsla_home() -> Path:
    """The cache root: ``$DSLA_HOME``, or ``~/.cache/dsla`` when unset."""
    env = os.environ.get("DSLA_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dsla"


def default_teacher_dir(home: Path | None = None) -> Path:
    """Directory of the converted default teacher (config.json, model.safetensors, tokenizer)."""
    return (home or dsla_home()) / "teachers" / DEFAULT_TEACHER_NAME


def default_student_dir(home: Path | None = None) -> Path:
    """Where `make student` distils the default teacher from scratch (in the cache)."""
    return (home or dsla_home()) / "students" / "default"


# The shipped default student: a compact artifact (q/o as bfloat16 deltas from the teacher, the
# DSLA parameters, the manifest with the teacher's sha256, and its eval report), in the package.
SHIPPED_STUDENT_DIR = Path(__file__).resolve().parent / "students" / "default"


def resolve_teacher(teacher: str | os.PathLike | None, home: Path | None = None) -> Path:
    """Return the teacher directory to use, or raise ``FileNotFoundError`` saying what to do.

    ``None`` means the default teacher in the cache, which ``dsla prepare`` creates.
    """
    path = Path(teacher).expanduser() if teacher is not None else default_teacher_dir(home)
    if not (path / "config.json").is_file():
        if teacher is None:
            raise FileNotFoundError(
                f"the default teacher is not in the cache ({path}): run `dsla prepare` first "
                "(or set DSLA_HOME to the cache you prepared)"
            )
        raise FileNotFoundError(
            f"teacher directory {path} has no config.json: pass a local Hugging Face Llama "
            "directory (config.json + *.safetensors + tokenizer files), or omit --teacher "
            "and run `dsla prepare` for the default one"
        )
    return path

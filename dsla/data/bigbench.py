"""BIG-bench multiple-choice tasks, read from the ``bigbench==1.0.0`` sdist (evaluation only).

The sdist is ~360 MB, so it is fetched once with ``pip download --no-deps --no-binary :all:``
(``dsla.data.sources.fetch_archive``), only the task files used here are extracted into
``$DSLA_HOME/bigbench/1.0.0/<task>/task.json`` (each pinned by sha256), and the archive is then
deleted. The tasks are never used for training: their files carry BIG-bench's canary string.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

from dsla.data.atomic import atomic_dir
from dsla.data.sources import Archive, fetch_archive
from dsla.paths import dsla_home

log = logging.getLogger(__name__)

BIGBENCH = Archive("bigbench", "1.0.0", wheel=False,
                   sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
# task name (as used on the command line and in reports) -> (path inside benchmark_tasks/, sha256)
TASKS = {
    "social_iqa": ("social_iqa/task.json",
                   "edc9f568b70ae6d4af0783764dbe4e4f18aa1242c675a93f534338d73a565348"),
    "cause_and_effect/one_sentence": ("cause_and_effect/one_sentence/task.json",
                                      "a7b000d3de3720a7ab8822f0608598fa7b23a6b1ffe7c9fa0c53772e254bc5d2"),
    "cause_and_effect/two_sentences": ("cause_and_effect/two_sentences/task.json",
                                       "74b23a42e6c7663505ce60bf845dd138e3b9a977a9508c443e4de8990da0edb7"),
    "goal_step_wikihow/goal_inference": ("goal_step_wikihow/goal_inference/task.json",
                                         "ae9d68546ae17707034b284444169b6035ea291dfab15826edaa867888090de6"),
    "timedial": ("timedial/task.json",
                 "fccc6b6981fcd3bacdf9a3467e6be9ada9efcd75510175d98b1c8e9269bb5cfb"),
    "date_understanding": ("date_understanding/task.json",
                           "ff716f0e399109146db3a998281c39954907b78268a9b633a95582d63847822f"),
    "logical_deduction/three_objects": ("logical_deduction/three_objects/task.json",
                                        "5e3f4a7569cb70bb1469374d3d34fb7883445a9d5743e1a81fd8dcdaf6fcb40f"),
}


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question: ``choices`` in the file's order, ``scores`` BIG-bench's."""

    input: str
    choices: tuple[str, ...]
    scores: tuple[float, ...]

    @property
    def answer(self) -> int:
        """Index of the correct choice (the highest score; the first one on a tie, as BIG-bench)."""
        return self.scores.index(max(self.scores))


@dataclass(frozen=True)
class MCTask:
    """A BIG-bench JSON task: its examples and the prompt-format fields it declares."""

    name: str
    examples: tuple[MCExample, ...]
    task_prefix: str = ""
    input_prefix: str = "\nQ: "  # BIG-bench's defaults when a task does not set them
    output_prefix: str = "\nA: "
    choice_prefix: str = "\n  choice: "
    append_choices_to_input: bool = True


def check_tasks(names) -> list[str]:
    """Return ``names`` as a list, or raise ``ValueError`` naming the unknown ones."""
    names = list(names)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown multiple-choice task(s) {unknown}: choose from {list(TASKS)}")
    return names


def tasks_dir(home: Path | None = None) -> Path:
    return (home or dsla_home()) / "bigbench" / BIGBENCH.version


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_complete(root: Path) -> bool:
    for rel, digest in TASKS.values():
        p = root / rel
        if not p.is_file() or _sha(p.read_bytes()) != digest:
            return False
    return True


def prepare_bigbench(home: Path | None = None, keep_archive: bool = False) -> Path:
    """Make sure every task in ``TASKS`` is extracted in the cache; return the tasks directory.

    Downloads the sdist only when a task file is missing. Raises ``RuntimeError`` with what to do
    when the download fails (offline, no index) or a file does not match its pinned sha256.
    """
    root = tasks_dir(home)
    if _is_complete(root):
        return root
    try:
        archive = fetch_archive(BIGBENCH, home)
    except RuntimeError as exc:
        raise RuntimeError(
            f"the BIG-bench task files are not in the cache ({root}) and fetching the "
            f"bigbench=={BIGBENCH.version} sdist failed: {exc}\nRun once with the package index "
            "reachable, or copy a prepared bigbench/ folder into $DSLA_HOME, or leave out the mc suite."
        ) from exc
    log.info("extracting %d BIG-bench task files from %s", len(TASKS), archive.name)
    wanted = {_PREFIX + rel: (rel, digest) for rel, digest in TASKS.values()}
    with atomic_dir(root) as tmp:
        with tarfile.open(archive, "r:gz") as tf:
            for member in tf:
                if member.name not in wanted:
                    continue
                rel, digest = wanted.pop(member.name)
                data = tf.extractfile(member).read()
                if _sha(data) != digest:
                    raise RuntimeError(f"{member.name} in {archive} has sha256 {_sha(data)}, expected "
                                       f"{digest}: delete {archive} and try again")
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
        if wanted:
            raise RuntimeError(f"{archive} lacks {sorted(wanted)}: delete it and try again")
    if not keep_archive:  # 360 MB that is no longer needed: the used files are extracted
        archive.unlink(missing_ok=True)
    return root


def parse_task(name: str, data: dict) -> MCTask:
    """An ``MCTask`` from a task.json's parsed contents (examples without target_scores are skipped)."""
    examples = []
    for ex in data["examples"]:
        ts = ex.get("target_scores")
        if not ts:
            continue
        choices = tuple(str(c) for c in ts)
        examples.append(MCExample(str(ex.get("input", "")), choices, tuple(float(ts[c]) for c in ts)))
    if not examples:
        raise ValueError(f"BIG-bench task {name} has no multiple-choice examples")
    return MCTask(
        name=name, examples=tuple(examples),
        task_prefix=str(data.get("task_prefix", "")),
        input_prefix=str(data.get("example_input_prefix", "\nQ: ")),
        output_prefix=str(data.get("example_output_prefix", "\nA: ")),
        choice_prefix=str(data.get("choice_prefix", "\n  choice: ")),
        append_choices_to_input=bool(data.get("append_choices_to_input", True)))


def load_task(name: str, home: Path | None = None) -> MCTask:
    """Load one task by name (fetching the task files first if needed)."""
    check_tasks([name])
    root = prepare_bigbench(home)
    path = root / TASKS[name][0]
    return parse_task(name, json.loads(path.read_text("utf-8")))

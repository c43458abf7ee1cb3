"""llama.cpp as a third implementation of `dsla bench decode` (``--impl llamacpp``).

llama-cpp-python lives in its own venv (``scripts/peers/setup_llamacpp.sh``); it is never
imported here. ``LlamaCppRunner`` drives ``dsla/bench/llamacpp_worker.py`` running in that venv,
one subprocess per GGUF file, JSON lines over stdin/stdout (the worker's docstring is the
protocol). The worker times each ``llama_decode`` itself (wall and CPU time of its own process)
and reads its own memory, so the pipe's latency and the parent's threads are not counted; the
runner keeps those reports, and ``dsla.bench.decode`` uses them in place of its own clocks for
this runner's rows.

Between its calls the worker is stopped (SIGSTOP, resumed with SIGCONT before the next call):
once it has answered, llama.cpp's threads may keep polling for work for a while, and those
cycles would be taken from our own rows, measured in between on the same cores. Stopped, it
takes no CPU from our rows (ours are not stopped in turn: torch's threads may still spin briefly
after our calls while llama.cpp is timed). Rows say ``stopped_between_calls``;
``dsla bench decode --llamacpp-no-pause`` turns it off (Linux only: elsewhere it is always off).

GGUF files: a name (``q4_1``, ``f16``, ``bf16``, ``f32``) means
``$DSLA_HOME/peers/models/SmolLM2-135M-Instruct.<name>.gguf``, which the setup script writes;
anything ending in ``.gguf`` is a path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dsla.bench.common import Timing
from dsla.paths import DEFAULT_TEACHER_NAME, dsla_home

WORKER = Path(__file__).with_name("llamacpp_worker.py")
SETUP_HINT = "run scripts/peers/setup_llamacpp.sh (it installs llama-cpp-python and writes the GGUF files)"
GGUF_NAMES = ("q4_1", "f16", "bf16", "f32")
# The dtype whose rows (ours, transformers) a GGUF's rows take turns with: the same precision
# where we run it, else float32 (q4_1 and f16 have no torch counterpart here).
GGUF_GROUP = {"bf16": "bfloat16", "f32": "float32", "f16": "float32", "q4_1": "float32"}


def peers_dir() -> Path:
    """Where the peers' venvs and model files live: ``$DSLA_HOME/peers``."""
    return dsla_home() / "peers"


def peer_python(name: str = "llamacpp") -> Path:
    """The python of a peer's venv, or ``FileNotFoundError`` saying how to install it."""
    py = peers_dir() / name / "bin" / "python"
    if not py.is_file():
        raise FileNotFoundError(f"the {name} peer is not installed ({py} is missing): {SETUP_HINT}")
    return py


def gguf_path(name: str) -> Path:
    """The GGUF file a ``--llamacpp-gguf`` entry names (see the module docstring)."""
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
    elif name in GGUF_NAMES:
        path = peers_dir() / "models" / f"{DEFAULT_TEACHER_NAME}.{name}.gguf"
    else:
        raise ValueError(f"--llamacpp-gguf {name!r}: give one of {', '.join(GGUF_NAMES)} or a path ending in .gguf")
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} is missing: {SETUP_HINT}" if name in GGUF_NAMES
                                else f"GGUF file {path} is missing: pass an existing .gguf file")
    return path


def gguf_label(name: str) -> str:
    return Path(name).stem if name.endswith(".gguf") else name


def group_ggufs(ggufs: Sequence[str], dtypes: Sequence[str]) -> dict[str, list[str]]:
    """Which dtype's configurations each GGUF is measured with (``GGUF_GROUP``; a path, or a
    GGUF whose dtype is not being run, joins the first dtype). Every GGUF is measured once."""
    if not dtypes:
        raise ValueError("no dtypes to measure llama.cpp alongside")
    groups: dict[str, list[str]] = {d: [] for d in dtypes}
    for g in ggufs:
        d = GGUF_GROUP.get(g, dtypes[0])
        groups[d if d in groups else dtypes[0]].append(g)
    return groups


class WorkerError(RuntimeError):
    """The worker answered an error or died; the message carries its words."""


class WorkerClient:
    """One worker subprocess: ``call(op, **fields)`` sends a line and returns the reply dict.

    ``pause``: keep the worker stopped (SIGSTOP) between calls, so that its threads take no CPU
    while the parent measures something else (see the module's docstring)."""

    def __init__(self, argv: Sequence[str], pause: bool = True) -> None:
        self.argv = list(argv)
        self.pause = pause and sys.platform.startswith("linux")
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker never blocks on it
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1)

    def _signal(self, sig: int) -> None:
        if self.pause and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self._signal(signal.SIGCONT)
        try:
            self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        finally:
            self._signal(signal.SIGSTOP)
        if not line:
            self._signal(signal.SIGCONT)
            self.proc.wait(timeout=10)
            self.stderr.seek(0)
            err = self.stderr.read()[-2000:]
            raise WorkerError(f"llama.cpp worker ({' '.join(self.argv)}) exited with code {self.proc.returncode} "
                              f"during {op!r}; its stderr ends:\n{err}")
        reply = json.loads(line)
        if not reply.pop("ok", False):
            raise WorkerError(f"llama.cpp worker failed {op!r}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self._signal(signal.SIGCONT)
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            f.close()


@dataclass
class WorkerReports:
    """What the worker reported for the calls since ``clear``: timing and memory per call."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    rise_mb: float = 0.0
    setup_mb: float = 0.0

    def add(self, r: dict[str, Any]) -> None:
        self.wall.append(r["wall_s"])
        self.cpu.append(r["cpu_s"])
        self.peak_mb = max(self.peak_mb, r["peak_rss_mb"])
        self.rise_mb = max(self.rise_mb, r["rise_mb"])

    def timing(self, repeats: int) -> Timing:
        """The last ``repeats`` calls (the timed ones; warm-up calls came first)."""
        if len(self.wall) < repeats:
            raise ValueError(f"{repeats} timed calls expected, the worker reported {len(self.wall)}")
        return Timing(tuple(self.wall[-repeats:]), tuple(self.cpu[-repeats:]))

    def fields(self) -> dict[str, float]:
        """The same memory fields as ``MemoryTracker.fields``, for the worker's process."""
        return {"peak_rss_mb": round(self.peak_mb, 1), "rss_delta_mb": round(self.setup_mb + self.rise_mb, 1)}


class LlamaCppRunner:
    """llama.cpp behind the interface of ``dsla.bench.decode``'s runners.

    The caches live in the worker: ``prefill`` returns the prompt (a token list) as its
    "cache", ``crop`` cuts it, ``batch_caches`` prefills it (untimed) into a fresh context with
    one KV stream per request and copies it to all of them; ``decode`` then runs one step.
    ``extra_tokens`` is how many decode steps a batch's context must leave room for.
    """

    impl = "llamacpp"

    def __init__(self, gguf: str, threads: int, extra_tokens: int, flash_attn: bool = False,
                 argv: Sequence[str] | None = None, pause: bool = True) -> None:
        self.gguf, self.threads, self.extra_tokens, self.flash_attn = gguf, threads, extra_tokens, flash_attn
        path = gguf_path(gguf) if argv is None else Path(gguf)
        self.worker = WorkerClient(argv or [str(peer_python()), str(WORKER)], pause=pause)
        try:
            info = self.worker.call("load", model=str(path), threads=threads, flash_attn=flash_attn)
        except BaseException:  # the caller never gets this runner to close: do not leave a stopped worker
            self.worker.close()
            raise
        self.num_layers, self.vocab_size = info["n_layer"], info["n_vocab"]
        self.row_dtype = gguf_label(gguf)
        self.row_extra = {"gguf": str(path), "threads": threads, "flash_attn": flash_attn,
                          "llama_cpp_python": info.get("version"), "stopped_between_calls": self.worker.pause}
        self.reports = WorkerReports()

    def add_dsla(self, layers: Sequence[int]) -> None:
        if layers:
            raise ValueError("llama.cpp has no DSLA layers: measure it at dsla ratio 0 only")

    def prefill(self, ids, dsla_layers: Sequence[int] = ()) -> list[int]:
        self.add_dsla(dsla_layers)
        tokens = [int(t) for t in ids]
        r = self.worker.call("prefill", tokens=tokens)
        self.reports.add(r)
        self.reports.setup_mb = r.get("setup_mb", 0.0)
        return tokens

    @staticmethod
    def crop(cache: list[int], length: int) -> list[int]:
        return cache[:length]

    def batch_caches(self, base: list[int], dsla_layers: Sequence[int], batch: int) -> int:
        self.add_dsla(dsla_layers)
        r = self.worker.call("fork", tokens=base, n_seq=batch, n_ctx_seq=len(base) + self.extra_tokens + 1)
        self.reports.setup_mb = r["setup_mb"]
        return batch

    def decode(self, batch: int, tokens) -> None:
        self.reports.add(self.worker.call("decode", tokens=[int(t) for t in tokens][:batch]))

    def close(self) -> None:
        self.worker.close()

"""Helpers shared by the benchmarks: timing, memory, machine description, JSON and table output.

Timing is wall clock (``time.perf_counter``) and process CPU time (``time.process_time``): a few
untimed warm-up calls, then the median of the timed repeats. Memory is resident set size read
from ``/proc/self/status``; on Linux the peak ("high-water mark") can be reset between
configurations so each one reports its own peak.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dsla.cliargs import parse_list  # noqa: F401  (re-exported: the benches' list flags)
from dsla.fileio import atomic_write_text


# ---- timing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Seconds per call over the timed repeats (warm-up excluded): wall clock in ``samples``,
    process CPU time (all threads) in ``cpu_samples``. With one torch thread on a machine that
    other processes keep busy, CPU time stays close to what an idle core would take while wall
    time also counts the waits for a core."""

    samples: tuple[float, ...]
    cpu_samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_samples)

    @property
    def repeats(self) -> int:
        return len(self.samples)


def _timed(fn: Callable[[], Any], wall: list[float], cpu: list[float]) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    cpu.append(time.process_time() - c0)
    wall.append(time.perf_counter() - t0)


def measure(fn: Callable[[], Any], warmup: int = 1, repeats: int = 3,
            max_seconds: float | None = None) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then up to ``repeats`` times timed.

    With ``max_seconds``, timed calls stop early once they have taken that long in total (at
    least one is always made): long configurations get fewer repeats, short ones all of them.
    """
    return measure_alternating([fn], warmup, repeats, max_seconds)[0]


def measure_alternating(fns: Sequence[Callable[[], Any]], warmup: int = 1, repeats: int = 3,
                        max_seconds: float | None = None,
                        trackers: Sequence["MemoryTracker"] | None = None) -> list[Timing]:
    """Like ``measure`` for several functions called in turn (a, b, a, b, ...), one Timing each.

    Alternating makes a comparison fair on a shared machine: a busy neighbour slows every side
    alike instead of whichever happened to run at the time. ``max_seconds`` counts all of them.
    ``trackers`` (one per function) watch the memory of every call, warm-up included, outside
    the timed region.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")

    def call(i: int, fn: Callable[[], Any], wall: list[float] | None = None, cpu: list[float] | None = None) -> None:
        if trackers:
            trackers[i].before()
        if wall is None:
            fn()
        else:
            _timed(fn, wall, cpu)
        if trackers:
            trackers[i].after()

    for _ in range(warmup):
        for i, fn in enumerate(fns):
            call(i, fn)
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    while len(wall[0]) < repeats and (not wall[0] or max_seconds is None or sum(map(sum, wall)) < max_seconds):
        for i, fn in enumerate(fns):
            call(i, fn, wall[i], cpu[i])
    return [Timing(tuple(w), tuple(c)) for w, c in zip(wall, cpu)]


# ---- memory ---------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """Resident set size now, MiB (0.0 where /proc is unavailable)."""
    kb = _status_kb("VmRSS")
    return 0.0 if kb is None else kb / 1024


def peak_rss_mb() -> float:
    """Peak resident set size, MiB: since the last ``reset_peak_rss`` where that worked, else
    since the process started (``getrusage``; monotonic)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        if sys.platform == "darwin":
            kb //= 1024  # bytes there
    return kb / 1024


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Without it, memory freed by an earlier configuration stays resident and the next one
    reuses it, so its RSS delta would read as zero.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: deltas are then only approximate
        pass


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``).

    Returns False where that is not possible; peaks are then process-wide and only grow.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryTracker:
    """Resident memory of one configuration whose calls may be interleaved with others'.

    ``setup`` is what building its state added (e.g. its caches); each tracked call contributes
    its own peak (the high-water mark is reset before it) and its rise over the RSS just before.
    """

    def __init__(self, setup_mb: float = 0.0, release: bool = False,
                 on_before: Callable[[], Any] | None = None) -> None:
        self.setup_mb = setup_mb
        self.release = release  # hand freed heap back to the OS before each call (long calls only)
        self.on_before = on_before  # e.g. drop the previous call's result, so the call rebuilds it
        self.peak_mb = 0.0  # highest process RSS seen during one of its calls
        self.rise_mb = 0.0  # largest (peak during a call - RSS just before it)
        self._before = 0.0

    def before(self) -> None:
        if self.on_before is not None:
            self.on_before()
        if self.release:  # else memory freed earlier is reused unseen and the rise reads low
            release_freed_memory()
        reset_peak_rss()
        self._before = current_rss_mb()

    def after(self) -> None:
        peak = max(peak_rss_mb(), current_rss_mb())
        self.peak_mb = max(self.peak_mb, peak)
        self.rise_mb = max(self.rise_mb, peak - self._before)

    def fields(self) -> dict[str, float]:
        """``peak_rss_mb`` (process-wide) and ``rss_delta_mb`` (setup + largest rise in a call)."""
        return {"peak_rss_mb": round(self.peak_mb, 1), "rss_delta_mb": round(self.setup_mb + self.rise_mb, 1)}


def setup_rss_mb(build: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``build`` and return its result and the resident memory it added, MiB."""
    release_freed_memory()
    before = current_rss_mb()
    out = build()
    release_freed_memory()
    return out, max(0.0, current_rss_mb() - before)


# ---- machine --------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo), or platform's best guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(**extra: Any) -> dict[str, Any]:
    """What a reader needs to compare two result files: software versions, CPU, threads, time."""
    info: dict[str, Any] = {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if "transformers" in sys.modules:
        info["transformers"] = sys.modules["transformers"].__version__
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)  # noisy neighbours show up here
    except OSError:
        pass
    info.update(extra)
    return info


# ---- output ---------------------------------------------------------------------------------
def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (``dsla.fileio``): a reader never sees half a file."""
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
    return Path(path)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain fixed-width text table of the given columns (None shows as '-')."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])

"""Our own CPU kernel for decode attention over many requests, built on first use.

A decode step of R requests attends one query token per request over that request's cache. With
torch's SDPA each (request, KV head) is a 3-row matmul and per-piece overhead dominates: 48
requests x 192 tokens took ~0.9 ms per layer, half of a saturated step (docs/results/speed.md 0g).
``csrc/decode_attention.cpp`` does the same arithmetic in float32 with one loop over the keys per
piece, the pieces spread over torch's OpenMP threads, and reads each request's cache where it is
(any capacity, any row of a ``KVBatch``), so no batch has to be built or masked.

It is compiled with the machine's C++ compiler (``g++ -O3 -march=native``: AVX-512 or AVX2, as the
CPU has) into ``$DSLA_HOME/kernels/`` the first time it is used (about a second), keyed by the
source, the flags, the compiler and the CPU, and loaded with ctypes; it links the OpenMP runtime
torch has already loaded, so it shares torch's threads. Where there is no compiler, or the build
fails, ``decode_attention_kernel`` returns None (one warning) and the caller uses SDPA.

``use_decode_kernel("off")`` (``dsla serve --decode-attention sdpa``, or ``DSLA_DECODE_KERNEL=0``)
turns it off for the process.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from torch.profiler import record_function

from dsla.paths import dsla_home

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "decode_attention.cpp"
# Compiled with -ffast-math (vectorised exp, reassociated sums), linked without it: linking with it
# adds crtfastmath.o, which flushes subnormals to zero for the whole process when the library loads.
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++17")
LINK_FLAGS = ("-shared", "-fopenmp")
HEAD_DIMS = (32, 64, 128)
_DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}
_ERRORS = {2: "a request has no tokens", 3: "query heads per KV head not in 1..8",
           4: f"head dim not in {HEAD_DIMS}", 5: "a cache has no room for the new token"}

_STATE: dict = {"mode": None, "lib": None, "tried": False}


def use_decode_kernel(mode: str) -> None:
    """``"auto"`` (the default: the kernel where it builds and the call fits it, else SDPA) or
    ``"off"`` (SDPA always)."""
    if mode not in ("auto", "off"):
        raise ValueError(f"decode attention kernel mode must be 'auto' or 'off', got {mode!r}")
    _STATE["mode"] = mode


def _mode() -> str:
    if _STATE["mode"] is None:
        env = os.environ.get("DSLA_DECODE_KERNEL", "1").strip().lower()
        _STATE["mode"] = "off" if env in ("0", "off", "false", "no") else "auto"
    return _STATE["mode"]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(directory: Path | None = None) -> Path:
    """Compile the kernel (if this source, compiler and CPU have no build yet) and return the
    library's path. Raises ``RuntimeError`` with the compiler's output when it fails."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (g++ or $CXX): install one (Debian: apt-get install g++)")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"the C++ compiler {cxx} does not run: {e}") from e
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS + LINK_FLAGS), version, _cpu_flags()]).encode())
    directory = directory or dsla_home() / "kernels"
    lib = directory / f"decode_attention-{key.hexdigest()[:16]}.so"
    if lib.is_file():
        return lib
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        obj = tmp[:-3] + ".o"
        for cmd in ([cxx, *FLAGS, "-c", "-o", obj, str(SOURCE)], [cxx, *LINK_FLAGS, "-o", tmp, obj]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"building {SOURCE.name} failed: {' '.join(cmd)}\n{done.stderr[-4000:]}")
        os.replace(tmp, lib)  # another process building the same key writes the same bytes
    finally:
        for path in (tmp, tmp[:-3] + ".o"):
            if os.path.exists(path):
                os.unlink(path)
    return lib


class _Args(ctypes.Structure):
    """One call's arguments: ``struct Args`` in csrc/decode_attention.cpp."""
    _fields_ = [(n, ctypes.c_int64) for n in ("R", "H", "G", "D")] + [
        ("meta", ctypes.c_void_p), ("q", ctypes.c_void_p), ("q_r", ctypes.c_int64), ("q_h", ctypes.c_int64),
        ("out", ctypes.c_void_p), ("o_r", ctypes.c_int64), ("o_h", ctypes.c_int64),
        ("k_new", ctypes.c_void_p), ("kn_h", ctypes.c_int64), ("kn_r", ctypes.c_int64),
        ("v_new", ctypes.c_void_p), ("vn_h", ctypes.c_int64), ("vn_r", ctypes.c_int64),
        ("scale", ctypes.c_float), ("threads", ctypes.c_int32)]


def _load() -> ctypes.CDLL | None:
    if not _STATE["tried"]:
        _STATE["tried"] = True
        try:
            lib = ctypes.CDLL(str(build()))
            lib.dsla_decode_attention.argtypes = [ctypes.POINTER(_Args), ctypes.c_int]
            lib.dsla_decode_attention.restype = ctypes.c_int
            _STATE["lib"] = lib
        except (RuntimeError, OSError) as e:
            log.warning("decode attention runs on SDPA: our CPU kernel is unavailable (%s)", e)
    return _STATE["lib"]


def decode_attention_kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when it is turned off or does
    not build (then the caller uses SDPA)."""
    return None if _mode() == "off" else _load()


def kernel_fits(q: Tensor, cache_dtype: torch.dtype) -> bool:
    """Whether the kernel handles this query over caches of ``cache_dtype``: on the CPU, bf16 or
    float32 alike, a head dim it knows, and no gradient wanted (the kernel has no backward)."""
    return (q.device.type == "cpu" and q.dtype in _DTYPES and q.dtype == cache_dtype and q.shape[-1] in HEAD_DIMS
            and q.stride(-1) == 1 and not (q.requires_grad and torch.is_grad_enabled()))


def kv_meta(states: Sequence) -> Tensor:
    """Per request (k address, v address, head stride in elements, length, capacity), (R, 5)
    int64, for ``KVState``s (buffers (2, H, capacity, D), D and capacity contiguous; a ``KVBatch``
    row included)."""
    return torch.tensor([s.kernel_meta() for s in states], dtype=torch.int64)


def decode_attention_cpu(lib: ctypes.CDLL, q: Tensor, meta: Tensor, num_kv_heads: int,
                         new_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Attention of one query token per request over that request's keys and values.

    q: (Hq, R, D) after RoPE (head h*G + g is query g of KV head h); ``meta`` from ``kv_meta`` for
    the R requests (their buffers must stay alive during the call). With ``new_kv`` = (k, v), each
    (Hkv, R, D), request r's new key and value are first written at row ``length`` of its cache,
    which must have room, and attended too; the caller then adds one to each length. Returns
    (R, Hq*D), query heads in order, like ``decode_attention``.
    """
    Hq, R, D = q.shape
    H = num_kv_heads
    if Hq % H or meta.shape != (R, 5) or meta.dtype != torch.int64 or not meta.is_contiguous():
        raise ValueError(f"decode_attention_cpu: q {tuple(q.shape)} with {H} KV heads and meta "
                         f"{tuple(meta.shape)} {meta.dtype} do not match (want (R, 5) int64, contiguous)")
    if q.dtype not in _DTYPES or q.stride(-1) != 1:
        raise ValueError(f"decode_attention_cpu: q must be bfloat16 or float32 with a contiguous last dim, "
                         f"got {q.dtype} strides {q.stride()}")
    out = q.new_empty(R, Hq * D)
    a = _Args(R=R, H=H, G=Hq // H, D=D, meta=meta.data_ptr(), q=q.data_ptr(), q_r=q.stride(1), q_h=q.stride(0),
              out=out.data_ptr(), o_r=Hq * D, o_h=D, scale=D ** -0.5, threads=torch.get_num_threads())
    if new_kv is not None:
        k, v = new_kv
        if k.shape != (H, R, D) or v.shape != (H, R, D) or k.dtype != q.dtype or v.dtype != q.dtype \
                or k.stride(-1) != 1 or v.stride(-1) != 1:
            raise ValueError(f"decode_attention_cpu: new keys {tuple(k.shape)} {k.dtype} and values "
                             f"{tuple(v.shape)} {v.dtype} must be ({H}, {R}, {D}) {q.dtype}, last dim contiguous")
        a.k_new, a.kn_h, a.kn_r = k.data_ptr(), k.stride(0), k.stride(1)
        a.v_new, a.vn_h, a.vn_r = v.data_ptr(), v.stride(0), v.stride(1)
    with record_function("dsla::decode_attention_cpu"):  # so torch.profiler counts it (it is not a torch op)
        rc = lib.dsla_decode_attention(ctypes.byref(a), 0 if q.dtype == torch.bfloat16 else 1)
    if rc:
        raise ValueError(f"decode attention kernel: {_ERRORS.get(rc, f'error {rc}')} "
                         f"(q {tuple(q.shape)}, lengths {meta[:, 3].tolist()}, capacities {meta[:, 4].tolist()})")
    return out

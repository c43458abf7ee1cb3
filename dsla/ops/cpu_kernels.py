"""Our own C++ CPU kernels, built on first use: decode and prefill attention, a DSLA layer's decode
step, and a decoder layer's small steps.

**Decode attention** (``csrc/decode_attention.cpp``). A decode step of R requests attends one query
token per request over that request's cache. With torch's SDPA each (request, KV head) is a 3-row
matmul and per-piece overhead dominates: 48 requests x 192 tokens took ~0.9 ms per layer, half of
a saturated step (docs/results/speed.md 0g). The kernel appends the step's key and value and does
the same arithmetic in float32 with one pass over the keys per piece of <= 128 tokens, the pieces
spread over torch's OpenMP threads, reading each request's cache where it is (any capacity, any
row of a ``KVBatch``), so no batch has to be built or masked.

**Glue** (``csrc/glue.cpp``, bfloat16). RMSNorm with its weight and RoPE on a head-major view,
each one call in place of several torch ops, rounded where torch's ops round: RoPE gives the same
bits, RMSNorm all but ~3 in a million (its sum of squares runs in another order).

**A DSLA layer's decode step** (``csrc/dsla_decode.cpp``): ``window_decode_cpu`` below.
**Prefill attention** (``csrc/prefill_attention.cpp``, AVX-512 BF16 only): ``prefill_attention_cpu``.

All are compiled with the machine's C++ compiler (``g++ -O3 -march=native``: AVX-512 or AVX2, as
the CPU has) into one library in ``$DSLA_HOME/kernels/`` the first time they are used (a few
seconds), keyed by the sources, the flags, the compiler and the CPU, and loaded with ctypes; the
library links the OpenMP runtime torch has already loaded, so it shares torch's threads. Where
there is no compiler, or the build fails, ``cpu_kernels_lib`` returns None (one warning) and the
callers run torch's ops. ``use_cpu_kernels("off")`` (``dsla serve --cpu-kernels off``, or
``DSLA_CPU_KERNELS=0``) turns them off for the process.

The attention kernel gets raw addresses of the caches' buffers, and ctypes releases the GIL during
the call: no other thread may touch those caches meanwhile (the server's engine thread alone owns
them; ``KVState.kernel_meta`` reads the addresses just before the call).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
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

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "decode_attention.cpp", CSRC / "glue.cpp", CSRC / "dsla_decode.cpp", CSRC / "prefill_attention.cpp",
           CSRC / "coded_linear.cpp")
HEADERS = (CSRC / "common.h",)  # included by the sources: part of the build's key
# Attention is compiled with -ffast-math (vectorised exp, reassociated sums); the glue without it, so
# that its divisions, square roots and roundings are IEEE ones, as torch's (reassociation only, for
# vectorised sums). Linked without -ffast-math: linking with it adds crtfastmath.o, which flushes
# subnormals to zero for the whole process when the library loads.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c++17")
SOURCE_FLAGS = {"decode_attention.cpp": ("-ffast-math",), "dsla_decode.cpp": ("-ffast-math",),
                "prefill_attention.cpp": ("-fno-math-errno",), "coded_linear.cpp": ("-fno-math-errno", "-ffp-contract=off"),
                "glue.cpp": ("-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
                             "-ffp-contract=off")}
LINK_FLAGS = ("-shared", "-fopenmp")
HEAD_DIMS = (32, 64, 128)
_DTYPE_CODE = {torch.bfloat16: 0, torch.float32: 1}  # the dtypes the kernels take, as the C side numbers them
_ERRORS = {2: "a request has no tokens", 3: "query heads per KV head not in 1..8",
           4: f"head dim not in {HEAD_DIMS}", 5: "a cache has no room for the new token",
           6: "a cache's KV heads, head dim or dtype differ from the call's",
           7: "feature dim not a multiple of 16 up to 256",
           8: "states not 1 or 2, window not in 1..8192, or sinks not in 0..64", 9: "this CPU has no AVX-512 BF16"}
# where the window decode and prefill kernels use a code for something else
_WINDOW_ERRORS = _ERRORS | {2: "a negative length"}
_PREFILL_ERRORS = _ERRORS | {5: "more queries than keys, or none"}
_CODED_ERRORS = _ERRORS | {2: "M < 1, N not a multiple of 64 or K not of 32"}

_STATE: dict = {"mode": None, "lib": None, "tried": False}


def use_cpu_kernels(mode: str) -> None:
    """``"auto"`` (the default: our kernels where they build and the call fits them, else torch's
    ops) or ``"off"`` (torch's ops, SDPA for attention, always)."""
    if mode not in ("auto", "off"):
        raise ValueError(f"CPU kernels mode must be 'auto' or 'off', got {mode!r}")
    _STATE["mode"] = mode


def _mode() -> str:
    if _STATE["mode"] is None:
        env = os.environ.get("DSLA_CPU_KERNELS", "1").strip().lower()
        _STATE["mode"] = "off" if env in ("0", "off", "false", "no") else "auto"
    return _STATE["mode"]


def _cpu_flags() -> str:
    from dsla.model.quant import cpu_flags  # here, not at import: dsla.model imports this module

    return " ".join(sorted(cpu_flags()))


def _compiler() -> list[str] | None:
    """The C++ compiler's command: ``$CXX`` (split as a shell would: ``ccache g++``), g++ or c++."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = shutil.which("g++") or shutil.which("c++")
    return None if found is None else [found]


def build(directory: Path | None = None) -> Path:
    """Compile the kernels (if these sources, compiler and CPU have no build yet) and return the
    library's path. Raises ``RuntimeError`` with the compiler's output when it fails."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (g++ or $CXX): install one (Debian: apt-get install g++)")
    try:
        version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"the C++ compiler {' '.join(cxx)} does not run: {e}") from e
    text = "\0".join(src.read_text() for src in SOURCES + HEADERS)
    key = hashlib.sha256("\0".join([text, " ".join(FLAGS + LINK_FLAGS), repr(SOURCE_FLAGS), version,
                                     _cpu_flags()]).encode())
    directory = directory or dsla_home() / "kernels"
    lib = directory / f"dsla_kernels-{key.hexdigest()[:16]}.so"
    if lib.is_file():
        return lib
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".build-", suffix=".so")
    os.close(fd)
    objs = [f"{tmp[:-3]}-{src.stem}.o" for src in SOURCES]
    try:
        cmds = [[*cxx, *FLAGS, *SOURCE_FLAGS[src.name], "-c", "-o", obj, str(src)] for src, obj in zip(SOURCES, objs)]
        for cmd in cmds + [[*cxx, *LINK_FLAGS, "-o", tmp, *objs]]:
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:  # a timeout included: the callers fall back
                raise RuntimeError(f"building our CPU kernels failed: {' '.join(cmd)}: {e}") from e
            if done.returncode != 0:
                raise RuntimeError(f"building our CPU kernels failed: {' '.join(cmd)}\n{done.stderr[-4000:]}")
        os.replace(tmp, lib)  # another process building the same key writes the same bytes
    finally:
        for path in (tmp, *objs):
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


class _WindowArgs(ctypes.Structure):
    """One call's arguments: ``struct Args`` in csrc/dsla_decode.cpp."""
    _fields_ = [(n, ctypes.c_int64) for n in ("R", "H", "G", "D", "F", "S", "W", "NS")] + [
        (n, ctypes.c_void_p) for n in ("q", "k", "k_raw", "v", "w_fq", "w_fk", "w_hist", "b_hist", "w_rec", "b_rec",
                                       "mix_logits", "window_log_scale", "states", "ring_k", "ring_v", "sink_k",
                                       "sink_v", "lengths", "out")] + [("eps", ctypes.c_float), ("threads", ctypes.c_int32)]


class _PrefillArgs(ctypes.Structure):
    """One call's arguments: ``struct Args`` in csrc/prefill_attention.cpp."""
    _fields_ = [(n, ctypes.c_int64) for n in ("H", "G", "L", "T", "D")] + [
        (n, t) for name in ("q", "k", "v", "out")
        for n, t in ((name, ctypes.c_void_p), (f"{name[0]}_h", ctypes.c_int64),
                     (f"{name[0]}_{'l' if name in ('q', 'out') else 't'}", ctypes.c_int64))] + [
        ("scale", ctypes.c_float), ("threads", ctypes.c_int32)]


class _CodedArgs(ctypes.Structure):
    """One call's arguments: ``struct Args`` in csrc/coded_linear.cpp."""
    _fields_ = [(n, ctypes.c_int64) for n in ("M", "N", "K")] + [
        ("x", ctypes.c_void_p), ("x_m", ctypes.c_int64), ("codes", ctypes.c_void_p), ("dm", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("o_m", ctypes.c_int64), ("threads", ctypes.c_int32)]


def _load() -> ctypes.CDLL | None:
    if not _STATE["tried"]:
        _STATE["tried"] = True
        try:
            lib = ctypes.CDLL(str(build()))
            lib.dsla_decode_attention.argtypes = [ctypes.POINTER(_Args), ctypes.c_int]
            lib.dsla_decode_attention.restype = ctypes.c_int
            lib.dsla_window_decode.argtypes = [ctypes.POINTER(_WindowArgs), ctypes.c_int]
            lib.dsla_window_decode.restype = ctypes.c_int
            lib.dsla_prefill_attention.argtypes = [ctypes.POINTER(_PrefillArgs)]
            lib.dsla_prefill_attention.restype = ctypes.c_int
            lib.dsla_prefill_attention_available.restype = ctypes.c_int
            lib.dsla_coded_linear.argtypes = [ctypes.POINTER(_CodedArgs)]
            lib.dsla_coded_linear.restype = ctypes.c_int
            lib.dsla_coded_linear_available.restype = ctypes.c_int
            i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
            lib.dsla_rms_norm.argtypes = [p, p, p, i64, i64, ctypes.c_float, i32, i32]
            lib.dsla_rope.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i32, i32]
            for fn in (lib.dsla_rms_norm, lib.dsla_rope):
                fn.restype = None
            _STATE["lib"] = lib
        except (RuntimeError, OSError) as e:
            log.warning("torch's ops (SDPA for decode attention) serve: our CPU kernels are unavailable (%s)", e)
    return _STATE["lib"]


def cpu_kernels_lib() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when it is turned off or does
    not build (then the callers run torch's ops)."""
    return None if _mode() == "off" else _load()


def kernel_fits(q: Tensor, k: Tensor, v: Tensor, cache_dtype: torch.dtype) -> bool:
    """Whether the attention kernels handle this query q (..., Hq, R, D) with keys and values k, v
    (..., Hkv, ·, D) over caches of ``cache_dtype``: on the CPU, bf16 or float32 alike, a head dim
    they know, 1 to 8 query heads per KV head, and no gradient wanted (they have no backward)."""
    Hq, Hkv = q.shape[-3], k.shape[-3]
    return (q.device.type == "cpu" and q.dtype in _DTYPE_CODE and q.dtype == cache_dtype and q.shape[-1] in HEAD_DIMS
            and q.stride(-1) == 1 and Hq % Hkv == 0 and 1 <= Hq // Hkv <= 8
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def _call(name: str, fn, *args) -> int:
    """A kernel call, named ``name`` for torch.profiler while it records (a kernel is not a torch
    op); no cost otherwise."""
    if torch.autograd._profiler_enabled():
        with record_function(name):
            return fn(*args)
    return fn(*args)


def kv_meta(states: Sequence) -> Tensor:
    """Per request (k address, v address, head stride in elements, length, capacity, KV heads, head
    dim, bytes per element), (R, 8) int64, for ``KVState``s (buffers (2, H, capacity, D), D and
    capacity contiguous; a ``KVBatch`` row included). The kernel checks the last three against the
    call, so a cache of another shape or dtype is refused instead of read out of bounds."""
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
    if Hq % H or meta.shape != (R, 8) or meta.dtype != torch.int64 or not meta.is_contiguous():
        raise ValueError(f"decode_attention_cpu: q {tuple(q.shape)} with {H} KV heads and meta "
                         f"{tuple(meta.shape)} {meta.dtype} do not match (want (R, 8) int64, contiguous)")
    if q.dtype not in _DTYPE_CODE or q.stride(-1) != 1:
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
    rc = _call("dsla::decode_attention_cpu", lib.dsla_decode_attention, ctypes.byref(a), _DTYPE_CODE[q.dtype])
    if rc:
        raise ValueError(f"decode attention kernel: {_ERRORS.get(rc, f'error {rc}')} "
                         f"(q {tuple(q.shape)} {q.dtype}, lengths {meta[:, 3].tolist()}, capacities "
                         f"{meta[:, 4].tolist()}, caches' heads / head dim / element bytes {meta[:, 5:].tolist()})")
    return out


# The fused glue of a decoder layer (csrc/glue.cpp), for bfloat16. Each returns None where it does
# not apply (kernels off or not built, another device or dtype, a gradient wanted, inside
# torch.compile, an odd layout): the caller then runs its torch form, which rounds at the same points.
# In float32 they step aside too: a sum in another order changes last bits there in most elements.

def _glue(x: Tensor) -> ctypes.CDLL | None:
    # bfloat16 only: there each rounding matches torch's ops; in float32 a sum in another order or a
    # fused multiply-add changes last bits, and float32 runs on torch's ops
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or (x.requires_grad and torch.is_grad_enabled()) \
            or torch.compiler.is_compiling():  # inside a torch.compile'd function: its own kernels
        return None
    return cpu_kernels_lib()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """``weight * rms_norm(x.float()).to(x.dtype)`` over the last dim of a contiguous x."""
    lib = _glue(x)
    if lib is None or weight.dtype != x.dtype or weight.shape != x.shape[-1:] or weight.requires_grad and \
            torch.is_grad_enabled() or not (x.is_contiguous() and weight.is_contiguous()):
        return None
    out = torch.empty_like(x)
    dim = x.shape[-1]
    lib.dsla_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps,
                      _DTYPE_CODE[x.dtype], torch.get_num_threads())
    return out


def rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor | None:
    """``x * cos + x.roll(D // 2, -1) * signed_sin`` for x (H, N, D) (any head and token strides,
    D contiguous) and contiguous (N, D) tables of x's dtype; the result has x's layout."""
    lib = _glue(x)
    if lib is None or x.dim() != 3 or x.stride(2) != 1 or cos.dtype != x.dtype or signed_sin.dtype != x.dtype \
            or cos.shape != x.shape[1:] or signed_sin.shape != x.shape[1:] \
            or not (cos.is_contiguous() and signed_sin.is_contiguous()):
        return None
    out = torch.empty_like(x)  # the same strides as x (dense)
    H, N, D = x.shape
    lib.dsla_rope(x.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), out.data_ptr(), H, N, D, x.stride(0),
                  x.stride(1), out.stride(0), out.stride(1), _DTYPE_CODE[x.dtype], torch.get_num_threads())
    return out


# ---- a DSLA layer's decode step with an exact window (csrc/dsla_decode.cpp) ---------------------

def window_decode_fits(dtype: torch.dtype, head_dim: int, group: int, feature_dim: int, num_states: int,
                       window: int, sinks: int) -> bool:
    """Whether ``window_decode_cpu`` takes a layer of these sizes in this dtype (bf16 or float32)."""
    return (dtype in _DTYPE_CODE and head_dim in HEAD_DIMS and 1 <= group <= 8 and feature_dim % 16 == 0
            and 0 < feature_dim <= 256 and num_states in (1, 2) and 1 <= window <= 8192 and 0 <= sinks <= 64)


def window_decode_cpu(lib: ctypes.CDLL, q: Tensor, k: Tensor, k_raw: Tensor, v: Tensor, params, states: Tensor,
                      ring_k: Tensor, ring_v: Tensor, sink_k: Tensor | None, sink_v: Tensor | None,
                      lengths: Tensor, eps: float) -> Tensor:
    """``dsla.model.dsla.window_decode_layer``'s output o (R, Hq*D) after RoPE, in one call.

    q (R, H, G, D) and k (R, H, D) after RoPE, k_raw and v (R, H, D), all contiguous and of one
    dtype; ``params`` a ``HeadParams`` with a window scale (its weights of that dtype); states
    (R, H, S, K, D+1) float32, rings (R, H, W, D) and sinks (R, H, NS, D) (or None) contiguous;
    lengths (R,) int64, the tokens each request saw before this one. The states are updated, the
    rings and sinks written, in place: afterwards they hold what ``window_decode_math`` returns.
    """
    R, H, G, D = q.shape
    p = params
    F, S, W = p.w_fq.shape[-1], states.shape[2], ring_k.shape[2]
    NS = 0 if sink_k is None else sink_k.shape[2]
    dt = q.dtype
    want = {"k": (k, (R, H, D), dt), "k_raw": (k_raw, (R, H, D), dt), "v": (v, (R, H, D), dt),
            "w_fq": (p.w_fq, (H, D, F), dt), "w_fk": (p.w_fk, (H, D, F), dt),
            "w_hist": (p.w_hist, (H, D, 2 * F), dt), "b_hist": (p.b_hist, (H, 1, 2 * F), dt),
            "window_log_scale": (p.window_log_scale, (H * G,), dt),
            "states": (states, (R, H, S, 2 * F, D + 1), torch.float32), "ring_k": (ring_k, (R, H, W, D), dt),
            "ring_v": (ring_v, (R, H, W, D), dt), "lengths": (lengths, (R,), torch.int64)}
    if S == 2:
        want |= {"w_rec": (p.w_rec, (H, D, 2 * F), dt), "b_rec": (p.b_rec, (H, 1, 2 * F), dt),
                 "mix_logits": (p.mix_logits, (H * G,), dt)}
    if NS:
        want |= {"sink_k": (sink_k, (R, H, NS, D), dt), "sink_v": (sink_v, (R, H, NS, D), dt)}
    bad = [f"{name} {None if t is None else (tuple(t.shape), t.dtype)} (want {shape} {dtype}, contiguous)"
           for name, (t, shape, dtype) in want.items()
           if t is None or t.shape != shape or t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu"]
    if bad or not q.is_contiguous() or not window_decode_fits(dt, D, G, F, S, W, NS):
        raise ValueError(f"window_decode_cpu: q {tuple(q.shape)} {dt}: " + ("; ".join(bad) or "sizes the kernel does not take"))
    out = q.new_empty(R, H * G * D)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    a = _WindowArgs(R=R, H=H, G=G, D=D, F=F, S=S, W=W, NS=NS, q=ptr(q), k=ptr(k), k_raw=ptr(k_raw), v=ptr(v),
                    w_fq=ptr(p.w_fq), w_fk=ptr(p.w_fk), w_hist=ptr(p.w_hist), b_hist=ptr(p.b_hist),
                    w_rec=ptr(p.w_rec) if S == 2 else None, b_rec=ptr(p.b_rec) if S == 2 else None,
                    mix_logits=ptr(p.mix_logits) if S == 2 else None, window_log_scale=ptr(p.window_log_scale),
                    states=ptr(states), ring_k=ptr(ring_k), ring_v=ptr(ring_v), sink_k=ptr(sink_k),
                    sink_v=ptr(sink_v), lengths=ptr(lengths), out=ptr(out), eps=eps,
                    threads=torch.get_num_threads())
    rc = _call("dsla::window_decode_cpu", lib.dsla_window_decode, ctypes.byref(a), _DTYPE_CODE[dt])
    if rc:
        raise ValueError(f"DSLA window decode kernel: {_WINDOW_ERRORS.get(rc, f'error {rc}')} (q {tuple(q.shape)}, "
                         f"features {F}, states {S}, window {W}, sinks {NS}, lengths {lengths.tolist()})")
    return out


# ---- causal attention of a prefill chunk (csrc/prefill_attention.cpp, AVX-512 BF16 only) ---------

def prefill_kernel(q: Tensor, k: Tensor, v: Tensor) -> ctypes.CDLL | None:
    """The kernel library when ``prefill_attention_cpu`` takes q (..., Hq, L, D) over k, v
    (..., Hkv, T, D): on the CPU, bfloat16, a head dim it knows, 1 to 8 query heads per KV head, the
    last dim contiguous, no gradient wanted, and a CPU with AVX-512 BF16; else None (SDPA serves)."""
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16 and kernel_fits(q, k, v, torch.bfloat16)
            and k.stride(-1) == v.stride(-1) == 1 and not torch.compiler.is_compiling()):
        return None
    lib = cpu_kernels_lib()
    return lib if lib is not None and lib.dsla_prefill_attention_available() else None


def prefill_attention_cpu(lib: ctypes.CDLL, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of L queries q (Hq, L, D) over T >= L keys k, v (Hkv, T, D), the last L of
    them the queries' own (query i sees keys 0..T-L+i), as ``dsla.ops.attention.causal_attention``.
    Any head and token strides. Returns (Hq, L, D), a view of an (L, Hq, D) buffer (so that
    ``.transpose(0, 1).reshape(L, -1)`` copies nothing)."""
    Hq, L, D = q.shape
    H, T = k.shape[0], k.shape[1]
    if not q.dtype == k.dtype == v.dtype == torch.bfloat16:
        raise ValueError(f"prefill_attention_cpu: q, k, v must be bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or k.shape[2] != D or L > T or Hq % H:
        raise ValueError(f"prefill_attention_cpu: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
                         f"match (want q (Hq, L, D), k and v (Hkv, T, D) with L <= T and Hkv dividing Hq)")
    out = q.new_empty(L, Hq, D)
    a = _PrefillArgs(H=H, G=Hq // H, L=L, T=T, D=D, q=q.data_ptr(), q_h=q.stride(0), q_l=q.stride(1),
                     k=k.data_ptr(), k_h=k.stride(0), k_t=k.stride(1), v=v.data_ptr(), v_h=v.stride(0),
                     v_t=v.stride(1), out=out.data_ptr(), o_h=D, o_l=Hq * D, scale=D ** -0.5,
                     threads=torch.get_num_threads())
    rc = _call("dsla::prefill_attention_cpu", lib.dsla_prefill_attention, ctypes.byref(a))
    if rc:
        raise ValueError(f"prefill attention kernel: {_PREFILL_ERRORS.get(rc, f'error {rc}')} (q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, {q.dtype})")
    return out.transpose(0, 1)


# ---- a linear layer over one-byte weight codes (csrc/coded_linear.cpp, AVX-512 BF16 only) -----------

def coded_linear_kernel() -> ctypes.CDLL | None:
    """The kernel library when ``coded_linear_cpu`` can run here (kernels on, built, and a CPU with
    AVX-512 BF16); else None."""
    lib = cpu_kernels_lib()
    return lib if lib is not None and lib.dsla_coded_linear_available() else None


def coded_linear_cpu(lib: ctypes.CDLL, x: Tensor, codes: Tensor, dm: Tensor) -> Tensor:
    """y = x W^T for x (M, K) bfloat16 (rows contiguous) and W held as ``dsla.model.quant.pack_codes``
    gives it: codes (N/64, K/2, 64, 2) int8, dm (N/64, K/32, 2, 64) float32. Returns (M, N) bfloat16."""
    if not x.device.type == codes.device.type == dm.device.type == "cpu":
        raise ValueError(f"coded_linear_cpu runs on the CPU: x on {x.device}, codes on {codes.device}, dm on {dm.device}")
    if x.dim() != 2 or x.dtype != torch.bfloat16 or x.stride(1) != 1:
        raise ValueError(f"coded_linear_cpu: x must be (M, K) bfloat16 with contiguous rows, got "
                         f"{tuple(x.shape)} {x.dtype} strides {x.stride()}")
    M, K = x.shape
    nb = codes.shape[0]
    if (codes.dtype != torch.int8 or dm.dtype != torch.float32 or not codes.is_contiguous() or not dm.is_contiguous()
            or tuple(codes.shape) != (nb, K // 2, 64, 2) or tuple(dm.shape) != (nb, K // 32, 2, 64)):
        raise ValueError(f"coded_linear_cpu: codes {tuple(codes.shape)} {codes.dtype} and dm {tuple(dm.shape)} "
                         f"{dm.dtype} are not pack_codes' layout for K={K}")
    out = x.new_empty(M, nb * 64)
    a = _CodedArgs(M=M, N=nb * 64, K=K, x=x.data_ptr(), x_m=x.stride(0), codes=codes.data_ptr(), dm=dm.data_ptr(),
                   out=out.data_ptr(), o_m=out.stride(0), threads=torch.get_num_threads())
    rc = _call("dsla::coded_linear_cpu", lib.dsla_coded_linear, ctypes.byref(a))
    if rc:
        raise ValueError(f"coded linear kernel: {_CODED_ERRORS.get(rc, f'error {rc}')} (x {tuple(x.shape)}, N {nb * 64})")
    return out

"""CLI flags generated from config dataclass fields (one source of truth for names and defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import typing
from typing import Any, Callable

DTYPE_NAMES = ("bfloat16", "float32")  # --dtype choices (dsla.cli.DTYPES maps them to torch dtypes)


def parse_list(text: str, kind: Callable[[str], Any] = str) -> list[Any]:
    """'512,2048' -> [512, 2048] (CLI list flags); raise ValueError naming a bad item."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(kind(item))
        except ValueError:
            raise ValueError(f"cannot read {item!r} in {text!r} as {getattr(kind, '__name__', kind)}") from None
    if not out:
        raise ValueError(f"the list {text!r} is empty")
    return out


def _parse_ints(text: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    try:
        return tuple(parse_list(text, int))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None


def auto_dtype_name() -> str:
    """bfloat16 on a CPU with native bf16 dot products (avx512_bf16 / amx_bf16 in /proc/cpuinfo),
    where it measured 2-3x faster than float32; float32 elsewhere (AVX2-only CPUs run bf16 slower)."""
    from dsla.model.quant import native_bf16_flags

    return "bfloat16" if native_bf16_flags() else "float32"


def _dtype_name(text: str) -> str:
    if text == "auto":
        return auto_dtype_name()
    if text not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"--dtype {text!r}: choose auto, {', '.join(DTYPE_NAMES)}")
    return text


def add_model_arguments(p: argparse.ArgumentParser, dtype_default: str = "float32") -> None:
    """Flags shared by every command that loads a teacher. ``--dtype auto`` resolves at parse time
    (``auto_dtype_name``), so ``args.dtype`` is always one of ``DTYPE_NAMES``."""
    p.add_argument("--teacher", default=None,
                   help="local HF Llama directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", type=_dtype_name, default=dtype_default,
                   help=f"weight/activation dtype: {', '.join(DTYPE_NAMES)} or auto (bfloat16 on a CPU with "
                        f"avx512_bf16/amx_bf16, else float32) (default: {dtype_default})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_weights_argument(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--weights``: the storage of the linear layers for inference (dsla.model.quant; never for training)."""
    from dsla.model.quant import MIXED_MAX_ROWS, WEIGHT_CHOICES

    p.add_argument("--weights", choices=WEIGHT_CHOICES, default=default,
                   help="linear-layer weights: native (the --dtype), int8 (per channel), int4 (groups of 32; "
                        f"lm_head and DSLA q/o int8), packed (the --dtype weights prepacked for oneDNN) or mixed (int4's kernels for steps of <= {MIXED_MAX_ROWS} rows; "
                        "for more, e.g. prefill, the bf16 weights as one-byte codes where exact, else packed); auto: mixed with --dtype bfloat16 on a CPU "
                        f"with native bf16 (avx512_bf16/amx_bf16), else native (default: {default})")


def add_compile_argument(p: argparse.ArgumentParser) -> None:
    """``--compile-decode``: DSLA decode steps through torch.compile (dsla.ops.compiled.use_compiled_decode);
    ``--cpu-kernels``: our C++ CPU kernels or torch's ops only (dsla.ops.cpu_kernels.use_cpu_kernels)."""
    p.add_argument("--compile-decode", action="store_true",
                   help="compile the DSLA layers' decode step with torch.compile (needs a C++ compiler; `dsla "
                        "serve` compiles it before serving, about a minute the first time on 2 cores, seconds "
                        "once cached; then each DSLA layer's step is one fused kernel set: ~1.3x faster "
                        "all-DSLA decode on a 2-core CPU; falls back to eager if it fails)")
    p.add_argument("--cpu-kernels", choices=("auto", "off"), default="auto",
                   help="auto: our C++ CPU kernels (dsla/ops/csrc: decode attention; RMSNorm and RoPE "
                        "in bfloat16), built with the machine's C++ compiler on first use, torch's ops where they "
                        "do not build or apply; off: torch's ops (SDPA) only (default: auto)")


def _parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}") from None


def _optional(base: type):
    """Parse ``base`` values, or "none" for None (fields typed ``X | None``)."""
    def parse(text: str):
        return None if text.strip().lower() in ("none", "off", "") else base(text)
    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse


_FIELD_DOC = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: the comment that ends its declaration line (base classes included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # no source (e.g. a frozen install): flags without docs
            continue
        for line in lines:
            m = _FIELD_DOC.match(line)
            if m:
                docs[m.group(1)] = m.group(2)
    return docs


def _help(doc: str | None, tail: str) -> str:
    text = f"{doc} {tail}" if doc else tail
    return text.replace("%", "%%")  # argparse formats help with %


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add ``--field-name`` for each field of ``cls`` (nested dataclasses are flattened); each flag's
    help is the field's documentation comment plus its default."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        typ, doc = hints[f.name], docs.get(f.name)
        args = typing.get_args(typ)
        flag = "--" + f.name.replace("_", "-")
        if type(None) in args and len(args) == 2 and args[0] in (int, float, str):  # X | None
            parser.add_argument(flag, type=_optional(args[0]), default=f.default,
                                help=_help(doc, f"(default: {f.default}; 'none' disables)"))
            continue
        if dataclasses.is_dataclass(typ):
            add_dataclass_arguments(parser, typ, skip)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=_help(doc, f"(default: {default})"))
        elif typ in (int, float, str):
            parser.add_argument(flag, type=typ, default=default, help=_help(doc, f"(default: {default})"))
        elif args and args[0] is float:  # tuple[float, ...]
            parser.add_argument(flag, type=_parse_floats, default=default,
                                help=_help(doc, f"(comma-separated numbers; default: {','.join(map(str, default))})"))
        else:  # tuple[int, ...]
            parser.add_argument(flag, type=_parse_ints, default=default,
                                help=_help(doc, f"(comma-separated integers; default: {','.join(map(str, default))})"))


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build ``cls`` from parsed flags (its __post_init__ validates the values)."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            kw[f.name] = dataclass_from_args(typ, args)
        elif hasattr(args, f.name):
            kw[f.name] = getattr(args, f.name)
    return cls(**kw)

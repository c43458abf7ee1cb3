"""CLI flags generated from config dataclass fields (one source of truth for names and defaults)."""

from __future__ import annotations

import argparse
import dataclasses
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


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that loads a teacher."""
    p.add_argument("--teacher", default=None,
                   help="local HF Llama directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="weight/activation dtype")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _optional(base: type):
    """Parse ``base`` values, or "none" for None (fields typed ``X | None``)."""
    def parse(text: str):
        return None if text.strip().lower() in ("none", "off", "") else base(text)
    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add ``--field-name`` for each field of ``cls`` (nested dataclasses are flattened)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        typ = hints[f.name]
        args = typing.get_args(typ)
        if type(None) in args and len(args) == 2 and args[0] in (int, float, str):  # X | None
            default = f.default
            parser.add_argument("--" + f.name.replace("_", "-"), type=_optional(args[0]), default=default,
                                help=f"(default: {default}; 'none' disables)")
            continue
        if dataclasses.is_dataclass(typ):
            add_dataclass_arguments(parser, typ, skip)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif typ in (int, float, str):
            parser.add_argument(flag, type=typ, default=default, help=f"(default: {default})")
        else:  # tuple[int, ...]
            parser.add_argument(flag, type=_parse_ints, default=default, help="comma-separated integers")


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

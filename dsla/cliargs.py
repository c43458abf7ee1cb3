"""CLI flags generated from config dataclass fields (one source of truth for names and defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None


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
        elif args and args[0] is float:  # tuple[float, ...]
            parser.add_argument(flag, type=_parse_floats, default=default, help="comma-separated numbers")
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

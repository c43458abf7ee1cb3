"""The process-wide switch for compiled decode kernels (``--compile-decode``), and the wrapper that
runs a ``torch.compile``d function but falls back to its eager form for good when compiling fails.

The DSLA layer's decode step (``dsla.model.dsla.window_decode_layer``) uses it. Compiling needs a
C++ compiler for CPU (inductor) and takes a while on the first steps after the switch is turned on
(``dsla serve`` takes that wait before serving: ``dsla.model.dsla.warm_up_decode``); where it
fails, decoding goes on eagerly with a warning.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_STATE: dict = {"on": False, "fns": {}}


def use_compiled_decode(on: bool) -> None:
    """Compile the decode kernels (on) or run them eagerly (off, the default). Turning it on or
    off drops the kernels compiled so far."""
    _STATE["on"] = bool(on)
    _STATE["fns"].clear()


def compiled_decode_on() -> bool:
    """Whether the switch is on."""
    return _STATE["on"]


def decode_kernel(fn: Callable, *, dynamic: bool | None, batch_args: tuple[int, ...] = ()) -> Callable:
    """``fn`` while the switch is off; else one ``SafeCompiled`` of it (built on first use, kept
    until the switch changes) that falls back to ``fn`` itself. The first call's ``dynamic`` and
    ``batch_args`` are the ones used: pass the same ones every time."""
    if not _STATE["on"]:
        return fn
    compiled = _STATE["fns"].get(fn)
    if compiled is None:
        compiled = _STATE["fns"][fn] = SafeCompiled(torch.compile(fn, dynamic=dynamic), fn, fn.__name__, batch_args)
    return compiled


class SafeCompiled:
    """A compiled function that falls back to ``eager`` for good when compiling fails (any error
    before its first success, or a dynamo / inductor error on a later recompile); other errors
    (out of memory, bad input) propagate, since the call may have written its outputs already.

    ``batch_args``: the arguments whose dim 0 is the number of requests. The first call with two
    or more requests marks that dim dynamic, so one graph serves every batch size (no static graph
    for this size first, then a dynamic one at the next); one request keeps its own graph (size 1
    is always specialised)."""

    def __init__(self, fn: Callable, eager: Callable, name: str, batch_args: tuple[int, ...] = ()) -> None:
        self.fn, self.eager, self.name, self.batch_args = fn, eager, name, batch_args
        self.succeeded, self.batched = False, not batch_args

    @property
    def compiled(self) -> bool:
        """False once it has fallen back to eager."""
        return self.fn is not self.eager

    def __call__(self, *args):
        if not self.batched and self.compiled and args[0].shape[0] >= 2:
            for i in self.batch_args:
                if i < len(args) and isinstance(args[i], Tensor):
                    torch._dynamo.maybe_mark_dynamic(args[i], 0)
            self.batched = True
        try:
            out = self.fn(*args)
        except Exception as e:
            from torch._dynamo.exc import TorchDynamoException
            if not self.compiled or (self.succeeded and not isinstance(e, TorchDynamoException)):
                raise
            log.warning("compiled %s failed (%s: %s); running eagerly", self.name, type(e).__name__, str(e)[:200])
            self.fn = self.eager
            return self.fn(*args)
        self.succeeded = True
        return out

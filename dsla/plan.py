"""Layer plans: which layers run DSLA at a conversion ratio (shared by serve, eval and the CLI)."""

from __future__ import annotations

from typing import Iterable, Sequence


def layer_count(ratio: float, num_layers: int) -> int:
    """How many layers a conversion ratio means: round(ratio * num_layers) (0.25 of 30 is 8)."""
    return round(ratio * num_layers)


def layers_for_ratio(order: Sequence[int], num_layers: int, ratio: float,
                     available: Iterable[int] | None = None) -> list[int]:
    """The first round(ratio * num_layers) layers of ``order`` (in that order).

    Raises ValueError when ``ratio`` is outside [0, 1], or when the order has too few layers, or
    (given ``available``, e.g. a student's finished layers) names one that is not available.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio {ratio} is outside [0, 1]")
    k = layer_count(ratio, num_layers)
    layers = list(order[:k])
    usable = set(order) if available is None else set(available) & set(order)
    missing = [i for i in layers if i not in usable]
    if len(layers) < k or missing:
        raise ValueError(f"ratio {ratio} needs {k} of {num_layers} layers converted but only {len(usable)} layers "
                         f"can be (the student's finished layers, order {list(order)}"
                         f"{f'; missing {missing}' if missing else ''}): finish `dsla distill` or use a lower ratio")
    return layers

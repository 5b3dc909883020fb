"""How a comparison is run and summed up on a shared, noisy machine: alternating sides, per-round ratios."""

from __future__ import annotations

import statistics
from typing import Any, Callable


def alternate(sides: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Call each side `repeats` times, rotating the order every round (A B, B A, A B, ...).

    Rotating cancels a slow drift of the machine's speed (another job starting, thermal limits) that
    a fixed order would credit to whichever side always runs second.
    """
    names = list(sides)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(sides[name]())
    return results


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of the per-round ratios numerators[i] / denominators[i].

    Runs of the same round are minutes apart at most, so each ratio sees the machine in one state;
    the median then drops the rounds where another job slowed one side.
    """
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))

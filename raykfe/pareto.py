"""Pareto fronts of accuracy vs cost (MACs, parameters, latency) over sweep trials.

A trial is on the front when no other trial is at least as accurate AND at most as costly with
one of the two strictly better. Exact ties (same accuracy and cost) are all kept. The front is
returned sorted by cost, ascending.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["pareto_front"]


def pareto_front(trials: Sequence[dict], *, accuracy: str = "val_acc", cost: str = "macs") -> list[dict]:
    """The non-dominated trials (maximise ``accuracy``, minimise ``cost``), sorted by cost.

    Trials missing either value (a trial stopped before it reported) are ignored.
    """
    points = [t for t in trials if t.get(accuracy) is not None and t.get(cost) is not None]

    def dominated(t: dict) -> bool:
        return any(
            o[accuracy] >= t[accuracy] and o[cost] <= t[cost] and (o[accuracy] > t[accuracy] or o[cost] < t[cost])
            for o in points
        )

    return sorted((t for t in points if not dominated(t)), key=lambda t: (t[cost], -t[accuracy]))

"""Which actor eigendecomposes which layers: a pure function of the layers' costs.

The cost of a layer is ``d_in^3 + d_out^3`` (one ``eigh`` per factor, :func:`raykfe.eigen.eigh_cost`).
With k actors, layers are taken largest first and each goes to the actor with the least work so
far (longest processing time first, Graham 1969): the makespan is at most 4/3 of the optimum, and
a layer larger than all others put together gets an actor to itself.
"""

from __future__ import annotations

from typing import Mapping

__all__ = ["assign_layers"]


def assign_layers(costs: Mapping[str, float], k: int) -> list[list[str]]:
    """Split layer names over ``k`` actors (``k`` is capped at the number of layers).

    Returns one list per actor, each in the order its layers were assigned (largest first).
    Ties are broken by name (layers) and by index (actors), so the result is deterministic.
    """
    if k < 1:
        raise ValueError(f"need at least one actor, got k={k}")
    k = min(k, len(costs)) or 1
    loads = [0.0] * k
    groups: list[list[str]] = [[] for _ in range(k)]
    for name in sorted(costs, key=lambda n: (-float(costs[n]), n)):
        i = min(range(k), key=lambda j: (loads[j], j))
        groups[i].append(name)
        loads[i] += float(costs[name])
    return [g for g in groups if g] or [[]]

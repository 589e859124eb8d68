"""Eigendecomposition on Ray actors: each actor owns a group of layers (placed by
:func:`assign_layers`), keeps their factors and eigenbases (so a later round of iterative pruning
can merge bases where they live), and returns their EigenDamage scores to the driver, which sets
the global threshold.
"""

from __future__ import annotations

import os
from typing import Mapping

import ray
import torch

from ..eigen import Eigenbasis, eigh_cost, eigenbasis
from ..factors import LayerStats
from ..pruning import LayerScores, score_in_basis
from .placement import assign_layers

__all__ = ["EigenActor", "EigenPool"]


@ray.remote
class EigenActor:
    """Holds some layers' statistics and eigenbases."""

    def __init__(self, threads: int = 1) -> None:
        torch.set_num_threads(max(1, threads))
        self.stats: dict[str, LayerStats] = {}
        self.bases: dict = {}

    def pid(self) -> int:
        return os.getpid()

    def score(self, stats: Mapping[str, LayerStats], weights: Mapping[str, torch.Tensor]) -> dict[str, LayerScores]:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")  # num_gpus > 0
        out = {}
        for name, st in stats.items():  # largest first, as placed
            self.stats[name] = st
            on_device = LayerStats(st.A_sum.to(device), st.S_sum.to(device), st.count, st.meta)
            basis = eigenbasis(name, on_device)
            self.bases[name] = Eigenbasis(*(t.cpu() for t in (basis.QA, basis.lA, basis.QS, basis.lS)))
            out[name] = score_in_basis(name, weights[name], self.bases[name])
        return out


class EigenPool:
    """Actors for one eigen stage; ``k`` defaults to what the cluster's CPUs allow."""

    def __init__(self, *, actor_cpus: float = 1.0, actor_gpus: float = 0.0, max_actors: int | None = None) -> None:
        self.actor_cpus, self.actor_gpus, self.max_actors = actor_cpus, actor_gpus, max_actors
        self.actors: list = []
        self.groups: list[list[str]] = []

    def _k(self, n_layers: int) -> int:
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        k = max(1, int(cpus // self.actor_cpus))
        if self.actor_gpus > 0:
            k = min(k, max(1, int(float(ray.cluster_resources().get("GPU", 0.0)) // self.actor_gpus)))
        if self.max_actors is not None:
            k = min(k, self.max_actors)
        return min(k, n_layers)

    def score(self, stats: Mapping[str, LayerStats], weights: Mapping[str, torch.Tensor]) -> dict[str, LayerScores]:
        self.groups = assign_layers({n: eigh_cost(st) for n, st in stats.items()}, self._k(len(stats)))
        threads = max(1, int(self.actor_cpus))
        self.actors = [
            EigenActor.options(num_cpus=self.actor_cpus, num_gpus=self.actor_gpus).remote(threads) for _ in self.groups
        ]
        refs = [
            actor.score.remote({n: stats[n] for n in group}, {n: weights[n] for n in group})
            for actor, group in zip(self.actors, self.groups)
        ]
        out: dict[str, LayerScores] = {}
        for part in ray.get(refs):
            out.update(part)
        return {n: out[n] for n in stats}

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

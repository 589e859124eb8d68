"""Eigendecomposition on Ray actors: each actor owns a group of layers (placed by
:func:`assign_layers`), keeps their factors and eigenbases (so a later round of iterative pruning
can merge bases where they live), and returns their EigenDamage scores to the driver, which sets
the global threshold.
"""

from __future__ import annotations

import os
import time
from typing import Mapping

import numpy as np
import ray
import torch

from ..eigen import Eigenbasis, eigh_cost, eigenbasis
from ..factors import LayerStats
from ..pruning import LayerScores, score_in_basis
from .placement import assign_layers

__all__ = ["EigenActor", "EigenPool"]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True))  # arrays from the object store are read-only


@ray.remote
class EigenActor:
    """Holds some layers' statistics and eigenbases. Tensors cross the actor boundary as numpy
    arrays, which Ray moves through its object store without pickling copies."""

    def __init__(self, threads: int = 1) -> None:
        torch.set_num_threads(max(1, threads))
        torch.linalg.eigh(torch.eye(64, dtype=torch.float64))  # load LAPACK before the clock starts
        self.stats: dict[str, LayerStats] = {}
        self.bases: dict[str, Eigenbasis] = {}
        self.compute_seconds = 0.0

    def seconds(self) -> float:
        """Time spent decomposing and scoring in the last :meth:`score` call."""
        return self.compute_seconds

    def pid(self) -> int:
        return os.getpid()

    def score(self, stats: Mapping[str, tuple], weights: Mapping[str, np.ndarray]) -> dict[str, tuple]:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")  # num_gpus > 0
        out = {}
        t0 = time.perf_counter()
        for name, (a_sum, s_sum, count) in stats.items():  # largest first, as placed
            st = LayerStats(_torch(a_sum), _torch(s_sum), int(count))
            self.stats[name] = st
            on_device = LayerStats(st.A_sum.to(device), st.S_sum.to(device), st.count)
            basis = eigenbasis(name, on_device)
            self.bases[name] = Eigenbasis(*(t.cpu() for t in (basis.QA, basis.lA, basis.QS, basis.lS)))
            sc = score_in_basis(name, _torch(weights[name]), self.bases[name])
            out[name] = tuple(_np(t) for t in (*(getattr(sc.basis, k) for k in ("QA", "lA", "QS", "lS")), sc.w_kfe, sc.entries))
        self.compute_seconds = time.perf_counter() - t0
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

    def start(self, n_layers: int) -> int:
        """Start the actors (and wait until each has imported torch); returns how many."""
        if not self.actors:
            threads = max(1, int(self.actor_cpus))
            self.actors = [
                EigenActor.options(num_cpus=self.actor_cpus, num_gpus=self.actor_gpus).remote(threads)
                for _ in range(self._k(n_layers))
            ]
            ray.get([a.pid.remote() for a in self.actors])
        return len(self.actors)

    def score(self, stats: Mapping[str, LayerStats], weights: Mapping[str, torch.Tensor]) -> dict[str, LayerScores]:
        k = self.start(len(stats))
        self.groups = assign_layers({n: eigh_cost(st) for n, st in stats.items()}, k)
        refs = [
            actor.score.remote(
                {n: (_np(stats[n].A_sum), _np(stats[n].S_sum), stats[n].count) for n in group},
                {n: _np(weights[n]) for n in group},
            )
            for actor, group in zip(self.actors, self.groups)
        ]
        out: dict[str, LayerScores] = {}
        for part in ray.get(refs):
            for name, (qa, la, qs, ls, wk, entries) in part.items():
                out[name] = LayerScores(Eigenbasis(_torch(qa), _torch(la), _torch(qs), _torch(ls)), _torch(wk), _torch(entries))
        return {n: out[n] for n in stats}

    def compute_seconds(self) -> list[float]:
        """Per actor, the seconds of decomposition and scoring in the last stage."""
        return ray.get([a.seconds.remote() for a in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

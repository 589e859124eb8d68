"""Eigendecomposition on Ray actors.

Layers are handed out one at a time, largest first, to whichever actor is free (a work queue:
longest processing time first with dynamic assignment, Graham 1969), so a layer that takes longer
than its ``n^3`` cost predicts delays only its own actor. Each actor holds ``depth`` layers in
flight: the factors of its next layer cross to it while it decomposes the current one, so the
transfers hide behind the compute. Results (bases, KFE weights, entry scores) return to the
driver, which sets the global threshold.
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
from ..methods.eigendamage import LayerScores, score_in_basis

__all__ = ["EigenActor", "EigenPool"]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True))  # arrays from the object store are read-only


@ray.remote
class EigenActor:
    """Decomposes and scores one layer per call. Tensors cross the actor boundary as numpy arrays,
    which Ray moves through its object store without pickling copies."""

    def __init__(self, threads: int = 1) -> None:
        torch.set_num_threads(max(1, threads))
        torch.linalg.eigh(torch.eye(64, dtype=torch.float64))  # load LAPACK before the clock starts

    def pid(self) -> int:
        return os.getpid()

    def score_one(self, name: str, a_sum: np.ndarray, s_sum: np.ndarray, count: int, weight: np.ndarray) -> tuple:
        """``(QA, lA, QS, lS, w_kfe, entries, seconds)`` of one layer."""
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")  # num_gpus > 0
        t0 = time.perf_counter()
        st = LayerStats(_torch(a_sum).to(device), _torch(s_sum).to(device), int(count))
        basis = eigenbasis(name, st)
        basis = Eigenbasis(*(t.cpu() for t in (basis.QA, basis.lA, basis.QS, basis.lS)))
        sc = score_in_basis(name, _torch(weight), basis)
        out = tuple(_np(t) for t in (*(getattr(sc.basis, k) for k in ("QA", "lA", "QS", "lS")), sc.w_kfe, sc.entries))
        return (*out, time.perf_counter() - t0)


class EigenPool:
    """Actors for one eigen stage; ``k`` defaults to what the cluster's CPUs allow."""

    def __init__(self, *, actor_cpus: float = 1.0, actor_gpus: float = 0.0, max_actors: int | None = None, depth: int = 2) -> None:
        self.actor_cpus, self.actor_gpus, self.max_actors, self.depth = actor_cpus, actor_gpus, max_actors, max(1, depth)
        self.actors: list = []
        self.groups: list[list[str]] = []  # per actor, the layers it decomposed in the last stage
        self._seconds: list[float] = []

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
        queue = sorted(stats, key=lambda n: (-float(eigh_cost(stats[n])), n))  # largest first
        self.groups, self._seconds = [[] for _ in range(k)], [0.0] * k
        pending: dict = {}  # object ref -> (actor index, layer name)

        def submit(i: int) -> None:
            name = queue.pop(0)
            st = stats[name]
            ref = self.actors[i].score_one.remote(name, _np(st.A_sum), _np(st.S_sum), st.count, _np(weights[name]))
            pending[ref] = (i, name)
            self.groups[i].append(name)

        for _ in range(self.depth):
            for i in range(k):
                if queue:
                    submit(i)
        out: dict[str, LayerScores] = {}
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i, name = pending.pop(ref)
            qa, la, qs, ls, wk, entries, seconds = ray.get(ref)
            out[name] = LayerScores(Eigenbasis(_torch(qa), _torch(la), _torch(qs), _torch(ls)), _torch(wk), _torch(entries))
            self._seconds[i] += seconds
            if queue:
                submit(i)
        return {n: out[n] for n in stats}

    def compute_seconds(self) -> list[float]:
        """Per actor, the seconds of decomposition and scoring in the last stage."""
        return list(self._seconds)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

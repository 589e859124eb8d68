"""The Ray implementation of the job backend (:class:`raykfe.backend.Backend`): statistics and
training on Ray Train workers, eigendecompositions on actors.

The job's context is put in Ray's object store once per job (:meth:`RayBackend.open`); every Train
run gets its reference. Workers hand their result (the all-reduced statistics, the trained
state_dict) to an inbox actor that the backend owns, and the backend returns it: nothing goes
through the stage store but the per-epoch training checkpoints, which must outlive a worker.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import uuid
from urllib.parse import urlparse

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..backend import JobContext
from ..config import JobConfig
from ..errors import RaykfeError
from ..factors import stats_from_tensors
from ..stream import export_listings
from .actors import EigenPool
from .cluster import connect
from .resources import check_job
from .faults import FAULT_ENV, test_fault_from_env
from .workers import measure_worker, stats_worker, train_worker

__all__ = ["RayBackend", "FAULT_ENV"]


def _absolute(ctx: JobContext) -> JobContext:
    """Local paths made absolute: Train workers do not share the driver's working directory."""

    def fix(uri):
        if uri and urlparse(uri).scheme in ("", "file"):
            return os.path.abspath(urlparse(uri).path if uri.startswith("file://") else uri)
        return uri

    return dataclasses.replace(ctx, store_uri=fix(ctx.store_uri), data=dataclasses.replace(ctx.data, root=fix(ctx.data.root)))


@ray.remote(num_cpus=0)
class _Inbox:
    """Where a Train run's chief leaves its result for the driver (the actor holds the value)."""

    def __init__(self) -> None:
        self.items: dict = {}

    def put(self, key: str, value) -> None:
        self.items[key] = value

    def say(self, line: str) -> None:
        """A console line from a worker, for the driver to print (Ray's forwarding is off)."""
        self.items.setdefault("_lines", []).append(line)

    def said(self) -> list[str]:
        return self.items.pop("_lines", [])

    def take(self, key: str):
        return self.items.pop(key, None)


class _Relay:
    """While a Train run lasts, print the lines its workers said (:meth:`_Inbox.say`) on the
    driver's console, once each and in order: the job's own lines, without Ray's log forwarding."""

    def __init__(self, inbox, log, every_s: float = 0.5) -> None:
        self.inbox, self.log, self.every_s = inbox, log, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _drain(self) -> None:
        for line in ray.get(self.inbox.said.remote()):
            self.log(line)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._drain()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()


class RayBackend:
    """Statistics and training on Ray Train workers, eigendecompositions on actors."""

    name = "ray"

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg, self.rc = cfg, cfg.ray
        self._connected = False
        self._ctx = None
        self._inbox = None
        self.log = lambda line: print(line, file=sys.stderr, flush=True)
        self.worker_reports: dict[str, list[dict]] = {}  # per stage, each worker's figures of its last run

    def open(self, ctx: JobContext) -> None:
        """Join or start the cluster before the job writes anything; ship the job's context once."""
        self._connect()
        self._ctx = ray.put(_absolute(ctx))
        self._inbox = _Inbox.remote()
        self._name = ctx.name

    def _connect(self) -> None:
        if not self._connected:
            connect(self.rc.address, self.rc.num_cpus, log_to_driver=self.rc.verbose)
            check_job(self.cfg)  # a request the cluster cannot meet fails here, not as a hang in Train
            self._connected = True

    def _fit(self, fn, recipe, state, stage: str, **extra):
        """One Train run of ``fn`` on the job's workers; the value its chief left in the inbox."""
        config = {
            "ctx": self._ctx, "inbox": self._inbox, "recipe": dataclasses.asdict(recipe), "state": ray.put(state),
            "threads": max(1, int(self.rc.cpus_per_worker)), "bucket_mb": self.rc.bucket_mb,
            "fault": test_fault_from_env(), "stage": stage,
            "listings": ray.put(export_listings()),  # the data root's listing, made once by the driver
            **extra,
        }
        trainer = TorchTrainer(
            fn,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=self.rc.workers, use_gpu=self.rc.use_gpu,
                                         resources_per_worker={"CPU": self.rc.cpus_per_worker}),
            run_config=RunConfig(
                name=f"raykfe-{self._name}-{stage}-{uuid.uuid4().hex[:8]}",
                failure_config=FailureConfig(max_failures=self.rc.max_failures),
            ),
        )
        try:
            with _Relay(self._inbox, self.log):
                trainer.fit()
        except ray.train.TrainingFailedError as exc:
            root = exc
            while getattr(root, "__cause__", None) is not None:
                root = root.__cause__
            msg = str(root).strip().splitlines()[-1] if str(root).strip() else type(root).__name__
            raise RaykfeError(
                f"the {stage} stage failed on the Ray Train workers after {self.rc.max_failures} restarts: {msg}"
            ) from None
        reports = ray.get([self._inbox.take.remote(f"{stage}.worker-{r}") for r in range(self.rc.workers)])
        self.worker_reports[stage] = [r for r in reports if r is not None]
        return ray.get(self._inbox.take.remote(stage))

    def train(self, recipe, state, settings, stage):
        out = self._fit(train_worker, recipe, state, stage, train=dataclasses.asdict(settings))
        return out if out is not None else (state, [])

    def kfac(self, recipe, state, layers, conv_mode):
        tensors, meta = self._fit(stats_worker, recipe, state, "stats", layers=list(layers), conv_mode=conv_mode)
        return stats_from_tensors(tensors, meta)

    def measure(self, recipe, state, kind, spec):
        return self._fit(measure_worker, recipe, state, "stats", kind=kind, spec=spec)

    def score(self, stats, weights):
        self._connect()
        pool = EigenPool(actor_cpus=self.rc.actor_cpus, actor_gpus=self.rc.actor_gpus, max_actors=self.rc.max_actors)
        try:
            return pool.score(stats, weights)
        finally:
            pool.shutdown()

"""The Ray implementation of the pipeline's backend (see :class:`raykfe.pipeline.LocalBackend`)."""

from __future__ import annotations

import dataclasses
import os
import uuid
from urllib.parse import urlparse

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..config import JobConfig, config_to_dict
from ..errors import RaykfeError
from ..factors import stats_from_tensors
from ..stages import StageStore
from ..storage import open_uri
from ..stream import export_listings
from .actors import EigenPool
from .cluster import connect
from .workers import measure_worker, stats_worker, train_worker

__all__ = ["RayBackend", "FAULT_ENV"]

FAULT_ENV = "RAYKFE_FAULT_INJECT"


def _absolute(cfg: JobConfig) -> JobConfig:
    """Local paths made absolute: Train workers do not share the driver's working directory."""

    def fix(uri):
        if uri and urlparse(uri).scheme in ("", "file"):
            return os.path.abspath(urlparse(uri).path if uri.startswith("file://") else uri)
        return uri

    return dataclasses.replace(
        cfg,
        output=dataclasses.replace(cfg.output, uri=fix(cfg.output.uri)),
        data=dataclasses.replace(cfg.data, root=fix(cfg.data.root)),
    )


def _fault() -> dict | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    stage, rank, after, marker = spec.split(":", 3)
    return {"stage": stage, "rank": int(rank), "after": int(after), "marker": marker}


class RayBackend:
    """Statistics and training on Ray Train workers, eigendecompositions on actors."""

    name = "ray"

    def __init__(self, cfg: JobConfig) -> None:
        self.rc = cfg.ray
        self._connected = False

    def prepare(self) -> None:
        """Join or start the cluster before the job writes anything."""
        self._connect()

    def _connect(self) -> None:
        if not self._connected:
            connect(self.rc.address, self.rc.num_cpus)
            self._connected = True

    def _fit(self, fn, cfg: JobConfig, recipe, state, stage: str, **extra) -> None:
        self._connect()
        cfg = _absolute(cfg)
        config = {
            "cfg": config_to_dict(cfg),
            "recipe": dataclasses.asdict(recipe),
            "state": ray.put(state),
            "threads": max(1, int(self.rc.cpus_per_worker)),
            "fault": _fault(),
            "stage": stage,
            "listings": ray.put(export_listings()),  # the data root's listing, made once by the driver
            **extra,
        }
        resources = {"CPU": self.rc.cpus_per_worker}
        trainer = TorchTrainer(
            fn,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=self.rc.workers, use_gpu=self.rc.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=f"raykfe-{cfg.name}-{stage}-{uuid.uuid4().hex[:8]}",
                failure_config=FailureConfig(max_failures=self.rc.max_failures),
            ),
        )
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as exc:
            root = exc
            while getattr(root, "__cause__", None) is not None:
                root = root.__cause__
            msg = str(root).strip().splitlines()[-1] if str(root).strip() else type(root).__name__
            raise RaykfeError(
                f"the {stage} stage failed on the Ray Train workers after {self.rc.max_failures} restarts: {msg}"
            ) from None

    def train(self, cfg, recipe, state, tcfg, stage, store):
        self._fit(train_worker, cfg, recipe, state, stage, tcfg=config_to_dict(tcfg))
        ckpt = StageStore(open_uri(_absolute(cfg).output.uri)).load_checkpoint(stage)
        if ckpt is None:  # zero epochs
            return state, []
        _, tensors, meta = ckpt
        return {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, meta["history"]

    def collect(self, cfg, recipe, state, layers, *, stage="stats", conv_mode=None):
        self._fit(stats_worker, cfg, recipe, state, stage, layers=list(layers), conv_mode=conv_mode)
        tensors, meta = StageStore(open_uri(_absolute(cfg).output.uri)).load(stage)
        return stats_from_tensors(tensors, meta)

    def measure(self, cfg, recipe, state, kind, spec, *, stage):
        self._fit(measure_worker, cfg, recipe, state, stage, kind=kind, spec=spec)
        tensors, _ = StageStore(open_uri(_absolute(cfg).output.uri)).load(stage)
        return tensors

    def score(self, stats, weights):
        self._connect()
        pool = EigenPool(actor_cpus=self.rc.actor_cpus, actor_gpus=self.rc.actor_gpus, max_actors=self.rc.max_actors)
        try:
            return pool.score(stats, weights)
        finally:
            pool.shutdown()

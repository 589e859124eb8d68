"""Where a job's heavy work runs: the backend protocol, what a backend is told of a job once
(:class:`JobContext`), and the in-process backend (the reference; Ray's is
:class:`raykfe.distributed.RayBackend`).

A backend is opened once per job with its context, then each call takes only the model to work on
(a :class:`raykfe.checkpoint.ModelRecipe` and a state_dict, so that it can be rebuilt on another
process or node) and what that call needs, and RETURNS its result. Keeping finished stages is the
job's business (:class:`raykfe.pipeline.JobSource`); a backend writes to storage only where a
stage must survive the process that computes it (per-epoch training checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import torch

from .checkpoint import ModelRecipe
from .config import DataConfig, JobConfig, StatsConfig
from .eigen import eigenbasis
from .errors import ConfigError
from .factors import LayerStats
from .finetune import TrainSettings
from .methods.eigendamage import LayerScores, score_in_basis

__all__ = ["Backend", "JobContext", "LocalBackend", "job_device"]


@dataclass(frozen=True)
class JobContext:
    """What a backend needs to know of a job: its data (and seed: the splits and the Fisher's label
    draws), how statistics passes batch, where its stages live, its device and whether to show
    progress."""

    name: str
    seed: int
    data: DataConfig
    stats: StatsConfig
    store_uri: str
    device: str = "cpu"
    progress: bool = False

    @classmethod
    def of(cls, cfg: JobConfig) -> "JobContext":
        return cls(cfg.name, cfg.seed, cfg.data, cfg.stats, cfg.output.uri, cfg.device, cfg.progress)


def job_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA GPU is visible: use device=cpu")
    return torch.device(device)


class Backend(Protocol):
    name: str

    def open(self, ctx: JobContext) -> None:
        """Bind the job (and join a cluster): called before the job writes anything."""
        ...

    def train(self, recipe: ModelRecipe, state: dict, settings: TrainSettings, stage: str) -> tuple[dict, list[dict]]:
        """Train the model ``settings.epochs`` epochs (resuming from the stage's newest checkpoint):
        its new state_dict and one record per epoch."""
        ...

    def kfac(self, recipe: ModelRecipe, state: dict, layers: list[str], conv_mode: str) -> dict[str, LayerStats]:
        """K-FAC statistics of ``layers`` over the training split (capped by ``stats.max_batches``)."""
        ...

    def measure(self, recipe: ModelRecipe, state: dict, kind: str, spec: dict) -> dict[str, torch.Tensor]:
        """The registered statistic ``kind`` (:func:`raykfe.methods.collect_statistic`) over the same data."""
        ...

    def score(self, stats: Mapping[str, LayerStats], weights: Mapping[str, torch.Tensor]) -> dict[str, LayerScores]:
        """Eigendecompose every layer's factors and score its directions in that basis."""
        ...


class LocalBackend:
    """Everything in this process: the reference implementation. The data splits are loaded once
    per job. ``on_epoch(record)`` is called after every fine-tuning epoch (a sweep trial reports
    it to Ray Tune's scheduler)."""

    name = "local"

    def __init__(self, on_epoch: Callable[[dict], None] | None = None) -> None:
        self.on_epoch = on_epoch
        self.ctx: JobContext | None = None
        self._splits = None

    def open(self, ctx: JobContext) -> None:
        self.ctx, self._splits = ctx, None

    @property
    def splits(self):
        if self._splits is None:
            from .data import job_splits

            self._splits = job_splits(self.ctx.data, self.ctx.seed)
        return self._splits

    def _model(self, recipe: ModelRecipe, state: dict):
        model = recipe.build()
        model.load_state_dict(state)
        return model.to(job_device(self.ctx.device))

    def _stats_loader(self):
        from .data import make_loader

        return make_loader(self.splits.train, self.ctx.stats.batch_size, shuffle=False)

    def train(self, recipe, state, settings, stage):
        from .data import make_loader
        from .finetune import run_training, state_of
        from .stages import StageStore
        from .storage import open_uri

        ctx, model = self.ctx, self._model(recipe, state)
        seed = ctx.seed + (stage == "finetune")
        history = run_training(
            model, make_loader(self.splits.train, settings.batch_size, shuffle=True, seed=seed, drop_last=True),
            settings, stage, StageStore(open_uri(ctx.store_uri)), val_loader=make_loader(self.splits.val, 256, shuffle=False),
            device=job_device(ctx.device), progress=ctx.progress, on_epoch=self.on_epoch if stage == "finetune" else None,
            seed=seed,
        )
        return state_of(model), history

    def kfac(self, recipe, state, layers, conv_mode):
        from .capture import collect_factors

        s = self.ctx.stats
        return collect_factors(self._model(recipe, state), self._stats_loader(), fisher=s.fisher, conv_mode=conv_mode,
                               seed=self.ctx.seed, layers=layers, max_batches=s.max_batches, progress=self.ctx.progress)

    def measure(self, recipe, state, kind, spec):
        from .methods import collect_statistic

        s = self.ctx.stats
        return collect_statistic(kind, self._model(recipe, state), self._stats_loader(), spec, fisher=s.fisher,
                                 seed=self.ctx.seed, max_batches=s.max_batches, progress=self.ctx.progress)

    def score(self, stats, weights):
        return {name: score_in_basis(name, weights[name], eigenbasis(name, st)) for name, st in stats.items()}

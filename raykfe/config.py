"""Job configuration: frozen, validated dataclasses, read from YAML with ``key=value`` overrides.

A job file has the sections below (every key optional, defaults shown by ``raykfe config``)::

    name: digits            # a label for reports
    seed: 0
    device: cpu             # or cuda / cuda:0
    model:    {name, width, weights, widths}
    data:     {name, root, image_size, val_fraction, test_fraction, augment, synthetic_size, num_classes,
               access, workers}
    base:     {epochs, lr, momentum, weight_decay, milestones, batch_size}   # trains a base model
    stats:    {fisher, conv_mode, batch_size, max_batches, max_factor_dim}
    prune:    {method, target, max_layer_ratio, include_classifier, exclude, tolerance, freeze_rotations,
               rounds, round_epochs, damping, steps, recalibrate_batches, recalibrate_on, rank, normalize,
               hybrid, ekfac, forms, round_to, channel_share, channel_method}
    sparsity: {epochs, lr, ..., bn_l1}  # network slimming's sparsity training (prune.method=slimming)
    finetune: {epochs, lr, momentum, weight_decay, milestones, batch_size, bn_l1}
    output:   {uri, overwrite}
    widen:    {factor, uri, max_uniform}   # raykfe widen: the bottlenecks widened vs a uniform widening
    runtime:  ray | local
    ray:      {address, num_cpus, workers, use_gpu, cpus_per_worker, actor_cpus, actor_gpus, max_actors,
               max_failures, bucket_mb, resource_wait_s, verbose}
    latency:  {batches, repeats, threads, table, batch}   # inference latency of base and pruned in the report
    sosp:     {classes, block, max_pairs}                  # SOSP-I's cost at scale (prune.method=sosp-i)

Every error names the field, the value and the fix, in one line (:class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import ConfigError
from .plan import parse_target

__all__ = [
    "JobConfig",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "StatsConfig",
    "PruneConfig",
    "OutputConfig",
    "RayConfig",
    "LatencyConfig",
    "SospConfig",
    "WidenConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
]


def _check(cond: bool, key: str, value: Any, fix: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: {fix}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet32"
    width: float = 1.0
    weights: str | None = None  # a safetensors state_dict of the base model; None trains one
    widths: str | None = None  # a widths spec (JSON, raykfe.widen): the model with those channel groups widened

    def validate(self, p: str) -> None:
        _check(self.width > 0, f"{p}.width", self.width, "use a positive width multiplier, e.g. 1.0")
        _check(self.widths is None or bool(self.widths.strip()), f"{p}.widths", self.widths,
               "give the path or URI of a widths JSON (raykfe widen writes them), or null")


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    root: str | None = None
    image_size: int = 32
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    augment: bool = False
    synthetic_size: int = 512
    num_classes: int | None = None
    access: str = "stream"  # an s3:// / gs:// root: "stream" (read objects as needed) or "mirror" (local copy first)
    workers: int = 0  # DataLoader processes that read, decode and augment images (0: in the loading process)

    def validate(self, p: str) -> None:
        _check(self.image_size >= 8, f"{p}.image_size", self.image_size, "use at least 8")
        _check(self.access in ("stream", "mirror"), f"{p}.access", self.access, "use stream or mirror")
        _check(self.workers >= 0, f"{p}.workers", self.workers, "use 0 (load in the main process) or more processes")
        _check(0 < self.val_fraction < 1, f"{p}.val_fraction", self.val_fraction, "use a fraction in (0, 1)")
        _check(0 <= self.test_fraction < 1, f"{p}.test_fraction", self.test_fraction, "use a fraction in [0, 1)")
        _check(self.synthetic_size >= 8, f"{p}.synthetic_size", self.synthetic_size, "use at least 8")


@dataclass(frozen=True)
class TrainConfig:
    """SGD with momentum and a step schedule (lr x gamma at each milestone fraction of epochs)."""

    epochs: int = 20
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    batch_size: int = 64
    bn_l1: float = 0.0  # L1 penalty on BatchNorm scales (network slimming's sparsity training)
    schedule: str = "step"  # "step" (gamma at each milestone) or "cosine" (to 0 over the epochs)
    warmup_epochs: float = 0.0  # linear warm-up of the rate over the first epochs
    rotation_lr: float = 1.0  # the KFE rotations' rate relative to lr

    def validate(self, p: str) -> None:
        _check(self.bn_l1 >= 0, f"{p}.bn_l1", self.bn_l1, "use 0 (off) or a small penalty, e.g. 1e-4")
        _check(self.schedule in ("step", "cosine"), f"{p}.schedule", self.schedule, "use step or cosine")
        _check(self.warmup_epochs >= 0, f"{p}.warmup_epochs", self.warmup_epochs, "use 0 or more epochs")
        _check(self.rotation_lr > 0, f"{p}.rotation_lr", self.rotation_lr, "use a positive multiple of lr, e.g. 0.1")
        _check(self.epochs >= 0, f"{p}.epochs", self.epochs, "use 0 or more epochs")
        _check(self.lr > 0, f"{p}.lr", self.lr, "use a positive learning rate")
        _check(0 <= self.momentum < 1, f"{p}.momentum", self.momentum, "use a momentum in [0, 1)")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, "use a non-negative weight decay")
        _check(all(0 < m < 1 for m in self.milestones), f"{p}.milestones", list(self.milestones), "use fractions of the epochs in (0, 1), e.g. [0.5, 0.75]")
        _check(0 < self.gamma <= 1, f"{p}.gamma", self.gamma, "use a factor in (0, 1]")
        _check(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, "use a positive batch size")

    def settings(self):
        from .finetune import TrainSettings

        return TrainSettings(
            epochs=self.epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
            milestones=tuple(self.milestones), gamma=self.gamma, batch_size=self.batch_size,
            bn_l1=self.bn_l1, schedule=self.schedule, warmup_epochs=self.warmup_epochs, rotation_lr=self.rotation_lr,
        )


@dataclass(frozen=True)
class StatsConfig:
    fisher: str = "true"
    conv_mode: str = "patch"
    batch_size: int = 64
    max_batches: int | None = None
    max_factor_dim: int = 8192

    def validate(self, p: str) -> None:
        _check(self.fisher in ("true", "empirical"), f"{p}.fisher", self.fisher, "use 'true' (sampled labels) or 'empirical'")
        _check(self.conv_mode in ("patch", "full"), f"{p}.conv_mode", self.conv_mode, "use 'patch' or 'full'")
        _check(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, "use a positive batch size")
        _check(self.max_batches is None or self.max_batches >= 1, f"{p}.max_batches", self.max_batches, "use a positive number or null for all")
        _check(self.max_factor_dim >= 1, f"{p}.max_factor_dim", self.max_factor_dim, "use a positive factor size, e.g. 8192")


@dataclass(frozen=True)
class PruneConfig:
    method: str = "eigendamage"
    target: str = "flops:0.5"
    max_layer_ratio: float | None = None  # default 0.95 in one pass, 0.5 per round when iterative
    include_classifier: bool = False
    exclude: tuple[str, ...] = ()
    tolerance: float = 0.02
    freeze_rotations: bool = False
    rounds: int | None = None  # prune/fine-tune rounds (eigendamage-iterative: default 3; others 1)
    round_epochs: int | None = None  # fine-tuning epochs between rounds (default: finetune.epochs)
    damping: float = 1e-3  # Tikhonov damping of the K-FAC inverses (c-obs, kron-obs), relative to the mean diagonal
    steps: int = 1  # one-shot prune steps, statistics re-collected between them (no training)
    recalibrate_batches: int = 10  # BatchNorm statistics re-estimated after surgery from this many batches (0: off)
    recalibrate_on: str = "driver"  # "driver" (in the job's process) or "workers" (sharded, all-reduced)
    rank: str | None = None  # "cost": loss per MAC / parameter saved; "score": loss alone; "auto": the better fit; null: the method's
    normalize: str | None = None  # "mean": scores / their layer's mean before the global ranking; null: the method's
    hybrid: bool = True  # KFE methods remove channels of the groups coupled to depthwise / grouped convs
    ekfac: bool = False  # KFE scores from the measured second moments in the eigenbasis (EKFAC)
    forms: str = "cheapest"  # pruned KFE layers in their cheapest exact form, or "three" layers
    round_to: int | None = None  # kept directions a multiple of this (null: 1 on CPU, 8 on a GPU)
    channel_share: float = 0.0  # KFE methods: share of the target removed by whole channels first (channel_method)
    channel_method: str = "c-obd"  # the channel step's ranking

    def validate(self, p: str) -> None:
        from .methods import METHODS

        _check(self.method in METHODS, f"{p}.method", self.method, f"choose one of {', '.join(METHODS)}")
        try:
            tgt = parse_target(self.target)
        except ConfigError as exc:
            raise ConfigError(f"{p}.target: {exc}") from None
        _check(tgt.kind != "directions" or METHODS[self.method].space == "kfe", f"{p}.target", self.target,
               f"directions:F counts eigen-directions; {self.method} removes channels: use params:F or flops:F")
        _check(tgt.kind != "latency" or (METHODS[self.method].space == "kfe" and self.n_rounds == 1 and self.steps == 1),
               f"{p}.target", self.target, "latency:F is met by one-shot eigendamage for now: use flops:F, or "
               "prune.method=eigendamage with steps 1")
        _check(tgt.kind != "directions" or self.n_rounds == 1, f"{p}.target", self.target,
               "iterative rounds aim at params:F or flops:F")
        _check(self.max_layer_ratio is None or 0 < self.max_layer_ratio <= 1, f"{p}.max_layer_ratio",
               self.max_layer_ratio, "use a fraction in (0, 1] or null for the default")
        _check(0 < self.tolerance < 1, f"{p}.tolerance", self.tolerance, "use a fraction, e.g. 0.02")
        _check(self.rounds is None or self.rounds >= 1, f"{p}.rounds", self.rounds, "use 1 or more rounds, or null")
        _check(self.rounds in (None, 1) or METHODS[self.method].space == "kfe", f"{p}.rounds", self.rounds,
               "rounds apply to eigendamage only: use prune.method=eigendamage-iterative or rounds=1")
        _check(self.round_epochs is None or self.round_epochs >= 0, f"{p}.round_epochs", self.round_epochs,
               "use 0 or more epochs, or null for finetune.epochs")
        _check(self.damping > 0, f"{p}.damping", self.damping, "use a small positive damping, e.g. 1e-3")
        _check(self.steps >= 1, f"{p}.steps", self.steps, "use 1 (one shot) or more steps")
        _check(self.steps == 1 or self.n_rounds == 1, f"{p}.steps", self.steps,
               "an iterative method prunes in prune.rounds: leave prune.steps at 1")
        _check(self.steps == 1 or tgt.kind != "directions", f"{p}.steps", self.steps, "steps aim at params:F or flops:F")
        _check(self.recalibrate_batches >= 0, f"{p}.recalibrate_batches", self.recalibrate_batches,
               "use 0 (off) or a number of batches, e.g. 10")
        _check(0 <= self.channel_share < 1, f"{p}.channel_share", self.channel_share, "use a fraction in [0, 1), e.g. 0.3 (0: off)")
        _check(self.channel_share == 0 or (METHODS[self.method].space == "kfe" and self.n_rounds == 1), f"{p}.channel_share",
               self.channel_share, "a channel step comes before one-shot eigendamage only: set it to 0")
        _check(self.channel_share == 0 or tgt.kind in ("flops", "params"), f"{p}.channel_share", self.channel_share,
               "a channel step needs a params:F or flops:F target: set it to 0")
        _check(self.channel_method in METHODS and METHODS[self.channel_method].space == "channels"
               and not METHODS[self.channel_method].needs_job and METHODS[self.channel_method].rounds == 1,
               f"{p}.channel_method", self.channel_method, "use a one-pass channel method, e.g. c-obd, kron-obs or l1")
        _check(self.recalibrate_on in ("driver", "workers"), f"{p}.recalibrate_on", self.recalibrate_on, "use driver or workers")
        _check(self.forms in ("cheapest", "three", "latency"), f"{p}.forms", self.forms,
               "use cheapest (each pruned layer's cheapest exact form by MACs), latency (the fastest by a measured "
               "table, latency.table) or three (three layers)")
        _check(self.round_to is None or self.round_to >= 1, f"{p}.round_to", self.round_to,
               "use 1 (no rounding), a width such as 8, or null (1 on CPU, 8 on a GPU)")
        _check(self.rank in (None, "cost", "score", "auto"), f"{p}.rank", self.rank, "use cost, score or auto, or null")
        _check(self.normalize in (None, "none", "mean"), f"{p}.normalize", self.normalize, "use none or mean, or null")

    @property
    def n_rounds(self) -> int:
        from .methods import METHODS

        return self.rounds if self.rounds is not None else METHODS[self.method].rounds

    @property
    def layer_ratio(self) -> float:
        """The per-layer (per-round) cap: 0.95 in one pass, 0.5 per round, unless set."""
        if self.max_layer_ratio is not None:
            return self.max_layer_ratio
        return 0.95 if self.n_rounds == 1 else 0.5


@dataclass(frozen=True)
class OutputConfig:
    uri: str = "results/job"
    overwrite: bool = False

    def validate(self, p: str) -> None:
        _check(bool(self.uri.strip()), f"{p}.uri", self.uri, "give a local directory or an s3:// / gs:// URI")
        scheme, sep, rest = self.uri.partition("://")
        if sep and scheme.lower() in ("s3", "gs", "gcs"):  # object keys are literal: '..' would not go up
            parts = rest.split("?", 1)[0].split("/")[1:]
            _check(not any(part in (".", "..") for part in parts), f"{p}.uri", self.uri,
                   "write the object-storage prefix without '.' or '..' components")


@dataclass(frozen=True)
class RayConfig:
    """Where and how the job runs on Ray (``runtime: ray``)."""

    address: str | None = None  # a running cluster (else RAY_ADDRESS, else a new local one)
    num_cpus: int | None = None  # logical CPUs of a NEW local cluster (default max(4, cores))
    workers: int = 2  # Ray Train workers for statistics, base training and fine-tuning
    use_gpu: bool = False  # one GPU per Train worker, NCCL; gloo on CPU
    cpus_per_worker: float = 1.0
    actor_cpus: float = 1.0  # per eigendecomposition actor
    actor_gpus: float = 0.0
    max_actors: int | None = None  # default: as many as the cluster's CPUs allow, at most one per layer
    max_failures: int = 2  # Train worker restarts before the job fails
    bucket_mb: int = 64  # all-reduce bucket size for the statistics
    resource_wait_s: float = 300.0  # with an autoscaler: how long to wait for the nodes a stage needs
    verbose: bool = False  # Ray's own log lines (workers, Train, autoscaler) on the console too (--verbose)

    def validate(self, p: str) -> None:
        _check(self.workers >= 1, f"{p}.workers", self.workers, "use at least 1 worker")
        _check(self.num_cpus is None or self.num_cpus >= 1, f"{p}.num_cpus", self.num_cpus, "use a positive CPU count or null")
        _check(self.cpus_per_worker > 0, f"{p}.cpus_per_worker", self.cpus_per_worker, "use a positive CPU count")
        _check(self.actor_cpus > 0, f"{p}.actor_cpus", self.actor_cpus, "use a positive CPU count, e.g. 1")
        _check(self.actor_gpus >= 0, f"{p}.actor_gpus", self.actor_gpus, "use 0 or more GPUs")
        _check(self.max_actors is None or self.max_actors >= 1, f"{p}.max_actors", self.max_actors, "use a positive number or null")
        _check(self.max_failures >= 0, f"{p}.max_failures", self.max_failures, "use 0 or more")
        _check(self.bucket_mb >= 1, f"{p}.bucket_mb", self.bucket_mb, "use at least 1 MB")
        _check(self.resource_wait_s >= 0, f"{p}.resource_wait_s", self.resource_wait_s, "use 0 or more seconds")


@dataclass(frozen=True)
class LatencyConfig:
    """Inference latency of the base and pruned models in the job report: the median of
    ``repeats`` timed eval-mode forward passes per batch size, on CPU with ``threads`` torch
    threads (default: all torch has), and also on the job's GPU when ``device`` is one.
    ``repeats: 0`` skips it. ``table`` and ``batch``: where ``prune.forms: latency`` keeps the
    measured latency tables it chooses forms by, and the batch it optimises for."""

    batches: tuple[int, ...] = (1, 32)
    repeats: int = 10
    threads: int | None = None
    table: str | None = None  # where measured latency tables are kept and shared (prune.forms: latency)
    batch: int | None = None  # the batch prune.forms: latency optimises for (default: the largest of batches)

    def validate(self, p: str) -> None:
        _check(len(self.batches) >= 1 and all(b >= 1 for b in self.batches), f"{p}.batches", list(self.batches), "give positive batch sizes, e.g. [1, 32]")
        _check(self.repeats >= 0, f"{p}.repeats", self.repeats, "use 0 (off) or more")
        _check(self.threads is None or self.threads >= 1, f"{p}.threads", self.threads, "use a positive thread count or null")
        _check(self.batch is None or self.batch >= 1, f"{p}.batch", self.batch, "use a positive batch size or null")


@dataclass(frozen=True)
class SospConfig:
    """SOSP-I at scale (:mod:`raykfe.methods.gram`): ``classes``, the softmax directions kept per
    example (null: every class, exact; each costs one backward pass per batch); ``block``,
    structures per block of the pairwise matrix (memory ``block^2`` float64 per block pair);
    ``max_pairs``, the block pairs computed (null: all, exact; fewer: sampled, unbiased for the row
    sums, the estimate's standard error reported)."""

    classes: int | None = None
    block: int = 2048
    max_pairs: int | None = None

    def validate(self, p: str) -> None:
        _check(self.classes is None or self.classes >= 1, f"{p}.classes", self.classes, "use a positive number of classes, or null for every class")
        _check(self.block >= 1, f"{p}.block", self.block, "use a positive number of structures per block, e.g. 2048")
        _check(self.max_pairs is None or self.max_pairs >= 1, f"{p}.max_pairs", self.max_pairs, "use a positive number of block pairs, or null for all")


@dataclass(frozen=True)
class SweepConfig:
    """``raykfe sweep``: the grid of trials (every combination) and how Ray Tune runs them.

    ``targets``: each ``kind:F`` or a range ``kind:A..B/N`` (N evenly spaced fractions from A to B).
    Empty ``methods`` / ``lr`` / ``epochs`` / ``weight_decay`` take the job's ``prune.method`` and
    ``finetune.*``. ASHA stops weak trials early on validation accuracy, one rung per
    ``grace_period * reduction_factor^k`` fine-tuning epochs.
    """

    targets: tuple[str, ...] = ("flops:0.5",)
    methods: tuple[str, ...] = ()
    lr: tuple[float, ...] = ()
    epochs: tuple[int, ...] = ()
    weight_decay: tuple[float, ...] = ()
    asha: bool = True
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent: int | None = None  # default: as many as the cluster's resources allow
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    latency_repeats: int = 20  # timed forward passes per latency figure (median reported)
    share_statistics: bool = True  # false: every trial recomputes its statistics (to measure what sharing saves)

    def validate(self, p: str) -> None:
        from .methods import METHODS

        _check(len(self.targets) >= 1, f"{p}.targets", list(self.targets), "give at least one target, e.g. [flops:0.5]")
        for t in self.targets:
            try:
                expand_target(t)
            except ConfigError as exc:
                raise ConfigError(f"{p}.targets: {exc}") from None
        for m in self.methods:
            _check(m in METHODS, f"{p}.methods", m, f"choose from {', '.join(METHODS)}")
        _check(all(v > 0 for v in self.lr), f"{p}.lr", list(self.lr), "use positive learning rates")
        _check(all(v >= 1 for v in self.epochs), f"{p}.epochs", list(self.epochs), "use at least 1 epoch")
        _check(all(v >= 0 for v in self.weight_decay), f"{p}.weight_decay", list(self.weight_decay), "use non-negative values")
        _check(self.grace_period >= 1, f"{p}.grace_period", self.grace_period, "use at least 1 epoch")
        _check(self.reduction_factor >= 2, f"{p}.reduction_factor", self.reduction_factor, "use 2 or more")
        _check(self.max_concurrent is None or self.max_concurrent >= 1, f"{p}.max_concurrent", self.max_concurrent, "use 1 or more, or null")
        _check(self.cpus_per_trial > 0, f"{p}.cpus_per_trial", self.cpus_per_trial, "use a positive CPU count")
        _check(self.gpus_per_trial >= 0, f"{p}.gpus_per_trial", self.gpus_per_trial, "use 0 or more GPUs")
        _check(self.latency_repeats >= 1, f"{p}.latency_repeats", self.latency_repeats, "use 1 or more")


@dataclass(frozen=True)
class WidenConfig:
    """``raykfe widen``: widen the bottlenecks a finished job's plan flags and compare with a
    uniform widening of the same MACs (:mod:`raykfe.widen_job`)."""

    factor: float = 2.0  # each flagged group's channels are multiplied by this
    uri: str | None = None  # where the comparison goes (default: <output.uri>-widen, beside the job's result)
    max_uniform: float = 8.0  # the largest uniform factor the bisection tries

    def validate(self, p: str) -> None:
        _check(self.factor > 1, f"{p}.factor", self.factor, "use a factor above 1, e.g. 2 (the SOSP paper's)")
        _check(self.uri is None or bool(self.uri.strip()), f"{p}.uri", self.uri, "give a directory or URI, or null")
        _check(self.max_uniform > 1, f"{p}.max_uniform", self.max_uniform, "use a factor above 1, e.g. 8")


def expand_target(text: str) -> list[str]:
    """``'flops:0.3..0.9/4'`` -> ``['flops:0.3', 'flops:0.5', 'flops:0.7', 'flops:0.9']``; a plain target -> [it]."""
    if isinstance(text, str) and ".." in text:
        kind, _, rng = text.partition(":")
        try:
            lo_hi, _, num = rng.partition("/")
            lo, _, hi = lo_hi.partition("..")
            lo, hi, n = float(lo), float(hi), int(num or 2)
        except ValueError:
            raise ConfigError(f"target range {text!r} is malformed: write kind:A..B/N, e.g. flops:0.3..0.9/4") from None
        if n < 2 or not lo < hi:
            raise ConfigError(f"target range {text!r} needs A < B and N >= 2, e.g. flops:0.3..0.9/4")
        out = [f"{kind}:{round(lo + (hi - lo) * i / (n - 1), 6):g}" for i in range(n)]
    else:
        out = [text]
    return [str(parse_target(t)) for t in out]


_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class JobConfig:
    name: str = "job"
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    runtime: str = "ray"  # "ray" (Train workers + actors) or "local" (one process, the reference)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    base: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=0.05))
    stats: StatsConfig = field(default_factory=StatsConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    # network slimming's sparsity training of the base model (used by prune.method=slimming only)
    sparsity: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=0.01, bn_l1=1e-4))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15, lr=0.01))
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    sosp: SospConfig = field(default_factory=SospConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)  # read by `raykfe sweep` only
    widen: WidenConfig = field(default_factory=WidenConfig)  # read by `raykfe widen` only

    def validate(self, p: str = "") -> None:
        # the name becomes part of Ray Train / Tune run directories: one plain path component
        _check(bool(_JOB_NAME.fullmatch(self.name)), "name", self.name,
               "use letters, digits, '.', '_' and '-' only, starting with a letter or digit (no '/' or '..')")
        _check(self.device == "cpu" or self.device.startswith("cuda"), "device", self.device, "use 'cpu' or 'cuda[:N]'")
        _check(self.runtime in ("ray", "local"), "runtime", self.runtime, "use 'ray' or 'local'")
        for f in fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v.validate(f.name)


# ------------------------------------------------------------------------------------------------
# dict <-> dataclass with type checks
# ------------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


#: a number in scientific notation that YAML 1.1 (PyYAML) leaves a string: 1e-4, 5E3, -2.5e+2
_SCIENTIFIC = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a list of {_type_name(inner)}")
        return tuple(_coerce(v, inner, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} has the wrong type: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} has the wrong type: expected an integer")
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; it means a number
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}={value!r} is not a finite number: give a real value, e.g. 0.01")
            return float(value)
        raise ConfigError(f"{key}={value!r} has the wrong type: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} has the wrong type: expected a string")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = prefix or "the job file"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else f"known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{full}': {hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    if cls is JobConfig:  # sections start from the job defaults, not the section defaults
        defaults = JobConfig()
        for key in ("base", "finetune", "sparsity"):
            if key in kwargs:
                kwargs[key] = dataclasses.replace(getattr(defaults, key), **{k: getattr(kwargs[key], k) for k in data[key] or {}})
    return cls(**kwargs)


def config_from_dict(data: Any) -> JobConfig:
    cfg = _build(JobConfig, data, "")
    cfg.validate()
    return cfg


def config_to_dict(cfg) -> dict:
    """Plain dict (lists for tuples), YAML/JSON-serialisable."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = config_to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config dict."""
    data = dict(data or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is malformed: write key=value, e.g. prune.target=flops:0.7")
        key, _, raw = item.partition("=")
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job file '{path}' not found: give the path of a YAML job spec, e.g. -c jobs/digits.yaml")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"job file '{path}' is not valid YAML{where}: {problem}; fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"job file '{path}' is not a text file: give a YAML job spec") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"job file '{path}' must hold a mapping of sections (model, data, prune, ...), got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a job YAML (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data = read_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides))

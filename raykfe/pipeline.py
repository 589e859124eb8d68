"""A whole pruning job, top to bottom, on a backend (:mod:`raykfe.backend`: in-process; Ray in
:mod:`raykfe.distributed`)::

    data -> base model (trained unless ``model.weights``) -> sparsity training (slimming only)
         -> the prune engine (:mod:`raykfe.engine`) on the job's source -> fine-tuning
         -> evaluation, latency -> result (plan, weights, report) written last

Every finished stage is kept under ``<output uri>/stages/`` (:mod:`raykfe.stages`), so re-running
the same job reuses what was finished and continues training from the last epoch's checkpoint.
The final result becomes visible when its manifest is written last (:mod:`raykfe.checkpoint`).
The in-process backend is the reference: the Ray backend must give the same statistics and plan.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import yaml
from torch import nn

from . import engine
from .backend import Backend, JobContext, LocalBackend, job_device
from .checkpoint import ModelRecipe, save
from .config import JobConfig, TrainConfig, config_to_dict
from .counting import count
from .data import job_splits, make_loader
from .eigen import Eigenbasis
from .errors import ConfigError, StorageError
from .factors import stats_from_tensors, stats_to_tensors
from .finetune import evaluate, seed_everything, state_of
from .methods import get_method
from .methods.eigendamage import LayerScores, score_in_basis
from .widen import job_model
from .plan import Plan
from .recalibrate import apply_bn_sums, bn_sums
from .report import job_table, plot_layers
from .settings import PruneSettings
from .stages import existing_result, open_stages
from .storage import open_uri

__all__ = ["run_job", "JobResult", "JobSource"]


@dataclass
class JobResult:
    config: JobConfig
    metrics: dict
    result: engine.PruneResult | None = None
    reused: bool = False
    timings: dict[str, float] = field(default_factory=dict)


class JobSource:
    """The engine's source for a job: a finished stage is read from the stage store, anything else
    is computed on the backend and stored (see :class:`raykfe.engine.Source`)."""

    def __init__(self, job: "_Job") -> None:
        self.job, self.store, self.backend = job, job.store, job.backend
        self.example = job.example

    def _recipe(self, plan: Plan | None) -> ModelRecipe:
        return ModelRecipe(self.job.recipe.spec, plan.to_dict() if plan is not None else None)

    def kfac(self, model, plan, layers, conv_mode, stage):
        if self.store.has(stage):
            self.job.reused.append(stage.replace("stats", "statistics", 1))
            return stats_from_tensors(*self.store.load(stage))
        self.log(f"raykfe: K-FAC statistics ({self.job.cfg.stats.fisher} Fisher, {conv_mode} mode) of {len(layers)} layers")
        stats = self.backend.kfac(self._recipe(plan), state_of(model), layers, conv_mode)
        self.store.save(stage, *stats_to_tensors(stats))
        return stats

    def measure(self, model, plan, kind, spec, stage):
        if self.store.has(stage):
            self.job.reused.append(stage.replace("stats", "statistics", 1))
            return self.store.load(stage)[0]
        self.log(f"raykfe: {kind} statistics")
        tensors = self.backend.measure(self._recipe(plan), state_of(model), kind, spec)
        self.store.save(stage, {k: v.contiguous() for k, v in tensors.items()}, {"kind": kind})
        return tensors

    def bases(self, stats, weights, stage) -> dict[str, LayerScores]:
        if self.store.has(stage):
            tensors, _ = self.store.load(stage)
            self.job.reused.append(stage)
            keys = ("QA", "lA", "QS", "lS")
            return {n: score_in_basis(n, w, Eigenbasis(*(tensors[f"{n}::{k}"] for k in keys))) for n, w in weights.items()}
        self.log(f"raykfe: eigendecomposition and scores of {len(stats)} layers")
        scored = self.backend.score(stats, weights)
        self.store.save(stage, {f"{n}::{k}": getattr(s.basis, k) for n, s in scored.items() for k in ("QA", "lA", "QS", "lS")})
        return scored

    def train(self, model, plan, stage):
        cfg = self.job.cfg
        epochs = cfg.prune.round_epochs if cfg.prune.round_epochs is not None else cfg.finetune.epochs
        self.job.resumed[stage] = self.job.checkpoint_epoch(stage)
        state, _ = self.backend.train(self._recipe(plan), state_of(model), dataclasses.replace(cfg.finetune, epochs=epochs).settings(), stage)
        return state

    def recall_plan(self, stage):
        text = self.store.load_text(f"{stage}.json")
        if text is None:
            return None
        self.job.reused.append(stage)
        return Plan.from_json(text)

    def keep_plan(self, stage, plan):
        self.store.save_text(f"{stage}.json", plan.to_json())

    def recall_round(self, r):
        if not self.store.has(f"round{r}"):
            return None
        tensors, meta = self.store.load(f"round{r}")
        self.job.reused.append(f"round{r}")
        return Plan.from_dict(meta["plan"]), tensors

    def keep_round(self, r, plan, state):
        self.store.save(f"round{r}", state, {"plan": plan.to_dict()})

    def bn_sums(self, model, plan, n_batches):
        """Over the first ``n_batches`` statistics batches of the training split: in the driver
        (``prune.recalibrate_on: driver``, the default: a few forward passes cost less than a Ray
        Train run's start-up, BENCHMARKS.md), or sharded over the backend's workers and
        all-reduced (``workers``: where the data and the accelerators are on a cluster)."""
        if self.job.cfg.prune.recalibrate_on == "workers":
            return self.backend.measure(self._recipe(plan), state_of(model), "bn", {"batches": n_batches})
        return bn_sums(model, make_loader(self.job.splits.train, self.job.cfg.stats.batch_size, shuffle=False),
                       {"batches": n_batches})

    def evaluate(self, model):
        return self.job.evaluate(model, self.job.val_loader)

    def fit_loss(self, model):
        """Over the first ``stats.max_batches`` (at most 10) statistics batches of the training split."""
        from itertools import islice

        s = self.job.cfg.stats
        loader = make_loader(self.job.splits.train, s.batch_size, shuffle=False)
        return self.job.evaluate(model, list(islice(loader, min(s.max_batches or 10, 10))))["loss"]

    def log(self, message):
        self.job.log(message)


class _Job:
    """The state of one job while it runs: config, backend, stage store, data, the base model and
    the bookkeeping of what was reused, resumed and how long each stage took."""

    def __init__(self, cfg: JobConfig, backend: Backend, log: Callable, shared: Sequence[str]) -> None:
        self.cfg, self.backend, self.log = cfg, backend, log
        self.device = job_device(cfg.device)
        seed_everything(cfg.seed)
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []
        self.resumed: dict[str, int] = {}  # training stages continued from an epoch checkpoint
        t0 = time.perf_counter()
        self.splits = job_splits(cfg.data, cfg.seed)  # validates the data before anything is written
        self.model = job_model(cfg, self.splits.num_classes)  # widened by model.widths when given
        self.recipe = ModelRecipe(dict(self.model.raykfe_spec))
        self.example = self.splits.test[0][0][None]
        self.settings = PruneSettings.from_job(cfg)
        self.method = get_method(cfg.prune.method)
        if self.method.space == "kfe":  # a model with nothing to prune fails before anything is written
            from .capture import prunable_layers

            s = self.settings
            prunable_layers(self.model, self.example, conv_mode=s.conv_mode, include_classifier=s.include_classifier,
                            exclude=s.exclude, max_factor_dim=s.max_factor_dim)
        if cfg.model.weights:
            _load_base_weights(self.model, cfg.model.weights)
        backend.open(JobContext.of(cfg))  # e.g. joins the Ray cluster: an unreachable one fails before anything is written
        self.store = open_stages(cfg, shared)
        self.val_loader = make_loader(self.splits.val, 256, shuffle=False)
        self.test_loader = make_loader(self.splits.test, 256, shuffle=False)
        self.timings["data"] = time.perf_counter() - t0

    def checkpoint_epoch(self, stage: str) -> int:
        ckpt = self.store.load_checkpoint(stage)
        return ckpt[0] if ckpt else 0

    def trained(self, stage: str, tcfg: TrainConfig, recipe: ModelRecipe, state: dict) -> tuple[dict, list[dict]]:
        """A training stage on the backend, resumed from its newest checkpoint."""
        self.resumed[stage] = self.checkpoint_epoch(stage)
        return self.backend.train(recipe, state, tcfg.settings(), stage)

    def stage_model(self, stage: str, message: str, tcfg: TrainConfig) -> list[dict]:
        """Load ``stage``'s finished weights into the base model, or train them (``tcfg``) and keep them."""
        t0 = time.perf_counter()
        history: list[dict] = []
        if self.store.has(stage):
            state, meta = self.store.load(stage)
            self.model.load_state_dict(state)
            history = (meta or {}).get("history", [])
            self.reused.append(stage)
        else:
            self.log(message)
            state, history = self.trained(stage, tcfg, self.recipe, state_of(self.model))
            self.model.load_state_dict(state)
            self.store.save(stage, state_of(self.model), {"history": history})
        self.timings[stage] = time.perf_counter() - t0
        return history

    def evaluate(self, model: nn.Module, loader) -> dict:
        model.to(self.device)
        out = evaluate(model, loader, device=self.device)
        model.cpu()
        return out

    def prepared(self, base_test: dict, base_val: dict) -> JobResult:
        """What a job stopped early (``stop_after``) returns: the base model's figures."""
        metrics = {"name": self.cfg.name, "method": self.cfg.prune.method, "prepared": True, "reused_stages": self.reused,
                   "timings": self.timings, "base": {"test_acc": base_test["accuracy"], "val_acc": base_val["accuracy"]}}
        return JobResult(self.cfg, metrics, None, timings=self.timings)


def run_job(
    cfg: JobConfig, backend: Backend | None = None, *, log=print, shared: Sequence[str] = (), stop_after: str | None = None
) -> JobResult:
    """Run ``cfg`` end to end on ``backend`` (default: in-process); returns the metrics.

    ``shared``: URIs of other jobs' outputs whose finished stages (base model, statistics,
    eigenbases) this job reuses instead of computing them (a sweep's trials). ``stop_after=
    "base"`` / ``"statistics"`` stops once the base model / every target-independent stage is
    stored (a sweep's driver).
    """
    backend = backend or LocalBackend()
    done = existing_result(cfg)
    if done is not None:
        log(f"raykfe: {cfg.output.uri} already holds this job's result; showing it (output.overwrite=true re-runs)")
        return JobResult(cfg, done, None, reused=True, timings=done.get("timings", {}))
    job = _Job(cfg, backend, log, shared)
    base_history = [] if cfg.model.weights else job.stage_model(
        "base", f"raykfe: training the base {cfg.model.name} for {cfg.base.epochs} epochs (no model.weights given)", cfg.base)
    base_test, base_val = job.evaluate(job.model, job.test_loader), job.evaluate(job.model, job.val_loader)
    if stop_after == "base":
        return job.prepared(base_test, base_val)
    if job.method.statistics == "bn-sparsity":  # network slimming: L1 sparsity training of the BN scales first
        job.stage_model("sparsity", f"raykfe: sparsity training (L1 {cfg.sparsity.bn_l1:g} on BatchNorm scales) for "
                        f"{cfg.sparsity.epochs} epochs", cfg.sparsity)
    source = JobSource(job)
    if stop_after == "statistics":
        engine.prepare(job.model, source, cfg.prune.method, job.settings)
        return job.prepared(base_test, base_val)
    result = engine.prune(job.model, source, cfg.prune.method, cfg.prune.target, job.settings)
    job.timings.update(result.timings)
    before = job.evaluate(result.model, job.test_loader)
    history = _finetune(job, result)
    if job.settings.recalibrate_batches and cfg.finetune.epochs:  # the running statistics lag the last epochs' weights
        apply_bn_sums(result.model, source.bn_sums(result.model, result.plan, job.settings.recalibrate_batches))
    return _finish(job, result, base_test, base_val, before, {"base": base_history, "finetune": history})


def _finetune(job: _Job, result: engine.PruneResult) -> list[dict]:
    t0 = time.perf_counter()
    stage = "finetune"
    epoch = job.checkpoint_epoch(stage)
    job.log(f"raykfe: fine-tuning the pruned model for {job.cfg.finetune.epochs} epochs"
            + (f" (resuming after epoch {epoch})" if epoch else ""))
    recipe = ModelRecipe(job.recipe.spec, result.plan.to_dict())
    state, history = job.trained(stage, job.cfg.finetune, recipe, state_of(result.model))
    result.model.load_state_dict(state)
    job.timings["finetune"] = time.perf_counter() - t0
    return history


def _finish(job: _Job, result: engine.PruneResult, base_test: dict, base_val: dict, before: dict, history: dict) -> JobResult:
    """Evaluate, time and count both models, and write the result (its manifest last)."""
    from safetensors.torch import save as st_save

    from .latency import job_latency

    cfg, model, pruned, example = job.cfg, job.model, result.model, job.example
    pruned_test, pruned_val = job.evaluate(pruned, job.test_loader), job.evaluate(pruned, job.val_loader)
    base_counts, pruned_counts = count(model, example), count(pruned, example)
    latency = job_latency(cfg.latency, cfg.device, model, pruned, example, job.log)
    metrics = {
        "name": cfg.name, "method": cfg.prune.method, "target": cfg.prune.target,
        "backend": getattr(job.backend, "name", type(job.backend).__name__), "achieved": result.plan.summary.achieved,
        "settings": _shown_settings(job, result.plan), "quality": _quality(result.plan),
        "base": {"test_acc": base_test["accuracy"], "val_acc": base_val["accuracy"], "params": base_counts.params,
                 "macs": base_counts.macs},
        "pruned": {"test_acc_before_finetune": before["accuracy"], "test_acc": pruned_test["accuracy"],
                   "val_acc": pruned_val["accuracy"], "params": pruned_counts.params, "macs": pruned_counts.macs},
        "params_reduction": 1 - pruned_counts.params / base_counts.params,
        "macs_reduction": 1 - pruned_counts.macs / base_counts.macs,
        "history": history, "reused_stages": job.reused,
        "resumed_from_epoch": {k: v for k, v in job.resumed.items() if v}, "timings": job.timings,
    }
    if latency:
        metrics["latency"] = latency
    t0 = time.perf_counter()
    extra = {
        "config.yaml": yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode(),
        "metrics.json": json.dumps(metrics, indent=1).encode(),
        "report.md": (job_table(metrics, markdown=True) + "\n\n" + result.table() + "\n").encode(),
        "base.safetensors": st_save({k: v.contiguous() for k, v in state_of(model).items()}),
        "layers.png": plot_layers(result.report, f"{cfg.prune.method} {cfg.prune.target}: removed per layer"),
    }
    save(result, cfg.output.uri, extra_files=extra, metadata={"job": cfg.name, "input_shape": list(example.shape[1:])})
    job.timings["save"] = time.perf_counter() - t0
    return JobResult(cfg, metrics, result, timings=job.timings)


def _shown_settings(job: _Job, plan: Plan) -> dict:
    """The settings that say how this method pruned (the report's settings line), as resolved for
    the method (its defaults filled in); ``rank: auto`` with the ranking it chose."""
    s, m = job.settings.for_method(job.method), job.method
    shown = {"max_layer_ratio": s.layer_ratio(s.rounds or m.rounds), **{k: getattr(s, k) for k in m.shown}}
    if shown.get("rank") == "auto":
        shown["rank"] = f"auto ({', '.join(str(st['rank']) for st in plan.steps if 'rank' in st) or '?'})"
    if m.space == "kfe" and s.channel_share > 0:
        shown.update(channel_share=s.channel_share, channel_method=s.channel_method)
    return shown


def _quality(plan: Plan) -> dict:
    """The loss increase the plan's scores predicted beside the one measured on the validation
    split right after pruning (BatchNorm recalibrated), over all its steps."""
    steps = plan.steps
    measured = [st for st in steps if "actual_dloss" in st]
    out = {"predicted_dloss": None if any(st.get("predicted_dloss") is None for st in steps)
           else float(sum(st["predicted_dloss"] for st in steps))}
    timed = [st["latency"] for st in steps if "latency" in st]
    if timed:  # a latency:F target: the figure it was met by, measured
        out["latency_target"] = timed[-1]
    if measured:
        out.update(val_loss_base=measured[0]["loss_before"], val_loss_pruned=measured[-1]["loss"],
                   val_acc_pruned=measured[-1]["accuracy"], measured_dloss=float(sum(st["actual_dloss"] for st in measured)))
    return out


def _load_base_weights(model: nn.Module, path: str) -> None:
    from safetensors.torch import load as st_load

    base, sep, query = path.partition("?")  # keep an s3:// URI's ?endpoint_override=... with its folder
    head, _, tail = base.rpartition("/")
    try:
        data = open_uri((head or ".") + sep + query).read_bytes(tail)
    except StorageError:
        raise ConfigError(f"model.weights='{path}' cannot be read: give a safetensors state_dict of the base model") from None
    try:
        state = st_load(data)
    except Exception:
        raise ConfigError(f"model.weights='{path}' is not a safetensors file: save the base model with safetensors") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(
            f"model.weights='{path}' holds NaN/Inf values in {bad[0]!r}" + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else "")
            + ": the model that was saved had diverged; give finite weights"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"model.weights='{path}' does not fit model.name: missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}"
        )

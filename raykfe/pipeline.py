"""A whole pruning job, stage by stage, on a compute backend (in-process here, Ray in
:mod:`raykfe.distributed`):

    data -> base model (trained when ``model.weights`` is not given) -> K-FAC statistics ->
    eigenbases -> scores -> plan -> surgery -> fine-tuning -> evaluation -> checkpoint + report

Every finished stage is kept under ``<output uri>/stages/`` (:mod:`raykfe.stages`), so re-running
the same job reuses what was finished and continues training from the last epoch's checkpoint.
The final result becomes visible when its manifest is written last (:mod:`raykfe.checkpoint`).
The in-process backend is the reference: the Ray backend must give the same statistics and plan.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from .capture import collect_factors
from .checkpoint import plan_from_dict, read_file, read_manifest, rebuild, save
from .config import JobConfig, TrainConfig, config_to_dict
from .counting import count
from .data import DataSplits, load_data, make_loader
from .eigen import Eigenbasis, eigenbasis
from .errors import ConfigError, StorageError
from .factors import LayerStats, stats_from_tensors, stats_to_tensors
from .finetune import evaluate, train
from .models import build_model
from .plan import Plan
from .methods import MethodInfo, method_info
from .pruning import LayerScores, PruneResult, plan_from_scores, plan_report, prunable_layers, score_in_basis
from .report import format_table, human, plot_layers
from .stages import StageStore, optimizer_from_tensors, optimizer_to_tensors
from .storage import open_uri
from .surgery import apply_plan

__all__ = ["run_job", "JobResult", "job_table", "seed_everything", "ModelRecipe", "LocalBackend", "data_splits"]

#: keys whose change does not make a different job (where results go, how it is shown or run)
RUN_ONLY_KEYS = ("output", "progress", "ray", "runtime", "sweep", "latency")


@dataclass
class JobResult:
    config: JobConfig
    metrics: dict
    result: PruneResult | None = None
    reused: bool = False
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelRecipe:
    """How to rebuild a model anywhere (a Train worker, a later run): registry spec + optional plan."""

    spec: dict
    plan: dict | None = None

    def build(self) -> nn.Module:
        model = build_model(**self.spec)
        if self.plan is not None:
            model = rebuild(model, plan_from_dict(self.plan))
        return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def data_splits(cfg: JobConfig) -> DataSplits:
    d = cfg.data
    return load_data(
        d.name, root=d.root, image_size=d.image_size, seed=cfg.seed, val_fraction=d.val_fraction,
        test_fraction=d.test_fraction, augment=d.augment, synthetic_size=d.synthetic_size, num_classes=d.num_classes,
        access=d.access, workers=d.workers,
    )


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def run_training(
    model: nn.Module,
    train_loader,
    tcfg: TrainConfig,
    stage: str,
    store: StageStore | None,
    *,
    val_loader=None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    chief: bool = True,
    before_epoch: Callable[[int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    unwrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    seed: int | None = None,
) -> list[dict]:
    """:func:`raykfe.finetune.train` with a checkpoint per epoch under ``store`` (by the chief only)
    and a resume from the newest one. Shared by the in-process backend and the Ray Train workers.

    ``seed``: before epoch ``e`` torch's global RNG (augmentation, dropout) and the loader's
    shuffling generator are seeded from ``(seed, e)`` only, so an epoch run after a resume from
    the checkpoint of epoch ``e - 1`` is the same as in an uninterrupted run."""
    start, opt_state, history = 0, None, []
    ckpt = store.load_checkpoint(stage) if store is not None else None
    if ckpt is not None:
        start, tensors, meta = ckpt
        unwrap(model).load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt_state = optimizer_from_tensors(tensors, meta)
        history = meta["history"]
        if start >= tcfg.epochs:
            return history

    def checkpoint(epoch, m, optimizer, records):
        if chief and store is not None:
            opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
            tensors = {f"model.{k}": v for k, v in unwrap(m).state_dict().items()} | opt_tensors
            store.save_checkpoint(stage, epoch, tensors, {**opt_meta, "history": records})

    def epoch_start(epoch: int) -> None:
        if seed is not None:
            torch.manual_seed(seed * 100003 + epoch)
            gen = getattr(train_loader, "generator", None)
            if isinstance(gen, torch.Generator):
                gen.manual_seed(seed * 100003 + epoch)
        if before_epoch is not None:
            before_epoch(epoch)

    return train(
        model, train_loader, tcfg.settings(), val_loader=val_loader, device=device, progress=progress, desc=stage,
        start_epoch=start, optimizer_state=opt_state, history=history, before_epoch=epoch_start,
        checkpoint=checkpoint, on_epoch=on_epoch, eval_module=unwrap(model),
    )


class Backend(Protocol):
    def train(self, cfg: JobConfig, recipe: ModelRecipe, state: dict, tcfg: TrainConfig, stage: str, store: StageStore) -> tuple[dict, list[dict]]: ...

    def collect(self, cfg: JobConfig, recipe: ModelRecipe, state: dict, layers: list[str], *, stage: str = "stats", conv_mode: str | None = None) -> dict[str, LayerStats]: ...

    def measure(self, cfg: JobConfig, recipe: ModelRecipe, state: dict, kind: str, spec: dict, *, stage: str) -> dict[str, torch.Tensor]:
        """The sums of :func:`raykfe.measure.measure` over the training data."""
        ...

    def score(self, stats: dict[str, LayerStats], weights: dict[str, torch.Tensor]) -> dict[str, LayerScores]:
        """Eigendecompose every layer's factors and score its directions in that basis."""
        ...


class LocalBackend:
    """Everything in this process: the reference implementation. ``on_epoch(record)`` is called
    after every fine-tuning epoch (a sweep trial reports it to Ray Tune's scheduler)."""

    name = "local"

    def __init__(self, on_epoch: Callable[[dict], None] | None = None) -> None:
        self.on_epoch = on_epoch

    def train(self, cfg, recipe, state, tcfg, stage, store):
        splits = data_splits(cfg)
        model = recipe.build()
        model.load_state_dict(state)
        device = _device(cfg)
        history = run_training(
            model, make_loader(splits.train, tcfg.batch_size, shuffle=True, seed=cfg.seed + (stage == "finetune"), drop_last=True),
            tcfg, stage, store, val_loader=make_loader(splits.val, 256, shuffle=False), device=device, progress=cfg.progress,
            on_epoch=self.on_epoch if stage == "finetune" else None, seed=cfg.seed + (stage == "finetune"),
        )
        return state_of(model), history

    def _model(self, cfg, recipe, state):
        model = recipe.build()
        model.load_state_dict(state)
        return model.to(_device(cfg))

    def collect(self, cfg, recipe, state, layers, *, stage="stats", conv_mode=None):
        return collect_factors(
            self._model(cfg, recipe, state), make_loader(data_splits(cfg).train, cfg.stats.batch_size, shuffle=False),
            fisher=cfg.stats.fisher, conv_mode=conv_mode or cfg.stats.conv_mode, seed=cfg.seed, layers=layers,
            max_batches=cfg.stats.max_batches, progress=cfg.progress,
        )

    def measure(self, cfg, recipe, state, kind, spec, *, stage):
        from .measure import measure

        return measure(
            kind, self._model(cfg, recipe, state), make_loader(data_splits(cfg).train, cfg.stats.batch_size, shuffle=False),
            spec, fisher=cfg.stats.fisher, seed=cfg.seed, max_batches=cfg.stats.max_batches, progress=cfg.progress,
        )

    def score(self, stats, weights):
        return {name: score_in_basis(name, weights[name], eigenbasis(name, st)) for name, st in stats.items()}


def _device(cfg: JobConfig) -> torch.device:
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but no CUDA GPU is visible: use device=cpu")
    return torch.device(cfg.device)


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


def _checkpoint_epoch(store: StageStore, stage: str) -> int:
    ckpt = store.load_checkpoint(stage)
    return ckpt[0] if ckpt else 0


#: settings inside a section that change how fast a job runs, never what it computes
RUN_ONLY_FIELDS = {"data": ("access", "workers")}


def _job_identity(d: dict) -> dict:
    """What makes two configs the same job: everything but the run-only keys, with the stored
    config's missing (newer) keys filled with their defaults, so a result written before a field
    existed is still recognised as this job's."""
    from .config import config_from_dict

    try:
        d = config_to_dict(config_from_dict(d))
    except ConfigError:
        pass  # an older raykfe's config that this one cannot read: compared as stored (a different job)
    out = {k: v for k, v in d.items() if k not in RUN_ONLY_KEYS}
    for section, keys in RUN_ONLY_FIELDS.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    return out


def existing_result(cfg: JobConfig) -> dict | None:
    """The metrics of a finished job with the SAME config under the output URI, else None.

    Raises when the URI holds a different job's result and ``output.overwrite`` is false.
    """
    loc = open_uri(cfg.output.uri)
    if cfg.output.overwrite or not loc.exists("manifest.json"):
        return None
    manifest = read_manifest(cfg.output.uri)
    try:
        stored = yaml.safe_load(read_file(cfg.output.uri, "config.yaml", manifest))
    except StorageError:
        stored = None
    if not isinstance(stored, dict) or _job_identity(stored) != _job_identity(config_to_dict(cfg)):
        raise StorageError(
            f"output.uri={cfg.output.uri!r} already holds a different job's result: choose another output.uri "
            "or set output.overwrite=true"
        )
    for name in manifest.get("files", {}):  # a damaged result is reported, not shown as this job's
        try:
            read_file(cfg.output.uri, name, manifest)
        except StorageError as exc:
            raise StorageError(f"{exc}; or set output.overwrite=true to run the job again") from None
    return json.loads(read_file(cfg.output.uri, "metrics.json", manifest))


def _open_stages(cfg: JobConfig, shared: Sequence[str] = ()) -> StageStore:
    """The stage store, checked to belong to this job (or cleared with ``output.overwrite``)."""
    store = StageStore(open_uri(cfg.output.uri), fallbacks=[StageStore(open_uri(u)) for u in shared])
    mine = config_to_dict(cfg)
    stored_text = store.load_text("config.yaml")
    if stored_text is not None:
        stored = yaml.safe_load(stored_text)
        if cfg.output.overwrite:  # start over: the old result stops being visible now
            store.loc.delete("manifest.json")
            store.clear()
        elif not isinstance(stored, dict) or _job_identity(stored) != _job_identity(mine):
            raise StorageError(
                f"output.uri={cfg.output.uri!r} holds unfinished stages of a different job: choose another "
                "output.uri or set output.overwrite=true"
            )
    store.save_text("config.yaml", yaml.safe_dump(mine, sort_keys=False))
    return store


@dataclass
class _Stages:
    """What the pruning stages of one job share: config, backend, stage store, bookkeeping."""

    cfg: JobConfig
    backend: "Backend"
    store: StageStore
    log: Callable
    reused: list
    resumed: dict
    timings: dict
    example: torch.Tensor
    statistics_only: bool = False  # stop once the target-independent stages are stored

    def tick(self, key: str, t0: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0


def _collect(job: _Stages, recipe: "ModelRecipe", state: dict, layers: list[str], stage: str, conv_mode: str) -> dict[str, LayerStats]:
    """K-FAC statistics of ``layers``, reused from the stage store when an earlier run finished them."""
    if job.store.has(stage):
        job.reused.append(stage.replace("stats", "statistics", 1))
        return stats_from_tensors(*job.store.load(stage))
    job.log(f"raykfe: K-FAC statistics ({job.cfg.stats.fisher} Fisher, {conv_mode} mode) of {len(layers)} layers")
    stats = job.backend.collect(job.cfg, recipe, state, layers, stage=stage, conv_mode=conv_mode)
    if not job.store.has(stage):  # the Ray backend's chief worker has stored them already
        job.store.save(stage, *stats_to_tensors(stats))
    return stats


class _StageSource:
    """The statistics of a channel method from the job's stage store, else from its backend."""

    def __init__(self, job: _Stages, recipe: "ModelRecipe", state: dict) -> None:
        self.job, self.recipe, self.state = job, recipe, state

    def kfac(self, layers, conv_mode):
        return _collect(self.job, self.recipe, self.state, layers, "stats", conv_mode)

    def measure(self, kind, spec):
        job = self.job
        if job.store.has("stats"):
            job.reused.append("statistics")
            return job.store.load("stats")[0]
        job.log(f"raykfe: {kind} statistics")
        tensors = job.backend.measure(job.cfg, self.recipe, self.state, kind, spec, stage="stats")
        if not job.store.has("stats"):
            job.store.save("stats", {k: v.contiguous() for k, v in tensors.items()}, {"kind": kind})
        return tensors


def _prune_kfe(job: _Stages, model: nn.Module, recipe: "ModelRecipe", adapters: dict, skipped: dict):
    """EigenDamage, in one pass or in rounds (:mod:`raykfe.iterative`): -> (pruned, plan, stats)."""
    from .capture import find_layers
    from .iterative import compose_plan, layer_metas, merge_round, round_layer_names, round_metas, round_target
    from .plan import parse_target

    cfg, p, store = job.cfg, job.cfg.prune, job.store
    rounds, mode = p.n_rounds, cfg.stats.conv_mode
    options = {
        "fisher": cfg.stats.fisher, "conv_mode": mode, "include_classifier": p.include_classifier,
        "exclude": list(p.exclude), "freeze_rotations": p.freeze_rotations, "seed": cfg.seed,
        "max_factor_dim": cfg.stats.max_factor_dim, "rounds_planned": rounds,
    }
    metas = layer_metas(model, job.example, adapters)
    tgt = parse_target(p.target)
    metric = "macs" if tgt.kind == "flops" else "params"
    base_cost = getattr(count(model, job.example), metric)
    current, composite, stats = model, None, None
    for r in range(1, rounds + 1):
        sfx = "" if r == 1 else f"-round{r}"
        if r < rounds and store.has(f"round{r}"):  # pruned and fine-tuned by an earlier run
            tensors, meta = store.load(f"round{r}")
            composite = Plan.from_dict(meta["plan"])
            current = apply_plan(model, composite)
            current.load_state_dict(tensors)
            job.reused.append(f"round{r}")
            continue
        names = round_layer_names(current, adapters)
        rec = ModelRecipe(recipe.spec, composite.to_dict() if composite is not None else None)
        t0 = time.perf_counter()
        stats = _collect(job, rec, state_of(current), list(names.values()), "stats" + sfx, mode)
        job.tick("statistics", t0)

        t0 = time.perf_counter()
        found, _ = find_layers(current, mode, None)
        round_adapters = {n: found[t] for n, t in names.items()}
        eigen_stage = "eigen" + sfx
        if store.has(eigen_stage):
            tensors, _ = store.load(eigen_stage)
            scored = {
                n: score_in_basis(t, round_adapters[n].weight_matrix(), Eigenbasis(*(tensors[f"{t}::{k}"] for k in ("QA", "lA", "QS", "lS"))))
                for n, t in names.items()
            }
            job.reused.append("eigen" + sfx)
        else:
            job.log(f"raykfe: eigendecomposition and scores of {len(names)} layers" + (f" (round {r}/{rounds})" if rounds > 1 else ""))
            by_target = job.backend.score({t: stats[t] for t in names.values()}, {t: round_adapters[n].weight_matrix() for n, t in names.items()})
            scored = {n: by_target[t] for n, t in names.items()}
            store.save(eigen_stage, {f"{names[n]}::{k}": getattr(s.basis, k) for n, s in scored.items() for k in ("QA", "lA", "QS", "lS")})
        job.tick("eigen", t0)
        if job.statistics_only:
            return None

        t0 = time.perf_counter()
        if rounds == 1:
            target = tgt
        else:
            target = round_target(tgt, base_cost, getattr(count(current, job.example), metric), r, rounds)
        plan_name = f"plan{sfx}.json"
        plan_text = store.load_text(plan_name)
        if plan_text is not None:
            round_plan = Plan.from_json(plan_text)
            job.reused.append("plan" + sfx)
        else:
            rmetas = round_metas(current, metas, {t: stats[t].meta for t in names.values()}, names)
            round_plan = plan_from_scores(
                current, job.example, scored, rmetas, target, skipped, method=p.method, max_layer_ratio=p.layer_ratio,
                tolerance=p.tolerance, options=options,
            )
            store.save_text(plan_name, round_plan.to_json())
        weights = {n: (s.basis.QA, s.basis.QS, s.w_kfe) for n, s in scored.items()}
        job.tick("plan", t0)
        if rounds == 1:
            return apply_plan(model, round_plan, weights), round_plan, stats

        new = merge_round(current, round_plan, weights, mode, p.freeze_rotations)
        composite = compose_plan(composite, round_plan, metas, r)
        measured = count(new, job.example)
        if (measured.params, measured.macs) != (composite.params, composite.macs):
            raise RuntimeError(f"round {r}: merged model has {measured}, the plan predicted {composite.params}/{composite.macs}")
        if r < rounds:
            t0 = time.perf_counter()
            tcfg = dataclasses.replace(cfg.finetune, epochs=p.round_epochs if p.round_epochs is not None else cfg.finetune.epochs)
            stage = f"finetune-round{r}"
            job.resumed[stage] = _checkpoint_epoch(store, stage)
            job.log(f"raykfe: round {r}/{rounds}: {100 * (1 - getattr(measured, metric) / base_cost):.1f}% of the "
                    f"{metric} removed; fine-tuning {tcfg.epochs} epochs before the next round")
            state, history = job.backend.train(cfg, ModelRecipe(recipe.spec, composite.to_dict()), state_of(new), tcfg, stage, store)
            new.load_state_dict(state)
            store.save(f"round{r}", state_of(new), {"plan": composite.to_dict(), "history": history})
            job.tick("rounds finetune", t0)
        current = new
    summary = dict(composite.options.get("summary", {}))
    summary.update(target=str(tgt), achieved=1.0 - getattr(count(current, job.example), metric) / base_cost)
    composite = dataclasses.replace(composite, target=str(tgt), options={**composite.options, "summary": summary})
    return current, composite, stats


def _prune_channels(job: _Stages, model: nn.Module, recipe: "ModelRecipe", info: MethodInfo):
    """A parameter-coordinate method: score channels, select, compensate, remove -> (pruned, plan)."""
    from .channels import ChannelGraph, ChannelPlan
    from .channel_methods import build_pruned, channel_scores, select_plan

    cfg, p, store = job.cfg, job.cfg.prune, job.store
    graph = ChannelGraph(model, job.example, exclude=p.exclude, include_classifier=p.include_classifier)
    t0 = time.perf_counter()
    scores, kfac = channel_scores(
        info, model, graph, _StageSource(job, ModelRecipe(recipe.spec), state_of(model)), damping=p.damping,
        max_factor_dim=cfg.stats.max_factor_dim,
    )
    job.tick("statistics", t0)
    if job.statistics_only:
        return None

    t0 = time.perf_counter()
    plan_text = store.load_text("plan.json")
    if plan_text is not None:
        plan = ChannelPlan.from_json(plan_text)
        job.reused.append("plan")
    else:
        plan = select_plan(
            info, graph, scores, p.target, job.example, max_layer_ratio=p.layer_ratio, tolerance=p.tolerance, damping=p.damping,
            options={"fisher": cfg.stats.fisher, "include_classifier": p.include_classifier, "exclude": list(p.exclude), "seed": cfg.seed},
        )
        store.save_text("plan.json", plan.to_json())
    pruned = build_pruned(info, model, graph, plan, kfac, p.damping, job.example)
    job.tick("plan", t0)
    return pruned, plan


def _prepared(cfg: JobConfig, base_test: dict, base_val: dict, reused: list, timings: dict) -> JobResult:
    """What a job stopped early (``stop_after``) returns: the base model's figures."""
    metrics = {"name": cfg.name, "method": cfg.prune.method, "prepared": True, "reused_stages": reused, "timings": timings,
               "base": {"test_acc": base_test["accuracy"], "val_acc": base_val["accuracy"]}}
    return JobResult(cfg, metrics, None, timings=timings)


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

    device = _device(cfg)
    seed_everything(cfg.seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    splits = data_splits(cfg)  # validates the data before anything is written
    model = build_model(cfg.model.name, splits.num_classes, width=cfg.model.width)
    recipe = ModelRecipe(dict(model.raykfe_spec))
    example = splits.test[0][0][None]
    p = cfg.prune
    adapters, skipped = prunable_layers(  # fails early on a model with nothing to prune
        model, example, conv_mode=cfg.stats.conv_mode, include_classifier=p.include_classifier, exclude=p.exclude,
        max_factor_dim=cfg.stats.max_factor_dim,
    )
    if cfg.model.weights:
        _load_base_weights(model, cfg.model.weights)
    if hasattr(backend, "prepare"):
        backend.prepare()  # e.g. join the Ray cluster: an unreachable one fails before anything is written
    store = _open_stages(cfg, shared)
    val_loader = make_loader(splits.val, 256, shuffle=False)
    test_loader = make_loader(splits.test, 256, shuffle=False)
    timings["data"] = time.perf_counter() - t0
    reused: list[str] = []
    resumed: dict[str, int] = {}  # training stages continued from an epoch checkpoint

    # --- base model -----------------------------------------------------------------------
    t0 = time.perf_counter()
    base_history: list[dict] = []
    if cfg.model.weights:
        pass  # loaded above
    elif store.has("base"):
        state, meta = store.load("base")
        model.load_state_dict(state)
        base_history = meta.get("history", [])
        reused.append("base")
    else:
        log(f"raykfe: training the base {cfg.model.name} for {cfg.base.epochs} epochs (no model.weights given)")
        resumed["base"] = _checkpoint_epoch(store, "base")
        state, base_history = backend.train(cfg, recipe, state_of(model), cfg.base, "base", store)
        model.load_state_dict(state)
        store.save("base", state_of(model), {"history": base_history})
    timings["base"] = time.perf_counter() - t0
    model.to(device)
    base_test = evaluate(model, test_loader, device=device)
    base_val = evaluate(model, val_loader, device=device)
    if stop_after == "base":
        return _prepared(cfg, base_test, base_val, reused, timings)

    info = method_info(p.method)
    if info.statistics == "bn-sparsity":  # network slimming: L1 sparsity training of the BN scales first
        t0 = time.perf_counter()
        if store.has("sparsity"):
            model.load_state_dict(store.load("sparsity")[0])
            reused.append("sparsity")
        else:
            log(f"raykfe: sparsity training (L1 {cfg.sparsity.bn_l1:g} on BatchNorm scales) for {cfg.sparsity.epochs} epochs")
            resumed["sparsity"] = _checkpoint_epoch(store, "sparsity")
            model.cpu()
            state, _ = backend.train(cfg, recipe, state_of(model), cfg.sparsity, "sparsity", store)
            model.load_state_dict(state)
            store.save("sparsity", state_of(model), {})
        timings["sparsity"] = time.perf_counter() - t0

    job = _Stages(cfg, backend, store, log, reused, resumed, timings, example, stop_after == "statistics")
    model.cpu()
    if info.space == "kfe":
        out = _prune_kfe(job, model, recipe, adapters, skipped)
    else:
        out = _prune_channels(job, model, recipe, info)
    if out is None:  # stop_after="statistics"
        return _prepared(cfg, base_test, base_val, reused, timings)
    if info.space == "kfe":
        pruned, plan, stats = out
    else:
        (pruned, plan), stats = out, None
    pruned.to(device)
    pruned_before = evaluate(pruned, test_loader, device=device)

    # --- fine-tuning ------------------------------------------------------------------------
    t0 = time.perf_counter()
    ft_recipe = ModelRecipe(recipe.spec, plan.to_dict())
    pruned.cpu()
    resumed["finetune"] = _checkpoint_epoch(store, "finetune")
    log(f"raykfe: fine-tuning the pruned model for {cfg.finetune.epochs} epochs"
        + (f" (resuming after epoch {resumed['finetune']})" if resumed["finetune"] else ""))
    state, ft_history = backend.train(cfg, ft_recipe, state_of(pruned), cfg.finetune, "finetune", store)
    pruned.load_state_dict(state)
    timings["finetune"] = time.perf_counter() - t0
    pruned.to(device)
    pruned_test = evaluate(pruned, test_loader, device=device)
    pruned_val = evaluate(pruned, val_loader, device=device)

    model.cpu(), pruned.cpu()
    base_counts, pruned_counts = count(model, example), count(pruned, example)
    latency = _job_latency(cfg, model, pruned, example, log)
    metrics = {
        "name": cfg.name,
        "method": p.method,
        "target": p.target,
        "backend": getattr(backend, "name", type(backend).__name__),
        "achieved": plan.options["summary"]["achieved"],
        "base": {"test_acc": base_test["accuracy"], "val_acc": base_val["accuracy"], "params": base_counts.params, "macs": base_counts.macs},
        "pruned": {
            "test_acc_before_finetune": pruned_before["accuracy"],
            "test_acc": pruned_test["accuracy"],
            "val_acc": pruned_val["accuracy"],
            "params": pruned_counts.params,
            "macs": pruned_counts.macs,
        },
        "params_reduction": 1 - pruned_counts.params / base_counts.params,
        "macs_reduction": 1 - pruned_counts.macs / base_counts.macs,
        "history": {"base": base_history, "finetune": ft_history},
        "reused_stages": reused,
        "resumed_from_epoch": {k: v for k, v in resumed.items() if v},
        "timings": timings,
    }
    if latency:
        metrics["latency"] = latency
    result = PruneResult(pruned, plan, plan_report(plan), stats, timings)
    from safetensors.torch import save as st_save

    t0 = time.perf_counter()
    extra = {
        "config.yaml": yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode(),
        "metrics.json": json.dumps(metrics, indent=1).encode(),
        "report.md": (job_table(metrics, markdown=True) + "\n\n" + result.table() + "\n").encode(),
        "base.safetensors": st_save({k: v.contiguous() for k, v in state_of(model).items()}),
        "layers.png": plot_layers(result.report, f"{p.method} {p.target}: removed per layer"),
    }
    save(result, cfg.output.uri, extra_files=extra, metadata={"job": cfg.name, "input_shape": list(example.shape[1:])})
    timings["save"] = time.perf_counter() - t0
    return JobResult(cfg, metrics, result, timings=timings)


def _job_latency(cfg: JobConfig, base: nn.Module, pruned: nn.Module, example: torch.Tensor, log) -> dict | None:
    """Latency of the base and the pruned model at ``latency.batches`` (CPU, and the job's GPU when
    it runs on one), measured in the driver after fine-tuning, the two models interleaved."""
    lc = cfg.latency
    if lc.repeats == 0:
        return None
    from .latency import latency_profile

    threads = lc.threads or torch.get_num_threads()
    log(f"raykfe: latency of the base and pruned models (batches {', '.join(map(str, lc.batches))}; CPU, {threads} thread(s))")
    gpu = cfg.device if cfg.device.startswith("cuda") else None
    prof = latency_profile({"base": base, "pruned": pruned}, example, batches=lc.batches, repeats=lc.repeats, threads=threads, gpu=gpu)
    return {"threads": threads, **prof}


def latency_table(latency: dict, *, markdown: bool = False) -> str:
    """Base vs pruned latency per device and batch size, with the measured speedup."""
    rows = []
    for dev, per_batch in latency["base"].items():
        for b, ms in per_batch.items():
            pm = latency["pruned"][dev][b]
            rows.append([f"{dev} ({latency['threads']} threads)" if dev == "cpu" else dev, b, f"{ms:.2f}", f"{pm:.2f}", f"{ms / pm:.2f}x"])
    return format_table(["device", "batch", "base ms", "pruned ms", "speedup"], rows, markdown=markdown)


def job_table(metrics: dict, *, markdown: bool = False) -> str:
    """Base vs pruned: accuracy, params, MACs, reductions, and the time of each stage."""
    b, p = metrics["base"], metrics["pruned"]
    rows = [
        ["base", f"{100 * b['test_acc']:.2f}", "-", human(b["params"]), human(b["macs"]), "-", "-"],
        [
            f"{metrics['method']} {metrics['target']}",
            f"{100 * p['test_acc']:.2f}",
            f"{100 * p['test_acc_before_finetune']:.2f}",
            human(p["params"]),
            human(p["macs"]),
            f"{100 * metrics['params_reduction']:.1f}%",
            f"{100 * metrics['macs_reduction']:.1f}%",
        ],
    ]
    table = format_table(
        ["model", "test acc %", "before FT %", "params", "MACs", "params removed", "MACs removed"], rows, markdown=markdown
    )
    if metrics.get("latency"):
        table += "\n\n" + latency_table(metrics["latency"], markdown=markdown)
    t = metrics.get("timings", {})
    times = format_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in t.items()], markdown=markdown)
    reused = metrics.get("reused_stages") or []
    note = f"\n\nreused from an earlier run: {', '.join(reused)}" if reused else ""
    for stage, epoch in (metrics.get("resumed_from_epoch") or {}).items():
        note += f"\n{stage} resumed after epoch {epoch}"
    return table + "\n\n" + times + note

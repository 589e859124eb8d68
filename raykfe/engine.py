"""The prune engine: ONE sequence for the API (:func:`raykfe.prune`), jobs (:mod:`raykfe.pipeline`)
and sweeps (:mod:`raykfe.sweep`)::

    prune(model, source, method, target, settings) -> PruneResult

    for each round r = 1..R (R = 1 unless the method works in rounds):
        statistics of the current model     source.kfac / source.measure   stage "stats[-round<r>]"
        scores                              KFE: eigenbases on source.bases stage "eigen[-round<r>]";
                                            channels: the method's channel_scores
        plan for the round's target         global selection with exact counts  "plan[-round<r>].json"
        surgery                             KFE: rotation -> core -> rotation, merged into the
                                            earlier rounds' rotations; channels: coupled slices
                                            removed after the method's compensating update
        fine-tuning before the next round   source.train (iterative methods: a job only)

A *source* (:class:`Source`) supplies what depends on where the work runs: the statistics of a
model, the eigenbases of statistics, training between rounds, and a cache of finished stages.
:class:`BatchSource` runs everything in this process over the caller's batches and caches
nothing; a job's source (:class:`raykfe.pipeline.JobSource`) reuses finished stages from the
job's stage store and runs the rest on the job's backend (in-process, or Ray Train workers and
eigen actors). The engine never knows which.

The plan's counts are checked against the rebuilt model's (:func:`raykfe.count`): a mismatch is a
bug in raykfe's cost model, never a user error.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from .capture import collect_factors, find_layers, layer_metas, prunable_layers
from .counting import count, layer_counts
from .eigen import eigenbasis
from .errors import ConfigError
from .factors import LayerStats
from .iterative import compose_plan, merge_round, round_layer_names, round_metas, round_target
from .methods import Method, collect_statistic, get_method
from .methods.eigendamage import LayerScores, score_in_basis
from .plan import ChannelLayer, Plan, Summary, Target, parse_target, select
from .settings import PruneSettings
from .surgery import rebuild

__all__ = ["prune", "prepare", "PruneResult", "Source", "BatchSource", "check_counts", "plan_from_scores"]


@dataclass
class PruneResult:
    """The pruned model (a new module), its plan, and a per-layer report."""

    model: nn.Module
    plan: Plan
    report: list[dict]
    stats: dict[str, LayerStats] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        from .report import layer_table

        return layer_table(self.report)


class Source(Protocol):
    """Where statistics come from and where finished stages are kept (see the module docstring).

    ``model`` is the model to measure (the original, or a partly pruned one) and ``plan`` its
    structure relative to the original (``None`` for the original): a job rebuilds the model
    from them on its workers. ``stage`` names the result for caching.
    """

    example: torch.Tensor  # one example input [1, ...]

    def kfac(self, model: nn.Module, plan: Plan | None, layers: list[str], conv_mode: str, stage: str) -> dict[str, LayerStats]: ...

    def measure(self, model: nn.Module, plan: Plan | None, kind: str, spec: dict, stage: str) -> dict[str, torch.Tensor]: ...

    def bases(self, stats: Mapping[str, LayerStats], weights: Mapping[str, torch.Tensor], stage: str) -> dict[str, LayerScores]: ...

    def train(self, model: nn.Module, plan: Plan, stage: str) -> dict[str, torch.Tensor]:
        """Fine-tune ``model`` between rounds; its new state_dict."""
        ...

    def recall_plan(self, stage: str) -> Plan | None:
        """The plan an earlier run finished for ``stage`` ("plan", "plan-round2", ...), or None."""
        ...

    def keep_plan(self, stage: str, plan: Plan) -> None: ...

    def recall_round(self, r: int) -> tuple[Plan, dict[str, torch.Tensor]] | None:
        """Round ``r``'s plan and fine-tuned state_dict from an earlier run, or None."""
        ...

    def keep_round(self, r: int, plan: Plan, state: dict[str, torch.Tensor]) -> None: ...

    def log(self, message: str) -> None: ...


class _Bound:
    """A source bound to one model and stage suffix: what a channel method's scores ask for
    (``kfac(layers, conv_mode)``, ``measure(kind, spec)``)."""

    def __init__(self, source: Source, model: nn.Module, plan: Plan | None, suffix: str) -> None:
        self.source, self.model, self.plan, self.suffix = source, model, plan, suffix

    def kfac(self, layers: list[str], conv_mode: str) -> dict[str, LayerStats]:
        return self.source.kfac(self.model, self.plan, layers, conv_mode, "stats" + self.suffix)

    def measure(self, kind: str, spec: dict) -> dict[str, torch.Tensor]:
        return self.source.measure(self.model, self.plan, kind, spec, "stats" + self.suffix)


class BatchSource:
    """Statistics of the caller's ``batches`` (``(x, y)`` or ``(x, y, idx)``), computed in this
    process; nothing is cached and nothing is trained. ``stats``: K-FAC statistics the caller
    already has (:func:`raykfe.collect_factors`), used for the first KFE pass."""

    def __init__(self, batches: Iterable, settings: PruneSettings, *, example: torch.Tensor | None = None,
                 stats: Mapping[str, LayerStats] | None = None) -> None:
        if iter(batches) is batches:  # a one-shot iterator: keep what the passes may read again
            batches = list(itertools.islice(batches, settings.max_batches) if settings.max_batches else batches)
        self.batches, self.settings, self.stats = batches, settings, stats
        if example is None:
            first = next(iter(batches), None)
            if first is None:
                raise ConfigError("no batch was given: the data for statistics is empty")
            example = first[0] if isinstance(first, (list, tuple)) else first
        self.example = example[:1]

    def _kw(self) -> dict:
        s = self.settings
        return dict(fisher=s.fisher, seed=s.seed, max_batches=s.max_batches, progress=s.progress)

    def kfac(self, model, plan, layers, conv_mode, stage):
        if self.stats is not None and stage == "stats":
            missing = [n for n in layers if n not in self.stats]
            if missing:
                raise ConfigError(f"statistics are missing for layers {missing}: collect them with the same model")
            return {n: self.stats[n] for n in layers}
        return collect_factors(model, self.batches, conv_mode=conv_mode, layers=layers, **self._kw())

    def measure(self, model, plan, kind, spec, stage):
        return collect_statistic(kind, model, self.batches, spec, **self._kw())

    def bases(self, stats, weights, stage):
        return {n: score_in_basis(n, weights[n], eigenbasis(n, st)) for n, st in stats.items()}

    def train(self, model, plan, stage):
        raise ConfigError("fine-tuning between rounds needs a job: run it with raykfe prune -c job.yaml")

    def recall_plan(self, stage):
        return None

    def keep_plan(self, stage, plan):
        pass

    def recall_round(self, r):
        return None

    def keep_round(self, r, plan, state):
        pass

    def log(self, message):
        pass


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------


def _check(method: Method, target: Target, rounds: int, api: bool) -> None:
    if target.kind == "directions" and method.space != "kfe":
        raise ConfigError(f"target {target} counts eigen-directions, which only the KFE methods have: "
                          f"use 'params:F' or 'flops:F' with {method.name}")
    if target.kind == "directions" and rounds > 1:
        raise ConfigError("iterative rounds need a params:F or flops:F target (directions:F is one-pass only)")
    if rounds > 1 and method.space != "kfe":
        raise ConfigError(f"rounds apply to the KFE methods only: use rounds=1 with {method.name}")
    if api and method.needs_job:
        raise ConfigError(f"method {method.name!r} cannot run from the API: {method.needs_job}; run it as a job "
                          f"(raykfe prune -c job.yaml prune.method={method.name})")
    if api and rounds > 1:
        raise ConfigError(f"method {method.name!r} fine-tunes between rounds: run it as a job (raykfe prune -c "
                          "job.yaml, or raykfe.pipeline.run_job) or use method='eigendamage' here")


def prune(model: nn.Module, source: Source, method: str = "eigendamage", target: "str | Target" = "flops:0.5",
          settings: PruneSettings | None = None, *, api: bool = False) -> PruneResult:
    """Prune ``model`` (left unchanged) with ``method`` to ``target`` on ``source``'s statistics.

    ``api``: called by :func:`raykfe.prune` (methods that need a job's stages are refused)."""
    settings = settings or PruneSettings()
    m, tgt = get_method(method), parse_target(target)
    rounds = settings.rounds or m.rounds
    _check(m, tgt, rounds, api)
    timings: dict[str, float] = {}
    if m.space == "kfe":
        new, plan, stats = _KfeRun(model, source, m, settings, rounds, timings).run(tgt)
    else:
        (new, plan), stats = _ChannelRun(model, source, m, settings, timings).run(tgt), None
    from .report import plan_report

    return PruneResult(new, plan, plan_report(plan), stats, timings)


def prepare(model: nn.Module, source: Source, method: str, settings: PruneSettings | None = None) -> None:
    """Compute (and let ``source`` keep) the stages that do not depend on the target: the
    statistics and the scores of the first round (a sweep's driver, once per method family)."""
    settings = settings or PruneSettings()
    m = get_method(method)
    if m.space == "kfe":
        _KfeRun(model, source, m, settings, settings.rounds or m.rounds, {}).scored(model, None, 1)
    else:
        _ChannelRun(model, source, m, settings, {}).scores()


def check_counts(model: nn.Module, plan: Plan, example: torch.Tensor, what: str = "the rebuilt model") -> None:
    measured = count(model, example)
    if (measured.params, measured.macs) != (plan.params, plan.macs):
        raise RuntimeError(  # a bug in raykfe's cost model, never a user error
            f"{what} has {measured} but the plan predicted params={plan.params} macs={plan.macs}"
        )


def plan_from_scores(model: nn.Module, example: torch.Tensor, scored: Mapping[str, LayerScores], metas: Mapping[str, dict],
                     target: "str | Target", skipped: Mapping[str, str], *, method: str,
                     settings: PruneSettings | None = None, rounds: int = 1) -> Plan:
    """The KFE plan of already-scored layers for ``target``: the global selection
    (:func:`raykfe.plan.select`) with the model's exact counts."""
    s = settings or PruneSettings()
    base = count(model, example)
    layers, summary = select(
        {n: (sc.rows, sc.cols) for n, sc in scored.items()}, dict(metas), target, base_params=base.params,
        base_macs=base.macs, max_layer_ratio=s.layer_ratio(rounds), tolerance=s.tolerance,
        entry_scores={n: sc.entries.numpy() for n, sc in scored.items()},
    )
    return _plan(get_method(method), parse_target(target), s, base, summary, layers=layers, skipped=dict(skipped),
                 freeze_rotations=s.freeze_rotations)


class _Clock:
    def __init__(self, timings: dict[str, float], key: str) -> None:
        self.timings, self.key = timings, key

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.t0


class _KfeRun:
    """EigenDamage in one pass or in rounds (:mod:`raykfe.iterative`)."""

    def __init__(self, model, source: Source, method: Method, settings: PruneSettings, rounds: int, timings) -> None:
        self.model, self.source, self.method, self.settings, self.rounds, self.timings = model, source, method, settings, rounds, timings
        s, self.example = settings, source.example.to(_device(model))
        self.adapters, self.skipped = prunable_layers(
            model, self.example, conv_mode=s.conv_mode, include_classifier=s.include_classifier, exclude=s.exclude,
            max_factor_dim=s.max_factor_dim,
        )
        self.metas = layer_metas(model, self.example, self.adapters)

    def scored(self, current: nn.Module, composite: Plan | None, r: int):
        """``(stats, {layer: LayerScores})`` of round ``r`` (statistics of the cores of rebuilt layers)."""
        sfx, mode = _suffix(r), self.settings.conv_mode
        names = round_layer_names(current, self.adapters)
        with _Clock(self.timings, "statistics"):
            stats = self.source.kfac(current, composite, list(names.values()), mode, "stats" + sfx)
        with _Clock(self.timings, "eigen"):
            found, _ = find_layers(current, mode, None)
            by_module = self.source.bases({t: stats[t] for t in names.values()},
                                          {t: found[t].weight_matrix() for t in names.values()}, "eigen" + sfx)
        return stats, {n: by_module[t] for n, t in names.items()}, names

    def select(self, current: nn.Module, stats, scored, names, target: Target) -> Plan:
        metas = round_metas(current, self.metas, {t: stats[t].meta for t in names.values()}, names)
        return plan_from_scores(current, self.example, scored, metas, target, self.skipped, method=self.method.name,
                                settings=self.settings, rounds=self.rounds)

    def run(self, tgt: Target):
        current, composite, stats, R = self.model, None, None, self.rounds
        metric = "macs" if tgt.kind == "flops" else "params"
        base_cost = getattr(count(self.model, self.example), metric)
        for r in range(1, R + 1):
            done = self.source.recall_round(r) if r < R else None
            if done is not None:  # pruned and fine-tuned by an earlier run
                composite, state = done
                current = rebuild(self.model, composite)
                current.load_state_dict(state)
                continue
            stats, scored, names = self.scored(current, composite, r)
            with _Clock(self.timings, "plan"):
                target = tgt if R == 1 else round_target(tgt, base_cost, getattr(count(current, self.example), metric), r, R)
                plan_r = self.source.recall_plan(f"plan{_suffix(r)}")
                if plan_r is None:
                    plan_r = self.select(current, stats, scored, names, target)
                    self.source.keep_plan(f"plan{_suffix(r)}", plan_r)
                weights = {n: (sc.basis.QA, sc.basis.QS, sc.w_kfe) for n, sc in scored.items()}
                new = merge_round(current, plan_r, weights, self.settings.conv_mode, self.settings.freeze_rotations)
                composite = plan_r if R == 1 else compose_plan(composite, plan_r, self.metas, r)
                check_counts(new, composite, self.example, f"round {r}'s model" if R > 1 else "the rebuilt model")
            if r < R:
                current = self._between_rounds(new, composite, r, base_cost, metric)
            else:
                current = new
        if R > 1:
            achieved = 1.0 - getattr(count(current, self.example), metric) / base_cost
            composite = dataclasses.replace(composite, target=str(tgt), summary=dataclasses.replace(
                composite.summary, target=str(tgt), achieved=achieved,
                within_tolerance=bool(achieved - tgt.fraction <= self.settings.tolerance)))
        return current, composite, stats

    def _between_rounds(self, new: nn.Module, composite: Plan, r: int, base_cost: float, metric: str) -> nn.Module:
        gone = 100 * (1 - getattr(count(new, self.example), metric) / base_cost)
        self.source.log(f"raykfe: round {r}/{self.rounds}: {gone:.1f}% of the {metric} removed; fine-tuning before the next round")
        with _Clock(self.timings, "rounds finetune"):
            new.load_state_dict(self.source.train(new, composite, f"finetune-round{r}"))
        self.source.keep_round(r, composite, {k: v.detach().cpu() for k, v in new.state_dict().items()})
        return new


class _ChannelRun:
    """A parameter-coordinate method: score channels, select, compensate, remove."""

    def __init__(self, model, source: Source, method: Method, settings: PruneSettings, timings) -> None:
        from .channels import ChannelGraph

        self.model, self.source, self.method, self.settings, self.timings = model, source, method, settings, timings
        self.example = source.example.to(_device(model))
        self.graph = ChannelGraph(model, self.example, exclude=settings.exclude, include_classifier=settings.include_classifier)

    def scores(self):
        with _Clock(self.timings, "statistics"):
            return self.method.channel_scores(self.model, self.graph, _Bound(self.source, self.model, None, ""), self.settings)

    def run(self, tgt: Target) -> tuple[nn.Module, Plan]:
        from .channels import apply_channels

        cs = self.scores()
        with _Clock(self.timings, "plan"):
            plan = self.source.recall_plan("plan")
            if plan is None:
                plan = self.select(cs.scores, tgt)
            model = self.method.compensate(self.model, self.graph, plan.removed, cs.aux, self.settings) if self.method.compensates else self.model
            pruned = apply_channels(model, self.example, plan.removed)
            if not plan.channels:
                plan = dataclasses.replace(plan, channels=self._layers(pruned, plan, cs.scores))
                self.source.keep_plan("plan", plan)
            check_counts(pruned, plan, self.example, "channel surgery's model")
        return pruned, plan

    def select(self, scores: Mapping[str, np.ndarray], tgt: Target) -> Plan:
        s = self.settings
        removed, summary = self.graph.select(scores, tgt, max_layer_ratio=s.layer_ratio(1), tolerance=s.tolerance)
        base = count(self.model, self.example)
        summary = {**summary, "units_removed": summary["removed_channels"], "units_total": summary["channels"]}
        return _plan(self.method, tgt, s, base, summary, removed=removed, skipped=dict(self.graph.skipped),
                     input_shape=list(self.example.shape[1:]))

    def _layers(self, pruned: nn.Module, plan: Plan, scores: Mapping[str, np.ndarray]) -> dict[str, ChannelLayer]:
        """Per Conv/Linear "out" member: channels kept, params and MACs after / before, and on a
        group's root the predicted loss increase of the channels it lost (loss-unit methods)."""
        from .channels import channel_layer_fractions

        before, after = layer_counts(self.model, self.example), layer_counts(pruned, self.example)
        out = {}
        for name, (kept, total) in channel_layer_fractions(self.graph, plan.removed).items():
            dl = None
            if self.method.loss_units and name in scores:
                dl = float(np.asarray(scores[name])[plan.removed.get(name, [])].sum())
            out[name] = ChannelLayer(kept, total, after[name].params, before[name].params, after[name].macs,
                                     before[name].macs, dl)
        return out


def _plan(method: Method, target: Target, settings: PruneSettings, base, summary: dict, **payload) -> Plan:
    return Plan(
        method=method.name, target=str(target), base_params=base.params, base_macs=base.macs,
        params=int(summary["params"]), macs=int(summary["macs"]),
        summary=Summary(str(target), float(summary["achieved"]), bool(summary["within_tolerance"]),
                        int(summary["units_removed"]), int(summary["units_total"])),
        settings=settings.to_dict(), **payload,
    )


def _suffix(r: int) -> str:
    return "" if r == 1 else f"-round{r}"


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))

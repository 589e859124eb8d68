"""The prune engine: ONE sequence for the API (:func:`raykfe.prune`), jobs (:mod:`raykfe.pipeline`)
and sweeps (:mod:`raykfe.sweep`)::

    prune(model, source, method, target, settings) -> PruneResult

    for each round r = 1..R (an iterative method's rounds, or prune.steps one-shot steps; else 1):
        statistics of the current model     source.kfac / source.measure   stage "stats[-round<r>]"
        scores                              KFE: eigenbases on source.bases stage "eigen[-round<r>]"
                                            (EKFAC: a second pass); channels: channel_scores
        plan for the round's target         global selection with exact counts  "plan[-round<r>].json"
        surgery                             KFE: rotation -> core -> rotation, merged into the
                                            earlier rounds' rotations (hybrid: channels first);
                                            channels: coupled slices removed after the method's
                                            compensating update
        BatchNorm recalibration             source.bn_sums (prune.recalibrate_batches)
        predicted vs measured loss          source.evaluate on held-out data, when it has any
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

import copy
import dataclasses
import itertools
import sys
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from .capture import collect_factors, find_layers, layer_metas, prunable_layers
from .counting import count, layer_counts
from .eigen import eigenbasis
from .errors import ConfigError, UnreachableTarget
from .factors import LayerStats
from .iterative import compose_plan, merge_round, round_layer_names, round_metas, round_target
from .recalibrate import apply_bn_sums, bn_sums
from .methods import Method, collect_statistic, get_method
from .methods.eigendamage import LayerScores, score_in_basis
from .plan import ChannelLayer, Plan, Summary, Target, parse_target, select
from .settings import PruneSettings
from .surgery import rebuild

__all__ = ["prune", "prepare", "PruneResult", "Source", "BatchSource", "check_counts", "plan_from_scores", "AUTO_RANKS"]

#: the rankings ``rank="auto"`` tries (module docstring of :mod:`raykfe.plan`: :func:`raykfe.plan.rank_keys`)
AUTO_RANKS = ("score", "cost")


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

    def bn_sums(self, model: nn.Module, plan: Plan, n_batches: int) -> dict[str, torch.Tensor]:
        """BatchNorm input sums of ``model`` over ``n_batches`` training batches (:mod:`raykfe.recalibrate`)."""
        ...

    def evaluate(self, model: nn.Module) -> dict | None:
        """``{"loss", "accuracy"}`` of ``model`` on held-out data, or None without any."""
        ...

    def fit_loss(self, model: nn.Module) -> float:
        """The mean loss of ``model`` (eval mode) on the statistics data, with the data's labels:
        what ``rank="auto"`` compares its candidates on."""
        ...

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

    def log(self, message: str) -> None:
        self.source.log(message)


class BatchSource:
    """Statistics of the caller's ``batches`` (``(x, y)`` or ``(x, y, idx)``), computed in this
    process; nothing is cached and nothing is trained. ``stats``: K-FAC statistics the caller
    already has (:func:`raykfe.collect_factors`), used for the first KFE pass; ``heldout``:
    batches the steps' measured loss increase is evaluated on (none: not measured)."""

    def __init__(self, batches: Iterable, settings: PruneSettings, *, example: torch.Tensor | None = None,
                 stats: Mapping[str, LayerStats] | None = None, heldout: Iterable | None = None) -> None:
        if iter(batches) is batches:  # a one-shot iterator: keep what the passes may read again
            batches = list(itertools.islice(batches, settings.max_batches) if settings.max_batches else batches)
        self.batches, self.settings, self.stats = batches, settings, stats
        self.heldout = list(heldout) if heldout is not None else None
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

    def bn_sums(self, model, plan, n_batches):
        return bn_sums(model, self.batches, {"batches": n_batches})

    def evaluate(self, model):
        from .finetune import evaluate

        return evaluate(model, self.heldout, device=_device(model)) if self.heldout else None

    def fit_loss(self, model):
        from .finetune import evaluate

        return evaluate(model, [(b[0], b[1]) for b in self.batches], device=_device(model))["loss"]

    def log(self, message):
        pass


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------


def _check(method: Method, target: Target, rounds: int, settings: PruneSettings, api: bool) -> None:
    if target.kind == "directions" and method.space != "kfe":
        raise ConfigError(f"target {target} counts eigen-directions, which only the KFE methods have: "
                          f"use 'params:F' or 'flops:F' with {method.name}")
    if target.kind == "latency" and (method.space != "kfe" or rounds > 1):
        raise ConfigError(f"target {target} is measured time, which the one-shot KFE methods (eigendamage) meet "
                          f"for now: use flops:F with {method.name}" + (" and one step" if rounds > 1 else ""))
    if target.kind == "directions" and rounds > 1:
        raise ConfigError("rounds and steps need a params:F or flops:F target (directions:F is one-pass only)")
    if method.rounds > 1 and settings.steps > 1:
        raise ConfigError(f"method {method.name!r} prunes in rounds (prune.rounds): leave steps at 1")
    if settings.rounds not in (None, 1) and method.space != "kfe":
        raise ConfigError(f"rounds apply to the KFE methods only: use rounds=1 with {method.name}")
    if api and method.needs_job:
        raise ConfigError(f"method {method.name!r} cannot run from the API: {method.needs_job}; run it as a job "
                          f"(raykfe prune -c job.yaml prune.method={method.name})")
    if api and method.rounds > 1:
        raise ConfigError(f"method {method.name!r} fine-tunes between rounds: run it as a job (raykfe prune -c "
                          "job.yaml, or raykfe.pipeline.run_job) or use method='eigendamage' here")


def _rounds(method: Method, settings: PruneSettings) -> int:
    """Rounds of an iterative method (fine-tuned between), else one-shot steps."""
    return (settings.rounds or method.rounds) if method.rounds > 1 else settings.steps


def prune(model: nn.Module, source: Source, method: str = "eigendamage", target: "str | Target" = "flops:0.5",
          settings: PruneSettings | None = None, *, api: bool = False) -> PruneResult:
    """Prune ``model`` (left unchanged) with ``method`` to ``target`` on ``source``'s statistics.

    ``api``: called by :func:`raykfe.prune` (methods that need a job's stages are refused)."""
    from .report import plan_report

    from .attention import attention_names, convert_attention

    settings = settings or PruneSettings()
    m, tgt = get_method(method), parse_target(target)
    _check(m, tgt, _rounds(m, settings), settings, api)
    if attention_names(model):  # q / k / v / out as Linear layers every method sees (rebuild does the same)
        model = copy.deepcopy(model)
        convert_attention(model)
    if _channels_first(m, tgt, settings):
        new, plan, stats, timings = _prune_channels_first(model, source, m, tgt, settings)
        return PruneResult(new, plan, plan_report(plan), stats, timings)
    run = _Run(model, source, m, settings)
    new, plan = run.run(tgt)
    return PruneResult(new, plan, plan_report(plan), run.space.stats, run.timings)


def prepare(model: nn.Module, source: Source, method: str, settings: PruneSettings | None = None) -> None:
    """Compute (and let ``source`` keep) the stages that do not depend on the target: the
    statistics and the scores of the first round (a sweep's driver, once per method family;
    with ``channel_share``, the channel step's, the KFE step's depending on the target)."""
    m, settings = get_method(method), settings or PruneSettings()
    if _channels_first(m, None, settings):
        cm, cs = _channel_step(settings)
        _Run(model, _Narrowed(source, None, CHANNEL_TAG), cm, cs).space.score(model, None, 1)
        return
    _Run(model, source, m, settings).space.score(model, None, 1)


# ------------------------------------------------------------------------------------------------
# channels first: a KFE method's target reached by a channel step, then the KFE step(s)
# ------------------------------------------------------------------------------------------------

#: stage-name tags of the two parts (``stats-channels``, ``plan-channels``; ``stats-narrowed``, ...)
CHANNEL_TAG, NARROWED_TAG = "-channels", "-narrowed"


def _channels_first(method: Method, target: Target | None, settings: PruneSettings) -> bool:
    """Whether ``settings.channel_share`` applies: a one-shot KFE method aiming at params / flops."""
    if settings.channel_share <= 0 or method.space != "kfe":
        return False
    if method.rounds > 1:
        raise ConfigError(f"prune.channel_share applies to one-shot eigendamage, not {method.name!r}: set it to 0")
    if target is not None and target.kind not in ("flops", "params"):
        raise ConfigError(f"target {target}: prune.channel_share needs a params:F or flops:F target: set it to 0")
    return True


def _channel_step(settings: PruneSettings) -> tuple[Method, PruneSettings]:
    """The channel step's method and settings: the channel method's own ranking, one step."""
    cm = get_method(settings.channel_method)
    if cm.space != "channels" or cm.needs_job or cm.rounds > 1:
        raise ConfigError(f"prune.channel_method={settings.channel_method!r} is not a one-pass channel method: "
                          "use c-obd, kron-obd, kron-obs, c-obs, sosp-h, sosp-i or l1")
    return cm, dataclasses.replace(settings, rank=None, normalize=None, steps=1, channel_share=0.0)


class _Narrowed:
    """A source seen by one part of a channels-first prune: stage names carry the part's ``tag``,
    and every plan handed on (to rebuild the model on the workers) is the ``prior`` channel plan
    with the part's own plan composed onto it, i.e. relative to the original model."""

    def __init__(self, source: Source, prior: Plan | None, tag: str, groups=None) -> None:
        self.source, self.prior, self.tag, self.groups = source, prior, tag, groups
        self.example = source.example

    def _plan(self, plan: Plan | None) -> Plan | None:
        if self.prior is None:
            return plan
        return self.prior if plan is None else _joined(self.prior, plan, self.groups)

    def kfac(self, model, plan, layers, conv_mode, stage):
        return self.source.kfac(model, self._plan(plan), layers, conv_mode, stage + self.tag)

    def measure(self, model, plan, kind, spec, stage):
        return self.source.measure(model, self._plan(plan), kind, spec, stage + self.tag)

    def bases(self, stats, weights, stage):
        return self.source.bases(stats, weights, stage + self.tag)

    def train(self, model, plan, stage):
        return self.source.train(model, self._plan(plan), stage + self.tag)

    def recall_plan(self, stage):
        return self.source.recall_plan(stage + self.tag)

    def keep_plan(self, stage, plan):
        self.source.keep_plan(stage + self.tag, plan)

    def recall_round(self, r):
        return None

    def keep_round(self, r, plan, state):
        pass

    def bn_sums(self, model, plan, n_batches):
        return self.source.bn_sums(model, self._plan(plan), n_batches)

    def evaluate(self, model):
        return self.source.evaluate(model)

    def fit_loss(self, model):
        return self.source.fit_loss(model)

    def log(self, message):
        self.source.log(message)


def _joined(prior: Plan, plan: Plan, groups) -> Plan:
    """``plan`` (made on the model ``prior`` narrowed) on top of ``prior``: one plan of the original
    model, rebuilt as channels first, then the KFE layers. ``groups``: the original channel groups
    ``(name, size)`` in forward order (a hybrid ``plan`` removes channels of the narrowed ones)."""
    from .hybrid import compose_removed

    removed = compose_removed(groups, prior.removed, plan.removed) if plan.removed else prior.removed
    channels = dict(prior.channels)
    for name, c in plan.channels.items():  # a hybrid plan's groups: kept of the narrowed width
        p = prior.channels.get(name)
        channels[name] = c if p is None else dataclasses.replace(
            c, total=p.total, dense_params=p.dense_params, dense_macs=p.dense_macs,
            predicted_dloss=None if c.predicted_dloss is None and p.predicted_dloss is None
            else (c.predicted_dloss or 0.0) + (p.predicted_dloss or 0.0))
    return dataclasses.replace(plan, removed=removed, channels=channels, base_params=prior.base_params,
                               base_macs=prior.base_macs, input_shape=prior.input_shape or plan.input_shape)


def _prune_channels_first(model: nn.Module, source: Source, method: Method, tgt: Target, settings: PruneSettings):
    """``settings.channel_share`` of the target's cost removed by whole channels first
    (``settings.channel_method``, its own statistics, BatchNorm recalibrated), then the rest by
    ``method`` on the narrowed model with statistics re-collected there. Returns the pruned
    model, the joined plan (relative to ``model``), the KFE step's statistics and the timings."""
    from .channels import ChannelGraph

    cm, cs = _channel_step(settings)
    metric = "macs" if tgt.kind == "flops" else "params"
    example = source.example.to(_device(model))
    base = getattr(count(model, example), metric)
    first = _Run(model, _Narrowed(source, None, CHANNEL_TAG), cm, cs)
    part = Target(tgt.kind, settings.channel_share * tgt.fraction)
    source.log(f"raykfe: channels first: {cm.name} removes {100 * part.fraction:.1f}% of the {metric}, then {method.name} the rest")
    narrowed, cplan = first.run(part)
    left = getattr(count(narrowed, example), metric) / base
    rest = Target(tgt.kind, 1.0 - (1.0 - tgt.fraction) / left)
    if rest.fraction <= 0:  # the channel step already met the whole target
        return narrowed, cplan, None, first.timings
    graph = ChannelGraph(model, example, exclude=settings.exclude, include_classifier=settings.include_classifier)
    groups = [(g.name, g.size) for g in graph.groups]
    second = _Run(narrowed, _Narrowed(source, cplan, NARROWED_TAG, groups), method, settings)
    new, kplan = second.run(rest)
    plan = _joined(cplan, kplan, groups)
    achieved = 1.0 - getattr(count(new, example), metric) / base
    steps = [{**st, "method": cm.name} for st in cplan.steps]
    steps += [{**st, "round": st["round"] + len(steps), "method": method.name} for st in kplan.steps]
    summary = Summary(str(tgt), achieved, bool(achieved - tgt.fraction <= settings.tolerance),
                      cplan.summary.units_removed + kplan.summary.units_removed,
                      cplan.summary.units_total + kplan.summary.units_total)
    plan = dataclasses.replace(plan, method=method.name, target=str(tgt), summary=summary, steps=steps,
                               settings=settings.for_method(method).to_dict())
    check_counts(new, plan, example)
    timings = dict(first.timings)
    for k, v in second.timings.items():
        timings[k] = timings.get(k, 0.0) + v
    return new, plan, second.space.stats, timings


def check_counts(model: nn.Module, plan: Plan, example: torch.Tensor, what: str = "the rebuilt model") -> None:
    measured = count(model, example)
    if (measured.params, measured.macs) != (plan.params, plan.macs):
        raise RuntimeError(  # a bug in raykfe's cost model, never a user error
            f"{what} has {measured} but the plan predicted params={plan.params} macs={plan.macs}"
        )


def plan_from_scores(model: nn.Module, example: torch.Tensor, scored: Mapping[str, LayerScores], metas: Mapping[str, dict],
                     target: "str | Target", skipped: Mapping[str, str], *, method: str,
                     settings: PruneSettings | None = None, rounds: int = 1,
                     caps: Mapping[str, tuple[int, int]] | None = None, channels=None, last: bool = True,
                     latency=None) -> Plan:
    """The KFE plan of already-scored layers for ``target``: the global selection
    (:func:`raykfe.plan.select`) with the model's exact counts; ``channels`` adds the channel
    units of a hybrid plan to it (``(graph, {group: scores}, caps)``). Layers take their cheapest
    form only in the ``last`` step / round (an earlier one's cores are pruned again). Nothing is measured here, so
    ``rank="auto"`` (a choice by measured loss, :meth:`_Run._choose`) ranks by the first of
    :data:`AUTO_RANKS`."""
    s = (settings or PruneSettings()).for_method(get_method(method))
    if s.rank == "auto":
        s = dataclasses.replace(s, rank=AUTO_RANKS[0])
    base = count(model, example)
    forms = s.forms if last else "three"
    if latency is None and forms == "latency":
        latency = _latency_table(model, metas, s)
    layers, summary = select(
        {n: (sc.rows, sc.cols) for n, sc in scored.items()}, dict(metas), target, base_params=base.params,
        base_macs=base.macs, max_layer_ratio=s.layer_ratio(rounds), tolerance=s.tolerance,
        entry_scores={n: sc.entries.numpy() for n, sc in scored.items()}, rank=s.rank, normalize=s.normalize,
        caps=dict(caps) if caps else None, channels=channels, forms=forms, latency=latency,
        round_to=s.round_to if last else 1,
    )
    extra = {"removed": summary["removed"], "input_shape": list(example.shape[1:])} if summary["removed"] else {}
    return _plan(get_method(method), parse_target(target), s, base, summary, layers=layers, skipped=dict(skipped),
                 freeze_rotations=s.freeze_rotations, **extra)


LATENCY_PROBES = 6  # plans built and timed end to end at most, to meet a latency:F target
LATENCY_REPEATS = 7  # timed passes per model and probe (median, base and pruned interleaved)


def latency_plan(model: nn.Module, example: torch.Tensor, scored: Mapping[str, LayerScores], metas: Mapping[str, dict],
                 target: Target, skipped: Mapping[str, str], *, method: str, settings: PruneSettings, channels=None) -> Plan:
    """The plan for ``latency:F``: removes the fraction F of the model's MEASURED time at
    ``settings.latency_batch`` on ``settings.latency_device``. The selection predicts it with the
    latency table (:meth:`raykfe.plan._Evaluator.latency_reduction`, forms chosen by the table);
    the rebuilt model is then timed end to end against the base, interleaved, and a miss beyond
    ``settings.tolerance`` is corrected by moving the predicted fraction asked of the selection (a
    secant step, kept inside the bracket of fractions known to undershoot and overshoot) for at
    most :data:`LATENCY_PROBES` plans. The plan keeps the smallest probe that met F as measured
    (else the one that came closest); its summary's ``achieved`` is the measured fraction and its
    step record the timings (``latency``)."""
    from .latency import latency_profile
    from .surgery import apply_plan

    s = (settings or PruneSettings()).for_method(get_method(method))
    table, geos = _latency_table(model, metas, s)
    gpu = "cuda" if s.latency_device.startswith("cuda") else None
    where, batch = ("cuda" if gpu else "cpu"), s.latency_batch

    def timed(models: dict) -> dict:
        prof = latency_profile(models, example[:1], batches=(batch,), repeats=LATENCY_REPEATS, threads=s.latency_threads, gpu=gpu)
        return {k: v[where][str(batch)] for k, v in prof.items()}

    base_ms = timed({"base": model})["base"]
    weights = {n: (sc.basis.QA, sc.basis.QS, sc.w_kfe) for n, sc in scored.items()}
    F, tol, f, lo, hi = target.fraction, s.tolerance, target.fraction, 0.0, 1.0
    probes: list[tuple[float, float, float, Plan, dict]] = []  # (asked, measured, predicted, plan, ms)
    for _ in range(LATENCY_PROBES):
        try:
            plan = plan_from_scores(model, example, scored, metas, Target("latency", f), skipped, method=method,
                                    settings=s, channels=channels, latency=(table, geos, base_ms))
        except UnreachableTarget:  # the table says f is out of reach: look lower
            hi = f
            f = (lo + hi) / 2
            continue
        ms = timed({"base": model, "pruned": apply_plan(model, plan, weights)})
        m = 1.0 - ms["pruned"] / ms["base"]
        probes.append((f, m, plan.summary.achieved, plan, ms))
        if F <= m <= F + tol:
            break
        if m < F:
            lo = max(lo, f)
            nxt = f + (F - m)
        else:
            hi = min(hi, f)
            nxt = f - (m - F)
        f = nxt if lo < nxt < hi else (lo + hi) / 2
        f = min(max(f, 1e-4), 1 - 1e-4)
    if not probes:
        raise UnreachableTarget(f"target {target} is unreachable: the latency table predicts less even at every layer's "
                          "cap; lower the target or raise prune.max_layer_ratio")
    met = [p for p in probes if p[1] >= F]
    asked, m, predicted, plan, ms = min(met, key=lambda p: p[0]) if met else max(probes, key=lambda p: p[1])
    record = {"latency": {"batch": batch, "device": where, "threads": s.latency_threads or torch.get_num_threads(),
                          "base_ms": ms["base"], "pruned_ms": ms["pruned"], "measured": m, "predicted": predicted,
                          "asked": asked, "probes": [[p[0], p[1]] for p in probes]}}
    summary = dataclasses.replace(plan.summary, target=str(target), achieved=float(m), within_tolerance=bool(abs(m - F) <= tol))
    return dataclasses.replace(plan, target=str(target), summary=summary, steps=[record])


def _latency_table(model: nn.Module, metas: Mapping[str, dict], s: PruneSettings):
    """``(table, geometries)`` for ``prune.forms: latency`` (:func:`raykfe.profile.table_for`)."""
    from .profile import table_for

    return table_for(model, metas, uri=s.latency_table, device=s.latency_device, threads=s.latency_threads,
                     batch=s.latency_batch, progress=s.progress,
                     log=(lambda m: print(m, file=sys.stderr, flush=True)) if s.progress else None)


class _Clock:
    def __init__(self, timings: dict[str, float], key: str) -> None:
        self.timings, self.key = timings, key

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.t0


class _Run:
    """One prune, round by round (module docstring); the space (:class:`_KfeSpace`,
    :class:`_ChannelSpace`) knows how to score, select, cut and compose in its coordinates."""

    def __init__(self, model: nn.Module, source: Source, method: Method, settings: PruneSettings) -> None:
        settings = settings.for_method(method)
        self.model, self.source, self.method, self.settings = model, source, method, settings
        self.rounds, self.iterative = _rounds(method, settings), method.rounds > 1
        self.timings: dict[str, float] = {}
        self.example = source.example.to(_device(model))
        space = _KfeSpace if method.space == "kfe" else _ChannelSpace
        self.space = space(self)

    def clock(self, key: str) -> _Clock:
        return _Clock(self.timings, key)

    def run(self, tgt: Target) -> tuple[nn.Module, Plan]:
        current, composite, R = self.model, None, self.rounds
        metric = "macs" if tgt.kind == "flops" else "params"
        base_cost = getattr(count(self.model, self.example), metric)
        before = self.source.evaluate(self.model)
        steps: list[dict] = []
        for r in range(1, R + 1):
            done = self.source.recall_round(r) if r < R and self.iterative else None
            if done is not None:  # pruned and fine-tuned by an earlier run
                composite, state = done
                current = rebuild(self.model, composite)
                current.load_state_dict(state)
                steps, before = list(composite.steps), None
                continue
            scored = self.space.score(current, composite, r)
            with self.clock("plan"):
                target = tgt if R == 1 else round_target(tgt, base_cost, getattr(count(current, self.example), metric), r, R)
                plan_r, new, choice, calibrated = self._choose(current, scored, target, r)
                self.space.accept(plan_r, scored)
                composite = plan_r if R == 1 else self.space.compose(composite, plan_r, r)
                check_counts(new, composite, self.example, f"round {r}'s model" if R > 1 else "the rebuilt model")
            if not calibrated:
                self._recalibrate(new, composite)
            after = self.source.evaluate(new)
            steps.append({**_step(r, plan_r, self.space.predicted(plan_r, scored), before, after), **choice})
            composite = dataclasses.replace(composite, steps=list(steps))
            if r < R and self.iterative:
                self._train(new, composite, r, base_cost, metric)
                before = self.source.evaluate(new)
            else:
                before = after
            current = new
        composite = self.space.finish(current, composite)
        if R > 1:
            achieved = 1.0 - getattr(count(current, self.example), metric) / base_cost
            composite = dataclasses.replace(composite, target=str(tgt), summary=dataclasses.replace(
                composite.summary, target=str(tgt), achieved=achieved,
                within_tolerance=bool(achieved - tgt.fraction <= self.settings.tolerance)))
        return current, composite

    def _choose(self, current: nn.Module, scored, target: Target, r: int) -> tuple[Plan, nn.Module, dict, bool]:
        """The round's plan and pruned model: a plan an earlier run finished, the plan of the
        settings' ranking, or with ``rank="auto"`` the candidate ("score", "cost") whose pruned
        and recalibrated model has the lower loss on the statistics data (never the held-out
        data: that measures the result). Returns the choice's record for the step (kept with the
        plan's stage, so a resumed run reports the same) and whether the model is recalibrated."""
        stage = f"plan{_suffix(r)}"
        plan = self.source.recall_plan(stage)
        if plan is not None:
            choice = dict(plan.steps[0]) if plan.steps else {}
            return dataclasses.replace(plan, steps=[]), self.space.apply(current, plan, scored), choice, False
        if self.settings.rank != "auto":
            plan = self.space.select(current, scored, target, r, self.settings)
            self.source.keep_plan(stage, plan)
            choice = dict(plan.steps[0]) if plan.steps else {}  # e.g. a latency plan's timings
            return dataclasses.replace(plan, steps=[]), self.space.apply(current, plan, scored), choice, False
        tried = {}
        for rank in AUTO_RANKS:
            plan = self.space.select(current, scored, target, r, dataclasses.replace(self.settings, rank=rank))
            model = self.space.apply(current, plan, scored)
            self._recalibrate(model, plan)
            tried[rank] = (self.source.fit_loss(model), plan, model)
        rank = min(tried, key=lambda k: tried[k][0])
        _, plan, model = tried[rank]
        choice = {**(plan.steps[0] if plan.steps else {}), "rank": rank,
                  "candidate_losses": {k: v[0] for k, v in tried.items()}}
        plan = dataclasses.replace(plan, steps=[])
        self.source.keep_plan(stage, dataclasses.replace(plan, steps=[choice]))
        return plan, model, choice, True

    def _recalibrate(self, model: nn.Module, plan: Plan) -> None:
        if self.settings.recalibrate_batches:
            with self.clock("recalibration"):
                apply_bn_sums(model, self.source.bn_sums(model, plan, self.settings.recalibrate_batches))

    def _train(self, new: nn.Module, composite: Plan, r: int, base_cost: float, metric: str) -> None:
        gone = 100 * (1 - getattr(count(new, self.example), metric) / base_cost)
        self.source.log(f"raykfe: round {r}/{self.rounds}: {gone:.1f}% of the {metric} removed; fine-tuning before the next round")
        with self.clock("rounds finetune"):
            new.load_state_dict(self.source.train(new, composite, f"finetune-round{r}"))
        self.source.keep_round(r, composite, {k: v.detach().cpu() for k, v in new.state_dict().items()})

    def caps_left(self, sizes: Mapping, original: Mapping) -> dict:
        """Per-layer caps of a one-shot step: what the layer may still lose so that, over all
        steps, it loses at most ``max_layer_ratio`` of its ORIGINAL units (iterative rounds cap
        each round on the current units instead, as the paper does: no caps here then)."""
        ratio = self.settings.layer_ratio(1)
        return {n: tuple(max(0, int(math.floor(ratio * o)) - (o - c)) for c, o in zip(sizes[n], original[n]))
                for n in sizes if n in original}


@dataclass
class _KfeScored:
    """A KFE round's statistics and scores: eigen-direction scores per layer (``names``: layer ->
    module measured, the core of a rebuilt layer), and for a hybrid plan the channel graph of the
    current model with its hybrid groups' unit scores."""

    stats: dict[str, LayerStats]
    scores: dict[str, LayerScores]
    names: dict[str, str]
    graph: object = None
    channel_scores: dict[str, np.ndarray] | None = None


class _KfeSpace:
    """EigenDamage's space: eigen-directions of each layer's K-FAC eigenbasis; a round prunes the
    cores of rebuilt layers and merges the bases (:mod:`raykfe.iterative`). With grouped or
    depthwise convs (and ``settings.hybrid``) the groups coupled to them lose whole channels in the
    same ranking (:mod:`raykfe.hybrid`)."""

    def __init__(self, run: _Run) -> None:
        self.run, s = run, run.settings
        self.adapters, self.skipped = prunable_layers(
            run.model, run.example, conv_mode=s.conv_mode, include_classifier=s.include_classifier, exclude=s.exclude,
            max_factor_dim=s.max_factor_dim,
        )
        self.graph, self.groups, self.consumers = None, [], {}
        if s.hybrid and any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in run.model.modules()):
            self._hybrid()
        self.metas = layer_metas(run.model, run.example, self.adapters)
        self.stats: dict[str, LayerStats] | None = None
        self.dloss: dict[str, float] = {}

    def _hybrid(self) -> None:
        from .channels import ChannelGraph
        from .hybrid import hybrid_groups

        s = self.run.settings
        self.graph = ChannelGraph(self.run.model, self.run.example, exclude=s.exclude, include_classifier=s.include_classifier)
        self.groups, members, self.consumers = hybrid_groups(self.run.model, self.graph)
        for n in members:
            if self.adapters.pop(n, None) is not None or n not in self.skipped:
                self.skipped[n] = "loses whole channels with the depthwise / grouped conv it is coupled to (hybrid plan)"

    def score(self, current: nn.Module, composite: Plan | None, r: int) -> _KfeScored:
        run, sfx, mode = self.run, _suffix(r), self.run.settings.conv_mode
        names = round_layer_names(current, self.adapters)
        found, _ = find_layers(current, mode, run.settings.max_factor_dim)
        measured = list(dict.fromkeys([*names.values(), *(c for c in self.consumers if c in found)]))
        with run.clock("statistics"):
            stats = run.source.kfac(current, composite, measured, mode, "stats" + sfx)
        with run.clock("eigen"):
            by_module = run.source.bases({t: stats[t] for t in names.values()},
                                         {t: found[t].weight_matrix() for t in names.values()}, "eigen" + sfx) if names else {}
        if run.settings.ekfac and by_module:
            from .ekfac import rescored

            spec = {"conv_mode": mode, "layers": {t: {"QA": sc.basis.QA, "QS": sc.basis.QS} for t, sc in by_module.items()}}
            with run.clock("statistics"):
                by_module = rescored(by_module, run.source.measure(current, composite, "ekfac", spec, "ekfac" + sfx))
        self.stats = stats
        out = _KfeScored(stats, {n: by_module[t] for n, t in names.items()}, names)
        if self.groups:
            from .channels import ChannelGraph
            from .hybrid import consumer_scores

            s = run.settings
            out.graph = self.graph if r == 1 else ChannelGraph(current, run.example, exclude=s.exclude,
                                                               include_classifier=s.include_classifier)
            out.channel_scores = consumer_scores(out.graph, self.groups, found, stats)
        return out

    def select(self, current: nn.Module, scored: _KfeScored, target: Target, r: int, settings: PruneSettings) -> Plan:
        run = self.run
        names = scored.names
        metas = round_metas(current, self.metas, {t: scored.stats[t].meta for t in names.values()}, names)
        caps, channels = None, None
        if not run.iterative and r > 1:
            caps = run.caps_left({n: (m["d_out"], m["d_in"]) for n, m in metas.items()},
                                 {n: (m["d_out"], m["d_in"]) for n, m in self.metas.items()})
        if scored.graph is not None:
            chan_caps = None if r == 1 else {n: c[0] for n, c in run.caps_left(
                {g.name: (g.size,) for g in scored.graph.groups if g.name in self.groups},
                {g.name: (g.size,) for g in self.graph.groups}).items()}
            channels = (scored.graph, scored.channel_scores, chan_caps)
        if target.kind == "latency":
            return latency_plan(current, run.example, scored.scores, metas, target, self.skipped, method=run.method.name,
                                settings=settings, channels=channels)
        return plan_from_scores(current, run.example, scored.scores, metas, target, self.skipped, method=run.method.name,
                                settings=settings, rounds=run.rounds if run.iterative else 1, caps=caps, channels=channels,
                                last=r == run.rounds)

    def accept(self, plan: Plan, scored: _KfeScored) -> None:
        """Keep the predicted loss of the channels a chosen round plan removes (hybrid groups)."""
        for g, idx in plan.removed.items():
            self.dloss[g] = self.dloss.get(g, 0.0) + float(scored.channel_scores[g][idx].sum())

    def apply(self, current: nn.Module, plan: Plan, scored: _KfeScored) -> nn.Module:
        if plan.removed:
            from .channels import apply_channels

            current = apply_channels(current, self.run.example, plan.removed)
        weights = {n: (sc.basis.QA, sc.basis.QS, sc.w_kfe) for n, sc in scored.scores.items()}
        return merge_round(current, plan, weights, self.run.settings.conv_mode, self.run.settings.freeze_rotations)

    def compose(self, composite: Plan | None, plan: Plan, r: int) -> Plan:
        out = compose_plan(composite, plan, self.metas, r)
        if self.graph is not None and composite is not None:
            from .hybrid import compose_removed

            out = dataclasses.replace(out, removed=compose_removed(
                [(g.name, g.size) for g in self.graph.groups], composite.removed, plan.removed))
        return out

    def predicted(self, plan: Plan, scored: _KfeScored) -> float:
        """The loss increase the round's plan predicts: every removed entry of every layer, once,
        and the removed channels of a hybrid plan."""
        kfe = sum(lp.predicted_dloss for lp in plan.layers.values() if lp.action == "kfe")
        return float(kfe + sum(scored.channel_scores[g][idx].sum() for g, idx in plan.removed.items()))

    def finish(self, final: nn.Module, composite: Plan) -> Plan:
        if self.graph is None or composite.channels:
            return composite
        rows = _channel_rows(self.run, self.graph, composite.removed, final, self.dloss, groups=self.groups)
        return dataclasses.replace(composite, channels=rows)


class _ChannelSpace:
    """The channel methods' space: output channels of coupled groups; a round prunes the narrowed
    network and its removals are mapped back to the original units."""

    def __init__(self, run: _Run) -> None:
        from .channels import ChannelGraph

        self.run, s = run, run.settings
        self.graph = ChannelGraph(run.model, run.example, exclude=s.exclude, include_classifier=s.include_classifier)
        self.stats = None
        self.dloss: dict[str, float] = {}  # predicted loss of the removed units, per group, over rounds

    def _graph(self, current: nn.Module, r: int):
        from .channels import ChannelGraph

        if r == 1:
            return self.graph
        s = self.run.settings
        return ChannelGraph(current, self.run.example, exclude=s.exclude, include_classifier=s.include_classifier)

    def score(self, current: nn.Module, composite: Plan | None, r: int):
        run = self.run
        graph = self._graph(current, r)
        with run.clock("statistics"):
            cs = run.method.channel_scores(current, graph, _Bound(run.source, current, composite, _suffix(r)), run.settings)
        return graph, cs

    def select(self, current: nn.Module, scored, target: Target, r: int, settings: PruneSettings) -> Plan:
        run, s = self.run, settings
        graph, cs = scored
        caps = None
        if r > 1:
            caps = {n: c[0] for n, c in run.caps_left({g.name: (g.size,) for g in graph.groups},
                                                       {g.name: (g.size,) for g in self.graph.groups}).items()}
        removed, summary = graph.select(cs.scores, target, max_layer_ratio=s.layer_ratio(1), tolerance=s.tolerance,
                                        rank=s.rank, normalize=s.normalize, caps=caps)
        summary = {**summary, "units_removed": summary["removed_channels"], "units_total": summary["channels"]}
        return _plan(run.method, target, s, count(current, run.example), summary, removed=removed,
                     skipped=dict(graph.skipped), input_shape=list(run.example.shape[1:]))

    def apply(self, current: nn.Module, plan: Plan, scored) -> nn.Module:
        from .channels import apply_channels

        graph, cs = scored
        m = self.run.method
        source = m.compensate(current, graph, plan.removed, cs.aux, self.run.settings) if m.compensates else current
        return apply_channels(source, self.run.example, plan.removed)

    def accept(self, plan: Plan, scored) -> None:
        """Keep the predicted loss of the channels a chosen round plan removes, per group."""
        if self.run.method.loss_units:
            for g, idx in plan.removed.items():
                self.dloss[g] = self.dloss.get(g, 0.0) + float(np.asarray(scored[1].scores[g])[idx].sum())

    def predicted(self, plan: Plan, scored) -> float | None:
        """The sum of the removed channels' scores (None when they are not in loss units)."""
        if not self.run.method.loss_units:
            return None
        scores = scored[1].scores
        return float(sum(np.asarray(scores[g])[idx].sum() for g, idx in plan.removed.items()))

    def compose(self, composite: Plan | None, plan: Plan, r: int) -> Plan:
        """``plan`` (units of the narrowed groups) on top of ``composite`` (units of the original ones)."""
        from .hybrid import compose_removed

        if composite is None:
            return plan
        removed = compose_removed([(g.name, g.size) for g in self.graph.groups], composite.removed, plan.removed)
        return dataclasses.replace(plan, removed=removed, base_params=composite.base_params, base_macs=composite.base_macs)

    def finish(self, final: nn.Module, composite: Plan) -> Plan:
        if composite.channels:  # a plan an earlier run finished
            return composite
        return dataclasses.replace(composite, channels=_channel_rows(self.run, self.graph, composite.removed, final, self.dloss))


def _channel_rows(run: _Run, graph, removed: Mapping[str, list[int]], final: nn.Module, dloss: Mapping[str, float],
                  groups=None) -> dict[str, ChannelLayer]:
    """Per Conv/Linear "out" member of the channel groups (of ``groups`` only, when given):
    channels kept, params and MACs after / before, and on a group's root the predicted loss
    increase of the channels the group lost (methods whose scores are in loss units; ``None``
    elsewhere)."""
    from .channels import channel_layer_fractions

    before, after = layer_counts(run.model, run.example), layer_counts(final, run.example)
    roots = {g.name for g in graph.groups} if run.method.loss_units else set()
    owned = None if groups is None else {m.module for g in graph.groups if g.name in groups for m in g.members if m.kind == "out"}
    return {name: ChannelLayer(kept, total, after[name].params, before[name].params, after[name].macs, before[name].macs,
                               dloss.get(name, 0.0) if name in roots else None)
            for name, (kept, total) in channel_layer_fractions(graph, removed).items()
            if name in after and (owned is None or name in owned)}


def _step(r: int, plan: Plan, predicted: float | None, before: dict | None, after: dict | None) -> dict:
    """One step's record: its target and summary, the loss increase its scores predicted (None
    when they are not in loss units), and, when the source has held-out data, the held-out loss
    and accuracy after it (BatchNorm recalibrated) with the measured increase over the model it
    started from."""
    out = {"round": r, "target": plan.target, "summary": dataclasses.asdict(plan.summary), "predicted_dloss": predicted}
    if before is not None and after is not None:
        out.update(loss_before=before["loss"], loss=after["loss"], accuracy=after["accuracy"],
                   actual_dloss=after["loss"] - before["loss"])
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

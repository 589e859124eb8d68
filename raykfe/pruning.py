"""``raykfe.prune``: statistics -> eigenbases -> scores -> plan -> a new, smaller model.

This is the single-process reference; the distributed run computes the same pieces on Ray
(statistics on Train workers, :func:`layer_scores` on one actor per layer) and must give the same
plan on the same data.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .capture import MAX_FACTOR_DIM, collect_factors, find_layers, trace_layers
from .counting import count
from .eigen import Eigenbasis, eigenbasis
from .errors import ConfigError
from .factors import LayerStats
from .layers import Adapter
from .methods import MethodInfo, method_info
from .methods.eigendamage import entry_scores, kfe_weight
from .plan import Plan, parse_target, select
from .surgery import apply_plan

__all__ = ["plan_report", "flag_bottlenecks", "PruneResult", "prune", "layer_scores", "score_in_basis", "LayerScores", "prunable_layers", "plan_from_scores", "layer_report"]


@dataclass
class LayerScores:
    """Everything the planner and the surgery need from one layer (float64)."""

    basis: Eigenbasis
    w_kfe: torch.Tensor  # W' [d_out, d_in(, k*k)]
    entries: torch.Tensor  # dL [d_out, d_in]

    @property
    def rows(self) -> np.ndarray:
        return self.entries.sum(dim=1).numpy()

    @property
    def cols(self) -> np.ndarray:
        return self.entries.sum(dim=0).numpy()


def layer_scores(name: str, adapter: Adapter, stats: LayerStats) -> LayerScores:
    """Eigendecompose one layer's factors and score its KFE directions (EigenDamage)."""
    return score_in_basis(name, adapter.weight_matrix(), eigenbasis(name, stats))


def score_in_basis(name: str, w: torch.Tensor, basis: Eigenbasis) -> LayerScores:
    """EigenDamage scores of weights ``W~`` in an already computed eigenbasis."""
    if tuple(w.shape[:2]) != (basis.QS.shape[0], basis.QA.shape[0]):
        raise ConfigError(
            f"the eigenbasis of layer {name!r} is A{tuple(basis.QA.shape)}/S{tuple(basis.QS.shape)} but its "
            f"weights are {tuple(w.shape[:2])}: statistics were collected on another model or conv_mode"
        )
    wk = kfe_weight(w, basis)
    return LayerScores(basis, wk, entry_scores(wk, basis))


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


def _peek(batches: Iterable) -> tuple[torch.Tensor, Iterable]:
    """The first example of ``batches`` (for counting) and an iterable that still yields everything."""
    if isinstance(batches, (list, tuple)) or hasattr(batches, "__len__") and hasattr(batches, "dataset"):
        first = next(iter(batches), None)
        rest = batches
    else:
        it = iter(batches)
        first = next(it, None)
        rest = itertools.chain([first], it) if first is not None else []
    if first is None:
        raise ConfigError("no batch was given: the data for statistics is empty")
    x = first[0] if isinstance(first, (list, tuple)) else first
    return x[:1], rest


def prunable_layers(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    conv_mode: str = "patch",
    include_classifier: bool = False,
    exclude: Sequence[str] = (),
    max_factor_dim: int | None = MAX_FACTOR_DIM,
) -> tuple[dict[str, Adapter], dict[str, str]]:
    """Adapters of the layers to prune, in forward order, and ``{name: reason}`` for the rest."""
    adapters, skipped = find_layers(model, conv_mode, max_factor_dim)
    geo = trace_layers(model, example_input)
    for name in exclude:
        if name not in adapters and name not in skipped:
            raise ConfigError(f"prune.exclude names {name!r}, which is not a layer of the model")
    order = [n for n in geo if n in adapters]
    for name in adapters:
        if name not in geo:
            skipped[name] = "not called in the forward pass"
    for name in exclude:
        if name in adapters:
            skipped[name] = "excluded by prune.exclude"
    if order and not include_classifier:
        skipped[order[-1]] = "classifier (kept by default; prune.include_classifier=true prunes it)"
    chosen = {n: adapters[n] for n in order if n not in skipped}
    if not chosen:
        raise ConfigError(
            "the model has no prunable layer (Linear, or Conv2d with groups=1, other than the classifier): "
            "use another model or set prune.include_classifier=true"
        )
    return chosen, skipped


def prune(
    model: nn.Module,
    batches: Iterable,
    method: str = "eigendamage",
    target: str = "flops:0.5",
    *,
    fisher: str = "true",
    conv_mode: str = "patch",
    max_layer_ratio: float = 0.95,
    include_classifier: bool = False,
    exclude: Sequence[str] = (),
    tolerance: float = 0.02,
    freeze_rotations: bool = False,
    seed: int = 0,
    stats: Mapping[str, LayerStats] | None = None,
    max_batches: int | None = None,
    max_factor_dim: int | None = MAX_FACTOR_DIM,
    example_input: torch.Tensor | None = None,
    progress: bool = False,
    damping: float = 1e-3,
) -> PruneResult:
    """Prune ``model`` with ``method`` to ``target`` using K-FAC statistics of ``batches``.

    ``batches`` yields ``(x, y)``; ``y`` is used only with ``fisher="empirical"`` (and by SOSP's
    gradient). Pass ``stats`` (from :func:`raykfe.collect_factors`) to reuse EigenDamage's
    statistics. ``method`` is any name of :data:`raykfe.methods.METHODS` except the iterative one
    (it fine-tunes between rounds: run it as a job). The input model is left unchanged.
    """
    info = method_info(method)
    if info.rounds > 1:
        raise ConfigError(
            f"method {method!r} fine-tunes between rounds: run it as a job (raykfe prune -c job.yaml, or "
            "raykfe.pipeline.run_job) or use method='eigendamage' here"
        )
    tgt = parse_target(target)
    if info.space == "channels":
        return _prune_channels(
            model, batches, info, tgt, fisher=fisher, max_layer_ratio=max_layer_ratio, include_classifier=include_classifier,
            exclude=exclude, tolerance=tolerance, seed=seed, max_batches=max_batches, example_input=example_input,
            progress=progress, damping=damping, max_factor_dim=max_factor_dim,
        )
    timings: dict[str, float] = {}
    if example_input is None:
        example_input, batches = _peek(batches)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example_input = example_input.to(device)
    adapters, skipped = prunable_layers(
        model, example_input, conv_mode=conv_mode, include_classifier=include_classifier, exclude=exclude,
        max_factor_dim=max_factor_dim,
    )

    t0 = time.perf_counter()
    if stats is None:
        stats = collect_factors(
            model, batches, fisher=fisher, conv_mode=conv_mode, seed=seed, layers=list(adapters),
            max_batches=max_batches, progress=progress,
        )
    missing = [n for n in adapters if n not in stats]
    if missing:
        raise ConfigError(f"statistics are missing for layers {missing}: collect them with the same model")
    timings["statistics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scored = {n: layer_scores(n, a, stats[n]) for n, a in adapters.items()}
    timings["eigen"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    plan = plan_from_scores(
        model, example_input, scored, {n: stats[n].meta for n in adapters}, tgt, skipped,
        method=method, max_layer_ratio=max_layer_ratio, tolerance=tolerance,
        options={
            "fisher": fisher, "conv_mode": conv_mode, "include_classifier": include_classifier,
            "exclude": list(exclude), "freeze_rotations": freeze_rotations, "seed": seed,
            "max_factor_dim": max_factor_dim,
        },
    )
    new = apply_plan(model, plan, {n: (s.basis.QA, s.basis.QS, s.w_kfe) for n, s in scored.items()})
    measured = count(new, example_input)
    if (measured.params, measured.macs) != (plan.params, plan.macs):
        raise RuntimeError(  # a bug in raykfe's cost model, never a user error
            f"rebuilt model has {measured} but the plan predicted params={plan.params} macs={plan.macs}"
        )
    timings["plan"] = time.perf_counter() - t0
    return PruneResult(new, plan, plan_report(plan), dict(stats), timings)


def _prune_channels(model, batches, info: MethodInfo, tgt, *, fisher, max_layer_ratio, include_classifier, exclude,
                    tolerance, seed, max_batches, example_input, progress, damping, max_factor_dim) -> PruneResult:
    """:func:`prune` for the parameter-coordinate methods (channel surgery)."""
    from .channel_methods import BatchSource, build_pruned, channel_scores, select_plan
    from .channels import ChannelGraph

    if example_input is None:
        example_input, batches = _peek(batches)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    graph = ChannelGraph(model, example_input, exclude=exclude, include_classifier=include_classifier)
    if info.statistics not in ("none", "bn-sparsity"):
        batches = list(itertools.islice(batches, max_batches) if max_batches else batches)  # may be read twice
    source = BatchSource(model, batches, fisher=fisher, seed=seed, max_batches=max_batches, progress=progress)
    scores, kfac = channel_scores(info, model, graph, source, damping=damping, max_factor_dim=max_factor_dim)
    timings["statistics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = select_plan(
        info, graph, scores, tgt, example_input, max_layer_ratio=max_layer_ratio, tolerance=tolerance, damping=damping,
        options={"fisher": fisher, "include_classifier": include_classifier, "exclude": list(exclude), "seed": seed},
    )
    new = build_pruned(info, model, graph, plan, kfac, damping, example_input)
    timings["plan"] = time.perf_counter() - t0
    return PruneResult(new, plan, plan_report(plan), None, timings)


#: a layer is flagged as an architectural bottleneck when it is among the least-pruned tenth
BOTTLENECK_SHARE = 0.1


def plan_report(plan) -> list[dict]:
    """Per-layer rows for any plan (KFE or channels): what was removed, with ``removed`` the
    fraction of the layer's structures (eigen-directions or output channels) that went and the
    least-pruned tenth of the pruned layers flagged as bottlenecks (SOSP's analysis: layers the
    method refuses to shrink are where the architecture is too narrow)."""
    if getattr(plan, "kind", "kfe") == "channels":
        rows = []
        for name, (kept, total) in plan.options.get("layers", {}).items():
            rows.append({
                "layer": name, "action": "channels" if kept < total else "kept", "kept_in": "-", "kept_out": f"{kept}/{total}",
                "params": None, "dense_params": None, "macs": None, "dense_macs": None, "predicted_dloss": 0.0,
                "removed": 1.0 - kept / total if total else 0.0, "note": "",
            })
        for name, reason in plan.skipped.items():
            rows.append({"layer": name, "action": "dense", "kept_in": "-", "kept_out": "-", "params": None, "dense_params": None,
                         "macs": None, "dense_macs": None, "predicted_dloss": 0.0, "removed": None, "note": reason})
    else:
        rows = layer_report(plan)
        for r, lp in zip(rows, plan.layers.values()):
            r["removed"] = 1.0 - (lp.r_in + lp.r_out) / (lp.d_in + lp.d_out) if lp.action == "kfe" else 0.0
    flag_bottlenecks(rows)
    return rows


def flag_bottlenecks(rows: list[dict], share: float = BOTTLENECK_SHARE) -> list[str]:
    """Mark (in ``note``) and return the least-pruned ``share`` of the rows that have a ``removed``
    (with every row tied with the last one: the layers of one residual stream go together)."""
    cand = [r for r in rows if r.get("removed") is not None]
    if len(cand) < 2:
        return []
    k = max(1, int(round(share * len(cand))))
    cut = sorted(r["removed"] for r in cand)[k - 1]
    flagged = [r for r in cand if r["removed"] <= cut + 1e-12]  # ties (e.g. one residual stream) all count
    for r in flagged:
        r["note"] = ("bottleneck (least pruned); " + r["note"]).rstrip("; ")
    return [r["layer"] for r in flagged]


def plan_from_scores(
    model: nn.Module,
    example_input: torch.Tensor,
    scored: Mapping[str, LayerScores],
    metas: Mapping[str, dict],
    target,
    skipped: Mapping[str, str],
    *,
    method: str,
    max_layer_ratio: float,
    tolerance: float,
    options: dict,
) -> Plan:
    """The global selection over already-scored layers (shared by the local and Ray drivers)."""
    base = count(model, example_input)
    layers, summary = select(
        {n: (s.rows, s.cols) for n, s in scored.items()},
        dict(metas),
        target,
        base_params=base.params,
        base_macs=base.macs,
        max_layer_ratio=max_layer_ratio,
        tolerance=tolerance,
        entry_scores={n: s.entries.numpy() for n, s in scored.items()},
    )
    return Plan(
        method=method,
        target=str(parse_target(target)),
        layers=layers,
        skipped=dict(skipped),
        base_params=base.params,
        base_macs=base.macs,
        params=summary["params"],
        macs=summary["macs"],
        options={**options, "max_layer_ratio": max_layer_ratio, "tolerance": tolerance, "summary": summary},
    )


def layer_report(plan: Plan) -> list[dict]:
    """One row per weight layer: kept directions, params, MACs, predicted loss increase."""
    rows = []
    for name, lp in plan.layers.items():
        rows.append(
            {
                "layer": name,
                "action": lp.action,
                "kept_in": f"{lp.r_in}/{lp.d_in}" if lp.action == "kfe" else "-",
                "kept_out": f"{lp.r_out}/{lp.d_out}" if lp.action == "kfe" else "-",
                "params": lp.params,
                "dense_params": lp.dense_params,
                "macs": lp.macs,
                "dense_macs": lp.dense_macs,
                "predicted_dloss": lp.predicted_dloss,
                "note": lp.reason,
            }
        )
    for name, reason in plan.skipped.items():
        rows.append(
            {"layer": name, "action": "dense", "kept_in": "-", "kept_out": "-", "params": None,
             "dense_params": None, "macs": None, "dense_macs": None, "predicted_dloss": 0.0, "note": reason}
        )
    return rows

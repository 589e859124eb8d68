"""Scores + target -> a pruning plan: pure data with a JSON round trip.

Targets are strings, the same in the API, the CLI and YAML:

* ``params:F`` -- remove a fraction F of the model's parameters;
* ``flops:F``  -- remove a fraction F of the model's multiply-accumulates (for the example input);
* ``directions:F`` -- remove a fraction F of all eigen-directions (rows + columns of ``W'`` of the
  pruned layers), the paper's ratio.

Selection is global. Every output direction (row) and input direction (column) of every pruned
layer is a unit with a score in loss units. Per layer and axis only the ``cap`` lowest-scored units
are eligible (``cap = min(floor(max_layer_ratio * n), n - 1)``, so one direction always survives);
the eligible units of all layers are sorted by score and the k lowest are removed. k is the
smallest count whose reduction meets the target, found by bisection with EXACT counts of the
rebuilt model for params/flops (:func:`kfe_cost`, equal to what :func:`raykfe.counting.count`
measures on it), so the achieved reduction is the smallest one at or above the target: a target is
never undershot, and the tolerance only flags how far above it the granularity forced the plan.
With ``forms="cheapest"`` each layer is counted in its cheapest exact form (:func:`kfe_cost`,
:func:`allowed_forms`); a layer whose chosen form would not be smaller (in the target's metric:
MACs for ``flops``, parameters otherwise) than its dense form stays dense with nothing removed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ConfigError, UnreachableTarget

__all__ = [
    "Target",
    "parse_target",
    "LayerPlan",
    "Plan",
    "ChannelLayer",
    "Summary",
    "kfe_cost",
    "dense_cost",
    "select",
    "smallest_meeting",
    "rank_keys",
    "normalized",
    "unit_costs",
    "RANKS",
    "NORMALIZERS",
    "PLAN_FORMAT",
    "FORMS",
    "FORM_CHOICES",
    "allowed_forms",
]

PLAN_FORMAT = 3  # 3: LayerPlan.form (format 2 plans are all three-layer)
TARGET_KINDS = ("params", "flops", "directions", "latency")


@dataclass(frozen=True)
class Target:
    kind: str
    fraction: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.fraction:g}"


def parse_target(target: "str | Target") -> Target:
    """``'flops:0.5'`` -> ``Target('flops', 0.5)``; a one-line ConfigError otherwise."""
    if isinstance(target, Target):
        return target
    fix = "write it as 'params:F', 'flops:F', 'latency:F' or 'directions:F' with 0 < F < 1, e.g. 'flops:0.5'"
    if not isinstance(target, str) or target.count(":") != 1:
        raise ConfigError(f"target {target!r} is malformed: {fix}")
    kind, _, value = target.partition(":")
    kind = kind.strip().lower()
    if kind not in TARGET_KINDS:
        raise ConfigError(f"target kind {kind!r} in {target!r} is not known: {fix}")
    try:
        fraction = float(value)
    except ValueError:
        raise ConfigError(f"target fraction {value!r} in {target!r} is not a number: {fix}") from None
    if not (0.0 < fraction < 1.0) or not math.isfinite(fraction):
        raise ConfigError(f"target fraction {fraction:g} in {target!r} is outside (0, 1): {fix}")
    return Target(kind, fraction)


# --------------------------------------------------------------------------------------------
# exact costs of one layer, dense or rebuilt; ``meta`` is LayerStats.meta (see capture._layer_meta)
# --------------------------------------------------------------------------------------------


def dense_cost(meta: dict) -> tuple[int, int]:
    """(params, MACs per example) of the layer as it is (for the core of an already rebuilt layer,
    ``meta["ranks"] = [r_in, r_out]``: its current three-layer form)."""
    if meta.get("ranks") is not None:
        return kfe_cost(meta, *meta["ranks"])
    c_in, c_out, k2, t = meta["c_in"], meta["d_out"], meta["k2"], meta["positions"]
    params = c_out * c_in * k2 + (c_out if meta["has_bias"] else 0)
    return params, t * c_out * c_in * k2


FORMS = ("three", "fold_out", "fold_in")
#: ``prune.forms``: choose each layer's cheapest exact form, or keep every layer in three layers
FORM_CHOICES = ("cheapest", "three", "latency")


def allowed_forms(meta: dict) -> tuple[str, ...]:
    """The exact forms of a pruned layer (ALGORITHMS.md section 11, :mod:`raykfe.surgery`): always
    three layers and the output rotation folded into the core; the input rotation folded into the
    core too, except for a patch-mode conv whose bias is folded into the input rotation (zero
    padding of ``P_in x + b`` is not a padding of the folded conv: not exact at the borders)."""
    if meta["kind"] != "linear" and meta["mode"] == "patch" and meta["fold_bias"]:
        return FORMS[:2]
    return FORMS


def kfe_cost(meta: dict, r_in: int, r_out: int, form: str = "three") -> tuple[int, int]:
    """(params, MACs per example) of ``form`` keeping r_in input / r_out output directions:

    * ``three``: rotation in, core, rotation out;
    * ``fold_out``: rotation in, then the core with the output rotation folded in (r_in -> c_out;
      does not depend on r_out);
    * ``fold_in``: the core with the input rotation folded in (c_in -> r_out), then rotation out
      (does not depend on r_in).

    ``meta["c_out"]`` (when present) is the layer's real output width; ``d_out`` then counts the
    output directions of an already rebuilt core (iterative rounds)."""
    c_in, c_out, k2, t = meta["c_in"], meta.get("c_out", meta["d_out"]), meta["k2"], meta["positions"]
    fold, bias = meta["fold_bias"], meta["has_bias"]
    out_bias = c_out if bias and not fold else 0
    if form == "fold_out":
        r_out = c_out  # the folded core's output is the layer's
    if form == "fold_in":
        r_in = c_in  # the folded core reads the layer's input
    extra = (r_in if fold and form != "fold_in" else 0) + (r_out if fold and form == "fold_in" else 0) + out_bias
    a, b, c = _factor_sizes(meta, c_in, c_out, k2, r_in, r_out, form)
    # patch mode: a 1x1 input rotation runs at the input's resolution, the rest at the output's
    pixels = int(np.prod(meta["in_shape"][1:])) if meta["kind"] != "linear" and meta["mode"] == "patch" else t
    return a + b + c + extra, pixels * a + t * (b + c)


def _factor_sizes(meta: dict, c_in: int, c_out: int, k2: int, r_in: int, r_out: int, form: str) -> tuple[int, int, int]:
    """The weight counts of (input rotation, core, output rotation) of ``form``; a folded factor is
    0 and its neighbour has the layer's width on that side (``r_out = c_out`` for ``fold_out``,
    ``r_in = c_in`` for ``fold_in``, set by the caller)."""
    if form not in FORMS:
        raise ConfigError(f"layer form {form!r} is not known: use one of {', '.join(FORMS)}")
    if meta["kind"] == "linear":
        rot_in, core, rot_out = c_in * r_in, r_in * r_out, r_out * c_out
    elif meta["mode"] == "patch":  # 1x1 in, k x k core, 1x1 out
        rot_in, core, rot_out = c_in * r_in, r_in * r_out * k2, r_out * c_out
    else:  # full mode: k x k rotation in, 1x1 core, 1x1 out
        rot_in, core, rot_out = c_in * k2 * r_in, r_in * r_out, r_out * c_out
    if form == "fold_out":
        return rot_in, core, 0
    if form == "fold_in":  # the folded core has the kernel (k2 = 1 for a Linear)
        return 0, c_in * k2 * r_out, rot_out
    return rot_in, core, rot_out


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------


@dataclass
class LayerPlan:
    """What happens to one prunable layer. ``keep_out``/``keep_in`` index the columns of Q_S / Q_A."""

    name: str
    action: str  # "kfe" (rebuilt in ``form``) or "dense" (left as it is)
    kind: str
    mode: str
    fold_bias: bool
    has_bias: bool
    d_in: int
    d_out: int
    keep_in: list[int] = field(default_factory=list)
    keep_out: list[int] = field(default_factory=list)
    params: int = 0
    macs: int = 0
    dense_params: int = 0
    dense_macs: int = 0
    predicted_dloss: float = 0.0
    reason: str = ""
    form: str = "three"  # FORMS: how the kept directions are built (plan.kfe_cost, surgery.to_form)

    @property
    def r_in(self) -> int:
        return len(self.keep_in)

    @property
    def r_out(self) -> int:
        return len(self.keep_out)


@dataclass
class ChannelLayer:
    """What channel surgery did to one Conv/Linear layer: output channels kept of ``total``, its
    parameters and MACs after / before, and the predicted loss increase of the group it roots
    (``None`` when the method's scores are not in loss units, e.g. l1)."""

    kept: int
    total: int
    params: int = 0
    dense_params: int = 0
    macs: int = 0
    dense_macs: int = 0
    predicted_dloss: float | None = None


@dataclass
class Summary:
    """How the selection met the target: the achieved fraction (at or above the target), whether it
    is within ``tolerance`` of it, and how many units (directions or channels) of how many went."""

    target: str = ""
    achieved: float = 0.0
    within_tolerance: bool = True
    units_removed: int = 0
    units_total: int = 0


@dataclass
class Plan:
    """A pruning plan: pure data with a JSON round trip (the same for every method).

    Two payloads, either or both filled:

    * ``layers``: every KFE-prunable layer (:class:`LayerPlan`, ``action`` "kfe" or "dense");
    * ``removed``: removed units per channel group (``{group root: sorted unit indices}``), applied
      by :func:`raykfe.channels.apply_channels` to the original architecture, with ``channels``
      the per-layer outcome (:class:`ChannelLayer`).

    ``input_shape`` (one example, no batch dim) is what channel surgery traces the model with;
    ``settings`` records how the plan was made (:class:`raykfe.settings.PruneSettings` as a dict);
    ``steps`` lists each step / round's target and summary when there was more than one.
    """

    method: str
    target: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    channels: dict[str, ChannelLayer] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    base_params: int = 0
    base_macs: int = 0
    params: int = 0
    macs: int = 0
    summary: Summary = field(default_factory=Summary)
    input_shape: list[int] | None = None
    freeze_rotations: bool = False
    settings: dict = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    format: int = PLAN_FORMAT

    @property
    def space(self) -> str:
        """``"kfe"``, ``"channels"`` or ``"hybrid"`` (both payloads)."""
        kfe = any(lp.action == "kfe" for lp in self.layers.values())
        if self.removed and kfe:
            return "hybrid"
        return "channels" if self.removed or (self.channels and not self.layers) else "kfe"

    @property
    def params_reduction(self) -> float:
        return 1.0 - self.params / self.base_params if self.base_params else 0.0

    @property
    def macs_reduction(self) -> float:
        return 1.0 - self.macs / self.base_macs if self.base_macs else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["removed"] = {k: [int(i) for i in v] for k, v in self.removed.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Read any plan raykfe wrote: this format, and format 1 (KFE ``options`` / channel ``kind``)."""
        if not isinstance(d, dict):
            raise ConfigError("a plan must be a JSON object: re-run the job that wrote it")
        fmt = int(d.get("format", 1 if "layers" in d else 0))
        if fmt > PLAN_FORMAT:
            raise ConfigError(f"plan format {fmt} is newer than this raykfe understands ({PLAN_FORMAT}): upgrade raykfe")
        if fmt < 2:
            d = _upgrade_v1(d)
        d = dict(d)
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"the plan has unknown fields {unknown}: upgrade raykfe or fix the plan")
        d["layers"] = {n: LayerPlan(**lp) for n, lp in d.get("layers", {}).items()}
        d["removed"] = {str(k): [int(i) for i in v] for k, v in d.get("removed", {}).items()}
        d["channels"] = {n: ChannelLayer(**c) for n, c in d.get("channels", {}).items()}
        d["summary"] = Summary(**d.get("summary", {}))
        d["format"] = PLAN_FORMAT
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))


def _upgrade_v1(d: dict) -> dict:
    """A format-1 plan (KFE: settings and summary in ``options``; channels: ``kind: "channels"``,
    per-layer ``options["layers"] = {name: [kept, total]}``) in this format's fields."""
    d = dict(d)
    options = dict(d.pop("options", {}) or {})
    kind = d.pop("kind", "kfe")
    if kind not in ("kfe", "channels"):
        raise ConfigError(f"plan kind {kind!r} is not known: re-run the job that wrote it")
    s = options.pop("summary", {}) or {}
    d["summary"] = {
        "target": s.get("target", d.get("target", "")), "achieved": float(s.get("achieved", 0.0)),
        "within_tolerance": bool(s.get("within_tolerance", True)),
        "units_removed": int(s.get("units_removed", s.get("removed_channels", 0))),
        "units_total": int(s.get("units_total", s.get("channels", 0))),
    }
    d["input_shape"] = options.pop("input_shape", None)
    d["freeze_rotations"] = bool(options.pop("freeze_rotations", False))
    d["steps"] = list(options.pop("rounds", []))
    d["channels"] = {n: {"kept": int(k), "total": int(t)} for n, (k, t) in (options.pop("layers", {}) or {}).items()}
    d["settings"] = options
    d["format"] = PLAN_FORMAT
    return d


# --------------------------------------------------------------------------------------------
# global selection
# --------------------------------------------------------------------------------------------


def rounded(kept: int, full: int, round_to: int) -> int:
    """``kept`` directions rounded UP to a multiple of ``round_to`` (never past ``full``): widths
    that vector units and GEMM tiles like (``prune.round_to``); 1 leaves them as they are."""
    if round_to <= 1 or kept <= 0:
        return kept
    return min(full, -(-kept // round_to) * round_to)


def smallest_meeting(reduction, n: int, fraction: float) -> int:
    """The smallest k in [0, n] with ``reduction(k) >= fraction``, by bisection (``reduction`` is
    non-decreasing in k: removing more units never makes the model larger)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if reduction(mid) >= fraction:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _cap(n: int, ratio: float) -> int:
    return max(0, min(int(math.floor(ratio * n)), n - 1))


RANKS = ("cost", "score")
NORMALIZERS = ("none", "mean")


def rank_keys(scores: np.ndarray, cost: float, rank: str) -> np.ndarray:
    """The key units are sorted by: the predicted loss increase itself (``rank="score"``), or per
    unit of the target's metric that removing the unit saves (``"cost"``: ``score / cost``)."""
    if rank not in RANKS:
        raise ConfigError(f"prune.rank={rank!r} is not known: use 'cost' (loss per MAC / parameter saved) or 'score'")
    return scores / max(float(cost), 1e-300) if rank == "cost" else scores


def normalized(scores: np.ndarray, normalize: str) -> np.ndarray:
    """Scores divided by their layer's (group's) mean with ``normalize="mean"`` (torch-pruning's
    default for global pruning), unchanged with ``"none"``."""
    if normalize not in NORMALIZERS:
        raise ConfigError(f"prune.normalize={normalize!r} is not known: use 'none' or 'mean'")
    mean = float(scores.mean()) if scores.size else 0.0
    return scores / mean if normalize == "mean" and mean > 0 else scores


def unit_costs(meta: dict, metric: int) -> tuple[int, int]:
    """What one output direction (row) and one input direction (column) of a layer save of
    ``metric`` (0 params, 1 MACs) at the layer's current widths: the three-layer form is bilinear
    in (r_in, r_out), so removing one unit saves a constant per layer and axis at fixed widths
    (the ranking's cost uses this form; the bisection counts the form each layer is built in)."""
    d_in, d_out = meta["d_in"], meta["d_out"]
    full = kfe_cost(meta, d_in, d_out)[metric]
    return full - kfe_cost(meta, d_in, d_out - 1)[metric], full - kfe_cost(meta, d_in - 1, d_out)[metric]


@dataclass
class _Units:
    """The eligible units of a selection, sorted by their ranking key: layer (or channel group),
    axis (0 rows, 1 columns, 2 channels of a group) and index."""

    layer: np.ndarray
    axis: np.ndarray
    index: np.ndarray
    total: int
    key: np.ndarray | None = None

    def merged(self, other: "_Units") -> "_Units":
        """Both unit lists in one ranking (stable: on equal keys ``self``'s come first)."""
        perm = np.argsort(np.concatenate([self.key, other.key]), kind="stable")
        cat = lambda a, b: np.concatenate([a, b])[perm]  # noqa: E731
        return _Units(cat(self.layer, other.layer), cat(self.axis, other.axis), cat(self.index, other.index),
                      self.total + other.total, cat(self.key, other.key))


def _eligible(scores, metas, names, metric, ratio, caps, rank, normalize) -> _Units:
    """Per layer and axis, the ``cap`` lowest-scored units (``caps[name] = (rows, cols)`` overrides
    ``ratio``), all sorted by :func:`rank_keys` (ties: layer, axis, index, in that order)."""
    keys, layer, axis, index, total = [], [], [], [], 0
    for li, name in enumerate(names):
        costs = unit_costs(metas[name], metric) if metric is not None else (1, 1)
        for ax, raw in enumerate(scores[name]):  # axis 0: rows (outputs), 1: columns (inputs)
            s = normalized(np.asarray(raw, dtype=np.float64), normalize)
            total += s.size
            cap = min(int(caps[name][ax]), s.size - 1) if caps and name in caps else _cap(s.size, ratio)
            order = np.argsort(s, kind="stable")[: max(0, cap)]
            keys.append(rank_keys(s[order], costs[ax], rank))
            layer.append(np.full(order.size, li))
            axis.append(np.full(order.size, ax))
            index.append(order)
    if not keys:
        return _Units(np.zeros(0, int), np.zeros(0, int), np.zeros(0, int), 0, np.zeros(0))
    key = np.concatenate(keys)
    perm = np.argsort(key, kind="stable")
    return _Units(np.concatenate(layer)[perm], np.concatenate(axis)[perm], np.concatenate(index)[perm], total, key[perm])


def select(
    scores: dict[str, tuple[np.ndarray, np.ndarray]],
    metas: dict[str, dict],
    target: "str | Target",
    *,
    base_params: int,
    base_macs: int,
    max_layer_ratio: float = 0.95,
    tolerance: float = 0.02,
    entry_scores: dict[str, np.ndarray] | None = None,
    rank: str = "score",
    normalize: str = "none",
    caps: dict[str, tuple[int, int]] | None = None,
    channels=None,
    forms: str = "three",
    latency=None,
    round_to: int = 1,
) -> tuple[dict[str, LayerPlan], dict]:
    """Choose the units to remove for ``target``. (Long: the docstring is the selection's contract;
    the body is one ranking and one bisection.)

    ``scores[name] = (row_scores [d_out], col_scores [d_in])``; ``metas[name]`` is the layer's
    geometry. ``base_params``/``base_macs`` count the WHOLE model (all layers, pruned or not).
    Units are ranked by ``rank`` (:func:`rank_keys`, after :func:`normalized`); the k first
    eligible units go, with k the smallest count whose reduction is at or above the target (never
    below it). ``tolerance`` only sets the summary's ``within_tolerance`` flag (``achieved -
    target <= tolerance``: the granularity overshot by at most that much).

    ``channels = (graph, {group: scores}, channel caps)`` adds whole channels of those groups of a
    :class:`raykfe.channels.ChannelGraph` to the same ranking (a hybrid plan: layers the KFE
    methods cannot rebuild lose channels with everything coupled to them); no scored KFE layer
    may be a member of those groups, so the two kinds of unit never change each other's cost.
    ``forms="cheapest"`` counts every layer in its cheapest exact form (:func:`allowed_forms`,
    :func:`kfe_cost`) and records it; a folded side keeps all of its directions (they cost nothing
    there), so the bisection's units on that side are not really removed. ``forms="latency"``
    chooses, per layer, the form or the dense layer that is fastest by ``latency = (table,
    geometries)`` (:mod:`raykfe.profile`; layers without a geometry: by the metric), and the
    bisection still counts the chosen forms' exact costs in the target's metric. ``round_to``
    rounds every layer's kept directions up to a multiple of it (the bisection removes more units
    elsewhere to meet the target).
    Returns the layer plans and a summary ``{target, achieved, within_tolerance, units_removed,
    units_total, params, macs, removed}`` (``removed``: the channel units, by group).
    """
    tgt = parse_target(target)
    if not (0.0 < max_layer_ratio <= 1.0):
        raise ConfigError(f"prune.max_layer_ratio={max_layer_ratio} must be in (0, 1]")
    metric = 1 if tgt.kind in ("flops", "latency") else 0  # index into (params, macs); latency ranks by MACs
    if tgt.kind == "latency":
        if latency is None or len(latency) != 3:
            raise ConfigError(f"target {tgt} needs a latency table and the base model's measured time (raykfe.profile)")
        if channels is not None:
            raise ConfigError(f"target {tgt}: latency targets do not cover channel units (hybrid plans of grouped / "
                              "depthwise convs) yet: use flops:F, or prune.hybrid=false")
        forms = "latency"
    names = list(scores)
    units = _eligible(scores, metas, names, None if tgt.kind == "directions" else metric, max_layer_ratio, caps, rank,
                      normalize)
    graph = channels[0] if channels is not None and tgt.kind != "directions" else None
    if graph is not None:
        units = units.merged(graph.eligible_units(channels[1], metric, max_layer_ratio, channels[2], rank, normalize))
    forms = "three" if tgt.kind == "directions" else forms  # the paper's ratio counts directions, not cost
    ev = _Evaluator(metas, names, units, graph, np.array([base_params, base_macs], dtype=np.int64), metric, forms, latency, round_to)

    def reduction(k: int) -> float:
        """Monotone non-decreasing in k: more removed units never make a layer larger."""
        tot, gone = ev.outcome(k)
        if tgt.kind == "directions":
            return gone / units.total if units.total else 0.0
        if tgt.kind == "latency":
            return ev.latency_reduction(k)
        return 1.0 - tot[metric] / ev.base[metric]

    n = units.layer.size
    best = reduction(n)
    if best < tgt.fraction - 1e-12:
        raise UnreachableTarget(
            f"target {tgt} is unreachable: at most {best:.3f} with prune.max_layer_ratio={max_layer_ratio}"
            " and the layers that can be pruned; lower the target, raise prune.max_layer_ratio"
            " or set prune.include_classifier=true"
        )
    k = smallest_meeting(reduction, n, tgt.fraction)  # a target is met, never undershot
    removed, groups = _split_removed(units, k, names, graph)
    plans = {nm: _layer_plan(nm, metas[nm], removed[nm], ev.layer_choice, ev.dense[nm], scores[nm],
                             None if entry_scores is None else entry_scores[nm], ev.round_to) for nm in names}
    achieved, (tot, gone) = reduction(k), ev.outcome(k)
    summary = {"target": str(tgt), "achieved": float(achieved), "within_tolerance": bool(achieved - tgt.fraction <= tolerance),
               "units_removed": int(gone), "units_total": int(units.total), "params": int(tot[0]), "macs": int(tot[1]),
               "removed": groups}
    return plans, summary


class _Evaluator:
    """The exact (params, MACs) of the model when the k first units of a ranking go: every KFE
    layer in its cheapest form (a pruned form or dense, by the target's metric), the channel groups
    of a hybrid plan through the graph's cost model (the two never change each other's cost)."""

    def __init__(self, metas, names, units: _Units, graph, base: np.ndarray, metric: int, forms: str = "three",
                 latency=None, round_to: int = 1) -> None:
        self.round_to = int(round_to)
        self.metas, self.names, self.units, self.graph, self.base, self.metric = metas, names, units, graph, base, metric
        if forms not in FORM_CHOICES:
            raise ConfigError(f"prune.forms={forms!r} is not known: use 'cheapest' (each layer's cheapest exact form), "
                              "'latency' (the fastest by a measured latency table) or 'three'")
        if forms == "latency" and latency is None:
            raise ConfigError("prune.forms='latency' needs a latency table (raykfe.profile.table_for)")
        self.forms, self.latency = forms, latency
        self._fastest: dict[tuple, str] = {}
        self.dense = {n: dense_cost(metas[n]) for n in names}
        self.dense_total = np.array([sum(self.dense[n][i] for n in names) for i in range(2)], dtype=np.int64)

    def layer_choice(self, name: str, r_in: int, r_out: int) -> tuple[str, tuple[int, int]]:
        """``("dense", cost)`` or ``(form, cost)``: the cheapest form in the target's metric (ties:
        fewer layers, then parameters), when it is cheaper than the dense layer."""
        m = self.metas[name]
        if self.forms == "latency" and name in self.latency[1]:
            form = self._by_latency(name, r_in, r_out)
            return (form, self.dense[name]) if form == "dense" else (form, kfe_cost(m, r_in, r_out, form))
        forms = allowed_forms(m) if self.forms != "three" else ("three",)
        costs = {f: kfe_cost(m, r_in, r_out, f) for f in forms}
        form = min(forms, key=lambda f: (costs[f][self.metric], f == "three", costs[f][1 - self.metric]))
        return (form, costs[form]) if costs[form][self.metric] < self.dense[name][self.metric] else ("dense", self.dense[name])

    def _by_latency(self, name: str, r_in: int, r_out: int) -> str:
        """The form (or ``"dense"``) whose time in the latency table is least (ties: fewer layers)."""
        key = (name, r_in, r_out)
        if key not in self._fastest:
            table, geos = self.latency[:2]
            forms = ("dense", *allowed_forms(self.metas[name]))
            self._fastest[key] = min(forms, key=lambda f: (table.layer_ms(geos[name], r_in, r_out, f), f == "three"))
        return self._fastest[key]

    def latency_reduction(self, k: int) -> float:
        """The fraction of the model's time the k first units save, predicted by the latency table
        ``(table, geometries, base_ms)``: the timed layers' forms against their dense times, the
        rest of the model (``base_ms`` minus the dense layers' table times) unchanged."""
        table, geos, base_ms = self.latency
        c = self._counts(k)
        dense = now = 0.0
        for li, name in enumerate(self.names):
            if name not in geos:
                continue
            g, m = geos[name], self.metas[name]
            r_in, r_out = m["d_in"] - c[li, 1], m["d_out"] - c[li, 0]
            d = table.layer_ms(g, g.c_in, g.c_out, "dense")
            dense += d
            form, _ = self.layer_choice(name, r_in, r_out)
            now += d if form == "dense" else table.layer_ms(g, r_in, r_out, form)
        rest = max(base_ms - dense, 0.0)
        return 1.0 - (rest + now) / (rest + dense) if rest + dense > 0 else 0.0

    def _counts(self, k: int) -> np.ndarray:
        """Per layer, the (rows, columns) the k first units remove, after rounding the kept counts
        up to multiples of ``round_to`` (the units past the rounding stay)."""
        lay, ax = self.units.layer[:k], self.units.axis[:k]
        c = np.zeros((len(self.names), 2), dtype=np.int64)
        np.add.at(c, (lay[ax < 2], ax[ax < 2]), 1)
        if self.round_to > 1:
            for li, name in enumerate(self.names):
                m = self.metas[name]
                for axis, d in ((0, m["d_out"]), (1, m["d_in"])):
                    c[li, axis] = d - rounded(d - int(c[li, axis]), d, self.round_to)
        return c

    def outcome(self, k: int) -> tuple[np.ndarray, int]:
        """(params, MACs) of the whole model and the units really removed (a layer left dense
        keeps all of its own directions; a folded form keeps every direction on its folded side,
        which costs nothing there)."""
        lay, ax = self.units.layer[:k], self.units.axis[:k]
        c = self._counts(k)
        gone = int((ax == 2).sum())
        tot = self.base
        if self.graph is not None:
            tot = np.array(self.graph.cost_of_counts(np.bincount(lay[ax == 2], minlength=len(self.graph.groups))), dtype=np.int64)
        tot = tot - self.dense_total
        for li, name in enumerate(self.names):
            m = self.metas[name]
            form, cost = self.layer_choice(name, m["d_in"] - c[li, 1], m["d_out"] - c[li, 0])
            tot = tot + np.array(cost, dtype=np.int64)
            gone += int(c[li, 1] * (form != "fold_in") + c[li, 0] * (form != "fold_out")) if form != "dense" else 0
        return tot, gone


def _split_removed(units: _Units, k: int, names: list[str], graph) -> tuple[dict[str, tuple[list, list]], dict[str, list[int]]]:
    """The k first units as ``{layer: (rows, columns)}`` and ``{group: sorted channels}`` (groups
    in the graph's forward order)."""
    removed = {nm: ([], []) for nm in names}
    groups: dict[str, list[int]] = {}
    for li, ax, idx in zip(units.layer[:k], units.axis[:k], units.index[:k]):
        if ax == 2:
            groups.setdefault(graph.groups[int(li)].name, []).append(int(idx))
        else:
            removed[names[li]][ax].append(int(idx))
    order = [g.name for g in graph.groups] if graph is not None else []
    return removed, {g: sorted(groups[g]) for g in order if g in groups}


def _layer_plan(name: str, m: dict, removed: tuple[list, list], layer_choice, dense: tuple[int, int], scores,
                entries: np.ndarray | None, round_to: int = 1) -> LayerPlan:
    """One layer's plan from its removed rows and columns (dense when its chosen form is not
    smaller), with the predicted loss increase of what it loses. With ``round_to`` the last-ranked
    removals of a side are kept back until its kept count is a multiple of it."""
    rows, cols = removed  # in ranking order
    rows = rows[: m["d_out"] - rounded(m["d_out"] - len(rows), m["d_out"], round_to)]
    cols = cols[: m["d_in"] - rounded(m["d_in"] - len(cols), m["d_in"], round_to)]
    rows_out, cols_out = set(rows), set(cols)
    keep_out = [i for i in range(m["d_out"]) if i not in rows_out]
    keep_in = [j for j in range(m["d_in"]) if j not in cols_out]
    form, cost = layer_choice(name, len(keep_in), len(keep_out))
    reason, dl = "", 0.0
    if form == "fold_out":  # the output rotation is folded: every output direction is kept
        keep_out, rows_out = list(range(m["d_out"])), set()
    if form == "fold_in":
        keep_in, cols_out = list(range(m["d_in"])), set()
    if form == "dense":
        keep_out, keep_in = list(range(m["d_out"])), list(range(m["d_in"]))
        reason = "nothing removed" if not (rows_out or cols_out) else "no pruned form smaller"
    elif entries is not None:
        gone = np.zeros(entries.shape, dtype=bool)
        gone[sorted(rows_out), :] = True
        gone[:, sorted(cols_out)] = True
        dl = float(entries[gone].sum())  # every entry in a removed row or column, once
    else:  # upper bound: overlaps of removed rows and columns counted twice
        dl = float(np.asarray(scores[0])[sorted(rows_out)].sum() + np.asarray(scores[1])[sorted(cols_out)].sum())
    return LayerPlan(
        name=name, action="dense" if form == "dense" else "kfe", form="three" if form == "dense" else form, kind=m["kind"], mode=m["mode"], fold_bias=m["fold_bias"], has_bias=m["has_bias"],
        d_in=m["d_in"], d_out=m["d_out"], keep_in=keep_in, keep_out=keep_out, params=int(cost[0]), macs=int(cost[1]),
        dense_params=int(dense[0]), dense_macs=int(dense[1]), predicted_dloss=dl, reason=reason,
    )

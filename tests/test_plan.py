"""Global selection (raykfe.plan.select): a target is a promise, met or exceeded, never undershot.

* on resnet8 at 16x16 (the API test's model), the achieved reduction counted on the rebuilt model
  is at or above params/flops targets (the default tolerance 0.02 only flags an overshoot);
* on small random layers and scores, with per-layer caps, the selection equals an exhaustive
  search over every subset of the eligible units (tests/selection_oracle.py states the property).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from selection_oracle import all_subsets, check_prefix_rule, mask_of

import raykfe
from raykfe.errors import ConfigError
from raykfe.models import build_model
from raykfe.plan import Target, dense_cost, kfe_cost, select

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet8_stats():
    torch.manual_seed(0)
    model = build_model("resnet8", 10).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    return model, batches, raykfe.collect_factors(model, batches, seed=0)


@pytest.mark.parametrize("target", ["params:0.3", "flops:0.5", "params:0.4", "flops:0.25"])
def test_target_is_met_on_the_rebuilt_model(resnet8_stats, target):
    """The reduction measured with raykfe.count on the rebuilt model is >= the target; the summary
    says the same; the tolerance (0.02 by default) does not license stepping below the target."""
    model, batches, stats = resnet8_stats
    x = batches[0][0][:1]
    kind, fraction = target.split(":")
    fraction = float(fraction)
    res = raykfe.prune(model, batches, target=target, stats=stats)
    base, new = raykfe.count(model, x), raykfe.count(res.model, x)
    measured = 1.0 - (new.params / base.params if kind == "params" else new.macs / base.macs)
    summary = res.plan.summary
    assert summary.achieved == pytest.approx(measured, abs=1e-15)
    assert measured >= fraction, f"{target}: achieved {measured:.6f} is below the target"
    assert summary.within_tolerance == (measured - fraction <= 0.02)


# ------------------------------------------------------------------------------------------------
# exhaustive search on small random score sets
# ------------------------------------------------------------------------------------------------


def random_meta(rng: np.random.Generator) -> dict:
    """A layer's meta as capture._layer_meta writes it (only what kfe_cost/dense_cost read), small."""
    kind = str(rng.choice(["linear", "patch", "full"]))
    has_bias = bool(rng.random() < 0.5)
    fold = has_bias and (kind != "patch" or bool(rng.random() < 0.7))
    d_out = int(rng.integers(2, 5))
    if kind == "linear":
        c_in, k2, t = int(rng.integers(2, 5)), 1, int(rng.choice([1, 3]))
        in_shape = [c_in] if t == 1 else [t, c_in]
        d_in = c_in + fold
    else:
        hw = int(rng.integers(2, 5))
        c_in = int(rng.integers(2, 4)) if kind == "patch" else 1
        k2 = int(rng.choice([1, 4, 9])) if kind == "patch" else int(rng.choice([2, 3, 4]))
        t = int(rng.integers(1, hw * hw + 1))  # strided / padded: any count of output positions
        in_shape = [c_in, hw, hw]
        d_in = (c_in if kind == "patch" else c_in * k2) + fold
    return {
        "kind": "linear" if kind == "linear" else "conv", "mode": "patch" if kind == "linear" else kind,
        "fold_bias": fold, "has_bias": has_bias, "c_in": c_in, "k2": k2, "d_in": d_in, "d_out": d_out,
        "in_shape": in_shape, "out_shape": [d_out], "positions": t,
    }


def _cap(n: int, ratio: float) -> int:
    return max(0, min(int(np.floor(ratio * n)), n - 1))


def random_problem(seed: int, ratio: float, max_eligible: int = 13):
    """Layers (metas + distinct random scores) whose eligible units number at most ``max_eligible``."""
    rng = np.random.default_rng(seed)
    while True:
        names = [f"l{i}" for i in range(int(rng.integers(2, 4)))]
        metas = {n: random_meta(rng) for n in names}
        n_eligible = sum(_cap(m["d_out"], ratio) + _cap(m["d_in"], ratio) for m in metas.values())
        if 2 <= n_eligible <= max_eligible:
            break
    scores = {n: (rng.random(m["d_out"]), rng.random(m["d_in"])) for n, m in metas.items()}
    other = (int(rng.integers(0, 40)), int(rng.integers(0, 400)))  # layers that are not pruned
    return metas, scores, other


def eligible_units(scores, ratio):
    """(layer, axis, index, score) of the ``cap`` lowest-scored units of every layer and axis."""
    units = []
    for name, axes in scores.items():
        for axis, s in enumerate(axes):
            for i in np.argsort(s)[: _cap(s.size, ratio)]:
                units.append((name, axis, int(i), float(s[i])))
    return units


def layer_cost(meta, rows_removed, cols_removed, metric) -> tuple[str, tuple[int, int]]:
    """The rule for one layer: three layers when smaller than dense in the target's metric."""
    dense = dense_cost(meta)
    kfe = kfe_cost(meta, meta["d_in"] - cols_removed, meta["d_out"] - rows_removed)
    return ("kfe", kfe) if kfe[metric] < dense[metric] else ("dense", dense)


def subset_reductions(metas, units, other, kind):
    """Reduction for every subset of ``units`` (bitmask order), from kfe_cost/dense_cost tables."""
    metric = 1 if kind == "flops" else 0
    names = list(metas)
    subsets = all_subsets(len(units))
    base = np.array(other, dtype=np.float64) + sum(np.array(dense_cost(m), dtype=np.float64) for m in metas.values())
    total = np.tile(np.array(other, dtype=np.float64), (subsets.shape[0], 1))
    gone = np.zeros(subsets.shape[0])
    for name in names:
        m = metas[name]
        rows = subsets[:, [u[0] == name and u[1] == 0 for u in units]].sum(axis=1)
        cols = subsets[:, [u[0] == name and u[1] == 1 for u in units]].sum(axis=1)
        table = {(r, c): layer_cost(m, r, c, metric) for r in set(rows.tolist()) for c in set(cols.tolist())}
        choice = [table[(r, c)] for r, c in zip(rows.tolist(), cols.tolist())]
        total += np.array([cost for _, cost in choice], dtype=np.float64)
        gone += np.array([r + c if action == "kfe" else 0 for (action, _), r, c in zip(choice, rows, cols)])
    if kind == "directions":
        return gone / sum(m["d_in"] + m["d_out"] for m in metas.values()), base
    return 1.0 - total[:, metric] / base[metric], base


@pytest.mark.parametrize("seed", range(12))
def test_select_equals_exhaustive_search(seed):
    """plan.select on random small layers, for params/flops/directions targets and four caps, against
    an exhaustive enumeration of the eligible units (the property is stated in
    tests/selection_oracle.py): the plan removes exactly the k lowest-scored eligible units (a layer
    left dense keeps its own), with k the smallest count meeting the target, and its achieved
    reduction, recomputed from the plan's kept directions with kfe_cost/dense_cost, is >= the target."""
    checked = 0
    for ratio in (0.34, 0.5, 0.75, 1.0):
        metas, scores, other = random_problem(seed * 10 + int(ratio * 100), ratio)
        units = eligible_units(scores, ratio)
        unit_scores = np.array([u[3] for u in units])
        order = np.argsort(unit_scores)
        for kind in ("params", "flops", "directions"):
            metric = 1 if kind == "flops" else 0
            red, base = subset_reductions(metas, units, other, kind)
            best = red[-1]
            if best <= 0.0:
                with pytest.raises(ConfigError, match="unreachable"):
                    select(scores, metas, f"{kind}:0.5", base_params=int(base[0]), base_macs=int(base[1]), max_layer_ratio=ratio)
                continue
            rng = np.random.default_rng(seed)
            prefix_reds = [red[mask_of(order[:j])] for j in range(len(units) + 1)]
            exact = [float(r) for r in prefix_reds if 0.0 < r < 1.0]
            targets = [float(best * u) for u in rng.uniform(0.05, 1.0, 3)] + exact[-1:] + exact[:1]
            for fraction in targets:
                what = f"seed {seed} ratio {ratio} {kind}:{fraction!r}"
                plans, summary = select(
                    scores, metas, Target(kind, fraction), base_params=int(base[0]), base_macs=int(base[1]),
                    max_layer_ratio=ratio,
                )
                # (a) achieved, recomputed from the plan's kept directions
                tot = np.array(other, dtype=np.int64)
                for name, lp in plans.items():
                    m = metas[name]
                    action, cost = layer_cost(m, m["d_out"] - lp.r_out, m["d_in"] - lp.r_in, metric)
                    assert lp.action == action and (lp.params, lp.macs) == cost, f"{what}: layer {name}"
                    tot += np.array(cost, dtype=np.int64)
                removed = [(n, ax, i) for n, lp in plans.items()
                           for ax, keep, d in ((0, lp.keep_out, lp.d_out), (1, lp.keep_in, lp.d_in)) for i in range(d) if i not in keep]
                if kind == "directions":
                    achieved = len(removed) / sum(m["d_in"] + m["d_out"] for m in metas.values())
                else:
                    achieved = 1.0 - tot[metric] / base[metric]
                assert summary["achieved"] == pytest.approx(achieved, abs=1e-15), what
                assert achieved >= fraction, f"{what}: achieved {achieved:.6f} is below the target"
                assert summary["within_tolerance"] == (achieved - fraction <= 0.02), what
                # (b), (c): the exhaustive oracle picks the smallest meeting prefix ...
                k = next(j for j, r in enumerate(prefix_reds) if r >= fraction)
                chosen = mask_of(order[:k])
                assert check_prefix_rule(unit_scores, red, chosen, fraction, what) == k
                # ... and the plan removes exactly its units, except in the layers left dense
                dense = {n for n, lp in plans.items() if lp.action == "dense"}
                expect = sorted((units[u][0], units[u][1], units[u][2]) for u in order[:k] if units[u][0] not in dense)
                assert sorted(removed) == expect, f"{what}: plan removes {sorted(removed)}, exhaustive search {expect}"
                checked += 1
    assert checked >= 24, checked  # most random problems are reachable: the test is not vacuous


# ------------------------------------------------------------------------------------------------
# one Plan type: JSON round trip, earlier formats read, newer ones refused
# ------------------------------------------------------------------------------------------------

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "results_v1"


def test_plan_round_trips_and_reads_format_1_plans():
    from raykfe.plan import PLAN_FORMAT, Plan

    kfe_v1 = json.loads((FIXTURES / "eigendamage" / "plan.json").read_text())
    chan_v1 = json.loads((FIXTURES / "l1" / "plan.json").read_text())
    assert kfe_v1["format"] == 1 and chan_v1["kind"] == "channels"
    kfe, chan = Plan.from_dict(kfe_v1), Plan.from_dict(chan_v1)
    assert kfe.space == "kfe" and chan.space == "channels"
    assert kfe.summary.achieved == kfe_v1["options"]["summary"]["achieved"]
    assert kfe.settings["conv_mode"] == "patch" and kfe.freeze_rotations is False
    assert chan.input_shape == chan_v1["options"]["input_shape"] and chan.removed == chan_v1["removed"]
    assert {n: [c.kept, c.total] for n, c in chan.channels.items()} == chan_v1["options"]["layers"]
    for plan in (kfe, chan):
        back = Plan.from_json(plan.to_json())
        assert back == plan and back.format == PLAN_FORMAT


def test_plan_of_a_newer_raykfe_or_with_unknown_fields_is_refused():
    from raykfe.plan import PLAN_FORMAT, Plan

    d = Plan("eigendamage", "flops:0.5").to_dict()
    with pytest.raises(raykfe.ConfigError, match="newer than this raykfe"):
        Plan.from_dict({**d, "format": PLAN_FORMAT + 1})
    with pytest.raises(raykfe.ConfigError, match="unknown fields.*'zzz'"):
        Plan.from_dict({**d, "zzz": 1})

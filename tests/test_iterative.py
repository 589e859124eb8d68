"""Iterative EigenDamage (ALGORITHMS.md section 5): merged rounds are exact, the schedule reaches the
final target, the job resumes between rounds and its result reloads."""

from __future__ import annotations

import copy

import pytest
import torch

import raykfe
from raykfe.backend import LocalBackend
from raykfe.capture import collect_factors, find_layers, layer_metas, prunable_layers
from raykfe.config import load_config
from raykfe.engine import plan_from_scores
from raykfe.iterative import compose_plan, merge_round, round_layer_names, round_metas, round_target
from raykfe.layers import make_adapter
from raykfe.methods.eigendamage import score_in_basis
from raykfe.models import build_model
from raykfe.pipeline import run_job
from raykfe.plan import Target
from raykfe.settings import PruneSettings
from raykfe.eigen import eigenbasis
from raykfe.surgery import KFEConv2d, fill_kfe, make_kfe_shell, set_module

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


def _batches(n=3, batch=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, dtype=DT, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def _round(model, adapters, skipped, metas, batches, example, target, mode, ratio):
    """One round by hand: statistics on the cores, bases, plan. -> (plan, weights, names)."""
    names = round_layer_names(model, adapters)
    stats = collect_factors(model, batches, conv_mode=mode, layers=list(names.values()))
    found, _ = find_layers(model, mode, None)
    scored = {n: score_in_basis(t, found[t].weight_matrix(), eigenbasis(t, stats[t])) for n, t in names.items()}
    rmetas = round_metas(model, metas, {t: stats[t].meta for t in names.values()}, names)
    plan = plan_from_scores(model, example, scored, rmetas, target, skipped, method="eigendamage-iterative",
                            settings=PruneSettings(max_layer_ratio=ratio, tolerance=0.02, forms="three"))
    return plan, {n: (s.basis.QA, s.basis.QS, s.w_kfe) for n, s in scored.items()}, names


# full mode's rotation is a k x k conv over d_in = c_in k^2 directions: at the per-round cap 0.5 its
# three-layer form is never smaller, so full mode needs a higher cap to prune at all
@pytest.mark.parametrize("mode,ratio", [("patch", 0.5), ("full", 0.95)])
def test_merged_round_equals_nested_three_layer_core_and_counts_match(mode, ratio):
    torch.manual_seed(0)
    model = build_model("resnet8", 10).to(DT).eval()
    batches = _batches()
    example = batches[0][0][:1]
    adapters, skipped = prunable_layers(model, example, conv_mode=mode)
    metas = layer_metas(model, example, adapters)
    plan1, w1, _ = _round(model, adapters, skipped, metas, batches, example, Target("flops", 0.3), mode, ratio)
    m1 = merge_round(model, plan1, w1, mode)
    comp1 = compose_plan(None, plan1, metas, 1)
    assert (raykfe.count(m1, example).params, raykfe.count(m1, example).macs) == (comp1.params, comp1.macs)
    assert any(isinstance(m, KFEConv2d) for m in m1.modules())

    plan2, w2, names = _round(m1, adapters, skipped, metas, batches, example, Target("flops", 0.3), mode, ratio)
    rebuilt = [n for n, lp in plan2.layers.items() if lp.action == "kfe" and names[n].endswith(".core")]
    assert rebuilt, "round 2 must prune some already rebuilt layer through its core"
    m2 = merge_round(m1, plan2, w2, mode)

    # reference: the round's three-layer core nested inside the old rotations, not merged
    nested = copy.deepcopy(m1)
    for n, lp in plan2.layers.items():
        if lp.action != "kfe":
            continue
        target = names[n]
        module = nested.get_submodule(target)
        if target.endswith(".core"):
            ad = make_adapter(target, module, mode)
            import dataclasses

            lp = dataclasses.replace(lp, fold_bias=ad.fold_bias, has_bias=ad.has_bias, d_in=ad.d_in, d_out=ad.d_out)
        shell = make_kfe_shell(module, lp)
        fill_kfe(shell, module, lp, *w2[n])
        set_module(nested, target, shell)
    x = torch.randn(4, 3, 16, 16, dtype=DT)
    with torch.no_grad():
        got, want = m2(x), nested(x)
    assert (got - want).abs().max().item() < 1e-10 * max(1.0, want.abs().max().item())

    comp2 = compose_plan(comp1, plan2, metas, 2)
    c2 = raykfe.count(m2, example)
    assert (c2.params, c2.macs) == (comp2.params, comp2.macs)
    assert c2.macs < raykfe.count(m1, example).macs
    # the composite plan rebuilds the same architecture from the original model (how results load)
    shells = raykfe.surgery.apply_plan(model, comp2)
    shells.load_state_dict(m2.state_dict())
    with torch.no_grad():
        assert torch.allclose(shells(x), got, rtol=0, atol=1e-12)


def test_round_schedule_is_geometric_and_ends_on_the_target():
    base, final = 1000.0, Target("flops", 0.75)
    current = base
    for r in range(1, 4):
        t = round_target(final, base, current, r, 3)
        current *= 1 - t.fraction
        assert current == pytest.approx(base * 0.25 ** (r / 3))
    assert current == pytest.approx(250.0)
    with pytest.raises(raykfe.ConfigError, match="params:F or flops:F"):
        round_target("directions:0.5", base, base, 1, 3)


class _DiesInRoundTwo(LocalBackend):
    def score(self, stats, weights):
        if any(n.endswith(".core") for n in stats):
            raise KeyboardInterrupt  # the driver is stopped during round 2
        return super().score(stats, weights)


@pytest.mark.slow
def test_iterative_job_reaches_target_resumes_between_rounds_and_reloads(tmp_path, tiny_job_overrides):
    overrides = [*tiny_job_overrides, "runtime=local", "prune.method=eigendamage-iterative", "prune.rounds=2",
                 "prune.round_epochs=1", "prune.target=flops:0.6"]
    cfg = load_config("jobs/digits.yaml", overrides)
    with pytest.raises(KeyboardInterrupt):
        run_job(cfg, _DiesInRoundTwo(), log=lambda m: None)
    job = run_job(cfg, LocalBackend(), log=lambda m: None)
    assert "round1" in job.metrics["reused_stages"]
    assert abs(job.metrics["macs_reduction"] - 0.6) <= 0.02  # prune.tolerance
    res = raykfe.load(str(tmp_path / "out"))
    assert [r["round"] for r in res.plan.steps] == [1, 2]
    x = torch.randn(2, 3, 16, 16)
    res.model.eval()
    job.result.model.eval()
    with torch.no_grad():
        assert torch.allclose(res.model(x), job.result.model.cpu()(x), rtol=1e-4, atol=1e-4)


def test_rounds_only_for_eigendamage_and_iterative_not_in_one_call_api():
    with pytest.raises(raykfe.ConfigError, match="rounds apply to eigendamage"):
        load_config("jobs/digits.yaml", ["prune.method=l1", "prune.rounds=3"])
    model = build_model("resnet8", 10)
    with pytest.raises(raykfe.ConfigError, match="fine-tunes between rounds"):
        raykfe.prune(model, _batches(1), method="eigendamage-iterative")


def test_iterative_job_runs_distributed_on_ray(ray_cluster, tmp_path, tiny_job_overrides):
    """Two rounds on Ray: statistics of the cores on Train workers, bases on actors, the round's
    fine-tuning on DDP workers; the result reloads and meets the target."""
    from raykfe.distributed.backend import RayBackend

    overrides = [*tiny_job_overrides, "runtime=ray", "ray.workers=2", "prune.method=eigendamage-iterative",
                 "prune.rounds=2", "prune.round_epochs=1", "prune.target=flops:0.6"]
    cfg = load_config("jobs/digits.yaml", overrides)
    job = run_job(cfg, RayBackend(cfg), log=lambda m: None)
    assert abs(job.metrics["macs_reduction"] - 0.6) <= 0.02
    res = raykfe.load(str(tmp_path / "out"))
    assert [r["round"] for r in res.plan.steps] == [1, 2]
    assert (tmp_path / "out" / "stages" / "stats-round2.json").exists()

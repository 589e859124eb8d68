"""prune.channel_share: a KFE method's target reached by a channel step first, then the KFE step on
the narrowed model. The joined plan is exactly the two separate prunes composed; it rebuilds the
model from the original, survives the JSON round trip, and a job resumes from either part."""

from __future__ import annotations

import pytest
import torch

import raykfe
from raykfe.config import load_config
from raykfe.errors import ConfigError
from raykfe.models import build_model
from raykfe.pipeline import run_job
from raykfe.plan import Plan
from raykfe.surgery import rebuild

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n=3, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, size, size, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("arch", ["resnet8", "mobilenet_small"])
def test_the_joined_plan_is_the_channel_prune_then_the_kfe_prune_of_the_narrowed_model(tmp_path, arch):
    """Same data and settings: the channel step removes exactly what ``method=c-obd`` at
    ``share * F`` removes, the KFE step keeps exactly what eigendamage keeps on that narrowed
    model at the rest of the target; the whole reaches F (relative to the ORIGINAL model); the
    joined plan rebuilds the pruned model from the original architecture (also after a JSON
    round trip and raykfe.save / load). mobilenet_small's KFE step is itself hybrid (its
    depthwise groups lose channels again): the two channel removals compose."""
    torch.manual_seed(0)
    model = build_model(arch, 10).eval()
    batches = _batches()
    x = batches[0][0][:1]
    F, share = 0.7, 0.3
    res = raykfe.prune(model, batches, target=f"flops:{F}", channel_share=share)
    base, new = raykfe.count(model, x), raykfe.count(res.model, x)
    achieved = 1 - new.macs / base.macs
    assert F <= achieved <= F + 0.02 and res.plan.summary.achieved == pytest.approx(achieved)
    assert (res.plan.params, res.plan.macs, res.plan.base_macs) == (new.params, new.macs, base.macs)
    assert [(s["round"], s["method"]) for s in res.plan.steps] == [(1, "c-obd"), (2, "eigendamage")]
    assert res.plan.settings["channel_share"] == share and res.plan.method == "eigendamage"

    first = raykfe.prune(model, batches, method="c-obd", target=f"flops:{share * F:g}")
    narrowed = raykfe.count(first.model, x)
    rest = 1 - (1 - F) / (narrowed.macs / base.macs)
    second = raykfe.prune(first.model, batches, target=f"flops:{rest:g}")
    if second.plan.removed:  # hybrid: its removals are of the narrowed groups
        assert set(res.plan.removed) >= set(first.plan.removed)
        for g, idx in first.plan.removed.items():
            assert set(idx) <= set(res.plan.removed[g])
    else:
        assert res.plan.removed == first.plan.removed
    assert {n: (lp.keep_in, lp.keep_out, lp.form) for n, lp in res.plan.layers.items()} == \
        {n: (lp.keep_in, lp.keep_out, lp.form) for n, lp in second.plan.layers.items()}
    assert (res.plan.params, res.plan.macs) == (second.plan.params, second.plan.macs)

    probe = batches[1][0]
    with torch.no_grad():
        want = res.model.eval()(probe)
        again = rebuild(model, Plan.from_json(res.plan.to_json()))
        again.load_state_dict(res.model.state_dict())
        torch.testing.assert_close(again.eval()(probe), want, rtol=0, atol=0)
        back = raykfe.load(raykfe.save(res, str(tmp_path / "r")), model=model)
        torch.testing.assert_close(back.model(probe), want, rtol=1e-6, atol=1e-6)


def test_channel_share_is_refused_where_it_does_not_apply():
    model = build_model("vgg_tiny", 10)
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))]
    with pytest.raises(ConfigError, match="channel_share=1.2 is invalid"):
        raykfe.prune(model, batches, channel_share=1.2)
    with pytest.raises(ConfigError, match="params:F or flops:F"):
        raykfe.prune(model, batches, target="directions:0.3", channel_share=0.3)
    with pytest.raises(ConfigError, match="channel_method='eigendamage' is not a one-pass channel method"):
        raykfe.prune(model, batches, channel_share=0.3, channel_method="eigendamage")
    for bad, match in [("prune.channel_share=-0.1", "prune.channel_share"),
                       ("prune.channel_method=slimming", "prune.channel_method"),
                       ("prune.target=latency:0.3", "prune.channel_share")]:
        with pytest.raises(ConfigError, match=match):
            load_config("jobs/digits.yaml", ["prune.channel_share=0.3", bad])
    with pytest.raises(ConfigError, match="prune.channel_share"):
        load_config("jobs/digits.yaml", ["prune.channel_share=0.3", "prune.method=eigendamage-iterative"])
    # a channel method's own channel_share is meaningless but harmless: the channel methods ignore it
    assert raykfe.prune(model, batches, method="l1", target="flops:0.3", channel_share=0.3).plan.space == "channels"


class _DiesOnTheNarrowedModel(__import__("raykfe.backend", fromlist=["LocalBackend"]).LocalBackend):
    def kfac(self, recipe, state, layers, conv_mode):
        if recipe.plan is not None:  # statistics of the narrowed model: the KFE step
            raise KeyboardInterrupt
        return super().kfac(recipe, state, layers, conv_mode)


@pytest.mark.slow
def test_a_channels_first_job_resumes_and_matches_the_api(tmp_path):
    """The job's KFE step measures the narrowed model rebuilt from the channel plan (its workers
    see only the recipe and the plan); killed there, a re-run reuses the channel step's stages and
    reaches the plan of an uninterrupted run; its report lists both steps."""
    overrides = ["model.name=vgg_tiny", "data.image_size=8", "base.epochs=1", "finetune.epochs=0", "stats.max_batches=2",
                 "stats.batch_size=32", "progress=false", "runtime=local", "latency.repeats=0",
                 "prune.target=flops:0.7", "prune.channel_share=0.3"]
    cfg = load_config("jobs/digits.yaml", [*overrides, f"output.uri={tmp_path / 'a'}"])
    with pytest.raises(KeyboardInterrupt):
        run_job(cfg, _DiesOnTheNarrowedModel(), log=lambda m: None)
    job = run_job(cfg, log=lambda m: None)
    assert job.metrics["reused_stages"][:3] == ["base", "statistics-channels", "plan-channels"]
    again = run_job(load_config("jobs/digits.yaml", [*overrides, f"output.uri={tmp_path / 'b'}"]), log=lambda m: None)
    a, b = job.result.plan, again.result.plan
    assert (a.removed, a.layers, a.macs) == (b.removed, b.layers, b.macs) and a.removed and a.space == "hybrid"
    assert job.metrics["macs_reduction"] >= 0.7
    report = (tmp_path / "a" / "report.md").read_text()
    assert "channel_share: 0.3" in report

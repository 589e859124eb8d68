"""The one prune engine: the API and a job reach the same plan through it; the package prunes with
ray blocked from import; results written before the engine change still load."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import raykfe
from raykfe.config import load_config
from raykfe.data import job_splits, make_loader
from raykfe.models import build_model
from raykfe.pipeline import run_job

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "results_v1"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_package_prunes_saves_and_loads_with_ray_blocked(tmp_path):
    """The API, engine, methods, surgery and checkpoint never import ray: a user without a cluster
    (or a worker of another framework) can prune and load results."""
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ImportError("ray is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch, raykfe, raykfe.engine, raykfe.methods, raykfe.surgery, raykfe.checkpoint, raykfe.pipeline
        from raykfe.models import build_model
        torch.manual_seed(0)
        model = build_model("vgg_tiny", 10).eval()
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
        for method in ("eigendamage", "l1", "kron-obs"):
            res = raykfe.prune(model, batches, method=method, target="flops:0.5")
            out = raykfe.save(res, r"{tmp_path}/" + method)
            back = raykfe.load(out)
            x = batches[0][0]
            assert torch.allclose(back.model(x), res.model.eval()(x), atol=1e-5)
        assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


@pytest.mark.parametrize("name", ["eigendamage", "l1", "eigendamage-iterative"])
def test_results_written_before_the_engine_change_still_load(name):
    """Results written by raykfe before the one-engine change (plan format 1: KFE, channel and
    iterative plans): loaded, they compute exactly what they computed then."""
    want = load_file(str(FIXTURES / name / "expected.safetensors"))
    res = raykfe.load(str(FIXTURES / name))
    with torch.no_grad():
        got = res.model.eval()(want["x"])
    torch.testing.assert_close(got, want["y"], rtol=1e-5, atol=1e-6)
    c = raykfe.count(res.model, want["x"][:1])
    assert (c.params, c.macs) == (int(want["params"]), int(want["macs"]))
    assert (res.plan.params, res.plan.macs) == (c.params, c.macs)
    assert res.plan.method == name and res.plan.summary.achieved >= 0.5
    if name == "eigendamage-iterative":
        assert [s["round"] for s in res.plan.steps] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["eigendamage", "kron-obs"])
def test_api_and_job_reach_the_same_plan(tmp_path, method):
    """The job (stage store, backend, global example indices) and raykfe.prune (the caller's
    batches) run the same engine: on the same data, seed and settings they make the same plan."""
    cfg = load_config("jobs/digits.yaml", [
        "model.name=vgg_tiny", "data.image_size=8", "base.epochs=1", "finetune.epochs=0", "stats.max_batches=2",
        "stats.batch_size=32", "progress=false", "runtime=local", "latency.repeats=0", f"prune.method={method}",
        "prune.target=flops:0.5", f"output.uri={tmp_path / 'job'}",
    ])
    job = run_job(cfg, log=lambda m: None)
    splits = job_splits(cfg.data, cfg.seed)
    model = build_model("vgg_tiny", splits.num_classes)
    model.load_state_dict(load_file(str(tmp_path / "job" / "base.safetensors")))
    batches = list(make_loader(splits.train, 32, shuffle=False))[:2]
    res = raykfe.prune(model, batches, method=method, target="flops:0.5", max_layer_ratio=0.95,
                       example_input=splits.test[0][0][None])
    a, b = job.result.plan, res.plan
    assert (a.params, a.macs, a.removed) == (b.params, b.macs, b.removed)
    report = (tmp_path / "job" / "report.md").read_text()  # says how the plan was made
    assert "normalize: mean" in report and ("damping: 0.001" in report) == (method == "kron-obs")
    assert {n: (lp.keep_in, lp.keep_out) for n, lp in a.layers.items()} == {n: (lp.keep_in, lp.keep_out) for n, lp in b.layers.items()}


def test_api_refuses_unknown_options_and_jobs_only_methods():
    model = build_model("vgg_tiny", 10)
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))]
    with pytest.raises(raykfe.ConfigError, match="unknown option.*'damp'"):
        raykfe.prune(model, batches, damp=0.1)
    with pytest.raises(raykfe.ConfigError, match="max_layer_ratio=1.5 is invalid"):
        raykfe.prune(model, batches, max_layer_ratio=1.5)
    with pytest.raises(raykfe.ConfigError, match="slimming.*run it as a job"):
        raykfe.prune(model, batches, method="slimming")
    with pytest.raises(raykfe.ConfigError, match="eigen-directions"):
        raykfe.prune(model, batches, method="l1", target="directions:0.3")


# ------------------------------------------------------------------------------------------------
# multi-step one-shot pruning
# ------------------------------------------------------------------------------------------------


def _tiny_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("method", ["eigendamage", "kron-obs"])
def test_steps_reach_the_target_and_the_composite_plan_rebuilds_the_model(tmp_path, method):
    """``steps=3`` prunes the partly pruned model three times (statistics re-collected, nothing
    trained): the final reduction is at or above the target, the composite plan (relative to the
    original model) rebuilds exactly the stepped model, and no layer loses more than the cap of
    its ORIGINAL units over all steps."""
    torch.manual_seed(0)
    model = build_model("resnet8", 10).eval()
    batches = _tiny_batches()
    x = batches[0][0][:1]
    res = raykfe.prune(model, batches, method=method, target="flops:0.6", steps=3, max_layer_ratio=0.8)
    base, new = raykfe.count(model, x), raykfe.count(res.model, x)
    achieved = 1 - new.macs / base.macs
    assert 0.6 <= achieved <= 0.62 and res.plan.summary.achieved == pytest.approx(achieved)
    assert [s["round"] for s in res.plan.steps] == [1, 2, 3]
    assert (res.plan.params, res.plan.macs) == (new.params, new.macs)
    if res.plan.space == "kfe":
        for lp in res.plan.layers.values():
            assert lp.d_out - lp.r_out <= int(0.8 * lp.d_out) and lp.d_in - lp.r_in <= int(0.8 * lp.d_in)
    else:
        for c in res.plan.channels.values():
            assert c.total - c.kept <= int(0.8 * c.total)
    back = raykfe.load(raykfe.save(res, str(tmp_path / "r")), model=model)
    with torch.no_grad():
        torch.testing.assert_close(back.model(batches[1][0]), res.model.eval()(batches[1][0]), rtol=1e-5, atol=1e-5)


class _DiesInStepTwo(__import__("raykfe.backend", fromlist=["LocalBackend"]).LocalBackend):
    def kfac(self, recipe, state, layers, conv_mode):
        if recipe.plan is not None:  # statistics of the partly pruned model: step 2
            raise KeyboardInterrupt
        return super().kfac(recipe, state, layers, conv_mode)


@pytest.mark.slow
def test_a_job_in_steps_resumes_from_its_finished_steps(tmp_path):
    overrides = ["model.name=vgg_tiny", "data.image_size=8", "base.epochs=1", "finetune.epochs=0", "stats.max_batches=2",
                 "stats.batch_size=32", "progress=false", "runtime=local", "latency.repeats=0", "prune.steps=2",
                 "prune.target=flops:0.6"]
    cfg = load_config("jobs/digits.yaml", [*overrides, f"output.uri={tmp_path / 'a'}"])
    with pytest.raises(KeyboardInterrupt):
        run_job(cfg, _DiesInStepTwo(), log=lambda m: None)
    job = run_job(cfg, log=lambda m: None)
    assert job.metrics["reused_stages"][:4] == ["base", "statistics", "eigen", "plan"]
    again = run_job(load_config("jobs/digits.yaml", [*overrides, f"output.uri={tmp_path / 'b'}"]), log=lambda m: None)
    assert job.result.plan.layers == again.result.plan.layers and job.metrics["macs_reduction"] >= 0.6
    # rank=auto's choice of step 1 is kept with its plan: the resumed run reports the same
    choices = [{k: s.get(k) for k in ("rank", "candidate_losses")} for s in job.result.plan.steps]
    assert choices == [{k: s.get(k) for k in ("rank", "candidate_losses")} for s in again.result.plan.steps]
    assert all(c["rank"] in ("score", "cost") for c in choices)


@pytest.mark.parametrize("method", ["kron-obs", "l1"])
def test_channel_reports_count_each_layer_and_predict_in_loss_units(method):
    """A channel plan's report rows give each layer's params and MACs after / before (counted
    again here on the two models) and, for a method whose scores are loss increases, the predicted
    increase of each group on its root row (the removed channels' scores; None for l1)."""
    from raykfe.counting import layer_counts

    torch.manual_seed(0)
    model = build_model("resnet8", 10).eval()
    batches = _tiny_batches()
    x = batches[0][0][:1]
    res = raykfe.prune(model, batches, method=method, target="flops:0.5")
    before, after = layer_counts(model, x), layer_counts(res.model, x)
    rows = {r["layer"]: r for r in res.report if r["action"] in ("channels", "kept")}
    assert rows and set(rows) == set(res.plan.channels)
    for name, r in rows.items():
        assert (r["params"], r["macs"], r["dense_params"], r["dense_macs"]) == (
            after[name].params, after[name].macs, before[name].params, before[name].macs), name
    roots = [n for n in rows if n in res.plan.removed]
    assert roots
    for name in roots:
        if method == "l1":
            assert rows[name]["predicted_dloss"] is None
        else:
            assert rows[name]["predicted_dloss"] > 0, name
    if method == "kron-obs":
        total = sum(r["predicted_dloss"] or 0.0 for r in rows.values())
        assert total == pytest.approx(res.plan.steps[0]["predicted_dloss"], rel=1e-12)


def test_auto_rank_keeps_the_candidate_that_fits_the_statistics_data_better():
    """``rank="auto"`` prunes with both rankings and keeps the plan whose recalibrated model has the
    lower loss on the statistics batches: the same plan as that ranking alone, and the record says
    which and the two losses (recomputed here)."""
    from raykfe.finetune import evaluate
    from raykfe.recalibrate import recalibrate

    torch.manual_seed(0)
    model = build_model("resnet8", 10).eval()
    batches = _tiny_batches()
    res = raykfe.prune(model, batches, target="flops:0.6", rank="auto")
    step = res.plan.steps[0]
    losses = {}
    for rank in ("score", "cost"):
        alone = raykfe.prune(model, batches, target="flops:0.6", rank=rank)
        m = alone.model
        recalibrate(m, batches, 10)
        losses[rank] = evaluate(m, batches)["loss"]
        if rank == step["rank"]:
            assert {n: (lp.keep_in, lp.keep_out) for n, lp in alone.plan.layers.items()} == {
                n: (lp.keep_in, lp.keep_out) for n, lp in res.plan.layers.items()}
    assert step["candidate_losses"] == pytest.approx(losses, rel=1e-9)
    assert step["rank"] == min(losses, key=losses.get) and res.plan.settings["rank"] == step["rank"]

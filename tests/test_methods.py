"""Every registered method end to end: the tiny digits job (in-process), the API, the saved result
reloaded without pickles; the channel methods' statistics on Ray workers equal the in-process ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import raykfe
from raykfe.backend import JobContext, LocalBackend
from raykfe.channels import ChannelGraph
from raykfe.checkpoint import ModelRecipe
from raykfe.config import load_config
from raykfe.data import job_splits
from raykfe.finetune import state_of
from raykfe.methods import METHODS
from raykfe.methods.sosp import owner_to_lists, structure_owner
from raykfe.models import build_model
from raykfe.pipeline import run_job

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    """One tiny base model shared by every method's job (as a user passes model.weights)."""
    out = tmp_path_factory.mktemp("base")
    cfg = load_config("jobs/digits.yaml", [
        "model.name=resnet8", "data.image_size=16", "base.epochs=2", "finetune.epochs=0", "stats.max_batches=2",
        "stats.batch_size=32", "progress=false", "runtime=local", f"output.uri={out / 'job'}",
    ])
    run_job(cfg, LocalBackend(), log=lambda m: None)
    return str(out / "job" / "base.safetensors")


def _tiny(tmp_path, base_weights, method, *extra):
    return load_config("jobs/digits.yaml", [
        "model.name=resnet8", "data.image_size=16", f"model.weights={base_weights}", "finetune.epochs=1",
        "stats.max_batches=2", "stats.batch_size=32", "progress=false", "runtime=local", "prune.target=flops:0.5",
        f"prune.method={method}", f"output.uri={tmp_path / method}", "sparsity.epochs=1", "prune.round_epochs=1", *extra,
    ])


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_the_tiny_job_and_its_result_reloads(tmp_path, base_weights, method):
    cfg = _tiny(tmp_path, base_weights, method)
    job = run_job(cfg, LocalBackend(), log=lambda m: None)
    m = job.metrics
    assert m["method"] == method
    assert abs(m["macs_reduction"] - 0.5) <= 0.05, m["macs_reduction"]  # channel granularity: a residual group is coarse
    assert 0.0 <= m["pruned"]["test_acc"] <= 1.0
    res = raykfe.load(str(tmp_path / method))
    x = torch.randn(3, 3, 16, 16)
    job.result.model.cpu().eval()
    with torch.no_grad():
        assert torch.allclose(res.model(x), job.result.model(x), rtol=1e-4, atol=1e-5)
    c = raykfe.count(res.model, x[:1])
    assert (c.params, c.macs) == (m["pruned"]["params"], m["pruned"]["macs"])
    report = json.loads((tmp_path / method / "report.json").read_text())["layers"]
    assert any("bottleneck" in r["note"] for r in report), "the least-pruned layers are flagged"
    assert (tmp_path / method / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no pickle anywhere in the result
    for f in (tmp_path / method).iterdir():
        if f.is_file():
            assert not f.read_bytes().startswith(b"\x80"), f"{f.name} looks like a pickle"
    if METHODS[method].statistics == "bn-sparsity":
        assert "sparsity" in m["timings"]


def test_slimming_sparsity_training_drives_bn_scales_down():
    from raykfe.finetune import TrainSettings, train

    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]

    def l1_after(penalty):
        m = build_model("resnet8", 10)
        m.load_state_dict(model.state_dict())
        train(m, data, TrainSettings(epochs=3, lr=0.05, weight_decay=0.0, bn_l1=penalty), progress=False)
        return sum(b.weight.abs().sum().item() for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))

    assert l1_after(0.5) < 0.5 * l1_after(0.0)


def test_every_method_from_the_api_meets_the_target():
    torch.manual_seed(0)
    model = build_model("resnet8", 10).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    for method, info in METHODS.items():
        if info.rounds > 1 or info.needs_job:
            with pytest.raises(raykfe.ConfigError, match="run it as a job"):  # a stage the API cannot run
                raykfe.prune(model, batches, method=method, target="params:0.4")
            continue
        res = raykfe.prune(model, batches, method=method, target="params:0.4")
        assert res.plan.method == method
        assert res.plan.summary.achieved >= 0.4 - 1e-9, method


def test_channel_method_statistics_on_two_ray_workers_equal_single_process(ray_cluster, tmp_path, base_weights):
    """SOSP-H's per-shard gradient and Gauss-Newton-vector sums, and C-OBD's diagonal Fisher, are
    all-reduced across the Train workers: the result equals the in-process pass."""
    from raykfe.distributed.backend import RayBackend

    cfg = _tiny(tmp_path, base_weights, "sosp-h", "ray.workers=2", "runtime=ray")
    splits = job_splits(cfg.data, cfg.seed)
    model = build_model("resnet8", splits.num_classes)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(base_weights))
    recipe, state = ModelRecipe(dict(model.raykfe_spec)), state_of(model)
    graph = ChannelGraph(model, splits.test[0][0][None])
    owner, _, total = structure_owner(model, graph)
    layers = sorted({m.module for g in graph.groups for m in g.members if m.kind == "out"
                     and isinstance(model.get_submodule(m.module), (torch.nn.Conv2d, torch.nn.Linear))})
    for kind, spec in (("sosp-h", {"owner": owner_to_lists(owner), "n_structures": total}), ("diag-fisher", {"layers": layers})):
        dist, local = RayBackend(cfg), LocalBackend()
        dist.open(JobContext.of(cfg)), local.open(JobContext.of(cfg))
        dist, local = dist.measure(recipe, state, kind, spec), local.measure(recipe, state, kind, spec)
        assert set(dist) == set(local)
        for k in local:
            a, b = dist[k].to(torch.float64), local[k].to(torch.float64)
            scale = max(b.abs().max().item(), 1e-30)
            assert (a - b).abs().max().item() <= 1e-5 * scale, (kind, k)  # float32 model, other batch splits
        assert int(dist["count"].reshape(-1)[0].item()) == int(local["count"].reshape(-1)[0].item()) == 64


def test_channel_method_job_on_ray_matches_in_process_plan(ray_cluster, tmp_path, base_weights):
    """kron-obs end to end on Ray (full-mode K-FAC on the Train workers, compensating update in the
    driver): the same plan as the in-process job, and the result reloads."""
    from raykfe.distributed.backend import RayBackend

    ray_cfg = _tiny(tmp_path / "ray", base_weights, "kron-obs", "runtime=ray", "ray.workers=2")
    local_cfg = _tiny(tmp_path / "local", base_weights, "kron-obs", "finetune.epochs=0")
    ray_job = run_job(ray_cfg, RayBackend(ray_cfg), log=lambda m: None)
    local_job = run_job(local_cfg, LocalBackend(), log=lambda m: None)
    assert ray_job.result.plan.removed == local_job.result.plan.removed
    assert ray_job.metrics["pruned"]["macs"] == local_job.metrics["pruned"]["macs"]
    res = raykfe.load(str(tmp_path / "ray" / "kron-obs"))
    assert res.plan.space == "channels" and res.plan.method == "kron-obs"

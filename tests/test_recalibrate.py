"""BatchNorm recalibration (ALGORITHMS.md section 10): the running statistics become the exact
mean / unbiased variance of each BatchNorm's inputs over the batches (BatchNorms in train mode),
weights, modes, momenta and counters untouched; shards' sums add."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from raykfe.errors import ConfigError
from raykfe.models import build_model
from raykfe.recalibrate import apply_bn_sums, bn_sums, recalibrate

DT = torch.float64


def _batches(n=3, batch=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, dtype=DT, generator=g) * 2 + 1, torch.zeros(batch, dtype=torch.long))
            for _ in range(n)]


def _brute_force(model: nn.Module, batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every BatchNorm's inputs over all batches, concatenated: (mean, unbiased var) per channel."""
    ref = copy.deepcopy(model).eval()
    bns = {n: m for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)}
    seen = {n: [] for n in bns}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen[n].append(inp[0].detach())) for n, m in bns.items()]
    for m in bns.values():
        m.train()
    with torch.no_grad():
        for x, _ in batches:
            ref(x)
    for h in hooks:
        h.remove()
    out = {}
    for n, xs in seen.items():
        flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1)
        out[n] = (flat.mean(dim=1), flat.var(dim=1, unbiased=True))
    return out


def test_recalibration_equals_the_brute_force_statistics_and_touches_nothing_else():
    torch.manual_seed(0)
    model = build_model("resnet8", 10).to(DT)
    model.train()  # the caller's mode is restored, whichever it is
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()  # stale statistics
            m.running_var.uniform_(0.5, 2.0)
            m.momentum = 0.3
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracked = {n: b.clone() for n, b in model.named_buffers() if n.endswith("num_batches_tracked")}
    batches = _batches()
    want = _brute_force(model, batches)
    n = recalibrate(model, batches, n_batches=len(batches))
    assert n == len(want) > 3
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(m.running_mean, want[name][0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(m.running_var, want[name][1], rtol=1e-10, atol=1e-12)
            assert m.momentum == 0.3
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(torch.equal(b, tracked[n]) for n, b in model.named_buffers() if n in tracked)
    assert all(m.training for m in model.modules())


def test_only_the_first_batches_count_and_differs_from_pytorchs_cumulative_average():
    """``n_batches`` caps the pass; PyTorch's ``momentum=None`` averages per-batch variances, which
    misses the spread of the batch means: the exact variance is larger here."""
    torch.manual_seed(1)
    model = build_model("vgg_tiny", 10).to(DT).eval()
    batches = _batches(n=4, seed=3)
    batches = [(x + 3.0 * i, y) for i, (x, y) in enumerate(batches)]  # batch means far apart
    want = _brute_force(model, batches[:2])
    recalibrate(model, batches, n_batches=2)
    cumulative = copy.deepcopy(model)
    for m in cumulative.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    with torch.no_grad():
        for x, _ in batches[:2]:
            cumulative(x)
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    ours, theirs = model.get_submodule(first), cumulative.get_submodule(first)
    torch.testing.assert_close(ours.running_var, want[first][1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-10, atol=1e-12)
    assert bool((ours.running_var > theirs.running_var).all())
    assert float(ours.running_var.sum() / theirs.running_var.sum()) > 1.2


def test_shard_sums_add_up_to_the_single_pass():
    torch.manual_seed(2)
    model = build_model("resnet8", 10).to(DT).eval()
    batches = _batches(n=4, seed=5)
    whole = bn_sums(model, batches)
    a, b = bn_sums(model, batches[:1]), bn_sums(model, batches[1:])
    assert set(whole) == set(a) == set(b)
    for k in whole:
        torch.testing.assert_close(a[k] + b[k], whole[k], rtol=1e-12, atol=1e-9)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    apply_bn_sums(m1, whole)
    apply_bn_sums(m2, {k: a[k] + b[k] for k in whole})
    for (n, x), (_, y) in zip(m1.named_buffers(), m2.named_buffers()):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_a_batch_of_one_is_left_out_not_fatal():
    """A shard's last batch can hold one example; a BatchNorm in train mode cannot normalise one
    value per channel (resnet's last stage is 1x1 on small inputs), so it is left out."""
    torch.manual_seed(4)
    model = build_model("resnet8", 10).to(DT).eval()
    batches = _batches(n=2, size=4, seed=7)  # 1x1 in the last stage
    one = (batches[0][0][:1], batches[0][1][:1])
    want = _brute_force(model, batches)
    recalibrate(model, [batches[0], one, batches[1]], n_batches=3)
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(m.running_mean, want[name][0], rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="at least 2 examples"):
        recalibrate(model, [one], n_batches=1)


def test_errors():
    model = build_model("vgg_tiny", 10)
    with pytest.raises(ConfigError, match="recalibrate_batches=0"):
        recalibrate(model, _batches(1), n_batches=0)
    with pytest.raises(ConfigError, match="no batch"):
        recalibrate(model, [], n_batches=3)


@pytest.mark.ray
def test_recalibration_sums_on_two_ray_workers_equal_the_driver(ray_cluster, tmp_path):
    """``prune.recalibrate_on: workers``: each Train worker sums its shard's BatchNorm inputs and
    the sums are all-reduced; with whole batches per worker (4 batches on 2 workers) the batches
    are the driver's, so the sums are the driver's up to float rounding."""
    from raykfe.backend import JobContext
    from raykfe.checkpoint import ModelRecipe
    from raykfe.config import load_config
    from raykfe.data import job_splits, make_loader
    from raykfe.distributed.backend import RayBackend
    from raykfe.finetune import state_of

    cfg = load_config("jobs/digits.yaml", ["model.name=resnet8", "data.image_size=16", "stats.batch_size=16",
                                           "ray.workers=2", "progress=false", f"output.uri={tmp_path / 'o'}"])
    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    backend = RayBackend(cfg)
    backend.open(JobContext.of(cfg))
    got = backend.measure(ModelRecipe(dict(model.raykfe_spec)), state_of(model), "bn", {"batches": 4})
    want = bn_sums(model, make_loader(job_splits(cfg.data, cfg.seed).train, 16, shuffle=False), {"batches": 4})
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].to(DT), want[k].to(DT), rtol=1e-5, atol=1e-3)
    assert float(want[next(k for k in want if k.endswith("::count"))]) == 4 * 16 * 16 * 16

"""Global selection (raykfe.plan.select): a target is a promise, met or exceeded, never undershot.

* on resnet8 at 16x16 (the API test's model), the achieved reduction counted on the rebuilt model
  is at or above params/flops targets (the default tolerance 0.02 only flags an overshoot).
"""

from __future__ import annotations

import pytest
import torch

import raykfe
from raykfe.models import build_model

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
    summary = res.plan.options["summary"]
    assert summary["achieved"] == pytest.approx(measured, abs=1e-15)
    assert measured >= fraction, f"{target}: achieved {measured:.6f} is below the target"
    assert summary["within_tolerance"] == (measured - fraction <= 0.02)

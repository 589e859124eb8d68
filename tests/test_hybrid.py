"""Hybrid plans: depthwise / grouped convs (no KFE form) lose whole channels with the layers coupled
to them while the other layers lose eigen-directions, in one ranking and one plan."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import raykfe
from raykfe.capture import find_layers
from raykfe.channels import ChannelGraph
from raykfe.hybrid import consumer_scores, hybrid_groups

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def mixed_net() -> nn.Module:
    """stem -> conv_a -> depthwise -> conv_c -> conv_b -> classifier: conv_a's group holds the
    depthwise conv (hybrid: conv_a and conv_c, which reads it, lose channels), stem and conv_b
    are KFE layers, untouched by the hybrid group's widths."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(),
        nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False), nn.BatchNorm2d(48), nn.ReLU(),
        nn.Conv2d(48, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    ).to(DT).eval()


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, dtype=DT, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("mode", ["patch", "full"])
def test_consumer_scores_equal_the_dense_kronecker_quadratic(mode):
    """A unit's score is 1/2 d^T (S (x) A) d summed over the layers that read it, with d the
    consumer's weights of that unit's input channels (zeroed): checked against the explicit
    Kronecker product in W~'s own layout (patch: one copy of S (x) A per kernel offset)."""
    model, batches = mixed_net(), _batches()
    graph = ChannelGraph(model, batches[0][0][:1])
    groups, members, consumers = hybrid_groups(model, graph)
    assert groups == ["3"] and members == {"3", "6", "9"} and consumers == {"9": "3"}
    stats = raykfe.collect_factors(model, batches, conv_mode=mode, layers=list(consumers))
    found, _ = find_layers(model, mode, None)
    got = consumer_scores(graph, groups, found, stats)["3"]
    a, st = found["9"], stats["9"]
    w = a.weight_matrix()
    w3 = w if w.dim() == 3 else w[:, :, None]
    k2 = w3.shape[2]
    F = torch.kron(torch.kron(st.S, st.A), torch.eye(k2, dtype=DT))  # vec of W~ [d_out, d_in, k2], row-major
    want = []
    for unit in range(48):
        cols = [unit] if mode == "patch" else list(range(unit * 9, unit * 9 + 9))
        d = torch.zeros_like(w3)
        d[:, cols] = w3[:, cols]
        want.append(0.5 * float(d.reshape(-1) @ F @ d.reshape(-1)))
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want, dtype=DT), rtol=1e-10, atol=1e-18)


def test_a_hybrid_plan_prunes_both_kinds_exactly_and_reloads(tmp_path):
    model, batches = mixed_net(), _batches()
    x = batches[0][0][:1]
    res = raykfe.prune(model, batches, target="flops:0.6", rank="cost", max_layer_ratio=0.8)
    plan = res.plan
    assert plan.space == "hybrid", plan.space
    assert set(plan.removed) == {"3"} and {"0", "12"} & {n for n, lp in plan.layers.items() if lp.action == "kfe"}
    assert "9" in plan.skipped and "3" in plan.skipped  # channel-space, never in the eigenbasis
    base, new = raykfe.count(model, x), raykfe.count(res.model, x)
    assert (plan.params, plan.macs) == (new.params, new.macs) and 1 - new.macs / base.macs >= 0.6
    kept = 48 - len(plan.removed["3"])
    assert {n: c.kept for n, c in plan.channels.items()} == {"3": kept, "6": kept}  # conv_a and the depthwise conv
    assert res.model[3].out_channels == res.model[6].in_channels == res.model[9].in_channels == kept
    back = raykfe.load(raykfe.save(res, str(tmp_path / "r")), model=model)
    with torch.no_grad():
        torch.testing.assert_close(back.model(batches[1][0]), res.model.eval()(batches[1][0]), rtol=1e-10, atol=1e-12)


def test_hybrid_reaches_what_the_kfe_layers_alone_cannot():
    """Without the hybrid groups EigenDamage leaves the depthwise path dense and refuses a target
    a channel method reaches; with them it meets it, in one step or several."""
    model, batches = mixed_net(), _batches()
    with pytest.raises(raykfe.ConfigError, match="unreachable"):
        raykfe.prune(model, batches, target="flops:0.92", hybrid=False)
    raykfe.prune(model, batches, method="l1", target="flops:0.92")  # a channel method reaches it
    for steps in (1, 2):
        res = raykfe.prune(model, batches, target="flops:0.92", steps=steps)
        x = batches[0][0][:1]
        assert 1 - raykfe.count(res.model, x).macs / raykfe.count(model, x).macs >= 0.92
        c = raykfe.count(res.model, x)
        assert res.plan.removed and (res.plan.params, res.plan.macs) == (c.params, c.macs)


def convnext_like() -> nn.Module:
    """stem -> depthwise -> expand (GELU) -> project -> depthwise -> head -> classifier: the
    expand / project pair sits between two depthwise groups (a ConvNeXt block's MLP), and the
    head's output is read by the classifier only (a MobileNet's last pointwise conv)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 32, 1), nn.GELU(),
        nn.Conv2d(32, 8, 1, bias=False), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).to(DT).eval()


def test_groups_left_with_only_channel_space_layers_lose_channels_too(tmp_path):
    """The expand conv's 32-wide output has only channel-space layers as members: without the rule
    nothing would ever prune it. The head's output is read by the classifier: not added."""
    model, batches = convnext_like(), _batches()
    x = batches[0][0][:1]
    graph = ChannelGraph(model, x)
    assert hybrid_groups(model, graph, closure=False)[0] == ["0", "8"]  # the depthwise groups only
    groups, members, consumers = hybrid_groups(model, graph)
    assert groups == ["0", "6", "8"] and members == {"0", "3", "6", "8", "10", "13"}
    assert consumers == {"6": "0", "8": "6", "13": "8"}
    res = raykfe.prune(model, batches, target="flops:0.6")
    assert res.plan.space == "channels" and "6" in res.plan.removed and "13" not in res.plan.removed
    c = raykfe.count(res.model, x)
    assert (res.plan.params, res.plan.macs) == (c.params, c.macs) and 1 - c.macs / raykfe.count(model, x).macs >= 0.6
    back = raykfe.load(raykfe.save(res, str(tmp_path / "r")), model=model)
    with torch.no_grad():
        torch.testing.assert_close(back.model(batches[1][0]), res.model.eval()(batches[1][0]), rtol=1e-10, atol=1e-12)

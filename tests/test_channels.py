"""Dependency-aware channel surgery (raykfe.channels) on a hand-built model and nine torchvision
architectures (num_classes=10, random weights, float64, eval mode, 1x3x32x32 inputs, BatchNorm
statistics measured on random images then perturbed):

* groups and costs of a toy conv-bn-relu / residual / flatten->Linear model, checked by hand;
* per architecture: the surgery keeps the output shape and ``cost()`` equals ``count()`` of the
  rebuilt model; function preservation (zero the removed channels' parameter slices in the
  ORIGINAL model, then removing them changes nothing, to 1e-8 relative; removing the NEXT unit of
  each group instead must change the outputs, so the check has teeth; ConvNeXt: the MLP hidden
  groups only, see ``exact_groups``); L1 selection meets ``flops:0.5`` within two
  points with the rebuilt model measuring what the summary says; a fresh base model + the removed
  indices + a safetensors round trip of the weights reproduces the pruned model exactly;
* bad input: KFE-only target, unreachable target, unknown names -> one-line ConfigError.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from raykfe.channels import ChannelGraph, apply_channels, channel_layer_fractions
from raykfe.plan import ChannelLayer, Plan, Summary
from raykfe.counting import count
from raykfe.errors import ConfigError
from raykfe.plan import Target
from selection_oracle import all_subsets, check_prefix_rule, mask_of

DT = torch.float64

# One intra-op thread (the repo's conftest fixture): on the 2 shared cores, float64 depthwise
# convs with 2 threads were measured 250x slower (0.77 s vs 3 ms per 7x7 conv call at 8x8).
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0, size: int = 32) -> nn.Module:
    """Non-trivial norm statistics and affine parameters (and ConvNeXt's layer scales, 1e-6 at
    init), so that zeroed or misplaced channels show in the outputs. The BatchNorm statistics are
    first measured on random images, then perturbed: with arbitrary statistics the signal of the
    early layers dies out in eval mode (in efficientnet_b0 the output then moved by 1e-14 when
    the input changed) and a wrong channel would go unnoticed."""
    g = torch.Generator().manual_seed(seed)

    def u(t, lo, hi):
        return (torch.rand(t.shape, generator=g, dtype=t.dtype) * (hi - lo) + lo).to(t)

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: the statistics of this one batch
    model.train()
    model(torch.randn(4, 3, size, size, generator=g, dtype=DT))
    model.eval()
    for m, mom in zip(bns, momenta):
        m.momentum = mom
        m.running_mean.add_(u(m.running_mean, -0.2, 0.2) * m.running_var.sqrt())
        m.running_var.mul_(u(m.running_var, 0.5, 2.0))
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            m.weight.copy_(u(m.weight, 0.5, 1.5))
            m.bias.copy_(u(m.bias, -0.2, 0.2))
        if hasattr(m, "layer_scale"):
            m.layer_scale.copy_(u(m.layer_scale, 0.1, 0.5))
    return model


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).to(DT).eval()
    return randomise(model, seed)


def random_removal(graph: ChannelGraph, rng: np.random.Generator, groups=None) -> dict[str, list[int]]:
    """0..cap random units of each group (some groups untouched)."""
    removed = {}
    for g in groups if groups is not None else graph.groups:
        cap = min(int(0.95 * g.size), g.size - 1)
        k = int(rng.integers(0, cap + 1))
        if k:
            removed[g.name] = sorted(rng.choice(g.size, k, replace=False).tolist())
    return removed


@torch.no_grad()
def zero_channels(model: nn.Module, graph: ChannelGraph, removed) -> None:
    """Zero every "out" slice of the removed units: conv/linear rows and biases, norm scales and
    shifts (including a BatchNorm applied AFTER a concatenation, e.g. DenseNet's pre-activation
    norms: they are "out" members too), per-channel parameters. Each removed channel is then
    exactly zero wherever it appears (BN(0) with zero scale and shift is 0, ReLU/SiLU/GELU(0) = 0,
    sigmoid(0) * 0 = 0, sums of zeros are zero), so the layers that read it get nothing from it."""
    for g in graph.groups:
        units = removed.get(g.name)
        if not units:
            continue
        for m in g.members:
            if m.kind != "out":
                continue
            sel = torch.as_tensor(m.index[np.isin(m.root, units)])
            for p in model.get_submodule(m.module).parameters(recurse=False):
                p[sel] = 0


def exact_groups(model: nn.Module, graph: ChannelGraph):
    """Groups whose removal is exactly function-preserving after zeroing: NOT those with a
    normalisation over channels (LayerNorm/GroupNorm: the zeroed channel still enters the mean and
    variance of the others, so removing it changes them -- ConvNeXt's stream groups)."""
    over_channels = (nn.LayerNorm, nn.GroupNorm)
    return [g for g in graph.groups if not any(isinstance(model.get_submodule(m.module), over_channels) for m in g.members)]


def l1_scores(model: nn.Module, graph: ChannelGraph) -> dict[str, np.ndarray]:
    """Sum |w| of the root's weight rows per unit, divided by the group's mean."""
    scores = {}
    for g in graph.groups:
        w = model.get_submodule(g.name).weight.detach()
        rows = w.abs().reshape(w.shape[0], -1).sum(1).numpy()
        m = g.member(g.name, "out")
        s = np.zeros(g.size)
        np.add.at(s, m.root, rows[m.index])
        scores[g.name] = s / s.mean()
    return scores


def counted(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    c = count(model, x)
    return c.params, c.macs


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-8) -> None:
    scale = max(1.0, float(b.abs().max()))
    diff = float((a - b).abs().max())
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel:g} * {scale:.3g}"


def state_bytes_roundtrip(model: nn.Module) -> dict[str, torch.Tensor]:
    from safetensors.torch import load, save

    return load(save({k: v.detach().contiguous() for k, v in model.state_dict().items()}))


# --------------------------------------------------------------------------------------------
# a model small enough to check by hand
# --------------------------------------------------------------------------------------------


class Toy(nn.Module):
    """conv_a(3->6) bn relu conv_b(6->8, no bias) bn relu = y; relu(bn(conv_c(y)) + y); flatten; Linear."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.conv_c = nn.Conv2d(8, 8, 1)
        self.bn_c = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x))))))
        z = torch.relu(self.bn_c(self.conv_c(y)) + y)
        return self.head(torch.flatten(z, 1))


def toy_cost(ra: int, rb: int) -> tuple[int, int]:
    """Parameters and MACs of Toy at 4x4 after removing ra / rb channels of the two groups."""
    a, b, hw = 6 - ra, 8 - rb, 16
    params = (a * 3 * 9 + a) + 2 * a + b * a * 9 + 2 * b + (b * b + b) + 2 * b + (5 * b * hw + 5)
    macs = hw * a * 27 + hw * b * a * 9 + hw * b * b + 5 * b * hw
    return params, macs


def test_toy_groups_and_costs_by_hand():
    torch.manual_seed(0)
    model = randomise(Toy().to(DT).eval(), size=4)
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    graph = ChannelGraph(model, x)
    assert [g.name for g in graph.groups] == ["conv_a", "conv_b"]
    assert [g.size for g in graph.groups] == [6, 8]
    assert graph.skipped == {"head": graph.skipped["head"]} and "classifier" in graph.skipped["head"]
    ga, gb = graph.groups
    assert {(m.module, m.kind) for m in ga.members} == {("conv_a", "out"), ("bn_a", "out"), ("conv_b", "in")}
    assert {(m.module, m.kind) for m in gb.members} == {
        ("conv_b", "out"), ("bn_b", "out"), ("conv_c", "in"), ("conv_c", "out"), ("bn_c", "out"), ("head", "in"),
    }
    head = gb.member("head", "in")  # flatten: channel c is inputs 16c .. 16c+15 of the Linear
    np.testing.assert_array_equal(head.index, np.arange(128))
    np.testing.assert_array_equal(head.root, np.arange(128) // 16)
    assert (graph.base_params, graph.base_macs) == toy_cost(0, 0) == counted(model, x[:1])
    for ra in range(6):
        for rb in range(8):
            assert graph.cost({"conv_a": ra, "conv_b": rb}) == toy_cost(ra, rb)
    assert channel_layer_fractions(graph, {"conv_b": [1, 2]}) == {"conv_a": (6, 6), "conv_b": (6, 8), "conv_c": (6, 8)}

    removed = {"conv_a": [0, 4], "conv_b": [1, 2, 7]}
    zeroed = copy.deepcopy(model)
    zero_channels(zeroed, graph, removed)
    pruned = apply_channels(zeroed, x, removed)
    assert pruned.conv_a.out_channels == 4 and pruned.conv_b.in_channels == 4 and pruned.conv_b.out_channels == 5
    assert pruned.conv_c.weight.shape == (5, 5, 1, 1) and pruned.head.in_features == 80
    assert counted(pruned, x[:1]) == toy_cost(2, 3)
    with torch.no_grad():
        assert_close_rel(pruned(x), zeroed(x), 1e-12)
    assert zeroed.conv_a.out_channels == 6  # the input model is untouched

    removed, summary = graph.select({"conv_a": np.arange(6.0), "conv_b": np.arange(8.0)[::-1].copy()}, "params:0.3")
    assert summary["achieved"] >= 0.3 and summary["params"] == graph.cost({k: len(v) for k, v in removed.items()})[0]
    # the lowest scores go first: conv_a from channel 0 up, conv_b from channel 7 down
    assert removed.get("conv_a", [])[:1] in ([], [0]) and removed.get("conv_b", [7])[-1] == 7


def test_toy_select_equals_exhaustive_search():
    """ChannelGraph.select on Toy (groups of 6 and 8 channels) for random scores, params and flops
    targets and four caps, against an exhaustive enumeration of the eligible channels with the
    hand-computed toy_cost (property stated in tests/selection_oracle.py): the k lowest-scored
    eligible channels go, k the smallest count meeting the target, achieved >= target."""
    torch.manual_seed(0)
    model = randomise(Toy().to(DT).eval(), size=4)
    graph = ChannelGraph(model, torch.randn(1, 3, 4, 4, dtype=DT))
    base = toy_cost(0, 0)
    checked = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        scores = {"conv_a": rng.random(6), "conv_b": rng.random(8)}
        for ratio in (0.3, 0.5, 0.75, 1.0):
            units = [(g, int(i)) for g, s in scores.items() for i in np.argsort(s)[: max(0, min(int(ratio * s.size), s.size - 1))]]
            unit_scores = np.array([scores[g][i] for g, i in units])
            subsets = all_subsets(len(units))
            ra = subsets[:, [g == "conv_a" for g, _ in units]].sum(axis=1)
            rb = subsets[:, [g == "conv_b" for g, _ in units]].sum(axis=1)
            costs = np.array([toy_cost(int(a), int(b)) for a, b in zip(ra, rb)], dtype=np.float64)
            order = np.argsort(unit_scores)
            for kind, metric in (("params", 0), ("flops", 1)):
                red = 1.0 - costs[:, metric] / base[metric]
                prefix_reds = [float(red[mask_of(order[:j])]) for j in range(len(units) + 1)]
                targets = [float(red[-1] * u) for u in rng.uniform(0.05, 1.0, 3)] + prefix_reds[-1:] + prefix_reds[1:2]
                for fraction in targets:
                    what = f"seed {seed} ratio {ratio} {kind}:{fraction!r}"
                    removed, summary = graph.select(scores, Target(kind, fraction), max_layer_ratio=ratio)
                    cost = toy_cost(len(removed.get("conv_a", [])), len(removed.get("conv_b", [])))
                    achieved = 1.0 - cost[metric] / base[metric]
                    assert (summary["params"], summary["macs"]) == cost and summary["achieved"] == achieved, what
                    assert achieved >= fraction, f"{what}: achieved {achieved:.6f} is below the target"
                    assert summary["within_tolerance"] == (achieved - fraction <= 0.02), what
                    chosen = mask_of(u for u, (g, i) in enumerate(units) if i in removed.get(g, []))
                    assert bin(chosen).count("1") == sum(len(v) for v in removed.values()), f"{what}: removes an ineligible channel"
                    check_prefix_rule(unit_scores, red, chosen, fraction, what)
                    checked += 1
    assert checked == 6 * 4 * 2 * 5


# --------------------------------------------------------------------------------------------
# torchvision architectures
# --------------------------------------------------------------------------------------------

ARCHS = [
    "resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "densenet121", "efficientnet_b0", "regnet_x_400mf",
    "shufflenet_v2_x1_0", "convnext_tiny",
]
#: groups torch-pruning gives / raykfe keeps, for the record (see raykfe.channels' docstring)
MIN_GROUPS = {"convnext_tiny": 22, "shufflenet_v2_x1_0": 18, "regnet_x_400mf": 40}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_architecture(arch):
    t0 = time.perf_counter()
    model = build(arch)
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(1))
    graph = ChannelGraph(model, x)
    assert graph.groups, graph.skipped
    assert len(graph.groups) >= MIN_GROUPS.get(arch, 1)
    assert (graph.base_params, graph.base_macs) == counted(model, x[:1])
    assert any("classifier" in r for r in graph.skipped.values())
    for g in graph.groups:  # every unit has the same number of entries in each member
        for m in g.members:
            assert m.index.size % g.size == 0 and np.all(np.bincount(m.root, minlength=g.size) == m.index.size // g.size)

    # 1 + 2: random removal on a model whose removed channels are zeroed: shapes, cost, function
    rng = np.random.default_rng(0)
    removed = random_removal(graph, rng, exact_groups(model, graph))
    assert removed
    zeroed = copy.deepcopy(model)
    zero_channels(zeroed, graph, removed)
    with torch.no_grad():
        y_zeroed = zeroed(x)
    pruned = apply_channels(zeroed, x, removed)
    with torch.no_grad():
        y_pruned = pruned(x)
        assert torch.equal(zeroed(x), y_zeroed)  # the input model is untouched
    assert y_pruned.shape == y_zeroed.shape == (2, 10)
    assert_close_rel(y_pruned, y_zeroed)
    rel_err = float((y_pruned - y_zeroed).abs().max()) / max(1.0, float(y_zeroed.abs().max()))
    # the check has teeth: removing the NEXT unit of each group instead changes the outputs
    shifted = {n: sorted({(i + 1) % graph.group(n).size for i in v}) for n, v in removed.items()}
    with torch.no_grad():
        wrong = apply_channels(zeroed, x, shifted)(x)
    assert float((wrong - y_zeroed).abs().max()) > 1e4 * 1e-8 * max(1.0, float(y_zeroed.abs().max()))
    counts = {k: len(v) for k, v in removed.items()}
    assert counted(pruned, x[:1]) == graph.cost(counts)
    del zeroed, pruned

    # ... and on ALL groups (ConvNeXt's stream groups too): exact costs, output shape
    if arch == "convnext_tiny":
        removed = random_removal(graph, rng)
        pruned = apply_channels(model, x, removed)
        with torch.no_grad():
            assert pruned(x).shape == (2, 10)
        assert counted(pruned, x[:1]) == graph.cost({k: len(v) for k, v in removed.items()})
        del pruned

    # 3: L1 selection meets flops:0.5 within two points; the rebuilt model measures the summary
    removed, summary = graph.select(l1_scores(model, graph), "flops:0.5")
    assert 0.50 <= summary["achieved"] <= 0.52, summary
    pruned = apply_channels(model, x, removed)
    measured = count(pruned, x[:1])
    assert (measured.params, measured.macs) == (summary["params"], summary["macs"])
    assert summary["achieved"] == pytest.approx(1 - measured.macs / graph.base_macs)
    layers = channel_layer_fractions(graph, removed)
    for name, (kept, before) in layers.items():
        m = pruned.get_submodule(name)
        assert (m.out_features if isinstance(m, nn.Linear) else m.out_channels) == kept
        assert kept >= 1 and before >= kept

    # 4: rebuild from a fresh base model + removed indices + safetensors weights; plan round trip
    plan = Plan(
        method="l1", target="flops:0.5", removed=removed, skipped=dict(graph.skipped), base_params=graph.base_params,
        base_macs=graph.base_macs, params=summary["params"], macs=summary["macs"], input_shape=[3, 32, 32],
        channels={k: ChannelLayer(kept, total) for k, (kept, total) in layers.items()},
        summary=Summary("flops:0.5", summary["achieved"], summary["within_tolerance"], summary["removed_channels"], summary["channels"]),
    )
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.space == "channels"
    fresh = build(arch, seed=7)
    rebuilt = apply_channels(fresh, torch.zeros(1, 3, 32, 32), back.removed)  # float32 example: cast inside
    rebuilt.load_state_dict(state_bytes_roundtrip(pruned))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned(x))
    print(f"\n{arch}: {len(graph.groups)} groups, {len(graph.skipped)} skipped, flops removed "
          f"{summary['achieved']:.4f}, params removed {1 - summary['params'] / graph.base_params:.4f}, "
          f"surgery error {rel_err:.1e}, {time.perf_counter() - t0:.1f} s")


def test_regnet_grouped_convs_are_tied():
    """A unit of a group that reaches a grouped conv is one channel in EVERY conv group, at the
    same position, so each conv group keeps the same width."""
    model = build("regnet_x_400mf")
    x = torch.randn(1, 3, 32, 32, dtype=DT)
    graph = ChannelGraph(model, x)
    name = "trunk_output.block2.block2-0.f.a.0"  # feeds f.b.0: 64 channels in 4 groups of 16
    g = graph.group(name)
    conv_b = model.get_submodule("trunk_output.block2.block2-0.f.b.0")
    assert conv_b.groups == 4 and g.size == 16
    m = g.member(name, "out")
    np.testing.assert_array_equal(m.root, m.index % 16)
    pruned = apply_channels(model, x, {name: [3, 5]})
    b = pruned.get_submodule("trunk_output.block2.block2-0.f.b.0")
    assert b.in_channels == 56 and b.groups == 4 and b.weight.shape[1] == 14
    assert counted(pruned, x) == graph.cost({name: 2})


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_graph():
    model = build("resnet18")
    return model, ChannelGraph(model, torch.randn(1, 3, 32, 32, dtype=DT))


def one_line_error(fn, *words):
    with pytest.raises(ConfigError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_bad_input(resnet18_graph):
    model, graph = resnet18_graph
    scores = l1_scores(model, graph)
    one_line_error(lambda: graph.select(scores, "directions:0.5"), "directions", "flops:F")
    msg = one_line_error(lambda: graph.select(scores, "flops:0.9", max_layer_ratio=0.3), "unreachable", "at most", "max_layer_ratio")
    reach = float(msg.split("at most ")[1].split()[0])
    assert 0.0 < reach < 0.9
    one_line_error(lambda: graph.select(scores, "flops:1.5"), "outside (0, 1)")
    one_line_error(lambda: graph.select(scores, "flops:0.5", max_layer_ratio=0.0), "max_layer_ratio")
    one_line_error(lambda: graph.select({"nope": np.ones(3)}, "flops:0.5"), "'nope'")
    one_line_error(lambda: graph.select({"fc": np.ones(10)}, "flops:0.5"), "'fc'", "classifier")
    one_line_error(lambda: graph.select({"conv1": np.ones(3)}, "flops:0.5"), "conv1", "64")
    one_line_error(lambda: ChannelGraph(model, torch.zeros(1, 3, 32, 32), exclude=["layer9.conv1"]), "prune.exclude", "layer9.conv1")
    one_line_error(lambda: graph.cost({"conv1": 64}), "conv1", "63")
    one_line_error(lambda: apply_channels(model, torch.zeros(1, 3, 32, 32), {"conv1": list(range(64))}), "keep at least one")
    one_line_error(lambda: apply_channels(model, torch.zeros(1, 3, 32, 32), {"conv1": [64]}), "outside")
    one_line_error(lambda: Plan.from_dict({"kind": "convs", "method": "l1", "target": "flops:0.5"}), "kind")
    one_line_error(lambda: graph.select({}, "flops:0.5"), "no channel group is scored")


def test_exclude_and_ties(resnet18_graph):
    model, graph = resnet18_graph
    ex = ChannelGraph(model, torch.zeros(1, 3, 32, 32), exclude=["layer1.0.conv1", "layer2.0.bn1"])
    names = {g.name for g in ex.groups}
    assert "layer1.0.conv1" not in names and "layer2.0.conv1" not in names  # bn1 is coupled with conv1
    assert {g.name for g in graph.groups} - names == {"layer1.0.conv1", "layer2.0.conv1"}
    assert "prune.exclude" in ex.skipped["layer1.0.conv1"] and "layer2.0.bn1" in ex.skipped["layer2.0.conv1"]
    # ties: equal scores are broken by group order then channel, the same every time
    flat = {g.name: np.ones(g.size) for g in graph.groups}
    a, sa = graph.select(flat, "params:0.3")
    b, sb = graph.select(flat, "params:0.3")
    assert a == b and sa == sb and 0.3 <= sa["achieved"] <= 0.32

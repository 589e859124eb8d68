"""Widening as data (raykfe.widen) and the ``raykfe widen`` comparison (raykfe.widen_job).

Invariants: a widened model runs and its groups have exactly the widths asked; the exact channel
cost model predicts its MACs as raykfe.count measures them; widths equal to the base give the base
architecture (same tensors for the same seed); a spec rebuilt from JSON takes the state of the
model it describes and computes the same outputs; groups that cannot widen are refused, named, in
one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from raykfe.channels import ChannelGraph
from raykfe.checkpoint import ModelRecipe
from raykfe.counting import count
from raykfe.errors import ConfigError
from raykfe.models import build_model
from raykfe.widen import (Widths, bottleneck_groups, build_widened, scaled_widths, uniform_widths, widen,
                          widenable_groups, widened_macs, widths_for)

SHAPE = (3, 16, 16)


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(0))


def _graph(model):
    return ChannelGraph(model, torch.zeros(1, *SHAPE))


def _doubled_every_other(model, graph) -> dict[str, int]:
    return {g: 2 * n for i, (g, n) in enumerate(widenable_groups(model, graph).items()) if i % 2 == 0}


@pytest.mark.parametrize("name", ["resnet8", "vgg_tiny", "vgg_small", "mobilenet_small"])
def test_widened_raykfe_model_runs_with_the_widths_and_predicted_macs(name):
    torch.manual_seed(0)
    base = build_model(name, 10)
    graph = _graph(base)
    groups = _doubled_every_other(base, graph)
    assert groups
    w = widths_for(base, SHAPE, groups, graph=graph)
    model = build_model(**w.spec())
    assert model(_x()).shape == (2, 10)
    sizes = {g.name: g.size for g in _graph(model).groups}
    expected = {g.name: groups.get(g.name, g.size) for g in graph.groups}
    assert sizes == expected  # same groups, each at its width
    for g in graph.groups:  # every producer's rows and norm entries, every consumer's columns
        n = expected[g.name]
        for mem in g.members:
            m = model.get_submodule(mem.module)
            mult = mem.index.size // g.size
            grown = mem.index.size + (n - g.size) * mult
            if mem.kind == "out":
                assert m.weight.shape[0] == grown, (mem.module, m.weight.shape)
            else:
                assert m.weight.shape[1] * getattr(m, "groups", 1) == grown, (mem.module, m.weight.shape)
    assert count(model, torch.zeros(1, *SHAPE)).macs == widened_macs(graph, groups)[1]
    assert count(model, torch.zeros(1, *SHAPE)).params == widened_macs(graph, groups)[0]


@pytest.mark.parametrize("name", ["resnet8", "vgg_small", "mobilenet_small"])
def test_every_group_doubled_is_the_architecture_built_at_width_2(name):
    """Widening is not only shape-consistent: it is the architecture the model builds natively."""
    base = build_model(name, 10)
    graph = _graph(base)
    wide = widen(base, torch.zeros(1, *SHAPE), {g: 2 * n for g, n in widenable_groups(base, graph).items()}, graph=graph)
    native = build_model(name, 10, width=2.0)
    a, b = wide.state_dict(), native.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert [repr(m) for m in wide.modules()] == [repr(m) for m in native.modules()]  # groups, strides, features


def test_widths_equal_to_the_base_give_the_base_exactly():
    torch.manual_seed(3)
    base = build_model("resnet8", 10)
    graph = _graph(base)
    same = dict(widenable_groups(base, graph))
    w = widths_for(base, SHAPE, same, graph=graph)
    assert w.groups == {} and w.spec() == base.raykfe_spec
    torch.manual_seed(3)
    rebuilt = build_model(**w.spec())
    a, b = base.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and widen() itself with every group at its size: a copy with the same tensors
    copy_ = widen(base, torch.zeros(1, *SHAPE), same, graph=graph)
    assert copy_ is not base and all(torch.equal(copy_.state_dict()[k], a[k]) for k in a)


def test_spec_round_trip_through_json_gives_identical_state_and_outputs():
    torch.manual_seed(0)
    base = build_model("resnet8", 10)
    graph = _graph(base)
    w = widths_for(base, SHAPE, {"layer3.0.conv1": 96, "conv1": 24}, graph=graph)
    assert Widths.from_json(w.to_json()) == w
    model = build_model(**w.spec())
    with torch.no_grad():  # trained-looking state, BN statistics included
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.train()
    model(_x(8))
    spec = json.loads(json.dumps(model.raykfe_spec))  # what a manifest / ModelRecipe carries
    again = ModelRecipe(spec).build()
    again.load_state_dict(model.state_dict())
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(model(_x()), again(_x()))


def test_widening_is_fresh_initialisation_not_a_copy():
    torch.manual_seed(0)
    base = build_model("vgg_tiny", 10)
    model = widen(base, torch.zeros(1, *SHAPE), {"features.0": 16})
    conv, bn = model.features[0], model.features[1]
    assert conv.weight.shape == (16, 3, 3, 3) and bn.weight.shape == (16,) and bn.running_mean.shape == (16,)
    assert model.features[4].weight.shape[1] == 16  # the consumer's columns
    assert torch.equal(bn.weight, torch.ones(16)) and torch.equal(bn.running_var, torch.ones(16))
    std = float(conv.weight.detach().std())  # Kaiming fan_out: sqrt(2 / (16 * 9)) = 0.118
    assert 0.08 < std < 0.16
    assert base.features[0].weight.shape == (8, 3, 3, 3)  # the base is untouched


@pytest.mark.parametrize("name", ["mobilenet_v2", "regnet_x_400mf"])  # depthwise convs; grouped convs (tied units)
def test_torchvision_models_widen(name):
    torch.manual_seed(0)
    shape = (3, 32, 32)
    base = build_model(name, 10)
    graph = ChannelGraph(base, torch.zeros(1, *shape))
    wide = widenable_groups(base, graph)
    groups = {g: n + n // 2 + 1 for g, n in list(wide.items())[1::4]}
    w = widths_for(base, shape, groups, graph=graph)
    model = build_model(**w.spec())
    assert model.eval()(torch.zeros(2, *shape)).shape == (2, 10)
    sizes = {g.name: g.size for g in ChannelGraph(model, torch.zeros(1, *shape)).groups}
    assert all(sizes[g] == n for g, n in groups.items())
    assert count(model, torch.zeros(1, *shape)).macs == widened_macs(graph, groups)[1]


def test_groups_that_cannot_widen_are_refused_by_name_in_one_line():
    base = build_model("resnet8", 10)
    graph = _graph(base)
    with pytest.raises(ConfigError) as e:
        widths_for(base, SHAPE, {"fc": 20, "input": 6, "conv1": 32}, graph=graph)
    msg = str(e.value)
    assert "\n" not in msg and "'fc'" in msg and "'input'" in msg and "classifier" in msg and "'conv1'" not in msg
    with pytest.raises(ConfigError, match="'layer1.0.conv1'.*>= its 16"):
        widths_for(base, SHAPE, {"layer1.0.conv1": 8}, graph=graph)
    with pytest.raises(ConfigError, match="'conv1'"):
        widths_for(base, SHAPE, {"conv1": True}, graph=graph)


def test_a_groupnorm_that_cannot_divide_the_widened_channels_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    x = torch.zeros(1, *SHAPE)
    with pytest.raises(ConfigError, match="'0'.*GroupNorm 1 has 4 groups"):
        widen(model, x, {"0": 10})
    wide = widen(model, x, {"0": 12, "3": 20})
    assert wide[1].num_channels == 12 and wide[7].in_features == 20 and wide(torch.zeros(2, *SHAPE)).shape == (2, 5)


def test_uniform_widening_matches_the_bottleneck_macs():
    base = build_model("resnet8", 10)
    graph = _graph(base)
    wide = widenable_groups(base, graph)
    flagged, lost = bottleneck_groups(graph, wide, ["avgpool", "layer3.0.conv1", "fc", "layer2.0.conv2"])
    # a layer widens the group of its output channels; the classifier's are the classes
    assert flagged == {"layer2.0.downsample.0": ["layer2.0.conv2"], "layer3.0.conv1": ["layer3.0.conv1"]}
    assert lost == ["avgpool", "fc"]
    bw = scaled_widths(wide, list(flagged), 2.0)
    macs = widened_macs(graph, bw)[1]
    f, uw, u_macs = uniform_widths(graph, wide, macs)
    assert 1.0 < f < 2.0 and set(uw) == set(wide)
    assert abs(u_macs - macs) / macs < 0.02
    step = [widened_macs(graph, scaled_widths(wide, list(wide), f + d))[1] for d in (-0.01, 0.01)]
    assert abs(u_macs - macs) <= min(abs(s - macs) for s in step)  # no nearby factor is closer
    assert uniform_widths(graph, wide, graph.base_macs)[0] == 1.0
    with pytest.raises(ConfigError, match="no uniform widening"):
        uniform_widths(graph, wide, 100 * macs, hi=2.0)


def test_a_spec_for_a_different_base_is_refused():
    base = build_model("resnet8", 10)
    w = widths_for(base, SHAPE, {"conv1": 32})
    bad = dict(w.spec()["widths"], base={**w.base, "conv1": 17})
    with pytest.raises(ConfigError, match="made for another resnet8"):
        build_widened({"name": "resnet8", "num_classes": 10, "width": 1.0}, bad)
    with pytest.raises(ConfigError, match="not valid JSON"):
        Widths.from_json("{")
    with pytest.raises(ConfigError, match="input_shape"):
        Widths.from_dict({"model": {"name": "resnet8"}, "input_shape": [3, 0], "base": {}, "groups": {}})


def test_job_model_widths_must_widen_the_jobs_model(tmp_path):
    from raykfe.config import load_config
    from raykfe.widen import job_model

    w = widths_for(build_model("resnet8", 10), SHAPE, {"conv1": 32})
    (tmp_path / "w.json").write_text(w.to_json())
    cfg = load_config(None, ["model.name=resnet8", f"model.widths={tmp_path / 'w.json'}"])
    assert job_model(cfg, 10).conv1.out_channels == 32
    cfg = load_config(None, ["model.name=vgg_small", f"model.widths={tmp_path / 'w.json'}"])
    with pytest.raises(ConfigError, match="widens resnet8.*not this job's vgg_small"):
        job_model(cfg, 10)
    cfg = load_config(None, ["model.name=resnet8", f"model.widths={tmp_path / 'missing.json'}"])
    with pytest.raises(ConfigError, match="cannot be read"):
        job_model(cfg, 10)


def _tiny(tmp_path, *extra):
    return ["model.name=resnet8", "data.image_size=16", "base.epochs=1", "finetune.epochs=1", "prune.method=l1",
            "prune.target=flops:0.5", "latency.repeats=0", f"output.uri={tmp_path / 'out'}", *extra]


@pytest.mark.slow
def test_widen_command_compares_three_networks_and_rebuilds_them(tmp_path, capsys):
    from raykfe.checkpoint import load, read_file, read_manifest
    from raykfe.cli import main

    assert main(["widen", "-c", "jobs/digits.yaml", "--local", "--quiet", *_tiny(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bottlenecks x2" in out and "uniform x" in out
    uri = str(tmp_path / "out-widen")
    metrics = json.loads(read_file(uri, "metrics.json", read_manifest(uri)))
    rows = metrics["rows"]
    assert set(rows) == {"base", "bottlenecks", "uniform"}
    assert rows["bottlenecks"]["macs"] > rows["base"]["macs"]
    assert abs(rows["uniform"]["macs"] - rows["bottlenecks"]["macs"]) / rows["bottlenecks"]["macs"] < 0.02
    for v in ("bottlenecks", "uniform"):  # every pruned net got to the target
        assert rows[v]["pruned_macs"] <= 0.5 * rows[v]["macs"] * 1.001
        w = Widths.from_json(read_file(uri, f"{v}.widths.json").decode())
        assert w.groups == {g: s[v] for g, s in metrics["groups"].items() if s[v] != s["base"]}
        result = load(f"{uri}/{v}")  # a normal result, rebuilt from its spec (widths) and plan
        assert result.model.raykfe_spec["widths"]["groups"] == w.groups
    report = read_file(uri, "report.md").decode()
    assert "| bottlenecks x2" in report and "Flagged by the plan" in report
    # a second run shows the finished comparison without computing anything
    assert main(["widen", "-c", "jobs/digits.yaml", "--local", "--quiet", *_tiny(tmp_path)]) == 0
    assert "already holds this comparison" in capsys.readouterr().err
    # another job's settings on the same output.uri: refused, nothing written for it
    assert main(["widen", "-c", "jobs/digits.yaml", "--local", "--quiet", *_tiny(tmp_path, "base.epochs=2",
                                                                                  f"widen.uri={tmp_path / 'w2'}")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds the result of a job with other settings" in err and "\n" not in err
    assert not (tmp_path / "w2").exists()


@pytest.mark.parametrize("extra, message", [
    (["widen.factor=0.5"], "widen.factor=0.5 is invalid"),
    (["model.widths=w.json"], "leave model.widths unset"),
    (["widen.uri=SAME"], "is the job's own output.uri"),
])
def test_widen_command_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, extra, message):
    from raykfe.cli import main

    extra = [e.replace("SAME", str(tmp_path / "out")) for e in extra]
    assert main(["widen", "-c", "jobs/digits.yaml", "--local", "--quiet", *_tiny(tmp_path, *extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raykfe: error: ") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.ray
def test_a_widened_recipe_builds_on_a_ray_worker(ray_cluster):
    """Train workers rebuild a job's model from its spec alone (no pickle of the module)."""
    base = build_model("resnet8", 10)
    spec = build_model(**widths_for(base, SHAPE, {"layer3.0.conv1": 80, "conv1": 20}).spec()).raykfe_spec

    @ray_cluster.remote(num_cpus=1)
    def shapes(spec):
        from raykfe.checkpoint import ModelRecipe

        return {k: tuple(v.shape) for k, v in ModelRecipe(spec).build().state_dict().items()}

    local = {k: tuple(v.shape) for k, v in ModelRecipe(spec).build().state_dict().items()}
    assert ray_cluster.get(shapes.remote(spec)) == local
    assert local["layer3.0.conv1.weight"][0] == 80 and local["conv1.weight"][0] == 20

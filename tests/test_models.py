"""Tests for raykfe.models: every registered model builds, structure, torchvision names, specs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from raykfe.errors import ConfigError
from raykfe.models import build_model, list_models


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_list_models_names() -> None:
    names = list_models()
    assert names == sorted(names)
    assert {"vgg19_bn", "vgg_tiny", "vgg_small", "resnet32", "resnet8", "wide_resnet32", "mobilenet_small"} <= set(names)


@pytest.mark.parametrize("name", list_models())
def test_every_model_gives_logits(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 7)


@pytest.mark.parametrize("name", ["vgg_tiny", "vgg_small", "resnet8", "resnet32", "mobilenet_small"])
@pytest.mark.parametrize("size", [8, 16])
def test_adaptive_models_take_small_images(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_vgg_small_structure() -> None:
    model = build_model("vgg_small", 10)
    convs = _convs(model)
    assert [c.out_channels for c in convs] == [32, 32, 64, 96]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    (fc,) = _linears(model)
    assert (fc.in_features, fc.out_features) == (96, 10)


def test_mobilenet_small_structure() -> None:
    model = build_model("mobilenet_small", 10)
    convs = _convs(model)
    depthwise = [c for c in convs if c.groups > 1]
    pointwise = [c for c in convs if c.kernel_size == (1, 1)]
    assert len(convs) == 1 + 2 * 5  # stem + 5 blocks of (depthwise, pointwise)
    assert all(c.groups == c.in_channels == c.out_channels and c.kernel_size == (3, 3) for c in depthwise)
    assert len(depthwise) == len(pointwise) == 5
    assert [c.out_channels for c in pointwise] == [32, 64, 64, 96, 96]
    assert [c.stride for c in depthwise] == [(1, 1), (2, 2), (1, 1), (2, 2), (1, 1)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 11
    (fc,) = _linears(model)
    assert (fc.in_features, fc.out_features) == (96, 10)
    half = build_model("mobilenet_small", 10, width=0.5)
    assert [c.out_channels for c in _convs(half) if c.kernel_size == (1, 1)] == [16, 32, 32, 48, 48]


@pytest.mark.parametrize("name", ["vgg_small", "mobilenet_small"])
@pytest.mark.parametrize("method", ["eigendamage", "l1"])
def test_benchmark_models_prune_at_16x16(name: str, method: str) -> None:
    """The pruned-model quality benchmark (bench/quality.py) prunes these at 16x16, KFE and channels."""
    import raykfe

    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    res = raykfe.prune(model, [(x, y)], method=method, target="flops:0.5")
    base, pruned = raykfe.count(model, x[:1]), raykfe.count(res.model, x[:1])
    assert pruned.macs <= 0.52 * base.macs
    res.model.eval()
    with torch.no_grad():
        assert res.model(x).shape == (32, 10)


def test_resnet32_structure() -> None:
    model = build_model("resnet32", 10)
    convs = _convs(model)
    three_by_three = [c for c in convs if c.kernel_size == (3, 3)]
    one_by_one = [c for c in convs if c.kernel_size == (1, 1)]
    # stem + 3 stages * 5 blocks * 2 convs = 31 3x3 convs; 2 projection shortcuts (stages 2, 3)
    assert len(three_by_three) == 31
    assert len(one_by_one) == 2
    assert len(_linears(model)) == 1  # 31 convs + fc = 32 weight layers
    assert all(c.bias is None for c in convs)
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [5, 5, 5]
    assert model.layer1[0].downsample is None
    assert model.layer2[0].downsample is not None and model.layer3[0].downsample is not None
    assert all(b.downsample is None for s in (model.layer2, model.layer3) for b in s[1:])
    assert model.layer2[0].conv1.stride == (2, 2)
    assert [s[-1].conv2.out_channels for s in (model.layer1, model.layer2, model.layer3)] == [
        16,
        32,
        64,
    ]
    assert model.fc.in_features == 64


def test_resnet32_width4_is_wide_resnet32() -> None:
    wide = build_model("resnet32", 10, width=4)
    assert wide.conv1.out_channels == 64
    stages = (wide.layer1, wide.layer2, wide.layer3)
    stage_widths = [{c.out_channels for c in _convs(stage)} for stage in stages]
    assert stage_widths == [{64}, {128}, {256}]
    assert wide.fc.in_features == 256
    assert _shapes(build_model("wide_resnet32", 10)) == _shapes(wide)


def test_resnet8_has_one_block_per_stage() -> None:
    model = build_model("resnet8", 3)
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [1, 1, 1]
    assert len([c for c in _convs(model) if c.kernel_size == (3, 3)]) == 7


def test_vgg19_bn_structure() -> None:
    model = build_model("vgg19_bn", 100)
    convs = _convs(model)
    assert len(convs) == 16
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 16
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    assert [c.out_channels for c in convs] == [64, 64, 128, 128] + [256] * 4 + [512] * 8
    (fc,) = _linears(model)
    assert (fc.in_features, fc.out_features) == (512, 100)


def test_width_scales_channels() -> None:
    half = build_model("vgg19_bn", 10, width=0.5)
    assert [c.out_channels for c in _convs(half)][:3] == [32, 32, 64]
    assert half.classifier.in_features == 256
    assert half(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    tiny = build_model("vgg_tiny", 10, width=0.01)  # rounds to at least one channel
    assert all(c.out_channels == 1 for c in _convs(tiny))
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_kaiming_init() -> None:
    torch.manual_seed(0)
    model = build_model("vgg19_bn", 10)
    conv = _convs(model)[-1]  # 512 -> 512, 3x3: fan_out = 512 * 9
    expected = (2.0 / (512 * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    bn = model.features[1]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18", "vgg11_bn"])
def test_torchvision_models(name: str) -> None:
    model = build_model(name, 5)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert model.raykfe_spec == {"name": name, "num_classes": 5, "width": 1.0}


def test_torchvision_prefix_overrides_own_name() -> None:
    ours = build_model("vgg19_bn", 10)
    assert len(_linears(ours)) == 1
    # The torchvision VGG has the 3-layer ImageNet classifier; only build a small one.
    tv = build_model("torchvision:vgg11_bn", 10)
    assert len(_linears(tv)) == 3


def test_torchvision_width_rejected() -> None:
    with pytest.raises(ConfigError, match="width"):
        build_model("resnet18", 10, width=2.0)


@pytest.mark.parametrize("name", ["foo", "torchvision:foo", "resnet33"])
def test_unknown_name(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(name, 10)
    msg = str(info.value)
    assert repr(name) in msg
    assert "\n" not in msg
    assert "resnet32" in msg and "torchvision" in msg


@pytest.mark.parametrize(
    "kwargs", [{"num_classes": 0}, {"num_classes": 2.5}, {"width": 0}, {"width": float("nan")}]
)
def test_bad_arguments(kwargs: dict) -> None:
    args = {"name": "resnet8", "num_classes": 10, **kwargs}
    with pytest.raises(ConfigError):
        build_model(**args)


@pytest.mark.parametrize(
    "name, width",
    [("resnet8", 1.0), ("vgg_tiny", 0.5), ("wide_resnet32", 0.25), ("resnet18", 1), ("vgg_small", 1.0),
     ("mobilenet_small", 0.5)],
)
def test_spec_round_trip(name: str, width: float) -> None:
    model = build_model(name, 4, width=width)
    spec = json.loads(json.dumps(model.raykfe_spec))
    assert spec == {"name": name, "num_classes": 4, "width": float(width)}
    rebuilt = build_model(**spec)
    assert _shapes(rebuilt) == _shapes(model)
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.raykfe_spec == model.raykfe_spec

"""Model registry: CIFAR-style networks of our own plus any torchvision classifier.

Tensor layouts
--------------
* Input images: float32 ``[N, 3, H, W]`` (NCHW). The raykfe models are built for CIFAR-sized
  inputs, ``H = W = 32``; ``vgg_tiny``, ``vgg_small``, ``mobilenet_small`` and the ResNets pool
  adaptively and accept other sizes,
  ``vgg19_bn`` needs exactly 32x32 (its 2x2 average pool expects a 2x2 map after 4 max pools).
* Output: logits float32 ``[N, num_classes]``.
* Conv weights ``[C_out, C_in, kH, kW]``, Linear weights ``[out_features, in_features]`` (the
  PyTorch conventions).

Module names follow torchvision so that code walking the graph can treat both alike:

* VGG: ``features`` (``nn.Sequential`` of Conv2d/BatchNorm2d/ReLU/MaxPool2d), ``avgpool``,
  ``classifier`` (one ``nn.Linear``).
* ResNet: ``conv1``, ``bn1``, ``relu``, ``layer1`` .. ``layer3`` (``nn.Sequential`` of
  :class:`BasicBlock` with ``conv1``, ``bn1``, ``relu``, ``conv2``, ``bn2``, ``downsample``),
  ``avgpool``, ``fc``.
* MobileNet-style (:class:`CifarMobileNet`): ``features`` (``nn.Sequential``: the stem
  Conv2d/BatchNorm2d/ReLU, then :class:`DepthwiseSeparable` blocks with ``conv_dw``, ``bn_dw``,
  ``conv_pw``, ``bn_pw``, ``relu``), ``avgpool``, ``classifier`` (one ``nn.Linear``), like
  torchvision's MobileNets.

Names
-----
``vgg19_bn``, ``vgg_tiny``, ``vgg_small``, ``resnet32``, ``resnet8``, ``wide_resnet32``,
``mobilenet_small`` are ours. ``vgg_small`` is a plain conv-BN-ReLU net (4 convs, 2 max pools, last
conv 96 channels) and ``mobilenet_small`` a depthwise-separable one; both pool adaptively, so they
run at any input size from 8x8 up (the pruned-model quality benchmark, ``bench/quality.py``, uses
them at 16x16). Any torchvision
classification model is available as ``torchvision:<name>``, or by its bare name when that name
is not one of ours (so bare ``vgg19_bn`` is the CIFAR network; ``torchvision:vgg19_bn`` is the
ImageNet-style one). Torchvision models are built with ``weights=None`` (random init; nothing is
ever downloaded).

Every built model carries ``model.raykfe_spec = {"name", "num_classes", "width"}`` (and
``"widths"`` for a widened one, :mod:`raykfe.widen`), a plain JSON-serialisable dict such that
``build_model(**model.raykfe_spec)`` rebuilds the architecture.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from raykfe.errors import ConfigError

__all__ = [
    "build_model", "list_models", "BasicBlock", "CifarResNet", "CifarVGG", "DepthwiseSeparable", "CifarMobileNet",
]

TORCHVISION_PREFIX = "torchvision:"

VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512,
)  # fmt: skip
VGG_TINY_CFG: tuple[int | str, ...] = (8, "M", 16, "M", 32, "M", 32)
VGG_SMALL_CFG: tuple[int | str, ...] = (32, 32, "M", 64, "M", 96)
#: mobilenet_small: stem width, then (output channels, stride) of each depthwise-separable block
MOBILENET_SMALL_STEM = 16
MOBILENET_SMALL_BLOCKS: tuple[tuple[int, int], ...] = ((32, 1), (64, 2), (64, 1), (96, 2), (96, 1))


def _scale(channels: int, width: float) -> int:
    """Channel count ``channels * width`` rounded to the nearest integer, at least 1."""
    return max(1, int(round(channels * width)))


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU); BatchNorm weight 1 / bias 0; Linear left default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CifarVGG(nn.Module):
    """VGG with BatchNorm for small images.

    ``cfg`` lists conv output channels (3x3, padding 1, no bias, each followed by BatchNorm2d and
    ReLU) and ``"M"`` for ``MaxPool2d(2)``. ``pool`` is the module between the features and the
    flatten (``AvgPool2d(2)`` for vgg19_bn, ``AdaptiveAvgPool2d(1)`` for vgg_tiny); the feature
    map after it must be 1x1, so the classifier is ``Linear(last_channels, num_classes)``.
    """

    def __init__(
        self, cfg: Sequence[int | str], num_classes: int, *, width: float, pool: nn.Module
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out_ch = _scale(int(item), width)
            layers += [
                nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.avgpool = pool
        self.classifier = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [N, C, h, w]
        x = self.avgpool(x)  # [N, C, 1, 1]
        x = torch.flatten(x, 1)  # [N, C]
        return self.classifier(x)  # [N, num_classes]


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; shortcut = identity, or 1x1 conv + BN when shape changes."""

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu(out)


class CifarResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, section 4.2): 3 stages of ``blocks`` BasicBlocks.

    Stage widths are ``16, 32, 64`` times ``width``; stages 2 and 3 start with stride 2.
    Depth = ``6 * blocks + 2`` (resnet32: blocks=5, resnet8: blocks=1).
    """

    def __init__(self, blocks: int, num_classes: int, *, width: float) -> None:
        super().__init__()
        widths = [_scale(c, width) for c in (16, 32, 64)]
        stem = _scale(16, width)
        self.conv1 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        in_ch = stem
        stages: list[nn.Sequential] = []
        for i, out_ch in enumerate(widths):
            stride = 1 if i == 0 else 2
            layer = []
            for b in range(blocks):
                layer.append(BasicBlock(in_ch, out_ch, stride if b == 0 else 1))
                in_ch = out_ch
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # [N, 16w, H, W]
        x = self.layer1(x)  # [N, 16w, H, W]
        x = self.layer2(x)  # [N, 32w, H/2, W/2]
        x = self.layer3(x)  # [N, 64w, H/4, W/4]
        x = torch.flatten(self.avgpool(x), 1)  # [N, 64w]
        return self.fc(x)  # [N, num_classes]


class DepthwiseSeparable(nn.Module):
    """A depthwise 3x3 conv (``groups = in_ch``, ``stride``) + BN + ReLU, then a pointwise 1x1
    conv (``in_ch -> out_ch``) + BN + ReLU (Howard et al. 2017, MobileNet v1). No conv biases."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False)
        self.bn_dw = nn.BatchNorm2d(in_ch)
        self.conv_pw = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn_dw(self.conv_dw(x)))  # [N, in_ch, H/stride, W/stride]
        return self.relu(self.bn_pw(self.conv_pw(x)))  # [N, out_ch, H/stride, W/stride]


class CifarMobileNet(nn.Module):
    """A small MobileNet-style network: a 3x3 stem conv + BN + ReLU (stride 1), then
    :class:`DepthwiseSeparable` blocks ``(out_channels, stride)``, global average pool, one Linear.

    Channel counts are scaled by ``width``. Only the stem and the pointwise convs have
    ``groups=1``; the depthwise convs follow their input's channels (channel pruning removes them
    with it, KFE pruning leaves them as they are).
    """

    def __init__(
        self, stem: int, blocks: Sequence[tuple[int, int]], num_classes: int, *, width: float
    ) -> None:
        super().__init__()
        in_ch = _scale(stem, width)
        layers: list[nn.Module] = [
            nn.Conv2d(3, in_ch, 3, padding=1, bias=False), nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True),
        ]
        for out, stride in blocks:
            layers.append(DepthwiseSeparable(in_ch, _scale(out, width), stride))
            in_ch = _scale(out, width)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [N, C, H / prod(strides), W / prod(strides)]
        x = torch.flatten(self.avgpool(x), 1)  # [N, C]
        return self.classifier(x)  # [N, num_classes]


_RAYKFE_MODELS: dict[str, Callable[[int, float], nn.Module]] = {
    "vgg19_bn": lambda nc, w: CifarVGG(VGG19_CFG, nc, width=w, pool=nn.AvgPool2d(2)),
    "vgg_tiny": lambda nc, w: CifarVGG(VGG_TINY_CFG, nc, width=w, pool=nn.AdaptiveAvgPool2d(1)),
    "vgg_small": lambda nc, w: CifarVGG(VGG_SMALL_CFG, nc, width=w, pool=nn.AdaptiveAvgPool2d(1)),
    "mobilenet_small": lambda nc, w: CifarMobileNet(MOBILENET_SMALL_STEM, MOBILENET_SMALL_BLOCKS, nc, width=w),
    "resnet32": lambda nc, w: CifarResNet(5, nc, width=w),
    "resnet8": lambda nc, w: CifarResNet(1, nc, width=w),
    "wide_resnet32": lambda nc, w: CifarResNet(5, nc, width=4.0 * w),
}


def list_models() -> list[str]:
    """Names of the raykfe (CIFAR-style) models, sorted. Torchvision names are accepted too."""
    return sorted(_RAYKFE_MODELS)


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _unknown(name: str) -> ConfigError:
    return ConfigError(
        f"unknown model {name!r}: choose one of {', '.join(list_models())} "
        "or any torchvision classification model name (e.g. resnet18, torchvision:vgg11_bn)"
    )


def build_model(
    name: str, num_classes: int, *, width: float = 1.0, image_size: int | None = None, widths: dict | None = None
) -> nn.Module:
    """Build a randomly initialised classifier by name.

    Args:
        name: a name from :func:`list_models`, ``torchvision:<name>``, or a bare torchvision
            classification model name.
        num_classes: number of output logits (>= 1).
        width: channel multiplier for the raykfe models (> 0); must be 1.0 for torchvision ones.
        image_size: the input size, for the torchvision models whose architecture depends on it
            (the VisionTransformers: their position embeddings); recorded in the spec only for
            them, ignored by every other model (they take any size).
        widths: channel groups widened beyond the architecture's own (``{"input_shape", "base",
            "groups"}``, see :mod:`raykfe.widen`): the model is built, then those groups grown,
            freshly initialised. Recorded in the spec, so a widened model rebuilds like any other.

    ``nn.MultiheadAttention`` modules of torchvision models are built as raykfe's
    :class:`raykfe.attention.Attention` (the same function with Linear projections that the
    methods prune; ``nn.MultiheadAttention`` state_dicts, e.g. pretrained weights, still load).

    Returns:
        The model (in train mode) with ``model.raykfe_spec`` set.

    Raises:
        ConfigError: unknown name, bad ``num_classes`` or ``width``, a group ``widths`` cannot widen.
    """
    if widths is not None:
        from .widen import build_widened

        spec = {"name": name, "num_classes": num_classes, "width": width}
        if image_size is not None:
            spec["image_size"] = image_size
        return build_widened(spec, widths)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name must be a non-empty string, got {name!r}: set model.name")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if (
        isinstance(width, bool)
        or not isinstance(width, (int, float))
        or not math.isfinite(width)
        or width <= 0
    ):
        raise ConfigError(f"model width must be a positive number, got {width!r}")
    width = float(width)

    if name in _RAYKFE_MODELS:
        model = _RAYKFE_MODELS[name](num_classes, width)
    else:
        tv_name = name[len(TORCHVISION_PREFIX) :] if name.startswith(TORCHVISION_PREFIX) else name
        if tv_name not in _torchvision_names():
            raise _unknown(name)
        if width != 1.0:
            raise ConfigError(
                f"model {name!r} is a torchvision model and cannot be widened "
                f"(width={width}): set width to 1.0"
            )
        import torchvision

        from .attention import convert_attention

        model = None
        if image_size is not None:
            if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
                raise ConfigError(f"image_size must be a positive integer, got {image_size!r}: set data.image_size")
            try:  # only builders whose architecture depends on the size take it (ViTs)
                model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, image_size=image_size)
            except TypeError:
                image_size = None
        if model is None:
            model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
        convert_attention(model)  # nn.MultiheadAttention -> raykfe's Attention (same function, Linear projections)
    model.raykfe_spec = {"name": name, "num_classes": num_classes, "width": width}
    if image_size is not None and name not in _RAYKFE_MODELS:
        model.raykfe_spec["image_size"] = image_size
    return model

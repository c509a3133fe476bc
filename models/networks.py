"""Networks built from the blocks: the block-comparison backbone, MobileNet v1/v2 and ResNet.

Every network takes ``num_classes``, ``in_channels`` and ``image_size`` from the data config. The
stem follows the input: ``stem="auto"`` uses a stride-1 3x3 stem for CIFAR-size inputs
(``image_size <= 64``) and the paper's strided stem for ImageNet-size inputs.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from .blocks import BLOCKS, InvertedResidual, SeparableBlock, StandardBlock, check_range
from .layers import ConvNormAct, make_divisible

__all__ = ["SMALL_INPUT_MAX", "BlockNet", "MobileNetV1", "MobileNetV2", "ResNet", "UnknownOptionError", "block_options"]

SMALL_INPUT_MAX = 64  # inputs up to this size (CIFAR 32, Fashion-MNIST 28) get the stride-1 stem
STEMS = ("auto", "small", "large")


class UnknownOptionError(ValueError):
    """An option a model does not take; the message lists the ones it does (``valid``)."""

    def __init__(self, owner: str, option: str, valid: Sequence[str]):
        self.owner, self.option, self.valid = owner, option, list(valid)
        super().__init__(f"{owner} has no option {option!r}; valid: {', '.join(self.valid)}")


def block_options(block: type[nn.Module]) -> list[str]:
    """The keyword-only options a block accepts (its constructor is the schema)."""
    params = inspect.signature(block.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _check_block_options(block_name: str, options: dict, network: type[nn.Module]) -> None:
    """Options a network passes on to its blocks; a mistake lists the network's own options as well."""
    valid = block_options(BLOCKS[block_name])
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UnknownOptionError(f"{network.__name__} of {block_name!r} blocks", unknown[0], [*block_options(network), *valid])


def _small_stem(stem: str, image_size: int) -> bool:
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose from: {', '.join(STEMS)}")
    return stem == "small" or (stem == "auto" and image_size <= SMALL_INPUT_MAX)


def _check_common(name: str, num_classes: int, in_channels: int, image_size: int, width: float) -> None:
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: {key}={value!r} must be an int >= 1")
    check_range("width", width, 0.0, 4.0, low_open=True)


def _is_count(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_count(key: str, value: object, what: str) -> int:
    """A channel count: a whole number >= 1, else a ``ValueError`` naming ``key`` (nothing is clamped)."""
    if not _is_count(value):
        problem = "out of range" if isinstance(value, numbers.Integral) and not isinstance(value, bool) else "is not a whole number"
        raise ValueError(f"{key}={value!r} {problem}; valid: a whole number >= 1 ({what})")
    return int(value)


def _check_counts(key: str, values: object, what: str, example: str) -> list[int]:
    """A per-stage list (``widths``, ``depths``, ``strides``): every entry a whole number >= 1, else a ``ValueError``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{key}={values!r} is not a list; valid: one whole number >= 1 per stage ({what}), e.g. {key}={example}")
    for i, value in enumerate(values):
        if not _is_count(value):
            raise ValueError(f"{key}={list(values)!r} has {key}[{i}]={value!r}; valid: whole numbers >= 1 ({what})")
    return [int(v) for v in values]


def _check_input_size(name: str, image_size: int, total_stride: int) -> None:
    if image_size < total_stride:
        raise ValueError(
            f"image_size={image_size} is too small for {name}: its downsampling (total stride {total_stride}) "
            f"needs image_size >= {total_stride}"
        )


def _head(in_ch: int, num_classes: int, dropout: float) -> nn.Sequential:
    check_range("dropout", dropout, 0.0, 1.0)
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(dropout) if dropout else nn.Identity(), nn.Linear(in_ch, num_classes)
    )


def init_weights(model: nn.Module) -> nn.Module:
    """torchvision's initialisation: Kaiming (fan_out) convs, unit norms, N(0, 0.01) classifier."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


class _Network(nn.Module):
    """stem -> blocks -> head; ``total_stride`` is the product of every downsampling step."""

    total_stride: int

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class BlockNet(_Network):
    """The block-comparison backbone: one macro-architecture, the block type is one config value.

    stem (3x3 standard conv) -> stages (``widths`` x ``depths``, the first block of a stage
    strides) -> global pool -> linear. Only the block differs between ``model=standard``,
    ``depthwise``, ``pointwise``, ``separable``, ``inverted_residual``, ``bottleneck``, ``basic``,
    so accuracy and cost compare like with like. ``width`` scales every channel count.
    """

    def __init__(
        self,
        block: str,
        num_classes: int = 10,
        in_channels: int = 3,
        *,
        image_size: int = 32,
        width: float = 1.0,
        stem_width: int = 32,
        widths: Sequence[int] = (32, 64, 128),
        depths: Sequence[int] = (2, 2, 2),
        strides: Sequence[int] = (1, 2, 2),
        stem: str = "auto",
        dropout: float = 0.0,
        **options,
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; choose from: {', '.join(BLOCKS)}")
        _check_common(block, num_classes, in_channels, image_size, width)
        _check_block_options(block, options, type(self))
        stem_width = _check_count("stem_width", stem_width, "channels of the stem conv")
        widths = _check_counts("widths", widths, "output channels of each stage", "[32,64,128]")
        depths = _check_counts("depths", depths, "blocks in each stage", "[2,2,2]")
        strides = _check_counts("strides", strides, "stride of each stage's first block", "[1,2,2]")
        if not len(widths) == len(depths) == len(strides) >= 1:
            raise ValueError(f"widths, depths and strides need one entry per stage; got {list(widths)}, {list(depths)}, {list(strides)}")
        small = _small_stem(stem, image_size)
        self.stem_kind = "small" if small else "large"  # what stem="auto" chose, for cost reports
        ch = max(1, int(stem_width * width))
        # CIFAR-size: 3x3 stride 1; ImageNet-size: 3x3 stride 2 then 3x3 max-pool stride 2 (as ResNet).
        self.stem = nn.Sequential(ConvNormAct(in_channels, ch, 3, 1 if small else 2))
        if not small:
            self.stem.append(nn.MaxPool2d(3, 2, 1))
        stride_product = 1 if small else 4
        layers: list[nn.Module] = []
        for out, depth, stride in zip(widths, depths, strides):
            out = max(1, int(out * width))
            for i in range(depth):
                layers.append(BLOCKS[block](ch, out, stride if i == 0 else 1, **options))
                ch = out
            stride_product *= stride
        self.blocks = nn.Sequential(*layers)
        self.head = _head(ch, num_classes, dropout)
        self.total_stride = stride_product
        _check_input_size(block, image_size, self.total_stride)
        init_weights(self)


class MobileNetV1(_Network):
    """MobileNet v1 exactly as Table 1 of Howard et al. 2017 (arXiv:1704.04861).

    ``width`` is the width multiplier alpha (channels ``max(8, int(c * alpha))``, as the reference
    implementation), ``block="standard"`` replaces every depthwise separable layer by a full 3x3
    convolution (the paper's "Conv MobileNet", Table 4), ``shallow=True`` drops the five
    14x14x512 separable layers (Table 5). Mult-Adds at 224x224: 569M; params 4.2M.
    """

    # (out_channels, stride) for the 13 separable layers after the 3x3 stride-2 stem of 32.
    LAYERS: tuple[tuple[int, int], ...] = (
        (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
        (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),  # the five 14x14x512 layers
        (1024, 2), (1024, 1),
    )  # fmt: skip
    SHALLOW_SKIP = range(6, 11)

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        *,
        image_size: int = 224,
        width: float = 1.0,
        block: str = "separable",
        shallow: bool = False,
        stem: str = "auto",
        dropout: float = 0.0,
        act: str = "relu",
    ) -> None:
        super().__init__()
        _check_common("mobilenet_v1", num_classes, in_channels, image_size, width)
        blocks = {"separable": SeparableBlock, "standard": StandardBlock}
        if block not in blocks:
            raise ValueError(f"unknown mobilenet_v1 block {block!r}; choose from: {', '.join(blocks)}")

        def ch(c: int) -> int:
            return max(8, int(c * width))

        small = _small_stem(stem, image_size)
        self.stem_kind = "small" if small else "large"  # what stem="auto" chose, for cost reports
        in_ch = ch(32)
        self.stem = ConvNormAct(in_channels, in_ch, 3, 1 if small else 2, act=act)
        self.total_stride = 1 if small else 2
        layers = []
        for i, (out, stride) in enumerate(self.LAYERS):
            if shallow and i in self.SHALLOW_SKIP:
                continue
            layers.append(blocks[block](in_ch, ch(out), stride, act=act))
            in_ch = ch(out)
            self.total_stride *= stride
        self.blocks = nn.Sequential(*layers)
        self.head = _head(in_ch, num_classes, dropout)
        _check_input_size("mobilenet_v1", image_size, self.total_stride)
        init_weights(self)


class MobileNetV2(_Network):
    """MobileNetV2 as Sandler et al. 2018 (arXiv:1801.04381), Table 2, laid out as torchvision.

    ``width`` multiplies every channel count (rounded to multiples of 8; the last 1x1 conv keeps
    1280 for widths below 1), ``expansion`` replaces the expansion factor t=6 of the table.
    Mult-Adds at 224x224: 300M; params 3.4M (torchvision: 3,504,872 with BatchNorm).
    """

    # t (expansion), c (channels), n (repeats), s (stride of the first).
    SETTINGS: tuple[tuple[float, int, int, int], ...] = (
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
    )  # fmt: skip

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        *,
        image_size: int = 224,
        width: float = 1.0,
        expansion: float = 6.0,
        stem: str = "auto",
        dropout: float = 0.2,
        act: str = "relu6",
        se_ratio: float = 0.0,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        _check_common("mobilenet_v2", num_classes, in_channels, image_size, width)
        check_range("expansion", expansion, 1, 16)
        small = _small_stem(stem, image_size)
        self.stem_kind = "small" if small else "large"  # what stem="auto" chose, for cost reports
        in_ch = make_divisible(32 * width)
        last_ch = make_divisible(1280 * max(1.0, width))
        self.stem = ConvNormAct(in_channels, in_ch, 3, 1 if small else 2, act=act)
        self.total_stride = 1 if small else 2
        layers: list[nn.Module] = []
        for t, c, n, s in self.SETTINGS:
            out = make_divisible(c * width)
            for i in range(n):
                layers.append(
                    InvertedResidual(
                        in_ch,
                        out,
                        s if i == 0 else 1,
                        expansion=expansion if t != 1 else 1,
                        act=act,
                        se_ratio=se_ratio,
                        kernel_size=kernel_size,
                    )
                )
                in_ch = out
            self.total_stride *= s
        layers.append(ConvNormAct(in_ch, last_ch, 1, act=act))
        self.blocks = nn.Sequential(*layers)
        self.head = _head(last_ch, num_classes, dropout)
        _check_input_size("mobilenet_v2", image_size, self.total_stride)
        init_weights(self)


class ResNet(_Network):
    """ResNet (He et al. 2016, arXiv:1512.03385) with torchvision's layout.

    ImageNet-size stem: 7x7 stride-2 conv + 3x3 stride-2 max-pool; CIFAR-size stem: 3x3 stride-1
    conv, no pool. Four stages of 64/128/256/512 (x4 for bottlenecks) channels, stride 2 from the
    second stage on, on the 3x3 conv of a bottleneck. Block options (``se_ratio``, ``depthwise``,
    ``groups``, ``act``) pass through to every block.
    """

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        *,
        image_size: int = 224,
        width: float = 1.0,
        stem: str = "auto",
        dropout: float = 0.0,
        **options,
    ) -> None:
        super().__init__()
        name = f"resnet ({block})"
        _check_common(name, num_classes, in_channels, image_size, width)
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"unknown resnet block {block!r}; choose from: basic, bottleneck")
        _check_block_options(block, options, type(self))
        layers = _check_counts("layers", layers, "blocks in each stage", "[2,2,2,2]")
        expansion = 4 if block == "bottleneck" else 1
        small = _small_stem(stem, image_size)
        self.stem_kind = "small" if small else "large"  # what stem="auto" chose, for cost reports
        in_ch = max(1, int(64 * width))
        if small:
            self.stem = nn.Sequential(ConvNormAct(in_channels, in_ch, 3, 1))
            self.total_stride = 1
        else:
            self.stem = nn.Sequential(ConvNormAct(in_channels, in_ch, 7, 2), nn.MaxPool2d(3, 2, 1))
            self.total_stride = 4
        stages = []
        for i, depth in enumerate(layers):
            out = max(1, int(64 * 2**i * width)) * expansion
            stride = 1 if i == 0 else 2
            for j in range(depth):
                stages.append(BLOCKS[block](in_ch, out, stride if j == 0 else 1, **options))
                in_ch = out
            self.total_stride *= stride
        self.blocks = nn.Sequential(*stages)
        self.head = _head(in_ch, num_classes, dropout)
        _check_input_size(name, image_size, self.total_stride)
        init_weights(self)

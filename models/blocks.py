"""The blocks convlab compares. Each takes ``(in_ch, out_ch, stride)`` and keyword-only options.

Common options: ``kernel_size`` (odd), ``act`` (relu, relu6, hardswish, silu), ``norm``
(batchnorm or none) and ``se_ratio`` (0 disables squeeze-and-excitation).
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .layers import ConvNormAct, SqueezeExcite, get_act

__all__ = [
    "BLOCKS",
    "BasicBlock",
    "Bottleneck",
    "DepthwiseBlock",
    "InvertedResidual",
    "PointwiseBlock",
    "SeparableBlock",
    "StandardBlock",
    "check_range",
]


def check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``value`` unless ``low <= value <= high`` (``low < value`` when ``low_open``)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    bound = f"{low} {'<' if low_open else '<='} {name} <= {high}"
    if not is_number:
        raise ValueError(f"{name}={value!r} is not a number; valid: {bound}")
    if not ((low < value if low_open else low <= value) and value <= high):
        raise ValueError(f"{name}={value!r} out of range; valid: {bound}")


def _se(channels: int, se_ratio: float, act: str) -> nn.Module:
    check_range("se_ratio", se_ratio, 0.0, 1.0)
    return SqueezeExcite(channels, se_ratio, act=act) if se_ratio > 0 else nn.Identity()


def _shortcut(in_ch: int, out_ch: int, stride: int, norm: str | None) -> nn.Module:
    """Identity when shapes match, else a 1x1 projection (ResNet option B)."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return ConvNormAct(in_ch, out_ch, 1, stride, norm=norm, act=None)


class StandardBlock(nn.Module):
    """Full k x k convolution -> BN -> act: every output channel sees every input channel."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        *,
        kernel_size: int = 3,
        act: str = "relu",
        norm: str | None = "batchnorm",
        se_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_ch, out_ch, kernel_size, stride, norm=norm, act=act)
        self.se = _se(out_ch, se_ratio, act)

    def forward(self, x: Tensor) -> Tensor:
        return self.se(self.conv(x))


class DepthwiseBlock(nn.Module):
    """Depthwise k x k only (no channel mixing); ``out_ch = in_ch * multiplier``."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        *,
        kernel_size: int = 3,
        act: str = "relu",
        norm: str | None = "batchnorm",
        se_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        if out_ch % in_ch:
            raise ValueError(
                f"depthwise block cannot map {in_ch} to {out_ch} channels: out_ch must be a multiple of in_ch (the channel multiplier)"
            )
        self.conv_dw = ConvNormAct(in_ch, out_ch, kernel_size, stride, groups=in_ch, norm=norm, act=act)
        self.se = _se(out_ch, se_ratio, act)

    def forward(self, x: Tensor) -> Tensor:
        return self.se(self.conv_dw(x))


class PointwiseBlock(nn.Module):
    """1x1 convolution only (channel mixing, no spatial mixing)."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int = 1, *, act: str = "relu", norm: str | None = "batchnorm", se_ratio: float = 0.0
    ) -> None:
        super().__init__()
        self.conv_pw = ConvNormAct(in_ch, out_ch, 1, stride, norm=norm, act=act)
        self.se = _se(out_ch, se_ratio, act)

    def forward(self, x: Tensor) -> Tensor:
        return self.se(self.conv_pw(x))


class SeparableBlock(nn.Module):
    """Depthwise separable convolution (MobileNets, arXiv:1704.04861, Fig. 3).

    Depthwise k x k -> BN -> act, then pointwise 1x1 -> BN -> act. Costs
    ``k^2 C H W + C K H W`` multiply-adds against ``k^2 C K H W`` for a standard conv: a ratio of
    ``1/K + 1/k^2``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        *,
        kernel_size: int = 3,
        act: str = "relu",
        norm: str | None = "batchnorm",
        se_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv_dw = ConvNormAct(in_ch, in_ch, kernel_size, stride, groups=in_ch, norm=norm, act=act)
        self.se = _se(in_ch, se_ratio, act)
        self.conv_pw = ConvNormAct(in_ch, out_ch, 1, norm=norm, act=act)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_pw(self.se(self.conv_dw(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual (arXiv:1801.04381, Table 1).

    1x1 expand to ``round(in_ch * expansion)`` -> depthwise k x k -> linear 1x1 projection (no
    activation); identity skip when ``stride == 1 and in_ch == out_ch``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        *,
        expansion: float = 6.0,
        kernel_size: int = 3,
        act: str = "relu6",
        norm: str | None = "batchnorm",
        se_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        check_range("expansion", expansion, 1, 16)
        mid_ch = round(in_ch * expansion)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.conv_pw = ConvNormAct(in_ch, mid_ch, 1, norm=norm, act=act) if mid_ch != in_ch else nn.Identity()
        self.conv_dw = ConvNormAct(mid_ch, mid_ch, kernel_size, stride, groups=mid_ch, norm=norm, act=act)
        self.se = _se(mid_ch, se_ratio, act)
        self.conv_pwl = ConvNormAct(mid_ch, out_ch, 1, norm=norm, act=None)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
        return x + y if self.has_skip else y


class Bottleneck(nn.Module):
    """ResNet bottleneck (arXiv:1512.03385, Fig. 5), stride on the 3x3 as torchvision (ResNet v1.5).

    1x1 reduce to ``out_ch / expansion`` -> k x k (``depthwise=True`` makes it depthwise, ``groups``
    grouped) -> 1x1 expand to ``out_ch`` without activation -> optional SE -> add the shortcut
    (projection when the shape changes) -> act.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        *,
        expansion: int = 4,
        groups: int = 1,
        depthwise: bool = False,
        kernel_size: int = 3,
        act: str = "relu",
        norm: str | None = "batchnorm",
        se_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        check_range("expansion", expansion, 1, 16)
        if expansion != int(expansion):  # out_ch // int(1.5) silently built expansion 1
            raise ValueError(f"bottleneck expansion={expansion} must be a whole number (out/mid channel ratio), e.g. 4")
        mid_ch = out_ch // int(expansion)
        if mid_ch < 1:
            raise ValueError(f"bottleneck out_ch={out_ch} is too narrow for expansion={expansion}; need out_ch >= expansion")
        groups = mid_ch if depthwise else groups
        self.conv1 = ConvNormAct(in_ch, mid_ch, 1, norm=norm, act=act)
        self.conv2 = ConvNormAct(mid_ch, mid_ch, kernel_size, stride, groups=groups, norm=norm, act=act)
        self.conv3 = ConvNormAct(mid_ch, out_ch, 1, norm=norm, act=None)
        self.se = _se(out_ch, se_ratio, act)
        self.shortcut = _shortcut(in_ch, out_ch, stride, norm)
        self.act = get_act(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.se(self.conv3(self.conv2(self.conv1(x)))) + self.shortcut(x))


class BasicBlock(nn.Module):
    """ResNet basic block (arXiv:1512.03385, Fig. 2): k x k -> k x k (no act) -> add shortcut -> act."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        *,
        kernel_size: int = 3,
        act: str = "relu",
        norm: str | None = "batchnorm",
        se_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_ch, out_ch, kernel_size, stride, norm=norm, act=act)
        self.conv2 = ConvNormAct(out_ch, out_ch, kernel_size, norm=norm, act=None)
        self.se = _se(out_ch, se_ratio, act)
        self.shortcut = _shortcut(in_ch, out_ch, stride, norm)
        self.act = get_act(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.se(self.conv2(self.conv1(x))) + self.shortcut(x))


BLOCKS: dict[str, type[nn.Module]] = {
    "standard": StandardBlock,
    "depthwise": DepthwiseBlock,
    "pointwise": PointwiseBlock,
    "separable": SeparableBlock,
    "inverted_residual": InvertedResidual,
    "bottleneck": Bottleneck,
    "basic": BasicBlock,
}

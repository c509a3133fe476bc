"""Layers: the conv primitives every block is made of, and string -> module resolution."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor

from .functional import pointwise_conv2d

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "POINTWISE_IMPLS",
    "ConvNormAct",
    "DepthwiseConv2d",
    "PointwiseConv2d",
    "SqueezeExcite",
    "get_act",
    "get_norm",
    "make_divisible",
    "set_pointwise_impl",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "hardswish": lambda: nn.Hardswish(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
}
NORMS: dict[str, Callable[[int], nn.Module]] = {"batchnorm": nn.BatchNorm2d}
POINTWISE_IMPLS = ("torch", "scratch")


def _choice(kind: str, value: object, choices: dict) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose from: {', '.join(choices)}, none")


def get_act(name: str | None) -> nn.Module:
    """Activation module by config name (``relu``, ``relu6``, ``hardswish``, ``silu``); ``None``/``"none"`` is identity."""
    if name is None or name == "none":
        return nn.Identity()
    _choice("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]()


def get_norm(name: str | None, channels: int) -> nn.Module:
    """Norm module by config name (``batchnorm``); ``None``/``"none"`` is identity."""
    if name is None or name == "none":
        return nn.Identity()
    _choice("norm", name, NORMS)
    return NORMS[name](channels)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a scaled channel count to a multiple of ``divisor`` without losing more than 10% (MobileNetV2)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class PointwiseConv2d(nn.Conv2d):
    """1x1 convolution (a per-pixel linear layer over channels).

    Holds an ``nn.Conv2d`` weight ``(out, in/groups, 1, 1)``, so checkpoints and cost accounting
    treat it as any conv; ``impl`` picks the arithmetic: ``"torch"`` runs torch's convolution,
    ``"scratch"`` runs convlab's :func:`models.pointwise_conv2d` (one matrix product).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, *, groups: int = 1, bias: bool = True, impl: str = "torch") -> None:
        super().__init__(in_ch, out_ch, 1, stride=stride, padding=0, groups=groups, bias=bias)
        self.impl = impl

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in POINTWISE_IMPLS:
            raise ValueError(f"unknown pointwise_impl {value!r}; choose from: {', '.join(POINTWISE_IMPLS)}")
        self._impl = value

    def forward(self, x: Tensor) -> Tensor:
        if self._impl == "scratch":
            return pointwise_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.groups)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self._impl}"


class DepthwiseConv2d(nn.Conv2d):
    """k x k depthwise convolution: each input channel gets its own ``multiplier`` filters (groups = channels).

    Under bf16 autocast on CPU a *strided* depthwise conv runs in fp32: oneDNN's bf16 kernel for
    its backward pass was 3-7x slower than the fp32 one on an AVX512-BF16 CPU (e.g. 152 ms vs
    42 ms for 128x192x28x28 channels_last, forward + backward), while stride-1 depthwise convs
    are faster in bf16 and stay there. The numbers are the same up to bf16 rounding.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.stride != (1, 1)
            and x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
        ):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)

    def __init__(
        self, channels: int, kernel_size: int = 3, stride: int = 1, *, multiplier: int = 1, dilation: int = 1, bias: bool = True
    ) -> None:
        if not isinstance(multiplier, int) or multiplier < 1:
            raise ValueError(f"depthwise channel multiplier={multiplier!r} must be an int >= 1")
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            channels, channels * multiplier, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=channels, bias=bias
        )


def _check_kernel(kernel_size: int) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size!r} must be an odd int >= 1 (1, 3, 5, 7, ...)")


class ConvNormAct(nn.Sequential):
    """conv -> norm -> activation, like torchvision's ``Conv2dNormActivation``.

    The conv is a :class:`PointwiseConv2d` when ``kernel_size == 1``, a :class:`DepthwiseConv2d`
    when ``groups == in_ch > 1`` (``out_ch = in_ch * multiplier``), else ``nn.Conv2d``. ``norm=None`` drops the
    norm (and the conv gets a bias), ``act=None`` drops the activation (a linear projection).
    Padding keeps ``H_out = ceil(H / stride)``: ``(k - 1) // 2 * dilation``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        groups: int = 1,
        dilation: int = 1,
        norm: str | None = "batchnorm",
        act: str | None = "relu",
    ) -> None:
        _check_kernel(kernel_size)
        for name, value in (("in_ch", in_ch), ("out_ch", out_ch), ("stride", stride), ("groups", groups)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"groups={groups} must divide in_ch={in_ch} and out_ch={out_ch}")
        bias = norm is None or norm == "none"
        if kernel_size == 1:
            conv: nn.Conv2d = PointwiseConv2d(in_ch, out_ch, stride, groups=groups, bias=bias)
        elif groups == in_ch > 1:
            conv = DepthwiseConv2d(in_ch, kernel_size, stride, multiplier=out_ch // in_ch, dilation=dilation, bias=bias)
        else:
            padding = (kernel_size - 1) // 2 * dilation
            conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=bias)
        super().__init__()
        self.conv = conv
        self.bn = get_norm(norm, out_ch)
        self.act = get_act(act)
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride


SE_GATES: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018, arXiv:1709.01507) made of two pointwise convs.

    Global average pool -> 1x1 reduce to ``round(channels * se_ratio)`` -> act -> 1x1 expand ->
    gate -> rescale the input channels.
    """

    def __init__(self, channels: int, se_ratio: float = 0.25, *, act: str = "relu", gate: str = "sigmoid") -> None:
        super().__init__()
        if not 0.0 < se_ratio <= 1.0:
            raise ValueError(f"se_ratio={se_ratio!r} out of range; valid: 0 < se_ratio <= 1 (0 disables SE)")
        rd_ch = max(1, round(channels * se_ratio))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce = PointwiseConv2d(channels, rd_ch)
        self.act = get_act(act)
        self.conv_expand = PointwiseConv2d(rd_ch, channels)
        if gate not in SE_GATES:
            raise ValueError(f"unknown SE gate {gate!r}; choose from: {', '.join(SE_GATES)}")
        self.gate = SE_GATES[gate]()

    def forward(self, x: Tensor) -> Tensor:
        s = self.pool(x)  # (N, C, 1, 1)
        s = self.conv_expand(self.act(self.conv_reduce(s)))
        return x * self.gate(s)


def set_pointwise_impl(model: nn.Module, impl: str) -> nn.Module:
    """Switch every :class:`PointwiseConv2d` in ``model`` to ``impl`` (``"torch"`` or ``"scratch"``)."""
    if impl not in POINTWISE_IMPLS:
        raise ValueError(f"unknown pointwise_impl {impl!r}; choose from: {', '.join(POINTWISE_IMPLS)}")
    for module in model.modules():
        if isinstance(module, PointwiseConv2d):
            module.impl = impl
    return model

"""Blocks: shapes, gradients, skips, and multiply-adds equal to the closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from experiments.cost import measure_cost
from models import BLOCKS, ConvNormAct, DepthwiseConv2d, InvertedResidual, PointwiseConv2d, SqueezeExcite

CASES = [(16, 32, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2)]


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize(("in_ch", "out_ch", "stride"), CASES)
def test_block_forward_backward_shapes(name, in_ch, out_ch, stride):
    block = BLOCKS[name](in_ch, out_ch, stride)
    x = torch.randn(2, in_ch, 9, 9, requires_grad=True)
    y = block(x)
    assert y.shape == (2, out_ch, math.ceil(9 / stride), math.ceil(9 / stride))
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in block.parameters() if p.requires_grad)


def test_squeeze_excite_gates():
    assert isinstance(SqueezeExcite(8, gate="hardsigmoid").gate, nn.Hardsigmoid)
    assert isinstance(SqueezeExcite(8).gate, nn.Sigmoid)
    with pytest.raises(ValueError, match="unknown SE gate 'relu'; choose from: sigmoid, hardsigmoid"):
        SqueezeExcite(8, gate="relu")  # was a sigmoid, silently


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize(
    "options", [{"act": "hardswish"}, {"act": "silu", "se_ratio": 0.25}, {"norm": "none", "act": "relu6"}, {"kernel_size": 5}]
)
def test_block_options(name, options):
    if name == "pointwise":
        options = {k: v for k, v in options.items() if k != "kernel_size"}
    block = BLOCKS[name](16, 32, 2, **options)
    assert block(torch.randn(1, 16, 8, 8)).shape == (1, 32, 4, 4)
    if options.get("se_ratio"):
        assert any(isinstance(m, SqueezeExcite) for m in block.modules())
    if options.get("norm") == "none":
        assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    if "kernel_size" in options:
        assert any(getattr(m, "kernel_size", None) == (5, 5) for m in block.modules())


def test_inverted_residual_skip_rule():
    assert InvertedResidual(16, 16, 1).has_skip
    assert not InvertedResidual(16, 16, 2).has_skip
    assert not InvertedResidual(16, 24, 1).has_skip
    block = InvertedResidual(8, 8, 1).eval()
    for m in block.modules():  # zero the projection: a skip block becomes the identity
        if isinstance(m, nn.BatchNorm2d):
            nn.init.zeros_(m.weight)
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(block(x), x)


def test_bottleneck_depthwise_option_and_projection():
    block = BLOCKS["bottleneck"](64, 256, 2, depthwise=True)
    assert block.conv2.conv.groups == 64 and isinstance(block.conv2.conv, DepthwiseConv2d)
    assert isinstance(block.shortcut, ConvNormAct) and block.shortcut.stride == 2
    assert isinstance(BLOCKS["bottleneck"](256, 256, 1).shortcut, nn.Identity)


def test_depthwise_block_rejects_non_multiple_channels():
    with pytest.raises(ValueError, match="multiple of in_ch"):
        BLOCKS["depthwise"](16, 24, 1)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: BLOCKS["separable"](8, 8, 1, act="gelu"), "unknown activation 'gelu'"),
        (lambda: BLOCKS["separable"](8, 8, 1, norm="layernorm"), "unknown norm 'layernorm'"),
        (lambda: BLOCKS["standard"](8, 8, 1, kernel_size=4), "kernel_size=4"),
        (lambda: BLOCKS["standard"](8, 8, 1, se_ratio=1.5), "se_ratio=1.5 out of range"),
        (lambda: BLOCKS["inverted_residual"](8, 8, 1, expansion=0.5), "expansion=0.5 out of range"),
        (lambda: BLOCKS["bottleneck"](8, 2, 1), "too narrow"),
        (lambda: BLOCKS["standard"](8, 0, 1), "out_ch=0"),
    ],
)
def test_bad_options_raise_value_error(factory, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        factory()


# Closed forms, measured with fvcore on single layers at H x W = 14 x 14.
H = W = 14


def _macs(module: nn.Module, channels: int, size: int = H) -> int:
    return measure_cost(module, (1, channels, size, size))["macs"]


@pytest.mark.parametrize(("k", "c_in", "c_out"), [(3, 16, 32), (5, 8, 24), (7, 3, 64)])
def test_standard_conv_macs_closed_form(k, c_in, c_out):
    layer = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)
    assert _macs(layer, c_in) == k * k * c_in * c_out * H * W


@pytest.mark.parametrize(("k", "c", "multiplier"), [(3, 32, 1), (5, 16, 1), (3, 8, 2)])
def test_depthwise_conv_macs_closed_form(k, c, multiplier):
    layer = DepthwiseConv2d(c, k, multiplier=multiplier)
    assert _macs(layer, c) == k * k * c * multiplier * H * W


@pytest.mark.parametrize("impl", ["torch", "scratch"])
@pytest.mark.parametrize(("c_in", "c_out"), [(16, 32), (64, 64), (3, 100)])
def test_pointwise_conv_macs_closed_form(impl, c_in, c_out):
    layer = PointwiseConv2d(c_in, c_out, impl=impl)
    assert _macs(layer, c_in) == c_in * c_out * H * W


@pytest.mark.parametrize(("k", "c", "n"), [(3, 32, 64), (3, 512, 512), (5, 64, 128), (7, 16, 16)])
def test_separable_over_standard_is_one_over_n_plus_one_over_k2(k, c, n):
    """MobileNets eq. (5): (k^2 C HW + C N HW) / (k^2 C N HW) = 1/N + 1/k^2, on the real blocks."""
    separable = BLOCKS["separable"](c, n, 1, kernel_size=k)
    standard = BLOCKS["standard"](c, n, 1, kernel_size=k)
    ratio = _macs(separable, c) / _macs(standard, c)
    assert ratio == pytest.approx(1 / n + 1 / k**2, rel=1e-12)


def test_strided_depthwise_runs_fp32_under_cpu_bf16_autocast():
    """The fast path: same numbers (to bf16 rounding), fp32 output for strided depthwise, bf16 for stride 1."""
    x = torch.randn(2, 8, 9, 9)
    for stride, dtype in ((2, torch.float32), (1, torch.bfloat16)):
        layer = DepthwiseConv2d(8, 3, stride)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), layer(x), rtol=2e-2, atol=2e-2)


def test_bottleneck_expansion_must_be_whole():
    """out_ch // int(1.5) built expansion 1 from the Python API, silently (the CLI refused it)."""
    from models.blocks import Bottleneck

    with pytest.raises(ValueError, match=r"expansion=1\.5 must be a whole number"):
        Bottleneck(64, 96, 1, expansion=1.5)
    assert Bottleneck(64, 96, 1, expansion=2.0).conv1.conv.out_channels == 48

"""Property-based: block and network options that the documented rules allow build a model with the formula's
output shape; options those rules forbid raise ValueError naming the bad value."""

from __future__ import annotations

import itertools
import math

import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from models import BLOCKS, build_model, list_models


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy, one_in: int = 10) -> st.SearchStrategy:
    """An invalid value about one draw in ``one_in``, so many examples build a model and the shape check runs."""
    return st.integers(1, one_in).flatmap(lambda i: invalid if i == one_in else valid)


ACTS = mostly(st.sampled_from(["relu", "relu6", "hardswish", "silu", None]), st.just("gelu"))
NORMS = mostly(st.sampled_from(["batchnorm", "none"]), st.just("layernorm"))
RATIOS = mostly(st.one_of(st.just(0.0), st.floats(0.01, 1.0)), st.one_of(st.floats(-1.0, -0.01), st.floats(1.01, 3.0)))
KERNELS = mostly(st.sampled_from([1, 3, 5, 7]), st.sampled_from([0, 2, 4, -1]))
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _option_problems(options: dict) -> list[str]:
    """Text a ValueError must contain for each option the docs rule out (models/blocks.py, models/layers.py)."""
    problems = []
    if options.get("act") not in ("relu", "relu6", "hardswish", "silu", "none", None):
        problems.append(repr(options["act"]))
    if options.get("norm") not in ("batchnorm", "none", None):
        problems.append(repr(options["norm"]))
    if not 0.0 <= options.get("se_ratio", 0.0) <= 1.0:
        problems.append("se_ratio=")
    kernel = options.get("kernel_size", 3)
    if kernel < 1 or kernel % 2 == 0:  # odd sizes only: padding (k - 1) // 2 keeps H_out = ceil(H / stride)
        problems.append("kernel_size=")
    if not 1 <= options.get("expansion", 1) <= 16:
        problems.append("expansion=")
    return problems


def block_problems(name: str, in_ch: int, out_ch: int, options: dict) -> list[str]:
    """Why these block arguments are invalid, as text the ValueError must contain; empty when they are valid."""
    problems = _option_problems(options)
    if name == "depthwise" and out_ch % in_ch:  # out_ch = in_ch x channel multiplier
        problems.append(f"cannot map {in_ch} to {out_ch}")
    if name == "bottleneck" and 1 <= options["expansion"] <= 16:
        mid_ch = out_ch // options["expansion"]  # 1x1 reduce to out_ch / expansion
        if mid_ch < 1:
            problems.append("too narrow")
        elif not options["depthwise"] and mid_ch % options["groups"]:
            problems.append(f"groups={options['groups']}")
    return problems


@st.composite
def block_options(draw):
    name = draw(st.sampled_from(sorted(BLOCKS)))
    options = {"act": draw(ACTS), "norm": draw(NORMS), "se_ratio": draw(RATIOS)}
    if name != "pointwise":
        options["kernel_size"] = draw(KERNELS)
    if name == "inverted_residual":
        options["expansion"] = draw(mostly(st.floats(1.0, 8.0), st.one_of(st.floats(0.0, 0.99), st.integers(17, 40))))
    if name == "bottleneck":
        options["expansion"] = draw(mostly(st.integers(1, 4), st.integers(-1, 0)))
        options["depthwise"] = draw(st.booleans())
        options["groups"] = draw(mostly(st.just(1), st.integers(2, 6)))
    return name, options


def _bottleneck(expansion: int = 4, groups: int = 1, depthwise: bool = False, **options) -> tuple[str, dict]:
    return "bottleneck", {"act": "relu", "norm": "batchnorm", "se_ratio": 0.0, "kernel_size": 3, "expansion": expansion,
                          "depthwise": depthwise, "groups": groups, **options}  # fmt: skip


@SETTINGS
@given(block_options(), st.integers(1, 24), st.integers(1, 24), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9))
@example(("depthwise", {"act": None, "norm": "batchnorm", "se_ratio": 0.25, "kernel_size": 5}), 4, 12, 2, 9, 7)
@example(("depthwise", {"act": None, "norm": "batchnorm", "se_ratio": 0.0, "kernel_size": 3}), 8, 12, 1, 5, 5)
@example(("inverted_residual", {"act": "hardswish", "norm": "none", "se_ratio": 0.5, "kernel_size": 3, "expansion": 2.5}), 6, 6, 1, 4, 4)
@example(("separable", {"act": "relu6", "norm": "batchnorm", "se_ratio": 0.0, "kernel_size": 7}), 3, 16, 3, 7, 2)
@example(("standard", {"act": "relu", "norm": "batchnorm", "se_ratio": 0.0, "kernel_size": 4}), 3, 16, 1, 8, 8)
@example(_bottleneck(groups=3), 16, 24, 2, 8, 8)  # mid 6: 3 groups of 2
@example(_bottleneck(groups=4), 16, 24, 1, 8, 8)  # mid 6: 4 groups do not divide it
@example(_bottleneck(expansion=4, depthwise=True, groups=5), 8, 20, 1, 3, 3)  # depthwise overrides groups
@example(_bottleneck(expansion=4), 8, 3, 1, 3, 3)  # out 3 < expansion 4
@example(("basic", {"act": "gelu", "norm": "batchnorm", "se_ratio": 0.0, "kernel_size": 3}), 8, 8, 1, 4, 4)
@example(("pointwise", {"act": "silu", "norm": "layernorm", "se_ratio": 0.0}), 8, 8, 1, 4, 4)
@example(("pointwise", {"act": "silu", "norm": "none", "se_ratio": 1.5}), 8, 8, 1, 4, 4)
def test_block_builds_with_formula_shape_or_raises_value_error(spec, in_ch, out_ch, stride, h, w):
    name, options = spec
    problems = block_problems(name, in_ch, out_ch, options)
    kwargs = {k: v for k, v in options.items() if v is not None}
    if problems:
        event(f"invalid: {problems[0]}")
        try:
            BLOCKS[name](in_ch, out_ch, stride, **kwargs)
        except ValueError as ex:
            assert any(p in str(ex) for p in problems), (problems, str(ex))
        else:
            raise AssertionError(f"{name}({in_ch}, {out_ch}, {stride}, {kwargs}) built despite {problems}")
        return
    event(f"built: {name}")
    block = BLOCKS[name](in_ch, out_ch, stride, **kwargs)
    y = block.eval()(torch.randn(2, in_ch, h, w))
    assert y.shape == (2, out_ch, math.ceil(h / stride), math.ceil(w / stride))


WIDTHS = mostly(st.floats(0.05, 1.25), st.one_of(st.floats(4.01, 50.0), st.floats(-2.0, 0.0)))
BLOCKNET_STRIDE = 1 * 2 * 2  # BlockNet's stage strides (1, 2, 2)
# The models' downsampling after a stride-1 stem, and the extra factor of their ImageNet-size stem.
TOTAL_STRIDE = {**{name: (BLOCKNET_STRIDE, 4) for name in BLOCKS}, "mobilenet_v1": (16, 2), "mobilenet_v2": (16, 2),
                "resnet18": (8, 4), "resnet50": (8, 4)}  # fmt: skip


def expected_total_stride(name: str, options: dict) -> int:
    small = options["stem"] == "small" or (options["stem"] == "auto" and options["image_size"] <= 64)
    body, large_stem = TOTAL_STRIDE[name]
    return body if small else body * large_stem


def network_problems(name: str, options: dict) -> list[str]:
    """Why these network options are invalid, as text the ValueError must contain; empty when they are valid."""
    problems = _option_problems(options)
    width = options["width"]
    if not 0 < width <= 4:
        return [*problems, "width="]
    if options["stem"] not in ("auto", "small", "large"):
        return [*problems, repr(options["stem"])]

    def scaled(c: int) -> int:  # BlockNet: "width scales every channel count"
        return max(1, int(c * width))

    if name == "depthwise":  # each stage maps the previous width to a multiple of it
        chain = [scaled(32), *(scaled(c) for c in options["widths"])]
        problems += [f"cannot map {a} to {b}" for a, b in itertools.pairwise(chain) if b % a]
    if name == "bottleneck" and any(scaled(c) < 4 for c in (32, 64, 128)):  # expansion 4 needs out_ch >= 4
        problems.append("too narrow")
    stride = expected_total_stride(name, options)
    if options["image_size"] < stride:
        problems.append(f"total stride {stride}")
    return problems


@st.composite
def network_options(draw):
    name = draw(st.sampled_from(list_models()))
    options = {
        "width": draw(WIDTHS),
        "image_size": draw(st.integers(1, 72)),
        "stem": draw(st.sampled_from(["auto", "small", "large", "tiny"])),
    }
    if name in ("mobilenet_v2", "inverted_residual"):
        options["expansion"] = draw(st.one_of(st.floats(1.0, 4.0), st.floats(-1.0, 0.99), st.floats(16.5, 40.0)))
    if name not in ("mobilenet_v1", "pointwise"):
        options["kernel_size"] = draw(st.sampled_from([1, 3, 4, 5]))
    if name not in ("mobilenet_v1",):
        options["se_ratio"] = draw(RATIOS)
    if name in ("standard", "separable", "depthwise"):
        base = draw(st.integers(1, 48))
        options["widths"] = [base, base * draw(st.integers(1, 3)), draw(mostly(st.just(base * 4), st.integers(1, 96)))]
    return name, options


@settings(SETTINGS, max_examples=150)
@given(network_options(), st.integers(1, 4), st.integers(1, 20))
@example(("mobilenet_v1", {"width": 0.25, "image_size": 16, "stem": "auto"}), 3, 10)
@example(("mobilenet_v1", {"width": 0.25, "image_size": 15, "stem": "auto"}), 3, 10)  # below its stride of 16
@example(("mobilenet_v2", {"width": 0.5, "image_size": 70, "stem": "auto", "expansion": 2.0, "kernel_size": 5, "se_ratio": 0.25}), 1, 7)
@example(("mobilenet_v2", {"width": 0.5, "image_size": 32, "stem": "large", "expansion": 2.0, "kernel_size": 3, "se_ratio": 0.0}), 3, 2)
@example(("resnet18", {"width": 0.125, "image_size": 8, "stem": "small", "kernel_size": 3, "se_ratio": 0.0}), 3, 10)
@example(("resnet50", {"width": 0.0625, "image_size": 31, "stem": "large", "kernel_size": 3, "se_ratio": 0.0}), 3, 10)  # stride 32
@example(("depthwise", {"width": 0.5, "image_size": 8, "stem": "auto", "kernel_size": 3, "se_ratio": 0.0, "widths": [16, 32, 64]}), 3, 10)
@example(("depthwise", {"width": 0.5, "image_size": 8, "stem": "auto", "kernel_size": 3, "se_ratio": 0.0, "widths": [16, 32, 40]}), 3, 10)
@example(("bottleneck", {"width": 0.1, "image_size": 8, "stem": "auto", "kernel_size": 3, "se_ratio": 0.0}), 3, 10)  # 32 x 0.1 = 3 < 4
@example(
    ("inverted_residual", {"width": 0.25, "image_size": 65, "stem": "auto", "expansion": 1.0, "kernel_size": 3, "se_ratio": 0.5}), 3, 5
)
@example(("separable", {"width": 0.25, "image_size": 4, "stem": "auto", "kernel_size": 3, "se_ratio": 0.0, "widths": [8, 8, 8]}), 2, 3)
def test_network_builds_with_formula_shape_or_raises_value_error(spec, in_channels, num_classes):
    name, options = spec
    problems = network_problems(name, options)
    if problems:
        event(f"invalid: {problems[0]}")
        try:
            build_model(name, num_classes=num_classes, in_channels=in_channels, **options)
        except ValueError as ex:
            assert any(p in str(ex) for p in problems), (problems, str(ex))
        else:
            raise AssertionError(f"{name} {options} built despite {problems}")
        return
    event(f"built: {name}")
    model = build_model(name, num_classes=num_classes, in_channels=in_channels, **options)
    size = options["image_size"]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, in_channels, size, size)).shape == (1, num_classes)
    assert model.total_stride == expected_total_stride(name, options) <= size

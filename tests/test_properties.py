"""Property-based: any block or network options either build a model with the formula's output shape or raise ValueError."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, event, given, settings
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


@SETTINGS
@given(block_options(), st.integers(1, 24), st.integers(1, 24), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9))
def test_block_builds_with_formula_shape_or_raises_value_error(spec, in_ch, out_ch, stride, h, w):
    name, options = spec
    try:
        block = BLOCKS[name](in_ch, out_ch, stride, **{k: v for k, v in options.items() if v is not None})
    except ValueError as ex:
        event(f"ValueError: {str(ex).split('=')[0].split()[-1]}")
        return
    event("built")
    y = block.eval()(torch.randn(2, in_ch, h, w))
    assert y.shape == (2, out_ch, math.ceil(h / stride), math.ceil(w / stride))


WIDTHS = mostly(st.floats(0.05, 1.25), st.one_of(st.floats(4.01, 50.0), st.floats(-2.0, 0.0)))


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
def test_network_builds_with_formula_shape_or_raises_value_error(spec, in_channels, num_classes):
    name, options = spec
    try:
        model = build_model(name, num_classes=num_classes, in_channels=in_channels, **options)
    except ValueError as ex:
        event(f"ValueError: {str(ex).split('=')[0].split()[-1]}")
        return
    event("built")
    size = options["image_size"]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, in_channels, size, size)).shape == (1, num_classes)
    assert size >= model.total_stride

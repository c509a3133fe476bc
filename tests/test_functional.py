"""pointwise_conv2d: the from-scratch 1x1 convolution equals F.conv2d everywhere it is defined."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import PointwiseConv2d, pointwise_conv2d

STRIDES = [1, 2, 3, (1, 2)]
PADDINGS = [0, 1, (2, 0)]
GROUPS = [1, 2, 4]
GRID = list(itertools.product(STRIDES, PADDINGS, GROUPS, [True, False], [False, True]))


def _inputs(groups: int, bias: bool, channels_last: bool, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 8, 9, 7, generator=g).to(dtype)
    w = torch.randn(12, 8 // groups, 1, 1, generator=g).to(dtype)
    b = torch.randn(12, generator=g).to(dtype) if bias else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, b


@pytest.mark.parametrize("lowering", ["native", "python"])
@pytest.mark.parametrize(("stride", "padding", "groups", "bias", "channels_last"), GRID)
def test_equals_conv2d_forward_and_backward(stride, padding, groups, bias, channels_last, lowering, request):
    if lowering == "python":
        request.getfixturevalue("python_lowering")
    x, w, b = _inputs(groups, bias, channels_last)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    ours = pointwise_conv2d(x, w, b, stride=stride, padding=padding, groups=groups)
    ref = F.conv2d(x, w, b, stride=stride, padding=padding, groups=groups)
    assert ours.shape == ref.shape
    # the memory format F.conv2d gives (channels_last in, channels_last out, strided or padded too)
    assert ours.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(ref)
    ours_grads = torch.autograd.grad(ours, leaves, upstream)
    ref_grads = torch.autograd.grad(ref, leaves, upstream)
    for got, want in zip(ours_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("stride", "padding", "groups"), list(itertools.product([1, 2], [0, 1], [1, 2])))
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_conv2d_bf16(stride, padding, groups, channels_last):
    x, w, b = _inputs(groups, True, channels_last, dtype=torch.bfloat16)
    ours = pointwise_conv2d(x, w, b, stride, padding, groups)
    ref = F.conv2d(x.float(), w.float(), b.float(), stride, padding, 1, groups)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref, rtol=2e-2, atol=5e-2)


def test_channels_last_in_channels_last_out():
    x, w, b = _inputs(1, True, channels_last=True)
    y = pointwise_conv2d(x, w, b)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert pointwise_conv2d(x.contiguous(), w, b).is_contiguous()


def test_guide_failure_mode_keywords_accepted():
    """The guide this project grew from: TypeError: pointwise_conv2d() got an unexpected keyword argument 'stride'."""
    x, w, b = _inputs(2, True, False)
    y = pointwise_conv2d(x=x, weight=w, bias=b, stride=2, padding=1, groups=2)
    torch.testing.assert_close(y, F.conv2d(x, w, b, stride=2, padding=1, groups=2), rtol=1e-5, atol=1e-5)
    # every keyword F.conv2d has, dilation included (no effect on a 1x1 kernel, as in F.conv2d)
    y = pointwise_conv2d(x, weight=w, bias=b, stride=2, padding=1, dilation=(2, 3), groups=2)
    torch.testing.assert_close(y, F.conv2d(x, w, b, stride=2, padding=1, dilation=(2, 3), groups=2), rtol=1e-5, atol=1e-5)


def test_is_a_per_pixel_linear_layer():
    """y[n,k,i,j] = sum_c x[n,c,i,j] W[k,c] + b[k]: the same numbers as nn.Linear applied at every pixel."""
    linear = nn.Linear(8, 5)
    x = torch.randn(2, 8, 6, 4)
    weight = linear.weight.detach().view(5, 8, 1, 1)
    per_pixel = linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(pointwise_conv2d(x, weight, linear.bias.detach()), per_pixel.detach(), rtol=1e-5, atol=1e-5)
    for impl in ("torch", "scratch"):
        module = PointwiseConv2d(8, 5, impl=impl)
        module.weight.data.copy_(weight)
        module.bias.data.copy_(linear.bias.detach())
        torch.testing.assert_close(module(x), per_pixel.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "groups", "needle"),
    [
        ((2, 8, 5, 5), (4, 8, 3, 3), 1, "(4, 8, 3, 3)"),  # not a 1x1 kernel
        ((2, 8, 5, 5), (4, 6, 1, 1), 1, "(4, 6, 1, 1)"),  # in/groups mismatch
        ((2, 8, 5, 5), (6, 2, 1, 1), 4, "(6, 2, 1, 1)"),  # out not divisible by groups
        ((2, 8, 5, 5), (4, 3, 1, 1), 3, "groups=3"),  # channels not divisible by groups
        ((2, 8), (4, 8, 1, 1), 1, "(2, 8)"),  # neither (N, C, H, W) nor (C, H, W)
        ((2, 8, 5, 5), (0, 8, 1, 1), 1, "out >= 1"),  # no output channels (F.conv2d refuses it too)
        ((2, 8, 0, 5), (4, 8, 1, 1), 1, "(2, 8, 0, 5) has no pixels"),  # nothing for the kernel to read
    ],
)
def test_bad_shapes_raise_value_error_naming_them(x_shape, w_shape, groups, needle):
    with pytest.raises(ValueError, match="pointwise_conv2d") as info:
        pointwise_conv2d(torch.zeros(x_shape), torch.zeros(w_shape), groups=groups)
    assert needle in str(info.value)


def test_bad_stride_and_padding():
    x, w, _ = _inputs(1, False, False)
    with pytest.raises(ValueError, match="stride"):
        pointwise_conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="padding"):
        pointwise_conv2d(x, w, padding=-1)
    with pytest.raises(ValueError, match="padding='full' is not valid; use an int, a pair of ints, 'valid' or 'same'"):
        pointwise_conv2d(x, w, padding="full")
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        pointwise_conv2d(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match="stride=True"):
        pointwise_conv2d(x, w, stride=True)
    with pytest.raises(ValueError, match=r"stride=2\.0 must be an int or a pair of ints"):
        pointwise_conv2d(x, w, stride=2.0)
    with pytest.raises(ValueError, match=r"padding=1\.0 must be an int or a pair of ints"):
        pointwise_conv2d(x, w, padding=1.0)
    with pytest.raises(ValueError, match="groups=True"):
        pointwise_conv2d(x, w, groups=True)
    with pytest.raises(ValueError, match=r"dilation=\(1, 0\) must be >= 1"):
        pointwise_conv2d(x, w, dilation=(1, 0))
    with pytest.raises(ValueError, match=r"dilation=1\.5 must be an int or a pair of ints"):
        pointwise_conv2d(x, w, dilation=1.5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_argument_form_conv2d_takes(channels_last):
    """padding 'valid' / 'same', one-element and list strides, unbatched (C, H, W) input: as F.conv2d."""
    x, w, b = _inputs(1, True, channels_last)
    import numpy as np

    # numpy integers and 0-d integer tensors (what has __index__) too: they were refused
    forms = ({"padding": "valid"}, {"padding": "same"}, {"stride": (2,)}, {"stride": [2, 3], "padding": [1]},
             {"stride": np.int64(2), "padding": (np.int32(1), 0)}, {"stride": torch.tensor(2)})  # fmt: skip
    for kwargs in forms:
        torch.testing.assert_close(pointwise_conv2d(x, w, b, **kwargs), F.conv2d(x, w, b, **kwargs), rtol=1e-5, atol=1e-5)
    xg, wg, _ = _inputs(2, False, channels_last)
    torch.testing.assert_close(pointwise_conv2d(xg, wg, groups=np.int64(2)), F.conv2d(xg, wg, groups=2), rtol=1e-5, atol=1e-5)
    unbatched = x[1]
    ours, ref = pointwise_conv2d(unbatched, w, b, stride=2), F.conv2d(unbatched, w, b, stride=2)
    assert ours.shape == ref.shape == (12, 5, 4)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_bias_that_is_a_view(channels_last, groups):
    """A sliced or expanded bias: oneDNN reads its operands densely, so a strided one must be copied first."""
    x, w, _ = _inputs(groups, False, channels_last)
    g = torch.Generator().manual_seed(7)
    for bias in (torch.randn(24, generator=g)[::2], torch.randn(1, generator=g).expand(12), torch.randn(12, 2, generator=g)[:, 1]):
        assert not bias.is_contiguous()
        torch.testing.assert_close(pointwise_conv2d(x, w, bias, groups=groups), F.conv2d(x, w, bias, groups=groups), rtol=1e-5, atol=1e-5)


def test_channels_last_views_keep_channels_last():
    """A channel slice of channels_last data is still channels_last by its strides: F.conv2d keeps the format, and so do we."""
    x, _, _ = _inputs(1, False, True)
    w, b = torch.randn(12, 6, 1, 1), torch.randn(12)
    view = x[:, 1:7]
    assert not view.is_contiguous(memory_format=torch.channels_last)
    ours, ref = pointwise_conv2d(view, w, b, stride=2), F.conv2d(view, w, b, stride=2)
    assert ref.is_contiguous(memory_format=torch.channels_last) and ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    nchw_view = x.contiguous()[:, 1:7]  # a slice of NCHW data stays NCHW
    assert pointwise_conv2d(nchw_view, w, b).is_contiguous() and F.conv2d(nchw_view, w, b).is_contiguous()


@pytest.mark.parametrize("channels_last", [False, True])
def test_mixed_dtypes_outside_autocast_name_them(channels_last):
    x, w, b = _inputs(1, True, channels_last)
    with pytest.raises(ValueError, match=r"input is torch.bfloat16 but weight torch.float32, bias torch.float32"):
        pointwise_conv2d(x.bfloat16(), w, b)
    with pytest.raises(ValueError, match=r"input is torch.float32 but weight torch.float32, bias torch.float64"):
        pointwise_conv2d(x, w, b.double())
    with pytest.raises(RuntimeError):  # F.conv2d refuses the same mix
        F.conv2d(x.bfloat16(), w, b)


@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_bias_under_autocast_keeps_the_autocast_dtype(channels_last):
    x, w, b = _inputs(2, True, channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = pointwise_conv2d(x, w, b, groups=2), F.conv2d(x, w, b, groups=2)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=5e-2)


def _case(channels_last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 16, 6, 5, generator=g)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    return x, torch.randn(24, 16, 1, 1, generator=g), torch.randn(24, generator=g)


def _assert_matches_conv(ours_fn, x, w, b, *, context=None, tol=(1e-5, 1e-5), grad_tol=(1e-4, 1e-4)):
    """``ours_fn(x, w, b)`` against ``F.conv2d(x, w, b)`` (both inside ``context``): values, then the
    gradients of ``x``, ``w`` and ``b`` for one upstream gradient, each within ``(rtol, atol)``.
    Returns both outputs and the gradient pairs."""
    leaves = [t.requires_grad_() for t in (x, w, b)]
    with context or contextlib.nullcontext():
        ours, ref = ours_fn(x, w, b), F.conv2d(x, w, b)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=tol[0], atol=tol[1])
    upstream = torch.randn_like(ref)
    grads = list(zip(torch.autograd.grad(ours, leaves, upstream), torch.autograd.grad(ref, leaves, upstream)))
    for got, want in grads:
        torch.testing.assert_close(got, want, rtol=grad_tol[0], atol=grad_tol[1])
    return ours, ref, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_rows_product_is_linear(dtype, bias):
    """The channels_last product (oneDNN's where torch has it) computes exactly F.linear's function."""
    from models.functional import _rows_product

    g = torch.Generator().manual_seed(1)
    rows, w, b = torch.randn(37, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    rows, w, b = rows.to(dtype), w.to(dtype), b.to(dtype) if bias else None
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    got = _rows_product(rows, w, b)
    assert got.dtype == dtype and got.shape == (37, 24)
    torch.testing.assert_close(got.float(), F.linear(rows.float(), w.float(), None if b is None else b.float()), **tol)
    empty = _rows_product(rows[:0], w, b)  # no rows: an empty (0, K) result, not an error
    assert empty.shape == (0, 24) and empty.dtype == dtype


def test_weight_operand_layouts():
    """The fp32 weight reaches oneDNN as it lies in products of few rows; with many rows column-major when narrow
    and packed into oneDNN's blocked layout when wide; an already column-major weight (the backward's W^T) always
    as itself; other dtypes and size-1 dimensions as a contiguous tensor. Each layout's product equals F.linear's."""
    from models.functional import COLUMN_MAJOR_MAX_OUT, RELAYOUT_MIN_ROWS, _rows_product, _weight_operand

    _needs_onednn_fp32()
    g = torch.Generator().manual_seed(5)
    narrow, wide = torch.randn(24, 16, generator=g), torch.randn(COLUMN_MAJOR_MAX_OUT, 16, generator=g)
    few, many = RELAYOUT_MIN_ROWS - 1, RELAYOUT_MIN_ROWS
    assert _weight_operand(narrow, few) is narrow  # few rows: as it lies, no copy
    col = _weight_operand(narrow, many)
    assert col.stride() == (1, 24) and torch.equal(col, narrow)  # a column-major copy
    free = narrow.t()  # (16, 24), already column-major: itself, as the backward's W^T
    assert _weight_operand(free, few) is free and _weight_operand(free, many) is free
    assert _weight_operand(wide, few).stride() == (16, 1)  # as it lies
    assert _weight_operand(wide, many).is_mkldnn  # packed
    assert _weight_operand(narrow.bfloat16(), many).stride() == (16, 1)
    assert _weight_operand(narrow[:1], many).stride() == (16, 1)  # one row: no layout to choose
    for w, m in ((narrow, few), (narrow, many), (free, few), (wide, few), (wide, many)):
        rows, b = torch.randn(m, w.shape[1], generator=g), torch.randn(w.shape[0], generator=g)
        torch.testing.assert_close(_rows_product(rows, w, b), F.linear(rows, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("wide", [False, True])
def test_channels_last_relaid_weight_matches_conv(wide):
    """Many pixels (the forward copies the weight column-major when narrow, packs it when wide): values and all
    three gradients as F.conv2d."""
    from models.functional import COLUMN_MAJOR_MAX_OUT, RELAYOUT_MIN_ROWS

    _needs_onednn_fp32()
    g = torch.Generator().manual_seed(6)
    side = int(RELAYOUT_MIN_ROWS**0.5) + 1
    k = COLUMN_MAJOR_MAX_OUT if wide else 24
    x = torch.randn(1, 8, side, side, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(k, 8, 1, 1, generator=g), torch.randn(k, generator=g)
    ours, _, _ = _assert_matches_conv(pointwise_conv2d, x, w, b, tol=(1e-5, 1e-4), grad_tol=(1e-4, 1e-3))
    assert ours.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_no_grad_forward_skips_autograd_and_matches_conv(memory_format):
    """Without a gradient to track (no_grad, inference_mode, or no operand requiring one) the product runs without
    the autograd Function: no grad_fn, the same values as F.conv2d; with one, the Function records the op."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 12, 30, 30, generator=g).contiguous(memory_format=memory_format)  # 900 pixels: per image in NCHW
    w, b = torch.randn(20, 12, 1, 1, generator=g), torch.randn(20, generator=g)
    expect = F.conv2d(x, w, b)
    for context in (torch.no_grad, torch.inference_mode, contextlib.nullcontext):
        with context():
            out = pointwise_conv2d(x, w, b)
        assert out.grad_fn is None and out.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-4)
    out = pointwise_conv2d(x, w.requires_grad_(), b)
    assert out.grad_fn is not None
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("c, k, expect_op", [(32, 128, "mkldnn._linear_pointwise"), (32, 96, "aten.mm"), (16, 96, "aten.mm")])
def test_thin_weight_grad_runs_on_onednn_and_is_exact(python_lowering, c, k, expect_op):
    """fp32 dW = dY^T X with 32-96 input channels and at least 4x as many outputs is one oneDNN product of the
    transposed views; other shapes keep the GEMM path. Either way it equals the plain product."""
    from models.functional import _weight_grad

    _needs_onednn_fp32()
    g = torch.Generator().manual_seed(c + k)
    rows, grad = torch.randn(300, c, generator=g), torch.randn(300, k, generator=g)
    names = _op_names(lambda: _weight_grad(grad, rows))
    assert expect_op in names and "aten.bmm" not in names, names
    torch.testing.assert_close(_weight_grad(grad, rows), grad.t() @ rows, rtol=1e-5, atol=1e-4)


def test_channels_last_thin_weight_grad_matches_conv():
    """The thin weight gradient inside a whole channels_last forward + backward: all three gradients as F.conv2d."""
    _needs_onednn_fp32()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 48, 9, 11, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(200, 48, 1, 1, generator=g) / 7, torch.randn(200, generator=g)
    _assert_matches_conv(pointwise_conv2d, x, w, b, tol=(1e-5, 1e-4), grad_tol=(1e-4, 1e-3))


def test_channels_last_without_onednn_falls_back_to_linear(monkeypatch):
    """A torch built without oneDNN (or a dtype it lacks) gets F.linear: same values and gradients."""
    import models.functional as functional

    monkeypatch.setattr(functional, "_onednn_linear_dtypes", lambda: frozenset())
    _assert_matches_conv(pointwise_conv2d, *_case())


def _op_names(fn) -> list[str]:
    """The aten / mkldnn ops ``fn()`` dispatched, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        fn()
    return ops.names


def dispatch_and_compare(x, w, b, g, *, tol=(1e-5, 1e-5), grad_tol=(1e-4, 1e-4)):
    """The ops one forward + backward of ``pointwise_conv2d(x, w, b)`` dispatches, and its output, after checking
    that output and the gradients of x, w and b (for an upstream gradient drawn from ``g``) against F.conv2d,
    each within ``(rtol, atol)``."""
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    upstream = torch.randn(x.shape[0], w.shape[0], *x.shape[2:], generator=g).to(x.dtype)

    def step():
        out = pointwise_conv2d(x, w, b)
        return out, torch.autograd.grad(out, leaves, upstream)

    names = _op_names(step)
    (ours, grads), ref = step(), F.conv2d(x, w, b)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    torch.testing.assert_close(ours.float(), ref.float(), rtol=tol[0], atol=tol[1])
    for got, want in zip(grads, torch.autograd.grad(ref, leaves, upstream)):
        torch.testing.assert_close(got.float(), want.float(), rtol=grad_tol[0], atol=grad_tol[1])
    return names, ours


def _needs_onednn_fp32() -> None:
    from models.functional import _onednn_linear_dtypes

    if torch.float32 not in _onednn_linear_dtypes():
        pytest.skip("this torch has no oneDNN matrix product for fp32")


def test_channels_last_cpu_product_runs_on_onednn_where_torch_has_it(python_lowering):
    """The fast path the benchmarks measured (oneDNN's matrix product, forward and input gradient) could
    fall back to F.linear unnoticed: the numbers stay right, the speed does not."""
    _needs_onednn_fp32()
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.randn(6, 8, 1, 1, requires_grad=True), torch.randn(6, requires_grad=True)
    names = _op_names(lambda: pointwise_conv2d(x, w, b).sum().backward())
    assert names.count("mkldnn._linear_pointwise") == 2, names  # the forward and dX = dY W
    assert "aten.convolution" not in names


# (N, C, K, H, W): per image (H*W >= PER_IMAGE_MIN_PIXELS, odd sizes so no dimension is a round number),
# one product over the batch (7x7 and 3x5), and more channels than pixels.
NCHW_ONEDNN_CASES = [(3, 12, 20, 29, 31), (2, 40, 24, 28, 28), (4, 16, 40, 7, 7), (2, 5, 3, 3, 5), (2, 96, 80, 2, 3)]


@pytest.mark.parametrize("case", NCHW_ONEDNN_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("bias", [True, False])
def test_nchw_fp32_cpu_runs_on_onednn_and_matches_conv(python_lowering, case, bias):
    """NCHW fp32 on CPU is oneDNN products (per image on strided views, or over the batch after a copy), forward and
    backward, with no batched MKL GEMM and no convolution; values and all three gradients match F.conv2d."""
    from models.functional import PER_IMAGE_MIN_PIXELS

    _needs_onednn_fp32()
    n, c, k, h, w_ = case
    g = torch.Generator().manual_seed(sum(case))
    x, w = torch.randn(n, c, h, w_, generator=g), torch.randn(k, c, 1, 1, generator=g) / c**0.5
    b = torch.randn(k, generator=g) if bias else None
    names, ours = dispatch_and_compare(x, w, b, g)
    assert ours.is_contiguous()  # NCHW in, NCHW out, as F.conv2d
    per_image = h * w_ >= PER_IMAGE_MIN_PIXELS
    # Per image: a product per image each way (forward, dX, dW). Over the batch: one each way.
    assert names.count("mkldnn._linear_pointwise") == (3 * n if per_image else 3), names
    assert not {"aten.bmm", "aten.baddbmm", "aten.mm", "aten.addmm", "aten.convolution"} & set(names), names
    # Copies, never one of x per image. Per image: W^T for dX. Over the batch: x transposed to rows (forward),
    # then in the backward dY to rows, dX back from rows, and dY and x to (channels, pixels) for dW.
    assert names.count("aten.clone") == (1 if per_image else 5), names


# (input maker, stride): views that are not a contiguous tensor's layout, and 1-pixel-high images whose stepped
# slices leave strides oneDNN refuses ("could not construct a memory descriptor using strides", found by fuzzing).
NCHW_VIEW_CASES = {
    "expanded batch": (lambda g: torch.randn(1, 16, 30, 30, generator=g).expand(3, 16, 30, 30), 1),
    "expanded pixels": (lambda g: torch.randn(2, 16, 1, 1, generator=g).expand(2, 16, 30, 30), 1),
    "channel slice": (lambda g: torch.randn(2, 32, 30, 30, generator=g)[:, ::2], 1),
    "column slice": (lambda g: torch.randn(2, 16, 30, 60, generator=g)[..., :30], 1),
    "one row, every 2nd pixel (per image)": (lambda g: torch.randn(3, 16, 1, 2001, generator=g)[..., ::2], 1),
    "one row, stride (1, 2), one image (over the batch)": (lambda g: torch.randn(1, 16, 1, 33, generator=g), (1, 2)),
    "one column, stride 3": (lambda g: torch.randn(2, 16, 17, 1, generator=g), 3),
}


@pytest.mark.parametrize("view", list(NCHW_VIEW_CASES))
def test_nchw_fp32_views_match_conv(view):
    """Strided views on the NCHW oneDNN path give F.conv2d's values and weight/bias gradients: operands reach oneDNN
    with a contiguous tensor's strides, as a copy where the view is not one."""
    _needs_onednn_fp32()
    make, stride = NCHW_VIEW_CASES[view]
    g = torch.Generator().manual_seed(7)
    x = make(g)
    w, b = torch.randn(8, 16, 1, 1, generator=g) / 4, torch.randn(8, generator=g)
    leaves = [w.requires_grad_(), b.requires_grad_()]  # x stays the view (no gradient asked of it)
    ours, ref = pointwise_conv2d(x, w, b, stride), F.conv2d(x, w, b, stride)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(ref.shape, generator=g)
    for got, want in zip(torch.autograd.grad(ours, leaves, upstream), torch.autograd.grad(ref, leaves, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_nchw_fp32_double_backward_through_a_copied_view():
    """The copy of a strided input is made outside the autograd Function, so a gradient penalty still reaches x."""
    _needs_onednn_fp32()
    g = torch.Generator().manual_seed(8)
    base = torch.randn(2, 16, 30, 60, generator=g).requires_grad_()
    w, b = (torch.randn(8, 16, 1, 1, generator=g) / 4).requires_grad_(), torch.randn(8, generator=g).requires_grad_()

    def penalty(conv):
        (grad_w,) = torch.autograd.grad(conv(base[..., ::2], w, b).square().sum(), w, create_graph=True)
        return torch.autograd.grad(grad_w.square().sum(), [base, w])

    for got, want in zip(penalty(pointwise_conv2d), penalty(F.conv2d)):
        scale = want.abs().max()  # fp32 sums of squares in another order: compare against the gradient's scale
        assert scale > 0 and (got - want).abs().max() <= 1e-5 * scale, ((got - want).abs().max(), scale)


def test_canonical_strides():
    """A contiguous tensor with odd strides on a size-1 dimension gets a contiguous tensor's strides as a view; others a copy."""
    from models.functional import _canonical

    t = torch.randn(2, 6, 17, 1)[:, :, ::3, ::3].reshape(2, 6, 6)  # contiguous by torch's rule, strides (102, 17, 3)
    odd = torch.randn(6, 1).as_strided((6, 1), (1, 3))
    assert odd.is_contiguous() and odd.stride() == (1, 3)
    got = _canonical(odd)
    assert got.stride() == (1, 1) and got.data_ptr() == odd.data_ptr() and torch.equal(got, odd)  # a view
    copied = _canonical(t)
    assert copied.stride() == (36, 6, 1) and torch.equal(copied, t)
    same = torch.randn(3, 4)
    assert _canonical(same) is same


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("hw", [(30, 30), (5, 5)])
def test_empty_batch_forward_and_backward_like_conv(memory_format, hw):
    """N = 0: an empty output and zero weight and bias gradients, as F.conv2d gives (the per-image backward indexed image 0)."""
    x = torch.randn(0, 8, *hw).contiguous(memory_format=memory_format).requires_grad_()
    w, b = torch.randn(4, 8, 1, 1, requires_grad=True), torch.randn(4, requires_grad=True)
    ours, ref = pointwise_conv2d(x, w, b), F.conv2d(x, w, b)
    assert ours.shape == ref.shape == (0, 4, *hw)
    for got, want in zip(torch.autograd.grad(ours.sum(), [x, w, b]), torch.autograd.grad(ref.sum(), [x, w, b])):
        assert got.shape == want.shape and not got.any()


def test_nchw_onednn_path_is_fp32_eager_cpu_only():
    """float64 (oneDNN has none), bf16 and autocast keep the batched GEMMs (aten sends those to oneDNN already)."""
    from models.functional import _onednn_images

    _needs_onednn_fp32()
    x = torch.zeros(1, 2, 3, 3)
    assert _onednn_images(x, None)
    assert not _onednn_images(x.double(), None) and not _onednn_images(x.bfloat16(), None)
    assert not _onednn_images(x, torch.bfloat16)  # under autocast the product runs in bf16
    assert not _onednn_images(x.to("meta"), None)


@pytest.mark.parametrize(("c", "k", "onednn"), [(128, 128, True), (128, 256, True), (64, 128, False), (32, 64, False)])
def test_channels_last_fp32_weight_grad_on_onednn_for_wide_layers(python_lowering, c, k, onednn):
    """dW = dY^T X runs on oneDNN's inner-product backward where C*K/(C+K) >= 50 (64 for 128->128, 85.3 for
    128->256; 42.7 and 21.3 stay on the GEMMs) and matches F.conv2d either way (thin layers, K >= 4C with
    32-96 input channels, take their own path: test_thin_weight_grad_runs_on_onednn_and_is_exact)."""
    from models.functional import ONEDNN_WEIGHT_GRAD_MIN_INTENSITY

    _needs_onednn_fp32()
    assert (c * k >= ONEDNN_WEIGHT_GRAD_MIN_INTENSITY * (c + k)) == onednn
    g = torch.Generator().manual_seed(c + k)
    x = torch.randn(2, c, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(k, c, 1, 1, generator=g) / c**0.5, torch.randn(k, generator=g)
    names = _op_names(lambda: _assert_matches_conv(pointwise_conv2d, x, w, b, tol=(1e-4, 1e-4), grad_tol=(1e-4, 1e-4)))
    assert ("aten.mkldnn_linear_backward_weights" in names) == onednn, names


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_channels_last_split_weight_grad_matches_conv(python_lowering, monkeypatch, threads):
    """With the row threshold at zero the weight gradient is cut into one slab per thread on a small
    case (120 rows >= C*K = 32; with 7 threads they do not split evenly, so one GEMM) and still
    matches F.conv2d."""
    import models.functional as functional

    monkeypatch.setattr(functional, "SPLIT_MIN_ROWS", 0)
    bmm, slabs = torch.bmm, []
    monkeypatch.setattr(torch, "bmm", lambda a, b: slabs.append(a.shape[0]) or bmm(a, b))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 4, 6, 5, generator=g).contiguous(memory_format=torch.channels_last)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _assert_matches_conv(pointwise_conv2d, x, torch.randn(8, 4, 1, 1, generator=g), torch.randn(8, generator=g))
    finally:
        torch.set_num_threads(previous)
    assert slabs == ([] if 120 % threads else [threads])


def test_weight_grad_split_into_slabs_is_the_gemm():
    """dY^T X summed slab by slab equals the one GEMM, whether or not the rows split evenly."""
    from models.functional import _weight_grad

    g = torch.Generator().manual_seed(3)
    previous = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for m in (4096, 4098):  # 4098 rows: not a multiple of 4 threads, so one GEMM
            grad, rows = torch.randn(m, 24, generator=g), torch.randn(m, 16, generator=g)
            got = _weight_grad(grad, rows)
            assert got.shape == (24, 16) and got.is_contiguous()
            # against float64 products, computed apart from both paths
            torch.testing.assert_close(got, (grad.double().t() @ rows.double()).float(), rtol=1e-4, atol=1e-3)
    finally:
        torch.set_num_threads(previous)


def test_channels_last_at_default_thresholds_matches_conv():
    """A layer with enough rows (4608 >= 2048 and >= C*K) for the split weight gradient as shipped."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 32, 48, 48, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64, 32, 1, 1, generator=g) / 4, torch.randn(64, generator=g)
    _assert_matches_conv(pointwise_conv2d, x, w, b, tol=(1e-4, 1e-4), grad_tol=(1e-4, 1e-3))


def test_channels_last_under_autocast_matches_conv():
    """Autocast lowers the product to bf16 as it lowers F.conv2d; parameter gradients stay fp32."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    ours, ref, grads = _assert_matches_conv(pointwise_conv2d, *_case(), context=autocast, tol=(2e-2, 5e-2), grad_tol=(5e-2, 2e-1))
    assert ours.dtype == ref.dtype == torch.bfloat16
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert all(got.dtype == want.dtype == torch.float32 for got, want in grads)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_parameter_gradients_keep_the_fp32_sums(input_dtype):
    """Under bf16 autocast on a layer the one-pass backward kernel takes (channels_last, 4096+ rows): dW and db are
    its fp32 sums, not rounded to bf16 first (F.conv2d's are: about 2e-3 off); dX comes back in the input's dtype
    and memory format, whichever autocast cast from."""
    from models import native

    if native.rows_backward(torch.bfloat16) is None:
        pytest.skip(f"native kernels {native.status()}")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 32, 32, 32, generator=g).to(input_dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = (torch.randn(64, 32, 1, 1, generator=g) / 6).requires_grad_(), torch.randn(64, generator=g).requires_grad_()
    upstream = torch.randn(4, 64, 32, 32, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pointwise_conv2d(x, w, b)
    grad_x, grad_w, grad_b = torch.autograd.grad(out, (x, w, b), upstream)
    assert grad_w.dtype == grad_b.dtype == torch.float32 and grad_x.dtype == input_dtype
    assert grad_x.is_contiguous(memory_format=torch.channels_last)
    rows = x.detach().bfloat16().permute(0, 2, 3, 1).reshape(-1, 32).double()  # the bf16 operands the product saw
    dy = upstream.permute(0, 2, 3, 1).reshape(-1, 64).double()
    for got, want in ((grad_w.view(64, 32), dy.t() @ rows), (grad_b, dy.sum(0))):
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    want_x = (dy @ w.detach().view(64, 32).bfloat16().double()).view(4, 32, 32, 32).permute(0, 3, 1, 2)  # (N, H, W, C) rows
    torch.testing.assert_close(grad_x.double(), want_x, rtol=2**-7, atol=1e-2)  # rounded to bf16 once


@pytest.mark.parametrize("grad_mode", [True, False])
def test_channels_last_output_takes_in_place_ops(grad_mode):
    """The channels_last output is a tensor of its own, not a view made inside the autograd Function: an in-place
    activation after it works and back-propagates as after F.conv2d."""
    x, w, b = _case()
    if not grad_mode:
        with torch.no_grad():
            torch.testing.assert_close(pointwise_conv2d(x, w, b).relu_(), F.conv2d(x, w, b).relu_())
        return
    leaves = [t.requires_grad_() for t in (x, w, b)]
    upstream = torch.randn(4, 24, 6, 5)
    ours = torch.autograd.grad(pointwise_conv2d(x, w, b).relu_(), leaves, upstream)
    theirs = torch.autograd.grad(F.conv2d(x, w, b).relu_(), leaves, upstream)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("channels_last", "size"), [(False, 5), (False, 11), (True, 5)])
def test_double_backward_matches_conv(channels_last, size):
    """A gradient penalty differentiates the backward pass itself: the folded NCHW path (6x5 pixels),
    the batched NCHW one with its hand-written backward (6x11 >= FOLD_MAX_PIXELS), and channels_last."""
    from models.functional import FOLD_MAX_PIXELS

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 6, size, generator=g)
    assert (6 * size >= FOLD_MAX_PIXELS) == (size == 11)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    w, b = torch.randn(24, 16, 1, 1, generator=g), torch.randn(24, generator=g)
    leaves = [t.requires_grad_() for t in (x, w, b)]

    def penalty(conv):
        (grad_x,) = torch.autograd.grad(conv(x, w, b).square().sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), leaves)

    for got, want in zip(penalty(pointwise_conv2d), penalty(F.conv2d)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # fp32 sums of squares, in another order


def test_autocast_leaves_float64_alone_as_conv_does():
    x, w, b = (t.double() for t in _case())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = pointwise_conv2d(x, w, b), F.conv2d(x, w, b)
    assert ours.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(ours, ref)


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_compile_matches_conv(channels_last):
    """trainer.compile=true compiles models that call pointwise_conv2d: forward and gradients still match."""
    _assert_matches_conv(torch.compile(pointwise_conv2d), *_case(channels_last))


def _layouts():
    """Every order of the four dims in memory, shapes with a size-1 dim, and slices of each: the
    ambiguous layouts where a looser channels_last rule than torch's picks another output format."""
    for perm in itertools.permutations(range(4)):
        for shape in [(2, 8, 5, 6), (1, 8, 9, 9), (2, 1, 9, 9), (2, 8, 1, 9), (3, 8, 8, 1)]:
            stored = torch.randn([shape[d] for d in perm]).permute(*[perm.index(d) for d in range(4)])
            for view in (stored, stored[:, ::2], stored[:, :, 1:], stored[:, :, :, ::2]):
                if 0 not in view.shape:
                    yield view


def test_output_memory_format_is_conv2ds_on_every_layout():
    cases = 0
    for x in _layouts():
        w, b = torch.randn(4, x.shape[1], 1, 1), torch.randn(4)
        for stride, padding in [(1, 0), (2, 0), (1, 1)]:
            ours, ref = pointwise_conv2d(x, w, b, stride, padding), F.conv2d(x, w, b, stride, padding)
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
            formats = [(t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)) for t in (ours, ref)]
            assert formats[0] == formats[1], (x.shape, x.stride(), stride, padding, ours.stride(), ref.stride())
            cases += 1
    assert cases > 1000


def test_channels_last_weight_gives_channels_last_output():
    """model.to(memory_format=channels_last) fed NCHW input: F.conv2d follows the weight, so do we."""
    x = torch.randn(2, 8, 5, 5)
    w = torch.empty_strided((4, 8, 1, 1), (8, 1, 8, 8)).normal_()  # what Module.to(channels_last) makes
    ours, ref = pointwise_conv2d(x, w), F.conv2d(x, w)
    assert ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous()
    assert ours.stride() == ref.stride()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    unbatched = torch.randn(1, 8, 5, 6).contiguous(memory_format=torch.channels_last)[0]  # (C, H, W), C innermost
    assert pointwise_conv2d(unbatched, w.contiguous()).stride() == F.conv2d(unbatched, w.contiguous()).stride()


def test_meta_tensors_give_the_shape():
    """Shape inference and deferred init run models on the meta device, as F.conv2d allows."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.empty(2, 8, 12, 12, device="meta").contiguous(memory_format=fmt)
        out = pointwise_conv2d(x, torch.empty(4, 8, 1, 1, device="meta"), torch.empty(4, device="meta"), stride=2)
        assert out.device.type == "meta" and out.shape == (2, 4, 6, 6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_func_transforms(channels_last):
    """vmap over a batch of batches, and jacrev / grad through the weight, equal F.conv2d's."""
    _, w, b = _inputs(1, True, channels_last)
    x = torch.randn(3, 8, 10, 10)  # 100 pixels: NCHW takes the batched product, not the small-image fold
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    xs = torch.stack([x, 2 * x])  # (2, N, C, H, W)
    torch.testing.assert_close(
        torch.func.vmap(lambda t: pointwise_conv2d(t, w, b, stride=2))(xs),
        torch.func.vmap(lambda t: F.conv2d(t, w, b, stride=2))(xs),
        rtol=1e-5,
        atol=1e-5,
    )
    small = x[:1, :, :3, :3].contiguous(memory_format=torch.channels_last) if channels_last else x[:1, :, :3, :3]
    torch.testing.assert_close(
        torch.func.jacrev(lambda w_: pointwise_conv2d(small, w_, b))(w),
        torch.func.jacrev(lambda w_: F.conv2d(small, w_, b))(w),
        rtol=1e-5,
        atol=1e-5,
    )
    for groups in (1, 2):
        wg = w[:, : 8 // groups].contiguous()
        grads = [
            torch.func.grad(lambda x_, conv=conv, wg=wg, groups=groups: conv(x_, wg, b, groups=groups).square().sum())(x)
            for conv in (pointwise_conv2d, F.conv2d)
        ]
        torch.testing.assert_close(*grads, rtol=1e-4, atol=1e-4)


def test_folded_nchw_weight_gradient_matches_conv(monkeypatch):
    """The GPU's folded NCHW weight gradient (one product over all N*H*W columns), forced on here on the
    CPU: the same gradients as F.conv2d in float64, and a gradient penalty through it still works."""
    import models.functional as functional

    monkeypatch.setattr(functional, "_fold_weight_grad", lambda grad: True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 16, 10, 10, generator=g, dtype=torch.float64, requires_grad=True)  # 100 pixels: the batched path
    w = torch.randn(24, 16, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 24, 10, 10, generator=g, dtype=torch.float64)
    for got, want in zip(
        torch.autograd.grad(pointwise_conv2d(x, w, b), (x, w, b), grad_out), torch.autograd.grad(F.conv2d(x, w, b), (x, w, b), grad_out)
    ):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda x, w, b: pointwise_conv2d(x, w, b), (x[:2, :, :5, :5].detach().requires_grad_(), w, b))


def test_fold_weight_gradient_rule():
    """Folded only where it was measured faster: CUDA, fp32, at least 2048 pixels per image (H200, benchmarks/gpu)."""
    from types import SimpleNamespace

    from models.functional import _fold_weight_grad

    def grad(cuda, dtype, pixels):
        return SimpleNamespace(is_cuda=cuda, dtype=dtype, shape=(8, 64, pixels))

    assert _fold_weight_grad(grad(True, torch.float32, 56 * 56)) and _fold_weight_grad(grad(True, torch.float32, 112 * 112))
    assert not _fold_weight_grad(grad(True, torch.float32, 28 * 28))  # 0.88-0.90x folded
    assert not _fold_weight_grad(grad(True, torch.bfloat16, 56 * 56))  # bf16: slower folded on every shape
    assert not _fold_weight_grad(grad(False, torch.float32, 112 * 112))  # the CPU keeps the per-image products
    assert not _fold_weight_grad(torch.zeros(2, 3, 4096))

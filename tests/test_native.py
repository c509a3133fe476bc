"""convlab's native product (models/native.py): it builds, multiplies right, pointwise_conv2d takes it, and its absence is safe."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import native, pointwise_conv2d
from tests.test_functional import _assert_matches_conv, _op_names, dispatch_and_compare


def _needs_native():
    if native.matmul_out() is None:
        pytest.skip(f"native product {native.status()}")


@pytest.mark.skipif(native._compiler() is None or os.environ.get("CONVLAB_NATIVE") == "0", reason="no C++ compiler here")
def test_builds_where_a_compiler_is():
    """With a compiler on Linux the op must build and load: a silent fallback would keep the numbers and lose the speed."""
    if not (torch.backends.mkldnn.is_available() and os.uname().sysname == "Linux"):
        pytest.skip("needs Linux and a torch with oneDNN")
    assert native.matmul_out() is not None, native.status()
    assert native.status() in ("loaded", "loaded, no AVX-512 kernel")
    has_avx512 = "avx512f" in Path("/proc/cpuinfo").read_text().split()
    assert (native.linear_out() is not None) == has_avx512, native.status()


def test_matmul_out_writes_the_product_in_place():
    """2-d, transposed operands read as they lie, batched 3-d with an expanded or broadcast operand; beta=1 adds onto out."""
    _needs_native()
    mm = native.matmul_out()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 16, generator=g), torch.randn(23, 16, generator=g)
    out = torch.full((37, 23), float("nan"))
    mm(a, b.t(), out, 0.0)  # beta=0 ignores what out held, NaN included
    torch.testing.assert_close(out, (a.double() @ b.double().t()).float(), rtol=1e-5, atol=1e-5)
    ptr = out.data_ptr()
    mm(a, b.t(), out, 1.0)
    assert out.data_ptr() == ptr
    torch.testing.assert_close(out, 2 * (a.double() @ b.double().t()).float(), rtol=1e-5, atol=1e-5)
    x3, w = torch.randn(3, 16, 29, generator=g), torch.randn(8, 16, generator=g)
    for weight in (w.expand(3, 8, 16), w.unsqueeze(0)):  # a copy per image; a batch of 1, broadcast
        out3 = torch.empty(3, 8, 29)
        mm(weight, x3, out3, 0.0)
        torch.testing.assert_close(out3, torch.stack([w @ x for x in x3]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "a, b, out, match",
    [
        ((4, 3), (5, 2), (4, 2), r"shapes \[4, 3\] @ \[5, 2\] do not give \[4, 2\]"),
        ((4, 3), (3, 2), (4, 5), r"do not give \[4, 5\]"),
        ((2, 4, 3), (3, 3, 2), (3, 4, 2), "batch sizes 2 and 3 do not broadcast to 3"),
        ((4, 3), (1, 3, 2), (1, 4, 2), "operands must all be 2-d or all 3-d"),
    ],
)
def test_matmul_out_refuses_shapes_that_do_not_fit(a, b, out, match):
    """Mismatched operands are a RuntimeError naming the shapes, never an out-of-bounds read or write."""
    _needs_native()
    with pytest.raises(RuntimeError, match=match):
        native.matmul_out()(torch.randn(a), torch.randn(b), torch.empty(out), 0.0)
    with pytest.raises(RuntimeError, match="one dtype for all three"):
        native.matmul_out()(torch.randn(4, 3), torch.randn(3, 2).double(), torch.empty(4, 2), 0.0)


def _needs_linear(dtype=torch.float32):
    _needs_native()
    if native.linear_out(dtype) is None:
        pytest.skip(f"native product {native.status()}")


# (M, K, N): panels of one, two, three and four vectors (N up to 16; up to 32, 70 and 96; 40, 130 and 144; the rest),
# whole tiles of 24, 12, 8 and 6 rows and every kind of row tail under them, column tails in each panel width, fp32
# reductions over more than one 256-deep block, many parallel tasks. bf16 takes the even K.
LINEAR_SHAPES = [(1, 2, 1), (37, 8, 1), (7, 4, 64), (50, 300, 70), (97, 258, 130), (13, 64, 16), (149, 512, 128), (200, 40, 192),
                 (75, 18, 12), (59, 32, 32), (30, 6, 24), (100, 40, 96), (61, 24, 144), (23, 10, 40)]  # fmt: skip
LINEAR_SHAPES_FP32 = [(1, 1, 1), (50, 1, 70), (7, 3, 64), (97, 257, 130)]


@pytest.mark.parametrize(
    "shape, dtype",
    [(s, torch.float32) for s in LINEAR_SHAPES + LINEAR_SHAPES_FP32] + [(s, torch.bfloat16) for s in LINEAR_SHAPES],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).removeprefix("torch."),
)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_out_matches_linear(shape, dtype, bias):
    """``x @ w^T + bias`` for row, column and depth tails; ``w`` contiguous or a transposed view, ``x`` a column
    slice of a wider matrix; the cache-bypassing stores (forced by a 0-byte threshold) and plain ones; an output
    that is not 64-byte aligned. NaN in out beforehand: every element must be written. bf16 sums in fp32 and
    rounds once: within one bf16 rounding of the exact result."""
    _needs_linear(dtype)
    m, k, n = shape
    g = torch.Generator().manual_seed(m + k + n)
    wide = torch.randn(m, k + 6, generator=g).to(dtype)
    weights = {"contiguous": torch.randn(n, k, generator=g), "transposed": torch.randn(k, n, generator=g).t()}
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    for x in (wide[:, :k].contiguous(), wide[:, 2 : 2 + k]):
        for w in (weight.to(dtype) for weight in weights.values()):
            expected = (x.double() @ w.double().t() + (0 if b is None else b.double())).to(dtype)
            for stream_min_bytes in (0, 1 << 40):
                for offset in (0, 1):  # offset 1: out starts one element past an aligned address
                    out = torch.full((m * n + offset,), float("nan"), dtype=dtype)[offset:].view(m, n)
                    native.linear_out(dtype)(x, w, b, out, stream_min_bytes)
                    if dtype == torch.float32:
                        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
                    else:  # the exact sum rounded to bf16, or its neighbour where fp32 summation crossed a midpoint
                        torch.testing.assert_close(out.double(), expected.double(), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize(
    "x, w, bias, out, match",
    [
        ((4, 3), (5, 2), None, (4, 5), r"shapes \[4, 3\] @ \[5, 2\]\^T do not give \[4, 5\]"),
        ((4, 3), (5, 3), None, (4, 6), r"do not give \[4, 6\]"),
        ((4, 3), (5, 3), (4,), (4, 5), r"bias must be Float of shape \[5\], got Float \[4\]"),
        ((4, 0), (5, 0), None, (4, 5), r"no columns to reduce over"),
        ((4, 3), (5, 3, 1), None, (4, 5), "must be 2-d"),
    ],
)
def test_linear_out_refuses_what_it_cannot_compute(x, w, bias, out, match):
    """Mismatched shapes, a missing reduction, other dtypes and strided columns are RuntimeErrors that name them."""
    _needs_linear()
    bias = None if bias is None else torch.randn(bias)
    with pytest.raises(RuntimeError, match=match):
        native.linear_out()(torch.randn(x), torch.randn(w), bias, torch.empty(out), 0)
    with pytest.raises(RuntimeError, match="must all be float32 or all bfloat16, got Double, Float and Float"):
        native.linear_out()(torch.randn(4, 3).double(), torch.randn(5, 3), None, torch.empty(4, 5), 0)
    with pytest.raises(RuntimeError, match="need unit column strides"):
        native.linear_out()(torch.randn(3, 4).t(), torch.randn(5, 3), None, torch.empty(4, 5), 0)


def test_linear_out_bf16_needs_even_columns():
    """bf16 multiplies pairs of columns: an odd count is refused by name, not read past the row."""
    _needs_linear(torch.bfloat16)
    x, w = torch.randn(4, 3).bfloat16(), torch.randn(5, 3).bfloat16()
    with pytest.raises(RuntimeError, match=r"x needs an even number of them, got shape \[4, 3\]"):
        native.linear_out(torch.bfloat16)(x, w, None, torch.empty(4, 5, dtype=torch.bfloat16), 0)


def _needs_images():
    _needs_native()
    if native.images_out() is None:
        pytest.skip(f"native product {native.status()}")


# (N, C, K, P): channel-row tails under the 6-row tile, pixel tails under the 64-pixel panel (a last panel of 1,
# 4 and 63 pixels), reductions over more than one 256-deep block, one image, one pixel, one output channel.
IMAGES_SHAPES = [(1, 1, 1, 1), (2, 3, 7, 64), (3, 16, 13, 129), (2, 37, 50, 196), (1, 300, 12, 70), (2, 513, 9, 100),
                 (4, 8, 96, 127), (1, 5, 1, 300)]  # fmt: skip


@pytest.mark.parametrize("shape", IMAGES_SHAPES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("bias", [False, True])
def test_images_out_matches_per_image_products(shape, bias):
    """``w @ x[n] + bias`` per image: x contiguous and a channel slice of wider images (larger strides), w
    contiguous and a column slice, the cache-bypassing stores (forced by a 0-byte threshold) and plain ones,
    an output that is not 64-byte aligned. NaN in out beforehand: every element must be written, and a partial
    last panel must not spill into the next image's rows."""
    _needs_images()
    n, c, k, p = shape
    g = torch.Generator().manual_seed(n + c + k + p)
    wide_x, wide_w = torch.randn(n, c + 3, p, generator=g), torch.randn(k, c + 2, generator=g)
    b = torch.randn(k, generator=g) if bias else None
    for x in (wide_x[:, :c].contiguous(), wide_x[:, 1 : 1 + c]):
        for w in (wide_w[:, :c].contiguous(), wide_w[:, 2 : 2 + c]):
            expected = torch.einsum("kc,ncp->nkp", w.double(), x.double())
            expected = (expected if b is None else expected + b.double()[:, None]).float()
            for stream_min_bytes in (0, 1 << 40):
                for offset in (0, 1):  # offset 1: out starts one element past an aligned address
                    out = torch.full((n * k * p + offset,), float("nan"))[offset:].view(n, k, p)
                    native.images_out()(w, x, b, out, stream_min_bytes)
                    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_images_out_writes_strided_outputs_and_empty_batches():
    """An output that is a channel slice of a wider one (its image stride larger than K*P) is written there and
    nowhere else; an empty batch or pixel count writes nothing and raises nothing."""
    _needs_images()
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(3, 10, 80, generator=g), torch.randn(14, 10, generator=g), torch.randn(14, generator=g)
    wide = torch.full((3, 20, 80), float("nan"))
    native.images_out()(w, x, b, wide[:, 3:17], 0)
    expected = (torch.einsum("kc,ncp->nkp", w.double(), x.double()) + b.double()[:, None]).float()
    torch.testing.assert_close(wide[:, 3:17], expected, rtol=1e-5, atol=1e-4)
    assert wide[:, :3].isnan().all() and wide[:, 17:].isnan().all()
    for n, p in ((0, 80), (3, 0)):
        native.images_out()(w, torch.randn(n, 10, p), b, torch.empty(n, 14, p), 0)


@pytest.mark.parametrize(
    "w, x, bias, out, match",
    [
        ((5, 3), (2, 4, 9), None, (2, 5, 9), r"shapes \[5, 3\] @ \[2, 4, 9\] do not give \[2, 5, 9\]"),
        ((5, 3), (2, 3, 9), None, (2, 5, 8), r"do not give \[2, 5, 8\]"),
        ((5, 3), (2, 3, 9), (4,), (2, 5, 9), r"bias must be float32 of shape \[5\], got Float \[4\]"),
        ((5, 0), (2, 0, 9), None, (2, 5, 9), r"no channels to reduce over"),
        ((5, 3), (3, 9), None, (5, 9), "w must be 2-d, x and out 3-d"),
    ],
)
def test_images_out_refuses_what_it_cannot_compute(w, x, bias, out, match):
    """Mismatched shapes, a missing reduction, other dtypes and strided pixels are RuntimeErrors that name them."""
    _needs_images()
    bias = None if bias is None else torch.randn(bias)
    with pytest.raises(RuntimeError, match=match):
        native.images_out()(torch.randn(w), torch.randn(x), bias, torch.empty(out), 0)
    with pytest.raises(RuntimeError, match="must all be float32, got Float, BFloat16 and Float"):
        native.images_out()(torch.randn(5, 3), torch.randn(2, 3, 9).bfloat16(), None, torch.empty(2, 5, 9), 0)
    with pytest.raises(RuntimeError, match="need unit last strides"):
        native.images_out()(torch.randn(5, 3), torch.randn(2, 9, 3).transpose(1, 2), None, torch.empty(2, 5, 9), 0)


@pytest.mark.parametrize(
    "c, k, hw, bias, forward, fused",
    [
        (16, 32, (56, 56), False, 1, 1),  # from IMAGES_MIN_PIXELS: the forward and dX, whatever the channels
        (96, 24, (56, 56), True, 1, 0),  # more inputs than outputs: the backward in three passes
        (16, 32, (55, 56), True, 1, 1),  # below it, from IMAGES_SMALL_MIN_PIXELS: the forward alone, few inputs
        (64, 32, (28, 28), True, 1, 0),  # IMAGES_SMALL_MAX_IN
        (72, 72, (28, 28), True, 0, 1),  # above it; as many outputs as inputs: the one-pass backward
        (32, 16, (28, 28), False, 1, 0),  # no bias: IMAGES_SMALL_MAX_IN_NOBIAS
        (40, 16, (28, 28), False, 0, 0),
        (16, 32, (27, 28), True, 0, 1),  # below IMAGES_SMALL_MIN_PIXELS
        (256, 256, (14, 14), True, 0, 1),  # IMAGES_GRAD_MAX_IN, at IMAGES_GRAD_MIN_PIXELS
        (264, 264, (14, 14), True, 0, 0),  # above it
        (32, 64, (13, 14), True, 0, 0),  # below IMAGES_GRAD_MIN_PIXELS
    ],
)
def test_nchw_takes_the_avx512_kernel_where_measured(c, k, hw, bias, forward, fused):
    """fp32 NCHW: the forward on images_out inside the measured bounds (else the native matmul); the backward in
    one pass on images_backward inside its bounds, else the input gradient on images_out from IMAGES_MIN_PIXELS,
    the weight gradient on the native matmul where it was measured faster and db a sum; all as F.conv2d's."""
    from models import functional

    _needs_images()
    p = hw[0] * hw[1]
    assert functional._images_kernel_fits(c, p, torch.zeros(1) if bias else None) == bool(forward)
    in_bounds = p >= functional.IMAGES_GRAD_MIN_PIXELS and c <= functional.IMAGES_GRAD_MAX_IN and k >= c
    assert in_bounds == bool(fused)
    input_grad = p >= functional.IMAGES_MIN_PIXELS
    g = torch.Generator().manual_seed(c + k + p)
    x = torch.randn(2, c, *hw, generator=g)
    w, b = torch.randn(k, c, 1, 1, generator=g) / c**0.5, torch.randn(k, generator=g) if bias else None
    # dW sums 2 * P products in fp32 on both sides: F.conv2d's own error is about 1.5e-4 on 56x56 (against float64)
    names, ours = dispatch_and_compare(x, w, b, g, tol=(1e-5, 1e-4), grad_tol=(1e-4, 1e-3))
    assert names.count("convlab.images_backward") == fused, names
    assert names.count("convlab.images_out") == forward + (input_grad and not fused), names
    # the forward unless on images_out; unfused, dX unless on it and dW from PER_IMAGE_MIN_PIXELS (below it on the
    # inner product)
    dw_native = p >= functional.PER_IMAGE_MIN_PIXELS
    assert names.count("convlab.matmul_out") == (1 - forward) + (1 - fused) * ((1 - input_grad) + dw_native), names
    # unfused: db a sum, and the native dW a sum of per-image products
    assert names.count("aten.sum") == (1 - fused) * (bool(bias) + dw_native), names
    assert ours.is_contiguous()


# (N, C, K, P): input channels on one to four 16-lane vectors of dW's tiles and past one 64-channel panel (70, 130),
# output-channel tails under each tile height (24, 12, 8, 6 rows), pixels under, at and over one 240-pixel chunk
# (several chunks per thread, so the next chunk's prefetch runs, across images too) and under dX's 48-pixel panels
# (tails of 1, 16, 32 and 47 pixels), one pixel, one channel.
IMAGES_GRAD_SHAPES = [(1, 1, 1, 1), (2, 5, 7, 37), (3, 16, 50, 241), (2, 17, 33, 130), (2, 32, 256, 500),
                      (4, 33, 13, 95), (2, 48, 20, 480), (1, 64, 7, 1000), (2, 70, 40, 200), (2, 130, 24, 129),
                      (5, 3, 97, 64), (2, 8, 1, 256)]  # fmt: skip


@pytest.mark.parametrize("shape", IMAGES_GRAD_SHAPES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("threads", [1, 2])
def test_images_backward_matches_the_reductions(shape, threads):
    """``sum_n grad[n] @ x[n]^T``, the channel sums of ``grad`` and ``wt @ grad[n]``, against float64: ``grad`` and
    ``x`` contiguous and channel slices of wider images (larger image strides), ``wt`` contiguous and a column
    slice, ``dx`` a channel slice of a wider output; with both, ``db`` alone and neither (then left alone); NaN in
    the outputs beforehand, so every element must be written and none past them; one thread and two (each
    reduces its chunks into its own partial sums)."""
    _needs_images()
    n, c, k, p = shape
    gen = torch.Generator().manual_seed(n + c + k + p)
    wide_g, wide_x = torch.randn(n, k + 2, p, generator=gen), torch.randn(n, c + 3, p, generator=gen)
    wide_wt = torch.randn(c, k + 4, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for grad, x, wt in ((wide_g[:, :k].contiguous(), wide_x[:, :c].contiguous(), wide_wt[:, :k].contiguous()),
                            (wide_g[:, 1 : 1 + k], wide_x[:, 2 : 2 + c], wide_wt[:, 3 : 3 + k])):  # fmt: skip
            expected_dw = torch.einsum("nkp,ncp->kc", grad.double(), x.double()).float()
            expected_db = grad.double().sum((0, 2)).float()
            expected_dx = torch.einsum("ck,nkp->ncp", wt.double(), grad.double()).float()
            dw, db = torch.full((k, c), float("nan")), torch.full((k,), float("nan"))
            wide_dx = torch.full((n, c + 4, p), float("nan"))
            native.images_backward()(grad, x, dw, db, wt, wide_dx[:, 1 : 1 + c])
            torch.testing.assert_close(dw, expected_dw, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(db, expected_db, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(wide_dx[:, 1 : 1 + c], expected_dx, rtol=1e-5, atol=1e-4)
            assert wide_dx[:, :1].isnan().all() and wide_dx[:, 1 + c :].isnan().all()
            dw, db = torch.full((k, c), float("nan")), torch.full((k,), float("nan"))
            native.images_backward()(grad, x, dw, db)  # no dX: db from a pass of its own
            torch.testing.assert_close(dw, expected_dw, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(db, expected_db, rtol=1e-5, atol=1e-4)
            dw, untouched = torch.full((k, c), float("nan")), torch.full((k,), float("nan"))
            native.images_backward()(grad, x, dw, None)
            torch.testing.assert_close(dw, expected_dw, rtol=1e-5, atol=1e-4)
            assert untouched.isnan().all()
    finally:
        torch.set_num_threads(previous)


def test_images_backward_of_an_empty_batch_is_zero():
    """No images or no pixels: nothing to sum, so dW, db and dX are zeros (not whatever the buffers held)."""
    _needs_images()
    for n, p in ((0, 50), (2, 0)):
        dw, db, dx = torch.full((6, 4), float("nan")), torch.full((6,), float("nan")), torch.full((n, 4, p), float("nan"))
        native.images_backward()(torch.randn(n, 6, p), torch.randn(n, 4, p), dw, db, torch.randn(4, 6), dx)
        assert not dw.any() and not db.any() and not dx.any()


@pytest.mark.parametrize(
    "grad, x, dw, match",
    [
        ((2, 5, 9), (2, 3, 8), (5, 3), r"shapes \[2, 5, 9\] @ \[2, 3, 8\]\^T do not give \[5, 3\]"),
        ((2, 5, 9), (2, 3, 9), (3, 5), r"do not give \[3, 5\]"),
        ((2, 5, 9), (3, 3, 9), (5, 3), r"do not give \[5, 3\]"),
        ((5, 9), (2, 3, 9), (5, 3), "grad and x must be 3-d, dw 2-d"),
    ],
)
def test_images_backward_refuses_what_it_cannot_compute(grad, x, dw, match):
    """Mismatched shapes, other dtypes, strided pixels, a strided dw, and a dx without its wt are RuntimeErrors that
    name them."""
    _needs_images()
    op = native.images_backward()
    with pytest.raises(RuntimeError, match=match):
        op(torch.randn(grad), torch.randn(x), torch.empty(dw), None)
    with pytest.raises(RuntimeError, match="every tensor must be float32, got grad Double"):
        op(torch.randn(2, 5, 9).double(), torch.randn(2, 3, 9), torch.empty(5, 3), None)
    with pytest.raises(RuntimeError, match="need unit pixel strides and dw must be contiguous"):
        op(torch.randn(2, 9, 5).transpose(1, 2), torch.randn(2, 3, 9), torch.empty(5, 3), None)
    with pytest.raises(RuntimeError, match="need unit pixel strides and dw must be contiguous"):
        op(torch.randn(2, 5, 9), torch.randn(2, 3, 9), torch.empty(3, 5).t(), None)
    with pytest.raises(RuntimeError, match=r"db must be a contiguous \[5\], got \[4\]"):
        op(torch.randn(2, 5, 9), torch.randn(2, 3, 9), torch.empty(5, 3), torch.empty(4))
    with pytest.raises(RuntimeError, match="wt and dx come together"):
        op(torch.randn(2, 5, 9), torch.randn(2, 3, 9), torch.empty(5, 3), None, torch.randn(3, 5))
    with pytest.raises(RuntimeError, match=r"needs wt \[3, 5\] and dx \[2, 3, 9\], got \[5, 3\] and \[2, 3, 9\]"):
        op(torch.randn(2, 5, 9), torch.randn(2, 3, 9), torch.empty(5, 3), None, torch.randn(5, 3), torch.empty(2, 3, 9))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_one_pass_weight_gradients_keep_fp32_accuracy(layout):
    """dW and db of a 25088-pixel reduction (N=8, 56x56) on images_backward / rows_backward, against float64: within
    1e-6 of the largest value (about 8 ulps there). Each tile sums its chunk or block from zero and adds that to
    the running total once: channels_last reads 3.8e-7 here (F.conv2d 6.2e-7); summed into the total itself it
    read 3.5e-6."""
    _needs_rows_backward()
    _needs_images()
    g = torch.Generator().manual_seed(21)
    x = torch.randn(8, 32, 56, 56, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 32, 1, 1, generator=g) / 32**0.5).requires_grad_()
    b = torch.randn(64, generator=g).requires_grad_()
    upstream = torch.randn(8, 64, 56, 56, generator=g)
    x.requires_grad_()
    names = _op_names(lambda: torch.autograd.grad(pointwise_conv2d(x, w, b), (x, w, b), upstream))
    assert names.count("convlab.images_backward" if layout == "nchw" else "convlab.rows_backward") == 1, names
    _, dw, db = torch.autograd.grad(pointwise_conv2d(x, w, b), (x, w, b), upstream)
    exact_dw = torch.einsum("nkhw,nchw->kc", upstream.double(), x.double())
    assert (dw.flatten(1).double() - exact_dw).abs().max() <= 1e-6 * exact_dw.abs().max()
    exact_db = upstream.double().sum((0, 2, 3))
    assert (db.double() - exact_db).abs().max() <= 1e-6 * exact_db.abs().max()


def _needs_rows_backward(dtype=torch.float32):
    _needs_native()
    if native.rows_backward(dtype) is None:
        pytest.skip(f"native product {native.status()}")


# (M, C, K): channel tails under the 24-, 12-, 8- and 6-channel tiles of dW^T, K on one 16-wide panel (up to 16),
# 48-wide panels (48, 96, 100) and 64-wide ones (64, 128, 130), fp32's 32-wide one (30, 44 -> 48 in bf16), a last
# partial panel, one row and one channel, row counts under, at and over the 128-row block (several blocks per
# thread, so the prefetch of the next block runs, and a partial last block); for dX, C on one to four 16-column
# vectors and over one 64-column panel (130), row tails under each tile height.
GRAD_SHAPES = [(1, 1, 1), (5, 3, 7), (127, 8, 48), (128, 13, 64), (300, 33, 100), (1000, 8, 96), (257, 64, 130),
               (700, 6, 128), (2000, 21, 5), (389, 40, 44), (301, 130, 140), (150, 17, 30), (600, 50, 16)]  # fmt: skip


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_backward_matches_the_reductions(shape, threads, dtype):
    """``x^T @ grad``, the row sums of ``grad`` and ``grad @ w``, against float64, for ``x`` contiguous and a
    column slice of a wider matrix, ``w`` contiguous and a column slice, ``dx`` a column slice of a wider output;
    with and without ``db`` and ``dx`` (then they are left alone); NaN in the outputs beforehand, so every
    element must be written; one thread and two (each reduces into its own partial sums). bf16 (inputs and dx;
    dW and db are fp32 sums) pairs rows for dW, an odd last row with zero, and pairs columns for dx (K even):
    dW and db to fp32 rounding of the exact sums of the bf16 products, dx within one bf16 rounding."""
    _needs_rows_backward(dtype)
    m, c, k = shape
    if dtype == torch.bfloat16 and k % 2:
        k += 1
    gen = torch.Generator().manual_seed(m + c + k)
    grad, wide = torch.randn(m, k, generator=gen).to(dtype), torch.randn(m, c + 4, generator=gen).to(dtype)
    wide_w = torch.randn(k, c + 3, generator=gen).to(dtype)
    dx_tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-2)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for x, w in ((wide[:, :c].contiguous(), wide_w[:, :c].contiguous()), (wide[:, 3 : 3 + c], wide_w[:, 2 : 2 + c])):
            expected = (x.double().t() @ grad.double()).float()
            dwt, db = torch.full((c, k), float("nan")), torch.full((k,), float("nan"))
            wide_dx = torch.full((m, c + 5), float("nan")).to(dtype)
            native.rows_backward(dtype)(grad, x, dwt, db, w, wide_dx[:, 1 : 1 + c])
            torch.testing.assert_close(dwt, expected, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(db, grad.double().sum(0).float(), rtol=1e-5, atol=1e-4)
            expected_dx = (grad.double() @ w.double()).to(dtype)
            torch.testing.assert_close(wide_dx[:, 1 : 1 + c].double(), expected_dx.double(), **dx_tol)
            assert wide_dx[:, :1].isnan().all() and wide_dx[:, 1 + c :].isnan().all()
            dwt, untouched = torch.full((c, k), float("nan")), torch.full((k,), float("nan"))
            native.rows_backward(dtype)(grad, x, dwt, None)
            torch.testing.assert_close(dwt, expected, rtol=1e-5, atol=1e-4)
            assert untouched.isnan().all()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize(
    "grad, x, dwt, db, match",
    [
        ((4, 5), (3, 2), (2, 5), None, r"shapes \[3, 2\]\^T @ \[4, 5\] do not give \[2, 5\]"),
        ((4, 5), (4, 2), (5, 2), None, r"do not give \[5, 2\]"),
        ((4, 5), (4, 2), (2, 5), (4,), r"db must be a contiguous \[5\], got \[4\]"),
        ((4, 5, 1), (4, 2), (2, 5), None, "must be 2-d"),
    ],
)
def test_rows_backward_refuses_what_it_cannot_compute(grad, x, dwt, db, match):
    """Mismatched shapes, other dtypes, strided columns and a strided dwt are RuntimeErrors that name them."""
    _needs_rows_backward()
    db = None if db is None else torch.empty(db)
    with pytest.raises(RuntimeError, match=match):
        native.rows_backward()(torch.randn(grad), torch.randn(x), torch.empty(dwt), db)
    with pytest.raises(RuntimeError, match="must be both float32 or both bfloat16, dwt and db float32, got Double"):
        native.rows_backward()(torch.randn(4, 5).double(), torch.randn(4, 2), torch.empty(2, 5), None)
    with pytest.raises(RuntimeError, match="must be both float32 or both bfloat16, dwt and db float32, got BFloat16"):
        native.rows_backward()(torch.randn(4, 5).bfloat16(), torch.randn(4, 2).bfloat16(), torch.empty(2, 5).bfloat16(), None)
    with pytest.raises(RuntimeError, match="need unit column strides and dwt must be contiguous"):
        native.rows_backward()(torch.randn(5, 4).t(), torch.randn(4, 2), torch.empty(2, 5), None)
    with pytest.raises(RuntimeError, match="need unit column strides and dwt must be contiguous"):
        native.rows_backward()(torch.randn(4, 5), torch.randn(4, 2), torch.empty(5, 2).t(), None)
    with pytest.raises(RuntimeError, match="w and dx come together"):
        native.rows_backward()(torch.randn(4, 5), torch.randn(4, 2), torch.empty(2, 5), None, torch.randn(5, 2))
    with pytest.raises(RuntimeError, match=r"needs w \[5, 2\] and dx \[4, 2\], got \[2, 5\] and \[4, 2\]"):
        native.rows_backward()(torch.randn(4, 5), torch.randn(4, 2), torch.empty(2, 5), None, torch.randn(2, 5), torch.empty(4, 2))


@pytest.mark.parametrize(
    "c, k, hw, bias, expected",
    [
        (24, 64, (46, 46), True, 1),  # 4232 rows at N=2: from GRAD_KERNEL_MIN_ROWS, dW and db in one pass
        (24, 64, (46, 46), False, 1),  # no bias: dW alone
        (24, 64, (45, 45), True, 0),  # 4050 rows: below it
        (128, 128, (46, 46), True, 1),  # GRAD_KERNEL_MAX_IN
        (136, 136, (46, 46), True, 0),  # above it
        (64, 32, (46, 46), True, 1),  # fewer outputs than inputs: from GRAD_KERNEL_NARROW_MIN_OUT outputs
        (64, 24, (46, 46), True, 0),  # below it
        (512, 32, (46, 46), False, 1),  # up to GRAD_KERNEL_NARROW_MAX_IN inputs
        (520, 32, (46, 46), True, 0),  # above it
        (64, 16, (46, 46), True, 1),  # up to GRAD_KERNEL_NARROWEST_MAX_OUT outputs, one 16-column panel
        (72, 16, (46, 46), True, 0),  # above GRAD_KERNEL_NARROWEST_MAX_IN inputs
        (16, 12, (46, 46), False, 1),
    ],
)
def test_channels_last_backward_takes_the_avx512_kernel_where_measured(c, k, hw, bias, expected):
    """fp32 channels_last: dX, dW and (with a bias) db in one pass on rows_backward inside the measured bounds,
    else dX and dW on the native matmul and db a separate sum; all gradients as F.conv2d's."""
    from models import functional

    _needs_rows_backward()
    n = 2
    narrow = k >= functional.GRAD_KERNEL_NARROW_MIN_OUT and c <= functional.GRAD_KERNEL_NARROW_MAX_IN
    narrowest = k <= functional.GRAD_KERNEL_NARROWEST_MAX_OUT and c <= functional.GRAD_KERNEL_NARROWEST_MAX_IN
    in_bounds = c <= functional.GRAD_KERNEL_MAX_IN if k >= c else narrow or narrowest
    assert (n * hw[0] * hw[1] >= functional.GRAD_KERNEL_MIN_ROWS and in_bounds) == bool(expected)
    g = torch.Generator().manual_seed(c + k + hw[0])
    x = torch.randn(n, c, *hw, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(k, c, 1, 1, generator=g) / c**0.5, torch.randn(k, generator=g) if bias else None
    names, _ = dispatch_and_compare(x, w, b, g, tol=(1e-5, 1e-4), grad_tol=(1e-4, 1e-3))
    assert names.count("convlab.rows_backward") == expected, names
    forward_matmul = not bias and "convlab.linear_out" not in names
    assert names.count("convlab.matmul_out") == 2 * (1 - expected) + forward_matmul, names
    assert ("aten.sum" in names) == (bias and not expected), names


def test_rows_backward_bf16_dx_needs_even_columns():
    """bf16 dX multiplies pairs of grad's columns: an odd count is refused by name, not read past the row."""
    _needs_rows_backward(torch.bfloat16)
    grad, x, w = (torch.randn(*shape).bfloat16() for shape in ((4, 5), (4, 2), (5, 2)))
    with pytest.raises(RuntimeError, match=r"grad needs an even number of them, got shape \[4, 5\]"):
        native.rows_backward(torch.bfloat16)(grad, x, torch.empty(2, 5), None, w, torch.empty(4, 2).bfloat16())


def test_bf16_channels_last_backward_takes_the_avx512_kernel_where_measured():
    """bf16 channels_last, as bf16 tensors and under CPU autocast: the backward on rows_backward inside the bounds
    (here an odd output count keeps it off, as bf16 dX needs pairs); gradients as F.conv2d's to bf16 precision."""
    _needs_rows_backward(torch.bfloat16)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 24, 46, 46, generator=g).contiguous(memory_format=torch.channels_last)
    for k, expected in ((64, 1), (63, 0)):
        w, b = torch.randn(k, 24, 1, 1, generator=g) / 5, torch.randn(k, generator=g)
        names, _ = dispatch_and_compare(x.bfloat16(), w.bfloat16(), b.bfloat16(), g, tol=(2e-2, 5e-2), grad_tol=(2e-2, 2e-1))
        assert names.count("convlab.rows_backward") == expected, names
    xg = x.clone().requires_grad_()
    w64, b64 = (torch.randn(64, 24, 1, 1, generator=g) / 5).requires_grad_(), torch.randn(64, generator=g).requires_grad_()
    upstream = torch.randn(2, 64, 46, 46, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        names = _op_names(lambda: torch.autograd.grad(pointwise_conv2d(xg, w64, b64), (xg, w64, b64), upstream))
        ours = torch.autograd.grad(pointwise_conv2d(xg, w64, b64), (xg, w64, b64), upstream)
        theirs = torch.autograd.grad(F.conv2d(xg, w64, b64), (xg, w64, b64), upstream)
    assert names.count("convlab.rows_backward") == 1, names
    for got, want in zip(ours, theirs):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-1)


@pytest.mark.parametrize(
    "memory_format, hw, op",
    [(torch.channels_last, (46, 46), "convlab.rows_backward"), (torch.contiguous_format, (30, 30), "convlab.images_backward")],
)
def test_backward_without_an_input_gradient(memory_format, hw, op):
    """An input that needs no gradient (a network's first layer, a frozen trunk): the one-pass kernel computes dW and
    db alone (images_backward: db in a pass of its own over each chunk), and no product runs for dX."""
    _needs_rows_backward()
    _needs_images()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 16, *hw, generator=g).contiguous(memory_format=memory_format)
    w = (torch.randn(32, 16, 1, 1, generator=g) / 4).requires_grad_()
    b = torch.randn(32, generator=g).requires_grad_()
    upstream = torch.randn(2, 32, *hw, generator=g)
    names = _op_names(lambda: torch.autograd.grad(pointwise_conv2d(x, w, b), (w, b), upstream))
    assert names.count(op) == 1 and "convlab.matmul_out" not in names, names
    ours = torch.autograd.grad(pointwise_conv2d(x, w, b), (w, b), upstream)
    for got, want in zip(ours, torch.autograd.grad(F.conv2d(x, w, b), (w, b), upstream)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "k, bias, expected",
    [
        (64, True, 1),
        (128, False, 1),
        (96, False, 1),
        (32, False, 1),
        (16, False, 1),
        (48, True, 1),
        (144, True, 1),
        (48, False, 0),
        (40, False, 0),
    ],
)
def test_channels_last_forward_takes_the_avx512_kernel_where_measured(k, bias, expected):
    """fp32 channels_last with at least LINEAR_MIN_ROWS rows: the forward on linear_out with a bias, or with at
    most LINEAR_NARROW_OUT output channels or a multiple of LINEAR_COLUMNS (else as before), dX and dW on
    matmul_out; all three as F.conv2d's."""
    from models.functional import LINEAR_COLUMNS, LINEAR_MIN_ROWS, LINEAR_NARROW_OUT

    _needs_linear()
    n, c, h = 2, 24, 23
    assert n * h * h >= LINEAR_MIN_ROWS and (bias or k <= LINEAR_NARROW_OUT or k % LINEAR_COLUMNS == 0) == bool(expected)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(n, c, h, h, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(k, c, 1, 1, generator=g) / c**0.5, torch.randn(k, generator=g) if bias else None
    names, ours = dispatch_and_compare(x, w, b, g, tol=(1e-5, 1e-4))
    assert names.count("convlab.linear_out") == expected, names
    assert names.count("convlab.matmul_out") == 2 + (not bias and not expected), names
    assert ours.is_contiguous(memory_format=torch.channels_last)
    small = x[:, :, :7, :7]  # 98 rows: below LINEAR_MIN_ROWS
    assert "convlab.linear_out" not in _op_names(lambda: pointwise_conv2d(small, w.detach(), None if b is None else b.detach()))


# (N, C, K, H, W, channels_last, bias, native products expected over forward, dX and dW)
NATIVE_CASES = [
    (2, 16, 24, 5, 7, True, False, 3),
    (2, 16, 24, 5, 7, True, True, 2),  # a bias: the forward on the inner product, which adds it as it writes
    (2, 128, 24, 3, 5, True, True, 2),
    # NCHW from IMAGES_GRAD_MIN_PIXELS with K >= C: the backward in one pass (images_backward); with K < C one
    # batched product each way from PER_IMAGE_MIN_PIXELS; the forward on images_out with few input channels
    (3, 12, 20, 29, 31, False, True, 2),
    (3, 72, 12, 29, 31, False, True, 3),
    (2, 40, 24, 28, 28, False, False, 3),
    (2, 8, 16, 56, 57, False, False, 2),  # from IMAGES_MIN_PIXELS: the forward (and an unfused dX) on images_out
    (2, 24, 8, 56, 57, False, False, 3),
    (3, 40, 24, 14, 14, False, True, 2),  # H*W >= NATIVE_MIN_PIXELS: dW folds the batch, on the inner product
    (4, 16, 40, 7, 7, False, True, 2),  # smaller: the forward and dX fold the batch on the native product, dW as above
]


@pytest.mark.parametrize(
    "case", NATIVE_CASES, ids=lambda c: "x".join(map(str, c[:5])) + ("-cl" if c[5] else "-nchw") + ("-bias" if c[6] else "")
)
def test_pointwise_takes_the_native_product_and_matches_conv(case):
    """fp32 on CPU, the forward and both gradients run where the rules send them and equal F.conv2d."""
    from models import functional
    from models.functional import IMAGES_MIN_PIXELS, NATIVE_MIN_PIXELS, PER_IMAGE_MIN_PIXELS, _images_kernel_fits

    _needs_native()
    n, c, k, h, w_, channels_last, bias, expected = case
    fused = (
        not channels_last
        and native.images_backward() is not None
        and h * w_ >= functional.IMAGES_GRAD_MIN_PIXELS
        and c <= functional.IMAGES_GRAD_MAX_IN
        and k >= c
    )
    if channels_last:  # dX and dW always; the forward without a bias
        assert expected == 2 + (not bias)
    elif fused:  # the forward, then the backward in one pass
        assert expected == 2
    else:  # the forward and dX always (broadcast from NATIVE_MIN_PIXELS, folded below), dW from PER_IMAGE_MIN_PIXELS
        assert expected == 2 + (h * w_ >= PER_IMAGE_MIN_PIXELS)
    g = torch.Generator().manual_seed(sum(case))
    x = torch.randn(n, c, h, w_, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(k, c, 1, 1, generator=g) / c**0.5
    b = torch.randn(k, generator=g) if bias else None
    names, ours = dispatch_and_compare(x, w, b, g, tol=(1e-5, 1e-4), grad_tol=(1e-4, 1e-3))
    kernels = 0
    if not channels_last and native.images_out() is not None:  # the forward and (from IMAGES_MIN_PIXELS, unfused) dX
        kernels = _images_kernel_fits(c, h * w_, b) + (h * w_ >= IMAGES_MIN_PIXELS and not fused)
    assert names.count("convlab.images_out") == kernels, names
    assert names.count("convlab.images_backward") == fused, names
    products = names.count("convlab.matmul_out") + kernels + fused
    assert products == expected and "aten.convolution" not in names, names
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if not channels_last:  # images_out and the broadcast forward read x as it lies; the folded one copies it into (C, N*P) columns
        forward = _op_names(lambda: pointwise_conv2d(x.detach(), w.detach(), None if b is None else b.detach()))
        assert ("aten.clone" in forward) == (h * w_ < NATIVE_MIN_PIXELS), forward


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_channels_last_takes_the_native_product_where_measured(bias):
    """bf16 channels_last: dX and dW on the native product; the forward too unless it has a bias (then the inner
    product, which adds it as it writes). Values as F.conv2d's, to bf16 precision."""
    _needs_native()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 5, 7, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(24, 16, 1, 1, generator=g).bfloat16(), torch.randn(24, generator=g).bfloat16() if bias else None
    names, _ = dispatch_and_compare(x, w, b, g, tol=(2e-2, 5e-2), grad_tol=(2e-2, 1e-1))
    assert names.count("convlab.matmul_out") == (2 if bias else 3), names
    assert ("mkldnn._linear_pointwise" in names) == bias, names


@pytest.mark.parametrize("c, bias, expected", [(16, True, 1), (32, False, 1), (272, True, 0)])
def test_bf16_channels_last_forward_takes_the_avx512_kernel_where_measured(c, bias, expected):
    """bf16 with at least LINEAR_BF16_MIN_ROWS rows: the forward on linear_out up to LINEAR_BF16_MAX_IN input
    channels, as a bf16 tensor and under CPU autocast; values as F.conv2d's, to bf16 precision."""
    from models.functional import LINEAR_BF16_MAX_IN, LINEAR_BF16_MIN_ROWS

    _needs_linear(torch.bfloat16)
    n, h, k = 2, 46, 64
    assert n * h * h >= LINEAR_BF16_MIN_ROWS and (c <= LINEAR_BF16_MAX_IN) == bool(expected)
    g = torch.Generator().manual_seed(c)
    x = torch.randn(n, c, h, h, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(k, c, 1, 1, generator=g) / c**0.5, torch.randn(k, generator=g) if bias else None
    names, _ = dispatch_and_compare(x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16(), g,
                                    tol=(2e-2, 5e-2), grad_tol=(2e-2, 1e-1))  # fmt: skip
    assert names.count("convlab.linear_out") == expected, names
    with torch.autocast("cpu", dtype=torch.bfloat16):
        names = _op_names(lambda: pointwise_conv2d(x, w, b))
        ours, theirs = pointwise_conv2d(x, w, b), F.conv2d(x, w, b)
    assert names.count("convlab.linear_out") == expected, names
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=5e-2)


def test_without_avx512_the_forward_stays_on_onednn(monkeypatch):
    """On a CPU without AVX-512 (so without linear_out and images_out) the status says so and the forward takes the
    paths it had before the kernels, with the same results; bf16 alone missing reads as its own status."""
    _needs_native()
    monkeypatch.setattr(native, "linear_out", lambda dtype=torch.float32: None)
    assert native.status() == "loaded, no AVX-512 kernel"
    x = torch.randn(2, 16, 23, 23).contiguous(memory_format=torch.channels_last)
    names = _op_names(lambda: _assert_matches_conv(pointwise_conv2d, x, torch.randn(64, 16, 1, 1), torch.randn(64)))
    assert "convlab.linear_out" not in names and "mkldnn._linear_pointwise" in names, names
    assert native.images_out() is None and native.rows_backward() is None and native.images_backward() is None
    x = torch.randn(2, 16, 28, 28)  # NCHW inside images_out's bounds: the batched native product, as before it
    names = _op_names(lambda: _assert_matches_conv(pointwise_conv2d, x, torch.randn(32, 16, 1, 1), torch.randn(32)))
    assert "convlab.images_out" not in names and "convlab.matmul_out" in names, names
    fp32_only = {torch.float32: torch.ops.convlab.linear_out, torch.bfloat16: None}
    monkeypatch.setattr(native, "linear_out", lambda dtype=torch.float32: fp32_only[dtype])
    assert native.status() == "loaded, AVX-512 kernel fp32 only"


def test_absent_native_op_falls_back_with_one_warning(monkeypatch):
    """A failed build (no compiler, a torch whose symbols moved) leaves pointwise_conv2d correct on its Python lowering."""

    def broken_build(*args, **kwargs):
        raise RuntimeError("c++ failed (exit 1): test")

    monkeypatch.setattr(native, "build", broken_build)
    native.matmul_out.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"native matmul_out unavailable \(c\+\+ failed \(exit 1\): test\)"):
            assert native.matmul_out() is None
        assert native.status() == "unavailable (c++ failed (exit 1): test)"
        x = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last)
        names = _op_names(lambda: _assert_matches_conv(pointwise_conv2d, x, torch.randn(24, 16, 1, 1), torch.randn(24)))
        assert "convlab.matmul_out" not in names and "mkldnn._linear_pointwise" in names, names
        native.linear_out.cache_clear()
        assert native.linear_out() is None  # the AVX-512 kernel lives in the same library
        big = torch.randn(2, 16, 23, 23).contiguous(memory_format=torch.channels_last)
        names = _op_names(lambda: _assert_matches_conv(pointwise_conv2d, big, torch.randn(64, 16, 1, 1), torch.randn(64)))
        assert "convlab.linear_out" not in names and "mkldnn._linear_pointwise" in names, names
        monkeypatch.setenv("CONVLAB_NATIVE", "0")
        native.matmul_out.cache_clear()
        with warnings_as_errors():
            assert native.matmul_out() is None
        assert native.status() == "off (CONVLAB_NATIVE=0)"
    finally:
        native.matmul_out.cache_clear()  # the next caller loads the real op again
        native.linear_out.cache_clear()


def test_a_second_load_in_one_process_keeps_the_first_library(monkeypatch):
    """After matmul_out's cache is cleared (a test, a notebook), the next call builds, and loads nothing more when a
    convlab library is loaded already: a second one, built from edited sources, would register the ops twice and
    abort the process (seen when the C++ changed under a running test session)."""
    _needs_native()

    def no_second_load(path):
        raise AssertionError(f"loaded a second library: {path}")

    monkeypatch.setattr(torch.ops, "load_library", no_second_load)
    native.matmul_out.cache_clear()
    try:
        assert native.matmul_out() is torch.ops.convlab.matmul_out
        assert native.status().startswith("loaded")
    finally:
        native.matmul_out.cache_clear()


@contextlib.contextmanager
def warnings_as_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_build_errors_name_the_cause(tmp_path, monkeypatch):
    """A compiler that fails and a missing compiler are RuntimeErrors that say which; no half-written library is left."""
    with pytest.raises(RuntimeError, match=r"^false failed \(exit 1\)"):
        native.build(cache=tmp_path, compiler="/bin/false")
    assert not list(tmp_path.rglob("*.so"))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler found"):
        native.build(cache=tmp_path)


def test_cxx_is_a_command_line(monkeypatch):
    """$CXX may carry a wrapper or flags (``ccache g++``): the program is looked up on the PATH, the words after it kept."""
    monkeypatch.setenv("CXX", "true -O1")  # `true`: a program every Linux has
    compiler = native._compiler()
    assert compiler is not None and compiler.endswith("true -O1") and os.path.isabs(compiler.split()[0])
    assert native._command(compiler, native.SOURCES, Path("x.so"))[:3] == [compiler.split()[0], "-O1", "-O2"]
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert native._compiler() is None

"""Functional ops written from scratch: the 1x1 convolution as a matrix product over channels."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

__all__ = ["pointwise_conv2d"]

# Below this many pixels per image (H*W), NCHW input is folded into one (K, C) @ (C, N*H*W) product.
# Per-image products (K, C) @ (C, H*W) this thin leave the GEMM kernel repacking the weight for little
# work: with N=8 on a 2-core AVX-512 CPU, MobileNet's 7x7 layers ran 1.2-1.3x faster folded (fp32,
# one thread) and bf16 ones up to 2.5x, while 14x14 layers and larger ran as fast or faster unfolded.
FOLD_MAX_PIXELS = 64


class _BatchedPointwise(torch.autograd.Function):
    """NCHW 1x1 convolution ``y[n] = W @ x[n] + b`` on ``x`` ``(N, C, P)``, ``W`` ``(K, C)``: one batched GEMM.

    Forward fuses the bias: ``baddbmm`` writes the bias into the output and the GEMM accumulates
    onto it, instead of a second pass over the output. Backward is the three products of a linear
    layer, ``dx[n] = W^T @ dy[n]``, ``dW = sum_n dy[n] @ x[n]^T``, ``db = sum dy``: batched products
    on views when images have at least as many pixels as channels (torch's ``matmul`` of a 2-d by a
    3-d tensor, which autograd would otherwise run, copies its operands), else one product each with
    the batch folded into the columns. Built from differentiable ops, so double backward works.
    """

    @staticmethod
    def forward(ctx: Any, x3: Tensor, w2d: Tensor, bias: Tensor | None) -> Tensor:
        n, c, p = x3.shape
        k = w2d.shape[0]
        w3 = w2d.expand(n, k, c)  # (N, K, C), stride 0 over N: no copy
        # (N, K, C) @ (N, C, P) -> (N, K, P); baddbmm starts from the bias broadcast over (N, K, P).
        out = torch.bmm(w3, x3) if bias is None else torch.baddbmm(bias.view(1, k, 1).expand(n, k, p), w3, x3)
        ctx.save_for_backward(x3, w2d)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        grad = grad.contiguous()  # (N, K, P)
        # Under autocast the forward ran in a lower precision than the saved tensors: follow grad's dtype.
        x3, w2d = (t.to(grad.dtype) for t in ctx.saved_tensors)  # (N, C, P), (K, C)
        n, k, p = grad.shape
        c = x3.shape[1]
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        # More channels than pixels: the per-image products would be thin, and the (N, K, C) per-image
        # weight gradients larger than grad itself, so the batch is folded into the columns; on a GPU the
        # weight gradient is folded for large images too (see _fold_weight_grad).
        fold_x, fold_w = p < c, p < c or (need_w and _fold_weight_grad(grad))
        grad_cols = grad.transpose(0, 1).reshape(k, n * p) if fold_x or fold_w else None  # (K, N*P), a copy
        if need_x and fold_x:
            grad_x = (w2d.t() @ grad_cols).view(c, n, p).transpose(0, 1).contiguous()  # (N, C, P)
        elif need_x:
            grad_x = torch.bmm(w2d.t().expand(n, c, k), grad)  # (N, C, K) @ (N, K, P) -> (N, C, P)
        if need_w and fold_w:
            grad_w = grad_cols @ x3.transpose(0, 1).reshape(c, n * p).t()  # (K, N*P) @ (N*P, C) -> (K, C)
        elif need_w:
            grad_w = torch.bmm(grad, x3.transpose(1, 2)).sum(0)  # (N, K, C) summed over images -> (K, C)
        if ctx.has_bias and need_b:
            grad_b = grad.sum((0, 2))  # (K,)
        return grad_x, grad_w, grad_b


# On CUDA, fp32 NCHW weight gradients of images with at least this many pixels run folded (see _fold_weight_grad).
FOLD_WEIGHT_GRAD_MIN_PIXELS_CUDA = 2048


def _fold_weight_grad(grad: Tensor) -> bool:
    """Whether the NCHW weight gradient ``sum_n dy[n] @ x[n]^T`` runs as one product over all N*P columns.

    Per image it is N GEMMs, each with one small (K, C) output and a P-long reduction: few thread
    blocks on a GPU. Folded, both operands are first copied into ``(K, N*P)`` and ``(N*P, C)``.
    Measured on an H200 (``benchmarks/gpu/ab_nchw_weight_grad.py``, N=8, CUDA graphs), forward +
    backward: fp32 folded was 1.25-2.70x faster on the 56x56 and 112x112 layers (32->64 @112:
    0.51 -> 0.19 ms), a tie on 32->512 @56 and 0.88-0.90x on the 28x28 ones; bf16 folded was slower
    on every shape (0.71-0.89x). Hence fp32 on CUDA with at least 2048 pixels per image. Folding was
    not measured on the CPU, which keeps the per-image form (at 0.97-1.35x torch's speed on one
    thread, ``benchmarks/threads1``).
    """
    return grad.is_cuda and grad.dtype == torch.float32 and grad.shape[2] >= FOLD_WEIGHT_GRAD_MIN_PIXELS_CUDA


@functools.cache
def _onednn_linear_dtypes() -> frozenset[torch.dtype]:
    """Dtypes for which this torch has oneDNN's CPU matrix product (its inner-product primitive)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return frozenset()
    dtypes = {torch.float32}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.add(torch.bfloat16)
    return frozenset(dtypes)


def _canonical(t: Tensor) -> Tensor:
    """``t`` with exactly a contiguous tensor's strides, as oneDNN's memory descriptors need them.

    A free view when ``t`` is contiguous: torch then ignores the strides of size-1 dimensions (a
    ``::3`` slice of a 1-pixel-wide image leaves stride 3 on it), oneDNN does not, and refuses strides
    that overlap ("could not construct a memory descriptor using strides"). Otherwise a copy.
    """
    if not t.is_contiguous():
        return t.contiguous()
    shape = t.shape
    if 1 not in shape and 0 not in shape:  # every dimension counts: a contiguous tensor's strides already
        return t
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    strides.reverse()
    return t if list(t.stride()) == strides else t.as_strided(t.shape, strides)


# Dtypes the native product was measured for (fp32 against MKL and oneDNN's inner product; bf16 channels_last).
NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _native_matmul(*operands: Tensor) -> Callable[..., None] | None:
    """convlab's native ``matmul_out(a, b, out, beta)`` (models/native.py) for non-empty CPU operands of one
    dtype in ``NATIVE_DTYPES``, eagerly; else None."""
    dtype = operands[0].dtype
    if torch.compiler.is_compiling() or dtype not in NATIVE_DTYPES:
        return None
    if any(t.dtype != dtype or t.device.type != "cpu" or not t.numel() for t in operands):
        return None
    return native.matmul_out()


def _unit_columns(t: Tensor) -> Tensor:
    """A 2-d ``t`` as convlab's AVX-512 kernels read it: itself when its columns lie adjacent, else a contiguous copy."""
    return t if t.stride(1) == 1 else t.contiguous()


def _matmul_operand(t: Tensor) -> Tensor:
    """A 2-d ``t`` as the native product reads it without a copy: contiguous, or the transpose of a contiguous matrix."""
    if t.is_contiguous():
        return _canonical(t)
    if t.t().is_contiguous():
        return _canonical(t.t()).t()
    return t.contiguous()


def _rows_product(rows: Tensor, w2d: Tensor, bias: Tensor | None) -> Tensor:
    """``rows @ w2d^T + bias`` for ``rows`` ``(M, C)``, ``w2d`` ``(K, C)``: one matrix product, no autograd.

    On CPU it runs oneDNN's matrix product where this torch has one for the dtype: for the tall,
    thin matrices of a 1x1 convolution (M = N*H*W rows, C and K in the tens) it is up to 1.7x faster
    than the BLAS ``sgemm`` behind ``F.linear`` on a 2-core AVX-512 CPU (see ``benchmarks/pointwise.md``).
    Without a bias, in fp32 and bf16, that is convlab's native product (oneDNN's matmul primitive,
    which reads the weight as it lies) when it loaded; with a bias, oneDNN's inner product, which
    adds it as it writes, where the native product needs a pass over the output for it. One-off
    A/Bs (2 threads, N=8, the pointwise suite's channels_last layers, against torch's convolution):
    fp32 without a bias the native product read 0.94-1.40x, the inner product 0.76-1.33x; with a
    bias, the native product and its pass against the inner product (the layout _weight_operand
    picks) on five layers in three rounds, 128->128 @56 0.77-0.90x against 0.75-0.96x (a tie),
    128->256 @28, 256->256 @28 and 256->512 @14 0.78-1.00x against 0.92-1.02x, 32->512 @56
    0.62-0.63x against 0.84-0.95x. bf16
    without a bias 0.97-1.39x against 0.86-1.31x; with one 0.50-1.32x against 0.89-1.32x.
    ``dX = dY W``: native faster on all 12, fp32 and bf16 (bf16 1024->1024 @7 1.25 -> 0.89 ms).
    """
    m = rows.shape[0]
    mm = _native_matmul(rows, w2d) if bias is None else None
    if mm is not None:
        out = rows.new_empty(m, w2d.shape[0])
        mm(_matmul_operand(rows), _matmul_operand(w2d).t(), out, 0.0)  # (M, C) @ (C, K)
        return out
    if rows.device.type == "cpu" and m and rows.dtype in _onednn_linear_dtypes() and w2d.dtype == rows.dtype:
        # A sliced or expanded bias read as it lies gave wrong values, and oneDNN refuses overlapping
        # strides: every operand goes in with a contiguous tensor's strides.
        bias = None if bias is None else _canonical(bias)
        return torch.ops.mkldnn._linear_pointwise(_canonical(rows), _weight_operand(w2d, rows.shape[0]), bias, "none", [], "")
    return F.linear(rows, w2d, bias)


# convlab's AVX-512 kernel runs the channels_last forward of products with a bias, or with at most LINEAR_NARROW_OUT
# output channels or a multiple of LINEAR_COLUMNS, and, in fp32, at least LINEAR_MIN_ROWS rows; in bf16 at least
# LINEAR_BF16_MIN_ROWS rows and at most LINEAR_BF16_MAX_IN input channels (see _forward_product).
LINEAR_NARROW_OUT = 32
LINEAR_COLUMNS = 32
LINEAR_MIN_ROWS = 1024
LINEAR_BF16_MIN_ROWS = 4096
LINEAR_BF16_MAX_IN = 256


def _forward_product(rows: Tensor, w2d: Tensor, bias: Tensor | None) -> Tensor:
    """The channels_last forward ``rows @ w2d^T + bias``, a new ``(M, K)`` tensor: convlab's AVX-512 kernel where
    measured faster, else :func:`_rows_product`.

    The kernel (``models/csrc/avx512_linear.cpp``) starts its register tiles at the bias, so the bias costs no
    pass, and streams outputs of at least ``native.STREAM_MIN_BYTES`` past the cache. Its panels are 64 columns
    wide, or 16 or 32 for up to 16 or 32 outputs, and 32 or 48 where that pads less (96, 160; 48, 144), and each
    product packs the weight first. One-off A/Bs, 2 threads, N=8, against torch's convolution (``/tmp`` scripts,
    not kept):

    * fp32, the pointwise suite's 12 layers with a bias: 1.00-1.11x where the inner product read 0.91-1.02x,
      from 14x14 up; at 7x7 (392 rows) 1.00-1.02x against 1.29-1.32x. Without a bias 1.00-1.10x against the
      native matmul's 0.77-0.97x, and again slower at 7x7. As ``dX = dY W`` (C columns) it lost on 8 of the 12
      layers to the native matmul, which keeps it. Non-temporal stores for outputs of 4 MiB and more:
      32->256 @56 1.11x with them, 0.67x without; 128->128 @56 1.03-1.04x against 0.96-0.98x.
    * narrow layers, on 16- and 32-column panels (with 64-column ones alone, MobileNet v2's 16-160 outputs had
      read 0.33-0.74x): 2 threads, fp32 and bf16, with and without a bias, against the path they would take
      otherwise (the native matmul, or oneDNN's inner product with a bias), on 19 layers with 8-32 outputs
      or 96 or 160 (CIFAR sizes at batch 128, MobileNet v2's at batch 8): 1.03-2.63x, and 0.91-1.51x torch's
      convolution; 32->32 @28 at batch 128 in bf16 (separable) 1.47x, 1.10x torch's. Other widths (40, 48
      and 144 outputs on 48-column panels, 80 on 32-column ones): with a bias 1.17-3.4x the inner product;
      without one 0.73-1.35x the native matmul (32->80 fp32 0.73x, 24->144 bf16 at batch 128 0.75x), which
      keeps those.
    * bf16 (it reduces in one block, see the source): with a bias 1.01-1.25x against the inner product's
      0.91-1.06x on the eight layers from 28x28 up with at most 256 input channels; 0.92-0.94x against
      1.01-1.03x on 256->512 and 512->512 @14, 0.75-0.88x against 1.30-1.40x at 7x7. Without a bias 1.00-1.10x
      against the native matmul's 0.93-1.03x on those eight, and at batch 128 on the separable model's
      CIFAR-size layers (4096 rows and more) 1.02-1.08x against 0.97-1.02x.
    """
    (m, c), k = rows.shape, w2d.shape[0]
    if rows.dtype == torch.float32:
        fits = m >= LINEAR_MIN_ROWS
    elif rows.dtype == torch.bfloat16:
        fits = m >= LINEAR_BF16_MIN_ROWS and c <= LINEAR_BF16_MAX_IN and c % 2 == 0
    else:
        fits = False
    fits = fits and (bias is not None or k <= LINEAR_NARROW_OUT or k % LINEAR_COLUMNS == 0)
    # _native_matmul's checks (eager, CPU, non-empty, one dtype; the library loaded) hold for both native ops.
    if fits and _native_matmul(*((rows, w2d) if bias is None else (rows, w2d, bias))):
        kernel = native.linear_out(rows.dtype)
        if kernel is not None:
            out = rows.new_empty(m, k)
            kernel(_unit_columns(rows), w2d, bias, out, native.STREAM_MIN_BYTES)
            return out
    return _rows_product(rows, w2d, bias)


# fp32 weights ``(K, C)`` go to oneDNN's product in another layout than they lie in only for products of at
# least this many rows; there, narrower than COLUMN_MAJOR_MAX_OUT rows K as the transpose of a contiguous
# ``(C, K)``, wider ones packed into oneDNN's blocked layout (see _weight_operand).
RELAYOUT_MIN_ROWS = 4096
COLUMN_MAJOR_MAX_OUT = 512


def _weight_operand(w2d: Tensor, m: int) -> Tensor:
    """The ``(K, C)`` weight of ``rows @ w2d^T`` (``m`` rows) in the layout oneDNN's fp32 product runs fastest on.

    oneDNN's matrix product reads the weight by its strides and works on ``W^T`` ``(C, K)``: stored
    column-major (``W^T`` contiguous, strides ``(1, K)``) the kernel reads it in place, stored
    row-major (as a ``(K, C)`` weight lies) it transposes blocks of it as it goes. Which pays for
    its per-call copy depends on the product's rows, and on this shared host also on the hour: two
    kept runs of ``benchmarks/ab_weight_layout.py`` five minutes apart (2 threads, N=8, each layout
    timed with its per-call copy or packing, against torch's 1x1 convolution; files
    ``benchmarks/ab_weight_layout_at_bdecc8d.md``, then ``ab_weight_layout.md``) ranked the layouts
    differently on the larger layers:

    * at least 4096 rows (28x28 and larger at N=8) and K < 512: a column-major copy. On these 15
      layers it read 0.97-1.13x torch in the first run, where the weight as it lies read 0.82-0.91x
      on 10 of them; in the second the two were within 6% of each other (as it lies 0.98-1.11x,
      the copy 0.95-1.11x). The copy's worst case is the smaller loss;
    * at least 4096 rows and K >= 512: oneDNN's packed layout (``_reorder_linear_weight``, about
      0.08 ms a call), 0.95-0.96x torch on 32->512 @56 in both runs, where the weight as it lies
      read 0.83x and then 1.02x;
    * fewer rows (the 14x14 and 7x7 layers at N=8): the weight as it lies, ahead of the
      column-major copy on all 15 such layers in both runs (MobileNet v2's 192->64 @14 1.19x
      against 1.10x torch, 576->160 @7 1.15x against 0.94x): on so few rows the copy costs what
      the product gains.

    The backward's ``dY @ W`` passes ``W^T``, a free column-major view, taken as it is whatever
    K and m: a row-major copy of it was slower on all 31 layers in both runs (0.54-0.99x its speed).
    """
    k, c = w2d.shape
    if w2d.dtype != torch.float32 or min(k, c) < 2:
        return _canonical(w2d)  # measured for fp32 only; a size-1 dimension has no layout to choose
    if w2d.stride() == (1, k):  # column-major already: free
        return w2d
    if m < RELAYOUT_MIN_ROWS:
        return _canonical(w2d)
    if k < COLUMN_MAJOR_MAX_OUT:
        return w2d.t().contiguous().t()  # a column-major copy
    if _onednn_packing_available():
        return torch.ops.mkldnn._reorder_linear_weight(_canonical(w2d), m)
    return _canonical(w2d)


@functools.cache
def _onednn_packing_available() -> bool:
    """Whether this torch can pack a weight into oneDNN's blocked layout for its product."""
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


# Below this many rows, or fewer rows than the gradient has elements (C*K), the weight gradient is
# one GEMM; otherwise (CPU, rows a multiple of the threads) one batched GEMM over a row slab per
# thread, then a sum (see _weight_grad).
SPLIT_MIN_ROWS = 2048


# fp32 channels_last weight gradients run on oneDNN's inner-product backward when C*K/(C+K) is at least this
# (the multiply-adds per element of the two operands it first copies; see _weight_grad).
ONEDNN_WEIGHT_GRAD_MIN_INTENSITY = 50


# fp32 channels_last weight gradients with this many input channels C and at least THIN_GRAD_MIN_RATIO * C
# outputs run as one oneDNN product on transposed views (see _weight_grad).
THIN_GRAD_IN_CHANNELS = range(32, 97)
THIN_GRAD_MIN_RATIO = 4


def _onednn_weight_grad_available() -> bool:
    """Whether this torch has oneDNN's inner-product weight gradient (it takes oneDNN tensors)."""
    return torch.float32 in _onednn_linear_dtypes() and hasattr(torch.ops.aten, "mkldnn_linear_backward_weights")


def _weight_grad(grad: Tensor, rows: Tensor) -> Tensor:
    """``dW = dY^T X`` for ``grad`` ``(M, K)``, ``rows`` ``(M, C)``: a reduction over the M rows.

    In fp32 or bf16 on CPU with convlab's native product, one oneDNN product on the transposed view
    of dY (in bf16 the kernel aten's ``mm`` also runs, timed the same). Without it, the paths below.
    One GEMM with a small (K, C) output and a longer M-row reduction leaves the BLAS threads little
    to share. With T > 1 threads, M >= C*K and M a multiple of T, the rows are cut into T slabs,
    one batched product ``(T, C, M/T) @ (T, M/T, K)`` gives T partial gradients and a sum adds
    them. Measured on a 2-core AVX-512 CPU (an earlier host), 2 threads, N=8: the fp32 weight gradient of
    MobileNet's 32->64 @112 layer 4.8 -> 3.8 ms and of 32->512 @56 7.9 -> 6.5 ms; forward+backward
    of those layers 12.6 -> 11.5 ms and 20.4 -> 19.2 ms fp32, 6.6 -> 5.9 ms and 12.6 -> 11.9 ms bf16.
    Split, fp32 128->256 @28 and 256->256 @28 (M = 6272 < C*K) ran 4-6% slower and 128->128 @56
    (M = 25088 > C*K) 5% faster (A/B in both orders), hence M >= C*K.
    """
    (m, c), k = rows.shape, grad.shape[1]
    mm = _native_matmul(grad, rows)
    if mm is not None:
        # The native product reads dY^T as the transposed view it is and reduces over M itself. One-off A/B
        # (2 threads, N=8, the suite's 12 channels_last layers): 1.1-2.1x faster than the paths below
        # (128->128 @56 3.74 -> 2.31 ms, 32->64 @56 0.71 -> 0.34 ms), which remain for when it is absent.
        out = rows.new_empty(k, c)
        mm(_matmul_operand(grad).t(), _matmul_operand(rows), out, 0.0)  # (K, M) @ (M, C)
        return out
    fp32_cpu = rows.device.type == "cpu" and rows.dtype == grad.dtype == torch.float32
    if fp32_cpu and m > 1 and c in THIN_GRAD_IN_CHANNELS and k >= THIN_GRAD_MIN_RATIO * c and torch.float32 in _onednn_linear_dtypes():
        # Few input channels, many more outputs: dW^T = X^T dY as oneDNN's product of the transposed views
        # (C, M) and (K, M), no copies. One-off A/B, 2 threads, N=8: 1.05-1.9x faster than the paths below
        # on 14 layers at 14x14-56x56 (32->1024 @28: 3.4 -> 1.8 ms), 0.98-1.31x on five at 7x7-14x14;
        # 0.94-0.99x on 32->160 @56; with 16 or 24 input channels (0.74-0.92x), with K < 4C (32->64 @56
        # 0.89x) and from 128 input channels up (128->512 @28 0.88-0.93x) slower, hence the bounds.
        return _onednn_nt(_canonical(rows).t(), _canonical(grad).t()).t().contiguous()  # (C, M) @ (K, M)^T -> (K, C)
    if fp32_cpu and c * k >= ONEDNN_WEIGHT_GRAD_MIN_INTENSITY * (c + k) and _onednn_weight_grad_available():
        # fp32 products in aten run on MKL's sgemm; oneDNN's inner-product backward computes dY^T X
        # itself, from copies of both operands into oneDNN tensors (M (C + K) elements), which pay off
        # where each element feeds enough multiply-adds. Measured on a 2-core AMD EPYC (family 26), N=8,
        # 2 threads: 1.2-2.0x faster than the GEMMs below from 128->128 @56 (C*K/(C+K) = 64) to
        # 1024->1024 @7; 0.94-1.25x on 64->128 @56 (43) in two runs; 0.69-1.11x with 32 input channels (21-30).
        weight = rows.new_empty(k, c)  # tells the primitive the gradient's shape and dtype
        return torch.ops.aten.mkldnn_linear_backward_weights(grad.to_mkldnn(), rows.to_mkldnn(), weight, False)[0]
    parts = torch.get_num_threads()
    if rows.device.type != "cpu" or parts < 2 or m < max(SPLIT_MIN_ROWS, c * k) or m % parts:
        return grad.t() @ rows  # (K, M) @ (M, C)
    slabs = torch.bmm(rows.reshape(parts, m // parts, c).transpose(1, 2), grad.reshape(parts, m // parts, k))  # (T, C, K)
    return slabs.sum(0).t().contiguous()  # (K, C)


# fp32 and bf16 channels_last backwards of at least GRAD_KERNEL_MIN_ROWS rows run on convlab's AVX-512 kernel, dW, db
# and dX in one pass over dY (see _kernel_backward): with no fewer outputs than inputs, up to GRAD_KERNEL_MAX_IN
# input channels; with fewer (a projection), from GRAD_KERNEL_NARROW_MIN_OUT outputs up to GRAD_KERNEL_NARROW_MAX_IN
# inputs, or up to GRAD_KERNEL_NARROWEST_MAX_OUT outputs (one 16-column panel) up to GRAD_KERNEL_NARROWEST_MAX_IN.
GRAD_KERNEL_MIN_ROWS = 4096
GRAD_KERNEL_MAX_IN = 128
GRAD_KERNEL_NARROW_MIN_OUT = 32
GRAD_KERNEL_NARROW_MAX_IN = 512
GRAD_KERNEL_NARROWEST_MAX_OUT = 16
GRAD_KERNEL_NARROWEST_MAX_IN = 64


def _kernel_backward(grad: Tensor, rows: Tensor, w2d: Tensor | None, with_bias: bool) -> tuple[Tensor | None, Tensor, Tensor | None] | None:
    """``(dX, dW, db)`` on ``rows_backward`` where measured faster, else None: ``dX = dY W`` when ``w2d`` is
    given (else None), ``dW = dY^T X``, ``db = sum dY`` when ``with_bias`` (else None). ``dW`` and ``db`` are the
    kernel's fp32 sums, whatever the operands' dtype (``dW`` as the transposed view of a ``(C, K)`` tensor): the
    caller rounds them once, to its parameters' dtypes.

    fp32 or bf16. The kernel (``models/csrc/avx512_linear.cpp``) walks ``dY`` once, in blocks of 128 rows: it
    reduces each block into per-thread 8x48 or 6x64 tiles of ``dW^T``, sums ``db`` from the ``dY`` vectors it
    has loaded anyway, then computes the block's ``dX`` rows while the block is in cache. In fp32 it prefetches
    the next block, whose strided walk otherwise stalls (that doubled its speed on 32-channel layers); in bf16
    it first interleaves the block's rows in pairs, for AVX512_BF16's dot product. The paths it replaces
    read ``dY`` three times: oneDNN's matmul for ``dX`` and ``dW``, ``grad.sum(0)`` for ``db``. One-off A/Bs
    (``/tmp`` scripts, not kept), 2 threads, fp32:

    * ``dW`` + ``db`` against ``_weight_grad`` + ``grad.sum(0)``: 1.01-4.23x on the 20 layers with
      ``K >= C``, ``C <= 128`` and at least 6272 rows (the pointwise suite's from 28x28 up, MobileNet v2- and
      CIFAR-size ones at batch 8 and 128; 32->512 @56 5.89 -> 2.31 ms, 32->64 @112 2.12 -> 1.26 ms), 0.97x
      (a tie) on 16->16 @112. Slower with 256 or 512 inputs at 14x14 and 28x28 (0.74-0.98x) and with fewer
      outputs than inputs (96->24 @112 0.66x), hence the bounds;
    * then ``dX`` in the same pass against oneDNN's matmul after it: 1.01-1.32x on 15 of those 16 layers
      (32->256 @56 2.55 -> 2.03 ms for all three), 0.96x (a tie) on 64->128 @16 at batch 128;
    * bf16 (pairs of rows multiplied with AVX512_BF16's dot product for ``dW``, pairs of columns for ``dX``,
      summed in fp32, ``dW`` and ``db`` rounded once): all three against today's matmuls and sum, 1.02-2.01x
      on 15 layers inside the bounds (32->64 @112 1.93 -> 1.37 ms, 32->512 @56 4.34 -> 2.89 ms); 0.97x on
      256->256 @28, outside them. dX in bf16 multiplies pairs of dY's columns, so K must be even;
    * fewer outputs than inputs (MobileNet v2's and ResNet-50's projections, at batch 8 and 128), all three
      against the paths above, in-process and interleaved, with torch's backward as the yardstick: from 32
      outputs and up to 512 inputs, on the 13 layers with 6272 rows or more (144->32 and 192->32 @28, 256->64
      @56, 512->128 and 512->256 @28, 96->48 @56, ...) fp32 1.03-1.50x torch's where the old paths read
      0.80-1.29x (one tie, 320->160 @28: 1.08x against 1.11x), bf16 1.04-1.58x against 0.68-1.00x. With 16
      outputs, on one 16-column panel (24 x 1 tiles; a 32-column one left half of each tile empty): up to 64
      inputs (32->16 @112, 64->16 @56, 48->16 and 32->16 at batch 128) fp32 1.29-1.49x against 1.03-1.20x,
      bf16 0.72-0.95x against 0.62-0.83x (48->16: 0.72x against 0.78x; bf16 dW there now runs fp32 tiles on rows
      widened per block, 1.04-1.25x the pairs except on 32 inputs, a tie: see ``kWidenMaxOut`` in the source);
      from 96 inputs 1.04-1.35x against 1.39-1.53x in fp32, so those keep the old paths, as do 24 outputs
      (0.91-0.99x against 0.86-1.19x) and layers under 4096 rows (14x14 and 7x7 at batch 8: mixed, 0.79-1.58x
      against 0.99-1.86x).
    """
    (m, c), k = rows.shape, grad.shape[1]
    if m < GRAD_KERNEL_MIN_ROWS:
        return None
    if k >= c:
        fits = c <= GRAD_KERNEL_MAX_IN
    else:
        fits = (k >= GRAD_KERNEL_NARROW_MIN_OUT and c <= GRAD_KERNEL_NARROW_MAX_IN) or (
            k <= GRAD_KERNEL_NARROWEST_MAX_OUT and c <= GRAD_KERNEL_NARROWEST_MAX_IN
        )
    if not fits:
        return None
    if rows.dtype == torch.bfloat16 and w2d is not None and k % 2:  # bf16 dX multiplies pairs of dY's columns
        return None
    operands = (grad, rows) if w2d is None else (grad, rows, w2d)
    if _native_matmul(*operands) is None or (kernel := native.rows_backward(rows.dtype)) is None:
        return None
    grad_wt = rows.new_empty(c, k, dtype=torch.float32)  # the kernel sums in fp32
    grad_b = rows.new_empty(k, dtype=torch.float32) if with_bias else None
    grad_x = None if w2d is None else rows.new_empty(m, c)
    kernel(_unit_columns(grad), _unit_columns(rows), grad_wt, grad_b, None if w2d is None else _unit_columns(w2d), grad_x)
    return grad_x, grad_wt.t(), grad_b


def _rows_operands(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The product's operands for a channels_last ``x``: its ``(N*H*W, C)`` rows (a free view), the weight as
    ``(K, C)``, and the bias; all cast to autocast's ``dtype`` when given, as autocast would cast ``F.linear``'s
    (floating tensors other than float64; this product is not an op autocast knows)."""
    rows = x.permute(0, 2, 3, 1).flatten(0, 2)  # flatten: a jit trace records no size arithmetic
    w2d = weight.flatten(1)
    if dtype is None:
        return rows, w2d, bias
    return _autocast_operand(rows, dtype), _autocast_operand(w2d, dtype), _autocast_operand(bias, dtype)


def _rows_forward(rows: Tensor, w2d: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """``F.conv2d``'s output for the operands of :func:`_rows_operands`: the product's ``(N*H*W, K)`` rows read as
    ``(N, K, H, W)`` in channels_last memory, through a tensor of its own on their storage (``set_``), not a view of
    them: a view made inside an autograd Function may not be modified in place, and a copy would cost a pass."""
    n, _, h, w = x.shape
    out = _forward_product(rows, w2d, bias)  # (N*H*W, K), rows contiguous
    k = out.shape[1]
    return out.new_empty(0).set_(out.untyped_storage(), out.storage_offset(), (n, k, h, w), (h * w * k, 1, w * k, k))


class _RowsPointwise(torch.autograd.Function):
    """Channels-last 1x1 convolution as ``Y = X W^T + b`` on the ``(N*H*W, C)`` rows: one product each way.

    It takes the 4-d input and weight and makes the rows, the ``(K, C)`` weight and autocast's casts itself, so
    autograd records one node where it recorded up to six (views and casts), and under autocast the weight's and
    the bias's gradients stay the kernel's fp32 sums: rounded to bf16 for the cast's backward, as F.conv2d's are,
    they were about 2e-3 off. (Speed: the same within noise, one-off in-process A/B on separable's five layer
    shapes at batch 128.) The output is a tensor of its own (see :func:`_rows_forward`), so in-place ops may follow it.

    Backward: ``dX = dY W`` (again a tall, thin product, so the same fast path), ``dW = dY^T X``
    (a long reduction over rows, see :func:`_weight_grad`), ``db = sum dY``; within
    :func:`_kernel_backward`'s bounds (fp32 and bf16), all three in one pass over ``dY`` on convlab's
    AVX-512 kernel. When the backward itself is differentiated (``create_graph=True``) it uses
    differentiable ops instead.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype | None) -> Tensor:
        rows, w2d, cast_bias = _rows_operands(x, weight, bias, dtype)
        # x and weight for a double backward, the product's operands for the backward (freed after it)
        ctx.save_for_backward(x, weight, rows, w2d)
        ctx.dtype = dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _rows_forward(rows, w2d, cast_bias, x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight, rows, w2d = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        need_b = need_b and ctx.bias_dtype is not None
        n, c, h, w = x.shape
        g = grad.permute(0, 2, 3, 1).flatten(0, 2)  # (M, K): a view when dY is channels_last, else a copy
        grad_x = grad_w = grad_b = None
        if torch.is_grad_enabled():  # a double backward: the operands again, with ops autograd records
            rows, w2d, _ = _rows_operands(x, weight, None, ctx.dtype)
            grad_x = g @ w2d if need_x else None
            grad_w = g.t() @ rows if need_w else None
            grad_b = g.sum(0) if need_b else None
        else:
            fused = _kernel_backward(g, rows, w2d if need_x else None, need_b) if need_w else None
            if fused is not None:
                grad_x, grad_w, grad_b = fused
            else:
                grad_x = _rows_product(g, w2d.t(), None) if need_x else None  # (M, C)
                grad_w = _weight_grad(g.contiguous(), rows) if need_w else None  # (K, C)
                grad_b = g.sum(0) if need_b else None
        if grad_x is not None:
            grad_x = grad_x.view(n, h, w, c).permute(0, 3, 1, 2).to(x.dtype)  # channels_last, as x
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype, memory_format=torch.contiguous_format).view(weight.shape)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None


# NCHW fp32 images with at least this many pixels run one oneDNN product per image on the input as it
# lies; smaller ones one product over the whole batch (see _ImagesPointwise).
PER_IMAGE_MIN_PIXELS = 784


def _onednn_images(x: Tensor, autocast_dtype: torch.dtype | None) -> bool:
    """Whether NCHW input takes :class:`_ImagesPointwise`: fp32 on a CPU whose torch has oneDNN's product, eagerly."""
    return (
        not torch.compiler.is_compiling()  # first: dynamo would trace the cached query below
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and autocast_dtype is None
        and torch.float32 in _onednn_linear_dtypes()
    )


def _onednn_nt(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b^T`` for ``a`` ``(M, C)``, ``b`` ``(N, C)`` on oneDNN's CPU product, which reads both by their strides.

    So the transpose of a contiguous matrix (an NCHW image ``(C, P)`` read as ``(P, C)``) costs no
    copy; callers pass views of :func:`_canonical` tensors, whose strides oneDNN always accepts. The
    result is a new contiguous ``(M, N)``. tests/test_functional.py checks every use against ``F.conv2d``.
    """
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


# With the native product, the NCHW forward and input gradient of images with at least this many pixels are one
# batched product each, the weight broadcast over images; smaller images fold the batch into the columns of one
# product, after a copy (see _images_product).
NATIVE_MIN_PIXELS = 196


# NCHW fp32 forwards and input gradients of images of at least IMAGES_MIN_PIXELS pixels run on convlab's AVX-512
# kernel (images_out); forwards of smaller images from IMAGES_SMALL_MIN_PIXELS too, with at most
# IMAGES_SMALL_MAX_IN input channels with a bias, IMAGES_SMALL_MAX_IN_NOBIAS without (see _images_kernel_fits).
IMAGES_MIN_PIXELS = 3136
IMAGES_SMALL_MIN_PIXELS = 784
IMAGES_SMALL_MAX_IN = 64
IMAGES_SMALL_MAX_IN_NOBIAS = 32


def _images_kernel_fits(c: int, p: int, bias: Tensor | None) -> bool:
    """Whether the NCHW forward of ``C`` input channels on ``P``-pixel images runs on ``images_out``, as measured.

    The kernel (``models/csrc/avx512_linear.cpp``) tiles each image's ``(K, P)`` output 6 channels x 64 pixels,
    reads its panels from the image's channel rows in place (fetching the next panel ahead) and starts each row
    at its bias, so the bias costs no pass; outputs of at least ``native.STREAM_MIN_BYTES`` bypass the cache.
    What it replaces is the batched native product, plus a pass for the bias. One-off A/Bs, forward only,
    2 threads, N=8 (``/tmp`` scripts, not kept), on 28 layers (the pointwise suite's, MobileNet v2- and
    ResNet-style ones):

    * 56x56 and up, 17 layers: with a bias 1.09-2.19x (32->512 @56 2.61 -> 1.79 ms, 96->24 @112 1.75 ->
      1.08 ms), without one 0.99-1.79x;
    * 28x28, 7 layers: with a bias 1.08-2.22x with up to 64 inputs, 0.93-1.00x from 128; without a bias 1.46x
      on 16->64, 0.99x on 32->192, 0.90-0.94x from 64 inputs;
    * 14x14 (and 7x7), whose last 64-pixel panel is mostly empty: 0.78-0.83x on all four.

    The input gradient ``W^T @ dY[n]`` takes it from ``IMAGES_MIN_PIXELS`` (see _images_input_grad).
    """
    if p >= IMAGES_MIN_PIXELS:
        return True
    return p >= IMAGES_SMALL_MIN_PIXELS and c <= (IMAGES_SMALL_MAX_IN_NOBIAS if bias is None else IMAGES_SMALL_MAX_IN)


def _images_product(x3: Tensor, w2d: Tensor, bias: Tensor | None) -> Tensor:
    """``W @ x[n] + b`` for every image of ``x3`` ``(N, C, P)``: the forward of :class:`_ImagesPointwise`, no autograd."""
    n, c, p = x3.shape
    k = w2d.shape[0]
    out = x3.new_empty(n, k, p)
    operands = (x3, w2d) if bias is None else (x3, w2d, bias)
    if _images_kernel_fits(c, p, bias) and _native_matmul(*operands) and (kernel := native.images_out()) is not None:
        kernel(w2d, x3, bias, out, native.STREAM_MIN_BYTES)
        return out
    mm = _native_matmul(x3, w2d)
    if mm is not None and p >= NATIVE_MIN_PIXELS:
        # (1, K, C) @ (N, C, P): one batched product, the weight broadcast over images, written in place.
        mm(w2d.unsqueeze(0), x3, out, 0.0)
        return out if bias is None else out.add_(bias.view(1, k, 1))
    if mm is None and p >= PER_IMAGE_MIN_PIXELS:
        b = None if bias is None else bias.view(k, 1)
        # unbind: the N views in one call each (per-image indexing costs two ops an image)
        for image, o in zip(x3.transpose(1, 2).unbind(0), out.unbind(0)):
            y = _onednn_nt(w2d, image)  # (K, C) @ (P, C)^T -> (K, P)
            o.copy_(y) if b is None else torch.add(y, b, out=o)
        return out
    # Small images: one (K, N*P) product, the batch folded into its columns. With the native product,
    # (K, C) @ (C, N*P) after a copy of P-long runs; without it, oneDNN's inner product on a transposing copy
    # (N*P, C) (a view for one image). One-off A/B, 2 threads, N=8, against torch's convolution: native
    # 0.99-1.07x on five 7x7 layers, against 0.91-1.02x on the inner product and 0.78-0.98x broadcast.
    if mm is not None:
        product = x3.new_empty(k, n * p)
        mm(w2d, x3.transpose(0, 1).reshape(c, n * p), product, 0.0)
    else:
        product = _onednn_nt(w2d, x3.transpose(1, 2).reshape(n * p, c))
    folded = product.view(k, n, p).transpose(0, 1)  # (K, N*P) read as (N, K, P)
    return out.copy_(folded) if bias is None else torch.add(folded, bias.view(1, k, 1), out=out)


def _images_input_grad(grad: Tensor, w2d: Tensor) -> Tensor:
    """``dx[n] = W^T @ dy[n]`` for ``grad`` ``(N, K, P)`` (canonical), ``w2d`` ``(K, C)``: the NCHW input gradient."""
    n, k, p = grad.shape
    c = w2d.shape[1]
    mm = _native_matmul(grad, w2d)
    if mm is not None and p >= IMAGES_MIN_PIXELS and (kernel := native.images_out()) is not None:
        # One-off A/B against the broadcast product below (2 threads, N=8, 20 layers from 28x28 up): 1.03-1.93x
        # on the 16 from 56x56 (32->64 @112 1.60 -> 1.04 ms), 0.93-1.51x at 28x28 (128->256 0.93x), hence the bound.
        grad_x = grad.new_empty(n, c, p)
        kernel(w2d.t().contiguous(), grad, None, grad_x, native.STREAM_MIN_BYTES)  # W^T (C, K) on each (K, P)
        return grad_x
    if mm is not None and p >= NATIVE_MIN_PIXELS:
        grad_x = grad.new_empty(n, c, p)
        mm(w2d.t().contiguous().unsqueeze(0), grad, grad_x, 0.0)  # (1, C, K) @ (N, K, P), W^T broadcast over images
        return grad_x
    if mm is not None:
        # Small images, as in the forward: W^T (C, K) @ dY folded to (K, N*P). One-off A/B, 2 threads, N=8: faster
        # than the inner product's folded form on all eight 7x7 and 14x14 layers (1024->1024 @7 2.04 -> 1.78 ms).
        product = grad.new_empty(c, n * p)
        mm(w2d.t(), grad.transpose(0, 1).reshape(k, n * p), product, 0.0)
        return product.view(c, n, p).transpose(0, 1).contiguous()
    if n and p < PER_IMAGE_MIN_PIXELS:
        # Small images: one product over the whole batch after a transposing copy, (N*P, K) @ W (K, C) with W
        # read as it lies (see _weight_operand), beats N thin ones (one-off A/B without the native product, N=8,
        # 2 threads, dX + dW: 512->1024 @7 2.94 -> 2.03 ms, 256->512 @14 2.50 -> 2.09; 28x28 ran 1.2-1.3x slower).
        rows_g = grad.transpose(1, 2).reshape(n * p, k)
        return _onednn_nt(rows_g, _weight_operand(w2d.t(), n * p)).view(n, p, c).transpose(1, 2).contiguous()
    w_t = w2d.t().contiguous()  # (C, K)
    grad_x = grad.new_empty(n, c, p)
    for g, o in zip(grad.transpose(1, 2).unbind(0), grad_x.unbind(0)):
        o.copy_(_onednn_nt(w_t, g))  # (C, K) @ (P, K)^T -> (C, P)
    return grad_x


def _images_weight_grad(grad: Tensor, x3: Tensor) -> Tensor:
    """``dW = sum_n dy[n] @ x[n]^T`` for ``grad`` ``(N, K, P)`` (canonical), ``x3`` ``(N, C, P)``: the NCHW weight gradient."""
    n, k, p = grad.shape
    c = x3.shape[1]
    if n and p < PER_IMAGE_MIN_PIXELS:
        # Small images: (K, N*P) @ (C, N*P)^T, one product after copies; the reduction runs along contiguous memory in both.
        return _onednn_nt(grad.transpose(0, 1).reshape(k, n * p), x3.transpose(0, 1).reshape(c, n * p))
    mm = _native_matmul(grad, x3)
    if mm is not None:
        per_image = grad.new_empty(n, k, c)
        mm(grad, x3.transpose(1, 2), per_image, 0.0)  # (N, K, P) @ (N, P, C): one batched product, then the sum
        return per_image.sum(0)
    grad_w = grad.new_zeros(k, c)  # stays zero for an empty batch
    for g, image in zip(grad.unbind(0), x3.unbind(0)):
        grad_w += _onednn_nt(g, image)  # (K, P) @ (C, P)^T -> (K, C)
    return grad_w


# NCHW fp32 backwards of images of at least IMAGES_GRAD_MIN_PIXELS pixels with at most IMAGES_GRAD_MAX_IN input
# channels and no fewer outputs run on convlab's one-pass kernel (see _images_backward).
IMAGES_GRAD_MIN_PIXELS = 196
IMAGES_GRAD_MAX_IN = 256


def _images_backward(
    grad: Tensor, x3: Tensor, w2d: Tensor, need_x: bool, with_bias: bool
) -> tuple[Tensor | None, Tensor, Tensor | None] | None:
    """dX, dW and db of the NCHW layer in one pass over ``grad`` ``(N, K, P)`` (canonical) on ``images_backward``,
    or None outside the bounds it was measured faster in (then each gradient takes its own pass).

    The kernel (``models/csrc/avx512_linear.cpp``) walks each image in 240-pixel chunks: it transposes x's slice
    of the chunk, reduces dW from dY's channel rows as they lie, then computes dX's slice, summing db from the
    vectors dX's first tile loads, while the chunk is still in L2. What it replaces reads dY three times: dX
    (images_out or the native matmul), dW (the native matmul) and db (``grad.sum``). One-off A/Bs of the whole
    forward + backward through pointwise_conv2d, 2 threads, N=8, the two paths alternating in one process
    (``/tmp`` scripts, not kept):

    * K >= C, C <= 256, from 14x14, 20 layers: 0.98-1.34x (32->256 @56 3.86 -> 3.47 ms, 32->512 @56 7.94 ->
      7.33, 64->128 @28 1.06 -> 0.90, 256->512 @14 1.01-1.04x in three runs); under 1.0 only 128->128 @56
      (0.98-1.00x) and 16->64 @112 (0.98-1.01x);
    * 512 inputs at 14x14: 0.99-1.00x; at 7x7, chunks of 49 pixels: 0.73x and 0.93x (512->1024, 160->960);
    * more inputs than outputs, where x's transpose is the larger part (an earlier build, db summed in its own
      pass): 0.76-0.91x on 96->24 @112, 144->24 and 256->64 @56, 32->16 @112.
    """
    n, k, p = grad.shape
    c = x3.shape[1]
    if p < IMAGES_GRAD_MIN_PIXELS or c > IMAGES_GRAD_MAX_IN or k < c:
        return None
    if not _native_matmul(grad, x3, w2d) or (kernel := native.images_backward()) is None:
        return None
    grad_w = grad.new_empty(k, c)
    grad_b = grad.new_empty(k) if with_bias else None
    grad_x = grad.new_empty(n, c, p) if need_x else None
    kernel(grad, x3, grad_w, grad_b, w2d.t().contiguous() if need_x else None, grad_x)
    return grad_x, grad_w, grad_b


class _ImagesPointwise(torch.autograd.Function):
    """NCHW fp32 1x1 convolution on CPU as oneDNN products: ``y[n] = W @ x[n] + b`` on ``x`` ``(N, C, P)``.

    With convlab's native product (models/native.py), images of at least ``NATIVE_MIN_PIXELS`` pixels
    run the forward and the input gradient as one batched product each, ``(1, K, C) @ (N, C, P)`` and
    ``(1, C, K) @ (N, K, P)``, the weight broadcast over images and the result written in place; from
    ``PER_IMAGE_MIN_PIXELS`` the weight gradient too, ``(N, K, P) @ (N, P, C)`` summed over images.
    Smaller images fold the batch into the columns of one native product, ``W @ (C, N*P)`` and
    ``W^T @ (K, N*P)``, after copies of P-long runs; their weight gradient stays on the inner
    product's folded form below (timed the same as native there). Forward against torch's
    convolution, 2 threads, N=8, with the benchmark's three contenders in rotation: 1.09-1.52x on
    the pointwise suite's layers from 28x28 up (``benchmarks/pointwise.md``, three passes); one-off
    A/B on eight 14x14 and 7x7 layers (the suite's and MobileNet v2's), twice: broadcast at 14x14
    0.99-1.03x against 0.94-0.97x folded on the inner product, at 7x7 0.77-1.14x (under 0.9x in 9
    of 12), hence the fold there. From 56x56 (``IMAGES_MIN_PIXELS``) the forward and the input gradient
    run instead on convlab's AVX-512 kernel (``images_out``), which adds the bias in its registers rather
    than in a pass over the output; at 28x28 the forward does too with few input channels (see
    :func:`_images_kernel_fits`); from 14x14, with no more inputs than outputs and at most 256 of them, the
    backward is one pass over dY on ``images_backward`` (see :func:`_images_backward`). The rest of this docstring
    is the lowering without the native op.

    For fp32, aten's matrix products (``bmm``, ``mm``) run on MKL's ``sgemm``, which on a 2-core AMD
    EPYC (family 26) reaches about 200 GFLOP/s where oneDNN's product reaches 460, so the batched
    GEMMs of :class:`_BatchedPointwise` ran at 0.46-0.92x torch's 1x1 convolution there. oneDNN's
    ``A @ B^T`` takes strided operands, so each image is one product with no copy: ``y[n] = W @
    x[n]`` as ``(K, C) @ ((C, P) read as (P, C))^T``, its ``(K, P)`` result then written into the
    output with the bias added; the backward is the same per image, ``dx[n] = W^T @ dy[n]`` and
    ``dW = sum_n dy[n] @ x[n]^T`` (its operands already reduce over their contiguous P). Images of
    fewer than ``PER_IMAGE_MIN_PIXELS`` pixels run one product over the batch each way instead, after
    transposing copies (one-off A/B of the forward, N=8, 2 threads, three runs: per image
    0.90-0.92x torch on 14x14 and 0.74-0.76x on 7x7 layers, over the batch 0.91-0.98x; on 28x28 to
    112x112 per image 0.95-1.31x, over the batch 0.70-0.99x; the kept benchmark, with its third
    contender in the rotation, reads lower: see benchmarks/README.md). Under ``create_graph=True``
    the backward uses differentiable ops instead.
    """

    @staticmethod
    def forward(ctx: Any, x3: Tensor, w2d: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x3, w2d)
        ctx.has_bias = bias is not None
        return _images_product(x3, w2d, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x3, w2d = ctx.saved_tensors  # (N, C, P), (K, C)
        need_x, need_w, need_b = ctx.needs_input_grad
        with_bias = ctx.has_bias and need_b
        if torch.is_grad_enabled():  # the backward itself is differentiated: plain ops autograd can follow
            grad_x = torch.matmul(w2d.t(), grad) if need_x else None  # (C, K) @ (N, K, P) -> (N, C, P)
            grad_w = torch.matmul(grad, x3.transpose(1, 2)).sum(0) if need_w else None  # (K, C)
            return grad_x, grad_w, grad.sum((0, 2)) if with_bias else None
        grad = _canonical(grad)  # (N, K, P)
        if need_w and (fused := _images_backward(grad, x3, w2d, need_x, with_bias)) is not None:
            return fused
        grad_b = grad.sum((0, 2)) if with_bias else None  # (K,)
        grad_x = _images_input_grad(grad, w2d) if need_x else None
        grad_w = _images_weight_grad(grad, x3) if need_w else None
        return grad_x, grad_w, grad_b


def _tracks_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd would record an op on these operands (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _autocast_operand(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _int(value: Any) -> int | None:
    """``value`` as an int when it is an integer (Python's, numpy's, a 0-d integer tensor: what has
    ``__index__``, as ``F.conv2d`` takes them), else None; bools are refused."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _pair(value: int | tuple[int, ...], name: str) -> tuple[int, int]:
    """An int or a sequence of one or two ints (as ``F.conv2d`` takes them) -> ``(h, w)``."""
    if type(value) is int:  # the usual case, ahead of the general parsing below (each call counts on small layers)
        return value, value
    single = _int(value)
    items = (single,) if single is not None else tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()
    pair = tuple(_int(v) for v in items)
    if len(pair) == 1:
        pair = pair * 2
    if len(pair) != 2 or None in pair:
        raise ValueError(f"pointwise_conv2d: {name}={value!r} must be an int or a pair of ints")
    return pair  # type: ignore[return-value]


def _padding(padding: int | tuple[int, ...] | str, stride: tuple[int, int]) -> tuple[int, int]:
    """``F.conv2d``'s padding: ints, or ``"valid"`` / ``"same"``, which for a 1x1 kernel both mean no border."""
    if not isinstance(padding, str):
        return _pair(padding, "padding")
    if padding not in ("valid", "same"):
        raise ValueError(f"pointwise_conv2d: padding={padding!r} is not valid; use an int, a pair of ints, 'valid' or 'same'")
    if padding == "same" and stride != (1, 1):
        raise ValueError(f"pointwise_conv2d: padding='same' needs stride 1 (as in F.conv2d), got stride={stride}")
    return (0, 0)


def _channels_last_like(t: Tensor) -> bool:
    """Whether ``t``'s strides read as channels_last, by the rule of torch's ``suggest_memory_format``.

    Walking C, W, H, N (innermost to outermost in channels_last), each stride must be at least the
    span of the dimensions inside it; a tensor that could be either (a zero channel stride, an
    ``N x 1 x 1 x 1`` shape) is NCHW. True for channels_last tensors and their views (a slice of
    channels, every s-th pixel), False for NCHW and for a channels_last ``(C, H, W)`` with a batch
    dimension added in front (which F.conv2d also treats as NCHW).
    """
    shape, strides = t.shape, t.stride()
    if len(shape) != 4 or strides[1] == 0:
        return False
    span = 0
    for d in (1, 3, 2, 0):
        size, stride = shape[d], strides[d]
        if size == 0 or stride < span or (d == 0 and span == strides[1]):
            return False
        span = stride * size if size > 1 else stride
    return True


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype for ``x``'s device when autocast is on there (never on meta: it has none)."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _under_functorch(*tensors: Tensor | None) -> bool:
    """Whether any operand is wrapped by a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``).

    Those need a batching rule that this module's autograd Functions lack, and ``vmap`` cannot
    answer memory-format queries, so the product is then built from plain differentiable ops.
    """
    if torch.compiler.is_compiling():  # dynamo cannot trace the query (a graph break); it handles transforms itself
        return False
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def pointwise_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    groups: int = 1,
    *,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """1x1 convolution as a per-pixel linear layer: ``y[n,k,i,j] = sum_c x[n,c,i,j] W[k,c] + b[k]``.

    The result of ``F.conv2d`` with a 1x1 kernel and its keywords; positionally ``groups`` comes
    sixth, where ``F.conv2d`` has ``dilation``, which is keyword-only here (a 1x1 kernel reads one
    pixel whatever its dilation, so it is checked and has no effect). Built from one matrix product
    over channels instead of a convolution kernel:

    * a 1x1 kernel reads one pixel, so ``padding`` is a zero border (the output there is the bias)
      and ``stride`` keeps every s-th pixel; both are applied to the input before the product;
    * channels_last input ``(N, H, W, C)`` in memory is already a ``(N*H*W, C)`` matrix: one GEMM
      with no copy (on CPU convlab's native ops where they built, else oneDNN's product where
      available; see :func:`_forward_product` and :func:`_rows_product`), and the output
      stays channels_last, as ``F.conv2d`` keeps it;
    * contiguous NCHW input is ``N`` matrices ``(C, H*W)``: in fp32 on CPU, one batched oneDNN product
      ``W @ x[n]`` written into the output where convlab's native op built (models/native.py), else one
      per image on the input as it lies (aten's fp32 GEMMs run on MKL, at half oneDNN's speed on some
      CPUs; see :class:`_ImagesPointwise`); otherwise one batched product with the
      bias fused into it and a hand-written backward (see :class:`_BatchedPointwise`), and images
      smaller than ``FOLD_MAX_PIXELS`` pixels folded into one product ``W @ (C, N*H*W)`` with a
      copy in and out (thin per-image products waste the GEMM kernel);
    * ``groups`` split channels into independent blocks: one batched product over groups.

    Args:
        x: input ``(N, C, H, W)`` or unbatched ``(C, H, W)``, any memory format, fp32/bf16/fp16/fp64.
        weight: ``(K, C // groups, 1, 1)`` as in ``nn.Conv2d``, the input's dtype (outside autocast).
        bias: optional ``(K,)``, the input's dtype (outside autocast).
        stride: int or (sh, sw), >= 1.
        padding: int or (ph, pw), >= 0; or ``"valid"`` / ``"same"`` (no border for a 1x1 kernel).
        groups: number of channel groups; divides both C and K.
        dilation: int or (dh, dw), >= 1, as ``F.conv2d`` takes it; no effect on a 1x1 kernel.

    Returns:
        ``(N, K, H_out, W_out)`` with ``H_out = (H + 2 ph - 1) // sh + 1``, channels_last when the
        input's or the weight's strides are (as ``F.conv2d`` chooses), else contiguous NCHW.

    Raises:
        ValueError: on a weight that is not ``(out, in/groups, 1, 1)``, channels not divisible by
            ``groups``, a stride/padding/dilation out of range, or operands of different dtypes outside
            autocast; the message names the shapes or dtypes.
    """
    if x.dim() == 3:  # unbatched (C, H, W), as F.conv2d takes it
        return pointwise_conv2d(x.unsqueeze(0), weight, bias, stride, padding, groups, dilation=dilation).squeeze(0)
    sh, sw = _pair(stride, "stride")
    ph, pw = _padding(padding, (sh, sw))
    if min(_pair(dilation, "dilation")) < 1:
        raise ValueError(f"pointwise_conv2d: dilation={dilation!r} must be >= 1 (as in F.conv2d)")
    if x.dim() != 4:
        raise ValueError(f"pointwise_conv2d: input must be (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    if sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError(f"pointwise_conv2d: need stride >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    n, c = x.shape[:2]
    if x.shape[2] + 2 * ph < 1 or x.shape[3] + 2 * pw < 1:
        raise ValueError(f"pointwise_conv2d: input shape {tuple(x.shape)} has no pixels (padding={padding}); H and W must be >= 1")
    g = _int(groups)
    if g is None or g < 1 or c % g:
        raise ValueError(f"pointwise_conv2d: groups={groups} must divide the input's {c} channels (input shape {tuple(x.shape)})")
    groups = g
    k = weight.shape[0]
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (c // groups, 1, 1) or k < 1 or k % groups:
        raise ValueError(
            f"pointwise_conv2d: weight shape {tuple(weight.shape)} does not fit input shape {tuple(x.shape)} "
            f"with groups={groups}; expected (out, {c // groups}, 1, 1) with out >= 1 and divisible by {groups}"
        )
    if bias is not None and tuple(bias.shape) != (k,):
        raise ValueError(
            f"pointwise_conv2d: bias shape {tuple(bias.shape)} does not match weight shape {tuple(weight.shape)}; expected ({k},)"
        )
    autocast_dtype = _autocast_dtype(x)
    if autocast_dtype is None and any(t is not None and t.dtype != x.dtype for t in (weight, bias)):
        dtypes = f"weight {weight.dtype}" + ("" if bias is None else f", bias {bias.dtype}")
        raise ValueError(f"pointwise_conv2d: input is {x.dtype} but {dtypes}; give all three one dtype (or run under autocast)")

    functorch = _under_functorch(x, weight, bias)
    # A jit trace (fvcore counts MACs on it) records an autograd Function as an opaque op: plain ops there too.
    plain = functorch or torch.jit.is_tracing()
    channels_last = not functorch and (_channels_last_like(x) or _channels_last_like(weight))
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))  # zeros: the output there is the bias alone
    if sh > 1 or sw > 1:
        x = x[:, :, ::sh, ::sw]  # a 1x1 window at stride s reads every s-th pixel
    if channels_last and not x.is_contiguous(memory_format=torch.channels_last):
        # A strided, padded or channel-sliced view of channels_last data: gather it into (N, H, W, C)
        # rows, so the output keeps the input's memory format as F.conv2d's does.
        x = x.contiguous(memory_format=torch.channels_last)
    h, w = x.shape[2:]

    if groups == 1 and channels_last:
        # (N, C, H, W) stored as (N, H, W, C): a free view as (N*H*W, C), one GEMM, no copy.
        if plain or torch.compiler.is_compiling():
            # A jit trace records aten::linear, which fvcore's cost model counts; torch.compile lowers
            # it with its own kernels (inductor cannot lower oneDNN's op on a weight that trains).
            out = F.linear(*_rows_operands(x, weight, bias, None))  # (N*H*W, K)
            return out.view(n, h, w, k).permute(0, 3, 1, 2)  # channels_last (N, K, H, W)
        if _tracks_grad(x, weight, bias):
            return _RowsPointwise.apply(x, weight, bias, autocast_dtype)
        # No gradient to track (inference, torch.no_grad()): the product alone, without the Function's bookkeeping.
        return _rows_forward(*_rows_operands(x, weight, bias, autocast_dtype), x)
    w2d = weight.reshape(k, c // groups)  # (K, C/G)
    if groups == 1 and plain:
        # The plain product (the same numbers), whose aten::matmul fvcore's cost model counts.
        out = torch.matmul(w2d, x.flatten(2))  # (N, K, H*W)
        if bias is not None:
            out = out + bias.view(1, k, 1)
        return out.view(n, k, h, w)
    if groups == 1 and _onednn_images(x, autocast_dtype):
        # NCHW fp32 on CPU: oneDNN products, per image or over the batch (see _ImagesPointwise).
        # Operands with a contiguous tensor's strides (a stepped slice or an expansion is copied), made
        # here, outside the Function, so autograd follows the copy (double backward differentiates x3).
        x3, w2d = _canonical(x.reshape(n, c, h * w)), _canonical(w2d)
        out = _ImagesPointwise.apply(x3, w2d, bias) if _tracks_grad(x3, w2d, bias) else _images_product(x3, w2d, bias)
        return out.view(n, k, h, w)
    if groups == 1 and h * w < FOLD_MAX_PIXELS:
        # Small images: one product over every pixel of the batch beats N thin ones. The two copies
        # move whole (H*W) rows and scale with C + K, the product with C * K.
        cols = x.reshape(n, c, h * w).transpose(0, 1).reshape(c, n * h * w)  # (N, C, HW) -> (C, N*HW), a copy
        out = torch.mm(w2d, cols) if bias is None else torch.addmm(bias.view(k, 1), w2d, cols)  # (K, N*HW)
        return out.view(k, n, h, w).transpose(0, 1).contiguous()  # (N, K, H, W) NCHW, a copy
    if groups == 1:
        # NCHW: N products (K, C) @ (C, H*W); the output is contiguous NCHW.
        out = _BatchedPointwise.apply(x.reshape(n, c, h * w), w2d, bias)  # (N, K, H*W)
        return out.view(n, k, h, w)
    # Groups: (N, G, C/G, H*W) and (G, K/G, C/G) -> one batched product per (n, g).
    # unflatten/flatten with -1: a jit trace (fvcore) records no size arithmetic as multiplications.
    xg = x.unflatten(1, (groups, -1)).flatten(3)
    out = torch.matmul(w2d.unflatten(0, (groups, -1)), xg)  # (N, G, K/G, H*W)
    out = out.flatten(1, 2).unflatten(2, (h, w))  # (N, K, H, W)
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, k, 1, 1)  # under autocast out is in the lower dtype: keep it there
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out

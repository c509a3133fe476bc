"""Functional ops written from scratch: the 1x1 convolution as a matrix product over channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pointwise_conv2d"]


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"pointwise_conv2d: {name}={value!r} must be an int or a pair of ints")
    return pair  # type: ignore[return-value]


def pointwise_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
) -> Tensor:
    """1x1 convolution as a per-pixel linear layer: ``y[n,k,i,j] = sum_c x[n,c,i,j] W[k,c] + b[k]``.

    Same signature and result as ``F.conv2d`` with a 1x1 kernel (dilation is meaningless for a
    1x1 kernel), built from one matrix product over channels instead of a convolution kernel:

    * a 1x1 kernel reads one pixel, so ``padding`` is a zero border (the output there is the bias)
      and ``stride`` keeps every s-th pixel; both are applied to the input before the product;
    * channels_last input ``(N, H, W, C)`` in memory is already a ``(N*H*W, C)`` matrix: one GEMM
      with no copy, and the output stays channels_last, as ``F.conv2d`` keeps it;
    * contiguous NCHW input is ``N`` matrices ``(C, H*W)``: one batched product ``W @ x[n]``;
    * ``groups`` split channels into independent blocks: one batched product over groups.

    Args:
        x: input ``(N, C, H, W)``, any memory format, fp32/bf16/fp16.
        weight: ``(K, C // groups, 1, 1)`` as in ``nn.Conv2d``.
        bias: optional ``(K,)``.
        stride: int or (sh, sw), >= 1.
        padding: int or (ph, pw), >= 0.
        groups: number of channel groups; divides both C and K.

    Returns:
        ``(N, K, H_out, W_out)`` with ``H_out = (H + 2 ph - 1) // sh + 1``.

    Raises:
        ValueError: on a weight that is not ``(out, in/groups, 1, 1)``, channels not divisible by
            ``groups``, or a stride/padding out of range; the message names the shapes.
    """
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    if x.dim() != 4:
        raise ValueError(f"pointwise_conv2d: input must be (N, C, H, W), got shape {tuple(x.shape)}")
    if sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError(f"pointwise_conv2d: need stride >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    n, c = x.shape[:2]
    if not isinstance(groups, int) or groups < 1 or c % groups:
        raise ValueError(f"pointwise_conv2d: groups={groups} must divide the input's {c} channels (input shape {tuple(x.shape)})")
    k = weight.shape[0]
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (c // groups, 1, 1) or k % groups:
        raise ValueError(
            f"pointwise_conv2d: weight shape {tuple(weight.shape)} does not fit input shape {tuple(x.shape)} "
            f"with groups={groups}; expected (out, {c // groups}, 1, 1) with out divisible by {groups}"
        )
    if bias is not None and tuple(bias.shape) != (k,):
        raise ValueError(f"pointwise_conv2d: bias shape {tuple(bias.shape)} does not match weight shape {tuple(weight.shape)}; expected ({k},)")

    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))  # zeros: the output there is the bias alone
    if sh > 1 or sw > 1:
        x = x[:, :, ::sh, ::sw]  # a 1x1 window at stride s reads every s-th pixel
    h, w = x.shape[2:]
    w2d = weight.reshape(k, c // groups)  # (K, C/G)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()

    if groups == 1 and channels_last:
        # (N, C, H, W) stored as (N, H, W, C): a free view as (N*H*W, C), one GEMM, no copy.
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
        out = F.linear(rows, w2d, bias)  # (N*H*W, K)
        return out.view(n, h, w, k).permute(0, 3, 1, 2)  # channels_last (N, K, H, W)
    if groups == 1:
        # NCHW: N products (K, C) @ (C, H*W); the output is contiguous NCHW.
        out = torch.matmul(w2d, x.reshape(n, c, h * w))  # (N, K, H*W)
        if bias is not None:
            out = out + bias.view(1, k, 1)
        return out.view(n, k, h, w)
    # Groups: (N, G, C/G, H*W) and (G, K/G, C/G) -> one batched product per (n, g).
    xg = x.reshape(n, groups, c // groups, h * w)
    out = torch.matmul(w2d.view(groups, k // groups, c // groups), xg)  # (N, G, K/G, H*W)
    out = out.reshape(n, k, h, w)
    if bias is not None:
        out = out + bias.view(1, k, 1, 1)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out

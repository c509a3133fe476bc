"""A/B on a GPU: the NCHW weight gradient of pointwise_conv2d per image (N batched GEMMs, summed) or folded
(one GEMM over all N*H*W columns, after copying both operands into that layout), against torch's 1x1 conv.

    python benchmarks/gpu/ab_nchw_weight_grad.py          # needs CUDA; prints one table, writes nothing

Forward + backward (gradients of input, weight and bias), NCHW input, the pointwise suite's shapes,
fp32 (IEEE, TF32 off) and bf16, each contender timed as replays of a CUDA graph of 20 calls.
"""

import torch
import torch.nn as nn

import models.functional as functional
from experiments.bench import POINTWISE_SHAPES, fp32_math, time_interleaved
from models import pointwise_conv2d

device = torch.device("cuda")


def case(label: str, n: int, c_in: int, c_out: int, hw: int, dtype: torch.dtype) -> str:
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 1).to(device, dtype)
    x = torch.randn(n, c_in, hw, hw, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(n, c_out, hw, hw, device=device, dtype=dtype)
    leaves = (x, conv.weight, conv.bias)

    def ours(fold: bool):
        def step():
            functional._fold_weight_grad = lambda grad: fold
            return torch.autograd.grad(pointwise_conv2d(x, conv.weight, conv.bias), leaves, grad_out)

        return step

    ref = torch.autograd.grad(conv(x), leaves, grad_out)
    for fold in (False, True):
        err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(ours(fold)(), ref))
        assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), (label, dtype, fold, err)
    t = time_interleaved(
        {"per_image": ours(False), "folded": ours(True), "torch": lambda: torch.autograd.grad(conv(x), leaves, grad_out)},
        device=device, repeats=30, warmup=5, min_time_s=0.2, graph_calls=20,
    )  # fmt: skip
    ms = {k: v["median_ms"] for k, v in t.items()}
    return (f"| {label} | {str(dtype)[6:]} | {ms['per_image']:.3f} | {ms['folded']:.3f} | {ms['torch']:.3f} | "
            f"{ms['per_image'] / ms['folded']:.2f}x | {ms['torch'] / ms['folded']:.2f}x |")  # fmt: skip


print("| layer | dtype | per-image ms | folded ms | torch conv ms | folded / per-image speed | folded vs torch |")
print("|---|---|---|---|---|---|---|")
with fp32_math(device, True):
    for _group, label, n, c_in, c_out, hw in POINTWISE_SHAPES["full"]:
        for dtype in (torch.float32, torch.bfloat16):
            print(case(label, n, c_in, c_out, hw, dtype))

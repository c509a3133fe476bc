"""A/B on a CPU: in which layout should the weight reach oneDNN's fp32 matrix product inside pointwise_conv2d?

    python benchmarks/ab_weight_layout.py > benchmarks/ab_weight_layout.md   # CPU; prints one Markdown report

channels_last rows ``(N*H*W, C)``, N=8, the pointwise suite's shapes and MobileNet v2's 1x1 layers
(224x224 input), 2 threads (the benchmark's default), glibc malloc kept steady as the benchmark
keeps it. Every contender's time includes whatever it copies or packs per call, since
pointwise_conv2d pays that on every call.

* forward ``Y = X W^T + b``: the weight as it lies (row-major, no copy), a column-major copy of
  it, and oneDNN's packed blocked layout (``_reorder_linear_weight``), each against torch's 1x1
  convolution; the report marks the one pointwise_conv2d's rule (``_weight_operand``) picks;
* input gradient ``dX = dY W``: ``W^T`` as the free column-major view it is (what
  pointwise_conv2d passes) against a row-major copy of it.

Contenders of a case run round-robin in shuffled rounds (``time_interleaved``); every case is
measured ``ROUNDS`` times and the cells give the median and the range. On a shared 2-core host
the ranking of the forward layouts is not stable over an hour: see benchmarks/README.md.
"""

import statistics
import time

import torch
import torch.nn as nn

from experiments.allocator import set_malloc
from experiments.bench import POINTWISE_SHAPES, time_interleaved
from models.functional import _weight_operand

THREADS = 2
ROUNDS = 3  # each case measured this many times; the table gives the median of the per-round ratios and their range
MOBILENET_V2 = [  # (C_in, C_out, H=W) of MobileNet v2's 1x1 layers at 224x224 (expansion and projection)
    (32, 16, 112), (16, 96, 112), (96, 24, 56), (24, 144, 56), (144, 24, 56), (144, 32, 28), (32, 192, 28),
    (192, 32, 28), (192, 64, 14), (64, 384, 14), (384, 64, 14), (384, 96, 14), (96, 576, 14), (576, 96, 14),
    (576, 160, 7), (160, 960, 7), (960, 160, 7), (960, 320, 7), (320, 1280, 7),
]  # fmt: skip
LAYOUTS = ("as_it_lies", "column_major", "packed")
LINEAR = torch.ops.mkldnn._linear_pointwise


def product(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return LINEAR(rows, weight, bias, "none", [], "")


def forward_case(c_in: int, c_out: int, hw: int) -> dict[str, float]:
    """Speed of each forward layout relative to torch's 1x1 convolution (above 1: faster than torch), and torch's ms."""
    conv = nn.Conv2d(c_in, c_out, 1)
    x = torch.randn(8, c_in, hw, hw).contiguous(memory_format=torch.channels_last)
    rows = x.permute(0, 2, 3, 1).reshape(-1, c_in)  # a free view
    w, b = conv.weight.detach().reshape(c_out, c_in), conv.bias.detach()
    fns = {
        "as_it_lies": lambda: product(rows, w, b),
        "column_major": lambda: product(rows, w.t().contiguous().t(), b),
        "packed": lambda: product(rows, torch.ops.mkldnn._reorder_linear_weight(w, rows.shape[0]), b),
        "torch_conv": lambda: conv(x),
    }
    with torch.no_grad():
        ms = {k: v["median_ms"] for k, v in time_interleaved(fns, repeats=30, warmup=3, min_time_s=0.3).items()}
    return {k: ms["torch_conv"] / v for k, v in ms.items() if k != "torch_conv"} | {"ms": ms["torch_conv"]}


def input_grad_case(c_in: int, c_out: int, hw: int) -> dict[str, float]:
    """Speed of a row-major copy of W^T relative to its free view (above 1: the copy is faster), and the view's ms."""
    grad, w = torch.randn(8 * hw * hw, c_out), torch.randn(c_out, c_in)
    fns = {"free_view": lambda: product(grad, w.t(), None), "row_major_copy": lambda: product(grad, w.t().contiguous(), None)}
    ms = {k: v["median_ms"] for k, v in time_interleaved(fns, repeats=30, warmup=3, min_time_s=0.3).items()}
    return {"row_major_copy": ms["free_view"] / ms["row_major_copy"], "ms": ms["free_view"]}


def chosen_layout(c_in: int, c_out: int, hw: int) -> str:
    """The forward layout pointwise_conv2d's rule picks for this layer (``_weight_operand``)."""
    weight = _weight_operand(torch.randn(c_out, c_in), 8 * hw * hw)
    return "packed" if weight.is_mkldnn else "column_major" if weight.stride() == (1, c_out) else "as_it_lies"


def cell(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def main() -> None:
    torch.set_num_threads(THREADS)
    malloc = set_malloc("steady")
    shapes = [(c_in, c_out, hw) for *_, c_in, c_out, hw in POINTWISE_SHAPES["full"]] + MOBILENET_V2
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print("# Weight layout for oneDNN's fp32 product in pointwise_conv2d (A/B)\n")
    print(
        f"torch {torch.__version__}, {THREADS} threads, malloc {malloc}, N=8, channels_last rows, {ROUNDS} rounds a case, started {started}."
    )
    print("Forward cells: speed relative to torch's 1x1 convolution (torch ms / layout ms; above 1.00 faster than torch), median")
    print("(range) over the rounds; each time includes that layout's per-call copy or packing. `*` marks the layout")
    print("pointwise_conv2d picks. dX cell: a row-major copy of W^T relative to the free view it uses (above 1.00: the copy is faster).\n")
    print("| layer | torch conv ms | as it lies | column-major copy | packed | dX ms, W^T free view | dX row-major copy |")
    print("|---|---|---|---|---|---|---|")
    best = {name: 0 for name in LAYOUTS}
    chosen_ok = copy_wins = 0
    for c_in, c_out, hw in shapes:
        fwd = [forward_case(c_in, c_out, hw) for _ in range(ROUNDS)]
        dx = [input_grad_case(c_in, c_out, hw) for _ in range(ROUNDS)]
        speeds = {name: [r[name] for r in fwd] for name in LAYOUTS}
        medians = {name: statistics.median(v) for name, v in speeds.items()}
        pick = chosen_layout(c_in, c_out, hw)
        best[max(medians, key=medians.get)] += 1
        chosen_ok += medians[pick] >= 0.95
        dx_copy = [r["row_major_copy"] for r in dx]
        copy_wins += statistics.median(dx_copy) > 1.0
        cells = " | ".join(cell(speeds[name]) + ("*" if name == pick else "") for name in LAYOUTS)
        print(f"| {c_in}->{c_out} @{hw} | {statistics.median(r['ms'] for r in fwd):.3f} | {cells} | "
              f"{statistics.median(r['ms'] for r in dx):.3f} | {cell(dx_copy)} |", flush=True)  # fmt: skip
    print(f"\nOf {len(shapes)} layers: fastest forward layout " + ", ".join(f"{name} {count}" for name, count in best.items()))
    print(
        f"(median speeds); the picked layout at >= 0.95x torch's convolution on {chosen_ok}; dX faster with the row-major copy on {copy_wins}."
    )


if __name__ == "__main__":
    main()

"""Cost accounting with fvcore: parameters and multiply-adds, per operator, module and layer type.

Convention, stated once: **MACs** are multiply-accumulates of convolution and linear layers, one
multiply-add counted once, exactly as the MobileNet papers count "Mult-Adds". fvcore also counts
one multiply-add as one "flop", so for conv/linear its count *is* the MAC count; FLOPs in the
2-per-MAC sense are ``2 * macs``. ``fvcore_flops`` is fvcore's own total, which adds BatchNorm
(two per element with an affine BatchNorm in eval mode, fvcore's ``batchnorm_flop_jit``) and pooling, and is reported as fvcore names it.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Any

import torch
import torch.nn as nn

with warnings.catch_warnings():  # fvcore.nn jit-scripts a loss at import, which torch now warns about
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

__all__ = ["LAYER_TYPES", "cost_report", "format_cost", "layer_type", "measure_cost"]

LAYER_TYPES = ("standard", "pointwise", "depthwise", "grouped", "linear")


def layer_type(module: nn.Module) -> str | None:
    """Classify a conv or linear layer; ``None`` for layers that do no multiply-adds of their own.

    ``pointwise``: 1x1, groups=1. ``depthwise``: groups = in_channels > 1. ``standard``: k > 1,
    groups=1. ``grouped``: any other groups > 1 (a grouped 1x1 too). ``linear``: ``nn.Linear``.
    """
    if isinstance(module, nn.Linear):
        return "linear"
    if not isinstance(module, nn.Conv2d):
        return None
    if module.groups == 1:
        return "pointwise" if module.kernel_size == (1, 1) else "standard"
    if module.groups == module.in_channels:
        return "depthwise"
    return "grouped"


def _matmul_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of ``aten::matmul`` with broadcasting: batch x M x K x N.

    fvcore's own handle multiplies the first operand's size by N, which drops the batch when it
    sits on the second operand (``W @ x`` with W (K, C) and x (N, C, HW), as pointwise_conv2d does).
    """
    a = get_shape(inputs[0])
    out = get_shape(outputs[0])
    inner = a[-1] if len(a) > 1 else a[0]
    return math.prod(out) * inner


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_cost(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> dict[str, Any]:
    """Count a model's parameters and multiply-adds with fvcore on one input of ``input_shape``.

    MACs: one multiply-add counts once; conv + linear layers, as the MobileNet papers count
    ("Mult-Adds"). fvcore's "flops" count a multiply-add once as well, so they equal MACs for
    conv/linear; ``fvcore_flops`` is fvcore's total including BatchNorm and pooling.

    Args:
        model: any ``nn.Module``; measured in eval mode on CPU, its mode restored afterwards.
        input_shape: ``(N, C, H, W)``; the papers count per image, so use ``N = 1``.

    Returns:
        ``input_shape``, ``params``, ``macs``, ``fvcore_flops``, ``by_operator`` ({op: flops}),
        ``by_module`` ({top-level child: fvcore flops}, so BatchNorm and pooling included),
        ``by_layer_type`` ({type: {macs, params, weights, layers}} over
        standard/pointwise/depthwise/grouped/linear, plus ``other`` for the params of norms;
        ``weights`` leaves out biases, as MobileNets Table 2 counts parameters),
        ``unsupported_ops`` ({op: calls} fvcore could not count).
    """
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, torch.zeros(*input_shape, device=device))
            analysis.set_op_handle("aten::matmul", _matmul_macs)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            by_module = analysis.by_module()
            total = analysis.total()
            by_operator = dict(analysis.by_operator())
            unsupported = dict(Counter(analysis.unsupported_ops()))
    finally:
        model.train(was_training)

    by_type = {t: {"macs": 0, "params": 0, "weights": 0, "layers": 0} for t in LAYER_TYPES}
    typed_params = 0
    for name, module in model.named_modules():
        kind = layer_type(module)
        if kind is None:
            continue
        params = sum(p.numel() for p in module.parameters(recurse=False))
        by_type[kind]["macs"] += int(by_module.get(name, 0))
        by_type[kind]["params"] += params
        by_type[kind]["weights"] += module.weight.numel()  # no bias: what MobileNets Table 2 counts as parameters
        by_type[kind]["layers"] += 1
        typed_params += params
    params = count_params(model)
    by_type["other"] = {"macs": 0, "params": params - typed_params, "weights": 0, "layers": 0}
    macs = sum(v["macs"] for v in by_type.values())
    return {
        "input_shape": list(input_shape),
        "params": params,
        "macs": macs,
        "fvcore_flops": int(total),
        "by_operator": {op: int(v) for op, v in sorted(by_operator.items())},
        "by_module": {name: int(by_module[name]) for name, _ in model.named_children() if name in by_module},
        "by_layer_type": by_type,
        "unsupported_ops": unsupported,
    }


def cost_report(cfg: Any, batch_size: int = 1) -> dict[str, Any]:
    """:func:`measure_cost` of ``cfg.model`` on one ``cfg.data`` input, labelled with the model and data."""
    from .config import input_shape, model_from_config, model_options

    model = model_from_config(cfg)
    report = measure_cost(model, input_shape(cfg, batch_size))
    # model.stem=auto picks the stem by input size: say which one was built (ImageNet at 64 px gets CIFAR's).
    stem = getattr(model, "stem_kind", None)
    return {"model": cfg.model.name, "model_options": model_options(cfg.model), "data": cfg.data.name, "stem": stem, **report}


def format_cost(report: dict[str, Any]) -> str:
    """A readable table of a cost report: totals, then each layer type's share."""
    macs, params = report["macs"], report["params"]
    shape = "x".join(str(d) for d in report["input_shape"])
    stem = {"small": ", stem small (3x3 stride 1, for inputs <= 64 px)", "large": ", stem large (strided, the papers')"}
    lines = [
        f"{report.get('model', 'model')} on {report.get('data', '?')}, input {shape}{stem.get(report.get('stem'), '')}",
        f"  params        {params:>15,}  ({params / 1e6:.2f} M)",
        f"  MACs          {macs:>15,}  ({macs / 1e6:.1f} M multiply-adds of conv + linear layers)",
        f"  fvcore flops  {report['fvcore_flops']:>15,}  (fvcore's total: conv + linear + BatchNorm + pooling)",
        "",
        f"  {'layer type':<11} {'layers':>6} {'MACs':>15} {'MACs %':>7} {'params':>12} {'params %':>8} {'weights %':>9}",
    ]
    by_type = report["by_layer_type"]
    weights = sum(row.get("weights", 0) for row in by_type.values())
    for kind, row in by_type.items():
        if not row["layers"] and not row["params"]:
            continue
        share = f"{100 * row['weights'] / max(weights, 1):>8.2f}%" if "weights" in row and row["layers"] else ""
        lines.append(
            f"  {kind:<11} {row['layers']:>6} {row['macs']:>15,} {100 * row['macs'] / max(macs, 1):>6.2f}% "
            f"{row['params']:>12,} {100 * row['params'] / max(params, 1):>7.2f}% {share}".rstrip()
        )
    lines.append("  weights %: conv and linear weights without biases and norms, as MobileNets Table 2 counts parameters")
    skipped = report["unsupported_ops"]
    lines.append("")
    lines.append(
        "  not counted by fvcore: " + ", ".join(f"{op} x{n}" for op, n in skipped.items())
        if skipped
        else "  not counted by fvcore: nothing"
    )
    return "\n".join(lines)

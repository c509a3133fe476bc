"""Multi-process training on torch's own engine: ``torchrun --nproc_per_node=N scripts/run.py ...``.

gloo on CPU, nccl on GPU. Rank 0 writes checkpoints, results and wandb; metrics are reduced
across ranks. ``GlobalBatchNorm2d`` is a synchronised BatchNorm that also runs on CPU (torch's
``SyncBatchNorm`` needs a GPU), so a CPU run on N processes normalises over the global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

__all__ = [
    "DistInfo",
    "GlobalBatchNorm2d",
    "all_reduce_sum",
    "broadcast_buffers",
    "broadcast_object",
    "convert_sync_bn",
    "init_distributed",
]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum of every rank's gradient (each rank's loss uses the sum)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the global batch's: sums all-reduced across ranks.

    The reduction is differentiable, so gradients see the global mean and variance exactly as a
    single process with the whole batch would.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        # Sums in float64: var = E[x^2] - E[x]^2 loses digits in float32 when the mean is large.
        xd = x.double()
        count = torch.full((1,), x.numel() / c, device=x.device, dtype=torch.float64)
        stats = _AllReduceSum.apply(torch.cat([xd.sum((0, 2, 3)), xd.square().sum((0, 2, 3)), count]))  # (2C + 1,)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean.square()).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
            self.running_var.lerp_((var.detach() * n / (n - 1)).to(self.running_var.dtype), factor)
        compute = torch.promote_types(x.dtype, torch.float32)  # normalise bf16/fp16 inputs in float32, as BatchNorm does
        scale = torch.rsqrt(var + self.eps).to(compute)
        y = (x.to(compute) - mean.to(compute).view(1, c, 1, 1)) * scale.view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """Synchronise every BatchNorm2d: torch's SyncBatchNorm on GPU, :class:`GlobalBatchNorm2d` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced)
        else:
            convert_sync_bn(child, device)
    return model

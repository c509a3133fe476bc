"""The baseline convlab's training is measured against: a training loop written the way the guide
and common tutorials write it (torchvision ``DataLoader`` over PIL images with ``transforms``,
fp32, NCHW), with the same model, batch size, optimizer and learning-rate schedule as convlab's.

Nothing here is slowed on purpose: it is the standard recipe (``num_workers=2``, as the PyTorch
CIFAR-10 tutorial uses), so the comparison shows what convlab's data path, bf16 autocast and
channels_last buy on the same hardware.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .data import Split
from .records import sync

__all__ = ["PILDataset", "baseline_loader", "train_baseline"]


class PILDataset(Dataset):
    """A split served one PIL image at a time, as torchvision's CIFAR10/FashionMNIST datasets do."""

    def __init__(self, split: Split, transform: Any) -> None:
        self.images = split.images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C) uint8, PIL's layout
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        array = self.images[i]
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        return self.transform(image), self.labels[i]


def baseline_loader(split: Split, batch_size: int, *, train: bool, mean: list[float], std: list[float], crop_padding: int, flip: bool,
                    seed: int = 0, workers: int = 2, pin_memory: bool = False) -> DataLoader:  # fmt: skip
    """``transforms.Compose([RandomCrop(size, padding), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])``; ``pin_memory`` for a GPU."""
    import torchvision.transforms as T

    size = split.images.shape[-1]
    steps: list[Any] = []
    if train and crop_padding:
        steps.append(T.RandomCrop(size, padding=crop_padding))
    if train and flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return DataLoader(PILDataset(split, T.Compose(steps)), batch_size=batch_size, shuffle=train, num_workers=workers, drop_last=train,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0, pin_memory=pin_memory)  # fmt: skip


def train_baseline(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, lr_at: Any, *, epochs: int = 1,
                   max_steps: int | None = None, warmup_steps: int = 0, label_smoothing: float = 0.0,
                   device: torch.device | str = "cpu") -> dict[str, Any]:  # fmt: skip
    """The tutorial loop: batch to ``device``, zero_grad, forward, loss, backward, step. Returns images/s (after warm-up) and the final loss.

    ``lr_at(step)`` sets the learning rate each step, so the baseline follows convlab's schedule.
    Images/s counts the steps after ``warmup_steps`` (the first batches pay for worker start-up).
    """
    device = torch.device(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    model.train()
    step, images, start, loss = 0, 0, None, torch.tensor(float("nan"))
    for _ in range(epochs):
        for x, y in loader:
            if step == warmup_steps:
                sync(device)  # the warm-up steps a GPU still runs are not timed
                start, images = time.perf_counter(), 0
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            images += len(y)
            if max_steps is not None and step >= max_steps:
                break
        if max_steps is not None and step >= max_steps:
            break
    sync(device)  # a GPU's queued steps count
    seconds = time.perf_counter() - start if start is not None else float("nan")
    return {
        "steps": step,
        "img_per_s": images / seconds if start is not None else None,
        "seconds": seconds,
        "train_loss": float(loss.detach()),
    }

"""From a composed config to the objects it names: the model and its input shape."""

from __future__ import annotations

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from models import build_model

__all__ = ["input_shape", "model_from_config", "model_options"]


def model_options(model_cfg: DictConfig) -> dict:
    """The ``model`` config as ``build_model`` keywords; ``null`` means "not an option here"."""
    options = OmegaConf.to_container(model_cfg, resolve=True)
    options.pop("name")
    return {k: v for k, v in options.items() if v is not None}


def model_from_config(cfg: DictConfig) -> nn.Module:
    """Build ``cfg.model`` for ``cfg.data`` (classes, channels and image size come from the data)."""
    data = cfg.data
    return build_model(
        cfg.model.name, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size, **model_options(cfg.model)
    )


def input_shape(cfg: DictConfig, batch_size: int = 1) -> tuple[int, int, int, int]:
    """``(N, C, H, W)`` of one input batch for ``cfg.data``."""
    size = cfg.data.image_size
    return (batch_size, cfg.data.in_channels, size, size)

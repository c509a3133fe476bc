"""Model registry: ``build_model(name, ...)`` and ``list_models()``, like torchvision's ``get_model``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch.nn as nn

from .layers import set_pointwise_impl
from .networks import UnknownOptionError

__all__ = ["build_model", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``factory(num_classes=..., in_channels=..., **options)`` as ``name``; a duplicate name is an error."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = factory
    return factory


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(_MODELS)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, *, pointwise_impl: str = "torch", **options) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models`.
        num_classes: classifier outputs.
        in_channels: input image channels.
        pointwise_impl: ``"torch"`` (torch's 1x1 convolution) or ``"scratch"`` (convlab's
            :func:`models.pointwise_conv2d`) for every 1x1 convolution.
        **options: the model's keyword options (``image_size``, ``width``, block options, ...).

    Raises:
        ValueError: unknown name or option, or an option out of range; the message lists what is valid.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(list_models())}")
    fn = _MODELS[name]
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = [k for k in params if k not in ("num_classes", "in_channels")]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise UnknownOptionError(f"model {name!r}", unknown[0], [*valid, "pointwise_impl"])
    try:
        model = fn(num_classes=num_classes, in_channels=in_channels, **options)
    except UnknownOptionError as e:  # a network checks the options it passes to its blocks; this one is build_model's
        raise UnknownOptionError(e.owner, e.option, [*e.valid, "pointwise_impl"]) from None
    return set_pointwise_impl(model, pointwise_impl)

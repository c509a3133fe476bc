"""convlab models: convolution blocks, the networks built from them, and a registry.

from models import build_model, list_models, pointwise_conv2d
"""

from . import zoo as _zoo  # noqa: F401  (registers the models)
from .blocks import BLOCKS, BasicBlock, Bottleneck, DepthwiseBlock, InvertedResidual, PointwiseBlock, SeparableBlock, StandardBlock
from .functional import pointwise_conv2d
from .layers import ConvNormAct, DepthwiseConv2d, PointwiseConv2d, SqueezeExcite, get_act, get_norm, set_pointwise_impl
from .networks import BlockNet, MobileNetV1, MobileNetV2, ResNet
from .registry import build_model, list_models, register_model

__all__ = [
    "BLOCKS",
    "BasicBlock",
    "BlockNet",
    "Bottleneck",
    "ConvNormAct",
    "DepthwiseBlock",
    "DepthwiseConv2d",
    "InvertedResidual",
    "MobileNetV1",
    "MobileNetV2",
    "PointwiseBlock",
    "PointwiseConv2d",
    "ResNet",
    "SeparableBlock",
    "SqueezeExcite",
    "StandardBlock",
    "build_model",
    "get_act",
    "get_norm",
    "list_models",
    "pointwise_conv2d",
    "register_model",
    "set_pointwise_impl",
]

"""The registered models: one entry per config in ``conf/model/``."""

from __future__ import annotations

from functools import partial

from .blocks import BLOCKS
from .networks import BlockNet, MobileNetV1, MobileNetV2, ResNet
from .registry import register_model

# The block-comparison backbone with each block type: same stem, stages and head.
for _block in BLOCKS:
    register_model(_block, partial(BlockNet, _block))

register_model("mobilenet_v1", MobileNetV1)
register_model("mobilenet_v2", MobileNetV2)
register_model("resnet18", partial(ResNet, "basic", (2, 2, 2, 2)))
register_model("resnet50", partial(ResNet, "bottleneck", (3, 4, 6, 3)))

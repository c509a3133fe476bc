"""Every config in conf/ composes, and every model config instantiates for every dataset."""

from __future__ import annotations

import pytest
import torch

from experiments.config import model_from_config

from .conftest import CONF


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("model", _options("model"))
@pytest.mark.parametrize("data", ["cifar10", "cifar100", "fashion_mnist", "synthetic", "imagenet"])
def test_every_model_config_instantiates(compose_cfg, model, data):
    cfg = compose_cfg(f"model={model}", f"data={data}")
    net = model_from_config(cfg)
    assert net.head[-1].out_features == cfg.data.num_classes
    first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == cfg.data.in_channels


@pytest.mark.parametrize(
    "group", ["data", "trainer", "optim", "sched", "logger", "experiment", "hydra/launcher", "hydra/job_logging", "hydra/hydra_logging"]
)
def test_every_group_option_composes(compose_cfg, group):
    options = _options(group)
    assert options, group
    for option in options:
        cfg = compose_cfg(f"{group}={option}", hydra_cfg=group.startswith("hydra"))
        assert cfg.model.name


@pytest.mark.parametrize("config", ["config", "profile"])
def test_primary_configs_compose(compose_cfg, config):
    cfg = compose_cfg(config=config)
    assert cfg.model.name == "separable" and cfg.data.name == "cifar10" and cfg.format == "text"

"""Every config in conf/ composes, and every model config instantiates for every dataset."""

from __future__ import annotations

import re

import pytest
import torch

from experiments.config import model_from_config

from .conftest import CONF


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_model_group_offers_exactly_the_documented_models():
    """The shared backbone lives outside conf/model/, so --help and errors offer only real models."""
    assert _options("model") == sorted(
        ["standard", "depthwise", "pointwise", "separable", "inverted_residual", "bottleneck", "basic",
         "mobilenet_v1", "mobilenet_v2", "resnet18", "resnet50"]
    )  # fmt: skip


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


@pytest.mark.parametrize("optim", _options("optim"))
@pytest.mark.parametrize("sched", _options("sched"))
@pytest.mark.parametrize("trainer", _options("trainer"))
def test_training_configs_instantiate(compose_cfg, optim, sched, trainer):
    """Every optim x sched x trainer option passes the run checks and builds its optimizer and schedule."""
    from experiments.train import build_optimizer, check_config, lr_factor

    cfg = compose_cfg(f"optim={optim}", f"sched={sched}", f"trainer={trainer}")
    check_config(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model_from_config(cfg), cfg.optim)
    assert type(optimizer).__name__.lower() == cfg.optim.name
    factors = [lr_factor(s, 100, round(cfg.sched.warmup_epochs * 10), cfg.sched.name, cfg.sched.min_lr_ratio) for s in range(101)]
    assert max(factors) == pytest.approx(1.0) and all(0 <= f <= 1 for f in factors)


@pytest.mark.parametrize("logger", _options("logger"))
def test_logger_configs_instantiate(compose_cfg, tmp_path, logger):
    from experiments.tracking import NullTracker, WandbTracker, make_tracker

    cfg = compose_cfg(f"logger={logger}", "logger.mode=disabled" if logger == "wandb" else "logger=none")
    tracker = make_tracker(cfg, tmp_path, {})
    assert isinstance(tracker, NullTracker)  # disabled wandb and none record nothing
    if logger == "wandb":
        offline = make_tracker(compose_cfg("logger.mode=offline"), tmp_path, {"seed": 0})
        assert isinstance(offline, WandbTracker) and offline.mode == "offline" and offline.run_id
        offline.finish()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.progress=1", "trainer.progress=1 is not valid; choose from: auto, true, false"),
        ("trainer.stop_at_target=0", "trainer.stop_at_target=0 is not valid; choose from: true, false"),
        ("trainer.compile='no'", "trainer.compile='no' is not valid; choose from: true, false"),
        ("trainer.channels_last=1", "trainer.channels_last=1 is not valid"),
        ("trainer.sync_bn=yes", "trainer.sync_bn='yes' is not valid"),
        ("data.augment.flip=0", "data.augment.flip=0 is not valid"),
        ("data.download=maybe", "data.download='maybe' is not valid"),
    ],
)
def test_check_config_takes_only_true_or_false_for_switches(compose_cfg, override, message):
    """train() called from Python has no command-line type check: 0, 1 and strings are not switches (1 == True in Python)."""
    from experiments.train import check_config

    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(compose_cfg("data=cifar10", override), torch.device("cpu"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("logger.mode=cloud", "logger.mode='cloud' is not valid; choose from: auto, online, offline, disabled"),
        ("logger.project=a/b", "logger.project='a/b' is not valid; a name without any of / \\ # ? % :"),
        ("logger.group=[1,2]", "logger.group=[1, 2] is not valid; a name, or null"),
    ],
)
def test_logger_settings_are_checked_before_the_run(compose_cfg, override, message):
    """wandb refused them only after data and cost, leaving a failed run dir (mode), or training went on without W&B (project, group)."""
    from experiments.train import check_config

    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(compose_cfg("data=cifar10", override), torch.device("cpu"))

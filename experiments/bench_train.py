"""The ``train`` benchmark suite: images/s of convlab's training step against the tutorial baseline.

Both sides train the same model (same seed, same initial weights) on the same data with the same
batch size, optimizer and learning-rate schedule. convlab's side is the code ``scripts/run.py``
runs (:class:`experiments.data.TensorLoader` batches augmented on the device, the trainer's
precision and memory format, :func:`experiments.train.train_step`); the baseline is
:mod:`experiments.baseline` (torchvision ``DataLoader`` over PIL images with ``transforms``, fp32,
NCHW). Images/s counts whole steps, data included, after warm-up steps, measured in the same run.

With ``train.full=true`` both sides also train the whole recipe (``trainer=quick`` by default) and
report test accuracy, so a speed-up is only claimed at equal accuracy.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from .baseline import baseline_loader, train_baseline
from .bench import BenchContext, _is_int, register_suite
from .cli import CONF_DIR
from .config import model_from_config
from .data import load_data, make_loaders
from .records import sync
from .train import build_optimizer, lr_factor, seed_everything, train, train_step

__all__ = ["check_train_options", "train_suite"]

log = logging.getLogger("convlab")

TRAIN_DEFAULTS = {"model": "separable", "data": "fashion_mnist", "trainer": "quick", "steps": 60, "warmup_steps": 10, "full": False}
TINY = {"steps": 3, "warmup_steps": 1}
GROUPS = ("model", "data", "trainer")  # train.<key> names a config in conf/<key>/


def _choices(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def check_train_options(train: dict[str, Any]) -> None:
    """The ``train`` options (conf/benchmark.yaml) before any timing: a mistake costs one line, not minutes.

    Raises:
        ValueError: an unknown key, a config name not in ``conf/<group>/``, ``steps`` not an int >= 1,
            ``warmup_steps`` not an int >= 0, ``full`` not true/false; the message names ``train.<key>``.
    """
    unknown = sorted(set(train) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key 'train.{unknown[0]}'; train has: {', '.join(TRAIN_DEFAULTS)}")
    for group in GROUPS:
        if group in train and train[group] not in (choices := _choices(group)):
            raise ValueError(f"unknown train.{group} {train[group]!r}; choose from: {', '.join(choices)}")
    for key, low, what in (("steps", 1, "timed training steps per side"), ("warmup_steps", 0, "untimed steps first")):
        value = train.get(key, TRAIN_DEFAULTS[key])
        if not _is_int(value, low):
            raise ValueError(f"train.{key}={value!r} must be a whole number >= {low} ({what})")
    if not isinstance(train.get("full", False), bool):
        raise ValueError(f"train.full={train['full']!r} must be true or false")


def _run_config(overrides: list[str]) -> DictConfig:
    """The training config ``scripts/run.py`` would compose for these overrides."""
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


def _ours_throughput(cfg: DictConfig, data: Any, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    seed_everything(cfg.seed)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model = model_from_config(cfg).to(device=device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.trainer.precision == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)
    loader = make_loaders(data, cfg, device)["train"]
    total = cfg.trainer.epochs * len(loader)
    model.train()
    done, start, images = 0, 0.0, 0
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                sync(device)  # the warm-up steps a GPU still runs are not timed
                start, images = time.perf_counter(), 0
            for group in optimizer.param_groups:
                group["lr"] = cfg.optim.lr * lr_factor(
                    done, total, round(cfg.sched.warmup_epochs * len(loader)), cfg.sched.name, cfg.sched.min_lr_ratio
                )
            loss, _ = train_step(model, x, y, optimizer, scaler, criterion, device, cfg.trainer.precision, cfg.trainer.grad_clip)
            done += 1
            images += len(y)
            if done >= warmup + steps:
                break
    float(loss.detach())  # waits for the device
    seconds = time.perf_counter() - start
    return {"img_per_s": images / seconds, "steps": steps, "seconds": seconds}


def _baseline(cfg: DictConfig, data: Any, *, steps: int | None, warmup: int, epochs: int = 1) -> tuple[nn.Module, dict[str, Any]]:
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)  # the device convlab's side trains on: the same hardware
    model = model_from_config(cfg).to(device)  # fp32, NCHW: the tutorial's defaults
    optimizer = build_optimizer(model, cfg.optim)
    aug = cfg.data.augment
    loader = baseline_loader(data.train, cfg.trainer.batch_size, train=True, mean=list(cfg.data.mean), std=list(cfg.data.std),
                             crop_padding=aug.crop_padding, flip=aug.flip, seed=cfg.seed, pin_memory=device.type == "cuda")  # fmt: skip
    total = cfg.trainer.epochs * len(loader)
    warm = round(cfg.sched.warmup_epochs * len(loader))

    def lr_at(step: int) -> float:
        return cfg.optim.lr * lr_factor(step, total, warm, cfg.sched.name, cfg.sched.min_lr_ratio)

    if steps is not None:  # as many epochs as the timed steps need, as convlab's side loops (a small data set has few batches)
        epochs = max(epochs, math.ceil((warmup + steps) / len(loader)))
    stats = train_baseline(model, loader, optimizer, lr_at, epochs=epochs, max_steps=None if steps is None else warmup + steps,
                           warmup_steps=warmup, label_smoothing=cfg.trainer.label_smoothing, device=device)  # fmt: skip
    return model, stats


@torch.no_grad()
def _baseline_accuracy(model: nn.Module, cfg: DictConfig, data: Any) -> float:
    """Test accuracy the tutorial way: a DataLoader over the test set, argmax, count."""
    loader = baseline_loader(
        data.test, 512, train=False, mean=list(cfg.data.mean), std=list(cfg.data.std), crop_padding=0, flip=False, workers=0
    )
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
        total += len(y)
    return correct / total


@register_suite("train")
def train_suite(ctx: BenchContext) -> dict[str, Any]:
    """convlab's training step vs the tutorial baseline: images/s (and, with ``train.full``, accuracy after the whole recipe)."""
    opts = {**TRAIN_DEFAULTS, **ctx.options.train, **(TINY if ctx.options.size == "tiny" else {})}
    overrides = [f"model={opts['model']}", f"data={opts['data']}", f"trainer={opts['trainer']}", "logger=none", f"device={ctx.device}"]
    if ctx.options.size == "tiny":
        overrides += ["data=synthetic", "data.train_size=256", "data.test_size=64", "trainer.batch_size=32"]
    cfg = _run_config(overrides)
    try:
        data = load_data(cfg.data, seed=cfg.seed)
    except ValueError as ex:  # its advice names run.py's data.root, which benchmark.py reads from the environment
        raise ValueError(f"{ex} (benchmark.py: data.root is $CONVLAB_DATA, now {cfg.data.root})") from None
    steps, warmup = int(opts["steps"]), int(opts["warmup_steps"])
    ours = _ours_throughput(cfg, data, ctx.device, steps, warmup)
    _, base = _baseline(cfg, data, steps=steps, warmup=warmup)
    if base["steps"] != warmup + steps:  # both sides time the same steps, or the ratio means nothing
        raise RuntimeError(f"the baseline ran {base['steps']} steps, not warmup + steps = {warmup + steps}")
    log.info(
        "train %s: convlab %.0f img/s, baseline %.0f img/s (%.2fx)",
        cfg.model.name,
        ours["img_per_s"],
        base["img_per_s"],
        ours["img_per_s"] / base["img_per_s"],
    )
    result: dict[str, Any] = {
        **ctx.record(cfg.trainer.precision), "model": cfg.model.name, "data": cfg.data.name, "trainer": opts["trainer"],
        "batch_size": cfg.trainer.batch_size, "project_img_s": ours["img_per_s"], "baseline_img_s": base["img_per_s"],
        "ratio": ours["img_per_s"] / base["img_per_s"], "steps": steps, "warmup_steps": warmup,
        "project": {"precision": cfg.trainer.precision, "channels_last": cfg.trainer.channels_last, "loader": "TensorLoader (uint8 on device, batched augmentation)"},
        "baseline": {"precision": "fp32", "channels_last": False, "loader": "torchvision DataLoader, PIL transforms, num_workers=2"},
    }  # fmt: skip
    if opts["full"]:
        with tempfile.TemporaryDirectory() as run_dir:
            record = train(cfg, Path(run_dir))
        start = time.perf_counter()
        model, full = _baseline(cfg, data, steps=None, warmup=warmup, epochs=cfg.trainer.epochs)
        result["full"] = {
            "epochs": cfg.trainer.epochs,
            "project_test_acc": record["final"]["test_acc"], "project_wall_s": record["final"]["wall_seconds"],
            "project_img_s": sum(h["img_per_s"] for h in record["history"]) / len(record["history"]),
            "baseline_test_acc": _baseline_accuracy(model, cfg, data), "baseline_wall_s": time.perf_counter() - start,
            "baseline_img_s": full["img_per_s"],
        }  # fmt: skip
        result["full"]["ratio"] = result["full"]["project_img_s"] / result["full"]["baseline_img_s"]
        log.info("train %s full recipe: convlab %.2f%% in %.0f s, baseline %.2f%% in %.0f s", cfg.model.name, 100 * result["full"]["project_test_acc"],
                 result["full"]["project_wall_s"], 100 * result["full"]["baseline_test_acc"], result["full"]["baseline_wall_s"])  # fmt: skip
    return {"results": [result], "tables": _tables(result), "notes": NOTES}


def _tables(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [[r["model"], r["data"], str(r["batch_size"]), f"{r['project_img_s']:.0f}", f"{r['baseline_img_s']:.0f}", f"{r['ratio']:.2f}x"]]
    tables = [{"title": f"Training images/s ({r['steps']} steps after {r['warmup_steps']} warm-up, data included)",
               "columns": ["model", "data", "batch", "convlab img/s", "baseline img/s", "ratio"], "rows": rows}]  # fmt: skip
    if "full" in r:
        f = r["full"]
        tables.append({
            "title": f"Whole recipe (trainer={r['trainer']}, {f['epochs']} epochs): speed at equal accuracy",
            "columns": ["side", "test acc", "wall time", "mean img/s"],
            "rows": [["convlab", f"{100 * f['project_test_acc']:.2f}%", f"{f['project_wall_s']:.0f} s", f"{f['project_img_s']:.0f}"],
                     ["baseline", f"{100 * f['baseline_test_acc']:.2f}%", f"{f['baseline_wall_s']:.0f} s", f"{f['baseline_img_s']:.0f}"]],
        })  # fmt: skip
    return tables


NOTES = [
    "convlab: scripts/run.py's own code path: TensorLoader (the split as one uint8 tensor, batches cut by index, crop/flip on whole batches), "
    "the trainer's precision (bf16 autocast) and channels_last, experiments.train.train_step.",
    "baseline: experiments/baseline.py, written as the guide and the PyTorch tutorials write it: torchvision DataLoader "
    "(num_workers=2, shuffle) over PIL images with RandomCrop/RandomHorizontalFlip/ToTensor/Normalize, fp32, NCHW, "
    "zero_grad/forward/backward/step. Same model, seed, batch size, optimizer and learning-rate schedule.",
    "img/s: images of whole training steps (data loading included) per second, after the warm-up steps; the baseline's "
    "warm-up also absorbs its worker start-up. Whole-recipe rows: wall time of the whole run, evaluation included.",
]

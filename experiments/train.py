"""Training, straight-line: seed -> model -> data -> cost -> optimizer -> loop -> results.

One call of :func:`train` is one run: it writes ``results.json`` (status ``running`` while it
trains, ``completed`` or ``failed`` with a reason at the end), a checkpoint per epoch, and a wandb
run. ``resume=auto`` continues from the newest good checkpoint in the run dir; a run dir that
already holds a completed run with the same config is not trained again.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, ListConfig, OmegaConf

from .allocator import steady_malloc
from .cli import Interrupted, raise_interrupted, resource_error
from .config import input_shape, model_from_config, model_options
from .cost import measure_cost
from .data import check_example_form, check_subset_form, load_data, make_loaders
from .distributed import all_reduce_sum, broadcast_buffers, broadcast_object, convert_sync_bn, init_distributed
from .records import (
    CHECKPOINT_KEYS,
    env_info,
    incomplete,
    list_checkpoints,
    load_checkpoint,
    now,
    read_json,
    resolve_device,
    save_checkpoint,
    write_json,
)
from .tracking import MODES as WANDB_MODES
from .tracking import Tracker, make_tracker

__all__ = [
    "VOLATILE",
    "Divergence",
    "build_optimizer",
    "check_config",
    "check_resume",
    "config_difference",
    "evaluate",
    "is_volatile",
    "lr_factor",
    "measure_latency",
    "resolve_device",
    "seed_everything",
    "train",
    "train_step",
]

log = logging.getLogger("convlab")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
# Keys that do not change what a run computes: a run dir may be resumed with other values.
VOLATILE = ("resume", "format", "logger", "tags", "latency_batch_sizes", "device", "trainer.progress", "trainer.num_threads",
            "trainer.target_acc", "data.root", "data.download")  # fmt: skip


class Divergence(RuntimeError):
    """The loss became non-finite."""


# -------------------------------------------------------------------------------------- checks


def _whole(key: str, value: Any, low: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key}={value!r} must be a whole number >= {low}" + (" (or null)" if allow_none else ""))


def _flag(key: str, value: Any, *extra: str) -> None:
    """A true/false option (and its ``extra`` named values): 0 and 1 are refused, though ``in (True, False)`` matches them."""
    if not (isinstance(value, bool) or (isinstance(value, str) and value in extra)):
        raise ValueError(f"{key}={value!r} is not valid; choose from: {', '.join([*extra, 'true', 'false'])}")


def _number(key: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{low} {'<' if low_open else '<='} {key.split('.')[-1]}" + (f" <= {high}" if high != math.inf else "")
        raise ValueError(f"{key}={value!r} out of range; valid: {bound}")


def check_config(cfg: DictConfig, device: torch.device) -> None:
    """Everything about a run config that can be checked before data is loaded; ValueError naming the bad value."""
    t, o, s = cfg.trainer, cfg.optim, cfg.sched
    _whole("trainer.epochs", t.epochs)
    _whole("trainer.batch_size", t.batch_size)
    _whole("trainer.eval_batch_size", t.eval_batch_size)
    _whole("trainer.max_steps", t.max_steps, allow_none=True)
    _whole("trainer.eval_every", t.eval_every)
    _whole("trainer.keep_checkpoints", t.keep_checkpoints)
    _whole("trainer.num_threads", t.num_threads, allow_none=True)
    if t.precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={t.precision!r} is not valid; choose from: {', '.join(PRECISIONS)}")
    if t.precision == "fp16" and device.type != "cuda":
        raise ValueError(f"trainer.precision=fp16 needs a CUDA device (gradient scaling); on {device.type} use bf16 or fp32")
    # A GPU without bf16 units (before Ampere) runs bf16 emulated and slowly: refuse it. torch's
    # is_bf16_supported asks about the current GPU, and says yes to emulation; this asks about `device`.
    native_bf16 = device.type == "cuda" and (bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8)
    if t.precision == "bf16" and device.type == "cuda" and not native_bf16:
        raise ValueError(f"trainer.precision=bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or fp32")
    _number("trainer.label_smoothing", t.label_smoothing, 0.0, 0.99)
    if t.grad_clip is not None:
        _number("trainer.grad_clip", t.grad_clip, 0.0, low_open=True)
    if o.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={o.name!r} is not valid; choose from: {', '.join(OPTIMIZERS)}")
    _number("optim.lr", o.lr, 0.0, low_open=True)
    _number("optim.weight_decay", o.weight_decay, 0.0)
    _number("optim.momentum", o.momentum, 0.0, 0.999999)
    if s.name not in SCHEDULES:
        raise ValueError(f"sched.name={s.name!r} is not valid; choose from: {', '.join(SCHEDULES)}")
    _number("sched.warmup_epochs", s.warmup_epochs, 0.0)
    _number("sched.min_lr_ratio", s.min_lr_ratio, 0.0, 1.0)
    target = t.get("target_acc")
    if target is not None:
        if isinstance(target, (int, float)) and not isinstance(target, bool) and 1 < target <= 100:
            raise ValueError(f"trainer.target_acc={target!r} is a fraction of the test set: use {target / 100:g} for {target:g}%")
        _number("trainer.target_acc", target, 0.0, 1.0, low_open=True)
    for key in ("channels_last", "compile", "sync_bn", "stop_at_target"):
        _flag(f"trainer.{key}", t.get(key, False))
    _flag("trainer.progress", t.progress, "auto")
    if t.get("stop_at_target") and t.get("target_acc") is None:
        raise ValueError("trainer.stop_at_target=true needs a target: set trainer.target_acc (a fraction, e.g. 0.94)")
    if cfg.format not in ("text", "json"):
        raise ValueError(f"format={cfg.format!r} is not valid; choose from: text, json")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**63:
        raise ValueError(f"seed={cfg.seed!r} must be a whole number in [0, 2**63)")
    sizes = cfg.get("latency_batch_sizes", [1])
    if not isinstance(sizes, ListConfig | list) or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ValueError(f"latency_batch_sizes={sizes!r} must be a list of whole numbers >= 1, e.g. [1] or [1,32]")
    if o.name == "adamw":
        _number("optim.beta2", o.get("beta2", 0.999), 0.0, 0.999999)
    _check_data(cfg.data)
    _check_logger(cfg.logger)
    if cfg.resume not in ("auto", "never") and not Path(str(cfg.resume)).exists():
        raise ValueError(f"resume={cfg.resume!r}: no such run dir or checkpoint; use auto, never, or a path that exists")


# Characters W&B refuses in a project name ("Invalid project name ...: cannot contain characters '/,\\,#,?,%,:'").
WANDB_BAD_PROJECT_CHARS = ("/", "\\", "#", "?", "%", ":")


def _check_logger(logger: DictConfig) -> None:
    """wandb's settings, before a run dir exists (wandb.init would refuse them after data and cost)."""
    if logger.name != "wandb":
        return
    if logger.mode not in WANDB_MODES:
        raise ValueError(f"logger.mode={logger.mode!r} is not valid; choose from: {', '.join(WANDB_MODES)}")
    if not isinstance(logger.project, str) or not logger.project.strip() or set(logger.project) & set(WANDB_BAD_PROJECT_CHARS):
        raise ValueError(f"logger.project={logger.project!r} is not valid; a name without any of {' '.join(WANDB_BAD_PROJECT_CHARS)}")
    for key in ("entity", "group"):
        if logger.get(key) is not None and not isinstance(logger.get(key), str):
            raise ValueError(f"logger.{key}={logger.get(key)!r} is not valid; a name, or null")


def _check_data(d: DictConfig) -> None:
    """The data config's numbers, before any data is read."""
    _whole("data.in_channels", d.in_channels)
    _whole("data.num_classes", d.num_classes, low=2)
    _whole("data.image_size", d.image_size)
    if "root" in d and (d.root is None or not str(d.root).strip()):
        raise ValueError(f"data.root={d.root!r} is not a dir; pass data.root=PATH (the default is data, or $CONVLAB_DATA)")
    if "download" in d:
        _flag("data.download", d.download)
    if "val_split" in d:  # their forms; whether the split holds enough examples is known after loading
        check_example_form(d.val_split, "data.val_split")
    check_subset_form(d.get("subset"), d.get("subset_seed"))
    for key in ("train_size", "test_size"):  # synthetic only
        if key in d:
            _whole(f"data.{key}", d[key])
    if "augment" in d:
        _whole("data.augment.crop_padding", d.augment.crop_padding, low=0)
        _flag("data.augment.flip", d.augment.flip)
    for key in ("mean", "std"):
        values = list(d[key])
        if len(values) != d.in_channels or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError(f"data.{key}={values} must hold {d.in_channels} numbers, one per input channel (data.in_channels)")
    if any(v <= 0 for v in d.std):
        raise ValueError(f"data.std={list(d.std)} must be > 0 in every channel (it divides the pixels)")


# ---------------------------------------------------------------------------------- ingredients


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's (which takes 32 bits) and torch's generators, on every device."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or AdamW; weight decay only on weights with ndim > 1 (not norms, not biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=bool(cfg.get("nesterov", False)) and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, cfg.get("beta2", 0.999)))


def lr_factor(step: int, total_steps: int, warmup_steps: int, name: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if name == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "onecycle":
        return 1 - (1 - min_ratio) * progress
    return 1.0


@torch.no_grad()
def measure_latency(model: nn.Module, shape: tuple[int, ...], device: torch.device, channels_last: bool, budget_s: float = 1.0) -> float:
    """Median fp32 inference latency (ms) of one batch of ``shape``, eval mode, after warm-up.

    glibc's allocator is held steady meanwhile, as in the benchmarks (see
    :mod:`experiments.allocator`), so large activations do not page-fault in on some calls only.
    What remains varies between processes: MobileNet-224 at batch 1 measured 15.2-17.2 ms in six
    fresh processes on a 2-core VM, and 12.4 ms once.
    """
    from .bench import time_interleaved  # the benchmarks' timer: warm-up, CUDA events, gc off

    was_training = model.training
    model.eval()
    x = torch.randn(shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with steady_malloc():
        timed = time_interleaved({"model": lambda: model(x)}, device=device, repeats=5, warmup=3, min_time_s=budget_s, max_repeats=200)
    model.train(was_training)
    return timed["model"]["median_ms"]


def record_latency(cost: dict[str, Any], model: nn.Module, cfg: DictConfig, device: torch.device, sizes: Any) -> None:
    """Measure ``model``'s latency at each batch size in ``sizes`` into ``cost``: ``latency_ms`` (by batch
    size, added to those already there), ``latency_device`` and, on a CPU, ``latency_load_avg`` (by
    batch size, the 1-minute load average then): a latency measured while other work shared the cores
    can be many times too high, and the record says so. A load above the CPU count is also warned about.
    A batch size the machine has no memory for is skipped, its reason in ``latency_errors``."""
    load = os.getloadavg()[0] if device.type == "cpu" and hasattr(os, "getloadavg") else None
    measured, failed = {}, {}
    for b in sizes:
        try:
            measured[str(b)] = measure_latency(model, input_shape(cfg, int(b)), device, cfg.trainer.channels_last)
        except (MemoryError, RuntimeError) as ex:  # a batch too large for the machine: the trained run stands
            reason = resource_error(ex)
            if reason is None:
                raise
            failed[str(b)] = reason
            log.warning("latency at batch size %s not measured: %s", b, reason)
    if failed:
        cost["latency_errors"] = {**(cost.get("latency_errors") or {}), **failed}
    cost["latency_ms"] = {**(cost.get("latency_ms") or {}), **measured}
    cost["latency_device"] = str(device)
    if load is not None:
        cost["latency_load_avg"] = {**(cost.get("latency_load_avg") or {}), **dict.fromkeys(measured, round(load, 2))}
        cpus = os.cpu_count() or 1
        if load > cpus:
            log.warning("latency measured while the 1-minute load average was %.1f on %d CPUs: other work shared them, "
                        "so it may be too high (recorded as cost.latency_load_avg)", load, cpus)  # fmt: skip


class Progress:
    """A one-line progress bar on stderr (loss, accuracy, images/s, ETA); silent when not a terminal."""

    def __init__(self, enabled: bool | str, total: int, label: str) -> None:
        self.enabled = sys.stderr.isatty() if enabled == "auto" else bool(enabled)
        self.total, self.label, self.start, self.last = total, label, time.perf_counter(), 0.0

    def update(self, step: int, sums: torch.Tensor, world_size: int = 1) -> None:
        """``sums``: (loss sum, correct, count) so far; read (a device sync) only when the bar is drawn."""
        now_ = time.perf_counter()
        if not self.enabled or (now_ - self.last < 0.2 and step < self.total):
            return
        self.last = now_
        loss_sum, correct, count = sums.tolist()
        elapsed = now_ - self.start
        eta = elapsed / max(step, 1) * (self.total - step)
        bar = "#" * int(20 * step / self.total)
        sys.stderr.write(f"\r{self.label} [{bar:<20}] {step}/{self.total} loss {loss_sum / count:.4f} acc {100 * correct / count:5.1f}% "
                         f"{count * world_size / max(elapsed, 1e-9):7.0f} img/s ETA {int(eta) // 60}:{int(eta) % 60:02d} ")  # fmt: skip
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               criterion: nn.Module, device: torch.device, precision: str, grad_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One optimizer step: autocast forward, (scaled) backward, optional clipping, step. Returns (loss, logits)."""
    with _autocast(device, precision):
        logits = model(x)
        loss = criterion(logits, y)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, logits


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, precision: str) -> dict[str, float]:
    """Accuracy and mean loss over a whole split, summed across ranks; the model is left in the mode it came in."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # correct, loss sum, count
    for x, y in loader:
        with _autocast(device, precision):
            logits = model(x)
        totals += torch.stack([(logits.argmax(1) == y).sum().double(), nn.functional.cross_entropy(logits.float(), y, reduction="sum").double(),
                               torch.full((), len(y), device=device, dtype=torch.float64)])  # fmt: skip
    all_reduce_sum(totals)
    model.train(was_training)
    return {"acc": (totals[0] / totals[2]).item(), "loss": (totals[1] / totals[2]).item()}


def time_to_target(history: list[dict[str, Any]], target: float | None) -> dict[str, Any] | None:
    """When a run's test accuracy first reached ``target`` (a fraction), and after how many seconds.

    Only evaluated epochs count (``trainer.eval_every`` sets the resolution). ``train_seconds`` sums
    the training epochs' time up to and including that epoch (steps and data, as DAWNBench and
    airbench count), ``seconds_with_eval`` adds the evaluations. None when no target is set.
    """
    if target is None:
        return None
    train_s = with_eval_s = 0.0
    for h in history:
        train_s += h["seconds"]
        with_eval_s += h["seconds"] + (h.get("eval_seconds") or 0.0)
        if h["test_acc"] is not None and h["test_acc"] >= target:
            return {"acc": target, "reached": True, "epoch": h["epoch"], "test_acc": h["test_acc"],
                    "train_seconds": train_s, "seconds_with_eval": with_eval_s}  # fmt: skip
    return {"acc": target, "reached": False, "epoch": None, "test_acc": None, "train_seconds": None, "seconds_with_eval": None}


def _off(value: Any) -> bool:
    """An option that is off: null or false (not 0, which ``in (None, False)`` would also match)."""
    return value is None or value is False


def is_volatile(key: str, stops_at_target: bool) -> bool:
    """Whether the dotted config ``key`` leaves what a run computes unchanged (it is, or is under, a
    VOLATILE key). The target only times a run, unless the run stops at it: then it changes what is trained."""
    return any(key == v or key.startswith(v + ".") for v in VOLATILE) and not (stops_at_target and key == "trainer.target_acc")


def config_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first key (dotted) whose value differs, ignoring VOLATILE keys and an option that is off on
    one side and absent on the other (added since); None when equal."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    a, b = (flat(d) for d in (old, new))
    stops = bool(a.get("trainer.stop_at_target.") or b.get("trainer.stop_at_target."))
    for key in sorted(set(a) | set(b)):
        if is_volatile(key.rstrip("."), stops):
            continue
        if (key not in a and _off(b[key])) or (key not in b and _off(a[key])):
            continue  # an option that is off, added (or dropped) after the other run was made: the same run
        if a.get(key) != b.get(key):
            return f"{key.rstrip('.')}: {a.get(key)!r} there, {b.get(key)!r} now"
    return None


def resume_checkpoint(cfg: DictConfig, run_dir: Path | None, config: dict[str, Any]) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint a run with ``config`` continues from, with its path: the run dir's newest with
    ``resume=auto``, ``resume=PATH``'s (a run dir or a file), none with ``resume=never``.

    Raises:
        ValueError: ``resume=PATH`` holds no loadable checkpoint, or the checkpoint was written with
            another config (naming the first key that differs).
    """
    source = run_dir if cfg.resume == "auto" else None if cfg.resume == "never" else Path(str(cfg.resume))
    loaded = load_checkpoint(source, CHECKPOINT_KEYS) if source is not None else None
    if loaded is None and cfg.resume not in ("auto", "never"):
        raise ValueError(f"resume={cfg.resume!r} holds no loadable checkpoint (checkpoint-epochNNNN.pt); use resume=auto or never")
    if loaded is not None:
        difference = config_difference(loaded[0].get("config", {}), config)
        if difference is not None:
            raise ValueError(f"checkpoint {loaded[1]} was written with another config ({difference}); use resume=never or another run dir")
    return loaded


def check_resume(cfg: DictConfig) -> None:
    """``resume=PATH`` before Hydra makes a run dir: a refused checkpoint costs one line, not a failed run
    record in a new dir. ``cfg`` is the composed config with its ``hydra`` node, which runs do not record."""
    if cfg.resume in ("auto", "never"):
        return
    task = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    resume_checkpoint(cfg, None, OmegaConf.to_container(task, resolve=True))


# ---------------------------------------------------------------------------------------- run


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train ``cfg`` in ``run_dir`` and return its results record (also written to results.json by rank 0).

    Raises:
        ValueError: bad input. A device the machine lacks, a config :func:`check_config` refuses, or a
            run dir holding a completed run of another config: raised before the run dir is touched
            (no record; the CLI checks these before Hydra makes the dir). Bad data or a model that
            cannot be built: the record says ``failed`` with the reason.
        Divergence: the loss became non-finite; the record says ``failed`` and the last good
            checkpoint is kept.
        KeyboardInterrupt: Ctrl-C, or :class:`Interrupted` on SIGTERM; the record says
            ``failed: interrupted (...)`` and the checkpoints are kept for a resume.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, raise_interrupted) if main_thread else None
    try:
        return _train(cfg, Path(run_dir))
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_handler)


def _set_aside_previous_run(run_dir: Path) -> None:
    """``resume=never`` in a used run dir: the earlier record becomes ``results.previous.json`` and its
    checkpoints move to ``previous/``. Left in place, they would outrank the fresh run's: its
    epoch-1 checkpoint pruned as the oldest, and after a crash the same command would resume the
    earlier run."""
    results_path, kept = run_dir / "results.json", run_dir / "results.previous.json"
    if results_path.exists():
        if kept.exists():  # one earlier run is kept, not all: say which one goes
            log.warning("resume=never: %s (the run before the earlier one) is replaced", kept)
        results_path.replace(kept)
        log.info("resume=never: the run dir's earlier results.json is kept as results.previous.json")
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        aside = run_dir / "previous"
        aside.mkdir(exist_ok=True)
        older = list_checkpoints(aside)
        if older:
            log.warning("resume=never: %d checkpoint(s) of the run before the earlier one are deleted from %s", len(older), aside)
        for old in older:  # one earlier run is kept, like results.previous.json
            old.unlink()
        for path in checkpoints:
            path.replace(aside / path.name)
        log.info("resume=never: the earlier run's %d checkpoint(s) moved to %s", len(checkpoints), aside)


def _add_latencies(record: dict[str, Any], cfg: DictConfig, device: torch.device, save: Callable[[dict[str, Any]], None]) -> None:
    """A reused run asked for latency at batch sizes it lacks: measure those (the architecture, not the
    trained weights, sets the time) on the device its others were measured on; elsewhere, say why not."""
    cost = record.get("cost") or {}
    have = cost.get("latency_ms") or {}
    missing = [b for b in cfg.latency_batch_sizes if str(b) not in have]
    if not missing:
        return
    if have and cost.get("latency_device") != str(device):
        log.warning("latency at batch size(s) %s not measured: this run's others were measured on %s, this process runs on %s",
                    ", ".join(map(str, missing)), cost.get("latency_device"), device)  # fmt: skip
        return
    model = model_from_config(cfg).to(
        device=device, memory_format=torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    )
    record_latency(cost, model, cfg, device, missing)
    record["cost"] = cost
    record["config"]["latency_batch_sizes"] = sorted({*map(int, cost["latency_ms"])})
    log.info("latency measured at batch size(s) %s for the reused run", ", ".join(map(str, missing)))
    save(record)


def _train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    config = OmegaConf.to_container(cfg, resolve=True)
    device = resolve_device(cfg.device)
    check_config(cfg, device)  # before anything in run_dir moves (resume=never sets the earlier run aside)
    dist_info = init_distributed(device)
    if dist_info.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", dist_info.local_rank)
            torch.cuda.set_device(device)
        run_dir = Path(broadcast_object(str(run_dir)))  # every rank uses rank 0's Hydra run dir
    table = cfg.get("table")
    record: dict[str, Any] = {
        "schema": 1, "status": "running", "reason": None, "name": cfg.name, "model": cfg.model.name, "data": cfg.data.name,
        "experiment": table.name if table else None, "row": cfg.get("row"), "seed": cfg.seed, "run_dir": str(run_dir.resolve()),
        "started_at": now(), "finished_at": None, "config": config, "cost": None, "history": [], "final": None,
        "env": env_info(device, dist_info.world_size), "wandb": None, "target": None,
    }  # fmt: skip
    target_acc = cfg.trainer.get("target_acc")
    results_path = run_dir / "results.json"
    main = dist_info.is_main

    def save(rec: dict[str, Any]) -> None:
        if main:
            write_json(results_path, rec)

    previous = read_json(results_path)
    if cfg.resume == "auto" and previous and previous.get("status") == "completed" and (problem := incomplete(previous)):
        log.warning("%s says completed but %s: it is not reused; the run goes on from its checkpoints", results_path, problem)
        previous = None
    if cfg.resume == "never" and main:
        _set_aside_previous_run(run_dir)
    if cfg.resume == "auto" and previous and previous.get("status") == "completed":
        difference = config_difference(previous.get("config", {}), config)
        if difference is None:
            log.info("run dir %s already holds a completed run with this config; not training again", run_dir)
            old_target = (previous.get("target") or {}).get("acc")
            if old_target != target_acc:  # a new target for the same run: time it on the recorded history
                previous["target"] = time_to_target(previous.get("history") or [], target_acc)
                previous["config"]["trainer"]["target_acc"] = target_acc
                save(previous)
            if main:
                _add_latencies(previous, cfg, device, save)
            return previous
        raise ValueError(
            f"run dir {run_dir} holds a completed run with another config ({difference}); use another hydra.run.dir or resume=never"
        )

    tracker: Tracker = Tracker()
    checkpoint_epoch = 0
    try:
        if cfg.trainer.num_threads:
            torch.set_num_threads(cfg.trainer.num_threads)
            record["env"] = env_info(device, dist_info.world_size)  # it records the threads the run uses
        seed_everything(cfg.seed)
        model = model_from_config(cfg)  # before the data: a model that cannot be built fails at once

        # data
        data = load_data(cfg.data, seed=cfg.seed)
        n_train = len(data.train)
        if cfg.trainer.batch_size > n_train:
            raise ValueError(
                f"trainer.batch_size={cfg.trainer.batch_size} is larger than the {n_train} training examples; use at most {n_train}"
            )
        if cfg.trainer.batch_size % dist_info.world_size:
            raise ValueError(f"trainer.batch_size={cfg.trainer.batch_size} must be divisible by the {dist_info.world_size} processes")
        loaders = make_loaders(data, cfg, device, dist_info.rank, dist_info.world_size)

        # model and cost
        log.info("model: %s %s", cfg.model.name, model_options(cfg.model))
        if main:
            record["cost"] = {"model": cfg.model.name, "data": cfg.data.name, "stem": getattr(model, "stem_kind", None),
                              **measure_cost(model, input_shape(cfg))}  # fmt: skip
            log.info("cost: %.2f M params, %.1f M MACs", record["cost"]["params"] / 1e6, record["cost"]["macs"] / 1e6)
        memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
        model = model.to(device=device, memory_format=memory_format)
        if dist_info.enabled and cfg.trainer.sync_bn:
            model = convert_sync_bn(model, device)
        raw_model = model

        # optimizer, schedule, precision
        optimizer = build_optimizer(raw_model, cfg.optim)
        steps_per_epoch = len(loaders["train"])
        total_steps = cfg.trainer.epochs * steps_per_epoch
        if cfg.trainer.max_steps:
            total_steps = min(total_steps, cfg.trainer.max_steps)
        warmup_steps = round(cfg.sched.warmup_epochs * steps_per_epoch)
        if warmup_steps >= total_steps > 0:
            log.warning("sched.warmup_epochs=%g is %d steps but the run has %d: the learning rate never reaches optim.lr=%g",
                        cfg.sched.warmup_epochs, warmup_steps, total_steps, cfg.optim.lr)  # fmt: skip
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.trainer.precision == "fp16")
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)

        # resume
        start_epoch, step, wandb_id = 0, 0, None
        loaded = resume_checkpoint(cfg, run_dir, config)
        if loaded is not None:
            state, path = loaded
            try:
                raw_model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scaler.load_state_dict(state["scaler"])
            except (RuntimeError, ValueError, KeyError) as ex:  # same config, other tensors: another code version, or a hand-made file
                message = " ".join(str(ex).split())[:200]
                raise ValueError(f"checkpoint {path} does not fit this model ({message}); use resume=never or another run dir") from None
            torch.set_rng_state(state["rng_cpu"])
            if device.type == "cuda" and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], device)
            start_epoch, step, wandb_id = state["epoch"], state["step"], state.get("wandb_id")
            record["history"] = state["history"]
            # One run in several parts: when it began (checkpoints before this key lack it), when each part
            # after the first began, and the checkpoint it came from when that is another run dir.
            record["resumed_at"] = [*state.get("resumed_at", []), record["started_at"]]
            record["started_at"] = state.get("started_at", record["started_at"])
            if path.resolve().parent != run_dir.resolve():
                record["resumed_from"] = str(path.resolve())
            checkpoint_epoch = start_epoch
            log.info("resume: %s (epoch %d, step %d)", path, start_epoch, step)

        if dist_info.enabled:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.trainer.compile:
            model = torch.compile(model)

        if main:
            tracker = make_tracker(cfg, run_dir, config, run_id=wandb_id)
            record["wandb"] = {**tracker.info(), "project": tracker.project, "group": tracker.group}
            cost = record["cost"]
            tracker.summary({"cost/macs": cost["macs"], "cost/params": cost["params"], "cost/fvcore_flops": cost["fvcore_flops"]})
            tracker.table("cost/by_layer_type", ["layer_type", "layers", "macs", "params", "macs_share"],
                          [[k, v["layers"], v["macs"], v["params"], v["macs"] / max(cost["macs"], 1)] for k, v in cost["by_layer_type"].items()])  # fmt: skip
        save(record)

        # loop
        log.info("train: %d epochs x %d steps, batch %d, %s, %s", cfg.trainer.epochs, steps_per_epoch, cfg.trainer.batch_size,
                 cfg.trainer.precision, device)  # fmt: skip
        wall_start = time.perf_counter()
        model.train()
        for epoch in range(start_epoch, cfg.trainer.epochs):
            if step >= total_steps:
                break
            loader = loaders["train"]
            loader.set_epoch(epoch)
            progress = Progress(cfg.trainer.progress if main else False, steps_per_epoch, f"epoch {epoch + 1}/{cfg.trainer.epochs}")
            sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count (local)
            epoch_start, epoch_first_step = time.perf_counter(), step
            for i, (x, y) in enumerate(loader):
                factor = lr_factor(step, total_steps, warmup_steps, cfg.sched.name, cfg.sched.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.optim.lr * factor
                loss, logits = train_step(model, x, y, optimizer, scaler, criterion, device, cfg.trainer.precision, cfg.trainer.grad_clip)
                step += 1
                # torch.full, not torch.tensor(count, device=...): a copy from the host waits for the GPU to finish the step.
                sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                     torch.full((), len(y), device=device, dtype=torch.float64)])  # fmt: skip
                if step % 50 == 0 or i + 1 == steps_per_epoch or step >= total_steps:
                    if not math.isfinite(float(all_reduce_sum(sums[:1].clone()).item())):
                        raise Divergence(
                            f"the training loss became non-finite at epoch {epoch + 1}, step {step} (optim.lr={cfg.optim.lr:g})"
                        )
                    tracker.log({"train/loss_step": loss.item(), "train/lr_step": cfg.optim.lr * factor}, step)
                progress.update(i + 1, sums, dist_info.world_size)
                if step >= total_steps:
                    break
            progress.close()
            seconds = time.perf_counter() - epoch_start
            all_reduce_sum(sums)
            entry = {"epoch": epoch + 1, "train_loss": (sums[0] / sums[2]).item(), "train_acc": (sums[1] / sums[2]).item(),
                     "val_acc": None, "test_acc": None, "eval_seconds": None, "lr": cfg.optim.lr * factor, "seconds": seconds,
                     "img_per_s": sums[2].item() / seconds, "steps": step - epoch_first_step, "images": int(sums[2].item())}  # fmt: skip
            last = epoch + 1 == cfg.trainer.epochs or step >= total_steps
            if last or (epoch + 1) % cfg.trainer.eval_every == 0:
                eval_start = time.perf_counter()
                # Each rank scores its share of the test set with the model rank 0 saves: DDP syncs BatchNorm's
                # running statistics at the start of a forward, so after the last step each rank holds its own.
                broadcast_buffers(raw_model)
                if "val" in loaders:
                    entry["val_acc"] = evaluate(raw_model, loaders["val"], device, cfg.trainer.precision)["acc"]
                entry["test_acc"] = evaluate(raw_model, loaders["test"], device, cfg.trainer.precision)["acc"]
                entry["eval_seconds"] = time.perf_counter() - eval_start
            record["history"].append(entry)
            record["target"] = time_to_target(record["history"], target_acc)
            log.info("epoch %d/%d: train loss %.4f acc %.2f%% | val %s | test %s | %.0f img/s | %.1f s | lr %.4g", epoch + 1,
                     cfg.trainer.epochs, entry["train_loss"], 100 * entry["train_acc"], _pct(entry["val_acc"]), _pct(entry["test_acc"]),
                     entry["img_per_s"], seconds, entry["lr"])  # fmt: skip
            tracker.log({"epoch": epoch + 1, "train/loss": entry["train_loss"], "train/acc": entry["train_acc"], "lr": entry["lr"],
                         "perf/img_per_s": entry["img_per_s"], "perf/epoch_seconds": seconds,
                         **({"val/acc": entry["val_acc"]} if entry["val_acc"] is not None else {}),
                         **({"test/acc": entry["test_acc"]} if entry["test_acc"] is not None else {})}, step)  # fmt: skip
            if main:
                state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "epoch": epoch + 1, "step": step, "history": record["history"], "config": config, "wandb_id": tracker.run_id,
                         "started_at": record["started_at"], "resumed_at": record.get("resumed_at", []),
                         "rng_cpu": torch.get_rng_state(), "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}  # fmt: skip
                save_checkpoint(run_dir, state, epoch + 1, cfg.trainer.keep_checkpoints)
                checkpoint_epoch = epoch + 1
                save(record)
            if step >= total_steps:
                break
            if record["target"] and record["target"]["reached"] and cfg.trainer.stop_at_target:
                log.info("target: test accuracy %s >= %s at epoch %d; stopping (trainer.stop_at_target=true)",
                         _pct(record["target"]["test_acc"]), _pct(target_acc), epoch + 1)  # fmt: skip
                break

        # final record
        history = record["history"]
        best_by = "val" if history and history[-1]["val_acc"] is not None else "test"
        scored = [h for h in history if h[f"{best_by}_acc"] is not None]
        best = max(scored, key=lambda h: h[f"{best_by}_acc"]) if scored else None
        # Epochs before a resume add their training and evaluation time; what the run did is counted in steps and
        # images too (trainer.max_steps can end an epoch early; entries from before these keys have neither).
        final = {"test_acc": history[-1]["test_acc"], "train_loss": history[-1]["train_loss"],
                 "wall_seconds": time.perf_counter() - wall_start + sum(h["seconds"] + (h.get("eval_seconds") or 0.0) for h in history[:start_epoch]),
                 "best_epoch": best["epoch"] if best else None, "best_by": best_by, "epochs": len(history), "steps": step,
                 "steps_per_epoch": steps_per_epoch, "images_seen": sum(h.get("images", 0) for h in history)}  # fmt: skip
        if main:
            record_latency(record["cost"], raw_model, cfg, device, cfg.latency_batch_sizes)
        record.update(status="completed", final=final, finished_at=now(), target=time_to_target(history, target_acc))
        target = record["target"] or {}
        tracker.summary({"test/acc": final["test_acc"], "final/test_acc": final["test_acc"], "final/train_loss": final["train_loss"],
                         "final/wall_seconds": final["wall_seconds"], "final/best_epoch": final["best_epoch"],
                         **{f"cost/latency_ms_b{b}": v for b, v in (record["cost"] or {}).get("latency_ms", {}).items()},
                         **({"target/acc": target["acc"], "target/reached": target["reached"], "target/epoch": target["epoch"],
                             "target/train_seconds": target["train_seconds"]} if target else {})})  # fmt: skip
        save(record)
        tracker.finish(failed=False)
        if target:
            log.info("target %s: %s", _pct(target["acc"]), f"reached at epoch {target['epoch']} after {target['train_seconds']:.1f} s of training"
                     if target["reached"] else f"not reached in {len(history)} epochs")  # fmt: skip
        log.info(
            "done: test acc %s after %d epochs, %.0f s; results: %s",
            _pct(final["test_acc"]),
            len(history),
            final["wall_seconds"],
            results_path,
        )
        return record
    except BaseException as ex:
        reason = " ".join(str(ex).split()) or type(ex).__name__
        if isinstance(ex, KeyboardInterrupt):
            reason = str(ex) if isinstance(ex, Interrupted) else "interrupted (Ctrl-C)"
        elif not isinstance(ex, (ValueError, Divergence)):
            reason = f"{type(ex).__name__}: {reason}"
        if isinstance(ex, Divergence) and checkpoint_epoch:
            reason += f"; the last good checkpoint (epoch {checkpoint_epoch}) is kept"
        record.update(status="failed", reason=reason, finished_at=now())
        try:
            save(record)
        finally:
            tracker.finish(failed=True)
        raise


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"

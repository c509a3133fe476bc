"""Hydra callbacks: what happens around a sweep."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("convlab")


class SweepSummary(Callback):
    """After a ``-m`` sweep: one line per failed job, and a non-zero exit when any failed.

    Hydra runs every job of a sweep even when one fails (convlab's jobs record failures in their
    results.json instead of raising); this reads those records back, so it works the same for
    in-process, joblib and SLURM launchers.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .records import read_json  # here: records imports torch, which report.py's start-up need not pay for

        records = sorted(Path(config.hydra.sweep.dir).glob("**/results.json"))
        failed = []
        for path in records:
            record = read_json(path)
            if not isinstance(record, dict):
                failed.append((path, "results.json unreadable"))
            elif record.get("status") != "completed":
                failed.append((path, record.get("reason") or record.get("status")))
        if not records:
            return
        log.info("sweep finished: %d of %d jobs completed", len(records) - len(failed), len(records))
        for path, reason in failed:
            print(f"error: job failed: {path.parent}: {reason}", file=sys.stderr)
        if failed:
            sys.exit(1)


class DropEmptySweepDir(Callback):
    """After a ``-m`` sweep of a script that writes nothing (profile.py, report.py): remove what it made.

    Hydra makes ``multirun/<date>/`` with one empty dir per job and a ``multirun.yaml`` even when
    ``output_subdir`` is null; left behind, they are clutter that looks like a sweep's results.
    Only what this sweep created goes: a sweep dir that existed before it is left alone, and so
    is one holding anything but ``multirun.yaml`` and empty dirs (and the parents only when this
    sweep made them too, and they are empty).
    """

    def __init__(self) -> None:
        self._new: list[Path] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        self._new = [p for p in (sweep_dir, *sweep_dir.parents) if not p.exists()]  # e.g. multirun/<date>/<time>: all three

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir not in self._new or not sweep_dir.is_dir():
            return
        entries = sorted(sweep_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True)  # deepest first
        if any(p.is_symlink() or not p.is_dir() for p in entries if p != sweep_dir / "multirun.yaml"):
            return
        (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
        for path in [*entries, sweep_dir]:
            if path.is_dir():
                path.rmdir()
        for parent in sweep_dir.parents:  # ``multirun/<date>`` and ``multirun/`` when this sweep made them, nearest first
            if parent not in self._new:
                break
            with contextlib.suppress(OSError):  # not empty: another sweep's too
                parent.rmdir()

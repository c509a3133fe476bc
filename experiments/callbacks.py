"""Hydra callbacks: what happens around a sweep."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
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
        records = sorted(Path(config.hydra.sweep.dir).glob("**/results.json"))
        failed = []
        for path in records:
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                failed.append((path, "results.json unreadable"))
                continue
            if record.get("status") != "completed":
                failed.append((path, record.get("reason") or record.get("status")))
        if not records:
            return
        log.info("sweep finished: %d of %d jobs completed", len(records) - len(failed), len(records))
        for path, reason in failed:
            print(f"error: job failed: {path.parent}: {reason}", file=sys.stderr)
        if failed:
            sys.exit(1)


class DropEmptySweepDir(Callback):
    """After a ``-m`` sweep of a script that writes nothing (profile.py, report.py): remove the dir.

    Hydra makes ``multirun/<date>/`` with one empty dir per job and a ``multirun.yaml`` even when
    ``output_subdir`` is null; left behind, they are clutter that looks like a sweep's results.
    A sweep dir holding any other file is kept as it is.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        if any(p.is_file() and p != sweep_dir / "multirun.yaml" for p in sweep_dir.rglob("*")):
            return
        shutil.rmtree(sweep_dir)
        with contextlib.suppress(OSError):  # ``multirun/`` itself, when this sweep was all it held
            sweep_dir.parent.rmdir()

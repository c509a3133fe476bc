"""Experiment tracking: Weights & Biases behind a small interface; ``logger=none`` never imports wandb.

wandb trouble never stops training: the first failure of any call logs one warning and turns
the tracker off; the local records (results.json, checkpoints) are complete either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("convlab")

__all__ = ["NullTracker", "Tracker", "WandbTracker", "has_api_key", "make_tracker"]

MODES = ("auto", "online", "offline", "disabled")


class Tracker:
    """The interface the training loop uses; this base class records nothing."""

    run_id: str | None = None
    mode: str = "none"
    project: str | None = None
    group: str | None = None
    url: str | None = None
    error: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log metrics at a global optimizer step."""

    def summary(self, values: dict[str, Any]) -> None:
        """Set run-level summary values (final accuracy, cost)."""

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Log a table (the per-layer-type cost)."""

    def finish(self, failed: bool = False) -> None:
        """Close the run; ``failed`` marks it failed on the server."""

    def info(self) -> dict[str, Any]:
        return {"mode": self.mode, "id": self.run_id, "url": self.url, "error": self.error}


class NullTracker(Tracker):
    """``logger=none``."""


def has_api_key() -> bool:
    """Whether a W&B API key is configured (WANDB_API_KEY, or the netrc entry `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text() or bool(os.environ.get("WANDB_BASE_URL") and netrc.exists())
    except OSError:
        return False


class WandbTracker(Tracker):
    """A wandb run per Hydra job: resolved config, per-step and per-epoch metrics, summary, cost table.

    ``mode="auto"``: online when an API key is configured (``WANDB_API_KEY`` or ``wandb login``),
    else offline, with one line saying how to upload the run later.
    """

    def __init__(self, *, project: str, run_dir: Path, config: dict[str, Any], name: str, group: str | None, tags: list[str],
                 job_type: str, mode: str = "auto", entity: str | None = None, run_id: str | None = None) -> None:  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"logger.mode={mode!r} is not valid; choose from: {', '.join(MODES)}")
        self.mode = ("online" if has_api_key() else "offline") if mode == "auto" else mode
        self.project, self.group = project, group  # as the run is filed: results.json says the same
        self._run = None
        init = {"project": project, "entity": entity, "name": name, "group": group, "tags": tags, "job_type": job_type, "config": config,
                "dir": str(run_dir), "id": run_id, "resume": "allow" if run_id else None}  # fmt: skip
        try:
            self._start(init)
        except Exception as ex:  # wandb must never stop training
            if self.mode != "online":
                self._fail("start", ex)
                return
            # A key but no server (no network, an outage): keep the run offline, to upload later.
            log.warning(
                "wandb: could not start online (%s: %s); logging offline instead", type(ex).__name__, " ".join(str(ex).split())[:120]
            )
            self.mode = "offline"
            try:
                self._start(init)
            except Exception as again:
                self._fail("start", again)

    def _start(self, init: dict[str, Any]) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        # finish_previous: a run left active in this process (one whose logging failed, in an in-process
        # sweep) must never be handed back as this job's run.
        settings = wandb.Settings(init_timeout=60, console="off", silent=True, x_disable_stats=True, reinit="finish_previous")
        self._run = wandb.init(**init, mode=self.mode, settings=settings)
        self.run_id, self.url = self._run.id, (self._run.url if self.mode == "online" else None)
        for key in ("val/acc", "test/acc", "train/acc", "train/loss", "lr", "perf/img_per_s"):
            self._run.define_metric(key, step_metric="epoch")
        self._run.define_metric("train/loss_step", step_metric="step")
        if self.mode == "offline":
            log.info("wandb: offline run in %s; upload it with: wandb sync %s", self._run.dir, Path(self._run.dir).parent)

    def _fail(self, what: str, ex: Exception) -> None:
        self.error = f"could not {what}: {type(ex).__name__}: {' '.join(str(ex).split())[:200]}"
        log.warning("wandb: %s; training continues, local records are complete", self.error)
        run, self._run = self._run, None
        if run is not None and what != "finish":
            with contextlib.suppress(Exception):  # close it as failed, so it is not left active in this process
                run.finish(exit_code=1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._run is not None:
            try:
                self._run.log({**metrics, "step": step})
            except Exception as ex:
                self._fail("log", ex)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            try:
                self._run.summary.update(values)
            except Exception as ex:
                self._fail("write the summary", ex)

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self._run is not None:
            try:
                import wandb

                self._run.log({key: wandb.Table(columns=columns, data=rows)})
            except Exception as ex:
                self._fail("log a table", ex)

    def finish(self, failed: bool = False) -> None:
        if self._run is not None:
            try:
                self._run.finish(exit_code=1 if failed else 0)
            except Exception as ex:
                self._fail("finish", ex)
            self._run = None


def make_tracker(cfg: Any, run_dir: Path, config: dict[str, Any], run_id: str | None = None) -> Tracker:
    """The tracker ``cfg.logger`` asks for (``wandb`` or ``none``)."""
    logger = cfg.logger
    if logger.name == "none" or logger.get("mode") == "disabled":
        return NullTracker()
    if logger.name != "wandb":
        raise ValueError(f"unknown logger {logger.name!r}; choose from: wandb, none")
    table = cfg.get("table")
    experiment = table.name if table else None
    tags = [cfg.model.name, cfg.data.name, *([experiment] if experiment else []), *cfg.get("tags", [])]
    return WandbTracker(
        project=logger.project, entity=logger.entity, run_dir=run_dir, config=config, name=f"{cfg.name}-s{cfg.seed}",
        group=logger.group or experiment or cfg.model.name, tags=list(dict.fromkeys(map(str, tags))), job_type=logger.job_type,
        mode=logger.mode, run_id=run_id,
    )  # fmt: skip

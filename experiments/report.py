"""The local dashboard: results.json files (or a W&B project) -> one shareable page, figures and tables.

``build_report(dirs, out)`` reads every ``results.json`` under ``dirs`` (docs/results_schema.md)
and writes into ``out``:

- ``index.html``: one self-contained page (inline SVG, CSS and JS; nothing fetched from the
  network) with accuracy vs MACs, params and latency (Pareto front marked), training curves, a
  sortable table of completed runs and, apart, the failed and unfinished runs with their reasons;
- ``acc_vs_macs.png``, ``acc_vs_params.png``, ``acc_vs_latency.png`` (matplotlib, Agg);
- ``runs.csv`` and ``runs.md``: the completed runs, for papers;
- ``groups.csv`` and ``groups.md``: one row per setting (the runs' resolved config but for the seed),
  test accuracy as mean ± sample standard deviation over its runs; the page shows them "By setting".

Only completed runs enter results, plots and tables. Failed runs (``status: failed``) and
unfinished ones (``status: running``, unreadable JSON, a completed record without a test
accuracy, or one with an impossible value: an accuracy outside [0, 1], a cost that is negative,
not finite or absurdly large) are listed apart, with the bad field named. Every string read from a run is HTML-escaped on the page.

Units, stated once: accuracy in % of the test set, MACs (one multiply-add counts once) and
params in millions, latency in ms for batch size 1, wall time in seconds.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import logging
import math
import re
import statistics
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from itertools import pairwise, product
from pathlib import Path
from typing import Any

from .tracking import has_api_key

__all__ = [
    "GroupRow",
    "RunRow",
    "build_report",
    "count_runs",
    "find_results",
    "format_summary",
    "group_runs",
    "impossible_value",
    "load_local_runs",
    "load_wandb_runs",
    "pareto_front",
    "render_html",
    "run_identity",
    "split_runs",
    "to_row",
    "write_figures",
    "write_groups",
    "write_tables",
]

SOURCES = ("local", "wandb")
# Okabe-Ito, then Tableau: distinguishable for colour-blind readers; cycled beyond ten models.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#8C564B", "#F0C400", "#7F7F7F", "#17BECF")
# (RunRow field, what, unit, file stem, log x): the three accuracy-vs-cost plots; log None: log when the values span > 20x.
SCATTERS = (
    ("macs", "MACs", "M", "acc_vs_macs", True),
    ("params", "Params", "M", "acc_vs_params", True),
    ("latency_ms", "Latency at batch 1", "ms", "acc_vs_latency", None),
)
# W&B run.state -> results.json status.
_WANDB_STATES = {"finished": "completed", "failed": "failed", "crashed": "failed", "killed": "failed", "running": "running"}


@dataclass
class RunRow:
    """One run, flattened from a results.json record: what the tables and plots show.

    ``test_acc`` is a fraction in [0, 1]; ``macs`` and ``params`` are counts; ``latency_ms`` is
    for batch size 1; ``status`` is ``completed``, ``failed``, ``running``, ``unreadable``,
    ``incomplete`` (completed without a test accuracy) or ``invalid`` (completed with a value no run
    can have, see :func:`_impossible_value`).
    """

    name: str
    model: str
    data: str
    status: str
    path: str
    experiment: str | None = None
    row: str | None = None
    seed: int | None = None
    reason: str | None = None
    test_acc: float | None = None
    macs: float | None = None
    params: float | None = None
    latency_ms: float | None = None
    latency_device: str | None = None
    epochs: int | None = None
    wall_seconds: float | None = None
    target_acc: float | None = None  # trainer.target_acc: a test accuracy that was timed (results.json "target")
    target_epoch: int | None = None  # the first epoch that reached it; None when it was not reached
    target_seconds: float | None = None  # training seconds up to that epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict, repr=False)  # the results.json record: its config says what produced it


@dataclass
class GroupRow:
    """Completed runs of one setting: the same resolved config but for the seed (see :func:`group_runs`).

    ``test_acc`` is their mean, a fraction; ``test_acc_sd`` their sample standard deviation (n - 1),
    None for a single run; ``settings`` names what produced them (data, training length, batch,
    optimizer, schedule, precision, seeds, commit, and any other key that tells it from another group).
    """

    model: str
    data: str
    n: int
    test_acc: float | None
    test_acc_sd: float | None
    macs: float | None
    params: float | None
    seeds: list[int]
    settings: str
    runs: list[str]  # their results.json paths


# ---------------------------------------------------------------- reading


def find_results(dirs: Sequence[str | Path]) -> list[Path]:
    """Every ``results.json`` under ``dirs`` (recursively), sorted and without duplicates.

    Args:
        dirs: run dirs, sweep dirs or any folder above them.

    Returns:
        The paths found; empty when there are none.

    Raises:
        ValueError: no dirs given, or one of them does not exist.
    """
    if not dirs:
        raise ValueError("no runs dirs given; pass runs=DIR or runs=[DIR1,DIR2]")
    found: dict[Path, None] = {}
    for directory in map(Path, dirs):
        if not directory.is_dir():
            raise ValueError(
                f"runs dir '{directory}' does not exist" if not directory.exists() else f"runs dir '{directory}' is not a directory"
            )
        for path in sorted(directory.rglob("results.json")):
            if path.is_file():
                found.setdefault(path.resolve(), None)
    return sorted(found)


def load_local_runs(dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read the results.json records under ``dirs``, each with its ``path`` added.

    A file that cannot be read or parsed becomes ``{"status": "unreadable", "reason": ...}``
    so it is listed with the unfinished runs instead of stopping the report.

    Args:
        dirs: folders searched recursively.

    Returns:
        One record per results.json, in path order.

    Raises:
        ValueError: a dir does not exist, or no results.json was found under any of them.
    """
    paths = find_results(dirs)
    if not paths:
        raise ValueError(f"no results.json found under: {', '.join(str(d) for d in dirs)}")
    records = []
    for path in paths:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except (OSError, UnicodeDecodeError, ValueError) as ex:  # json.JSONDecodeError is a ValueError
            reason = " ".join(str(ex).split())
            record = {"status": "unreadable", "reason": f"unreadable results.json: {reason}", "name": path.parent.name}
        records.append({**record, "path": str(path)})
    return records


def _get(mapping: Any, dotted: str) -> Any:
    """``mapping["a"]["b"]`` for ``"a.b"``, or the flat key ``"a.b"`` (W&B flattens some configs); None when absent."""
    if not isinstance(mapping, dict):
        return None
    if dotted in mapping:
        return mapping[dotted]
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _wandb_value(summary: Any, key: str) -> Any:
    """A summary metric: ``summary["cost/macs"]`` or its nested form ``summary["cost"]["macs"]``."""
    try:
        value = summary[key]  # a dict, or wandb's summary object (mapping-like, KeyError when missing)
    except (KeyError, TypeError, IndexError):
        value = None
    return value if value is not None else _get(summary if isinstance(summary, dict) else {}, key.replace("/", "."))


def _first(values: Iterable[Any]) -> Any:
    """The first value that is not None (None when there is none)."""
    return next((v for v in values if v is not None), None)


def _config_name(config: dict[str, Any], group: str) -> Any:
    """``config["model"]["name"]``, a flat ``config["model.name"]``, or ``config["model"]`` when it is a plain value."""
    node = _get(config, group)
    return _get(config, f"{group}.name") if isinstance(node, dict) or node is None else node


def _wandb_history(run: Any) -> list[dict[str, Any]]:
    """Per-epoch ``{"epoch", "test_acc", "train_loss"}`` from ``run.history()`` (a list of dicts or a DataFrame)."""
    try:
        rows = run.history(pandas=False)
    except TypeError:  # an API object whose history() takes no pandas flag
        rows = run.history()
    if hasattr(rows, "to_dict"):
        rows = rows.to_dict("records")
    history = []
    for step in rows or []:
        epoch = _number(step.get("epoch"))
        if epoch is None:
            continue
        history.append({"epoch": int(epoch), "test_acc": _number(step.get("test/acc")), "train_loss": _number(step.get("train/loss"))})
    return history


def wandb_record(run: Any, path: str) -> dict[str, Any]:
    """Map one W&B run (``wandb.Api().runs()`` item) to a results.json-shaped record.

    Args:
        run: has ``name``, ``state``, ``config``, ``summary``, ``url`` and ``history()``.
        path: ``entity/project`` or ``project``, recorded as the source.

    Returns:
        A record with name, model, data, experiment, row, seed, status, reason, final, cost and history.
    """
    config = dict(getattr(run, "config", None) or {})
    summary = getattr(run, "summary", None) or {}
    state = str(getattr(run, "state", "unknown"))
    status = _WANDB_STATES.get(state, "running")
    history = _wandb_history(run)
    experiment = _get(config, "table.name") or _get(config, "experiment")  # scripts/run.py records the experiment's table
    test_acc = _wandb_value(summary, "test/acc")
    latency = _first(_wandb_value(summary, k) for k in ("cost/latency_ms_b1", "cost/latency_ms/1"))
    return {
        "schema": 1,
        "status": status,
        "reason": None if status in ("completed", "running") else f"W&B run state: {state}",
        "name": _get(config, "name") or getattr(run, "name", None) or getattr(run, "id", "?"),
        "model": _config_name(config, "model"),
        "data": _config_name(config, "data"),
        "experiment": experiment if isinstance(experiment, str) else None,
        "row": _get(config, "row"),
        "seed": _get(config, "seed"),
        "run_dir": getattr(run, "url", None),
        "config": config,
        "cost": {
            "macs": _wandb_value(summary, "cost/macs"),
            "params": _wandb_value(summary, "cost/params"),
            "latency_ms": {"1": latency} if latency is not None else {},
        },
        "history": history,
        "final": None
        if status != "completed"
        else {
            "test_acc": test_acc,
            "train_loss": _first(_wandb_value(summary, k) for k in ("final/train_loss", "train/loss")),
            "wall_seconds": _first(_wandb_value(summary, k) for k in ("final/wall_seconds", "_runtime")),
            "epochs": len(history) or _wandb_value(summary, "epoch"),
        },
        "target": None
        if _wandb_value(summary, "target/acc") is None
        else {
            "acc": _wandb_value(summary, "target/acc"),
            "reached": _wandb_value(summary, "target/reached"),
            "epoch": _wandb_value(summary, "target/epoch"),
            "train_seconds": _wandb_value(summary, "target/train_seconds"),
        },
        "path": getattr(run, "url", None) or f"wandb:{path}/{getattr(run, 'id', '?')}",
    }


def load_wandb_runs(project: str | None, entity: str | None = None, api: Any = None) -> list[dict[str, Any]]:
    """Read the runs of a W&B project as results.json-shaped records (see :func:`wandb_record`).

    Summary keys read (as scripts/run.py logs them): ``test/acc``, ``cost/macs``, ``cost/params``,
    ``cost/latency_ms_b1``, ``final/train_loss`` and ``final/wall_seconds`` (else ``train/loss``
    and ``_runtime``), and ``target/{acc,reached,epoch,train_seconds}`` when the run timed a
    target; history keys: ``epoch``, ``test/acc``, ``train/loss``. The run's name, model, data,
    seed, table and row come from its config (the resolved Hydra config).

    Args:
        project: the W&B project.
        entity: team or user; None for the default entity of the API key.
        api: an object with ``runs(path)`` (for tests); None builds ``wandb.Api()``.

    Returns:
        One record per run.

    Raises:
        ValueError: no project, W&B unreachable or not logged in, or the project has no runs.
    """
    if not project:
        raise ValueError("source=wandb needs project=NAME (and entity=TEAM for a team project)")
    path = f"{entity}/{project}" if entity else str(project)
    if api is None and not has_api_key():  # wandb.Api() would ask for a key on a terminal; nothing may prompt
        raise ValueError(f"source=wandb needs a W&B API key to read '{path}': run `wandb login` or set WANDB_API_KEY")
    try:
        if api is None:
            import wandb  # lazy: the local report needs no wandb

            api = wandb.Api(timeout=15)
        runs = list(api.runs(path))
        records = [wandb_record(run, path) for run in runs]
    except ValueError:
        raise
    except Exception as ex:  # wandb raises its own types (UsageError, CommError, ...) and requests' ones
        message = " ".join(str(ex).split()) or type(ex).__name__
        raise ValueError(f"cannot read W&B project '{path}': {message}") from None
    if not records:
        raise ValueError(f"W&B project '{path}' has no runs")
    return records


# ---------------------------------------------------------------- rows and groups


def _number(value: Any) -> float | None:
    """A finite float, or None for missing, non-numeric or NaN values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


# Upper bounds past which a cost is a corrupt record, not a model: 10^15 MACs or params (a
# thousand times the largest models), 10^7 ms (almost three hours) for one image.
MAX_COUNT = 1e15
MAX_LATENCY_MS = 1e7
_ACC_KEYS = ("test_acc", "val_acc", "train_acc")


def _bad_value(key: str, value: Any, low: float, high: float, what: str, whole: bool = False) -> str | None:
    """Why ``value`` cannot be ``key`` (``low <= value <= high``, a finite number, ``whole`` for a
    count); None when it can, or is absent."""
    if value is None:
        return None
    number = None if isinstance(value, bool) else _number(value)
    shown = repr(value) if isinstance(value, (int, float, str)) else f"<a {type(value).__name__}>"
    if number is None or not low <= number <= high:
        return f"{key}={shown} is impossible; valid: {low:g} <= {key.rsplit('.', 1)[-1]} <= {high:g} ({what})"
    if whole and number != int(number):
        return f"{key}={shown} is impossible; valid: a whole number ({what})"
    return None


def impossible_value(record: dict[str, Any]) -> str | None:
    """The first field of a completed record that no run can have (accuracy outside [0, 1]; a cost
    that is not a number, negative, not finite or absurdly large), as a reason; None when all are possible.

    Such a record would put nonsense on the plots (or make matplotlib refuse them), so it goes to
    the problems list instead of the results.
    """
    final = record.get("final") if isinstance(record.get("final"), dict) else {}
    cost = record.get("cost") if isinstance(record.get("cost"), dict) else {}
    latency = cost.get("latency_ms") if isinstance(cost.get("latency_ms"), dict) else {}
    checks = [
        ("final.test_acc", final.get("test_acc"), 0.0, 1.0, "a fraction of the test set"),
        ("cost.macs", cost.get("macs"), 0.0, MAX_COUNT, "multiply-adds per image", True),
        ("cost.params", cost.get("params"), 0.0, MAX_COUNT, "parameters", True),
        ('cost.latency_ms["1"]', latency.get("1", latency.get(1)), 0.0, MAX_LATENCY_MS, "milliseconds at batch size 1"),
    ]
    if record.get("history") is not None and not isinstance(record.get("history"), list):
        return f"history={_text(record.get('history'))} is not a list of epochs"
    for i, h in enumerate(h for h in _history(record)):
        checks += [(f"history[{i}].{key}", h.get(key), 0.0, 1.0, "a fraction") for key in _ACC_KEYS]
    for key, value, low, high, what, *whole in checks:
        reason = _bad_value(key, value, low, high, what, *whole)
        if reason:
            return reason
    return None


def _history(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's epochs; nothing when ``history`` is not a list (a hand-edited or foreign file)."""
    history = record.get("history")
    return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []


def to_row(record: dict[str, Any]) -> RunRow:
    """Flatten one results.json-shaped record into a :class:`RunRow`; the status says where it belongs."""
    final = record.get("final") if isinstance(record.get("final"), dict) else {}
    cost = record.get("cost") if isinstance(record.get("cost"), dict) else {}
    latency = cost.get("latency_ms") if isinstance(cost.get("latency_ms"), dict) else {}
    history = _history(record)
    path = str(record.get("path") or record.get("run_dir") or "?")
    status = str(record.get("status") or "unknown")
    reason = _text(record.get("reason"))
    test_acc = _number(final.get("test_acc"))
    impossible = impossible_value(record) if status == "completed" else None
    if impossible:
        status, reason = "invalid", impossible
    elif status == "completed" and test_acc is None:
        status, reason = "incomplete", "status is completed but final.test_acc is missing"
    elif status == "running":
        started = record.get("started_at")
        reason = (
            f"still running, or stopped without a result (started {started})" if started else "still running, or stopped without a result"
        )
    elif status not in ("completed", "failed", "unreadable", "invalid"):
        reason = reason or f"unknown status '{status}'"
    elif status == "failed" and not reason:
        reason = "failed (no reason recorded)"
    epochs = _number(final.get("epochs"))
    seed = record.get("seed")
    target = record.get("target") if isinstance(record.get("target"), dict) else {}
    target_epoch = _number(target.get("epoch")) if target.get("reached") is True else None
    return RunRow(
        name=str(record.get("name") or Path(path).parent.name),
        model=str(record.get("model") or "?"),
        data=str(record.get("data") or "?"),
        status=status,
        path=path,
        experiment=_text(record.get("experiment")),
        row=_text(record.get("row")),
        seed=int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else None,
        reason=" ".join(reason.split()) if reason else None,
        test_acc=test_acc,
        macs=_number(cost.get("macs")),
        params=_number(cost.get("params")),
        latency_ms=_number(latency.get("1", latency.get(1))),
        latency_device=_text(cost.get("latency_device")),
        epochs=int(epochs) if epochs is not None else (len(history) or None),
        wall_seconds=_number(final.get("wall_seconds")),
        target_acc=_number(target.get("acc")),
        target_epoch=int(target_epoch) if target_epoch is not None else None,
        target_seconds=_number(target.get("train_seconds")) if target_epoch is not None else None,
        history=history,
        record=record,
    )


def run_identity(record: dict[str, Any], path: str | Path | None = None) -> tuple[tuple[Any, ...] | None, bool]:
    """``(identity, original)`` of a results record read from ``path``.

    A copied run dir (a backup, a second sweep folder) holds the same run, not another one: the
    identity is its run dir, start time and seed, None when the record lacks them. ``original``:
    the file lies in the run dir it names; of several copies that one is kept, else the first path.
    """
    run_dir, started = record.get("run_dir"), record.get("started_at")
    identity = (str(run_dir), str(started), record.get("seed")) if run_dir and started else None
    original = bool(path and run_dir) and Path(str(path)).parent.resolve() == Path(str(run_dir)).resolve()
    return identity, original


def split_runs(records: Iterable[dict[str, Any]]) -> tuple[list[RunRow], list[RunRow], list[RunRow]]:
    """(completed, failed, unfinished) rows; unfinished holds running, unreadable, incomplete, invalid, duplicate, continued and unknown records.

    Completed rows come sorted by test accuracy, best first; the others by path.
    """

    def copy_first(record: dict[str, Any]) -> tuple[bool, str]:  # the file in its own run_dir is the original
        return (not run_identity(record, record.get("path"))[1], str(record.get("path") or ""))

    records = sorted(records, key=copy_first)
    # A run stopped in one dir and finished from its checkpoint in another (resume=PATH) is one run:
    # the stopped part is listed apart, not counted as a failure.
    continued = {
        str(Path(str(r["resumed_from"])).parent): str(r.get("run_dir") or r.get("path"))
        for r in records
        if r.get("status") == "completed" and r.get("resumed_from")
    }
    rows, seen = [], {}
    for record in records:
        row = to_row(record)
        later = continued.get(str(Path(str(record.get("run_dir")))) if record.get("run_dir") else "")
        if row.status in ("failed", "running") and later:
            row = replace(row, status="continued", reason=f"{row.reason}; continued and finished in {later}")
        # A copied run dir is one run, not two (see run_identity): a copy is listed apart, not counted twice.
        identity = run_identity(record)[0]
        if row.status == "completed" and identity:
            if identity in seen:
                row = replace(row, status="duplicate", reason=f"a copy of the run at {seen[identity]}")
            else:
                seen[identity] = row.path
        rows.append(row)
    completed = sorted((r for r in rows if r.status == "completed"), key=lambda r: (-(r.test_acc or 0.0), r.name, r.path))
    failed = sorted((r for r in rows if r.status == "failed"), key=lambda r: r.path)
    unfinished = sorted((r for r in rows if r.status not in ("completed", "failed")), key=lambda r: r.path)
    return completed, failed, unfinished


def count_runs(completed: Sequence[RunRow], failed: Sequence[RunRow], unfinished: Sequence[RunRow]) -> dict[str, int]:
    """The counts the page and the summary show. ``unfinished``: running, or stopped without a result;
    ``invalid``: records that cannot be used (unreadable, an impossible value, completed without a
    test accuracy, an unknown status); ``duplicates``: copies of a run already counted; ``continued``:
    stopped parts of runs that ``resume=PATH`` finished in another dir."""
    copies = sum(r.status == "duplicate" for r in unfinished)
    running = sum(r.status == "running" for r in unfinished)
    parts = sum(r.status == "continued" for r in unfinished)
    return {
        "completed": len(completed), "failed": len(failed), "unfinished": running,
        "invalid": len(unfinished) - running - copies - parts, "duplicates": copies, "continued": parts,
    }  # fmt: skip


# Config keys that name a run or file it (its name, the table and row it belongs to, Hydra's own
# settings), not what it computes. With the seed they do not split a setting, nor do the keys a run
# dir may change and still be the same run (experiments.train.config_difference: logger, device, ...).
_NOT_SETTINGS = ("seed", "name", "row", "table", "hydra")
# Config keys tables.recipe names in a settings text; any other key that tells two settings apart is added as key=value.
_IN_RECIPE = ("model.name", "data.name", "data.subset", "data.subset_seed", "data.image_size", "trainer.epochs", "trainer.batch_size",
              "optim.name", "optim.lr", "optim.weight_decay", "sched.name", "trainer.precision")  # fmt: skip


def _setting(row: RunRow) -> dict[str, Any]:
    """The run's resolved config without the seed and the naming keys (top level, or W&B's flat ``table.name``)."""
    config = row.record.get("config") if isinstance(row.record.get("config"), dict) else {}
    return {k: v for k, v in config.items() if str(k).split(".")[0] not in _NOT_SETTINGS}


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``."""
    if not isinstance(node, dict):
        return {prefix: node}
    return {key: value for k, v in node.items() for key, value in _flat(v, f"{prefix}.{k}" if prefix else str(k)).items()}


def _settings_text(rows: Sequence[RunRow]) -> str:
    """tables.recipe for these runs: their data, the epochs each trained, batch, optimizer, schedule, precision."""
    from .tables import recipe  # here: tables imports torch, which the rest of the report does not need

    return recipe({"": [r.record for r in rows]}) or ""


def _differences(settings: Sequence[dict[str, Any]]) -> list[list[str]]:
    """For each setting (a flat config), ``key=value`` for the keys outside the recipe text whose value
    another setting does not share.

    A key of a config group is compared between settings of the same option (``model.dropout``
    between runs of one model, ``data.mean`` on one dataset, ``optim.momentum`` with one
    optimizer): the option's own defaults come with its name, which the row shows. Off (null or
    false) and absent are the same, as for a run dir's reuse.
    """
    from .train import is_volatile  # here: train imports torch

    def value(flat: dict[str, Any], key: str) -> Any:
        found = flat.get(key)
        return None if found is None or found is False else found

    def option(flat: dict[str, Any], key: str) -> Any:
        return flat.get(key.split(".")[0] + ".name")

    out = []
    for mine in settings:
        shown = []
        for key in sorted({k for flat in settings for k in flat}):
            if key in _IN_RECIPE or is_volatile(key, bool(mine.get("trainer.stop_at_target"))):
                continue
            peers = [flat for flat in settings if option(flat, key) == option(mine, key)]
            if any(value(flat, key) != value(mine, key) for flat in peers):
                text = value(mine, key)
                shown.append(f"{key}={text if isinstance(text, str) else json.dumps(text)}")
        out.append(shown)
    return out


def group_runs(completed: Sequence[RunRow]) -> list[GroupRow]:
    """Completed runs grouped by setting: everything in their resolved config but the seed.

    Two runs share a setting when experiments.train.config_difference finds no difference between
    their configs without the seed and the naming keys (name, table, row): the notion by which a run
    dir is reused, so logger, device, data.root and the like do not split a group. Model, dataset,
    MACs and params must match as well (a record whose config lacks a key still splits by its model).

    Args:
        completed: completed runs.

    Returns:
        One :class:`GroupRow` per setting, by dataset, then best mean test accuracy first.
    """
    from .train import config_difference  # here: train imports torch

    groups: list[list[RunRow]] = []
    for r in completed:
        for group in groups:
            first = group[0]
            same_model = (first.model, first.data, first.macs, first.params) == (r.model, r.data, r.macs, r.params)
            if same_model and config_difference(_setting(first), _setting(r)) is None:
                group.append(r)
                break
        else:
            groups.append([r])
    extras = _differences([_flat(_setting(group[0])) for group in groups])
    out = []
    for group, extra in zip(groups, extras):
        accs = [r.test_acc for r in group if r.test_acc is not None]
        out.append(
            GroupRow(
                model=group[0].model,
                data=group[0].data,
                n=len(group),
                test_acc=statistics.fmean(accs) if accs else None,
                test_acc_sd=statistics.stdev(accs) if len(accs) > 1 else None,
                macs=group[0].macs,
                params=group[0].params,
                seeds=sorted(r.seed for r in group if r.seed is not None),
                settings="; ".join([_settings_text(group), *extra]),
                runs=[r.path for r in group],
            )
        )
    return sorted(out, key=lambda g: (g.data, -(g.test_acc or 0.0), g.model, g.settings))


def pareto_front(costs: Sequence[float], accs: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (lower or equal cost and higher or equal accuracy, one strictly).

    Args:
        costs: x values (MACs, params, latency); lower is better.
        accs: y values; higher is better.

    Returns:
        The front's indices in order of increasing cost (and accuracy). Exact duplicates of a
        front point are on the front too.
    """
    if len(costs) != len(accs):
        raise ValueError(f"pareto_front needs as many costs as accuracies, got {len(costs)} and {len(accs)}")
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -accs[i]))
    front: list[int] = []
    for i in order:
        if not front or accs[i] > accs[front[-1]] or (accs[i] == accs[front[-1]] and costs[i] == costs[front[-1]]):
            front.append(i)
    return front


# ---------------------------------------------------------------- formatting


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2, grouping: bool = True) -> str:
    return "" if value is None else f"{value / scale:{',' if grouping else ''}.{digits}f}"


def _fmt_int(value: int | None) -> str:
    return "" if value is None else str(value)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"


def _fmt_target(r: RunRow) -> str:
    """``94%: 1m 23s (epoch 17)``, ``94%: not reached``, or empty for a run that timed no target."""
    if r.target_acc is None:
        return ""
    if r.target_epoch is None:
        return f"{100 * r.target_acc:g}%: not reached"
    return f"{100 * r.target_acc:g}%: {_fmt_duration(r.target_seconds)} (epoch {r.target_epoch})"


def _experiment_row(r: RunRow) -> str:
    return " / ".join(x for x in (r.experiment, r.row) if x)


# (header, sort value, shown text, numeric?) of the page's run table.
_COLUMNS: tuple[tuple[str, Callable[[RunRow], Any], Callable[[RunRow], str], bool], ...] = (
    ("Name", lambda r: r.name, lambda r: r.name, False),
    ("Model", lambda r: r.model, lambda r: r.model, False),
    ("Data", lambda r: r.data, lambda r: r.data, False),
    ("Experiment / row", _experiment_row, _experiment_row, False),
    ("Seed", lambda r: r.seed, lambda r: _fmt_int(r.seed), True),
    ("Test acc (%)", lambda r: r.test_acc, lambda r: _fmt(r.test_acc, 0.01, 2), True),
    ("MACs (M)", lambda r: r.macs, lambda r: _fmt(r.macs, 1e6, 1), True),
    ("Params (M)", lambda r: r.params, lambda r: _fmt(r.params, 1e6, 2), True),
    ("Latency (ms)", lambda r: r.latency_ms, lambda r: _fmt(r.latency_ms, 1, 2), True),
    ("Epochs", lambda r: r.epochs, lambda r: _fmt_int(r.epochs), True),
    ("Wall time", lambda r: r.wall_seconds, lambda r: _fmt_duration(r.wall_seconds), True),
    ("Time to target", lambda r: r.target_seconds, _fmt_target, True),
    ("Status", lambda r: r.status, lambda r: r.status, False),
)


def _columns(rows: Sequence[RunRow]) -> list[tuple[str, Callable[[RunRow], Any], Callable[[RunRow], str], bool]]:
    """The run table's columns; "Time to target" only when some run timed one (``trainer.target_acc``)."""
    timed = any(r.target_acc is not None for r in rows)
    return [c for c in _COLUMNS if timed or c[0] != "Time to target"]


def _paper_order(rows: Sequence[RunRow]) -> list[RunRow]:
    """Tables for papers: grouped by experiment and row, then name and seed."""
    return sorted(rows, key=lambda r: (r.experiment or "", r.row or "", r.name, r.seed if r.seed is not None else -1))


def _md_cell(text: str) -> str:
    """Markdown-safe cell: the table's pipe, HTML and code/emphasis markers escaped with a backslash."""
    for char in ("\\", "|", "<", ">", "`", "*"):
        text = text.replace(char, "\\" + char)
    return " ".join(text.split())


def write_tables(completed: Sequence[RunRow], out: Path) -> list[Path]:
    """Write ``runs.csv`` and ``runs.md``: one row per completed run, grouped by experiment and row.

    The CSV keeps exact ``macs`` and ``params`` counts beside the rounded columns.

    Args:
        completed: completed runs.
        out: the output dir (exists).

    Returns:
        The two paths.
    """
    rows = _paper_order(completed)
    csv_path, md_path = out / "runs.csv", out / "runs.md"
    header = ["name", "model", "data", "experiment", "row", "seed", "test_acc_pct", "macs_m", "params_m", "latency_ms", "epochs", "wall_s",
              "target_acc_pct", "target_epoch", "time_to_target_s"]  # fmt: skip
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*header, "macs", "params", "status", "results"])
        for r in rows:
            numbers = [(r.test_acc, 0.01, 2), (r.macs, 1e6, 1), (r.params, 1e6, 2), (r.latency_ms, 1, 2)]
            writer.writerow(
                [r.name, r.model, r.data, r.experiment or "", r.row or "", _fmt_int(r.seed)]
                + [_fmt(value, scale, digits, grouping=False) for value, scale, digits in numbers]
                + [_fmt_int(r.epochs), _fmt(r.wall_seconds, 1, 0, grouping=False)]
                + [_fmt(r.target_acc, 0.01, 2), _fmt_int(r.target_epoch), _fmt(r.target_seconds, 1, 1, grouping=False)]
                + [_fmt(r.macs, 1, 0, grouping=False), _fmt(r.params, 1, 0, grouping=False), r.status, r.path]
            )
    columns = [c for c in _columns(rows) if c[0] != "Status"]  # every row is completed
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "|".join("---:" if c[3] else "---" for c in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_md_cell(shown(r)) for _, _, shown, _ in columns) + " |")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [csv_path, md_path]


def _fmt_mean_sd(g: GroupRow) -> str:
    """``91.00 ± 0.35`` in %, the sample standard deviation after the mean; the mean alone for one run."""
    if g.test_acc is None:
        return ""
    return _fmt(g.test_acc, 0.01, 2) + ("" if g.test_acc_sd is None else f" ± {_fmt(g.test_acc_sd, 0.01, 2)}")


# (header, sort value, shown text, numeric?) of the settings table (groups.md and the page's "By setting").
_GROUP_COLUMNS: tuple[tuple[str, Callable[[GroupRow], Any], Callable[[GroupRow], str], bool], ...] = (
    ("Model", lambda g: g.model, lambda g: g.model, False),
    ("Data", lambda g: g.data, lambda g: g.data, False),
    ("n", lambda g: g.n, lambda g: str(g.n), True),
    ("Test acc (%)", lambda g: g.test_acc, _fmt_mean_sd, True),
    ("MACs (M)", lambda g: g.macs, lambda g: _fmt(g.macs, 1e6, 1), True),
    ("Params (M)", lambda g: g.params, lambda g: _fmt(g.params, 1e6, 2), True),
    ("Settings", lambda g: g.settings, lambda g: g.settings, False),
)
_GROUPS_NOTE = (
    "One row per setting: runs whose resolved config is the same but for the seed. "
    "Test acc: mean ± sample standard deviation (n - 1) over those runs; n = 1 has no spread."
)


def write_groups(groups: Sequence[GroupRow], out: Path) -> list[Path]:
    """Write ``groups.csv`` and ``groups.md``: one row per setting (:func:`group_runs`), test accuracy as mean ± sample SD.

    The CSV keeps exact ``macs`` and ``params`` counts beside the rounded columns, and the runs' results.json paths.

    Args:
        groups: the settings, in the order to write them.
        out: the output dir (exists).

    Returns:
        The two paths.
    """
    csv_path, md_path = out / "groups.csv", out / "groups.md"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "data", "n", "test_acc_mean_pct", "test_acc_sd_pct", "macs_m", "params_m", "seeds", "settings",
                         "macs", "params", "results"])  # fmt: skip
        for g in groups:
            writer.writerow([
                g.model, g.data, g.n, _fmt(g.test_acc, 0.01, 2), _fmt(g.test_acc_sd, 0.01, 2),
                _fmt(g.macs, 1e6, 1, grouping=False), _fmt(g.params, 1e6, 2, grouping=False), " ".join(map(str, g.seeds)), g.settings,
                _fmt(g.macs, 1, 0, grouping=False), _fmt(g.params, 1, 0, grouping=False), ";".join(g.runs),
            ])  # fmt: skip
    lines = [
        "| " + " | ".join(c[0] for c in _GROUP_COLUMNS) + " |",
        "|" + "|".join("---:" if c[3] else "---" for c in _GROUP_COLUMNS) + "|",
    ]
    for g in groups:
        lines.append("| " + " | ".join(_md_cell(shown(g)) for _, _, shown, _ in _GROUP_COLUMNS) + " |")
    md_path.write_text("\n".join([*lines, "", _GROUPS_NOTE]) + "\n", encoding="utf-8")
    return [csv_path, md_path]


def _model_colors(rows: Sequence[RunRow]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(sorted({r.model for r in rows}))}


def by_data(rows: Sequence[RunRow]) -> dict[str, list[RunRow]]:
    """Runs grouped by dataset, in name order. Accuracies on different test sets are not comparable,
    so each dataset gets its own accuracy-vs-cost plots and Pareto front."""
    groups: dict[str, list[RunRow]] = {}
    for r in rows:
        groups.setdefault(r.data or "?", []).append(r)
    return dict(sorted(groups.items()))


def _file_part(text: str) -> str:
    """A dataset name as part of a file name: letters, digits, ``-`` and ``_``; a name that had to be
    changed gets a short hash of itself, so "cifar 10" and "cifar/10" do not share (and overwrite) a file."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "data"
    return safe if safe == text else f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def _scatter_points(rows: Sequence[RunRow], key: str) -> list[tuple[float, float, RunRow]]:
    """(x in plot units, accuracy in %, row) for the runs that have both values; MACs and params in millions."""
    scale = 1.0 if key == "latency_ms" else 1e6
    points = []
    for r in rows:
        x = getattr(r, key)
        if x is not None and r.test_acc is not None and x > 0:
            points.append((x / scale, r.test_acc * 100, r))
    return points


def _use_log(xs: Sequence[float], log: bool | None) -> bool:
    if log is not None:
        return log
    return bool(xs) and min(xs) > 0 and max(xs) / min(xs) > 20


# ---------------------------------------------------------------- PNG figures


def write_figures(completed: Sequence[RunRow], out: Path) -> list[Path]:
    """Write the three accuracy-vs-cost scatter plots as PNG (matplotlib, Agg), Pareto front as a step line.

    One set per dataset: ``acc_vs_macs.png`` when the runs share one, ``acc_vs_macs_<data>.png``
    for each when they do not (a front across test sets would compare the incomparable). A plot
    whose x value no run has (latency of runs that did not measure it) is not written.

    Args:
        completed: completed runs.
        out: the output dir (exists).

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font-cache chatter on a first run
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    colors = _model_colors(completed)
    groups = by_data(completed)
    for _, _, _, stem, _ in SCATTERS:  # no stale figure from an earlier report into the same dir
        for old in (out / f"{stem}.png", *out.glob(f"{stem}_*.png")):
            old.unlink(missing_ok=True)
    written = []
    for (data, rows), (key, what, unit, stem, log) in product(groups.items(), SCATTERS):
        points = _scatter_points(rows, key)
        path = out / (f"{stem}.png" if len(groups) == 1 else f"{stem}_{_file_part(data)}.png")
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        log_x = _use_log(xs, log)
        fig, ax = plt.subplots(figsize=(6.0, 4.2), dpi=150)
        for model, color in colors.items():
            mine = [p for p in points if p[2].model == model]
            if mine:
                ax.scatter(
                    [p[0] for p in mine],
                    [p[1] for p in mine],
                    s=36,
                    color=color,
                    edgecolors="white",
                    linewidths=0.6,
                    label=_mpl_text(model),
                    zorder=3,
                )
        front = pareto_front(xs, ys)
        fx, fy = [xs[i] for i in front], [ys[i] for i in front]
        ax.step(fx, fy, where="post", color="#333333", linestyle="--", linewidth=1.0, label="Pareto front", zorder=2)
        ax.scatter(fx, fy, s=90, facecolors="none", edgecolors="#111111", linewidths=1.2, zorder=4)
        for i in front:
            ax.annotate(
                _mpl_text(_short(points[i][2].name)),
                (xs[i], ys[i]),
                xytext=(6, 5),
                textcoords="offset points",
                fontsize=7,
                color="#333333",
            )
        ax.margins(x=0.08, y=0.12)
        if log_x:
            ax.set_xscale("log")
            lo, hi = ax.get_xlim()
            ticks = _log_ticks(lo, hi)  # 1-2-5 ticks in plain numbers, as on the page (not 2x10^1)
            ax.set_xticks(ticks, [_tick_label(t) for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(_axis_label(what, unit, log_x))
        ax.set_ylabel(f"Test accuracy on {_mpl_text(data)} (%)")
        ax.grid(True, which="major", color="#e5e5e5", linewidth=0.8)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(fontsize=7, frameon=False, loc="lower right")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _axis_label(what: str, unit: str, log_x: bool) -> str:
    return f"{what} ({unit}{', log scale' if log_x else ''})"


def _mpl_text(text: str) -> str:
    """Literal text for matplotlib: ``$`` would start mathtext (and fail on a stray one)."""
    return text.replace("$", r"\$")


def _short(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    """HTML-escape anything that came from a config or a result (quotes too: it may land in an attribute)."""
    return html.escape("" if value is None else str(value), quote=True)


def _json_for_script(value: Any) -> str:
    """JSON safe inside ``<script>``: no ``</script>``, comment or entity can be formed from the data."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _nice_step(span: float, count: int) -> float:
    raw = span / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def _linear_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    step = _nice_step(hi - lo, count)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    for exponent in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        ticks += [m * 10.0**exponent for m in (1, 2, 5)]
    inside = [t for t in ticks if lo <= t <= hi]
    decades = [t for t in inside if math.isclose(math.log10(t), round(math.log10(t)))]
    if len(decades) >= 3:
        return decades
    if len(inside) >= 2:
        return inside
    # a narrow range (one run, or runs of similar cost): every integer mantissa, else the middle value
    fine = [m * 10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in range(1, 10)]
    fine = [t for t in fine if lo <= t <= hi]
    return fine if len(fine) >= 2 else [float(f"{math.sqrt(lo * hi):.3g}")]


def _tick_label(value: float, step: float | None = None) -> str:
    if step is not None and step < 1:
        return f"{value:.{max(0, -math.floor(math.log10(step)))}f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:g}"


class _Axes:
    """Data -> SVG pixel coordinates for one chart, linear or log in x, linear in y."""

    W, H, LEFT, RIGHT, TOP, BOTTOM = 480, 320, 58, 18, 14, 46

    def __init__(self, xs: Sequence[float], ys: Sequence[float], log_x: bool, integer_x: bool = False) -> None:
        self.log_x = log_x
        if log_x:
            lo, hi = min(xs), max(xs)
            self.x0, self.x1 = math.log10(lo / 1.3), math.log10(hi * 1.3)
        else:
            lo, hi = min(xs), max(xs)
            pad = (hi - lo) * 0.06 or max(abs(hi) * 0.1, 1.0)
            self.x0, self.x1 = (lo - pad, hi + pad) if not integer_x else (min(lo, 1) - 0.3, hi + 0.3)
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.08 or max(abs(hi) * 0.05, 1.0)
        self.y0, self.y1 = lo - pad, hi + pad
        self.integer_x = integer_x

    def px(self, x: float) -> float:
        value = math.log10(x) if self.log_x else x
        return self.LEFT + (value - self.x0) / (self.x1 - self.x0) * (self.W - self.LEFT - self.RIGHT)

    def py(self, y: float) -> float:
        return self.H - self.BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (self.H - self.TOP - self.BOTTOM)

    def frame(self, x_label: str, y_label: str) -> list[str]:
        """Grid, ticks and axis labels."""
        left, right, top, bottom = self.LEFT, self.W - self.RIGHT, self.TOP, self.H - self.BOTTOM
        parts = [f'<rect class="plot" x="{left}" y="{top}" width="{right - left}" height="{bottom - top}"/>']
        if self.log_x:
            x_ticks, x_step = _log_ticks(10**self.x0, 10**self.x1), None
        else:
            x_ticks = _linear_ticks(self.x0, self.x1, 6, self.integer_x)
            x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else None
        for t in x_ticks:
            x = self.px(t)
            parts.append(f'<line class="grid" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}"/>')
            parts.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 15}" text-anchor="middle">{_tick_label(t, x_step)}</text>')
        y_ticks = _linear_ticks(self.y0, self.y1, 5)
        y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else None
        for t in y_ticks:
            y = self.py(t)
            parts.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>')
            parts.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(t, y_step)}</text>')
        parts.append(f'<text class="label" x="{(left + right) / 2:.0f}" y="{self.H - 8}" text-anchor="middle">{_e(x_label)}</text>')
        parts.append(
            f'<text class="label" transform="translate(14 {(top + bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">{_e(y_label)}</text>'
        )
        return parts


def _svg(parts: list[str], title: str) -> str:
    return f'<svg viewBox="0 0 {_Axes.W} {_Axes.H}" role="img" aria-label="{_e(title)}"><title>{_e(title)}</title>{"".join(parts)}</svg>'


def _empty_svg(message: str) -> str:
    return _svg([f'<text class="empty" x="{_Axes.W / 2}" y="{_Axes.H / 2}" text-anchor="middle">{_e(message)}</text>'], message)


def _hover(r: RunRow, *lines: str) -> str:
    details = [r.name, f"model {r.model} · data {r.data}" + ("" if r.seed is None else f" · seed {r.seed}"), *lines]
    return _e("\n".join(line for line in details if line))


def _scatter_svg(
    rows: Sequence[RunRow], index: dict[int, int], scatter: tuple[str, str, str, str, bool | None], colors: dict[str, str]
) -> str:
    """Accuracy vs one cost with the Pareto front (a step line: the best accuracy reachable at each cost)."""
    key, what, unit, _, log = scatter
    points = _scatter_points(rows, key)
    if not points:
        return _empty_svg(f"no completed run has a {what.lower()} value")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    log_x = _use_log(xs, log)
    axes = _Axes(xs, ys, log_x)
    parts = axes.frame(_axis_label(what, unit, log_x), "Test accuracy (%)")
    front = pareto_front(xs, ys)
    if len(front) > 1:
        steps = [f"{axes.px(xs[front[0]]):.1f},{axes.py(ys[front[0]]):.1f}"]
        for a, b in pairwise(front):
            steps += [f"{axes.px(xs[b]):.1f},{axes.py(ys[a]):.1f}", f"{axes.px(xs[b]):.1f},{axes.py(ys[b]):.1f}"]
        parts.append(
            f'<polyline class="front" points="{" ".join(steps)}"><title>Pareto front: best accuracy at each cost</title></polyline>'
        )
    on_front = set(front)
    for i, (x, y, r) in enumerate(points):
        cls = "pt front-pt" if i in on_front else "pt"
        tip = _hover(r, f"test acc {y:.2f} %", f"{what} {x:,.2f} {unit}", "on the Pareto front" if i in on_front else "")
        parts.append(
            f'<circle class="{cls}" data-i="{index[id(r)]}" cx="{axes.px(x):.1f}" cy="{axes.py(y):.1f}" r="{6 if i in on_front else 5}" '
            f'fill="{colors[r.model]}"><title>{tip}</title></circle>'
        )
    for i in front:
        x, y = axes.px(xs[i]), axes.py(ys[i])
        anchor = "end" if x > axes.W * 0.7 else "start"
        dx = -8 if anchor == "end" else 8
        parts.append(
            f'<text class="pt-label" x="{x + dx:.1f}" y="{y - 7:.1f}" text-anchor="{anchor}">{_e(_short(points[i][2].name, 24))}</text>'
        )
    return _svg(parts, f"Test accuracy vs {what}")


def _curve_svg(rows: Sequence[RunRow], index: dict[int, int], metric: str, y_label: str, colors: dict[str, str]) -> str:
    """One line per run over epochs (hover a line for its run)."""
    scale = 100.0 if metric == "test_acc" else 1.0
    series = []
    for r in rows:
        pairs = ((_number(h.get("epoch")), _number(h.get(metric))) for h in r.history)
        pts = sorted((epoch, value * scale) for epoch, value in pairs if epoch is not None and value is not None)
        if pts:
            series.append((r, pts))
    if not series:
        return _empty_svg(f"no run recorded {metric} per epoch")
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    axes = _Axes(xs, ys, log_x=False, integer_x=True)
    parts = axes.frame("Epoch", y_label)
    for r, pts in series:
        coords = " ".join(f"{axes.px(x):.1f},{axes.py(y):.1f}" for x, y in pts)
        epoch, last = pts[-1]
        tip = _hover(r, f"{y_label.lower()} at epoch {epoch:g}: {last:.{2 if metric == 'test_acc' else 3}f}")
        color = colors[r.model]
        parts.append(f'<g class="curve" data-i="{index[id(r)]}"><title>{tip}</title><polyline points="{coords}" stroke="{color}"/>')
        parts.append("".join(f'<circle cx="{axes.px(x):.1f}" cy="{axes.py(y):.1f}" r="2.2" fill="{color}"/>' for x, y in pts) + "</g>")
    return _svg(parts, f"{y_label} per epoch")


_CSS = """
:root { --fg: #1d1d1f; --muted: #6b6b70; --line: #e3e3e8; --bg: #ffffff; --panel: #f7f7f9; --accent: #0072B2; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--fg); background: var(--bg); }
main { max-width: 1280px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 32px 0 10px; border-bottom: 1px solid var(--line); padding-bottom: 6px; } h3 { font-size: 14px; margin: 16px 0 8px; }
.meta { color: var(--muted); margin: 0; } .meta code { font-size: 12px; }
.counts { display: flex; gap: 12px; margin: 14px 0 4px; flex-wrap: wrap; }
.count { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; }
.count b { font-size: 20px; display: block; } .count.bad b { color: #B3261E; } .count.wait b { color: #8a6d00; }
.grid3 { display: grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr)); gap: 16px; }
figure { margin: 0; background: var(--bg); border: 1px solid var(--line); border-radius: 8px; padding: 8px 8px 4px; }
figcaption { font-weight: 600; font-size: 13px; padding: 2px 6px 4px; }
svg { width: 100%; height: auto; display: block; font-size: 12px; }
svg .plot { fill: #fcfcfd; stroke: #c9c9cf; } svg .grid { stroke: #ececf0; } svg .tick { fill: var(--muted); } svg .label { fill: var(--fg); font-size: 13px; }
svg .empty { fill: var(--muted); font-size: 13px; } svg .front { fill: none; stroke: #333; stroke-width: 1.3; stroke-dasharray: 5 3; }
svg .pt { stroke: #fff; stroke-width: 1; cursor: default; } svg .front-pt { stroke: #111; stroke-width: 1.8; }
svg .pt-label { fill: #333; font-size: 11px; pointer-events: none; paint-order: stroke; stroke: #fcfcfd; stroke-width: 3px; }
svg .curve polyline { fill: none; stroke-width: 1.6; opacity: 0.85; } svg .curve:hover polyline, svg .curve.hl polyline { stroke-width: 3.5; opacity: 1; }
svg .pt:hover, svg .pt.hl { stroke: #111; stroke-width: 3; }
.legend { display: flex; gap: 16px; flex-wrap: wrap; color: var(--muted); margin: 6px 0 12px; font-size: 13px; }
.legend span::before { content: ""; display: inline-block; width: 10px; height: 10px; border-radius: 50%; background: var(--c); margin-right: 6px; }
.legend .front-key::before { border-radius: 0; height: 0; width: 18px; border-top: 2px dashed #333; background: none; vertical-align: middle; }
.note { color: var(--muted); font-size: 12.5px; margin: 6px 0; }
.table-wrap { overflow-x: auto; border: 1px solid var(--line); border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 9px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
td.num, th.num { text-align: right; } td.reason, td.path, td.settings { white-space: normal; word-break: break-word; }
td.path { color: var(--muted); font-size: 12px; }
thead th { background: var(--panel); position: sticky; top: 0; font-weight: 600; }
table.sortable th { cursor: pointer; user-select: none; } table.sortable th:hover { color: var(--accent); }
th[aria-sort="ascending"]::after { content: " \\25B2"; font-size: 10px; } th[aria-sort="descending"]::after { content: " \\25BC"; font-size: 10px; }
tbody tr:hover, tbody tr.hl { background: #eef5fb; }
.status { font-size: 12px; padding: 1px 8px; border-radius: 10px; background: #e7f4ea; color: #1e6b34; }
.status.failed { background: #fbe9e7; color: #B3261E; } .status.duplicate { background: #ececf0; color: var(--muted); } .status.running, .status.unreadable, .status.incomplete, .status.invalid, .status.unknown { background: #fff4d6; color: #8a6d00; }
footer { color: var(--muted); font-size: 12px; margin-top: 36px; }
"""

# Sorts by each cell's data-v (numbers numerically), blanks last; hovering a row highlights its points and curves.
_JS = """
(function () {
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
    heads.forEach(function (th, col) {
      th.addEventListener("click", function () {
        var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir);
        var numeric = th.classList.contains("num"), sign = dir === "ascending" ? 1 : -1;
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[col].getAttribute("data-v"), y = b.cells[col].getAttribute("data-v");
          if (x === "" || y === "") { return (x === "") - (y === ""); }
          if (numeric) { return sign * (parseFloat(x) - parseFloat(y)); }
          return sign * x.localeCompare(y, undefined, {numeric: true, sensitivity: "base"});
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  function mark(i, on) {
    document.querySelectorAll('[data-i="' + i + '"]').forEach(function (el) { el.classList.toggle("hl", on); });
  }
  document.querySelectorAll("#runs tbody tr").forEach(function (tr) {
    tr.addEventListener("mouseenter", function () { mark(tr.getAttribute("data-i"), true); });
    tr.addEventListener("mouseleave", function () { mark(tr.getAttribute("data-i"), false); });
  });
})();
"""


def _runs_table(rows: Sequence[RunRow], index: dict[int, int]) -> str:
    sorted_by = ' aria-sort="descending"'  # rows arrive best accuracy first
    columns = _columns(rows)
    head = "".join(
        f'<th scope="col" class="{"num" if numeric else ""}"{sorted_by if title.startswith("Test acc") else ""}>{_e(title)}</th>'
        for title, _, _, numeric in columns
    )
    body = []
    for r in rows:
        cells = []
        for title, raw, shown, numeric in columns:
            value, text = raw(r), shown(r)
            if title == "Status":
                text_html = f'<span class="status {_e(r.status)}">{_e(text)}</span>'
            elif title == "Name":
                text_html = f'<span title="{_e(r.path)}">{_e(text)}</span>'
            else:
                text_html = _e(text)
            cells.append(f'<td class="{"num" if numeric else ""}" data-v="{_e("" if value is None else value)}">{text_html}</td>')
        body.append(f'<tr data-i="{index[id(r)]}">{"".join(cells)}</tr>')
    return f'<div class="table-wrap"><table id="runs" class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _groups_table(groups: Sequence[GroupRow]) -> str:
    head = "".join(f'<th scope="col" class="{"num" if numeric else ""}">{_e(title)}</th>' for title, _, _, numeric in _GROUP_COLUMNS)
    body = []
    for g in groups:
        cells = []
        for title, raw, shown, numeric in _GROUP_COLUMNS:
            kind = "num" if numeric else "settings" if title == "Settings" else ""  # the settings text wraps
            cells.append(f'<td class="{kind}" data-v="{_e(raw(g))}">{_e(shown(g))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<div class="table-wrap"><table id="groups" class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _problems_table(rows: Sequence[RunRow]) -> str:
    if not rows:
        return '<p class="note">None: every run found completed.</p>'
    head = "".join(f"<th>{t}</th>" for t in ("Name", "Status", "Reason", "Model", "Data", "Epochs done", "results.json"))
    body = "".join(
        f'<tr><td>{_e(r.name)}</td><td><span class="status {_e(r.status)}">{_e(r.status)}</span></td><td class="reason">{_e(r.reason)}</td>'
        f'<td>{_e(r.model)}</td><td>{_e(r.data)}</td><td class="num">{len(r.history)}</td><td class="path">{_e(r.path)}</td></tr>'
        for r in rows
    )
    return f'<div class="table-wrap"><table id="problems"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def render_html(
    completed: Sequence[RunRow],
    settings: Sequence[GroupRow],
    failed: Sequence[RunRow],
    unfinished: Sequence[RunRow],
    sources: Sequence[str],
) -> str:
    """The whole dashboard as one self-contained HTML page.

    Args:
        completed: completed runs (plots and the sortable table).
        settings: the completed runs by setting (:func:`group_runs`), the "By setting" table.
        failed: failed runs, listed apart with their reasons.
        unfinished: running, unreadable, incomplete or invalid runs, listed apart.
        sources: what was read (dirs or a W&B path), shown in the header.

    Returns:
        The page; every string from a run is HTML-escaped, the embedded JSON too.
    """
    index = {id(r): i for i, r in enumerate(completed)}
    colors = _model_colors(completed)
    groups = by_data(completed) or {"": []}
    scatters = "".join(
        (f"<h3>{_e(data)}</h3>" if len(groups) > 1 else "")
        + '<div class="grid3">'
        + "".join(
            f"<figure><figcaption>Test accuracy{f' on {_e(data)}' if data else ''} vs {_e(scatter[1])}</figcaption>"
            f"{_scatter_svg(rows, index, scatter, colors)}</figure>"
            for scatter in SCATTERS
        )
        + "</div>"
        for data, rows in groups.items()
    )
    data_note = (
        f'<p class="note">Runs on {len(groups)} datasets ({_e(", ".join(groups))}): each has its own plots and Pareto front, '
        "as accuracies on different test sets do not compare.</p>"
        if len(groups) > 1
        else ""
    )
    curves = (
        f"<figure><figcaption>Test accuracy per epoch</figcaption>{_curve_svg(completed, index, 'test_acc', 'Test accuracy (%)', colors)}</figure>"
        f"<figure><figcaption>Training loss per epoch</figcaption>{_curve_svg(completed, index, 'train_loss', 'Training loss', colors)}</figure>"
    )
    legend = (
        "".join(f'<span style="--c:{c}">{_e(m)}</span>' for m, c in colors.items())
        + '<span class="front-key">Pareto front (ringed points)</span>'
    )
    devices = sorted({r.latency_device for r in completed if r.latency_device and r.latency_ms is not None})
    device_note = (
        f'<p class="note">Latency measured on different devices ({_e(", ".join(devices))}): compare latencies within one device only.</p>'
        if len(devices) > 1
        else (f'<p class="note">Latency: median inference time at batch size 1 on {_e(devices[0])}.</p>' if devices else "")
    )
    data = [{k: v for k, v in asdict(r).items() if k not in ("history", "record")} for r in completed]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total = len(completed) + len(failed) + len(unfinished)
    counts = count_runs(completed, failed, unfinished)
    invalid_box = f'<div class="count bad"><b>{counts["invalid"]}</b>unreadable or invalid</div>' if counts["invalid"] else ""
    copies_box = f'<div class="count"><b>{counts["duplicates"]}</b>copies (not counted)</div>' if counts["duplicates"] else ""
    if counts["continued"]:
        copies_box += f'<div class="count"><b>{counts["continued"]}</b>continued elsewhere (not counted)</div>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>convlab report</title><style>{_CSS}</style></head>
<body><main>
<h1>convlab report</h1>
<p class="meta">Generated {generated} from {", ".join(f"<code>{_e(s)}</code>" for s in sources)}</p>
<div class="counts"><div class="count"><b>{total}</b>runs found</div><div class="count"><b>{len(completed)}</b>completed</div>
<div class="count bad"><b>{len(failed)}</b>failed</div><div class="count wait"><b>{counts["unfinished"]}</b>unfinished</div>{invalid_box}{copies_box}</div>
<h2>Accuracy vs cost</h2>
<div class="legend">{legend}</div>{data_note}
{scatters}
<p class="note">Pareto front: runs no other run beats on both accuracy and cost; the dashed step is the best accuracy reachable at each cost.
MACs: one multiply-add counts once (conv + linear, as the MobileNet papers count). Hover a point for its run.</p>{device_note}
<h2>Training curves</h2>
<div class="grid3">{curves}</div>
<h2>By setting</h2>
<p class="note">{_e(_GROUPS_NOTE)}</p>
{_groups_table(settings)}
<h2>Completed runs</h2>
<p class="note">Click a column header to sort; hover a row to find its points above.</p>
{_runs_table(completed, index)}
<h2>Failed and unfinished runs</h2>
<p class="note">Not in the plots or tables above.</p>
{_problems_table([*failed, *unfinished])}
<footer>convlab · accuracy on the test set, MACs and params in millions, wall time of the whole run.</footer>
</main>
<script type="application/json" id="runs-data">{_json_for_script(data)}</script>
<script>{_JS}</script>
</body></html>
"""


# ---------------------------------------------------------------- the whole report


def _writable_dir(out: str | Path) -> Path:
    if not str(out).strip():  # Path("") is the current directory: the report would land in the repo
        raise ValueError(f"out={str(out)!r} is empty; pass out=DIR with a directory path")
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as ex:
        raise ValueError(f"out dir '{out}' is not writable ({ex.strerror or ex}); pass out=DIR with a writable path") from None
    return path


def build_report(
    runs: Sequence[str | Path] | str | None,
    out: str | Path = "report",
    source: str = "local",
    project: str | None = None,
    entity: str | None = None,
    api: Any = None,
) -> dict[str, Any]:
    """Read the runs, then write index.html, the PNG figures, runs.csv / runs.md and groups.csv / groups.md into ``out``.

    Args:
        runs: dirs searched recursively for results.json (source local); a single dir may be a string.
        out: output dir, created when missing.
        source: ``local`` or ``wandb``.
        project: W&B project (source wandb).
        entity: W&B entity (source wandb).
        api: injected W&B API object (tests); None builds ``wandb.Api()``.

    Returns:
        Summary: ``runs`` and the counts of :func:`count_runs` (``completed``, ``failed``,
        ``unfinished``, ``invalid``, ``duplicates``, ``continued``), ``index`` (path of
        index.html), ``files`` written, ``problems`` (name, status, reason, path per run left out) and
        ``groups`` (one :class:`GroupRow` per setting, as a dict: test accuracy as a fraction).

    Raises:
        ValueError: unknown source, missing or empty runs dirs, unreadable W&B project, unwritable out.
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not valid; choose from: {', '.join(SOURCES)}")
    if source == "local":
        dirs = [runs] if isinstance(runs, (str, Path)) else list(runs or [])
        records = load_local_runs([str(d) for d in dirs])
        sources = [str(d) for d in dirs]
    else:
        records = load_wandb_runs(project, entity, api=api)
        sources = [f"wandb:{entity}/{project}" if entity else f"wandb:{project}"]
    out_dir = _writable_dir(out)
    completed, failed, unfinished = split_runs(records)
    groups = group_runs(completed)
    files = write_tables(completed, out_dir) + write_groups(groups, out_dir) + write_figures(completed, out_dir)
    index = out_dir / "index.html"
    index.write_text(render_html(completed, groups, failed, unfinished, sources), encoding="utf-8")
    return {
        "runs": len(records),
        **count_runs(completed, failed, unfinished),
        "sources": sources,
        "index": str(index),
        "files": [str(index), *(str(f) for f in files)],
        "problems": [{"name": r.name, "status": r.status, "reason": r.reason, "path": r.path} for r in (*failed, *unfinished)],
        "groups": [asdict(g) for g in groups],
    }


def format_summary(summary: dict[str, Any], limit: int = 10) -> str:
    """A few lines for the terminal: counts, the runs left out (at most ``limit``) and where the page is."""
    lines = [
        f"{summary['runs']} runs from {', '.join(summary['sources'])}: "
        f"{summary['completed']} completed, {summary['failed']} failed, {summary['unfinished']} unfinished"
        + (f", {summary['invalid']} unreadable or invalid" if summary.get("invalid") else "")
        + (f", {summary['duplicates']} copies of runs already counted" if summary.get("duplicates") else "")
        + (f", {summary['continued']} stopped runs finished in another dir" if summary.get("continued") else "")
    ]
    for problem in summary["problems"][:limit]:
        lines.append(f"  {problem['status']}: {problem['name']}: {problem['reason']} ({problem['path']})")
    if len(summary["problems"]) > limit:
        lines.append(f"  ... and {len(summary['problems']) - limit} more (see the page)")
    lines.append(f"report: {summary['index']}  (+ {len(summary['files']) - 1} files: tables and figures)")
    return "\n".join(lines)

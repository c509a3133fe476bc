"""Reproduced tables: a ``conf/experiment`` table's rows, our figures beside the paper's, in
Markdown, CSV and LaTeX.

Cost columns come from the config alone (fvcore on the model the row builds); accuracy columns
come only from the ``results.json`` files of trained runs, mean +- std over seeds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
import statistics
from collections.abc import Iterable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .allocator import steady_malloc
from .cli import CONF_DIR
from .config import input_shape, model_from_config
from .cost import measure_cost
from .records import incomplete, read_json
from .report import impossible_value, run_identity

__all__ = [
    "Table",
    "as_json",
    "build_table",
    "collect_runs",
    "csv_table",
    "format_table",
    "latex_table",
    "markdown_table",
    "out_dir_name",
    "override_key",
    "recipe",
    "row_costs",
    "row_set_warnings",
]

log = logging.getLogger("convlab")

Table = list[dict[str, Any]]


def row_costs(table: DictConfig, compose: Any, overrides: list[str], latency: bool = True) -> list[dict[str, Any]]:
    """Cost of every row: ``compose(overrides)`` -> config -> model -> fvcore, plus fp32 CPU latency (batch 1).

    Latency: every row's model is timed round-robin (one call of each per round, as the benchmarks
    do), so whatever the machine does meanwhile falls on all rows alike and the rows compare;
    channels_last, eval mode, no grad, glibc's allocator held steady; the median per row.
    """
    out, calls = [], {}
    for i, row in enumerate(table.rows):
        cfg = compose([*overrides, *row.overrides])
        try:
            model = model_from_config(cfg)
        except ValueError as ex:  # a row that cannot be built: listed with its reason, the others go on
            out.append({"row": row, "cost": None, "data": cfg.data.name, "error": " ".join(str(ex).split())})
            continue
        cost = measure_cost(model, input_shape(cfg))
        out.append({"row": row, "cost": cost, "data": cfg.data.name})
        if latency:
            model = model.to(memory_format=torch.channels_last).eval()
            x = torch.randn(input_shape(cfg)).contiguous(memory_format=torch.channels_last)
            calls[i] = torch.no_grad()(lambda model=model, x=x: model(x))
    if calls:
        from .bench import time_interleaved

        with steady_malloc():
            timed = time_interleaved({str(i): fn for i, fn in calls.items()}, repeats=20, warmup=3, min_time_s=0.5)
        for i in calls:
            out[i]["cost"]["latency_ms"] = {"1": timed[str(i)]["median_ms"]}
            out[i]["cost"]["latency_device"] = "cpu"
    return out


def override_key(override: str) -> str:
    """The key of a command-line override: ``+model.depthwise=true`` -> ``model.depthwise``."""
    return override.split("=", 1)[0].lstrip("+~")


def out_dir_name(overrides: list[str]) -> str:
    """reproduce.py's default out dir name: the overrides that change results, as run.py names sweep
    jobs (data.root, logger, device... left out: moving the data does not retrain the table). A
    long one keeps its start and a hash, under the file system's 255-byte limit."""
    from .train import VOLATILE  # here: train imports much that tables' other users do not need

    # run.py's exclusions that change no result (not `name`: a run dir refuses a run of another name)
    excluded = set(OmegaConf.load(CONF_DIR / "config.yaml").hydra.job.config.override_dirname.exclude_keys) & set(VOLATILE)
    text = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", ",".join(sorted(o for o in overrides if override_key(o) not in excluded))) or "default"
    return text if len(text) <= 120 else f"{text[:100]}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def row_set_warnings(table: Any, overrides: list[str]) -> list[str]:
    """One warning per command-line override that the table's rows set themselves (a row's value wins in that row).

    ``reproduce.py table=mobilenet_t7 data.image_size=8``: every row of Table 7 sets the image size,
    so the override changes nothing; the caller says so instead of ignoring it silently.
    """
    row_keys = {override_key(o) for row in table.rows for o in row.overrides}
    return [
        f"{o}: rows of table {table.name} set {override_key(o)} themselves; in those rows their value is used"
        for o in overrides
        if "=" in o and override_key(o) in row_keys
    ]


def collect_runs(runs_dir: Path) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Completed run records by table row, and the failed or unfinished ones, from ``runs_dir/**/results.json``.

    A copy of a run dir (a backup beside it) is the same run: counted once, as the dashboard does
    (:func:`experiments.report.run_identity`), not as another seed in the row's mean and n.
    """
    done: dict[str, list[dict[str, Any]]] = {}
    other: list[dict[str, Any]] = []
    read = [(path, read_json(path)) for path in sorted(Path(runs_dir).glob("**/results.json"))]
    read.sort(key=lambda pr: not (isinstance(pr[1], dict) and run_identity(pr[1], pr[0])[1]))  # originals first, stable
    seen: dict[tuple[Any, ...], Path] = {}
    for path, record in read:
        if not isinstance(record, dict):
            reason = f"{path} is not a results record (not JSON, or not a JSON object)"
            other.append({"row": None, "status": "unreadable", "reason": reason, "run_dir": str(path.parent)})
        elif record.get("status") == "completed" and (invalid := incomplete(record) or impossible_value(record)):
            other.append({**record, "status": "invalid", "reason": f"{path}: {invalid}"})  # as the dashboard lists it
        elif record.get("status") == "completed" and (record.get("final") or {}).get("test_acc") is not None:
            identity = run_identity(record, path)[0]
            if identity in seen:
                log.warning("%s is a copy of the run at %s: counted once", path, seen[identity])
                continue
            if identity:
                seen[identity] = path
            done.setdefault(str(record.get("row")), []).append(record)
        else:
            other.append(record)
    return done, other


def _digits(value: float | str) -> int:
    """Decimals the paper printed. A figure with a trailing zero ("4.20") must be written as a
    string in the table's YAML: as a float it reads 4.2, one digit less."""
    text = value if isinstance(value, str) else repr(value)
    return len(text.split(".")[1]) if "." in text else 0


def _diff(ours: float, paper: float | str) -> str:
    """Ours minus the paper's, at the precision the paper printed: "0" means they agree.

    Ours is rounded half up in decimal, as papers round (149.5 M -> 150), not half to even on the
    binary float (``round(2.5) == 2``).
    """
    digits = _digits(paper)
    step = Decimal(1).scaleb(-digits)
    printed = Decimal(paper if isinstance(paper, str) else repr(paper))
    delta = Decimal(repr(ours)).quantize(step, rounding=ROUND_HALF_UP) - printed.quantize(step)
    return "0" if delta == 0 else f"{delta:+.{digits}f}"


def build_table(costs: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]] | None) -> Table:
    """One dict per row: setting, accuracy (ours and paper), MACs and params (ours, paper, difference), latency, note."""
    out = []
    for item in costs:
        row, cost = item["row"], item["cost"] or {}  # no cost: a row whose model could not be built
        paper = OmegaConf.to_container(row.paper) if row.get("paper") else {}
        records = (runs or {}).get(str(row.id), [])
        accs = [100 * r["final"]["test_acc"] for r in records]
        latency = cost.get("latency_ms", {}).get("1")
        device = cost.get("latency_device")
        measured = [r["cost"]["latency_ms"]["1"] for r in records if "1" in r["cost"].get("latency_ms", {})]
        if measured:  # measured on the training device after training
            latency = statistics.median(measured)
            device = records[0]["cost"].get("latency_device")
        macs_m, params_m = (cost[key] / 1e6 if key in cost else None for key in ("macs", "params"))  # None: JSON null, not NaN
        targets = [r["target"] for r in records if isinstance(r.get("target"), dict)]  # trainer.target_acc runs
        reached = [t["train_seconds"] for t in targets if t.get("reached")]
        out.append({
            "id": str(row.id),
            "setting": row.label,
            "data": item["data"],
            "acc": statistics.fmean(accs) if accs else None,
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
            "seeds": len(accs),
            "paper_acc": paper.get("accuracy"),
            "macs_m": macs_m,
            "paper_macs_m": paper.get("macs_m"),
            "macs_diff": _diff(macs_m, paper["macs_m"]) if "macs_m" in paper and item["cost"] else None,
            "params_m": params_m,
            "paper_params_m": paper.get("params_m"),
            "params_diff": _diff(params_m, paper["params_m"]) if "params_m" in paper and item["cost"] else None,
            "latency_ms": latency,
            "latency_device": device,
            "train_img_s": statistics.median(statistics.fmean(h["img_per_s"] for h in r["history"]) for r in records) if records else None,
            "train_s": statistics.median(r["final"]["wall_seconds"] for r in records) if records else None,
            "target_acc": targets[0]["acc"] if targets else None,
            "target_runs": len(targets),
            "target_reached": len(reached),
            "time_to_target_s": statistics.median(reached) if reached else None,
            "note": " ".join(str(row.get("note") or item.get("error") or "").split()) or None,
        })  # fmt: skip
    return out


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _acc(row: dict[str, Any]) -> str:
    if row["acc"] is None:
        return "—"
    if row["acc_std"] is None:
        return f"{row['acc']:.2f}" + (f" (n={row['seeds']})" if row["seeds"] > 1 else "")
    return f"{row['acc']:.2f} ± {row['acc_std']:.2f} (n={row['seeds']})"


def _columns(rows: Table, table: DictConfig) -> list[tuple[str, list[str]]]:
    has_paper = any(r["paper_macs_m"] is not None or r["paper_acc"] is not None for r in rows)
    data = rows[0]["data"] if rows else "?"
    cols = [("setting", [r["setting"] for r in rows]), (f"acc % ({data})", [_acc(r) for r in rows])]
    if has_paper:
        cols.append(
            (f"paper acc % ({table.get('paper_accuracy') or 'paper'})".replace(" (%)", ""), [_fmt(r["paper_acc"], "") for r in rows])
        )
    cols.append(("MACs (M)", [_fmt(r["macs_m"], ".1f") for r in rows]))
    if has_paper:
        cols += [("paper MACs (M)", [_fmt(r["paper_macs_m"], "") for r in rows]), ("Δ MACs", [r["macs_diff"] or "—" for r in rows])]
    cols.append(("params (M)", [_fmt(r["params_m"], ".2f") for r in rows]))
    if has_paper:
        cols += [("paper params (M)", [_fmt(r["paper_params_m"], "") for r in rows]), ("Δ params", [r["params_diff"] or "—" for r in rows])]
    devices = {r["latency_device"] for r in rows if r["latency_device"]}
    cols.append((f"latency ms ({', '.join(sorted(devices)) or '—'}, batch 1)", [_fmt(r["latency_ms"], ".2f") for r in rows]))
    if any(r["train_img_s"] is not None for r in rows):
        cols += [
            ("train img/s", [_fmt(r["train_img_s"], ".0f") for r in rows]),
            ("wall time (s)", [_fmt(r["train_s"], ".0f") for r in rows]),
        ]
    timed = [r for r in rows if r["target_acc"] is not None]
    if timed:
        goal = "/".join(sorted({f"{100 * r['target_acc']:g}%" for r in timed}))
        cols.append((f"time to {goal} (s)", [_time_to_target(r) for r in rows]))
    return cols


def _time_to_target(row: dict[str, Any]) -> str:
    """Median training seconds to the target over the seeds that reached it; ``(k/n)`` when some did not."""
    if row["target_acc"] is None:
        return "—"
    reached = "" if row["target_reached"] == row["target_runs"] else f" ({row['target_reached']}/{row['target_runs']} reached)"
    return _fmt(row["time_to_target_s"], ".1f") + reached


def _short_commit(commit: Any) -> str:
    text = str(commit or "?")
    return text[:10] + ("-dirty" if text.endswith("-dirty") else "")


def _config_value(record: dict[str, Any], *path: str) -> Any:
    """``record["config"][path[0]][path[1]]...``, None where a level is missing or not a mapping."""
    value: Any = record.get("config")
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def trained_epochs(record: dict[str, Any]) -> str:
    """How long a run trained, as :func:`recipe`'s epochs figure: ``4``; ``3 of 40`` when it stopped
    before its epochs (``trainer.stop_at_target``); ``8 steps (trainer.max_steps), 0.5 of 1`` when
    ``trainer.max_steps`` ended it first. The configured count alone where the record has no ``final``."""

    def number(value: Any) -> float | None:
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    final = record.get("final") if isinstance(record.get("final"), dict) else {}
    planned, max_steps = number(_config_value(record, "trainer", "epochs")), number(_config_value(record, "trainer", "max_steps"))
    epochs, steps, per_epoch = (number(final.get(k)) for k in ("epochs", "steps", "steps_per_epoch"))
    if max_steps and steps and per_epoch and planned and steps < planned * per_epoch:
        return f"{steps:g} steps (trainer.max_steps), {steps / per_epoch:.3g} of {planned:g}"
    if epochs is not None and planned is not None and epochs != planned:
        return f"{epochs:g} of {planned:g}"
    shown = planned if planned is not None else epochs
    return "?" if shown is None else f"{shown:g}"


def recipe(runs: dict[str, list[dict[str, Any]]] | None) -> str | None:
    """What produced a table's accuracies, read from the runs themselves: data, epochs trained
    (:func:`trained_epochs`), batch, optimizer, schedule, precision, seeds and the convlab commit. A value that differs between
    rows is listed with a slash. None for a table without trained runs."""
    records = [r for rs in (runs or {}).values() for r in rs]
    if not records:
        return None

    def joined(texts: Iterable[str]) -> str:
        return "/".join(dict.fromkeys(texts))  # each distinct value once, in order

    def values(*path: str) -> str:
        return joined("?" if (value := _config_value(r, *path)) is None else str(value) for r in records)

    subset, subset_seed = values("data", "subset"), values("data", "subset_seed")
    drawn = "" if subset_seed == "?" else f" drawn with seed {subset_seed}"  # else with each run's seed
    data = values("data", "name") + ("" if subset == "?" else f" (subset {subset}{drawn})") + f" at {values('data', 'image_size')} px"
    seeds = sorted({r.get("seed") for r in records if isinstance(r.get("seed"), int)})
    commits = sorted({_short_commit((r.get("env") or {}).get("git_commit")) for r in records})
    return (
        f"{data}; {joined(map(trained_epochs, records))} epochs, batch {values('trainer', 'batch_size')}, "
        f"{values('optim', 'name')} lr {values('optim', 'lr')} wd {values('optim', 'weight_decay')}, "
        f"{values('sched', 'name')} schedule, {values('trainer', 'precision')}; "
        f"seeds {', '.join(map(str, seeds))}; convlab {', '.join(commits)}"
    )


def markdown_table(rows: Table, table: DictConfig, trained: str | None = None) -> str:
    """The table in Markdown, with the source, what trained its runs (:func:`recipe`) and each row's note as footnotes."""
    cols = _columns(rows, table)
    lines = [
        "| " + " | ".join(name for name, _ in cols) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|",
    ]
    for i in range(len(rows)):
        lines.append("| " + " | ".join(values[i].replace("|", r"\|") for _, values in cols) + " |")
    notes = [f"- {r['setting']}: {r['note']}" for r in rows if r["note"]]
    head = f"**{table.title}** ({table.source})" + (f"\n\nTrained: {trained}." if trained else "")
    delta = "Δ = ours rounded to the paper's printed digits minus the paper's figure; 0 means they agree."
    extra = [delta] if any(r["macs_diff"] is not None for r in rows) else []
    return "\n".join([head, "", *lines, "", *extra, *notes]).rstrip() + "\n"


def csv_table(rows: Table) -> str:
    """Every field of every row, machine-readable (exact MACs and params in millions)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["id"])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _tex(text: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("#", r"\#"),
        ("$", r"\$"),
        ("±", r"$\pm$"),
        ("Δ", r"$\Delta$"),
        ("—", "--"),
    ):
        text = text.replace(a, b)
    return text


def latex_table(rows: Table, table: DictConfig, trained: str | None = None) -> str:
    """A booktabs ``table`` environment ready to paste into a paper; the caption says what trained it."""
    cols = _columns(rows, table)
    spec = "l" + "r" * (len(cols) - 1)
    caption = f"{table.title} ({table.source})" + (f". Trained: {trained}." if trained else "")
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(caption)}}}", rf"\begin{{tabular}}{{{spec}}}",
             r"\toprule", " & ".join(_tex(name) for name, _ in cols) + r" \\", r"\midrule"]  # fmt: skip
    for i in range(len(rows)):
        lines.append(" & ".join(_tex(values[i]) for _, values in cols) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\label{{tab:{table.name}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def format_table(rows: Table, table: DictConfig, failed: list[dict[str, Any]] | None = None, trained: str | None = None) -> str:
    """What reproduce.py prints: the Markdown table, then failed or unfinished runs apart."""
    text = markdown_table(rows, table, trained)
    if failed:
        text += "\nFailed or unfinished runs (not in the table):\n"
        text += "".join(
            f"- row {r.get('row')}: {r.get('status')}: {r.get('reason') or 'no reason recorded'} ({r.get('run_dir')})\n" for r in failed
        )
    return text


def as_json(rows: Table, table: DictConfig, failed: list[dict[str, Any]], trained: str | None = None) -> str:
    body = {"table": table.name, "title": table.title, "source": table.source, "trained": trained, "rows": rows, "failed": failed}
    return json.dumps(body, default=str, allow_nan=False)  # strict JSON: a missing figure is null

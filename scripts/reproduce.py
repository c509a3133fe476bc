"""Reproduce a table: run an experiment's sweep (or only count its cost) and print ours beside the paper's.

    python scripts/reproduce.py table=mobilenet_t6 cost_only=true
    python scripts/reproduce.py table=blocks data=fashion_mnist trainer=quick seeds=3

Writes <out>/<table>.md, .csv and .tex; prints the Markdown table on stdout (format=json: one
JSON object). Training goes through `scripts/run.py -m experiment=<table>` into <out>/runs, so
an interrupted reproduction continues where it stopped and finished rows are not trained again.
"""

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

# The repo root replaces scripts/ on the path: scripts/profile.py must not shadow the stdlib's profile module.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.cli import CONF_DIR, check_writable, entry, fail
from experiments.records import atomic_write
from experiments.tables import (
    as_json,
    build_table,
    collect_runs,
    csv_table,
    format_table,
    latex_table,
    out_dir_name,
    override_key,
    recipe,
    row_costs,
    row_set_warnings,
)
from experiments.train import check_config, config_difference, resolve_device

log = logging.getLogger("convlab")
OWN_KEYS = {"table", "cost_only", "seeds", "out", "format", "latency"}


TABLES = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def _table_overlay(overrides: list[str]) -> list[str]:
    """The table's experiment overlay, so that its model's own keys (model.depthwise=...) are known up front."""
    tables = [o.split("=", 1)[1] for o in overrides if o.startswith("table=")]
    return [f"experiment={tables[-1]}"] if tables and tables[-1] in TABLES else []


def _check_table(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "table"):
        raise ValueError(f"no table given; pass table=NAME, one of: {', '.join(TABLES)}")
    if cfg.table not in TABLES:
        raise ValueError(f"unknown table {cfg.table!r}; choose from: {', '.join(TABLES)}")


def _check(cfg: DictConfig) -> None:
    """Before any row trains: the table, the run settings every row shares, and the output dir."""
    _check_table(cfg)
    check_config(cfg, resolve_device(cfg.device))
    check_writable(str(cfg.out) if cfg.out is not None else "reproduce", "out=...")  # out= (empty) is refused there


def _run_to_the_end(command: list[str]) -> int:
    """Run the sweep; if this process is interrupted, so is the sweep, and it records that before we exit.

    Ctrl-C reaches the sweep too (one process group); SIGTERM (``kill``, a scheduler's limit) reaches
    only this process and is passed on. A sweep left running would go on writing into ``out`` while
    the same command, run again, trains the same rows beside it.
    """
    sweep = subprocess.Popen(command, stdout=sys.stderr)
    try:
        return sweep.wait()
    except KeyboardInterrupt:
        try:
            sweep.wait(timeout=5)  # a Ctrl-C it got itself: let it record the interruption
        except subprocess.TimeoutExpired:
            sweep.terminate()
            sweep.wait()
        raise


def _this_sweep(table: DictConfig, runs: dict, failed: list, compose_row: Any, seeds: range, runs_dir: Path) -> tuple[dict, list]:
    """Only the runs this command's sweep makes: its rows and seeds, with its settings.

    ``out/runs`` keeps every run ever trained into it (another seed count, another ``optim.lr``
    passed with the same ``out=``); pooled, they would make a row's mean and n describe runs this
    command did not ask for. The others are named in one warning and left out.
    """
    rows = {str(r.id): r for r in table.rows}
    kept: dict[str, list] = {}
    left_out: list[str] = []

    def wanted(record: dict) -> bool:
        row = rows.get(str(record.get("row")))
        if row is None or record.get("seed") not in seeds:
            left_out.append(f"row {record.get('row')} seed {record.get('seed')}")
            return False
        expected = compose_row([*row.overrides, f"row={row.id}", f"seed={record['seed']}"])
        difference = config_difference(record.get("config") or {}, OmegaConf.to_container(expected, resolve=True))
        if difference:
            left_out.append(f"row {row.id} seed {record['seed']} ({difference})")
        return difference is None

    for row_id, records in runs.items():
        mine = [r for r in records if wanted(r)]
        if mine:
            kept[row_id] = mine
    failed = [r for r in failed if r.get("row") is None or wanted(r)]
    if left_out:
        log.warning("%d earlier run(s) in %s were made with other rows, seeds or settings and are left out: %s",
                    len(left_out), runs_dir, "; ".join(left_out[:5]) + (" ..." if len(left_out) > 5 else ""))  # fmt: skip
    return kept, failed


@entry(
    "reproduce",
    check=_check,
    extra=_table_overlay,
    interrupted="finished runs are kept under out; the same command goes on from them",
    no_sweep="reproduce.py runs the table's sweep itself; drop -m (seeds=N trains N runs per row)",
)
def main(cfg: DictConfig) -> None:
    _check_table(cfg)
    if cfg.format not in ("text", "json"):
        raise ValueError(f"format={cfg.format!r} is not valid; choose from: text, json")
    if isinstance(cfg.seeds, bool) or not isinstance(cfg.seeds, int) or cfg.seeds < 1:
        raise ValueError(f"seeds={cfg.seeds!r} must be a whole number >= 1")
    overrides = HydraConfig.get().overrides
    for override in overrides.hydra:
        if override_key(override) == "hydra.sweeper.seeds":
            shown = override.lstrip("+")  # the front door may have added a "+" the user did not type
            raise ValueError(f"{shown}: reproduce.py sets the sweeper's seeds from its own key; pass seeds={override.split('=', 1)[1]}")
    # For run.py and the row configs, which know every key of the table's model: a "+key" (added by
    # the front door for keys only the table's model has) is a plain override there.
    passthrough = [o.removeprefix("+") for o in overrides.task if override_key(o) not in OWN_KEYS]
    launcher = [o for o in overrides.hydra if override_key(o).startswith(("hydra/launcher", "hydra.launcher"))]

    def compose_row(extra: list[str]) -> DictConfig:
        return compose("config", overrides=[f"experiment={cfg.table}", *passthrough, *extra])

    table = compose_row([]).table
    for warning in row_set_warnings(table, passthrough):
        log.warning(warning)
    costs = row_costs(table, compose_row, passthrough, latency=cfg.latency and cfg.cost_only)
    unbuilt = [c for c in costs if c["cost"] is None]
    if len(unbuilt) == len(costs):  # nothing to count or train: one line, nothing written
        raise ValueError(f"no row of table {cfg.table} can be built: {unbuilt[0]['error']}")
    out = Path(str(cfg.out)) if cfg.out is not None else Path("reproduce") / cfg.table / out_dir_name(passthrough)
    check_writable(str(out), "out=...")
    out.mkdir(parents=True, exist_ok=True)

    runs, failed, status = None, [], 0
    if not cfg.cost_only:
        # The dir is quoted: its name holds the overrides (data=x,trainer=y), which Hydra would read as a sweep.
        command = [sys.executable, str(Path(__file__).with_name("run.py")), "-m", f"experiment={cfg.table}", f"hydra.sweep.dir='{out / 'runs'}'",
                   f"hydra.sweeper.seeds={cfg.seeds}", *passthrough, *launcher]  # fmt: skip
        log.info("training %d rows x %d seeds: %s", len(table.rows), cfg.seeds, " ".join(command[1:]))
        status = _run_to_the_end(command)  # failures are read back from results.json
        runs, failed = collect_runs(out / "runs")
        runs, failed = _this_sweep(table, runs, failed, compose_row, range(cfg.seed, cfg.seed + cfg.seeds), out / "runs")

    rows, trained = build_table(costs, runs), recipe(runs)
    atomic_write(out / f"{cfg.table}.md", format_table(rows, table, failed, trained).encode())
    atomic_write(out / f"{cfg.table}.csv", csv_table(rows).encode())
    atomic_write(out / f"{cfg.table}.tex", latex_table(rows, table, trained).encode())
    print(as_json(rows, table, failed, trained) if cfg.format == "json" else format_table(rows, table, failed, trained), flush=True)
    log.info("wrote %s/%s.{md,csv,tex}", out, cfg.table)
    if failed:
        fail(f"{len(failed)} run(s) failed or did not finish; they are listed apart and left out of the table", code=1)
    if status:  # a job can fail before it writes a record (beside a completed run of another config)
        fail(f"the training sweep exited with status {status}; its messages above name the jobs that failed", code=1)
    if cfg.cost_only and unbuilt:
        fail(
            f"{len(unbuilt)} row(s) could not be built ({', '.join(str(c['row'].id) for c in unbuilt)}); the table's notes say why", code=1
        )


if __name__ == "__main__":
    main()

"""Reproduced tables: paper figures beside ours, the table sweeper, reuse of finished runs, failed rows apart."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
from omegaconf import OmegaConf

from .conftest import CONF, assert_one_line_error, run_script

PAPER_TABLES = ["mobilenet_t4", "mobilenet_t5", "mobilenet_t6", "mobilenet_t7"]


@pytest.mark.parametrize("table", PAPER_TABLES)
def test_cost_only_tables_agree_with_the_paper(table, tmp_path):
    proc = run_script("reproduce.py", f"table={table}", "cost_only=true", f"out={tmp_path}", "format=json", "latency=false")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = result["rows"]
    spec = OmegaConf.load(CONF / "experiment" / f"{table}.yaml").table
    assert [r["setting"] for r in rows] == [row.label for row in spec.rows]
    for row, want in zip(rows, spec.rows):
        assert row["paper_macs_m"] == want.paper.macs_m and row["paper_params_m"] == want.paper.params_m
        assert row["paper_acc"] == want.paper.accuracy
        assert row["params_diff"] == "0", row
        # every MACs figure agrees to the printed digits, except those whose note explains why not
        assert row["macs_diff"] == "0" or (row["note"] and row["macs_diff"] in ("+1", "+1.0")), row
    # the three files hold every row: the CSV its exact figures, the Markdown one line per setting with the paper's MACs
    with (tmp_path / f"{table}.csv").open(newline="") as f:
        written = list(csv.DictReader(f))
    assert [(w["setting"], float(w["macs_m"]), w["macs_diff"]) for w in written] == [
        (r["setting"], r["macs_m"], r["macs_diff"]) for r in rows
    ]
    md_rows = [line for line in (tmp_path / f"{table}.md").read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(md_rows) == len(rows)
    for line, row in zip(md_rows, rows):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert cells[0] == row["setting"].replace("|", r"\|") and f"{row['paper_macs_m']:g}" in cells, line
    tex = (tmp_path / f"{table}.tex").read_text()
    assert tex.count(r"\\") >= len(rows) + 1  # a header line and one per row
    assert r"\begin{tabular}" in tex and rf"\label{{tab:{table}}}" in tex  # a label is a key, not text: no \_


def test_difference_rounds_half_up_as_papers_do():
    """Half to even on binary floats read 2.5 against a printed 3 as -1, and 0.25 against 0.3 as -0.1."""
    from experiments.tables import _diff

    assert (_diff(2.5, 3), _diff(0.25, 0.3), _diff(149.5, 150), _diff(149.497088, 149)) == ("0", "0", "0", "0")
    assert (_diff(290.6752, 290), _diff(4.15, 4.2), _diff(4.14, 4.2), _diff(1.5, 2.0)) == ("+1", "0", "-0.1", "-0.5")
    assert (_diff(4.231976, "4.20"), _diff(4.2, "4.20")) == ("+0.03", "0")  # a printed trailing zero, kept as a string


def test_cost_only_markdown_on_stdout(tmp_path):
    proc = run_script("reproduce.py", "table=mobilenet_t6", "cost_only=true", f"out={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("**MobileNet width multiplier**")
    row = next(line for line in lines if line.startswith("| 0.25 MobileNet-224"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:9] == ["50.6", "41.0", "41", "0", "0.47", "0.5", "0"]
    assert float(cells[9]) > 0  # measured latency


@pytest.mark.slow
def test_train_rows_with_seeds_then_reuse(tmp_path):
    args = [
        "table=bottleneck",
        "data=synthetic",
        "data.image_size=16",
        "trainer=smoke",
        "logger=none",
        "seeds=2",
        f"out={tmp_path}",
        "format=json",
    ]
    first = run_script("reproduce.py", *args)
    assert first.returncode == 0, first.stderr
    rows, trained = json.loads(first.stdout)["rows"], json.loads(first.stdout)["trained"]
    assert [r["id"] for r in rows] == ["standard", "standard_se", "depthwise", "depthwise_se"]
    # what produced the accuracies, read back from the runs: data, recipe, seeds, commit
    # trainer=smoke: 2 epochs of 16 steps configured, trainer.max_steps=3 ends each run first (it said "2 epochs")
    assert trained.startswith("synthetic at 16 px; 3 steps (trainer.max_steps), 0.188 of 2 epochs, batch 32, sgd lr 0.2"), trained
    assert "; seeds 0, 1; convlab " in trained
    assert f"Trained: {trained}." in (tmp_path / "bottleneck.md").read_text()
    assert all(r["seeds"] == 2 and r["acc"] is not None and r["acc_std"] is not None for r in rows)
    assert rows[2]["macs_m"] < rows[0]["macs_m"]  # depthwise 3x3 costs less
    assert len(list((tmp_path / "runs").glob("*/results.json"))) == 8
    again = run_script("reproduce.py", *args)
    assert again.returncode == 0 and again.stderr.count("not training again") == 8
    assert json.loads(again.stdout)["rows"] == rows
    # The same out= with one seed, then another lr: each table holds only its own runs (the earlier
    # ones were pooled in, n=2 and a mean over two learning rates), and says which it left out.
    one = run_script("reproduce.py", *[a for a in args if a != "seeds=2"], "seeds=1")
    assert one.returncode == 0, one.stderr
    assert all(r["seeds"] == 1 and r["acc_std"] is None for r in json.loads(one.stdout)["rows"])
    assert "4 earlier run(s)" in one.stderr and "row standard seed 1" in one.stderr
    other_lr = run_script("reproduce.py", *[a for a in args if a != "seeds=2"], "seeds=1", "optim.lr=0.05")
    assert other_lr.returncode == 0, other_lr.stderr
    assert all(r["seeds"] == 1 for r in json.loads(other_lr.stdout)["rows"])
    assert "8 earlier run(s)" in other_lr.stderr and "optim.lr: 0.2 there, 0.05 now" in other_lr.stderr
    # Jobs refused before they write a record (their dirs hold runs of another name) fail the table too.
    named = run_script("reproduce.py", *[a for a in args if a != "seeds=2"], "seeds=1", "name=other")
    assert named.returncode == 1 and "the training sweep exited with status 1" in named.stderr, named.stderr


@pytest.mark.slow
def test_failed_row_is_listed_apart(tmp_path):
    # no out=: the default dir, reproduce/blocks/<overrides>, is named by "=" and "," (Hydra's sweep syntax)
    proc = run_script(
        "reproduce.py",
        "table=blocks",
        "data=synthetic",
        "data.image_size=8",
        "trainer=smoke",
        "logger=none",
        "model.widths=[48,96,96]",
        cwd=tmp_path,
    )
    (out,) = (tmp_path / "reproduce" / "blocks").iterdir()
    assert out.name == "data.image_size=8,data=synthetic,model.widths=_48,96,96_,trainer=smoke"  # logger=none changes no result
    assert (out / "blocks.md").is_file() and len(list((out / "runs").glob("*/results.json"))) == 7, proc.stderr

    assert proc.returncode == 1
    assert "Failed or unfinished runs" in proc.stdout and "row depthwise: failed: depthwise block cannot map 32 to 48" in proc.stdout
    table = proc.stdout.split("Failed or unfinished")[0]
    depthwise = next(line for line in table.splitlines() if line.startswith("| depthwise 3x3 only"))
    assert "| — |" in depthwise  # no accuracy for the failed row
    separable = next(line for line in table.splitlines() if line.startswith("| depthwise separable"))
    assert "| — |" not in separable.split("|", 3)[2]


def _timed_record(row: str, acc: float, target: dict | None) -> dict:
    return {"row": row, "status": "completed", "final": {"test_acc": acc, "wall_seconds": 100.0}, "history": [{"img_per_s": 900.0}],
            "cost": {"latency_ms": {}}, "target": target}  # fmt: skip


def test_time_to_target_column_is_the_median_over_seeds_that_reached_it():
    from experiments.tables import build_table, csv_table, markdown_table

    table = OmegaConf.create({"name": "t", "title": "T", "source": "S", "rows": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]})
    costs = [{"row": row, "cost": {"macs": 1e6, "params": 1e4}, "data": "cifar10"} for row in table.rows]

    def hit(seconds: float) -> dict:
        return {"acc": 0.94, "reached": True, "epoch": 3, "train_seconds": seconds}

    miss = {"acc": 0.94, "reached": False, "epoch": None, "train_seconds": None}
    runs = {"a": [_timed_record("a", 0.95, hit(30.0)), _timed_record("a", 0.95, hit(50.0)), _timed_record("a", 0.95, hit(41.0))],
            "b": [_timed_record("b", 0.93, miss), _timed_record("b", 0.945, hit(80.0))]}  # fmt: skip
    rows = build_table(costs, runs)
    assert [(r["target_reached"], r["target_runs"], r["time_to_target_s"]) for r in rows] == [(3, 3, 41.0), (1, 2, 80.0)]
    lines = markdown_table(rows, table).splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[-1] == "time to 94% (s)"
    assert [line.rsplit("|", 2)[1].strip() for line in lines[4:6]] == ["41.0", "80.0 (1/2 reached)"]
    assert "time_to_target_s" in csv_table(rows).splitlines()[0]
    untimed = build_table(costs, {"a": [_timed_record("a", 0.9, None)]})
    assert not any("time to" in line for line in markdown_table(untimed, table).splitlines())


def test_time_to_94_table_composes_a_valid_timed_run(compose_cfg):
    import torch

    from experiments.train import check_config

    cfg = compose_cfg("experiment=cifar10_94")
    check_config(cfg, torch.device("cpu"))
    assert (cfg.trainer.target_acc, cfg.data.name, cfg.trainer.epochs) == (0.94, "cifar10", 40)
    assert [row.id for row in cfg.table.rows] == ["resnet18", "resnet50", "mobilenet_v2"]


def test_overrides_that_rows_set_themselves_are_named_not_ignored_silently(tmp_path):
    from experiments.tables import row_set_warnings

    table = OmegaConf.create(
        {"name": "t", "rows": [{"overrides": ["data.image_size=224", "model.width=1.0"]}, {"overrides": ["+model.shallow=true"]}]}
    )
    assert row_set_warnings(table, ["data.image_size=8", "optim.lr=0.1", "model.shallow=false", "seed=3"]) == [
        "data.image_size=8: rows of table t set data.image_size themselves; in those rows their value is used",
        "model.shallow=false: rows of table t set model.shallow themselves; in those rows their value is used",
    ]
    proc = run_script("reproduce.py", "table=mobilenet_t7", "cost_only=true", "latency=false", "data.image_size=8", f"out={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "data.image_size=8: rows of table mobilenet_t7 set data.image_size themselves" in proc.stderr


def test_cost_only_rows_that_cannot_be_built(tmp_path):
    """Some rows: the table is written with the reasons in its notes, strict JSON (null, not NaN),
    exit 1. Every row: one line, exit 2, nothing written."""
    proc = run_script("reproduce.py", "table=blocks", "cost_only=true", "latency=false", "model.widths=[48,96,128]", f"out={tmp_path}/some",
                      "format=json")  # fmt: skip
    assert proc.returncode == 1 and "1 row(s) could not be built (depthwise)" in proc.stderr
    rows = {r["id"]: r for r in json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))["rows"]}
    assert rows["depthwise"]["macs_m"] is None and "cannot map 32 to 48" in rows["depthwise"]["note"]
    assert rows["standard"]["macs_m"] > 0 and (tmp_path / "some" / "blocks.md").is_file()
    none = run_script("reproduce.py", "table=blocks", "cost_only=true", "latency=false", "data.image_size=2", f"out={tmp_path}/none")
    assert_one_line_error(none, "no row of table blocks can be built", "image_size=2")
    assert not (tmp_path / "none").exists()


def test_out_dir_names(tmp_path):
    from experiments.tables import out_dir_name

    assert out_dir_name(["data=fashion_mnist", "logger=none", "data.root=/elsewhere", "device=cpu"]) == "data=fashion_mnist"
    long = out_dir_name([f"data.root={'a' * 300}", *[f"+model.k{i}={'x' * 20}" for i in range(20)]])
    assert len(long) <= 120 and long.startswith("+model.k0=")
    assert_one_line_error(run_script("reproduce.py", "table=mobilenet_t4", "cost_only=true", "out="), "output dir is empty", "out=")


def test_bad_table_name():
    assert_one_line_error(
        run_script("reproduce.py", "table=mobilenet_t9", "cost_only=true"), "unknown table 'mobilenet_t9'", "mobilenet_t6", "blocks"
    )


def test_multirun_with_a_bad_job_keeps_the_good_jobs(tmp_path):
    """A job that fails while training (lr=1e8 without norms diverges; no check can know before) records
    its failure, and the good job's record stands."""
    proc = run_script("run.py", "-m", "optim.lr=0.05,1e8", "model.norm=none", "data=synthetic", "data.image_size=8", "trainer=smoke",
                      "trainer.max_steps=null", "logger=none", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert proc.returncode == 1
    records = {json.loads(p.read_text())["config"]["optim"]["lr"]: json.loads(p.read_text()) for p in tmp_path.glob("*/results.json")}
    assert records[0.05]["status"] == "completed" and records[0.05]["final"]["test_acc"] is not None
    assert records[1e8]["status"] == "failed" and "non-finite" in records[1e8]["reason"]
    assert "error: job failed" in proc.stderr and "Traceback" not in proc.stderr


def test_multirun_job_failing_before_its_record_still_fails_the_sweep(tmp_path):
    """A job can fail before it writes results.json (here: beside a completed run with another
    config): the sweep still names it and exits 1, rather than 'sweep finished: 1 of 1 completed'."""
    common = ["-m", "model=separable,pointwise", "data=synthetic", "data.image_size=8", "trainer=smoke", "logger=none",
              "hydra.sweep.subdir=job", f"hydra.sweep.dir={tmp_path}"]  # fmt: skip
    proc = run_script("run.py", *common)
    assert proc.returncode == 1, proc.stderr
    assert "holds a completed run with another config" in proc.stderr and "1 sweep job(s) failed" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sweeping_a_key_left_out_of_dir_names_is_refused(tmp_path):
    for sweep in ("device=cpu,auto", "name=a,b"):
        proc = run_script("run.py", "-m", sweep, "data=synthetic", "trainer=smoke", "logger=none", f"hydra.sweep.dir={tmp_path}/s")
        assert_one_line_error(proc, sweep, "every job of this sweep would share one run dir")
    assert not (tmp_path / "s").exists()


def test_a_sweep_job_only_its_combination_breaks_is_found_before_any_job(tmp_path):
    """separable takes widths [48,96,128], depthwise cannot (32 -> 48 channels): the depthwise job used to
    fail after the separable one had trained."""
    proc = run_script("run.py", "-m", "model=separable,depthwise", "model.widths=[48,96,128]", "data=synthetic", "trainer=smoke",
                      "logger=none", f"hydra.sweep.dir={tmp_path}/s")  # fmt: skip
    assert_one_line_error(proc, "sweep job model=depthwise:", "cannot map 32 to 48 channels")
    assert not (tmp_path / "s").exists()


def test_slurm_launcher_without_slurm_is_one_line(tmp_path):
    """submitit raised its own 'Could not detect srun' with a 30-line traceback after making the sweep dir."""
    import shutil

    assert shutil.which("srun") is None  # this test is about a machine without SLURM
    for launcher in ("slurm", "submitit_slurm"):
        proc = run_script("run.py", "-m", f"hydra/launcher={launcher}", "model=standard,separable", "data=synthetic", "trainer=smoke",
                          "logger=none", f"hydra.sweep.dir={tmp_path}/s")  # fmt: skip
        assert_one_line_error(proc, "hydra/launcher=slurm", "no srun on its PATH", "hydra/launcher=basic")
    assert not (tmp_path / "s").exists()


def test_parallel_launcher_jobs_write_only_their_own_dirs(tmp_path):
    proc = run_script("run.py", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "model=separable,pointwise", "data=synthetic",
                      "data.image_size=8", "trainer=smoke", "trainer.num_threads=1", "logger=none", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    dirs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [d.name for d in dirs] == ["data.image_size=8,data=synthetic,model=pointwise,trainer.num_threads=1,trainer=smoke",
                                      "data.image_size=8,data=synthetic,model=separable,trainer.num_threads=1,trainer=smoke"]  # fmt: skip
    for d in dirs:
        record = json.loads((d / "results.json").read_text())
        assert record["status"] == "completed" and record["run_dir"] == str(d.resolve())
        assert {p.name for p in d.iterdir()} <= {".hydra", "results.json", "run.log", "checkpoint-epoch0001.pt"}


def test_table_sweeper_jobs(compose_cfg):
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext
    from hydra.utils import instantiate

    cfg = compose_cfg("experiment=mobilenet_t5", "hydra.sweeper.seeds=3", "seed=5", hydra_cfg=True)
    assert cfg.hydra.sweeper._target_.endswith("TableSweeper")
    assert "TableSweeper" in {c.__name__ for c in Plugins.instance().discover()}
    sweeper = instantiate(cfg.hydra.sweeper)  # as Hydra builds it from the composed config
    assert sweeper.seeds == 3
    sweeper.config, sweeper.hydra_context = cfg, HydraContext(config_loader=None, callbacks=None)
    rows = [("narrow", ["model.width=0.75", "model.shallow=false"]), ("shallow", ["model.width=1.0", "model.shallow=true"])]
    assert [(row.id, list(row.overrides)) for row in cfg.table.rows] == rows
    # one job per row x seed, rows outermost; seeds count up from the config's seed
    jobs = sweeper.job_overrides([])
    assert jobs == [[*overrides, f"row={row}", f"seed={seed}"] for row, overrides in rows for seed in (5, 6, 7)]
    # a command-line sweep multiplies every row; seed=K starts the seeds there, a seed sweep replaces them
    lr_jobs = sweeper.job_overrides(["optim.lr=0.1,0.2"])
    assert lr_jobs == [[f"optim.lr={lr}", *overrides, f"row={row}", f"seed={seed}"]
                       for row, overrides in rows for lr in (0.1, 0.2) for seed in (5, 6, 7)]  # fmt: skip
    assert sweeper.job_overrides(["seed=9"]) == [[*overrides, f"row={row}", f"seed={s}"] for row, overrides in rows for s in (9, 10, 11)]
    assert sweeper.job_overrides(["seed=1,4"]) == [[f"seed={s}", *overrides, f"row={row}"] for row, overrides in rows for s in (1, 4)]
    # a job's overrides compose into that row's run
    job = compose_cfg("experiment=mobilenet_t5", *jobs[-1])
    assert (job.row, job.seed, job.model.width, job.model.shallow) == ("shallow", 7, 1.0, True)


def test_a_sweep_value_is_refused_without_pointing_at_the_refused_m():
    proc = run_script("reproduce.py", "table=blocks", "cost_only=true", "optim.lr=0.1,0.2")
    assert_one_line_error(proc, "optim.lr=0.1,0.2 sweeps over several values, which this script does not take")
    assert "add -m" not in proc.stderr


def test_sweeper_seeds_key_points_at_seeds():
    proc = run_script("reproduce.py", "table=blocks", "cost_only=true", "hydra.sweeper.seeds=3")
    assert_one_line_error(proc, "hydra.sweeper.seeds=3: reproduce.py sets the sweeper's seeds from its own key; pass seeds=3")
    assert "+hydra" not in proc.stderr  # as the user typed it


def test_recipe_names_the_subset_and_its_draw():
    """A table trained on a subset says so, and with which seed it was drawn when data.subset_seed fixed it."""
    from experiments.tables import recipe

    def run(seed: int, **data) -> dict:
        config = {"data": {"name": "cifar10", "image_size": 32, **data}, "trainer": {"epochs": 2, "batch_size": 32}}
        return {"config": config, "seed": seed, "env": {"git_commit": "0123456789abcdef"}}

    assert recipe({"a": [run(0)]}).startswith("cifar10 at 32 px; 2 epochs, batch 32")
    assert recipe({"a": [run(0, subset=500), run(1, subset=500)]}).startswith("cifar10 (subset 500) at 32 px")
    fixed = recipe({"a": [run(0, subset=500, subset_seed=7), run(1, subset=500, subset_seed=7)]})
    assert fixed.startswith("cifar10 (subset 500 drawn with seed 7) at 32 px") and "seeds 0, 1" in fixed


def test_recipe_says_how_long_the_runs_trained():
    """The epochs figure is what each run trained, read from its final record, not the configured count."""
    from experiments.tables import recipe, trained_epochs

    def run(final: dict | None, **trainer) -> dict:
        return {"config": {"data": {"name": "cifar10", "image_size": 32}, "trainer": {"epochs": 40, "batch_size": 32, **trainer}},
                "seed": 0, "final": final}  # fmt: skip

    whole = run({"epochs": 40, "steps": 7800, "steps_per_epoch": 195})
    assert trained_epochs(whole) == "40" and trained_epochs(run(None)) == "40"
    assert trained_epochs(run({"epochs": 12, "steps": 2340, "steps_per_epoch": 195}, stop_at_target=True)) == "12 of 40"
    cut = run({"epochs": 1, "steps": 8, "steps_per_epoch": 16}, max_steps=8)
    assert trained_epochs(cut) == "8 steps (trainer.max_steps), 0.5 of 40"
    assert "; 40/8 steps (trainer.max_steps), 0.5 of 40 epochs, batch 32" in recipe({"a": [whole], "b": [cut]})


def test_accuracy_wall_time_and_latency_are_mean_std_and_medians_over_seeds():
    """Distinct figures per seed, the first seed's neither the median nor the mean: accuracy is the mean in %,
    its spread the sample std; wall time, train img/s and measured latency are medians over the seeds."""
    from experiments.tables import build_table, markdown_table

    table = OmegaConf.create({"name": "t", "title": "T", "source": "S", "rows": [{"id": "a", "label": "A"}]})
    costs = [{"row": table.rows[0], "cost": {"macs": 1e6, "params": 1e4, "latency_ms": {"1": 50.0}, "latency_device": "cpu"},
              "data": "cifar10"}]  # fmt: skip

    def run(acc: float, wall: float, latency: float, img_s: list[float]) -> dict:
        record = _timed_record("a", acc, None)
        record["final"]["wall_seconds"] = wall
        record["history"] = [{"img_per_s": v} for v in img_s]
        record["cost"] = {"latency_ms": {"1": latency}, "latency_device": "cuda"}
        return record

    runs = {"a": [run(0.97, 600.0, 9.0, [1000.0]), run(0.90, 100.0, 1.0, [100.0, 300.0]), run(0.92, 200.0, 2.0, [400.0])]}
    (row,) = build_table(costs, runs)
    percents = [97.0, 90.0, 92.0]
    assert row["seeds"] == 3
    assert row["acc"] == pytest.approx(93.0, abs=1e-9)
    assert row["acc_std"] == pytest.approx(statistics.stdev(percents), rel=1e-9)  # sample std (n - 1), not pstdev
    assert row["acc_std"] != pytest.approx(statistics.pstdev(percents), rel=1e-3)
    assert row["train_s"] == 200.0  # median of 600/100/200
    assert row["train_img_s"] == 400.0  # median over seeds of each run's mean img/s: 1000, 200, 400
    assert (row["latency_ms"], row["latency_device"]) == (2.0, "cuda")  # measured after training: median of 9/1/2
    lines = markdown_table([row], table).splitlines()
    header, cells = ([c.strip() for c in line.strip("|").split("|")] for line in (lines[2], lines[4]))
    shown = dict(zip(header, cells))
    assert shown["acc % (cifar10)"] == "93.00 ± 3.61 (n=3)"
    assert (shown["latency ms (cuda, batch 1)"], shown["wall time (s)"], shown["train img/s"]) == ("2.00", "200", "400")


def test_cost_only_latency_is_each_rows_own_median(monkeypatch, compose_cfg):
    """Every built row gets the median the round-robin timing gave its own model, a row that cannot be
    built in between included (it shifts no index)."""
    from experiments import bench
    from experiments.tables import row_costs

    seen: dict = {}

    def fake_time_interleaved(fns, **kwargs):
        seen["keys"] = list(fns)
        for fn in fns.values():
            fn()  # each is a callable running its row's model
        return {key: {"median_ms": 10.0 + int(key)} for key in fns}

    monkeypatch.setattr(bench, "time_interleaved", fake_time_interleaved)
    table = OmegaConf.create({"name": "t", "rows": [
        {"id": "standard", "overrides": ["model=standard"]},
        {"id": "broken", "overrides": ["model=depthwise", "model.widths=[48,96,128]"]},
        {"id": "separable", "overrides": ["model=separable"]},
        {"id": "pointwise", "overrides": ["model=pointwise"]},
    ]})  # fmt: skip
    out = row_costs(table, lambda overrides: compose_cfg(*overrides), ["data=synthetic", "data.image_size=8"])
    assert seen["keys"] == ["0", "2", "3"]
    assert out[1]["cost"] is None and "cannot map 32 to 48" in out[1]["error"]
    assert [(item["cost"]["latency_ms"], item["cost"]["latency_device"]) for item in (out[0], out[2], out[3])] == [
        ({"1": 10.0}, "cpu"), ({"1": 12.0}, "cpu"), ({"1": 13.0}, "cpu")
    ]  # fmt: skip


def test_a_copied_run_dir_counts_once_in_a_row(tmp_path, caplog):
    """A backup of a run dir beside it is the same run: one seed in the row's n and mean, as on the dashboard."""
    from experiments.tables import collect_runs

    def write(run_dir, seed, acc, where=None):
        record = {"status": "completed", "row": "separable", "seed": seed, "run_dir": str(run_dir), "started_at": f"2026-11-25T10:0{seed}:00",
                  "final": {"test_acc": acc}, "config": {}, "cost": {"macs": 1e6, "params": 1e3}}  # fmt: skip
        (where or run_dir).mkdir(parents=True)
        ((where or run_dir) / "results.json").write_text(json.dumps(record))

    write(tmp_path / "runs" / "b-seed0", 0, 0.90)
    write(tmp_path / "runs" / "b-seed0", 0, 0.90, where=tmp_path / "runs" / "a-backup")  # sorts first, still the copy
    write(tmp_path / "runs" / "b-seed1", 1, 0.80)
    with caplog.at_level("WARNING", logger="convlab"):
        done, other = collect_runs(tmp_path / "runs")
    assert sorted(r["seed"] for r in done["separable"]) == [0, 1] and other == []
    assert (
        f"{tmp_path / 'runs' / 'a-backup' / 'results.json'} is a copy of the run at {tmp_path / 'runs' / 'b-seed0' / 'results.json'}"
        in caplog.text
    )


def test_impossible_or_incomplete_records_are_listed_apart_not_tabled(tmp_path):
    """A percentage where a fraction belongs (75.0) went into the table as 7500.00 %; the dashboard already refused it."""
    from experiments.tables import collect_runs

    base = {"status": "completed", "row": "a", "seed": 0, "config": {}, "cost": {"macs": 1e6, "params": 1e3, "latency_ms": {}}}
    records = {"ok": {**base, "final": {"test_acc": 0.75}}, "percent": {**base, "final": {"test_acc": 75.0}},
               "text": {**base, "final": {"test_acc": "abc"}}, "no-cost": {**base, "cost": None, "final": {"test_acc": 0.7}},
               "list": [1, 2]}  # fmt: skip
    for name, record in records.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(record))
    done, other = collect_runs(tmp_path)
    assert [r["final"]["test_acc"] for r in done["a"]] == [0.75]
    reasons = sorted(r["reason"] for r in other)
    assert [r["status"] for r in other].count("invalid") == 3 and len(other) == 4, reasons
    assert any("final.test_acc=75.0 is impossible; valid: 0 <= test_acc <= 1" in r for r in reasons)
    assert any("final.test_acc='abc' is impossible" in r for r in reasons)
    assert any("cost=None is not a mapping" in r for r in reasons)
    assert any("list" in r and "is not a results record (not JSON, or not a JSON object)" in r for r in reasons)

"""experiments/report.py and scripts/report.py: the dashboard, figures and tables from results.json files."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from experiments.report import build_report, format_summary, load_local_runs, load_wandb_runs, pareto_front, split_runs

from .conftest import assert_one_line_error, run_script

HOSTILE = "<script>alert(1)</script>"
HOSTILE_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
# name, model, MACs (M), params (M), test acc, latency (ms), subdir (a sweep job or a single run)
COMPLETED = [
    ("standard-cifar10", "standard", 40.0, 0.60, 0.920, 3.1, "outputs/standard-cifar10/2026-11-24_12-00-00"),
    ("separable-cifar10", "separable", 21.3, 0.14, 0.910, 1.9, "multirun/2026-11-24/model=separable,seed=0"),
    ("separable-cifar10-s1", "separable", 21.3, 0.14, 0.905, 2.0, "multirun/2026-11-24/model=separable,seed=1"),
    ("depthwise-cifar10", "depthwise", 5.0, 0.05, 0.800, 1.2, "multirun/2026-11-24/model=depthwise,seed=0"),
    ("pointwise-cifar10", "pointwise", 15.0, 0.09, 0.780, 1.5, "multirun/2026-11-24/model=pointwise,seed=0"),
    (HOSTILE, "separable", 30.0, 0.20, 0.850, 2.5, "outputs/hostile/2026-11-24_13-00-00"),
]
FAILED_REASON = "loss is nan at epoch 3 (lr 0.4 too high?)"


def _record(name: str, model: str, macs_m: float, params_m: float, acc: float, latency: float, seed: int = 0) -> dict:
    history = [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "train_acc": acc * e / 4,
            "val_acc": None,
            "test_acc": acc * (0.7 + 0.1 * e),
            "lr": 0.1,
            "seconds": 30.0,
        }
        for e in (1, 2, 3)
    ]
    return {
        "schema": 1,
        "status": "completed",
        "reason": None,
        "name": name,
        "model": model,
        "data": "cifar10",
        "experiment": "blocks",
        "row": model,
        "seed": seed,
        "started_at": "2026-11-24T12:00:00+00:00",
        "config": {"name": name},
        "cost": {"params": int(params_m * 1e6), "macs": int(macs_m * 1e6), "latency_ms": {"1": latency}, "latency_device": "cpu"},
        "history": history,
        "final": {"test_acc": acc, "train_loss": 0.3, "wall_seconds": 95.0, "best_epoch": 3, "best_by": "test", "epochs": 3},
    }


def write_runs(root: Path) -> Path:
    """A runs tree: six completed runs (one with a hostile name), one failed, one running, one corrupt file."""
    for name, model, macs, params, acc, latency, sub in COMPLETED:
        path = root / sub / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(_record(name, model, macs, params, acc, latency, seed=int(sub.endswith("seed=1")))))
    failed = {**_record("diverged-run", "standard", 40.0, 0.6, 0.1, 3.0), "status": "failed", "reason": FAILED_REASON, "final": None}
    running = {**_record("still-going", "separable", 21.3, 0.14, 0.5, 1.9), "status": "running", "final": None}
    for sub, record in (("outputs/diverged/1", failed), ("outputs/running/1", running)):
        (root / sub).mkdir(parents=True)
        (root / sub / "results.json").write_text(json.dumps(record))
    (root / "multirun/2026-11-24/model=broken").mkdir(parents=True)
    (root / "multirun/2026-11-24/model=broken/results.json").write_text('{"schema": 1, "status": "compl')
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """(runs root, out dir, summary) of one build_report call shared by the checks below."""
    root = write_runs(tmp_path_factory.mktemp("runs"))
    out = tmp_path_factory.mktemp("report") / "out"
    return root, out, build_report([str(root)], out=out)


def test_pareto_front_hand_made():
    costs = [5.0, 15.0, 21.3, 21.3, 30.0, 40.0, 50.0]
    accs = [0.80, 0.78, 0.91, 0.905, 0.85, 0.92, 0.92]
    # 15 is beaten by 5 (cheaper, better); 21.3/0.905 by its twin; 30 by 21.3; 50 ties 40 on accuracy at a higher cost.
    assert pareto_front(costs, accs) == [0, 2, 5]
    assert pareto_front([3.0, 1.0, 2.0], [0.9, 0.5, 0.7]) == [1, 2, 0]  # all on the front, returned by cost
    assert pareto_front([1.0, 1.0], [0.5, 0.5]) == [0, 1]  # exact duplicates dominate neither
    assert pareto_front([], []) == []
    with pytest.raises(ValueError, match="as many costs"):
        pareto_front([1.0], [])


def test_load_and_split_keeps_failed_and_unfinished_apart(tmp_path):
    records = load_local_runs([write_runs(tmp_path)])
    assert len(records) == 9
    completed, failed, unfinished = split_runs(records)
    assert sorted(r.name for r in completed) == sorted(c[0] for c in COMPLETED)
    assert [r.test_acc for r in completed] == sorted((r.test_acc for r in completed), reverse=True)  # best first
    assert [(r.name, r.reason) for r in failed] == [("diverged-run", FAILED_REASON)]
    assert sorted(r.status for r in unfinished) == ["running", "unreadable"]
    broken = next(r for r in unfinished if r.status == "unreadable")
    assert "unreadable results.json" in broken.reason and broken.path.endswith("model=broken/results.json")
    separable = next(r for r in completed if r.name == "separable-cifar10")
    assert (separable.macs, separable.params, separable.latency_ms, separable.epochs) == (21.3e6, 140000, 1.9, 3)


def test_html_lists_every_run_and_the_problems_apart(report):
    _, out, summary = report
    assert (summary["runs"], summary["completed"], summary["failed"], summary["unfinished"], summary["invalid"]) == (9, 6, 1, 1, 1)
    page = (out / "index.html").read_text()
    for name, *_ in COMPLETED:
        assert (HOSTILE_ESCAPED if name == HOSTILE else name) in page
    runs_table = page.split('id="runs"')[1].split("</table>")[0]
    problems = page.split('id="problems"')[1].split("</table>")[0]
    assert "diverged-run" in problems and "still-going" in problems and "model=broken" in problems
    assert "loss is nan at epoch 3 (lr 0.4 too high?)" in problems and "unreadable results.json" in problems
    assert "diverged-run" not in runs_table and "still-going" not in runs_table
    assert runs_table.count("<tr data-i=") == 6
    # one point per completed run in each of the three scatters, and a curve per run in each of the two curve charts
    assert page.count('<circle class="pt') == 3 * 6 and page.count('<g class="curve"') == 2 * 6
    # the table's numbers: accuracy in %, MACs in M with 1 decimal, params in M with 2
    assert ">91.00<" in runs_table and ">21.3<" in runs_table and ">0.14<" in runs_table and ">1m 35s<" in runs_table


def test_html_marks_the_pareto_front(report):
    page = (report[1] / "index.html").read_text()
    macs_chart = page.split("<figcaption>Test accuracy on cifar10 vs MACs</figcaption>")[1].split("</svg>")[0]
    front_titles = re.findall(r'<circle class="pt front-pt"[^>]*><title>([^<\n]*)', macs_chart)
    assert sorted(front_titles) == ["depthwise-cifar10", "separable-cifar10", "standard-cifar10"]
    assert '<polyline class="front"' in macs_chart


def test_each_dataset_gets_its_own_plots_and_front(tmp_path):
    """A Pareto front across test sets compares the incomparable: a 91% CIFAR-10 run would 'dominate'
    every Fashion-MNIST run below 91%. Each dataset is plotted apart, with its own front."""
    runs = tmp_path / "runs"
    cases = [("sep-c10", "separable", 21.3, "cifar10", 0.91), ("std-c10", "standard", 40.0, "cifar10", 0.92),
             ("sep-fm", "separable", 21.3, "fashion_mnist", 0.89), ("dw-fm", "depthwise", 5.0, "fashion_mnist", 0.85)]  # fmt: skip
    for name, model, macs, data, acc in cases:
        (runs / name).mkdir(parents=True)
        (runs / name / "results.json").write_text(json.dumps({**_record(name, model, macs, 0.1, acc, 1.0), "data": data}))
    out = tmp_path / "out"
    (out).mkdir()
    (out / "acc_vs_macs.png").write_bytes(b"stale")  # from an earlier single-dataset report into the same dir
    summary = build_report([str(runs)], out=out)
    pngs = sorted(p.name for p in out.glob("acc_vs_*.png"))
    assert pngs == sorted(f"acc_vs_{k}_{d}.png" for k in ("macs", "params", "latency") for d in ("cifar10", "fashion_mnist"))
    assert all(str(out / name) in summary["files"] for name in pngs)
    page = (out / "index.html").read_text()
    assert "Runs on 2 datasets (cifar10, fashion_mnist): each has its own plots and Pareto front" in page
    for data, expected in (("cifar10", ["sep-c10", "std-c10"]), ("fashion_mnist", ["dw-fm", "sep-fm"])):
        chart = page.split(f"<figcaption>Test accuracy on {data} vs MACs</figcaption>")[1].split("</svg>")[0]
        assert chart.count('<circle class="pt') == 2
        assert sorted(re.findall(r'<circle class="pt front-pt"[^>]*><title>([^<\n]*)', chart)) == expected
    # names a file system cannot take are made safe, and two that would become one stay apart
    for name, data in (("a", "cifar 10"), ("b", "cifar/10")):
        (runs / name).mkdir()
        (runs / name / "results.json").write_text(json.dumps({**_record(name, "separable", 21.3, 0.1, 0.9, 1.0), "data": data}))
    summary = build_report([str(runs)], out=out)
    macs = sorted(p.name for p in out.glob("acc_vs_macs_cifar-10-*.png"))
    assert len(macs) == 2 and len(set(summary["files"])) == len(summary["files"])


def test_a_copied_run_is_counted_once(tmp_path):
    record = {**_record("sep", "separable", 21.3, 0.14, 0.91, 1.9), "run_dir": "/runs/sep/2026-11-24_12-00-00"}
    for copy in ("a", "b"):  # the same run in a sweep folder and in a backup of it
        (tmp_path / copy).mkdir()
        (tmp_path / copy / "results.json").write_text(json.dumps(record))
    (tmp_path / "c").mkdir()  # the same config run again later: a second run, not a copy
    (tmp_path / "c" / "results.json").write_text(json.dumps({**record, "started_at": "2026-11-25T08:00:00+00:00"}))
    completed, _, unfinished = split_runs(load_local_runs([tmp_path]))
    assert sorted(r.path for r in completed) == [str(tmp_path / d / "results.json") for d in ("a", "c")]
    (copy,) = unfinished
    assert copy.status == "duplicate" and copy.reason == f"a copy of the run at {tmp_path / 'a' / 'results.json'}"
    summary = build_report([str(tmp_path)], out=tmp_path / "out")
    assert (summary["completed"], summary["unfinished"], summary["duplicates"]) == (2, 0, 1)  # a copy is not "unfinished"
    assert summary["invalid"] == 0  # nor "invalid": each run is counted in one kind
    kinds = ("completed", "failed", "unfinished", "invalid", "duplicates", "continued")
    assert sum(summary[k] for k in kinds) == summary["runs"] == 3
    assert "1 copies of runs already counted" in format_summary(summary)


def test_a_run_finished_in_another_dir_is_not_a_failure(tmp_path):
    """resume=PATH finishes a stopped run in a new dir: the stopped part was counted as a failed run."""
    stopped = {**_record("sep", "separable", 21.3, 0.14, 0.91, 1.9), "run_dir": "/runs/a", "status": "failed",
               "reason": "interrupted (SIGTERM)", "final": None}  # fmt: skip
    finished = {**_record("sep", "separable", 21.3, 0.14, 0.91, 1.9), "run_dir": "/runs/b",
                "resumed_from": "/runs/a/checkpoint-epoch0002.pt"}  # fmt: skip
    other = {**stopped, "run_dir": "/runs/c"}  # stopped and never continued: a failure
    for name, record in (("a", stopped), ("b", finished), ("c", other)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(record))
    completed, failed, unfinished = split_runs(load_local_runs([tmp_path]))
    assert [r.path for r in completed] == [str(tmp_path / "b" / "results.json")]
    assert [r.path for r in failed] == [str(tmp_path / "c" / "results.json")]
    (part,) = unfinished
    assert part.status == "continued" and part.reason == "interrupted (SIGTERM); continued and finished in /runs/b"
    summary = build_report([str(tmp_path)], out=tmp_path / "out")
    assert (summary["completed"], summary["failed"], summary["invalid"], summary["continued"]) == (1, 1, 0, 1)
    assert "1 stopped runs finished in another dir" in format_summary(summary)


def test_the_run_in_its_own_run_dir_is_the_original(tmp_path):
    """A backup that sorts first is still the copy: the original is the file in the recorded run_dir."""
    home = tmp_path / "z-runs" / "sep"
    home.mkdir(parents=True)
    record = {**_record("sep", "separable", 21.3, 0.14, 0.91, 1.9), "run_dir": str(home)}
    (home / "results.json").write_text(json.dumps(record))
    (tmp_path / "a-backup").mkdir()
    (tmp_path / "a-backup" / "results.json").write_text(json.dumps(record))
    completed, _, (copy,) = split_runs(load_local_runs([tmp_path]))
    assert [r.path for r in completed] == [str(home / "results.json")] and copy.path.startswith(str(tmp_path / "a-backup"))


def test_html_is_self_contained(report):
    page = (report[1] / "index.html").read_text()
    assert not re.search(r"\b(src|href)\s*=", page), "the page must load nothing"
    assert "url(" not in page and "@import" not in page and "<link" not in page
    assert page.count("<svg") == 5 and page.count("<script") == 2  # the data block and the sorting script


def test_hostile_strings_are_escaped(tmp_path):
    root = write_runs(tmp_path / "runs")
    evil = {**_record("ok-run", "x", 1.0, 0.1, 0.5, 1.0), "model": '"><img src=x onerror=alert(2)>', "experiment": "</script><b>"}
    (root / "evil").mkdir()
    (root / "evil/results.json").write_text(json.dumps(evil))
    failed = {**_record("f", "m", 1.0, 0.1, 0.5, 1.0), "status": "failed", "reason": HOSTILE, "final": None}
    (root / "evil-failed").mkdir()
    (root / "evil-failed/results.json").write_text(json.dumps(failed))
    build_report([root], out=tmp_path / "out")
    page = (tmp_path / "out/index.html").read_text()
    assert HOSTILE not in page and "<img" not in page and "</script><b>" not in page
    assert HOSTILE_ESCAPED in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    data = page.split('<script type="application/json" id="runs-data">')[1].split("</script>")[0]
    assert "<" not in data and ">" not in data
    names = {r["name"] for r in json.loads(data)}
    assert HOSTILE in names and "ok-run" in names  # the \u003c escapes decode back to the literal name


def test_tables_and_figures(report):
    _, out, summary = report
    with (out / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["name"] for r in rows} == {c[0] for c in COMPLETED}
    standard = next(r for r in rows if r["name"] == "standard-cifar10")
    assert (standard["test_acc_pct"], standard["macs_m"], standard["params_m"], standard["macs"]) == ("92.00", "40.0", "0.60", "40000000")
    lines = (out / "runs.md").read_text().splitlines()
    assert lines[0].startswith("| Name | Model |") and set(lines[1]) <= set("|-:")
    assert "Time to target" not in lines[0]  # no run timed a target
    assert len(lines) == 2 + 6
    assert any("\\<script\\>alert(1)\\</script\\>" in line for line in lines)  # literal text in a Markdown renderer
    for stem in ("acc_vs_macs", "acc_vs_params", "acc_vs_latency"):
        path = out / f"{stem}.png"
        assert str(path) in summary["files"] and path.stat().st_size > 10_000
        image = Image.open(path).convert("RGB")
        assert image.size[0] > 500 and len(image.getcolors(maxcolors=1 << 20)) > 50  # drawn, not blank


def test_time_to_target_column_when_runs_timed_one(tmp_path):
    reached = {
        **_record("fast", "separable", 7.1, 0.04, 0.945, 1.2),
        "target": {"acc": 0.94, "reached": True, "epoch": 17, "test_acc": 0.9412, "train_seconds": 83.4, "seconds_with_eval": 90.0},
    }
    missed = {
        **_record("slow", "standard", 48.1, 0.3, 0.93, 1.2),
        "target": {"acc": 0.94, "reached": False, "epoch": None, "test_acc": None, "train_seconds": None, "seconds_with_eval": None},
    }
    untimed = _record("plain", "depthwise", 1.9, 0.01, 0.6, 0.9)
    for record in (reached, missed, untimed):
        (tmp_path / "runs" / record["name"]).mkdir(parents=True)
        (tmp_path / "runs" / record["name"] / "results.json").write_text(json.dumps(record))
    build_report([str(tmp_path / "runs")], out=tmp_path / "out")
    lines = (tmp_path / "out/runs.md").read_text().splitlines()
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    column = table[0].index("Time to target")
    cells = {row[0]: row[column] for row in table[2:]}
    assert cells == {"fast": "94%: 1m 23s (epoch 17)", "slow": "94%: not reached", "plain": ""}
    with (tmp_path / "out/runs.csv").open() as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert (rows["fast"]["target_acc_pct"], rows["fast"]["target_epoch"], rows["fast"]["time_to_target_s"]) == ("94.00", "17", "83.4")
    assert (rows["slow"]["target_acc_pct"], rows["slow"]["target_epoch"], rows["slow"]["time_to_target_s"]) == ("94.00", "", "")
    assert "94%: 1m 23s (epoch 17)" in (tmp_path / "out/index.html").read_text()


def _sweep_run(model: str, seed: int, acc: float, lr: float = 0.2, max_steps: int | None = None, **trainer) -> dict:
    """A Fashion-MNIST subset run with a full config, as run.py writes one: 8 steps per epoch, 1 epoch.

    Each seed runs on another device, name and logger: keys that change no result, so they must not split a setting.
    """
    config = {
        "model": {"name": model, "width": 1.0, "dropout": 0.0},
        "data": {"name": "fashion_mnist", "root": f"/data{seed}", "image_size": 28, "subset": 512, "subset_seed": None},
        "trainer": {"epochs": 1, "batch_size": 64, "max_steps": max_steps, "precision": "bf16", "label_smoothing": 0.0, **trainer},
        "optim": {"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 5e-4},
        "sched": {"name": "cosine", "warmup_epochs": 1.0},
        "logger": {"name": "none" if seed else "wandb", "mode": "offline"},
        "seed": seed, "name": f"{model}-seed{seed}", "device": "cpu" if seed else "auto", "resume": "auto", "row": None,
    }  # fmt: skip
    macs = 36.4 if model == "standard" else 4.9
    record = {**_record(f"{model}-lr{lr}-s{seed}", model, macs, 0.1, acc, 1.0, seed=seed), "data": "fashion_mnist", "config": config}
    steps = min(8, max_steps or 8)
    record["final"] = {**record["final"], "epochs": 1, "steps": steps, "steps_per_epoch": 8, "images_seen": 64 * steps}
    record["env"] = {"git_commit": "0123456789abcdef"}
    return record


def _report_of(tmp_path: Path, records: list[dict]) -> tuple[dict, Path]:
    for i, record in enumerate(records):
        (tmp_path / "runs" / str(i)).mkdir(parents=True)
        (tmp_path / "runs" / str(i) / "results.json").write_text(json.dumps(record))
    return build_report([str(tmp_path / "runs")], out=tmp_path / "out"), tmp_path / "out"


def test_groups_give_mean_and_sample_sd_over_seeds(tmp_path):
    """Two seeds of two models: one row per model, the mean and the n - 1 standard deviation of its two runs."""
    records = [
        _sweep_run("standard", 0, 0.90),
        _sweep_run("standard", 1, 0.93),
        _sweep_run("separable", 0, 0.88),
        _sweep_run("separable", 1, 0.89),
    ]
    summary, out = _report_of(tmp_path, records)
    groups = {g["model"]: g for g in summary["groups"]}
    assert [g["model"] for g in summary["groups"]] == ["standard", "separable"]  # best mean first
    # by hand: mean (0.90 + 0.93) / 2; sample SD sqrt(((0.90 - 0.915)^2 + (0.93 - 0.915)^2) / (2 - 1)) = 0.03 / sqrt(2)
    standard, separable = groups["standard"], groups["separable"]
    assert (standard["n"], standard["seeds"], standard["macs"]) == (2, [0, 1], 36.4e6)
    assert standard["test_acc"] == pytest.approx(0.915) and standard["test_acc_sd"] == pytest.approx(0.0212132, abs=1e-7)
    assert separable["test_acc"] == pytest.approx(0.885) and separable["test_acc_sd"] == pytest.approx(0.0070711, abs=1e-7)
    for g in (standard, separable):
        assert g["settings"].startswith(
            "fashion_mnist (subset 512) at 28 px; 1 epochs, batch 64, sgd lr 0.2 wd 0.0005, cosine schedule, bf16"
        )
        assert "seeds 0, 1" in g["settings"] and "device" not in g["settings"] and "logger" not in g["settings"]
    lines = (out / "groups.md").read_text().splitlines()
    assert lines[0] == "| Model | Data | n | Test acc (%) | MACs (M) | Params (M) | Settings |"
    cells = [[c.strip() for c in line.strip("|").split("|")][:6] for line in lines[2:4]]
    assert cells == [
        ["standard", "fashion_mnist", "2", "91.50 ± 2.12", "36.4", "0.10"],
        ["separable", "fashion_mnist", "2", "88.50 ± 0.71", "4.9", "0.10"],
    ]
    with (out / "groups.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["n"], r["test_acc_mean_pct"], r["test_acc_sd_pct"], r["seeds"]) for r in rows] == [
        ("standard", "2", "91.50", "2.12", "0 1"),
        ("separable", "2", "88.50", "0.71", "0 1"),
    ]
    assert str(out / "groups.md") in summary["files"] and len((out / "runs.md").read_text().splitlines()) == 2 + 4  # runs.md as before
    page = (out / "index.html").read_text()
    assert page.index("<h2>By setting</h2>") < page.index('id="groups"') < page.index("<h2>Completed runs</h2>")
    assert page.split('id="groups"')[1].split("</table>")[0].count("<tr>") == 1 + 2 and ">91.50 ± 2.12<" in page


def test_runs_differing_in_a_setting_are_separate_groups(tmp_path):
    """Another lr, or another value of a key the settings text does not name, is another row, and its text says so."""
    records = [_sweep_run("separable", 0, 0.88), _sweep_run("separable", 1, 0.89), _sweep_run("separable", 0, 0.80, lr=0.05),
               _sweep_run("separable", 0, 0.85, label_smoothing=0.1)]  # fmt: skip
    summary, out = _report_of(tmp_path, records)
    groups = sorted(summary["groups"], key=lambda g: g["test_acc"])
    assert [g["n"] for g in groups] == [1, 1, 2]
    low_lr, smoothed, base = groups
    assert " lr 0.05 " in low_lr["settings"] and " lr 0.2 " in base["settings"] and " lr 0.2 " in smoothed["settings"]
    assert smoothed["settings"].endswith("; trainer.label_smoothing=0.1") and base["settings"].endswith("; trainer.label_smoothing=0.0")
    # one run: no spread, in the JSON, the CSV and the Markdown
    assert (low_lr["test_acc"], low_lr["test_acc_sd"]) == (0.80, None)
    with (out / "groups.csv").open() as f:
        rows = {r["test_acc_mean_pct"]: r for r in csv.DictReader(f)}
    assert rows["80.00"]["test_acc_sd_pct"] == "" and rows["88.50"]["test_acc_sd_pct"] == "0.71"
    line = next(line for line in (out / "groups.md").read_text().splitlines() if "lr 0.05" in line)
    assert "| 80.00 |" in line and "±" not in line


def test_settings_say_when_max_steps_cut_the_run(tmp_path):
    """A run that trainer.max_steps ended after 4 of its 8 steps says it trained half an epoch, not "1 epochs"."""
    summary, out = _report_of(tmp_path, [_sweep_run("separable", 0, 0.5, max_steps=4), _sweep_run("separable", 0, 0.88, max_steps=100)])
    cut, whole = sorted(summary["groups"], key=lambda g: g["test_acc"])
    assert "; 4 steps (trainer.max_steps), 0.5 of 1 epochs, batch 64," in cut["settings"]
    assert "; 1 epochs, batch 64," in whole["settings"] and "steps (trainer.max_steps)" not in whole["settings"]
    assert cut["settings"].endswith("; trainer.max_steps=4") and whole["settings"].endswith("; trainer.max_steps=100")
    assert "4 steps (trainer.max_steps), 0.5 of 1 epochs" in (out / "groups.md").read_text()


class _FakeRun(SimpleNamespace):
    def history(self, pandas: bool = True) -> list[dict]:
        assert pandas is False
        return self.rows


class _FakeApi:
    def __init__(self, runs: list[_FakeRun]) -> None:
        self._runs, self.paths = runs, []

    def runs(self, path: str) -> list[_FakeRun]:
        self.paths.append(path)
        return self._runs


def _fake_api() -> _FakeApi:
    config = {
        "name": "separable-cifar10",
        "model": {"name": "separable"},
        "data": {"name": "cifar10"},
        "seed": 2,
        "table": {"name": "blocks"},
        "row": "sep",
    }
    done = _FakeRun(
        name="separable-cifar10-s2",
        id="abc",
        state="finished",
        url="https://wandb.ai/team/convlab/runs/abc",
        config=config,
        summary={
            "test/acc": 0.9,
            "cost/macs": 21_300_000,
            "cost/params": 140_000,
            "cost/latency_ms_b1": 1.9,
            "final/wall_seconds": 60.0,
            "target/acc": 0.85,
            "target/reached": True,
            "target/epoch": 2,
            "target/train_seconds": 41.5,
        },
        rows=[
            {"epoch": 1, "test/acc": 0.8, "train/loss": 1.0},
            {"_step": 5, "train/loss_step": 0.9},
            {"epoch": 2, "test/acc": 0.9, "train/loss": 0.5},
        ],
    )
    crashed = _FakeRun(name="depthwise-s0", id="def", state="crashed", url=None, config={"model.name": "depthwise"}, summary={}, rows=[])
    return _FakeApi([done, crashed])


def test_wandb_source_with_a_fake_api(tmp_path):
    api = _fake_api()
    records = load_wandb_runs("convlab", entity="team", api=api)
    assert api.paths == ["team/convlab"]
    done, crashed = records
    assert (done["name"], done["model"], done["data"], done["seed"], done["experiment"], done["row"]) == (
        "separable-cifar10",
        "separable",
        "cifar10",
        2,
        "blocks",
        "sep",
    )
    assert done["status"] == "completed" and done["final"]["test_acc"] == 0.9 and done["final"]["epochs"] == 2
    assert done["cost"] == {"macs": 21_300_000, "params": 140_000, "latency_ms": {"1": 1.9}}
    assert [h["epoch"] for h in done["history"]] == [1, 2] and done["history"][1]["train_loss"] == 0.5
    assert done["target"] == {"acc": 0.85, "reached": True, "epoch": 2, "train_seconds": 41.5} and crashed["target"] is None
    assert (crashed["status"], crashed["model"], crashed["reason"]) == ("failed", "depthwise", "W&B run state: crashed")
    summary = build_report(None, out=tmp_path / "out", source="wandb", project="convlab", entity="team", api=_fake_api())
    assert (summary["completed"], summary["failed"], summary["sources"]) == (1, 1, ["wandb:team/convlab"])
    page = (tmp_path / "out/index.html").read_text()
    assert "separable-cifar10" in page and "W&amp;B run state: crashed" in page


def test_wandb_errors_are_one_line_value_errors():
    class Down:
        def runs(self, path: str):
            raise ConnectionError(f"cannot reach api.wandb.ai for {path}\nretrying")

    with pytest.raises(ValueError, match=r"cannot read W&B project 'convlab': cannot reach api.wandb.ai for convlab retrying$"):
        load_wandb_runs("convlab", api=Down())
    with pytest.raises(ValueError, match="has no runs"):
        load_wandb_runs("empty", api=_FakeApi([]))
    with pytest.raises(ValueError, match="needs project=NAME"):
        load_wandb_runs(None, api=_FakeApi([]))


def test_cli_end_to_end(tmp_path):
    root = write_runs(tmp_path / "runs")
    out = tmp_path / "out"
    proc = run_script("report.py", f"runs={root}", f"out={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (
        "9 runs" in proc.stdout
        and "6 completed, 1 failed, 1 unfinished, 1 unreadable or invalid" in proc.stdout
        and FAILED_REASON in proc.stdout
    )
    assert str(out / "index.html") in proc.stdout and (out / "index.html").is_file()
    # a list of dirs, and one JSON object on stdout
    proc = run_script("report.py", f"runs=[{root}/outputs,{root}/multirun]", f"out={out}", "format=json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["runs"], summary["completed"], summary["failed"], summary["unfinished"], summary["invalid"]) == (9, 6, 1, 1, 1)
    assert sorted(g["n"] for g in summary["groups"]) == [1, 1, 1, 1, 2]  # the two seeds of separable-cifar10 are one setting
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "runs"]  # nothing but out/ written


def test_cli_wandb_without_a_key_fails_in_one_line_without_asking(tmp_path):
    """wandb.Api() with no key asks on a terminal to create an account: nothing may prompt, so it is never built."""
    env = {"WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc"), "WANDB_CONFIG_DIR": str(tmp_path), "WANDB_DIR": str(tmp_path)}
    proc = run_script("report.py", "source=wandb", "project=convlab-offline", f"out={tmp_path / 'out'}", env=env, timeout=60)
    assert_one_line_error(proc, "source=wandb needs a W&B API key to read 'convlab-offline'", "wandb login", "WANDB_API_KEY")


def test_wandb_source_builds_no_api_without_a_key(monkeypatch):
    import sys

    from experiments.report import load_wandb_runs

    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("NETRC", "/nonexistent/netrc")
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would raise: the check comes first
    with pytest.raises(ValueError, match="needs a W&B API key to read 'team/p'"):
        load_wandb_runs("p", "team")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["runs={tmp}/missing"], ["runs dir", "missing", "does not exist"]),
        (["runs=[{tmp}/empty,{tmp}/empty2]"], ["no results.json found under", "empty", "empty2"]),
        (["runs={tmp}/runs", "source=s3"], ["source='s3'", "local, wandb"]),
        (["runs={tmp}/runs", "format=xml"], ["format='xml'", "text, json"]),
        (["runs={tmp}/model=a,seed=0"], ["cannot parse the command line", "quote a value that holds '=' or ','"]),  # a sweep job's dir
        (["runs={tmp}/runs", "out={tmp}/blocker/out"], ["out dir", "blocker", "not writable"]),
        (["runs={tmp}/runs", "out="], ["out='' is empty", "out=DIR"]),  # not the current directory
        (["runs={tmp}/runs", "out=null"], ["out=null is not a dir; pass out=DIR"]),  # not a dir named "None"
        (["source=wandb"], ["source=wandb needs project=NAME"]),
        ([], ["no runs dirs given"]),
    ],
)
def test_bad_input_one_line(tmp_path, args, needles):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty2").mkdir()
    (tmp_path / "blocker").write_text("a file, not a dir")
    write_runs(tmp_path / "runs")
    args = [a.format(tmp=tmp_path) for a in args]
    assert_one_line_error(run_script("report.py", *args, cwd=tmp_path), *[n.format(tmp=tmp_path) for n in needles])
    assert not list(tmp_path.glob("index.html")) and not list(tmp_path.glob("*.csv"))


def test_dirs_named_by_numbers(tmp_path):
    """runs=0 out=123: Hydra reads both as ints; they are still dir names (runs=0 said "no runs dirs given")."""
    write_runs(tmp_path / "0")
    proc = run_script("report.py", "runs=0", "out=123", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "123" / "index.html").exists()

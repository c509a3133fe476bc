"""Bad input costs one line naming the bad value and what is valid: models, profile, benchmark options, the dashboard.

Each check here failed before its fix: a value silently clamped or rounded, a traceback, a run
that did the wrong thing with exit status 0, or a whole report lost to one corrupt file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments import bench
from experiments.bench import BenchOptions, options_from_config, run_benchmarks
from experiments.cli import UsageError, check_writable
from experiments.report import build_report, to_row
from models import build_model
from models.networks import ResNet

from .conftest import ROOT, assert_one_line_error, run_script

# ---------------------------------------------------------------------------------------------
# 1. models/networks.py: stem_width, widths, depths (and strides) are whole numbers >= 1


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"stem_width": 0}, "stem_width=0 out of range; valid: a whole number >= 1"),
        ({"stem_width": -3}, "stem_width=-3 out of range"),
        ({"stem_width": "abc"}, "stem_width='abc' is not a whole number; valid: a whole number >= 1"),
        ({"stem_width": 1.5}, "stem_width=1.5 is not a whole number"),
        ({"stem_width": True}, "stem_width=True is not a whole number"),
        ({"widths": [32, 0, 128]}, r"widths=\[32, 0, 128\] has widths\[1\]=0; valid: whole numbers >= 1"),
        ({"widths": [32, -64, 128]}, r"widths\[1\]=-64"),
        ({"widths": "abc"}, "widths='abc' is not a list; valid: one whole number >= 1 per stage"),
        ({"widths": 64}, "widths=64 is not a list"),
        ({"depths": [2, 0, 2]}, r"depths=\[2, 0, 2\] has depths\[1\]=0; valid: whole numbers >= 1 \(blocks in each stage\)"),
        ({"depths": ["a", "b", "c"]}, r"depths\[0\]='a'"),
        ({"depths": [2, 2.5, 2]}, r"depths\[1\]=2.5"),
        ({"strides": [1, 0, 2]}, r"strides\[1\]=0"),
    ],
)
def test_blocknet_counts_refused_not_clamped(options, needle):
    with pytest.raises(ValueError, match=needle):
        build_model("standard", **options)


def test_resnet_stage_depths_refused():
    with pytest.raises(ValueError, match=r"layers\[1\]=0"):
        ResNet("basic", [2, 0, 2, 2], num_classes=10, image_size=32)


def test_small_width_multiplier_still_builds():
    """Only the counts given are checked: a width multiplier that scales a stage below one channel still gets one."""
    model = build_model("standard", width=0.01, widths=[32, 64, 128], depths=[1, 1, 1])
    assert min(m.out_channels for m in model.modules() if hasattr(m, "out_channels")) == 1


def test_blocknet_counts_one_line_through_the_cli():
    assert_one_line_error(run_script("profile.py", "model.depths=[2,0,2]"), "depths=[2, 0, 2]", "depths[1]=0", "whole numbers >= 1")


# ---------------------------------------------------------------------------------------------
# 2. scripts/profile.py: batch_size >= 1 and an input that fits in memory


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["batch_size=0"], ["batch_size=0", "whole number >= 1"]),  # printed 0 MACs with exit 0
        (["batch_size=-1"], ["batch_size=-1", "whole number >= 1"]),  # RuntimeError traceback
        (["data.image_size=100000"], ["data.image_size=100000", "<= 4096"]),  # tried to allocate 120 GB
        (["data.image_size=4096", "batch_size=2"], ["batch_size=2", "data.image_size=4096", "batch_size <= 1"]),
    ],
)
def test_profile_bad_sizes_one_line(args, needles):
    proc = run_script("profile.py", *args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_one_line_error(proc, *needles)


# ---------------------------------------------------------------------------------------------
# 3. experiments/bench.py, bench_train.py: timing and train options, checked before any timing

CFG = {"device": "cpu", "threads": None, "repeats": 5, "warmup": 1, "min_time_s": 0.0, "size": "tiny", "dtypes": ["fp32"]}


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("threads", 1.5, "threads=1.5 must be null or an int >= 1"),  # was 1
        ("threads", True, "threads=True must be null or an int >= 1"),  # was 1
        ("repeats", 2.9, "repeats=2.9 must be an int >= 1"),  # was 2
        ("warmup", 1.5, "warmup=1.5 must be an int >= 0"),
        ("block", False, "block=False must be an int >= 1"),
        ("min_time_s", math.nan, "min_time_s=nan must be a number >= 0"),  # accepted
        ("min_time_s", math.inf, "min_time_s=inf must be a number >= 0"),
        ("min_time_s", "nan", "min_time_s='nan' must be a number >= 0"),
        ("dtypes", ["fp32", "fp32"], r"dtypes=\['fp32', 'fp32'\] names a dtype twice"),  # every row timed and counted twice
    ],
)
def test_timing_options_not_rounded(key, value, needle):
    with pytest.raises(ValueError, match=needle):
        options_from_config(OmegaConf.create({**CFG, key: value}))


def test_whole_floats_and_numbers_still_pass():
    options = options_from_config(OmegaConf.create({**CFG, "threads": 2.0, "repeats": 7, "min_time_s": 1}))
    assert (options.threads, options.repeats, options.min_time_s) == (2, 7, 1.0)
    assert isinstance(options.threads, int) and isinstance(options.min_time_s, float)


@pytest.mark.parametrize(
    ("train", "needle"),
    [
        ({"steps": 0}, "train.steps=0 must be a whole number >= 1"),  # UnboundLocalError traceback at size=full
        ({"steps": 2.5}, "train.steps=2.5 must be a whole number >= 1"),
        ({"warmup_steps": -1}, "train.warmup_steps=-1 must be a whole number >= 0"),
        ({"model": "foo"}, "unknown train.model 'foo'; choose from: .*mobilenet_v1.*separable"),
        ({"trainer": "foo"}, "unknown train.trainer 'foo'; choose from: default, quick, smoke"),
        ({"data": "foo"}, "unknown train.data 'foo'; choose from: .*fashion_mnist.*synthetic"),
        ({"full": "maybe"}, "train.full='maybe' must be true or false"),  # counted as true
        ({"stepz": 5}, "unknown key 'train.stepz'; train has: model, data, trainer, steps"),
    ],
)
def test_train_options_checked(train, needle):
    with pytest.raises(ValueError, match=needle):
        BenchOptions(size="tiny", train=train)  # size=tiny replaces steps later: the user's value is still checked
    with pytest.raises(ValueError, match=needle):
        options_from_config(OmegaConf.create({**CFG, "size": "full", "train": train}))


@pytest.mark.parametrize(
    ("arg", "needles"),
    [
        ("train.steps=0", ["train.steps=0", "whole number >= 1"]),
        ("train.model=foo", ["unknown train.model 'foo'", "separable"]),
        ("suite=trian", ["unknown suite 'trian'", "pointwise, blocks, train, all"]),
    ],
)
def test_train_options_one_line_before_timing(tmp_path, arg, needles):
    out = tmp_path / "out"
    proc = run_script("benchmark.py", "suite=train", "dtypes=[fp32]", f"out={out}", arg, timeout=120)
    assert_one_line_error(proc, *needles)
    assert "peak fp32" not in proc.stderr  # refused before the machine was measured
    assert not out.exists()  # refused before the output dir was made


# ---------------------------------------------------------------------------------------------
# 4. size=tiny never writes over the committed benchmarks/


def test_default_out_is_the_committed_dir_and_tiny_goes_elsewhere(compose_cfg, monkeypatch):
    monkeypatch.chdir(ROOT)  # scripts/benchmark.py runs in the current dir (hydra.run.dir=.)
    out = compose_cfg(config="benchmark").out
    assert Path(out).resolve() == (ROOT / "benchmarks").resolve()
    assert bench.output_dir(out, "tiny") == bench.TINY_DIR.resolve()
    assert bench.output_dir("benchmarks/threads1", "tiny") == bench.TINY_DIR.resolve() / "threads1"
    assert bench.output_dir(out, "full") == Path(out)  # full runs write where they are told


def test_tiny_run_aimed_at_committed_dir_writes_elsewhere(tmp_path, monkeypatch, caplog):
    committed, tiny = tmp_path / "benchmarks", tmp_path / "outputs" / "benchmarks_tiny"
    committed.mkdir()
    (committed / "echo.json").write_text('{"cited": true}')
    monkeypatch.setattr(bench, "COMMITTED_DIR", committed)
    monkeypatch.setattr(bench, "TINY_DIR", tiny)
    monkeypatch.setattr(bench, "SUITES", {})

    @bench.register_suite("echo")
    def echo(ctx: bench.BenchContext) -> dict:
        return {"results": [{**ctx.record("fp32"), "value": 1}], "tables": [], "notes": []}

    options = BenchOptions(device="cpu", size="tiny", dtypes=("fp32",), malloc="default")
    with caplog.at_level("INFO", logger="convlab"):
        result = run_benchmarks("echo", options, out=committed)
    assert (committed / "echo.json").read_text() == '{"cited": true}' and not (committed / "echo.md").exists()
    assert (tiny / "echo.json").is_file() and (tiny / "echo.md").is_file()
    assert result["files"][0] == str(tiny / "echo.json")
    assert "size=tiny: writing to" in caplog.text and str(tiny) in caplog.text


# ---------------------------------------------------------------------------------------------
# 5. experiments/report.py: one impossible value lists that run as a problem, the rest still report


def _record(name: str, model: str, acc: float, macs: float, params: float) -> dict:
    return {
        "schema": 1, "status": "completed", "name": name, "model": model, "data": "cifar10",
        "cost": {"macs": macs, "params": params, "latency_ms": {"1": 1.5}},
        "history": [{"epoch": 1, "test_acc": acc, "train_loss": 1.0}],
        "final": {"test_acc": acc, "epochs": 1, "wall_seconds": 10.0},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("cost.params", 1e300, "cost.params=1e+300 is impossible; valid: 0 <= params <= 1e+15"),  # "Axis limits cannot be NaN or Inf"
        ("cost.macs", 1e300, "cost.macs=1e+300 is impossible"),
        ("cost.macs", -5, "cost.macs=-5 is impossible"),
        ("cost.macs", 1e-320, "cost.macs=1e-320 is impossible; valid: a whole number"),  # "math domain error" on the log axis
        ("cost.latency_ms", {"1": 1e300}, 'cost.latency_ms["1"]=1e+300 is impossible'),
        ("final.test_acc", 1.5, "final.test_acc=1.5 is impossible; valid: 0 <= test_acc <= 1"),  # plotted at 150%
        ("final.test_acc", -1, "final.test_acc=-1 is impossible"),
    ],
)
def test_report_lists_impossible_values_as_problems(tmp_path, field, value, needle):
    runs = tmp_path / "runs"
    for i, model in enumerate(("standard", "separable", "depthwise")):
        record = _record(model, model, 0.8 + 0.05 * i, 1e7 * (i + 1), 1e5 * (i + 1))
        if i == 0:
            section, key = field.split(".")
            record[section][key] = value
        (runs / model).mkdir(parents=True)
        (runs / model / "results.json").write_text(json.dumps(record))
    summary = build_report([runs], out=tmp_path / "out")
    assert summary["completed"] == 2
    (problem,) = summary["problems"]
    assert problem["status"] == "invalid" and needle in problem["reason"], problem
    assert problem["path"].endswith("standard/results.json")
    for stem in ("acc_vs_macs", "acc_vs_params", "acc_vs_latency"):
        assert (tmp_path / "out" / f"{stem}.png").is_file()
    assert "standard" not in (tmp_path / "out" / "runs.csv").read_text()


@pytest.mark.parametrize("history", [5, True, "epochs"])
def test_report_lists_a_history_that_is_not_a_list_as_invalid(history):
    """It crashed the dashboard with "'int' object is not iterable" and a traceback."""
    row = to_row({**_record("odd", "standard", 0.8, 1e7, 1e5), "history": history, "path": "x/results.json"})
    assert row.status == "invalid" and f"history={history} is not a list of epochs" in row.reason


def test_possible_values_stay_completed():
    row = to_row({**_record("ok", "standard", 1.0, 0, 1), "path": "x/results.json"})
    assert row.status == "completed" and row.test_acc == 1.0
    failed = {**_record("bad", "standard", 7.0, 1e300, 1), "status": "failed", "reason": "diverged"}
    assert to_row(failed).status == "failed" and to_row(failed).reason == "diverged"  # not plotted: kept as it is


def test_check_writable_leaves_no_dirs_behind(tmp_path):
    """The pre-flight check makes the run dir to test it and removes it: Hydra makes its own, and a
    ``${now:...}`` dir resolved a second later would otherwise stay behind, empty."""
    (tmp_path / "outputs").mkdir()
    check_writable(str(tmp_path / "outputs" / "m-d" / "2026-11-25_06-51-39"))
    assert [p.name for p in tmp_path.rglob("*")] == ["outputs"]
    check_writable(str(tmp_path / "outputs"))  # an existing dir stays
    assert (tmp_path / "outputs").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="not writable"):
        check_writable(str(tmp_path / "file" / "run"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "outputs"]
    check_writable(str(tmp_path / "up" / ".." / "down" / "run"))  # ".." is resolved: no "up" left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "outputs"]


def test_check_writable_keeps_a_dir_another_process_made_meanwhile(tmp_path, monkeypatch):
    """Only the levels this check created are removed: a parallel run's fresh dir is not its to remove."""
    from experiments import cli

    real_mkdir = cli.os.mkdir

    def mkdir(path, *args):
        if Path(path).name == "shared":
            real_mkdir(path)  # another process gets there first
        return real_mkdir(path, *args)

    monkeypatch.setattr(cli.os, "mkdir", mkdir)
    check_writable(str(tmp_path / "shared" / "run"))
    assert (tmp_path / "shared").is_dir() and not (tmp_path / "shared" / "run").exists()


# ---------------------------------------------------------------------------------------------
# Out of memory or disk: no check before a run can foresee them; one line, the record says failed


def test_out_of_memory_is_one_line_and_recorded(tmp_path):
    """data.image_size=100000 passes every check, then the synthetic data asks for 15 TB."""
    import resource
    import subprocess
    import sys

    def limit_memory():  # 16 GiB of address space: the request fails at once whatever the machine's overcommit policy
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))

    command = [sys.executable, str(ROOT / "scripts" / "run.py"), "data=synthetic", "trainer=smoke", "logger=none", "data.image_size=100000",
               f"hydra.run.dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=300, preexec_fn=limit_memory, env={**os.environ, "WANDB_SILENT": "true"}
    )
    assert_one_line_error(proc, "out of memory: can't allocate memory", "trainer.batch_size, data.image_size")
    assert proc.returncode == 1
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "failed" and "can't allocate memory" in record["reason"]


def test_resource_errors_are_named_and_bugs_keep_their_traceback():
    import errno

    from experiments.cli import resource_error

    full = resource_error(OSError(errno.ENOSPC, "No space left on device", "/runs/a/checkpoint-epoch0003.pt"))
    assert full == "No space left on device: /runs/a/checkpoint-epoch0003.pt; free the space or pick a writable dir"
    assert resource_error(MemoryError()).startswith("out of memory: MemoryError;")
    assert resource_error(FileNotFoundError(errno.ENOENT, "No such file", "x")) is None  # may be a bug
    assert resource_error(RuntimeError("shape mismatch")) is None


@pytest.mark.parametrize(
    ("arg", "needle"),
    [
        ("dtypes=null", "dtypes=None is not valid; give a list of fp32, bf16, fp16"),
        ("train=5", "train=5 is not valid; give the train suite's keys"),
        ("out=null", "out=null is not a dir; pass out=DIR"),
    ],
)
def test_benchmark_values_of_the_wrong_kind(tmp_path, arg, needle):
    """They were TypeError tracebacks (or a dir named "None"), before any timing."""
    args = ["suite=pointwise", "size=tiny", *([] if arg.startswith("out=") else [f"out={tmp_path}"]), arg]
    assert_one_line_error(run_script("benchmark.py", *args, cwd=tmp_path), needle)
    assert not (tmp_path / "None").exists()


@pytest.mark.parametrize("removal", ["~trainer.epochs", "~trainer", "~model", "~seed"])
def test_removing_a_key_the_run_reads_is_one_line(tmp_path, removal):
    """Hydra's ~key: a ConfigAttributeError traceback from deep in the run checks."""
    proc = run_script("run.py", "data=synthetic", "trainer=smoke", "logger=none", removal, f"hydra.run.dir={tmp_path}/run")
    key = removal[1:]
    assert_one_line_error(proc, f"{removal} removes {key}, which the run reads; give it a value instead ({key}=...)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("traner.epochs=3", "unknown key 'traner.epochs' (did you mean trainer.epochs?); the config has: model, data, trainer,"),
        ("trainer.epoch=3", "unknown key 'trainer.epoch' (did you mean trainer.epochs?); trainer has: epochs, batch_size"),
        ("trainer.epochs.x=3", "unknown key 'trainer.epochs.x'; trainer has: epochs,"),
    ],
)
def test_an_unknown_key_lists_its_nearest_parent_and_the_closest_key(override, needle):
    """'traner.epochs' said "traner has:" and listed nothing."""
    assert_one_line_error(run_script("run.py", "data=synthetic", "logger=none", override), needle)


def test_data_root_null_is_one_line_and_a_number_is_a_dir_name(tmp_path):
    """data.root=null and data.root=123 were TypeError tracebacks (Path(None), Path(123))."""
    proc = run_script("run.py", "data=synthetic", "trainer=smoke", "logger=none", "data.root=null", f"hydra.run.dir={tmp_path}/a")
    assert_one_line_error(proc, "data.root=None is not a dir; pass data.root=PATH")
    proc = run_script("run.py", "data=cifar10", "data.root=123", "data.download=false", "trainer=smoke", "logger=none",
                      f"hydra.run.dir={tmp_path}/b", cwd=tmp_path)  # fmt: skip
    assert_one_line_error(proc, f"cifar10 not found at {tmp_path / '123' / 'cifar-10-batches-py'}")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model=null", "model=null cannot be given: a run needs a model; choose from: basic, bottleneck, depthwise"),
        ("experiment=null", "experiment=null cannot be given: it is the default: leave experiment= out; choose from: blocks"),
        ("name=ünï", "LexerNoViableAltException: name=ünï (quote a value with spaces or letters outside ASCII, e.g. name='résumé run')"),
    ],
)
def test_group_null_and_unquoted_non_ascii_say_what_to_do(tmp_path, override, needle):
    """Hydra's own words were 'Config group override must be a string or a list. Got NoneType' and a bare lexer error."""
    proc = run_script("run.py", "data=synthetic", "trainer=smoke", "logger=none", override, f"hydra.run.dir={tmp_path}/run")
    assert_one_line_error(proc, needle)

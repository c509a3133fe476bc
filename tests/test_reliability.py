"""Nothing lost: corrupt checkpoints, failed writes, wandb failing mid-run, bad input through run.py."""

from __future__ import annotations

import errno
import glob
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from experiments import records
from experiments.records import list_checkpoints, load_checkpoint, save_checkpoint, write_json
from experiments.train import train

from .conftest import ROOT, assert_one_line_error, run_script
from .helpers import kill_when, signal_when


def _run_args(run_dir, *extra):
    return [
        "data=synthetic",
        "trainer=smoke",
        "trainer.max_steps=null",
        "trainer.epochs=3",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    args = _run_args(tmp_path / "whole", "data.train_size=1024", "trainer.num_threads=1")
    whole = run_script("run.py", *args)
    assert whole.returncode == 0, whole.stderr
    assert json.loads((tmp_path / "whole" / "results.json").read_text())["env"]["threads"] == 1  # the threads it ran on
    # a crash during epoch 3, then the newest checkpoint found truncated
    run = tmp_path / "crashed"
    command = [sys.executable, str(ROOT / "scripts" / "run.py"), *_run_args(run, "data.train_size=1024", "trainer.num_threads=1")]
    kill_when(command, run / "checkpoint-epoch0002.pt")
    assert json.loads((run / "results.json").read_text())["status"] == "running", "the run finished before it could be killed"
    newest = run / "checkpoint-epoch0002.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    resumed = run_script("run.py", *_run_args(run, "data.train_size=1024", "trainer.num_threads=1"))
    assert resumed.returncode == 0, resumed.stderr
    warning = [line for line in resumed.stderr.splitlines() if "checkpoint-epoch0002.pt is unreadable" in line]
    assert len(warning) == 1 and "trying the previous one" in warning[0]
    assert "resume:" in resumed.stderr and "epoch 1, step 32" in resumed.stderr
    a, b = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "whole", run))
    assert b["status"] == "completed" and b["final"]["test_acc"] == a["final"]["test_acc"]
    assert b["final"]["train_loss"] == pytest.approx(a["final"]["train_loss"], rel=1e-6)


def test_keeps_the_newest_two_checkpoints(tmp_path):
    for epoch in range(1, 5):
        save_checkpoint(tmp_path, {"epoch": epoch, "w": torch.ones(2) * epoch}, epoch, keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["checkpoint-epoch0003.pt", "checkpoint-epoch0004.pt"]
    state, path = load_checkpoint(tmp_path)
    assert state["epoch"] == 4 and path.name == "checkpoint-epoch0004.pt"


def test_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json(path, {"status": "running", "history": [1]})
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"status": "completed", "history": [1, 2]})
    monkeypatch.setattr(records.os, "fsync", real_fsync)
    assert json.loads(path.read_text()) == {"status": "running", "history": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind
    save_checkpoint(tmp_path, {"epoch": 1}, 1)
    monkeypatch.setattr(records.os, "fsync", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, {"epoch": 2}, 2)
    monkeypatch.setattr(records.os, "fsync", real_fsync)
    assert load_checkpoint(tmp_path)[0]["epoch"] == 1


def test_git_commit_says_when_the_tree_had_uncommitted_changes(tmp_path, monkeypatch):
    """results.json's env.git_commit ends in -dirty when tracked files differ from the commit (what the README's tables cite)."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    (tmp_path / "f.txt").write_text("a")
    for args in (["init", "-q"], ["add", "f.txt"], ["commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, env=env)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setattr(records, "REPO", tmp_path)
    assert records._git_commit() == head
    (tmp_path / "untracked.txt").write_text("b")  # untracked files do not change what ran
    assert records._git_commit() == head
    (tmp_path / "f.txt").write_text("changed")
    assert records._git_commit() == head + "-dirty"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_mode_open_would_give_them(tmp_path, umask):
    """results.json, tables and checkpoints were always 0600 (mkstemp's mode): a team's report.py could not read them."""
    old = os.umask(umask)
    try:
        write_json(tmp_path / "results.json", {"status": "completed"})
        save_checkpoint(tmp_path, {"epoch": 1}, 1)
        (tmp_path / "plain.txt").write_text("x")  # what open() gives under this umask
    finally:
        os.umask(old)
    want = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == dict.fromkeys(
        ["results.json", "checkpoint-epoch0001.pt", "plain.txt"], want
    )


def test_wandb_failing_to_log_mid_run_never_stops_training(compose_cfg, tmp_path, monkeypatch, caplog):
    import wandb.sdk.wandb_run as wandb_run

    def server_error(self, *args, **kwargs):
        raise RuntimeError("HTTP 500 from the wandb server")

    monkeypatch.setattr(wandb_run.Run, "log", server_error)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    record = train(compose_cfg("data=synthetic", "trainer=smoke"), tmp_path)
    assert record["status"] == "completed" and record["final"]["test_acc"] is not None
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wandb: could not")]
    assert len(warnings) == 1 and "HTTP 500" in warnings[0]  # one warning, then the tracker is off
    # The broken run is closed: the next run in this process (an in-process sweep's next job) gets a
    # wandb run of its own, in its own run dir, not the broken one handed back.
    monkeypatch.undo()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    following = train(compose_cfg("data=synthetic", "trainer=smoke", "seed=1"), tmp_path / "next")
    assert following["wandb"]["id"] != record["wandb"]["id"] and following["wandb"]["error"] is None
    assert glob.glob(str(tmp_path / "next" / "wandb" / "offline-run-*" / f"run-{following['wandb']['id']}.wandb"))


def test_checkpoints_load_with_weights_only(tmp_path):
    assert run_script("run.py", *_run_args(tmp_path, "trainer.epochs=1")).returncode == 0
    state = torch.load(tmp_path / "checkpoint-epoch0001.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "step", "rng_cpu", "history", "config"} <= set(state)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["model=resnet19"], ["unknown model 'resnet19'", "separable"]),
        (["data=imagenet22k"], ["unknown data 'imagenet22k'", "fashion_mnist"]),
        (["model.width=0"], ["width=0", "0.0 < width <= 4.0"]),
        (["model=inverted_residual", "model.expansion=99"], ["expansion=99", "1 <= expansion <= 16"]),
        (["model.se_ratio=-0.5"], ["se_ratio=-0.5", "0.0 <= se_ratio <= 1.0"]),
        (["model=depthwise", "model.widths=[48,96,128]"], ["cannot map 32 to 48 channels"]),
        (["model=bottleneck", "model.groups=3"], ["groups=3", "must divide"]),
        (["model=resnet18", "data.image_size=4"], ["image_size=4", "needs image_size >= 8"]),
        (["trainer.batch_size=-1"], ["trainer.batch_size=-1"]),
        (["trainer.epochs=0"], ["trainer.epochs=0"]),
        # values of the wrong kind, named against their default (the front door's type check)
        (["seed=abc"], ["seed='abc' must be a whole number", "default is 0"]),
        (["trainer.compile=maybe"], ["trainer.compile='maybe' must be true or false"]),
        (["model.depths=[a,b,c]"], ["model.depths=", "list of whole numbers", "[2,2,2]"]),
        (["data.image_size=2.5"], ["data.image_size=2.5 must be a whole number"]),
        (["model=standard,separable"], ["model=standard,separable", "add -m"]),
        # values checked before any data is read or any epoch is trained
        (["latency_batch_sizes=[-1]"], ["latency_batch_sizes=[-1]", ">= 1"]),
        (["data.test_size=0"], ["data.test_size=0", ">= 1"]),
        (["data.in_channels=2"], ["data.mean=", "2 numbers", "data.in_channels"]),
        (["data.std=[0,0,0]"], ["data.std=[0, 0, 0]", "> 0"]),
        (["data.num_classes=1"], ["data.num_classes=1", ">= 2"]),
        (["data.val_split=1.0"], ["data.val_split=1.0", "fraction in [0, 1)"]),
        (["data.subset=0.5"], ["data.subset=0.5", "whole number of examples >= 1"]),  # was found after the run dir and data
        (["data.subset=8", "data.subset_seed=-1"], ["data.subset_seed=-1", "whole number >= 0", "null for the run's seed"]),
        (["optim=adamw", "optim.beta2=1.5"], ["optim.beta2=1.5", "beta2"]),
        (["seed=99999999999999999999"], ["seed=99999999999999999999", "2**63"]),
        # a key added with + that nothing reads is a typo, not a setting
        (["+trainer.epoch=3"], ["+trainer.epoch=3 adds a key nothing reads", "trainer has: epochs"]),
        (["optim=adamw", "+optim.nesterov=true"], ["+optim.nesterov=true", "optim has: name, lr, momentum, beta2"]),
        (["+model.expansion=2"], ["'separable' blocks has no option 'expansion'", "stem_width", "kernel_size"]),
        (["-cn", "reproduce"], ["--config-name=reproduce is reproduce.py's config", "it reads 'config'"]),
        (["--config-name=nope"], ["unknown config name 'nope'", "config, profile"]),
    ],
)
def test_bad_model_and_trainer_input_through_run_py(tmp_path, args, needles):
    proc = run_script("run.py", "data=synthetic", "trainer=smoke", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", *args)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "run").exists()  # found before Hydra makes the run dir: nothing written


def test_appended_keys_and_config_flags_that_are_fine(tmp_path):
    """++ on a known key, + on a model option (the builder checks it), -cn naming conf/'s own config,
    and a user's own --config-dir (Hydra alone composes it) all pass the front door."""
    from experiments.cli import preflight

    run_dir = f"hydra.run.dir={tmp_path / 'run'}"
    cfg = preflight(["-cn", "config", "++trainer.epochs=1", "+model.expansion=2", run_dir], "config")
    assert cfg.trainer.epochs == 1 and cfg.model.expansion == 2
    assert preflight(["--config-dir", str(tmp_path), "+anything=1", run_dir], "config") is None


def test_empty_output_dirs_are_refused_not_read_as_the_current_dir(tmp_path):
    proc = run_script("run.py", "data=synthetic", "trainer=smoke", "logger=none", "hydra.run.dir=", cwd=tmp_path)
    assert_one_line_error(proc, "output dir is empty", "hydra.run.dir")
    assert list(tmp_path.iterdir()) == []


def test_flags_after_overrides_and_sweeper_mistakes(tmp_path):
    """Hydra's parser wants -m / --cfg before the overrides; the front door reorders them."""
    proc = run_script("run.py", "data=synthetic", "model=pointwise", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "name: pointwise" in proc.stdout
    seeds = run_script("run.py", "-m", "experiment=blocks", "hydra.sweeper.seeds=0", f"hydra.sweep.dir={tmp_path}/a")
    assert_one_line_error(seeds, "hydra.sweeper.seeds=0", ">= 1")
    no_table = run_script("run.py", "-m", "hydra/sweeper=table", "data=synthetic", f"hydra.sweep.dir={tmp_path}/b")
    assert_one_line_error(no_table, "hydra/sweeper=table needs a table", "experiment=NAME")
    no_jobs = run_script("run.py", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=0", "model=standard,separable",
                         f"hydra.sweep.dir={tmp_path}/c")  # fmt: skip
    assert_one_line_error(no_jobs, "hydra.launcher.n_jobs=0", ">= 1")
    assert not (tmp_path / "c").exists()


def test_resume_path_without_a_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_script("run.py", *_run_args(tmp_path / "run"), f"resume={tmp_path / 'empty'}")
    assert_one_line_error(proc, f"resume='{tmp_path / 'empty'}' holds no loadable checkpoint", "resume=auto or never")
    assert not (tmp_path / "run").exists()  # refused before Hydra makes the run dir: no failed record


def test_resume_path_from_another_run_dir_is_recorded_and_checked_first(compose_cfg, tmp_path):
    """resume=PATH continues another dir's checkpoint: the record says where from and when each part began;
    a checkpoint of another config was refused only after a new run dir held a failed record."""
    args = ("data=synthetic", "trainer=smoke", "trainer.epochs=2", "trainer.max_steps=null", "data.train_size=64", "logger=none")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()  # as Hydra makes a run dir
    first = train(compose_cfg(*args), tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-epoch0001.pt"
    second = train(compose_cfg(*args, f"resume={checkpoint}"), tmp_path / "b")
    assert second["status"] == "completed" and second["resumed_from"] == str(checkpoint.resolve())
    assert second["started_at"] == first["started_at"] and len(second["resumed_at"]) == 1
    assert second["history"][0] == first["history"][0] and len(second["history"]) == 2
    proc = run_script("run.py", *args, "seed=1", f"resume={checkpoint}", f"hydra.run.dir={tmp_path / 'c'}")
    assert_one_line_error(proc, "was written with another config", "seed: 0 there, 1 now")
    assert not (tmp_path / "c").exists()


def test_resume_never_keeps_the_earlier_record(compose_cfg, tmp_path):
    cfg = compose_cfg("data=synthetic", "trainer=smoke", "logger=none")
    first = train(cfg, tmp_path)
    again = compose_cfg("data=synthetic", "trainer=smoke", "logger=none", "resume=never", "seed=1")
    second = train(again, tmp_path)
    # the two runs differ by seed (started_at has whole seconds: two smoke runs can share one)
    kept, now_ = (json.loads((tmp_path / name).read_text()) for name in ("results.previous.json", "results.json"))
    assert (kept["seed"], kept["status"], kept["final"]) == (0, "completed", first["final"])
    assert (now_["seed"], now_["status"], now_["final"]) == (1, "completed", second["final"])


def test_resume_never_sets_the_earlier_checkpoints_aside(compose_cfg, tmp_path):
    """Left in place, an earlier run's later-epoch checkpoints outranked the fresh run's: its
    epoch-1 checkpoint was pruned at once, and after a crash resume=auto picked the earlier run."""
    first = compose_cfg(
        "data=synthetic", "trainer=smoke", "trainer.epochs=3", "trainer.max_steps=null", "data.train_size=64", "logger=none"
    )
    train(first, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-epoch0003.pt", "checkpoint-epoch0002.pt"]
    fresh = compose_cfg("data=synthetic", "trainer=smoke", "trainer.epochs=1", "trainer.max_steps=null", "data.train_size=64", "logger=none",
                        "resume=never", "seed=1")  # fmt: skip
    train(fresh, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-epoch0001.pt"]
    assert torch.load(tmp_path / "checkpoint-epoch0001.pt", weights_only=False)["config"]["seed"] == 1
    assert [p.name for p in list_checkpoints(tmp_path / "previous")] == ["checkpoint-epoch0003.pt", "checkpoint-epoch0002.pt"]


def test_sigterm_is_recorded_as_an_interruption_and_the_run_resumes(tmp_path):
    """kill / timeout / a scheduler's time limit send SIGTERM: one line, results.json says so, and the same command resumes."""
    # 12 short epochs: SIGTERM goes as epoch 1's checkpoint appears, with 11 epochs (seconds) still to train, so a run that
    # finished first is a failure, not a skip; the resume trains those 11, about what 2 of 3 long epochs cost before.
    args = _run_args(tmp_path, "data.train_size=512", "trainer.epochs=12", "trainer.num_threads=1")
    command = [sys.executable, str(ROOT / "scripts" / "run.py"), *args]
    returncode, stderr = signal_when(command, (tmp_path / "checkpoint-epoch0001.pt").exists, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM, f"exit status {returncode} (0: the run finished before SIGTERM arrived)\n{stderr}"
    # The default run dir is named by the time it started: the line names the dir to continue in.
    assert "Traceback" not in stderr and "error: interrupted (SIGTERM); a training run records this" in stderr
    assert f"the same command with hydra.run.dir={tmp_path} resumes it" in stderr
    assert (tmp_path / "run.log").read_text().splitlines()[-1].endswith("error: interrupted (SIGTERM); a training run records this "
                                                                       f"in its results.json; the same command with hydra.run.dir={tmp_path} resumes it")  # fmt: skip
    record = json.loads((tmp_path / "results.json").read_text())
    assert (record["status"], record.get("reason")) == ("failed", "interrupted (SIGTERM)") and 1 <= len(record["history"]) < 12, (
        record["status"], record.get("reason"), len(record["history"]))  # fmt: skip
    resumed = run_script("run.py", *args)
    assert resumed.returncode == 0 and "resume:" in resumed.stderr, resumed.stderr
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "completed" and [h["epoch"] for h in record["history"]] == list(range(1, 13))


def test_sigterm_to_reproduce_stops_its_sweep_too(tmp_path):
    """reproduce.py trains through a run.py sweep in a child process: a SIGTERM to reproduce.py alone
    (kill, a scheduler) must not leave that sweep training on into out/ after reproduce.py has exited."""
    args = [
        "table=blocks",
        "data=synthetic",
        "trainer=smoke",
        # Row 1 alone trains 100 epochs of 3 steps (about a minute): SIGTERM goes at its first checkpoint (3 steps in, as
        # before) and reproduce.py ends the sweep 5 s later, so the sweep cannot have finished (no run interrupted) by then.
        "trainer.max_steps=null",
        "trainer.epochs=100",
        "data.train_size=96",
        "trainer.num_threads=1",
        "logger=none",
        f"out={tmp_path}",
    ]
    command = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), *args]
    returncode, stderr = signal_when(
        command, lambda: bool(glob.glob(str(tmp_path / "runs" / "*" / "checkpoint-epoch0001.pt"))), signal.SIGTERM
    )
    assert returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and stderr.splitlines()[-1].startswith("error: interrupted (SIGTERM); finished runs are kept")
    records_ = [json.loads(Path(f).read_text()) for f in glob.glob(str(tmp_path / "runs" / "*" / "results.json"))]
    assert records_ and all(r["status"] != "running" for r in records_), [r["status"] for r in records_]
    assert any(r.get("reason") == "interrupted (SIGTERM)" for r in records_)


def test_non_finite_numbers_are_written_as_null_strict_json(tmp_path):
    write_json(tmp_path / "r.json", {"loss": float("nan"), "history": [{"x": float("inf")}, {"x": 1.5}]})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}")) == {
        "loss": None,
        "history": [{"x": None}, {"x": 1.5}],
    }


def test_reproduce_knows_the_tables_model_and_checks_run_settings_first(tmp_path):
    depthwise = run_script(
        "reproduce.py", "table=bottleneck", "cost_only=true", "latency=false", "model.depthwise=true", f"out={tmp_path}/a"
    )
    assert depthwise.returncode == 0, depthwise.stderr
    epochs = run_script("reproduce.py", "table=bottleneck", "data=synthetic", "trainer=smoke", "trainer.epochs=0", f"out={tmp_path}/b")
    assert_one_line_error(epochs, "trainer.epochs=0")
    assert not (tmp_path / "b" / "runs").exists()  # no row was launched
    sweeper_seeds = run_script("reproduce.py", "table=blocks", "cost_only=true", "hydra.sweeper.seeds=3", f"out={tmp_path}/c")
    assert_one_line_error(sweeper_seeds, "hydra.sweeper.seeds=3", "pass seeds=3")
    missing = run_script("reproduce.py")
    assert_one_line_error(missing, "no table given", "table=NAME", "mobilenet_t6")
    swept = run_script("reproduce.py", "-m", "table=blocks", "cost_only=true", f"out={tmp_path}/d")
    assert_one_line_error(swept, "-m is not for this script", "runs the table's sweep itself", "seeds=N")
    assert not (tmp_path / "d").exists()


def test_run_dir_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_script("run.py", "data=synthetic", "trainer=smoke", "logger=none", f"hydra.run.dir={blocker}/run")
    assert_one_line_error(proc, "not writable", str(blocker))
    sweep = run_script("run.py", "-m", "data=synthetic", "trainer=smoke", "logger=none", f"hydra.sweep.dir={blocker}/sweep")
    assert_one_line_error(sweep, "not writable")
    # the scripts' own output dirs, before any training or timing
    reproduce = run_script("reproduce.py", "table=blocks", "cost_only=true", f"out={blocker}/tables")
    assert_one_line_error(reproduce, "not writable", f"{blocker}/tables", "out=")
    benchmark = run_script("benchmark.py", "suite=pointwise", "size=tiny", f"out={blocker}/bench")
    assert_one_line_error(benchmark, "not writable", f"{blocker}/bench", "out=")


def test_read_json_of_bytes_that_are_not_text_is_none(tmp_path):
    """A results.json of binary garbage raised UnicodeDecodeError where a bad JSON gave None."""
    path = tmp_path / "results.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert records.read_json(path) is None

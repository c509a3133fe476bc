"""Nothing lost: corrupt checkpoints, failed writes, wandb failing mid-run, bad input through run.py."""

from __future__ import annotations

import errno
import json
import os
import sys

import pytest
import torch

from experiments import records
from experiments.records import load_checkpoint, save_checkpoint, write_json
from experiments.train import train

from .conftest import ROOT, assert_one_line_error, run_script
from .helpers import kill_when


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
    ],
)
def test_bad_model_and_trainer_input_through_run_py(tmp_path, args, needles):
    proc = run_script("run.py", "data=synthetic", "trainer=smoke", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", *args)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "run").exists()  # found before Hydra makes the run dir: nothing written


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

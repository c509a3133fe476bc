"""Training end to end through the real command line: records, wandb offline, resume, failures."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.data import DEBIAN_FASHION_MNIST
from experiments.train import build_optimizer, lr_factor, time_to_target, train
from models import build_model

from .conftest import ROOT, assert_one_line_error, run_script
from .helpers import kill_when, read_wandb_records, wandb_summary, write_cifar10

RESULT_KEYS = {"schema", "status", "reason", "name", "model", "data", "experiment", "row", "seed", "run_dir", "started_at", "finished_at",
               "config", "cost", "history", "final", "env", "wandb", "target"}  # fmt: skip
HISTORY_KEYS = {"epoch", "train_loss", "train_acc", "val_acc", "test_acc", "eval_seconds", "lr", "seconds", "img_per_s", "steps", "images"}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, per_batch=40, test=40)
    return root


def test_smoke_run_on_cifar_format_files_with_offline_wandb(cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_script("run.py", f"data.root={cifar_root}", "data.download=false", "data.val_split=0.1", "trainer=smoke", "format=json",
                      f"hydra.run.dir={run_dir}", env={"WANDB_API_KEY": None, "WANDB_MODE": None})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    record = json.loads((run_dir / "results.json").read_text())
    assert printed == record
    assert set(record) >= RESULT_KEYS and record["status"] == "completed" and record["reason"] is None
    assert record["model"] == "separable" and record["data"] == "cifar10" and record["config"]["data"]["root"] == str(cifar_root)
    assert set(record["history"][0]) == HISTORY_KEYS and record["history"][0]["val_acc"] is not None
    # trainer=smoke stops after 3 steps of 32: the record says so, not just "1 epoch"
    assert (record["final"]["steps"], record["final"]["images_seen"], record["final"]["epochs"]) == (3, 96, 1)
    assert (record["history"][0]["steps"], record["history"][0]["images"]) == (3, 96)
    assert "sched.warmup_epochs=1 is" in proc.stderr and "never reaches optim.lr" in proc.stderr
    assert set(record["final"]) >= {"test_acc", "train_loss", "wall_seconds", "best_epoch"} and record["final"]["best_by"] == "val"
    assert 0.0 <= record["final"]["test_acc"] <= 1.0
    assert record["cost"]["macs"] == 7_050_496 and "by_layer_type" in record["cost"] and record["cost"]["latency_ms"]["1"] > 0
    assert set(record["env"]) >= {"torch", "device", "threads", "git_commit"} and record["env"]["torch"] == torch.__version__
    # the offline wandb run, read back from its own file
    assert record["wandb"]["mode"] == "offline"
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{record['wandb']['id']}.wandb"))
    assert len(files) == 1
    records = read_wandb_records(Path(files[0]))
    summary = wandb_summary(records)
    assert summary["test/acc"] == pytest.approx(record["final"]["test_acc"])
    assert summary["cost/macs"] == record["cost"]["macs"] and summary["cost/params"] == record["cost"]["params"]
    assert summary["cost/by_layer_type/_type"] == "table-file" and summary["cost/by_layer_type/nrows"] == 6
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_group == "separable" and {"separable", "cifar10"} <= set(run.tags) and run.job_type == "train"
    assert (record["wandb"]["group"], record["wandb"]["project"]) == (run.run_group, run.project)  # as the run is filed
    config_keys = {item.key for r in records if r.WhichOneof("record_type") == "run" for item in r.run.config.update}
    assert {"model", "data", "trainer", "optim"} <= config_keys
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits == [0]
    assert "wandb sync" in proc.stderr


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_smoke_run_on_real_fashion_mnist(tmp_path):
    proc = run_script("run.py", "data=fashion_mnist", "data.subset=512", "trainer=smoke", "trainer.target_acc=0.01", "logger=none",
                      f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "completed" and record["cost"]["input_shape"] == [1, 1, 28, 28]
    assert record["target"]["reached"] and record["target"]["epoch"] == 1
    assert "test acc" in proc.stdout and f"(1% reached at epoch 1 after {record['target']['train_seconds']:.1f} s)" in proc.stdout


def _resume_cmd(run_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "run.py"), "data=synthetic", "data.train_size=1024", "trainer=smoke", "trainer.max_steps=null",
            "trainer.epochs=3", "trainer.num_threads=1", "data.augment.crop_padding=4", "model.dropout=0.2", "logger=none",
            f"hydra.run.dir={run_dir}"]  # fmt: skip


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_same_final_metrics(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    whole = subprocess.run(_resume_cmd(tmp_path / "whole"), env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    interrupted = tmp_path / "interrupted"
    kill_when(_resume_cmd(interrupted), interrupted / "checkpoint-epoch0001.pt")
    partial = json.loads((interrupted / "results.json").read_text())
    assert partial["status"] == "running" and len(partial["history"]) < 3, "the run finished before it could be killed"
    resumed = subprocess.run(_resume_cmd(interrupted), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resume:" in resumed.stderr
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((interrupted / "results.json").read_text())
    assert b["status"] == "completed" and len(b["history"]) == 3
    # one run in two parts, in its own dir: when it began, when the second part began, nothing "from" elsewhere
    assert b["started_at"] == partial["started_at"] and len(b["resumed_at"]) == 1 and "resumed_from" not in b
    assert b["final"]["test_acc"] == a["final"]["test_acc"]
    assert b["final"]["train_loss"] == pytest.approx(a["final"]["train_loss"], rel=1e-6)
    for ha, hb in zip(a["history"], b["history"]):
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-6) and hb["test_acc"] == ha["test_acc"]
    # the resumed run's wall time counts the epochs trained before the kill, not only those after it
    assert b["final"]["wall_seconds"] >= sum(h["seconds"] + (h["eval_seconds"] or 0) for h in b["history"])


@pytest.mark.slow
def test_completed_run_dir_is_not_trained_again(tmp_path):
    args = ["data=synthetic", "trainer=smoke", "logger=none", f"hydra.run.dir={tmp_path}"]
    assert run_script("run.py", *args).returncode == 0
    first = (tmp_path / "results.json").read_text()
    again = run_script("run.py", *args)
    assert again.returncode == 0 and "not training again" in again.stderr
    assert (tmp_path / "results.json").read_text() == first
    other = run_script("run.py", *args, "model.width=0.5")
    assert_one_line_error(other, "another config", "model.width")
    # A moved run dir (a clone of a repo with kept runs): reused where it is, and the summary names where it is now.
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(tmp_path, moved)
    again = run_script("run.py", *args[:-1], f"hydra.run.dir={moved}")
    assert again.returncode == 0 and "not training again" in again.stderr
    assert again.stdout.strip().endswith(f"| {moved / 'results.json'}") and str(tmp_path / "results.json") not in again.stdout


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """trainer.compile=true through the CLI, on convlab's own 1x1 convolutions in channels_last."""
    args = ["data=synthetic", "trainer=smoke", "trainer.channels_last=true", "model.pointwise_impl=scratch", "logger=none"]
    runs = {}
    for compile_ in ("false", "true"):
        proc = run_script("run.py", *args, f"trainer.compile={compile_}", f"hydra.run.dir={tmp_path / compile_}")
        assert proc.returncode == 0, proc.stderr
        runs[compile_] = json.loads((tmp_path / compile_ / "results.json").read_text())
    eager, compiled = runs["false"], runs["true"]
    assert compiled["status"] == "completed" and compiled["config"]["trainer"]["compile"] is True
    assert compiled["final"]["train_loss"] == pytest.approx(eager["final"]["train_loss"], rel=1e-3)


def test_diverging_run_fails_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = run_script("run.py", "data=synthetic", "trainer=smoke", "trainer.max_steps=null", "optim.lr=1e8", "model.norm=none",
                      f"hydra.run.dir={tmp_path}", env={"WANDB_API_KEY": None, "WANDB_MODE": None})  # fmt: skip
    assert_one_line_error(proc, "non-finite", "optim.lr=1e+08")
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "failed" and "non-finite" in record["reason"] and record["final"] is None
    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    exits = [r.exit.exit_code for r in read_wandb_records(Path(files[0])) if r.WhichOneof("record_type") == "exit"]
    assert exits and exits[-1] != 0  # the wandb run is marked failed


def test_divergence_after_a_good_epoch_keeps_its_checkpoint(compose_cfg, tmp_path, monkeypatch):
    cfg = compose_cfg("data=synthetic", "trainer=smoke", "trainer.max_steps=null", "trainer.epochs=3", "logger=none")
    calls = {"n": 0}
    real_forward = torch.nn.CrossEntropyLoss.forward

    def nan_in_epoch_2(self, logits, target):
        calls["n"] += 1
        loss = real_forward(self, logits, target)
        return loss * float("nan") if calls["n"] > 16 else loss  # 16 steps per epoch

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", nan_in_epoch_2)
    with pytest.raises(Exception, match="non-finite at epoch 2"):
        train(cfg, tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "failed" and "last good checkpoint (epoch 1) is kept" in record["reason"]
    assert len(record["history"]) == 1
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == ["checkpoint-epoch0001.pt"]
    state = torch.load(tmp_path / "checkpoint-epoch0001.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["trainer.batch_size=0"], ["trainer.batch_size=0", ">= 1"]),
        (["data.train_size=64", "trainer.batch_size=128"], ["trainer.batch_size=128", "64 training examples"]),
        (["data.subset=5000"], ["data.subset=5000", "512-example"]),
        (["trainer.precision=fp16"], ["trainer.precision=fp16", "bf16 or fp32"]),
        (["trainer.precision=fp8"], ["trainer.precision='fp8'", "fp32, bf16, fp16"]),
        (["device=cuda"], ["device='cuda'", "device=cpu"]),
        (["optim.name=lamb"], ["optim.name='lamb'", "sgd, adamw"]),
        (["optim=lamb"], ["unknown optim 'lamb'", "adamw, sgd"]),
        (["logger=mlflow"], ["unknown logger 'mlflow'", "none, wandb"]),
        (["hydra/launcher=ray"], ["unknown launcher 'ray'", "parallel", "slurm"]),
        (["resume=/no/such/run"], ["resume='/no/such/run'", "auto, never"]),
        (["trainer.target_acc=94"], ["trainer.target_acc=94", "use 0.94"]),
        (["trainer.target_acc=0"], ["trainer.target_acc=0", "0.0 < target_acc <= 1.0"]),
        (["trainer.stop_at_target=true"], ["trainer.stop_at_target=true", "trainer.target_acc"]),
        (["trainer.stop_at_target=yes"], ["trainer.stop_at_target='yes'", "true or false"]),
    ],
)
def test_bad_input_one_line_through_the_cli(tmp_path, args, needles):
    proc = run_script("run.py", "data=synthetic", "trainer=smoke", "logger=none", f"hydra.run.dir={tmp_path}", *args)
    assert_one_line_error(proc, *needles)
    record_path = tmp_path / "results.json"
    if record_path.exists():  # config errors inside the run are recorded as failures, never as results
        assert json.loads(record_path.read_text())["status"] == "failed"


def test_missing_dataset_without_download(tmp_path):
    proc = run_script("run.py", f"data.root={tmp_path}", "data.download=false", "logger=none", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, str(tmp_path / "cifar-10-batches-py"), "data=fashion_mnist", "data=synthetic")


def test_logger_none_never_imports_wandb(tmp_path):
    code = (
        "import sys; from hydra import compose, initialize_config_dir\n"
        f"with initialize_config_dir(config_dir='{ROOT / 'conf'}', version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['data=synthetic', 'trainer=smoke', 'logger=none'])\n"
        "from experiments.train import train\n"
        f"assert train(cfg, __import__('pathlib').Path('{tmp_path}'))['status'] == 'completed'\n"
        "assert 'wandb' not in sys.modules, 'wandb was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_wandb_failure_never_stops_training(compose_cfg, tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(*args, **kwargs):
        raise ConnectionError("wandb server unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    cfg = compose_cfg("data=synthetic", "trainer=smoke", "logger.mode=online")
    record = train(cfg, tmp_path)
    assert record["status"] == "completed" and record["final"]["test_acc"] is not None
    assert any("wandb: could not start" in r.getMessage() and "training continues" in r.getMessage() for r in caplog.records)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "completed" and "wandb server unreachable" in saved["wandb"]["error"]


def test_wandb_online_that_cannot_start_falls_back_to_offline(compose_cfg, tmp_path, monkeypatch, caplog):
    """A stored key but no server: the run is kept offline (to upload later), not lost."""
    import wandb

    real_init, modes = wandb.init, []

    def no_server(*args, **kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise ConnectionError("no route to api.wandb.ai")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", no_server)
    record = train(compose_cfg("data=synthetic", "trainer=smoke", "logger.mode=online"), tmp_path)
    assert modes == ["online", "offline"]
    assert record["status"] == "completed" and record["wandb"]["mode"] == "offline" and record["wandb"]["error"] is None
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / f"run-{record['wandb']['id']}.wandb"))
    assert any("could not start online" in r.getMessage() and "logging offline instead" in r.getMessage() for r in caplog.records)


def test_time_to_target_counts_only_evaluated_epochs_up_to_the_first_hit():
    history = [
        {"epoch": 1, "test_acc": 0.80, "seconds": 10.0, "eval_seconds": 1.0},
        {"epoch": 2, "test_acc": None, "seconds": 10.0, "eval_seconds": None},  # not evaluated (eval_every=2)
        {"epoch": 3, "test_acc": 0.9401, "seconds": 12.0, "eval_seconds": 1.5},
        {"epoch": 4, "test_acc": 0.95, "seconds": 12.0, "eval_seconds": 1.5},
    ]
    hit = time_to_target(history, 0.94)
    assert hit == {"acc": 0.94, "reached": True, "epoch": 3, "test_acc": 0.9401, "train_seconds": 32.0, "seconds_with_eval": 34.5}
    assert time_to_target(history, 0.80)["epoch"] == 1  # reached counts >=, not >
    missed = time_to_target(history, 0.96)
    assert missed["reached"] is False and missed["epoch"] is None and missed["train_seconds"] is None
    assert time_to_target(history, None) is None


def test_stop_at_target_ends_the_run_at_the_first_epoch_that_reached_it(compose_cfg, tmp_path):
    base = ("data=synthetic", "data.train_size=256", "data.test_size=64", "trainer=smoke", "trainer.max_steps=null", "trainer.epochs=3",
            "logger=none")  # fmt: skip
    for name in ("stop", "miss", "none"):
        (tmp_path / name).mkdir()
    # Random labels: any accuracy above 0 is reached after the first epoch, 1.0 never is.
    stopped = train(compose_cfg(*base, "trainer.target_acc=0.001", "trainer.stop_at_target=true"), tmp_path / "stop")
    assert stopped["status"] == "completed" and len(stopped["history"]) == 1
    first = stopped["history"][0]
    assert stopped["target"] == {"acc": 0.001, "reached": True, "epoch": 1, "test_acc": first["test_acc"],
                                 "train_seconds": first["seconds"], "seconds_with_eval": first["seconds"] + first["eval_seconds"]}  # fmt: skip
    assert json.loads((tmp_path / "stop" / "results.json").read_text())["target"] == stopped["target"]
    missed = train(compose_cfg(*base, "trainer.target_acc=1.0", "trainer.stop_at_target=true"), tmp_path / "miss")
    assert len(missed["history"]) == 3 and missed["target"]["reached"] is False
    untimed = train(compose_cfg(*base, "trainer.epochs=1"), tmp_path / "none")
    assert untimed["target"] is None
    # A run that stopped at its target is not another target's run: the same dir refuses it.
    with pytest.raises(ValueError, match=r"trainer\.target_acc: 0\.001 there, 0\.99 now"):
        train(compose_cfg(*base, "trainer.target_acc=0.99", "trainer.stop_at_target=true"), tmp_path / "stop")
    # Without stopping, a target only times the run: the same run answers a new one from its history.
    retimed = train(compose_cfg(*base, "trainer.epochs=1", "trainer.target_acc=0.001"), tmp_path / "none")
    assert retimed["history"] == untimed["history"] and retimed["target"]["acc"] == 0.001 and retimed["target"]["reached"]
    assert json.loads((tmp_path / "none" / "results.json").read_text())["target"] == retimed["target"]


def test_a_reused_run_measures_the_latencies_it_lacks(compose_cfg, tmp_path, monkeypatch, caplog):
    """latency_batch_sizes=[1,8] on a finished run dir reused it and silently kept only batch 1's latency."""
    import experiments.train as train_module

    base = ("data=synthetic", "data.train_size=64", "data.test_size=32", "trainer=smoke", "logger=none")
    first = train(compose_cfg(*base), tmp_path)
    assert set(first["cost"]["latency_ms"]) == {"1"} and first["cost"]["latency_device"] == "cpu"
    assert set(first["cost"]["latency_load_avg"]) == {"1"} and first["cost"]["latency_load_avg"]["1"] == pytest.approx(
        os.getloadavg()[0], abs=5
    )
    again = train(compose_cfg(*base, "latency_batch_sizes=[1,8]"), tmp_path)
    assert again["history"] == first["history"] and again["cost"]["latency_ms"]["1"] == first["cost"]["latency_ms"]["1"]
    assert again["cost"]["latency_ms"]["8"] > 0 and again["config"]["latency_batch_sizes"] == [1, 8]
    assert (
        set(again["cost"]["latency_load_avg"]) == {"1", "8"}
        and again["cost"]["latency_load_avg"]["1"] == first["cost"]["latency_load_avg"]["1"]
    )
    assert json.loads((tmp_path / "results.json").read_text())["cost"]["latency_ms"] == again["cost"]["latency_ms"]
    # Measured on another device: not mixed into one table, and said so.
    record = json.loads((tmp_path / "results.json").read_text())
    record["cost"]["latency_device"] = "cuda:0"
    (tmp_path / "results.json").write_text(json.dumps(record))
    monkeypatch.setattr(train_module, "measure_latency", lambda *a, **k: pytest.fail("measured on the wrong device"))
    with caplog.at_level("WARNING", logger="convlab"):
        third = train(compose_cfg(*base, "latency_batch_sizes=[1,8,32]"), tmp_path)
    assert "32" not in third["cost"]["latency_ms"] and "batch size(s) 32 not measured" in caplog.text and "cuda:0" in caplog.text


def test_lr_schedules():
    total, warmup = 100, 10
    assert lr_factor(0, total, warmup, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, total, warmup, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, total, warmup, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, total, warmup, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, total, warmup, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, total, warmup, "onecycle", 0.0) == pytest.approx(0.5)
    assert lr_factor(50, total, 0, "constant", 1.0) == 1.0


def test_weight_decay_skips_norms_and_biases(compose_cfg):
    model = build_model("separable", image_size=32, norm="batchnorm")
    optimizer = build_optimizer(model, compose_cfg().optim)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    norm_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert norm_ids <= {id(p) for p in no_decay["params"]}
    assert optimizer.defaults["nesterov"] is True


def _bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():  # running statistics far from any one batch's, so train-mode and eval-mode outputs differ
        model[1].running_mean.uniform_(-2, 2)
        model[1].running_var.uniform_(0.1, 4)
    return model


def test_evaluate_runs_in_eval_mode_and_leaves_the_model_untouched():
    from experiments.train import evaluate

    model = _bn_model()
    batches = [(torch.randn(n, 3, 8, 8), torch.randint(0, 3, (n,))) for n in (4, 4, 2)]  # a partial last batch
    running_mean = model[1].running_mean.clone()
    first = evaluate(model, batches, torch.device("cpu"), "fp32")
    assert torch.equal(model[1].running_mean, running_mean) and model.training  # back in train mode, statistics kept
    assert evaluate(model, batches, torch.device("cpu"), "fp32") == first
    model.eval()
    assert evaluate(model, batches, torch.device("cpu"), "fp32") == first and not model.training  # eval mode kept too
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in batches)
        loss = sum(torch.nn.functional.cross_entropy(model(x), y, reduction="sum").item() for x, y in batches)
    assert first["acc"] == pytest.approx(correct / 10) and first["loss"] == pytest.approx(loss / 10, rel=1e-5)


def test_seed_everything_sets_the_model_init(compose_cfg):
    from experiments.config import model_from_config
    from experiments.train import seed_everything

    cfg = compose_cfg("data=synthetic")

    def weights(seed: int) -> list[torch.Tensor]:
        seed_everything(seed)
        return [p.detach().clone() for p in model_from_config(cfg).parameters()]

    zero, one, zero_again = weights(0), weights(1), weights(0)
    assert all(torch.equal(a, b) for a, b in zip(zero, zero_again))
    assert not all(torch.equal(a, b) for a, b in zip(zero, one))


def test_best_epoch_is_the_epoch_of_the_highest_test_acc(compose_cfg, tmp_path):
    cfg = compose_cfg("data=synthetic", "data.train_size=256", "data.test_size=64", "trainer=smoke", "trainer.max_steps=null",
                      "trainer.epochs=3", "logger=none")  # fmt: skip
    record = train(cfg, tmp_path)
    accs = [h["test_acc"] for h in record["history"]]
    assert len(accs) == 3 and len(set(accs)) > 1, accs  # otherwise min and max would pick the same epoch
    assert record["final"]["best_by"] == "test"
    assert record["final"]["best_epoch"] == record["history"][accs.index(max(accs))]["epoch"]


def test_train_loss_is_the_per_example_mean(compose_cfg, tmp_path):
    """10 classes, random labels: the mean cross-entropy after 3 steps is near ln 10 = 2.3, not divided by the batch size."""
    record = train(compose_cfg("data=synthetic", "data.test_size=32", "trainer=smoke", "logger=none"), tmp_path)
    assert record["config"]["data"]["num_classes"] == 10
    assert 1 < record["history"][0]["train_loss"] < 5


def test_a_bad_config_leaves_the_run_dir_alone(compose_cfg, tmp_path):
    """resume=never sets an earlier run aside: a config that is refused must not have moved it first."""
    base = ("data=synthetic", "trainer=smoke", "logger=none")
    assert train(compose_cfg(*base), tmp_path)["status"] == "completed"
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert "results.json" in files and any(name.startswith("checkpoint-") for name in files)
    with pytest.raises(ValueError, match=r"trainer\.precision='fp8' is not valid; choose from"):
        train(compose_cfg(*base, "resume=never", "trainer.precision=fp8"), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files
    assert not (tmp_path / "previous").exists()


def test_read_json_is_none_for_what_is_no_record(tmp_path):
    from experiments.records import read_json

    for name, text in (("list", "[1, 2]"), ("number", "3"), ("deep", "[" * 200_000 + "]" * 200_000)):
        (tmp_path / name).write_text(text)
        assert read_json(tmp_path / name) is None, name


def test_a_completed_record_that_lacks_its_results_is_not_reused(compose_cfg, tmp_path, caplog):
    """results.json says completed but final is null (a hand edit, a bad merge): the run goes on from its checkpoints."""
    base = ("data=synthetic", "trainer=smoke", "logger=none")
    first = train(compose_cfg(*base), tmp_path)
    broken = {**first, "final": None}
    (tmp_path / "results.json").write_text(json.dumps(broken))
    with caplog.at_level("WARNING", logger="convlab"):
        again = train(compose_cfg(*base), tmp_path)
    assert "says completed but final=None is not a mapping: it is not reused" in caplog.text
    assert again["status"] == "completed" and again["final"]["test_acc"] == first["final"]["test_acc"]
    assert json.loads((tmp_path / "results.json").read_text())["final"] == again["final"]


def test_resume_from_files_that_are_not_checkpoints_is_one_line(compose_cfg, tmp_path, caplog):
    """A list saved with torch.save, a dict without the optimizer: were AttributeError / KeyError tracebacks."""
    from experiments.train import check_resume

    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"model": {}, "epoch": 1}, tmp_path / "partial.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, warned in (("list.pt", "is not a convlab checkpoint (a list, not a dict)"), ("partial.pt", "(no optimizer, scaler, step"),
                         ("empty.pt", "is unreadable (")):  # fmt: skip
        caplog.clear()
        with caplog.at_level("WARNING", logger="convlab"), pytest.raises(ValueError, match=f"resume='{tmp_path / name}' holds no loadable"):
            check_resume(compose_cfg("data=synthetic", "trainer=smoke", "logger=none", f"resume={tmp_path / name}"))
        assert warned in caplog.text and "\x1b[" not in caplog.text


def test_a_checkpoint_of_the_same_config_that_does_not_fit_the_model_is_recorded(compose_cfg, tmp_path):
    base = ("data=synthetic", "trainer=smoke", "logger=none", "trainer.epochs=2", "trainer.max_steps=null", "data.train_size=64")
    train(compose_cfg(*base, "trainer.epochs=1"), tmp_path)
    (checkpoint,) = (tmp_path).glob("checkpoint-*.pt")
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["trainer"]["epochs"] = 2
    state["model"] = {k: v[..., :1] if v.dim() > 1 else v for k, v in state["model"].items()}  # other shapes
    torch.save(state, checkpoint)
    (tmp_path / "results.json").unlink()  # a run stopped after epoch 1, to go on to 2
    with pytest.raises(
        ValueError, match=r"checkpoint .*checkpoint-epoch0001\.pt does not fit this model \(Error\(s\) in loading state_dict"
    ):
        train(compose_cfg(*base), tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "failed" and "does not fit this model" in record["reason"]


def test_a_latency_batch_without_memory_leaves_the_trained_run_completed(compose_cfg, tmp_path, monkeypatch, caplog):
    """latency_batch_sizes=[1,100000]: the memory ran out after training, and the whole run was recorded as failed."""
    import experiments.train as train_module

    real = train_module.measure_latency

    def no_memory_for_large_batches(model, shape, *args, **kwargs):
        if shape[0] > 8:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")
        return real(model, shape, *args, **kwargs)

    monkeypatch.setattr(train_module, "measure_latency", no_memory_for_large_batches)
    with caplog.at_level("WARNING", logger="convlab"):
        record = train(compose_cfg("data=synthetic", "trainer=smoke", "logger=none", "latency_batch_sizes=[1,100000]"), tmp_path)
    assert record["status"] == "completed" and set(record["cost"]["latency_ms"]) == {"1"}
    assert record["cost"]["latency_errors"]["100000"].startswith("out of memory: can't allocate memory")
    assert "latency at batch size 100000 not measured: out of memory" in caplog.text
    monkeypatch.setattr(train_module, "measure_latency", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    (tmp_path / "bug").mkdir()
    with pytest.raises(RuntimeError, match="a bug"):  # anything else is not swallowed
        train(compose_cfg("data=synthetic", "trainer=smoke", "logger=none"), tmp_path / "bug")


def test_resume_never_twice_says_what_it_deletes(compose_cfg, tmp_path, caplog):
    """One earlier run is kept: the one before it went without a word."""
    base = ("data=synthetic", "trainer=smoke", "logger=none", "resume=never")
    train(compose_cfg(*base, "seed=1"), tmp_path)
    train(compose_cfg(*base, "seed=2"), tmp_path)
    assert "is replaced" not in caplog.text
    with caplog.at_level("WARNING", logger="convlab"):
        train(compose_cfg(*base, "seed=3"), tmp_path)
    assert f"{tmp_path / 'results.previous.json'} (the run before the earlier one) is replaced" in caplog.text
    assert f"checkpoint(s) of the run before the earlier one are deleted from {tmp_path / 'previous'}" in caplog.text
    assert json.loads((tmp_path / "results.previous.json").read_text())["seed"] == 2

"""The code paths that only run on a GPU, checked without one.

What runs differently on CUDA is checked by its device-agnostic part: copies to the "meta"
device stand in for copies to a GPU (both are seen by a dispatch mode), and the few
``torch.cuda`` calls are replaced by stand-ins that record how they were called.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from experiments import baseline, bench, bench_train
from experiments.data import FolderLoader, Split, TensorLoader, load_data
from experiments.train import check_config, resolve_device, train

META = torch.device("meta")
TRAIN_PY = str(Path(__file__).resolve().parent.parent / "experiments" / "train.py")


class _HostCopies(TorchDispatchMode):
    """Every copy from the CPU to another device, with its ``non_blocking`` flag."""

    def __init__(self) -> None:
        super().__init__()
        self.non_blocking: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" and kwargs.get("device") not in (None, args[0].device):
            self.non_blocking.append(bool(kwargs.get("non_blocking")))
        return func(*args, **kwargs)


def _split(n: int = 8) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8, generator=g), torch.arange(n) % 3)


@pytest.mark.parametrize("kind", ["tensor", "folder"])
def test_loaders_copy_to_the_device_without_waiting_for_it(kind):
    """Index, crop offsets and flips are drawn on the CPU and copied to the device each batch.

    A blocking copy to a GPU waits until the device has run everything queued (cudaStreamSynchronize),
    so each step would wait for the one before: every copy must be non_blocking.
    """
    options = {"device": META, "mean": [0.5] * 3, "std": [0.25] * 3, "seed": 0, "channels_last": True}
    if kind == "tensor":
        loader = TensorLoader(_split(), 4, train=True, image_size=6, crop_padding=2, flip=True, **options)
    else:
        dataset = [(image, int(label)) for image, label in zip(_split().images, _split().labels)]
        loader = FolderLoader(dataset, 4, train=True, flip=True, workers=0, **options)
    with _HostCopies() as copies:
        batches = list(loader)
    assert len(batches) == 2 and all(x.device == y.device == META for x, y in batches)
    assert copies.non_blocking and all(copies.non_blocking), copies.non_blocking


class _TensorFromHostData(TorchFunctionMode):
    """``torch.tensor(...)`` calls made by experiments/train.py itself."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = sys._getframe(1).f_code
        if func is torch.tensor and caller.co_filename == TRAIN_PY:
            self.calls.append(caller.co_name)
        return func(*args, **(kwargs or {}))


def test_training_and_evaluation_build_no_tensor_from_host_data(compose_cfg, tmp_path):
    """``torch.tensor(n, device=cuda)`` is a blocking host-to-device copy: a device sync per step and per eval batch."""
    cfg = compose_cfg("data=synthetic", "trainer=smoke", "logger=none", "latency_batch_sizes=[]")
    with _TensorFromHostData() as mode:
        record = train(cfg, tmp_path)
    assert record["status"] == "completed"
    assert record["history"][-1]["test_acc"] is not None  # evaluate ran
    assert mode.calls == []


def test_cuda_timer_records_its_events_on_the_timed_devices_stream(monkeypatch):
    """On cuda:1 while cuda:0 is the current device, events on the current stream would time none of the work."""
    recorded = []

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            pass

        def record(self, stream=None) -> None:
            recorded.append(stream)

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end) -> float:
            return 2.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", torch.device(device)))
    device = torch.device("cuda", 1)
    assert bench._timer(device)(lambda: None) == pytest.approx(0.002)
    assert recorded == [("stream of", device)] * 2


def _fake_gpu(monkeypatch, major: int) -> None:
    """torch.cuda as a one-GPU machine whose GPU has compute capability ``major``.x and can emulate bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device=None: True, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU sm_{major}0")
    monkeypatch.setattr(torch.version, "hip", None)


def test_bf16_is_refused_on_a_gpu_that_would_only_emulate_it(monkeypatch, compose_cfg):
    """Before Ampere (sm_80) torch's default check says yes to bf16 because it can emulate it, slowly."""
    cfg = compose_cfg("trainer.precision=bf16")
    _fake_gpu(monkeypatch, major=7)
    with pytest.raises(ValueError, match="bf16 is not supported by GPU sm_70"):
        check_config(cfg, torch.device("cuda"))
    _fake_gpu(monkeypatch, major=8)
    check_config(cfg, torch.device("cuda"))


def test_bf16_is_checked_on_the_run_device_not_the_current_one(monkeypatch, compose_cfg):
    """device=cuda:1 on a machine whose current GPU (cuda:0) is an sm_80 and cuda:1 an sm_70."""
    cfg = compose_cfg("trainer.precision=bf16")
    _fake_gpu(monkeypatch, major=8)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    majors = {0: 8, 1: 7}
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=majors[torch.device(device).index or 0])
    )
    check_config(cfg, torch.device("cuda", 0))
    with pytest.raises(ValueError, match="bf16 is not supported"):
        check_config(cfg, torch.device("cuda", 1))


def test_a_gpu_index_the_machine_lacks_is_a_value_error(monkeypatch):
    _fake_gpu(monkeypatch, major=8)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"device='cuda:1' but this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        resolve_device("cuda:1")


def test_baseline_trains_on_the_device_convlab_trains_on(monkeypatch, compose_cfg):
    """The train suite's ratio compares two recipes on one machine: the baseline model must not stay on the CPU."""
    cfg = compose_cfg("data=synthetic", "data.train_size=64", "data.test_size=16", "trainer=smoke", "logger=none", "device=meta")
    seen = {}

    def train_baseline(model, loader, optimizer, lr_at, **kwargs):
        seen.update(model=model, loader=loader, **kwargs)
        return {}

    monkeypatch.setattr(bench_train, "train_baseline", train_baseline)
    bench_train._baseline(cfg, load_data(cfg.data, seed=cfg.seed), steps=2, warmup=1)
    assert {p.device for p in seen["model"].parameters()} == {META}
    assert seen["device"] == META
    assert seen["loader"].pin_memory is False  # pinned memory only for a CUDA device


def _sync_recorder(monkeypatch, module) -> list:
    events: list = []
    monkeypatch.setattr(module, "sync", lambda device: events.append(("sync", torch.device(device))))
    return events


def test_baseline_timing_waits_for_the_device_at_both_ends(monkeypatch):
    """A GPU runs the steps after the CPU queued them: without a sync the warm-up leaks in and the last steps fall out."""
    events = _sync_recorder(monkeypatch, baseline)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    model.register_forward_hook(lambda *_: events.append("step"))
    loader = [(torch.randn(2, 3, 2, 2), torch.tensor([0, 1])) for _ in range(3)]
    stats = baseline.train_baseline(model, loader, torch.optim.SGD(model.parameters()), lambda step: 0.1, warmup_steps=1)
    cpu = ("sync", torch.device("cpu"))
    assert events == ["step", cpu, "step", "step", cpu]
    assert stats["steps"] == 3 and stats["img_per_s"] > 0


def test_convlab_throughput_starts_its_clock_after_the_warm_up_ran(monkeypatch, compose_cfg):
    cfg = compose_cfg("data=synthetic", "data.train_size=64", "data.test_size=16", "trainer=smoke", "logger=none", "device=cpu")
    events = _sync_recorder(monkeypatch, bench_train)
    real_step = bench_train.train_step

    def train_step(*args, **kwargs):
        events.append("step")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(bench_train, "train_step", train_step)
    result = bench_train._ours_throughput(cfg, load_data(cfg.data, seed=cfg.seed), torch.device("cpu"), steps=2, warmup=1)
    assert events == ["step", ("sync", torch.device("cpu")), "step", "step"]
    assert result["steps"] == 2 and result["img_per_s"] > 0


def test_kernel_suites_compare_ieee_fp32_on_a_gpu_and_restore_the_flags():
    """cuDNN runs fp32 convolutions as TF32 by default: the pointwise and blocks suites switch both
    sides to IEEE fp32 and put the flags back; the train suite keeps torch's defaults. (The flags
    can be set without a GPU.)"""
    from experiments.bench import IEEE_FP32_SUITES, fp32_math

    cuda = torch.device("cuda")
    before = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    with fp32_math(cuda, True) as said:
        assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == ("ieee", "ieee")
        assert said.startswith("ieee")
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
    with fp32_math(cuda, False) as said:
        assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
        assert said.startswith("torch defaults")
    assert set(IEEE_FP32_SUITES) == {"pointwise", "blocks"}

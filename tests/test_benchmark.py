"""Benchmarks: the suites' JSON structure and arithmetic (never their speed), the CLI, and pointwise_conv2d's fast paths.

Every check here is arithmetic or structure: FLOPs from closed forms, bytes moved by hand,
intensity, GFLOP/s and % of peak recomputed from the recorded times. No test asserts a speed.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

from experiments import bench
from experiments.bench import (
    BLOCK_SHAPES,
    POINTWISE_SHAPES,
    SUITES,
    BenchOptions,
    bytes_moved,
    run_benchmarks,
    summarize_times,
    time_interleaved,
)
from experiments.cost import measure_cost
from models import BLOCKS, ConvNormAct, PointwiseConv2d, pointwise_conv2d
from models.functional import FOLD_MAX_PIXELS, _onednn_linear_dtypes

from .conftest import assert_one_line_error, run_script

TINY = BenchOptions(device="cpu", size="tiny", dtypes=("fp32", "bf16"), malloc="default")
RECORD_KEYS = ("device", "device_name", "threads", "dtype", "torch")


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    """Every registered suite, run once at size=tiny through the library."""
    out = tmp_path_factory.mktemp("bench")
    return run_benchmarks("all", TINY, out=out), out


def _close(got: float, want: float) -> None:
    assert got == pytest.approx(want, rel=1e-9), (got, want)


def _check_record(row: dict, dtype: str) -> None:
    for key in RECORD_KEYS:
        assert key in row, key
    assert row["device"] == "cpu" and row["dtype"] == dtype and row["torch"] == torch.__version__
    assert isinstance(row["threads"], int) and row["threads"] >= 1 and row["device_name"]


def _check_rate(stats: dict, flops: int, peak: float) -> None:
    """GFLOP/s = flops / median time; % of peak = achieved / peak x 100; the quartiles bracket the median."""
    _close(stats["gflops"], flops / (stats["median_ms"] / 1e3) / 1e9)
    _close(stats["pct_peak"], stats["gflops"] / peak * 100)
    assert stats["min_ms"] <= stats["q1_ms"] <= stats["median_ms"] <= stats["q3_ms"]
    _close(stats["iqr_ms"], stats["q3_ms"] - stats["q1_ms"])


def test_all_runs_every_registered_suite_and_writes_files(outcome):
    result, out = outcome
    assert result["suite"] == "all" and list(result["reports"]) == list(SUITES)
    for name, report in result["reports"].items():
        assert (out / f"{name}.json").is_file() and (out / f"{name}.md").is_file()
        assert json.loads((out / f"{name}.json").read_text())["suite"] == name
        assert report["env"]["torch"] == torch.__version__ and report["env"]["device"] == "cpu"
        assert set(report["peak"]) == {"fp32", "bf16"}
        for dtype, peak in report["peak"].items():
            _close(peak["gflops"], peak["flops"] / (peak["median_ms"] / 1e3) / 1e9)
            assert peak["flops"] == 2 * peak["n"] ** 3
            # The peak is the fastest product torch has here: oneDNN's beside torch.matmul where this torch has it.
            want = {"torch.matmul", "onednn"} if bench.DTYPES[dtype] in _onednn_linear_dtypes() else {"torch.matmul"}
            assert set(peak["backends"]) == want
            assert peak["gflops"] == max(b["gflops"] for b in peak["backends"].values())
            assert peak["backends"][peak["backend"]]["gflops"] == peak["gflops"]
        bw = report["bandwidth"]
        _close(bw["gb_per_s"], bw["bytes"] / (bw["median_ms"] / 1e3) / 1e9)
        markdown = (out / f"{name}.md").read_text()
        assert markdown.count("\n| ") >= len(report["results"])  # a table row per result
        assert report["fp32_math"] == "ieee (cpu)" and "fp32 math ieee (cpu)" in markdown
    assert (out / "blocks_roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pointwise_arithmetic(outcome):
    report = outcome[0]["reports"]["pointwise"]
    rows = report["results"]
    # Every shape x dtype x memory format x pass, once.
    assert len(rows) == len(POINTWISE_SHAPES["tiny"]) * 2 * 2 * 2
    assert {(r["layer"], r["dtype"], r["memory_format"], r["pass"]) for r in rows} == {
        (label, d, f, p)
        for _, label, *_ in POINTWISE_SHAPES["tiny"]
        for d in ("fp32", "bf16")
        for f in ("nchw", "channels_last")
        for p in ("fwd", "fwd+bwd")
    }
    for row in rows:
        _check_record(row, row["dtype"])
        macs = row["n"] * row["c_in"] * row["c_out"] * row["h"] * row["w"]  # pointwise: N Cin Cout H W
        assert row["macs"] == macs
        assert row["flops"] == (2 if row["pass"] == "fwd" else 6) * macs  # FLOPs = 2 x MACs, x3 for fwd+bwd
        peak = report["peak"][row["dtype"]]["gflops"]
        assert row["peak_gflops"] == peak
        assert set(row["timings"]) == {"ours", "torch", "linear"}
        for stats in row["timings"].values():
            _check_rate(stats, row["flops"], peak)
        t = row["timings"]
        _close(row["speed_ratio_ours_vs_torch"], t["torch"]["median_ms"] / t["ours"]["median_ms"])
        _close(row["speed_ratio_linear_vs_torch"], t["torch"]["median_ms"] / t["linear"]["median_ms"])
        assert row["max_abs_diff_vs_torch"] < (1e-4 if row["dtype"] == "fp32" else 0.1)  # it timed the right computation
        _close(row["speed_ratio_ours_vs_torch_min"], t["torch"]["min_ms"] / t["ours"]["min_ms"])
        # Each contender timed once per pass; its time is the median of the passes' medians, each pass's ratio from them.
        assert row["passes"] == TINY.passes == 3
        for stats in t.values():
            assert len(stats["pass_median_ms"]) == 3 and stats["median_ms"] == statistics.median(stats["pass_median_ms"])
            _close(stats["pass_spread"], (max(stats["pass_median_ms"]) - min(stats["pass_median_ms"])) / stats["median_ms"])
        want = [a / b for a, b in zip(t["torch"]["pass_median_ms"], t["ours"]["pass_median_ms"], strict=True)]
        assert row["pass_speed_ratios_ours_vs_torch"] == pytest.approx(want, rel=1e-12)
    # Every summary entry recomputed from its rows: one per (dtype, memory format, pass).
    keys = {(r["dtype"], r["memory_format"], r["pass"]) for r in rows}
    assert set(report["summary"]) == {f"{d} {f} {p}" for d, f, p in keys}
    for dtype, fmt, pass_name in keys:
        summary = report["summary"][f"{dtype} {fmt} {pass_name}"]
        chosen = [r for r in rows if (r["dtype"], r["memory_format"], r["pass"]) == (dtype, fmt, pass_name)]
        ratios = [r["speed_ratio_ours_vs_torch"] for r in chosen]
        worst = min(chosen, key=lambda r: r["speed_ratio_ours_vs_torch"])
        assert summary["shapes"] == len(chosen) == len(POINTWISE_SHAPES["tiny"])
        assert summary["shapes_at_least_0.95x"] == sum(r >= 0.95 for r in ratios)
        per_pass = [sum(r["pass_speed_ratios_ours_vs_torch"][i] >= 0.95 for r in chosen) for i in range(3)]
        assert summary["shapes_at_least_0.95x_per_pass"] == per_pass
        _close(summary["min_speed_ratio_ours_vs_torch"], min(ratios))
        assert summary["min_at"] == worst["layer"]
        _close(summary["median_speed_ratio_ours_vs_torch"], statistics.median(ratios))
        _close(summary["min_speed_ratio_ours_vs_torch_by_min_times"], min(r["speed_ratio_ours_vs_torch_min"] for r in chosen))
        large = {
            r["layer"]: round(r["timings"]["ours"]["pct_peak"], 1)
            for r in chosen
            if r["group"] == "large output" or (r["group"] == "mobilenet_v1" and r["c_in"] >= 512)
        }
        assert summary["ours_pct_peak_large"] == large and list(large) == ["16->48 @4"]


def test_pointwise_summary_by_hand():
    """Three shapes with ratios chosen so that median != mean, one exactly at 0.95x, and the worst by min times elsewhere."""

    def row(layer: str, ours_median: float, ours_min: float, c_in: int = 8, group: str = "small output") -> dict:
        timings = {"ours": {"median_ms": ours_median, "min_ms": ours_min, "pct_peak": 12.34}, "torch": {"median_ms": 1.0, "min_ms": 1.0}}
        return {"dtype": "fp32", "memory_format": "nchw", "pass": "fwd", "layer": layer, "group": group, "c_in": c_in,
                "timings": timings, "speed_ratio_ours_vs_torch": 1.0 / ours_median, "speed_ratio_ours_vs_torch_min": 1.0 / ours_min}  # fmt: skip

    rows = [row("a", 1 / 0.95, 1 / 3.0), row("b", 1 / 0.5, 1 / 2.0), row("c", 1 / 4.0, 1 / 0.25, 512, "mobilenet_v1"),
            row("d", 1 / 0.92, 1.0), row("e", 1 / 2.0, 1.0, 960, "mobilenet_v2")]  # fmt: skip
    rows[0]["speed_ratio_ours_vs_torch"] = 0.95  # exactly at the threshold, not 1 / (1 / 0.95)
    (summary,) = bench._pointwise_summary(rows).values()
    assert summary["shapes"] == 5 and summary["shapes_at_least_0.95x"] == 3  # 0.95, 2 and 4 count; 0.92 and 0.5 do not
    assert (summary["min_speed_ratio_ours_vs_torch"], summary["min_at"]) == (0.5, "b")
    assert summary["median_speed_ratio_ours_vs_torch"] == 0.95  # of 0.5, 0.92, 0.95, 2, 4; the mean is 1.674
    assert summary["min_speed_ratio_ours_vs_torch_by_min_times"] == 0.25  # at c, whose median ratio is the best
    assert summary["ours_pct_peak_large"] == {"c": 12.3}  # MobileNet v1's c_in >= 512 is a large shape, v2's 960 is not


def test_merge_passes_by_hand():
    """A contender's times over three passes: the median of the medians (not of all calls), the least minimum,
    the medians of the quartiles (the IQR between them), all calls counted, page faults weighted by calls, and the passes' spread."""

    def run(median: float, low: float, q1: float, q3: float, repeats: int, faults: float) -> dict:
        return {"median_ms": median, "min_ms": low, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "repeats": repeats,
                "page_faults_per_call": faults, "timing": "eager"}  # fmt: skip

    passes = [
        {"ours": run(2.0, 1.5, 1.8, 2.4, 10, 0.0)},
        {"ours": run(1.0, 0.9, 0.95, 1.1, 30, 2.0)},
        {"ours": run(4.0, 0.8, 3.0, 5.0, 20, 1.0)},
    ]
    merged = bench.merge_passes(passes)["ours"]
    assert merged["median_ms"] == 2.0 and merged["pass_median_ms"] == [2.0, 1.0, 4.0]
    assert merged["min_ms"] == 0.8 and merged["q1_ms"] == 1.8 and merged["q3_ms"] == 2.4
    _close(merged["iqr_ms"], 0.6)
    assert merged["repeats"] == 60 and merged["timing"] == "eager"
    _close(merged["page_faults_per_call"], (0 * 10 + 2 * 30 + 1 * 20) / 60)
    _close(merged["pass_spread"], (4.0 - 1.0) / 2.0)


def test_passes_must_be_a_positive_int():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="passes="):
            BenchOptions(device="cpu", passes=bad)


def _closed_form_macs(block: str, n: int, c: int, k: int, hw: int) -> int:
    """Each block's MACs at stride 1 with its default options (expansion 6 and 4, no SE) by hand."""
    pixels = n * hw * hw
    projection = 0 if c == k else c * k * pixels  # the 1x1 shortcut when channels change (ResNet option B)
    mid_ir, mid_b = 6 * c, k // 4
    return {
        "standard": 9 * c * k * pixels,  # k^2 Cin Cout H W
        "depthwise": 9 * c * pixels,  # k^2 C H W
        "pointwise": c * k * pixels,  # Cin Cout H W
        "separable": 9 * c * pixels + c * k * pixels,
        "inverted_residual": (c * mid_ir + 9 * mid_ir + mid_ir * k) * pixels,  # expand 1x1, depthwise 3x3, project 1x1
        "bottleneck": (c * mid_b + 9 * mid_b * mid_b + mid_b * k) * pixels + projection,  # 1x1, 3x3, 1x1 (+ shortcut)
        "basic": (9 * c * k + 9 * k * k) * pixels + projection,  # 3x3, 3x3 (+ shortcut)
    }[block]


def test_blocks_arithmetic(outcome):
    report = outcome[0]["reports"]["blocks"]
    rows = report["results"]
    assert len(rows) == len(BLOCK_SHAPES["tiny"]) * len(BLOCKS) * 2
    bandwidth = report["bandwidth"]["gb_per_s"]
    for row in rows:
        _check_record(row, row["dtype"])
        n, c, k, hw = row["n"], row["c_in"], row["c_out"], row["h"]
        assert row["macs"] == measure_cost(BLOCKS[row["block"]](c, k, 1), (n, c, hw, hw))["macs"]
        closed = _closed_form_macs(row["block"], n, c, k, hw)
        assert row["macs"] == closed, (row["block"], row["macs"], closed)
        assert row["flops"] == 2 * row["macs"]
        assert row["bytes"] == row["bytes_read"] + row["bytes_written"] == sum(row["bytes_by_op"].values())
        _close(row["intensity"], row["flops"] / row["bytes"])
        peak = report["peak"][row["dtype"]]["gflops"]
        _close(row["attainable_gflops"], min(peak, row["intensity"] * bandwidth))
        _check_rate(row["fwd"], 2 * row["macs"], peak)
        _check_rate(row["fwd+bwd"], 6 * row["macs"], peak)
        _close(row["pct_attainable_fwd"], 100 * row["fwd"]["gflops"] / row["attainable_gflops"])
    # The pointwise block by hand: conv (in + weight + out), BatchNorm (in + 4 vectors + out), in-place ReLU (in + out).
    for dtype, size in (("fp32", 4), ("bf16", 2)):
        row = next(r for r in rows if r["block"] == "pointwise" and r["dtype"] == dtype)
        act_in, act_out = row["n"] * row["c_in"] * row["h"] * row["w"], row["n"] * row["c_out"] * row["h"] * row["w"]
        conv = act_in + row["c_in"] * row["c_out"] + act_out
        norm = act_out + 4 * row["c_out"] + act_out
        assert row["bytes"] == size * (conv + norm + 2 * act_out)


def test_train_suite_fields(outcome):
    """The train suite compares convlab's step with the tutorial baseline: required keys, consistent ratio."""
    (row,) = outcome[0]["reports"]["train"]["results"]
    for key in ("model", "batch_size", "device", "project_img_s", "baseline_img_s", "ratio"):
        assert key in row, key
    _check_record(row, "bf16")
    assert row["model"] == "separable" and row["batch_size"] == 32
    _close(row["ratio"], row["project_img_s"] / row["baseline_img_s"])
    assert row["baseline"]["precision"] == "fp32" and row["baseline"]["channels_last"] is False


def test_train_suite_full_recipe_reports_both_accuracies(tmp_path, monkeypatch):
    """The whole-recipe row reports what each side's run produced.

    At size=tiny the data are synthetic (random images, random labels: 256 train, 64 test), so
    neither side can beat chance and no accuracy level is asserted. What holds exactly instead:
    each accuracy is a count out of the 64 test images; convlab's figures are its trainer's record;
    the baseline's accuracy is its trained model's argmax on the normalized test images, recounted
    here; both sides ran every epoch; wall times cover the images the img/s figures count.
    """
    from experiments import bench_train

    seen: dict = {}

    def load_data(cfg, seed):
        seen["data"] = real_load_data(cfg, seed=seed)
        return seen["data"]

    def train(cfg, run_dir):
        seen["cfg"], seen["record"] = cfg, real_train(cfg, run_dir)
        return seen["record"]

    def baseline(cfg, data, *, steps, warmup, epochs=1):
        model, stats = real_baseline(cfg, data, steps=steps, warmup=warmup, epochs=epochs)
        if steps is None:  # the whole-recipe run, not the throughput one
            seen["baseline"] = (model, stats)
        return model, stats

    real_load_data, real_train, real_baseline = bench_train.load_data, bench_train.train, bench_train._baseline
    monkeypatch.setattr(bench_train, "load_data", load_data)
    monkeypatch.setattr(bench_train, "train", train)
    monkeypatch.setattr(bench_train, "_baseline", baseline)
    options = BenchOptions(device="cpu", size="tiny", dtypes=("fp32",), malloc="default", train={"full": True})
    (row,) = run_benchmarks("train", options, out=tmp_path)["reports"]["train"]["results"]
    full, cfg, record, data = row["full"], seen["cfg"], seen["record"], seen["data"]
    assert (cfg.data.name, len(data.train), len(data.test), cfg.trainer.batch_size) == ("synthetic", 256, 64, 32)
    epochs = cfg.trainer.epochs
    assert full["epochs"] == epochs == 4 and len(record["history"]) == epochs
    for key in ("project_test_acc", "baseline_test_acc"):
        correct = full[key] * 64
        assert 0 <= correct <= 64 and correct == round(correct), (key, full[key])  # a count of the 64 test images

    # convlab's side: the trainer's own record, final epoch.
    assert full["project_test_acc"] == record["final"]["test_acc"] == record["history"][-1]["test_acc"]
    assert full["project_wall_s"] == record["final"]["wall_seconds"] >= sum(h["seconds"] for h in record["history"]) > 0
    _close(full["project_img_s"], sum(h["img_per_s"] for h in record["history"]) / epochs)

    # the baseline: every step of every epoch, and its accuracy recounted from its model.
    model, stats = seen["baseline"]
    steps_per_epoch = len(data.train) // cfg.trainer.batch_size
    assert stats["steps"] == epochs * steps_per_epoch
    mean, std = torch.tensor(list(cfg.data.mean)).view(1, -1, 1, 1), torch.tensor(list(cfg.data.std)).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model.eval()(((data.test.images.float() / 255) - mean) / std)
    assert full["baseline_test_acc"] * 64 == (logits.argmax(1) == data.test.labels).sum().item()
    assert full["baseline_img_s"] == stats["img_per_s"] > 0
    timed_images = (stats["steps"] - row["warmup_steps"]) * cfg.trainer.batch_size
    assert full["baseline_wall_s"] > timed_images / full["baseline_img_s"]
    _close(full["ratio"], full["project_img_s"] / full["baseline_img_s"])

    md = (tmp_path / "train.md").read_text()
    assert f"trainer=quick, {epochs} epochs): speed at equal accuracy" in md
    assert f"| convlab | {100 * full['project_test_acc']:.2f}% |" in md
    assert f"| baseline | {100 * full['baseline_test_acc']:.2f}% |" in md


def test_peak_drift_warns_only_past_ten_percent(outcome):
    """A run whose matmul peak moved > 10% from start to end says '% peak' is unreliable; a steady one does not."""
    report = dict(outcome[0]["reports"]["pointwise"])
    start = {d: p["gflops"] for d, p in report["peak"].items()}
    report["peak_after"] = {d: 1.05 * v for d, v in start.items()}
    assert bench.peak_drift(report) == {} and "Warning" not in bench.markdown_report(report)
    report["peak_after"] = {"fp32": 1.3 * start["fp32"], "bf16": 0.8 * start["bf16"]}
    drift = bench.peak_drift(report)
    assert drift == pytest.approx({"fp32": 30.0, "bf16": -20.0})
    assert "(fp32 +30%, bf16 -20%)" in bench.markdown_report(report)


def test_bytes_moved_by_hand():
    layer = ConvNormAct(8, 16, 1)  # 1x1 conv (no bias) -> BatchNorm -> ReLU
    moved = bytes_moved(layer, torch.zeros(2, 8, 4, 4))
    x, w, y = 2 * 8 * 16, 16 * 8, 2 * 16 * 16
    assert moved["by_op"] == {"convolution": 4 * (x + w + y), "native_batch_norm": 4 * (y + 4 * 16 + y), "relu_": 4 * (y + y)}
    assert moved["read"] == 4 * (x + w + y + 4 * 16 + y) and moved["written"] == 4 * 3 * y

    class Residual(nn.Module):
        def forward(self, a: torch.Tensor) -> torch.Tensor:
            return a + a.view(-1).view(a.shape) * 2  # a view moves nothing; mul reads a, writes t; add reads a and t, writes out

    a = torch.zeros(10, dtype=torch.bfloat16)
    assert bytes_moved(Residual(), a)["bytes"] == 2 * (10 + 10 + 10 + 10 + 10)


def test_bytes_moved_counts_each_storage_once_per_op():
    """The module docstring's model: an op reads each distinct tensor argument once (``a * a`` reads ``a``
    once), but two different views of one storage are two reads, and two tensors are two."""

    class Square(nn.Module):
        def forward(self, a: torch.Tensor) -> torch.Tensor:
            return a * a

    class Halves(nn.Module):
        def forward(self, a: torch.Tensor) -> torch.Tensor:
            return a[:5] * a[5:]  # two views (no bytes), then mul reads 5 + 5 and writes 5

    class Product(nn.Module):
        def forward(self, a: torch.Tensor) -> torch.Tensor:
            return a * a.clone()  # clone reads 10, writes 10; mul reads 10 + 10, writes 10

    a = torch.ones(10, dtype=torch.bfloat16)
    square = bytes_moved(Square(), a)
    assert (square["bytes"], square["read"], square["written"], square["by_op"]) == (2 * (10 + 10), 2 * 10, 2 * 10, {"mul": 40})
    assert bytes_moved(Halves(), a)["bytes"] == 2 * (5 + 5 + 5)
    assert bytes_moved(Product(), a)["by_op"] == {"clone": 2 * (10 + 10), "mul": 2 * (10 + 10 + 10)}


def test_bandwidth_counts_a_copy_twice(monkeypatch):
    """Copying B bytes moves 2 B (read + write, as STREAM's copy counts); GB/s from the median, best from the min."""
    seen: dict = {}

    def fake_time_interleaved(fns, **kwargs):
        seen["names"] = list(fns)
        fns["copy"]()
        return {"copy": {"median_ms": 2.0, "min_ms": 1.0}}

    monkeypatch.setattr(bench, "time_interleaved", fake_time_interleaved)
    bw = bench.measure_bandwidth(torch.device("cpu"), mbytes=1)
    assert seen["names"] == ["copy"]
    assert bw["bytes"] == 2 * 2**20  # a 1 MiB fp32 tensor copied
    assert bw["gb_per_s"] == pytest.approx(2 * 2**20 / 2e-3 / 1e9) and bw["best_gb_per_s"] == pytest.approx(2 * 2**20 / 1e-3 / 1e9)
    assert (bw["median_ms"], bw["min_ms"]) == (2.0, 1.0)


@pytest.mark.parametrize("faster", ["torch.matmul", "onednn"])
def test_matmul_peak_is_the_faster_product_and_names_both(monkeypatch, faster):
    """On CPU torch.matmul (MKL) and oneDNN's product are timed together; the peak is the faster one's median, both are reported."""
    if torch.float32 not in _onednn_linear_dtypes():
        pytest.skip("this torch has no oneDNN matrix product")
    calls: dict = {}

    def fake_time_interleaved(fns, **kwargs):
        results = {name: fn() for name, fn in fns.items()}
        calls["products"] = results
        ms = {name: (1.0 if name == faster else 2.0) for name in fns}
        return {name: {"median_ms": ms[name], "min_ms": ms[name] / 2} for name in fns}

    monkeypatch.setattr(bench, "time_interleaved", fake_time_interleaved)
    peak = bench.measure_matmul_peak(torch.device("cpu"), torch.float32, n=64)
    a, b = (torch.randn(64, 64, generator=g) for g in [torch.Generator().manual_seed(0)] * 2)
    # Both contenders compute n^3 multiply-adds on the same operands: a @ b and a @ b^T.
    assert torch.allclose(calls["products"]["torch.matmul"], a @ b, atol=1e-4)
    assert torch.allclose(calls["products"]["onednn"], a @ b.t(), atol=1e-4)
    flops = 2 * 64**3
    assert peak["backend"] == faster and peak["gflops"] == pytest.approx(flops / 1e-3 / 1e9)
    assert peak["best_gflops"] == pytest.approx(flops / 0.5e-3 / 1e9)
    slower = ({"torch.matmul", "onednn"} - {faster}).pop()
    assert peak["backends"][slower]["gflops"] == pytest.approx(flops / 2e-3 / 1e9)
    line = bench._peak_source(peak)
    assert line.startswith(f"{faster}, median; best ") and f"; {slower} " in line, line


def test_cpu_name_carries_family_and_model(monkeypatch):
    """Two hosts that both say 'AMD EPYC' differ by their family and model numbers, so results can tell them apart."""
    from experiments import records

    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\nmodel name\t: other\n"
    monkeypatch.setattr(records.Path, "read_text", lambda self, *a, **k: text)
    assert records._cpu_name() == "AMD EPYC (family 26, model 2)"
    monkeypatch.setattr(records.Path, "read_text", lambda self, *a, **k: "model name\t: Some CPU\n")
    assert records._cpu_name() == "Some CPU"


def test_summarize_and_round_robin():
    stats = summarize_times([0.005, 0.001, 0.003, 0.002, 0.004])  # seconds
    assert (stats["median_ms"], stats["min_ms"], stats["q1_ms"], stats["q3_ms"], stats["repeats"]) == pytest.approx((3, 1, 2, 4, 5))
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timed = time_interleaved(fns, repeats=12, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up, in order
    rounds = [tuple(calls[i : i + 3]) for i in range(3, len(calls), 3)]
    assert len(rounds) == 12 and all(sorted(r) == ["a", "b", "c"] for r in rounds)  # each round calls each once
    assert len(set(rounds)) > 1  # in a shuffled order, not always the same one
    again: list[str] = []
    time_interleaved({name: (lambda name=name: again.append(name)) for name in "abc"}, repeats=12, warmup=1)
    assert again == calls  # seeded: the same sequence every run
    assert timed["a"]["repeats"] == timed["b"]["repeats"] == timed["c"]["repeats"] == 12
    blocked: list[str] = []
    timed = time_interleaved({name: (lambda name=name: blocked.append(name)) for name in "ab"}, repeats=6, warmup=0, block=3)
    turns = [blocked[i : i + 4] for i in range(0, len(blocked), 4)]  # a lead-in call, then 3 timed calls
    assert len(turns) == 4 and all(len(set(t)) == 1 for t in turns) and sorted(t[0] for t in turns) == ["a", "a", "b", "b"]
    assert timed["a"]["repeats"] == timed["b"]["repeats"] == 6
    with pytest.raises(ValueError, match="no times"):
        summarize_times([])


def test_graph_timing_divides_replays_and_counts_their_whole_time(monkeypatch):
    """On CUDA a timed call replays a graph of ``graph_calls`` calls: the record is one call's time, and
    min_time_s counts the replays' whole time (counting per-call times would run graph_calls times longer)."""
    clock = {"now": 0.0}

    def work():
        clock["now"] += 0.001  # every call takes 1 ms of the fake clock

    def timer(device):
        def time_one(fn):
            start = clock["now"]
            fn()
            return clock["now"] - start

        return time_one

    captured: list[int] = []

    def fake_graph(fn, device, calls):
        captured.append(calls)
        return lambda: [fn() for _ in range(calls)]

    monkeypatch.setattr(bench, "sync", lambda device: None)
    monkeypatch.setattr(bench, "_timer", timer)
    monkeypatch.setattr(bench, "cuda_graph", fake_graph)
    timed = bench.time_interleaved({"a": work}, device="cuda", repeats=2, warmup=0, min_time_s=0.1, graph_calls=10)["a"]
    assert captured == [10] and timed["timing"] == "cuda graph of 10 calls"
    assert timed["median_ms"] == pytest.approx(1.0)  # one call, not the 10 ms replay
    assert timed["repeats"] == 10  # 10 replays of 10 ms reach 0.1 s
    monkeypatch.setattr(bench, "cuda_graph", lambda fn, device, calls: None)  # capture failed: eager calls
    timed = bench.time_interleaved({"a": work}, device="cuda", repeats=2, warmup=0, min_time_s=0.0, graph_calls=10)["a"]
    assert timed["timing"] == "eager" and timed["median_ms"] == pytest.approx(1.0)
    calls: list[int] = []
    timed = bench.time_interleaved({"a": lambda: calls.append(1)}, device="cpu", repeats=3, warmup=1, graph_calls=10)["a"]
    assert timed["timing"] == "eager" and len(calls) == 4  # no graphs on the CPU
    assert "host clock" in bench.timing_method("pointwise", "cpu", {"graph_calls": 20})
    assert "CUDA graph of 20 calls" in bench.timing_method("blocks", "cuda", {"graph_calls": 20})
    assert "each eager call" in bench.timing_method("pointwise", "cuda:1", {"graph_calls": 0})
    assert "whole eager training steps" in bench.timing_method("train", "cuda", {"graph_calls": 20})
    assert "3 passes over the whole suite" in bench.timing_method("pointwise", "cpu", {"passes": 3})
    assert "passes" not in bench.timing_method("blocks", "cpu", {"passes": 3})  # only the pointwise suite makes passes


def test_registry_one_function_per_suite(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "SUITES", dict(SUITES))

    @bench.register_suite("echo")
    def echo(ctx: bench.BenchContext) -> dict:
        return {
            "results": [{**ctx.record("fp32"), "value": 1}],
            "tables": [{"title": "t", "columns": ["value"], "rows": [["1"]]}],
            "notes": [],
        }

    with pytest.raises(ValueError, match="already registered"):
        bench.register_suite("echo")(echo)
    result = bench.run_benchmarks("echo", BenchOptions(size="tiny", dtypes=("fp32",), malloc="default"), out=tmp_path)
    assert result["reports"]["echo"]["results"][0]["value"] == 1 and (tmp_path / "echo.md").is_file()
    with pytest.raises(ValueError, match=r"unknown suite 'nope'; choose from: pointwise, blocks, train, echo, all"):
        bench.run_benchmarks("nope", TINY, out=tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("size", "huge", "unknown size 'huge'"),
        ("dtypes", ("fp8",), "unknown dtype 'fp8'"),
        ("device", "tpu", "device='tpu' is not valid; choose from: auto, cpu, cuda, cuda:N"),
        ("device", "cuda:7" if torch.cuda.device_count() < 8 else "cuda:99", "device='cuda:"),  # the run's rule: cuda:N is a device
        ("malloc", "x", "malloc"),
        ("block", 0, "block=0 must be an int >= 1"),
        ("graph_calls", -1, "graph_calls=-1 must be an int >= 0"),
    ],
)
def test_bad_options(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        BenchOptions(**{field: value})


def test_cli_json(tmp_path):
    proc = run_script("benchmark.py", "suite=pointwise", "size=tiny", f"out={tmp_path}", "format=json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout is exactly one JSON object; the logs went to stderr
    assert result["suite"] == "pointwise" and list(result["reports"]) == ["pointwise"]
    assert "peak fp32" in proc.stderr
    report = result["reports"]["pointwise"]
    assert report["options"]["size"] == "tiny" and report["env"]["malloc"].startswith(("steady", "default (mallopt"))
    assert report["env"]["native"].startswith(("loaded", "off", "unavailable")), report["env"]["native"]
    assert json.loads((tmp_path / "pointwise.json").read_text())["results"] == report["results"]
    markdown = (tmp_path / "pointwise.md").read_text()
    assert f"native product {report['env']['native']}," in markdown
    batches = sorted({r["n"] for r in report["results"]})
    assert "| group |" in markdown and f"fwd (N={', '.join(map(str, batches))};" in markdown and "N=8" not in markdown  # tiny: not N=8


def test_cli_unknown_suite_one_line(tmp_path):
    assert_one_line_error(
        run_script("benchmark.py", "suite=speed", "size=tiny", f"out={tmp_path}"), "unknown suite 'speed'", "pointwise, blocks, train, all"
    )


def test_options_not_a_number_name_the_key():
    """A timing option that is not a number is named with its value, not left to int()'s own message."""
    cfg = {"device": "cpu", "threads": None, "repeats": 5, "warmup": 1, "min_time_s": 0.0, "size": "tiny", "dtypes": ["fp32"]}
    from omegaconf import OmegaConf

    assert bench.options_from_config(OmegaConf.create(cfg)).block == 1  # absent: the default
    for key, value, needle in [("block", "x", "block='x' must be an int"), ("repeats", "many", "repeats='many' must be an int"),
                               ("min_time_s", "soon", "min_time_s='soon' must be a number")]:  # fmt: skip
        with pytest.raises(ValueError, match=needle):
            bench.options_from_config(OmegaConf.create({**cfg, key: value}))


# ---------------------------------------------------------------------------------------------
# pointwise_conv2d's fast paths (models/functional.py): float64 gradients, double backward, no conv inside


def _inputs(c: int, k: int, hw: tuple[int, int], bias: bool = True, channels_last: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, c, *hw, generator=g, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    w = torch.randn(k, c, 1, 1, generator=g, dtype=torch.float64)
    b = torch.randn(k, generator=g, dtype=torch.float64) if bias else None
    return [t.requires_grad_() for t in (x, w, b) if t is not None]


PATHS = {
    # NCHW batched product, batched backward (pixels >= channels)
    "batched": (3, 4, (9, 8), True, False),
    # NCHW batched product, backward with the batch folded into the columns (channels > pixels)
    "batched-folded-backward": (70, 3, (8, 8), True, False),
    # NCHW without bias
    "batched-no-bias": (3, 4, (9, 8), False, False),
    # NCHW, fewer than FOLD_MAX_PIXELS pixels: folded into one (N*H*W, C) product
    "folded": (5, 4, (3, 5), True, False),
    # channels_last: one GEMM on the (N*H*W, C) view
    "channels-last": (5, 4, (3, 5), True, True),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_pointwise_paths_gradcheck_float64(path):
    c, k, hw, bias, channels_last = PATHS[path]
    assert (hw[0] * hw[1] < FOLD_MAX_PIXELS) == (path in ("folded", "channels-last"))
    args = _inputs(c, k, hw, bias, channels_last)
    fast = c * hw[0] * hw[1] > 1000  # the 70-channel case: a randomized check instead of the full Jacobian
    assert gradcheck(pointwise_conv2d, args, fast_mode=fast)
    assert gradgradcheck(pointwise_conv2d, args, fast_mode=True)
    torch.testing.assert_close(pointwise_conv2d(*args), F.conv2d(*args))


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", list(PATHS))
def test_pointwise_paths_use_no_convolution(path):
    c, k, hw, bias, channels_last = PATHS[path]
    args = _inputs(c, k, hw, bias, channels_last)
    with _Ops() as ops:
        torch.autograd.grad(pointwise_conv2d(*args).sum(), args)
    assert not {name for name in ops.names if "conv" in name}, ops.names
    assert ops.names & {"bmm", "baddbmm", "mm", "addmm"}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_traced_graph_is_the_counted_matmul():
    """fvcore traces: the trace takes the plain matmul path (counted by experiments.cost), with the same numbers."""
    layer = PointwiseConv2d(6, 5, impl="scratch")
    x = torch.randn(2, 6, 9, 9)
    traced = torch.jit.trace(layer, x)
    assert "aten::matmul" in str(traced.graph) and "PythonOp" not in str(traced.graph)
    torch.testing.assert_close(traced(x), layer(x))


@pytest.mark.parametrize("hw", [(9, 9), (5, 5)], ids=["batched", "folded"])
def test_pointwise_under_autocast_matches_conv2d(hw):
    """bf16 autocast: the same output dtype as F.conv2d, and a backward that follows the gradient's dtype."""
    x, w, b = (t.detach().float().requires_grad_() for t in _inputs(80, 6, hw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = pointwise_conv2d(x, w, b), F.conv2d(x, w, b)
    assert ours.dtype == ref.dtype == torch.bfloat16
    grads = torch.autograd.grad(ours.float().sum(), (x, w, b))
    want = torch.autograd.grad(ref.float().sum(), (x, w, b))
    for got, exp in zip(grads, want):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, exp, rtol=3e-2, atol=0.5)


def test_sigterm_keeps_the_finished_suites_and_says_so(tmp_path):
    """kill / a scheduler's limit mid-benchmark: one line saying what was kept; suites already written stay."""
    import signal
    import sys

    from .conftest import ROOT
    from .helpers import signal_when

    # train.full: the last suite also trains the whole recipe on both sides (tens of seconds, where blocks and train took
    # about 2 s), so SIGTERM, sent as the first suite's files appear, comes before the rest can finish: exit 0 is a failure.
    command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "suite=all", "size=tiny", "train.full=true", f"out={tmp_path}"]
    returncode, stderr = signal_when(command, (tmp_path / "pointwise.md").exists, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, f"exit status {returncode} (0: every suite finished)\n{stderr}"
    assert (
        stderr.splitlines()[-1]
        == "error: interrupted (SIGTERM); suites that finished before it are written to out; the one in progress is not"
    )
    assert json.loads((tmp_path / "pointwise.json").read_text())["results"]
    assert not (tmp_path / "train.json").exists()


def test_baseline_times_every_step_asked_for_across_epochs():
    """With fewer batches in an epoch than warm-up + timed steps, the baseline stopped at the epoch's
    end: it timed fewer steps than the record said, or none (a TypeError on img/s = None)."""
    from experiments import bench_train

    cfg = bench_train._run_config(["data=synthetic", "data.train_size=96", "data.test_size=32", "trainer=smoke", "trainer.batch_size=32",
                                   "logger=none", "device=cpu"])  # fmt: skip
    data = bench_train.load_data(cfg.data, seed=0)
    _, stats = bench_train._baseline(cfg, data, steps=5, warmup=2)  # 3 batches an epoch, 7 steps
    assert stats["steps"] == 7 and stats["img_per_s"] > 0


def test_native_status_is_cpu_only():
    """A run on another device neither builds the CPU-only native product nor reports it as loaded."""
    from experiments.bench import _native_status

    assert _native_status(torch.device("meta")) == "n/a (CPU only)"

"""scripts/profile.py through the real command line."""

from __future__ import annotations

import json

import pytest

from .conftest import assert_one_line_error, run_script


def test_profile_paper_example_text():
    proc = run_script("profile.py", "model=mobilenet_v1", "data=imagenet", "model.width=0.75", "data.image_size=192")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "input 1x3x192x192" in out and "2,585,560" in out
    for kind in ("pointwise", "depthwise", "standard", "linear"):
        assert kind in out
    assert "MACs" in out and "fvcore flops" in out


def test_profile_json_fields():
    proc = run_script("profile.py", "model=mobilenet_v1", "data=imagenet", "format=json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout is exactly one JSON object
    for key in ("model", "input_shape", "params", "macs", "fvcore_flops", "by_layer_type", "unsupported_ops", "by_operator", "by_module"):
        assert key in report
    assert report["model"] == "mobilenet_v1" and report["input_shape"] == [1, 3, 224, 224] and report["stem"] == "large"
    assert round(report["macs"] / 1e6) == 569 and round(report["params"] / 1e6, 1) == 4.2
    assert set(report["by_layer_type"]["pointwise"]) >= {"macs", "params"}


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["model=resnet19"], ["unknown model 'resnet19'", "mobilenet_v1", "separable"]),
        (["data=mnist"], ["unknown data 'mnist'", "fashion_mnist"]),
        (["model.widht=2"], ["unknown key 'model.widht'", "width"]),
        (["model.width=7"], ["width=7", "0.0 < width <= 4.0"]),
        (["model=inverted_residual", "model.expansion=0"], ["expansion=0", "1 <= expansion <= 16"]),
        (["model.se_ratio=2"], ["se_ratio=2", "0.0 <= se_ratio <= 1.0"]),
        (["model=depthwise", "model.widths=[48,64,128]"], ["cannot map 32 to 48 channels"]),
        (["model=mobilenet_v1", "data.image_size=8"], ["image_size=8", "needs image_size >= 16"]),
        (["format=xml"], ["format='xml'", "text, json"]),
        (["model.act=gelu"], ["unknown activation 'gelu'", "relu6"]),
    ],
)
def test_bad_input_one_line(args, needles):
    assert_one_line_error(run_script("profile.py", *args), *needles)


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(run_script("profile.py", f"hydra.run.dir={blocker}/run"), "not writable", str(blocker))


def test_sweep_leaves_no_empty_dirs(tmp_path):
    """profile.py writes nothing, so a -m sweep must not leave Hydra's multirun/<date>/<job>/ dirs."""
    (tmp_path / "multirun" / "earlier").mkdir(parents=True)  # a user's own sweep is not touched
    proc = run_script("profile.py", "-m", "model=standard,depthwise", "format=json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count('"model": "standard"') == 1 and proc.stdout.count('"model": "depthwise"') == 1
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == ["multirun", "multirun/earlier"], left
    # a sweep dir the user already had is not this sweep's to remove, even when it holds no files
    mine = tmp_path / "mine"
    (mine / "empty").mkdir(parents=True)
    (mine / "link").symlink_to(tmp_path / "nowhere")
    proc = run_script("profile.py", "-m", "model=standard,depthwise", "format=json", f"hydra.sweep.dir={mine}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (mine / "empty").is_dir() and (mine / "link").is_symlink()


def test_profile_says_which_stem_auto_chose():
    """model.stem=auto builds CIFAR's stride-1 stem for inputs <= 64 px, even on ImageNet: ResNet-50 at
    64 px then costs more than at 224 px. The output names the stem, so the figure is not misread."""
    small = run_script("profile.py", "model=resnet50", "data=imagenet", "data.image_size=64")
    assert small.returncode == 0, small.stderr
    assert "input 1x3x64x64, stem small (3x3 stride 1, for inputs <= 64 px)" in small.stdout
    large = run_script("profile.py", "model=resnet50", "data=imagenet", "data.image_size=64", "model.stem=large", "format=json")
    assert large.returncode == 0, large.stderr
    report = json.loads(large.stdout)
    assert report["stem"] == "large" and report["params"] == 25_557_032  # torchvision's ResNet-50


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("profile.py", ["model=standard,depthwise", "format=json"]),
        ("report.py", ["runs={runs}", "out={tmp}/out", "format=text,json"]),
        (
            "benchmark.py",
            [
                "suite=pointwise",
                "size=tiny",
                "dtypes=[fp32]",
                "repeats=1",
                "warmup=0",
                "min_time_s=0",
                "out={tmp}/bench",
                "format=text,json",
            ],
        ),
    ],
)
def test_a_sweep_of_a_script_that_writes_only_its_out_leaves_no_multirun_dir(tmp_path, script, args):
    """Hydra makes multirun/<date>/<time>/<job>: all of it went but multirun/ (report.py), or none of it (benchmark.py)."""
    from .test_report import write_runs

    write_runs(tmp_path / "runs")
    proc = run_script(script, "-m", *[a.format(tmp=tmp_path, runs=tmp_path / "runs") for a in args], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "multirun").exists(), sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("multirun*"))

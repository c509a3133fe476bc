"""Shared fixtures: Hydra compose() against conf/, shrunk for CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def python_lowering(monkeypatch):
    """pointwise_conv2d as it runs where convlab's native product is absent (no C++ compiler, ``CONVLAB_NATIVE=0``)."""
    import models.functional as functional

    monkeypatch.setattr(functional, "_native_matmul", lambda *operands: None)


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides, config="config") -> DictConfig, with GlobalHydra cleared around it."""

    def _compose(*overrides: str, config: str = "config", hydra_cfg: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config, overrides=list(overrides), return_hydra_config=hydra_cfg)

    yield _compose
    GlobalHydra.instance().clear()


def run_script(
    script: str, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run scripts/<script> with the test interpreter, as a user would from the repo root; ``env`` values of None unset."""
    full_env = {**os.environ, "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None removes a variable
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Non-zero exit, one ``error:`` line on stderr naming every needle, and no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) >= 1, proc.stderr
    for needle in needles:
        assert needle in errors[-1], (needle, errors[-1])

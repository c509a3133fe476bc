"""Issue acceptance: sweep two models on synthetic data with trainer=smoke, build the dashboard, open it in Chromium."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from .conftest import run_script
from .test_report_browser import ARGS, CHROMIUM

pytestmark = pytest.mark.browser


def test_sweep_then_report_then_browser(tmp_path):
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian chromium not installed: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    sweep = tmp_path / "sweep"
    proc = run_script(
        "run.py", "-m", "model=separable,standard", "data=synthetic", "trainer=smoke", "logger=none", f"hydra.sweep.dir={sweep}"
    )
    assert proc.returncode == 0, proc.stderr
    names = {json.loads(p.read_text())["name"] for p in sweep.glob("*/results.json")}
    assert names == {"separable-synthetic", "standard-synthetic"}

    out = tmp_path / "report"
    report = run_script("report.py", f"runs={sweep}", f"out={out}")
    assert report.returncode == 0, report.stderr
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda ex: errors.append(str(ex)))
            page.goto((out / "index.html").as_uri(), wait_until="load")
            text = page.inner_text("body")
            shot = out / "e2e.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    for name in names:
        assert name in text
    image = Image.open(shot).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50
    assert max(count for count, _ in colors) < 0.95 * image.width * image.height

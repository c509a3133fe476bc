"""The dashboard in a real browser: Debian's chromium, headless, opening index.html from disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from experiments.report import build_report

from .test_report import COMPLETED, HOSTILE, write_runs

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page_and_events(tmp_path_factory):
    """(playwright page on out/index.html, out dir, console errors, dialogs), one browser for the module."""
    if not Path(CHROMIUM).exists() or not shutil.which(CHROMIUM):
        pytest.skip("Debian chromium not installed: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    root = write_runs(tmp_path_factory.mktemp("runs"))
    out = tmp_path_factory.mktemp("report") / "out"
    build_report([root], out=out)
    errors: list[str] = []
    dialogs: list[str] = []
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda ex: errors.append(str(ex)))
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto((out / "index.html").as_uri(), wait_until="load")
            yield page, out, errors, dialogs
        finally:
            context.close()


def _column(page, title: str) -> list[str]:
    """The text of one column of the runs table, in display order."""
    heads = page.locator("#runs thead th").all_inner_texts()
    col = next(i for i, h in enumerate(heads) if h.strip().startswith(title))
    return page.locator(f"#runs tbody tr td:nth-child({col + 1})").all_inner_texts()


def test_page_loads_without_errors_and_names_every_run(page_and_events):
    page, _, errors, dialogs = page_and_events
    text = page.inner_text("body")
    for name, *_ in COMPLETED:
        assert name in text
    assert "diverged-run" in page.inner_text("#problems") and "loss is nan at epoch 3" in page.inner_text("#problems")
    assert page.locator("svg").count() == 5
    assert errors == [] and dialogs == []


def test_header_click_sorts_the_table(page_and_events):
    page, *_ = page_and_events
    accs = [float(a) for a in _column(page, "Test acc")]
    assert accs == sorted(accs, reverse=True)  # best first when the page opens
    before = _column(page, "Name")
    page.locator("#runs thead th", has_text="Name").click()
    after = _column(page, "Name")
    assert after != before and after == sorted(before, key=str.lower)
    page.locator("#runs thead th", has_text="MACs").click()
    macs = [float(m) for m in _column(page, "MACs")]
    assert macs == sorted(macs)
    page.locator("#runs thead th", has_text="MACs").click()
    assert [float(m) for m in _column(page, "MACs")] == sorted(macs, reverse=True)


def test_hostile_name_is_literal_text(page_and_events):
    page, _, errors, dialogs = page_and_events
    assert HOSTILE in _column(page, "Name")  # shown as the characters it is made of
    assert page.locator("#runs script").count() == 0 and page.locator("script").count() == 2
    assert page.evaluate("JSON.parse(document.getElementById('runs-data').textContent).some(r => r.name === '<script>alert(1)</script>')")
    assert dialogs == [] and errors == []


def test_screenshot_is_not_blank(page_and_events):
    page, out, *_ = page_and_events
    path = out / "screenshot.png"
    page.screenshot(path=str(path), full_page=True)
    image = Image.open(path).convert("RGB")
    assert image.size[1] > 900
    colors = image.getcolors(maxcolors=1 << 24)
    assert len(colors) > 200  # text, charts and palette colours, not a blank page
    assert max(count for count, _ in colors) < 0.95 * image.size[0] * image.size[1]

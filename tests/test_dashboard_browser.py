"""The dashboard of a real project, rendered in headless Chromium (Debian's package) through Playwright.

Run with ``make test-browser`` (installs chromium and playwright, then ``pytest -m browser``); ``.ci/run``
runs it after ``make test``. The project: the tiny pipeline on the real BigEarthNet pairs, retrained
twice so that one application has a second version that failed its gate. The full-page screenshot
is kept in ``reports/browser/dashboard.png`` to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.pipeline_project import ROOT, inside, make_project, set_params

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("prefect_harness")]
APPS = ["landcover-s2", "landcover-s1"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# the flags this machine's closed network needs (no background connections), as root: no sandbox
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(os.environ.get("MAPEX_SCREENSHOT", ROOT / "reports" / "browser" / "dashboard.png"))


@pytest.fixture(scope="module")
def project(ben_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A project after two retrains: landcover-s1 v2 failed the gate (parameter bound), v1 stays champion."""
    from flows.pipeline import retrain

    with inside(make_project(tmp_path_factory.mktemp("browser") / "proj", ben_root)) as root:
        retrain(params="params.yaml", fetch_samples=False)
        set_params(root, "applications.landcover-s1.finetune.steps", 5)
        set_params(root, "applications.landcover-s1.gate", {"max_params": 1000})
        retrain(params="params.yaml", fetch_samples=False)
        yield root


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url: str):  # noqa: ANN001, ANN201 - playwright objects
    """The page at ``url`` and the list its console errors, page errors and failed requests go to."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(url)
    page.wait_for_load_state("load")
    return page, problems


def test_dashboard_page_in_chromium(project: Path, browser) -> None:  # noqa: ANN001
    index = project / "reports" / "dashboard" / "index.html"  # written by the retrain flow
    data = json.loads((project / "reports" / "dashboard" / "dashboard.json").read_text())
    page, problems = open_page(browser, index.as_uri())

    # one visible card per application, champion and challenger as the registry has them
    cards = page.locator("article.card")
    assert cards.evaluate_all("els => els.map(e => e.dataset.app)") == APPS
    for i in range(cards.count()):
        assert cards.nth(i).is_visible() and cards.nth(i).bounding_box()["height"] > 200
    s1 = page.locator("#app-landcover-s1")
    assert "v1" in s1.locator(".role.champion .value").inner_text()
    challenger = s1.locator(".role.challenger")
    assert "v2" in challenger.inner_text() and challenger.locator(".badge.failed").is_visible()
    assert "> max 1000" in challenger.inner_text()  # the gate's reason, in words
    assert page.locator("#app-landcover-s2 .role.challenger .badge.passed").is_visible()
    assert s1.locator("svg.line").count() == 1 and s1.locator("svg.bars").count() == 1

    # the heatmaps: one per MoE layer, modality x expert cells, drawn with a real size
    layers = data["pretrain"]["routing"]["layers"]
    mods = data["pretrain"]["routing"]["modalities"]
    heatmaps = page.locator("svg.heatmap")
    assert heatmaps.count() == len(layers) >= 1
    for i, layer in enumerate(layers.values()):
        hm = heatmaps.nth(i)
        assert hm.is_visible() and hm.bounding_box()["width"] > 100
        assert hm.locator("rect.cell").count() == len(mods) * len(layer["experts"])
    # the page as it opens, for a person to look at
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 50_000
    # kept experts: the first app is outlined; choosing another app moves the outline; "none" hides it
    on = page.locator("g.kept.on")
    assert set(on.evaluate_all("els => els.map(e => e.dataset.app)")) == {APPS[0]}
    page.locator('input[name="kept-app"][value="landcover-s1"]').check()
    assert set(on.evaluate_all("els => els.map(e => e.dataset.app)")) == {"landcover-s1"}
    assert page.locator('g.kept.on[data-app="landcover-s1"] rect').first.is_visible()
    page.locator('input[name="kept-app"][value=""]').check()
    assert on.count() == 0

    # pre-training and data sections are filled, not empty states
    assert page.locator("#pretrain svg.line").is_visible()
    assert "tokens/s" in page.locator("#pretrain").inner_text()
    assert "bigearthnet" in page.locator("#data table").inner_text()
    # images load, and every local link (Data Docs) points at a file that exists
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    local = [h for h in page.locator("a[href]").evaluate_all("els => els.map(e => e.href)") if h.startswith("file:")]
    assert local, "expected a link to the Great Expectations Data Docs"
    for href in local:
        assert Path(unquote(urlsplit(href).path)).is_file(), href

    assert problems == []
    page.close()


def test_dashboard_serve_binds_localhost(project: Path, browser) -> None:  # noqa: ANN001
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mapex")), "dashboard", "--out", "served",
                             "--serve", "--port", "0"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = []
        for line in proc.stdout:  # the JSON summary, then the address line
            lines.append(line)
            if line.startswith("dashboard on "):
                break
        url = lines[-1].split()[2]
        assert url.startswith("http://127.0.0.1:"), lines
        page, problems = open_page(browser, url)
        assert page.title() == "MAPEX dashboard"
        assert page.locator("article.card").count() == len(APPS)
        assert problems == []
        page.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)

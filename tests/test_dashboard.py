"""Dashboard: chart primitives, and the page of a project where nothing has run yet (empty states).

The page of a project with registered versions, a failed gate and a manual promotion is checked in
``test_orchestration.py`` (it reuses that module's flow runs); the rendered page in a real browser
in ``test_dashboard_browser.py`` (``make test-browser``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from mapex_core.dashboard.charts import (
    Bar,
    Mark,
    Series,
    bar_chart,
    heatmap,
    line_chart,
    nice_ticks,
    viridis,
)
from mapex_core.dashboard.collect import redact
from tests.helpers import Elements
from tests.pipeline_project import TINY_PARAMS


def test_viridis_and_ticks() -> None:
    assert viridis(0.0) == "#440154" and viridis(1.0) == "#fde725"
    assert viridis(-3) == viridis(0) and viridis(7) == viridis(1)
    assert nice_ticks(0, 1) == [0.0, 0.25, 0.5, 0.75, 1.0]
    ticks = nice_ticks(0.37, 1.42)
    assert ticks[0] <= 0.37 and ticks[-1] >= 1.42 and len(ticks) <= 8


def test_heatmap_has_one_cell_per_modality_and_expert_and_outlines_kept_experts() -> None:
    shares = [[0.5, 0.5, 0.0, 0.0], [0.0, 0.1, 0.9, float("nan")]]
    svg = heatmap(shares, ["s1", "s2"], ["0", "1", "2", "3"], ["s1", "s1", "s2", "s2"],
                  {"flood": [0, 1], "crops": [2]}, "block 1", "hm1")
    page = Elements(svg)
    assert len(page.find("rect", class_="cell")) == 8
    assert "s2: no tokens seen" in svg  # NaN is an empty state, not a colour
    assert [g["data-app"] for g in page.find("g", class_="kept")] == ["flood", "crops"]
    assert len(page.find("rect", class_="kept-cell")) == 3
    assert "90.0% of the routing mass" in svg


def test_line_and_bar_charts_draw_marks_and_empty_states() -> None:
    svg = line_chart([Series("pruned", [1, 2, 3], [0.5, 0.6, float("nan")], markers=True)], "version", "mAP",
                     "history", [Mark(2, 0.6, "v2: champion")])
    page = Elements(svg)
    assert len(page.find("circle")) == 3  # 2 finite points + the champion ring
    assert "v2: champion" in svg
    assert "no data yet" in line_chart([Series("x", [1], [math.nan])], "a", "b", "empty")
    bars = bar_chart([Bar("pruned", 0.7, 0.6, 0.8), Bar("scratch", math.nan)], "mAP", "eval", x_max=1.0)
    assert "not measured" in bars and "0.700" in bars and "95 % interval 0.600-0.800" in bars


def test_line_chart_draws_interval_whiskers_and_a_diamond_mark() -> None:
    svg = line_chart([Series("sweep", [3.0, 2.0, 1.0], [0.7, 0.6, 0.65], markers=True,
                             errors=[(0.6, 0.8), (0.5, 0.7), (None, None)])], "parameters", "mAP", "curve",
                     [Mark(1.0, 0.65, "chosen by the sweep", "diamond")])
    page = Elements(svg)
    assert len(page.find("path", class_="whisker")) == 2  # no whisker where there is no interval
    assert len(page.find("circle", class_="point")) == 3
    assert len(page.find("path", class_="mark")) == 1 and "<title>chosen by the sweep</title>" in svg
    high = line_chart([Series("s", [1.0, 2.0], [0.5, 0.6], errors=[(0.4, 1.3), (0.5, 0.7)])], "x", "y", "t")
    low = line_chart([Series("s", [1.0, 2.0], [0.5, 0.6])], "x", "y", "t")
    y_tick = 'text-anchor="end">1.5</text>'
    assert y_tick in high and y_tick not in low  # the y axis reaches the top of the highest whisker


def test_a_sweep_is_drawn_as_a_curve_with_its_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mapex sweep``'s default output of an application is drawn on its card (no version registered yet)."""
    import mlflow

    from mapex_core.dashboard import write_dashboard

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    points = [{"kept_per_layer": k, "params": p, "value": v, "ci95": [v - 0.1, min(v + 0.1, 1.0)], "latency_ms": 2.0,
               "within_tolerance": ok} for k, p, v, ok in ((4, 120_000, 0.71, True), (3, 100_000, 0.70, True),
                                                            (2, 80_000, 0.55, False))]
    sweep = tmp_path / "outputs/apps/landcover-s2/sweep/sweep.json"
    sweep.parent.mkdir(parents=True)
    sweep.write_text(json.dumps({"app": "landcover-s2", "metric": "map_macro", "strategy": "reap", "tolerance": 0.02,
                                 "reference": {"kept_per_layer": 4, "value": 0.71}, "points": points,
                                 "chosen": {"index": 1, **points[1]}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        write_dashboard("site")
    finally:
        mlflow.set_tracking_uri(None)
    html = Path("site/index.html").read_text()
    assert [d["data-app"] for d in Elements(html).find("div", class_="sweep")] == ["landcover-s2"]
    chart = html.split('class="sweep"')[1].split("</svg>")[0]
    assert chart.count('class="point"') == 3 and chart.count('class="whisker"') == 3
    marks = re.findall(r'class="mark"[^>]*><title>([^<]*)</title>', chart)
    assert marks == ["chosen by the sweep (smallest within tolerance) · 3 experts per MoE layer, 100,000 parameters"]
    assert "full group - gate.tolerance (0.02)" in chart  # the tolerance floor is drawn
    assert "0.7000 (95 % CI 0.600-0.800)" in chart  # each point's value and interval in its tooltip
    data = json.loads(Path("site/dashboard.json").read_text())["apps"][0]["sweep"]
    assert data["chosen"] == 1 and data["source"].endswith("outputs/apps/landcover-s2/sweep/sweep.json")


def test_redact_drops_credentials() -> None:
    assert redact("https://alice:secret@mlflow.example.org:8443/x") == "https://mlflow.example.org:8443/x"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_empty_project_gives_empty_states_not_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from mapex_core.dashboard import write_dashboard

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        summary = write_dashboard("site")
    finally:
        mlflow.set_tracking_uri(None)
    assert summary == {"index": "site/index.html", "apps": ["landcover-s2", "landcover-s1"], "versions": 0,
                       "layers": 0}
    html = Path("site/index.html").read_text()
    page = Elements(html)
    assert [a["data-app"] for a in page.find("article", class_="card")] == ["landcover-s2", "landcover-s1"]
    text = " ".join(page.text)
    assert text.count("no champion yet") == 2
    assert "No routing statistics yet" in text and "Not pre-trained yet" in text and "not ingested yet" in text
    assert "No ablation yet" in text  # the ablations section's empty state
    # self-contained: nothing fetched from elsewhere (no external scripts, styles or images)
    assert not re.search(r'(src|href)="(https?:)?//', html.replace('href="http://127.0.0.1:5000', ""))
    assert json.loads(Path("site/dashboard.json").read_text())["apps"][0]["versions"] == []
    # a damaged chip store is shown as such, the rest of the page still renders
    Path("data/chips/bigearthnet.zarr").mkdir(parents=True)
    try:
        write_dashboard("site")
    finally:
        mlflow.set_tracking_uri(None)
    text = " ".join(Elements(Path("site/index.html").read_text()).text)
    assert "chip store unreadable: data/chips/bigearthnet.zarr: not a readable chip store" in text
    assert text.count("no champion yet") == 2


def test_dashboard_cli_errors_name_the_problem(tmp_path: Path) -> None:
    from tests.pipeline_project import run

    (tmp_path / "file").write_text("x")
    out = run(["mapex", "dashboard", "--out", str(tmp_path / "file")], tmp_path, check=False)
    assert out.returncode == 1 and "file: exists and is not a folder" in out.stderr
    out = run(["mapex", "dashboard", "--out", str(tmp_path / "site"), "--params", str(tmp_path / "none.yaml")],
              tmp_path, check=False)
    assert out.returncode == 1 and "none.yaml: no params file" in out.stderr
    assert not (tmp_path / "site").exists()  # nothing written on error

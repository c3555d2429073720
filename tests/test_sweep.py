"""The accuracy-size sweep (`mapex sweep`), `prune.target: smallest_within_tolerance` in the pipeline, and
`mapex prune --task-model`: real sweeps of a small MAPEX model on the real BigEarthNet chip store.

The pipeline test builds a throwaway DVC project (tests/pipeline_project.py), runs the DVC stages up to
evaluate@landcover-s2 (the same commands the retrain flow runs), registers the model in the project's
MLflow store and writes its dashboard.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mapex_core.apps import get_application
from mapex_core.model import MapexConfig, MapexModel, load_model, save_model
from mapex_core.model.heads import TaskModel, save_task_model, strip_decoder
from mapex_core.model.routing import moe_layers
from mapex_core.training.prune import prune_app
from mapex_core.training.sweep import choose_point
from tests.pipeline_project import TINY_PARAMS, inside, make_project, run

FAST = {"steps": 4, "batch_size": 8, "eval_every": 2, "patience": 2, "bootstrap": 50, "latency_runs": 3,
        "head_channels": 8}
S2_GROUP = [4, 5, 6, 7]  # experts of S2 in a model of S1 + S2 with 4 experts per modality


@pytest.fixture(scope="module")
def pre(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MAPEX model for S1 + S2 (4 experts per modality, top-2, two MoE layers), saved."""
    torch.manual_seed(0)
    model = MapexModel(MapexConfig(modalities=["s1", "s2"], img_size=64, patch_size=8, dim=32, depth=2, heads=2,
                                   moe_every=1, experts_per_modality=4, top_k=2, decoder_dim=32, decoder_depth=1,
                                   decoder_heads=2))
    with torch.no_grad():  # routing decided by the tokens too, not only by the modality bias
        for layer in moe_layers(model).values():
            layer.router.normal_(std=0.5)
    out = tmp_path_factory.mktemp("sweep") / "pre"
    save_model(model, out)
    return out


def app_file(folder: Path, chips: Path, name: str = "cover-s2", **extra: Any) -> Path:
    """A standalone application YAML (landcover from S2 on ``chips``) with a tiny budget."""
    entry = {"name": name, "modalities": ["s2"], "task": "multilabel", "metric": "map_macro", "chips": str(chips),
             "finetune": FAST, "prune": {"calibration_batches": 2, "batch_size": 8}, **extra}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(entry, sort_keys=False))
    return path


def smallest_within(points: list[dict[str, Any]], tolerance: float) -> int:
    """The rule written out independently: scan from the smallest model up, first one not below full - tolerance."""
    floor = points[0]["value"] - tolerance
    for i in sorted(range(len(points)), key=lambda j: points[j]["params"]):
        if points[i]["value"] >= floor:
            return i
    raise AssertionError("the full group is always within its own tolerance")


def test_choice_is_the_smallest_point_within_tolerance_of_the_full_group() -> None:
    pts = [{"params": 100, "value": 0.80}, {"params": 90, "value": 0.70}, {"params": 80, "value": 0.78},
           {"params": 70, "value": float("nan")}]
    assert choose_point(pts, 0.05) == 2  # 0.78 >= 0.75; the curve need not be monotone
    assert choose_point(pts, 0.01) == 0  # nothing smaller within 0.79
    assert choose_point(pts, 0.10) == 2  # 0.70 qualifies too, 0.78 is smaller; NaN never qualifies
    assert choose_point(pts, 0.10) == smallest_within(pts[:3], 0.10)
    assert choose_point([{"params": 100, "value": float("nan")}, {"params": 50, "value": 0.9}], 0.5) == 0
    assert choose_point([{"params": 10, "value": 0.5}], 0.0) == 0


# ----- mapex sweep ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swept(pre: Path, ben_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`mapex sweep` of an S2 app (REAP criterion) on the real BigEarthNet store: its process and sweep.json."""
    work = tmp_path_factory.mktemp("swept")
    app = app_file(work, ben_store, prune={"strategy": "reap", "calibration_batches": 2, "batch_size": 8},
                   gate={"tolerance": 0.02})
    proc = run(["mapex", "sweep", "--app", str(app), "--checkpoint", str(pre), "--out", "out", "--device", "cpu"],
               work, check=False)
    return {"proc": proc, "work": work, "app": app,
            "record": json.loads((work / "out" / "sweep.json").read_text()) if proc.returncode == 0 else None}


def test_sweep_points_are_ordered_by_size_and_the_choice_follows_the_gate_rule(swept: dict[str, Any]) -> None:
    proc, rec = swept["proc"], swept["record"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = rec["points"]
    assert [p["kept_per_layer"] for p in points] == [4, 3, 2]  # the S2 group (4) down to top_k (2)
    params = [p["params"] for p in points]
    assert all(a > b for a, b in zip(params, params[1:], strict=False))  # strictly decreasing
    enc = [p["encoder_params"] for p in points]
    assert all(a > b for a, b in zip(enc, enc[1:], strict=False))
    for p in points:
        assert 0.0 <= p["value"] <= 1.0 and p["ci95"][0] <= p["value"] + 1e-9 <= p["ci95"][1] + 2e-9
        assert p["latency_ms"] > 0
        assert [t["seed"] for t in p["training"]] == [0] and p["training"][0]["stopped_at"] <= FAST["steps"]
        assert all(sorted(kept) == kept and set(kept) <= set(S2_GROUP) and len(kept) == p["kept_per_layer"]
                   for kept in p["kept_experts"].values())
    # scored once: each size keeps the best-ranked experts, so the kept sets are nested
    for big, small in zip(points, points[1:], strict=False):
        assert all(set(small["kept_experts"][b]) < set(big["kept_experts"][b]) for b in big["kept_experts"])
    # chosen: within gate.tolerance of the full group's metric, and no smaller point is
    tol, full = rec["tolerance"], points[0]["value"]
    chosen = rec["chosen"]
    assert tol == 0.02 and rec["reference"] == {"kept_per_layer": 4, "value": full}
    assert chosen["value"] >= full - tol
    assert all(p["value"] < full - tol for p in points if p["params"] < chosen["params"])
    assert chosen["index"] == smallest_within(points, tol)
    assert {k: v for k, v in chosen.items() if k != "index"} == points[chosen["index"]]
    assert [p["within_tolerance"] for p in points] == [p["value"] >= full - tol for p in points]
    # same settings as evaluation: the app's seeds, the test split, batch-1 latency
    assert rec["seeds"] == [0] and rec["test_chips"] == 8 and rec["strategy"] == "reap"
    assert rec["latency"]["batch"] == 1 and rec["latency"]["runs"] == 3


def test_sweep_prints_a_line_per_point_and_its_json(swept: dict[str, Any]) -> None:
    proc, rec = swept["proc"], swept["record"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"^sweep .*: point (\d)/3: (\d) experts per MoE layer, .* metric (\S+) ", proc.stderr, re.M)
    assert [(int(i), int(k)) for i, k, _ in lines] == [(1, 4), (2, 3), (3, 2)]
    assert [float(v) for _, _, v in lines] == [round(p["value"], 4) for p in rec["points"]]
    out = json.loads(proc.stdout)
    assert out["points"] == [{k: p[k] for k in ("kept_per_layer", "params", "value", "ci95", "latency_ms")}
                             for p in rec["points"]]
    assert out["chosen"]["index"] == rec["chosen"]["index"] and out["out"] == "out/sweep.json"


def test_sweep_help_is_truthful_and_errors_name_the_app_or_path(swept: dict[str, Any], pre: Path,
                                                                ben_store: Path) -> None:
    work = swept["work"]
    helped = run(["mapex", "sweep", "--help"], work, check=False)
    assert helped.returncode == 0
    text = " ".join(helped.stdout.split())
    for option in ("--app", "--checkpoint", "--chips", "--out", "--strategy", "--force"):
        assert option in text
    assert "sweep.json" in text and "gate.tolerance" in text and "top_k" in text
    assert "outputs/apps/APP/sweep" in text and "kept_per_layer, params, value, ci95, latency_ms" in text

    def fails(*args: str) -> str:
        proc = run(["mapex", "sweep", *args], work, check=False)
        assert proc.returncode == 1, proc.stderr
        return proc.stderr

    assert "unknown application 'nope'" in fails("--app", "nope", "--checkpoint", str(pre))
    assert f"{work / 'missing'}/config.json not found" in fails("--app", str(swept["app"]), "--checkpoint",
                                                                str(work / "missing"), "--out", "o2")
    grouped = app_file(work, ben_store, name="grouped", prune={"strategy": "group"})
    assert "application 'grouped': a sweep ranks experts inside the groups and strategy 'group'" in fails(
        "--app", str(grouped), "--checkpoint", str(pre), "--out", "o3")
    (work / "foreign").mkdir()
    (work / "foreign" / "notes.txt").write_text("mine")
    err = fails("--app", str(swept["app"]), "--checkpoint", str(pre), "--out", "foreign")
    assert "foreign: is a folder that is not a sweep folder (it holds notes.txt)" in err
    assert (work / "foreign" / "notes.txt").read_text() == "mine"
    assert not (work / "o2").exists() and not (work / "o3").exists()  # nothing written on error


# ----- mapex prune --task-model --------------------------------------------------------------------
def test_prune_task_model_option_measures_the_fine_tuned_model(pre: Path, ben_store: Path, tmp_path: Path) -> None:
    encoder = load_model(pre)
    task = TaskModel(strip_decoder(encoder), "multilabel", ["x", "y"], info={"app": "cover-s2"},
                     input_modalities=["s2"])
    save_task_model(task, tmp_path / "ft")
    app = app_file(tmp_path, ben_store, prune={"strategy": "task", "keep_per_layer": 2, "calibration_batches": 2,
                                               "batch_size": 8})
    with_model = run(["mapex", "prune", "--app", str(app), "--checkpoint", str(pre), "--device", "cpu", "--quiet",
                      "--out", "a", "--task-model", "ft"], tmp_path)
    b = prune_app(get_application(str(app)), pre, ben_store, tmp_path / "b", device="cpu")  # the encoder's tokens
    assert json.loads(with_model.stdout)["params_after"] == b["params_after"]
    a = json.loads((tmp_path / "a" / "prune_report.json").read_text())
    assert a["task_model"] == str((tmp_path / "ft").resolve()) and b["task_model"] is None
    assert a["scores"] != b["scores"]  # the task model's class probabilities, not the encoder's tokens
    assert all(len(k) == 2 for k in a["kept_experts"].values())
    other = app_file(tmp_path, ben_store, name="other", prune={"strategy": "frequency"})
    proc = run(["mapex", "prune", "--app", str(other), "--checkpoint", str(pre), "--out", "c", "--task-model", "ft"],
               tmp_path, check=False)
    assert proc.returncode == 1 and "only used by prune.strategy 'task'" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_prune_target_values_are_checked() -> None:
    from mapex_core.apps import load_applications

    def app(**prune: Any) -> dict[str, Any]:
        return {"applications": {"a": {"modalities": ["s2"], "task": "multilabel", "metric": "map_macro",
                                       "prune": prune}}}

    assert load_applications(app())["a"].prune.target == "groups"
    assert load_applications(app(target="smallest_within_tolerance"))["a"].prune.target == "smallest_within_tolerance"
    with pytest.raises(ValueError, match=r"application 'a': prune.target must be one of .*, got 'smallest'"):
        load_applications(app(target="smallest"))
    with pytest.raises(ValueError, match="remove prune.keep_per_layer"):
        load_applications(app(target="smallest_within_tolerance", keep_per_layer=2))
    with pytest.raises(ValueError, match="strategy 'group' ranks none"):
        load_applications(app(target="smallest_within_tolerance", strategy="group"))


# ----- the pipeline with prune.target: smallest_within_tolerance ----------------------------------
APP = "landcover-s2"


@pytest.fixture(scope="module")
def pipeline(ben_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A DVC project whose landcover-s2 sweeps (3 experts per modality, top-1: sizes 3, 2, 1) with a tolerance
    that admits every size: ``dvc repro`` up to its evaluation, then registration and the dashboard."""
    from mapex_core import stages
    from mapex_core.dashboard import write_dashboard

    params = copy.deepcopy(TINY_PARAMS)
    params["pipeline"]["apps"] = [APP]
    params["model"]["experts_per_modality"] = 3
    params["applications"][APP]["prune"]["target"] = "smallest_within_tolerance"
    params["applications"][APP]["gate"] = {"tolerance": 1.0}
    root = make_project(tmp_path_factory.mktemp("pipeline") / "proj", ben_root, params)
    first = run(["dvc", "repro", f"evaluate@{APP}"], root)
    with inside(root):
        report = json.loads(Path(f"outputs/apps/{APP}/pruned/prune_report.json").read_text())
        mtime = Path(f"outputs/apps/{APP}/pruned/prune_report.json").stat().st_mtime_ns
        reg = stages.register(APP, "params.yaml")
        again = run(["dvc", "repro", f"evaluate@{APP}"], root)
        from mapex_core import lineage

        changed = lineage.stage_changed(f"prune@{APP}")
        dash = write_dashboard("reports/dashboard")
        from flows.pipeline import summary_markdown, summary_row

        row = summary_row(APP, stages.stage_summary(f"prune@{APP}"), stages.stage_summary(f"evaluate@{APP}"), reg,
                          "params.yaml")
        return {"root": root, "first": first, "report": report, "reg": reg, "again": again, "changed": changed,
                "mtime_same": Path(f"outputs/apps/{APP}/pruned/prune_report.json").stat().st_mtime_ns == mtime,
                "dashboard": dash, "summary": stages.stage_summary(f"prune@{APP}"),
                "evaluation": json.loads(Path(f"reports/{APP}/evaluation.json").read_text()),
                "config": json.loads(Path(f"outputs/apps/{APP}/pruned/config.json").read_text()),
                "html": Path("reports/dashboard/index.html").read_text(), "markdown": summary_markdown([row])}


def test_pipeline_prunes_to_the_sweeps_choice_and_registers_it(pipeline: dict[str, Any]) -> None:
    import mlflow
    from mlflow import MlflowClient

    from mapex_core import tracking

    rep, reg = pipeline["report"], pipeline["reg"]
    sweep = rep["sweep"]
    assert rep["target"] == "smallest_within_tolerance"
    assert [p["kept_per_layer"] for p in sweep["points"]] == [3, 2, 1]
    assert sweep["chosen"]["index"] == 2 and sweep["chosen"]["kept_per_layer"] == 1  # tolerance 1.0: the smallest
    assert rep["keep_per_layer"] == 1 and all(len(k) == 1 for k in rep["kept_experts"].values())
    assert rep["kept_experts"] == sweep["points"][2]["kept_experts"] and rep["params_after"] == sweep["points"][2][
        "encoder_params"]
    origin = pipeline["config"]["origin"]["sweep"]
    assert origin["point"] == 2 and origin["kept_per_layer"] == 1 and origin["target"] == "smallest_within_tolerance"
    # the evaluated and registered model is the chosen point: same size, and (same seed, same training) same metric
    ev = pipeline["evaluation"]["pruned"]
    assert ev["params"] == sweep["chosen"]["params"]
    assert ev["value"] == pytest.approx(sweep["chosen"]["value"], abs=1e-6)
    with inside(pipeline["root"]):
        tracking.configure()  # the project's own store
        client = MlflowClient()
        version = client.get_model_version(f"mapex-{APP}", reg["version"])
        assert int(version.tags["params"]) == sweep["chosen"]["params"]
        assert version.tags["prune_target"] == "smallest_within_tolerance"
        assert int(version.tags["sweep_kept_per_layer"]) == sweep["chosen"]["kept_per_layer"]
        run_params = client.get_run(reg["run_id"]).data.params
        assert run_params["app.prune.target"] == "smallest_within_tolerance"
        logged = mlflow.artifacts.load_dict(f"runs:/{reg['run_id']}/reports/prune_report.json")
        assert logged["sweep"]["chosen"] == sweep["chosen"] and logged["target"] == "smallest_within_tolerance"
    assert pipeline["summary"]["sweep_chosen"] == {k: sweep["chosen"][k] for k in ("index", "kept_per_layer", "params",
                                                                                   "value")}
    assert (f"- **{APP}**: point 3 of 3, 1 experts per MoE layer, {sweep['chosen']['params']:,} parameters, "
            f"map_macro {sweep['chosen']['value']:.3f} (within 1.0 of the full group)") in pipeline["markdown"]


def test_pipeline_rerun_with_nothing_changed_does_not_sweep_again(pipeline: dict[str, Any]) -> None:
    assert "Running stage 'prune@landcover-s2'" in pipeline["first"].stdout
    assert "Running stage 'compare@landcover-s2'" in pipeline["first"].stdout  # evaluate@ depends on it
    again = " ".join(pipeline["again"].stdout.split())
    assert "Running stage" not in again and "Stage 'prune@landcover-s2' didn't change, skipping" in again
    assert pipeline["changed"] is False and pipeline["mtime_same"]


def test_dashboard_draws_the_curve_and_marks_the_registered_point(pipeline: dict[str, Any]) -> None:
    from tests.helpers import Elements

    page = Elements(pipeline["html"])
    charts = page.find("div", class_="sweep")
    assert len(charts) == 1 and charts[0]["data-app"] == APP
    chart = pipeline["html"].split('class="sweep"')[1].split("</svg>")[0]
    points = pipeline["report"]["sweep"]["points"]
    assert chart.count('class="point"') == len(points) and chart.count('class="whisker"') == len(points)
    registered = re.findall(r'class="mark"[^>]*><title>([^<]*)</title>', chart)
    assert any(t.startswith(f"registered: v{pipeline['reg']['version']}") and "1 experts per MoE layer" in t
               for t in registered), registered
    assert any(t.startswith("chosen by the sweep") for t in registered)
    assert math.isclose(pipeline["dashboard"]["versions"], 1)

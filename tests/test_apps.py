"""Applications registry, pruning for an app, fine-tuning and evaluation end to end on the real
chip stores (BigEarthNet pairs; the Sen1Floods11 chip split into spatially separate sub-chips)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mapex_core.apps import get_application, load_applications
from mapex_core.metrics import confusion_per_chip, iou_per_class, summarize
from mapex_core.model import MapexConfig, load_model
from mapex_core.model.heads import load_task_model
from mapex_core.training.evaluate import evaluate_app
from mapex_core.training.finetune import finetune_app
from mapex_core.training.pretrain import PretrainParams, pretrain
from mapex_core.training.prune import prune_app

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(modalities=["s1", "s2", "s2l1c"], img_size=64, patch_size=8, dim=32, depth=2, heads=2, moe_every=1,
            experts_per_modality=2, top_k=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)
FAST = {"steps": 8, "batch_size": 8, "eval_every": 4, "patience": 2, "bootstrap": 50, "latency_runs": 3}


@pytest.fixture(scope="module")
def pretrained(ben_store, shared_flood_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "pretrain"
    pretrain([ben_store, shared_flood_store], out, MapexConfig(**TINY),
             PretrainParams(steps=6, batch_size=8, log_every=3, ckpt_every=6, splits=("train",),
                            stats_batches=2), device="cpu")
    return out


def _params(ben_store, flood_store, **extra):
    apps = {
        "landcover-s2": {"modalities": ["s2"], "task": "multilabel", "metric": "map_macro", "chips": str(ben_store),
                         "finetune": FAST},
        "flood-s1": {"modalities": ["s1"], "task": "segmentation", "metric": "iou_water", "chips": str(flood_store),
                     "finetune": {**FAST, "seeds": [0, 1]}},
        **extra,
    }
    return {"applications": apps}


def test_default_registry_ships_the_five_applications():
    apps = load_applications(ROOT / "params.yaml")
    assert set(apps) == {"landcover-s2", "landcover-s1", "landcover-s1s2", "flood-s1", "landuse-s2"}
    assert apps["landcover-s1s2"].modalities == ["s1", "s2"] and apps["flood-s1"].task == "segmentation"
    assert apps["landuse-s2"].label_type == "mask" and apps["landcover-s1"].label_type == "multilabel"


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"modalities": ["s1"], "task": "segmentation"}, r"lacks \['metric'\]"),
        ({"modalities": ["landsat8"], "task": "multilabel", "metric": "map_macro"}, r"unknown modalities \['landsat8'\]"),
        ({"modalities": ["s1"], "task": "detection", "metric": "map_macro"}, "unknown task 'detection'"),
        ({"modalities": ["s1"], "task": "segmentation", "metric": "map_macro"}, "metric 'map_macro' is for multilabel"),
        ({"modalities": ["s1"], "task": "segmentation", "metric": "miou", "finetune": {"stpes": 3}}, "stpes"),
        ({"modalities": ["s1"], "task": "segmentation", "metric": "miou", "colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ],
)
def test_bad_registry_entries_are_clear_errors(entry, message):
    with pytest.raises(ValueError, match=message):
        load_applications({"applications": {"bad-app": entry}})


def test_unknown_app_lists_registered_and_names_are_validated(ben_store, shared_flood_store):
    params = _params(ben_store, shared_flood_store)
    with pytest.raises(ValueError, match=r"unknown application 'wildfire'; registered: \['flood-s1', 'landcover-s2'\]"):
        get_application("wildfire", params)
    with pytest.raises(ValueError, match="application name '../evil' must match"):
        load_applications({"applications": {"../evil": {"modalities": ["s1"], "task": "segmentation", "metric": "miou"}}})


def test_app_yaml_file_needs_only_four_keys(tmp_path):
    f = tmp_path / "water.yaml"
    f.write_text(yaml.safe_dump({"name": "water-s1", "modalities": ["s1"], "task": "segmentation", "metric": "iou_water"}))
    app = get_application(str(f), {})
    assert app.name == "water-s1" and app.finetune.steps > 0 and app.prune.coverage == 0.99 and app.chips is None


def test_incompatible_model_or_store_is_a_clear_error(pretrained, ben_store, shared_flood_store, tmp_path):
    params = _params(ben_store, shared_flood_store, **{
        "dem-app": {"modalities": ["dem"], "task": "segmentation", "metric": "miou"},
        "flood-on-ben": {"modalities": ["s1"], "task": "segmentation", "metric": "iou_water", "chips": str(ben_store)},
        "cover-on-flood": {"modalities": ["s2"], "task": "multilabel", "metric": "map_macro",
                           "chips": str(shared_flood_store)},
    })
    with pytest.raises(ValueError, match=r"needs modalities \['dem'\] that the pre-trained model lacks; the model takes \['s1', 's2', 's2l1c'\]"):
        prune_app(get_application("dem-app", params), pretrained, ben_store, tmp_path / "x")
    with pytest.raises(ValueError, match=r"needs mask labels, but the chip store has 'multilabel' labels"):
        finetune_app(get_application("flood-on-ben", params), pretrained, ben_store, tmp_path / "y")
    with pytest.raises(ValueError, match=r"chip store has no \['s2'\] chips .* it holds \['s2l1c', 's1'\]"):
        prune_app(get_application("cover-on-flood", params), pretrained, shared_flood_store, tmp_path / "z")


def test_flood_segmentation_prune_finetune_evaluate(pretrained, ben_store, shared_flood_store, tmp_path):
    app = get_application("flood-s1", _params(ben_store, shared_flood_store))
    report = prune_app(app, pretrained, shared_flood_store, tmp_path / "pruned")
    assert report["reduction"] > 0.3 and report["max_output_deviation"] < 1e-4
    assert set(json.loads((tmp_path / "pruned" / "prune_report.json").read_text())) >= {
        "params_before", "params_after", "reduction", "kept_experts", "coverage", "max_output_deviation"}
    pruned = load_model(tmp_path / "pruned")
    assert pruned.config.modalities == ["s1"] and pruned.config.origin["pruned_from"] == str(pretrained.resolve())

    summary = finetune_app(app, tmp_path / "pruned", shared_flood_store, tmp_path / "ft")
    assert summary["history"]["train_chips"] == 48 and summary["history"]["steps"][-1] <= 8
    task = load_task_model(tmp_path / "ft")
    assert task.task == "segmentation" and task.class_names == ["dry", "water"]
    x = {"s1": torch.zeros(2, 2, 64, 64)}
    assert task(x).shape == (2, 2, 64, 64)

    rep = evaluate_app(app, tmp_path / "ft", shared_flood_store, tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text())["metric"] == "iou_water"
    assert rep["test_chips"] == 8 and rep["seeds"] == [0, 1]
    for v in ("pruned", "unpruned", "scratch"):
        r = rep[v]
        assert 0.0 <= r["value"] <= 1.0 and r["ci95"][0] <= r["value"] + 1e-9 and r["value"] <= r["ci95"][1] + 1e-9
        assert r["params"] > 0 and r["checkpoint_bytes"] > 0 and r["latency_ms"] > 0
        assert set(r["per_class_iou"]) == {"dry", "water"}
    assert rep["pruned"]["params"] == rep["scratch"]["params"] < rep["unpruned"]["params"]
    assert rep["pruned"]["checkpoint_bytes"] < rep["unpruned"]["checkpoint_bytes"]
    assert rep["unpruned"]["input_modalities"] == ["s1"]  # fed the app's modalities only
    assert rep["unpruned"]["model_modalities"] == ["s1", "s2", "s2l1c"]


def test_landcover_multilabel_with_label_fraction_and_linear_probe(pretrained, ben_store, shared_flood_store, tmp_path):
    params = _params(ben_store, shared_flood_store)
    params["applications"]["landcover-s2"]["finetune"] = {**FAST, "mode": "linear", "label_fraction": 0.5}
    app = get_application("landcover-s2", params)
    prune_app(app, pretrained, ben_store, tmp_path / "pruned")
    before = load_model(tmp_path / "pruned").state_dict()
    summary = finetune_app(app, tmp_path / "pruned", ben_store, tmp_path / "ft")
    assert summary["history"]["train_chips"] == 4  # half of the 8 train chips (2 tiles x 4 chips)
    after = load_task_model(tmp_path / "ft").encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after)  # linear probe: encoder frozen
    rep = evaluate_app(app, tmp_path / "ft", ben_store)
    assert rep["metric"] == "map_macro" and {"map_macro", "f1_macro"} <= set(rep["pruned"])
    assert rep["pruned_checkpoint_reused"] and rep["pruned"]["bootstrap_units"] == 2  # 2 test patches
    # a checkpoint fine-tuned with another budget is not compared as is: it is fine-tuned again
    params["applications"]["landcover-s2"]["finetune"] = {**FAST, "mode": "linear", "label_fraction": 0.5, "lr": 1e-3}
    other = evaluate_app(get_application("landcover-s2", params), tmp_path / "ft", ben_store)
    assert not other["pruned_checkpoint_reused"] and other["pruned_retrained_because"] == ["fine-tuning budget"]
    assert all(0.0 <= rep[v]["value"] <= 1.0 for v in ("pruned", "unpruned", "scratch"))


def test_metrics_on_known_values():
    pred = np.array([[[0, 1], [1, 1]]])
    tgt = np.array([[[0, 1], [0, -1]]])
    conf = confusion_per_chip(pred, tgt, 2)
    assert conf.tolist() == [[[1, 1], [0, 1]]]
    assert iou_per_class(conf[0]).tolist() == [0.5, 0.5]
    out = summarize("iou_water", ["dry", "water"], [conf], np.zeros(1), n_boot=10)
    assert out["value"] == 0.5 and out["per_class_iou"] == {"dry": 0.5, "water": 0.5}
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.6]])
    targets = np.array([[1, 0], [0, 1], [1, 1]])
    ml = summarize("map_macro", ["a", "b"], [scores], targets, n_boot=20)
    assert ml["value"] == pytest.approx(1.0) and ml["f1_macro"] == pytest.approx(1.0)
    # a class absent from targets and predictions does not count as F1 = 0
    three = summarize("f1_macro", ["a", "b", "c"], [np.c_[scores, np.zeros(3)]], np.c_[targets, np.zeros(3, int)],
                      n_boot=0)
    assert three["value"] == pytest.approx(1.0)
    # bootstrap over groups: two groups of chips -> resamples of whole groups
    grouped = summarize("map_macro", ["a", "b"], [scores], targets, n_boot=50, groups=np.array(["p", "p", "q"]))
    assert grouped["bootstrap_units"] == 2


def _mapex(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mapex_core.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_cli_contract_prune_finetune_evaluate(pretrained, shared_flood_store, tmp_path):
    app_file = tmp_path / "water.yaml"
    app_file.write_text(yaml.safe_dump({"name": "water-s1", "modalities": ["s1"], "task": "segmentation",
                                        "metric": "iou_water", "finetune": FAST}))
    res = _mapex("prune", "--app", str(app_file), "--checkpoint", str(pretrained), "--chips", str(shared_flood_store),
                 "--out", "p", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "p" / "prune_report.json").read_text())
    assert 0 < rep["reduction"] < 1 and rep["params_after"] < rep["params_before"]
    assert (tmp_path / "p" / "config.json").is_file() and (tmp_path / "p" / "model.safetensors").is_file()
    res = _mapex("finetune", "--app", str(app_file), "--checkpoint", "p", "--chips", str(shared_flood_store),
                 "--out", "f", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = _mapex("evaluate", "--app", str(app_file), "--checkpoint", "f", "--chips", str(shared_flood_store),
                 "--out", "r.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metric"] == "iou_water"
    for v in ("pruned", "unpruned", "scratch"):
        assert {"value", "ci95", "params", "checkpoint_bytes", "latency_ms"} <= set(report[v])
    res = _mapex("prune", "--app", "nope", "--checkpoint", str(pretrained), "--out", "q", cwd=tmp_path)
    assert res.returncode != 0 and "unknown application 'nope'" in res.stderr


def test_multiclass_accuracy_end_to_end(pretrained, ben_store, tmp_path):
    """Single-label classification: each real BigEarthNet chip labelled with its first 19-class label."""
    from mapex_core.data.chips import ChipStore, ChipWriter
    from mapex_core.data.raster import Grid

    src = ChipStore.open(ben_store, normalize=False)
    meta = src.metadata()
    first = [int(np.flatnonzero(src.labels[i])[0]) for i in range(len(src))]
    used = sorted(set(first))
    out = tmp_path / "mc.zarr"
    with ChipWriter(out, ["s2", "s1"], 64, class_names=[src.class_names[c] for c in used], label_type="class") as w:
        for i in range(len(src)):
            item = src[i]
            w.add(meta["chip_id"][i], meta["sample"][i], {"s2": item["s2"].numpy(), "s1": item["s1"].numpy()},
                  Grid(meta["crs"][i], tuple(meta["transform"][i]), (64, 64)), labels=np.array(used.index(first[i])),
                  split=meta["split"][i])
    params = {"applications": {"cover-class": {"modalities": ["s2"], "task": "multiclass", "metric": "accuracy",
                                                "chips": str(out), "finetune": FAST}}}
    app = get_application("cover-class", params)
    prune_app(app, pretrained, out, tmp_path / "p")
    finetune_app(app, tmp_path / "p", out, tmp_path / "f")
    rep = evaluate_app(app, tmp_path / "f", out)
    assert rep["metric"] == "accuracy" and rep["test_chips"] == int((meta["split"] == "test").sum())
    for v in ("pruned", "unpruned", "scratch"):
        assert rep[v]["value"] in {k / rep["test_chips"] for k in range(rep["test_chips"] + 1)}


def test_applications_yaml_next_to_params_adds_apps(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"applications": {
        "a1": {"modalities": ["s1"], "task": "segmentation", "metric": "miou"}}}))
    (tmp_path / "applications.yaml").write_text(yaml.safe_dump({
        "a2": {"modalities": ["s2"], "task": "multilabel", "metric": "f1_macro"}}))
    assert sorted(load_applications(tmp_path / "params.yaml")) == ["a1", "a2"]
    (tmp_path / "applications.yaml").write_text(yaml.safe_dump({
        "a1": {"modalities": ["s2"], "task": "multilabel", "metric": "f1_macro"}}))
    with pytest.raises(ValueError, match="application 'a1' is also defined in"):
        load_applications(tmp_path / "params.yaml")

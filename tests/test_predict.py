"""Whole-scene inference on the real Sen1Floods11 scene chip (tiny untrained task models: the checks
are about windows, blending, georeferencing and memory, not about accuracy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

# tall_scene: the same taller scene bench/predict.py maps
from tests.helpers import NORM, S1, S2, tall_scene, tiny


def chip_probs(model: torch.nn.Module, row: int, col: int) -> np.ndarray:
    arrays = {}
    for m, path in (("s1", S1), ("s2l1c", S2)):
        if m in model.modalities:
            with rasterio.open(path) as src:
                a = src.read(window=rasterio.windows.Window(col, row, 64, 64), masked=True)
                a = a.astype(np.float32).filled(np.nan)
            n = NORM[m]
            a = (a.astype(np.float32) - np.asarray(n["mean"], np.float32)[:, None, None]) / np.asarray(
                n["std"], np.float32)[:, None, None]
            arrays[m] = torch.from_numpy(np.nan_to_num(a)[None])
    with torch.no_grad():
        logits = model(arrays)
    return (torch.sigmoid(logits) if model.task == "multilabel" else torch.softmax(logits, 1))[0].numpy()


def test_interior_equals_chipwise_prediction_and_output_is_a_georeferenced_cog(tmp_path: Path) -> None:
    from mapex_core.predict import predict_scene

    model = tiny(modalities=("s1", "s2l1c"))
    out = tmp_path / "probs.tif"
    summary = predict_scene(model, {"s1": S1, "s2l1c": S2}, out, output="probabilities", overlap=16, batch_size=5)
    assert summary["windows"] == 11 * 11 and summary["classes"] == ["dry", "water"]
    with rasterio.open(out) as dst, rasterio.open(S1) as src:
        assert dst.crs == src.crs and dst.transform == src.transform and dst.shape == src.shape
        assert dst.count == 2 and dst.dtypes[0] == "float32"
        assert dst.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        probs = dst.read()
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    # windows start every 48 px (the last one flush with the edge, at 448): the centre [16, 48) of
    # each window before it is covered by that window alone
    for row, col in ((48, 96), (240, 384), (0, 0)):
        want = chip_probs(model, row, col)
        got = probs[:, row + 16:row + 48, col + 16:col + 48]
        np.testing.assert_allclose(got, want[:, 16:48, 16:48], atol=1e-5)
    labels = tmp_path / "labels.tif"
    predict_scene(model, {"s1": S1, "s2l1c": S2}, labels, overlap=16)
    with rasterio.open(labels) as dst:
        assert dst.count == 1 and dst.dtypes[0] == "uint8"
        np.testing.assert_array_equal(dst.read(1), probs.argmax(0))


def test_classification_models_map_window_probabilities(tmp_path: Path) -> None:
    from mapex_core.predict import predict_scene

    model = tiny("multilabel")
    predict_scene(model, {"s1": S1}, tmp_path / "cls.tif", output="probabilities", overlap=0)
    with rasterio.open(tmp_path / "cls.tif") as dst:
        probs = dst.read()
    assert probs.shape == (3, 512, 512)
    np.testing.assert_allclose(probs[:, 64:128, 128:192], chip_probs(model, 64, 128)[:, None, None]
                               * np.ones((1, 64, 64), np.float32), atol=1e-5)


def test_missing_or_extra_modalities_and_bad_files_are_clear_errors(tmp_path: Path) -> None:
    from mapex_core.predict import predict_scene

    model = tiny(modalities=("s1", "s2l1c"))
    with pytest.raises(ValueError, match=r"takes modalities \['s1', 's2l1c'\] .*missing: \['s2l1c'\]"):
        predict_scene(model, {"s1": S1}, tmp_path / "x.tif")
    with pytest.raises(ValueError, match=r"not used by it: \['s2'\]"):
        predict_scene(model, {"s1": S1, "s2l1c": S2, "s2": S2}, tmp_path / "x.tif")
    with pytest.raises(ValueError, match=r"S1Hand.tif: s2l1c needs 13 bands"):
        predict_scene(model, {"s1": S1, "s2l1c": S1}, tmp_path / "x.tif")
    assert not (tmp_path / "x.tif").exists()


RSS_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[3])
from tests.helpers import peak_rss_kb
from mapex_core import delivery
s = delivery.predict("flood-s1", {"s1": sys.argv[1]}, sys.argv[2], model=sys.argv[4], output="probabilities",
                     batch_size=8)
print(json.dumps({"windows": s["windows"], "peak_kb": peak_rss_kb()}))
"""


def test_peak_memory_does_not_grow_with_scene_height(tmp_path: Path) -> None:
    """Each scene is mapped in a fresh process, by what `mapex predict --model DIR` runs
    (``delivery.predict``), and the process reads its own peak RSS (VmHWM) afterwards."""
    from mapex_core.model.heads import save_task_model

    root = str(Path(__file__).resolve().parents[1])
    model = tiny()
    model.info = {"app": "flood-s1"}
    save_task_model(model, tmp_path / "model")
    # glibc's malloc settings not inherited from this process: an earlier test's local Dask cluster
    # leaves MALLOC_TRIM_THRESHOLD_ in it, and the result must be the same alone and in the suite
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    runs = {}
    for repeats in (2, 16):  # 1024 x 512 and 8192 x 512 pixels
        scene = tall_scene(tmp_path / f"tall{repeats}.tif", repeats)
        res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(scene), str(tmp_path / f"p{repeats}.tif"), root,
                              str(tmp_path / "model")], capture_output=True, text=True, check=True, env=env)
        runs[repeats] = json.loads(res.stdout.strip().splitlines()[-1])
    small, big = runs[2], runs[16]
    assert big["windows"] > 7 * small["windows"]
    # the 8x taller scene's probabilities alone would take 8192*512*2*4 B = 32 MiB more if held whole
    assert big["peak_kb"] - small["peak_kb"] < 8 * 1024, runs


def test_cli_predict_with_a_local_model(tmp_path: Path) -> None:
    from mapex_core.model.heads import save_task_model

    model = tiny()
    model.info = {"app": "flood-s1"}
    save_task_model(model, tmp_path / "model")
    cmd = [sys.executable, "-m", "mapex_core.cli", "predict", "--app", "flood-s1", "--model", str(tmp_path / "model"),
           "--out", str(tmp_path / "flood.tif"), "--quiet"]
    res = subprocess.run([*cmd, "--input", f"s1={S1}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["windows"] == 121 and summary["output"] == "labels"
    with rasterio.open(tmp_path / "flood.tif") as dst:
        assert dst.count == 1 and set(np.unique(dst.read(1))) <= {0, 1}
    bad = subprocess.run([*cmd, "--input", f"s1={S1}", "--input", f"s2={S2}"], capture_output=True, text=True)
    assert bad.returncode == 1 and "not used by it: ['s2']" in bad.stderr
    bad = subprocess.run([*cmd, "--input", str(S1)], capture_output=True, text=True)
    assert bad.returncode == 1 and "--input must be MODALITY=PATH" in bad.stderr
    other = subprocess.run([*cmd, "--input", f"s1={S1}", "--app", "landcover-s1"], capture_output=True, text=True)
    assert other.returncode == 1 and "is a model of application 'flood-s1', not 'landcover-s1'" in other.stderr


def test_a_modality_on_another_grid_is_warped_onto_the_finest_one(tmp_path: Path) -> None:
    """S1 reprojected to UTM at 5 m is the finest input in metres (the S2 scene's ~9 m pixels are in
    degrees): the output takes its grid, S2 is warped onto it, and the interior equals chip-wise
    prediction on S1 read directly and S2 warped by GDAL directly."""
    import rioxarray
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    from mapex_core.predict import predict_scene

    utm = tmp_path / "s1_utm.tif"
    rioxarray.open_rasterio(S1, masked=True).rio.reproject(
        "EPSG:32630", resolution=5.0, resampling=Resampling.bilinear).rio.to_raster(utm)
    model = tiny(modalities=("s1", "s2l1c"))
    out = tmp_path / "probs.tif"
    predict_scene(model, {"s1": utm, "s2l1c": S2}, out, output="probabilities", overlap=16, batch_size=16)
    with rasterio.open(out) as dst, rasterio.open(utm) as ref, rasterio.open(S2) as s2:
        assert dst.crs == ref.crs and dst.transform == ref.transform and dst.shape == ref.shape
        r, c = 48 * (ref.height // 96), 48 * (ref.width // 96)  # a window in the middle of the scene
        window = rasterio.windows.Window(c, r, 64, 64)
        got = dst.read(window=window)[:, 16:48, 16:48]  # covered by this window alone
        with WarpedVRT(s2, crs=ref.crs, transform=ref.transform, width=ref.width, height=ref.height,
                       resampling=Resampling.bilinear, src_nodata=s2.nodata, nodata=np.nan, dtype="float32") as vrt:
            raw = {"s1": ref.read(window=window, masked=True).astype(np.float32).filled(np.nan),
                   "s2l1c": vrt.read(window=window, masked=True).astype(np.float32).filled(np.nan)}
    assert np.isfinite(raw["s2l1c"]).mean() > 0.9 and np.isfinite(raw["s1"]).mean() > 0.9  # inside both scenes
    arrays = {}
    for m, a in raw.items():
        n = NORM[m]
        a = (a - np.asarray(n["mean"], np.float32)[:, None, None]) / np.asarray(n["std"], np.float32)[:, None, None]
        arrays[m] = torch.from_numpy(np.nan_to_num(a)[None])
    with torch.no_grad():
        want = torch.softmax(model(arrays), 1)[0].numpy()[:, 16:48, 16:48]
    np.testing.assert_allclose(got, want, atol=1e-5)

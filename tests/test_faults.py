"""Faults a user meets, on copies of the real samples: an infinite value in a raster, a store from an older
version with infinite statistics, hostile names, and which failures exit 1 (fix the input) or 75 (retry)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from mapex_core.errors import EX_TEMPFAIL, MapexError, exit_status

ROOT = Path(__file__).resolve().parents[1]


def mapex(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "mapex_core.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def inf_store(ben_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real BigEarthNet pairs with one infinite value in one Sentinel-1 VV raster, ingested."""
    from mapex_core.data.ingest import ingest

    root = tmp_path_factory.mktemp("inf")
    src = root / "ben"
    shutil.copytree(ben_root, src)
    vv = sorted(src.rglob("*_VV.tif"))[0]
    with rasterio.open(vv, "r+") as ds:
        a = ds.read(1)
        a[10, 10] = np.inf
        ds.write(a, 1)
    out = root / "inf.zarr"
    ingest(src, out, layout="bigearthnet", reports_dir=root / "reports", chip_size=64, stride=56)
    return out


def test_an_infinite_pixel_is_quarantined_and_left_out_of_the_statistics(inf_store: Path, ben_store: Path) -> None:
    from mapex_core.data.dataset import ChipStore

    store = ChipStore.open(inf_store, include_quarantined=True, normalize=False)
    meta = store.metadata()
    bad = meta[meta["s1_VV_max"] == np.inf]
    assert len(bad) >= 1 and bad["quarantined"].all()
    stats = store.band_stats("s1")
    assert np.isfinite(stats[["mean", "std", "p01", "p99"]].to_numpy()).all()
    clean = ChipStore.open(ben_store, normalize=False).band_stats("s1")
    # one pixel of ~14 400 per patch left out: the mean moves by a hair, not to infinity
    assert abs(stats.loc["VV", "mean"] - clean.loc["VV", "mean"]) < 0.05


def test_a_quarantined_chip_is_taken_out_of_the_statistics(inf_store: Path, ben_store: Path) -> None:
    """Exact pixel counts: the quarantined chip (offset 0, 0 of its 120 px patch, stride 56) owns the
    56 x 56 pixels up to the next chip's offset; they leave the train statistics of both S1 bands."""
    import xarray as xr

    from mapex_core.data.dataset import ChipStore

    meta = ChipStore.open(inf_store, include_quarantined=True, normalize=False).metadata()
    bad = meta[meta["quarantined"]]
    assert len(bad) == 1 and (bad["row"].iloc[0], bad["col"].iloc[0]) == (0, 0)
    hostile, clean = (xr.open_zarr(p, consolidated=True) for p in (inf_store, ben_store))
    removed = 56 * 56 if bad["split"].iloc[0] == "train" else 0
    assert clean["s1_count"].values.tolist() == [hostile["s1_count"].values[0] + removed,
                                                  hostile["s1_count"].values[1] + removed]
    assert (hostile["s2_count"].values == clean["s2_count"].values - removed).all()


def test_a_store_with_infinite_statistics_is_refused_naming_the_band(ben_store: Path, tmp_path: Path) -> None:
    import zarr

    from mapex_core.data.dataset import ChipStore

    old = tmp_path / "old.zarr"
    shutil.copytree(ben_store, old)
    arr = zarr.open_array(str(old / "s1_mean"), mode="r+")
    arr[0] = np.inf  # what the previous version wrote for an infinite VV pixel
    with pytest.raises(ValueError, match=r"old.zarr: the normalisation statistics of s1 band VV are not finite"):
        ChipStore.open(old)
    for cmd in (["validate", "--chips", str(old), "--reports", str(tmp_path / "r")],
                ["pretrain", "--chips", str(old), "--out", str(tmp_path / "pre"), "--steps", "1", "--quiet"]):
        res = mapex(*cmd, cwd=tmp_path)
        assert res.returncode == 1 and "statistics of s1 band VV are not finite" in res.stderr, (cmd, res.stderr)
        assert "Traceback" not in res.stderr


def test_hostile_application_names_never_reach_the_registry(tmp_path: Path) -> None:
    res = mapex("promote", "--app", "x' OR name LIKE '%", "--version", "1", cwd=tmp_path)
    assert res.returncode == 1 and "invalid application name" in res.stderr and "filter" not in res.stderr
    res = mapex("serve", "--app", "ok", "--alias", "champion'; --", cwd=tmp_path)
    assert res.returncode == 1 and "invalid alias" in res.stderr
    assert not (tmp_path / "mlflow").exists()  # refused before any store was opened


def test_exit_status_tells_fix_the_input_from_retry(tmp_path: Path) -> None:
    for code in (errno.EROFS, errno.EACCES, errno.ENOSPC, errno.ENOENT, errno.ENOTDIR):
        assert exit_status(OSError(code, os.strerror(code), "/data/out")) == 1, code
    for exc in (OSError(errno.EIO, "I/O error"), TimeoutError("read timed out"), ConnectionResetError()):
        assert exit_status(exc) == EX_TEMPFAIL, exc
    assert exit_status(ValueError("bad")) == 1 and exit_status(MapexError("bad")) == 1
    assert exit_status(KeyError("bug")) is None  # a bug keeps its traceback
    # a real one: an output path under a regular file
    (tmp_path / "afile").write_text("x")
    res = mapex("samples", "--dest", str(tmp_path / "afile" / "raw"), "--source", "bigearthnet", cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "afile" in res.stderr and "Traceback" not in res.stderr


def test_predict_refuses_a_complex_or_integer_sar_scene_naming_the_file(tmp_path: Path) -> None:
    """`mapex predict` checks its inputs' data types like ingestion does (before any pixel is read)."""
    from mapex_core.predict import predict_scene
    from tests.helpers import S1, tiny

    with rasterio.open(S1) as src:
        data, profile = src.read(), src.profile
    for dtype, word in (("complex64", "complex"), ("uint16", "uint16")):
        bad = tmp_path / f"s1_{dtype}.tif"
        profile.update(dtype=dtype, nodata=None)
        with rasterio.open(bad, "w", **profile) as dst:
            dst.write(np.nan_to_num(data).astype(dtype))
        with pytest.raises(ValueError, match=rf"s1_{dtype}.tif: band 1 \(VV\) has the .*{word}"):
            predict_scene(tiny(), {"s1": bad}, tmp_path / "out.tif")
    assert not (tmp_path / "out.tif").exists()

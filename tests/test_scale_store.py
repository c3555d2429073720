"""Chip stores at scale (issue 18.2): Zarr v3 shards of one chunk per chip, consolidated metadata; stores of
format version 1 (Zarr v2, 8-chip chunks) still read with the same tensors, and `mapex convert-store`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import xarray as xr
import zarr

from mapex_core.data import shards
from mapex_core.data.dataset import ChipStore, collate
from mapex_core.data.sampling import PresenceBatchSampler
from mapex_core.data.statistics import pooled_normalization
from mapex_core.data.store import FORMAT_VERSION, open_dataset
from tests.helpers import S1, WINDOWS, real_chips


def write_v1(src: Path, dst: Path) -> Path:
    """The store at ``src`` laid out as format version 1 wrote it: Zarr v2 through xarray, 8-chip chunks
    for the image arrays, default chunks for the rest, consolidated metadata, ``format_version`` 1. The
    image arrays are read with zarr itself (not the reader under test)."""
    ds = open_dataset(src)
    data = {}
    for name, var in ds.data_vars.items():
        if name.startswith("scene_") or "_running_" in name:
            continue  # format 2 only
        values = zarr.open_array(str(src / name), mode="r")[...] if (src / name / "c").is_dir() and \
            name in (*ds.attrs["modalities"], "labels") else var.values
        if values.dtype.kind in "OT":
            values = np.array([str(v) for v in values], dtype=object)
        data[name] = (var.dims, values)
    coords = {k: [str(v) for v in c.values] for k, c in ds.coords.items() if k != "statistics_set"}
    out = xr.Dataset(data, coords=coords)
    out.attrs.update({k: v for k, v in ds.attrs.items() if k not in ("shard_chips", "ingest_settings")},
                     format_version=1)
    enc = {m: {"chunks": (8, *ds[m].shape[1:])} for m in ds.attrs["modalities"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out.to_zarr(dst, mode="w", zarr_format=2, consolidated=False, encoding=enc)
        zarr.consolidate_metadata(str(dst), zarr_format=2)
    return dst


def assert_same_reads(a: ChipStore, b: ChipStore) -> None:
    """Every item, label, metadata row, statistic, fingerprint and batch of ``a`` and ``b`` are equal."""
    assert len(a) == len(b) > 0 and a.modalities == b.modalities
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys(), i
        for k in x:
            assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k], (i, k)
    assert a.fingerprint() == b.fingerprint()
    assert a.metadata().equals(b.metadata())
    for m in a.stored_modalities:
        assert a.band_stats(m).equals(b.band_stats(m))
    assert pooled_normalization([a]) == pooled_normalization([b])
    assert a.presence_patterns() == b.presence_patterns()
    batches = PresenceBatchSampler(a, 4, seed=3).batches(0)
    assert batches == PresenceBatchSampler(b, 4, seed=3).batches(0)
    for idx in batches[:3]:  # what pre-training and pruning calibration stack
        ca, cb = collate([a[i] for i in idx]), collate([b[i] for i in idx])
        assert all(torch.equal(ca[k], cb[k]) for k in ca)


# ----- the shard files --------------------------------------------------------------------------
def test_shard_files_are_byte_for_byte_what_zarr_writes(tmp_path: Path) -> None:
    chips = real_chips(["s1"])["s1"]  # (5, 2, 64, 64) real Sen1Floods11 S1 windows, with NaN nodata
    data = np.concatenate([chips, np.full((1, 2, 64, 64), np.nan, np.float32), chips[:2] * 0.5])  # an all-NaN chip
    with rasterio.open(S1) as src:  # a mask-like int16 array: a zero chip (not stored) among real values
        masks = np.stack([(src.read(1, window=rasterio.windows.Window(c, r, 64, 64)) < -15).astype(np.int16)
                          for r, c in WINDOWS] + [np.zeros((64, 64), np.int16)] * 3)
    for name, arr in (("img", data), ("mask", masks)):
        writer = shards.ShardWriter(tmp_path / "mine" / name, arr.ndim, shard_chips=3)
        for chip in arr:
            writer.append(shards.encode_chip(chip))
        writer.close()
        ref = zarr.create_array(str(tmp_path / "ref" / name), shape=arr.shape, dtype=arr.dtype,
                                chunks=(1, *arr.shape[1:]), shards=(3, *arr.shape[1:]),
                                compressors=[zarr.codecs.ZstdCodec(level=0)], fill_value=shards.fill_value(arr.dtype))
        ref[...] = arr
        mine = sorted(p.relative_to(tmp_path / "mine" / name) for p in (tmp_path / "mine" / name).rglob("*")
                      if p.is_file())
        theirs = sorted(p.relative_to(tmp_path / "ref" / name) for p in (tmp_path / "ref" / name).rglob("*")
                        if p.is_file() and p.name != "zarr.json")
        assert mine == theirs and len(mine) == math.ceil(len(arr) / 3) - (name == "mask")  # last mask shard: zeros
        for rel in mine:
            assert (tmp_path / "mine" / name / rel).read_bytes() == (tmp_path / "ref" / name / rel).read_bytes(), rel
        (tmp_path / "mine" / name / "zarr.json").write_bytes((tmp_path / "ref" / name / "zarr.json").read_bytes())
        reader = shards.ShardReader.open(tmp_path / "mine" / name)
        assert reader is not None and reader.shard_chips == 3
        np.testing.assert_array_equal(reader.read_all(), arr)
        for j in range(len(arr)):
            np.testing.assert_array_equal(reader[j], ref[j])
        with pytest.raises(IndexError, match="out of range"):
            reader[len(arr)]


def test_a_damaged_shard_index_is_named(tmp_path: Path) -> None:
    chips = real_chips(["s1"])["s1"]
    writer = shards.ShardWriter(tmp_path / "a", 4, shard_chips=8)
    for chip in chips:
        writer.append(shards.encode_chip(chip))
    writer.close()
    path = shards.shard_path(tmp_path / "a", 0, 4)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # a bit flipped in the index
    path.write_bytes(bytes(raw))
    reader = shards.ShardReader(tmp_path / "a", (5, 2, 64, 64), np.float32, 8)
    with pytest.raises(ValueError, match=r"c/0/0/0/0: corrupt shard index"):
        reader[0]


# ----- stores -------------------------------------------------------------------------------------
def test_a_store_is_one_file_per_shard_per_image_array(shared_flood_store: Path) -> None:
    ds = open_dataset(shared_flood_store)
    n = int(ds.sizes["chip"])
    assert ds.attrs["format_version"] == FORMAT_VERSION == 2 and ds.attrs["shard_chips"] == shards.SHARD_CHIPS
    root = json.loads((shared_flood_store / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and "consolidated_metadata" in root  # one read opens the store
    image = [*ds.attrs["modalities"], "labels"]  # Sen1Floods11: s2l1c, s1 and a mask
    for name in image:
        files = sorted(p for p in (shared_flood_store / name).rglob("*") if p.is_file())
        assert [p.name for p in files] == ["0"] * math.ceil(n / shards.SHARD_CHIPS) + ["zarr.json"], name
    for name in ds.data_vars:  # every other array: one chunk
        if name not in image:
            chunks = [p for p in (shared_flood_store / name).rglob("*") if p.is_file() and p.name != "zarr.json"]
            assert len(chunks) <= 1, name
    # so a store of 500,000 chips holds 3 x 123 shard files and the same fixed set of small arrays
    fixed = sum(1 for p in shared_flood_store.rglob("*") if p.is_file()) - len(image)
    assert fixed + len(image) * math.ceil(500_000 / shards.SHARD_CHIPS) < 500


@pytest.mark.parametrize("fixture", ["ben_store", "shared_flood_store"])
def test_format_1_and_2_stores_of_the_same_chips_read_the_same(fixture: str, request: pytest.FixtureRequest,
                                                               tmp_path: Path) -> None:
    v2 = request.getfixturevalue(fixture)
    v1 = write_v1(v2, tmp_path / "v1.zarr")
    assert (v1 / ".zmetadata").is_file() and (v1 / next(iter(open_dataset(v2).attrs["modalities"])) / ".zarray").is_file()
    for in_memory in (True, False):
        for split in (None, "train"):
            assert_same_reads(ChipStore.open(v1, in_memory=in_memory, split=split, include_quarantined=True),
                              ChipStore.open(v2, in_memory=in_memory, split=split, include_quarantined=True))
    assert isinstance(ChipStore.open(v2, in_memory=False)._arrays[open_dataset(v2).attrs["modalities"][0]],
                      shards.ShardReader)  # the fast path, not zarr's per-chip index reads


def test_pretraining_on_either_format_gives_the_same_weights(ben_store: Path, tmp_path: Path) -> None:
    from mapex_core.model import MapexConfig
    from mapex_core.training.pretrain import PretrainParams, pretrain

    v1 = write_v1(ben_store, tmp_path / "v1.zarr")
    cfg = dict(modalities=["s1", "s2"], img_size=64, patch_size=16, dim=32, depth=2, heads=2, moe_every=2,
               experts_per_modality=2, top_k=1, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    p = PretrainParams(steps=3, batch_size=4, log_every=1, ckpt_every=3, stats_batches=1)
    for name, store in (("v1", v1), ("v2", ben_store)):
        pretrain(store, tmp_path / name, MapexConfig(**cfg), p, device="cpu")
    assert (tmp_path / "v1" / "model.safetensors").read_bytes() == (tmp_path / "v2" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "v1" / "config.json").read_text()) == json.loads(
        (tmp_path / "v2" / "config.json").read_text())


def test_convert_store_rewrites_a_format_1_store_with_the_same_values(shared_flood_store: Path, tmp_path: Path) -> None:
    v1 = write_v1(shared_flood_store, tmp_path / "old.zarr")
    res = subprocess.run([sys.executable, "-m", "mapex_core.cli", "convert-store", str(v1), str(tmp_path / "new.zarr")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["format_version_before"] == 1 and summary["format_version"] == 2 and summary["chips"] == 64
    assert summary["files_after"] < summary["files_before"]
    new = tmp_path / "new.zarr"
    assert open_dataset(new).attrs["converted_from_format_version"] == 1
    assert_same_reads(ChipStore.open(v1, include_quarantined=True), ChipStore.open(new, include_quarantined=True))
    assert_same_reads(ChipStore.open(new, include_quarantined=True, in_memory=False),
                      ChipStore.open(shared_flood_store, include_quarantined=True, in_memory=False))
    # in place: the store is rebuilt aside and swapped in
    res = subprocess.run([sys.executable, "-m", "mapex_core.cli", "convert-store", str(v1), str(v1)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert open_dataset(v1).attrs["format_version"] == 2
    assert_same_reads(ChipStore.open(v1, include_quarantined=True), ChipStore.open(new, include_quarantined=True))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    res = subprocess.run([sys.executable, "-m", "mapex_core.cli", "convert-store", str(tmp_path / "notes"),
                          str(tmp_path / "c.zarr")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "notes: is a folder that is not a chip store" in res.stderr
    assert "Traceback" not in res.stderr

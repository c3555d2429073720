"""``mapex convert-store``: a chip store of an earlier format version rewritten in the current one.

Format version 1 (Zarr v2, 8-chip chunks: one file per 8 chips per image array) becomes version 2
(Zarr v3, one chunk per chip in shards of 4096 chips, consolidated metadata): every value is kept
as it is (chips, labels, metadata, quarantine flags, normalisation statistics), so training,
calibration and evaluation read the same tensors from either store. Version 1 stores keep no
running sums or scene records: ``mapex ingest --append`` on a converted store ingests it again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from mapex_core.data import shards
from mapex_core.data.store import FORMAT, FORMAT_VERSION, chip_store_problem, open_dataset
from mapex_core.io import check_output, replace_folder, sweep_strays, temporary_sibling

READ_CHIPS = 256  # chips read from the old store at once


def _sharded(ds: xr.Dataset) -> list[str]:
    mods = list(ds.attrs["modalities"])
    return mods + (["labels"] if ds.attrs.get("label_type") == "mask" and "labels" in ds else [])


def convert_store(old: str | Path, new: str | Path, force: bool = False,
                  shard_chips: int = shards.SHARD_CHIPS) -> dict[str, Any]:
    """Rewrite the chip store ``old`` in the current format at ``new`` (may be ``old`` itself).

    Args:
        old: a chip store of any format version.
        new: where the converted store goes (built aside, swapped in whole).
        force: replace whatever is at ``new`` (otherwise only a chip store).
        shard_chips: chips per shard file.

    Returns:
        ``old``, ``new``, format versions, chips, files before and after, seconds.

    Raises:
        FileNotFoundError: no store at ``old``.
        ValueError: ``old`` is not a chip store.
    """
    t0 = time.perf_counter()
    old, new = Path(old), Path(new)
    if not old.exists():
        raise FileNotFoundError(f"{old}: chip store not found")
    problem = chip_store_problem(old)
    if problem:
        raise ValueError(f"{old}: {problem}")
    check_output(new, chip_store_problem, force)
    ds = open_dataset(old)
    if ds.attrs.get("format") != FORMAT:
        raise ValueError(f"{old}: not a MAPEX chip store (format={ds.attrs.get('format')!r})")
    n = int(ds.sizes["chip"])
    sweep_strays(new)
    new.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(new)
    try:
        variables: dict[str, Any] = {}
        encoding: dict[str, Any] = {}
        for name in _sharded(ds):
            var = ds[name]
            writer = shards.ShardWriter(tmp / name, var.ndim, shard_chips)
            for start in range(0, n, READ_CHIPS):
                block = np.asarray(var[start: start + READ_CHIPS].values)  # (b, ...) as stored
                for chip in block:
                    writer.append(shards.encode_chip(chip))
            writer.close()
            variables[name] = (var.dims, shards.placeholder(var.shape, var.dtype, shard_chips))
            encoding[name] = shards.encoding(var.shape, shard_chips)
        for name, var in ds.data_vars.items():
            if name in variables:
                continue
            values = np.asarray(var.values)
            if values.dtype.kind in "OUT":  # strings: variable length, as the writer stores them
                values = np.array([str(v) for v in values.ravel()], dtype=object).reshape(values.shape)  # as it was
            variables[name] = (var.dims, values)
            if values.ndim:
                encoding[name] = {"chunks": tuple(max(1, s) for s in values.shape)}
        coords = {k: np.array([str(v) for v in c.values], dtype=object) if c.dtype.kind in "OUT" else c.values
                  for k, c in ds.coords.items()}
        out = xr.Dataset(variables, coords=coords)
        before = ds.attrs.get("format_version")
        out.attrs.update({**ds.attrs, "format_version": FORMAT_VERSION, "shard_chips": shard_chips,
                          **({"converted_from_format_version": before} if before != FORMAT_VERSION else {})})
        import warnings

        import zarr

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr", category=UserWarning)
            out.to_zarr(tmp, mode="a", zarr_format=3, consolidated=False, encoding=encoding, compute=False)
            zarr.consolidate_metadata(str(tmp), zarr_format=3)
        files_before = sum(1 for p in old.rglob("*") if p.is_file())
        check_output(new, chip_store_problem, force)  # again: something may have appeared meanwhile
        replace_folder(tmp, new)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return {"old": str(old), "new": str(new), "format_version_before": before, "format_version": FORMAT_VERSION,
            "chips": n, "files_before": files_before, "files_after": sum(1 for p in new.rglob("*") if p.is_file()),
            "seconds": round(time.perf_counter() - t0, 3)}

"""Reading a chip store: a torch ``Dataset`` of dict samples, normalised with a model's statistics.

:meth:`ChipStore.open` opens one store (optionally one split, some modalities, in RAM or read
lazily); :class:`ConcatStores` puts several side by side for pre-training; :func:`collate` stacks
items that hold the same modalities (batches come from
:class:`~mapex_core.data.sampling.PresenceBatchSampler`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch.utils.data import Dataset

from mapex_core.data.sampling import SPLITS
from mapex_core.data.shards import ShardReader
from mapex_core.data.statistics import check_statistics
from mapex_core.data.store import FORMAT, META_COLUMNS, open_dataset


def _strings(da: xr.DataArray) -> np.ndarray:
    """A string variable as an object array of ``str`` (zarr returns numpy StringDType)."""
    return np.array([str(v) for v in da.values], dtype=object)


def chip_array(path: Path, ds: xr.Dataset, name: str, load: bool) -> Any:
    """A chip array of the store at ``path``: in RAM (``load``), else read a chip at a time; a sharded
    array (format version 2) through :class:`~mapex_core.data.shards.ShardReader`, others through xarray."""
    reader = ShardReader.open(path / name)
    if reader is None:
        return ds[name].values if load else ds[name].variable
    return reader.read_all() if load else reader

class ChipStore(Dataset):
    """A chip store opened for reading: a torch ``Dataset`` of dict samples.

    Each item is ``{modality: (C, H, W) float32 normalised, ..., "labels": (K,), "index": i}``
    with only the modalities present in that chip. Normalisation is ``(x - mean) / std`` with
    the store's statistics; NaN (nodata) becomes 0 after normalisation (the band mean).

    Use :meth:`open`; ``indices`` restricts the view (e.g. a split).
    """

    def __init__(self, path: Path, ds: xr.Dataset, modalities: list[str], indices: np.ndarray,
                 normalize: bool, arrays: dict[str, Any],
                 normalization: dict[str, dict[str, list[float]]] | None = None) -> None:
        self.path = path
        self.ds = ds
        self.modalities = modalities
        self.indices = indices
        self.normalize = normalize
        self._arrays = arrays
        self.stored_modalities = list(ds.attrs["modalities"])
        norm = normalization or {}
        self.mean = {m: np.asarray(norm[m]["mean"] if m in norm else ds[f"{m}_mean"].values,
                                   np.float32)[:, None, None] for m in modalities}
        self.std = {m: np.asarray(norm[m]["std"] if m in norm else ds[f"{m}_std"].values,
                                  np.float32)[:, None, None] for m in modalities}
        cols = [self.stored_modalities.index(m) for m in modalities]
        self.present = np.asarray(ds["present"].values)[indices][:, cols]  # (N, M)
        labels = chip_array(path, ds, "labels", load=True) if "labels" in ds else None
        self.labels = np.asarray(labels)[indices] if labels is not None else None
        self.class_names = [str(c) for c in ds["class"].values] if "class" in ds.coords else None
        self.label_type = str(ds.attrs.get("label_type", "none"))

    @classmethod
    def open(
        cls,
        path: str | Path,
        modalities: list[str] | None = None,
        split: str | list[str] | None = None,
        normalize: bool = True,
        in_memory: bool | None = None,
        max_memory_bytes: int = 2 << 30,
        include_quarantined: bool = False,
        normalization: dict[str, dict[str, list[float]]] | None = None,
        require_all: bool = False,
    ) -> ChipStore:
        """Open a chip store.

        Args:
            path: the store written by :class:`ChipWriter`.
            modalities: keep only these modalities (chips with none of them are dropped).
            split: ``train``, ``val``, ``test`` or a list of them; ``None`` = all chips.
            normalize: apply the stored per-band normalisation.
            in_memory: load the arrays into RAM; default when they fit ``max_memory_bytes``.
            include_quarantined: keep chips that failed validation (skipped by default).
            normalization: per modality ``{"mean": [...], "std": [...]}`` to use instead of the
                store's own statistics (a model's training statistics).
            require_all: keep only chips in which every one of ``modalities`` is present
                (default: chips with any of them).

        Raises:
            FileNotFoundError: no store at ``path``.
            ValueError: not a chip store, or an unknown modality / split.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: chip store not found")
        try:
            ds = open_dataset(path)
        except Exception as exc:  # zarr raises several types for a non-store directory
            raise ValueError(f"{path}: not a readable chip store: {exc}") from exc
        if ds.attrs.get("format") != FORMAT:
            raise ValueError(f"{path}: not a MAPEX chip store (format={ds.attrs.get('format')!r})")
        check_statistics(ds, path)
        stored = list(ds.attrs["modalities"])
        mods = list(modalities) if modalities is not None else stored
        unknown = [m for m in mods if m not in stored]
        if unknown:
            raise ValueError(f"{path}: modalities {unknown} not in this store; it holds {stored}")
        present = np.asarray(ds["present"].values)[:, [stored.index(m) for m in mods]]
        keep = present.all(1) if require_all else present.any(1)
        if not include_quarantined and "quarantined" in ds:
            keep &= ~np.asarray(ds["quarantined"].values, dtype=bool)
        if split is not None:
            splits = [split] if isinstance(split, str) else list(split)
            bad = [s for s in splits if s not in SPLITS]
            if bad:
                raise ValueError(f"unknown split(s) {bad}; known: {list(SPLITS)}")
            keep &= np.isin(_strings(ds["split"]), splits)
        indices = np.flatnonzero(keep)
        nbytes = sum(ds[m].nbytes for m in mods)
        load = in_memory if in_memory is not None else nbytes <= max_memory_bytes
        arrays = {m: chip_array(path, ds, m, load) for m in mods}
        return cls(path, ds, mods, indices, normalize, arrays, normalization)

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, m: str, j: int) -> np.ndarray:
        a = self._arrays[m]
        return np.asarray(a[j] if isinstance(a, np.ndarray | ShardReader) else a[j].values, dtype=np.float32)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.indices[i])
        item: dict[str, Any] = {"index": i}
        for k, m in enumerate(self.modalities):
            if not self.present[i, k]:
                continue
            x = self._read(m, j)  # (C, H, W)
            if self.normalize:
                x = (x - self.mean[m]) / self.std[m]
            item[m] = torch.from_numpy(np.nan_to_num(x, nan=0.0 if self.normalize else np.nan))
        if self.labels is not None:
            lab = self.labels[i]
            item["labels"] = (torch.from_numpy(lab.astype(np.float32)) if self.label_type == "multilabel"
                              else torch.as_tensor(lab.astype(np.int64)))
        return item

    def metadata(self) -> pd.DataFrame:
        """The per-chip metadata table of this view (one row per chip), as validated at ingestion.

        Columns: ``index`` (position in the store), ``chip_id``, ``sample``, ``split``, ``crs``,
        ``time``, ``row``, ``col``, ``content_hash``, ``transform``, ``height``, ``width``, and per
        stored modality ``present_<m>``, ``nodata_frac_<m>`` and ``<m>_<band>_min/_max``.
        """
        idx = self.indices
        ds = self.ds
        df = pd.DataFrame({"index": idx})
        for c in META_COLUMNS:
            df[c] = _strings(ds[c])[idx] if c not in ("row", "col") else ds[c].values[idx]
        df["transform"] = [tuple(t) for t in ds["transform"].values[idx]]
        df["height"] = ds.sizes["y"]
        df["width"] = ds.sizes["x"]
        for k, m in enumerate(self.stored_modalities):
            df[f"present_{m}"] = ds["present"].values[idx, k]
            df[f"nodata_frac_{m}"] = ds["nodata_frac"].values[idx, k]
            mins, maxs = ds[f"{m}_chip_min"].values[idx], ds[f"{m}_chip_max"].values[idx]
            for j, band in enumerate(str(b) for b in ds[f"band_{m}"].values):
                df[f"{m}_{band}_min"] = mins[:, j]
                df[f"{m}_{band}_max"] = maxs[:, j]
        if "quarantined" in ds:
            df["quarantined"] = ds["quarantined"].values[idx]
            df["quarantine_reasons"] = _strings(ds["quarantine_reasons"])[idx]
        return df

    def band_stats(self, modality: str) -> pd.DataFrame:
        """Per-band normalisation statistics of one modality."""
        cols = {k: self.ds[f"{modality}_{k}"].values for k in ("mean", "std", "p01", "p99", "count")}
        return pd.DataFrame(cols, index=[str(b) for b in self.ds[f"band_{modality}"].values])

    @property
    def chip_size(self) -> int:
        return int(self.ds.attrs["chip_size"])

    def fingerprint(self) -> str:
        """SHA-256 of the whole store's chips (ids, splits, contents) and labels: same data, same value."""
        h = hashlib.sha256()
        for col in ("chip_id", "split", "content_hash"):
            h.update("\x1f".join(_strings(self.ds[col])).encode())
        if "labels" in self.ds:
            h.update(np.ascontiguousarray(chip_array(self.path, self.ds, "labels", load=True)).tobytes())
        return h.hexdigest()

    def presence_patterns(self) -> dict[tuple, list[int]]:
        """Indices of this view grouped by the set of modalities present (chips that stack)."""
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(self.present):
            key = tuple(m for m, p in zip(self.modalities, row, strict=True) if p)
            groups.setdefault(key, []).append(i)
        return groups

class ConcatStores(Dataset):
    """Several chip stores as one dataset of modality-only items (labels dropped: pre-training).

    Chips stack into one batch only when they share their present modalities and chip size,
    so :meth:`presence_patterns` groups by both.
    """

    def __init__(self, stores: list[ChipStore]) -> None:
        self.stores = stores
        self.offsets = np.cumsum([0] + [len(s) for s in stores])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        item = self.stores[k][i - int(self.offsets[k])]
        item.pop("labels", None)
        item["index"] = i
        return item

    def presence_patterns(self) -> dict[tuple, list[int]]:
        groups: dict[tuple, list[int]] = {}
        for k, store in enumerate(self.stores):
            for key, idx in store.presence_patterns().items():
                groups.setdefault((key, store.chip_size), []).extend(int(self.offsets[k]) + j for j in idx)
        return groups

def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of items that share the same present modalities.

    The copy is numpy's (one thread): ``torch.stack`` spreads it over torch's intra-op threads, which on a
    busy CPU is tens of times slower for a batch of 64 S1+S2 chips (``bench/scale.py``, BENCHMARKS.md).
    """
    keys = [k for k in items[0] if k != "index"]
    out: dict[str, Any] = {k: torch.from_numpy(np.stack([it[k].numpy() for it in items])) for k in keys}
    out["index"] = torch.tensor([it["index"] for it in items])
    return out

"""The chip store: the on-disk format every stage of the platform reads.

One Zarr store (format 2, consolidated metadata) written through xarray:

=====================  ==============================  ======================================
variable               dims                            meaning
=====================  ==============================  ======================================
``<m>``                (chip, band_<m>, y, x) float32  physical values (S2 reflectance x 1e4,
                                                       S1 dB); NaN = nodata or absent
``present``            (chip, modality) bool           modality present in the chip
``labels``             (chip, class) uint8             multi-hot labels (``multilabel``), or
                       (chip,) int16                   a class id (``class``), or
                       (chip, y, x) int16              a mask (``mask``; -1 = ignore)
``chip_id`` ...        (chip,)                         metadata table (see ``META_COLUMNS``)
``transform``          (chip, affine) float64          GDAL-order affine of the chip
``nodata_frac``        (chip, modality) float32        share of NaN pixels per modality
``<m>_mean`` ...       (band_<m>,) float64             normalisation statistics over the store
=====================  ==============================  ======================================

Write with :class:`ChipWriter` (streams chips to a temporary store, renames it into place when
complete, so a crash never leaves a partial store). Read with :meth:`ChipStore.open`, a torch
``Dataset`` of dict samples normalised with the stored statistics.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch.utils.data import Dataset, Sampler

from mapex_core.data.raster import Grid
from mapex_core.data.sample import Sample
from mapex_core.modalities import get_modality

FORMAT = "mapex-chips"
FORMAT_VERSION = 1
META_COLUMNS = ("chip_id", "sample", "split", "crs", "time", "row", "col", "content_hash")
CHUNK_CHIPS = 8
HIST_BINS = 4096
SPLITS = ("train", "val", "test")  # a chip may also be "none": overlapping two split blocks
LABEL_TYPES = ("multilabel", "class", "mask")
IGNORE_INDEX = -1


def assign_split(group: str, seed: int = 0, fractions: tuple[float, float] = (0.8, 0.1)) -> str:
    """Seeded, order-independent split of a spatial group (sample, scene or tile) by hash."""
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def _strings(da: xr.DataArray) -> np.ndarray:
    """A string variable as an object array of ``str`` (zarr returns numpy StringDType)."""
    return np.array([str(v) for v in da.values], dtype=object)


def assign_splits(groups: list[str], seed: int = 0, fractions: tuple[float, float] = (0.8, 0.1)) -> dict[str, str]:
    """Seeded split of whole spatial groups, in proportion, with every split non-empty when possible.

    Groups are ordered by a seeded hash (so the result does not depend on the input order);
    the first ~80% go to train, then val, then test. With 3 or more groups, val and test get at
    least one group each.
    """
    uniq = sorted(set(groups), key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    n = len(uniq)
    n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
    n_test = max(1, round((1 - fractions[0] - fractions[1]) * n)) if n >= 2 else 0
    n_train = n - n_val - n_test
    return {g: "train" if i < n_train else "val" if i < n_train + n_val else "test" for i, g in enumerate(uniq)}


def chip_offsets(size: int, chip: int, stride: int) -> list[int]:
    """Start offsets along one axis; the last chip is aligned to the edge so all pixels are used."""
    if chip > size:
        raise ValueError(f"chip size {chip} is larger than the image ({size} px)")
    offs = list(range(0, size - chip + 1, stride))
    if offs[-1] + chip < size:
        offs.append(size - chip)
    return offs


class _BandStats:
    """Streaming per-band count, mean, std and histogram-based 1st/99th percentiles."""

    def __init__(self, n_bands: int, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi
        self.count = np.zeros(n_bands, np.float64)
        self.total = np.zeros(n_bands, np.float64)
        self.total_sq = np.zeros(n_bands, np.float64)
        self.hist = np.zeros((n_bands, HIST_BINS), np.int64)

    def update(self, x: np.ndarray, also: _BandStats | None = None) -> None:
        """Add the pixels of ``x`` ``(C, H, W)``; NaN pixels are skipped. ``also`` (statistics of
        the same sensor) gets the same pixels without computing them twice."""
        scale = HIST_BINS / (self.hi - self.lo)
        for c in range(x.shape[0]):
            v = x[c][~np.isnan(x[c])].astype(np.float64)  # valid pixels of band c
            idx = ((v - self.lo) * scale).astype(np.int64)
            np.clip(idx, 0, HIST_BINS - 1, out=idx)
            part = (v.size, v.sum(), np.dot(v, v), np.bincount(idx, minlength=HIST_BINS))
            for stats in (self, also) if also is not None else (self,):
                stats.count[c] += part[0]
                stats.total[c] += part[1]
                stats.total_sq[c] += part[2]
                stats.hist[c] += part[3]

    def finish(self) -> dict[str, np.ndarray]:
        n = np.maximum(self.count, 1)
        mean = self.total / n
        std = np.sqrt(np.maximum(self.total_sq / n - mean**2, 0.0))
        std = np.where(std > 1e-6, std, 1.0)
        cdf = np.cumsum(self.hist, 1) / np.maximum(self.hist.sum(1, keepdims=True), 1)
        width = (self.hi - self.lo) / HIST_BINS

        def pct(q: float) -> np.ndarray:
            return self.lo + (np.argmax(cdf >= q, axis=1) + 0.5) * width

        return {"mean": mean, "std": std, "p01": pct(0.01), "p99": pct(0.99), "count": self.count}


class ChipWriter:
    """Stream chips into a new chip store; the store appears at ``path`` only when complete.

    Args:
        path: destination (a directory, conventionally ``*.zarr``); replaced if it exists.
        modalities: modality keys stored, in order.
        chip_size: chip height and width in pixels.
        class_names: label classes, or ``None`` for an unlabelled store.
        label_type: ``multilabel`` (multi-hot per chip), ``class`` (one id per chip) or
            ``mask`` (one id per pixel, ``IGNORE_INDEX`` = unlabelled pixel).
        seed: seed of the spatially blocked train/val/test split.
        flush_every: chips buffered in memory before they are appended to disk.
        attrs: extra store attributes (layout, source, processing level...).

    Besides the arrays, every chip gets a metadata row (see :meth:`table`): ids, split, CRS,
    transform, presence, nodata fraction and per-band min/max per modality, and a content hash.
    """

    def __init__(
        self,
        path: str | Path,
        modalities: list[str],
        chip_size: int,
        class_names: list[str] | None = None,
        label_type: str = "multilabel",
        seed: int = 0,
        flush_every: int = 256,
        attrs: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.modalities = list(modalities)
        self.specs = {m: get_modality(m) for m in self.modalities}
        self.chip_size = chip_size
        self.class_names = list(class_names) if class_names is not None else None
        if label_type not in LABEL_TYPES:
            raise ValueError(f"unknown label_type {label_type!r}; known: {LABEL_TYPES}")
        self.label_type = label_type if self.class_names is not None else "none"
        self.seed = seed
        self.flush_every = max(CHUNK_CHIPS, flush_every - flush_every % CHUNK_CHIPS)
        self.attrs = dict(attrs or {})
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        # normalisation statistics from train chips only (no val/test leakage); the statistics
        # of all chips are the fallback for a store without train chips
        self.stats = {m: _BandStats(s.num_bands, *s.valid_range) for m, s in self.specs.items()}
        self.stats_all = {m: _BandStats(s.num_bands, *s.valid_range) for m, s in self.specs.items()}
        # chips wait for the next flush in buffers allocated once and reused (no per-chip arrays, no
        # references to the scene arrays they were cut from): memory stays flat however many scenes
        self._buf: dict[str, np.ndarray] = {}
        self._n_buf = 0
        self.rows: list[dict[str, Any]] = []
        self._ids: set[str] = set()

    @property
    def n_chips(self) -> int:
        return len(self.rows)

    def __enter__(self) -> ChipWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Discard everything written so far."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._buf, self._n_buf = {}, 0

    def add_sample(self, sample: Sample, stride: int | None = None, split: str | None = None,
                   group: str | None = None, split_block: int | None = None) -> int:
        """Cut a sample into chips and add them.

        Args:
            sample: the co-registered sample.
            stride: chip stride in pixels (default: the chip size).
            split: the layout's split for the whole sample, if it has one.
            group: spatial block of the sample (tile or scene; default: its name).
            split_block: instead of one split per group, split blocks of this many pixels of
                the sample; a chip that overlaps two blocks gets split ``none`` (kept, unused).
        """
        h, w = sample.grid.shape
        cs, st = self.chip_size, stride or self.chip_size
        group = group or sample.name
        rows, cols = chip_offsets(h, cs, st), chip_offsets(w, cs, st)
        for m in sample.arrays:
            if m not in self.stats:
                raise ValueError(f"modality {m!r} is not in this store ({self.modalities})")
        splits: dict[tuple[int, int], str] = {}
        if split is None and split_block:
            b = split_block
            blocks = sorted({(r // b, c // b) for r in rows for c in cols})
            by_name = assign_splits([f"{group}/b{br}_{bc}" for br, bc in blocks], self.seed)
            splits = {(br, bc): by_name[f"{group}/b{br}_{bc}"] for br, bc in blocks}
        if split is not None or not split_block:  # one split for the whole sample
            whole = split or assign_split(group, self.seed)
            for m, a in sample.arrays.items():  # statistics over the sample's pixels, once
                self.stats_all[m].update(a, also=self.stats[m] if whole == "train" else None)
        n = 0
        for r in rows:
            for c in cols:
                if split is not None:
                    chip_split = split
                elif split_block:
                    first, last = (r // split_block, c // split_block), ((r + cs - 1) // split_block,
                                                                         (c + cs - 1) // split_block)
                    chip_split = splits[first] if first == last else "none"
                    for m, a in sample.arrays.items():  # statistics per chip: splits vary inside
                        self.stats_all[m].update(a[:, r : r + cs, c : c + cs],
                                                 also=self.stats[m] if chip_split == "train" else None)
                else:
                    chip_split = whole
                self.add(
                    chip_id=f"{sample.name}_r{r}_c{c}",
                    sample=sample.name,
                    arrays={m: a[:, r : r + cs, c : c + cs] for m, a in sample.arrays.items()},
                    grid=sample.grid.window(r, c, cs, cs),
                    labels=(sample.labels[r : r + cs, c : c + cs]
                            if self.label_type == "mask" and sample.labels is not None else sample.labels),
                    time=sample.time,
                    row=r,
                    col=c,
                    split=chip_split,
                    update_stats=False,
                )
                n += 1
        return n

    def add(
        self,
        chip_id: str,
        sample: str,
        arrays: dict[str, np.ndarray],
        grid: Grid,
        labels: np.ndarray | None = None,
        time: str = "",
        row: int = 0,
        col: int = 0,
        split: str | None = None,
        update_stats: bool = True,
    ) -> None:
        """Add one chip. ``arrays`` maps present modalities to ``(C, chip, chip)`` arrays.

        ``update_stats=False`` when the caller has already added these pixels to the
        normalisation statistics (``add_sample`` does it once per sample).
        """
        if chip_id in self._ids:
            raise ValueError(f"duplicate chip id {chip_id!r}")
        for m, a in arrays.items():
            if m not in self.specs:
                raise ValueError(f"chip {chip_id}: modality {m!r} is not in this store ({self.modalities})")
            want = (self.specs[m].num_bands, self.chip_size, self.chip_size)
            if a.shape != want:
                raise ValueError(f"chip {chip_id}: modality {m!r} expected shape {want}, got {a.shape}")
        self._check_labels(chip_id, labels)
        self._ids.add(chip_id)
        digest = hashlib.sha256()
        meta: dict[str, Any] = dict(
            chip_id=chip_id, sample=sample, split=split or assign_split(sample, self.seed),
            crs=grid.crs, time=time, row=row, col=col, transform=tuple(grid.transform),
            height=self.chip_size, width=self.chip_size,
        )
        if not self._buf:
            self._allocate_buffers()
        i = self._n_buf
        for m in self.modalities:
            a = arrays.get(m)
            slot = self._buf[m][i]  # (C, chip, chip) float32, this chip's place in the next flush
            meta[f"present_{m}"] = a is not None
            if a is None:
                slot.fill(np.nan)
                meta[f"nodata_frac_{m}"] = 1.0
                meta[f"min_{m}"] = meta[f"max_{m}"] = np.full(self.specs[m].num_bands, np.nan)
                continue
            if update_stats:
                self.stats_all[m].update(a, also=self.stats[m] if meta["split"] == "train" else None)
            slot[...] = a
            digest.update(m.encode())
            digest.update(slot)
            flat = slot.reshape(slot.shape[0], -1)  # (C, H*W)
            meta[f"nodata_frac_{m}"] = float(np.isnan(flat).mean())
            meta[f"min_{m}"] = np.fmin.reduce(flat, axis=1)  # NaN-skipping; NaN only if all NaN
            meta[f"max_{m}"] = np.fmax.reduce(flat, axis=1)
        if labels is not None and self.label_type != "none":
            lab = np.asarray(labels, dtype=np.float64).reshape(-1)
            meta["label_min"], meta["label_max"] = float(lab.min()), float(lab.max())
            if self.label_type == "mask":
                meta["label_valid_frac"] = float((lab != IGNORE_INDEX).mean())
                digest.update(np.asarray(labels, np.int16).tobytes())
        if self.label_type == "class":
            self._buf["labels"][i] = int(labels)
        elif self.label_type != "none":
            self._buf["labels"][i] = np.asarray(labels).astype(self._buf["labels"].dtype)
        meta["content_hash"] = digest.hexdigest()
        self.rows.append(meta)
        self._n_buf += 1
        if self._n_buf >= self.flush_every:
            self._flush()

    def _allocate_buffers(self) -> None:
        n, cs = self.flush_every, self.chip_size
        self._buf = {m: np.empty((n, s.num_bands, cs, cs), np.float32) for m, s in self.specs.items()}
        if self.label_type == "multilabel":
            self._buf["labels"] = np.empty((n, len(self.class_names or [])), np.uint8)
        elif self.label_type == "class":
            self._buf["labels"] = np.empty(n, np.int16)
        elif self.label_type == "mask":
            self._buf["labels"] = np.empty((n, cs, cs), np.int16)

    def _check_labels(self, chip_id: str, labels: np.ndarray | None) -> None:
        if self.class_names is None:
            return
        k = len(self.class_names)
        if labels is None:
            raise ValueError(f"chip {chip_id}: this store is labelled ({self.label_type}) but the chip has no labels")
        lab = np.asarray(labels)
        if self.label_type == "multilabel" and lab.shape != (k,):
            raise ValueError(f"chip {chip_id}: expected {k} multi-hot labels, got shape {lab.shape}")
        if self.label_type == "class" and (lab.ndim != 0 or not 0 <= int(lab) < k):
            raise ValueError(f"chip {chip_id}: expected one class id in [0, {k}), got {lab}")
        if self.label_type == "mask":
            if lab.shape != (self.chip_size, self.chip_size):
                raise ValueError(f"chip {chip_id}: expected a {self.chip_size}x{self.chip_size} mask, got {lab.shape}")
            bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= k))
            if bad.any():
                raise ValueError(f"chip {chip_id}: mask values must be in [0, {k}) or {IGNORE_INDEX}")

    def table(self) -> pd.DataFrame:
        """Per-chip metadata of everything added so far (one row per chip, store order)."""
        rows = []
        for i, r in enumerate(self.rows):
            flat = {k: v for k, v in r.items() if not k.startswith(("min_", "max_"))}
            flat["index"] = i
            for m, spec in self.specs.items():
                for j, band in enumerate(spec.band_names):
                    flat[f"{m}_{band}_min"] = float(r[f"min_{m}"][j])
                    flat[f"{m}_{band}_max"] = float(r[f"max_{m}"][j])
            rows.append(flat)
        return pd.DataFrame(rows)

    def _flush(self) -> None:
        n, cs = self._n_buf, self.chip_size
        if not n:
            return
        # only the pixel arrays stream to disk; the per-chip metadata (small) is written at close
        data: dict[str, Any] = {m: (("chip", f"band_{m}", "y", "x"), self._buf[m][:n]) for m in self.specs}
        if self.label_type != "none":
            dims = {"multilabel": ("chip", "class"), "class": ("chip",), "mask": ("chip", "y", "x")}[self.label_type]
            data["labels"] = (dims, self._buf["labels"][:n])
        ds = xr.Dataset(data)
        if self.tmp.exists():
            ds.to_zarr(self.tmp, mode="a", append_dim="chip", zarr_format=2, consolidated=False)
        else:
            coords = {f"band_{m}": s.band_names for m, s in self.specs.items()}
            coords["modality"] = self.modalities
            if self.class_names is not None:
                coords["class"] = self.class_names
            ds = ds.assign_coords(coords)
            enc = {m: {"chunks": (CHUNK_CHIPS, s.num_bands, cs, cs)} for m, s in self.specs.items()}
            ds.to_zarr(self.tmp, mode="w", zarr_format=2, consolidated=False, encoding=enc)
        self._n_buf = 0

    def close(self, quarantine: dict[str, list[str]] | None = None) -> Path:
        """Write statistics, attributes and the quarantine list, then move the store into place.

        Args:
            quarantine: chip id -> failed checks, for chips that failed validation. They stay
                in the store, flagged, and readers skip them by default.
        """
        if self.n_chips == 0:
            self.abort()
            raise ValueError(f"{self.path}: no chips were written (empty input)")
        self._flush()
        self._buf = {}  # the flush buffers (tens of MB) are not needed any more
        q = quarantine or {}
        unknown = sorted(set(q) - self._ids)
        if unknown:
            raise ValueError(f"quarantine names unknown chips: {unknown[:5]}")
        rows = self.rows
        stats: dict[str, Any] = {}
        for m in self.modalities:
            source = self.stats[m] if self.stats[m].count.sum() > 0 else self.stats_all[m]
            for key, val in source.finish().items():
                stats[f"{m}_{key}"] = ((f"band_{m}",), val)
            stats[f"{m}_chip_min"] = (("chip", f"band_{m}"), np.stack([r[f"min_{m}"] for r in rows]))
            stats[f"{m}_chip_max"] = (("chip", f"band_{m}"), np.stack([r[f"max_{m}"] for r in rows]))
        stats["present"] = (("chip", "modality"),
                            np.array([[r[f"present_{m}"] for m in self.modalities] for r in rows]))
        stats["nodata_frac"] = (("chip", "modality"), np.array(
            [[r[f"nodata_frac_{m}"] for m in self.modalities] for r in rows], np.float32))
        stats["transform"] = (("chip", "affine"), np.array([r["transform"] for r in rows], np.float64))
        for col in ("chip_id", "sample", "split", "crs", "time", "content_hash"):
            stats[col] = (("chip",), np.array([r[col] for r in rows], dtype=object))  # variable length
        for col in ("row", "col"):
            stats[col] = (("chip",), np.array([r[col] for r in rows], np.int32))
        ids = [r["chip_id"] for r in self.rows]
        stats["quarantined"] = (("chip",), np.array([cid in q for cid in ids]))
        stats["quarantine_reasons"] = (("chip",), np.array(["; ".join(q.get(cid, [])) for cid in ids], dtype=object))
        ds = xr.Dataset(stats)
        ds.attrs.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            modalities=self.modalities,
            chip_size=self.chip_size,
            label_type=self.label_type,
            split_seed=self.seed,
            statistics_from={m: "train" if self.stats[m].count.sum() > 0 else "all" for m in self.modalities},
            **self.attrs,
        )
        ds.to_zarr(self.tmp, mode="a", zarr_format=2, consolidated=False)
        import zarr

        zarr.consolidate_metadata(str(self.tmp), zarr_format=2)
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.path


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
        self.labels = np.asarray(ds["labels"].values)[indices] if "labels" in ds else None
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
            ds = xr.open_zarr(path, consolidated=True, chunks=None)
        except Exception as exc:  # zarr raises several types for a non-store directory
            raise ValueError(f"{path}: not a readable chip store: {exc}") from exc
        if ds.attrs.get("format") != FORMAT:
            raise ValueError(f"{path}: not a MAPEX chip store (format={ds.attrs.get('format')!r})")
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
        arrays = {m: (ds[m].values if load else ds[m].variable) for m in mods}
        return cls(path, ds, mods, indices, normalize, arrays, normalization)

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, m: str, j: int) -> np.ndarray:
        a = self._arrays[m]
        return np.asarray(a[j] if isinstance(a, np.ndarray) else a[j].values, dtype=np.float32)

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
            h.update(np.ascontiguousarray(self.ds["labels"].values).tobytes())
        return h.hexdigest()

    def presence_patterns(self) -> dict[tuple, list[int]]:
        """Indices of this view grouped by the set of modalities present (chips that stack)."""
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(self.present):
            key = tuple(m for m, p in zip(self.modalities, row, strict=True) if p)
            groups.setdefault(key, []).append(i)
        return groups


def pooled_normalization(stores: list[ChipStore]) -> dict[str, dict[str, list[float]]]:
    """Per-band mean and std over several stores (pooled by pixel counts), per modality."""
    out: dict[str, dict[str, list[float]]] = {}
    mods = sorted({m for s in stores for m in s.modalities})
    for m in mods:
        parts = [(s.ds[f"{m}_count"].values, s.ds[f"{m}_mean"].values, s.ds[f"{m}_std"].values)
                 for s in stores if m in s.modalities]
        n = sum(p[0] for p in parts)
        mean = sum(p[0] * p[1] for p in parts) / np.maximum(n, 1)
        second = sum(p[0] * (p[2] ** 2 + p[1] ** 2) for p in parts) / np.maximum(n, 1)
        std = np.sqrt(np.maximum(second - mean**2, 0.0))
        out[m] = {"mean": [float(v) for v in mean], "std": [float(v) if v > 1e-6 else 1.0 for v in std]}
    return out


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


class PresenceBatchSampler(Sampler[list[int]]):
    """Batches whose chips share one set of present modalities (so they stack), reshuffled per epoch.

    The order depends only on ``(seed, epoch)``, so a resumed run sees the same batches.
    """

    def __init__(self, store: ChipStore | ConcatStores, batch_size: int, seed: int = 0,
                 drop_last: bool = True) -> None:
        self.groups = [g for g in store.presence_patterns().values()]
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.epoch = 0

    def batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        out: list[list[int]] = []
        for idx in self.groups:
            perm = torch.randperm(len(idx), generator=g).tolist()
            for s in range(0, len(idx), self.batch_size):
                chunk = [idx[p] for p in perm[s : s + self.batch_size]]
                # a group smaller than one batch still yields its chips once
                if len(chunk) == self.batch_size or not self.drop_last or s == 0:
                    out.append(chunk)
        order = torch.randperm(len(out), generator=g).tolist()
        return [out[o] for o in order]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)

    def __len__(self) -> int:
        return len(self.batches(self.epoch))


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of items that share the same present modalities."""
    keys = [k for k in items[0] if k != "index"]
    out: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in keys}
    out["index"] = torch.tensor([it["index"] for it in items])
    return out

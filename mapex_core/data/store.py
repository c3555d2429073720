"""The chip store format, and writing one: the on-disk data every stage of the platform reads.

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
complete, so a crash never leaves a partial store; it replaces only a chip store, unless forced).
Read with
:meth:`mapex_core.data.dataset.ChipStore.open`, a torch ``Dataset`` of dict samples normalised
with the stored statistics.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from mapex_core.data.raster import Grid, window_offsets
from mapex_core.data.sample import Sample
from mapex_core.data.sampling import assign_split, assign_splits
from mapex_core.data.statistics import BandStats
from mapex_core.io import check_output, replace_folder, sweep_strays, temporary_sibling
from mapex_core.metrics import IGNORE_INDEX
from mapex_core.modalities import get_modality

FORMAT = "mapex-chips"
FORMAT_VERSION = 1
META_COLUMNS = ("chip_id", "sample", "split", "crs", "time", "row", "col", "content_hash")
CHUNK_CHIPS = 8
LABEL_TYPES = ("multilabel", "class", "mask")


def chip_store_problem(path: str | Path) -> str | None:
    """What makes ``path`` something other than a chip store (``None``: an empty folder or a chip store)."""
    path = Path(path)
    if not path.is_dir():
        return "is a file, not a chip store"
    try:
        if not any(path.iterdir()):
            return None
        attrs = json.loads((path / ".zattrs").read_text())
    except (OSError, ValueError):
        attrs = None
    if isinstance(attrs, dict) and attrs.get("format") == FORMAT:
        return None
    names = sorted(p.name for p in path.iterdir())
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return f"is a folder that is not a chip store (it holds {', '.join(names[:5])}{more})"


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
        force: replace whatever is at ``path``; otherwise only a chip store (or an empty folder)
            is replaced and anything else is an error, here and again when the store is complete.

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
        force: bool = False,
    ) -> None:
        self.path = Path(path)
        self.force = force
        self._check_out()
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
        sweep_strays(self.path)  # temporaries of a killed earlier ingest
        self.tmp = temporary_sibling(self.path)
        # normalisation statistics from train chips only (no val/test leakage); the statistics
        # of all chips are the fallback for a store without train chips
        self.stats = {m: BandStats(s.num_bands, *s.valid_range) for m, s in self.specs.items()}
        self.stats_all = {m: BandStats(s.num_bands, *s.valid_range) for m, s in self.specs.items()}
        # chips wait for the next flush in buffers allocated once and reused (no per-chip arrays, no
        # references to the scene arrays they were cut from): memory stays flat however many scenes
        self._buf: dict[str, np.ndarray] = {}
        self._n_buf = 0
        self.rows: list[dict[str, Any]] = []
        # per chip, the (height, width) of its window whose pixels went into the statistics on its
        # behalf, so that a chip which fails validation can be taken out of them again
        self._stat_regions: list[tuple[int, int] | None] = []
        self._ids: set[str] = set()

    @property
    def n_chips(self) -> int:
        return len(self.rows)

    def _check_out(self) -> None:
        check_output(self.path, chip_store_problem, self.force)

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
        rows, cols = window_offsets(h, cs, st), window_offsets(w, cs, st)
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
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
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
                # what went into the statistics on this chip's behalf: its whole window (per-chip
                # statistics), or the pixels it owns in the sample (from its offset to the next chip's)
                self._stat_regions[-1] = (cs, cs) if split is None and split_block else (
                    min((rows[i + 1] if i + 1 < len(rows) else h) - r, cs),
                    min((cols[j + 1] if j + 1 < len(cols) else w) - c, cs))
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
        self._stat_regions.append((self.chip_size, self.chip_size) if update_stats else None)
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

    def _drop_from_statistics(self, quarantine: dict[str, list[str]]) -> None:
        """Take the pixels of quarantined chips out of the normalisation statistics (read back from the
        temporary store: only chips that passed validation shape the normalisation)."""
        if not quarantine:
            return
        import zarr

        group = zarr.open_group(str(self.tmp), mode="r")
        for i, row in enumerate(self.rows):
            region = self._stat_regions[i]
            if row["chip_id"] not in quarantine or region is None:
                continue
            h, w = region
            for m in self.modalities:
                if row[f"present_{m}"]:
                    x = np.asarray(group[m][i, :, :h, :w], dtype=np.float32)  # (C, h, w)
                    self.stats_all[m].update(x, also=self.stats[m] if row["split"] == "train" else None, sign=-1)

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
        self._drop_from_statistics(q)
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
        try:
            self._check_out()  # again: something may have appeared at the path meanwhile
            return replace_folder(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

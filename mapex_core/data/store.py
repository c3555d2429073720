"""The chip store format, and writing one: the on-disk data every stage of the platform reads.

One Zarr v3 store (consolidated metadata) written through xarray (format version 2):

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
``<m>_running_*``      (statistics_set, band_<m>, ..)  their running sums (train, all chips)
``scene_*``            (scene,)                        name, content hash, group and split of
                                                       every scene ingested (``--append``)
=====================  ==============================  ======================================

The image arrays (``<m>``, a mask ``labels``) hold one inner chunk per chip in shards of
``shard_chips`` chips (:mod:`mapex_core.data.shards`): a store of 500,000 chips is a few hundred
files. The other variables are one chunk each. Stores of format version 1 (Zarr v2, 8-chip
chunks) are still read, and ``mapex convert-store`` rewrites one in this format (same values).

Write with :class:`ChipWriter` (streams chips to a temporary store, renames it into place when
complete, so a crash never leaves a partial store; it replaces only a chip store, unless forced;
with ``base`` it continues an existing store, whose chips stay bit for bit as they were). Read with
:meth:`mapex_core.data.dataset.ChipStore.open`, a torch ``Dataset`` of dict samples normalised
with the stored statistics.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from mapex_core.data import shards
from mapex_core.data.chipping import LABEL_TYPES, ChipConfig, ScenePart, chip_one, chip_sample
from mapex_core.data.raster import Grid
from mapex_core.data.sample import Sample
from mapex_core.data.statistics import BandStats
from mapex_core.io import check_output, replace_folder, sweep_strays, temporary_sibling
from mapex_core.modalities import get_modality

FORMAT = "mapex-chips"
FORMAT_VERSION = 2  # 1: Zarr v2, 8-chip chunks; 2: Zarr v3 shards of one chunk per chip, running statistics, scenes
META_COLUMNS = ("chip_id", "sample", "split", "crs", "time", "row", "col", "content_hash")
SCENE_COLUMNS = ("name", "hash", "group", "split")
STAT_SETS = ("train", "all")
__all__ = ["FORMAT", "FORMAT_VERSION", "LABEL_TYPES", "META_COLUMNS", "ChipWriter", "chip_store_problem",
           "open_dataset", "store_attrs"]


def store_attrs(path: str | Path) -> dict[str, Any] | None:
    """The root attributes of a Zarr store at ``path`` (format 3 ``zarr.json`` or format 2 ``.zattrs``), or ``None``."""
    path = Path(path)
    try:
        if (path / "zarr.json").is_file():
            attrs = json.loads((path / "zarr.json").read_text()).get("attributes")
        else:
            attrs = json.loads((path / ".zattrs").read_text())
    except (OSError, ValueError, AttributeError):
        return None
    return attrs if isinstance(attrs, dict) else None


def open_dataset(path: str | Path) -> xr.Dataset:
    """A chip store (either format version) as a lazy xarray dataset, without zarr's warning that
    consolidated metadata is not yet part of the Zarr v3 specification."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        return xr.open_zarr(path, consolidated=True, chunks=None)


def chip_store_problem(path: str | Path) -> str | None:
    """What makes ``path`` something other than a chip store (``None``: an empty folder or a chip store)."""
    path = Path(path)
    if not path.is_dir():
        return "is a file, not a chip store"
    try:
        if not any(path.iterdir()):
            return None
    except OSError:
        pass
    attrs = store_attrs(path)
    if isinstance(attrs, dict) and attrs.get("format") == FORMAT:
        return None
    names = sorted(p.name for p in path.iterdir())
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return f"is a folder that is not a chip store (it holds {', '.join(names[:5])}{more})"


def _strings(values: Any) -> np.ndarray:
    return np.array([str(v) for v in np.asarray(values)], dtype=object)


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
        shard_chips: chips per shard file of the image arrays.
        attrs: extra store attributes (layout, source, processing level...).
        force: replace whatever is at ``path``; otherwise only a chip store (or an empty folder)
            is replaced and anything else is an error, here and again when the store is complete.
        base: a store of this format to continue (usually ``path`` itself): its chips come first,
            unchanged (their shards are linked, not copied), and its statistics go on from its
            running sums. It must have the same modalities, chip size and labels.
        flush_every: the name ``shard_chips`` had in format version 1 (when chips were flushed to
            8-chip chunks in batches); when given, it sets ``shard_chips``.

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
        shard_chips: int = shards.SHARD_CHIPS,
        attrs: dict[str, Any] | None = None,
        force: bool = False,
        base: str | Path | None = None,
        flush_every: int | None = None,
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
        self.config = ChipConfig(tuple(self.modalities), chip_size,
                                 tuple(self.class_names) if self.class_names is not None else None, self.label_type, seed)
        self.shard_chips = int(flush_every or shard_chips)
        self.attrs = dict(attrs or {})
        sweep_strays(self.path)  # temporaries of a killed earlier ingest
        self.tmp = temporary_sibling(self.path)
        self._measure = self.config.stats()
        # normalisation statistics from train chips only (no val/test leakage); the statistics
        # of all chips are the fallback for a store without train chips
        self.stats, self.stats_all = self.config.stats(), self.config.stats()
        self.rows: list[dict[str, Any]] = []
        self.labels: list[Any] = []
        self.scenes: list[dict[str, str]] = []
        # per chip, the (height, width) of its window whose pixels went into the statistics on its
        # behalf, so that a chip which fails validation can be taken out of them again
        self._stat_regions: list[tuple[int, int] | None] = []
        self._ids: set[str] = set()
        self._writers: dict[str, shards.ShardWriter] = {}
        self.base: xr.Dataset | None = None
        self.base_path = Path(base) if base is not None else None
        self.n_base = 0
        if self.base_path is not None:
            self._open_base()

    @property
    def n_chips(self) -> int:
        """Chips added by this writer (not counting those of ``base``)."""
        return len(self.rows)

    def _check_out(self) -> None:
        check_output(self.path, chip_store_problem, self.force)

    def _open_base(self) -> None:
        assert self.base_path is not None
        ds = open_dataset(self.base_path)
        a = ds.attrs
        want = {"format_version": FORMAT_VERSION, "modalities": self.modalities, "chip_size": self.chip_size,
                "label_type": self.label_type, "shard_chips": self.shard_chips}
        for key, value in want.items():
            if a.get(key) != value:
                raise ValueError(f"{self.base_path}: cannot add chips to this store: its {key} is {a.get(key)!r}, "
                                 f"these chips need {value!r}")
        classes = [str(c) for c in ds["class"].values] if "class" in ds.coords else None
        if classes != self.class_names:
            raise ValueError(f"{self.base_path}: cannot add chips to this store: its classes differ")
        for m, s in self.specs.items():
            state = {k: ds[f"{m}_running_{k}"].values for k in ("count", "sum", "sum_sq", "hist")}
            self.stats[m] = BandStats.from_state({k: v[0] for k, v in state.items()}, *s.valid_range)
            self.stats_all[m] = BandStats.from_state({k: v[1] for k, v in state.items()}, *s.valid_range)
        self.base, self.n_base = ds, int(ds.sizes["chip"])
        self._ids = set(_strings(ds["chip_id"].values))

    def __enter__(self) -> ChipWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Discard everything written so far (a continued ``base`` is left as it was)."""
        for w in self._writers.values():
            w.abort()
        self._writers = {}
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _start(self) -> None:
        """Create the temporary store: shard writers, and links to the full shards of ``base``."""
        self.tmp.mkdir(parents=True)
        full = self.n_base // self.shard_chips
        for name, shape in self.config.sharded().items():
            old = self.base_path / name if self.base_path is not None else None
            for k in range(full):  # never written again: the new store shares them with the old one
                src = shards.shard_path(old, k, len(shape) + 1) if old is not None else None
                if src is not None and src.exists():
                    dst = shards.shard_path(self.tmp / name, k, len(shape) + 1)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(src, dst)
                    except OSError:  # a file system without hard links
                        shutil.copyfile(src, dst)
            self._writers[name] = shards.ShardWriter(self.tmp / name, len(shape) + 1, self.shard_chips,
                                                     start=self.n_base, resume_from=old)

    def apply(self, part: ScenePart) -> None:
        """Add the chips of a part (:func:`~mapex_core.data.chipping.chip_sample`) after those already added."""
        ids = [r["chip_id"] for r in part.rows]
        dup = next((i for i in ids if i in self._ids), None) or (
            next(i for i in ids if ids.count(i) > 1) if len(set(ids)) < len(ids) else None)
        if dup is not None:
            raise ValueError(f"duplicate chip id {dup!r}")
        if not self._writers:
            self._start()
        for name, w in self._writers.items():
            for blob in part.blobs.get(name, [None] * part.n):
                w.append(blob)
        self.labels.extend(part.labels)
        for m, train, op in part.ops:  # in order: the float sums are those of a single pass
            self.stats_all[m].add(op, hist=False)
            if train:
                self.stats[m].add(op, hist=False)
        for m, (h_all, h_train) in part.hists.items():  # integer counts: order does not matter
            self.stats_all[m].hist += h_all
            self.stats[m].hist += h_train
        self.rows.extend(part.rows)
        self._ids.update(ids)
        self._stat_regions.extend(part.regions)
        if part.scene:
            self.scenes.append(part.scene)

    def add_sample(self, sample: Sample, stride: int | None = None, split: str | None = None,
                   group: str | None = None, split_block: int | None = None) -> int:
        """Cut a sample into chips and add them (:func:`~mapex_core.data.chipping.chip_sample`); returns their number."""
        part = chip_sample(self.config, sample, stride=stride, split=split, group=group, split_block=split_block)
        self.apply(part)
        return part.n

    def add(self, chip_id: str, sample: str, arrays: dict[str, np.ndarray], grid: Grid,
            labels: np.ndarray | None = None, time: str = "", row: int = 0, col: int = 0,
            split: str | None = None, update_stats: bool = True) -> None:
        """Add one chip. ``arrays`` maps present modalities to ``(C, chip, chip)`` arrays.

        ``update_stats=False`` when the caller has already added these pixels to the
        normalisation statistics.
        """
        if chip_id in self._ids:
            raise ValueError(f"duplicate chip id {chip_id!r}")
        part = ScenePart()
        chip_one(self.config, part, self._measure if update_stats else None, chip_id, sample, arrays, grid,
                 labels=labels, time=time, row=row, col=col, split=split)
        self.apply(part)

    def table(self) -> pd.DataFrame:
        """Per-chip metadata of the chips added by this writer (one row per chip, store order;
        ``index`` counts from the first chip of ``base``)."""
        rows = []
        for i, r in enumerate(self.rows):
            flat = {k: v for k, v in r.items() if not k.startswith(("min_", "max_"))}
            flat["index"] = self.n_base + i
            for m, spec in self.specs.items():
                for j, band in enumerate(spec.band_names):
                    flat[f"{m}_{band}_min"] = float(r[f"min_{m}"][j])
                    flat[f"{m}_{band}_max"] = float(r[f"max_{m}"][j])
            rows.append(flat)
        return pd.DataFrame(rows)

    def _drop_from_statistics(self, quarantine: dict[str, list[str]]) -> None:
        """Take the pixels of quarantined chips out of the normalisation statistics (read back from the
        temporary store: only chips that passed validation shape the normalisation)."""
        if not quarantine:
            return
        n, cs = self.n_base + self.n_chips, self.chip_size
        readers = {m: shards.ShardReader(self.tmp / m, (n, s.num_bands, cs, cs), np.float32, self.shard_chips)
                   for m, s in self.specs.items()}
        for i, row in enumerate(self.rows):
            region = self._stat_regions[i]
            if row["chip_id"] not in quarantine or region is None:
                continue
            h, w = region
            for m in self.modalities:
                if row[f"present_{m}"]:
                    x = readers[m][self.n_base + i][:, :h, :w]  # (C, h, w)
                    self.stats_all[m].update(x, also=self.stats[m] if row["split"] == "train" else None, sign=-1)

    def _variables(self, q: dict[str, list[str]]) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        """Every variable but the sharded arrays: per chip (``base``'s first), statistics, scenes."""
        rows, out = self.rows, {}
        per_chip: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
        for m in self.modalities:
            nb = self.specs[m].num_bands
            source = self.stats[m] if self.stats[m].count.sum() > 0 else self.stats_all[m]
            for key, val in source.finish().items():
                out[f"{m}_{key}"] = ((f"band_{m}",), val)
            for key in ("count", "sum", "sum_sq", "hist"):
                val = np.stack([self.stats[m].state()[key], self.stats_all[m].state()[key]])
                out[f"{m}_running_{key}"] = (("statistics_set", f"band_{m}") + (("histogram_bin",) if key == "hist"
                                                                                  else ()), val)
            per_chip[f"{m}_chip_min"] = (("chip", f"band_{m}"), np.stack([r[f"min_{m}"] for r in rows])
                                         if rows else np.zeros((0, nb)))
            per_chip[f"{m}_chip_max"] = (("chip", f"band_{m}"), np.stack([r[f"max_{m}"] for r in rows])
                                         if rows else np.zeros((0, nb)))
        # reshapes: (N, M), (N, M), (N, 6), also when N = 0
        per_chip["present"] = (("chip", "modality"), np.array(
            [[r[f"present_{m}"] for m in self.modalities] for r in rows], bool).reshape(-1, len(self.modalities)))
        per_chip["nodata_frac"] = (("chip", "modality"), np.array(
            [[r[f"nodata_frac_{m}"] for m in self.modalities] for r in rows], np.float32).reshape(-1, len(self.modalities)))
        per_chip["transform"] = (("chip", "affine"), np.array([r["transform"] for r in rows], np.float64).reshape(-1, 6))
        for col in ("chip_id", "sample", "split", "crs", "time", "content_hash"):
            per_chip[col] = (("chip",), np.array([r[col] for r in rows], dtype=object))  # variable length
        for col in ("row", "col"):
            per_chip[col] = (("chip",), np.array([r[col] for r in rows], np.int32))
        ids = [r["chip_id"] for r in rows]
        per_chip["quarantined"] = (("chip",), np.array([cid in q for cid in ids], bool))
        per_chip["quarantine_reasons"] = (("chip",), np.array(["; ".join(q.get(cid, [])) for cid in ids], dtype=object))
        if self.label_type == "multilabel":
            per_chip["labels"] = (("chip", "class"),  # (N, K)
                                  np.array(self.labels, np.uint8).reshape(-1, len(self.class_names or [])))
        elif self.label_type == "class":
            per_chip["labels"] = (("chip",), np.array(self.labels, np.int16))
        scenes = {f"scene_{c}": (("scene",), np.array([s[c] for s in self.scenes], dtype=object))
                  for c in SCENE_COLUMNS}
        if self.base is not None:  # the chips and scenes of the store continued come first, unchanged
            for name, (dims, val) in {**per_chip, **scenes}.items():
                old = self.base[name].values if name in self.base else np.zeros((0,) + val.shape[1:], val.dtype)
                old = _strings(old) if val.dtype == object else old
                per_chip[name] = (dims, np.concatenate([old, val]))
        elif self.scenes:
            per_chip.update(scenes)
        return {**out, **per_chip}

    def close(self, quarantine: dict[str, list[str]] | None = None) -> Path:
        """Write statistics, attributes and the quarantine list, then move the store into place.

        Args:
            quarantine: chip id -> failed checks, for chips (added by this writer) that failed
                validation. They stay in the store, flagged, and readers skip them by default.
        """
        if self.n_chips == 0:
            self.abort()
            raise ValueError(f"{self.path}: no chips were written (empty input)")
        for w in self._writers.values():
            w.close()
        q = quarantine or {}
        unknown = sorted(set(q) - {r["chip_id"] for r in self.rows})
        if unknown:
            raise ValueError(f"quarantine names unknown chips: {unknown[:5]}")
        self._drop_from_statistics(q)
        variables = self._variables(q)
        n = self.n_base + self.n_chips
        encoding = {k: {"chunks": tuple(max(1, s) for s in v[1].shape)} for k, v in variables.items() if v[1].ndim}
        for name, shape in self.config.sharded().items():
            dims = ("chip", f"band_{name}", "y", "x") if name in self.specs else ("chip", "y", "x")
            dtype = np.float32 if name in self.specs else np.int16
            variables[name] = (dims, shards.placeholder((n, *shape), dtype, self.shard_chips))
            encoding[name] = shards.encoding((n, *shape), self.shard_chips)
        coords: dict[str, Any] = {f"band_{m}": np.array(s.band_names, dtype=object) for m, s in self.specs.items()}
        coords["modality"] = np.array(self.modalities, dtype=object)
        coords["statistics_set"] = np.array(STAT_SETS, dtype=object)
        if self.class_names is not None:
            coords["class"] = np.array(self.class_names, dtype=object)
        ds = xr.Dataset(variables, coords=coords)
        base_attrs = {k: v for k, v in (self.base.attrs if self.base is not None else {}).items()}
        ds.attrs.update(
            {**base_attrs, **self.attrs},
            format=FORMAT,
            format_version=FORMAT_VERSION,
            modalities=self.modalities,
            chip_size=self.chip_size,
            label_type=self.label_type,
            split_seed=self.seed,
            shard_chips=self.shard_chips,
            statistics_from={m: "train" if self.stats[m].count.sum() > 0 else "all" for m in self.modalities},
        )
        import zarr

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            # the sharded arrays' folders hold their shards before xarray writes their zarr.json
            warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr", category=UserWarning)
            ds.to_zarr(self.tmp, mode="a", zarr_format=3, consolidated=False, encoding=encoding, compute=False)
            zarr.consolidate_metadata(str(self.tmp), zarr_format=3)
        try:
            self._check_out()  # again: something may have appeared at the path meanwhile
            return replace_folder(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

"""Cutting a co-registered sample into chips: all that a chip store keeps of them, computed where the sample is.

:func:`chip_sample` (and :func:`chip_one` for a single chip) return a :class:`ScenePart`: per chip
its metadata row (ids, split, CRS, transform, presence, nodata fraction, per-band min/max, content
hash), its compressed inner chunks (:func:`~mapex_core.data.shards.encode_chip`) and labels, and
what the sample adds to the normalisation statistics (in order). It is a function of the sample
and the :class:`ChipConfig` only, so a Dask worker computes it and
:class:`~mapex_core.data.store.ChipWriter` adds the parts in scene order: the store is the same,
byte for byte, wherever the parts were made.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mapex_core.data.raster import Grid, window_offsets
from mapex_core.data.sample import Sample
from mapex_core.data.sampling import assign_split, assign_splits
from mapex_core.data.shards import encode_chip
from mapex_core.data.statistics import BandStats, StatPart
from mapex_core.metrics import IGNORE_INDEX
from mapex_core.modalities import get_modality

LABEL_TYPES = ("multilabel", "class", "mask")


@dataclass(frozen=True)
class ChipConfig:
    """What chipping needs to know of the store: modalities in order, chip size, labels, split seed.

    ``label_type`` is ``none`` for an unlabelled store (``class_names`` ``None``).
    """

    modalities: tuple[str, ...]
    chip_size: int
    class_names: tuple[str, ...] | None = None
    label_type: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.class_names is not None and self.label_type not in LABEL_TYPES:
            raise ValueError(f"unknown label_type {self.label_type!r}; known: {LABEL_TYPES}")

    def stats(self) -> dict[str, BandStats]:
        """Empty statistics per modality (each sensor's valid range sets its histogram)."""
        return {m: BandStats(get_modality(m).num_bands, *get_modality(m).valid_range) for m in self.modalities}

    def sharded(self) -> dict[str, tuple[int, ...]]:
        """The chip arrays kept in shards and their shape per chip: the modalities, and a mask label array."""
        cs = self.chip_size
        out = {m: (get_modality(m).num_bands, cs, cs) for m in self.modalities}
        if self.label_type == "mask":
            out["labels"] = (cs, cs)
        return out


@dataclass
class ScenePart:
    """Chips of one sample (or one chip) ready to be added to a store, in store order.

    Attributes:
        rows: per chip metadata (:meth:`~mapex_core.data.store.ChipWriter.table` flattens them).
        blobs: sharded array -> per chip its encoded inner chunk (``None``: all fill value).
        labels: per chip its multi-hot vector or class id (stores whose labels are not a mask).
        ops: what goes into the statistics, in order: ``(modality, is_train, part)``; the parts carry
            no histogram, which is summed per modality in ``hists`` (``[all chips, train chips]``).
        regions: per chip the ``(height, width)`` of its window counted in the statistics on its
            behalf (taken out again if it fails validation), or ``None``.
        scene: the scene's record in the store (name, content hash, group, split), set by ingestion.
        extra: anything the reader of the scene reports with it (radiometric decisions).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    blobs: dict[str, list[bytes | None]] = field(default_factory=dict)
    labels: list[Any] = field(default_factory=list)
    ops: list[tuple[str, bool, StatPart]] = field(default_factory=list)
    hists: dict[str, list[np.ndarray]] = field(default_factory=dict)
    regions: list[tuple[int, int] | None] = field(default_factory=list)
    scene: dict[str, str] = field(default_factory=dict)
    extra: Any = None

    @property
    def n(self) -> int:
        return len(self.rows)

    def measure(self, stats: dict[str, BandStats], m: str, x: np.ndarray, train: bool) -> None:
        """Record the statistics of pixels ``x`` ``(C, H, W)`` of modality ``m``."""
        part = stats[m].measure(x)
        hists = self.hists.setdefault(m, [np.zeros_like(part.hist), np.zeros_like(part.hist)])
        hists[0] += part.hist
        if train:
            hists[1] += part.hist
        self.ops.append((m, train, replace(part, hist=None)))


def check_labels(cfg: ChipConfig, chip_id: str, labels: np.ndarray | None) -> None:
    """Raise ``ValueError`` (naming the chip) when ``labels`` do not fit the store's label type."""
    if cfg.class_names is None:
        return
    k = len(cfg.class_names)
    if labels is None:
        raise ValueError(f"chip {chip_id}: this store is labelled ({cfg.label_type}) but the chip has no labels")
    lab = np.asarray(labels)
    if cfg.label_type == "multilabel" and lab.shape != (k,):
        raise ValueError(f"chip {chip_id}: expected {k} multi-hot labels, got shape {lab.shape}")
    if cfg.label_type == "class" and (lab.ndim != 0 or not 0 <= int(lab) < k):
        raise ValueError(f"chip {chip_id}: expected one class id in [0, {k}), got {lab}")
    if cfg.label_type == "mask":
        if lab.shape != (cfg.chip_size, cfg.chip_size):
            raise ValueError(f"chip {chip_id}: expected a {cfg.chip_size}x{cfg.chip_size} mask, got {lab.shape}")
        bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= k))
        if bad.any():
            raise ValueError(f"chip {chip_id}: mask values must be in [0, {k}) or {IGNORE_INDEX}")


def chip_one(cfg: ChipConfig, part: ScenePart, stats: dict[str, BandStats] | None, chip_id: str, sample: str,
             arrays: dict[str, np.ndarray], grid: Grid, labels: np.ndarray | None = None, time: str = "",
             row: int = 0, col: int = 0, split: str | None = None) -> None:
    """Add one chip to ``part``. ``arrays`` maps present modalities to ``(C, chip, chip)`` arrays.

    ``stats``: measure the chip's pixels for the statistics (``None`` when the caller measured them).

    Raises:
        ValueError: an unknown modality, a wrong shape or labels that do not fit (names the chip).
    """
    cs = cfg.chip_size
    for m, a in arrays.items():
        if m not in cfg.modalities:
            raise ValueError(f"chip {chip_id}: modality {m!r} is not in this store ({list(cfg.modalities)})")
        want = (get_modality(m).num_bands, cs, cs)
        if a.shape != want:
            raise ValueError(f"chip {chip_id}: modality {m!r} expected shape {want}, got {a.shape}")
    check_labels(cfg, chip_id, labels)
    digest = hashlib.sha256()
    meta: dict[str, Any] = dict(
        chip_id=chip_id, sample=sample, split=split or assign_split(sample, cfg.seed),
        crs=grid.crs, time=time, row=row, col=col, transform=tuple(grid.transform), height=cs, width=cs,
    )
    for m in cfg.modalities:
        a = arrays.get(m)
        meta[f"present_{m}"] = a is not None
        blobs = part.blobs.setdefault(m, [])
        if a is None:
            blobs.append(None)
            meta[f"nodata_frac_{m}"] = 1.0
            meta[f"min_{m}"] = meta[f"max_{m}"] = np.full(get_modality(m).num_bands, np.nan)
            continue
        chip = np.ascontiguousarray(a, dtype=np.float32)  # (C, chip, chip)
        if stats is not None:
            part.measure(stats, m, chip, meta["split"] == "train")
        digest.update(m.encode())
        digest.update(chip)
        blobs.append(encode_chip(chip))
        flat = chip.reshape(chip.shape[0], -1)  # (C, H*W)
        meta[f"nodata_frac_{m}"] = float(np.isnan(flat).mean())
        meta[f"min_{m}"] = np.fmin.reduce(flat, axis=1)  # NaN-skipping; NaN only if all NaN
        meta[f"max_{m}"] = np.fmax.reduce(flat, axis=1)
    if labels is not None and cfg.label_type != "none":
        lab = np.asarray(labels, dtype=np.float64).reshape(-1)  # (K,) or (H*W,)
        meta["label_min"], meta["label_max"] = float(lab.min()), float(lab.max())
        if cfg.label_type == "mask":
            meta["label_valid_frac"] = float((lab != IGNORE_INDEX).mean())
            mask = np.asarray(labels, np.int16)
            digest.update(mask.tobytes())
            part.blobs.setdefault("labels", []).append(encode_chip(mask))
    if cfg.label_type == "class":
        part.labels.append(int(labels))  # type: ignore[arg-type]
    elif cfg.label_type == "multilabel":
        part.labels.append(np.asarray(labels).astype(np.uint8))
    meta["content_hash"] = digest.hexdigest()
    part.rows.append(meta)
    part.regions.append((cs, cs) if stats is not None else None)


def chip_sample(cfg: ChipConfig, sample: Sample, stride: int | None = None, split: str | None = None,
                group: str | None = None, split_block: int | None = None) -> ScenePart:
    """Cut a sample into chips.

    Args:
        cfg: the store's chipping configuration.
        sample: the co-registered sample.
        stride: chip stride in pixels (default: the chip size).
        split: the layout's split for the whole sample, if it has one.
        group: spatial block of the sample (tile or scene; default: its name).
        split_block: instead of one split per group, split blocks of this many pixels of
            the sample; a chip that overlaps two blocks gets split ``none`` (kept, unused).
    """
    h, w = sample.grid.shape
    cs, st = cfg.chip_size, stride or cfg.chip_size
    group = group or sample.name
    rows, cols = window_offsets(h, cs, st), window_offsets(w, cs, st)
    for m in sample.arrays:
        if m not in cfg.modalities:
            raise ValueError(f"modality {m!r} is not in this store ({list(cfg.modalities)})")
    stats = cfg.stats()
    part = ScenePart()
    splits: dict[tuple[int, int], str] = {}
    if split is None and split_block:
        b = split_block
        blocks = sorted({(r // b, c // b) for r in rows for c in cols})
        by_name = assign_splits([f"{group}/b{br}_{bc}" for br, bc in blocks], cfg.seed)
        splits = {(br, bc): by_name[f"{group}/b{br}_{bc}"] for br, bc in blocks}
    if split is not None or not split_block:  # one split for the whole sample
        whole = split or assign_split(group, cfg.seed)
        for m, a in sample.arrays.items():  # statistics over the sample's pixels, once
            part.measure(stats, m, a, whole == "train")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            if split is not None:
                chip_split = split
            elif split_block:
                first, last = (r // split_block, c // split_block), ((r + cs - 1) // split_block,
                                                                     (c + cs - 1) // split_block)
                chip_split = splits[first] if first == last else "none"
                for m, a in sample.arrays.items():  # statistics per chip: splits vary inside
                    part.measure(stats, m, a[:, r : r + cs, c : c + cs], chip_split == "train")
            else:
                chip_split = whole
            chip_one(cfg, part, None, chip_id=f"{sample.name}_r{r}_c{c}", sample=sample.name,
                     arrays={m: a[:, r : r + cs, c : c + cs] for m, a in sample.arrays.items()},
                     grid=sample.grid.window(r, c, cs, cs),
                     labels=(sample.labels[r : r + cs, c : c + cs]
                             if cfg.label_type == "mask" and sample.labels is not None else sample.labels),
                     time=sample.time, row=r, col=c, split=chip_split)
            # what went into the statistics on this chip's behalf: its whole window (per-chip
            # statistics), or the pixels it owns in the sample (from its offset to the next chip's)
            part.regions[-1] = (cs, cs) if split is None and split_block else (
                min((rows[i + 1] if i + 1 < len(rows) else h) - r, cs),
                min((cols[j + 1] if j + 1 < len(cols) else w) - c, cs))
    return part

"""Ingestion: imagery in a known layout -> validated chip store.

One scene is read, co-registered and chipped at a time (memory does not grow with the number
of scenes); chips stream into a temporary store. The Great Expectations suite then runs over
the per-chip metadata table: failing chips are quarantined (kept, flagged, skipped by readers),
Data Docs and the report are written under ``reports/validation/<store>/``, and the store is
moved into place only when the failed share is within bounds. Any error (a corrupt file, a
missing band, ...) leaves no partial store behind.

Re-ingesting the same raw data gives a byte-identical store: everything written is a function
of the inputs and the parameters (no timestamps, sorted scene order).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rasterio

from mapex_core.data.layouts import find_scenes
from mapex_core.data.raster import GDAL_CACHE_MB, MAX_SCENE_PIXELS
from mapex_core.data.sampling import assign_splits
from mapex_core.data.scenes import SceneSpec, load_scene
from mapex_core.data.store import ChipWriter
from mapex_core.data.validation import (
    ValidationFailed,
    ValidationParams,
    validate_table,
    write_report,
)
from mapex_core.modalities import MODALITIES


@dataclass
class DataParams:
    """The ``data`` section of ``params.yaml``.

    ``max_scene_pixels`` caps the pixels a raster file may declare and a scene's grid may have
    (checked before any pixel is read); ``allow_outside_paths`` lets a STAC catalog point at files
    outside its own folder.
    """

    chip_size: int = 64
    stride: int | None = None
    seed: int = 0
    crs: str | None = None
    resolution: float | None = None
    split_block: int | None = None
    max_scene_pixels: int = MAX_SCENE_PIXELS
    allow_outside_paths: bool = False

    def __post_init__(self) -> None:
        for name in ("chip_size", "stride", "split_block", "max_scene_pixels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"data.{name} must be a positive number of pixels, got {value!r}")
        if self.resolution is not None and self.resolution <= 0:
            raise ValueError(f"data.resolution must be positive, got {self.resolution!r}")
        if not isinstance(self.allow_outside_paths, bool):
            raise ValueError(f"data.allow_outside_paths must be true or false, got {self.allow_outside_paths!r}")


def _label_setup(scenes: list[SceneSpec]) -> tuple[list[str] | None, str]:
    labelled = [s for s in scenes if s.labels is not None]
    if not labelled:
        return None, "multilabel"
    first = labelled[0].labels
    assert first is not None
    for s in labelled[1:]:
        assert s.labels is not None
        if s.labels.classes != first.classes or s.labels.label_type != first.label_type:
            raise ValueError(f"scene {s.name}: labels ({s.labels.label_type}, {len(s.labels.classes)} classes) "
                             f"differ from scene {labelled[0].name}'s ({first.label_type}, {len(first.classes)})")
    if len(labelled) != len(scenes):
        missing = [s.name for s in scenes if s.labels is None][:5]
        raise ValueError(f"scenes {missing} have no labels while others do; ingest them separately")
    return list(first.classes), first.label_type


def ingest(
    source: str | Path,
    out: str | Path,
    layout: str = "auto",
    params: DataParams | None = None,
    validation: ValidationParams | None = None,
    reports_dir: str | Path = "reports",
    labels: str | Path | None = None,
    label_attribute: str | None = None,
    classes: list[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    force: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Read every scene under ``source`` and write the validated chip store ``out``.

    Args:
        source: folder of imagery, or a STAC ``catalog.json``.
        out: chip store path (written atomically; replaced when it exists).
        layout: ``auto`` or a name from :data:`mapex_core.data.layouts.LAYOUTS`.
        params: chip size, stride, split and target grid.
        validation: thresholds of the validation suite.
        reports_dir: root of the validation reports.
        labels: vector labels for the ``scenes`` layout (GeoPackage, GeoJSON, ...).
        label_attribute: class column of the vector labels.
        classes: class names in id order (masks; optional for vectors).
        progress: callback ``(done, total, scene_name)``.
        force: replace whatever is at ``out``; otherwise only a chip store (or an empty folder) is
            replaced, and anything else there is an error naming it, before any scene is read.
        **overrides: ``DataParams`` fields (e.g. ``chip_size=120``, ``allow_outside_paths=True``).

    Returns:
        Summary: layout, scenes, chips, quarantined, per-modality chip counts, seconds, paths.

    Raises:
        ValueError / FileNotFoundError: bad input, naming the file and the reason.
        ValidationFailed: more than ``max_failed_share`` of the chips failed validation.
    """
    t0 = time.perf_counter()
    p = params or DataParams()
    p = DataParams(**{**p.__dict__, **{k: v for k, v in overrides.items() if v is not None}})  # re-validated
    out = Path(out)
    layout, scenes = find_scenes(source, layout, labels=Path(labels) if labels else None,
                                 label_attribute=label_attribute, classes=classes,
                                 allow_outside_paths=p.allow_outside_paths)
    present = {m for s in scenes for m in s.sources}
    modalities = [m for m in MODALITIES if m in present]
    class_names, label_type = _label_setup(scenes)
    levels = {m: MODALITIES[m].description for m in modalities}
    counts = dict.fromkeys(modalities, 0)
    attrs = {"layout": layout, "source": Path(source).name, "modality_descriptions": levels,
             "stride": p.stride or p.chip_size, "split_block": p.split_block or 0}
    writer = ChipWriter(out, modalities, p.chip_size, class_names=class_names, label_type=label_type,
                        seed=p.seed, attrs=attrs, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    group_split = assign_splits([s.group or s.name for s in scenes], p.seed)
    # xarray caches each `.rio` accessor on its DataArray, and the accessor points back: every array
    # read holds its pixels in a reference cycle that only a full collection frees (~25 MB per
    # Sen1Floods11 scene piled up between collections). Collect after each scene, with the objects
    # that existed before ingestion frozen so that a collection only scans this run's objects
    # (milliseconds instead of a quarter second with torch and GX imported). A caller that froze
    # objects itself keeps its freeze: ingestion then neither freezes nor unfreezes.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):  # one scene at a time: no cache of past scenes' blocks
            for i, spec in enumerate(scenes):
                sample = load_scene(spec, crs=p.crs, resolution=p.resolution, max_pixels=p.max_scene_pixels)
                try:
                    split = spec.split or (None if p.split_block else group_split[spec.group or spec.name])
                    n = writer.add_sample(sample, stride=p.stride, split=split, group=spec.group,
                                          split_block=p.split_block)
                except ValueError as exc:
                    raise ValueError(f"scene {spec.name} ({spec.files()[0]}): {exc}") from exc
                for m in sample.arrays:
                    counts[m] += n
                del sample
                gc.collect()
                if progress is not None:
                    progress(i + 1, len(scenes), spec.name)
        if writer.n_chips == 0:
            raise ValueError(f"{source}: no chips produced")
        report_dir = Path(reports_dir) / "validation" / out.name.removesuffix(".zarr")
        vparams = validation or ValidationParams()
        report = validate_table(writer.table(), modalities, p.chip_size, writer.label_type,
                                len(class_names or []), vparams, docs_dir=report_dir / "data_docs",
                                name=out.name.removesuffix(".zarr").replace(".", "_"))
        write_report(report, report_dir / "validation.json")
        if not report.success:
            raise ValidationFailed(report, str(out))
        writer.close(quarantine=report.quarantine)
    except BaseException:
        writer.abort()
        raise
    finally:
        if freeze:
            gc.unfreeze()
    splits: dict[str, int] = {}
    for r in writer.rows:
        if r["chip_id"] not in report.quarantine:
            splits[r["split"]] = splits.get(r["split"], 0) + 1
    return {
        "out": str(out),
        "layout": layout,
        "scenes": len(scenes),
        "chips": writer.n_chips,
        "quarantined": len(report.quarantine),
        "chips_per_modality": counts,
        "splits": dict(sorted(splits.items())),
        "label_type": writer.label_type,
        "classes": class_names,
        "chip_size": p.chip_size,
        "validation_report": str(report_dir / "validation.json"),
        "data_docs": report.docs,
        "seconds": round(time.perf_counter() - t0, 3),
    }

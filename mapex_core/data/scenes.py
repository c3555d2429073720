"""A scene as files on disk (`SceneSpec`) and its co-registered arrays (`load_scene`).

Layouts (BigEarthNet, Sen1Floods11, folders of scenes, STAC) only *find* scenes and describe
them as :class:`SceneSpec`; :func:`load_scene` does the reading for all of them:

1. open every modality's files lazily (one multi-band file, or one file per band);
2. pick the reference grid: the finest modality's grid, or a user CRS + resolution;
3. reproject every band onto it (``reproject_match``; bilinear for continuous bands);
4. turn nodata (declared, or the sensor's nodata value, masked before resampling) into NaN,
   the per-pixel valid mask;
5. put the labels on the same grid: nearest for raster masks, rasterised vector polygons,
   or multi-label names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rasterio.enums import Resampling

from mapex_core.data.labels import LabelSource, load_labels
from mapex_core.data.raster import (
    Grid,
    RasterError,
    grid_of,
    open_raster,
    reference_grid,
    reproject_onto,
)
from mapex_core.data.sample import Sample
from mapex_core.modalities import get_modality


@dataclass
class ModalitySource:
    """Where one modality of a scene lives.

    Attributes:
        modality: modality key (see :mod:`mapex_core.modalities`).
        files: one multi-band file with the sensor's bands in order, or one file per band.
    """

    modality: str
    files: list[Path]

    @property
    def per_band(self) -> bool:
        return len(self.files) > 1 or get_modality(self.modality).num_bands == 1


@dataclass
class SceneSpec:
    """One scene (or BigEarthNet patch, or Sen1Floods11 chip) before reading.

    Attributes:
        name: unique scene id.
        sources: modality -> files, in the order the layout prefers for the reference grid.
        labels: label source, or ``None``.
        group: spatial block for the split (a tile or scene); defaults to ``name``.
        split: split given by the layout (``train``/``val``/``test``), else ``None``.
        time: acquisition time (ISO 8601).
    """

    name: str
    sources: dict[str, ModalitySource]
    labels: LabelSource | None = None
    group: str = ""
    split: str | None = None
    time: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def files(self) -> list[Path]:
        """Every file this scene reads (imagery and labels)."""
        out = [f for s in self.sources.values() for f in s.files]
        if self.labels is not None and self.labels.path is not None:
            out.append(self.labels.path)
        return out


def load_scene(spec: SceneSpec, crs: str | None = None, resolution: float | None = None) -> Sample:
    """Read and co-register one scene.

    Args:
        spec: the scene's files.
        crs: target CRS (default: the finest modality's).
        resolution: target pixel size in target-CRS units (default: the finest modality's).

    Raises:
        RasterError: a corrupt or missing file, a wrong band count, a raster without CRS, or a
            modality that is entirely nodata (each names the file).
        ValueError: labels that do not overlap the imagery.
    """
    opened: dict[str, list] = {}
    grids: list[Grid] = []
    for m, src in spec.sources.items():
        n = get_modality(m).num_bands
        if src.per_band and len(src.files) != n:
            raise RasterError(f"{spec.name}: modality {m!r} needs {n} band files, found {len(src.files)}")
        expected = 1 if src.per_band else n
        das = [open_raster(f, expected_bands=expected) for f in src.files]
        opened[m] = das
        grids.extend(grid_of(d) for d in das)
    grid = reference_grid(grids, crs=crs, resolution=resolution)

    arrays: dict[str, np.ndarray] = {}
    for m, das in opened.items():
        files = spec.sources[m].files
        nodata = get_modality(m).nodata
        parts = [reproject_onto(d, grid, f, Resampling.bilinear, nodata=nodata) for d, f in zip(das, files, strict=True)]
        arr = np.concatenate(parts, axis=0)  # (C, H, W), nodata as NaN
        if np.isnan(arr).all():
            names = ", ".join(str(f) for f in files)
            raise RasterError(f"{names}: modality {m!r} of scene {spec.name} has no valid pixel (all nodata/NaN)")
        arrays[m] = arr
    labels = load_labels(spec.labels, grid, spec.name) if spec.labels is not None else None
    return Sample(name=spec.name, arrays=arrays, grid=grid, labels=labels, time=spec.time,
                  sources={m: str(s.files[0].parent) for m, s in spec.sources.items()})

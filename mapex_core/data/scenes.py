"""A scene as files on disk (`SceneSpec`) and its co-registered arrays (`load_scene`).

Layouts (BigEarthNet, Sen1Floods11, folders of scenes, STAC) only *find* scenes and describe
them as :class:`SceneSpec`; :func:`load_scene` does the reading for all of them:

1. open every modality's files lazily (one multi-band file, or one file per band);
2. pick the reference grid: the finest modality's grid, or a user CRS + resolution;
3. reproject every band onto it (``reproject_match``; bilinear for continuous bands);
4. turn nodata (declared, or the sensor's nodata value, masked before resampling) into NaN,
   the per-pixel valid mask;
5. harmonise radiometry on the native grid, before resampling (:mod:`mapex_core.data.radiometry`:
   the Sentinel-2 +1000 offset of processing baseline 04.00+ removed, Sentinel-1 linear power
   turned into dB), decided per modality from the layout's ``extra``, the files' metadata and
   names, the acquisition time or (Sentinel-1) the first file's values;
6. put the labels on the same grid: nearest for raster masks, rasterised vector polygons,
   or multi-label names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.enums import Resampling

from mapex_core.data import radiometry
from mapex_core.data.labels import LabelSource, load_labels
from mapex_core.data.radiometry import Decision, FileMeta, RadiometryOptions
from mapex_core.data.raster import (
    MAX_SCENE_PIXELS,
    Grid,
    RasterError,
    grid_of,
    open_raster,
    read_masked,
    reference_grid,
    resample_onto,
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
        extra: what the layout knows besides the files, as text: per modality, STAC properties and
            product names that decide radiometry (keys of :func:`mapex_core.data.radiometry.decide`'s
            ``extra``), under ``<modality>:<key>`` or ``<key>`` for every modality; the partner
            item of a paired STAC scene (``s1_item``).
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

    def extra_for(self, modality: str) -> dict[str, str]:
        """:attr:`extra` as one modality sees it: ``<modality>:<key>`` entries win over ``<key>``."""
        prefix = f"{modality}:"
        own = {k[len(prefix):]: v for k, v in self.extra.items() if k.startswith(prefix)}
        return {**{k: v for k, v in self.extra.items() if k.split(":", 1)[0] not in self.sources}, **own}


class SceneList(list[SceneSpec]):
    """The scenes a layout found (a ``list`` of :class:`SceneSpec`), with ``notes`` on what it left
    out or how it paired items (shown in the ingestion summary)."""

    def __init__(self, scenes: Iterable[SceneSpec] = (), notes: dict[str, Any] | None = None) -> None:
        super().__init__(scenes)
        self.notes: dict[str, Any] = dict(notes or {})


def _check_footprints(m: str, files: list[Path], grids: list[Grid]) -> None:
    """The per-band files of one modality cover the same ground (within a pixel of the coarser file):
    a band whose header declares another size or place is named before any pixel is read."""
    first, g0 = files[0], grids[0]
    names = get_modality(m).band_names
    for i, (f, g) in enumerate(zip(files, grids, strict=True)):
        if g.crs != g0.crs:
            continue  # compared after reprojection only; bands of one sensor share a CRS
        tol = max(abs(g.affine.a), abs(g.affine.e), abs(g0.affine.a), abs(g0.affine.e))
        if any(abs(a - b) > tol for a, b in zip(g.bounds, g0.bounds, strict=True)):
            raise RasterError(f"{f}: band {names[i]} ({g.shape[0]} x {g.shape[1]} px) does not cover the ground of "
                              f"band {names[0]} ({first.name}, {g0.shape[0]} x {g0.shape[1]} px): bounds "
                              f"{_fmt(g.bounds)} vs {_fmt(g0.bounds)}")


def _fmt(bounds: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{b:.10g}" for b in bounds) + ")"


def load_scene(spec: SceneSpec, crs: str | None = None, resolution: float | None = None,
               max_pixels: int | None = MAX_SCENE_PIXELS, radiometry_options: RadiometryOptions | None = None) -> Sample:
    """Read, harmonise and co-register one scene (:func:`read_scene` without the radiometric decisions)."""
    return read_scene(spec, crs, resolution, max_pixels, radiometry_options)[0]


def read_scene(spec: SceneSpec, crs: str | None = None, resolution: float | None = None,
               max_pixels: int | None = MAX_SCENE_PIXELS,
               radiometry_options: RadiometryOptions | None = None) -> tuple[Sample, dict[str, Decision]]:
    """Read, harmonise and co-register one scene; also return the radiometric decision per modality.

    Every file's header is checked before any pixel is read (declared size, band count, data type:
    :func:`~mapex_core.data.raster.open_raster`), and so is the size of the scene's grid; after
    reading, a band without any valid pixel is named.

    Args:
        spec: the scene's files.
        crs: target CRS (default: the finest modality's).
        resolution: target pixel size in target-CRS units (default: the finest modality's).
        max_pixels: the most pixels a file or the scene's grid may have (``data.max_scene_pixels``);
            ``None``: no cap.
        radiometry_options: forced radiometric choices (default: detect; see
            :mod:`mapex_core.data.radiometry`).

    Raises:
        RasterError: a corrupt or missing file, a declared size over ``max_pixels``, a wrong band
            count or data type, band files of one modality that cover different ground, a raster
            without CRS, or a modality or band that is entirely nodata (each names the file).
        ValueError: labels that do not overlap the imagery, or invalid label values.
    """
    opened: dict[str, list] = {}
    grids: list[Grid] = []
    for m, src in spec.sources.items():
        names = get_modality(m).band_names
        n = len(names)
        if src.per_band and len(src.files) != n:
            raise RasterError(f"{spec.name}: modality {m!r} needs {n} band files, found {len(src.files)}")
        if src.per_band:
            das = [open_raster(f, expected_bands=1, modality=m, bands=[b], max_pixels=max_pixels)
                   for f, b in zip(src.files, names, strict=True)]
        else:
            das = [open_raster(src.files[0], expected_bands=n, modality=m, bands=names, max_pixels=max_pixels)]
        opened[m] = das
        these = [grid_of(d) for d in das]
        if len(these) > 1:
            _check_footprints(m, src.files, these)
        grids.extend(these)
    grid = reference_grid(grids, crs=crs, resolution=resolution)
    if max_pixels is not None and grid.shape[0] * grid.shape[1] > max_pixels:
        h, w = grid.shape
        raise RasterError(f"{spec.files()[0]}: scene {spec.name} needs a {h} x {w} px grid ({h * w:,} pixels), more "
                          f"than data.max_scene_pixels = {max_pixels:,} (raise it, or a coarser data.resolution)")

    arrays: dict[str, np.ndarray] = {}
    decisions: dict[str, Decision] = {}
    for m, das in opened.items():
        files = spec.sources[m].files
        names = get_modality(m).band_names
        nodata = get_modality(m).nodata
        parts = []
        decision = None
        for i, (d, f) in enumerate(zip(das, files, strict=True)):
            values = read_masked(d, f, nodata)  # (C_file, h, w) on the file's own grid
            if decision is None:  # the first file's values decide what a distribution rule decides
                decision = radiometry.decide(m, files, [FileMeta.of_dataarray(x) for x in das],
                                             extra=spec.extra_for(m), time=spec.time, values=values,
                                             options=radiometry_options)
            file_bands = names[i:i + 1] if len(das) > 1 else names
            radiometry.apply(decision, values, file_bands)  # before resampling: never blended first
            parts.append(resample_onto(d, values, grid, Resampling.bilinear))
            del values
        assert decision is not None
        decisions[m] = decision
        empty = np.array([bool(np.isnan(band).all()) for part in parts for band in part])  # a band at a time
        arr = np.concatenate(parts, axis=0)  # (C, H, W), nodata as NaN
        if empty.all():
            listed = ", ".join(str(f) for f in files)
            raise RasterError(f"{listed}: modality {m!r} of scene {spec.name} has no valid pixel (all nodata/NaN)")
        if empty.any():
            b = int(np.argmax(empty))
            f, in_file = (files[b], 1) if len(files) > 1 else (files[0], b + 1)
            raise RasterError(f"{f}: band {in_file} ({get_modality(m).band_names[b]}) of modality {m!r} has no valid "
                              f"pixel in scene {spec.name} (all nodata/NaN) while the other bands have data")
        arrays[m] = arr
    labels = (load_labels(spec.labels, grid, spec.name, max_pixels=max_pixels)
              if spec.labels is not None else None)
    return Sample(name=spec.name, arrays=arrays, grid=grid, labels=labels, time=spec.time,
                  sources={m: str(s.files[0].parent) for m, s in spec.sources.items()}), decisions

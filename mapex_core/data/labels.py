"""Labels on the scene grid: multi-label vectors, raster masks and rasterised vector polygons.

Masks use ``IGNORE_INDEX`` (-1) for pixels without a label (Sen1Floods11's -1, nodata,
outside every polygon, outside the label raster). One rule for the values of a mask file in every
layout (:func:`check_label_values`): each is a known label value or -1; anything else (a
Sen1Floods11 label of 2, a class id past the class list) is an error naming the file and the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rasterio.enums import Resampling
from rasterio.features import rasterize

from mapex_core.data.raster import Grid, grid_of, open_raster, reproject_onto

IGNORE_INDEX = -1
LABEL_KINDS = ("multilabel", "mask", "vector")


@dataclass
class LabelSource:
    """Labels of one scene.

    Attributes:
        kind: ``multilabel`` (``multihot`` given), ``mask`` (a raster of class ids at ``path``)
            or ``vector`` (polygons at ``path`` whose ``attribute`` names the class).
        classes: class names; the class id is the index in this list.
        multihot: ``(K,) uint8`` for ``multilabel``.
        path: mask raster or vector file.
        attribute: vector column holding the class name.
        value_to_class: mask file value -> class id, when the file's values are not the class ids
            (Sen1Floods11: 0 dry, 1 water); other values than these keys and -1 are errors.
    """

    kind: str
    classes: list[str]
    multihot: np.ndarray | None = None
    path: Path | None = None
    attribute: str | None = None
    value_to_class: dict[float, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in LABEL_KINDS:
            raise ValueError(f"unknown label kind {self.kind!r}; known: {LABEL_KINDS}")

    @property
    def label_type(self) -> str:
        """The chip store's label type for this source."""
        return "multilabel" if self.kind == "multilabel" else "mask"


def vector_classes(path: Path, attribute: str) -> list[str]:
    """Sorted distinct values of ``attribute`` in a vector file (the default class list).

    Raises:
        ValueError: unreadable file or missing attribute (lists the columns).
    """
    gdf = _read_vector(path)
    if attribute not in gdf.columns:
        cols = [c for c in gdf.columns if c != "geometry"]
        raise ValueError(f"{path}: no attribute {attribute!r}; columns: {cols}")
    return sorted(str(v) for v in gdf[attribute].dropna().unique())


def _read_vector(path: Path):  # noqa: ANN202 - geopandas GeoDataFrame
    import geopandas as gpd

    try:
        gdf = gpd.read_file(path)
    except Exception as exc:  # pyogrio raises several types
        raise ValueError(f"{path}: cannot read vector labels: {exc}") from exc
    if gdf.crs is None:
        raise ValueError(f"{path}: vector labels have no CRS")
    return gdf


def _rasterize_vector(src: LabelSource, grid: Grid, scene: str) -> np.ndarray:
    assert src.path is not None and src.attribute is not None
    gdf = _read_vector(src.path)
    if src.attribute not in gdf.columns:
        cols = [c for c in gdf.columns if c != "geometry"]
        raise ValueError(f"{src.path}: no attribute {src.attribute!r}; columns: {cols}")
    if not grid.intersects(gdf.crs.to_wkt(), tuple(gdf.total_bounds)):
        raise ValueError(f"{src.path}: labels do not overlap the imagery of scene {scene}")
    gdf = gdf.to_crs(grid.crs)
    index = {c: i for i, c in enumerate(src.classes)}
    shapes = [(geom, index[str(v)]) for geom, v in zip(gdf.geometry, gdf[src.attribute], strict=True)
              if geom is not None and not geom.is_empty and str(v) in index]
    if not shapes:
        raise ValueError(f"{src.path}: no polygon with a class in {src.classes}")
    return rasterize(shapes, out_shape=grid.shape, transform=grid.affine, fill=IGNORE_INDEX,
                     dtype="int16")


def allowed_label_values(src: LabelSource) -> list[float]:
    """The values a mask file of ``src`` may hold: the keys of ``value_to_class`` (e.g. Sen1Floods11's
    0 and 1), or the class ids ``0 .. K-1``; and ``IGNORE_INDEX`` (-1, no label) in both cases."""
    values = set(src.value_to_class) if src.value_to_class else set(range(len(src.classes)))
    return sorted({float(v) for v in values} | {float(IGNORE_INDEX)})


def check_label_values(values: np.ndarray, allowed: list[float], path: Path | str) -> None:
    """The one rule for label values in every layout: each valid (non-NaN) value is one of ``allowed``.

    Raises:
        ValueError: names the file, the values found outside ``allowed`` (at most 10) and the allowed ones.
    """
    found = np.unique(values[~np.isnan(values)])
    bad = found[~np.isin(found, np.asarray(allowed, dtype=found.dtype))]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:10].tolist()) + (f" (+{bad.size - 10} more)" if bad.size > 10 else "")
        raise ValueError(f"{path}: mask values [{shown}] are not labels; allowed: "
                         f"{', '.join(f'{v:g}' for v in allowed)} ({IGNORE_INDEX}: no label)")


def _read_mask(src: LabelSource, grid: Grid, scene: str, max_pixels: int | None = None) -> np.ndarray:
    assert src.path is not None
    da = open_raster(src.path, expected_bands=1, max_pixels=max_pixels)
    g = grid_of(da)
    if not grid.intersects(g.crs, g.bounds):
        raise ValueError(f"{src.path}: labels do not overlap the imagery of scene {scene}")
    values = reproject_onto(da, grid, src.path, Resampling.nearest)[0]  # NaN outside / nodata
    check_label_values(values, allowed_label_values(src), src.path)
    out = np.full(values.shape, IGNORE_INDEX, np.int16)
    valid = ~np.isnan(values)
    if src.value_to_class:
        for value, cls in src.value_to_class.items():
            out[valid & (values == value)] = cls
    else:
        out[valid] = values[valid].astype(np.int16)
    return out


def load_labels(src: LabelSource, grid: Grid, scene: str, max_pixels: int | None = None) -> np.ndarray:
    """Labels of a scene on ``grid``: ``(K,) uint8`` multi-hot or an ``(H, W) int16`` mask.

    Args:
        src: the scene's label source.
        grid: the scene's grid.
        scene: the scene's name, for messages.
        max_pixels: the most pixels a mask file may declare (``data.max_scene_pixels``).

    Raises:
        ValueError: labels that do not overlap the imagery, or values outside the allowed ones
            (:func:`check_label_values`; names the file).
    """
    if src.kind == "multilabel":
        if src.multihot is None or len(src.multihot) != len(src.classes):
            raise ValueError(f"scene {scene}: multi-label source without a {len(src.classes)}-class vector")
        return src.multihot.astype(np.uint8)
    mask = (_rasterize_vector(src, grid, scene) if src.kind == "vector"
            else _read_mask(src, grid, scene, max_pixels=max_pixels))
    if (mask == IGNORE_INDEX).all():
        raise ValueError(f"{src.path}: labels do not overlap the imagery of scene {scene} (no labelled pixel)")
    return mask

"""Raster reading with rioxarray: one band per file, resampled onto a reference grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError


@dataclass(frozen=True)
class Grid:
    """A georeferenced pixel grid.

    Attributes:
        crs: CRS as WKT (or an authority string such as ``EPSG:32633``).
        transform: affine transform as the 6 GDAL-order coefficients ``(a, b, c, d, e, f)``.
        shape: ``(height, width)`` in pixels.
    """

    crs: str
    transform: tuple[float, float, float, float, float, float]
    shape: tuple[int, int]

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform)

    def window(self, row: int, col: int, height: int, width: int) -> Grid:
        """The sub-grid starting at pixel ``(row, col)``."""
        a = self.affine * Affine.translation(col, row)
        return Grid(self.crs, (a.a, a.b, a.c, a.d, a.e, a.f), (height, width))

    def template(self) -> xr.DataArray:
        """An empty DataArray on this grid, for ``rio.reproject_match``."""
        h, w = self.shape
        a = self.affine
        xs = a.c + a.a * (np.arange(w) + 0.5)  # pixel centres
        ys = a.f + a.e * (np.arange(h) + 0.5)
        da = xr.DataArray(np.zeros((1, h, w), np.float32), dims=("band", "y", "x"),
                          coords={"band": [1], "y": ys, "x": xs})
        return da.rio.write_crs(self.crs).rio.write_transform(a)


def open_band(path: str | Path) -> xr.DataArray:
    """Open a single-band raster as ``(1, H, W) float32`` with nodata as NaN.

    Raises:
        ValueError: unreadable/corrupt file, more than one band, or no CRS (names the file).
    """
    path = Path(path)
    try:
        da = rioxarray.open_rasterio(path, masked=True)
    except (RasterioIOError, OSError) as exc:
        raise ValueError(f"{path}: cannot read raster: {exc}") from exc
    if not isinstance(da, xr.DataArray) or da.shape[0] != 1:
        n = da.shape[0] if isinstance(da, xr.DataArray) else "several"
        raise ValueError(f"{path}: expected a single-band raster, found {n} bands")
    if da.rio.crs is None:
        raise ValueError(f"{path}: raster has no CRS")
    try:
        values = da.values.astype(np.float32)
    except (RasterioIOError, OSError, RuntimeError) as exc:
        raise ValueError(f"{path}: cannot read pixel data (corrupt or truncated?): {exc}") from exc
    return da.copy(data=values).rio.write_nodata(np.nan, encoded=False)


def grid_of(da: xr.DataArray) -> Grid:
    """The :class:`Grid` of a rioxarray DataArray."""
    t = da.rio.transform()
    return Grid(da.rio.crs.to_wkt(), (t.a, t.b, t.c, t.d, t.e, t.f), (da.shape[-2], da.shape[-1]))


def read_band_stack(
    files: list[Path], reference: Path | Grid, resampling: Resampling = Resampling.bilinear
) -> tuple[np.ndarray, Grid]:
    """Read single-band files into ``(C, H, W) float32`` on a reference grid.

    Args:
        files: one file per band, in band order.
        reference: a file whose grid is the target, or a :class:`Grid`.
        resampling: resampling for bands not already on the grid (bilinear for continuous
            values; use nearest for labels).
    """
    grid = reference if isinstance(reference, Grid) else grid_of(open_band(reference))
    template = None
    out = np.empty((len(files), *grid.shape), dtype=np.float32)
    for i, f in enumerate(files):
        da = open_band(f)
        if grid_of(da) != grid:
            template = template if template is not None else grid.template()
            da = da.rio.reproject_match(template, resampling=resampling, nodata=np.nan)
        out[i] = da.values[0]
    return out, grid

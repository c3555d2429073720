"""Raster I/O with rioxarray: open with clear errors, pick a reference grid, reproject onto it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.warp import calculate_default_transform, transform_bounds

from mapex_core.modalities import get_modality

# GDAL's block cache (default: 5% of RAM) would keep the blocks of every raster read so far; a
# pass that reads each file once gains nothing from it: ingestion and `mapex predict` cap it.
GDAL_CACHE_MB = 64
# Default cap on the pixels of one file and of one scene's grid (``data.max_scene_pixels``): a
# Sentinel-2 tile (10980 x 10980 = 120.6 M px) fits; a header declaring 30000 x 30000 px does not.
# A scene is held as float32 in memory: about 0.6 GB per band at the cap.
MAX_SCENE_PIXELS = 150_000_000


def window_offsets(size: int, chip: int, stride: int) -> list[int]:
    """Start offsets of windows of ``chip`` pixels every ``stride`` along an axis of ``size`` pixels.

    The last window is flush with the edge, so every pixel is covered (chipping at ingestion and
    the sliding windows of ``mapex predict`` both step this way).

    Raises:
        ValueError: ``chip`` is larger than ``size``.
    """
    if chip > size:
        raise ValueError(f"chip size {chip} is larger than the image ({size} px)")
    offs = list(range(0, size - chip + 1, stride))
    if offs[-1] + chip < size:
        offs.append(size - chip)
    return offs

class RasterError(ValueError):
    """A raster cannot be used; the message names the file and the reason."""


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

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` in CRS units."""
        a, h, w = self.affine, self.shape[0], self.shape[1]
        xs = (a.c, a.c + a.a * w)
        ys = (a.f, a.f + a.e * h)
        return min(xs), min(ys), max(xs), max(ys)

    def window(self, row: int, col: int, height: int, width: int) -> Grid:
        """The sub-grid starting at pixel ``(row, col)``."""
        a = self.affine * Affine.translation(col, row)
        return Grid(self.crs, (a.a, a.b, a.c, a.d, a.e, a.f), (height, width))

    def pixel_size_m(self) -> float:
        """Mean pixel size in metres (degrees converted at the grid's centre latitude)."""
        a = self.affine
        crs = CRS.from_user_input(self.crs)
        if crs.is_geographic:
            lat = math.radians((self.bounds[1] + self.bounds[3]) / 2)
            return (abs(a.a) * 111_320 * math.cos(lat) + abs(a.e) * 110_574) / 2
        return (abs(a.a) + abs(a.e)) / 2 * (crs.linear_units_factor[1] if crs.linear_units_factor else 1.0)

    def template(self) -> xr.DataArray:
        """An empty DataArray on this grid, for ``rio.reproject_match``."""
        h, w = self.shape
        a = self.affine
        xs = a.c + a.a * (np.arange(w) + 0.5)  # pixel centres
        ys = a.f + a.e * (np.arange(h) + 0.5)
        da = xr.DataArray(np.zeros((1, h, w), np.float32), dims=("band", "y", "x"),
                          coords={"band": [1], "y": ys, "x": xs})
        return da.rio.write_crs(self.crs).rio.write_transform(a)

    def matches(self, other: Grid, tol: float = 1e-6) -> bool:
        """Whether ``other`` is this grid up to floating-point noise: the same CRS and shape, and
        pixel corners that agree within ``tol`` of a pixel in x and in y everywhere on the grid
        (files written by different tools often differ in the last digits of their transforms)."""
        if self.crs != other.crs or self.shape != other.shape:
            return False
        a, b = self.transform, other.transform
        h, w = self.shape
        pixel = math.sqrt(abs(a[0] * a[4] - a[1] * a[3])) or 1.0  # side of a pixel, rotated grids too
        dx = abs(a[0] - b[0]) * w + abs(a[1] - b[1]) * h + abs(a[2] - b[2])  # largest corner shift in x
        dy = abs(a[3] - b[3]) * w + abs(a[4] - b[4]) * h + abs(a[5] - b[5])
        return dx <= tol * pixel and dy <= tol * pixel

    def intersects(self, crs: str, bounds: tuple[float, float, float, float]) -> bool:
        """Whether ``bounds`` (in ``crs``) overlap this grid's footprint."""
        left, bottom, right, top = transform_bounds(crs, self.crs, *bounds)
        gl, gb, gr, gt = self.bounds
        return left < gr and right > gl and bottom < gt and top > gb


def grid_of(da: xr.DataArray) -> Grid:
    """The :class:`Grid` of a rioxarray DataArray."""
    t = da.rio.transform()
    return Grid(da.rio.crs.to_wkt(), (t.a, t.b, t.c, t.d, t.e, t.f), (da.shape[-2], da.shape[-1]))


def check_header(ds: rasterio.DatasetReader, path: Path, expected_bands: int | None, modality: str | None,
                  bands: Sequence[str] | None, max_pixels: int | None) -> None:
    """Declared size, band count and data types of an open dataset, before any pixel is read.

    Raises:
        RasterError: more pixels than ``max_pixels``, another band count, a complex data type, or one
            the modality's values cannot be in (names the file and the band).
    """
    if max_pixels is not None and ds.height * ds.width > max_pixels:
        raise RasterError(f"{path}: declares {ds.height} x {ds.width} px ({ds.height * ds.width:,} pixels), more "
                          f"than data.max_scene_pixels = {max_pixels:,} (a damaged or hostile header, or a "
                          f"scene too large for one read: raise the setting)")
    if expected_bands is not None and ds.count and ds.count != expected_bands:  # 0: sub-datasets, named later
        raise RasterError(f"{path}: expected {expected_bands} band(s), found {ds.count}")
    spec = get_modality(modality) if modality is not None else None
    for i, dtype in enumerate(ds.dtypes):
        name = f"band {i + 1}" + (f" ({bands[i]})" if bands is not None and i < len(bands) else "")
        if dtype.startswith("complex"):  # complex_int16, complex64, complex128
            raise RasterError(f"{path}: {name} has the complex data type {dtype}; complex-valued rasters (e.g. SAR "
                              f"SLC) are not supported" + (f", {spec.name} needs {', '.join(spec.dtypes)}" if spec else ""))
        if spec is not None and dtype not in spec.dtypes:
            lo, hi = spec.valid_range
            raise RasterError(f"{path}: {name} has the data type {dtype}, which cannot hold {spec.name} values "
                              f"({spec.units}, {lo:g} to {hi:g}); expected one of {', '.join(spec.dtypes)}")


def open_raster(path: str | Path, expected_bands: int | None = None, *, modality: str | None = None,
                bands: Sequence[str] | None = None, max_pixels: int | None = None) -> xr.DataArray:
    """Open a raster lazily as ``(bands, y, x)``; nodata becomes NaN in :func:`read_values`.

    The header is checked before any pixel is read: the declared size against ``max_pixels``, the
    band count, and the data types (never complex; one of the modality's
    :attr:`~mapex_core.modalities.ModalitySpec.dtypes` when ``modality`` is given). A nodata value
    shared by all bands is masked by :func:`read_values` (one comparison, half the time of GDAL's
    masked read); a raster with a mask band, an alpha channel or per-band nodata values is opened
    masked (GDAL applies those masks).

    Args:
        path: the raster file.
        expected_bands: the band count it must have.
        modality: the sensor it holds (checks the data types).
        bands: the names of its bands, for messages.
        max_pixels: the most pixels (height x width) it may declare.

    Raises:
        RasterError: unreadable or corrupt file, a declared size over ``max_pixels``, unexpected band
            count, an impossible data type, or no CRS.
    """
    path = Path(path)
    if not path.is_file():
        raise RasterError(f"{path}: file not found")
    try:
        with rasterio.open(path) as ds:
            check_header(ds, path, expected_bands, modality, bands, max_pixels)
            # GDAL's masked read for masks other than one nodata value: a mask band, alpha, or
            # nodata values that differ between bands (VRT, netCDF, ENVI)
            masked = (any(set(flags) - {MaskFlags.all_valid, MaskFlags.nodata} for flags in ds.mask_flag_enums)
                      or len({repr(v) for v in ds.nodatavals}) > 1)
        da = rioxarray.open_rasterio(path, masked=masked, cache=False)  # read once, by read_values
    except (RasterioError, OSError) as exc:
        raise RasterError(f"{path}: cannot read raster (corrupt or not a raster?): {exc}") from exc
    if not isinstance(da, xr.DataArray):
        raise RasterError(f"{path}: holds several sub-datasets; expected one raster")
    if expected_bands is not None and da.shape[0] != expected_bands:
        raise RasterError(f"{path}: expected {expected_bands} band(s), found {da.shape[0]}")
    if da.rio.crs is None:
        raise RasterError(f"{path}: raster has no CRS")
    return da


def read_values(da: xr.DataArray, path: str | Path) -> np.ndarray:
    """Read a raster of :func:`open_raster` into float32, its nodata value as NaN; a truncated file
    raises :class:`RasterError`."""
    try:
        raw = da.values
    except (RasterioError, OSError, RuntimeError) as exc:
        raise RasterError(f"{path}: cannot read pixel data (corrupt or truncated?): {exc}") from exc
    values = raw.astype(np.float32)  # a copy: the caller may write NaNs into it
    nodata = da.rio.nodata  # NaN (or None) when opened masked: GDAL has already masked it
    if nodata is not None and not np.isnan(nodata):
        values[raw == nodata] = np.nan
    return values


def reference_grid(grids: list[Grid], crs: str | None = None, resolution: float | None = None) -> Grid:
    """The finest of ``grids`` (first one on ties), or that grid warped to ``crs``/``resolution``."""
    finest = min(grids, key=lambda g: round(g.pixel_size_m(), 6))
    if crs is None and resolution is None:
        return finest
    dst = crs or finest.crs
    h, w = finest.shape
    res = resolution if resolution is not None else None
    transform, width, height = calculate_default_transform(
        finest.crs, dst, w, h, *finest.bounds, resolution=res
    )
    t = transform
    return Grid(CRS.from_user_input(dst).to_wkt(), (t.a, t.b, t.c, t.d, t.e, t.f), (int(height), int(width)))


def read_masked(da: xr.DataArray, path: str | Path, nodata: float | None = None) -> np.ndarray:
    """:func:`read_values`, with ``nodata`` (the sensor's nodata value, for files that do not
    declare one) also turned into NaN: ``(bands, h, w) float32`` on the file's own grid."""
    values = read_values(da, path)
    if nodata is not None and not np.isnan(nodata):
        values[values == nodata] = np.nan
    return values


def reproject_onto(da: xr.DataArray, grid: Grid, path: str | Path,
                   resampling: Resampling = Resampling.bilinear, nodata: float | None = None) -> np.ndarray:
    """Values of ``da`` on ``grid`` as ``(bands, H, W) float32`` (NaN where there is no data).

    Args:
        nodata: a value to treat as missing besides the file's declared nodata (the sensor's
            nodata value, for files that do not declare one). It becomes NaN *before*
            resampling, so it is never blended into valid neighbours.
    """
    return resample_onto(da, read_masked(da, path, nodata), grid, resampling)


def resample_onto(da: xr.DataArray, values: np.ndarray, grid: Grid,
                  resampling: Resampling = Resampling.bilinear) -> np.ndarray:
    """``values`` (read from ``da``, on its grid, NaN = nodata) on ``grid`` as ``(bands, H, W) float32``;
    ``values`` itself when ``da`` is already on ``grid``."""
    if grid_of(da).matches(grid):  # already on the grid: no resampling
        return values
    src = da.copy(data=values).rio.write_nodata(np.nan, encoded=False)
    out = src.rio.reproject_match(grid.template(), resampling=resampling, nodata=np.nan)
    return np.asarray(out.values, dtype=np.float32)

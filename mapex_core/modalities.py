"""Sensor specifications: one entry per modality.

Every other module asks this registry for band names, band order, units, nodata and valid
ranges. Adding a sensor is one entry in :data:`MODALITIES`; nothing else changes.

Wavelengths are centre wavelengths in micrometres (for SAR: the radar wavelength, C-band
5.55 cm = 55 465 um). Resolutions are the native ground sampling distance in metres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# every real-valued raster data type GDAL has (rasterio names); complex types are never a sensor's
REAL_DTYPES: tuple[str, ...] = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                                "float32", "float64")
# integer or float types that hold reflectance x 1e4 (0 to 20 000): not 8-bit
_REFLECTANCE_DTYPES = ("uint16", "int16", "uint32", "int32", "float32", "float64")


@dataclass(frozen=True)
class BandSpec:
    """One band of a sensor.

    Args:
        name: band name as the provider spells it (``B04``, ``VV``).
        wavelength_um: centre wavelength in micrometres, ``None`` when not applicable (DEM).
        resolution_m: native ground sampling distance in metres.
    """

    name: str
    wavelength_um: float | None
    resolution_m: float


@dataclass(frozen=True)
class ModalitySpec:
    """A sensor (modality) the model can take.

    Args:
        name: short key used everywhere (``s2``, ``s1``).
        description: one line for humans.
        bands: bands in the order the model expects them.
        units: physical unit of the stored values.
        nodata: value that marks missing pixels (``nan`` for float sensors that use NaN).
        valid_range: (min, max) of plausible physical values; outside is flagged by validation.
        kind: ``optical``, ``sar`` or ``elevation``.
        dtypes: the raster data types (rasterio names) that can hold this sensor's values; a
            file of another type (an ``int8`` reflectance band, ``uint16`` SAR amplitude where dB
            is expected, complex SLC data) is refused before its pixels are read.
    """

    name: str
    description: str
    bands: tuple[BandSpec, ...]
    units: str
    nodata: float | None
    valid_range: tuple[float, float]
    kind: str
    dtypes: tuple[str, ...] = REAL_DTYPES

    @property
    def band_names(self) -> list[str]:
        """Band names in model order."""
        return [b.name for b in self.bands]

    @property
    def num_bands(self) -> int:
        """Number of bands (input channels)."""
        return len(self.bands)

    def is_nodata(self, value: float) -> bool:
        """Whether ``value`` is this sensor's nodata marker."""
        if self.nodata is None:
            return False
        if isinstance(self.nodata, float) and math.isnan(self.nodata):
            return math.isnan(value)
        return value == self.nodata


def _s2_bands(include_b10: bool) -> tuple[BandSpec, ...]:
    table = [
        ("B01", 0.443, 60.0),
        ("B02", 0.490, 10.0),
        ("B03", 0.560, 10.0),
        ("B04", 0.665, 10.0),
        ("B05", 0.705, 20.0),
        ("B06", 0.740, 20.0),
        ("B07", 0.783, 20.0),
        ("B08", 0.842, 10.0),
        ("B8A", 0.865, 20.0),
        ("B09", 0.945, 60.0),
        ("B10", 1.375, 60.0),
        ("B11", 1.610, 20.0),
        ("B12", 2.190, 20.0),
    ]
    return tuple(BandSpec(n, w, r) for n, w, r in table if include_b10 or n != "B10")


_C_BAND_UM = 55465.76  # Sentinel-1 C-band, 5.405 GHz

MODALITIES: dict[str, ModalitySpec] = {
    "s2": ModalitySpec(
        name="s2",
        description="Sentinel-2 MSI Level-2A surface reflectance (x 1e4), 12 bands (no B10)",
        bands=_s2_bands(include_b10=False),
        units="reflectance x 1e4",
        nodata=0.0,
        valid_range=(0.0, 20000.0),
        kind="optical",
        dtypes=_REFLECTANCE_DTYPES,
    ),
    "s2l1c": ModalitySpec(
        name="s2l1c",
        description="Sentinel-2 MSI Level-1C top-of-atmosphere reflectance (x 1e4), 13 bands",
        bands=_s2_bands(include_b10=True),
        units="reflectance x 1e4",
        nodata=0.0,
        valid_range=(0.0, 20000.0),
        kind="optical",
        dtypes=_REFLECTANCE_DTYPES,
    ),
    "s1": ModalitySpec(
        name="s1",
        description="Sentinel-1 GRD backscatter sigma0, VV and VH, in dB",
        bands=(BandSpec("VV", _C_BAND_UM, 10.0), BandSpec("VH", _C_BAND_UM, 10.0)),
        units="dB",
        nodata=float("nan"),
        valid_range=(-50.0, 30.0),
        kind="sar",
        dtypes=("float32", "float64"),  # dB; integer files are amplitude DN (e.g. GRD uint16), not dB
    ),
    "rgb": ModalitySpec(
        name="rgb",
        description="8-bit red, green, blue (aerial or very-high-resolution imagery)",
        bands=(
            BandSpec("red", 0.665, 1.0),
            BandSpec("green", 0.560, 1.0),
            BandSpec("blue", 0.490, 1.0),
        ),
        units="DN",
        nodata=None,
        valid_range=(0.0, 255.0),
        kind="optical",
        dtypes=("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64"),
    ),
    "dem": ModalitySpec(
        name="dem",
        description="Digital elevation model (e.g. Copernicus DEM GLO-30), metres",
        bands=(BandSpec("elevation", None, 30.0),),
        units="m",
        nodata=-32768.0,
        valid_range=(-500.0, 9000.0),
        kind="elevation",
        dtypes=("int16", "uint16", "int32", "uint32", "float32", "float64"),
    ),
}


def get_modality(name: str) -> ModalitySpec:
    """Return the spec of a modality, or raise ``KeyError`` listing the known ones."""
    try:
        return MODALITIES[name]
    except KeyError:
        known = ", ".join(sorted(MODALITIES))
        raise KeyError(f"unknown modality {name!r}; known modalities: {known}") from None

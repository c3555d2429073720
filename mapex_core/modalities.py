"""Sensor specifications: one entry per modality.

Every other module asks this registry for band names, band order, units, nodata and valid
ranges. Adding a sensor is one entry in :data:`MODALITIES`; nothing else changes.

Wavelengths are centre wavelengths in micrometres (for SAR: the radar wavelength, C-band
5.55 cm = 55 465 um). Resolutions are the native ground sampling distance in metres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
    """

    name: str
    description: str
    bands: tuple[BandSpec, ...]
    units: str
    nodata: float | None
    valid_range: tuple[float, float]
    kind: str

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
    ),
    "s2l1c": ModalitySpec(
        name="s2l1c",
        description="Sentinel-2 MSI Level-1C top-of-atmosphere reflectance (x 1e4), 13 bands",
        bands=_s2_bands(include_b10=True),
        units="reflectance x 1e4",
        nodata=0.0,
        valid_range=(0.0, 20000.0),
        kind="optical",
    ),
    "s1": ModalitySpec(
        name="s1",
        description="Sentinel-1 GRD backscatter sigma0, VV and VH, in dB",
        bands=(BandSpec("VV", _C_BAND_UM, 10.0), BandSpec("VH", _C_BAND_UM, 10.0)),
        units="dB",
        nodata=float("nan"),
        valid_range=(-50.0, 30.0),
        kind="sar",
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
    ),
    "dem": ModalitySpec(
        name="dem",
        description="Digital elevation model (e.g. Copernicus DEM GLO-30), metres",
        bands=(BandSpec("elevation", None, 30.0),),
        units="m",
        nodata=-32768.0,
        valid_range=(-500.0, 9000.0),
        kind="elevation",
    ),
}


def get_modality(name: str) -> ModalitySpec:
    """Return the spec of a modality, or raise ``KeyError`` listing the known ones."""
    try:
        return MODALITIES[name]
    except KeyError:
        known = ", ".join(sorted(MODALITIES))
        raise KeyError(f"unknown modality {name!r}; known modalities: {known}") from None

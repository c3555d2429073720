"""Sensor specifications: one entry per modality.

Every other module asks this registry for band names, band order, units, nodata and valid
ranges. Adding a sensor is one entry in :data:`MODALITIES`; nothing else changes.

Wavelengths are centre wavelengths in micrometres (for SAR: the radar wavelength, C-band
5.55 cm = 55 465 um). Resolutions are the native ground sampling distance in metres.

Radiometric conventions that differ between product versions live here too, so that readers
(:mod:`mapex_core.data.radiometry`) bring every product onto one scale: a
:class:`ProductOffset` (Sentinel-2 processing baseline 04.00 and later add +1000 to every valid
value) and ``linear_power`` (Sentinel-1 backscatter that may arrive as linear power instead of dB).
Band entries carry the STAC common name (``red``, ``nir08``, ``swir16``) and the asset keys public
catalogs use (Earth Search's ``rededge1``), so catalog items are read by those names.
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
        common_name: the STAC ``eo`` common name (``red``, ``nir08``); ``rededge`` is shared by
            three Sentinel-2 bands, so it names no band on its own.
        aliases: other asset keys public STAC catalogs give this band (Earth Search: ``rededge1``).
    """

    name: str
    wavelength_um: float | None
    resolution_m: float
    common_name: str | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProductOffset:
    """A constant that some versions of a product add to every valid value.

    Sentinel-2 L1C and L2A of processing baseline 04.00 and later (produced from 25 January 2022,
    and the reprocessed Collection-1 archive) store ``DN = reflectance x 1e4 - ADD_OFFSET`` with
    ``ADD_OFFSET = -1000`` per band in the product metadata; DN 0 stays nodata. Removing ``value``
    puts them back on the earlier scale.

    Args:
        value: the offset in stored units (1000) when the metadata does not give it per band.
        since_baseline: the first processing baseline that adds it (``"04.00"``).
        since_date: the first acquisition date (ISO) of products that add it, for the last-resort rule.
        metadata_field: the per-band XML element of the product metadata (``BOA_ADD_OFFSET``).
        metadata_files: product metadata file names (``MTD_MSIL2A.xml``).
        band_order: band names in the order of the metadata's ``band_id`` (0, 1, ...).
        floor: the lowest value after removal: earlier baselines clamped DN to [1, 32767], so a
            value that falls below 1 becomes 1 (see :mod:`mapex_core.data.radiometry`).
    """

    value: float
    since_baseline: str
    since_date: str
    metadata_field: str
    metadata_files: tuple[str, ...]
    band_order: tuple[str, ...] = ()
    floor: float = 1.0


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
        offset: the offset some product versions add (see :class:`ProductOffset`), or ``None``.
        linear_power: values may arrive as linear power (many catalogs serve SAR so); they are
            detected and converted to ``units`` (dB: 10 log10) by :mod:`mapex_core.data.radiometry`.
    """

    name: str
    description: str
    bands: tuple[BandSpec, ...]
    units: str
    nodata: float | None
    valid_range: tuple[float, float]
    kind: str
    dtypes: tuple[str, ...] = REAL_DTYPES
    offset: ProductOffset | None = None
    linear_power: bool = False

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
    # name, wavelength, resolution, STAC common name, Earth Search asset key where it differs
    table = [
        ("B01", 0.443, 60.0, "coastal", ()),
        ("B02", 0.490, 10.0, "blue", ()),
        ("B03", 0.560, 10.0, "green", ()),
        ("B04", 0.665, 10.0, "red", ()),
        ("B05", 0.705, 20.0, "rededge", ("rededge1",)),
        ("B06", 0.740, 20.0, "rededge", ("rededge2",)),
        ("B07", 0.783, 20.0, "rededge", ("rededge3",)),
        ("B08", 0.842, 10.0, "nir", ()),
        ("B8A", 0.865, 20.0, "nir08", ()),
        ("B09", 0.945, 60.0, "nir09", ()),
        ("B10", 1.375, 60.0, "cirrus", ()),
        ("B11", 1.610, 20.0, "swir16", ()),
        ("B12", 2.190, 20.0, "swir22", ()),
    ]
    return tuple(BandSpec(n, w, r, c, a) for n, w, r, c, a in table if include_b10 or n != "B10")


def _s2_offset(level: str, field: str) -> ProductOffset:
    return ProductOffset(value=1000.0, since_baseline="04.00", since_date="2022-01-25", metadata_field=field,
                         metadata_files=(f"MTD_MSI{level}.xml",),
                         band_order=tuple(b.name for b in _s2_bands(include_b10=True)))  # ESA band ids 0..12


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
        offset=_s2_offset("L2A", "BOA_ADD_OFFSET"),
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
        offset=_s2_offset("L1C", "RADIO_ADD_OFFSET"),
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
        linear_power=True,  # catalogs often serve sigma0/gamma0 as linear power: converted to dB
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

"""Radiometric harmonisation: every product of a sensor on one scale, at ingestion and in `mapex predict`.

What differs between product versions is declared in :mod:`mapex_core.modalities`; this module
decides, per scene and modality, which convention a product follows, and converts it.

Why this module is long: each decision weighs up to five kinds of evidence (options, STAC,
product metadata in three forms, product names, dates or values), and each says where it came from.

**Sentinel-2 processing baseline** (modalities with a
:class:`~mapex_core.modalities.ProductOffset`: ``s2``, ``s2l1c``). Products of baseline 04.00 and
later store ``DN = reflectance x 1e4 + 1000`` (``BOA_ADD_OFFSET`` / ``RADIO_ADD_OFFSET = -1000``
per band; DN 0 stays nodata). The first of these that answers decides:

1. the option ``--s2-offset none|N`` (``auto`` by default);
2. the STAC item: ``earthsearch:boa_offset_applied: true`` (the publisher removed it already), a
   non-zero ``raster:bands`` offset of the band assets (``-offset / scale`` DN), or
   ``s2:processing_baseline``;
3. the product metadata: a non-zero GDAL band offset (``-offset / scale``), a
   ``PROCESSING_BASELINE`` tag, or ``MTD_MSIL2A.xml`` / ``MTD_MSIL1C.xml`` (per-band
   ``BOA_ADD_OFFSET`` / ``RADIO_ADD_OFFSET``, else ``PROCESSING_BASELINE``) in the file's folder or
   up to :data:`SAFE_DEPTH` folders above it (a ``.SAFE`` product);
4. the product name's ``_Nxxxx_`` field (``S2B_MSIL2A_20220830T103629_N0400_...``) in the file's
   name, its folders' names, the STAC ``s2:product_uri`` or BigEarthNet's ``tile_source``
   (``N9999``, Sen2Cor's mark of a locally processed product, as in BigEarthNet v2 ids, says nothing);
5. the acquisition date, only as a last resort: on or after 2022-01-25 the offset is removed with a
   :class:`RadiometryWarning` naming the file (the archive reprocessed as Collection-1 carries the
   offset whatever its date, so the date is a guess; earlier dates keep the values as they are).

Nothing known: the values are taken as they are (what every product before 2022 needs).

Removal subtracts the offset and raises what falls below 1 to 1: ESA introduced the offset so that
dark surfaces can keep *negative* reflectances, which products of earlier baselines clamped to
DN 1 (their valid range was [1, 32767]; 0 is nodata). Putting a new product on the earlier scale
therefore means the same clamp; keeping negatives would give a product of 2023 values no product
of 2018 of the same ground can have (and the sensor's valid range, 0 .. 20 000, would quarantine
dark water). Clamping at 0 would turn valid dark pixels into the nodata value. NaN (nodata) stays
NaN.

**Sentinel-1 in linear power** (modalities with ``linear_power``: ``s1``). The first that answers:

1. the option ``--s1-scale db|linear`` (``auto`` by default);
2. metadata: the unit of the STAC asset (``raster:bands`` / ``bands`` ``unit``) or of the file's
   bands (GDAL unit type, a ``units`` tag): ``dB`` or ``linear`` / ``power`` / ``intensity``;
3. the value distribution of the scene's first file (at most :data:`SAMPLE_VALUES` values, an even
   stride): of its finite non-zero values, at most :data:`MAX_NEGATIVE_SHARE` negative and more
   than half in ``(0, 1.5]`` means linear power (backscatter in dB is mostly negative: sigma0
   below 1, i.e. below 0 dB; zeros are a fill value in linear products and are left out).

Linear power becomes ``10 log10(x)``; non-positive values become NaN (nodata).

A :class:`Decision` records what was decided and from which evidence; ingestion keeps them per
scene (store attribute ``radiometry`` when any scene was converted, and the ingestion report), and
`mapex predict` returns them in its summary.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np

from mapex_core.modalities import ModalitySpec, ProductOffset, get_modality

AS_IS = "as is"
OFFSET_REMOVED = "offset removed"
TO_DB = "linear power to dB"
S1_SCALES = ("auto", "db", "linear")
SAFE_DEPTH = 4  # folders above a band file searched for the product metadata (IMG_DATA/R10m -> the .SAFE)
MAX_METADATA_BYTES = 20 * 2**20  # a product metadata XML is ~100 kB; larger files are not parsed
SAMPLE_VALUES = 4_000_000  # values of a scene the linear-power rule looks at, at most
LINEAR_MAX = 1.5  # linear power: most values in (0, LINEAR_MAX]
MAX_NEGATIVE_SHARE = 0.001  # linear power: at most this share of negative values
DB_UNITS = ("db", "decibel", "decibels")
LINEAR_UNITS = ("linear", "linear power", "power", "intensity")

_PRODUCT = re.compile(r"S2[A-D]_MSI(?:L1C|L2A)_(?P<date>\d{8})T\d{4,6}_N(?P<pb>\d{4})_")
# a product name's date, or a SAFE band file's (T33UUU_20170216T102101_B04.jp2)
_PRODUCT_DATE = re.compile(r"S2[A-D]_MSI(?:L1C|L2A)_(?P<date>\d{8})T|(?:^|_)T\d{2}[A-Z]{3}_(?P<tile_date>\d{8})T\d{6}")
_BASELINE_TAGS = ("PROCESSING_BASELINE", "s2:processing_baseline")
_PRODUCT_TAGS = ("PRODUCT_URI", "PRODUCT_NAME", "s2:product_uri")
_DATE_TAGS = ("PRODUCT_START_TIME", "DATATAKE_1_DATATAKE_SENSING_START", "SENSING_TIME", "ACQUISITION_DATE")


class RadiometryWarning(UserWarning):
    """A radiometric decision taken on weak evidence (the acquisition date); names the file."""


@dataclass(frozen=True)
class RadiometryOptions:
    """How to decide (``auto``) or what to force.

    Args:
        s2_offset: ``auto`` (detect), ``none`` (values as they are) or a number of DN to remove
            from every valid value (``1000``).
        s1_scale: ``auto`` (detect), ``db`` (as they are) or ``linear`` (convert to dB).
    """

    s2_offset: str = "auto"
    s1_scale: str = "auto"

    def __post_init__(self) -> None:
        s2 = str(self.s2_offset).strip().lower()
        if s2 not in ("auto", "none"):
            try:
                value = float(s2)
            except ValueError:
                value = float("nan")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"s2_offset (--s2-offset) must be auto, none or a number of DN >= 0, "
                                 f"got {self.s2_offset!r}")
        object.__setattr__(self, "s2_offset", s2)
        s1 = str(self.s1_scale).strip().lower()
        if s1 not in S1_SCALES:
            raise ValueError(f"s1_scale (--s1-scale) must be one of {', '.join(S1_SCALES)}, got {self.s1_scale!r}")
        object.__setattr__(self, "s1_scale", s1)


@dataclass(frozen=True)
class FileMeta:
    """What a raster file says about itself: dataset tags, and per band the unit, offset and scale."""

    tags: dict[str, str] = field(default_factory=dict)
    units: tuple[str, ...] = ()
    offsets: tuple[float, ...] = ()
    scales: tuple[float, ...] = ()

    @classmethod
    def of_dataset(cls, src: Any) -> FileMeta:
        """From an open rasterio dataset."""
        return cls({str(k): str(v) for k, v in src.tags().items()}, tuple(u or "" for u in src.units),
                   tuple(float(o) for o in src.offsets), tuple(float(s) for s in src.scales))

    @classmethod
    def of_dataarray(cls, da: Any) -> FileMeta:
        """From the attributes rioxarray gives an opened raster (tags, ``units``, ``scale_factor``,
        ``add_offset``; ``scales`` / ``offsets`` where bands differ)."""
        attrs = dict(da.attrs)
        units = attrs.pop("units", ())
        units = (units,) if isinstance(units, str) else tuple(str(u or "") for u in units)
        offsets = attrs.pop("offsets", attrs.pop("add_offset", 0.0))
        scales = attrs.pop("scales", attrs.pop("scale_factor", 1.0))
        n = int(da.shape[0]) if getattr(da, "ndim", 0) == 3 else 1
        offsets = tuple(float(o) for o in offsets) if isinstance(offsets, (tuple, list)) else (float(offsets),) * n
        scales = tuple(float(s) for s in scales) if isinstance(scales, (tuple, list)) else (float(scales),) * n
        tags = {str(k): str(v) for k, v in attrs.items() if not k.startswith("_")}
        return cls(tags, units, offsets, scales)


@dataclass(frozen=True)
class Decision:
    """What was done to one modality of one scene, and why.

    Attributes:
        modality: the modality key.
        action: :data:`AS_IS`, :data:`OFFSET_REMOVED` or :data:`TO_DB`.
        source: the evidence: ``option``, ``stac``, ``metadata``, ``product name``, ``date``,
            ``distribution``, or ``none`` (nothing known, or nothing to harmonise).
        detail: the evidence in words (which property, tag, file or name, and its value).
        offsets: band -> DN removed (:data:`OFFSET_REMOVED` only).
    """

    modality: str
    action: str
    source: str
    detail: str
    offsets: dict[str, float] = field(default_factory=dict)

    @property
    def changes(self) -> bool:
        """Whether the values are converted (anything but :data:`AS_IS`)."""
        return self.action != AS_IS

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: action, source, detail (and offsets per band when removed)."""
        out: dict[str, Any] = {"action": self.action, "source": self.source, "detail": self.detail}
        if self.offsets:
            out["offsets"] = dict(self.offsets)
        return out


def decide(modality: str, files: Sequence[str | Path], metas: Sequence[FileMeta] = (),
           extra: Mapping[str, str] | None = None, time: str = "", values: np.ndarray | None = None,
           options: RadiometryOptions | None = None) -> Decision:
    """The radiometric decision for one modality of a scene (see the module docstring for the rules).

    Args:
        modality: the modality key.
        files: its files (one multi-band file, or one per band in band order).
        metas: what the files say about themselves (:class:`FileMeta`, same order; may be empty).
        extra: what the layout found (STAC properties: ``stac:processing_baseline``,
            ``stac:boa_offset_applied``, ``stac:raster_offsets`` (JSON band -> DN), ``stac:unit``,
            ``product`` (a product name), ``product_metadata`` (a metadata XML path)).
        time: the acquisition time (ISO 8601), for the last-resort date rule.
        values: values of the first file (``(bands, h, w)``, NaN = nodata), for the linear-power rule.
        options: forced choices (default: detect everything).

    Raises:
        ValueError: a product metadata XML that cannot be parsed (names the file).
    """
    spec = get_modality(modality)
    options = options or RadiometryOptions()
    extra = extra or {}
    paths = [Path(f) for f in files]
    if spec.offset is not None:
        return _offset_decision(spec, spec.offset, paths, list(metas), extra, time, options.s2_offset)
    if spec.linear_power:
        return _scale_decision(spec, paths, list(metas), extra, values, options.s1_scale)
    return Decision(modality, AS_IS, "none", f"{modality} has no product-version convention to harmonise")


def apply(decision: Decision, values: np.ndarray, bands: Sequence[str]) -> np.ndarray:
    """Convert ``values`` ``(len(bands), h, w) float32`` (NaN = nodata) in place as ``decision`` says.

    Returns:
        ``values``.
    """
    if decision.action == OFFSET_REMOVED:
        floor = get_modality(decision.modality).offset.floor  # type: ignore[union-attr]
        off = np.array([decision.offsets[b] for b in bands], np.float32).reshape(-1, 1, 1)  # (C, 1, 1)
        np.subtract(values, off, out=values)
        np.maximum(values, np.float32(floor), out=values)  # NaN stays NaN
    elif decision.action == TO_DB:
        with np.errstate(divide="ignore", invalid="ignore"):
            nonpositive = values <= 0
            np.log10(values, out=values)
            values *= np.float32(10.0)
        values[nonpositive] = np.nan
    return values


def needs_values(modality: str, options: RadiometryOptions | None = None) -> bool:
    """Whether :func:`decide` may need pixel values for ``modality`` (the linear-power rule)."""
    spec = get_modality(modality)
    return spec.linear_power and (options or RadiometryOptions()).s1_scale == "auto"


# ----- Sentinel-2 processing baseline ---------------------------------------------------------------
def _baseline(text: str) -> tuple[int, int] | None:
    """``04.00`` / ``4.0`` / ``0400`` / ``N0400`` -> ``(4, 0)``; ``None`` when it is not a baseline."""
    t = str(text).strip().upper().removeprefix("N")
    m = re.fullmatch(r"(\d{1,2})\.(\d{1,2})", t) or re.fullmatch(r"(\d{2})(\d{2})", t)
    if not m:
        return None
    major, minor = m.groups()
    return int(major), int(minor.ljust(2, "0"))


def _from_baseline(spec: ModalitySpec, rule: ProductOffset, text: str, source: str,
                   detail: str) -> Decision | None:
    pb = _baseline(text)
    if pb is None:
        return None
    since = _baseline(rule.since_baseline)
    assert since is not None
    shown = f"{pb[0]:02d}.{pb[1]:02d}"
    if pb >= since:
        return Decision(spec.name, OFFSET_REMOVED, source, f"processing baseline {shown} ({detail}), >= "
                        f"{rule.since_baseline}", dict.fromkeys(spec.band_names, rule.value))
    return Decision(spec.name, AS_IS, source, f"processing baseline {shown} ({detail}), before {rule.since_baseline}")


def _offsets_from(spec: ModalitySpec, per_band: Mapping[str, float], source: str, detail: str) -> Decision:
    offsets = {b: float(per_band.get(b, 0.0)) for b in spec.band_names}
    if not any(offsets.values()):
        return Decision(spec.name, AS_IS, source, f"no offset ({detail})")
    values = sorted(set(offsets.values()))
    shown = f"{values[0]:g}" if len(values) == 1 else "per band"
    return Decision(spec.name, OFFSET_REMOVED, source, f"offset {shown} DN ({detail})", offsets)


def _metadata_xml(rule: ProductOffset, files: list[Path], extra: Mapping[str, str]) -> Path | None:
    """The product metadata file: the STAC ``product_metadata`` asset, else the nearest
    ``MTD_MSI*.xml`` in a band file's folder or up to :data:`SAFE_DEPTH` folders above."""
    given = extra.get("product_metadata")
    if given and Path(given).name in rule.metadata_files and Path(given).is_file():
        return Path(given)
    if not files:
        return None
    folder = files[0].parent
    for _ in range(SAFE_DEPTH + 1):
        for name in rule.metadata_files:
            if (folder / name).is_file():
                return folder / name
        if folder.suffix.upper() == ".SAFE" or folder.parent == folder:
            break
        folder = folder.parent
    return None


def _read_metadata_xml(path: Path, rule: ProductOffset) -> tuple[dict[str, float], str | None]:
    """Per-band offsets (DN to remove) and the processing baseline of a product metadata XML.

    Raises:
        ValueError: too large or not XML (names the file).
    """
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise ValueError(f"{path}: product metadata of {path.stat().st_size:,} bytes, more than "
                         f"{MAX_METADATA_BYTES:,}: not a Sentinel-2 metadata file")
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise ValueError(f"{path}: cannot parse the product metadata XML: {exc}") from exc
    offsets: dict[str, float] = {}
    baseline = None
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == rule.metadata_field:
            band_id = el.get("band_id", "")
            try:
                band = rule.band_order[int(band_id)]
                offsets[band] = -float((el.text or "").strip())  # the XML gives -1000: remove +1000
            except (ValueError, IndexError):
                raise ValueError(f"{path}: {rule.metadata_field} with band_id {band_id!r} and value {el.text!r} "
                                 f"is not a band offset") from None
        elif tag == "PROCESSING_BASELINE" and baseline is None:
            baseline = (el.text or "").strip()
    return offsets, baseline


def _band_offsets(spec: ModalitySpec, metas: list[FileMeta]) -> dict[str, float]:
    """DN to remove per band from the files' GDAL offset/scale (``physical = DN x scale + offset``)."""
    out: dict[str, float] = {}
    names = spec.band_names
    per_band = [(o, s) for m in metas for o, s in zip(m.offsets, m.scales, strict=False)]
    if len(per_band) != len(names):
        return {}
    for name, (off, scale) in zip(names, per_band, strict=True):
        if off and scale:
            out[name] = -off / scale
    return out


def _product_names(files: list[Path], metas: list[FileMeta], extra: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(text, where)`` that may hold a product name, most specific first."""
    found = []
    if extra.get("product"):
        found.append((extra["product"], "the layout's product name"))
    for meta in metas[:1]:
        for tag in _PRODUCT_TAGS:
            if tag in meta.tags:
                found.append((meta.tags[tag], f"tag {tag}"))
    if files:
        p = files[0]
        found.append((p.name, f"file name {p}"))
        for parent in list(p.parents)[: SAFE_DEPTH + 1]:
            found.append((parent.name, f"folder name {parent}"))
    return found


def _date(time: str, names: list[tuple[str, str]], metas: list[FileMeta]) -> tuple[str, str] | None:
    """The acquisition date (``YYYY-MM-DD``) and where it was found."""
    if time and re.match(r"\d{4}-\d{2}-\d{2}", time):
        return time[:10], "the scene's acquisition time"
    for meta in metas[:1]:
        for tag in _DATE_TAGS:
            if re.match(r"\d{4}-\d{2}-\d{2}", meta.tags.get(tag, "")):
                return meta.tags[tag][:10], f"tag {tag}"
    for text, where in names:
        m = _PRODUCT_DATE.search(text)
        if m:
            d = m["date"] or m["tile_date"]
            return f"{d[:4]}-{d[4:6]}-{d[6:]}", where
    return None


def _offset_decision(spec: ModalitySpec, rule: ProductOffset, files: list[Path], metas: list[FileMeta],
                     extra: Mapping[str, str], time: str, option: str) -> Decision:
    name = spec.name
    if option == "none":
        return Decision(name, AS_IS, "option", "--s2-offset none")
    if option != "auto":
        value = float(option)
        if value == 0:
            return Decision(name, AS_IS, "option", f"--s2-offset {option}")
        return Decision(name, OFFSET_REMOVED, "option", f"--s2-offset {option}", dict.fromkeys(spec.band_names, value))
    # 2. the STAC item
    if str(extra.get("stac:boa_offset_applied", "")).lower() == "true":
        return Decision(name, AS_IS, "stac", "earthsearch:boa_offset_applied is true: the publisher removed the "
                        "offset already")
    if extra.get("stac:raster_offsets"):
        per_band = {str(k): float(v) for k, v in json.loads(extra["stac:raster_offsets"]).items()}
        if any(per_band.values()):
            return _offsets_from(spec, per_band, "stac", "raster:bands offset / scale of the band assets")
    if extra.get("stac:processing_baseline"):
        d = _from_baseline(spec, rule, extra["stac:processing_baseline"], "stac", "s2:processing_baseline")
        if d is not None:
            return d
    # 3. the product metadata
    per_band = _band_offsets(spec, metas)
    if any(per_band.values()):
        return _offsets_from(spec, per_band, "metadata", f"GDAL band offset / scale of {files[0]}")
    for meta in metas[:1]:
        for tag in _BASELINE_TAGS:
            if tag in meta.tags:
                d = _from_baseline(spec, rule, meta.tags[tag], "metadata", f"tag {tag} of {files[0]}")
                if d is not None:
                    return d
    xml = _metadata_xml(rule, files, extra)
    if xml is not None:
        offsets, baseline = _read_metadata_xml(xml, rule)
        if offsets:
            return _offsets_from(spec, offsets, "metadata", f"{rule.metadata_field} in {xml}")
        if baseline:
            d = _from_baseline(spec, rule, baseline, "metadata", f"PROCESSING_BASELINE in {xml}")
            if d is not None:
                return d
    # 4. the product name
    names = _product_names(files, metas, extra)
    for text, where in names:
        m = _PRODUCT.search(text)
        if m and m["pb"] != "9999":  # N9999: processed locally (Sen2Cor's placeholder; BigEarthNet v2 ids)
            d = _from_baseline(spec, rule, m["pb"], "product name", f"N{m['pb']} in {where}")
            if d is not None:
                return d
    # 5. the acquisition date (last resort)
    found = _date(time, names, metas)
    if found is not None:
        date, where = found
        if date >= rule.since_date:
            where_file = files[0] if files else "(no file)"
            warnings.warn(f"{where_file}: no processing baseline in STAC, metadata or product name; acquired {date} "
                          f"({where}), on or after {rule.since_date}: assuming baseline {rule.since_baseline} or "
                          f"later and removing the +{rule.value:g} offset (--s2-offset none|{rule.value:g} decides "
                          f"instead)", RadiometryWarning, stacklevel=2)
            return Decision(name, OFFSET_REMOVED, "date", f"acquired {date} ({where}), on or after {rule.since_date}",
                            dict.fromkeys(spec.band_names, rule.value))
        return Decision(name, AS_IS, "date", f"acquired {date} ({where}), before {rule.since_date}")
    return Decision(name, AS_IS, "none", "no processing baseline, product name or date: values as they are")


# ----- Sentinel-1 linear power -------------------------------------------------------------------------
def _unit_decision(spec: ModalitySpec, unit: str, source: str, where: str) -> Decision | None:
    u = unit.strip().lower()
    if u in DB_UNITS:
        return Decision(spec.name, AS_IS, source, f"unit {unit!r} ({where})")
    if u in LINEAR_UNITS:
        return Decision(spec.name, TO_DB, source, f"unit {unit!r} ({where})")
    return None


def linear_power_share(values: np.ndarray) -> tuple[int, float, float]:
    """Of the finite non-zero values of ``values`` (an even-stride sample of at most
    :data:`SAMPLE_VALUES`): how many, the share that is negative, the share in ``(0, LINEAR_MAX]``."""
    flat = values.reshape(-1)  # (bands * h * w,)
    sample = flat[:: max(1, flat.size // SAMPLE_VALUES)]
    sample = sample[np.isfinite(sample) & (sample != 0)]
    n = int(sample.size)
    if n == 0:
        return 0, 0.0, 0.0
    negative = int(np.count_nonzero(sample < 0))
    small = int(np.count_nonzero((sample > 0) & (sample <= LINEAR_MAX)))
    return n, negative / n, small / n


def _scale_decision(spec: ModalitySpec, files: list[Path], metas: list[FileMeta], extra: Mapping[str, str],
                    values: np.ndarray | None, option: str) -> Decision:
    name = spec.name
    if option == "db":
        return Decision(name, AS_IS, "option", "--s1-scale db")
    if option == "linear":
        return Decision(name, TO_DB, "option", "--s1-scale linear")
    if extra.get("stac:unit"):
        d = _unit_decision(spec, extra["stac:unit"], "stac", "unit of the STAC asset's bands")
        if d is not None:
            return d
    for f, meta in zip(files, metas, strict=False):
        for unit in [*meta.units, meta.tags.get("units", ""), meta.tags.get("UNITS", "")]:
            if unit:
                d = _unit_decision(spec, unit, "metadata", f"band unit of {f}")
                if d is not None:
                    return d
    if values is None:
        return Decision(name, AS_IS, "none", "no unit in the metadata and no values to look at: values as they are")
    n, negative, small = linear_power_share(values)
    where = files[0] if files else "the values"
    if n == 0:
        return Decision(name, AS_IS, "distribution", f"no finite non-zero value in {where}")
    stats = f"{negative:.1%} negative, {small:.1%} in (0, {LINEAR_MAX:g}] of {n:,} values of {where}"
    if negative <= MAX_NEGATIVE_SHARE and small > 0.5:
        return Decision(name, TO_DB, "distribution", f"linear power: {stats}")
    return Decision(name, AS_IS, "distribution", f"dB: {stats}")

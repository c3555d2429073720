"""Named source layouts: each finds the scenes under a path and describes them as `SceneSpec`.

=================  ===========================================================================
layout             what it reads
=================  ===========================================================================
``bigearthnet``    BigEarthNet v1 patch folders (see :mod:`mapex_core.data.bigearthnet`)
``bigearthnet2``   BigEarthNet v2: ``BigEarthNet-S1/``, ``BigEarthNet-S2/``, ``metadata.parquet``
``sen1floods11``   Sen1Floods11 chips: ``*_S1Hand.tif`` (VV, VH dB), ``*_S2Hand.tif`` (S2 L1C,
                   13 bands), ``*_LabelHand.tif`` (-1 ignore, 0 dry, 1 water)
``scenes``         a folder of rasters: per-band files ``<scene>_<BAND>.<ext>`` (the sensor is
                   recognised from its band names) or multi-band ``<scene>_<modality>.<ext>`` /
                   ``<scene>/<modality>.<ext>``; labels ``<scene>_labels.tif`` or a vector
                   file given with ``labels=``
``stac``           a local STAC catalog (``catalog.json``): one item per scene, assets keyed by
                   modality (multi-band) or band name, optional ``labels`` asset; or items as
                   public catalogs publish them (Earth Search, Planetary Computer): one item
                   per sensor and acquisition, band assets keyed by common name (``red``,
                   ``nir08``, ``swir16``), lower-case ``vv``/``vh`` or described by
                   ``eo:bands``/``bands``, Sentinel-1 and Sentinel-2 items paired by footprint
                   overlap and time (:func:`stac_scenes`); links are followed without
                   recursion into pystac (cycles and nesting deeper than
                   :data:`MAX_STAC_DEPTH` are errors), and the assets read and linked files
                   must lie under the catalog's folder unless ``allow_outside_paths``
=================  ===========================================================================

A layout returns a :class:`~mapex_core.data.scenes.SceneList`: the scenes, and notes on what it
left out or paired (BigEarthNet v1 with the official split lists, paired STAC items).

Why this module is long: one finder per layout, and STAC takes three quarters of it: catalogs are
walked without recursion and confined to their folder, and items are read both as MAPEX writes them
and as public catalogs publish them (asset keys, band objects, radiometry properties, pairing).

Two files for one band, modality or label of a scene are an error naming both, in every layout.

``auto`` detects the first four in the order stac, bigearthnet2, sen1floods11, bigearthnet,
scenes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mapex_core.data import bigearthnet
from mapex_core.data.labels import LabelSource, vector_classes
from mapex_core.data.scenes import ModalitySource, SceneList, SceneSpec
from mapex_core.modalities import MODALITIES

RASTER_EXTS = (".tif", ".tiff", ".jp2", ".vrt")
VECTOR_EXTS = (".gpkg", ".geojson", ".shp", ".fgb")
FLOOD_CLASSES = ["dry", "water"]


class LayoutError(ValueError):
    """The source does not match the layout; names the path and what is missing."""


def _rasters(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in RASTER_EXTS and p.is_file())


def _put(files: dict[str, Path], key: str, path: Path, what: str) -> None:
    """``files[key] = path``, or a :class:`LayoutError` naming both files when ``key`` has one already."""
    if key in files:
        raise LayoutError(f"{files[key]} and {path}: two files for {what}; keep one")
    files[key] = path


# ----- Sen1Floods11 -----------------------------------------------------------------------
_FLOOD = re.compile(r"^(?P<scene>.+)_(?P<kind>S1Hand|S2Hand|LabelHand)$")


def sen1floods11_scenes(root: Path, **_: object) -> list[SceneSpec]:
    """Sen1Floods11 hand-labelled chips; the spatial block is the region (e.g. ``Spain``)."""
    found: dict[str, dict[str, Path]] = {}
    for f in _rasters(root):
        m = _FLOOD.match(f.stem)
        if m:
            _put(found.setdefault(m["scene"], {}), m["kind"], f, f"{m['kind']} of chip {m['scene']}")
    if not found:
        raise LayoutError(f"{root}: no Sen1Floods11 chip (*_S1Hand.tif / *_S2Hand.tif) found")
    specs = []
    for scene, files in sorted(found.items()):
        sources = {}
        if "S2Hand" in files:
            sources["s2l1c"] = ModalitySource("s2l1c", [files["S2Hand"]])
        if "S1Hand" in files:
            sources["s1"] = ModalitySource("s1", [files["S1Hand"]])
        if not sources:
            raise LayoutError(f"{files['LabelHand']}: label chip without S1Hand or S2Hand imagery")
        labels = None
        if "LabelHand" in files:
            labels = LabelSource("mask", FLOOD_CLASSES, path=files["LabelHand"],
                                 value_to_class={0.0: 0, 1.0: 1})  # and -1: no label; others: errors
        specs.append(SceneSpec(name=scene, sources=sources, labels=labels, group=scene.split("_")[0]))
    return specs


# ----- folder of scenes -------------------------------------------------------------------
def _band_modality(bands: set[str]) -> str | None:
    """The sensor whose band names are exactly ``bands`` (e.g. 13 S2 bands -> ``s2l1c``)."""
    for name, spec in MODALITIES.items():
        if set(spec.band_names) == bands:
            return name
    return None


def folder_scenes(root: Path, labels: Path | None = None, label_attribute: str | None = None,
                  classes: list[str] | None = None, **_: object) -> list[SceneSpec]:
    """Scenes in a folder of rasters (see the module table).

    Args:
        root: the folder.
        labels: a vector file (GeoPackage, GeoJSON, ...) of polygons for every scene.
        label_attribute: the polygons' class column.
        classes: class names in id order (default: the attribute's sorted distinct values).
    """
    rasters = _rasters(root)
    if not rasters:
        raise LayoutError(f"{root}: empty folder (no raster file {', '.join(RASTER_EXTS)})")
    all_bands = {b for spec in MODALITIES.values() for b in spec.band_names}
    per_band: dict[str, dict[str, Path]] = {}
    multi: dict[str, dict[str, Path]] = {}
    mask_files: dict[str, Path] = {}
    for f in rasters:
        stem = f.stem
        if stem == "labels" or stem.endswith("_labels"):
            scene = f.parent.name if stem == "labels" else stem[: -len("_labels")]
            _put(mask_files, scene, f, f"the labels of scene {scene}")
            continue
        if stem in MODALITIES:  # <scene>/<modality>.tif
            _put(multi.setdefault(f.parent.name, {}), stem, f, f"modality {stem} of scene {f.parent.name}")
            continue
        scene, _, suffix = stem.rpartition("_")
        if scene and suffix in MODALITIES:
            _put(multi.setdefault(scene, {}), suffix, f, f"modality {suffix} of scene {scene}")
        elif scene and suffix in all_bands:
            _put(per_band.setdefault(scene, {}), suffix, f, f"band {suffix} of scene {scene}")
    scenes = sorted(set(per_band) | set(multi))
    if not scenes:
        raise LayoutError(f"{root}: no raster named after a modality ({', '.join(MODALITIES)}) or a band")
    vec_classes = None
    if labels is not None:
        if label_attribute is None:
            raise LayoutError(f"{labels}: vector labels need a class attribute (--label-attribute)")
        vec_classes = classes or vector_classes(labels, label_attribute)
    specs = []
    for scene in scenes:
        sources: dict[str, ModalitySource] = {}
        bands = per_band.get(scene, {})
        if bands:
            modality = _band_modality(set(bands))
            if modality is None:
                raise LayoutError(f"{root}: scene {scene} has bands {sorted(bands)}, which match no "
                                  f"sensor; known: {{{', '.join(f'{k}: {v.band_names}' for k, v in MODALITIES.items())}}}")
            names = MODALITIES[modality].band_names
            sources[modality] = ModalitySource(modality, [bands[b] for b in names])
        for modality, f in sorted(multi.get(scene, {}).items()):
            if modality in sources:
                raise LayoutError(f"{sources[modality].files[0]} and {f}: modality {modality} of scene {scene} "
                                  f"given twice (band files and a multi-band file); keep one")
            sources[modality] = ModalitySource(modality, [f])
        label_src = None
        if labels is not None:
            assert vec_classes is not None
            label_src = LabelSource("vector", vec_classes, path=labels, attribute=label_attribute)
        elif scene in mask_files:
            label_src = LabelSource("mask", classes or [], path=mask_files[scene])
            if not label_src.classes:
                raise LayoutError(f"{mask_files[scene]}: mask labels need class names (--classes)")
        specs.append(SceneSpec(name=scene, sources=sources, labels=label_src, group=scene))
    return specs


# ----- STAC -------------------------------------------------------------------------------
MAX_STAC_DEPTH = 32  # catalog nesting followed at most (real catalogs nest a few levels)
PAIR_DAYS = 7.0  # days between paired Sentinel-1 and Sentinel-2 items, at most (S1 revisits a place in 6-12 days)
PAIR_OVERLAP = 0.5  # share of the optical item's footprint the radar item's must cover, at least


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder)


def _stac_items(catalog_path: Path, allow_outside_paths: bool = False,
                max_depth: int = MAX_STAC_DEPTH) -> list[Path]:
    """The item files of a local STAC catalog, each catalog parsed once, without pystac's recursion.

    Follows ``child`` and ``item`` links from ``catalog_path``; a link back to a catalog on the way
    (a catalog that is its own child, two catalogs that are each other's child), a file reached by
    two paths, nesting deeper than ``max_depth``, a remote link, and (unless
    ``allow_outside_paths``) a link out of the catalog's folder are errors naming the catalog.

    Raises:
        LayoutError: as above, or an unreadable file (named).
    """
    folder = catalog_path.resolve().parent
    items: list[Path] = []
    seen: dict[Path, Path | None] = {}  # file -> the catalog that linked it

    def read(path: Path) -> dict:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise LayoutError(f"{path}: STAC file not found") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise LayoutError(f"{path}: not valid STAC JSON: {str(exc)[:200]}") from exc
        if not isinstance(doc, dict):
            raise LayoutError(f"{path}: not valid STAC JSON: a {type(doc).__name__}, not an object")
        return doc

    def walk(path: Path, chain: list[Path]) -> None:
        if len(chain) > max_depth:
            raise LayoutError(f"{chain[0]}: STAC catalogs nest deeper than {max_depth} levels (at {path})")
        doc = read(path)
        if doc.get("type") == "Feature":
            items.append(path)
            return
        links = doc.get("links", [])
        for link in links if isinstance(links, list) else []:
            if not isinstance(link, dict) or link.get("rel") not in ("child", "item"):
                continue
            href = str(link.get("href", ""))
            if href.startswith("file://"):
                href = href[len("file://"):]
            elif "://" in href:
                raise LayoutError(f"{path}: links to the remote STAC file {href}; only local catalogs are read")
            child = Path(os.path.normpath(path.parent / href))
            resolved = child.resolve()
            if resolved == path:
                raise LayoutError(f"{path}: STAC catalog is its own child (a link cycle)")
            if resolved in chain:
                loop = " -> ".join(str(p) for p in chain[chain.index(resolved):] + [resolved])
                raise LayoutError(f"{resolved}: STAC catalog links form a cycle: {loop}")
            if resolved in seen:
                raise LayoutError(f"{resolved}: reached twice in the STAC catalog (linked from {seen[resolved]} "
                                  f"and {path})")
            if not allow_outside_paths and not _inside(resolved, folder):
                raise LayoutError(f"{path}: links to {resolved}, outside the catalog's folder {folder} "
                                  f"(--allow-outside-paths, or data.allow_outside_paths, reads it)")
            seen[resolved] = path
            walk(resolved, chain + [resolved])

    root = catalog_path.resolve()
    seen[root] = None
    walk(root, [root])
    return items


def _band_lookup() -> dict[str, list[tuple[str, str]]]:
    """Lower-case asset key or band name -> the ``(modality, band)`` it can be: band names, the asset
    keys public catalogs use, and STAC common names that name one band of a sensor (``red``, ``nir08``,
    ``swir16``; not ``rededge``, which three Sentinel-2 bands share)."""
    table: dict[str, list[tuple[str, str]]] = {}
    for m, spec in MODALITIES.items():
        commons = [b.common_name for b in spec.bands if b.common_name]
        for b in spec.bands:
            keys = {b.name.lower(), *(a.lower() for a in b.aliases)}
            if b.common_name and commons.count(b.common_name) == 1:
                keys.add(b.common_name.lower())
            for k in sorted(keys):
                table.setdefault(k, []).append((m, b.name))
    return table


def _band_objects(asset: Any) -> list[dict[str, Any]]:
    """The band objects of an asset: STAC 1.1 ``bands``, else ``eo:bands``."""
    fields = asset.extra_fields
    for key in ("bands", "eo:bands"):
        if isinstance(fields.get(key), list):
            return [b for b in fields[key] if isinstance(b, dict)]
    return []


def _asset_candidates(key: str, asset: Any, lookup: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """What ``(modality, band)`` an asset can hold: by its key, else by its one band object's
    ``name`` or ``common_name`` / ``eo:common_name``."""
    found = list(lookup.get(key.lower(), []))
    if found:
        return found
    objects = _band_objects(asset)
    if len(objects) != 1:
        return []
    obj = objects[0]
    for name in (obj.get("name"), obj.get("common_name"), obj.get("eo:common_name")):
        if isinstance(name, str) and name.lower() in lookup:
            return list(lookup[name.lower()])
    return []


def _raster_fields(asset: Any) -> dict[str, Any]:
    """``offset``, ``scale`` and ``unit`` of an asset's (first) band: ``raster:bands`` (STAC 1.0) or
    ``bands`` with ``raster:``-prefixed or plain fields (STAC 1.1)."""
    fields = asset.extra_fields
    raster = fields.get("raster:bands")
    band = raster[0] if isinstance(raster, list) and raster and isinstance(raster[0], dict) else None
    if band is None:
        objects = _band_objects(asset)
        band = objects[0] if objects else {}
    out = {}
    for name in ("offset", "scale", "unit"):
        value = band.get(name, band.get(f"raster:{name}", fields.get(f"raster:{name}")))
        if value is not None:
            out[name] = value
    return out


def _local_asset(where: str, key: str, asset: Any, folder: Path, allow_outside_paths: bool) -> Path:
    """The local file of an asset the scene reads.

    Raises:
        LayoutError: a remote href, a missing file, or a file outside the catalog's folder.
    """
    href = asset.get_absolute_href() or asset.href
    if href.startswith("file://"):
        href = href[len("file://"):]
    elif "://" in href:
        raise LayoutError(f"{where}: asset {key!r} is remote ({href}); only local files are read (download the "
                          f"assets next to the catalog)")
    path = Path(href)
    if not path.is_file():
        raise LayoutError(f"{where}: asset {key!r} file {path} not found")
    if not allow_outside_paths and not _inside(path, folder):
        raise LayoutError(f"{where}: asset {key!r} file {path} is outside the catalog's folder {folder} "
                          f"(--allow-outside-paths, or data.allow_outside_paths, reads it)")
    return path


PRODUCT_METADATA_ASSETS = ("product_metadata", "product-metadata")  # Earth Search / Planetary Computer keys


def _mgrs_tile(props: dict[str, Any]) -> str | None:
    """The MGRS tile (``T33UUP``) of a Sentinel-2 item: ``s2:mgrs_tile``, or the ``mgrs`` extension."""
    if props.get("s2:mgrs_tile"):
        return f"T{str(props['s2:mgrs_tile']).removeprefix('T')}"
    parts = [props.get(k) for k in ("mgrs:utm_zone", "mgrs:latitude_band", "mgrs:grid_square")]
    if all(p is not None for p in parts):
        return f"T{int(parts[0]):02d}{parts[1]}{parts[2]}"
    return None


class _Found:
    """One item, read: its modalities, labels, what it says about radiometry, footprint and time."""

    def __init__(self, item: Any, spec: SceneSpec, geometry: Any, when: Any) -> None:
        self.item, self.spec, self.geometry, self.when = item, spec, geometry, when

    @property
    def modality(self) -> str | None:
        """Its one imagery modality, or ``None`` when it has several."""
        return next(iter(self.spec.sources)) if len(self.spec.sources) == 1 else None


def _read_item(item: Any, where: str, folder: Path, lookup: dict[str, list[tuple[str, str]]],
               classes: list[str] | None, label_attribute: str | None, allow_outside_paths: bool) -> SceneSpec:
    """The :class:`SceneSpec` of one item (see :func:`stac_scenes`)."""
    sources: dict[str, ModalitySource] = {}
    candidates: dict[str, list[tuple[str, str]]] = {}
    for key, asset in item.assets.items():
        if key in MODALITIES:
            sources[key] = ModalitySource(key, [_local_asset(where, key, asset, folder, allow_outside_paths)])
        elif key != "labels" and key not in PRODUCT_METADATA_ASSETS:
            found = _asset_candidates(key, asset, lookup)
            if found:
                candidates[key] = found
    extra: dict[str, str] = {}
    remaining = dict(candidates)
    while remaining:  # the largest sensor whose every band is there, then the next one from the other assets
        covered: dict[str, dict[str, str]] = {}  # modality -> band -> asset key
        for key, found in remaining.items():
            for m, band in found:
                if band in covered.setdefault(m, {}):
                    raise LayoutError(f"{where}: assets {covered[m][band]!r} and {key!r} are both band {band} of "
                                      f"{m}; keep one")
                covered[m][band] = key
        complete = [m for m in MODALITIES if len(covered.get(m, {})) == MODALITIES[m].num_bands]
        modality = max(complete, key=lambda m: MODALITIES[m].num_bands, default=None)  # s2l1c (13) over s2 (12)
        partial = max((m for m in covered if m not in complete), key=lambda m: len(covered[m]), default=None)
        if partial is not None and len(covered[partial]) > (MODALITIES[modality].num_bands if modality else 0):
            # most of a larger sensor's bands (an S2 item without one band is not an RGB scene)
            missing = [b for b in MODALITIES[partial].band_names if b not in covered[partial]]
            raise LayoutError(f"{where}: band assets {sorted(remaining)} match no sensor completely: they hold "
                              f"{len(covered[partial])} of the {MODALITIES[partial].num_bands} bands of {partial} "
                              f"(missing {', '.join(missing)})")
        if modality is None:
            if remaining == candidates:
                raise LayoutError(f"{where}: band assets {sorted(candidates)} match no sensor completely; known: "
                                  f"{{{', '.join(f'{k}: {v.band_names}' for k, v in MODALITIES.items())}}}")
            break  # assets that only look like bands of another sensor (a lone 'red'): not read
        if modality in sources:
            raise LayoutError(f"{where}: modality {modality} given twice (asset {modality!r} and band assets "
                              f"{sorted(covered[modality].values())}); keep one")
        keys = [covered[modality][b] for b in MODALITIES[modality].band_names]
        sources[modality] = ModalitySource(modality, [_local_asset(where, k, item.assets[k], folder,
                                                                   allow_outside_paths) for k in keys])
        offsets = {}
        for band, key in zip(MODALITIES[modality].band_names, keys, strict=True):
            f = _raster_fields(item.assets[key])
            if f.get("offset") and f.get("scale"):
                offsets[band] = -float(f["offset"]) / float(f["scale"])
            if f.get("unit"):
                extra[f"{modality}:stac:unit"] = str(f["unit"])
        if offsets:
            extra[f"{modality}:stac:raster_offsets"] = json.dumps(offsets, sort_keys=True)
        remaining = {k: v for k, v in remaining.items() if k not in keys}
    if not sources:
        raise LayoutError(f"{where}: no asset named after a modality ({', '.join(MODALITIES)}), a band or a band's "
                          f"common name")
    for m in sources:
        for key in PRODUCT_METADATA_ASSETS:
            if key in item.assets:
                extra[f"{m}:product_metadata"] = str(_local_asset(where, key, item.assets[key], folder,
                                                                  allow_outside_paths))
    props = item.properties
    if "s2:processing_baseline" in props:
        extra.update({f"{m}:stac:processing_baseline": str(props["s2:processing_baseline"]) for m in sources})
    if "earthsearch:boa_offset_applied" in props:
        extra.update({f"{m}:stac:boa_offset_applied": str(props["earthsearch:boa_offset_applied"]).lower()
                      for m in sources})
    extra.update({f"{m}:product": str(props.get("s2:product_uri") or item.id) for m in sources})
    label_src = None
    if "labels" in item.assets:
        lp = _local_asset(where, "labels", item.assets["labels"], folder, allow_outside_paths)
        if lp.suffix.lower() in VECTOR_EXTS:
            if label_attribute is None:
                raise LayoutError(f"{where}: vector labels need a class attribute (--label-attribute)")
            label_src = LabelSource("vector", classes or vector_classes(lp, label_attribute),
                                    path=lp, attribute=label_attribute)
        else:
            if not classes:
                raise LayoutError(f"{where}: mask labels need class names (--classes)")
            label_src = LabelSource("mask", classes, path=lp)
    time = item.datetime.isoformat() if item.datetime else ""
    return SceneSpec(name=item.id, sources=sources, labels=label_src, group=_mgrs_tile(props) or item.id, time=time,
                     extra=extra)


def _pair(found: list[_Found], pair_days: float, pair_overlap: float) -> tuple[list[SceneSpec], dict[str, Any]]:
    """Single-modality items paired into multi-modal scenes (see :func:`stac_scenes`)."""
    from shapely import STRtree

    kinds = {f.item.id: MODALITIES[f.modality].kind if f.modality else None for f in found}
    anchors = [f for f in found if kinds[f.item.id] == "optical" and f.geometry is not None and f.when is not None]
    partners = [f for f in found if kinds[f.item.id] == "sar" and f.spec.labels is None
                and f.geometry is not None and f.when is not None]
    if not anchors or not partners:
        return [f.spec for f in found], {}
    tree = STRtree([p.geometry for p in partners])
    used: set[str] = set()
    paired: dict[str, SceneSpec] = {}
    for a in anchors:
        best = None
        area = a.geometry.area
        for i in tree.query(a.geometry):
            p = partners[int(i)]
            days = abs((a.when - p.when).total_seconds()) / 86400
            if days > pair_days or not area:
                continue
            share = a.geometry.intersection(p.geometry).area / area
            if share < pair_overlap:
                continue
            key = (-share, days, p.item.id)
            if best is None or key < best[0]:
                best = (key, p)
        if best is None:
            continue
        p = best[1]
        used.add(p.item.id)
        paired[a.item.id] = SceneSpec(
            name=a.spec.name, sources={**a.spec.sources, **p.spec.sources}, labels=a.spec.labels,
            group=a.spec.group, time=a.spec.time,
            extra={**a.spec.extra, **p.spec.extra, "s1_item": p.item.id, "pair_overlap": f"{-best[0][0]:.4f}",
                   "pair_days": f"{best[0][1]:.4f}"})
    specs = [paired.get(f.item.id, f.spec) for f in found if f.item.id not in used]
    notes = {"pairs": len(paired), "unpaired_optical": len(anchors) - len(paired),
             "unpaired_sar": len(partners) - len(used), "pair_days": pair_days, "pair_overlap": pair_overlap}
    return specs, notes


def stac_scenes(root: Path, classes: list[str] | None = None, label_attribute: str | None = None,
                allow_outside_paths: bool = False, pair_days: float = PAIR_DAYS,
                pair_overlap: float = PAIR_OVERLAP, **_: object) -> SceneList:
    """Items of a local STAC catalog, as MAPEX writes them or as public catalogs publish them.

    An item's imagery is an asset keyed by a modality (multi-band), or one asset per band keyed by
    the band's name (``B04``, ``vv``: any case), the key public catalogs use (``red``, ``nir08``,
    ``swir16``, ``rededge1``) or described by one ``eo:bands`` / ``bands`` object (its ``name`` or
    common name); the sensor is the one whose every band is there (``s2l1c`` over ``s2`` when B10 is
    too). Other assets (thumbnails, ``visual``, ``scl``) are not read. ``labels`` is the labels asset.

    Items with one modality each (public catalogs: one item per sensor and acquisition) are paired:
    an optical item (Sentinel-2) takes the radar item (Sentinel-1) whose footprint covers at least
    ``pair_overlap`` of its own (areas in the items' lon/lat geometry) and whose time is at most
    ``pair_days`` away; the largest overlap wins, then the nearest time, then the smaller id. A radar
    item may pair with several optical items; items left unpaired stay scenes of their own. A paired
    scene has the optical item's id, time and labels.

    What the items say about radiometry (``s2:processing_baseline``, ``s2:product_uri``,
    ``earthsearch:boa_offset_applied``, ``raster:bands`` offset/scale and unit, a
    ``product_metadata`` asset) goes to :attr:`SceneSpec.extra` for
    :mod:`mapex_core.data.radiometry`; the spatial block is the MGRS tile when the item names it.

    Args:
        root: the catalog (``catalog.json``) or its folder.
        classes: class names of mask labels (optional for vector labels).
        label_attribute: the class column of vector labels.
        allow_outside_paths: read assets (and follow links) outside the catalog's folder; by
            default a catalog can only make ingestion read files under its own folder.
        pair_days: the most days between paired items (``data.stac_pair_days``).
        pair_overlap: the least share of the optical footprint the radar footprint covers
            (``data.stac_pair_overlap``).

    Raises:
        LayoutError: link cycles, too deep nesting, files outside the catalog's folder, remote,
            missing or unreadable files, items without imagery (each names the catalog or the file).
    """
    import pystac
    from pystac.errors import STACError
    from shapely.geometry import shape

    catalog_path = root / "catalog.json" if root.is_dir() else root
    item_files = _stac_items(catalog_path, allow_outside_paths)
    folder = catalog_path.resolve().parent
    try:
        pystac.Catalog.from_file(str(catalog_path))
    except (OSError, json.JSONDecodeError, STACError, KeyError, TypeError, ValueError) as exc:
        raise LayoutError(f"{catalog_path}: not a readable STAC catalog: {exc}") from exc
    items = []
    for f in item_files:
        try:
            items.append(pystac.Item.from_file(str(f)))
        except (OSError, json.JSONDecodeError, STACError, KeyError, TypeError, ValueError) as exc:
            raise LayoutError(f"{f}: not a readable STAC item: {exc}") from exc
    if not items:
        raise LayoutError(f"{catalog_path}: STAC catalog has no item")
    by_id: dict[str, Path] = {}
    for item, f in zip(items, item_files, strict=True):
        if item.id in by_id:
            raise LayoutError(f"{by_id[item.id]} and {f}: two STAC items with the id {item.id!r}")
        by_id[item.id] = f
    items.sort(key=lambda i: i.id)
    lookup = _band_lookup()
    found = []
    for item in items:
        where = f"{catalog_path} item {item.id!r}"
        spec = _read_item(item, where, folder, lookup, classes, label_attribute, allow_outside_paths)
        geometry = None
        if item.geometry:
            try:
                geometry = shape(item.geometry)
                geometry = geometry if geometry.is_valid else geometry.buffer(0)
            except (ValueError, TypeError, AttributeError) as exc:
                raise LayoutError(f"{by_id[item.id]}: item {item.id!r} has an unreadable geometry: {exc}") from exc
        when = item.datetime or item.common_metadata.start_datetime
        found.append(_Found(item, spec, geometry, when))
    specs, notes = _pair(found, pair_days, pair_overlap)
    return SceneList(specs, notes)


# ----- registry ---------------------------------------------------------------------------
LAYOUTS: dict[str, Callable[..., list[SceneSpec]]] = {
    "bigearthnet": lambda root, split_lists=None, **_: bigearthnet.v1_scenes(root, split_lists),
    "bigearthnet2": lambda root, **_: bigearthnet.v2_scenes(root),
    "sen1floods11": sen1floods11_scenes,
    "scenes": folder_scenes,
    "stac": stac_scenes,
}


def detect_layout(source: Path) -> str:
    """Name the layout of ``source``.

    Raises:
        LayoutError: nothing matches (empty folder, or no known layout).
    """
    if source.is_file():
        if source.suffix.lower() == ".json":
            return "stac"
        raise LayoutError(f"{source}: a file source must be a STAC catalog (.json)")
    if not source.is_dir():
        raise LayoutError(f"{source}: source not found")
    if (source / "catalog.json").is_file():
        return "stac"
    if (source / "metadata.parquet").is_file() and (source / "BigEarthNet-S2").is_dir():
        return "bigearthnet2"
    rasters = _rasters(source)
    if not rasters:
        raise LayoutError(f"{source}: empty folder (no raster file {', '.join(RASTER_EXTS)})")
    if any(_FLOOD.match(f.stem) for f in rasters):
        return "sen1floods11"
    if any(f.name.endswith("_B02.tif") for f in rasters) and next(source.rglob("*_labels_metadata.json"), None):
        return "bigearthnet"
    return "scenes"


def find_scenes(source: str | Path, layout: str = "auto", **options: object) -> tuple[str, list[SceneSpec]]:
    """Detect (when ``auto``) the layout and list the scenes.

    Returns:
        ``(layout, scenes)``.
    """
    src = Path(source)
    if layout != "auto" and layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}")
    if not src.exists():
        raise LayoutError(f"{src}: source not found")
    name = detect_layout(src) if layout == "auto" else layout
    return name, LAYOUTS[name](src, **options)

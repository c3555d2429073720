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
                   modality (multi-band) or band name, optional ``labels`` asset; links are
                   followed without recursion into pystac (cycles and nesting deeper than
                   :data:`MAX_STAC_DEPTH` are errors), and assets and linked files must lie
                   under the catalog's folder unless ``allow_outside_paths``
=================  ===========================================================================

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

from mapex_core.data import bigearthnet
from mapex_core.data.labels import LabelSource, vector_classes
from mapex_core.data.scenes import ModalitySource, SceneSpec
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


def stac_scenes(root: Path, classes: list[str] | None = None, label_attribute: str | None = None,
                allow_outside_paths: bool = False, **_: object) -> list[SceneSpec]:
    """Items of a local STAC catalog; asset keys name a modality or a band, ``labels`` the labels.

    Args:
        root: the catalog (``catalog.json``) or its folder.
        classes: class names of mask labels (optional for vector labels).
        label_attribute: the class column of vector labels.
        allow_outside_paths: read assets (and follow links) outside the catalog's folder; by
            default a catalog can only make ingestion read files under its own folder.

    Raises:
        LayoutError: link cycles, too deep nesting, files outside the catalog's folder, missing or
            unreadable files, items without imagery (each names the catalog or the file).
    """
    import pystac
    from pystac.errors import STACError

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
    all_bands = {b: m for m, spec in MODALITIES.items() for b in spec.band_names}
    specs = []
    for item in items:
        where = f"{catalog_path} item {item.id!r}"
        hrefs = {}
        for key, asset in item.assets.items():
            path = Path(asset.get_absolute_href() or asset.href)
            if not path.is_file():
                raise LayoutError(f"{where}: asset {key!r} file {path} not found")
            if not allow_outside_paths and not _inside(path, folder):
                raise LayoutError(f"{where}: asset {key!r} file {path} is outside the catalog's folder {folder} "
                                  f"(--allow-outside-paths, or data.allow_outside_paths, reads it)")
            hrefs[key] = path
        sources: dict[str, ModalitySource] = {}
        band_assets: dict[str, dict[str, Path]] = {}
        for key, path in hrefs.items():
            if key in MODALITIES:
                sources[key] = ModalitySource(key, [path])
            elif key in all_bands:
                band_assets.setdefault("bands", {})[key] = path
        if band_assets:
            bands = band_assets["bands"]
            modality = _band_modality(set(bands))
            if modality is None:
                raise LayoutError(f"{where}: band assets {sorted(bands)} match no sensor")
            if modality in sources:
                raise LayoutError(f"{where}: modality {modality} given twice (asset {modality!r} and band assets "
                                  f"{sorted(bands)}); keep one")
            sources[modality] = ModalitySource(modality, [bands[b] for b in MODALITIES[modality].band_names])
        if not sources:
            raise LayoutError(f"{where}: no asset named after a modality ({', '.join(MODALITIES)}) or a band")
        label_src = None
        if "labels" in hrefs:
            lp = hrefs["labels"]
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
        specs.append(SceneSpec(name=item.id, sources=sources, labels=label_src, group=item.id, time=time))
    return specs


# ----- registry ---------------------------------------------------------------------------
LAYOUTS: dict[str, Callable[..., list[SceneSpec]]] = {
    "bigearthnet": lambda root, **_: bigearthnet.v1_scenes(root),
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

"""BigEarthNet layouts (v1 and v2) and the 19-class nomenclature.

A BigEarthNet patch is 1.2 km x 1.2 km, one GeoTIFF per band. Sentinel-2 L2A bands come on
three native grids (10, 20 and 60 m: 120, 60 and 20 px) and are resampled onto the 10 m grid
(bilinear, by :func:`~mapex_core.data.scenes.load_scene`); Sentinel-1 VV and VH (dB) land on the
same grid.

* **v1**: ``BigEarthNet-S1-.../<S1 patch>/`` and ``BigEarthNet-S2-.../<S2 patch>/`` folders;
  each ``*_labels_metadata.json`` holds CORINE level-3 names (43 classes, mapped here to the 19
  classes) and the S1 json names its S2 patch (``corresponding_s2_patch``).
* **v2** (reBEN): ``BigEarthNet-S2/<tile>/<patch>/``, ``BigEarthNet-S1/<product>/<patch>/`` and
  ``metadata.parquet`` with ``patch_id``, ``labels`` (19-class names), ``split`` and
  ``s1_name``.

Spatial blocks for the split are Sentinel-2 tiles: patches of one tile never straddle splits.

**Official v1 splits.** When the official lists are given, v1 uses them instead of the hashed
tile split, so that results compare with published ones: ``train.csv``, ``val.csv`` and
``test.csv`` (one patch name per line, or ``S2 name,S1 name`` rows as BigEarthNet-MM ships them),
and the exclusion lists ``patches_with_cloud_and_shadow.csv`` and
``patches_with_seasonal_snow.csv`` (optional). They are looked for in ``data.split_lists``
(``--split-lists DIR``) when set, else in the source folder, else in its ``splits/`` folder.
Excluded patches and patches no split list names are left out (counted in the ingestion
summary's ``layout_notes``).

**Radiometry.** A v1 S2 patch comes from the L1C product named in its json's ``tile_source``
(``..._N0205_...``): that product name is passed on (``extra``) for the processing-baseline rule of
:mod:`mapex_core.data.radiometry`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from mapex_core.data.labels import LabelSource
from mapex_core.data.sample import Sample
from mapex_core.data.scenes import ModalitySource, SceneList, SceneSpec, load_scene
from mapex_core.modalities import get_modality

_TILE = re.compile(r"_T(\d{2}[A-Z]{3})_")

# The 19-class nomenclature, in the order of the BigEarthNet-19 publication.
BEN19_CLASSES: tuple[str, ...] = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)

# CORINE level-3 name (as written in BigEarthNet v1 json) -> 19-class name, None = dropped.
BEN43_TO_19: dict[str, str | None] = {
    "Continuous urban fabric": "Urban fabric",
    "Discontinuous urban fabric": "Urban fabric",
    "Industrial or commercial units": "Industrial or commercial units",
    "Road and rail networks and associated land": None,
    "Port areas": None,
    "Airports": None,
    "Mineral extraction sites": None,
    "Dump sites": None,
    "Construction sites": None,
    "Green urban areas": None,
    "Sport and leisure facilities": None,
    "Non-irrigated arable land": "Arable land",
    "Permanently irrigated land": "Arable land",
    "Rice fields": "Arable land",
    "Vineyards": "Permanent crops",
    "Fruit trees and berry plantations": "Permanent crops",
    "Olive groves": "Permanent crops",
    "Pastures": "Pastures",
    "Annual crops associated with permanent crops": "Permanent crops",
    "Complex cultivation patterns": "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation": (
        "Land principally occupied by agriculture, with significant areas of natural vegetation"
    ),
    "Agro-forestry areas": "Agro-forestry areas",
    "Broad-leaved forest": "Broad-leaved forest",
    "Coniferous forest": "Coniferous forest",
    "Mixed forest": "Mixed forest",
    "Natural grassland": "Natural grassland and sparsely vegetated areas",
    "Moors and heathland": "Moors, heathland and sclerophyllous vegetation",
    "Sclerophyllous vegetation": "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland/shrub": "Transitional woodland, shrub",
    "Beaches, dunes, sands": "Beaches, dunes, sands",
    "Bare rock": None,
    "Sparsely vegetated areas": "Natural grassland and sparsely vegetated areas",
    "Burnt areas": None,
    "Inland marshes": "Inland wetlands",
    "Peatbogs": "Inland wetlands",
    "Salt marshes": "Coastal wetlands",
    "Salines": "Coastal wetlands",
    "Intertidal flats": None,
    "Water courses": "Inland waters",
    "Water bodies": "Inland waters",
    "Coastal lagoons": "Marine waters",
    "Estuaries": "Marine waters",
    "Sea and ocean": "Marine waters",
}


def labels_to_multihot(names: list[str], source: str = "labels") -> np.ndarray:
    """Map CORINE level-3 names to a 19-class multi-hot vector ``(19,) uint8``.

    Raises:
        ValueError: a name is not a BigEarthNet class (names ``source`` and the name).
    """
    out = np.zeros(len(BEN19_CLASSES), dtype=np.uint8)
    for name in names:
        if name in BEN43_TO_19:
            new = BEN43_TO_19[name]
        elif name in BEN19_CLASSES:  # already in the 19-class nomenclature
            new = name
        else:
            raise ValueError(f"{source}: {name!r} is not a BigEarthNet (43- or 19-class) label")
        if new is not None:
            out[BEN19_CLASSES.index(new)] = 1
    return out


def _band_files(folder: Path, modality: str) -> list[Path]:
    """One file per band of ``modality`` in a patch folder.

    Raises:
        FileNotFoundError: a band has no file.
        ValueError: a band has two files (names both).
    """
    files = []
    for band in get_modality(modality).band_names:
        matches = sorted(folder.glob(f"*_{band}.tif"))
        if not matches:
            raise FileNotFoundError(f"{folder}: band file *_{band}.tif not found")
        if len(matches) > 1:
            raise ValueError(f"{matches[0]} and {matches[1]}: two files for band {band} in one patch folder; "
                             f"keep one")
        files.append(matches[0])
    return files


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read labels metadata json: {exc}") from exc


def _tile(text: str, default: str) -> str:
    m = _TILE.search(text)
    return f"T{m.group(1)}" if m else default


def find_pairs(root: str | Path) -> list[tuple[Path | None, Path]]:
    """Find BigEarthNet v1 patches under ``root``: ``(s1_folder or None, s2_folder)`` pairs.

    S1 folders name their S2 patch in ``*_labels_metadata.json``
    (``corresponding_s2_patch``); S2 folders without an S1 partner are returned alone.

    Raises:
        FileNotFoundError: ``root`` holds no BigEarthNet patch, or an S1 json names an S2
            patch that is not there.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    s2_dirs = {p.parent.name: p.parent for p in sorted(root.rglob("*_B02.tif"))}
    s1_dirs = sorted({p.parent for p in root.rglob("*_VV.tif")})
    pairs: list[tuple[Path | None, Path]] = []
    paired: set[str] = set()
    for s1 in s1_dirs:
        metas = sorted(s1.glob("*_labels_metadata.json"))
        if not metas:
            raise FileNotFoundError(f"{s1}: no *_labels_metadata.json naming its S2 patch")
        s2_name = _read_json(metas[0]).get("corresponding_s2_patch")
        if not s2_name or s2_name not in s2_dirs:
            raise FileNotFoundError(
                f"{metas[0]}: corresponding S2 patch {s2_name!r} not found under {root}"
            )
        pairs.append((s1, s2_dirs[s2_name]))
        paired.add(s2_name)
    pairs.extend((None, d) for n, d in s2_dirs.items() if n not in paired)
    if not pairs:
        raise FileNotFoundError(f"{root}: no BigEarthNet v1 patch (no *_B02.tif) found")
    return pairs


def pair_spec(s1_dir: Path | None, s2_dir: Path) -> SceneSpec:
    """The :class:`SceneSpec` of one BigEarthNet v1 patch (S2, and S1 when given)."""
    sources = {"s2": ModalitySource("s2", _band_files(s2_dir, "s2"))}
    if s1_dir is not None:
        sources["s1"] = ModalitySource("s1", _band_files(s1_dir, "s1"))
    metas = sorted(s2_dir.glob("*_labels_metadata.json"))
    if not metas and s1_dir is not None:
        metas = sorted(s1_dir.glob("*_labels_metadata.json"))
    meta = _read_json(metas[0]) if metas else {}
    labels = None
    if "labels" in meta:
        labels = LabelSource("multilabel", list(BEN19_CLASSES),
                             multihot=labels_to_multihot(list(meta["labels"]), source=str(metas[0])))
    time = str(meta.get("acquisition_date", meta.get("acquisition_time", ""))).replace(" ", "T")
    group = _tile(str(meta.get("tile_source", "")), s2_dir.name)
    extra = {"s2:product": str(meta["tile_source"])} if meta.get("tile_source") else {}
    return SceneSpec(name=s2_dir.name, sources=sources, labels=labels, group=group, time=time, extra=extra)


SPLIT_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
EXCLUSION_FILES = ("patches_with_cloud_and_shadow.csv", "patches_with_seasonal_snow.csv")


def find_split_lists(root: str | Path, folder: str | Path | None = None) -> Path | None:
    """The folder of the official split lists: ``folder`` when given, else ``root`` or ``root/splits``
    when it holds ``train.csv``; ``None`` when there are none (the hashed tile split applies).

    Raises:
        FileNotFoundError: a given ``folder`` without all three lists, or a found folder that lacks one
            (names the folder and the missing files).
    """
    candidates = [Path(folder)] if folder is not None else [Path(root), Path(root) / "splits"]
    for cand in candidates:
        present = [n for n in SPLIT_FILES.values() if (cand / n).is_file()]
        if folder is None and "train.csv" not in present:
            continue
        missing = [n for n in SPLIT_FILES.values() if n not in present]
        if missing:
            raise FileNotFoundError(f"{cand}: BigEarthNet split list(s) {', '.join(missing)} not found (the official "
                                    f"splits need {', '.join(SPLIT_FILES.values())})")
        return cand
    return None


def _list_names(path: Path) -> list[str]:
    """Every comma-separated field of a list file (a header or an unknown name matches no patch)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the BigEarthNet list: {exc}") from exc
    return [f.strip().strip('"') for line in text.splitlines() for f in line.split(",") if f.strip()]


def read_split_lists(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``(patch -> split, patch -> exclusion list file)`` of the official lists in ``folder``.

    Raises:
        ValueError: a patch in two split lists (names both files).
    """
    split: dict[str, str] = {}
    where: dict[str, Path] = {}
    for name, file in SPLIT_FILES.items():
        path = folder / file
        for patch in _list_names(path):
            if patch in split and split[patch] != name:
                raise ValueError(f"{where[patch]} and {path}: patch {patch} is in two split lists")
            split[patch], where[patch] = name, path
    excluded = {patch: file for file in EXCLUSION_FILES if (folder / file).is_file()
                for patch in _list_names(folder / file)}
    return split, excluded


def v1_scenes(root: str | Path, split_lists: str | Path | None = None) -> SceneList:
    """Every BigEarthNet v1 patch under ``root``; with the official split lists (see the module
    docstring), the listed ones with their split, excluded patches left out.

    Raises:
        FileNotFoundError / ValueError: missing patches or lists, unreadable lists (named); lists that
            name none of the patches.
    """
    pairs = find_pairs(root)
    specs = [pair_spec(s1, s2) for s1, s2 in pairs]
    folder = find_split_lists(root, split_lists)
    if folder is None:
        return SceneList(specs)
    split, excluded = read_split_lists(folder)
    kept: list[SceneSpec] = []
    dropped: dict[str, int] = {}
    unlisted = 0
    for spec, (s1, s2) in zip(specs, pairs, strict=True):
        names = [s2.name] + ([s1.name] if s1 is not None else [])
        why = next((excluded[n] for n in names if n in excluded), None)
        if why is not None:
            dropped[why] = dropped.get(why, 0) + 1
            continue
        chosen = next((split[n] for n in names if n in split), None)
        if chosen is None:
            unlisted += 1
            continue
        spec.split = chosen
        kept.append(spec)
    if not kept:
        raise ValueError(f"{folder}: the BigEarthNet split lists name none of the {len(specs)} patches under {root} "
                         f"(excluded: {sum(dropped.values())}, not listed: {unlisted})")
    counts = {k: sum(1 for s in kept if s.split == k) for k in SPLIT_FILES}
    return SceneList(kept, {"split_lists": str(folder), "splits": counts, "excluded": dropped,
                            "not_in_split_lists": unlisted})


def read_pair(s1_dir: Path | None, s2_dir: Path) -> Sample:
    """Read one BigEarthNet v1 patch (S2, and S1 when given) onto the S2 10 m grid."""
    return load_scene(pair_spec(s1_dir, s2_dir))


V2_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def v2_scenes(root: str | Path) -> list[SceneSpec]:
    """Every patch listed in a BigEarthNet v2 ``metadata.parquet`` under ``root``.

    Raises:
        ValueError: unreadable metadata or missing columns (names the file).
        FileNotFoundError: a listed patch folder is missing.
    """
    import pandas as pd

    root = Path(root)
    meta_path = root / "metadata.parquet"
    try:
        meta = pd.read_parquet(meta_path)
    except Exception as exc:  # pyarrow raises several types
        raise ValueError(f"{meta_path}: cannot read BigEarthNet v2 metadata: {exc}") from exc
    missing = {"patch_id", "labels"} - set(meta.columns)
    if missing:
        raise ValueError(f"{meta_path}: missing column(s) {sorted(missing)}; has {list(meta.columns)}")
    s2_dirs = {p.name: p for p in (root / "BigEarthNet-S2").glob("*/*") if p.is_dir()}
    s1_dirs = {p.name: p for p in (root / "BigEarthNet-S1").glob("*/*") if p.is_dir()}
    specs = []
    for row in meta.sort_values("patch_id").itertuples(index=False):
        pid = str(row.patch_id)
        if pid not in s2_dirs:
            raise FileNotFoundError(f"{root / 'BigEarthNet-S2'}: patch folder {pid} listed in {meta_path} not found")
        sources = {"s2": ModalitySource("s2", _band_files(s2_dirs[pid], "s2"))}
        s1_name = str(getattr(row, "s1_name", "") or "")
        if s1_name:
            if s1_name not in s1_dirs:
                raise FileNotFoundError(f"{root / 'BigEarthNet-S1'}: S1 patch {s1_name} of {pid} not found")
            sources["s1"] = ModalitySource("s1", _band_files(s1_dirs[s1_name], "s1"))
        names = [str(n) for n in row.labels]
        split = V2_SPLITS.get(str(getattr(row, "split", "")))
        specs.append(SceneSpec(
            name=pid, sources=sources, group=_tile(pid, pid), split=split,
            labels=LabelSource("multilabel", list(BEN19_CLASSES),
                               multihot=labels_to_multihot(names, source=f"{meta_path} [{pid}]")),
        ))
    if not specs:
        raise ValueError(f"{meta_path}: lists no patch")
    return specs

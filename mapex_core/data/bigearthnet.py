"""BigEarthNet v1 reader: per-band GeoTIFFs, S1 folders paired to S2 folders through the json.

A BigEarthNet v1 patch is 1.2 km x 1.2 km. Sentinel-2 L2A bands come on three native grids
(10, 20 and 60 m: 120, 60 and 20 px); every band is resampled onto the 10 m grid of B02
(bilinear). Sentinel-1 VV and VH (dB) are reprojected onto that same grid. Labels are CORINE
level-3 names (43 classes), mapped to the 19-class BigEarthNet nomenclature.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mapex_core.data.raster import read_band_stack
from mapex_core.data.sample import Sample
from mapex_core.modalities import get_modality

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


def _band_file(folder: Path, band: str) -> Path:
    matches = sorted(folder.glob(f"*_{band}.tif"))
    if not matches:
        raise FileNotFoundError(f"{folder}: band file *_{band}.tif not found")
    return matches[0]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read labels metadata json: {exc}") from exc


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


def read_pair(s1_dir: Path | None, s2_dir: Path) -> Sample:
    """Read one BigEarthNet v1 patch (S2, and S1 when given) onto the S2 10 m grid."""
    s2 = get_modality("s2")
    s2_files = [_band_file(s2_dir, b) for b in s2.band_names]
    s2_arr, grid = read_band_stack(s2_files, reference=s2_files[s2.band_names.index("B02")])
    arrays = {"s2": s2_arr}
    sources = {"s2": str(s2_dir)}
    meta_files = sorted(s2_dir.glob("*_labels_metadata.json"))
    meta = _read_json(meta_files[0]) if meta_files else {}
    if s1_dir is not None:
        s1 = get_modality("s1")
        s1_files = [_band_file(s1_dir, b) for b in s1.band_names]
        arrays["s1"], _ = read_band_stack(s1_files, reference=grid)
        sources["s1"] = str(s1_dir)
        if not meta:
            meta = _read_json(sorted(s1_dir.glob("*_labels_metadata.json"))[0])
    labels = None
    if "labels" in meta:
        labels = labels_to_multihot(list(meta["labels"]), source=str(meta_files[0] if meta_files else s1_dir))
    time = str(meta.get("acquisition_date", meta.get("acquisition_time", ""))).replace(" ", "T")
    return Sample(name=s2_dir.name, arrays=arrays, grid=grid, labels=labels, time=time, sources=sources)


def iter_samples(root: str | Path) -> Iterator[Sample]:
    """Read every BigEarthNet v1 patch under ``root``, one at a time."""
    for s1, s2 in find_pairs(root):
        yield read_pair(s1, s2)

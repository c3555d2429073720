"""Ingestion: turn a folder of imagery in a known layout into a chip store.

This first version knows the BigEarthNet v1 layout; the ingestion issue adds more layouts,
validation and quarantine on the same entry point.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mapex_core.data import bigearthnet
from mapex_core.data.chips import ChipWriter

LAYOUTS = ("auto", "bigearthnet")


@dataclass
class DataParams:
    """The ``data`` section of ``params.yaml``."""

    chip_size: int = 64
    stride: int | None = None
    seed: int = 0


def detect_layout(source: Path) -> str:
    """Name the layout of ``source``.

    Raises:
        ValueError: no known layout matches (names the folder and the layouts tried).
    """
    if source.is_dir() and next(source.rglob("*_B02.tif"), None) is not None:
        return "bigearthnet"
    raise ValueError(f"{source}: no known layout detected (tried: {', '.join(LAYOUTS[1:])})")


def ingest(
    source: str | Path,
    out: str | Path,
    layout: str = "auto",
    chip_size: int = 64,
    stride: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Read every sample under ``source`` and write the chip store ``out``.

    Args:
        source: folder of imagery.
        out: chip store path (written atomically; replaced when it exists).
        layout: ``auto`` or a named layout.
        chip_size: chip height/width in pixels.
        stride: chip stride (defaults to ``chip_size``).
        seed: seed of the spatially blocked split.
        progress: callback ``(done, total, sample_name)``.

    Returns:
        Summary: samples, chips, per-modality chip counts, seconds.
    """
    t0 = time.perf_counter()
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{src}: source not found")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    layout = detect_layout(src) if layout == "auto" else layout
    pairs = bigearthnet.find_pairs(src)
    modalities = ["s1", "s2"] if any(s1 is not None for s1, _ in pairs) else ["s2"]
    counts = dict.fromkeys(modalities, 0)
    with ChipWriter(out, modalities, chip_size, class_names=list(bigearthnet.BEN19_CLASSES),
                    seed=seed, attrs={"layout": layout, "source": src.name}) as writer:
        for i, (s1, s2) in enumerate(pairs):
            sample = bigearthnet.read_pair(s1, s2)
            n = writer.add_sample(sample, stride=stride)
            for m in sample.arrays:
                counts[m] += n
            if progress is not None:
                progress(i + 1, len(pairs), sample.name)
    return {
        "out": str(out),
        "layout": layout,
        "samples": len(pairs),
        "chips": writer.n_chips,
        "chips_per_modality": counts,
        "chip_size": chip_size,
        "seconds": round(time.perf_counter() - t0, 3),
    }

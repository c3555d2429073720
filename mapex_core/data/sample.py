"""`Sample`: one co-registered multi-modal sample on a common grid, before chipping."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mapex_core.data.raster import Grid


@dataclass
class Sample:
    """One co-registered multi-modal sample on a common grid.

    Attributes:
        name: sample identifier.
        arrays: modality -> ``(C, H, W) float32`` physical values; nodata as NaN.
        grid: the reference grid (CRS, transform, shape).
        labels: multi-hot ``(K,) uint8``, a class id, a mask ``(H, W)`` on the grid, or ``None``.
        time: acquisition time (ISO 8601) of the reference modality.
        sources: modality -> source folder.
    """

    name: str
    arrays: dict[str, np.ndarray]
    grid: Grid
    labels: np.ndarray | None = None
    time: str = ""
    sources: dict[str, str] = field(default_factory=dict)

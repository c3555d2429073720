"""Per-band statistics of a chip store: the normalisation every model trained on it uses.

Computed in one streaming pass at ingestion (:class:`BandStats`: count, sum, sum of squares and a
histogram per band, so memory does not depend on the number of chips), from the finite pixels of
the train split only, and only of chips that passed validation (a quarantined chip's pixels are
taken out again when the store is closed) (no leakage of validation or test pixels into the normalisation; an infinite
value in a raster is left out, not averaged into every pixel's normalisation). Several stores pool
their statistics by pixel counts (:func:`pooled_normalization`). A store whose statistics are not
finite (written by an older version) is refused when opened (:func:`check_statistics`).

Where the pixels are read elsewhere (a Dask worker), :meth:`BandStats.measure` gives their
:class:`StatPart` and the writer adds the parts in scene order: the float64 sums are the same, bit
for bit, as a single process's. A store keeps its running sums (:meth:`BandStats.state`), so chips
appended later continue them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

HIST_BINS = 4096


@dataclass
class StatPart:
    """What one array adds to :class:`BandStats`: per band the count, sum and sum of squares of its finite
    pixels (float64, ``(C,)``) and their histogram (``(C, HIST_BINS)`` int64).

    Computed where the pixels are (a Dask worker) and added where the statistics are kept, in a fixed
    order: the float sums come out the same, to the last bit, as adding the pixels there.
    """

    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray
    hist: np.ndarray


class BandStats:
    """Streaming per-band count, mean, std and histogram-based 1st/99th percentiles."""

    def __init__(self, n_bands: int, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi
        self.count = np.zeros(n_bands, np.float64)
        self.total = np.zeros(n_bands, np.float64)
        self.total_sq = np.zeros(n_bands, np.float64)
        self.hist = np.zeros((n_bands, HIST_BINS), np.int64)

    def measure(self, x: np.ndarray) -> StatPart:
        """The contribution of the pixels of ``x`` ``(C, H, W)`` (non-finite pixels skipped), not yet added."""
        scale = HIST_BINS / (self.hi - self.lo)
        n = x.shape[0]
        part = StatPart(np.zeros(n), np.zeros(n), np.zeros(n), np.zeros((n, HIST_BINS), np.int64))
        for c in range(n):
            v = x[c][np.isfinite(x[c])].astype(np.float64)  # valid pixels of band c: no NaN, no inf
            idx = ((v - self.lo) * scale).astype(np.int64)
            np.clip(idx, 0, HIST_BINS - 1, out=idx)
            # numpy's pairwise sums, not np.dot: BLAS's dot rounds differently with the array's memory
            # alignment, so a Dask worker's sum of squares could differ from this process's in the last bit
            part.count[c], part.total[c], part.total_sq[c] = v.size, v.sum(), np.square(v).sum()
            part.hist[c] = np.bincount(idx, minlength=HIST_BINS)
        return part

    def add(self, part: StatPart, sign: int = 1, hist: bool = True) -> None:
        """Add a measured part (``sign=-1`` takes it out again); ``hist=False`` leaves the histogram (integer
        counts: added in any order, e.g. summed per scene first)."""
        self.count += sign * part.count
        self.total += sign * part.total
        self.total_sq += sign * part.total_sq
        if hist:
            self.hist += sign * part.hist

    def update(self, x: np.ndarray, also: BandStats | None = None, sign: int = 1) -> None:
        """Add the pixels of ``x`` ``(C, H, W)``; non-finite pixels are skipped. ``also`` (statistics
        of the same sensor) gets the same pixels without computing them twice. ``sign=-1`` takes
        pixels added before out again (a chip that failed validation)."""
        part = self.measure(x)
        for stats in (self, also) if also is not None else (self,):
            stats.add(part, sign)

    def state(self) -> dict[str, np.ndarray]:
        """The running sums (what :meth:`from_state` continues from: a store that is appended to)."""
        return {"count": self.count, "sum": self.total, "sum_sq": self.total_sq, "hist": self.hist}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], lo: float, hi: float) -> BandStats:
        """Statistics that continue the running sums ``state`` (from :meth:`state`)."""
        stats = cls(len(state["count"]), lo, hi)
        stats.count, stats.total = np.array(state["count"], np.float64), np.array(state["sum"], np.float64)
        stats.total_sq, stats.hist = np.array(state["sum_sq"], np.float64), np.array(state["hist"], np.int64)
        return stats

    def finish(self) -> dict[str, np.ndarray]:
        n = np.maximum(self.count, 1)
        mean = self.total / n
        std = np.sqrt(np.maximum(self.total_sq / n - mean**2, 0.0))
        std = np.where(std > 1e-6, std, 1.0)
        cdf = np.cumsum(self.hist, 1) / np.maximum(self.hist.sum(1, keepdims=True), 1)
        width = (self.hi - self.lo) / HIST_BINS

        def pct(q: float) -> np.ndarray:
            return self.lo + (np.argmax(cdf >= q, axis=1) + 0.5) * width

        return {"mean": mean, "std": std, "p01": pct(0.01), "p99": pct(0.99), "count": self.count}

def pooled_normalization(stores: list[Any]) -> dict[str, dict[str, list[float]]]:
    """Per-band mean and std over several opened chip stores (pooled by pixel counts), per modality."""
    out: dict[str, dict[str, list[float]]] = {}
    mods = sorted({m for s in stores for m in s.modalities})
    for m in mods:
        parts = [(s.ds[f"{m}_count"].values, s.ds[f"{m}_mean"].values, s.ds[f"{m}_std"].values)
                 for s in stores if m in s.modalities]
        n = sum(p[0] for p in parts)
        mean = sum(p[0] * p[1] for p in parts) / np.maximum(n, 1)
        second = sum(p[0] * (p[2] ** 2 + p[1] ** 2) for p in parts) / np.maximum(n, 1)
        std = np.sqrt(np.maximum(second - mean**2, 0.0))
        out[m] = {"mean": [float(v) for v in mean], "std": [float(v) if v > 1e-6 else 1.0 for v in std]}
    return out


def check_statistics(ds: Any, path: str | Any) -> None:
    """Refuse a chip store (its xarray dataset ``ds``) whose normalisation statistics are not finite.

    Raises:
        ValueError: names the store, the modality and the band.
    """
    for m in ds.attrs.get("modalities", []):
        mean, std = np.asarray(ds[f"{m}_mean"].values), np.asarray(ds[f"{m}_std"].values)
        bad = ~(np.isfinite(mean) & np.isfinite(std))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            band = str(ds[f"band_{m}"].values[j])
            raise ValueError(f"{path}: the normalisation statistics of {m} band {band} are not finite (mean "
                             f"{mean[j]}, std {std[j]}): a model trained on them would see no data; ingest the "
                             "source again (statistics now leave out non-finite pixels)")

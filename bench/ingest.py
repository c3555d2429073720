"""Ingestion throughput against a plain rasterio read of the same files, and peak RSS for N and 2N scenes.

Scenes are real: the Sen1Floods11 chip in ../shared/data (S1 VV/VH, S2 L1C 13 bands, water
mask), copied N times with each copy rolled by a different offset so every chip is distinct
(identical copies would be quarantined as duplicates). Throughput counts the decoded raster
bytes of those files. The plain read and the ingestion alternate (repeats, medians) in one
process with Great Expectations already imported; peak RSS is measured in a fresh process per
scene count. Prints a table, then one JSON line.

    python bench/ingest.py [--scenes 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MAPEX_SHARED_DATA", ROOT.parent / "shared" / "data"))
SAMPLE = SHARED / "sen1floods11_sample" / "sample"
KINDS = (("S1", "S1Hand"), ("S2", "S2Hand"), ("Labels", "LabelHand"))


def make_scenes(dest: Path, n: int) -> list[Path]:
    """``n`` distinct Sen1Floods11-layout scenes made from the real chip."""
    dest.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        for sub, kind in KINDS:
            with rasterio.open(SAMPLE / sub / f"Spain_7370579_{kind}.tif") as r:
                data, profile = r.read(), r.profile
            out = dest / f"Spain_{1000 + i}_{kind}.tif"
            with rasterio.open(out, "w", **profile) as w:
                w.write(np.roll(data, (i * 37, i * 53), axis=(1, 2)))
            files.append(out)
    return files


def plain_read(files: list[Path]) -> int:
    nbytes = 0
    for f in files:
        with rasterio.open(f) as r:
            nbytes += r.read().nbytes
    return nbytes


def peak_rss_mb(src: Path, out: Path) -> float:
    # VmHWM: this process image's peak RSS (ru_maxrss would carry the forking parent's peak over exec)
    code = (
        "from mapex_core.data.ingest import ingest; "
        f"ingest({str(src)!r}, {str(out)!r}, reports_dir={str(out.parent / 'reports')!r}, chip_size=64); "
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import great_expectations  # noqa: F401  (one-off import cost is not throughput)

    from mapex_core.data.ingest import ingest

    with tempfile.TemporaryDirectory(prefix="mapex-bench-ingest-") as tmp:
        tmp = Path(tmp)
        files_n = make_scenes(tmp / "n", args.scenes)
        make_scenes(tmp / "2n", 2 * args.scenes)
        raw_s, ing_s = [], []
        nbytes = plain_read(files_n)  # warm the page cache for both
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            plain_read(files_n)
            raw_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            summary = ingest(tmp / "n", tmp / "out" / "chips.zarr", reports_dir=tmp / "reports", chip_size=64)
            ing_s.append(time.perf_counter() - t0)
        rss_n = peak_rss_mb(tmp / "n", tmp / "rss_n" / "chips.zarr")
        rss_2n = peak_rss_mb(tmp / "2n", tmp / "rss_2n" / "chips.zarr")

    mb = nbytes / 1e6
    raw, ing = statistics.median(raw_s), statistics.median(ing_s)
    result = {
        "scenes": args.scenes, "chips": summary["chips"], "raster_mb": round(mb, 1),
        "plain_read_mb_s": round(mb / raw, 1), "ingest_mb_s": round(mb / ing, 1),
        "ingest_vs_plain_read": round(raw / ing, 3),
        "peak_rss_mb_n": round(rss_n, 1), "peak_rss_mb_2n": round(rss_2n, 1),
        "rss_2n_vs_n": round(rss_2n / rss_n, 3),
    }
    print(f"ingestion of {args.scenes} Sen1Floods11-layout scenes ({mb:.1f} MB of raster, {summary['chips']} chips)")
    print(f"  plain rasterio read  {raw:7.3f} s  {mb / raw:8.1f} MB/s")
    print(f"  mapex ingest         {ing:7.3f} s  {mb / ing:8.1f} MB/s  (co-register, chip, stats, zarr, GX)")
    print(f"  peak RSS  {args.scenes} scenes: {rss_n:.0f} MB   {2 * args.scenes} scenes: {rss_2n:.0f} MB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

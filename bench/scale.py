"""The data path at BigEarthNet scale, in one run: Dask speed-up, worker memory, files, appends, loader, overhead.

Corpus: N pairs in the BigEarthNet v2 layout (``BigEarthNet-S1/``, ``BigEarthNet-S2/``, ``metadata.parquet``
with splits), generated under a temporary folder (never the repository) from the 6 real pairs of
../shared/data: each new pair is a real pair rotated by k x 90 degrees, maybe flipped, shifted by 0-2
60 m pixels and given small noise (S2 +-N(0, 8) DN, S1 +-N(0, 0.05) dB), with new ids. Ingestion
uses the pipeline's data settings (64 px chips, stride 28: 9 chips per pair). Reported:

- ``dask_speedup``: ingestion time on 1 Dask worker / on 2 workers (clusters started and warmed before
  the clock starts; the ingesting process still writes the shards and runs Great Expectations);
- ``rss_ratio``: peak RSS (VmHWM) of the busiest worker ingesting 2N pairs / N pairs (2 workers);
- ``files_per_10k_chips``: files in the store of N pairs, per 10,000 chips;
- ``append_vs_full``: ``ingest --append`` of the last 10% of the pairs into the store of the first
  90% / a full single-process ingestion of all N;
- ``loader_vs_step``: chips/s of the pre-training input path (PresenceBatchSampler, chips read from the
  sharded store on disk, normalisation, collation; DataLoader with 0 and 2 workers, the better one) /
  chips/s one CPU training step consumes at the production size of ``bench/train_step.py``
  (37.7 M parameters, batch 64);
- ``ingest_vs_minimal``: time of a minimal pipeline (read, float32 with NaN for nodata, co-register,
  chip, compressed Zarr write; no statistics, hashing or validation) / time of ``ingest`` on the
  same N pairs (1.0: ingestion costs nothing beyond the required work).

    python bench/scale.py [--pairs 20000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("MAPEX_SHARED_DATA", ROOT.parent / "shared" / "data"))
BEN = SHARED / "bigearthnet_mm_example"
DATA = {"chip_size": 64, "stride": 28, "seed": 0}  # params.yaml's data section (the demo's BigEarthNet)
SPLITS = ("train", "validation", "test")


def _real_pairs() -> list[dict]:
    """The 6 real pairs: per band its array, profile; and the 19-class labels."""
    import rasterio

    from mapex_core.data.bigearthnet import BEN43_TO_19, find_pairs

    out = []
    for s1, s2 in find_pairs(BEN):
        meta = json.loads(next(s2.glob("*_labels_metadata.json")).read_text())
        bands = {}
        for d, kind in ((s2, "s2"), (s1, "s1")):
            for f in sorted(d.glob("*.tif")):
                with rasterio.open(f) as r:
                    bands[(kind, f.stem.rsplit("_", 1)[1])] = (r.read(1), r.profile)
        out.append({"bands": bands, "tile": meta["tile_source"].split("_")[5],
                    "labels": sorted({BEN43_TO_19[n] for n in meta["labels"] if BEN43_TO_19[n]})})
    return out


def make_corpus(dest: Path, first: int, n: int, real: list[dict]) -> list[dict]:
    """Write pairs ``first .. first + n - 1`` under ``dest``; return their metadata rows."""
    import rasterio

    rows = []
    for i in range(first, first + n):
        src = real[i % len(real)]
        rng = np.random.default_rng(i)
        k, flip, shift = int(rng.integers(4)), bool(rng.integers(2)), int(rng.integers(3))
        pid = f"S2A_MSIL2A_20200101T000000_N9999_R000_{src['tile']}_{i // 1000:03d}_{i % 1000:03d}"
        s1_name = f"S1A_IW_GRDH_1SDV_20200101T000000_{src['tile']}_{i // 1000:03d}_{i % 1000:03d}"
        for (kind, band), (arr, profile) in src["bands"].items():
            a = np.rot90(arr, k)
            a = a[:, ::-1] if flip else a
            a = np.roll(a, shift * a.shape[0] // 20, axis=(0, 1))  # 0-2 pixels of 60 m, at every resolution
            if kind == "s2":
                a = np.clip(a.astype(np.float32) + rng.normal(0, 8, a.shape), 1, 20000).astype(arr.dtype)
                folder = dest / "BigEarthNet-S2" / src["tile"] / pid
                name = f"{pid}_{band}.tif"
            else:
                a = (a + rng.normal(0, 0.05, a.shape)).astype(arr.dtype)
                folder = dest / "BigEarthNet-S1" / "S1A_PRODUCT" / s1_name
                name = f"{s1_name}_{band}.tif"
            folder.mkdir(parents=True, exist_ok=True)
            with rasterio.open(folder / name, "w", **profile) as w:
                w.write(np.ascontiguousarray(a), 1)
        u = rng.random()
        rows.append({"patch_id": pid, "labels": src["labels"], "s1_name": s1_name, "country": "X",
                     "split": SPLITS[0] if u < 0.8 else SPLITS[1] if u < 0.9 else SPLITS[2]})
    return rows


def link_corpus(full: Path, dest: Path, rows: list[dict], listed: list[dict] | None = None) -> Path:
    """A corpus of ``rows`` whose folders are hard links into ``full``'s (no bytes copied); its
    ``metadata.parquet`` lists ``listed`` (default: ``rows``)."""
    import pandas as pd

    for r in rows:
        for sub in (full / "BigEarthNet-S2").glob(f"*/{r['patch_id']}"), (full / "BigEarthNet-S1").glob(f"*/{r['s1_name']}"):
            for folder in sub:
                target = dest / folder.relative_to(full)
                target.mkdir(parents=True, exist_ok=True)
                for f in folder.iterdir():
                    os.link(f, target / f.name)
    pd.DataFrame(listed or rows).to_parquet(dest / "metadata.parquet")
    return dest


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _warm() -> None:
    import rioxarray  # noqa: F401

    import mapex_core.data.distributed_ingest  # noqa: F401


@contextmanager
def cluster(workers: int) -> Iterator[tuple[Any, Any]]:
    """A local cluster of ``workers`` single-threaded processes, warmed (imports done), and its client."""
    import logging

    from distributed import Client, LocalCluster

    from mapex_core.data.distributed_ingest import restored_environ

    with restored_environ(), LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                          dashboard_address=None, silence_logs=logging.ERROR) as c, Client(c) as client:
        client.run(_warm)
        yield c, client


def worker_peak_rss(src: Path, out: Path) -> float:
    """The largest peak RSS (MB) of 2 fresh workers after ingesting ``src``."""
    from mapex_core.data.ingest import ingest

    with cluster(2) as (c, client):
        ingest(src, out, reports_dir=out.parent / "reports", dask=c.scheduler_address, **DATA)
        return max(client.run(_vmhwm_mb).values())


def minimal_pipeline(src: Path, out: Path) -> int:
    """Only the required work: read, float32 with NaN for nodata, co-register, chip, compressed Zarr write."""
    import xarray as xr

    from mapex_core.data import shards
    from mapex_core.data.layouts import find_scenes
    from mapex_core.data.raster import window_offsets
    from mapex_core.data.scenes import read_scene

    _, scenes = find_scenes(src, "bigearthnet2")
    writers: dict = {}
    cs, st = DATA["chip_size"], DATA["stride"]
    n = 0
    for spec in scenes:
        sample, _ = read_scene(spec)
        h, w = sample.grid.shape
        for r in window_offsets(h, cs, st):
            for c in window_offsets(w, cs, st):
                for m, a in sample.arrays.items():
                    if m not in writers:
                        writers[m] = (shards.ShardWriter(out / m, 4), a.shape[0])
                    writers[m][0].append(shards.encode_chip(np.ascontiguousarray(a[:, r:r + cs, c:c + cs])))
                n += 1
    variables, encoding = {}, {}
    for m, (w, bands) in writers.items():
        w.close()
        shape = (n, bands, cs, cs)
        variables[m] = (("chip", f"band_{m}", "y", "x"), shards.placeholder(shape, np.float32))
        encoding[m] = shards.encoding(shape)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xr.Dataset(variables).to_zarr(out, mode="a", zarr_format=3, consolidated=False, encoding=encoding,
                                      compute=False)
    return n


def loader_chips_per_s(store: Path, workers: int, batches: int) -> float:
    """Chips/s of the pre-training input path over the sharded store on disk (first batch not timed)."""
    from torch.utils.data import DataLoader

    from mapex_core.data.dataset import ChipStore, collate
    from mapex_core.data.sampling import PresenceBatchSampler

    ds = ChipStore.open(store, modalities=["s1", "s2"], in_memory=False)
    sampler = PresenceBatchSampler(ds, 64, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                        persistent_workers=workers > 0)
    it = iter(loader)
    next(it)
    t0, chips, done = time.perf_counter(), 0, 0
    while done < batches:  # epochs again while the store has fewer batches
        for batch in it:
            chips += int(batch["index"].shape[0])
            done += 1
            if done == batches:
                break
        sampler.epoch += 1
        it = iter(loader)
    return chips / (time.perf_counter() - t0)


def read_and_stack_ms(store: Path, repeats: int = 3) -> dict:
    """Side by side: ms to read one S2 chip through ShardReader and through zarr-python (random chips), and
    to stack a batch of 64 S1+S2 items with numpy (``collate``) and with ``torch.stack``."""
    import torch
    import zarr

    from mapex_core.data.dataset import ChipStore, collate
    from mapex_core.data.shards import ShardReader

    reader, arr = ShardReader.open(store / "s2"), zarr.open_array(str(store / "s2"), mode="r")
    idx = np.random.default_rng(0).integers(0, len(reader), 100).tolist()
    items = [ChipStore.open(store, modalities=["s1", "s2"], in_memory=False)[i] for i in range(64)]
    ways = {"read_shard_reader": lambda: [reader[j] for j in idx], "read_zarr": lambda: [arr[j] for j in idx],
            "stack_numpy": lambda: collate(items),
            "stack_torch": lambda: {k: torch.stack([it[k] for it in items]) for k in ("s1", "s2")}}
    times: dict = {k: [] for k in ways}
    for _ in range(repeats):  # interleaved
        for k, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v) * 1e3 / (len(idx) if k.startswith("read") else 1), 3)
            for k, v in times.items()}


def step_chips_per_s(steps: int = 3) -> float:
    """Chips/s one CPU pre-training step consumes at bench/train_step.py's production size (batch 64)."""
    import torch

    from mapex_core.model import MapexConfig, MapexModel

    torch.manual_seed(0)
    cfg = MapexConfig(modalities=["s1", "s2"], img_size=64, patch_size=8, dim=384, depth=6, heads=6, moe_every=2,
                      experts_per_modality=4, top_k=2, mask_ratio=0.75, decoder_dim=256, decoder_depth=2,
                      decoder_heads=8)
    model = MapexModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {"s1": torch.randn(64, 2, 64, 64), "s2": torch.randn(64, 12, 64, 64)}
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(batch, generator=gen).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return 64 / statistics.median(times)


def files_per_10k(n: int, say: Callable[..., None]) -> dict[str, Any]:
    """Files of the store of ``n`` generated pairs, ingested once in one process, per 10,000 chips."""
    from mapex_core.data.ingest import ingest
    from mapex_core.data.store import open_dataset

    with tempfile.TemporaryDirectory(prefix="mapex-bench-files-") as tmp:
        tmp = Path(tmp)
        rows = make_corpus(tmp / "all", 0, n, _real_pairs())
        t0 = time.perf_counter()
        ingest(link_corpus(tmp / "all", tmp / "n", rows), tmp / "s" / "chips.zarr", reports_dir=tmp / "r", **DATA)
        seconds = time.perf_counter() - t0
        chips = int(open_dataset(tmp / "s" / "chips.zarr").sizes["chip"])
        files = sum(1 for p in (tmp / "s" / "chips.zarr").rglob("*") if p.is_file())
        say(f"{n} pairs, {chips} chips: {files} files, ingested in {seconds:.0f} s")
        return {"pairs": n, "chips": chips, "files": files, "files_per_10k_chips": round(files / chips * 1e4, 1),
                "ingest_s": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--json", action="store_true", help="print only one JSON line")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the timed ingestions (medians)")
    ap.add_argument("--loader-batches", type=int, default=30)
    ap.add_argument("--files-only", action="store_true",
                    help="only files_per_10k_chips: one ingestion of N pairs (a size the full run cannot afford)")
    args = ap.parse_args()
    say = (lambda *a: None) if args.json else print
    n = args.pairs
    load_start = os.getloadavg()
    import great_expectations  # noqa: F401  (one-off import cost is not throughput)

    from mapex_core.data.ingest import ingest
    from mapex_core.data.store import open_dataset

    if args.files_only:
        print(json.dumps(files_per_10k(n, say)))
        return

    def clock(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="mapex-bench-scale-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        rows = make_corpus(tmp / "all", 0, 2 * n, _real_pairs())
        say(f"corpus: {2 * n} pairs generated in {time.perf_counter() - t0:.0f} s under {tmp}")
        corpus_n = link_corpus(tmp / "all", tmp / "n", rows[:n])
        corpus_2n = link_corpus(tmp / "all", tmp / "2n", rows)
        corpus_90 = link_corpus(tmp / "all", tmp / "n90", rows[: n - n // 10])
        for f in (tmp / "all").rglob("*.tif"):  # every run reads from the page cache
            f.read_bytes()
        ingest(corpus_90, tmp / "base" / "chips.zarr", reports_dir=tmp / "r", **DATA)
        link_corpus(tmp / "all", corpus_90, rows[n - n // 10: n], rows[:n])  # the new 10% arrive

        times: dict[str, list[float]] = {k: [] for k in ("ingest", "minimal", "append", "dask_1_worker",
                                                         "dask_2_workers")}
        with cluster(1) as (c1, _), cluster(2) as (c2, _):  # the alternatives interleaved, repeated
            for r in range(args.repeats):
                times["ingest"].append(clock(lambda r=r: ingest(corpus_n, tmp / f"full{r}" / "chips.zarr",
                                                                reports_dir=tmp / "r", **DATA)))
                times["minimal"].append(clock(lambda r=r: minimal_pipeline(corpus_n, tmp / f"minimal{r}.zarr")))
                shutil.copytree(tmp / "base" / "chips.zarr", tmp / f"app{r}" / "chips.zarr")
                times["append"].append(clock(lambda r=r: ingest(corpus_90, tmp / f"app{r}" / "chips.zarr",
                                                                reports_dir=tmp / "r", append=True, **DATA)))
                for key, c in (("dask_1_worker", c1), ("dask_2_workers", c2)):
                    times[key].append(clock(lambda r=r, c=c, key=key: ingest(
                        corpus_n, tmp / f"{key}{r}" / "chips.zarr", reports_dir=tmp / "r",
                        dask=c.scheduler_address, **DATA)))
                say(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()))
        med = {k: statistics.median(v) for k, v in times.items()}
        chips = int(open_dataset(tmp / "full0" / "chips.zarr").sizes["chip"])
        appended = open_dataset(tmp / "app0" / "chips.zarr")
        assert int(appended.sizes["chip"]) == chips and len(appended["scene_name"]) == n
        a, b = tmp / "full0" / "chips.zarr", tmp / "dask_2_workers0" / "chips.zarr"
        files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
        identical = files_a == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file()) and all(
            (a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
        rss_n = worker_peak_rss(corpus_n, tmp / "rss_n" / "chips.zarr")
        rss_2n = worker_peak_rss(corpus_2n, tmp / "rss_2n" / "chips.zarr")
        say(f"worker peak RSS {rss_n:.0f} MB (N), {rss_2n:.0f} MB (2N); the 2-worker store is the 1-process one, "
            f"byte for byte: {identical}")

        loader = {w: loader_chips_per_s(a, w, args.loader_batches) for w in (0, 2)}
        side = read_and_stack_ms(a)
        step = step_chips_per_s()
        best = max(loader, key=lambda w: loader[w])
        say(f"loader: {loader[0]:.0f} chips/s (0 workers), {loader[2]:.0f} chips/s (2 workers); "
            f"CPU training step consumes {step:.1f} chips/s")
        say(f"per S2 chip: ShardReader {side['read_shard_reader']} ms, zarr-python {side['read_zarr']} ms; "
            f"stacking 64 items: numpy {side['stack_numpy']} ms, torch.stack {side['stack_torch']} ms")
    result = {
        "pairs": n, "chips": chips,
        "dask_speedup": round(med["dask_1_worker"] / med["dask_2_workers"], 3), "rss_ratio": round(rss_2n / rss_n, 3),
        "files_per_10k_chips": round(len(files_a) / chips * 1e4, 1), "files": len(files_a),
        "append_vs_full": round(med["append"] / med["ingest"], 3),
        "loader_vs_step": round(loader[best] / step, 2), "loader_workers": best,
        "ingest_vs_minimal": round(med["minimal"] / med["ingest"], 3),
        "seconds": {k: [round(t, 1) for t in v] for k, v in times.items()},
        "worker_peak_rss_mb": {"n": round(rss_n), "2n": round(rss_2n)},
        "loader_chips_per_s": {str(w): round(v) for w, v in loader.items()}, "step_chips_per_s": round(step, 1),
        "ms": side, "dask_store_identical": identical, "cpus": os.cpu_count(),
        "load_avg_start_end": [round(load_start[0], 1), round(os.getloadavg()[0], 1)],
    }
    if not args.json:
        for k in ("dask_speedup", "rss_ratio", "files_per_10k_chips", "append_vs_full", "loader_vs_step",
                  "ingest_vs_minimal"):
            say(f"  {k:22s} {result[k]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

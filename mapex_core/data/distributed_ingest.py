"""Ingestion's work per scene, here or on Dask workers, and what of a source is new to a store.

:func:`scene_part` reads, harmonises and co-registers one scene and chips it
(:func:`~mapex_core.data.chipping.chip_sample`): chips compressed, metadata rows, statistics parts.
:func:`scene_parts` yields the parts of a dataset's scenes *in scene order*, computed one at a time
in this process or spread over Dask workers (``local``: a cluster of one single-threaded worker
process per core, started here; or ``tcp://HOST:PORT``, a running scheduler whose workers see the
same files and have MAPEX installed). The store writer adds the parts in that order, so the store
is byte for byte the single-process one (same chip order, statistics summed in the same order).

Why workers send their chips back instead of writing shards themselves: a chip's place in the
store is only known once every earlier scene is chipped (scenes give different numbers of chips)
and a shard holds chips of many scenes, so direct writes would need the chip counts first and
shared shards. A worker sends a scene's chips already compressed (one Zarr chunk each), and this
process only appends bytes to shard files. Memory stays flat: at most two scenes per worker are in
flight, and a worker holds one scene at a time.

Incremental ingestion (:func:`plan_append`): a scene is known by its name in the layout (source
identity) and :func:`scene_fingerprint`, a hash of its files' bytes and of what the layout says
of it (split, group, time, labels). Scenes not yet in the store are added; a scene whose content
changed, other ingestion settings, or a store of an earlier format version mean the store is
rebuilt (the plan says why).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mapex_core.data.chipping import ChipConfig, ScenePart, chip_sample
from mapex_core.data.sampling import assign_split
from mapex_core.data.scenes import SceneSpec
from mapex_core.data.store import FORMAT, FORMAT_VERSION, open_dataset, store_attrs

IN_FLIGHT_PER_WORKER = 2  # scenes submitted per worker ahead of the one being written
HASH_BATCH = 256  # scenes fingerprinted per Dask task when planning an append
DASK_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")


@dataclass(frozen=True)
class SceneJob:
    """What every scene of one ingestion shares (sent to the workers once per scene, small).

    Attributes:
        config: the store's chipping configuration.
        stride: chip stride (``None``: the chip size).
        split_block: split blocks of this many pixels inside scenes, or ``None``.
        read: keyword arguments of :func:`~mapex_core.data.scenes.read_scene` (target grid, pixel
            cap, radiometric options).
    """

    config: ChipConfig
    stride: int | None = None
    split_block: int | None = None
    read: dict[str, Any] = field(default_factory=dict)


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (cached for files shared by scenes, e.g. one label file)."""
    st = os.stat(path)
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


def scene_fingerprint(spec: SceneSpec) -> str:
    """A scene's content hash: its files' bytes (by modality and file name, not folder) and what the
    layout says of it (group, split, time, extra, labels).

    Raises:
        FileNotFoundError / OSError: a file cannot be read (names it).
    """
    h = hashlib.sha256()
    lab = spec.labels
    about = {"name": spec.name, "group": spec.group, "split": spec.split, "time": spec.time,
             "extra": dict(sorted(spec.extra.items())),
             "labels": None if lab is None else {
                 "kind": lab.kind, "classes": list(lab.classes), "attribute": lab.attribute,
                 "value_to_class": sorted((float(k), int(v)) for k, v in lab.value_to_class.items()),
                 "multihot": None if lab.multihot is None else np.asarray(lab.multihot).tolist()}}
    h.update(json.dumps(about, sort_keys=True, default=str).encode())
    files = [(m, f) for m, s in spec.sources.items() for f in s.files]
    if lab is not None and lab.path is not None:
        files.append(("labels", lab.path))
    for m, f in files:
        try:
            digest = file_digest(Path(f))
        except OSError as exc:
            raise FileNotFoundError(f"{f}: cannot read file of scene {spec.name}: {exc.strerror or exc}") from exc
        h.update(f"{m}:{Path(f).name}:{digest}".encode())
    return h.hexdigest()


def _fingerprints(specs: list[SceneSpec]) -> list[str]:
    return [scene_fingerprint(s) for s in specs]


def scene_part(spec: SceneSpec, split: str | None, job: SceneJob, fingerprint: str | None = None) -> ScenePart:
    """Read one scene and cut it into chips (runs here or on a Dask worker).

    Raises:
        ValueError / RasterError: bad input, naming the scene and its first file.
    """
    import rasterio

    from mapex_core.data.raster import GDAL_CACHE_MB
    from mapex_core.data.scenes import read_scene

    fingerprint = fingerprint or scene_fingerprint(spec)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):  # one scene at a time: no cache of past scenes' blocks
        sample, extra = read_scene(spec, **job.read)
    try:
        part = chip_sample(job.config, sample, stride=job.stride, split=split, group=spec.group,
                           split_block=job.split_block)
    except ValueError as exc:
        raise ValueError(f"scene {spec.name} ({spec.files()[0]}): {exc}") from exc
    part.scene = {"name": spec.name, "hash": fingerprint, "group": spec.group or spec.name, "split": split or ""}
    part.extra = extra
    return part


def _remote_scene_part(spec: SceneSpec, split: str | None, job: SceneJob, fingerprint: str | None) -> ScenePart:
    """:func:`scene_part` on a worker: the worker's own objects are frozen once, so collecting the
    scene's reference cycles (xarray's ``.rio`` accessors hold the pixels) after it costs milliseconds."""
    if gc.get_freeze_count() == 0:
        gc.freeze()
    try:
        return scene_part(spec, split, job, fingerprint)
    except Exception as exc:  # noqa: BLE001 - raised again below as its own type, without its chain: Dask
        # pickles the causes too, GDAL's do not travel, and the caller would get a bare Exception
        try:
            clean = type(exc)(*exc.args)
        except Exception:  # noqa: BLE001 - an exception type that cannot be rebuilt from its args
            clean = RuntimeError(f"{type(exc).__name__}: {exc}")
    finally:
        gc.collect()
    raise clean  # outside the except block: no __context__


@contextmanager
def restored_environ(keys: tuple[str, ...] = DASK_ENV) -> Iterator[None]:
    """Put ``keys`` of ``os.environ`` back as they were (a local cluster's nannies set them here)."""
    before = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def dask_client(address: str, n_workers: int | None = None) -> Iterator[Any]:
    """A Dask client: of a local cluster (``local``, one single-threaded worker process per core, or
    ``n_workers``) started for the block, or of the scheduler at ``address`` (``tcp://HOST:PORT``).

    Raises:
        ValueError: an address that is neither ``local`` nor a scheduler URL.
        OSError: the scheduler cannot be reached (names the address).
    """
    import logging

    from distributed import Client, LocalCluster

    from mapex_core.runtime import cpu_count

    if address == "local" or address.startswith("local:"):
        n = n_workers or (int(address.split(":", 1)[1]) if ":" in address else cpu_count())
        with restored_environ(), LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                              dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
                Client(cluster) as client:
            yield client
        return
    if "://" not in address:
        raise ValueError(f"--dask {address!r}: use 'local', 'local:N' (N workers) or a scheduler address "
                         "such as tcp://HOST:8786")
    try:
        client = Client(address, timeout=30)
    except (OSError, TimeoutError) as exc:
        raise OSError(f"--dask {address}: cannot reach the Dask scheduler ({exc})") from exc
    try:
        yield client
    finally:
        client.close()


def scene_parts(items: list[tuple[SceneSpec, str | None, str | None]], job: SceneJob, client: Any = None
                ) -> Iterator[tuple[SceneSpec, ScenePart]]:
    """The parts of ``items`` (scene, split, known fingerprint or ``None``), in their order.

    Without ``client`` one scene at a time here; with a Dask client, up to
    ``IN_FLIGHT_PER_WORKER`` scenes per worker are being chipped while this process writes.
    """
    if client is None:
        freeze = gc.get_freeze_count() == 0  # see _remote_scene_part; a caller's own freeze is kept
        if freeze:
            gc.freeze()
        try:
            for spec, split, fp in items:
                part = scene_part(spec, split, job, fp)
                gc.collect()
                yield spec, part
        finally:
            if freeze:
                gc.unfreeze()
        return
    window = IN_FLIGHT_PER_WORKER * max(1, len(client.scheduler_info().get("workers", {})))
    pending: deque[tuple[SceneSpec, Any]] = deque()
    todo = iter(items)
    try:
        for spec, split, fp in todo:
            pending.append((spec, client.submit(_remote_scene_part, spec, split, job, fp, pure=False)))
            if len(pending) >= window:
                break
        while pending:
            spec, fut = pending.popleft()
            part = fut.result()
            fut.release()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt[0], client.submit(_remote_scene_part, nxt[0], nxt[1], job, nxt[2], pure=False)))
            yield spec, part
    finally:
        client.cancel([f for _, f in pending])


def fingerprints(specs: list[SceneSpec], client: Any = None) -> list[str]:
    """:func:`scene_fingerprint` of every scene (batches of ``HASH_BATCH`` scenes on Dask workers)."""
    if client is None:
        return _fingerprints(specs)
    batches = [specs[i: i + HASH_BATCH] for i in range(0, len(specs), HASH_BATCH)]
    return [h for batch in client.gather(client.map(_fingerprints, batches, pure=False)) for h in batch]


@dataclass
class AppendPlan:
    """What ``ingest --append`` does with a store.

    Attributes:
        mode: ``full`` (no store yet), ``append``, ``unchanged`` (nothing new) or ``rebuild``.
        reason: why the store is rebuilt.
        new: the scenes to add, with their split (``None``: per chip or block) and fingerprint.
        known: scenes of the source already in the store.
        missing: scenes of the store no longer in the source (kept).
    """

    mode: str
    reason: str = ""
    new: list[tuple[SceneSpec, str | None, str | None]] = field(default_factory=list)
    known: int = 0
    missing: int = 0


def ingest_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings recorded in a store that must match for chips to be appended (JSON-safe values)."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def store_damage(out: Path, ds: Any) -> str | None:
    """What is missing or broken in the shard files of a chip store (``None``: nothing found).

    Cheap (reads the shard indexes, not the chips): a shard file that should exist (a chip of it has the
    modality) but does not, an index that fails its checksum, or chunks that run past the file's end.
    Bytes flipped inside a chunk are not seen (the chunks carry no checksum).
    """
    from mapex_core.data import shards

    n = int(ds.sizes["chip"])
    present = np.asarray(ds["present"].values, bool)
    mods = list(ds.attrs["modalities"])
    names = mods + (["labels"] if ds.attrs.get("label_type") == "mask" else [])
    for name in names:
        reader = shards.ShardReader.open(out / name)
        if reader is None or reader.shape[0] != n:
            return f"array {name} is not a sharded array of {n} chips"
        for k in range(-(-n // reader.shard_chips)):
            path = shards.shard_path(out / name, k, len(reader.shape))
            chips = slice(k * reader.shard_chips, (k + 1) * reader.shard_chips)
            if not path.exists():
                if name in mods and present[chips, mods.index(name)].any():
                    return f"{path.relative_to(out)} is missing"
                continue
            try:
                index = shards.read_index(path, reader.shard_chips)
            except (ValueError, OSError) as exc:
                return str(exc)
            stored = index[:, 0] != np.uint64(2**64 - 1)
            end = int((index[stored, 0] + index[stored, 1]).max()) if stored.any() else 0
            if end > path.stat().st_size - (reader.shard_chips * 16 + 4):
                return f"{path.relative_to(out)} is truncated"
    return None


def plan_append(out: Path, scenes: list[SceneSpec], settings: dict[str, Any], seed: int,
                split_block: int | None, client: Any = None,
                fingerprint: Callable[[list[SceneSpec], Any], list[str]] = fingerprints) -> AppendPlan:
    """Compare the source's scenes with the store at ``out``: which are new, or why to rebuild.

    Args:
        out: the chip store.
        scenes: the scenes the layout finds now.
        settings: this ingestion's settings (:func:`ingest_settings`), compared with the store's.
        seed: split seed (the split of a new group: :func:`~mapex_core.data.sampling.assign_split`).
        split_block: splits per block inside scenes (no split per scene).
        client: fingerprint on these Dask workers.
    """
    attrs = store_attrs(out) if out.exists() else None
    if attrs is None:
        return AppendPlan("full")
    if attrs.get("format") != FORMAT or attrs.get("format_version") != FORMAT_VERSION:
        return AppendPlan("rebuild", f"{out} is of chip store format version {attrs.get('format_version')} "
                                     f"(this version writes {FORMAT_VERSION})")
    stored = attrs.get("ingest_settings") or {}
    if not stored:
        return AppendPlan("rebuild", f"{out} has no record of its scenes (converted from format version 1, or not "
                                     "written by mapex ingest)")
    for key in sorted(set(stored) | set(settings)):
        if stored.get(key) != settings.get(key):
            return AppendPlan("rebuild", f"{out} was made with {key} = {stored.get(key)!r}, now {settings.get(key)!r}")
    try:
        ds = open_dataset(out)
        damage = store_damage(out, ds)
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for damaged metadata
        damage = f"unreadable: {exc}"
    if damage:
        return AppendPlan("rebuild", f"{out} is damaged ({damage})")
    have = ({str(n): str(h) for n, h in zip(ds["scene_name"].values, ds["scene_hash"].values, strict=True)}
            if "scene_name" in ds else {})
    group_split = ({str(g): str(s) for g, s in zip(ds["scene_group"].values, ds["scene_split"].values, strict=True)}
                   if "scene_group" in ds else {})
    hashes = fingerprint(scenes, client)
    new = []
    for spec, fp in zip(scenes, hashes, strict=True):
        if spec.name in have:
            if have[spec.name] != fp:
                return AppendPlan("rebuild", f"scene {spec.name} ({spec.files()[0]}) changed since it was ingested")
            continue
        group = spec.group or spec.name
        split = spec.split or (None if split_block else group_split.get(group) or assign_split(group, seed))
        new.append((spec, split, fp))
    names = {s.name for s in scenes}
    return AppendPlan("append" if new else "unchanged", new=new, known=len(scenes) - len(new),
                      missing=sum(1 for n in have if n not in names))


def check_against_store(report: Any, rows: list[dict[str, Any]], base: Any) -> Any:
    """Appending: quarantine new chips whose content is already in the store (the suite saw only
    the new rows, so its uniqueness check could not see the old ones); the share is recomputed.

    Args:
        report: the :class:`~mapex_core.data.validation.ValidationReport` of the new rows.
        rows: the new chips' metadata rows.
        base: the store's dataset (``None``: not appending; the report is returned as it is).
    """
    from dataclasses import replace

    if base is None:
        return report
    known = {str(h) for h in base["content_hash"].values}
    dups = [r["chip_id"] for r in rows if r["content_hash"] in known]
    quarantine = {k: list(v) for k, v in report.quarantine.items()}
    for cid in dups:
        quarantine.setdefault(cid, []).append("expect_column_values_to_be_unique(content_hash) with the store's chips")
    expectations = [*report.expectations, {"expectation": "content_hash not in the store already",
                                           "success": not dups, "unexpected": len(dups)}]
    share = len(quarantine) / max(report.chips, 1)
    table_failed = any(not e["success"] and e["expectation"].startswith("expect_table") for e in expectations)
    return replace(report, quarantine=quarantine, expectations=expectations, failed_share=share,
                   success=share <= report.max_failed_share and not table_failed)

"""Ingestion: imagery in a known layout -> validated chip store.

One scene is read, co-registered and chipped at a time (memory does not grow with the number
of scenes); chips stream into a temporary store. The Great Expectations suite then runs over
the per-chip metadata table: failing chips are quarantined (kept, flagged, skipped by readers),
Data Docs and the report are written under ``reports/validation/<store>/``, and the store is
moved into place only when the failed share is within bounds. Any error (a corrupt file, a
missing band, ...) leaves no partial store behind.

Re-ingesting the same raw data gives a byte-identical store: everything written is a function
of the inputs and the parameters (no timestamps, sorted scene order).

One dataset's scenes can be spread over Dask workers (``dask``: ``local`` or ``tcp://HOST:PORT``;
:mod:`mapex_core.data.distributed_ingest`): the store is the same, byte for byte. With ``append``,
only the scenes not yet in the store are read, chipped and validated; the chips already there stay
bit for bit as they were, the statistics continue from the store's running sums, and a store with
nothing new is not touched (same DVC hash).

Radiometry is harmonised per scene as it is read (:mod:`mapex_core.data.radiometry`: the
Sentinel-2 +1000 offset of processing baseline 04.00+ removed, Sentinel-1 linear power turned into
dB). The decisions are counted in the summary (``radiometry``), written per scene to
``reports/validation/<store>/radiometry.json``, and, when any scene was converted, kept per scene
in the store attribute ``radiometry`` (scene -> modality -> action, source, detail; chips name their
scene in ``sample``). A store of scenes taken as they are is the same, byte for byte, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mapex_core.data.chipping import ChipConfig
from mapex_core.data.distributed_ingest import (
    AppendPlan,
    SceneJob,
    check_against_store,
    dask_client,
    ingest_settings,
    plan_append,
    scene_parts,
)
from mapex_core.data.layouts import PAIR_DAYS, PAIR_OVERLAP, find_scenes
from mapex_core.data.radiometry import Decision, RadiometryOptions
from mapex_core.data.raster import MAX_SCENE_PIXELS
from mapex_core.data.sampling import assign_splits
from mapex_core.data.scenes import SceneSpec
from mapex_core.data.store import ChipWriter
from mapex_core.data.validation import (
    ValidationFailed,
    ValidationParams,
    validate_table,
    write_report,
)
from mapex_core.io import atomic_write_json
from mapex_core.modalities import MODALITIES

RUN_OPTIONS = ("append", "dask", "max_scene_pixels", "allow_outside_paths")  # not what the chips are made of


@dataclass
class DataParams:
    """The ``data`` section of ``params.yaml``.

    ``max_scene_pixels`` caps the pixels a raster file may declare and a scene's grid may have
    (checked before any pixel is read); ``allow_outside_paths`` lets a STAC catalog point at files
    outside its own folder. ``s2_offset`` (``auto``, ``none`` or DN) and ``s1_scale`` (``auto``,
    ``db``, ``linear``) force the radiometric decisions; ``stac_pair_days`` and
    ``stac_pair_overlap`` pair single-sensor STAC items; ``split_lists`` is the folder of the official
    BigEarthNet v1 split and exclusion lists (default: next to the data).

    How, not what (not recorded in the store): ``append`` adds only the scenes not yet in the store;
    ``dask`` spreads the scenes over Dask workers (``local``, ``local:N`` or ``tcp://HOST:PORT``).
    """

    chip_size: int = 64
    stride: int | None = None
    seed: int = 0
    crs: str | None = None
    resolution: float | None = None
    split_block: int | None = None
    max_scene_pixels: int = MAX_SCENE_PIXELS
    allow_outside_paths: bool = False
    s2_offset: str = "auto"
    s1_scale: str = "auto"
    stac_pair_days: float = PAIR_DAYS
    stac_pair_overlap: float = PAIR_OVERLAP
    split_lists: str | None = None
    append: bool = False
    dask: str | None = None

    def __post_init__(self) -> None:
        for name in ("chip_size", "stride", "split_block", "max_scene_pixels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"data.{name} must be a positive number of pixels, got {value!r}")
        if self.resolution is not None and self.resolution <= 0:
            raise ValueError(f"data.resolution must be positive, got {self.resolution!r}")
        if not isinstance(self.allow_outside_paths, bool):
            raise ValueError(f"data.allow_outside_paths must be true or false, got {self.allow_outside_paths!r}")
        if not isinstance(self.append, bool):
            raise ValueError(f"data.append must be true or false, got {self.append!r}")
        try:
            opts = RadiometryOptions(self.s2_offset, self.s1_scale)
        except ValueError as exc:
            raise ValueError(f"data.{exc}") from None
        self.s2_offset, self.s1_scale = opts.s2_offset, opts.s1_scale
        if not isinstance(self.stac_pair_days, (int, float)) or isinstance(self.stac_pair_days, bool) \
                or not self.stac_pair_days >= 0:
            raise ValueError(f"data.stac_pair_days must be a number of days >= 0, got {self.stac_pair_days!r}")
        if not isinstance(self.stac_pair_overlap, (int, float)) or isinstance(self.stac_pair_overlap, bool) \
                or not 0 < self.stac_pair_overlap <= 1:
            raise ValueError(f"data.stac_pair_overlap must be a share in (0, 1], got {self.stac_pair_overlap!r}")


def _label_setup(scenes: list[SceneSpec]) -> tuple[list[str] | None, str]:
    labelled = [s for s in scenes if s.labels is not None]
    if not labelled:
        return None, "multilabel"
    first = labelled[0].labels
    assert first is not None
    for s in labelled[1:]:
        assert s.labels is not None
        if s.labels.classes != first.classes or s.labels.label_type != first.label_type:
            raise ValueError(f"scene {s.name}: labels ({s.labels.label_type}, {len(s.labels.classes)} classes) "
                             f"differ from scene {labelled[0].name}'s ({first.label_type}, {len(first.classes)})")
    if len(labelled) != len(scenes):
        missing = [s.name for s in scenes if s.labels is None][:5]
        raise ValueError(f"scenes {missing} have no labels while others do; ingest them separately")
    return list(first.classes), first.label_type


def ingest(
    source: str | Path,
    out: str | Path,
    layout: str = "auto",
    params: DataParams | None = None,
    validation: ValidationParams | None = None,
    reports_dir: str | Path = "reports",
    labels: str | Path | None = None,
    label_attribute: str | None = None,
    classes: list[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    force: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Read every scene under ``source`` and write the validated chip store ``out``.

    Args:
        source: folder of imagery, or a STAC ``catalog.json``.
        out: chip store path (written atomically; replaced when it exists).
        layout: ``auto`` or a name from :data:`mapex_core.data.layouts.LAYOUTS`.
        params: chip size, stride, split and target grid.
        validation: thresholds of the validation suite.
        reports_dir: root of the validation reports.
        labels: vector labels for the ``scenes`` layout (GeoPackage, GeoJSON, ...).
        label_attribute: class column of the vector labels.
        classes: class names in id order (masks; optional for vectors).
        progress: callback ``(done, total, scene_name)``.
        force: replace whatever is at ``out``; otherwise only a chip store (or an empty folder) is
            replaced, and anything else there is an error naming it, before any scene is read.
        **overrides: ``DataParams`` fields (e.g. ``chip_size=120``, ``allow_outside_paths=True``).

    Returns:
        Summary: layout, scenes, chips, quarantined, per-modality chip counts, seconds, paths.

    Raises:
        ValueError / FileNotFoundError: bad input, naming the file and the reason.
        ValidationFailed: more than ``max_failed_share`` of the chips failed validation.
    """
    t0 = time.perf_counter()
    p = params or DataParams()
    p = DataParams(**{**p.__dict__, **{k: v for k, v in overrides.items() if v is not None}})  # re-validated
    out = Path(out)
    layout, scenes = find_scenes(source, layout, labels=Path(labels) if labels else None,
                                 label_attribute=label_attribute, classes=classes,
                                 allow_outside_paths=p.allow_outside_paths, pair_days=p.stac_pair_days,
                                 pair_overlap=p.stac_pair_overlap, split_lists=p.split_lists)
    radiometry_options = RadiometryOptions(p.s2_offset, p.s1_scale)
    decisions: dict[str, dict[str, Decision]] = {}
    present = {m for s in scenes for m in s.sources}
    modalities = [m for m in MODALITIES if m in present]
    class_names, label_type = _label_setup(scenes)
    levels = {m: MODALITIES[m].description for m in modalities}
    counts = dict.fromkeys(modalities, 0)
    attrs = {"layout": layout, "source": Path(source).name, "modality_descriptions": levels,
             "stride": p.stride or p.chip_size, "split_block": p.split_block or 0}
    attrs["ingest_settings"] = ingest_settings({**{k: v for k, v in p.__dict__.items() if k not in RUN_OPTIONS},
                                                "layout": layout, "modalities": modalities,
                                                "label_type": label_type, "classes": class_names})
    job = SceneJob(ChipConfig(tuple(modalities), p.chip_size, tuple(class_names) if class_names is not None else None,
                              label_type if class_names is not None else "none", p.seed),
                   stride=p.stride, split_block=p.split_block,
                   read={"crs": p.crs, "resolution": p.resolution, "max_pixels": p.max_scene_pixels,
                         "radiometry_options": radiometry_options})
    with ExitStack() as stack:
        client = stack.enter_context(dask_client(p.dask)) if p.dask else None
        plan = (plan_append(out, scenes, attrs["ingest_settings"], p.seed, p.split_block, client) if p.append
                else AppendPlan("full"))
        if plan.mode == "unchanged":
            return {"out": str(out), "layout": layout, "mode": plan.mode, "scenes": len(scenes), "scenes_added": 0,
                    "scenes_not_in_source": plan.missing, "chips": 0, "quarantined": 0,
                    "seconds": round(time.perf_counter() - t0, 3)}
        if plan.mode == "append":
            items = plan.new
        else:
            group_split = assign_splits([s.group or s.name for s in scenes], p.seed)
            items = [(s, s.split or (None if p.split_block else group_split[s.group or s.name]), None) for s in scenes]
        writer = ChipWriter(out, modalities, p.chip_size, class_names=class_names, label_type=label_type,
                            seed=p.seed, attrs=attrs, force=force, base=out if plan.mode == "append" else None)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            parts = stack.enter_context(closing(scene_parts(items, job, client)))  # stops the workers' scenes on error
            for i, (spec, part) in enumerate(parts):
                decisions[spec.name] = part.extra
                writer.apply(part)
                for m in modalities:
                    counts[m] += sum(1 for r in part.rows if r[f"present_{m}"])
                if progress is not None:
                    progress(i + 1, len(items), spec.name)
            if writer.n_chips == 0:
                raise ValueError(f"{source}: no chips produced")
            report_dir = Path(reports_dir) / "validation" / out.name.removesuffix(".zarr")
            vparams = validation or ValidationParams()
            report = validate_table(writer.table(), modalities, p.chip_size, writer.label_type,
                                    len(class_names or []), vparams, docs_dir=report_dir / "data_docs",
                                    name=out.name.removesuffix(".zarr").replace(".", "_"))
            report = check_against_store(report, writer.rows, writer.base)  # appending: the store's chips too
            write_report(report, report_dir / "validation.json")
            radiometry = _radiometry_record(decisions, report_dir / "radiometry.json")
            if not report.success:
                raise ValidationFailed(report, str(out))
            before = dict(writer.base.attrs.get("radiometry") or {}) if writer.base is not None else {}
            if before or any(d.changes for per in decisions.values() for d in per.values()):  # else: as before
                writer.attrs["radiometry"] = {**before, **{scene: {m: d.to_dict() for m, d in per.items()}
                                                           for scene, per in decisions.items()}}
            writer.close(quarantine=report.quarantine)
        except BaseException:
            writer.abort()
            raise
    splits: dict[str, int] = {}
    for r in writer.rows:
        if r["chip_id"] not in report.quarantine:
            splits[r["split"]] = splits.get(r["split"], 0) + 1
    return {
        "out": str(out),
        "layout": layout,
        "mode": plan.mode,
        **({"reason": plan.reason} if plan.reason else {}),
        "scenes": len(scenes),
        "scenes_added": len(items),
        **({"scenes_not_in_source": plan.missing} if p.append else {}),
        "chips": writer.n_chips,
        "chips_in_store": writer.n_base + writer.n_chips,
        "quarantined": len(report.quarantine),
        "chips_per_modality": counts,
        "splits": dict(sorted(splits.items())),
        "label_type": writer.label_type,
        "classes": class_names,
        "chip_size": p.chip_size,
        "validation_report": str(report_dir / "validation.json"),
        "data_docs": report.docs,
        "radiometry": radiometry,
        **({"layout_notes": scenes.notes} if getattr(scenes, "notes", None) else {}),
        **({"dask": p.dask} if p.dask else {}),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _radiometry_record(decisions: dict[str, dict[str, Decision]], path: Path) -> dict[str, Any]:
    """Write every scene's radiometric decisions to ``path`` (JSON); return the counts per modality,
    action and source, with the path (the summary's ``radiometry``)."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for per in decisions.values():
        for m, d in per.items():
            by_source = counts.setdefault(m, {}).setdefault(d.action, {})
            by_source[d.source] = by_source.get(d.source, 0) + 1
    atomic_write_json(path, {scene: {m: d.to_dict() for m, d in per.items()} for scene, per in sorted(decisions.items())},
                      indent=1)
    return {**counts, "report": str(path)}

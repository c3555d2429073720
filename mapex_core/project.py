"""The project: where its params, datasets, applications and stage outputs are.

A MAPEX project is a folder with ``params.yaml`` (every knob; the DVC params file) and ``dvc.yaml``
(the stages). This module reads the pipeline's sections of ``params.yaml`` (``datasets`` and
``pipeline``; applications are :mod:`mapex_core.apps`) and fixes where each stage writes::

    data/raw/                               samples
    <datasets.NAME.out>                     ingest@NAME (a chip store), validated by validate@NAME
    reports/validation/NAME/                validation.json + Great Expectations Data Docs
    outputs/pretrain/                       pretrain: config.json, model.safetensors, metrics.json, loss.csv
    outputs/apps/APP/pruned/                prune@APP: pruned model + prune_report.json
    outputs/apps/APP/finetuned/             finetune@APP: task model + finetune.json
    outputs/apps/APP/compare/               compare@APP: the evaluation's comparison models + compare.json
    reports/APP/evaluation.json, metrics.json  evaluate@APP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapex_core.names import NAME
from mapex_core.params import load_params, section

PARAMS = Path("params.yaml")  # the project's params file: dvc.yaml's stages read this one
PRETRAIN_DIR = Path("outputs/pretrain")
APPS_DIR = Path("outputs/apps")
REPORTS_DIR = Path("reports")


@dataclass
class Dataset:
    """One raw dataset -> chip store (an entry of the ``datasets`` section)."""

    name: str
    source: str
    out: str
    layout: str = "auto"
    labels: str | None = None
    label_attribute: str | None = None
    classes: list[str] | None = None
    chip_size: int | None = None
    stride: int | None = None
    split_block: int | None = None
    crs: str | None = None
    resolution: float | None = None


@dataclass
class PipelineParams:
    """The ``pipeline`` section: what the retrain flow and ``dvc repro`` run."""

    pretrain_datasets: list[str] = field(default_factory=list)
    apps: list[str] = field(default_factory=list)
    device: str = "auto"
    nproc: int = 1
    schedule: str = "0 3 * * 1"
    timezone: str = "UTC"
    no_gpu_worker: str = "local"  # a worker's retrain finds no worker in pool gpu: local (warning), wait or fail
    gpu_wait_s: float = 600.0  # how long `wait` waits for one


def read_params(params: str | Path | dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """``(params dict, where it came from)`` for a params file path, an already loaded dict, or ``None``
    (``./params.yaml`` when it exists, else no params: every section takes its defaults)."""
    if isinstance(params, dict):
        return params, "params"
    if params is None:
        return (load_params(PARAMS), str(PARAMS)) if PARAMS.is_file() else ({}, "defaults")
    return load_params(params), str(params)


def load_datasets(params: str | Path | dict[str, Any] | None = "params.yaml") -> dict[str, Dataset]:
    """The ``datasets`` section.

    Raises:
        ValueError: unknown keys, a missing ``source``/``out``, or an ``out`` not named ``NAME.zarr``
            (the validation report folder and the DVC stage are named after the dataset).
    """
    data, source = read_params(params)
    raw = data.get("datasets") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: 'datasets' must be a mapping name -> settings")
    known = set(Dataset.__dataclass_fields__) - {"name"}
    out: dict[str, Dataset] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict) or "source" not in entry or "out" not in entry:
            raise ValueError(f"{source}: dataset {name!r} needs at least 'source' and 'out'")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"{source}: dataset {name!r} has unknown key(s) {unknown}; known: {sorted(known)}")
        if not NAME.match(str(name)):
            raise ValueError(f"{source}: dataset name {name!r} must match {NAME.pattern} (it names DVC stages "
                             "and report folders)")
        if Path(entry["out"]).name != f"{name}.zarr":
            raise ValueError(f"{source}: dataset {name!r}: 'out' must be a chip store named {name}.zarr, "
                             f"got {entry['out']!r}")
        out[name] = Dataset(name=name, **entry)
    return out


def get_dataset(name: str, params: str | Path | dict[str, Any] | None = "params.yaml") -> Dataset:
    """One dataset by name; the error lists the defined ones."""
    datasets = load_datasets(params)
    if name not in datasets:
        raise ValueError(f"unknown dataset {name!r}; defined in params 'datasets': {sorted(datasets) or 'none'}")
    return datasets[name]


def load_pipeline(params: str | Path | dict[str, Any] | None = "params.yaml") -> PipelineParams:
    """The ``pipeline`` section, checked against ``datasets`` and ``applications``."""
    from mapex_core.apps import load_applications

    data, source = read_params(params)
    p = section(PipelineParams, data, "pipeline", source=source)
    datasets = load_datasets(data)
    bad = [d for d in p.pretrain_datasets if d not in datasets]
    if bad:
        raise ValueError(f"{source}: pipeline.pretrain_datasets names unknown dataset(s) {bad}; "
                         f"defined: {sorted(datasets)}")
    apps = load_applications(params if not isinstance(params, dict) else data)
    bad = [a for a in p.apps if a not in apps]
    if bad:
        raise ValueError(f"{source}: pipeline.apps names unknown application(s) {bad}; registered: {sorted(apps)}")
    elsewhere = [a for a in p.apps if a not in (data.get("applications") or {})]
    if elsewhere:
        raise ValueError(f"{source}: pipeline.apps {elsewhere} must be defined in this file's 'applications' "
                         "(dvc.yaml's stages track that section), not in applications.yaml")
    return p


def check_params_file(params: str | Path) -> None:
    """The pipeline (``dvc.yaml``) reads ``./params.yaml``: refuse any other file, and a folder without ``dvc.yaml``.

    Raises:
        ValueError: ``params`` is not ``./params.yaml`` or the current folder has no ``dvc.yaml``.
    """
    if Path(params).resolve() != PARAMS.resolve():
        raise ValueError(f"the pipeline reads ./params.yaml (dvc.yaml's stages do), not {params}; edit params.yaml "
                         "or run from the project folder that holds it")
    if not Path("dvc.yaml").is_file():
        raise ValueError(f"{Path.cwd()} has no dvc.yaml: run the pipeline from the project folder")


def pipeline_apps(params: str | Path | dict[str, Any] = "params.yaml", apps: list[str] | None = None) -> list[str]:
    """``apps`` checked against the pipeline (default: all of ``pipeline.apps``).

    Raises:
        ValueError: an unknown application, or one not in ``pipeline.apps`` (``dvc.yaml``'s per-app
            stages exist only for those).
    """
    from mapex_core.apps import load_applications

    p = load_pipeline(params)
    if not apps:
        return list(p.apps)
    data, source = read_params(params)
    known = load_applications(params if not isinstance(params, dict) else data)
    unknown = [a for a in apps if a not in known]
    if unknown:
        raise ValueError(f"unknown application(s) {unknown}; registered: {sorted(known)}")
    elsewhere = [a for a in apps if a not in (data.get("applications") or {})]
    if elsewhere:
        raise ValueError(f"application(s) {elsewhere} are not defined in {source} 'applications' (dvc.yaml's stages "
                         "track that section only); move them there to run them in the pipeline")
    outside = [a for a in apps if a not in p.apps]
    if outside:
        raise ValueError(f"application(s) {outside} are not in pipeline.apps of {source} {p.apps}: the pipeline "
                         "(dvc.yaml) has stages only for those; add them there")
    return list(apps)


@dataclass(frozen=True)
class AppPaths:
    """Where the stages of one application write."""

    pruned: Path
    finetuned: Path
    evaluation: Path
    metrics: Path


def app_paths(app: str) -> AppPaths:
    """The fixed output layout of application ``app`` (relative to the project root)."""
    return AppPaths(pruned=APPS_DIR / app / "pruned", finetuned=APPS_DIR / app / "finetuned",
                    evaluation=REPORTS_DIR / app / "evaluation.json", metrics=REPORTS_DIR / app / "metrics.json")


def pretrain_chips(params: str | Path | dict[str, Any] = "params.yaml") -> list[Path]:
    """The chip stores pre-training reads: those of ``pipeline.pretrain_datasets``."""
    data, source = read_params(params)
    p = load_pipeline(params)
    if not p.pretrain_datasets:
        raise ValueError(f"{source}: pipeline.pretrain_datasets is empty; list the datasets to pre-train on "
                         "or pass --chips")
    datasets = load_datasets(data)
    return [Path(datasets[d].out) for d in p.pretrain_datasets]



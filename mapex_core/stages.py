"""The pipeline's stages, each one function: what `mapex <stage>`, `dvc repro` and the Prefect flows run.

Every stage reads its knobs from ``params.yaml`` and writes to the fixed layout below, so the
DVC stage (which calls the CLI) and the Prefect task (which calls the function) produce the same
files::

    data/raw/                               samples
    <datasets.NAME.out>                     ingest@NAME (a chip store), validated by validate@NAME
    reports/validation/NAME/                validation.json + Great Expectations Data Docs
    outputs/pretrain/                       pretrain: config.json, model.safetensors, metrics.json, loss.csv
    outputs/apps/APP/pruned/                prune@APP: pruned model + prune_report.json
    outputs/apps/APP/finetuned/             finetune@APP: task model + finetune.json
    reports/APP/evaluation.json, metrics.json  evaluate@APP
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapex_core.apps import NAME
from mapex_core.params import load_params

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


def _params(params: str | Path | dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    if isinstance(params, dict):
        return params, "params"
    path = Path(params) if params is not None else Path("params.yaml")
    return load_params(path), str(path)


def load_datasets(params: str | Path | dict[str, Any] | None = "params.yaml") -> dict[str, Dataset]:
    """The ``datasets`` section.

    Raises:
        ValueError: unknown keys, a missing ``source``/``out``, or an ``out`` not named ``NAME.zarr``
            (the validation report folder and the DVC stage are named after the dataset).
    """
    data, source = _params(params)
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
    from mapex_core.params import section

    data, source = _params(params)
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
    if Path(params).resolve() != Path("params.yaml").resolve():
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
    data, source = _params(params)
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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# --- the stages -------------------------------------------------------------------------------------

def ingest_stage(dataset: str, params: str | Path = "params.yaml",
                 progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Ingest dataset ``dataset`` of ``params`` into its chip store (validated)."""
    from mapex_core.data.ingest import DataParams, ingest
    from mapex_core.data.validation import ValidationParams
    from mapex_core.params import section

    data, source = _params(params)
    ds = get_dataset(dataset, data)
    dp = section(DataParams, data, "data", source=source, chip_size=ds.chip_size, stride=ds.stride,
                 split_block=ds.split_block, crs=ds.crs, resolution=ds.resolution)
    vp = section(ValidationParams, data, "validation", source=source)
    return ingest(ds.source, ds.out, layout=ds.layout, params=dp, validation=vp, reports_dir=REPORTS_DIR,
                  labels=ds.labels, label_attribute=ds.label_attribute, classes=ds.classes, progress=progress)


def pretrain_chips(params: str | Path | dict[str, Any] = "params.yaml") -> list[Path]:
    """The chip stores pre-training reads: those of ``pipeline.pretrain_datasets``."""
    data, source = _params(params)
    p = load_pipeline(params)
    if not p.pretrain_datasets:
        raise ValueError(f"{source}: pipeline.pretrain_datasets is empty; list the datasets to pre-train on "
                         "or pass --chips")
    datasets = load_datasets(data)
    return [Path(datasets[d].out) for d in p.pretrain_datasets]


def checkpoint_matches(ckpt: Path, config: Any, params: Any, chips: list[Path]) -> bool:
    """Whether checkpoint ``ckpt`` was written by a run with ``config``, ``params`` and ``chips``' statistics."""
    from dataclasses import asdict

    from mapex_core.data.chips import pooled_normalization
    from mapex_core.training.pretrain import open_stores

    if config.normalization is None:
        config = type(config).from_dict({**config.to_dict(), "normalization": pooled_normalization(
            open_stores(chips, config, list(params.splits)))})
    try:
        saved_cfg = json.loads((ckpt / "config.json").read_text())
        state = json.loads((ckpt / "trainer.json").read_text())
    except (OSError, ValueError):
        return False
    same_config = json.loads(json.dumps(config.to_dict())) == saved_cfg
    return same_config and json.loads(json.dumps(asdict(params))) == state.get("params")


def prune_stage(app: str, params: str | Path = "params.yaml", device: str | None = None) -> dict[str, Any]:
    """Prune the pre-trained model for ``app`` into ``outputs/apps/APP/pruned``."""
    from mapex_core.apps import get_application
    from mapex_core.training.prune import prune_app

    application = get_application(app, params)
    return prune_app(application, PRETRAIN_DIR, _chips(application), app_paths(application.name).pruned,
                     device=device or load_pipeline(params).device)


def finetune_stage(app: str, params: str | Path = "params.yaml", device: str | None = None) -> dict[str, Any]:
    """Fine-tune ``app``'s pruned model into ``outputs/apps/APP/finetuned``."""
    from mapex_core.apps import get_application
    from mapex_core.training.finetune import finetune_app

    application = get_application(app, params)
    paths = app_paths(application.name)
    return finetune_app(application, paths.pruned, _chips(application), paths.finetuned,
                        device=device or load_pipeline(params).device)


def evaluate_stage(app: str, params: str | Path = "params.yaml", device: str | None = None) -> dict[str, Any]:
    """Evaluate ``app`` (pruned vs unpruned vs scratch); writes ``reports/APP/{evaluation,metrics}.json``."""
    from mapex_core.apps import get_application
    from mapex_core.training.finetune import evaluate_app

    application = get_application(app, params)
    paths = app_paths(application.name)
    report = evaluate_app(application, paths.finetuned, _chips(application), paths.evaluation,
                          device=device or load_pipeline(params).device, pretrained=PRETRAIN_DIR)
    _write_json(paths.metrics, summary_metrics(report))
    return report


def summary_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The flat numbers of an evaluation report (DVC metrics, MLflow metrics, the gate)."""
    out: dict[str, Any] = {"metric": report["metric"], "test_chips": report["test_chips"]}
    for variant in ("pruned", "unpruned", "scratch"):
        v = report[variant]
        out[variant] = {"value": v["value"], "ci95_low": v["ci95"][0], "ci95_high": v["ci95"][1],
                        "params": v["params"], "checkpoint_bytes": v["checkpoint_bytes"],
                        "latency_ms": v["latency_ms"]}
    return out


def _chips(application: Any) -> Path:
    if not application.chips:
        raise ValueError(f"application {application.name!r} has no 'chips' (the chip store it is trained on)")
    return Path(application.chips)


def stage_summary(stage: str) -> dict[str, Any]:
    """A small JSON summary of DVC stage ``stage``'s outputs (what the flows report and cache)."""
    kind, _, name = stage.partition("@")

    def read(path: Path) -> dict[str, Any]:
        return json.loads(Path(path).read_text())

    if kind in ("ingest", "validate"):
        v = read(REPORTS_DIR / "validation" / name / "validation.json")
        return {"dataset": name, "out": get_dataset(name, "params.yaml").out,
                **{k: v.get(k) for k in ("chips", "success", "failed_share")}, "quarantined": len(v.get("quarantine", []))}
    if kind == "pretrain":
        m = read(PRETRAIN_DIR / "metrics.json")
        return {k: m.get(k) for k in ("final_loss", "tokens_per_s", "samples_seen", "parameters", "specialisation")}
    paths = app_paths(name)
    if kind == "prune":
        r = read(paths.pruned / "prune_report.json")
        return {k: r[k] for k in ("app", "params_before", "params_after", "reduction", "kept_experts", "coverage")}
    if kind == "finetune":
        f = read(paths.finetuned / "finetune.json")
        return {"app": name, "best_val": f["history"]["best_val"], "parameters": f["parameters"]}
    if kind == "evaluate":
        return read(paths.metrics)
    raise ValueError(f"no summary for stage {stage!r}")

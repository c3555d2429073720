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
    source: list[str] = typer.Option(None, help="Sample source(s); default: all (bigearthnet)."),
    force: bool = typer.Option(False, help="Fetch again even if already complete."),
) -> None:
    """Obtain real sample imagery from the package index (idempotent).

    bigearthnet: 6 BigEarthNet v1 S1+S2 patch pairs from the wheel bigearthnet-common==2.8.0.
    """
    from mapex_core.data.samples import fetch_samples

    try:
        got = fetch_samples(dest, source or None, force=force)
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc))
    _print_json({name: str(p) for name, p in got.items()})


@app.command()
def ingest(
    source: Path = typer.Option(..., help="Folder of imagery."),
    out: Path = typer.Option(Path("data/chips/chips.zarr"), help="Chip store to write (replaced atomically)."),
    layout: str = typer.Option("auto", help="Layout: auto or bigearthnet (BigEarthNet v1 folders)."),
    chip_size: int = typer.Option(None, help="Chip height and width in pixels (params data.chip_size, else 64)."),
    stride: int = typer.Option(None, help="Chip stride in pixels (params data.stride, else the chip size)."),
    seed: int = typer.Option(None, help="Seed of the spatially blocked split (params data.seed, else 0)."),
    params: Path = typer.Option(None, help="params.yaml whose 'data' section gives the defaults "
                                "(default: ./params.yaml when it exists)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Co-register, chip and store imagery as a chip store; prints a JSON summary."""
    from mapex_core.data.ingest import DataParams
    from mapex_core.data.ingest import ingest as run_ingest
    from mapex_core.params import load_params, section

    path = params if params is not None else (DEFAULT_PARAMS if DEFAULT_PARAMS.is_file() else None)
    try:
        dp = section(DataParams, load_params(path), "data", source=str(path),
                     chip_size=chip_size, stride=stride, seed=seed)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))

    with _progress(quiet) as prog:
        task = prog.add_task("ingest", total=None, info="")

        def cb(done: int, total: int, name: str) -> None:
            prog.update(task, completed=done, total=total, info=name)

        try:
            summary = run_ingest(source, out, layout=layout, chip_size=dp.chip_size, stride=dp.stride,
                                 seed=dp.seed, progress=cb)
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
    _print_json(summary)


@app.command()
def pretrain(
    chips: Path = typer.Option(..., help="Chip store to pre-train on."),
    out: Path = typer.Option(..., help="Output directory (model, metrics, checkpoints)."),
    params: Path = typer.Option(None, help="params.yaml with 'model' and 'pretrain' sections "
                                "(default: ./params.yaml when it exists)."),
    steps: int = typer.Option(None, help="Optimisation steps (overrides params)."),
    batch_size: int = typer.Option(None, help="Batch size (overrides params)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (bf16 autocast on CUDA)."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in OUT/checkpoints."),
    overwrite: bool = typer.Option(False, help="Start over, deleting an earlier run's checkpoints in OUT."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Pre-train a MAPEX model (multi-modal masked autoencoder) on a chip store.

    Writes OUT/config.json, OUT/model.safetensors, OUT/metrics.json (loss curve, tokens/s,
    specialisation per modality) and OUT/routing_stats.json.
    """
    from mapex_core.model import MapexConfig
    from mapex_core.params import load_params, section
    from mapex_core.training.pretrain import PretrainParams
    from mapex_core.training.pretrain import pretrain as run_pretrain

    path = params if params is not None else (DEFAULT_PARAMS if DEFAULT_PARAMS.is_file() else None)
    try:
        p = load_params(path)
        cfg = section(MapexConfig, p, "model", source=str(path))
        tp = section(PretrainParams, p, "pretrain", source=str(path), steps=steps, batch_size=batch_size)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        _fail(str(exc))
    with _progress(quiet) as prog:
        task = prog.add_task("pretrain", total=tp.steps, info="")

        def cb(step: int, total: int, logs: dict[str, float]) -> None:
            prog.update(task, completed=step, info=f"loss {logs['loss']:.4f}  lr {logs['lr']:.2e}")

        try:
            metrics = run_pretrain(chips, out, cfg, tp, device=device, resume=resume, overwrite=overwrite,
                                   on_step=cb)
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
    summary = {k: metrics[k] for k in ("final_loss", "tokens_per_s", "samples_per_s", "specialisation",
                                       "parameters", "num_chips", "device")}
    summary["outputs"] = {n: str(out / n) for n in ("config.json", "model.safetensors", "metrics.json",
                                                    "routing_stats.json", "checkpoints")}
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


def main() -> None:
    """Entry point of the ``mapex`` console script."""
    app()


if __name__ == "__main__":
    main()

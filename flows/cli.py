"""The ``mapex`` console script: the library's commands (:mod:`mapex_core.cli`) plus the orchestration
ones, ``retrain`` and ``deploy``, which need Prefect (``mapex_core`` never imports it)."""

from __future__ import annotations

from pathlib import Path

import typer

from mapex_core.cli import EX_TEMPFAIL, _fail, _print_json, app
from mapex_core.cli import main as core_main


@app.command()
def retrain(
    app_names: list[str] = typer.Option(None, "--app", help="Application(s) to retrain; repeat for several "
                                        "(default: pipeline.apps of params.yaml)."),
    samples: bool = typer.Option(True, help="Fetch the sample imagery first (--no-samples for your own data)."),
    dask: str = typer.Option(None, help="Ingest on Dask: 'local' (a local cluster) or a scheduler address "
                             "(tcp://host:8786)."),
) -> None:
    """Run the weekly `retrain` Prefect flow here: every stage, every app, registry and gate.

    ingest -> validate -> pretrain -> per app prune -> finetune -> evaluate -> register in MLflow +
    promotion gate. Unchanged stages are skipped (cached).

    Runs locally with no server (Prefect's temporary API, MLflow's sqlite store under mlflow/, DVC);
    records every stage in dvc.lock, so `dvc repro` afterwards finds the pipeline up to date.
    Knobs: params.yaml (the file dvc.yaml reads).
    """
    from dvc.exceptions import DvcException

    from mapex_core import lineage, tracking
    from mapex_core.stages import check_params_file, pipeline_apps

    try:
        check_params_file("params.yaml")
        names = pipeline_apps("params.yaml", list(app_names or []))
        tracking.configure()
    except (FileNotFoundError, ValueError, tracking.TrackingError) as exc:
        _fail(str(exc))
    from flows.pipeline import AppsFailed, summary_markdown
    from flows.pipeline import retrain as retrain_flow

    try:
        rows = retrain_flow(apps=names, fetch_samples=samples, ingest_on_dask=dask)
    except AppsFailed as exc:
        typer.echo(summary_markdown(exc.rows, failed=exc.failed))
        _fail(str(exc))
    except lineage.StageFailed as exc:
        _fail(str(exc), EX_TEMPFAIL if exc.transient else 1)
    except (FileNotFoundError, ValueError, DvcException, tracking.TrackingError) as exc:
        _fail(f"{type(exc).__name__}: {exc}")
    typer.echo(summary_markdown(rows))
    typer.echo("Where to look:\n"
               f"  MLflow UI       bash mlflow/server.sh, then http://127.0.0.1:5000 (store {tracking.tracking_uri()})\n"
               "  models          outputs/pretrain/, outputs/apps/<app>/{pruned,finetuned}/\n"
               "  dashboard       reports/dashboard/index.html (open from disk, or `mapex dashboard --serve`)\n"
               "  reports         reports/<app>/evaluation.json, reports/validation/*/data_docs/index.html\n"
               "  lineage         dvc.lock (dvc status, dvc repro, dvc metrics show, dvc plots show, dvc push)\n"
               "  Prefect runs    PREFECT_HOME=.prefect prefect flow-run ls; artifact 'retrain-summary'")


@app.command()
def deploy(
    params: Path = typer.Option(Path("params.yaml"), help="params.yaml (pipeline.schedule / pipeline.timezone)."),
    cron: str = typer.Option(None, help="Cron of the scheduled retrain (default: pipeline.schedule, weekly)."),
    timezone: str = typer.Option(None, help="Time zone of the schedule (default: pipeline.timezone)."),
    serve: bool = typer.Option(False, help="Run the schedules from this process instead of work pools "
                               "(blocks; no worker needed, the server still is)."),
) -> None:
    """Register the Prefect deployments: scheduled retrain (pool cpu), pre-training (pool gpu).

    Against the Prefect server of PREFECT_API_URL: `retrain` on a cron schedule on work pool `cpu`,
    pre-training on work pool `gpu` (see README: workers, Kubernetes).
    """
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        _fail("no Prefect server configured: start one (`prefect server start --host 127.0.0.1`) and "
              "export PREFECT_API_URL=http://127.0.0.1:4200/api (or set it in your Prefect profile)")
    from flows import deployments

    try:
        if serve:
            deployments.serve(str(params), cron, timezone)
            return
        _print_json({"deployments": deployments.deploy(str(params), cron, timezone)})
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - httpx / Prefect HTTP errors: the server is the problem
        if type(exc).__module__.split(".")[0] not in ("httpx", "httpcore", "prefect"):
            raise
        _fail(f"Prefect server {api} did not accept the deployments: {type(exc).__name__}: {exc}")
    typer.echo("Start workers: `prefect worker start --pool cpu` (and `--pool gpu` on the GPU machine).", err=True)


def main() -> None:
    """Entry point of the ``mapex`` console script."""
    core_main()


if __name__ == "__main__":
    main()

"""The orchestration commands of ``mapex``: ``retrain``, ``deploy``, ``cluster`` and ``worker`` (they need
Prefect, which ``mapex_core`` never imports). ``pyproject.toml`` declares them under the ``mapex.commands`` entry
points, so :func:`mapex_core.cli.main` adds them to the one ``mapex`` program."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from mapex_core.cli import fail, print_json


def _line(row) -> str:  # noqa: ANN001 - mapex_core.progress.StageRow
    from mapex_core.progress import format_seconds

    when = time.strftime("%H:%M:%S")
    if row.state == "running":
        return f"[{when}] {row.name}: running"
    return f"[{when}] {row.name}: {row.state} in {format_seconds(row.elapsed)}"


def _table(board):  # noqa: ANN001, ANN202 - a StageBoard -> a rich Table
    from rich.table import Table

    from mapex_core.progress import format_seconds

    colours = {"waiting": "dim", "running": "bold cyan", "cached": "green", "done": "green", "failed": "bold red"}
    table = Table(title="mapex retrain", title_justify="left", box=None, pad_edge=False)
    for col in ("stage", "state", "time", "progress"):
        table.add_column(col)
    for row in board.snapshot():
        detail = ""
        if row.state == "running" and row.total:
            detail = f"{row.done}/{row.total}  {row.info}"
        elif row.state == "running" and row.info:
            detail = row.info
        table.add_row(row.name, f"[{colours[row.state]}]{row.state}[/]", format_seconds(row.elapsed), detail)
    return table


@contextmanager
def watch(board) -> Iterator[None]:  # noqa: ANN001 - mapex_core.progress.StageBoard
    """Show ``board`` while the block runs: a live table on a terminal, else a log line per stage start and end."""
    if not sys.stderr.isatty():
        board.on_change = lambda row: print(_line(row), file=sys.stderr, flush=True)
        yield
        return
    from rich.console import Console
    from rich.live import Live

    with Live(_table(board), console=Console(stderr=True), refresh_per_second=2, transient=False) as live:
        stop = False

        def refresh() -> None:
            while not stop:
                live.update(_table(board))
                time.sleep(0.5)

        import threading

        thread = threading.Thread(target=refresh, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop = True
            thread.join(2)
            live.update(_table(board))


def retrain(
    app_names: list[str] = typer.Option(None, "--app", help="Application(s) to retrain; repeat for several "
                                        "(default: pipeline.apps of params.yaml)."),
    samples: bool = typer.Option(True, help="Fetch the sample imagery first (--no-samples for your own data)."),
    dask: str = typer.Option(None, help="Ingest on Dask: 'local' (a local cluster) or a scheduler address "
                             "(tcp://host:8786)."),
) -> None:
    """Run the weekly `retrain` Prefect flow here: every stage, every app, registry and gate.

    ingest -> validate -> pretrain -> per app prune -> finetune -> evaluate -> register in MLflow +
    promotion gate. Unchanged stages are skipped (cached). Shows each stage's state, time and
    progress as it runs (one log line per stage start and end without a terminal).

    Runs locally with no server (Prefect's temporary API, MLflow's sqlite store under mlflow/, DVC);
    records every stage in dvc.lock, so `dvc repro` afterwards finds the pipeline up to date.
    Knobs: params.yaml (the file dvc.yaml reads).
    """
    from dvc.exceptions import DvcException

    from mapex_core import lineage, progress, project, tracking
    from mapex_core.errors import EX_TEMPFAIL

    try:
        project.check_params_file(project.PARAMS)
        names = project.pipeline_apps(project.PARAMS, list(app_names or []))
        tracking.configure()
    except (FileNotFoundError, ValueError, tracking.TrackingError) as exc:
        fail(str(exc))
    from flows.pipeline import AppsFailed, plan, summary_markdown
    from flows.pipeline import retrain as retrain_flow

    board = progress.StageBoard(plan(names, str(project.PARAMS), samples))
    try:
        with progress.use_board(board), watch(board):
            rows = retrain_flow(apps=names, fetch_samples=samples, ingest_on_dask=dask)
    except AppsFailed as exc:
        typer.echo(summary_markdown(exc.rows, failed=exc.failed))
        fail(str(exc))
    except lineage.StageFailed as exc:
        fail(str(exc), EX_TEMPFAIL if exc.transient else 1)
    except (FileNotFoundError, ValueError, DvcException, tracking.TrackingError) as exc:
        fail(f"{type(exc).__name__}: {exc}")
    typer.echo(summary_markdown(rows))
    typer.echo("Where to look:\n"
               f"  MLflow UI       bash mlflow/server.sh, then http://127.0.0.1:5000 (store {tracking.tracking_uri()})\n"
               "  models          outputs/pretrain/, outputs/apps/<app>/{pruned,finetuned}/\n"
               "  dashboard       reports/dashboard/index.html (open from disk, or `mapex dashboard --serve`)\n"
               "  reports         reports/<app>/evaluation.json, reports/validation/*/data_docs/index.html\n"
               "  lineage         dvc.lock (dvc status, dvc repro, dvc metrics show, dvc plots show, dvc push)\n"
               "  Prefect runs    PREFECT_HOME=.prefect prefect flow-run ls; artifact 'retrain-summary'")


def deploy(
    params: Path = typer.Option(Path("params.yaml"), help="params.yaml (pipeline.schedule / pipeline.timezone)."),
    cron: str = typer.Option(None, help="Cron of the scheduled retrain (default: pipeline.schedule, weekly)."),
    timezone: str = typer.Option(None, help="Time zone of the schedule (default: pipeline.timezone)."),
    serve: bool = typer.Option(False, help="Run the schedules from this process instead of work pools "
                               "(blocks; no worker needed, the server still is)."),
    repo: str = typer.Option(None, help="Git repository the workers clone at this commit (default: the "
                             "project's origin; with none, flow runs use this folder: one machine)."),
) -> None:
    """Register the Prefect deployments: scheduled retrain (pool cpu), pre-training (pool gpu).

    Against the Prefect server of PREFECT_API_URL: `retrain` on a cron schedule on work pool `cpu`,
    pre-training on work pool `gpu` (see README: workers, Kubernetes).
    """
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        fail("no Prefect server configured: start one (`prefect server start --host 127.0.0.1`) and "
             "export PREFECT_API_URL=http://127.0.0.1:4200/api (or set it in your Prefect profile)")
    from flows import deployments

    try:
        if serve:
            deployments.serve(str(params), cron, timezone)
            return
        print_json({"deployments": deployments.deploy(str(params), cron, timezone, repo=repo)})
    except (FileNotFoundError, ValueError):
        raise
    except Exception as exc:  # httpx / Prefect HTTP errors: the server is the problem
        if type(exc).__module__.split(".")[0] not in ("httpx", "httpcore", "prefect"):
            raise
        fail(f"Prefect server {api} did not accept the deployments: {type(exc).__name__}: {exc}")
    typer.echo("Start workers: `mapex worker --pool cpu` (and `--pool gpu` on the GPU machine).", err=True)


def cluster(
    action: str = typer.Argument(..., help="up, down or status."),
    clean: bool = typer.Option(False, "--clean", help="With down: also remove the data (databases, objects)."),
    cluster_dir: Path = typer.Option(Path(".cluster"), "--dir", help="Folder of the cluster's data, logs and env."),
) -> None:
    """Start, stop or show the team's servers on this host: PostgreSQL, S3 (SeaweedFS), MLflow, Prefect.

    `up` starts what is not running (bound to 127.0.0.1) and writes DIR/env, the `export` lines a
    worker sources (`source .cluster/env && mapex worker --pool cpu`); `down` stops everything and
    keeps the data (--clean removes it). Ports: MAPEX_PG_PORT, MAPEX_S3_PORT, MAPEX_MLFLOW_PORT,
    MAPEX_PREFECT_PORT at the first `up` (0 = any free port).
    """
    from flows import cluster as servers

    if action == "up":
        out = servers.up(cluster_dir, log=lambda m: typer.echo(m, err=True))
        print_json(out)
        said = f"cluster up in {out['seconds']} s" if out["started"] else "cluster already running"
        typer.echo(f"{said}; workers: `source {out['env']} && mapex worker --pool cpu` (or --pool gpu)", err=True)
    elif action == "down":
        print_json(servers.down(cluster_dir, clean=clean))
    elif action == "status":
        print_json(servers.status(cluster_dir))
    else:
        fail(f"unknown action {action!r}: expected up, down or status")


def worker(
    pool: str = typer.Option(..., "--pool", help="Work pool: cpu, or gpu on a GPU machine."),
    env_file: Path = typer.Option(Path(".cluster/env"), help="Export lines of the cluster (variables already "
                                  "set win)."),
    name: str = typer.Option(None, help="Worker name (default: POOL-HOST-PID)."),
    limit: int = typer.Option(None, min=1, help="At most this many flow runs at once."),
) -> None:
    """Run a Prefect worker of work pool POOL for the cluster of ENV_FILE (creating the pool if absent).

    Run it in a clone of this repository with `make setup` done; the cluster's S3 remote becomes
    the clone's default DVC remote (.dvc/config.local). Stop it with Ctrl-C or SIGTERM.
    """
    from flows import cluster as servers

    servers.run_worker(pool, env_file, name, limit, log=lambda m: typer.echo(m, err=True))


def main() -> None:
    """``python -m flows.cli``: the ``mapex`` program (its commands and these)."""
    from mapex_core.cli import main as mapex_main

    mapex_main()


if __name__ == "__main__":
    main()

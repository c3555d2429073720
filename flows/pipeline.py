"""Prefect flows of the MAPEX pipeline: ingest, pretrain, prune, finetune, evaluate, and retrain.

Thin by design. A stage task runs the DVC stage's own command from ``dvc.yaml`` (a ``mapex``
command, i.e. one :mod:`mapex_core.stages` function) in its own process, exactly what
``dvc repro`` runs, then records the outputs in ``dvc.lock`` (:func:`mapex_core.lineage.commit_stage`):
both paths produce the same files, and ``dvc repro`` after a flow finds everything up to date.
Own processes also keep concurrent applications apart (RNG, memory, GPU context). Flows run in the
project folder (the one holding ``dvc.yaml`` and ``params.yaml``).

Progress: each stage's state, time and progress go to the run's :class:`mapex_core.progress.StageBoard`
(``mapex retrain`` shows it live), which also shares the CPUs among the stage processes running at
once: a stage starting beside another gets half the cores, the last one running gets them all.

Caching: a stage task's cache key is :func:`mapex_core.lineage.stage_key`, a hash of the stage's
command, its dependencies' DVC content hashes and its params, so an unchanged stage is skipped on
re-run (state ``Cached``). Right before a stage is started (its upstream stages are done), ``dvc
status`` is asked about it: if DVC sees anything to do (outputs missing or edited by hand, or the
outputs on disk are from other params than those the cache record was made with), the stage runs
and its cache record is refreshed.
Retries: a command that exits 75 (EX_TEMPFAIL: an I/O error, a timeout), a locked sqlite store or
a lost connection are retried with exponential backoff; bad input and bugs are not.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from mapex_core import lineage, progress, project, runtime, stages

# restores the thread variables a local Dask cluster's nannies set in the flow's process
from mapex_core.data.distributed_ingest import DASK_ENV, restored_environ

PARAMS = str(project.PARAMS)  # the project's params file: dvc.yaml's stages read this one
WORKERS = 2  # datasets / applications processed at once; the board shares the cores among their stages
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.EBUSY}


def is_transient(exc: BaseException) -> bool:
    """Whether a failure is worth retrying: I/O trouble, timeouts, a busy lock; never a bad input or a bug."""
    from dvc.lock import LockError

    if isinstance(exc, lineage.StageFailed):
        return exc.transient
    if isinstance(exc, sqlite3.OperationalError) or any(c.__name__ == "MlflowException" for c in type(exc).__mro__):
        return "locked" in str(exc) or "busy" in str(exc)
    if isinstance(exc, TimeoutError | ConnectionError | LockError):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key of a stage task: the DVC stage's command, dependency hashes and params
    (not ``env``: progress file and threads change how it is watched and its speed, not its result)."""
    stage = parameters["stage"]
    return f"mapex-{stage}-{lineage.stage_key(stage)}"


RETRY = {"retries": 2, "retry_delay_seconds": exponential_backoff(backoff_factor=5),
         "retry_condition_fn": _retry_if_transient}


@task(name="stage", task_run_name="{stage}", cache_key_fn=stage_cache_key, persist_result=True,
      result_serializer="json", **RETRY)
def stage_task(stage: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run DVC stage ``stage``'s command, record its outputs in ``dvc.lock``, return its summary."""
    lineage.run_stage(stage, log=get_run_logger().info, env=env)
    lineage.commit_stage(stage)
    return stages.stage_summary(stage)


@dataclass
class BoardEntry:
    """A stage on the run's board: the environment its process gets (progress file, threads) and the
    state it ends in (``done`` unless the block says ``cached``; ``failed`` on an exception)."""

    env: dict[str, str] = field(default_factory=dict)
    state: str = "done"


@contextmanager
def on_board(stage: str, threads: int | None = None) -> Iterator[BoardEntry]:
    """Mark ``stage`` running on the run's board (if there is one) for the duration of the block;
    its process gets ``threads`` intra-op threads (default: torch's, every core)."""
    board = progress.board()
    entry = BoardEntry(board.start(stage, threads) if board is not None else progress.stage_threads_env(threads))
    try:
        yield entry
    except BaseException:
        if board is not None:
            board.finish(stage, "failed")
        raise
    if board is not None:
        board.finish(stage, entry.state)


def run_stage(stage: str, threads: int | None = None) -> dict[str, Any]:
    """Run :func:`stage_task` now (its upstream stages are done): from the cache when DVC finds the
    stage up to date and a cache record exists, else for real (refreshing the record)."""
    with on_board(stage, threads) as entry:
        state = stage_task.with_options(refresh_cache=lineage.stage_changed(stage))(stage, entry.env,
                                                                                     return_state=True)
        if state.name == "Cached":
            entry.state = "cached"
        return state.result()


@task(name="samples", cache_policy=None, **RETRY)
def samples_task() -> dict[str, Any]:
    """Fetch the sample imagery (idempotent) and record ``data/raw`` in DVC."""
    with on_board("samples") as entry:
        lineage.run_stage("samples", log=get_run_logger().info, env=entry.env)
        return lineage.commit_stage("samples")


def stage_threads(concurrent: int) -> int:
    """Intra-op threads of each stage process when ``concurrent`` chains run at once (no oversubscription).

    Fixed for the whole phase, whatever finishes first: a stage's thread count changes its weights,
    and they must not depend on timing. Cores that free up go to the stages through the board's
    ``.cores`` files instead (evaluation trains its comparison models at once).
    """
    return runtime.share_threads(concurrent)


@task(name="dataset", task_run_name="dataset-{dataset}", cache_policy=None)
def dataset_chain(dataset: str, threads: int | None = None) -> dict[str, Any]:
    """Ingest then validate one dataset (runs on the flow's task runner: threads or Dask workers)."""
    return {"ingest": run_stage(f"ingest@{dataset}", threads), "validate": run_stage(f"validate@{dataset}", threads)}


@task(name="track-pretrain", cache_policy=None, **RETRY)
def track_pretrain_task(params: str = PARAMS) -> dict[str, Any]:
    """Log the pre-training run and register ``mapex-pretrained`` (idempotent on the weights)."""
    return stages.register_pretrained(params)


@task(name="register", task_run_name="register-{app}", cache_policy=None, **RETRY)
def register_task(app: str, pretrain_run: dict[str, Any], params: str = PARAMS) -> dict[str, Any]:
    """Register ``mapex-<app>`` and apply the promotion gate (idempotent on the weights)."""
    with on_board(f"register@{app}"):
        return stages.register(app, params, pretrain_run)


@task(name="dashboard", cache_policy=None)
def dashboard_task(params: str = PARAMS) -> dict[str, Any]:
    """Regenerate the team dashboard (``reports/dashboard/index.html``) and link it from a Prefect artifact."""
    from pathlib import Path

    from mapex_core.dashboard import DEFAULT_OUT, write_dashboard

    summary = write_dashboard(DEFAULT_OUT, params=params)
    create_link_artifact(key="mapex-dashboard", link=Path(summary["index"]).resolve().as_uri(),
                         link_text="MAPEX dashboard: per-task models", description="Open from this machine's disk")
    return summary


@task(name="application", task_run_name="application-{app}", cache_policy=None)
def app_chain(app: str, pretrain_run: dict[str, Any], params: str = PARAMS,
              threads: int | None = None) -> dict[str, Any]:
    """prune -> finetune -> evaluate -> register + gate for one application; its summary row (under
    ``prune.target: smallest_within_tolerance`` the prune stage is the accuracy-size sweep)."""
    prune = run_stage(f"prune@{app}", threads)
    run_stage(f"finetune@{app}", threads)
    metrics = run_stage(f"evaluate@{app}", threads)
    return summary_row(app, prune, metrics, register_task(app, pretrain_run, params), params)


def plan(apps: list[str], params: str = PARAMS, fetch_samples: bool = True) -> list[str]:
    """The stages a retrain of ``apps`` runs, in order (the rows of its progress board)."""
    datasets = list(project.load_datasets(params))
    return ((["samples"] if fetch_samples else []) + [f"{k}@{d}" for d in datasets for k in ("ingest", "validate")]
            + ["pretrain"] + [f"{k}@{a}" for a in apps for k in ("prune", "finetune", "evaluate", "register")]
            + ["dashboard"])


@contextmanager
def run_board(stages_planned: list[str]) -> Iterator[progress.StageBoard]:
    """The board of this run: the caller's (``mapex retrain`` watches it), else one of its own (for the
    thread sharing; a deployment run on a worker has no terminal)."""
    board = progress.board()
    if board is not None:
        for s in stages_planned:
            board.rows.setdefault(s, progress.StageRow(s))
        yield board
        return
    with progress.use_board(progress.StageBoard(stages_planned)) as own:
        yield own


def _flow_setup(params: str) -> None:
    from mapex_core import tracking

    project.check_params_file(params)
    tracking.configure()  # fails fast, before any training, when the tracking server is unreachable


INGEST_DASK_ENV = "MAPEX_INGEST_DASK"  # `mapex ingest --dask` read from the environment by the stage commands


def dask_runner(address: str = "local", n_workers: int = 2) -> Any:
    """A Dask task runner: a local cluster of ``n_workers`` processes for ``local``, else the scheduler at ``address``."""
    from prefect_dask import DaskTaskRunner

    if address != "local":
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@contextmanager
def dask_scheduler(address: str = "local", n_workers: int = 2) -> Iterator[str]:
    """The address of a Dask scheduler: of a local cluster of ``n_workers`` single-threaded processes
    started for the block (``local``), else ``address`` itself."""
    if address != "local":
        yield address
        return
    import logging

    from distributed import LocalCluster

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster:
        yield cluster.scheduler_address


def _gather(futures: dict[str, Any]) -> tuple[dict[str, Any], dict[str, BaseException]]:
    done, failed = {}, {}
    for name, fut in futures.items():
        try:
            done[name] = fut.result()
        except Exception as exc:  # noqa: BLE001 - reported per item, raised after the others finish
            failed[name] = exc
    return done, failed


@flow(name="ingest", task_runner=ThreadPoolTaskRunner(max_workers=WORKERS))
def ingest_flow(datasets: list[str] | None = None, params: str = PARAMS) -> dict[str, Any]:
    """Ingest and validate datasets (default: all of ``params``' ``datasets``) concurrently on the task runner."""
    project.check_params_file(params)
    names = datasets or list(project.load_datasets(params))
    done, failed = _gather({d: dataset_chain.submit(d, stage_threads(min(WORKERS, len(names)))) for d in names})
    if failed:
        name, exc = next(iter(failed.items()))
        raise exc if len(failed) == 1 else RuntimeError(f"datasets {sorted(failed)} failed; {name}: {exc}")
    return done


def ingest_with_dask(datasets: list[str] | None = None, params: str = PARAMS, address: str = "local",
                     n_workers: int = 2) -> dict[str, Any]:
    """Run :func:`ingest_flow` with each dataset's *scenes* spread over Dask workers (a local cluster
    by default, or the scheduler at ``address``): the stage commands (``mapex ingest``, as in
    ``dvc.yaml``) find the scheduler in ``MAPEX_INGEST_DASK`` and write the same stores as without."""
    import os

    with restored_environ(DASK_ENV + (INGEST_DASK_ENV,)), dask_scheduler(address, n_workers) as scheduler:
        os.environ[INGEST_DASK_ENV] = scheduler
        return ingest_flow(datasets=datasets, params=params)


@flow(name="pretrain")
def pretrain_flow(params: str = PARAMS) -> dict[str, Any]:
    """Pre-train on the pipeline's chip stores and log the run to MLflow (deployed on work pool ``gpu``)."""
    _flow_setup(params)
    metrics = run_stage("pretrain")
    return {"metrics": metrics, "mlflow": track_pretrain_task(params)}


def _per_app(kind: str, apps: list[str] | None, params: str) -> dict[str, Any]:
    project.check_params_file(params)
    return {a: run_stage(f"{kind}@{a}") for a in project.pipeline_apps(params, apps)}


@flow(name="prune")
def prune_flow(apps: list[str] | None = None, params: str = PARAMS) -> dict[str, Any]:
    """Prune the pre-trained model for each application (default: ``pipeline.apps``)."""
    return _per_app("prune", apps, params)


@flow(name="finetune")
def finetune_flow(apps: list[str] | None = None, params: str = PARAMS) -> dict[str, Any]:
    """Fine-tune each application's pruned model."""
    return _per_app("finetune", apps, params)


@flow(name="evaluate")
def evaluate_flow(apps: list[str] | None = None, params: str = PARAMS) -> dict[str, Any]:
    """Evaluate each application (pruned vs unpruned vs scratch)."""
    return _per_app("evaluate", apps, params)


class AppsFailed(RuntimeError):
    """Some applications failed; the others were registered (their rows are in ``rows``)."""

    def __init__(self, failed: dict[str, BaseException], rows: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"application {a}: {e}" for a, e in failed.items()))
        self.failed, self.rows = failed, rows


@flow(name="retrain", task_runner=ThreadPoolTaskRunner(max_workers=WORKERS))
def retrain(apps: list[str] | None = None, params: str = PARAMS, fetch_samples: bool = True,
            ingest_on_dask: str | None = None) -> list[dict[str, Any]]:
    """The weekly job: samples -> ingest -> validate -> pretrain -> per app (concurrently)
    prune -> finetune -> evaluate -> register + promotion gate; a summary artifact at the end.

    Args:
        apps: applications to (re)train; default ``pipeline.apps`` of ``params``.
        params: the project's ``params.yaml`` (the file ``dvc.yaml`` reads).
        fetch_samples: fetch the sample imagery first (the demo); off for your own data.
        ingest_on_dask: ingest on Dask: ``local`` (a local cluster) or a scheduler address.

    Returns:
        One summary row per application (also the flow run's markdown artifact).

    Raises:
        AppsFailed: after every application ran, when some failed (the artifact lists the others).
    """
    names = project.pipeline_apps(params, apps)
    _flow_setup(params)
    with run_board(plan(names, params, fetch_samples)):
        rows, failed, dash, pretrain_run = _retrain(names, params, fetch_samples, ingest_on_dask)
    create_markdown_artifact(summary_markdown(rows, pretrain_run, failed, dash), key="retrain-summary",
                             description="MAPEX retrain: per-application models")
    get_run_logger().info("retrain finished: %s", ", ".join(f"{r['app']} v{r['version']} ({r['decision']})" for r in rows))
    if failed:
        raise AppsFailed(failed, rows)
    return rows


def _retrain(names: list[str], params: str, fetch_samples: bool, ingest_on_dask: str | None
             ) -> tuple[list[dict[str, Any]], dict[str, BaseException], str, dict[str, Any]]:
    """The stages of :func:`retrain`: rows, failed applications, dashboard page, pre-training run."""
    if fetch_samples:
        samples_task()
    if ingest_on_dask:
        ingest_with_dask(params=params, address=ingest_on_dask)
    else:
        ingest_flow(params=params)
    from flows import handoff

    pretrain_run, pools = handoff.pretrain_stage(params)
    if pools:  # each application's chain as its own flow run on pool cpu: several workers take them at once
        done, failed = _gather({a: handoff.app_on_pool.submit(a, pretrain_run, params) for a in names})
    else:
        threads = stage_threads(min(WORKERS, len(names)))
        done, failed = _gather({a: app_chain.submit(a, pretrain_run, params, threads) for a in names})
    rows = [done[a] for a in names if a in done]
    try:
        with on_board("dashboard"):
            dash = dashboard_task(params)["index"]
    except Exception as exc:  # the models are registered: report a broken page, do not fail the retrain for it
        get_run_logger().error("dashboard not written: %s", exc)
        dash = f"not written ({type(exc).__name__}: {exc})"
    return rows, failed, dash, pretrain_run


def summary_row(app: str, prune: dict[str, Any], metrics: dict[str, Any], reg: dict[str, Any],
                params: str = PARAMS) -> dict[str, Any]:
    """One application's line of the retrain summary."""
    from mapex_core.apps import get_application

    application = get_application(app, params)
    return {"app": app, "modalities": application.modalities, "metric": metrics["metric"],
            "params_full": metrics["unpruned"]["params"], "params_pruned": metrics["pruned"]["params"],
            "encoder_reduction": prune["reduction"],
            "pruned": metrics["pruned"]["value"], "unpruned": metrics["unpruned"]["value"],
            "scratch": metrics["scratch"]["value"], "version": reg["version"], "decision": reg["decision"],
            "champion": reg.get("champion"), "aliases": reg.get("aliases", []), "reasons": reg.get("reasons", []),
            "sweep_chosen": prune.get("sweep_chosen"), "sweep_points": prune.get("sweep_points"),
            "tolerance": prune.get("tolerance")}


def summary_markdown(rows: list[dict[str, Any]], pretrain_run: dict[str, Any] | None = None,
                     failed: dict[str, BaseException] | None = None, dashboard: str | None = None) -> str:
    """The retrain summary as a markdown table (with a link to the dashboard page when given)."""
    lines = ["# MAPEX retrain", ""]
    if dashboard:
        from pathlib import Path

        page = Path(dashboard)
        lines += [f"Dashboard: [{dashboard}]({page.resolve().as_uri()})" if page.suffix == ".html"
                  else f"Dashboard: {dashboard}", ""]
    if pretrain_run:
        lines += [f"Pre-trained model: `mapex-pretrained` v{pretrain_run['version']} "
                  f"(MLflow run `{pretrain_run['run_id']}`)", ""]
    lines += ["| application | modalities | parameters full -> pruned | metric | pruned | unpruned | scratch "
              "| version (aliases) | gate | champion |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        aliases = ", ".join(r["aliases"]) or "no alias"
        champion = f"v{r['champion']}" if r["champion"] else "none yet"
        lines.append(f"| {r['app']} | {', '.join(r['modalities'])} | {r['params_full']:,} -> {r['params_pruned']:,} "
                     f"({1 - r['params_pruned'] / r['params_full']:.0%} fewer) | {r['metric']} | {r['pruned']:.3f} "
                     f"| {r['unpruned']:.3f} | {r['scratch']:.3f} | v{r['version']} ({aliases}) | {r['decision']} "
                     f"| {champion} |")
    for app, exc in (failed or {}).items():
        lines.append(f"| {app} | failed: {str(exc).splitlines()[0][:120]} | | | | | | | | |")
    lines += ["", "Gate reasons:", ""] + [f"- **{r['app']}**: {'; '.join(r['reasons'])}" for r in rows]
    swept = [r for r in rows if r.get("sweep_chosen")]
    if swept:  # prune.target smallest_within_tolerance: the registered size came from an accuracy-size sweep
        lines += ["", "Sizes chosen by a sweep (prune.target: smallest_within_tolerance):", ""] + [
            f"- **{r['app']}**: point {r['sweep_chosen']['index'] + 1} of {r['sweep_points']}, "
            f"{r['sweep_chosen']['kept_per_layer']} experts per MoE layer, {r['sweep_chosen']['params']:,} parameters, "
            f"{r['metric']} {r['sweep_chosen']['value']:.3f} (within {r['tolerance']} of the full group)" for r in swept]
    return "\n".join(lines) + "\n"

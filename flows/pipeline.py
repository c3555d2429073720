"""Prefect flows of the MAPEX pipeline: ingest, pretrain, prune, finetune, evaluate (with compare), and retrain.

Thin by design. A stage task runs the DVC stage's own command from ``dvc.yaml`` (a ``mapex``
command, i.e. one :mod:`mapex_core.stages` function) in its own process, exactly what
``dvc repro`` runs, then records the outputs in ``dvc.lock`` (:func:`mapex_core.lineage.commit_stage`):
both paths produce the same files, and ``dvc repro`` after a flow finds everything up to date.
Own processes also keep concurrent applications apart (RNG, memory, GPU context). Flows run in the
project folder (the one holding ``dvc.yaml`` and ``params.yaml``).

Progress: each stage's state, time and progress go to the run's :class:`mapex_core.progress.StageBoard`
(``mapex retrain`` shows it live), which also shares the CPUs among the stage processes running at
once: a stage starting beside another gets half the cores, the last one running gets them all. An
application's compare@APP (the evaluation's comparison models) runs beside its finetune@APP
(:func:`flows.sharing.beside`), so when the other applications are done the last one's stages keep every core busy.

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
from prefect.transactions import CommitMode, transaction

from flows.sharing import beside
from flows.summary import PARAMS, summary_markdown, summary_row
from mapex_core import lineage, progress, project, runtime, stages

# restores the thread variables a local Dask cluster's nannies set in the flow's process
from mapex_core.data.distributed_ingest import DASK_ENV, restored_environ

WORKERS = 2  # datasets / applications processed at once; the board shares the cores among their stages
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.EBUSY}


def is_transient(exc: BaseException) -> bool:
    """Whether a failure is worth retrying: I/O trouble, timeouts, a busy lock, a server that did not answer
    (MLflow after its own retries, Prefect's API 5xx); also when wrapped (``raise ... from``, a URLError's reason);
    never a bad input or a bug."""
    from dvc.lock import LockError

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        names, text = {c.__name__ for c in type(cur).__mro__}, str(cur)
        if isinstance(cur, lineage.StageFailed):
            return cur.transient
        if (isinstance(cur, sqlite3.OperationalError) or "MlflowException" in names) and (
                "locked" in text or "busy" in text):
            return True
        if "MlflowException" in names and (getattr(cur, "error_code", None) == "TEMPORARILY_UNAVAILABLE" or
                                           "failed with exception" in text or "failed with timeout exception" in text):
            return True  # the server was down or answered 5xx through all of the client's retries
        if "HTTPStatusError" in names and getattr(getattr(cur, "response", None), "status_code", 0) in (500, 502, 503, 504):
            return True
        if isinstance(cur, TimeoutError | ConnectionError | LockError):
            return True
        if isinstance(cur, OSError) and cur.errno in TRANSIENT_ERRNOS:
            return True
        reason = getattr(cur, "reason", None)
        cur = cur.__cause__ or (reason if isinstance(reason, BaseException) else None)
    return False


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
    """Run DVC stage ``stage``'s command, record its outputs in ``dvc.lock`` (and, on a worker, push them to
    the DVC remote), return its summary with its ``dvc.lock`` record (what another machine restores)."""
    from flows import exchange

    lineage.run_stage(stage, log=get_run_logger().info, env=env)
    lineage.commit_stage(stage)
    if exchange.active():  # before the cache record is written: a record never points at missing outputs
        lineage.push_outputs(stage)
    return stages.stage_summary(stage) | {exchange.LOCK_KEY: lineage.lock_entry(stage)}


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
    from flows import exchange

    with on_board(stage, threads) as entry:
        task = stage_task
        if exchange.active():  # a worker's clone: inputs and earlier outputs come from the DVC remote
            exchange.before_stage(stage)
            task = task.with_options(result_storage=exchange.result_storage())
        # its own commit: the cache record is written when the stage ends, not when the application's chain
        # (the enclosing task) ends, so a crash later in the chain keeps the finished stages cached
        with transaction(commit_mode=CommitMode.EAGER):
            state = task.with_options(refresh_cache=lineage.stage_changed(stage))(stage, entry.env, return_state=True)
        if state.name == "Cached":
            entry.state = "cached"
        return {k: v for k, v in state.result().items() if k != exchange.LOCK_KEY}


@task(name="samples", cache_policy=None, **RETRY)
def samples_task() -> dict[str, Any]:
    """Fetch the sample imagery (idempotent) and record ``data/raw`` in DVC."""
    with on_board("samples") as entry:
        lineage.run_stage("samples", log=get_run_logger().info, env=entry.env)
        return lineage.commit_stage("samples")


def stage_threads(concurrent: int) -> int:
    """Intra-op threads of each stage process when ``concurrent`` chains run at once (no oversubscription).

    Fixed for the whole phase, whatever finishes first: a stage's thread count changes its weights,
    and they must not depend on timing. Cores that free up go to more training runs at once instead:
    compare@APP beside finetune@APP (:func:`flows.sharing.beside`), and, through the board's ``.cores`` files, several
    comparison models at once in compare@APP.
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
    """Regenerate the team dashboard and link it from a Prefect artifact: with a tracking server and
    ``MAPEX_DASHBOARD_URL`` (``.cluster/env``), publish it to the server and link that address (the team's
    dashboard service); else write ``reports/dashboard/index.html`` and link the file."""
    import os
    from pathlib import Path

    from mapex_core import dashboard as dash

    url, text = os.environ.get("MAPEX_DASHBOARD_URL", ""), "MAPEX dashboard: per-task models"
    if url.startswith(("http://", "https://")) and dash.server_configured():
        summary = dash.publish_dashboard(params=params) | {"index": url}
        create_link_artifact(key="mapex-dashboard", link=url, link_text=text,
                             description=f"The team's dashboard (MLflow run {summary['run_id']})")
        return summary
    summary = dash.write_dashboard(dash.DEFAULT_OUT, params=params)
    create_link_artifact(key="mapex-dashboard", link=Path(summary["index"]).resolve().as_uri(), link_text=text,
                         description="Open from this machine's disk")
    return summary


@task(name="application", task_run_name="application-{app}", cache_policy=None)
def app_chain(app: str, pretrain_run: dict[str, Any], params: str = PARAMS,
              threads: int | None = None) -> dict[str, Any]:
    """prune -> finetune and compare (beside it) -> evaluate -> register + gate for one application; its
    summary row (under ``prune.target: smallest_within_tolerance`` the prune stage is the accuracy-size sweep)."""
    prune = run_stage(f"prune@{app}", threads)
    with beside(lambda: run_stage(f"compare@{app}", threads), threads, block=f"finetune@{app}"):
        run_stage(f"finetune@{app}", threads)
    metrics = run_stage(f"evaluate@{app}", threads)
    return summary_row(app, prune, metrics, register_task(app, pretrain_run, params), params)


def plan(apps: list[str], params: str = PARAMS, fetch_samples: bool = True) -> list[str]:
    """The stages a retrain of ``apps`` runs, in order (the rows of its progress board)."""
    datasets = list(project.load_datasets(params))
    return ((["samples"] if fetch_samples else []) + [f"{k}@{d}" for d in datasets for k in ("ingest", "validate")]
            + ["pretrain"] + [f"{k}@{a}" for a in apps for k in ("prune", "finetune", "compare", "evaluate", "register")]
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
    from flows import exchange
    from mapex_core import tracking

    project.check_params_file(params)
    if exchange.active():
        exchange.prepare()
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
    """Evaluate each application (pruned vs unpruned vs scratch), its comparison models first (compare@APP)."""
    _per_app("compare", apps, params)
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
    prune -> finetune and compare -> evaluate -> register + promotion gate; a summary artifact at the end.

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
    from flows import exchange

    if exchange.active():  # the dvc.lock of every stage, for `git clone -b mapex-results && dvc pull`
        from prefect.runtime import flow_run

        published = exchange.publish_lock(flow_run.name or "retrain")
        get_run_logger().info("dvc.lock pushed to %s (branch %s, tag %s)", published["repository"],
                              published["branch"], published["tag"])
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
        concurrent = min(WORKERS, len(names))
        done, failed = _gather({a: handoff.app_on_pool.submit(a, pretrain_run, params, concurrent) for a in names})
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

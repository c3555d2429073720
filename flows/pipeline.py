"""Prefect flows of the MAPEX pipeline: ingest, pretrain, prune, finetune, evaluate, and retrain.

Thin by design. A stage task runs the DVC stage's own command from ``dvc.yaml`` (a ``mapex``
command, i.e. one :mod:`mapex_core.stages` function) in its own process, exactly what
``dvc repro`` runs, then records the outputs in ``dvc.lock`` (:func:`mapex_core.lineage.commit_stage`):
both paths produce the same files, and ``dvc repro`` after a flow finds everything up to date.
Own processes also keep concurrent applications apart (RNG, memory, GPU context).

Caching: a stage task's cache key is :func:`mapex_core.lineage.stage_key`, a hash of the stage's
command, its dependencies' DVC content hashes and its params, so an unchanged stage is skipped on
re-run (state ``Cached``); a stage whose outputs are missing or were changed since ``dvc.lock``
recorded them is run again (``refresh_cache``).
Retries: a command that exits 75 (EX_TEMPFAIL: an I/O error, a timeout), a busy DVC lock or a
locked sqlite store are retried with exponential backoff; bad input and bugs are not.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from mapex_core import lineage, stages

PARAMS = "params.yaml"


def is_transient(exc: BaseException) -> bool:
    """Whether a failure is worth retrying: I/O trouble, timeouts, a busy lock; never a bad input or a bug."""
    from dvc.lock import LockError

    if isinstance(exc, lineage.StageFailed):
        return exc.transient
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError | PermissionError):
        return False  # a missing or wrong path does not fix itself
    if isinstance(exc, sqlite3.OperationalError) or type(exc).__name__ == "MlflowException":
        return "locked" in str(exc) or "busy" in str(exc)
    return isinstance(exc, OSError | TimeoutError | ConnectionError | LockError)


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key of a stage task: the DVC stage's command, dependency hashes and params."""
    stage = parameters["stage"]
    return f"mapex-{stage}-{lineage.stage_key(stage, parameters.get('root', '.'))}"


RETRY = {"retries": 2, "retry_delay_seconds": exponential_backoff(backoff_factor=5),
         "retry_condition_fn": _retry_if_transient}


@task(name="stage", task_run_name="{stage}", cache_key_fn=stage_cache_key, persist_result=True,
      result_serializer="json", **RETRY)
def stage_task(stage: str, root: str = ".") -> dict[str, Any]:
    """Run DVC stage ``stage``'s command, record its outputs in ``dvc.lock``, return its summary."""
    lineage.run_stage(stage, root, log=get_run_logger().info)
    lineage.commit_stage(stage, root)
    return stages.stage_summary(stage, Path(root))


def run_stage(stage: str, root: str = ".", wait_for: list[Any] | None = None) -> Any:
    """Submit :func:`stage_task`; forces a run (no cache hit) when the stage's outputs are missing or
    differ from what ``dvc.lock`` records (deleted or edited by hand), as ``dvc repro`` would."""
    refresh = lineage.outputs_changed(stage, root)
    return stage_task.with_options(refresh_cache=refresh).submit(stage, root, wait_for=wait_for or [])


@task(name="samples", cache_policy=None, **RETRY)
def samples_task(root: str = ".") -> dict[str, Any]:
    """Fetch the sample imagery (idempotent) and record ``data/raw`` in DVC."""
    lineage.run_stage("samples", root, log=get_run_logger().info)
    return lineage.commit_stage("samples", root)


@task(name="track-pretrain", cache_policy=None, **RETRY)
def track_pretrain_task(params: str = PARAMS, root: str = ".") -> dict[str, Any]:
    """Log the pre-training run and register ``mapex-pretrained`` (idempotent on the weights)."""
    from mapex_core import tracking
    from mapex_core.params import load_params

    tracking.configure()
    return tracking.log_pretrain(Path(root) / stages.PRETRAIN_DIR, load_params(Path(root) / params),
                                 {str(p): lineage.output_hash(p, root) for p in stages.pretrain_chips(params)},
                                 lineage.git_sha(root), root=root)


@task(name="register", task_run_name="register-{app}", cache_policy=None, **RETRY)
def register_task(app: str, pretrain_run: dict[str, Any], params: str = PARAMS, root: str = ".") -> dict[str, Any]:
    """Register ``mapex-<app>`` and apply the promotion gate (idempotent on the weights)."""
    from mapex_core import tracking

    tracking.configure()
    return tracking.register_app_from_outputs(app, params, pretrain_run, root=root)


def _flow_setup() -> None:
    from mapex_core import tracking

    tracking.configure()  # fails fast, before any training, when the tracking server is unreachable


def dask_runner(address: str = "local", n_workers: int = 2) -> Any:
    """A Dask task runner: a local cluster of ``n_workers`` processes for ``local``, else the scheduler at ``address``."""
    from prefect_dask import DaskTaskRunner

    if address != "local":
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@flow(name="ingest", task_runner=ThreadPoolTaskRunner(max_workers=2))
def ingest_flow(datasets: list[str] | None = None, params: str = PARAMS, root: str = ".") -> dict[str, Any]:
    """Ingest and validate datasets (default: all of ``params``' ``datasets``) concurrently on the task runner."""
    names = datasets or list(stages.load_datasets(Path(root) / params))
    ingested = {d: run_stage(f"ingest@{d}", root) for d in names}
    validated = {d: run_stage(f"validate@{d}", root, wait_for=[ingested[d]]) for d in names}
    return {d: {"ingest": ingested[d].result(), "validate": validated[d].result()} for d in names}


def ingest_with_dask(datasets: list[str] | None = None, params: str = PARAMS, address: str = "local",
                     n_workers: int = 2) -> dict[str, Any]:
    """Run :func:`ingest_flow` on Dask: a local cluster by default, or the scheduler at ``address``."""
    return ingest_flow.with_options(task_runner=dask_runner(address, n_workers))(datasets=datasets, params=params)


@flow(name="pretrain")
def pretrain_flow(params: str = PARAMS, root: str = ".") -> dict[str, Any]:
    """Pre-train on the pipeline's chip stores and log the run to MLflow (deployed on work pool ``gpu``)."""
    _flow_setup()
    metrics = run_stage("pretrain", root)
    return {"metrics": metrics.result(), "mlflow": track_pretrain_task(params, root, wait_for=[metrics])}


def _per_app(kind: str, apps: list[str] | None, params: str, root: str) -> dict[str, Any]:
    names = stages.pipeline_apps(Path(root) / params, apps)
    futures = {a: run_stage(f"{kind}@{a}", root) for a in names}
    return {a: f.result() for a, f in futures.items()}


@flow(name="prune", task_runner=ThreadPoolTaskRunner(max_workers=2))
def prune_flow(apps: list[str] | None = None, params: str = PARAMS, root: str = ".") -> dict[str, Any]:
    """Prune the pre-trained model for each application (default: ``pipeline.apps``)."""
    return _per_app("prune", apps, params, root)


@flow(name="finetune", task_runner=ThreadPoolTaskRunner(max_workers=2))
def finetune_flow(apps: list[str] | None = None, params: str = PARAMS, root: str = ".") -> dict[str, Any]:
    """Fine-tune each application's pruned model."""
    return _per_app("finetune", apps, params, root)


@flow(name="evaluate", task_runner=ThreadPoolTaskRunner(max_workers=2))
def evaluate_flow(apps: list[str] | None = None, params: str = PARAMS, root: str = ".") -> dict[str, Any]:
    """Evaluate each application (pruned vs unpruned vs scratch)."""
    return _per_app("evaluate", apps, params, root)


@flow(name="retrain", task_runner=ThreadPoolTaskRunner(max_workers=2))
def retrain(apps: list[str] | None = None, params: str = PARAMS, fetch_samples: bool = True,
            ingest_on_dask: str | None = None, root: str = ".") -> list[dict[str, Any]]:
    """The weekly job: samples -> ingest -> validate -> pretrain -> per app (concurrently)
    prune -> finetune -> evaluate -> register + promotion gate; a summary artifact at the end.

    Args:
        apps: applications to (re)train; default ``pipeline.apps`` of ``params``.
        fetch_samples: fetch the sample imagery first (the demo); off for your own data.
        ingest_on_dask: ingest on Dask: ``local`` (a local cluster) or a scheduler address.

    Returns:
        One summary row per application (also the flow run's markdown artifact).
    """
    logger = get_run_logger()
    names = stages.pipeline_apps(Path(root) / params, apps)
    _flow_setup()
    if fetch_samples:
        samples_task(root)
    ingest = ingest_flow.with_options(task_runner=dask_runner(ingest_on_dask)) if ingest_on_dask else ingest_flow
    ingest(params=params, root=root)
    pretrained = run_stage("pretrain", root)
    pretrain_run = track_pretrain_task(params, root, wait_for=[pretrained])
    chains = {}
    for a in names:  # each app's chain runs concurrently with the others'
        p = run_stage(f"prune@{a}", root)
        f = run_stage(f"finetune@{a}", root, wait_for=[p])
        e = run_stage(f"evaluate@{a}", root, wait_for=[f])
        chains[a] = (p, e, register_task.submit(a, pretrain_run, params, root, wait_for=[e]))
    wait([c[2] for c in chains.values()])
    rows = [summary_row(a, p.result(), e.result(), r.result(), Path(root) / params)
            for a, (p, e, r) in chains.items()]
    create_markdown_artifact(summary_markdown(rows, pretrain_run), key="retrain-summary",
                             description="MAPEX retrain: per-application models")
    logger.info("retrain finished: %s", ", ".join(f"{r['app']} v{r['version']} ({r['decision']})" for r in rows))
    return rows


def summary_row(app: str, prune: dict[str, Any], metrics: dict[str, Any], reg: dict[str, Any],
                params: str | Path = PARAMS) -> dict[str, Any]:
    """One application's line of the retrain summary."""
    from mapex_core.apps import get_application

    application = get_application(app, params)
    return {"app": app, "modalities": application.modalities, "metric": metrics["metric"],
            "params_full": metrics["unpruned"]["params"], "params_pruned": metrics["pruned"]["params"],
            "encoder_reduction": prune["reduction"],
            "pruned": metrics["pruned"]["value"], "unpruned": metrics["unpruned"]["value"],
            "scratch": metrics["scratch"]["value"], "version": reg["version"], "decision": reg["decision"],
            "champion": reg.get("champion"), "aliases": reg.get("aliases", []), "reasons": reg.get("reasons", [])}


def summary_markdown(rows: list[dict[str, Any]], pretrain_run: dict[str, Any] | None = None) -> str:
    """The retrain summary as a markdown table."""
    lines = ["# MAPEX retrain", ""]
    if pretrain_run:
        lines += [f"Pre-trained model: `mapex-pretrained` v{pretrain_run['version']} "
                  f"(MLflow run `{pretrain_run['run_id']}`)", ""]
    lines += ["| application | modalities | parameters full -> pruned | metric | pruned | unpruned | scratch "
              "| version | gate | champion |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['app']} | {', '.join(r['modalities'])} | {r['params_full']:,} -> {r['params_pruned']:,} "
                     f"({1 - r['params_pruned'] / r['params_full']:.0%} fewer) | {r['metric']} | {r['pruned']:.3f} "
                     f"| {r['unpruned']:.3f} | {r['scratch']:.3f} | v{r['version']} ({', '.join(r['aliases']) or 'no alias'}) | {r['decision']} "
                     f"| {'v' + str(r['champion']) if r['champion'] else 'none yet'} |")
    lines += ["", "Gate reasons:", ""] + [f"- **{r['app']}**: {'; '.join(r['reasons'])}" for r in rows]
    return "\n".join(lines) + "\n"

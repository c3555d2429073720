"""Handing the retrain's stages to the work pools: pre-training to pool ``gpu``, each application's chain to pool ``cpu``.

A retrain hands off only when it is itself a run of a deployment (``mapex deploy`` against a Prefect
server, then the schedule or ``prefect deployment run retrain/scheduled-retrain``): it then runs
``pretrain/pretrain-gpu`` on pool ``gpu`` and ``application/app-cpu`` once per application on pool
``cpu``, each as a subflow run it waits for, so several CPU workers take applications in parallel.
``mapex retrain`` (the demo, no server, or a server used only to watch) runs every stage here, as
before.

When no worker of pool ``gpu`` is online, ``pipeline.no_gpu_worker`` of ``params.yaml`` decides:
``local`` pre-trains here with a warning, ``wait`` waits up to ``pipeline.gpu_wait_s`` seconds for
one, ``fail`` stops with an error naming the pool.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task

from flows.deployments import APPLICATION_NAME, CPU_POOL, GPU_POOL, PRETRAIN_NAME
from flows.pipeline import (
    PARAMS,
    _flow_setup,
    app_chain,
    on_board,
    run_stage,
    stage_threads,
    summary_row,
    track_pretrain_task,
)
from mapex_core import project, stages

NO_GPU_WORKER = ("local", "wait", "fail")
POLL_S = 5.0


class NoWorker(RuntimeError):
    """No worker is online in a work pool the retrain needs (the message names the pool and the setting)."""


def handing_off() -> bool:
    """Whether this flow run hands its stages to the work pools: it is a run of a deployment, taken by a
    worker of a work pool (not ``mapex retrain``, nor ``mapex deploy --serve``, which run everything here)."""
    from prefect import get_client
    from prefect.runtime import deployment, flow_run

    if deployment.id is None:
        return False
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run.id).work_pool_name is not None


def online_workers(pool: str) -> list[str]:
    """Names of the workers of work pool ``pool`` that the server sees online (none when the pool is missing)."""
    from prefect import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    with get_client(sync_client=True) as client:
        try:
            workers = client.read_workers_for_work_pool(
                pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))
        except ObjectNotFound:
            return []
        except PrefectHTTPStatusError as exc:  # this endpoint answers a missing pool with a plain 404
            if exc.response.status_code == 404:
                return []
            raise
    return [w.name for w in workers]


def gpu_placement(policy: str, wait_s: float, warn: Callable[[str], None], pool: str = GPU_POOL,
                  poll_s: float = POLL_S) -> str:
    """Where pre-training runs: ``pool`` (a worker of ``pool`` is online) or ``local`` (``policy`` says so).

    Args:
        policy: ``pipeline.no_gpu_worker``: ``local``, ``wait`` or ``fail``.
        wait_s: ``pipeline.gpu_wait_s``, how long ``wait`` waits for a worker.
        warn: called with the warning when pre-training falls back to this machine.

    Raises:
        ValueError: an unknown ``policy``.
        NoWorker: ``fail`` and no worker online, or ``wait`` and none came within ``wait_s``.
    """
    if policy not in NO_GPU_WORKER:
        raise ValueError(f"params.yaml: pipeline.no_gpu_worker must be one of {list(NO_GPU_WORKER)}, got {policy!r}")
    if online_workers(pool):
        return "pool"
    start = f"start one on the GPU machine: `source .cluster/env && mapex worker --pool {pool}`"
    if policy == "local":
        warn(f"no worker online in work pool {pool!r}: pre-training runs here instead "
             f"(params.yaml pipeline.no_gpu_worker: local); {start}")
        return "local"
    if policy == "fail":
        raise NoWorker(f"no worker online in work pool {pool!r} (params.yaml pipeline.no_gpu_worker: fail); {start}")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        if online_workers(pool):
            return "pool"
    raise NoWorker(f"no worker came online in work pool {pool!r} within {wait_s:g} s (params.yaml "
                   f"pipeline.no_gpu_worker: wait, pipeline.gpu_wait_s: {wait_s:g}); {start}")


def run_on_pool(deployment: str, parameters: dict[str, Any], what: str) -> Any:
    """Run ``deployment`` as a subflow run of the current flow run and wait for it; the finished flow run.

    Raises:
        RuntimeError: the run did not complete (names the run, its pool and its final state).
    """
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, as_subflow=True, timeout=None)
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        message = f": {run.state.message}" if run.state and run.state.message else ""
        raise RuntimeError(f"{what}: flow run {run.name!r} of deployment {deployment} (work pool "
                           f"{run.work_pool_name}) ended {state}{message}")
    return run


def pretrain_on_gpu_pool(params: str) -> Any:
    """Pre-training as a run of ``pretrain/pretrain-gpu`` on pool ``gpu``, waited for."""
    return run_on_pool(f"pretrain/{PRETRAIN_NAME}", {"params": params}, "pre-training on work pool gpu")


def application_on_cpu_pool(app: str, pretrain_run: dict[str, Any], params: str, concurrent: int = 1) -> Any:
    """Application ``app``'s chain as a run of ``application/app-cpu`` on pool ``cpu``, waited for."""
    return run_on_pool(f"application/{APPLICATION_NAME}", {"app": app, "pretrain_run": pretrain_run,
                                                           "params": params, "concurrent": concurrent},
                       f"application {app} on work pool {CPU_POOL}")


@flow(name="application")
def application_flow(app: str, pretrain_run: dict[str, Any], params: str = PARAMS,
                     concurrent: int = 1) -> dict[str, Any]:
    """One application's chain, prune -> finetune -> evaluate -> register + gate (deployed on work pool
    ``cpu``: a retrain run by a worker starts one per application); its summary row.

    Args:
        concurrent: applications the retrain started at once: each stage gets this machine's share of the
            cores for as many (:func:`flows.pipeline.stage_threads`), as in a retrain on one machine, so
            the models are the same wherever they are trained.
    """
    _flow_setup(params)
    return app_chain(app, pretrain_run, params, stage_threads(concurrent))


@task(name="application-on-pool", task_run_name="application-{app}", cache_policy=None)
def app_on_pool(app: str, pretrain_run: dict[str, Any], params: str = PARAMS, concurrent: int = 1) -> dict[str, Any]:
    """:func:`application_flow` as a run on work pool ``cpu``, waited for; its summary row, read back from
    the stage outputs and the registry (registration is idempotent on the weights)."""
    application_on_cpu_pool(app, pretrain_run, params, concurrent)
    restore_here([f"{k}@{app}" for k in ("prune", "finetune", "compare", "evaluate")])
    return summary_row(app, stages.stage_summary(f"prune@{app}"), stages.stage_summary(f"evaluate@{app}"),
                       stages.register(app, params, pretrain_run), params)


def restore_here(names: list[str]) -> None:
    """After a run on another worker: its stages' outputs into this clone (on one machine: already here)."""
    from flows import exchange

    if exchange.active():
        for name in names:
            exchange.restore(name, required=True)


def pretrain_stage(params: str) -> tuple[dict[str, Any], bool]:
    """Pre-train: on work pool ``gpu`` when this retrain is a worker's deployment run (with no gpu worker
    online, ``pipeline.no_gpu_worker`` decides), else here; the registered pre-training run, and whether
    this retrain hands its stages to the pools."""
    pools, on_gpu = handing_off(), False
    if pools:
        pipe = project.load_pipeline(params)
        on_gpu = gpu_placement(pipe.no_gpu_worker, pipe.gpu_wait_s, get_run_logger().warning) == "pool"
    if on_gpu:
        with on_board("pretrain"):
            pretrain_on_gpu_pool(params)
            restore_here(["pretrain"])
    else:
        run_stage("pretrain")
    return track_pretrain_task(params), pools

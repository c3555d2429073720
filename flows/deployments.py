"""Prefect deployments: the scheduled ``retrain`` on work pool ``cpu``, pre-training on work pool ``gpu``,
and one application's chain (``application/app-cpu``) on work pool ``cpu``: a retrain run by a worker
hands pre-training and each application to them (:mod:`flows.handoff`).

``mapex deploy`` registers them against the Prefect server in ``PREFECT_API_URL`` (creating the
two pools, type ``process``, when missing); workers then pick the runs up::

    mapex worker --pool cpu                          # on any machine with this project installed
    mapex worker --pool gpu                          # on the GPU machine

The deployments name their flows by module path (``flows.pipeline.retrain``), so any worker with
the ``mapex`` package installed can run them; ``working_dir`` (a job variable) is the project
folder holding ``params.yaml`` and ``dvc.yaml``. On Kubernetes, create pools ``cpu`` and ``gpu`` of
type ``kubernetes`` instead (``prefect work-pool create gpu --type kubernetes``), give the ``gpu``
pool's job template a GPU resource request, and run one worker per pool in the cluster: the
deployments stay the same. ``mapex deploy --serve`` instead runs both schedules from one local
process, without pools or workers (a laptop).
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Any

CPU_POOL, GPU_POOL = "cpu", "gpu"
RETRAIN_NAME, PRETRAIN_NAME, APPLICATION_NAME = "scheduled-retrain", "pretrain-gpu", "app-cpu"


def build_deployments(params: str = "params.yaml", cron: str | None = None, timezone: str | None = None,
                      project_dir: str | Path | None = None, pools: bool = True) -> list[Any]:
    """The ``retrain`` (cron-scheduled, pool ``cpu``), ``pretrain`` (on demand, pool ``gpu``) and
    ``application`` (one application's chain, run by the retrain, pool ``cpu``) deployments.

    Args:
        params: params file (its ``pipeline.schedule`` / ``pipeline.timezone`` are the defaults).
        cron: cron expression of the retrain schedule (default: ``pipeline.schedule``, weekly).
        project_dir: the project folder the flows run in (default: the current directory).
        pools: attach the work pools (False for ``serve``, which runs the flows itself).
    """
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.handoff import application_flow
    from flows.pipeline import pretrain_flow, retrain
    from mapex_core.project import load_pipeline

    pipe = load_pipeline(params)
    cron = cron or pipe.schedule
    timezone = timezone or pipe.timezone
    _check_cron(cron, timezone)
    workdir = str(Path(project_dir or Path.cwd()).resolve())
    common: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["mapex"]}
    retrain_kwargs = dict(common, name=RETRAIN_NAME, schedules=[Cron(cron, timezone=timezone)],
                          parameters={"params": params, "fetch_samples": False},
                          description=f"Weekly MAPEX retrain of {', '.join(pipe.apps)} (cron {cron!r}).")
    pretrain_kwargs = dict(common, name=PRETRAIN_NAME, parameters={"params": params},
                           description="MAPEX pre-training on the pipeline's chip stores (GPU worker).")
    app_kwargs = dict(common, name=APPLICATION_NAME, parameters={"params": params},
                      description="One MAPEX application: prune -> finetune -> evaluate -> register + gate "
                                  "(started by the retrain, CPU workers).")
    if pools:
        retrain_kwargs |= {"work_pool_name": CPU_POOL, "job_variables": {"working_dir": workdir}}
        pretrain_kwargs |= {"work_pool_name": GPU_POOL, "job_variables": {"working_dir": workdir}}
        app_kwargs |= {"work_pool_name": CPU_POOL, "job_variables": {"working_dir": workdir}}
    return [retrain.to_deployment(**retrain_kwargs), pretrain_flow.to_deployment(**pretrain_kwargs),
            application_flow.to_deployment(**app_kwargs)]


def _check_cron(cron: str, timezone: str | None = None) -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        raise ValueError(f"invalid schedule: cron {cron!r}, timezone {timezone!r} "
                         "(e.g. cron '0 3 * * 1' = Mondays 03:00, timezone 'UTC')") from exc


def ensure_pools(pools: tuple[str, ...] = (CPU_POOL, GPU_POOL)) -> None:
    """Create work pools ``pools`` (default ``cpu`` and ``gpu``; type ``process``) on the server when missing."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                with suppress(ObjectAlreadyExists):  # created at the same moment by another worker
                    client.create_work_pool(WorkPoolCreate(name=pool, type="process"))


def deploy(params: str = "params.yaml", cron: str | None = None, timezone: str | None = None,
           project_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Register both deployments with the Prefect server; returns name, id, pool and schedule of each."""
    ensure_pools()
    out = []
    for dep in build_deployments(params, cron, timezone, project_dir):
        dep_id = dep.apply(work_pool_name=dep.work_pool_name)
        out.append({"deployment": f"{dep.flow_name}/{dep.name}", "id": str(dep_id), "work_pool": dep.work_pool_name,
                    "schedules": [getattr(s.schedule, "cron", None) for s in dep.schedules or []],
                    "parameters": dep.parameters})
    return out


def serve(params: str = "params.yaml", cron: str | None = None, timezone: str | None = None) -> None:
    """Run both deployments' schedules from this process (blocks; stop with SIGTERM or Ctrl-C)."""
    from prefect import serve as prefect_serve

    prefect_serve(*build_deployments(params, cron, timezone, pools=False))

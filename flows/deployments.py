"""Prefect deployments: the scheduled ``retrain`` on work pool ``cpu``, pre-training on work pool ``gpu``,
and one application's chain (``application/app-cpu``) on work pool ``cpu``: a retrain run by a worker
hands pre-training and each application to them (:mod:`flows.handoff`).

``mapex deploy`` registers them against the Prefect server in ``PREFECT_API_URL`` (creating the
two pools, type ``process``, when missing); workers then pick the runs up::

    mapex worker --pool cpu                          # on any machine with this project installed
    mapex worker --pool gpu                          # on the GPU machine

From a git repository with a remote (``origin``, or ``mapex deploy --repo URL``), a team's case: the
deployments carry the current commit and a ``git_clone`` pull step, so each flow run starts in a fresh
clone of the project at that commit, in a temporary folder of whichever worker takes it (no path of
the deploying machine), and exchanges stage outputs through the DVC remote and the object store
(:mod:`flows.exchange`). The commit must be pushed first. Without a git remote (one machine), the
flows are named by module path and ``working_dir`` is this project folder, as before. On Kubernetes, create pools ``cpu`` and ``gpu`` of
type ``kubernetes`` instead (``prefect work-pool create gpu --type kubernetes``), give the ``gpu``
pool's job template a GPU resource request, and run one worker per pool in the cluster: the
deployments stay the same. ``mapex deploy --serve`` instead runs both schedules from one local
process, without pools or workers (a laptop).
"""

from __future__ import annotations

import subprocess
from contextlib import suppress
from pathlib import Path
from typing import Any, NamedTuple

CPU_POOL, GPU_POOL = "cpu", "gpu"
RETRAIN_NAME, PRETRAIN_NAME, APPLICATION_NAME = "scheduled-retrain", "pretrain-gpu", "app-cpu"


class GitSource(NamedTuple):
    """Where workers get the project: a repository URL and the commit deployed."""

    url: str
    commit: str


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False, timeout=120)


def git_source(project_dir: str | Path | None = None, repo: str | None = None) -> GitSource | None:
    """The repository (``repo``, else the project's ``origin``) and commit (``HEAD``) workers clone, or
    ``None`` when the project has no git remote and none is given (one machine: run in this folder).

    Raises:
        ValueError: uncommitted changes to tracked files, or ``HEAD`` is not on any branch of the remote
            (workers would not run what is here: commit and push first).
    """
    root = Path(project_dir or Path.cwd()).resolve()
    head = _git(root, "rev-parse", "HEAD")
    if head.returncode != 0:
        if repo:
            raise ValueError(f"{root}: not a git repository with a commit ({head.stderr.strip()}); --repo needs one")
        return None
    if not repo:
        origin = _git(root, "remote", "get-url", "origin")
        if origin.returncode != 0:
            return None
        repo = origin.stdout.strip()
    commit = head.stdout.strip()
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    if dirty:
        raise ValueError(f"{root}: uncommitted changes to tracked files ({dirty.splitlines()[0].strip()} ...): "
                         f"workers clone {repo} at {commit[:12]}, which lacks them; commit and push first")
    refs = _git(root, "ls-remote", "--heads", repo)
    if refs.returncode != 0:
        raise ValueError(f"git repository {repo} is not reachable: {refs.stderr.strip()}")
    tips = [line.split()[0] for line in refs.stdout.splitlines() if line.strip()]
    if not any(_git(root, "merge-base", "--is-ancestor", commit, tip).returncode == 0 for tip in tips):
        raise ValueError(f"commit {commit[:12]} is on no branch of {repo}: `git push` it first (workers clone it)")
    return GitSource(repo, commit)


# the flows' files in the repository (entrypoints of deployments pulled from git)
ENTRYPOINTS = {"retrain": "flows/pipeline.py:retrain", "pretrain": "flows/pipeline.py:pretrain_flow",
               "application": "flows/handoff.py:application_flow"}


def build_deployments(params: str = "params.yaml", cron: str | None = None, timezone: str | None = None,
                      project_dir: str | Path | None = None, pools: bool = True,
                      source: GitSource | None = None) -> list[Any]:
    """The ``retrain`` (cron-scheduled, pool ``cpu``), ``pretrain`` (on demand, pool ``gpu``) and
    ``application`` (one application's chain, run by the retrain, pool ``cpu``) deployments.

    Args:
        params: params file (its ``pipeline.schedule`` / ``pipeline.timezone`` are the defaults).
        cron: cron expression of the retrain schedule (default: ``pipeline.schedule``, weekly).
        project_dir: the project folder the flows run in (default: the current directory).
        pools: attach the work pools (False for ``serve``, which runs the flows itself).
        source: clone this repository at this commit for each flow run (no ``working_dir``) and exchange
            stage outputs through the DVC remote; ``None``: run in ``project_dir``.
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
        from flows.exchange import EXCHANGE_ENV

        where = {"env": {EXCHANGE_ENV: "dvc"}} if source else {"working_dir": workdir}
        retrain_kwargs |= {"work_pool_name": CPU_POOL, "job_variables": dict(where)}
        pretrain_kwargs |= {"work_pool_name": GPU_POOL, "job_variables": dict(where)}
        app_kwargs |= {"work_pool_name": CPU_POOL, "job_variables": dict(where)}
    deps = {"retrain": retrain.to_deployment(**retrain_kwargs),
            "pretrain": pretrain_flow.to_deployment(**pretrain_kwargs),
            "application": application_flow.to_deployment(**app_kwargs)}
    if pools and source:
        from prefect.runner.storage import GitRepository

        for flow_name, dep in deps.items():  # a git_clone pull step at the commit; the flow by file path
            dep.storage = GitRepository(url=source.url, commit_sha=source.commit)
            dep.entrypoint = ENTRYPOINTS[flow_name]
    return list(deps.values())


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
           project_dir: str | Path | None = None, repo: str | None = None) -> list[dict[str, Any]]:
    """Register the deployments with the Prefect server; returns name, id, pool, schedule and source of each.

    Args:
        repo: the git repository workers clone (default: the project's ``origin``; none: this folder).
    """
    from flows.faults import ensure_crash_detection

    source = git_source(project_dir, repo)
    ensure_pools()
    ensure_crash_detection()  # a worker that dies leaves its runs CRASHED, so the next retrain can run
    out = []
    for dep in build_deployments(params, cron, timezone, project_dir, source=source):
        dep_id = dep.apply(work_pool_name=dep.work_pool_name)
        out.append({"deployment": f"{dep.flow_name}/{dep.name}", "id": str(dep_id), "work_pool": dep.work_pool_name,
                    "schedules": [getattr(s.schedule, "cron", None) for s in dep.schedules or []],
                    "parameters": dep.parameters,
                    "source": f"{source.url}@{source.commit}" if source else str(Path(project_dir or ".").resolve())})
    return out


def serve(params: str = "params.yaml", cron: str | None = None, timezone: str | None = None) -> None:
    """Run both deployments' schedules from this process (blocks; stop with SIGTERM or Ctrl-C)."""
    from prefect import serve as prefect_serve

    prefect_serve(*build_deployments(params, cron, timezone, pools=False))

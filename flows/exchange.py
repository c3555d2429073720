"""Stages on machines that share no folder: outputs travel through the DVC remote, cache records through S3.

A deployment made by ``mapex deploy`` from a git repository (:mod:`flows.deployments`) starts every
flow run from a fresh clone of the project at the deployed commit, in a temporary folder of the
worker, with ``MAPEX_EXCHANGE=dvc`` in its environment. Then, for each stage it runs:

1. **inputs**: the outputs of the stages it reads that are not in the clone are restored
   (recursively: the chips for pre-training, the pre-trained model for pruning);
2. **its own outputs from an earlier run on any machine**: the stage's Prefect cache record, keyed
   as on one machine (:func:`flows.pipeline.stage_cache_key`: command, dependency hashes, params),
   lives in the object store (``MAPEX_RESULTS``, e.g. ``s3://mapex/prefect-results``) and holds the
   stage's ``dvc.lock`` record; with it, ``dvc pull`` brings the outputs and the stage is ``Cached``;
3. otherwise the stage runs, and ``dvc push`` sends its outputs before its cache record is written,
   so a record never points at outputs the remote lacks.

Restoring a stage = merge its ``dvc.lock`` record (from its cache record, or the one committed in
git: the ``samples`` data) and ``dvc pull`` its outputs. At the end, the retrain commits the merged
``dvc.lock`` and pushes it to branch ``mapex-results`` (``MAPEX_RESULTS_BRANCH``) of the repository it
was cloned from, plus a tag per retrain: a fresh clone of that branch, ``dvc pull``, and ``dvc
status`` finds every stage up to date. Without ``MAPEX_EXCHANGE`` (the demo, ``mapex retrain``, a
deployment run in one folder) nothing here runs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import socket
import subprocess
from typing import Any

from mapex_core import lineage

EXCHANGE_ENV = "MAPEX_EXCHANGE"  # "dvc": this flow run exchanges stage outputs through the DVC remote
RESULTS_ENV = "MAPEX_RESULTS"  # where the stage cache records live (an s3:// URL on the object store)
RESULTS_BRANCH_ENV = "MAPEX_RESULTS_BRANCH"
RESULTS_BRANCH = "mapex-results"
LOCK_KEY = "_dvc_lock"  # the key of a stage result holding the stage's dvc.lock record


class StageNotRestorable(RuntimeError):
    """A stage's outputs are needed here but no machine recorded them (run the upstream stages first)."""


def active() -> bool:
    """Whether this process exchanges stage outputs through the DVC remote (a worker's flow run)."""
    return os.environ.get(EXCHANGE_ENV, "") == "dvc"


def prepare() -> str:
    """Make the clone ready: the cluster's S3 remote as its default DVC remote; the remote's URL.

    Raises:
        RuntimeError: ``MAPEX_DVC_REMOTE`` (from ``.cluster/env`` on the worker) is missing.
    """
    from flows.cluster import configure_dvc_remote

    remote = configure_dvc_remote(".", os.environ)
    if not remote:
        raise RuntimeError(f"{EXCHANGE_ENV}=dvc but no DVC remote: the worker needs MAPEX_DVC_REMOTE and "
                           "MAPEX_DVC_ENDPOINT (`source .cluster/env` before `mapex worker`)")
    return remote


@functools.cache
def result_storage() -> Any:
    """The Prefect result storage of the stage cache records: ``MAPEX_RESULTS`` on the object store
    (credentials from ``AWS_*`` in the environment, never stored on the Prefect server)."""
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.filesystems import RemoteFileSystem

    url = os.environ.get(RESULTS_ENV) or _sibling(os.environ.get("MAPEX_DVC_REMOTE", ""), "prefect-results")
    endpoint = os.environ.get("MAPEX_DVC_ENDPOINT")
    settings = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    storage = RemoteFileSystem(basepath=url, settings=settings)
    # Prefect keeps a task's result storage server-side: a block (location and endpoint only, no secret)
    name = "mapex-stage-records-" + hashlib.sha256(f"{url} {endpoint}".encode()).hexdigest()[:12]
    try:
        storage.save(name, overwrite=True)
    except ObjectAlreadyExists:  # saved at the same moment by another flow run
        storage = RemoteFileSystem.load(name)
    return storage


def _sibling(url: str, name: str) -> str:
    """``s3://bucket/dvc`` -> ``s3://bucket/<name>``."""
    if not url.startswith("s3://"):
        raise RuntimeError(f"no {RESULTS_ENV} and MAPEX_DVC_REMOTE {url!r} is not an s3:// URL")
    return url.rstrip("/").rsplit("/", 1)[0] + "/" + name


def record(stage: str) -> dict[str, Any] | None:
    """Stage ``stage``'s cache record (its result) for its current inputs, by any machine, or ``None``."""
    from prefect.results import ResultStore

    from flows.pipeline import stage_cache_key

    store = ResultStore(result_storage=result_storage())
    key = stage_cache_key(None, {"stage": stage})
    if not store.exists(key):
        return None
    value = store.read(key).result
    return value if isinstance(value, dict) else None


def restore(stage: str, required: bool) -> bool:
    """Bring stage ``stage``'s outputs of an earlier run (any machine) into this clone; whether it did.

    Args:
        required: the outputs are an input here: fail when they cannot be restored (else the stage
            just runs).

    Raises:
        StageNotRestorable: ``required`` and neither a cache record nor ``dvc.lock`` knows the outputs.
    """
    rec = record(stage)
    if rec and rec.get(LOCK_KEY):
        lineage.merge_lock_entries({stage: rec[LOCK_KEY]})
    elif not required:
        return False
    elif lineage.lock_entry(stage) is None:
        raise StageNotRestorable(f"stage {stage}: its outputs are needed here, but no run recorded them "
                                 "(no cache record for its current inputs, nothing in dvc.lock)")
    from mapex_core.remote_errors import RemoteUnavailable

    try:
        lineage.pull_outputs([stage])
    except RemoteUnavailable:
        raise  # the object store does not answer: retried as transient, never "recompute instead"
    except Exception as exc:  # noqa: BLE001 - DVC's errors: objects missing on the remote
        if required:
            raise
        _log(f"stage {stage}: outputs of an earlier run could not be pulled ({exc}); running it")
        return False
    return True


def ensure_inputs(stage: str) -> None:
    """Restore the outputs of every stage ``stage`` reads that are not in this clone (recursively)."""
    for upstream in lineage.producers(stage):
        if not lineage.outputs_present(upstream):
            ensure_inputs(upstream)
            restore(upstream, required=True)


def before_stage(stage: str) -> None:
    """Inputs in place and this stage's own earlier outputs restored when a machine made them."""
    ensure_inputs(stage)
    if not lineage.outputs_present(stage):
        restore(stage, required=False)


def _log(message: str) -> None:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    with contextlib.suppress(MissingContextError):  # outside a flow run: nobody to tell
        get_run_logger().info(message)


def _git(*args: str) -> str:
    res = subprocess.run(["git", *args], capture_output=True, text=True, check=False, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout.strip()


def publish_lock(run_name: str) -> dict[str, str]:
    """Commit this clone's ``dvc.lock`` (every stage of the retrain) and push it to the results branch and
    to tag ``mapex-retrain/<run_name>`` of the repository the clone came from.

    Returns:
        ``branch``, ``tag``, ``commit`` and ``repository``.
    """
    branch = os.environ.get(RESULTS_BRANCH_ENV) or RESULTS_BRANCH
    tag = "mapex-retrain/" + re.sub(r"[^A-Za-z0-9._-]+", "-", run_name).strip("-")
    origin = _git("remote", "get-url", "origin")
    _git("add", "dvc.lock")
    _git("-c", "user.name=MAPEX retrain", "-c", f"user.email=mapex@{socket.gethostname()}", "commit",
         "--allow-empty", "-q", "-m", f"MAPEX retrain {run_name}: dvc.lock of every stage")
    commit = _git("rev-parse", "HEAD")
    # the branch is the latest retrain on top of the deployed commit; each retrain keeps its tag
    _git("push", "-q", "--force", "origin", f"HEAD:refs/heads/{branch}", f"HEAD:refs/tags/{tag}")
    return {"branch": branch, "tag": tag, "commit": commit, "repository": origin}

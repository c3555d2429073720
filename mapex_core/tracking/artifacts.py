"""Reading runs back from the tracking server, and publishing small sites as run artifacts.

What the team dashboard needs from MLflow beyond the registry (:mod:`~mapex_core.tracking.registry`):
the registered applications, the JSON reports a run logged (``reports/evaluation.json`` ...), the
newest run carrying some tags (the latest ``mapex ablate`` of an application, the latest published
dashboard), and logging / downloading a run's files. Everything goes through MLflow's client, so
it works the same on the project's sqlite store and on a tracking server with proxied artifacts.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from mapex_core.names import NAME
from mapex_core.tracking.registry import PRETRAINED_MODEL
from mapex_core.tracking.store import EXPERIMENT, TrackingError

APP_MODEL_PREFIX = "mapex-"


def _error(what: str, exc: Exception) -> TrackingError:
    return TrackingError(f"MLflow tracking store {mlflow.get_tracking_uri()}: {what}: {exc}")


def registered_apps() -> list[str]:
    """The applications with a registered model ``mapex-<app>`` (sorted; ``mapex-pretrained`` is not one).

    Raises:
        TrackingError: the registry does not answer.
    """
    client = MlflowClient()
    names: list[str] = []
    token = None
    try:
        while True:
            page = client.search_registered_models(filter_string=f"name LIKE '{APP_MODEL_PREFIX}%'", max_results=100,
                                                   page_token=token)
            names += [m.name for m in page]
            token = page.token
            if not token:
                break
    except (MlflowException, SQLAlchemyError) as exc:
        raise _error("listing registered models", exc) from exc
    apps = [n.removeprefix(APP_MODEL_PREFIX) for n in names if n != PRETRAINED_MODEL]
    return sorted(a for a in apps if NAME.match(a))


def run_record(run_id: str, documents: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A run's ``params``, ``tags`` and the JSON ``documents`` it logged (artifact path -> object, ``None`` when absent).

    Raises:
        TrackingError: the run does not exist or the store does not answer.
        ValueError: a document exists but is not valid JSON (names the run and the path).
    """
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except (MlflowException, SQLAlchemyError) as exc:
        raise _error(f"run {run_id}", exc) from exc
    listed: dict[str, set[str]] = {}
    for path in documents:
        folder = str(PurePosixPath(path).parent)
        if folder not in listed:
            try:
                listed[folder] = {f.path for f in client.list_artifacts(run_id, None if folder == "." else folder)}
            except (MlflowException, OSError) as exc:
                raise _error(f"listing artifacts {folder!r} of run {run_id}", exc) from exc
    docs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in documents:
            if path not in listed[str(PurePosixPath(path).parent)]:
                docs[path] = None
                continue
            try:
                local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
            except (MlflowException, OSError) as exc:
                raise _error(f"downloading {path} of run {run_id}", exc) from exc
            try:
                docs[path] = json.loads(Path(local).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"run {run_id}: artifact {path} is not valid JSON ({exc})") from exc
    return {"run_id": run_id, "params": dict(run.data.params), "tags": dict(run.data.tags), "documents": docs}


def latest_run(tags: dict[str, str], experiment: str = EXPERIMENT) -> dict[str, Any] | None:
    """The newest finished run of ``experiment`` carrying every tag of ``tags``: ``run_id``, ``start_time``
    (ms), ``tags``; ``None`` when there is none (or no such experiment).

    Raises:
        TrackingError: the store does not answer.
    """
    client = MlflowClient()
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        where = " and ".join([f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"])
        runs = client.search_runs([exp.experiment_id], filter_string=where, max_results=1,
                                  order_by=["attributes.start_time DESC"])
    except (MlflowException, SQLAlchemyError) as exc:
        raise _error(f"searching runs of {experiment!r}", exc) from exc
    if not runs:
        return None
    run = runs[0]
    return {"run_id": run.info.run_id, "start_time": run.info.start_time, "tags": dict(run.data.tags)}


def log_files_run(files: dict[str, str], experiment: str, name: str, tags: dict[str, str]) -> dict[str, Any]:
    """Log a run of ``experiment`` (created when absent) whose artifacts are ``files`` (artifact path -> text).

    Where the store is the project's sqlite file, a new experiment keeps its artifacts next to those of
    experiment ``mapex`` (not in ``./mlruns`` of whatever folder this runs in).

    Returns:
        ``run_id``, ``experiment_id`` and ``artifact_uri``.

    Raises:
        TrackingError: the store refused an operation.
    """
    client = MlflowClient()
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            base = client.get_experiment_by_name(EXPERIMENT)
            location = base.artifact_location if base and base.artifact_location.startswith("file:") else None
            try:
                exp_id = client.create_experiment(experiment, artifact_location=location)
            except MlflowException:  # created concurrently by another publisher
                exp_id = client.get_experiment_by_name(experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, tags=tags, run_name=name)
        try:
            for path, text in files.items():
                client.log_text(run.info.run_id, text, path)
        except BaseException:
            with contextlib.redirect_stdout(sys.stderr):
                client.set_terminated(run.info.run_id, status="FAILED")
            raise
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints "View run at <url>" to stdout: keep it clean
            client.set_terminated(run.info.run_id, status="FINISHED")
    except (MlflowException, SQLAlchemyError, OSError) as exc:
        raise _error(f"logging a run of {experiment!r}", exc) from exc
    return {"run_id": run.info.run_id, "experiment_id": exp_id, "artifact_uri": run.info.artifact_uri}


def download_run_files(run_id: str, paths: list[str], dst: str | Path) -> Path:
    """Download the artifacts ``paths`` of run ``run_id`` into folder ``dst`` (kept at their relative paths).

    Raises:
        TrackingError: an artifact is missing or the store does not answer.
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for path in paths:
        try:
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst))
        except (MlflowException, OSError) as exc:
            raise _error(f"downloading {path} of run {run_id}", exc) from exc
        if not (dst / path).is_file():
            raise TrackingError(f"run {run_id}: artifact {path} was not downloaded to {dst}")
    return dst

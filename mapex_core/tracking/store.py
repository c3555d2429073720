"""The MLflow door: which tracking store, and logging runs and models into it.

* Store: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<project>/mlflow/mlflow.db`` with
  artifacts under ``<project>/mlflow/artifacts`` (``mlflow/server.sh`` serves the UI on it).
  :func:`configure` points MLflow at it and checks that it answers.
* Models are logged as *models from code* (the small ``mapex_pyfunc.py`` below, written at log
  time, loads :class:`~mapex_core.tracking.served.MapexPyfunc`) whose artifacts are the model's
  ``config.json``/``task.json`` + ``model.safetensors``: nothing is pickled. Each carries its
  signature, an input example of real chips when the chip store is at hand, the ``mapex_core``
  code and exact pins, so a fresh environment built by MLflow serves it.

What is registered under which name, aliases and the promotion gate are in
:mod:`~mapex_core.tracking.registry`; the served model is :mod:`~mapex_core.tracking.served`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from mapex_core.errors import MapexError
from mapex_core.tracking.served import signature

EXPERIMENT = "mapex"
STORE_DIR = Path("mlflow")
_REQUIREMENT_PACKAGES = ("torch", "mlflow", "safetensors", "numpy", "pyyaml")
_PACKAGE = Path(__file__).resolve().parents[1]  # mapex_core: the logged model's code
_LOCK = _PACKAGE.parent / "requirements.lock"
_MODEL_CODE = '''"""MAPEX pyfunc model (models from code: nothing pickled). mapex_core travels with it (code/)."""
from mlflow.models import set_model

from mapex_core.tracking import MapexPyfunc

set_model(MapexPyfunc())
'''


class TrackingError(MapexError, RuntimeError):
    """The tracking store or registry is unreachable or refused an operation."""


def default_tracking_uri(root: str | Path = ".") -> str:
    """``sqlite:///<root>/mlflow/mlflow.db`` (absolute)."""
    return f"sqlite:///{(Path(root) / STORE_DIR / 'mlflow.db').resolve()}"


def tracking_uri(root: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the project's sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def configure(uri: str | None = None, root: str | Path = ".") -> str:
    """Point MLflow at ``uri`` (default :func:`tracking_uri`), check it answers, create the experiment.

    Raises:
        TrackingError: a server that does not answer, or a store that cannot be opened.
    """
    uri = uri or tracking_uri(root)
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        # MLflow creates a fresh sqlite store's schema on first use, unguarded: two processes starting at once
        # both run the migrations and one crashes ("table experiments already exists"). The first use of
        # both stores (tracking, registry) and the experiment's creation run under a lock next to the file.
        with _file_lock(db.with_name(db.name + ".lock") if db is not None else None):
            client = MlflowClient()
            if client.get_experiment_by_name(EXPERIMENT) is None:
                artifacts = (db.parent / "artifacts").resolve().as_uri() if db is not None else None
                with suppress(MlflowException):  # created concurrently by another run
                    client.create_experiment(EXPERIMENT, artifact_location=artifacts)
            client.search_registered_models(max_results=1)  # the registry store's tables
    except (MlflowException, SQLAlchemyError) as exc:
        raise TrackingError(f"MLflow tracking store {uri}: {exc}") from exc
    return uri


@contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the duration (none when ``path`` is ``None`` or cannot be opened)."""
    try:
        f = open(path, "a") if path is not None else None  # noqa: SIM115 - closed below
    except OSError:  # a read-only folder: nobody initialises a store there, reading needs no lock
        f = None
    if f is None:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_server(uri: str, timeout: float = 5.0) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310 - http(s) only
            if resp.status != 200:
                raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {resp.status}")
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({exc}); start it (mlflow/server.sh) "
                            "or unset MLFLOW_TRACKING_URI to use the local sqlite store") from exc


def pip_requirements(lock: str | Path | None = None) -> list[str]:
    """Exact pins of what loading a MAPEX pyfunc needs (torch, mlflow, safetensors, numpy, pyyaml).

    The versions are the project's ``requirements.lock`` (what ``make setup`` installs; ``lock``
    defaults to the one next to this package); where the package runs outside a checkout, the
    installed versions (no local labels such as ``+cpu``). Never inferred by MLflow.

    Raises:
        ValueError: ``lock`` was given and does not exist or pins one of them twice.
    """
    path = Path(lock) if lock is not None else _LOCK
    if lock is not None and not path.is_file():
        raise ValueError(f"{path}: requirements lock not found")
    pins: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, sep, ver = line.split("#")[0].strip().partition("==")
            key = _canonical(name)
            if sep and key in {_canonical(p) for p in _REQUIREMENT_PACKAGES}:
                if key in pins:
                    raise ValueError(f"{path}: {name} is pinned twice")
                pins[key] = ver.strip()
    reqs = []
    for pkg in _REQUIREMENT_PACKAGES:
        ver = pins.get(_canonical(pkg))
        if ver is None:
            try:
                ver = version(pkg).split("+")[0]
            except PackageNotFoundError:
                continue
        reqs.append(f"{pkg}=={ver}")
    return reqs


def _canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (``PyYAML`` = ``pyyaml``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value if isinstance(value, int | float | str | bool) or value is None else json.dumps(value)
    return out


def log_dataset(path: str | Path, digest: str | None, context: str) -> None:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local file source
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(path).resolve().as_uri())
    name = Path(path).name
    ds = MetaDataset(source=source, name=name, digest=(digest or "untracked").removesuffix(".dir")[:36])
    mlflow.log_input(ds, context=context)


def log_model_version(artifact_key: str, model_dir: Path, files: tuple[str, ...], registered: str,
                      metadata: dict[str, Any] | None = None,
                      input_example: dict[str, np.ndarray] | None = None) -> str:
    """Log the model in ``model_dir`` as a models-from-code pyfunc and register it; returns the version.

    The logged model carries its signature (:func:`~mapex_core.tracking.served.signature`),
    ``input_example`` when given (modality -> ``(B, C, H, W)`` physical values), the
    ``mapex_core`` package as its code (``code/mapex_core``, put on ``sys.path`` when it loads) and
    exact pins (:func:`pip_requirements`): a fresh environment built from its ``requirements.txt``
    (``mlflow models serve --env-manager uv``, ``mlflow models build-docker``) loads it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "mapex_pyfunc.py"
        code.write_text(_MODEL_CODE)
        weights = Path(tmp) / artifact_key
        weights.mkdir()
        for name in files:
            (weights / name).write_bytes((model_dir / name).read_bytes())
        package = Path(tmp) / "code" / "mapex_core"
        shutil.copytree(_PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        from mapex_core.remote_errors import remote_errors

        # the artifact store (through the tracking server) that does not answer: named, transient
        with warnings.catch_warnings(), remote_errors("MLflow artifact store", mlflow.get_artifact_uri(),
                                                      mlflow.get_tracking_uri()):
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            info = mlflow.pyfunc.log_model(name="model", python_model=str(code),
                                           artifacts={artifact_key: str(weights)}, pip_requirements=pip_requirements(),
                                           code_paths=[str(package)], registered_model_name=registered,
                                           metadata=metadata, signature=signature(model_dir),
                                           input_example=input_example)
    return str(info.registered_model_version)


def ui_base_url() -> str:
    """Where the MLflow UI of this store is: the tracking server itself when it is one, else the address
    ``mlflow/server.sh`` (``make mlflow-ui``) serves the project's store on."""
    uri = mlflow.get_tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"




def log_run_group(name: str, params: dict[str, Any], metrics: dict[str, float], children: list[dict[str, Any]],
                  tags: dict[str, str] | None = None, artifacts: list[str | Path] | None = None) -> dict[str, Any]:
    """Log a parent run and, nested under it, one run per entry of ``children`` (experiment ``mapex``).

    Call :func:`configure` first. Non-finite or missing metric values are left out (MLflow refuses ``None``).

    Args:
        name: the parent run's name.
        params: the parent's params (nested dicts become ``a.b`` keys).
        metrics: the parent's metrics.
        children: each ``{"name": ..., "params": {...}, "metrics": {...}, "tags": {...}}`` (``tags`` optional).
        tags: the parent's tags.
        artifacts: files logged on the parent run.

    Returns:
        ``run_id`` (the parent) and ``children`` (the child run ids, in order).

    Raises:
        TrackingError: the experiment does not exist (not configured) or the store refused an operation.
    """
    def finite(values: dict[str, Any]) -> dict[str, float]:
        return {k: float(v) for k, v in values.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)}

    uri = mlflow.get_tracking_uri()
    try:
        exp = MlflowClient().get_experiment_by_name(EXPERIMENT)
        if exp is None:
            raise TrackingError(f"MLflow tracking store {uri} has no experiment {EXPERIMENT!r}; configure() it first")
        ids = []
        with mlflow.start_run(experiment_id=exp.experiment_id, run_name=name, tags=tags) as parent:
            mlflow.log_params(flatten("", params, {}))
            mlflow.log_metrics(finite(metrics))
            for child in children:
                with mlflow.start_run(experiment_id=exp.experiment_id, run_name=child["name"], nested=True,
                                      tags=child.get("tags")) as run:
                    mlflow.log_params(flatten("", child.get("params") or {}, {}))
                    mlflow.log_metrics(finite(child.get("metrics") or {}))
                    ids.append(run.info.run_id)
            for path in artifacts or []:
                mlflow.log_artifact(str(path))
    except (MlflowException, SQLAlchemyError) as exc:
        raise TrackingError(f"MLflow tracking store {uri}: {exc}") from exc
    return {"run_id": parent.info.run_id, "children": ids}

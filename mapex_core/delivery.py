"""Getting the platform's models to their users: maps, exports, a served model, a look at the registry.

Each function is what one ``mapex`` command does after parsing: it finds the task model (a
registered version ``mapex-APP@ALIAS`` through :mod:`mapex_core.tracking`, or a local folder),
checks it belongs to the application, and hands it to the library (:mod:`mapex_core.predict`,
:mod:`mapex_core.export`) or to the REST server (:mod:`mapex_core.tracking.server`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mapex_core.apps import check_model_app
from mapex_core.names import check_alias, check_name


def task_model_folder(app: str, alias: str = "champion", model: str | Path | None = None
                      ) -> tuple[Path, dict[str, Any]]:
    """The folder of ``app``'s task model and where it came from.

    Args:
        app: the application.
        alias: the registry alias to fetch (when ``model`` is not given).
        model: a local task model folder instead of the registry.

    Returns:
        ``(folder, lineage)``; ``lineage`` names the registered version, run, git SHA and DVC hash, or
        the local source.

    Raises:
        ValueError: a bad name, no such version or alias, or a model of another application.
    """
    check_name(app)
    check_alias(alias)
    if model is None:
        from mapex_core import tracking

        tracking.configure()
        lineage = tracking.version_lineage(app, alias)
        folder = tracking.download_task_model(app, alias)
    else:
        folder, lineage = Path(model), {"app": app, "source": str(model)}
    task = folder / "task.json"
    try:
        info = json.loads(task.read_text()) if task.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{task}: not valid JSON ({exc})") from exc
    check_model_app(info, app, folder)
    return folder, lineage


def predict(app: str, inputs: dict[str, str | Path], out: str | Path, alias: str = "champion",
            model: str | Path | None = None, progress: Callable[[int, int], None] | None = None,
            **options: Any) -> dict[str, Any]:
    """``mapex predict``: map whole scenes with ``app``'s model into a georeferenced COG.

    Args:
        inputs: modality -> scene file.
        options: :func:`mapex_core.predict.predict_scene` options (``output``, ``overlap``, ``batch_size``).
    """
    from mapex_core._env import return_freed_memory
    from mapex_core.model.heads import load_task_model
    from mapex_core.predict import predict_scene

    return_freed_memory()  # an inference process: freed activations go back to the OS
    folder, _ = task_model_folder(app, alias, model)
    return predict_scene(load_task_model(folder), inputs, out, progress=progress, **options)


def export(app: str, fmt: str, out: str | Path, alias: str = "champion", model: str | Path | None = None,
           force: bool = False) -> dict[str, Any]:
    """``mapex export``: ``app``'s model as ONNX or a ``torch.export`` program, with a STAC item."""
    from mapex_core.export import FORMATS, ExportError, check_out_dir, export_task_model

    if fmt not in FORMATS:
        raise ExportError(f"unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    check_out_dir(out, force)  # before any download
    folder, lineage = task_model_folder(app, alias, model)
    return export_task_model(folder, out, fmt, lineage, force=force)


def serve(app: str, alias: str = "champion", host: str = "127.0.0.1", port: int = 5001, workers: int | None = None,
          max_body_mb: float | None = None, announce: Callable[[dict[str, Any]], None] | None = None,
          max_batch: int | None = None, max_wait_ms: float | None = None) -> None:
    """``mapex serve``: serve ``mapex-APP@ALIAS`` over REST until SIGTERM or Ctrl-C.

    The alias is resolved once (every worker serves the same version); the version's task model folder
    is checked before it is loaded; MLflow's scoring app runs behind
    :class:`mapex_core.tracking.server.GuardedApp` (malformed requests get a short 4xx); concurrent
    requests share forward passes (:mod:`mapex_core.tracking.batching`).

    Args:
        workers: server worker processes, each loading the model and batching its own requests (default:
            one per CPU core this process may use, :func:`mapex_core.tracking.server.serve_workers`).
        max_body_mb: the request body limit in MiB (default: the model's largest valid request in the
            compact form, at least 32 MiB).
        announce: called with ``version``, ``store``, ``max_body`` (bytes), ``workers``, ``max_batch`` (rows)
            and ``max_wait_ms`` just before the server starts.
        max_batch, max_wait_ms: the most rows in one forward (1: no batching) and the longest a request
            waits for others on their way (default: ``MAPEX_SERVE_MAX_BATCH`` / ``MAPEX_SERVE_MAX_WAIT_MS``,
            else 64 rows and 2 ms).

    Raises:
        ValueError: a bad name, option, no such model or alias, or a model folder that does not match its config.
    """
    from mapex_core import tracking
    from mapex_core.tracking.batching import check_settings, settings_from_env
    from mapex_core.tracking.server import serve_model, serve_workers

    check_name(app)
    check_alias(alias)
    workers = serve_workers(workers)  # (the default resolved there, once)
    default_batch, default_wait = settings_from_env()  # (a bad variable is an error now, named)
    check_settings(default_batch if max_batch is None else max_batch, default_wait, "--max-batch")
    check_settings(default_batch, default_wait if max_wait_ms is None else max_wait_ms, "--max-wait-ms")
    _check_port_free(host, port)  # before the model is fetched: one line, not uvicorn's exit 3
    uri = tracking.configure()
    version = tracking.model_version_for(app, alias)

    def started(max_body: int) -> None:
        if announce is not None:
            batch, wait = settings_from_env()  # what serve_model set for the model
            announce({"version": version, "store": uri, "max_body": max_body, "workers": workers,
                      "max_batch": batch, "max_wait_ms": wait})

    serve_model(f"models:/{tracking.registered_name(app)}/{version}", host, port, workers, max_body_mb, started,
                max_batch, max_wait_ms)


def _check_port_free(host: str, port: int) -> None:
    """Raise ``ValueError`` naming ``host:port`` when it cannot be bound (in use, or no such interface)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ValueError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None


def registry_view(app: str) -> dict[str, Any]:
    """``mapex registry``: the versions of ``mapex-APP`` with aliases, metric and gate decision.

    Raises:
        ValueError: the application has no versions yet.
    """
    from mapex_core import tracking

    tracking.configure()
    state = tracking.registry_state(check_name(app))
    if not state["versions"]:
        raise ValueError(f"no versions of {state['model']} yet; run `mapex retrain`")
    keys = ("metric", "metric_value", "params", "gate.decision", "promotion", "git_sha", "dvc_hash")
    return {"model": state["model"], "champion": state["champion"], "challenger": state["challenger"],
            "versions": [{"version": v["version"], "aliases": v["aliases"], **{k: v["tags"].get(k) for k in keys},
                          "gate.reasons": json.loads(v["tags"].get("gate.reasons", "[]"))}
                         for v in state["versions"]]}


def promote(app: str, version: str, reason: str = "") -> dict[str, Any]:
    """``mapex promote``: move ``champion`` of ``mapex-APP`` to ``version`` by hand (recorded as manual)."""
    from mapex_core import tracking

    check_name(app)
    tracking.configure()
    return tracking.promote(app, version, reason)


def describe(path: str | Path) -> dict[str, Any]:
    """``mapex info``: a model folder (config, parameters), a task model folder (also its task and classes)
    or a chip store (chips, splits, bands). A model folder is checked against its config before its
    weights are loaded (an error names the folder and the field)."""
    path = Path(path)
    if (path / "task.json").is_file():
        from mapex_core.model.heads import load_task_model

        task_model = load_task_model(path)
        return {"config": task_model.encoder.config.to_dict(), "task": task_model.task,
                "classes": task_model.class_names, "modalities": task_model.modalities,
                "parameters": task_model.num_parameters(), "breakdown": task_model.encoder.parameter_breakdown()}
    if (path / "config.json").is_file():
        from mapex_core.model import load_model

        model = load_model(path)
        return {"config": model.config.to_dict(), "parameters": model.num_parameters(),
                "breakdown": model.parameter_breakdown()}
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (mapex info takes a model folder or a chip store)")
    if (path / "model.safetensors").is_file():  # weights without their config: a write that did not finish
        raise ValueError(f"{path}: a model folder without config.json (incomplete: written by a run that was "
                         "stopped); run its stage again")
    from mapex_core.data.dataset import ChipStore

    store = ChipStore.open(path)
    meta = store.metadata()
    return {"chips": len(store), "modalities": store.modalities, "chip_size": store.ds.attrs.get("chip_size"),
            "splits": meta["split"].value_counts().to_dict(), "classes": store.class_names,
            "bands": {m: list(store.band_stats(m).index) for m in store.modalities}}

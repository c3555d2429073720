"""The only module that talks to MLflow: tracking store, runs, registry, promotion gate, pyfunc model.

* Store: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<project>/mlflow/mlflow.db`` with
  artifacts under ``<project>/mlflow/artifacts`` (``mlflow/server.sh`` serves the UI on it).
* Registered models: ``mapex-pretrained`` (the pre-trained encoder) and ``mapex-<app>`` (the
  pruned, fine-tuned task model). Models are logged as *models from code*
  (``mlflow/mapex_pyfunc.py``-style file written at log time) whose artifacts are the model's
  ``config.json``/``task.json`` + ``model.safetensors``: nothing is pickled.
* A new ``mapex-<app>`` version gets alias ``challenger``; :func:`apply_gate` moves ``champion``
  to it only when its primary metric is not worse than the champion's beyond the app's tolerance
  and the size/latency bounds hold. Decision and reasons become version tags. Aliases move under
  a lock, after the gate, so concurrent retrains cannot interleave their read-compare-move.
* Registration is idempotent: a model whose weights (sha256) are already a version of the
  registered model is not registered again.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import math
import os
import tempfile
import time
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
from mlflow.pyfunc import PythonModel

from mapex_core.lineage import file_sha256

EXPERIMENT = "mapex"
STORE_DIR = Path("mlflow")
PRETRAINED_MODEL = "mapex-pretrained"
CHAMPION, CHALLENGER, PRETRAINED_ALIAS = "champion", "challenger", "current"
_REQUIREMENT_PACKAGES = ("torch", "mlflow", "safetensors", "numpy", "pyyaml")
_MODEL_CODE = '''"""MAPEX pyfunc model (models from code: nothing pickled). Needs the mapex package installed."""
from mlflow.models import set_model

from mapex_core.tracking import MapexPyfunc

set_model(MapexPyfunc())
'''


class TrackingError(RuntimeError):
    """The tracking store or registry is unreachable or refused an operation."""


def registered_name(app: str) -> str:
    """The registered model name of application ``app``."""
    return f"mapex-{app}"


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
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        client = MlflowClient()
        if client.get_experiment_by_name(EXPERIMENT) is None:
            artifacts = None
            if uri.startswith("sqlite:///"):
                artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
            with suppress(MlflowException):  # created concurrently by another run
                client.create_experiment(EXPERIMENT, artifact_location=artifacts)
    except MlflowException as exc:
        raise TrackingError(f"MLflow tracking store {uri}: {exc}") from exc
    return uri


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


def pip_requirements() -> list[str]:
    """Exact pins of what loading a MAPEX pyfunc needs (no local version labels such as ``+cpu``)."""
    reqs = []
    for pkg in _REQUIREMENT_PACKAGES:
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


@contextmanager
def registry_lock(root: str | Path = ".") -> Iterator[None]:
    """An exclusive lock (``mlflow/registry.lock``) around alias moves of this project's registry.

    It serialises retrains of one project folder on one machine (the local and the sqlite case).
    Workers on several machines sharing a tracking server need a shared folder for it (or one
    worker per pool that registers).
    """
    path = Path(root) / STORE_DIR / "registry.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value if isinstance(value, int | float | str | bool) or value is None else json.dumps(value)
    return out


def _log_dataset(path: str | Path, digest: str | None, context: str) -> None:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local file source
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(path).resolve().as_uri())
    name = Path(path).name
    ds = MetaDataset(source=source, name=name, digest=(digest or "untracked").removesuffix(".dir")[:36])
    mlflow.log_input(ds, context=context)


def _existing_version(client: MlflowClient, name: str, sha: str) -> Any | None:
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for v in versions:
        if v.tags.get("model_sha256") == sha:
            return v
    return None


def _signature() -> Any:
    """A signature with no input schema (the input contract validates dicts of arrays) and the
    ``output`` param: without a params schema MLflow drops ``params`` before ``predict`` sees them."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ModelSignature(inputs=None, outputs=None, params=ParamSchema([ParamSpec("output", "string", "default")]))


def _log_pyfunc(artifact_key: str, model_dir: Path, files: tuple[str, ...], registered: str,
                metadata: dict[str, Any] | None = None) -> str:
    """Log the model in ``model_dir`` as a models-from-code pyfunc and register it; returns the version."""
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "mapex_pyfunc.py"
        code.write_text(_MODEL_CODE)
        weights = Path(tmp) / artifact_key
        weights.mkdir()
        for name in files:
            (weights / name).write_bytes((model_dir / name).read_bytes())
        with warnings.catch_warnings():  # no input example: the input contract (metadata) documents the input
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            info = mlflow.pyfunc.log_model(name="model", python_model=str(code),
                                           artifacts={artifact_key: str(weights)}, pip_requirements=pip_requirements(),
                                           registered_model_name=registered, metadata=metadata,
                                           signature=_signature())
    return str(info.registered_model_version)


def log_pretrain(pretrain_dir: str | Path, params: dict[str, Any], chips: dict[str, str | None],
                 git: str, root: str | Path = ".") -> dict[str, Any]:
    """Log the pre-training run and register ``mapex-pretrained`` (idempotent on the weights).

    Args:
        pretrain_dir: ``config.json``, ``model.safetensors``, ``metrics.json``, ``routing_stats.json``.
        params: the ``model`` and ``pretrain`` params sections.
        chips: chip store path -> its DVC hash (the dataset digest).
        git: the code version (:func:`mapex_core.lineage.git_sha`).

    Returns:
        ``run_id``, ``version``, ``new`` (False when these weights were registered before).
    """
    d = Path(pretrain_dir)
    sha = file_sha256(d / "model.safetensors")
    client = MlflowClient()
    found = _existing_version(client, PRETRAINED_MODEL, sha)
    if found is not None:  # these weights again (e.g. params reverted): make them current again
        with registry_lock(root):
            client.set_registered_model_alias(PRETRAINED_MODEL, PRETRAINED_ALIAS, str(found.version))
        return {"run_id": found.run_id, "version": str(found.version), "new": False}
    metrics = json.loads((d / "metrics.json").read_text())
    config = json.loads((d / "config.json").read_text())
    exp = client.get_experiment_by_name(EXPERIMENT)
    tags = {"mapex.stage": "pretrain", "mapex.git_sha": git, "mapex.modalities": ",".join(config["modalities"]),
            "mapex.params": str(metrics["parameters"]),
            "mapex.dvc_hash": ",".join(f"{Path(p).name}={h}" for p, h in chips.items())}
    ver: str | None = None
    try:
        with mlflow.start_run(experiment_id=exp.experiment_id, run_name="pretrain", tags=tags) as run:
            ver = _log_pretrain_run(d, params, metrics, chips)
            for k, v in {"model_sha256": sha, "run_id": run.info.run_id, "git_sha": git}.items():
                client.set_model_version_tag(PRETRAINED_MODEL, ver, k, v)
            with registry_lock(root):
                client.set_registered_model_alias(PRETRAINED_MODEL, PRETRAINED_ALIAS, ver)
    except BaseException:
        _delete_version(client, PRETRAINED_MODEL, ver)
        raise
    return {"run_id": run.info.run_id, "version": ver, "new": True}


def _delete_version(client: MlflowClient, name: str, ver: str | None) -> None:
    """Remove a version whose registration did not complete (nothing half-registered)."""
    if ver is not None:
        with suppress(MlflowException):
            client.delete_model_version(name, ver)


def _log_pretrain_run(d: Path, params: dict[str, Any], metrics: dict[str, Any], chips: dict[str, str | None]) -> str:
    """Params, curves, artifacts, inputs and the model of the active pre-training run; returns the version."""
    mlflow.log_params(_flatten("", {k: v for k, v in params.items() if k in ("model", "pretrain")}, {}))
    for i, step in enumerate(metrics["steps"]):
        mlflow.log_metrics({k: metrics[k][i] for k in ("loss", "recon_loss", "aux_loss", "lr")}, step=step)
    mlflow.log_metrics({"tokens_per_s": metrics["tokens_per_s"], "samples_per_s": metrics["samples_per_s"],
                        "parameters": metrics["parameters"]}
                       | {f"specialisation.{m}": v for m, v in metrics["specialisation"].items()})
    for name in ("config.json", "metrics.json", "routing_stats.json", "loss.csv"):
        if (d / name).is_file():
            mlflow.log_artifact(str(d / name), artifact_path="pretrain")
    for path, digest in chips.items():
        _log_dataset(path, digest, "pretraining")
    return _log_pyfunc("encoder", d, ("config.json", "model.safetensors"), PRETRAINED_MODEL)


def register_app(app: Any, finetuned_dir: str | Path, prune_report: dict[str, Any], evaluation: dict[str, Any],
                 finetune_summary: dict[str, Any], lineage: dict[str, Any], root: str | Path = ".") -> dict[str, Any]:
    """Log application ``app``'s run, register its model as ``mapex-<app>`` and apply the promotion gate.

    Args:
        app: the :class:`~mapex_core.apps.Application`.
        finetuned_dir: the pruned, fine-tuned task model (``config.json``, ``task.json``, ``model.safetensors``).
        lineage: ``git_sha``, ``dvc_hash`` (of the app's chip store), ``chips`` and
            ``pretrain_run_id`` / ``pretrain_version`` (the parent pre-training run).

    Returns:
        ``run_id``, ``version``, ``new`` and the gate ``decision`` (``passed``/``failed``) with ``reasons``.
        When a step fails after the version was created, the version is deleted before re-raising,
        so nothing is half-registered.
    """
    d = Path(finetuned_dir)
    name = registered_name(app.name)
    sha = file_sha256(d / "model.safetensors")
    client = MlflowClient()
    found = _existing_version(client, name, sha)
    if found is not None:
        return {"run_id": found.run_id, "version": str(found.version), "new": False,
                "decision": found.tags.get("gate.decision", "none"),
                "reasons": json.loads(found.tags.get("gate.reasons", "[]"))}
    pruned, unpruned = evaluation["pruned"], evaluation["unpruned"]
    tags = {"mapex.stage": "app", "mapex.app": app.name, "mapex.modalities": ",".join(app.modalities),
            "mapex.git_sha": lineage.get("git_sha", "unknown"), "mapex.dvc_hash": str(lineage.get("dvc_hash")),
            "mapex.params_full": str(unpruned["params"]), "mapex.params_pruned": str(pruned["params"]),
            "mapex.encoder_params_before": str(prune_report["params_before"]),
            "mapex.encoder_params_after": str(prune_report["params_after"]),
            "mapex.pretrain_run_id": str(lineage.get("pretrain_run_id")),
            "mapex.pretrain_version": str(lineage.get("pretrain_version"))}
    if lineage.get("pretrain_run_id"):
        tags["mlflow.parentRunId"] = lineage["pretrain_run_id"]
    exp = client.get_experiment_by_name(EXPERIMENT)
    ver: str | None = None
    try:
        with mlflow.start_run(experiment_id=exp.experiment_id, run_name=app.name, tags=tags) as run:
            mlflow.log_params(_flatten("", {"app": {k: v for k, v in app.to_dict().items() if k != "name"}}, {}))
            hist = finetune_summary.get("history", {})
            for step, loss, val in zip(hist.get("steps", []), hist.get("train_loss", []), hist.get("val", []),
                                       strict=False):
                mlflow.log_metrics({"finetune.train_loss": loss}
                                   | ({f"finetune.val_{app.metric}": val} if val is not None else {}), step=step)
            flat: dict[str, float] = {}
            for variant in ("pruned", "unpruned", "scratch"):
                v = evaluation[variant]
                flat |= {f"{variant}.{app.metric}": v["value"], f"{variant}.ci95_low": v["ci95"][0],
                         f"{variant}.ci95_high": v["ci95"][1], f"{variant}.params": v["params"],
                         f"{variant}.checkpoint_bytes": v["checkpoint_bytes"], f"{variant}.latency_ms": v["latency_ms"]}
            flat["prune.reduction"] = prune_report["reduction"]
            flat |= {f"routing.coverage.block{k}": float(c) for k, c in (prune_report.get("coverage") or {}).items()}
            mlflow.log_metrics({k: float(v) for k, v in flat.items() if v is not None})
            mlflow.log_dict(prune_report, "reports/prune_report.json")
            mlflow.log_dict(evaluation, "reports/evaluation.json")
            mlflow.log_dict(finetune_summary, "reports/finetune.json")
            mlflow.log_artifact(str(d / "config.json"), artifact_path="reports")
            if lineage.get("chips"):
                _log_dataset(lineage["chips"], lineage.get("dvc_hash"), "finetuning")
            ver = _log_pyfunc("task_model", d, ("config.json", "task.json", "model.safetensors"), name,
                              metadata={"mapex_contract": task_contract(d)})
            vtags = {"model_sha256": sha, "run_id": run.info.run_id, "app": app.name, "metric": app.metric,
                     "metric_value": repr(float(pruned["value"])), "params": str(pruned["params"]),
                     "latency_ms": repr(float(pruned["latency_ms"])),
                     "checkpoint_bytes": str(pruned["checkpoint_bytes"]),
                     "git_sha": tags["mapex.git_sha"], "dvc_hash": tags["mapex.dvc_hash"]}
            for k, v in vtags.items():
                client.set_model_version_tag(name, ver, k, v)
            decision = apply_gate(app, ver, root=root)
    except BaseException:
        _delete_version(client, name, ver)
        raise
    return {"run_id": run.info.run_id, "version": ver, "new": True} | decision


def task_contract(model_dir: str | Path) -> dict[str, Any]:
    """The input contract (:class:`~mapex_core.contract.InputContract`) of the task model in ``model_dir``."""
    from mapex_core.contract import InputContract
    from mapex_core.model.heads import load_task_model

    return InputContract.of(load_task_model(model_dir)).to_dict()


def model_version_for(app: str, alias: str) -> str:
    """The version of ``mapex-<app>`` that ``alias`` points to.

    Raises:
        ValueError: no such registered model or alias (lists the aliases that exist).
    """
    client = MlflowClient()
    name = registered_name(app)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        raise ValueError(f"no registered model {name!r}: run `mapex retrain` for application {app!r} first") from exc
    aliases = dict(model.aliases or {})
    if alias not in aliases:
        raise ValueError(f"{name} has no alias {alias!r}; aliases: {aliases or 'none'}")
    return str(aliases[alias])


def version_lineage(app: str, alias: str = CHAMPION) -> dict[str, Any]:
    """Where ``mapex-<app>@<alias>`` came from, for exports: ``registered_model``, ``version``, ``alias``,
    ``run_id``, ``git_sha``, ``dvc_hash``, ``model_sha256`` and ``created`` (ISO 8601, UTC).

    Raises:
        ValueError: no such registered model or alias.
    """
    from datetime import UTC, datetime

    ver = model_version_for(app, alias)
    v = MlflowClient().get_model_version(registered_name(app), ver)
    created = datetime.fromtimestamp(v.creation_timestamp // 1000, UTC).isoformat() if v.creation_timestamp else None
    return {"registered_model": registered_name(app), "version": str(ver), "alias": alias, "run_id": v.run_id,
            "app": v.tags.get("app", app), "git_sha": v.tags.get("git_sha"), "dvc_hash": v.tags.get("dvc_hash"),
            "model_sha256": v.tags.get("model_sha256"), "created": created}


def download_task_model(app: str, alias: str = CHAMPION, dst: str | Path | None = None) -> Path:
    """Fetch the task model of ``mapex-<app>@<alias>`` (``config.json``, ``task.json``, safetensors); its folder."""
    model_version_for(app, alias)  # clear error when the model or alias does not exist
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{registered_name(app)}@{alias}",
                                                dst_path=str(dst) if dst else None)
    path = Path(local) / "artifacts" / "task_model"
    if not (path / "task.json").is_file():
        raise ValueError(f"{registered_name(app)}@{alias} holds no MAPEX task model (artifacts/task_model)")
    return path


def gate_decision(app: Any, candidate: dict[str, Any], champion: dict[str, Any] | None) -> tuple[bool, list[str]]:
    """The promotion rule, pure: ``candidate``/``champion`` hold ``version``, ``metric``, ``value``,
    ``params``, ``latency_ms``. Returns (passed, reasons)."""
    g = app.gate
    reasons, ok = [], True
    if not math.isfinite(candidate["value"]):
        return False, [f"{candidate['metric']} is {candidate['value']}: not a finite value"]
    if champion is not None and not math.isfinite(champion["value"]):
        champion = None
        reasons.append("champion has no finite metric value: not compared")
    if champion is None:
        reasons = reasons or ["no champion yet"]
    elif champion["metric"] != candidate["metric"]:
        reasons.append(f"champion v{champion['version']} was measured with {champion['metric']}, "
                       f"not {candidate['metric']}: metric not compared")
    else:
        floor = champion["value"] - g.tolerance
        passed = candidate["value"] >= floor
        ok &= passed
        reasons.append(f"{candidate['metric']} {candidate['value']:.4f} {'>=' if passed else '<'} champion "
                       f"v{champion['version']} {champion['value']:.4f} - tolerance {g.tolerance}")
    if g.max_params is not None:
        passed = candidate["params"] <= g.max_params
        ok &= passed
        reasons.append(f"parameters {candidate['params']} {'<=' if passed else '>'} max {g.max_params}")
    if g.max_latency_ms is not None:
        passed = candidate["latency_ms"] <= g.max_latency_ms
        ok &= passed
        reasons.append(f"latency {candidate['latency_ms']:.2f} ms {'<=' if passed else '>'} max {g.max_latency_ms} ms")
    return ok, reasons


def register_app_from_outputs(app: str, params: str | Path, pretrain_run: dict[str, Any] | None,
                              root: str | Path = ".") -> dict[str, Any]:
    """:func:`register_app` for the outputs the pipeline stages wrote for ``app`` (see :mod:`mapex_core.stages`)."""
    from mapex_core import lineage, stages
    from mapex_core.apps import get_application

    application = get_application(app, params)
    paths = stages.app_paths(app)
    files = {"prune report": paths.pruned / "prune_report.json", "evaluation": paths.evaluation,
             "fine-tuning summary": paths.finetuned / "finetune.json"}
    for what, f in files.items():
        if not (Path(root) / f).is_file():
            raise ValueError(f"{f}: the {what} of application {app!r} is missing; run its stages first")
    read = {k: json.loads((Path(root) / f).read_text()) for k, f in files.items()}
    info = {"git_sha": lineage.git_sha(root), "dvc_hash": lineage.output_hash(application.chips or "", root),
            "chips": application.chips, "pretrain_run_id": (pretrain_run or {}).get("run_id"),
            "pretrain_version": (pretrain_run or {}).get("version")}
    res = register_app(application, Path(root) / paths.finetuned, read["prune report"], read["evaluation"],
                       read["fine-tuning summary"], info, root=root)
    res["aliases"] = sorted(MlflowClient().get_model_version(registered_name(app), res["version"]).aliases)
    res.setdefault("champion", _alias_version(MlflowClient(), registered_name(app), CHAMPION))
    return res


def _version_facts(client: MlflowClient, name: str, ver: str) -> dict[str, Any]:
    tags = client.get_model_version(name, ver).tags
    return {"version": str(ver), "metric": tags.get("metric", ""), "value": float(tags.get("metric_value", "nan")),
            "params": int(tags.get("params", "0")), "latency_ms": float(tags.get("latency_ms", "nan"))}


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def apply_gate(app: Any, ver: str, root: str | Path = ".") -> dict[str, Any]:
    """Set ``challenger`` on version ``ver`` of ``mapex-<app>`` and move ``champion`` if the gate passes.

    Runs under :func:`registry_lock`, re-reading the champion inside it. Records ``gate.decision``,
    ``gate.reasons``, ``gate.compared_to`` and ``gate.time`` as version tags.
    """
    client = MlflowClient()
    name = registered_name(app.name)
    with registry_lock(root):
        champ_ver = _alias_version(client, name, CHAMPION)
        champion = _version_facts(client, name, champ_ver) if champ_ver is not None else None
        passed, reasons = gate_decision(app, _version_facts(client, name, ver), champion)
        decision = "passed" if passed else "failed"
        for k, v in {"gate.decision": decision, "gate.reasons": json.dumps(reasons),
                     "gate.compared_to": champ_ver or "none", "gate.time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                           time.gmtime())}.items():
            client.set_model_version_tag(name, ver, k, v)
        client.set_registered_model_alias(name, CHALLENGER, ver)
        if passed:
            client.set_registered_model_alias(name, CHAMPION, ver)
            client.set_model_version_tag(name, ver, "promotion", "gate")
    return {"decision": decision, "reasons": reasons, "champion": ver if passed else champ_ver}


def promote(app: str, ver: str, reason: str = "", root: str | Path = ".") -> dict[str, Any]:
    """Move ``champion`` of ``mapex-<app>`` to version ``ver`` by hand, recorded as a manual promotion.

    Raises:
        ValueError: the registered model or the version does not exist (lists the versions).
    """
    client = MlflowClient()
    name = registered_name(app)
    try:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    except MlflowException as exc:
        raise TrackingError(f"registry at {mlflow.get_registry_uri()}: {exc}") from exc
    if not versions:
        raise ValueError(f"no registered model {name!r} (application {app!r} has no versions yet)")
    if not str(ver).isdigit() or int(ver) not in versions:
        raise ValueError(f"{name} has no version {ver!r}; versions: {versions}")
    ver = str(int(ver))
    with registry_lock(root):
        previous = _alias_version(client, name, CHAMPION)
        client.set_registered_model_alias(name, CHAMPION, str(ver))
        for k, v in {"promotion": "manual", "promotion.by": getpass.getuser(), "promotion.reason": reason or "-",
                     "promotion.previous_champion": previous or "none",
                     "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}.items():
            client.set_model_version_tag(name, str(ver), k, v)
    return {"app": app, "model": name, "champion": str(ver), "previous_champion": previous}


def registry_state(app: str) -> dict[str, Any]:
    """Versions of ``mapex-<app>`` (newest first) with their tags and aliases."""
    client = MlflowClient()
    name = registered_name(app)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        versions = []
    rows = [{"version": str(v.version), "aliases": list(v.aliases), "run_id": v.run_id, "tags": dict(v.tags),
             "created": v.creation_timestamp} for v in versions]
    rows.sort(key=lambda r: int(r["version"]), reverse=True)
    return {"model": name, "versions": rows, "champion": _alias_version(client, name, CHAMPION) if rows else None,
            "challenger": _alias_version(client, name, CHALLENGER) if rows else None}


def ui_base_url() -> str:
    """Where the MLflow UI of this store is: the tracking server itself when it is one, else the address
    ``mlflow/server.sh`` (``make mlflow-ui``) serves the project's store on."""
    uri = mlflow.get_tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def registry_history(apps: list[str]) -> dict[str, Any]:
    """What the dashboard shows of the registry: per application, every version of ``mapex-<app>``
    (newest first) with its tags, aliases and its run's metrics; plus ``mapex-pretrained``.

    Returns:
        ``{"ui": base URL, "experiment_id", "apps": {app: registry_state + per-version "metrics"},
        "pretrained": {"version", "run_id", "metrics", "tags"} or None}``. A registry with no versions
        yet gives empty lists, not an error.
    """
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs: dict[str, dict[str, float]] = {}

    def metrics_of(run_id: str | None) -> dict[str, float]:
        if not run_id:
            return {}
        if run_id not in runs:
            try:
                runs[run_id] = dict(client.get_run(run_id).data.metrics)
            except MlflowException:
                runs[run_id] = {}
        return runs[run_id]

    out: dict[str, Any] = {"ui": ui_base_url(), "experiment_id": exp.experiment_id if exp else None, "apps": {}}
    for app in apps:
        state = registry_state(app)
        for row in state["versions"]:
            row["metrics"] = metrics_of(row["run_id"])
        out["apps"][app] = state
    try:
        pre = client.get_model_version_by_alias(PRETRAINED_MODEL, PRETRAINED_ALIAS)
        out["pretrained"] = {"version": str(pre.version), "run_id": pre.run_id, "tags": dict(pre.tags),
                             "metrics": metrics_of(pre.run_id)}
    except MlflowException:
        out["pretrained"] = None
    return out


class MapexPyfunc(PythonModel):
    """MLflow pyfunc of a MAPEX model loaded from safetensors + JSON, with its input contract.

    Input (``{"inputs": {...}}`` over REST): a dict modality -> array ``(B, C, H, W)`` of physical
    values (S2 reflectance x 1e4, S1 dB) in the band order of :mod:`mapex_core.modalities`;
    normalisation is applied inside with the model's statistics
    (:class:`~mapex_core.contract.InputContract`). A request that breaks the contract raises an
    ``MlflowException`` (HTTP 400) saying what was expected.

    Output: ``{"probabilities": (B, K), "classes": [...]}`` for classification;
    ``{"mask": (B, H, W), "classes": [...]}`` for segmentation (``params={"output":
    "probabilities"}`` gives ``(B, K, H, W)`` instead); ``{"embeddings": (B, dim)}`` (mean-pooled
    encoder tokens) for ``mapex-pretrained``.
    """

    # predict takes a dict of arrays: no type-hint schema (MLflow would read hints as rows and warn)
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from mapex_core._env import SERVING_MMAP_THRESHOLD, return_freed_memory
        from mapex_core.contract import InputContract
        from mapex_core.model import load_model
        from mapex_core.model.heads import load_task_model

        if "task_model" in context.artifacts:
            self.model = load_task_model(context.artifacts["task_model"])
            self.contract = InputContract.of(self.model)
        else:
            self.model = load_model(context.artifacts["encoder"])
            self.contract = None
        self.model.eval()
        return_freed_memory(SERVING_MMAP_THRESHOLD)  # a serving process: activations go back to the OS

    def _bad_request(self, msg: str) -> MlflowException:
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        return MlflowException(msg, error_code=INVALID_PARAMETER_VALUE)

    def _encoder_inputs(self, model_input: Any) -> dict[str, np.ndarray]:
        cfg = self.model.config
        if not isinstance(model_input, dict) or not model_input or set(model_input) - set(cfg.modalities):
            raise self._bad_request(f"inputs must be an object with some of the modalities {cfg.modalities}")
        from mapex_core.contract import normalize

        arrays = {}
        for m, x in model_input.items():
            a = np.asarray(x, dtype=np.float32)
            if a.ndim != 4 or a.shape[1] != cfg.in_chans[m]:
                raise self._bad_request(f"{m}: expected (B, {cfg.in_chans[m]}, H, W), got {tuple(a.shape)}")
            arrays[m] = a
        return {m: np.nan_to_num(a, nan=0.0) for m, a in normalize(arrays, cfg.normalization).items()}

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - untyped: MLflow reads hints as a schema
        import torch

        from mapex_core.contract import ContractError

        if self.contract is None:
            arrays = self._encoder_inputs(model_input)
            with torch.inference_mode():
                tokens = self.model.encode({m: torch.from_numpy(a) for m, a in arrays.items()}).tokens
            return {"embeddings": tokens.mean(1).numpy()}
        try:
            arrays = self.contract.normalize(self.contract.validate(model_input))
        except ContractError as exc:
            raise self._bad_request(str(exc)) from None
        output = (params or {}).get("output", "default")
        if output not in ("default", "probabilities"):
            raise self._bad_request(f"params.output must be 'default' or 'probabilities', got {output!r}")
        with torch.inference_mode():
            logits = self.model({m: torch.from_numpy(a) for m, a in arrays.items()}).float()
        classes = self.contract.classes
        if self.model.task == "multilabel":
            return {"probabilities": torch.sigmoid(logits).numpy(), "classes": classes}
        probs = torch.softmax(logits, dim=1)
        if self.model.task == "segmentation" and output == "default":
            return {"mask": probs.argmax(1).numpy().astype(np.int32), "classes": classes}
        return {"probabilities": probs.numpy(), "classes": classes}

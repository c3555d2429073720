"""The model registry: one registered model per application, its versions, aliases and promotion gate.

* Registered models: ``mapex-pretrained`` (the pre-trained encoder, alias ``current``) and
  ``mapex-<app>`` (the pruned, fine-tuned task model of each application).
* A new ``mapex-<app>`` version gets alias ``challenger``; :func:`apply_gate` moves ``champion``
  to it only when :func:`mapex_core.gate.gate_decision` passes (its primary metric is not worse
  than the champion's beyond the app's tolerance, size and latency within bounds). Decision and
  reasons become version tags. Aliases move under a lock, after the gate, so concurrent retrains
  cannot interleave their read-compare-move.
* Registration is idempotent: a model whose weights (sha256) are already a version of the
  registered model is not registered again. The check and the registration run under the same
  lock, so two processes registering the same weights at once still create one version.
* Application names are checked (:func:`mapex_core.names.check_name`) before they reach a query.
"""

from __future__ import annotations

import getpass
import json
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mapex_core.apps import VARIANTS
from mapex_core.gate import gate_decision
from mapex_core.io import file_sha256
from mapex_core.names import check_name
from mapex_core.tracking.lock import registry_lock
from mapex_core.tracking.served import input_example, task_contract
from mapex_core.tracking.store import (
    EXPERIMENT,
    TrackingError,
    flatten,
    log_dataset,
    log_model_version,
    ui_base_url,
)

PRETRAINED_MODEL = "mapex-pretrained"
CHAMPION, CHALLENGER, PRETRAINED_ALIAS = "champion", "challenger", "current"


def registered_name(app: str) -> str:
    """The registered model name of application ``app`` (a valid application name, else ``ValueError``)."""
    return f"mapex-{check_name(app)}"


def _existing_version(client: MlflowClient, name: str, sha: str) -> Any | None:
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for v in versions:
        if v.tags.get("model_sha256") == sha:
            return v
    return None


def log_pretrain(pretrain_dir: str | Path, params: dict[str, Any], chips: dict[str, str | None],
                 git: str, root: str | Path = ".", extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """Log the pre-training run and register ``mapex-pretrained`` (idempotent on the weights).

    Args:
        pretrain_dir: ``config.json``, ``model.safetensors``, ``metrics.json``, ``routing_stats.json``.
        params: the ``model`` and ``pretrain`` params sections.
        chips: chip store path -> its DVC hash (the dataset digest).
        git: the code version (:func:`mapex_core.lineage.git_sha`).
        extras: file name -> JSON object, logged as ``pretrain/<name>`` (what the team dashboard reads
            from the server, e.g. ``datasets.json``); only with a new version.

    Returns:
        ``run_id``, ``version``, ``new`` (False when these weights were registered before).
    """
    d = Path(pretrain_dir)
    sha = file_sha256(d / "model.safetensors")
    with registry_lock(root):  # the "already registered?" check and the registration: one step for other processes
        return _log_pretrain_locked(d, sha, params, chips, git, root, extras or {})


def _log_pretrain_locked(d: Path, sha: str, params: dict[str, Any], chips: dict[str, str | None], git: str,
                         root: str | Path, extras: dict[str, Any]) -> dict[str, Any]:
    client = MlflowClient()
    found = _existing_version(client, PRETRAINED_MODEL, sha)
    if found is not None:  # these weights again (e.g. params reverted): make them current again
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
            ver = _log_pretrain_run(d, params, metrics, chips, root)
            for name, doc in extras.items():
                mlflow.log_dict(doc, f"pretrain/{name}")
            for k, v in {"model_sha256": sha, "run_id": run.info.run_id, "git_sha": git}.items():
                client.set_model_version_tag(PRETRAINED_MODEL, ver, k, v)
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


def _log_pretrain_run(d: Path, params: dict[str, Any], metrics: dict[str, Any], chips: dict[str, str | None],
                      root: str | Path = ".") -> str:
    """Params, curves, artifacts, inputs and the model of the active pre-training run; returns the version."""
    mlflow.log_params(flatten("", {k: v for k, v in params.items() if k in ("model", "pretrain")}, {}))
    for i, step in enumerate(metrics["steps"]):
        mlflow.log_metrics({k: metrics[k][i] for k in ("loss", "recon_loss", "aux_loss", "lr")}, step=step)
    mlflow.log_metrics({"tokens_per_s": metrics["tokens_per_s"], "samples_per_s": metrics["samples_per_s"],
                        "parameters": metrics["parameters"]}
                       | {f"specialisation.{m}": v for m, v in metrics["specialisation"].items()})
    for name in ("config.json", "metrics.json", "routing_stats.json", "loss.csv"):
        if (d / name).is_file():
            mlflow.log_artifact(str(d / name), artifact_path="pretrain")
    for path, digest in chips.items():
        log_dataset(path, digest, "pretraining")
    config = json.loads((d / "config.json").read_text())  # an example when one store holds all its modalities
    example = input_example(list(chips), config["modalities"], config["img_size"], root=root)
    return log_model_version("encoder", d, ("config.json", "model.safetensors"), PRETRAINED_MODEL,
                             input_example=example)


def register_app(app: Any, finetuned_dir: str | Path, prune_report: dict[str, Any], evaluation: dict[str, Any],
                 finetune_summary: dict[str, Any], lineage: dict[str, Any], root: str | Path = ".",
                 extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """Log application ``app``'s run, register its model as ``mapex-<app>`` and apply the promotion gate.

    Args:
        app: the :class:`~mapex_core.apps.Application`.
        finetuned_dir: the pruned, fine-tuned task model (``config.json``, ``task.json``, ``model.safetensors``).
        lineage: ``git_sha``, ``dvc_hash`` (of the app's chip store), ``chips`` and
            ``pretrain_run_id`` / ``pretrain_version`` (the parent pre-training run).
        extras: file name -> JSON object, logged as ``reports/<name>`` next to the prune report and the
            evaluation (what the team dashboard reads from the server: ``sweep.json``, ``datasets.json``);
            only with a new version.

    Returns:
        ``run_id``, ``version``, ``new``, the gate ``decision`` (``passed``/``failed``) with ``reasons``,
        the version's ``aliases`` and the ``champion`` after the gate.
        When a step fails after the version was created, the version is deleted before re-raising,
        so nothing is half-registered.
    """
    d = Path(finetuned_dir)
    name = registered_name(app.name)
    sha = file_sha256(d / "model.safetensors")
    with registry_lock(root):  # the "already registered?" check, the registration and the gate: one step
        return _register_app_locked(app, d, name, sha, prune_report, evaluation, finetune_summary, lineage, root,
                                    extras or {})


def _register_app_locked(app: Any, d: Path, name: str, sha: str, prune_report: dict[str, Any],
                         evaluation: dict[str, Any], finetune_summary: dict[str, Any], lineage: dict[str, Any],
                         root: str | Path, extras: dict[str, Any]) -> dict[str, Any]:
    client = MlflowClient()
    found = _existing_version(client, name, sha)
    if found is not None:
        res = {"run_id": found.run_id, "version": str(found.version), "new": False,
               "decision": found.tags.get("gate.decision", "none"),
               "reasons": json.loads(found.tags.get("gate.reasons", "[]"))}
        return res | _aliases_after(client, name, res["version"])
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
            mlflow.log_params(flatten("", {"app": {k: v for k, v in app.to_dict().items() if k != "name"}}, {}))
            hist = finetune_summary.get("history", {})
            for step, loss, val in zip(hist.get("steps", []), hist.get("train_loss", []), hist.get("val", []),
                                       strict=False):
                mlflow.log_metrics({"finetune.train_loss": loss}
                                   | ({f"finetune.val_{app.metric}": val} if val is not None else {}), step=step)
            flat: dict[str, float] = {}
            for variant in VARIANTS:
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
            for doc_name, doc in extras.items():
                mlflow.log_dict(doc, f"reports/{doc_name}")
            mlflow.log_artifact(str(d / "config.json"), artifact_path="reports")
            if lineage.get("chips"):
                log_dataset(lineage["chips"], lineage.get("dvc_hash"), "finetuning")
            contract = task_contract(d)
            example = input_example(lineage.get("chips"), contract["modalities"], contract["chip_size"], root=root)
            ver = log_model_version("task_model", d, ("config.json", "task.json", "model.safetensors"), name,
                                    metadata={"mapex_contract": contract}, input_example=example)
            vtags = {"model_sha256": sha, "run_id": run.info.run_id, "app": app.name, "metric": app.metric,
                     "metric_value": repr(float(pruned["value"])), "params": str(pruned["params"]),
                     "latency_ms": repr(float(pruned["latency_ms"])),
                     "checkpoint_bytes": str(pruned["checkpoint_bytes"]),
                     "git_sha": tags["mapex.git_sha"], "dvc_hash": tags["mapex.dvc_hash"],
                     "prune_target": str(prune_report.get("target") or "groups")}
            if prune_report.get("sweep"):  # the size a `prune.target: smallest_within_tolerance` sweep chose
                vtags["sweep_kept_per_layer"] = str(prune_report["sweep"]["chosen"]["kept_per_layer"])
            for k, v in vtags.items():
                client.set_model_version_tag(name, ver, k, v)
            decision = apply_gate(app, ver, root=root)
    except BaseException:
        _delete_version(client, name, ver)
        raise
    return {"run_id": run.info.run_id, "version": ver, "new": True} | decision | _aliases_after(client, name, ver)


def _aliases_after(client: MlflowClient, name: str, ver: str) -> dict[str, Any]:
    """The aliases of version ``ver`` and the current champion (what a retrain summary shows)."""
    return {"aliases": sorted(client.get_model_version(name, ver).aliases),
            "champion": _alias_version(client, name, CHAMPION)}


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
        passed, reasons = gate_decision(app.gate, _version_facts(client, name, ver), champion)
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



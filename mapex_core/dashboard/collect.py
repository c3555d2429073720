"""Gather what the dashboard shows into one JSON-ready dict (written next to the page as ``dashboard.json``).

Two sources give the same dict (``source``: ``local`` or ``server``):

* :func:`collect`, the project on this disk: the MLflow registry (through :mod:`mapex_core.tracking`), the
  stage outputs (``outputs/pretrain/{metrics,routing_stats}.json``, ``outputs/apps/APP/pruned/
  prune_report.json`` with the sweep of ``prune.target``, ``outputs/apps/APP/sweep/sweep.json``,
  ``reports/APP/evaluation.json``, ``reports/APP/ablation/ablation.json``), the chip stores and their
  validation reports;
* :func:`collect_server`, the tracking server alone: every registered application and its newest
  version's run (its params, ``reports/{prune_report,evaluation,sweep,datasets}.json``), the
  pre-training run (``pretrain/{metrics,routing_stats,datasets}.json``) and the newest ``mapex ablate``
  run of each application (``ablation.json``). Registration logs the files only this disk has
  (:func:`app_documents`, :func:`pretrain_documents`), so any machine can build the page.

Anything missing becomes an empty value that the page shows as an empty state.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mapex_core import project
from mapex_core.apps import VARIANTS
from mapex_core.stages import sweep_dir


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file is absent (a stage that has not run yet).

    Raises:
        ValueError: the file exists but is not valid JSON (names the file).
    """
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def redact(uri: str) -> str:
    """``uri`` without a user name or password (the page may be shared)."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def _version_row(row: dict[str, Any], metric: str, aliases: dict[str, str | None]) -> dict[str, Any]:
    """One registered version, flattened for the page (``aliases``: alias -> the version it points to;
    MLflow's version search does not fill in aliases)."""
    tags, m = row["tags"], row.get("metrics", {})

    def num(key: str) -> float | None:
        try:
            return float(tags[key])
        except (KeyError, ValueError):
            return None

    variants = {v: {"value": m.get(f"{v}.{metric}"), "ci95": [m.get(f"{v}.ci95_low"), m.get(f"{v}.ci95_high")],
                    "params": m.get(f"{v}.params")} for v in VARIANTS}
    created = row.get("created")
    return {
        "version": row["version"], "run_id": row["run_id"],
        "aliases": sorted(set(row["aliases"]) | {a for a, v in aliases.items() if v == row["version"]}),
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(created / 1000)) if created else None,
        "metric_value": num("metric_value"), "params": num("params"), "params_full": variants["unpruned"]["params"],
        "latency_ms": num("latency_ms"), "checkpoint_bytes": num("checkpoint_bytes"),
        "dvc_hash": tags.get("dvc_hash"), "git_sha": tags.get("git_sha"),
        "gate": {"decision": tags.get("gate.decision", "none"), "reasons": json.loads(tags.get("gate.reasons", "[]")),
                 "compared_to": tags.get("gate.compared_to"), "time": tags.get("gate.time")},
        "promotion": {k.removeprefix("promotion.") if k != "promotion" else "kind": v for k, v in tags.items()
                      if k.startswith("promotion")},
        "variants": variants,
    }


def _sweep_facts(prune: dict[str, Any] | None, standalone: dict[str, Any] | None,
                 standalone_source: str) -> dict[str, Any] | None:
    """The application's accuracy-size sweep: the one its prune stage ran (``prune_report.json``), else the
    last ``mapex sweep`` into its default folder (``standalone``); ``None`` when there is none."""
    sweep, source = (prune or {}).get("sweep"), "prune stage (prune.target)"
    if not sweep:
        sweep, source = standalone, standalone_source
    if not sweep:
        return None
    keep = ("kept_per_layer", "params", "value", "ci95", "latency_ms", "within_tolerance")
    return {"source": source, "strategy": sweep.get("strategy"), "tolerance": sweep.get("tolerance"),
            "reference": sweep.get("reference"), "chosen": (sweep.get("chosen") or {}).get("index"),
            "points": [{k: p.get(k) for k in keep} for p in sweep.get("points", [])]}


def _definition(app: Any) -> dict[str, Any]:
    """What the page shows of an :class:`~mapex_core.apps.Application`'s settings."""
    return {"name": app.name, "modalities": list(app.modalities), "task": app.task, "metric": app.metric,
            "description": app.description, "prune_target": app.prune.target,
            "gate": {"tolerance": app.gate.tolerance, "max_params": app.gate.max_params,
                     "max_latency_ms": app.gate.max_latency_ms}}


def _logged_definition(name: str, params: dict[str, str], tags: dict[str, str]) -> dict[str, Any]:
    """The same settings from a registration run's params (``app.*``, as :func:`~mapex_core.tracking.store.flatten`
    logged them: lists as JSON, ``None`` as ``"None"``)."""

    def value(key: str) -> Any:
        raw = params.get(f"app.{key}")
        if raw is None or raw == "None":
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw

    mods = value("modalities")
    return {"name": name, "modalities": mods if isinstance(mods, list) else tags.get("mapex.modalities", "").split(","),
            "task": value("task"), "metric": value("metric"), "description": value("description") or "",
            "prune_target": value("prune.target") or "groups",
            "gate": {"tolerance": value("gate.tolerance"), "max_params": value("gate.max_params"),
                     "max_latency_ms": value("gate.max_latency_ms")}}


def _app_card(definition: dict[str, Any], in_pipeline: bool | None, registry: dict[str, Any],
              prune: dict[str, Any] | None, evaluation: dict[str, Any] | None,
              sweep: dict[str, Any] | None) -> dict[str, Any]:
    """One application's card (``in_pipeline``: ``None`` when the source does not know ``pipeline.apps``)."""
    aliases = {"champion": registry.get("champion"), "challenger": registry.get("challenger")}
    versions = [_version_row(r, definition["metric"], aliases) for r in registry.get("versions", [])]
    keep = ("params_before", "params_after", "reduction", "kept_experts", "experts_before", "coverage", "strategy",
            "coverage_target", "max_output_deviation")
    return {
        "name": definition["name"], "modalities": definition["modalities"], "task": definition["task"],
        "metric": definition["metric"], "description": definition["description"], "in_pipeline": in_pipeline,
        "model": registry.get("model"), "champion": registry.get("champion"),
        "challenger": registry.get("challenger"), "versions": versions, "evaluation": evaluation,
        "prune": {k: prune.get(k) for k in keep} if prune else None,
        "gate": definition["gate"], "prune_target": definition["prune_target"], "sweep": sweep,
    }


def _app_facts(app: Any, in_pipeline: bool, registry: dict[str, Any], root: Path) -> dict[str, Any]:
    paths = project.app_paths(app.name)
    prune = _read_json(root / paths.pruned / "prune_report.json")
    standalone = root / sweep_dir(app.name) / "sweep.json"
    return _app_card(_definition(app), in_pipeline, registry, prune, _read_json(root / paths.evaluation),
                     _sweep_facts(prune, _read_json(standalone), str(standalone)))


def _ablation_facts(name: str, rep: dict[str, Any], source: str, run_id: str | None) -> dict[str, Any]:
    """One application's ablation table from its ``ablation.json``."""
    arms = [{"name": arm, **{k: a.get(k) for k in ("description", "comparison", "value", "ci95", "seed_values",
                                                   "params", "active_params_per_token")},
             "train_chips": [s.get("train_chips") for s in a.get("per_seed", [])],
             "vs_reference": a.get("vs_reference")} for arm, a in (rep.get("arms") or {}).items()]
    return {"app": name, "metric": rep.get("metric"), "seeds": rep.get("seeds"), "sizes": rep.get("sizes"),
            "budget_steps": (rep.get("budget") or {}).get("steps"), "notes": rep.get("notes", []),
            "mlflow_run": run_id, "arms": arms, "source": source}


def _ablations(root: Path, apps: list[str]) -> list[dict[str, Any]]:
    """The ablation tables of ``apps`` (``mapex ablate`` into its default folder), those that have one."""
    from mapex_core.training.ablate import ABLATION_FILE, default_out

    out = []
    for name in apps:
        rep = _read_json(root / default_out(name) / ABLATION_FILE)
        if rep:
            out.append(_ablation_facts(name, rep, str(default_out(name) / ABLATION_FILE),
                                       (rep.get("mlflow") or {}).get("run_id")))
    return out


def dataset_facts(ds: Any, root: Path) -> dict[str, Any]:
    """Chips per modality, per split and quarantined, from the chip store; its validation report."""
    from mapex_core.data.dataset import ChipStore

    out: dict[str, Any] = {"name": ds.name, "source": ds.source, "chips_path": ds.out, "store": None,
                           "validation": None}
    path = root / ds.out
    if path.exists():
        try:
            store = ChipStore.open(path, include_quarantined=True, normalize=False, in_memory=False)
        except (ValueError, OSError) as exc:  # shown on the page: one broken store should not hide the rest
            out["error"] = str(exc)
            return out
        meta = store.metadata()
        out["store"] = {
            "chips": len(meta), "modalities": list(store.stored_modalities), "label_type": store.label_type,
            "per_modality": {m: int(meta[f"present_{m}"].sum()) for m in store.stored_modalities},
            "per_split": {s: int(n) for s in ("train", "val", "test", "none") if (n := (meta["split"] == s).sum())},
            "quarantined": int(meta["quarantined"].sum()) if "quarantined" in meta else 0,
            "chip_size": store.chip_size,
        }
    report = _read_json(root / project.REPORTS_DIR / "validation" / ds.name / "validation.json")
    if report:
        out["validation"] = {k: report.get(k) for k in ("success", "chips", "failed_share", "max_failed_share", "docs")}
        out["validation"]["quarantined"] = len(report.get("quarantine") or {})
        out["validation"]["failed_expectations"] = [e["expectation"] for e in report.get("expectations", [])
                                                    if not e.get("success", True)]
    return out


def collect(root: str | Path = ".", params: str | Path = "params.yaml") -> dict[str, Any]:
    """Everything the dashboard shows, from the project in ``root`` (its ``params.yaml``).

    Applications: ``pipeline.apps`` first, then any other declared application that has registered
    versions. The MLflow store is the project's (:func:`mapex_core.tracking.configure`).

    Raises:
        ValueError: ``params`` is unreadable, or a report file is corrupt (names the file).
        mapex_core.tracking.TrackingError: the tracking server does not answer.
    """
    from mapex_core import lineage, tracking
    from mapex_core.apps import load_applications

    root = Path(root)
    params_path = Path(params) if Path(params).is_absolute() else root / params
    if not params_path.is_file():
        raise ValueError(f"{params_path}: no params file (run from the project folder or pass --params)")
    uri = tracking.configure(root=root)
    declared = load_applications(params_path)
    try:
        pipeline = project.load_pipeline(params_path).apps
    except ValueError:
        pipeline = []
    names = [a for a in pipeline if a in declared] + sorted(a for a in declared if a not in pipeline)
    registry = tracking.registry_history(names)
    apps = [_app_facts(declared[a], a in pipeline, registry["apps"][a], root) for a in names]
    apps = [a for a in apps if a["in_pipeline"] or a["versions"]]
    skipped = [a for a in names if a not in {x["name"] for x in apps}]
    datasets = project.load_datasets(params_path)
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "source": "local",
        "project": str(root.resolve()), "git_sha": lineage.git_sha(root), "tracking_uri": redact(uri),
        "mlflow_ui": redact(registry["ui"]), "experiment_id": registry["experiment_id"],
        "apps": apps, "not_in_pipeline": skipped, "ablations": _ablations(root, names),
        "pretrain": {"metrics": _read_json(root / project.PRETRAIN_DIR / "metrics.json"),
                     "routing": _read_json(root / project.PRETRAIN_DIR / "routing_stats.json"),
                     "registry": registry["pretrained"]},
        "datasets": [dataset_facts(d, root) for d in datasets.values()],
    }


# ----- the same page from the tracking server alone ------------------------------------------------
APP_DOCUMENTS = ("prune_report.json", "evaluation.json", "sweep.json", "datasets.json")  # under reports/ of its run
PRETRAIN_DOCUMENTS = ("metrics.json", "routing_stats.json", "datasets.json")  # under pretrain/ of its run


def _same_path(a: str | Path, b: str | Path, root: Path) -> bool:
    return (root / a).resolve() == (root / b).resolve()


def app_documents(app: Any, params: str | Path | dict[str, Any], root: str | Path = ".") -> dict[str, Any]:
    """What only this disk knows of application ``app`` and the page shows, for its registration run to log
    (``reports/<name>``): ``sweep.json`` (the last ``mapex sweep`` into its default folder, when there is
    one) and ``datasets.json`` (:func:`dataset_facts` of the ``datasets`` entry whose chip store it trains on).

    Raises:
        ValueError: the sweep report exists but is corrupt (names the file).
    """
    root = Path(root)
    docs: dict[str, Any] = {}
    sweep = _read_json(root / sweep_dir(app.name) / "sweep.json")
    if sweep:
        docs["sweep.json"] = sweep
    if app.chips:
        used = [d for d in project.load_datasets(params).values() if _same_path(d.out, app.chips, root)]
        if used:
            docs["datasets.json"] = [dataset_facts(d, root) for d in used]
    return docs


def pretrain_documents(params: str | Path | dict[str, Any], root: str | Path = ".") -> dict[str, Any]:
    """``datasets.json`` (:func:`dataset_facts` of ``pipeline.pretrain_datasets``) for the pre-training run to
    log as ``pretrain/datasets.json``; empty when the params name none."""
    root = Path(root)
    names = project.load_pipeline(params).pretrain_datasets
    datasets = project.load_datasets(params)
    return {"datasets.json": [dataset_facts(datasets[n], root) for n in names]} if names else {}


def _params_view(params: str | Path | None) -> tuple[list[str], dict[str, Any]]:
    """``pipeline.apps`` and the declared applications of ``params`` (nothing when ``params`` is ``None``).

    Raises:
        ValueError: ``params`` is given and unreadable.
    """
    if params is None:
        return [], {}
    from mapex_core.apps import load_applications

    if not Path(params).is_file():
        raise ValueError(f"{params}: no params file (pass --params, or none to list every registered application)")
    declared = load_applications(params)
    try:
        return [a for a in project.load_pipeline(params).apps if a in declared], declared
    except ValueError:
        return [], declared


def collect_server(params: str | Path | None = None, uri: str | None = None) -> dict[str, Any]:
    """Everything the dashboard shows, from the configured tracking store alone (call
    :func:`mapex_core.tracking.configure` first; ``uri``: its address as the page names it, default
    :func:`mapex_core.tracking.tracking_uri`): the same dict as :func:`collect`, ``source`` ``server``.

    Applications: every registered ``mapex-<app>``; with ``params``, ``pipeline.apps`` come first (those
    without versions too) and the others are marked as not in the pipeline. Each card's settings,
    prune report, evaluation, sweep and chip store are those its newest version's run logged.
    Datasets: those the newest runs logged (newest first wins).

    Raises:
        ValueError: ``params`` is unreadable, or a logged report is not valid JSON (names the run).
        mapex_core.tracking.TrackingError: the tracking store does not answer.
    """
    from mapex_core import tracking

    pipeline, declared = _params_view(params)
    registered = tracking.registered_apps()
    names = pipeline + [a for a in registered if a not in pipeline]
    registry = tracking.registry_history(names)
    apps, datasets, git = [], {}, []
    for name in names:
        rows = registry["apps"][name]["versions"]
        if not rows:
            if name in declared:
                apps.append(_app_card(_definition(declared[name]), True, registry["apps"][name], None, None, None))
            continue
        run = tracking.run_record(rows[0]["run_id"], [f"reports/{d}" for d in APP_DOCUMENTS])
        docs = {k.removeprefix("reports/"): v for k, v in run["documents"].items()}
        definition = _logged_definition(name, run["params"], run["tags"])
        if not definition["metric"] and name in declared:  # a run logged without the app's params
            definition = _definition(declared[name])
        definition["metric"] = definition["metric"] or rows[0]["tags"].get("metric", "")
        sweep = _sweep_facts(docs["prune_report.json"], docs["sweep.json"], f"MLflow run {run['run_id']}")
        apps.append(_app_card(definition, (name in pipeline) if params is not None else None, registry["apps"][name],
                              docs["prune_report.json"], docs["evaluation.json"], sweep))
        created = rows[0].get("created") or 0
        git.append((created, rows[0]["tags"].get("git_sha")))
        for ds in docs["datasets.json"] or []:
            if ds["name"] not in datasets or datasets[ds["name"]][0] < created:
                datasets[ds["name"]] = (created, ds)
    pre = registry["pretrained"]
    pre_docs: dict[str, Any] = dict.fromkeys(PRETRAIN_DOCUMENTS)
    if pre:
        run = tracking.run_record(pre["run_id"], [f"pretrain/{d}" for d in PRETRAIN_DOCUMENTS])
        pre_docs = {k.removeprefix("pretrain/"): v for k, v in run["documents"].items()}
        for ds in pre_docs["datasets.json"] or []:
            datasets.setdefault(ds["name"], (0, ds))
        git.append((0, pre["tags"].get("git_sha")))
    ablations = []
    for name in names:
        found = tracking.latest_run({"mapex.stage": "ablate", "mapex.app": name})
        if found:
            rep = tracking.run_record(found["run_id"], ["ablation.json"])["documents"]["ablation.json"]
            if rep:
                ablations.append(_ablation_facts(name, rep, f"MLflow run {found['run_id']}", found["run_id"]))
    shas = [sha for _, sha in sorted(git, key=lambda g: g[0], reverse=True) if sha]
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "source": "server",
        "project": None, "git_sha": shas[0] if shas else "unknown", "tracking_uri": redact(uri or tracking.tracking_uri()),
        "mlflow_ui": redact(registry["ui"]), "experiment_id": registry["experiment_id"],
        "apps": apps, "not_in_pipeline": [a for a in declared if a not in pipeline and a not in registered],
        "ablations": ablations,
        "pretrain": {"metrics": pre_docs["metrics.json"], "routing": pre_docs["routing_stats.json"],
                     "registry": pre},
        "datasets": [ds for _, ds in datasets.values()],
    }

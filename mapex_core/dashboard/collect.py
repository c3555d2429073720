"""Gather what the dashboard shows into one JSON-ready dict (written next to the page as ``dashboard.json``).

Sources, all local to the project: the MLflow registry (through :mod:`mapex_core.tracking`), the
stage outputs (``outputs/pretrain/{metrics,routing_stats}.json``, ``outputs/apps/APP/pruned/
prune_report.json`` with the sweep of ``prune.target``, ``outputs/apps/APP/sweep/sweep.json``,
``reports/APP/evaluation.json``, ``reports/APP/ablation/ablation.json``), the chip stores and their
validation reports. Anything missing becomes an empty value that the page shows as an empty state.
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


def _sweep_facts(prune: dict[str, Any] | None, standalone: Path) -> dict[str, Any] | None:
    """The application's accuracy-size sweep: the one its prune stage ran (``prune_report.json``), else the
    last ``mapex sweep`` into its default folder; ``None`` when there is none."""
    sweep, source = (prune or {}).get("sweep"), "prune stage (prune.target)"
    if not sweep:
        sweep, source = _read_json(standalone), str(standalone)
    if not sweep:
        return None
    keep = ("kept_per_layer", "params", "value", "ci95", "latency_ms", "within_tolerance")
    return {"source": source, "strategy": sweep.get("strategy"), "tolerance": sweep.get("tolerance"),
            "reference": sweep.get("reference"), "chosen": (sweep.get("chosen") or {}).get("index"),
            "points": [{k: p.get(k) for k in keep} for p in sweep.get("points", [])]}


def _app_facts(app: Any, in_pipeline: bool, registry: dict[str, Any], root: Path) -> dict[str, Any]:
    paths = project.app_paths(app.name)
    aliases = {"champion": registry.get("champion"), "challenger": registry.get("challenger")}
    versions = [_version_row(r, app.metric, aliases) for r in registry.get("versions", [])]
    prune = _read_json(root / paths.pruned / "prune_report.json")
    keep = ("params_before", "params_after", "reduction", "kept_experts", "experts_before", "coverage", "strategy",
            "coverage_target", "max_output_deviation")
    return {
        "name": app.name, "modalities": list(app.modalities), "task": app.task, "metric": app.metric,
        "description": app.description, "in_pipeline": in_pipeline, "model": registry.get("model"),
        "champion": registry.get("champion"), "challenger": registry.get("challenger"), "versions": versions,
        "evaluation": _read_json(root / paths.evaluation),
        "prune": {k: prune.get(k) for k in keep} if prune else None,
        "gate": {"tolerance": app.gate.tolerance, "max_params": app.gate.max_params,
                 "max_latency_ms": app.gate.max_latency_ms},
        "prune_target": app.prune.target,
        "sweep": _sweep_facts(prune, root / sweep_dir(app.name) / "sweep.json"),
    }


def _ablations(root: Path, apps: list[str]) -> list[dict[str, Any]]:
    """The ablation tables of ``apps`` (``mapex ablate`` into its default folder), those that have one."""
    from mapex_core.training.ablate import ABLATION_FILE, default_out

    out = []
    for name in apps:
        rep = _read_json(root / default_out(name) / ABLATION_FILE)
        if not rep:
            continue
        arms = [{"name": arm, **{k: a.get(k) for k in ("description", "comparison", "value", "ci95", "seed_values",
                                                       "params", "active_params_per_token")},
                 "train_chips": [s.get("train_chips") for s in a.get("per_seed", [])],
                 "vs_reference": a.get("vs_reference")} for arm, a in (rep.get("arms") or {}).items()]
        out.append({"app": name, "metric": rep.get("metric"), "seeds": rep.get("seeds"), "sizes": rep.get("sizes"),
                    "budget_steps": (rep.get("budget") or {}).get("steps"), "notes": rep.get("notes", []),
                    "mlflow_run": (rep.get("mlflow") or {}).get("run_id"), "arms": arms,
                    "source": str(default_out(name) / ABLATION_FILE)})
    return out


def _dataset_facts(ds: Any, root: Path) -> dict[str, Any]:
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
        "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "project": str(root.resolve()), "git_sha": lineage.git_sha(root), "tracking_uri": redact(uri),
        "mlflow_ui": redact(registry["ui"]), "experiment_id": registry["experiment_id"],
        "apps": apps, "not_in_pipeline": skipped, "ablations": _ablations(root, names),
        "pretrain": {"metrics": _read_json(root / project.PRETRAIN_DIR / "metrics.json"),
                     "routing": _read_json(root / project.PRETRAIN_DIR / "routing_stats.json"),
                     "registry": registry["pretrained"]},
        "datasets": [_dataset_facts(d, root) for d in datasets.values()],
    }

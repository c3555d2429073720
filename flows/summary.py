"""The retrain's summary: one row per application (sizes, metrics, registered version, gate decision)
and the markdown table of the Prefect artifact and of `mapex retrain`'s last output."""

from __future__ import annotations

from typing import Any

from mapex_core import project

PARAMS = str(project.PARAMS)  # the project's params file: dvc.yaml's stages read this one


def summary_row(app: str, prune: dict[str, Any], metrics: dict[str, Any], reg: dict[str, Any],
                params: str = PARAMS) -> dict[str, Any]:
    """One application's line of the retrain summary."""
    from mapex_core.apps import get_application

    application = get_application(app, params)
    return {"app": app, "modalities": application.modalities, "metric": metrics["metric"],
            "params_full": metrics["unpruned"]["params"], "params_pruned": metrics["pruned"]["params"],
            "encoder_reduction": prune["reduction"],
            "pruned": metrics["pruned"]["value"], "unpruned": metrics["unpruned"]["value"],
            "scratch": metrics["scratch"]["value"], "version": reg["version"], "decision": reg["decision"],
            "champion": reg.get("champion"), "aliases": reg.get("aliases", []), "reasons": reg.get("reasons", []),
            "sweep_chosen": prune.get("sweep_chosen"), "sweep_points": prune.get("sweep_points"),
            "tolerance": prune.get("tolerance")}


def summary_markdown(rows: list[dict[str, Any]], pretrain_run: dict[str, Any] | None = None,
                     failed: dict[str, BaseException] | None = None, dashboard: str | None = None) -> str:
    """The retrain summary as a markdown table (with a link to the dashboard page when given)."""
    lines = ["# MAPEX retrain", ""]
    if dashboard:
        from pathlib import Path

        page = Path(dashboard)
        if dashboard.startswith(("http://", "https://")):  # the team's dashboard service
            lines += [f"Dashboard: [{dashboard}]({dashboard})", ""]
        else:
            lines += [f"Dashboard: [{dashboard}]({page.resolve().as_uri()})" if page.suffix == ".html"
                      else f"Dashboard: {dashboard}", ""]
    if pretrain_run:
        lines += [f"Pre-trained model: `mapex-pretrained` v{pretrain_run['version']} "
                  f"(MLflow run `{pretrain_run['run_id']}`)", ""]
    lines += ["| application | modalities | parameters full -> pruned | metric | pruned | unpruned | scratch "
              "| version (aliases) | gate | champion |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        aliases = ", ".join(r["aliases"]) or "no alias"
        champion = f"v{r['champion']}" if r["champion"] else "none yet"
        lines.append(f"| {r['app']} | {', '.join(r['modalities'])} | {r['params_full']:,} -> {r['params_pruned']:,} "
                     f"({1 - r['params_pruned'] / r['params_full']:.0%} fewer) | {r['metric']} | {r['pruned']:.3f} "
                     f"| {r['unpruned']:.3f} | {r['scratch']:.3f} | v{r['version']} ({aliases}) | {r['decision']} "
                     f"| {champion} |")
    for app, exc in (failed or {}).items():
        lines.append(f"| {app} | failed: {str(exc).splitlines()[0][:120]} | | | | | | | | |")
    lines += ["", "Gate reasons:", ""] + [f"- **{r['app']}**: {'; '.join(r['reasons'])}" for r in rows]
    swept = [r for r in rows if r.get("sweep_chosen")]
    if swept:  # prune.target smallest_within_tolerance: the registered size came from an accuracy-size sweep
        lines += ["", "Sizes chosen by a sweep (prune.target: smallest_within_tolerance):", ""] + [
            f"- **{r['app']}**: point {r['sweep_chosen']['index'] + 1} of {r['sweep_points']}, "
            f"{r['sweep_chosen']['kept_per_layer']} experts per MoE layer, {r['sweep_chosen']['params']:,} parameters, "
            f"{r['metric']} {r['sweep_chosen']['value']:.3f} (within {r['tolerance']} of the full group)" for r in swept]
    return "\n".join(lines) + "\n"

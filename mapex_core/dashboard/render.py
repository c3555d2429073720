"""The dashboard page: one self-contained HTML file (inline CSS, inline SVG, a few lines of JS).

Sections: application cards (registry, gate, size, lineage, metric history, pruned vs unpruned vs
scratch), ablation tables (``mapex ablate``), expert usage heatmaps, pre-training, data. Every value comes from :func:`collect`'s dict.
"""

from __future__ import annotations

import math
import os
from html import escape
from pathlib import Path
from typing import Any

from mapex_core.apps import VARIANTS
from mapex_core.dashboard.charts import (
    PALETTE,
    Bar,
    Mark,
    Series,
    bar_chart,
    color_legend,
    heatmap,
    line_chart,
)

VARIANT_COLORS = {"pruned": "#1f77b4", "unpruned": "#7f7f7f", "scratch": "#ff7f0e"}
VARIANT_LABELS = {"pruned": "pruned (registered)", "unpruned": "unpruned", "scratch": "from scratch"}

CSS = """
:root { --fg:#1b1f23; --muted:#5b6570; --line:#d8dde3; --bg:#f5f7f9; --card:#fff; --ok:#1a7f37; --bad:#c62828; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
       color:var(--fg); background:var(--bg); }
header.top { background:#13294b; color:#fff; padding:14px 24px; }
header.top h1 { margin:0; font-size:20px; }
header.top p { margin:2px 0 0; color:#c9d3e0; font-size:12px; }
header.top a { color:#fff; }
header.top code { background:#2b4470; color:#fff; }
nav { display:flex; gap:16px; margin-top:8px; font-size:13px; }
main { padding:16px 24px 40px; max-width:1500px; }
section { margin-bottom:28px; }
h2 { font-size:17px; margin:18px 0 8px; border-bottom:1px solid var(--line); padding-bottom:4px; }
h3 { margin:0; font-size:16px; }
h4 { margin:14px 0 4px; font-size:13px; color:var(--muted); font-weight:600; }
.cards { display:grid; grid-template-columns:repeat(auto-fill,minmax(460px,1fr)); gap:16px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 16px; }
.card header { display:flex; align-items:baseline; gap:8px; flex-wrap:wrap; }
.badge { display:inline-block; padding:1px 7px; border-radius:10px; font-size:12px; background:#e8eef6; color:#13294b; }
.badge.passed { background:#dcf3e3; color:var(--ok); } .badge.failed { background:#fde2e2; color:var(--bad); }
.badge.none { background:#eee; color:var(--muted); }
.muted { color:var(--muted); } .small { font-size:12px; }
.roles { display:grid; grid-template-columns:1fr 1fr; gap:10px; margin:10px 0; }
.role { border:1px solid var(--line); border-radius:6px; padding:8px 10px; }
.role .label { font-size:11px; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); }
.role .value { font-size:20px; font-weight:600; }
.role ul { margin:4px 0 0; padding-left:18px; font-size:12px; }
dl.facts { display:grid; grid-template-columns:max-content 1fr; gap:2px 12px; margin:6px 0; font-size:13px; }
dl.facts dt { color:var(--muted); } dl.facts dd { margin:0; }
code { font-size:12px; background:#f0f2f4; padding:0 3px; border-radius:3px; }
.empty { color:var(--muted); font-style:italic; }
table { border-collapse:collapse; font-size:13px; background:var(--card); }
th, td { border:1px solid var(--line); padding:4px 8px; text-align:left; vertical-align:top; }
th { background:#eef1f4; }
td.num { text-align:right; font-variant-numeric:tabular-nums; }
.chart text.tick { font-size:11px; fill:#444; } .chart text.axis { font-size:12px; fill:#222; }
.chart text.cellv { font-size:10px; }
svg text.tick { font-size:11px; fill:#444; } svg text.axis { font-size:12px; fill:#222; }
.layers { display:flex; flex-wrap:wrap; gap:18px; }
.layer { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:10px; }
.kept { display:none; } .kept.on { display:inline; }
.selector { margin:6px 0 10px; } .selector label { margin-right:12px; }
.row2 { display:flex; flex-wrap:wrap; gap:24px; align-items:flex-start; }
details summary { cursor:pointer; color:var(--muted); font-size:13px; margin-top:8px; }
"""

SCRIPT = """
(function () {
  function select(app) {
    document.querySelectorAll('g.kept').forEach(function (g) {
      g.classList.toggle('on', g.getAttribute('data-app') === app);
    });
  }
  var boxes = document.querySelectorAll('input[name="kept-app"]');
  boxes.forEach(function (box) {
    box.addEventListener('change', function () { select(box.value); });
    if (box.checked) { select(box.value); }
  });
})();
"""


def _num(v: Any, fmt: str = "{:,.0f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def _mb(v: Any) -> str:
    return f"{v / 1e6:.2f} MB" if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def _short(h: str | None, n: int = 10) -> str:
    return escape(h[:n]) if h and h not in ("None", "unknown") else "–"


def _link(href: str | None, text: str) -> str:
    return f'<a href="{escape(href)}">{escape(text)}</a>' if href else escape(text)


def _run_url(d: dict[str, Any], run_id: str | None) -> str | None:
    if not run_id or not d.get("experiment_id"):
        return None
    return f"{d['mlflow_ui']}/#/experiments/{d['experiment_id']}/runs/{run_id}"


def _version_url(d: dict[str, Any], model: str, version: str) -> str:
    return f"{d['mlflow_ui']}/#/models/{model}/versions/{version}"


def _by_version(app: dict[str, Any], version: str | None) -> dict[str, Any] | None:
    return next((v for v in app["versions"] if v["version"] == version), None)


def _role(label: str, app: dict[str, Any], v: dict[str, Any] | None, empty: str, gate: bool) -> str:
    if v is None:
        return f'<div class="role"><div class="label">{label}</div><div class="empty">{escape(empty)}</div></div>'
    value = _num(v["metric_value"], "{:.3f}")
    parts = [f'<div class="role {label.lower()}"><div class="label">{label}</div>',
             f'<div class="value">v{escape(v["version"])} · {value} <span class="small muted">'
             f'{escape(app["metric"])}</span></div>']
    if gate:
        decision = v["gate"]["decision"]
        parts.append(f'<div>gate <span class="badge {escape(decision)}">{escape(decision)}</span> '
                     f'<span class="small muted">vs champion {escape(str(v["gate"]["compared_to"] or "none"))}'
                     "</span></div>")
        parts.append("<ul>" + "".join(f"<li>{escape(r)}</li>" for r in v["gate"]["reasons"]) + "</ul>")
    elif v["promotion"].get("kind"):
        kind, who, why = v["promotion"]["kind"], v["promotion"].get("by"), v["promotion"].get("reason")
        how = {"gate": "promoted by the gate", "manual": "promoted by hand"}.get(kind, f"promoted ({kind})")
        parts.append(f'<div class="small muted">{escape(how)}' + (f" ({escape(who)})" if who else "")
                     + (f": {escape(why)}" if why and why != "-" else "") + "</div>")
    parts.append("</div>")
    return "".join(parts)


def _history_chart(app: dict[str, Any]) -> str:
    vs = sorted(app["versions"], key=lambda v: int(v["version"]))
    if not vs:
        return '<p class="empty">no versions registered yet</p>'
    xs = [int(v["version"]) for v in vs]
    series = []
    for name in VARIANTS:
        ys = [v["variants"][name]["value"] for v in vs]
        ys = [float(y) if y is not None else float("nan") for y in ys]
        titles = [f"v{v['version']} {VARIANT_LABELS[name]}: {y:.4f}" for v, y in zip(vs, ys, strict=True)]
        series.append(Series(VARIANT_LABELS[name], xs, ys, VARIANT_COLORS[name], "" if name == "pruned" else "4 3",
                             markers=True, point_titles=titles))
    marks = []
    for v in vs:
        y = v["metric_value"] if v["metric_value"] is not None else float("nan")
        if v["version"] == app["champion"]:
            marks.append(Mark(int(v["version"]), y, f"v{v['version']}: champion", "ring", "#1a7f37"))
        if v["gate"]["decision"] == "failed":
            marks.append(Mark(int(v["version"]), y, f"v{v['version']}: gate failed", "cross", "#c62828"))
    chart = line_chart(series, "registered version (one per retrain that changed the model)", app["metric"],
                       f"{app['name']}: {app['metric']} by version", marks, y_range=(0.0, 1.0), x_integer=True)
    return (chart + '<div class="small muted">ring: champion · cross: gate failed (kept as challenger only)</div>')


def _evaluation_chart(app: dict[str, Any]) -> str:
    ev = app.get("evaluation")
    if not ev:
        return '<p class="empty">not evaluated yet</p>'
    bars = []
    for name in VARIANTS:
        r = ev.get(name) or {}
        lo, hi = (r.get("ci95") or [None, None])[:2]
        bars.append(Bar(VARIANT_LABELS[name], float(r.get("value", float("nan"))), lo, hi, VARIANT_COLORS[name],
                        f"; {r.get('params', 0):,} parameters"))
    return bar_chart(bars, f"{app['metric']}, test split · whiskers: bootstrap 95 % CI",
                     f"{app['name']}: pruned vs unpruned vs scratch", x_max=1.0)


def _sweep_chart(app: dict[str, Any]) -> str:
    """The accuracy-size curve (parameters vs metric, 95 % CI whiskers) with the registered and chosen points."""
    sw = app.get("sweep")
    if not sw or not sw["points"]:
        return ""
    pts = sw["points"]

    def num(v: Any) -> float:
        return float(v) if isinstance(v, (int, float)) else float("nan")

    xs = [p["params"] / 1e6 for p in pts]
    ys = [num(p["value"]) for p in pts]
    errors = [tuple((p.get("ci95") or [None, None])[:2]) for p in pts]
    metric = app["metric"]

    def what(p: dict[str, Any]) -> str:
        return f"{p['kept_per_layer']} experts per MoE layer, {p['params']:,} parameters"

    titles = [f"{what(p)}: {metric} {num(p['value']):.4f} (95 % CI {_num(lo, '{:.3f}')}-{_num(hi, '{:.3f}')}), "
              f"{_num(p.get('latency_ms'), '{:.2f}')} ms" for p, (lo, hi) in zip(pts, errors, strict=True)]
    series = [Series(f"sweep ({sw['strategy']} ranking)", xs, ys, VARIANT_COLORS["pruned"], markers=True,
                     point_titles=titles, errors=errors)]
    ref, tol = (sw.get("reference") or {}).get("value"), sw.get("tolerance")
    if isinstance(ref, (int, float)) and isinstance(tol, (int, float)) and math.isfinite(ref):
        series.append(Series(f"full group - gate.tolerance ({tol:g})", [min(xs), max(xs)], [ref - tol] * 2,
                             "#7f7f7f", "4 3"))
    marks = []
    registered = _by_version(app, app["champion"]) or (app["versions"][0] if app["versions"] else None)
    for i, p in enumerate(pts):
        if registered is not None and registered["params"] is not None and round(registered["params"]) == p["params"]:
            role = ", ".join(registered["aliases"]) or "no alias"
            marks.append(Mark(xs[i], ys[i], f"registered: v{registered['version']} ({role}) · {what(p)}", "ring",
                              "#1a7f37"))
        if i == sw.get("chosen"):
            marks.append(Mark(xs[i], ys[i], f"chosen by the sweep (smallest within tolerance) · {what(p)}", "diamond",
                              "#9467bd"))
    chart = line_chart(series, "parameters (millions, task model)", f"{metric}, test split", f"{app['name']}: "
                       f"{metric} by size", marks, y_range=(0.0, 1.0))
    return (f'<h4>Accuracy–size curve</h4><div class="sweep" data-app="{escape(app["name"])}">{chart}</div>'
            '<div class="small muted">one point per number of experts kept per MoE layer, fine-tuned and evaluated '
            "with the same budget, seeds and split · whiskers: bootstrap 95 % CI · ring: the registered model · "
            f"diamond: the sweep's choice · from {escape(sw['source'])}</div>")


def _card(d: dict[str, Any], app: dict[str, Any]) -> str:
    name = app["name"]
    mods = "".join(f'<span class="badge">{escape(m)}</span>' for m in app["modalities"])
    champion = _by_version(app, app["champion"])
    challenger = _by_version(app, app["challenger"])
    latest = app["versions"][0] if app["versions"] else None
    out = [f'<article class="card" id="app-{escape(name)}" data-app="{escape(name)}">',
           f"<header><h3>{escape(name)}</h3>{mods}<span class=\"muted small\">{escape(app['task'])} · "
           f"primary metric {escape(app['metric'])}</span></header>"]
    if app["description"]:
        out.append(f'<div class="small muted">{escape(app["description"])}</div>')
    if app["in_pipeline"] is False:  # None: the page was built from the tracking server without params
        out.append('<div class="small muted">not in pipeline.apps: the weekly retrain does not update it</div>')
    out.append('<div class="roles">')
    out.append(_role("Champion", app, champion, "no champion yet", gate=False))
    out.append(_role("Challenger", app, challenger,
                     "no versions registered yet: run `mapex retrain`" if not latest else "no challenger", gate=True))
    out.append("</div>")
    if latest is None:
        out.append('<p class="empty">No model registered for this application yet. The next `mapex retrain` '
                   f"registers one.</p>{_sweep_chart(app)}</article>")
        return "".join(out)
    full, pruned = latest["params_full"], latest["params"]
    share = f" ({1 - pruned / full:.0%} fewer)" if full and pruned else ""
    prune = app.get("prune") or {}
    model = app["model"]
    links = [_link(_run_url(d, latest["run_id"]), "MLflow run"),
             _link(_version_url(d, model, latest["version"]), f"{model} v{latest['version']}")]
    out.append(f"<h4>Latest version v{escape(latest['version'])} "
               f"({escape(', '.join(latest['aliases']) or 'no alias')})</h4><dl class=\"facts\">")
    facts = [
        ("Parameters", f"{_num(full)} → {_num(pruned)}{share} <span class='small muted'>task model, full → pruned"
                       "</span>"),
        ("Encoder", f"{_num(prune.get('params_before'))} → {_num(prune.get('params_after'))}"
                    + (f" ({prune['reduction']:.0%} fewer)" if prune.get("reduction") is not None else "")),
        ("Checkpoint", _mb(latest["checkpoint_bytes"]) + " <span class='small muted'>safetensors</span>"),
        ("Latency", _num(latest["latency_ms"], "{:.2f}") + " ms <span class='small muted'>one chip, batch 1, "
                    "on the machine that evaluated it</span>"),
        ("Data version", f"<code>{_short(latest['dvc_hash'], 16)}</code> <span class='small muted'>DVC hash of "
                         "the chip store</span>"),
        ("Code", f"<code>{_short(latest['git_sha'])}</code> <span class='small muted'>git SHA</span>"),
        ("Registered", escape(latest["created"] or "–")),
        ("Links", " · ".join(links)),
    ]
    out += [f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts]
    out.append("</dl>")
    out.append(f"<h4>{escape(app['metric'])} across retrains</h4>{_history_chart(app)}")
    out.append(f"<h4>Latest evaluation: pruned vs unpruned vs from scratch</h4>{_evaluation_chart(app)}")
    out.append(_sweep_chart(app))
    rows = "".join(
        f"<tr><td>v{escape(v['version'])}</td><td>{escape(v['created'] or '–')}</td>"
        f"<td class=\"num\">{_num(v['metric_value'], '{:.3f}')}</td><td class=\"num\">{_num(v['params'])}</td>"
        f"<td><span class=\"badge {escape(v['gate']['decision'])}\">{escape(v['gate']['decision'])}</span></td>"
        f"<td>{escape(', '.join(v['aliases']) or '–')}</td><td>{_link(_run_url(d, v['run_id']), 'run')}</td></tr>"
        for v in app["versions"])
    out.append(f"<details><summary>All {len(app['versions'])} version(s)</summary><table><tr><th>version</th>"
               f"<th>registered</th><th>{escape(app['metric'])}</th><th>parameters</th><th>gate</th><th>aliases</th>"
               f"<th>MLflow</th></tr>{rows}</table></details>")
    out.append("</article>")
    return "".join(out)


def _expert_usage(d: dict[str, Any]) -> str:
    routing = d["pretrain"]["routing"]
    if not routing or not routing.get("layers"):
        return '<p class="empty">No routing statistics yet: pre-training has not run (`mapex retrain`).</p>'
    mods = routing["modalities"]
    apps_kept = {a["name"]: a["prune"]["kept_experts"] for a in d["apps"] if (a.get("prune") or {}).get("kept_experts")}
    out = ['<p class="small muted">Share of each modality\'s routing mass (its tokens\' gate weights, summed) that '
           "each expert of the pre-trained model receives, on pre-training chips. Mass on the modality's own "
           "group is specialisation. The coloured band over the columns names the modality group that owns each "
           "expert; numbers are percentages. Outlined: the experts an application keeps after pruning.</p>"]
    if apps_kept:
        radios = "".join(
            f'<label><input type="radio" name="kept-app" value="{escape(a)}"{" checked" if i == 0 else ""}> '
            f"{escape(a)}</label>" for i, a in enumerate(apps_kept))
        out.append(f'<div class="selector">Outline the kept experts of: {radios}'
                   '<label><input type="radio" name="kept-app" value=""> none</label></div>')
    else:
        out.append('<p class="empty">No application has been pruned yet: no kept experts to outline.</p>')
    out.append(color_legend("share of the modality's routing mass", "legend-mass"))
    out.append('<div class="layers">')
    for b, layer in sorted(routing["layers"].items(), key=lambda kv: int(kv[0])):
        experts, groups = layer["experts"], layer["groups"]
        shares = []
        for m in mods:
            mass = layer["mass"][m]
            total = sum(mass)
            shares.append([x / total if total > 0 else float("nan") for x in mass])
        owner = [mods[g] if 0 <= g < len(mods) else "shared" for g in groups]
        kept = {a: [experts.index(e) for e in k.get(str(b), []) if e in experts] for a, k in apps_kept.items()}
        spec = (routing.get("specialisation_per_layer") or {}).get(str(b), {})
        spec_txt = ", ".join(f"{escape(m)} {v:.0%}" for m, v in spec.items())
        out.append(f'<div class="layer"><h4>MoE block {escape(str(b))}</h4>'
                   + heatmap(shares, mods, [str(e) for e in experts], owner, kept,
                             f"MoE block {b}: routing mass share, modality x expert", f"heatmap-block{b}")
                   + f'<div class="small muted">specialisation: {spec_txt or "–"}</div></div>')
    out.append("</div>")
    spec = routing.get("specialisation") or {}
    if spec:
        rows = "".join(f"<tr><td>{escape(m)}</td><td class=\"num\">{v:.1%}</td></tr>" for m, v in spec.items())
        out.append("<h4>Specialisation per modality (all MoE blocks)</h4><table><tr><th>modality</th>"
                   f"<th>mass on its own experts</th></tr>{rows}</table>")
    return "".join(out)


def _pretrain(d: dict[str, Any]) -> str:
    m = d["pretrain"]["metrics"]
    if not m:
        return '<p class="empty">Not pre-trained yet: run `mapex retrain` (or `mapex pretrain`).</p>'
    steps = m.get("steps", [])
    series = [Series("total loss", steps, m.get("loss", []), PALETTE[0]),
              Series("reconstruction (masked patches)", steps, m.get("recon_loss", []), PALETTE[2], "4 3")]
    if m.get("aux_loss"):
        series.append(Series("router balance (aux)", steps, m["aux_loss"], PALETTE[4], "2 2"))
    reg = d["pretrain"].get("registry") or {}
    facts = [("Throughput", f"{_num(m.get('tokens_per_s'))} tokens/s · {_num(m.get('samples_per_s'), '{:.1f}')} "
                            "samples/s"),
             ("Device", escape(str(m.get("device", "–")))),
             ("Training time", _num(m.get("train_seconds"), "{:.1f}") + " s"),
             ("Samples seen", f"{_num(m.get('samples_seen'))} from {_num(m.get('num_chips'))} chips"),
             ("Parameters", _num(m.get("parameters"))),
             ("Final loss", _num(m.get("final_loss"), "{:.4f}"))]
    if reg:
        facts.append(("Registered", _link(_run_url(d, reg.get("run_id")), f"mapex-pretrained v{reg['version']}")
                      + " <span class='small muted'>(alias current)</span>"))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    chart = line_chart(series, "optimizer step", "loss", "pre-training loss curve", width=560, height=240,
                       x_integer=True)
    return f'<div class="row2"><div>{chart}</div><dl class="facts">{dl}</dl></div>'


def _data(d: dict[str, Any], out_dir: Path, root: Path) -> str:
    if not d["datasets"]:
        return '<p class="empty">No datasets in params.yaml.</p>'
    rows = []
    for ds in d["datasets"]:
        st, va = ds["store"], ds["validation"]
        if ds.get("error"):
            rows.append(f"<tr><td>{escape(ds['name'])}</td><td colspan=\"6\" class=\"empty\">chip store unreadable: "
                        f"{escape(ds['error'])}</td></tr>")
            continue
        if st is None:
            rows.append(f"<tr><td>{escape(ds['name'])}</td><td colspan=\"6\" class=\"empty\">not ingested yet "
                        f"({escape(ds['chips_path'])})</td></tr>")
            continue
        per_mod = "<br>".join(f"{escape(m)}: {n:,}" for m, n in st["per_modality"].items())
        per_split = "<br>".join(f"{escape(s)}: {n:,}" for s, n in st["per_split"].items())
        if va:
            docs = va.get("docs")
            # Data Docs are files of the machine that validated: linked only on a page built from this disk
            href = os.path.relpath(root / docs, out_dir) if docs and d.get("source") != "server" else None
            state = "passed" if va.get("success") else "failed"
            val = (f'<span class="badge {state}">{state}</span> {va.get("failed_share", 0):.1%} of chips failed '
                   f"(max {va.get('max_failed_share', 0):.0%})<br>"
                   + (_link(href, "Great Expectations Data Docs") if href else ""))
            if va.get("failed_expectations"):
                val += "<br><span class='small muted'>failed: " + ", ".join(
                    escape(e) for e in va["failed_expectations"]) + "</span>"
        else:
            val = '<span class="empty">not validated yet</span>'
        rows.append(f"<tr><td>{escape(ds['name'])}<br><span class='small muted'>{escape(ds['source'])}</span></td>"
                    f"<td class=\"num\">{st['chips']:,}</td><td>{per_mod}</td><td>{per_split}</td>"
                    f"<td class=\"num\">{st['quarantined']:,}</td><td>{st['chip_size']} px</td><td>{val}</td></tr>")
    return ("<table><tr><th>dataset</th><th>chips</th><th>chips per modality</th><th>per split</th>"
            "<th>quarantined</th><th>chip size</th><th>validation</th></tr>" + "".join(rows) + "</table>")


def render(d: dict[str, Any], out_dir: str | Path, root: str | Path = ".") -> str:
    """The page for :func:`~mapex_core.dashboard.collect.collect`'s ``d``; relative links point from ``out_dir``."""
    # the ablation section draws with this module's helpers: imported here, once this module is loaded
    from mapex_core.dashboard.ablation import ablation_section

    out_dir, root = Path(out_dir).resolve(), Path(root).resolve()
    if d["apps"]:
        cards = '<div class="cards">' + "".join(_card(d, a) for a in d["apps"]) + "</div>"
    else:
        cards = '<p class="empty">No applications in pipeline.apps and none registered.</p>'
    if d["not_in_pipeline"]:
        cards += ('<p class="small muted">Declared but not in pipeline.apps and never registered: '
                  + ", ".join(escape(a) for a in d["not_in_pipeline"]) + "</p>")
    local = not d["tracking_uri"].startswith(("http://", "https://"))
    ui_note = (f"MLflow links open {escape(d['mlflow_ui'])}: start it with <code>make mlflow-ui</code>."
               if local else f"MLflow links open {escape(d['mlflow_ui'])}.")
    from_server = " from the tracking server" if d.get("source") == "server" else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>MAPEX dashboard</title>
<link rel="icon" href="data:,">
<style>{CSS}</style></head>
<body>
<header class="top"><h1>MAPEX: per-task models</h1>
<p>Generated {escape(d['generated'])}{from_server} · code <code>{_short(d['git_sha'])}</code> · tracking
<code>{escape(d['tracking_uri'])}</code> · {ui_note}</p>
<nav><a href="#apps">Applications</a><a href="#ablations">Ablations</a><a href="#experts">Expert usage</a><a href="#pretrain">Pre-training</a>
<a href="#data">Data</a></nav></header>
<main>
<section id="apps"><h2>Applications</h2>{cards}</section>
<section id="ablations"><h2>Ablations</h2>{ablation_section(d)}</section>
<section id="experts"><h2>Expert usage of the pre-trained model</h2>{_expert_usage(d)}</section>
<section id="pretrain"><h2>Pre-training</h2>{_pretrain(d)}</section>
<section id="data"><h2>Data</h2>{_data(d, out_dir, root)}</section>
</main>
<script>{SCRIPT}</script>
</body></html>
"""

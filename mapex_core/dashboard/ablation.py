"""The dashboard's ablation section: one table per application with an ablation report (``mapex ablate``).

Each row is an arm (:mod:`mapex_core.training.ablate`): its test metric with the bootstrap 95% interval,
its paired difference to the reference with that interval, the train chips per seed and its size.
"""

from __future__ import annotations

from html import escape
from typing import Any

from mapex_core.dashboard.render import _link, _num, _run_url


def ablation_section(d: dict[str, Any]) -> str:
    """One table per application that has an ablation report (``mapex ablate``)."""
    abl = d.get("ablations") or []
    if not abl:
        return ('<p class="empty">No ablation yet: <code>mapex ablate --app APP</code> writes '
                "<code>reports/APP/ablation/ablation.json</code>.</p>")
    out = ['<p class="small muted">Each arm is fine-tuned with the application\'s budget on the same train / val / '
           "test split, once per seed; values are the test metric averaged over the seeds with a bootstrap 95 % "
           "interval over independent test units. The difference to the reference is paired (same resamples); an "
           "interval that includes 0 supports no conclusion.</p>"]
    for a in abl:
        sizes = a.get("sizes") or {}
        rows = []
        for arm in a["arms"]:
            lo, hi = (arm.get("ci95") or [None, None])[:2]
            vs = arm.get("vs_reference") or {}
            dlo, dhi = (vs.get("ci95") or [None, None])[:2]
            diff = (f"{_num(vs.get('difference'), '{:+.3f}')} [{_num(dlo, '{:+.3f}')}, {_num(dhi, '{:+.3f}')}]"
                    if vs else "reference")
            cls = "badge passed" if vs.get("conclusive") else "badge none"
            tag = ("interval excludes 0" if vs.get("conclusive") else
                   "excludes 0, too few test units: no conclusion" if vs.get("excludes_zero") else
                   "no conclusion" if vs else "")
            badge = f'<span class="{cls}">{tag}</span>' if tag else ""
            chips = sorted(set(c for c in arm.get("train_chips") or [] if c is not None))
            rows.append(f"<tr data-arm=\"{escape(arm['name'])}\"><td><code>{escape(arm['name'])}</code></td>"
                        f"<td>{escape(arm.get('description') or '')}</td>"
                        f"<td class=\"num\">{_num(arm.get('value'), '{:.3f}')} [{_num(lo, '{:.3f}')}, "
                        f"{_num(hi, '{:.3f}')}]</td>"
                        f"<td class=\"num\">{diff}</td><td>{badge}</td>"
                        f"<td class=\"num\">{', '.join(str(c) for c in chips) or '–'}</td>"
                        f"<td class=\"num\">{_num(arm.get('params'))} / {_num(arm.get('active_params_per_token'))}"
                        "</td></tr>")
        run = _link(_run_url(d, a.get("mlflow_run")), "MLflow parent run") if a.get("mlflow_run") else ""
        notes = "".join(f"<li>{escape(n)}</li>" for n in a.get("notes") or [])
        out.append(f'<h3 id="ablation-{escape(a["app"])}">{escape(a["app"])} <span class="small muted">'
                   f"{escape(str(a.get('metric')))} · seeds {escape(str(a.get('seeds')))} · "
                   f"{_num(a.get('budget_steps'))} steps · chips train {_num(sizes.get('train'))} / val "
                   f"{_num(sizes.get('val'))} / test {_num(sizes.get('test'))} ({_num(sizes.get('test_units'))} "
                   f"independent test units)</span></h3>"
                   f'<table class="ablation" data-app="{escape(a["app"])}"><tr><th>arm</th><th>what changes</th>'
                   f"<th>{escape(str(a.get('metric')))} [95 % CI]</th><th>minus reference [95 % CI]</th><th></th>"
                   "<th>train chips</th><th>parameters / active per token</th></tr>" + "".join(rows) + "</table>"
                   f'<ul class="small muted">{notes}</ul><div class="small muted">from <code>'
                   f"{escape(a.get('source') or '')}</code> {run}</div>")
    return "".join(out)

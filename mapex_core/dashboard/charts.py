"""Small inline-SVG charts for the dashboard: heatmap, line chart, bars with intervals.

Plain strings, no plotting library and nothing fetched: the page works offline from a file URL.
Every chart has axis labels or a legend, and every mark a ``<title>`` (the browser's tooltip).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

# viridis, sampled at 0, .25, .5, .75, 1 (perceptually uniform, readable in grey and by colour-blind readers)
_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]
# outlines of kept experts: bright colours that stand out on every viridis cell
OUTLINES = ["#ff2d55", "#ff9500", "#00c7ff", "#ff00d4", "#ffffff", "#34c759"]


def viridis(t: float) -> str:
    """Colour of ``t`` in [0, 1] on the viridis scale, as ``#rrggbb``."""
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    r, g, b = (round(a + (c - a) * f) for a, c in zip(_VIRIDIS[i], _VIRIDIS[i + 1], strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def _text_on(t: float) -> str:
    """Readable text colour on the viridis colour of ``t``."""
    return "#111" if t > 0.55 else "#fff"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 10) for k in range(first, last + 1)]  # the first tick <= lo, the last >= hi


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.0f}"
    return f"{v:.3g}"


def heatmap(
    shares: Sequence[Sequence[float]],
    rows: Sequence[str],
    cols: Sequence[str],
    col_owner: Sequence[str],
    kept: dict[str, Sequence[int]],
    title: str,
    chart_id: str,
) -> str:
    """Routing mass share as a modality x expert heatmap, with the kept experts of each application.

    Args:
        shares: ``(M, E)`` share of each modality's routing mass per expert (rows sum to 1; NaN = unseen).
        rows: modality names (``M``); cols: expert labels (``E``).
        col_owner: owner group of each expert (a modality name or ``shared``), drawn as a band on top.
        kept: application -> column indices it keeps; one strip per application below the heatmap, and
            an outline over the heatmap columns (``class="kept kept-<app>"``, shown for the selected app).
        chart_id: unique id prefix of the SVG elements.
    """
    cw, ch, left, top = 34, 26, 92, 46
    strip = 16
    width = left + cw * len(cols) + 12
    height = top + ch * len(rows) + 14 + (strip + 4) * len(kept) + 8
    owners = list(dict.fromkeys(col_owner))
    out = [f'<svg class="chart heatmap" id="{escape(chart_id)}" role="img" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
           f"<title>{escape(title)}</title>"]
    # owner band: which modality group each expert belongs to
    for j, owner in enumerate(col_owner):
        color = PALETTE[owners.index(owner) % len(PALETTE)]
        out.append(f'<rect x="{left + j * cw}" y="4" width="{cw - 1}" height="8" fill="{color}">'
                   f"<title>expert {escape(cols[j])}: {escape(owner)} group</title></rect>")
    for owner in owners:
        js = [j for j, o in enumerate(col_owner) if o == owner]
        mid = left + (js[0] + js[-1] + 1) * cw / 2
        out.append(f'<text x="{mid}" y="24" class="axis" text-anchor="middle">{escape(owner)}</text>')
    for j, c in enumerate(cols):
        out.append(f'<text x="{left + j * cw + cw / 2}" y="{top - 6}" class="tick" text-anchor="middle">'
                   f"{escape(c)}</text>")
    for i, r in enumerate(rows):
        y = top + i * ch
        out.append(f'<text x="{left - 6}" y="{y + ch / 2 + 4}" class="axis" text-anchor="end">{escape(r)}</text>')
        for j in range(len(cols)):
            v = float(shares[i][j])
            x = left + j * cw
            if not math.isfinite(v):
                out.append(f'<rect class="cell" x="{x}" y="{y}" width="{cw - 1}" height="{ch - 1}" fill="#eee">'
                           f"<title>{escape(r)}: no tokens seen</title></rect>")
                continue
            out.append(f'<rect class="cell" x="{x}" y="{y}" width="{cw - 1}" height="{ch - 1}" fill="{viridis(v)}">'
                       f"<title>{escape(r)} tokens to expert {escape(cols[j])}: {v:.1%} of the routing mass"
                       "</title></rect>")
            if v >= 0.005:
                out.append(f'<text x="{x + cw / 2}" y="{y + ch / 2 + 4}" class="cellv" text-anchor="middle" '
                           f'fill="{_text_on(v)}">{round(v * 100)}</text>')
    grid_bottom = top + ch * len(rows)
    # outlines of each application's kept experts over the heatmap (CSS shows the selected app's)
    for a, (app, idx) in enumerate(kept.items()):
        color = OUTLINES[a % len(OUTLINES)]
        out.append(f'<g class="kept kept-{escape(app)}" data-app="{escape(app)}">')
        for j in idx:
            out.append(f'<rect x="{left + j * cw - 1.5}" y="{top - 1.5}" width="{cw + 2}" height="{ch * len(rows) + 2}"'
                       f' fill="none" stroke="{color}" stroke-width="3"><title>{escape(app)} keeps expert '
                       f"{escape(cols[j])}</title></rect>")
        out.append("</g>")
        # the strip: one row per application, outlined squares at its kept experts
        y = grid_bottom + 14 + a * (strip + 4)
        out.append(f'<text x="{left - 6}" y="{y + strip - 4}" class="tick" text-anchor="end">{escape(app)}</text>')
        keep = set(idx)
        for j in range(len(cols)):
            x = left + j * cw
            if j in keep:
                out.append(f'<rect class="kept-cell" x="{x + 2}" y="{y}" width="{cw - 5}" height="{strip}" '
                           f'fill="{color}" fill-opacity="0.25" stroke="{color}" stroke-width="2">'
                           f"<title>{escape(app)} keeps expert {escape(cols[j])}</title></rect>")
            else:
                out.append(f'<rect x="{x + 2}" y="{y}" width="{cw - 5}" height="{strip}" fill="none" '
                           f'stroke="#ccc" stroke-dasharray="2 2"><title>{escape(app)} prunes expert '
                           f"{escape(cols[j])}</title></rect>")
    out.append("</svg>")
    return "".join(out)


def color_legend(label: str, chart_id: str, width: int = 240) -> str:
    """A 0-100 % viridis colour bar with its label above it."""
    stops = "".join(f'<stop offset="{k / 10:.1f}" stop-color="{viridis(k / 10)}"/>' for k in range(11))
    return (f'<svg class="legend" width="{width + 24}" height="50" xmlns="http://www.w3.org/2000/svg" role="img">'
            f"<title>{escape(label)}</title>"
            f'<defs><linearGradient id="{chart_id}">{stops}</linearGradient></defs>'
            f'<text x="10" y="12" class="axis">{escape(label)}</text>'
            f'<rect x="10" y="18" width="{width}" height="12" fill="url(#{chart_id})"/>'
            f'<text x="10" y="44" class="tick">0 %</text>'
            f'<text x="{10 + width / 2}" y="44" class="tick" text-anchor="middle">50 %</text>'
            f'<text x="{10 + width}" y="44" class="tick" text-anchor="end">100 %</text></svg>')


@dataclass
class Series:
    """One line of a :func:`line_chart`."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str = PALETTE[0]
    dash: str = ""
    markers: bool = False
    point_titles: Sequence[str] = field(default_factory=list)
    errors: Sequence[tuple[float, float]] = field(default_factory=list)  # (low, high) whisker of each point


@dataclass
class Mark:
    """A highlighted point (e.g. the champion) drawn over a :func:`line_chart`."""

    x: float
    y: float
    label: str
    shape: str = "ring"  # ring | cross | diamond
    color: str = "#111"


def line_chart(series: Sequence[Series], x_label: str, y_label: str, title: str, marks: Sequence[Mark] = (),
               width: int = 420, height: int = 220, y_range: tuple[float, float] | None = None,
               x_integer: bool = False) -> str:
    """Lines (and optional point markers) with axes, ticks, a legend and highlighted marks."""
    left, right, top, bottom = 54, 12, 12, 42
    pts = [(x, y) for s in series for x, y in zip(s.xs, s.ys, strict=True) if math.isfinite(y)]
    if not pts:
        return f'<p class="empty">{escape(title)}: no data yet</p>'
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    ys += [v for s in series for e in s.errors for v in e if v is not None and math.isfinite(v)]
    x0, x1 = min(xs), max(xs)
    pad = 0.5 if x1 == x0 else (x1 - x0) * 0.04  # markers at the ends stay inside the plot
    x0, x1 = x0 - pad, x1 + pad
    y0, y1 = y_range if y_range else (min(ys), max(ys))
    yt = nice_ticks(y0, y1)
    y0, y1 = min(yt[0], y0), max(yt[-1], y1)
    xt = nice_ticks(x0, x1, 6)
    if x_integer:
        xt = [t for t in xt if float(t).is_integer()]
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / ((y1 - y0) or 1)) * ph

    out = [f'<svg class="chart line" role="img" width="{width}" height="{height + 18 * len(series)}" '
           f'viewBox="0 0 {width} {height + 18 * len(series)}" xmlns="http://www.w3.org/2000/svg">',
           f"<title>{escape(title)}</title>",
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ddd"/>']
    for t in yt:
        if y0 <= t <= y1:
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e6e6e6"/>'
                       f'<text x="{left - 5}" y="{sy(t) + 4:.1f}" class="tick" text-anchor="end">{_fmt(t)}</text>')
    for t in xt:
        if x0 <= t <= x1:
            out.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" class="tick" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 32}" class="axis" text-anchor="middle">'
               f"{escape(x_label)}</text>")
    out.append(f'<text x="12" y="{top + ph / 2}" class="axis" text-anchor="middle" '
               f'transform="rotate(-90 12 {top + ph / 2})">{escape(y_label)}</text>')
    for s in series:
        seg = [(sx(x), sy(y)) for x, y in zip(s.xs, s.ys, strict=True) if math.isfinite(y)]
        if len(seg) > 1:
            d = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(seg))
            dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
            out.append(f'<path d="{d}" fill="none" stroke="{s.color}" stroke-width="2"{dash}>'
                       f"<title>{escape(s.name)}</title></path>")
        for x, (lo, hi) in zip(s.xs, s.errors, strict=False):
            if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
                px = sx(x)
                out.append(f'<path class="whisker" d="M{px:.1f},{sy(lo):.1f}V{sy(hi):.1f}M{px - 3:.1f},{sy(lo):.1f}'
                           f'H{px + 3:.1f}M{px - 3:.1f},{sy(hi):.1f}H{px + 3:.1f}" stroke="{s.color}" '
                           f'stroke-width="1.2"/>')
        if s.markers or len(seg) == 1:
            titles = list(s.point_titles) or [f"{s.name}: {y:.4g}" for y in s.ys]
            for (x, y), t in zip(seg, titles, strict=False):
                out.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{s.color}"><title>'
                           f"{escape(t)}</title></circle>")
    for m in marks:
        if not math.isfinite(m.y):
            continue
        x, y = sx(m.x), sy(m.y)
        if m.shape == "diamond":
            out.append(f'<path class="mark" d="M{x:.1f},{y - 8:.1f}L{x + 8:.1f},{y:.1f}L{x:.1f},{y + 8:.1f}L{x - 8:.1f},'
                       f'{y:.1f}Z" fill="none" stroke="{m.color}" stroke-width="2"><title>{escape(m.label)}</title>'
                       "</path>")
        elif m.shape == "cross":
            out.append(f'<path class="mark" d="M{x - 5:.1f},{y - 5:.1f}L{x + 5:.1f},{y + 5:.1f}M{x - 5:.1f},'
                       f'{y + 5:.1f}L{x + 5:.1f},{y - 5:.1f}" stroke="{m.color}" stroke-width="2.5">'
                       f"<title>{escape(m.label)}</title></path>")
        else:
            out.append(f'<circle class="mark" cx="{x:.1f}" cy="{y:.1f}" r="7" fill="none" stroke="{m.color}" '
                       f'stroke-width="2.5"><title>{escape(m.label)}</title></circle>')
    for i, s in enumerate(series):
        y = height + 4 + 18 * i
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        out.append(f'<line x1="{left}" x2="{left + 22}" y1="{y}" y2="{y}" stroke="{s.color}" stroke-width="2"{dash}/>'
                   f'<text x="{left + 28}" y="{y + 4}" class="tick">{escape(s.name)}</text>')
    out.append("</svg>")
    return "".join(out)


@dataclass
class Bar:
    """One bar of :func:`bar_chart`: a value with an optional 95 % interval."""

    label: str
    value: float
    low: float | None = None
    high: float | None = None
    color: str = PALETTE[0]
    note: str = ""


def bar_chart(bars: Sequence[Bar], x_label: str, title: str, x_max: float | None = None, width: int = 420) -> str:
    """Horizontal bars with interval whiskers and value labels."""
    left, right, row, top = 140, 56, 26, 6
    finite = [b for b in bars if math.isfinite(b.value)]
    if not finite:
        return f'<p class="empty">{escape(title)}: no data yet</p>'
    hi = x_max if x_max is not None else max(max(b.high or b.value for b in finite), 1e-12)
    pw = width - left - right
    height = top + row * len(bars) + 36

    def sx(v: float) -> float:
        return left + min(max(v, 0.0), hi) / hi * pw

    out = [f'<svg class="chart bars" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>']
    for t in nice_ticks(0, hi):
        if t <= hi:
            out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{top + row * len(bars)}" '
                       f'stroke="#e6e6e6"/><text x="{sx(t):.1f}" y="{top + row * len(bars) + 14}" class="tick" '
                       f'text-anchor="middle">{_fmt(t)}</text>')
    for i, b in enumerate(bars):
        y = top + i * row
        out.append(f'<text x="{left - 6}" y="{y + row / 2 + 4}" class="axis" text-anchor="end">{escape(b.label)}'
                   "</text>")
        if not math.isfinite(b.value):
            out.append(f'<text x="{left + 4}" y="{y + row / 2 + 4}" class="tick">not measured</text>')
            continue
        ci = f" (95 % interval {b.low:.3f}-{b.high:.3f})" if b.low is not None and b.high is not None else ""
        out.append(f'<rect x="{left}" y="{y + 5}" width="{max(sx(b.value) - left, 1):.1f}" height="{row - 10}" '
                   f'fill="{b.color}"><title>{escape(b.label)}: {b.value:.4f}{ci}{escape(b.note)}</title></rect>')
        if b.low is not None and b.high is not None:
            ym = y + row / 2
            out.append(f'<path d="M{sx(b.low):.1f},{ym}H{sx(b.high):.1f}M{sx(b.low):.1f},{ym - 5}V{ym + 5}'
                       f'M{sx(b.high):.1f},{ym - 5}V{ym + 5}" stroke="#222" stroke-width="1.5"/>')
        out.append(f'<text x="{max(sx(b.value), sx(b.high or 0)) + 5:.1f}" y="{y + row / 2 + 4}" class="tick">'
                   f"{b.value:.3f}</text>")
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" class="axis" text-anchor="middle">{escape(x_label)}'
               "</text></svg>")
    return "".join(out)

"""The replay's HTML report: one self-contained file that opens offline.

Plots are inline SVG written here (no plotting library, no CDN, no web fonts); a few lines
of inline JavaScript only sort the changes table. A Content-Security-Policy forbids every
network load, so the file behaves the same on an air-gapped analyst laptop.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

SCORE_BINS = 40
COLORS = {"A": "#1f6fb4", "B": "#d1495b", "frauds": "#555555"}
WIDTH, HEIGHT = 540, 300
MARGIN = {"left": 62, "right": 18, "top": 28, "bottom": 46}
PSI_MODERATE, PSI_MAJOR = 0.1, 0.25

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;
background:#fafafa}
main{max-width:1160px;margin:0 auto;padding:18px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid
#ddd;padding-bottom:4px}
.sub{color:#666;margin:0 0 12px}
table{border-collapse:collapse;margin:6px 0 10px;background:#fff}
th,td{border:1px solid #e2e2e2;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;font-weight:600}td.l,th.l{text-align:left}
table.sortable th{cursor:pointer}
.grid{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;background:#fff;border:1px solid #e2e2e2;padding:6px}
figcaption{font-size:12px;color:#555;max-width:530px;padding:2px 4px}
svg text{font:11px system-ui,sans-serif;fill:#333}
.axis{stroke:#888;stroke-width:1}.gridline{stroke:#eee;stroke-width:1}
.series{fill:none;stroke-width:1.8}
.block{color:#b00020;font-weight:600}.review{color:#b26a00;font-weight:600}.allow{color:#2e7d32}
.note{background:#fff8e1;border:1px solid #f0e0a0;padding:6px 10px;margin:6px 0}
.reasons{text-align:left;font-size:11px;white-space:normal;min-width:210px}
.scroll{overflow-x:auto;max-width:100%}
"""

_JS = """
(function () {
  var headers = document.querySelectorAll("table.sortable th");
  Array.prototype.forEach.call(headers, function (th) {
    th.addEventListener("click", function () {
      var body = th.closest("table").tBodies[0];
      var col = th.cellIndex;
      var asc = th.getAttribute("data-order") !== "asc";
      th.setAttribute("data-order", asc ? "asc" : "desc");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute("data-v") || a.cells[col].textContent;
        var y = b.cells[col].getAttribute("data-v") || b.cells[col].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  document.documentElement.setAttribute("data-ready", "1");
})();
"""

_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "img-src data:")


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for tables: '—' for missing, thousands separators for counts."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# ---- SVG -----------------------------------------------------------------------------------


class Frame:
    """Data → pixel mapping of one chart's plotting area."""

    def __init__(self, x0: float, x1: float, y0: float, y1: float,
                 width: int = WIDTH, height: int = HEIGHT) -> None:
        self.x0, self.x1 = x0, x1 if x1 > x0 else x0 + 1
        self.y0, self.y1 = y0, y1 if y1 > y0 else y0 + 1
        self.width, self.height = width, height
        self.left, self.right = MARGIN["left"], width - MARGIN["right"]
        self.top, self.bottom = MARGIN["top"], height - MARGIN["bottom"]

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def py(self, y: float) -> float:
        return self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _axes(f: Frame, xticks: Sequence[tuple[float, str]], yticks: Sequence[tuple[float, str]],
          xlabel: str, ylabel: str) -> list[str]:
    parts = []
    for y, text in yticks:
        py = f.py(y)
        parts.append(f'<line class="gridline" x1="{f.left}" x2="{f.right}" y1="{py:.1f}" '
                     f'y2="{py:.1f}"/><text x="{f.left - 6}" y="{py + 4:.1f}" '
                     f'text-anchor="end">{esc(text)}</text>')
    for x, text in xticks:
        px = f.px(x)
        parts.append(f'<line class="axis" x1="{px:.1f}" x2="{px:.1f}" y1="{f.bottom}" '
                     f'y2="{f.bottom + 4}"/><text x="{px:.1f}" y="{f.bottom + 16}" '
                     f'text-anchor="middle">{esc(text)}</text>')
    parts.append(f'<line class="axis" x1="{f.left}" x2="{f.right}" y1="{f.bottom}" '
                 f'y2="{f.bottom}"/><line class="axis" x1="{f.left}" x2="{f.left}" '
                 f'y1="{f.top}" y2="{f.bottom}"/>')
    parts.append(f'<text x="{(f.left + f.right) / 2:.0f}" y="{f.height - 8}" '
                 f'text-anchor="middle">{esc(xlabel)}</text>')
    parts.append(f'<text transform="translate(14,{(f.top + f.bottom) / 2:.0f}) rotate(-90)" '
                 f'text-anchor="middle">{esc(ylabel)}</text>')
    return parts


def _legend(f: Frame, names: Sequence[tuple[str, str, str]]) -> list[str]:
    """(label, color, dash) entries in a row above the plot."""
    parts, x = [], f.left
    for label, color, dash in names:
        parts.append(f'<path d="M{x},{f.top - 12}h18" stroke="{color}" stroke-width="2.5" '
                     f'stroke-dasharray="{dash}"/><text x="{x + 23}" y="{f.top - 8}">'
                     f'{esc(label)}</text>')
        x += 30 + 7 * len(label)
    return parts


def _svg(plot_id: str, f: Frame, parts: Sequence[str], title: str) -> str:
    return (f'<svg id="{plot_id}" class="plot" xmlns="http://www.w3.org/2000/svg" '
            f'width="{f.width}" height="{f.height}" viewBox="0 0 {f.width} {f.height}" '
            f'role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>'
            + "".join(parts) + "</svg>")


def _polyline(f: Frame, xs: Sequence[float], ys: Sequence[float]) -> str:
    return "M" + "L".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in zip(xs, ys, strict=True))


def line_chart(plot_id: str, title: str, series: Sequence[dict[str, Any]], xlabel: str,
               ylabel: str, xticks: Sequence[tuple[float, str]] | None = None,
               y_range: tuple[float, float] | None = None,
               yticks: Sequence[tuple[float, str]] | None = None,
               vlines: Sequence[dict[str, Any]] = ()) -> str:
    """Lines (`series`: name, x, y, color, dash) with optional vertical markers."""
    xs = [x for s in series for x in s["x"]] or [0.0, 1.0]
    ys = [y for s in series for y in s["y"]] or [0.0, 1.0]
    lo, hi = y_range or (min(0.0, min(ys)), max(ys) * 1.05 if max(ys) > 0 else 1.0)
    f = Frame(min(xs), max(xs), lo, hi)
    xt = xticks if xticks is not None else [(t, f"{t:g}") for t in nice_ticks(f.x0, f.x1)]
    yt = yticks if yticks is not None else [(t, f"{t:g}") for t in nice_ticks(lo, hi)]
    parts = _axes(f, xt, yt, xlabel, ylabel)
    for v in vlines:
        px = f.px(v["x"])
        parts.append(f'<path d="M{px:.1f},{f.top}V{f.bottom}" stroke="{v["color"]}" '
                     f'stroke-width="1" stroke-dasharray="3 3" opacity="0.8">'
                     f'<title>{esc(v["label"])}</title></path>')
    for s in series:
        if not len(s["x"]):
            continue
        parts.append(f'<path class="series" d="{_polyline(f, s["x"], s["y"])}" '
                     f'stroke="{s["color"]}" stroke-dasharray="{s.get("dash", "")}">'
                     f'<title>{esc(s["name"])}</title></path>')
    parts += _legend(f, [(s["name"], s["color"], s.get("dash", "")) for s in series])
    return _svg(plot_id, f, parts, title)


def hbar_chart(plot_id: str, title: str, names: Sequence[str],
               values: dict[str, Sequence[float]], xlabel: str,
               marks: Sequence[tuple[float, str]] = ()) -> str:
    """Horizontal grouped bars, one group per name, one bar per series in `values`."""
    groups = max(len(names), 1)
    per = max(len(values), 1)
    height = MARGIN["top"] + MARGIN["bottom"] + groups * (5 * per + 6)
    top = max((v for vs in values.values() for v in vs if math.isfinite(v)), default=0.0)
    hi = max(top * 1.08, max((m for m, _ in marks), default=0.0) * 1.1, 0.05)
    f = Frame(0.0, hi, 0.0, float(groups), width=WIDTH, height=height)
    f.left = 190
    parts = _axes(f, [(t, f"{t:g}") for t in nice_ticks(0, hi)], [], xlabel, "")
    for m, label in marks:
        px = f.px(m)
        parts.append(f'<path d="M{px:.1f},{f.top}V{f.bottom}" stroke="#999" '
                     f'stroke-dasharray="4 3"><title>{esc(label)}</title></path>')
    row_h = (f.bottom - f.top) / groups
    for g, name in enumerate(names):
        y = f.top + g * row_h
        parts.append(f'<text x="{f.left - 6}" y="{y + row_h / 2 + 4:.1f}" '
                     f'text-anchor="end">{esc(name)}</text>')
        for k, (label, vs) in enumerate(values.items()):
            v = vs[g] if math.isfinite(vs[g]) else 0.0
            w = max(f.px(v) - f.left, 0.0)
            by = y + 3 + k * 5
            parts.append(f'<path class="bar" d="M{f.left},{by:.1f}h{w:.1f}v4.5h{-w:.1f}Z" '
                         f'fill="{COLORS.get(label, "#888")}"><title>{esc(name)} — model '
                         f'{esc(label)}: PSI {vs[g]:.4f}</title></path>')
    parts += _legend(f, [(f"vs model {k}'s reference", COLORS.get(k, "#888"), "")
                         for k in values])
    return _svg(plot_id, f, parts, title)


# ---- the page ------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "",
           left: int = 1) -> str:
    """Rows of already escaped cells; the first `left` columns are left-aligned."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>'
                   for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else
                                    f'<td class="{"l" if i < left else ""}">{c}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"


def _models_section(s: dict[str, Any]) -> str:
    rows = []
    for m in s["models"]:
        t = m.get("training") or {}
        window = f'{str(t.get("start", "?"))[:10]} → {str(t.get("end", "?"))[:10]}'
        d = m["decisions"]
        rows.append([f'<b style="color:{COLORS[m["label"]]}">{esc(m["label"])}</b>',
                     esc(m["version"]), esc(window), fmt(m["review_threshold"], 4),
                     fmt(m["block_threshold"], 4), fmt(d["allow"]), fmt(d["review"]),
                     fmt(d["block"]), fmt(m["score_psi"])])
    return "<h2>Models</h2>" + _table(
        ["model", "version", "training window", "review ≥", "block ≥", "allow", "review", "block",
         "score PSI vs validation"], rows, left=3)


def _metrics_section(s: dict[str, Any]) -> str:
    if s["metrics"] is None:
        return ('<h2>Detection quality</h2><p class="note">No labels for this range: pass '
                "<code>--labels FILE|TOPIC</code> for AUC, precision and Card Precision@100."
                "</p>")
    budget = s["alert_budget"]
    rows = []
    for label, m in s["metrics"].items():
        rows.append([f'<b style="color:{COLORS[label]}">{esc(label)}</b>', fmt(m["auc_roc"]),
                     fmt(m["average_precision"]), fmt(m["card_precision_at_100"]),
                     fmt(m["alerts"]), fmt(m["alerts_per_day"], 1), fmt(m["alert_precision"]),
                     fmt(m["alert_recall"]), fmt(m["precision_at_budget"])])
    return (f'<h2>Detection quality</h2><p class="sub">{fmt(s.get("frauds"))} frauds among '
            f'{fmt(s["events"])} events ({fmt(s.get("labelled_events"))} labelled). Card '
            "Precision@100: the handbook's daily share of frauded cards among the 100 "
            f"highest-scored cards. Precision at budget: frauds among each day's {budget} "
            "highest-scored transactions.</p>"
            + _table(["model", "AUC ROC", "average precision", "Card Precision@100", "alerts",
                      "alerts / day", "alert precision", "alert recall",
                      f"precision @ {budget}/day"], rows))


def _score_plot(s: dict[str, Any]) -> str:
    centers = [(i + 0.5) / SCORE_BINS for i in range(SCORE_BINS)]
    series, vlines = [], []
    top = 1.0
    for m in s["models"]:
        logs = [math.log10(c + 1) for c in m["score_histogram"]]
        top = max(top, max(logs, default=0.0))
        series.append({"name": f"model {m['label']}", "x": centers, "y": logs,
                       "color": COLORS[m["label"]]})
        vlines.append({"x": m["review_threshold"], "color": COLORS[m["label"]],
                       "label": f"model {m['label']} review ≥ {m['review_threshold']:.4f}"})
    hi = math.ceil(top)
    yticks = [(k, f"{10 ** k:,.0f}") for k in range(0, hi + 1)]
    svg = line_chart("plot-scores", "Score distributions", series, "fraud score",
                     "events (log scale)", y_range=(0.0, float(hi)), yticks=yticks,
                     vlines=vlines)
    return _figure(svg, f"Fraud score histograms ({SCORE_BINS} bins; log count). Dashed: "
                   "each model's review threshold.")


def _pr_plot(s: dict[str, Any]) -> str | None:
    if not s.get("pr_curves"):
        return None
    series = [{"name": f"model {k} (AP {s['metrics'][k]['average_precision']:.3f})",
               "x": r, "y": p, "color": COLORS[k]} for k, (r, p) in s["pr_curves"].items()]
    svg = line_chart("plot-pr", "Precision-recall", series, "recall", "precision",
                     y_range=(0.0, 1.0))
    return _figure(svg, "Precision-recall curves over the range's labelled events.")


def _day_ticks(days: Sequence[str]) -> list[tuple[float, str]]:
    step = max(1, math.ceil(len(days) / 8))
    return [(float(i), d[5:]) for i, d in enumerate(days) if i % step == 0]


def _alerts_plot(s: dict[str, Any]) -> str:
    days = s["days"]
    xs = list(range(len(days)))
    series = [{"name": f"alerts, model {m['label']}", "x": xs, "y": m["alerts_per_day"],
               "color": COLORS[m["label"]]} for m in s["models"]]
    if s.get("frauds_per_day") is not None:
        series.append({"name": "frauds (labels)", "x": xs, "y": s["frauds_per_day"],
                       "color": COLORS["frauds"], "dash": "4 3"})
    if len(xs) == 1:  # one day: draw a short flat segment so the line is visible
        for ser in series:
            ser["x"], ser["y"] = [-0.4, 0.4], [ser["y"][0]] * 2
    svg = line_chart("plot-alerts", "Alerts per day", series, "day (UTC)", "events",
                     xticks=_day_ticks(days))
    return _figure(svg, "Events decided review or block per UTC day"
                   + (", and labelled frauds." if s.get("frauds_per_day") else "."))


def _drift_plot(s: dict[str, Any]) -> tuple[str, str]:
    drift = {k: v for k, v in s["drift"].items() if v}
    if not drift:
        return "", "No drift reference: no history before the range."
    names = sorted(next(iter(drift.values())),
                   key=lambda n: -max(d.get(n, 0.0) or 0.0 for d in drift.values()))
    values = {k: [(d.get(n) if d.get(n) is not None else float("nan")) for n in names]
              for k, d in drift.items()}
    svg = hbar_chart("plot-drift", "Feature drift (PSI)", names, values, "PSI",
                     marks=[(PSI_MODERATE, "moderate shift"), (PSI_MAJOR, "major shift")])
    refs = "; ".join(f"model {m['label']}: {esc(m['drift_reference'])}" for m in s["models"])
    caption = (f"Population stability index of each feature in the range against the "
               f"reference ({refs}). Dashed: {PSI_MODERATE} (moderate) and {PSI_MAJOR} "
               "(major shift).")
    return _figure(svg, caption), refs


def _reasons(reasons: Any) -> str:
    if not reasons:
        return ""
    return "<br>".join(f"{esc(r['feature'])}={r['value']:.4g} ({r['contribution']:+.2f})"
                       for r in reasons)


def _changes_section(s: dict[str, Any]) -> str:
    if len(s["models"]) < 2:
        return ""
    trans = ", ".join(f"{esc(k)}: {v:,}" for k, v in s["transitions"].items()) or "none"
    head = (f"<h2>Changed decisions</h2><p class=\"sub\">{s['changed']:,} of "
            f"{s['events']:,} events change decision from A to B ({trans}). The "
            f"{len(s['top_changes'])} largest score moves (click a header to sort); reasons "
            "are each model's top TreeSHAP contributions (log-odds).</p>")
    if not s["top_changes"]:
        return head
    rows = []
    for c in s["top_changes"]:
        label = c["is_fraud"]
        rows.append([
            esc(c["transaction_id"]), esc(c["timestamp"][:19].replace("T", " ")),
            esc(str(c["customer_token"])[:10]) + "…", esc(c["terminal_id"]),
            f'<td data-v="{c["amount"]}">{c["amount"]:,.2f}</td>',
            f'<td data-v="{c["score_a"]}">{c["score_a"]:.4f}</td>',
            f'<td class="{esc(c["decision_a"])}">{esc(c["decision_a"])}</td>',
            f'<td data-v="{c["score_b"]}">{c["score_b"]:.4f}</td>',
            f'<td class="{esc(c["decision_b"])}">{esc(c["decision_b"])}</td>',
            "—" if label is None else ("fraud" if label else "genuine"),
            f'<td class="reasons">{_reasons(c.get("reasons_a"))}</td>',
            f'<td class="reasons">{_reasons(c.get("reasons_b"))}</td>',
        ])
    table = _table(["transaction", "time (UTC)", "customer token", "terminal", "amount",
                    "score A", "decision A", "score B", "decision B", "label", "reasons A",
                    "reasons B"], rows, cls="sortable changes", left=4)
    return f'{head}<div class="scroll">{table}</div>'


def render(s: dict[str, Any]) -> str:
    """The whole report for a replay summary (see :func:`app.replay.summarise`)."""
    plots = [_score_plot(s)]
    pr = _pr_plot(s)
    if pr:
        plots.append(pr)
    plots.append(_alerts_plot(s))
    drift_fig, _ = _drift_plot(s)
    plot_ids = ["plot-scores", *(["plot-pr"] if pr else []), "plot-alerts",
                *(["plot-drift"] if drift_fig else [])]
    versions = " vs ".join(f"{m['label']} = {m['version']}" for m in s["models"])
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in s["notes"])
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    seconds = (s.get("seconds") or {}).get("before_writing")
    took = f"{seconds:.1f} s" if seconds is not None else "—"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fraudscore replay {esc(s['from'][:10])} → {esc(s['to'][:10])}</title>
<style>{_CSS}</style></head>
<body><main data-plots="{' '.join(plot_ids)}">
<h1>Replay {esc(s['from'])} → {esc(s['to'])}</h1>
<p class="sub">{esc(versions)} · source {esc(s['source'])} · {s['events']:,} events replayed,
features rebuilt from {s['history_events']:,} earlier events · computed in {took} ·
generated {generated}</p>
{notes}
{_models_section(s)}
{_metrics_section(s)}
<h2>Scores, precision and alerts</h2>
<div class="grid">{''.join(plots)}</div>
{_changes_section(s)}
<h2>Feature drift</h2>
<div class="grid">{drift_fig or '<p class="note">No drift reference.</p>'}</div>
</main>
<script>{_JS}</script>
</body></html>
"""

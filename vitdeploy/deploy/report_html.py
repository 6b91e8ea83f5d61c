"""report.html: the bundle on one self-contained page (inline CSS, inline SVG plots, PNGs as data: URIs;
a Content-Security-Policy that lets the page load nothing from anywhere). Every text is escaped.

A small inline script records, once the page has loaded, each image's decoded size in its
``data-natural-width`` attribute, so a headless browser's DOM dump shows that the images decoded."""

from __future__ import annotations

import base64
import hashlib
import math
from html import escape
from typing import Any

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1200px;color:#1b1f24;
padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0;font-size:13px}th,td{border:1px solid #d0d7de;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.passed{color:#1a7f37;font-weight:600}.failed{color:#cf222e;font-weight:600}.other{color:#9a6700}
.muted{color:#57606a;font-size:12px}.callout{background:#ddf4ff;border:1px solid #54aeff;padding:8px 12px;
border-radius:6px;margin:10px 0}pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:12px;margin:4px 0;
white-space:pre-wrap;word-break:break-all}.plots{display:flex;flex-wrap:wrap;gap:16px}
.gallery{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;border:1px solid #d0d7de;border-radius:6px;
padding:8px;width:200px}figure img{width:96px;height:96px;image-rendering:pixelated;display:block;
border:1px solid #eee}figcaption{font-size:12px}ol{margin:4px 0;padding-left:20px;font-size:12px}
"""
SCRIPT = """window.addEventListener('load', function () {
  document.querySelectorAll('img').forEach(function (im) {
    im.setAttribute('data-natural-width', String(im.naturalWidth));
    im.setAttribute('data-natural-height', String(im.naturalHeight));
  });
  document.body.setAttribute('data-loaded', 'yes');
});"""
# The page runs its one script and nothing else: script-src names that script by its hash (a CSP level 2
# source), so an injected <script> or on* attribute does not run even if some text escaped its escaping.
SCRIPT_HASH = "'sha256-" + base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode() + "'"
CSP = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {SCRIPT_HASH}; "
       "base-uri 'none'; form-action 'none'")


def e(value: Any) -> str:
    return escape(str(value), quote=True)


def _verdict_class(verdict: str) -> str:
    return "passed" if verdict == "passed" else "failed" if verdict.lower().startswith("fail") else "other"


# --- plots ------------------------------------------------------------------------------------------------
def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    step = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        if m * step >= value:
            return m * step
    return 10 * step


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str,
               width: int = 560, height: int = 320) -> str:
    """An SVG line chart, x on a log2 axis at the x values present; y from 0."""
    if not series:
        return f'<p class="muted">{e(title)}: nothing measured</p>'
    left, right, top, bottom = 56, 16, 28, 48 + 16 * len(series)
    pw, ph = width - left - right, height - top - 48
    xs = sorted({x for pts in series.values() for x, _ in pts})
    ymax = _nice_max(max(y for pts in series.values() for _, y in pts))
    lx = [math.log2(x) for x in xs]
    span = (max(lx) - min(lx)) or 1.0

    def px(x: float) -> float:
        return left + (pw * (math.log2(x) - min(lx)) / span if len(xs) > 1 else pw / 2)

    def py(y: float) -> float:
        return top + ph - ph * y / ymax

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + bottom - 48}" '
           f'role="img" aria-label="{e(title)}"><text x="{left}" y="18" font-size="14" font-weight="600">'
           f'{e(title)}</text>']
    for i in range(5):
        y = ymax * i / 4
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6}" y="{py(y) + 4:.1f}" font-size="11" text-anchor="end">{y:g}</text>')
    for x in xs:
        out.append(f'<text x="{px(x):.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 32}" font-size="12" text-anchor="middle">{e(x_label)}'
               f'</text><text x="14" y="{top + ph / 2}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2})">{e(y_label)}</text>')
    for i, (label, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        pts = sorted(pts)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}"><title>{e(label)}: batch {x:g}, '
                f'{y:.3g} {e(y_label)}</title></circle>' for x, y in pts]
        ly = top + ph + 48 + 16 * i
        out.append(f'<rect x="{left}" y="{ly - 9}" width="12" height="3" fill="{color}"/>'
                   f'<text x="{left + 18}" y="{ly}" font-size="11">{e(label)}</text>')
    return "".join(out) + "</svg>"


def bar_chart(title: str, bars: list[tuple[str, float]], y_label: str, width: int = 560, height: int = 320) -> str:
    """An SVG bar chart of values in [0, 1] shown as percentages."""
    if not bars:
        return f'<p class="muted">{e(title)}: no accuracy measured (give --data DIR)</p>'
    left, top, ph = 56, 28, height - 110
    pw = width - left - 16
    slot = pw / len(bars)
    lo = max(0.0, math.floor(min(v for _, v in bars) * 10 - 1) / 10)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{e(title)}"><text x="{left}" y="18" font-size="14" font-weight="600">{e(title)}</text>']
    for i in range(5):
        v = lo + (1 - lo) * i / 4
        y = top + ph - ph * (v - lo) / (1 - lo)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{v * 100:.0f}%</text>')
    for i, (label, v) in enumerate(bars):
        h = ph * (v - lo) / (1 - lo)
        x = left + slot * i + slot * 0.15
        out.append(f'<rect x="{x:.1f}" y="{top + ph - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
                   f'fill="{COLORS[i % len(COLORS)]}"><title>{e(label)}: {v * 100:.2f}%</title></rect>'
                   f'<text x="{x + slot * 0.35:.1f}" y="{top + ph - h - 4:.1f}" font-size="11" '
                   f'text-anchor="middle">{v * 100:.2f}%</text>'
                   f'<text x="{x + slot * 0.35:.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">'
                   f'{e(label)}</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2})">{e(y_label)}</text>')
    return "".join(out) + "</svg>"


# --- sections -----------------------------------------------------------------------------------------------
def _machine(report: dict[str, Any]) -> str:
    m = report["machine"]
    rows = [("CPU", m.get("cpu")), ("ISA flags", " ".join(m.get("cpu_flags") or []) or "-"),
            ("cores", m.get("cores")), ("GPUs", ", ".join(m.get("gpus") or []) or "none"),
            ("platform", m.get("platform")), ("Python", m.get("python"))]
    libs = [(k, v or "not installed") for k, v in report["libraries"].items()]
    cells = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    lib_cells = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in libs)
    return (f'<h2 id="machine">Machine and libraries</h2><div class="plots"><table id="machine-table">{cells}'
            f'</table><table id="libraries-table">{lib_cells}</table></div>')


def _cell_ms(row: dict[str, Any], batch: str) -> str:
    ms, thr = row["latency_ms"].get(batch), row["throughput"].get(batch)
    if ms is None:
        return '<td class="num">-</td>'
    return f'<td class="num">{ms:.2f}<br><span class="muted">{thr:.1f} img/s</span></td>'


def _embedding(report: dict[str, Any]) -> bool:
    return bool(report.get("model", {}).get("task") == "embedding")


def _vs_fp32(r: dict[str, Any]) -> str:
    """The row against FP32 in its task's measure (cosine of its embeddings, or top-1 agreement)."""
    ref = r.get("vs_fp32")
    if not ref:
        return '<td class="num">-</td>'
    if ref["measure"] == "cosine":
        return (f'<td class="num vs-fp32">{ref["mean"]:.4f}<br><span class="muted">lowest {ref["lowest"]:.4f}; '
                f'FP32 {ref["reference_score"] * 100:.2f}%</span></td>')
    return (f'<td class="num vs-fp32">{ref["mean"] * 100:.2f}%<br><span class="muted">FP32 '
            f'{ref["reference_score"] * 100:.2f}%</span></td>')


def _artifact_table(report: dict[str, Any]) -> str:
    batches = [str(x) for x in report["options"]["bench_batches"]]
    measure, against = (("kNN top-1", "mean cosine to FP32") if _embedding(report)
                        else ("top-1 accuracy", "top-1 agreement with FP32"))
    head = (f"<tr><th>artifact</th><th>kind</th><th>precision</th><th>size</th><th>{measure}</th><th>{against}</th>"
            "<th>best path</th>" + "".join(f"<th>b{e(x)} median ms</th>" for x in batches)
            + "<th>verification</th></tr>")
    body = []
    for r in report["rows"]:
        acc = f"{r['accuracy'] * 100:.2f}%" if r["accuracy"] is not None else "-"
        acc_note = f'<br><span class="muted">{e(r["accuracy_note"])}</span>' if r["accuracy_note"] else ""
        paths = "<br>".join(f"b{e(k)}: {e(v)}" for k, v in r["paths"].items()) or "-"
        bench_note = f'<br><span class="muted">{e(r["bench_note"])}</span>' if r["bench_note"] else ""
        kind = r["kind"] + (f" ({r['flavour']}, {', '.join(r['targets'] or [])})" if r["kind"] == "engine" else "")
        body.append(
            f'<tr class="artifact-row" data-artifact="{e(r["artifact"])}"><td>{e(r["artifact"])}</td><td>{e(kind)}</td>'
            f'<td>{e(r["precision"])}</td><td class="num">{r["bytes"] / 1e6:.2f} MB</td><td class="num">{e(acc)}'
            f'{acc_note}</td>{_vs_fp32(r)}<td>{paths}{bench_note}</td>{"".join(_cell_ms(r, x) for x in batches)}'
            f'<td><span class="{_verdict_class(r["verdict"])}">{e(r["verdict"])}</span><br>'
            f'<span class="muted">{e(r["verdict_detail"])}</span></td></tr>')
    return f'<h2 id="artifacts">Artifacts</h2><table id="artifacts-table">{head}{"".join(body)}</table>'


def _plots(report: dict[str, Any]) -> str:
    series: dict[str, list[tuple[float, float]]] = {}
    for r in report["rows"]:
        if r["latency_ms"]:  # one line per artifact: its best path (a tune plan may change path with the batch)
            paths = " / ".join(dict.fromkeys(p.split("[")[0].removeprefix("tuned: ") for p in r["paths"].values()))
            series[f"{r['name']} ({paths})"] = [(int(k), v) for k, v in r["latency_ms"].items()]
    bars = [(f"{r['precision']} {r['kind']}", r["accuracy"]) for r in report["rows"] if r["accuracy"] is not None]
    measure = "kNN top-1 (cosine, leave-one-out)" if _embedding(report) else "top-1 accuracy"
    return ('<h2 id="plots">Latency and accuracy</h2><div class="plots">'
            + line_chart("median latency against batch size, best path per artifact", series, "batch size",
                         "ms per batch")
            + bar_chart(f"{measure} against precision", bars, measure.split(" (")[0]) + "</div>")


def _golden(report: dict[str, Any]) -> str:
    output, below = (("embeddings", "Below: the size and norm of the reference's embedding.") if _embedding(report)
                     else ("logits", "Top-5 below: the reference's."))
    parts = [f'<h2 id="golden">Golden images</h2><p class="muted">Each artifact carries these images and the {output} '
             "torch FP32 gave for them; the verification runs them through decode, the artifact's preprocessing and "
             f"the runtime. {below}</p>"]
    for g in report["golden"]:
        parts.append(f'<p>{e(g["source"])}, carried by {e(", ".join(g["artifacts"]))}</p><div class="gallery">')
        for im in g["images"]:
            top = "".join(f"<li>{e(t['label'])} <span class=\"muted\">{t['probability'] * 100:.1f}%</span></li>"
                          for t in im["top5"])
            if "embedding" in im:
                top = f"<li>embedding of {im['embedding']['size']}, norm {im['embedding']['norm']:.4g}</li>"
            parts.append(f'<figure class="golden"><img alt="{e(im["name"])}" src="data:image/png;base64,{im["png"]}">'
                         f"<figcaption>{e(im['name'])}<ol>{top}</ol></figcaption></figure>")
        parts.append("</div>")
    return "".join(parts)


def _commands(report: dict[str, Any]) -> str:
    parts = ['<h2 id="reproduce">Reproduce</h2><p>The whole bundle (a rerun with the same inputs redoes '
             f'nothing):</p><pre>{e(report["command"])}</pre>']
    for r in report["rows"]:
        parts.append(f'<p>{e(r["artifact"])}:</p><pre class="commands">{e(chr(10).join(r["commands"]))}</pre>')
    if report["options"]["tune_seconds"] != 0.5:
        parts.append(f'<p class="muted">deploy timed each tune path for at least {report["options"]["tune_seconds"]:g}'
                     " s per batch size (--tune-seconds); `vitdeploy tune` takes 0.5 s.</p>")
    return "".join(parts)


def _stages(report: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{e(s['name'])}</td><td class=\"num\">{s['seconds']:.1f} s</td><td>"
                   + e(", ".join(f"{s[k]} {k}" for k in ("done", "skipped", "failed", "not possible") if s.get(k)))
                   + "</td></tr>" for s in report["stages"])
    notes = "".join(f"<li>{e(u['stage'])} {e(u['unit'])}: {e(u['status'])}: {e(u.get('reason', ''))}</li>"
                    for u in report["units"].values() if u["status"] in ("failed", "not possible"))
    return (f'<h2 id="stages">Stages</h2><table id="stages-table"><tr><th>stage</th><th>time</th><th>units</th></tr>'
            f'{rows}</table>' + (f"<ul>{notes}</ul>" if notes else ""))


def _header(report: dict[str, Any]) -> str:
    f = report["fastest"]
    if f is None:
        best = "No artifact was both verified and benchmarked on this machine."
    else:
        thr = ", ".join(f"{v:.1f} img/s at batch {k}" for k, v in f["throughput"].items())
        best = (f"Fastest verified path on this machine: {f['artifact']} on {f['path']}, {f['latency_ms']:.2f} ms at "
                f"batch {f['batch']} ({thr}).")
    m = report.get("model") or {}
    task = (f"an embedding model: {m.get('output_name')} of {m.get('output_size')}"
            f"{', L2-normalized' if m.get('normalized') else ''}" if m.get("task") == "embedding"
            else "a classifier" + (f": {m['output_name']} of {m['output_size']}" if m.get("output_name") else ""))
    return (f"<h1>vitdeploy deploy: {e(report['source'])}</h1><p id=\"task\">{e(task)}</p>"
            f"<p class=\"muted\">bundle {e(report['out'])}, "
            f"vitdeploy {e(report['vitdeploy'])}, {e(report['created'])}, {report['seconds']:.1f} s</p>"
            f'<div class="callout" id="fastest">{e(best)}</div>')


def render(report: dict[str, Any]) -> str:
    """The whole page for a report dict as :func:`vitdeploy.deploy.report.build_report` makes it."""
    body = "".join([_header(report), _artifact_table(report), _plots(report), _golden(report), _machine(report),
                    _commands(report), _stages(report)])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{e(CSP)}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>vitdeploy deploy: {e(report['source'])}</title><style>{CSS}</style>"
            f"<script>{SCRIPT}</script></head><body>{body}</body></html>\n")

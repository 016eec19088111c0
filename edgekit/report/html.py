"""report.html: one self-contained file (no network; plots are inline base64 PNGs, CSS inline).

Target table (best target within its gates marked, artifacts linked), gates, fp32-vs-optimized latency
distributions per target (box = quartiles, line = p50, whiskers = min..p99, from the stats in
report.json), metric vs latency scatter, size bars, then per target: every artifact's p50/p90/p99, load
time and peak RSS, how it was timed, the accuracy search's steps and pruning's effect. Laid out for a
1280 px window (numbers never wrap; wide tables scroll).
A failed target, or one without latency, is a table row with its reason and is left out of the plots
that need the missing numbers. Needs matplotlib (``pip install 'edgekit-deploy[report]'``); without it the
file is still written, with the table and a note instead of plots.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from edgekit.report.markdown import latency_host, speed_text
from edgekit.report.schema import GateResult, Report

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;max-width:1220px}
.wide{overflow-x:auto}table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 7px;text-align:left;white-space:nowrap}
td.wrap{white-space:normal;max-width:1150px}th{background:#f3f3f3}tr.best td{background:#eaf7ee}
.ok{color:#1a7f37}.bad{color:#cf222e;font-weight:bold}.na{color:#9a6700}
pre{background:#f6f8fa;padding:6px;white-space:pre-wrap;max-width:1100px}img{max-width:100%;margin:.5em 0}
.fig{display:inline-block;vertical-align:top;margin-right:1em}li{margin:.2em 0}code{font-size:90%}"""


def _e(x) -> str:
    return html.escape("—" if x is None else str(x))


def _ms(side) -> str:
    return f"{side.p50:.3f}" if side and side.latency_ms else ("—" if not side else "not measured")


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def plots(doc: Report) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    rows = [r for r in doc.targets if r.fp32 or r.optimized]
    # latency distributions
    stats, labels = [], []
    for r in rows:
        for kind, a in r.artifacts():
            lat = a.latency_ms
            if not lat:
                continue
            med = lat.p50
            stats.append({"med": med, "q1": lat.q1 if lat.q1 is not None else med,
                          "q3": lat.q3 if lat.q3 is not None else med,
                          "whislo": lat.min if lat.min is not None else med, "whishi": lat.p99, "fliers": [],
                          "label": f"{r.name}\n{kind}"})
            labels.append(kind)
    if stats:
        fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(stats)), 3.6))
        bp = ax.bxp(stats, showfliers=False, patch_artist=True)
        for patch, kind in zip(bp["boxes"], labels):
            patch.set_facecolor("#9ecae1" if kind == "fp32" else "#fdae6b" if kind == "optimized" else "#c7e9c0")
        ax.set_ylabel("latency per call (ms)")
        ax.set_title("Latency, fp32 vs optimized (box: quartiles; whiskers: min..p99)")
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
        for t in ax.get_xticklabels():
            t.set_horizontalalignment("right")
        figs.append(("Latency distributions", _png(fig)))
    # metric vs latency
    pts = [(r.name, kind, a.p50, a.metric) for r in rows for kind, a in r.artifacts()
           if a.latency_ms and a.metric is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        names = list(dict.fromkeys(p[0] for p in pts))
        colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
        for n in names:  # one color per target, fp32 -> optimized joined by a line
            mine = [(x, y) for name, _, x, y in pts if name == n]
            ax.plot([x for x, _ in mine], [y for _, y in mine], color=colors[n], alpha=0.4, lw=1)
        for name, kind, x, y in pts:
            ax.scatter([x], [y], marker="o" if kind == "fp32" else "^" if kind == "optimized" else "s", s=40,
                       color=colors[name], label=name if kind == "optimized" else None)
        ax.legend(fontsize=7, loc="best", frameon=False)  # one entry per target: no labels over the points
        ax.set_xlabel("p50 latency (ms)")
        ax.set_ylabel(doc.eval.metric)
        ax.set_title(f"{doc.eval.metric} vs latency (o fp32, ^ optimized, ■ other)")
        figs.append(("Accuracy vs latency", _png(fig)))
    # sizes
    sz = [(r.name, kind, a.size_bytes) for r in rows for kind, a in r.artifacts() if a.size_bytes]
    if sz:
        fig, ax = plt.subplots(figsize=(5.5, max(2.4, 0.32 * len(sz) + 0.8)))
        ax.barh(range(len(sz)), [s / 1e6 for _, _, s in sz],
                color=["#9ecae1" if k == "fp32" else "#fdae6b" if k == "optimized" else "#c7e9c0" for _, k, _ in sz])
        ax.set_yticks(range(len(sz)), [f"{n} {k}" for n, k, _ in sz], fontsize=8)  # one label per row
        ax.invert_yaxis()
        ax.set_xlabel("artifact size (MB)")
        ax.set_title("Artifact sizes")
        figs.append(("Artifact sizes", _png(fig)))
    return figs


def table(doc: Report) -> str:
    from edgekit.report.terminal import best

    metric = doc.eval.metric
    top = best(doc, list(doc.gates) + [GateResult.model_validate(g) for g in (doc.baseline or {}).get("results", [])])
    head = ["target", "status", "device", "p50 fp32 → opt (ms)", "speedup [95 % CI]", "size fp32 → opt",
            f"{metric} fp32 → opt", "drop", "artifacts"]
    out = ['<div class="wide"><table id="targets"><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in doc.targets:
        fp, op = r.fp32, r.optimized
        st = '<span class="ok">ok</span>' if r.status == "ok" else f'<span class="bad">{_e(r.status)}</span>'
        if r.name == top:
            st += " ★ best"
        mb = lambda a: "—" if not a or not a.size_bytes else f"{a.size_bytes / 1e6:.2f} MB"  # noqa: E731
        met = lambda a: "—" if not a or a.metric is None else f"{a.metric:.4f}"  # noqa: E731
        links = " ".join(f'<a href="{html.escape(a.artifact)}">{_e(kind)}</a>' for kind, a in r.artifacts()) or "—"
        cells = [_e(r.name), st, _e(r.device), f"{_ms(fp)} → {_ms(op)}", _speed(r), f"{mb(fp)} → {mb(op)}",
                 f"{met(fp)} → {met(op)}", "—" if r.metric_drop is None else f"{r.metric_drop:+.4f}", links]
        cls = ' class="best"' if r.name == top else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        if r.reason:
            out.append(f'<tr><td colspan="{len(head)}" class="wrap"><pre>{_e(r.reason)}</pre></td></tr>')
        if r.timing and r.timing.noisy:
            out.append(f'<tr><td colspan="{len(head)}" class="na wrap">noisy timing: {_e("; ".join(r.timing.noise))}'
                       f' (speed-up is the median over {r.timing.rounds} interleaved rounds; gates use the '
                       f'lower bound of its 95 % interval)</td></tr>')
    out.append("</table></div>")
    return "\n".join(out)


def details(doc: Report) -> str:
    """Per target: every artifact (precision, p50/p90/p99, load time, peak RSS, link), how it was timed,
    the accuracy search's steps and pruning's effect: report.md's lines, as HTML."""
    from edgekit.report.markdown import arm_md, prune_markdown, rescues_md, search_md, timing_md

    out = ["<h2>Targets</h2>"]
    for r in doc.targets:
        items = []
        for kind, a in r.artifacts():
            lat = a.latency_ms
            lat_s = (f"p50 {lat.p50:.3f} / p90 {lat.p90:.3f} / p99 {lat.p99:.3f} ms (n={lat.n})" if lat
                     else (a.latency_reason or "not measured"))
            load = "" if a.load_ms is None else f", load {a.load_ms:.0f} ms"
            rss = "" if a.peak_rss_mb is None else f", peak RSS {a.peak_rss_mb:.0f} MB"
            items.append(f'<b>{_e(kind)}</b> <a href="{html.escape(a.artifact)}"><code>{_e(a.artifact)}</code></a> '
                         f"({_e(a.precision)}): {a.size_bytes / 1e6:.2f} MB, {_e(lat_s)}{_e(load)}{_e(rss)}")
            items += ["&nbsp;&nbsp;↳ " + _inline(line.strip()[2:]) for line in rescues_md(a.details) + arm_md(a.arm, doc.eval.metric)]
        md = timing_md(r) + search_md(r.quantize_search) + (prune_markdown(r, doc.eval.metric) if r.prune else [])
        items += [("&nbsp;&nbsp;↳ " + _inline(line.strip()[2:])) if line.startswith("  ") else _inline(line[2:])
                  for line in md]
        out.append(f"<h3>{_e(r.name)} ({_e(r.backend)}, {_e(r.device)}, {_e(r.threads)} thread(s))</h3>")
        out.append("<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>")
    return "\n".join(out)


def _inline(md: str) -> str:
    """The Markdown of report.md's bullet lines (``code``, **bold**, sub-items) as escaped HTML."""
    import re

    text = _e(md.strip())
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
    return text


def _speed(r) -> str:
    """The speed-up with its 95 % interval; a noisy one marked."""
    text = speed_text(r)
    if not text:
        return "—"
    return _e(text).replace(" noisy", ' <span class="na">noisy</span>')


def gates_table(results: list, title: str) -> str:
    if not results:
        return ""
    out = [f"<h2>{_e(title)}</h2>", '<div class="wide"><table><tr><th>target</th><th>gate</th><th>what</th>'
           "<th>value</th><th>limit</th><th>result</th></tr>"]
    for g in map(GateResult.model_validate, results):
        res = {True: '<span class="ok">pass</span>', False: '<span class="bad">FAIL</span>',
               None: f'<span class="na">not judged: {_e(g.note)}</span>'}[g.passed]
        out.append(f"<tr><td>{_e(g.target)}</td><td>{_e(g.gate)}</td><td>{_e(g.what)}</td>"
                   f"<td>{_e(g.value)}</td><td>{_e(g.limit)}</td><td>{res}</td></tr>")
    out.append("</table></div>")
    return "\n".join(out)


def render(doc: Report) -> str:
    m, ev = doc.model, doc.eval
    try:
        figs = plots(doc)
        fig_html = "\n".join(f'<div class="fig"><h3>{_e(t)}</h3>{img}</div>' for t, img in figs) or \
            "<p>No measured latency or sizes to plot.</p>"
    except ImportError:
        fig_html = "<p>Plots need matplotlib: <code>pip install 'edgekit-deploy[report]'</code>.</p>"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>edgekit report: {_e(m.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>edgekit report: {_e(m.name)}</h1>",
        f"<p>{m.params / 1e6:.2f} M params, {m.macs / 1e6:.1f} M MACs per sample · {_e(ev.metric)} on "
        f"{ev.n} held-out samples (fp32 PyTorch: {ev.fp32_torch:.4f}) · edgekit {_e(doc.edgekit_version)}"
        f" · {_e(doc.created)}</p>",
        f"<p>Latency: batch 1, timed runs after warm-up, on {_e(latency_host(doc))}; a target's "
        f"artifacts are timed in interleaved rounds, speedup = median over "
        f"rounds of fp32 p50 / optimized p50 [95 % interval]. 'drop' = fp32 PyTorch metric − optimized "
        f"artifact metric.</p>",
        table(doc),
        gates_table(doc.gates, "Gates"),
        gates_table((doc.baseline or {}).get("results") or [], "Regressions vs baseline"),
        "<h2>Plots</h2>", fig_html,
        details(doc),
        # the page's own width after layout, for the headless-browser test (no network, nothing else)
        "<script>addEventListener('load',()=>{document.body.dataset.scrollWidth="
        "document.documentElement.scrollWidth})</script>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def write(doc: Report, out: Path) -> None:
    (Path(out) / "report.html").write_text(render(doc), encoding="utf-8")

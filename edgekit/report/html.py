"""report.html: one self-contained file (no network; plots are inline base64 PNGs, CSS inline).

Target table, fp32-vs-optimized latency distributions per target (box = quartiles, line = p50,
whiskers = min..p99, from the stats in report.json), metric vs latency scatter, size bars, gates.
A failed target, or one without latency, is a table row with its reason and is left out of the plots
that need the missing numbers. Needs matplotlib (``pip install 'edgekit-deploy[report]'``); without it the
file is still written, with the table and a note instead of plots.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from edgekit.report.markdown import speed_text
from edgekit.report.schema import GateResult, Report

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}.ok{color:#1a7f37}.bad{color:#cf222e;font-weight:bold}.na{color:#9a6700}
pre{background:#f6f8fa;padding:6px;white-space:pre-wrap;max-width:900px}img{max-width:100%;margin:.5em 0}
.fig{display:inline-block;vertical-align:top;margin-right:1em}"""


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
        ax.tick_params(axis="x", labelsize=8)
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
                       color=colors[name])
            ax.annotate(f"{name} {kind}", (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
        ax.set_xlabel("p50 latency (ms)")
        ax.set_ylabel(doc.eval.metric)
        ax.set_title(f"{doc.eval.metric} vs latency (o fp32, ^ optimized)")
        figs.append(("Accuracy vs latency", _png(fig)))
    # sizes
    sz = [(r.name, kind, a.size_bytes) for r in rows for kind, a in r.artifacts() if a.size_bytes]
    if sz:
        fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(sz)), 3.6))
        ax.bar(range(len(sz)), [s / 1e6 for _, _, s in sz],
               color=["#9ecae1" if k == "fp32" else "#fdae6b" if k == "optimized" else "#c7e9c0" for _, k, _ in sz])
        ax.set_xticks(range(len(sz)), [f"{n}\n{k}" for n, k, _ in sz], fontsize=8)
        ax.set_ylabel("artifact size (MB)")
        ax.set_title("Artifact sizes")
        figs.append(("Artifact sizes", _png(fig)))
    return figs


def table(doc: Report) -> str:
    metric = doc.eval.metric
    head = ["target", "status", "device", "p50 fp32 (ms)", "p50 optimized (ms)", "speedup", "size fp32",
            "size optimized", f"{metric} fp32", f"{metric} optimized", "drop", "precision"]
    out = ['<table id="targets"><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in doc.targets:
        fp, op = r.fp32, r.optimized
        st = '<span class="ok">ok</span>' if r.status == "ok" else f'<span class="bad">{_e(r.status)}</span>'
        mb = lambda a: "—" if not a or not a.size_bytes else f"{a.size_bytes / 1e6:.2f} MB"  # noqa: E731
        met = lambda a: "—" if not a or a.metric is None else f"{a.metric:.4f}"  # noqa: E731
        cells = [_e(r.name), st, _e(r.device), _ms(fp), _ms(op),
                 _speed(r), mb(fp), mb(op), met(fp), met(op),
                 "—" if r.metric_drop is None else f"{r.metric_drop:+.4f}", _e(op.precision if op else None)]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        if r.reason:
            out.append(f'<tr><td colspan="{len(head)}"><pre>{_e(r.reason)}</pre></td></tr>')
        if r.timing and r.timing.noisy:
            out.append(f'<tr><td colspan="{len(head)}" class="na">noisy timing: {_e("; ".join(r.timing.noise))}'
                       f' (speed-up is the median over {r.timing.rounds} interleaved rounds; gates use the '
                       f'lower bound of its 95 % interval)</td></tr>')
    out.append("</table>")
    return "\n".join(out)


def _speed(r) -> str:
    """The speed-up with its 95 % interval; a noisy one marked."""
    text = speed_text(r)
    if not text:
        return "—"
    return _e(text).replace(" noisy", ' <span class="na">noisy</span>')


def gates_table(results: list, title: str) -> str:
    if not results:
        return ""
    out = [f"<h2>{_e(title)}</h2>", '<table><tr><th>target</th><th>gate</th><th>what</th><th>value</th>'
           "<th>limit</th><th>result</th></tr>"]
    for g in map(GateResult.model_validate, results):
        res = {True: '<span class="ok">pass</span>', False: '<span class="bad">FAIL</span>',
               None: f'<span class="na">not judged: {_e(g.note)}</span>'}[g.passed]
        out.append(f"<tr><td>{_e(g.target)}</td><td>{_e(g.gate)}</td><td>{_e(g.what)}</td>"
                   f"<td>{_e(g.value)}</td><td>{_e(g.limit)}</td><td>{res}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def render(doc: Report) -> str:
    m, mach, ev = doc.model, doc.machine, doc.eval
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
        f"<p>Latency: batch 1, timed runs after warm-up, on {_e(mach.cpu)} ({mach.cores} cores, "
        f"{_e(mach.os)}); a target's artifacts are timed in interleaved rounds, speedup = median over "
        f"rounds of fp32 p50 / optimized p50 [95 % interval]. 'drop' = fp32 PyTorch metric − optimized "
        f"artifact metric.</p>",
        table(doc),
        gates_table(doc.gates, "Gates"),
        gates_table((doc.baseline or {}).get("results") or [], "Regressions vs baseline"),
        "<h2>Plots</h2>", fig_html,
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def write(doc: Report, out: Path) -> None:
    (Path(out) / "report.html").write_text(render(doc), encoding="utf-8")

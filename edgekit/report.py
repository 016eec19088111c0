"""report.json (the contract release pipelines read) and report.md (what a person reads)."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

SCHEMA = "edgekit.report/1"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write(doc: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "report.md").write_text(markdown(doc))
    from edgekit import report_html

    report_html.write(doc, out)


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f} MB"


def _ms(side: dict | None) -> str:
    if not side:
        return "—"
    lat = side.get("latency_ms")
    return f"{lat['p50']:.2f}" if lat else "not measured"


def _metric(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def summary_line(row: dict) -> str:
    fp, op = row["fp32"], row["optimized"]
    speed = f"{row['speedup_p50']:.2f}x faster" if row["speedup_p50"] else (op["latency_reason"] or "")
    return (f"p50 {_ms(fp)} -> {_ms(op)} ms ({speed}), size {_mb(fp['size_bytes'])} -> {_mb(op['size_bytes'])}, "
            f"metric {_metric(fp['metric'])} -> {_metric(op['metric'])} (drop {row['metric_drop']:+.4f})")


def table(doc: dict) -> str:
    head = ("| target | status | device | p50 fp32 → opt (ms) | speedup | size fp32 → opt | "
            f"{doc['eval']['metric']} fp32 → opt | drop | precision |")
    lines = [head, "|" + "---|" * 9]
    for r in doc["targets"]:
        fp, op = r["fp32"] or {}, r["optimized"] or {}
        status = "✅ ok" if r["status"] == "ok" else f"❌ {r['status']}"
        speed = f"**{r['speedup_p50']:.2f}×**" if r["speedup_p50"] else "—"
        drop = "—" if r["metric_drop"] is None else f"{r['metric_drop']:+.4f}"
        lines.append(
            f"| {r['name']} | {status} | {r['device']} | {_ms(fp)} → {_ms(op)} | {speed} | "
            f"{_mb(fp.get('size_bytes'))} → {_mb(op.get('size_bytes'))} | "
            f"{_metric(fp.get('metric'))} → {_metric(op.get('metric'))} | {drop} | {op.get('precision', '—')} |")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    m, mach, ev = doc["model"], doc["machine"], doc["eval"]
    out = [
        f"# edgekit report: {m['name']}",
        "",
        f"{m['params'] / 1e6:.2f} M params, {m['macs'] / 1e6:.1f} M MACs per sample · "
        f"{ev['metric']} on {ev['n']} held-out samples (fp32 PyTorch: {ev['fp32_torch']:.4f}) · "
        f"calibration: {doc['calibration']['n']} samples",
        "",
        table(doc),
        "",
        f"Latency: batch 1, p50 of timed runs after warm-up, on {mach['cpu']} ({mach['cores']} cores, "
        f"{mach['os']}); threads per target below. 'drop' = fp32 PyTorch metric − optimized artifact metric.",
        "",
    ]
    if doc.get("gates"):
        out += ["## Gates", ""]
        for g in doc["gates"]:
            mark = {True: "✅", False: "❌", None: "⚠️"}[g["passed"]]
            val = "not judged: " + g.get("note", "") if g["value"] is None else f"{g['value']:g}"
            out.append(f"- {mark} `{g['target']}` {g['gate']} = {g['limit']:g}: {g['what']} = {val}")
        out.append("")
    if doc.get("baseline"):
        out += [f"## Regressions vs baseline ({doc['baseline']['path']})", ""]
        for g in doc["baseline"]["results"]:
            mark = {True: "✅", False: "❌", None: "⚠️"}[g["passed"]]
            val = "not judged: " + g.get("note", "") if g["value"] is None else f"{g['value']:g}"
            out.append(f"- {mark} `{g['target']}` {g['gate']}: {g['what']} = {val} (limit {g['limit']:g})")
        out.append("")
    out += ["## Targets", ""]
    for r in doc["targets"]:
        out.append(f"### {r['name']} ({r['backend']}, {r['device']}, {r['threads']} thread(s))")
        if r["reason"]:
            out += ["", "```", r["reason"], "```"]
        sides = [(k, r.get(k)) for k in ("fp32", "optimized")] + sorted((r.get("extras") or {}).items())
        for kind, a in sides:
            if not a:
                continue
            lat = a["latency_ms"]
            lat_s = (f"p50 {lat['p50']:.3f} / p90 {lat['p90']:.3f} / p99 {lat['p99']:.3f} ms (n={lat['n']})"
                     if lat else a["latency_reason"] or "not measured")
            f = a["fidelity"]
            out.append(f"- **{kind}** `{a['artifact']}` ({a['precision']}): {_mb(a['size_bytes'])}, {lat_s}, "
                       f"load {a['load_ms']:.0f} ms, peak RSS {a['peak_rss_mb']:.0f} MB; fidelity to fp32 "
                       f"torch: cosine {f['cosine']:.4f}, top-1 agreement {f['top1_agreement']:.1%}")
        out.append("")
    return "\n".join(out)

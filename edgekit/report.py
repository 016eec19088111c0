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


def prune_effect(row: dict) -> None:
    """Add to ``row["prune"]`` what pruning did on this target's runtime: the metric after quantization
    and the latency of the pruned int8 artifact vs the unpruned int8 one (extra ``int8_unpruned``)."""
    pr, op = row["prune"], row["optimized"]
    pr["metric_after_quantize"] = op["metric"]
    base = (row.get("extras") or {}).get("int8_unpruned")
    if base:
        pr["int8_unpruned_metric"] = base["metric"]
        if base["latency_ms"] and op["latency_ms"]:
            pr["latency_p50_ms"] = {"int8_unpruned": base["latency_ms"]["p50"], "pruned_int8": op["latency_ms"]["p50"]}
            pr["speedup_vs_int8_unpruned"] = round(base["latency_ms"]["p50"] / op["latency_ms"]["p50"], 3)


def prune_markdown(row: dict, metric: str) -> list[str]:
    pr = row["prune"]
    f = lambda k: _metric(pr.get(k))  # noqa: E731
    heads = [w for w in pr["widths"] if w["kind"] == "heads"]
    chans = [w for w in pr["widths"] if w["kind"] == "channels"]
    lines = [f"- **pruning** (ratio {pr['ratio']}, per tower {pr['ratios'] or '—'}, widths multiples of "
             f"{pr['round_to']}, {pr['recover_steps']} distillation steps): params {pr['params_before'] / 1e6:.2f} M → "
             f"{pr['params_after'] / 1e6:.2f} M, MACs {pr['macs_before'] / 1e6:.1f} M → {pr['macs_after'] / 1e6:.1f} M"
             + (f" (MACs budget {pr['macs_budget']:g}: ratios ×{pr['ratio_scale']:g})" if pr.get("macs_budget") else "")
             + f"; {metric} in torch: pruned {f('metric_after_prune')} → recovered "
             f"{f('metric_after_recovery')} → quantized {f('metric_after_quantize')}"]
    if pr.get("latency_p50_ms"):
        lat = pr["latency_p50_ms"]
        lines.append(f"- pruning's latency effect here (same quantization options): int8 unpruned p50 "
                     f"{lat['int8_unpruned']:.3f} ms → pruned int8 {lat['pruned_int8']:.3f} ms "
                     f"(**{pr['speedup_vs_int8_unpruned']:.2f}×**)")
    if heads:
        lines.append("- heads kept: " + ", ".join(f"`{w['layer']}` {w['before']}→{w['after']}" for w in heads))
    if chans:
        lines.append("- widths: " + ", ".join(f"`{w['layer']}` {w['before']}→{w['after']} ({w['tower']})"
                                              for w in chans))
    if pr.get("protected"):
        lines.append("- kept whole (protected): " + ", ".join(f"{n} × {why}" for why, n in pr["protected"].items()))
    return lines


def table(doc: dict) -> str:
    head = ("| target | status | device | p50 fp32 → opt (ms) | speedup | size fp32 → opt | "
            f"{doc['eval']['metric']} fp32 → opt | drop | precision |")
    lines = [head, "|" + "---|" * 9]
    for r in doc["targets"]:
        fp, op = r["fp32"] or {}, r["optimized"] or {}
        status = "✅ ok" if r["status"] == "ok" else f"❌ {r['status']}"
        speed = f"**{r['speedup_p50']:.2f}×**" if r["speedup_p50"] else "—"
        drop = "—" if r["metric_drop"] is None else f"{r['metric_drop']:+.4f}"
        measured = any((r.get(k) or {}).get("latency_ms") for k in ("fp32", "optimized"))
        lines.append(
            f"| {r['name']} | {status} | {r['device'] if measured else '—'} | {_ms(fp)} → {_ms(op)} | {speed} | "
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
            timed = f" on {a['measured_on']}" if a.get("measured_on") else ""
            rss = "" if a["peak_rss_mb"] is None else f", peak RSS {a['peak_rss_mb']:.0f} MB"
            out.append(f"- **{kind}** `{a['artifact']}` ({a['precision']}): {_mb(a['size_bytes'])}, {lat_s}{timed}, "
                       f"load {a['load_ms']:.0f} ms{rss}; fidelity to fp32 torch (verified on "
                       f"{a.get('verified_on', '?')}): cosine {f['cosine']:.4f}, top-1 agreement "
                       f"{f['top1_agreement']:.1%}")
        if r.get("device_info"):
            d = r["device_info"]
            out.append(f"- device {r['device']}: {d['cpu']} ({d['arch']}, {d['cores']} cores), {d['os']}, "
                       f"python {d['python']}")
        out += search_md(r.get("quantize_search"))
        if r.get("prune"):
            out += prune_markdown(r, doc["eval"]["metric"])
        out.append("")
    return "\n".join(out)


def search_md(qs: dict | None) -> list[str]:
    """The accuracy-aware quantization search of one target (edgekit.quantize_search)."""
    if not qs:
        return []
    n_steps = len(qs["steps"]) - 1
    b, a = qs["before"], qs["after"]
    out = [f"- **quantize search** ({qs['status']}; {qs['metric']} drop budget {qs['max_metric_drop']:g}, scored on "
           f"the first {qs['eval_samples']} evaluation samples, in-process latency estimates): {n_steps} step(s) in "
           f"{qs['search_s']:.0f} s of {qs['time_budget_s']:g} s, stopped: {qs['stopped']}. Drop {b['drop']:+.4f} → "
           f"{a['drop']:+.4f}, latency ~{b['latency_ms']:.2f} → {a['latency_ms']:.2f} ms "
           f"({qs['latency_cost_ms']:+.2f} ms). Kept in float: "
           + (", ".join(f"`{n}`" for n in qs["kept_float"][:20]) + (f" … ({len(qs['kept_float'])} in all)"
              if len(qs["kept_float"]) > 20 else "") if qs["kept_float"] else "nothing")]
    for i, st in enumerate(qs["steps"]):
        mark = " ← chosen" if i == qs["chosen"] else ""
        out.append(f"  - step {i}: {st['step']}: drop {st['drop']:+.4f}, ~{st['latency_ms']:.2f} ms, "
                   f"{len(st['kept_float'])} kept in float{mark}")
    return out

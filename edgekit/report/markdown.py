"""report.md: what a person reads, from the typed report (``edgekit.report.schema``)."""
from __future__ import annotations

from edgekit.report.schema import ArtifactResult, Report, SearchOutcome, TargetRow


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f} MB"


def _ms(side: ArtifactResult | None) -> str:
    if not side:
        return "—"
    return f"{side.p50:.2f}" if side.latency_ms else "not measured"


def _metric(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def speed_text(row: TargetRow, times: str = "×") -> str:
    """``2.17× [2.13–2.20]``: the speed-up and its 95 % interval, ``noisy`` when flagged; "" if none."""
    if not row.speedup_p50:
        return ""
    ci = f" [{row.speedup_ci[0]:.2f}–{row.speedup_ci[1]:.2f}]" if row.speedup_ci else ""
    return f"{row.speedup_p50:.2f}{times}{ci}" + (" noisy" if row.timing and row.timing.noisy else "")


def timing_md(row: TargetRow) -> list[str]:
    """How the target was timed, the conditions, and why it is flagged noisy."""
    t = row.timing
    if not t:
        return []
    c = t.conditions
    where = (f"pinned to core(s) {c['affinity']}" if c.get("pinned") else
             f"cores {c['affinity']}" if c.get("affinity") else "")
    cond = [f"{c.get('threads')} thread(s)", where]
    if c.get("load_before"):
        cond.append(f"load average {c['load_before'][0]:.2f} → {c['load_after'][0]:.2f}")
    if c.get("others_cpu") is not None:
        cond.append(f"other processes {c['others_cpu']:.2f} cores, steal {c.get('steal', 0):.1%}")
    if c.get("freq_mhz_before"):
        cond.append(f"CPU {c['freq_mhz_before'][0]}–{c['freq_mhz_before'][1]} MHz ({c.get('governor') or '?'})")
    ratios = "; ".join(f"{k} {v['median']:.2f}× [{v['ci'][0]:.2f}–{v['ci'][1]:.2f}]" for k, v in t.speedups.items())
    line = (f"- **timing**: {t.method}, {t.rounds} rounds × {c.get('per_round', '?')} calls per artifact "
            f"({', '.join(x for x in cond if x)}); stopped: {t.stopped}. Speed-up over fp32, median of the "
            f"per-round ratios [95 % interval]: {ratios or '—'}")
    out = [line]
    if t.noisy:
        out.append(f"- ⚠️ **noisy timing**: {'; '.join(t.noise)}. The figures above are medians over "
                   f"interleaved rounds; gates use the interval's lower bound.")
    return out


def summary_line(row: TargetRow) -> str:
    fp, op = row.fp32, row.optimized
    noisy = " (noisy timing)" if row.timing and row.timing.noisy else ""
    speed = (f"{speed_text(row, 'x').removesuffix(' noisy')} faster{noisy}" if row.speedup_p50
             else (op.latency_reason or ""))
    return (f"p50 {_ms(fp)} -> {_ms(op)} ms ({speed}), size {_mb(fp.size_bytes)} -> {_mb(op.size_bytes)}, "
            f"metric {_metric(fp.metric)} -> {_metric(op.metric)} (drop {row.metric_drop:+.4f})")


def prune_markdown(row: TargetRow, metric: str) -> list[str]:
    pr = row.prune
    heads = [w for w in pr.widths if w["kind"] == "heads"]
    chans = [w for w in pr.widths if w["kind"] == "channels"]
    budget = getattr(pr, "macs_budget", None)
    lines = [f"- **pruning** (ratio {pr.ratio}, per tower {pr.ratios or '—'}, widths multiples of "
             f"{pr.round_to}, {pr.recover_steps} distillation steps): params {pr.params_before / 1e6:.2f} M → "
             f"{pr.params_after / 1e6:.2f} M, MACs {pr.macs_before / 1e6:.1f} M → {pr.macs_after / 1e6:.1f} M"
             + (f" (MACs budget {budget:g}: ratios ×{pr.ratio_scale:g})" if budget else "")
             + f"; {metric} in torch: pruned {_metric(pr.metric_after_prune)} → recovered "
             f"{_metric(pr.metric_after_recovery)} → quantized {_metric(pr.metric_after_quantize)}"]
    if pr.latency_p50_ms:
        lat = pr.latency_p50_ms
        lines.append(f"- pruning's latency effect here (same quantization options): int8 unpruned p50 "
                     f"{lat['int8_unpruned']:.3f} ms → pruned int8 {lat['pruned_int8']:.3f} ms "
                     f"(**{pr.speedup_vs_int8_unpruned:.2f}×**"
                     + (f" [{pr.speedup_vs_int8_unpruned_ci[0]:.2f}–{pr.speedup_vs_int8_unpruned_ci[1]:.2f}]"
                        if pr.speedup_vs_int8_unpruned_ci else "") + ")")
    if heads:
        lines.append("- heads kept: " + ", ".join(f"`{w['layer']}` {w['before']}→{w['after']}" for w in heads))
    if chans:
        lines.append("- widths: " + ", ".join(f"`{w['layer']}` {w['before']}→{w['after']} ({w['tower']})"
                                              for w in chans))
    if pr.protected:
        lines.append("- kept whole (protected): " + ", ".join(f"{n} × {why}" for why, n in pr.protected.items()))
    if pr.low_rank:
        lr = pr.low_rank
        done = [r for r in lr["layers"] if r.get("params_after")]
        lines.append(f"- **low-rank factorization** (energy kept: {lr['energies'] or lr['energy']}): {len(done)} of "
                     f"{len(lr['layers'])} layers, MACs {lr['macs_before'] / 1e6:.1f} M → {lr['macs_after'] / 1e6:.1f} M, "
                     f"params {lr['params_before'] / 1e6:.2f} M → {lr['params_after'] / 1e6:.2f} M; {metric} in torch "
                     f"after factorization {_metric(lr.get('metric_after_factorization'))}")
        if lr.get("speedup_vs_unfactorized_int8"):
            lat, ci = lr["latency_p50_ms"], lr.get("speedup_vs_unfactorized_int8_ci")
            lines.append(f"- factorization's latency effect here (`{lr['reference']}`, same quantization options, same "
                         f"rounds): unfactorized int8 p50 {lat['unfactorized_int8']:.3f} ms → factorized int8 "
                         f"{lat['factorized_int8']:.3f} ms (**{lr['speedup_vs_unfactorized_int8']:.2f}×**"
                         + (f" [{ci[0]:.2f}–{ci[1]:.2f}]" if ci else "") + ")")
        if done:
            lines.append("- ranks: " + ", ".join(f"`{r['layer']}` {r['shape'][0]}×{r['shape'][1]} → rank {r['rank']} "
                                                 f"({r['kept_energy']:.1%} energy)" for r in done))
        left = [r for r in lr["layers"] if not r.get("params_after")]
        if left:
            lines.append("- left alone: " + ", ".join(f"`{r['layer']}` ({r['skipped']})" for r in left[:10])
                         + (f" … ({len(left)} in all)" if len(left) > 10 else ""))
    return lines


def table(doc: Report) -> str:
    head = ("| target | status | device | p50 fp32 → opt (ms) | speedup | size fp32 → opt | "
            f"{doc.eval.metric} fp32 → opt | drop | precision |")
    lines = [head, "|" + "---|" * 9]
    for r in doc.targets:
        fp, op = r.fp32, r.optimized
        status = "✅ ok" if r.status == "ok" else f"❌ {r.status}"
        speed = "—"
        if r.speedup_p50:
            noisy = bool(r.timing and r.timing.noisy)
            speed = f"**{speed_text(r).removesuffix(' noisy')}**" + (" ⚠️ noisy" if noisy else "")
        drop = "—" if r.metric_drop is None else f"{r.metric_drop:+.4f}"
        measured = any(a is not None and a.latency_ms for a in (fp, op))
        lines.append(
            f"| {r.name} | {status} | {r.device if measured else '—'} | {_ms(fp)} → {_ms(op)} | {speed} | "
            f"{_mb(fp and fp.size_bytes)} → {_mb(op and op.size_bytes)} | "
            f"{_metric(fp and fp.metric)} → {_metric(op and op.metric)} | {drop} | {op.precision if op else '—'} |")
    return "\n".join(lines)


def _gate_line(g, baseline: bool) -> str:
    mark = {True: "✅", False: "❌", None: "⚠️"}[g.passed]
    val = "not judged: " + (g.note or "") if g.value is None else f"{g.value:g}"
    if g.basis:
        val += f" ({g.basis})"
    if baseline:
        return f"- {mark} `{g.target}` {g.gate}: {g.what} = {val} (limit {g.limit:g})"
    return f"- {mark} `{g.target}` {g.gate} = {g.limit:g}: {g.what} = {val}"


def markdown(doc: Report) -> str:
    m, ev = doc.model, doc.eval
    out = [
        f"# edgekit report: {m.name}",
        "",
        f"{m.params / 1e6:.2f} M params, {m.macs / 1e6:.1f} M MACs per sample · "
        f"{ev.metric} on {ev.n} held-out samples (fp32 PyTorch: {ev.fp32_torch:.4f}) · "
        f"calibration: {doc.calibration['n']} samples",
        "",
        table(doc),
        "",
        f"Latency: batch 1, p50 of timed runs after warm-up, on {latency_host(doc)}; threads per target below. "
        f"A target's artifacts are timed in interleaved rounds; "
        f"speedup = median over rounds of fp32 p50 / optimized p50, [95 % interval]. "
        f"'drop' = fp32 PyTorch metric − optimized artifact metric.",
        "",
    ]
    if doc.gates:
        out += ["## Gates", "", *(_gate_line(g, False) for g in doc.gates), ""]
    if doc.baseline:
        from edgekit.report.schema import GateResult

        out += [f"## Regressions vs baseline ({doc.baseline['path']})", "",
                *(_gate_line(GateResult.model_validate(g), True) for g in doc.baseline["results"]), ""]
    out += ["## Targets", ""]
    for r in doc.targets:
        out.append(f"### {r.name} ({r.backend}, {r.device}, {r.threads} thread(s))")
        if r.reason:
            out += ["", "```", r.reason, "```"]
        for kind, a in r.artifacts():
            lat = a.latency_ms
            lat_s = (f"p50 {lat.p50:.3f} / p90 {lat.p90:.3f} / p99 {lat.p99:.3f} ms (n={lat.n})"
                     if lat else a.latency_reason or "not measured")
            f = a.fidelity
            timed = f" on {a.measured_on}" if a.measured_on else ""
            rss = "" if a.peak_rss_mb is None else f", peak RSS {a.peak_rss_mb:.0f} MB"
            out.append(f"- **{kind}** `{a.artifact}` ({a.precision}): {_mb(a.size_bytes)}, {lat_s}{timed}, "
                       f"load {a.load_ms:.0f} ms{rss}; fidelity to fp32 torch (verified on "
                       f"{a.verified_on or '?'}): cosine {f.cosine:.4f}, top-1 agreement "
                       f"{f.top1_agreement:.1%}")
            out += rescues_md(a.details) + arm_md(a.arm, ev.metric)
        if r.device_info:
            d = r.device_info
            out.append(f"- device {r.device}: {d['cpu']} ({d['arch']}, {d['cores']} cores), {d['os']}, "
                       f"python {d['python']}")
        out += timing_md(r)
        out += search_md(r.quantize_search)
        if r.prune:
            out += prune_markdown(r, ev.metric)
        out.append("")
    return "\n".join(out)


def arm_md(c, metric: str) -> list[str]:
    """The check on an emulated aarch64 core (edgekit.measure.arm)."""
    if c is None:
        return []
    if c.status == "skipped":
        return [f"  - aarch64 check ({c.device}) skipped: {c.reason}"]
    line = (f"  - on aarch64 ({c.device}, {c.runtime}): {c.samples} of {c.of} evaluation samples in {c.seconds:.0f} s: "
            f"{metric} {c.metric:.4f} (host {c.host_metric:.4f} on the same samples); against the host's outputs: "
            f"top-1 agreement {c.top1_agreement:.1%}, max |Δ| {c.max_abs_diff:.3g} = {c.relative_diff:.2%} of the "
            f"output range, rms(Δ) {c.noise_ratio:.2f}× the artifact's own rms error against fp32 (fails over "
            f"{c.tolerance:g} when max |Δ| > {c.floor:.0%}): **{c.status}**")
    return [line + (f". {c.reason}" if c.reason else "")]


def rescues_md(details: dict) -> list[str]:
    """What the conversion-error rescue (edgekit.quantize.rescue) kept in float, and the toolchain's reason;
    which modules were exported through an exact rewrite (edgekit.inputs.exportable)."""
    out = [f"  - kept in float after a conversion error: {', '.join(f'`{u}`' for u in r['kept_float'])}, because "
           f"the toolchain said: `{r['because']}`" for r in details.get("conversion_rescues", [])]
    if details.get("exact_rewrites"):
        w = details["exact_rewrites"]
        out.append(f"  - exported through an exact rewrite of {', '.join(f'`{m}`' for m in w['modules'])} (the "
                   f"toolchain cannot convert `aten.{', aten.'.join(w['ops'])}`)")
    return out


def search_md(qs: SearchOutcome | None) -> list[str]:
    """The accuracy-aware quantization search of one target (edgekit.quantize.search)."""
    if not qs:
        return []
    n_steps = len(qs.steps) - 1
    b, a = qs.before, qs.after
    kept = qs.kept_float
    out = [f"- **quantize search** ({qs.status}; {qs.metric} drop budget {qs.max_metric_drop:g}, scored on "
           f"the first {qs.eval_samples} evaluation samples, in-process latency estimates): {n_steps} step(s) in "
           f"{qs.search_s:.0f} s of {qs.time_budget_s:g} s, stopped: {qs.stopped}. Drop {b['drop']:+.4f} → "
           f"{a['drop']:+.4f}, latency ~{b['latency_ms']:.2f} → {a['latency_ms']:.2f} ms "
           f"({qs.latency_cost_ms:+.2f} ms). Kept in float: "
           + (", ".join(f"`{n}`" for n in kept[:20]) + (f" … ({len(kept)} in all)" if len(kept) > 20 else "")
              if kept else "nothing")]
    for i, st in enumerate(qs.steps):
        mark = " ← chosen" if i == qs.chosen else ""
        out.append(f"  - step {i}: {st.step}: drop {st.drop:+.4f}, ~{st.latency_ms:.2f} ms, "
                   f"{len(st.kept_float)} kept in float{mark}")
    return out


def latency_host(doc: Report) -> str:
    """Where latency was taken: this machine, or (on a cluster) the node each row names."""
    if doc.cluster:
        return f"the node each row's device names (Ray cluster {doc.cluster})"
    mach = doc.machine
    return f"{mach.cpu} ({mach.cores} cores, {mach.os})"

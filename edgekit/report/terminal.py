"""The summary a person reads at the end of a run in the terminal: one aligned table (no Markdown), the
best target within its gates marked, then where the reports are. Colour only on a terminal."""
from __future__ import annotations

import sys
from typing import Optional

from edgekit.report.schema import GateResult, Report, TargetRow

_GREEN, _RED, _YELLOW, _BOLD, _RESET = "\033[32m", "\033[31m", "\033[33m", "\033[1m", "\033[0m"


def best(doc: Report, results: list[GateResult]) -> Optional[str]:
    """The ok target with no failed gate and the largest speed-up (lower bound of its interval first)."""
    failed = {g.target for g in results if g.passed is False}
    ok = [r for r in doc.targets if r.status == "ok" and r.name not in failed and r.speedup_p50]
    if not ok:
        return None
    return max(ok, key=lambda r: ((r.speedup_ci or [r.speedup_p50])[0], r.speedup_p50)).name


def table(doc: Report, results: list[GateResult], colour: Optional[bool] = None) -> str:
    colour = sys.stdout.isatty() if colour is None else colour
    top = best(doc, results)
    head = ["target", "status", "p50 fp32 → opt", "speed-up [95 % CI]", "size fp32 → opt",
            f"{doc.eval.metric} drop", "gates", ""]
    rows = []
    for r in doc.targets:
        fp, op = r.fp32, r.optimized
        bad = [g.gate for g in results if g.target == r.name and g.passed is False]
        n = sum(1 for g in results if g.target == r.name and g.passed is not None)
        rows.append([
            r.name,
            "ok" if r.status == "ok" else r.status.upper(),
            _lat(fp, op),
            _speed(r),
            f"{_mb(fp and fp.size_bytes)} → {_mb(op and op.size_bytes)}",
            "—" if r.metric_drop is None else f"{r.metric_drop:+.4f}",
            ("FAILED " + ", ".join(bad)) if bad else (f"{n} passed" if n else "—"),
            "★ best" if r.name == top else "",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def line(cells, style=None):
        text = "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        return f"{style}{text}{_RESET}" if colour and style else text

    out = [line(head, _BOLD), line(["─" * w for w in widths])]
    for r, cells in zip(doc.targets, rows):
        style = _RED if r.status != "ok" or cells[6].startswith("FAILED") else (
            _YELLOW if r.timing and r.timing.noisy else _GREEN if cells[7] else None)
        out.append(line(cells, style))
    notes = [f"  {r.name}: noisy timing ({'; '.join(r.timing.noise)})" for r in doc.targets
             if r.timing and r.timing.noisy]
    if notes:
        out += ["", "speed-ups marked noisy were timed while the machine was busy:", *notes]
    return "\n".join(out)


def _mb(n) -> str:
    return "—" if not n else f"{n / 1e6:.1f} MB"


def _lat(fp, op) -> str:
    def ms(a):
        return f"{a.p50:.2f}" if a and a.latency_ms else "—"
    if not (fp and fp.latency_ms) and not (op and op.latency_ms):
        reason = (op or fp).latency_reason if (op or fp) else None
        return "not measured" if reason else "—"
    return f"{ms(fp)} → {ms(op)} ms"


def _speed(r: TargetRow) -> str:
    if not r.speedup_p50:
        return "—"
    ci = f" [{r.speedup_ci[0]:.2f}–{r.speedup_ci[1]:.2f}]" if r.speedup_ci else ""
    return f"{r.speedup_p50:.2f}×{ci}" + (" noisy" if r.timing and r.timing.noisy else "")

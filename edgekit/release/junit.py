"""JUnit XML for CI test reporters (``edgekit ci --junit FILE``) and a Markdown job summary.

JUnit: one ``<testcase>`` per target x gate (``classname`` = ``edgekit.<target>``, ``name`` = gate);
a failed gate is a ``<failure>`` whose message names target, gate, value and limit; a gate that could
not be judged (not measured, target failed) is ``<skipped>``; a failed target adds a ``build`` test
case with an ``<error>`` carrying its reason.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from edgekit.report.markdown import table
from edgekit.report.schema import GateResult, Report


def _fmt(x) -> str:
    return "—" if x is None else (f"{x:g}" if isinstance(x, (int, float)) else str(x))


def message(g: GateResult) -> str:
    basis = f" ({g.basis})" if g.basis else ""
    return f"{g.target}: gate {g.gate} failed: {g.what} = {_fmt(g.value)}, limit {_fmt(g.limit)}{basis}"


def xml(doc: Report, results: list[GateResult]) -> str:
    suite = ET.Element("testsuite", name=f"edgekit {doc.model.name}")
    n = fails = errors = skipped = 0
    for row in doc.targets:
        if row.status == "failed" and not row.budget_missed:  # a missed budget fails its gate case
            tc = ET.SubElement(suite, "testcase", classname=f"edgekit.{row.name}", name="build")
            ET.SubElement(tc, "error", message=f"{row.name}: target failed: "
                          f"{row.reason.splitlines()[0] if row.reason else ''}").text = row.reason
            n, errors = n + 1, errors + 1
    for g in results:
        tc = ET.SubElement(suite, "testcase", classname=f"edgekit.{g.target}", name=g.gate)
        n += 1
        if g.passed is False:
            fails += 1
            ET.SubElement(tc, "failure", message=message(g)).text = message(g)
        elif g.passed is None:
            skipped += 1
            ET.SubElement(tc, "skipped", message=f"{g.target}: {g.gate} not judged: {g.note or ''}")
        else:
            ET.SubElement(tc, "system-out").text = (f"{g.what} = {_fmt(g.value)}, limit {_fmt(g.limit)}"
                                                    + (f" ({g.basis})" if g.basis else ""))
    suite.set("tests", str(n))
    suite.set("failures", str(fails))
    suite.set("errors", str(errors))
    suite.set("skipped", str(skipped))
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write(path: str | Path, doc: Report, results: list[GateResult]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(xml(doc, results))


def summary(doc: Report, results: list[GateResult], exit_code: int) -> str:
    """Markdown for a CI job summary ($GITHUB_STEP_SUMMARY): verdict, failed gates first, the table."""
    verdict = {0: "✅ passed", 1: "❌ a gate failed", 3: "❌ a target failed"}.get(exit_code, f"exit {exit_code}")
    bad = [g for g in results if g.passed is False]
    unjudged = [g for g in results if g.passed is None]
    lines = [f"## edgekit ci: {doc.model.name} — {verdict}", ""]
    for r in doc.targets:
        if r.status == "failed":
            lines.append(f"- ❌ **{r.name}** failed: {(r.reason or '').splitlines()[0]}")
    for g in bad:
        lines.append(f"- ❌ **{g.target}** `{g.gate}`: {g.what} = {_fmt(g.value)} (limit {_fmt(g.limit)})")
    if lines[-1] != "":
        lines.append("")
    lines += [table(doc), ""]
    lines += ["| target | gate | value | limit | |", "|---|---|---|---|---|"]
    for g in results:
        mark = {True: "✅", False: "❌", None: "⚠️ " + (g.note or "not judged")}[g.passed]
        lines.append(f"| {g.target} | {g.gate} | {_fmt(g.value)} | {_fmt(g.limit)} | {mark} |")
    lines.append("")
    lines.append(f"{len(results)} gate checks: {sum(g.passed is True for g in results)} passed, "
                 f"{len(bad)} failed, {len(unjudged)} not judged.")
    return "\n".join(lines) + "\n"

"""The summary across the recipes of one ``edgekit run a.toml b.toml`` call: one line per model x target
(``matrix.json``, schema ``edgekit.matrix/1``, and ``matrix.md``), next to each recipe's own report."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

SCHEMA = "edgekit.matrix/1"


def rows(entries: list[dict]) -> list[dict]:
    """``entries``: {"recipe", "out", "report" (a Report) or "error" (str), "seconds"} per recipe."""
    out = []
    for e in entries:
        doc = e.get("report")
        if doc is None:
            out.append({"recipe": e["recipe"], "model": None, "target": None, "status": "error",
                        "reason": e["error"], "report": None})
            continue
        for t in doc.targets:
            out.append({"recipe": e["recipe"], "model": doc.model.name, "target": t.name, "status": t.status,
                        "reason": t.reason, "device": t.device, "metric_drop": t.metric_drop,
                        "speedup_p50": t.speedup_p50, "speedup_ci": t.speedup_ci, "size_ratio": t.size_ratio,
                        "optimized_p50_ms": t.optimized.p50 if t.optimized else None,
                        "report": str(Path(e["out"]) / "report.json")})
    return out


def write(folder: Path, entries: list[dict], cluster: Optional[str], seconds: float) -> tuple[Path, Path]:
    """Write ``matrix.json`` and ``matrix.md`` into ``folder`` (each atomically); return their paths."""
    from edgekit import __version__
    from edgekit.report import now

    table = rows(entries)
    doc = {"schema": SCHEMA, "edgekit_version": __version__, "created": now(), "cluster": cluster,
           "seconds": round(seconds, 1),
           "recipes": [{"recipe": e["recipe"], "out": str(e["out"]), "seconds": round(e["seconds"], 1),
                        **({"error": e["error"]} if "error" in e else {})} for e in entries],
           "rows": table}
    folder.mkdir(parents=True, exist_ok=True)
    js, md = folder / "matrix.json", folder / "matrix.md"
    _atomic(js, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    _atomic(md, markdown(doc))
    return js, md


def markdown(doc: dict) -> str:
    where = f"on the Ray cluster {doc['cluster']}" if doc["cluster"] else "on this machine"
    lines = [f"# edgekit matrix: {len(doc['recipes'])} recipes, {doc['seconds']:.0f} s {where}", "",
             "| model | target | status | metric drop | speed-up (p50, 95 % interval) | size ratio | measured on |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if r["status"] == "error":
            lines.append(f"| {r['recipe']} | - | error | {r['reason'].splitlines()[0]} | | | |")
            continue
        sp = "not measured" if r["speedup_p50"] is None else f"{r['speedup_p50']:.2f}x" + (
            f" [{r['speedup_ci'][0]:.2f}-{r['speedup_ci'][1]:.2f}]" if r.get("speedup_ci") else "")
        drop = "" if r["metric_drop"] is None else f"{r['metric_drop']:+.4f}"
        size = "" if r["size_ratio"] is None else f"{r['size_ratio']:.2f}"
        status = r["status"] + (f": {r['reason'].splitlines()[0][:120]}" if r["status"] != "ok" and r["reason"] else "")
        lines.append(f"| {r['model']} | {r['target']} | {status} | {drop} | {sp} | {size} | {r['device']} |")
    lines += ["", "Each recipe's own report: " + ", ".join(f"`{r['out']}/report.html`" for r in doc["recipes"]
                                                       if "error" not in r), ""]
    return "\n".join(lines)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)

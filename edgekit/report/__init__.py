"""The run's outputs: report.json (the contract, ``schema``), report.md (``markdown``), report.html
(``html``) and manifest.json (``manifest``)."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from edgekit.report.schema import SCHEMA, Report

__all__ = ["SCHEMA", "Report", "now", "write"]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write(doc: Report, out: Path) -> None:
    from edgekit.report import html, markdown

    (out / "report.json").write_text(doc.dumps())
    (out / "report.md").write_text(markdown.markdown(doc))
    html.write(doc, out)

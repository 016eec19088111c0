"""``manifest.json``: what was shipped, byte for byte — written next to ``artifacts/`` by every run.

Per artifact: every file's sha256 and size, the input/output signature (names, dtypes, shapes, and
for quantized tensor I/O the scale / zero point) as the runtime that loads it sees it, the precision
and quantization settings; plus the recipe's sha256, the model's content digest, edgekit's and each
toolchain's versions. No timestamps: two runs that built the same bytes write the same manifest.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgekit.report.schema import Report

SCHEMA = "edgekit.manifest/1"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build(doc: Report, out: Path) -> dict:
    arts = []
    for row in doc.targets:
        for kind, a in row.artifacts():
            arts.append({
                "target": row.name, "kind": kind, "backend": row.backend, "path": a.artifact,
                "precision": a.precision, "quantization": a.details,
                "files": [{"path": f, "sha256": sha256(out / f), "size_bytes": (out / f).stat().st_size}
                          for f in a.files],
                "io": a.io,
            })
    return {
        "schema": SCHEMA,
        "edgekit_version": doc.edgekit_version,
        "recipe": doc.recipe,
        "model": doc.model.model_dump(mode="json", include={"name", "source", "params", "inputs"}),
        "toolchains": {r.name: r.versions for r in doc.targets},
        "artifacts": arts,
    }


def write(doc: Report, out: Path) -> dict:
    man = build(doc, out)
    (out / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    return man


def verify(out: Path) -> list[str]:
    """Files whose bytes no longer match the manifest (empty list: all match)."""
    man = json.loads((out / "manifest.json").read_text())
    bad = []
    for a in man["artifacts"]:
        for f in a["files"]:
            p = out / f["path"]
            if not p.is_file() or sha256(p) != f["sha256"]:
                bad.append(f["path"])
    return bad

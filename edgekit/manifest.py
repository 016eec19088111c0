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

import numpy as np

SCHEMA = "edgekit.manifest/1"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build(doc: dict, out: Path) -> dict:
    arts = []
    for row in doc["targets"]:
        sides = [(k, row.get(k)) for k in ("fp32", "optimized")] + sorted((row.get("extras") or {}).items())
        for kind, a in sides:
            if not a:
                continue
            arts.append({
                "target": row["name"], "kind": kind, "backend": row["backend"], "path": a["artifact"],
                "precision": a["precision"], "quantization": a.get("details") or {},
                "files": [{"path": f, "sha256": sha256(out / f), "size_bytes": (out / f).stat().st_size}
                          for f in a["files"]],
                "io": a.get("io"),
            })
    return {
        "schema": SCHEMA,
        "edgekit_version": doc["edgekit_version"],
        "recipe": doc.get("recipe"),
        "model": {k: doc["model"].get(k) for k in ("name", "source", "params", "inputs")},
        "toolchains": {r["name"]: r.get("versions") for r in doc["targets"]},
        "artifacts": arts,
    }


def write(doc: dict, out: Path) -> dict:
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


def signature(runner) -> dict | None:
    """The loaded artifact's I/O as its runtime reports it (ONNX Runtime session, OpenVINO compiled
    model, LiteRT signature runner), or None for a runner this does not know."""
    try:
        if hasattr(runner, "sess"):  # ONNX Runtime
            io = lambda ports: [{"name": p.name, "dtype": p.type.removeprefix("tensor(").rstrip(")"),  # noqa: E731
                                 "shape": list(p.shape)} for p in ports]
            return {"inputs": io(runner.sess.get_inputs()), "outputs": io(runner.sess.get_outputs())}
        if hasattr(runner, "compiled"):  # OpenVINO
            io = lambda ports: [{"name": p.get_any_name(), "dtype": p.get_element_type().get_type_name(),  # noqa: E731
                                 "shape": str(p.get_partial_shape())} for p in ports]
            return {"inputs": io(runner.compiled.inputs), "outputs": io(runner.compiled.outputs)}
        if hasattr(runner, "in_details"):  # LiteRT
            def io(details):
                return [{"name": n, "dtype": np.dtype(d["dtype"]).name, "shape": [int(x) for x in d["shape"]],
                         **({"scale": float(d["quantization"][0]), "zero_point": int(d["quantization"][1])}
                            if d["quantization"][0] else {})} for n, d in details.items()]
            return {"inputs": io(runner.in_details), "outputs": io(runner.out_details)}
    except Exception:  # noqa: BLE001 - a signature is documentation; never fail a target over it
        return None
    return None

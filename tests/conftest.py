"""Shared fixtures: recipes written into tmp_path that point at the shipped tiny example."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_multimodal"
DATA = ROOT / "calibration" / "tiny_multimodal"

INPUTS = """inputs = [
  { name = "image", shape = [1, 3, 32, 32], dtype = "float32", modality = "image" },
  { name = "input_ids", shape = [1, 32], dtype = "int64", modality = "text" },
  { name = "attention_mask", shape = [1, 32], dtype = "int64", modality = "text" },
]"""


def recipe_text(source: str, calib: str, evals: str, metric: str = "cosine", extra: str = "",
                targets: str = '["ort-cpu"]') -> str:
    return f"""targets = {targets}

[model]
source = "{source}"
{INPUTS}

[data]
calibration = "{calib}"
evaluation = "{evals}"
metric = "{metric}"
{extra}
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder with a copy of the tiny model and its data, ready for a recipe."""
    shutil.copy(EXAMPLE / "model.py", tmp_path / "model.py")
    shutil.copy(DATA / "calib.npz", tmp_path / "calib.npz")
    shutil.copy(DATA / "eval.npz", tmp_path / "eval.npz")
    return tmp_path


@pytest.fixture
def write_recipe(workdir: Path):
    def write(text: str | None = None, **kw) -> Path:
        if text is None:
            text = recipe_text(kw.pop("source", "model.py:build"), kw.pop("calib", "calib.npz"),
                               kw.pop("evals", "eval.npz"), **kw)
        p = workdir / "edgekit.toml"
        p.write_text(text)
        return p
    return write


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}

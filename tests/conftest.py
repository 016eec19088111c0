"""Shared fixtures: recipes written into tmp_path that point at the shipped tiny example."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
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


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests never read or fill the user's ~/.cache/edgekit: one fresh cache per test session."""
    import os

    old = os.environ.get("EDGEKIT_CACHE")
    os.environ["EDGEKIT_CACHE"] = str(tmp_path_factory.mktemp("edgekit-cache"))
    yield
    if old is None:
        os.environ.pop("EDGEKIT_CACHE", None)
    else:
        os.environ["EDGEKIT_CACHE"] = old


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


@dataclass
class Built:
    """One target's fp32 and optimized artifacts, built in-process with the real toolchain."""

    backend: object
    runtime: object
    fp32: object
    optimized: object
    evals: list
    reference: np.ndarray
    model: object

    def outputs(self, path: Path, runtime=None, samples=None) -> np.ndarray:
        runner = self.backend.load(path, runtime or self.runtime)
        return np.stack([runner.run(s)[0].reshape(-1) for s in (samples or self.evals)])


def build_target(target: str, folder: Path, n_calib: int, n_eval: int) -> Built:
    from edgekit.backends import get_backend
    from edgekit.inputs.data import load_calibration, load_evaluation
    from edgekit.inputs.model import example_inputs, load_model, reference_outputs
    from edgekit.config.profiles import load_profile
    from edgekit.config.recipe import load_recipe

    (folder / "edgekit.toml").write_text(recipe_text(
        f"{EXAMPLE}/model.py:build", f"{DATA}/calib.npz", f"{DATA}/eval.npz",
        extra=f"max_calibration_samples = {n_calib}\nmax_evaluation_samples = {n_eval}"))
    r = load_recipe(folder / "edgekit.toml")
    prof = load_profile(target)
    backend = get_backend(prof.backend)
    ex, qo, rt = backend.options(prof)
    model = load_model(r)
    calib, evals = load_calibration(r), list(load_evaluation(r))
    fp32 = backend.export_fp32(model, example_inputs(r.model.inputs, calib.sample(0)), r.model.inputs, folder, ex)
    opt = backend.quantize(fp32, calib, folder, qo)
    return Built(backend, rt, fp32, opt, evals, reference_outputs(model, r.model.inputs, evals), model)

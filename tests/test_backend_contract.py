"""Every registered backend through the same checks, with its real toolchain: the contract the rest of
edgekit relies on (edgekit.backends.base). A new backend gets these for free by its registry entry."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

from edgekit.backends import REGISTRY, get_backend
from edgekit.config.profiles import available, load_profile
from edgekit.measure.verify import cosine
from tests.conftest import build_target


def _profile_for(backend: str) -> str:
    """The first shipped profile of this backend that measures on this host."""
    for name in available():
        prof = load_profile(name)
        if prof.backend == backend and prof.arch is None and not get_backend(backend).unmeasurable_reason(
                get_backend(backend).options(prof)[2]):
            return name
    raise AssertionError(f"no host profile for backend {backend}")


@pytest.fixture(scope="module", params=sorted(REGISTRY))
def built(request, tmp_path_factory):
    return request.param, build_target(_profile_for(request.param), tmp_path_factory.mktemp(request.param), 12, 6)


def test_registry_entry_describes_the_toolchain(built):
    name, b = built
    info = REGISTRY[name]
    assert b.backend.info is info and b.backend.name == name
    assert b.fp32.path.suffix == info.suffix == b.optimized.path.suffix
    for mod, dist, what in info.imports:
        assert importlib.metadata.version(dist) and what
        __import__(mod)
    assert set(b.backend.versions()) == set(info.packages) and info.install_hint.startswith("pip install")
    # what load() needs, importable before the timing worker pins itself (edgekit.measure.timing)
    assert b.backend.RUNTIME_MODULES
    b.backend.import_runtime()


def test_artifacts_list_their_files_and_load_into_a_complete_runner(built):
    name, b = built
    for art in (b.fp32, b.optimized):
        assert all(Path(f).is_file() for f in art.files) and art.size_bytes > 0
        assert b.backend.files(art.path) == art.files
        runner = b.backend.load(art.path, b.runtime)
        assert isinstance(runner.device, str) and runner.device
        sig = runner.signature()
        assert [i["name"] for i in sig["inputs"]][:1] and all({"name", "dtype", "shape"} <= set(i) for i in sig["inputs"])
        assert {i["name"] for i in sig["inputs"]} >= {"image", "input_ids", "attention_mask"}
        out = runner.run(b.evals[0])
        assert out[0].dtype == np.float32 and out[0].reshape(-1).shape == b.reference[0].shape
        synth = runner.run(runner.synthetic_feed())
        assert np.isfinite(synth[0]).all()
    assert cosine(b.outputs(b.fp32.path), b.reference) > 0.9999
    assert cosine(b.outputs(b.optimized.path), b.reference) > 0.95


def test_the_search_questions_are_answered_consistently(built):
    name, b = built
    opts = b.backend.options(load_profile(_profile_for(name)))[1]
    for fix in b.backend.quality_fixes(b.fp32, opts):
        assert fix.label and set(fix.update) <= set(type(opts).model_fields)
    ranked = b.backend.rank_activations(b.optimized, _calib(b), 2)
    assert ranked, "no quantized activation ranked"
    dbs = [db for _, db in ranked]
    assert dbs == sorted(dbs) and all(isinstance(u, list) and u for u, _ in ranked)
    units = ranked[0][0]
    kept = b.backend.keep_in_float(opts, units)
    assert set(b.backend.float_units(kept)) == set(b.backend.float_units(opts)) | set(units)
    assert b.backend.keep_in_float(kept, units) == kept    # idempotent
    assert isinstance(b.backend.weights_per_channel(opts), bool)
    every = sorted({x for u, _ in ranked for x in u})
    macs = b.backend.unit_macs(b.optimized, every)
    assert set(macs) <= set(every) and all(isinstance(v, int) and v >= 0 for v in macs.values())
    assert max(macs.values()) > 100_000    # the tiny model's matmuls / convolutions are found and costed


def _calib(b):
    from edgekit.inputs.data import SampleSet

    keys = b.evals[0].keys()
    return SampleSet(Path("calib.npz"), {k: np.concatenate([s[k] for s in b.evals]) for k in keys}, None)

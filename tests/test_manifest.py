"""The shipped data is what the manifest says it is (a changed file without a new manifest fails)."""
import importlib.util
import json

from tests.conftest import ROOT


def test_manifest_matches_files():
    spec = importlib.util.spec_from_file_location("update_manifest", ROOT / "calibration" / "update_manifest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert json.loads((ROOT / "calibration" / "manifest.json").read_text()) == mod.build()

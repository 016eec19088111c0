"""Recipe validation: every bad recipe is exit 2 with a message naming the file and the field."""
from __future__ import annotations

import pytest

from edgekit.errors import InputError
from edgekit.config.recipe import load_recipe
from tests.conftest import recipe_text


def test_good_recipe_resolves_paths_against_its_folder(write_recipe, workdir):
    r = load_recipe(write_recipe())
    assert r.targets == ["ort-cpu"]
    assert [i.name for i in r.model.inputs] == ["image", "input_ids", "attention_mask"]
    assert r.resolve(r.data.calibration) == workdir / "calib.npz"
    assert load_recipe(workdir).path == r.path  # a folder means its edgekit.toml


def test_missing_recipe(tmp_path):
    with pytest.raises(InputError, match=r"nope\.toml: recipe file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_not_toml(write_recipe):
    p = write_recipe("targets = [ort-cpu\n")
    with pytest.raises(InputError, match=r"edgekit\.toml: not valid TOML"):
        load_recipe(p)


def test_unknown_key_is_named(write_recipe):
    p = write_recipe(extra="calibraton_samples = 3")
    with pytest.raises(InputError) as e:
        load_recipe(p)
    assert "data.calibraton_samples: unknown key" in str(e.value)
    assert str(p) in str(e.value)


def test_missing_field_is_named(write_recipe):
    text = recipe_text("model.py:build", "calib.npz", "eval.npz").replace('evaluation = "eval.npz"\n', "")
    with pytest.raises(InputError, match=r"data\.evaluation: missing required field"):
        load_recipe(write_recipe(text))


def test_batch_axis_must_be_one(write_recipe):
    text = recipe_text("model.py:build", "calib.npz", "eval.npz").replace("[1, 3, 32, 32]", "[4, 3, 32, 32]")
    with pytest.raises(InputError, match=r"model\.inputs\.0\.shape: .*batch\) axis must be 1"):
        load_recipe(write_recipe(text))


def test_duplicate_input_names(write_recipe):
    text = recipe_text("model.py:build", "calib.npz", "eval.npz").replace('"input_ids"', '"image"')
    with pytest.raises(InputError, match=r"input names must be unique, repeated: image"):
        load_recipe(write_recipe(text))


def test_bad_metric_and_dtype(write_recipe):
    with pytest.raises(InputError, match=r"data\.metric"):
        load_recipe(write_recipe(metric="accuracy"))
    text = recipe_text("model.py:build", "calib.npz", "eval.npz").replace('"int64"', '"long"', 1)
    with pytest.raises(InputError, match=r"model\.inputs\.1\.dtype"):
        load_recipe(write_recipe(text))


def test_unknown_target(write_recipe):
    from edgekit.orchestrate.pipeline import prepare

    with pytest.raises(InputError, match=r"unknown target 'ort-cpuu'; known targets: .*ort-cpu"):
        prepare(write_recipe(targets='["ort-cpuu"]'), None, None)


def test_per_target_gate_override(write_recipe):
    p = write_recipe(extra="\n[gates]\nmin_speedup = 1.5\n[gates.targets.ort-cpu]\nmin_speedup = 2.0\n")
    r = load_recipe(p)
    assert r.gates.for_target("ort-cpu").min_speedup == 2.0
    assert r.gates.for_target("ort-arm").min_speedup == 1.5

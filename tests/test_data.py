"""The calibration/evaluation .npz contract: each violation is an error naming the file and the input."""
from __future__ import annotations

import numpy as np
import pytest

from edgekit.inputs.data import check_disjoint, load_calibration, load_evaluation
from edgekit.errors import InputError
from edgekit.config.recipe import load_recipe
from tests.conftest import load


def _rewrite(path, **changes):
    arrays = load(path)
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    np.savez(path, **arrays)


def test_shipped_data_follows_the_contract(write_recipe):
    r = load_recipe(write_recipe())
    c, e = load_calibration(r), load_evaluation(r)
    check_disjoint(c, e)
    assert len(c) >= 1 and len(e) >= 1
    s = c.sample(0)
    assert s["image"].shape == (1, 3, 32, 32) and s["input_ids"].dtype == np.int64


def test_missing_input_array(write_recipe, workdir):
    _rewrite(workdir / "calib.npz", attention_mask=None)
    with pytest.raises(InputError, match=r"calibration data .*calib\.npz: no array for model input\(s\) 'attention_mask'"):
        load_calibration(load_recipe(write_recipe()))


def test_extra_array(write_recipe, workdir):
    _rewrite(workdir / "calib.npz", token_type_ids=np.zeros((64, 32), np.int64))
    with pytest.raises(InputError, match=r"array\(s\) 'token_type_ids' match no model input"):
        load_calibration(load_recipe(write_recipe()))


def test_wrong_per_sample_shape(write_recipe, workdir):
    _rewrite(workdir / "calib.npz", image=np.zeros((64, 1, 3, 32, 32), np.float32))
    with pytest.raises(InputError, match=r"input 'image' has per-sample shape \(1, 3, 32, 32\).*recipe says \(3, 32, 32\)"):
        load_calibration(load_recipe(write_recipe()))


def test_wrong_dtype(write_recipe, workdir):
    _rewrite(workdir / "eval.npz", input_ids=load(workdir / "eval.npz")["input_ids"].astype(np.int32))
    with pytest.raises(InputError, match=r"evaluation data .*input 'input_ids' has dtype int32; the recipe says int64"):
        load_evaluation(load_recipe(write_recipe()))


def test_no_samples(write_recipe, workdir):
    a = load(workdir / "calib.npz")
    np.savez(workdir / "calib.npz", **{k: v[:0] for k, v in a.items()})
    with pytest.raises(InputError, match=r"calibration data .*has no samples \(need at least 1\)"):
        load_calibration(load_recipe(write_recipe()))


def test_nan_in_calibration(write_recipe, workdir):
    img = load(workdir / "calib.npz")["image"].copy()
    img[5, 0, 0, 0] = np.nan
    _rewrite(workdir / "calib.npz", image=img)
    with pytest.raises(InputError, match=r"input 'image' has NaN or Inf \(first in sample 5\)"):
        load_calibration(load_recipe(write_recipe()))


def test_calibration_and_evaluation_same_file(write_recipe):
    r = load_recipe(write_recipe(evals="calib.npz"))
    with pytest.raises(InputError, match=r"are the same file; evaluate on held-out samples"):
        check_disjoint(load_calibration(r), load_evaluation(r))


def test_same_content_under_two_names(write_recipe, workdir):
    (workdir / "copy.npz").write_bytes((workdir / "calib.npz").read_bytes())
    r = load_recipe(write_recipe(evals="copy.npz"))
    with pytest.raises(InputError, match=r"same file"):
        check_disjoint(load_calibration(r), load_evaluation(r))


def test_top1_needs_labels(write_recipe):
    with pytest.raises(InputError, match=r"metric 'top1' needs a 'labels' array"):
        load_evaluation(load_recipe(write_recipe(metric="top1")))


def test_labels_count_must_match(write_recipe, workdir):
    _rewrite(workdir / "eval.npz", labels=np.zeros(3, np.int64))
    with pytest.raises(InputError, match=r"'labels' has 3 entries for 200 samples"):
        load_evaluation(load_recipe(write_recipe(metric="top1")))


def test_not_an_npz(write_recipe, workdir):
    (workdir / "calib.npz").write_text("hello")
    with pytest.raises(InputError, match=r"calibration data .*not a readable \.npz file"):
        load_calibration(load_recipe(write_recipe()))


def test_missing_file(write_recipe):
    with pytest.raises(InputError, match=r"evaluation data .*held_out\.npz: file not found"):
        load_evaluation(load_recipe(write_recipe(evals="held_out.npz")))

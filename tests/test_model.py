"""Model sources: file.py:callable and torch.export .pt2, and the errors a user can hit."""
from __future__ import annotations

import pytest
import torch

from edgekit.inputs.data import load_evaluation
from edgekit.errors import InputError
from edgekit.inputs.model import check_forward, count_macs, example_inputs, load_model
from edgekit.config.recipe import load_recipe


def test_load_py_callable_and_describe(write_recipe):
    r = load_recipe(write_recipe())
    m = load_model(r)
    sample = load_evaluation(r).sample(0)
    check_forward(m, r.model.inputs, sample)
    assert count_macs(m, example_inputs(r.model.inputs, sample)) > 1_000_000


def test_load_pt2(write_recipe, workdir):
    r = load_recipe(write_recipe())
    m = load_model(r)
    args = example_inputs(r.model.inputs, load_evaluation(r).sample(0))
    torch.export.save(torch.export.export(m, args), str(workdir / "model.pt2"))
    m2 = load_model(load_recipe(write_recipe(source="model.pt2")))
    assert torch.allclose(m(*args), m2(*args), atol=1e-5)


@pytest.mark.parametrize("source, message", [
    ("missing.py:build", r"model\.source = 'missing\.py:build': file .*missing\.py not found"),
    ("model.py:nothere", r"has no callable named 'nothere'"),
    ("model.py", r"expected 'file\.py:callable' or a '\.pt2' file"),
    ("gone.pt2", r"file .*gone\.pt2 not found"),
])
def test_bad_sources(write_recipe, source, message):
    with pytest.raises(InputError, match=message):
        load_model(load_recipe(write_recipe(source=source)))


def test_callable_must_return_module(write_recipe, workdir):
    (workdir / "bad.py").write_text("def build():\n    return {'not': 'a module'}\n")
    with pytest.raises(InputError, match=r"build\(\) returned dict, not a torch\.nn\.Module"):
        load_model(load_recipe(write_recipe(source="bad.py:build")))


def test_import_error_is_reported(write_recipe, workdir):
    (workdir / "broken.py").write_text("import no_such_package_xyz\n")
    with pytest.raises(InputError, match=r"importing .*broken\.py failed: ModuleNotFoundError"):
        load_model(load_recipe(write_recipe(source="broken.py:build")))


def test_inputs_in_wrong_order_fail_the_forward_check(write_recipe, workdir):
    (workdir / "swapped.py").write_text(
        "from model import build as _b\nimport torch\n"
        "class W(torch.nn.Module):\n"
        "    def __init__(s):\n        super().__init__(); s.m = _b()\n"
        "    def forward(s, input_ids, attention_mask, image):\n        return s.m(image, input_ids, attention_mask)\n"
        "def build():\n    return W()\n")
    r = load_recipe(write_recipe(source="swapped.py:build"))
    with pytest.raises(InputError, match=r"model forward failed with the recipe's inputs \(image\(1, 3, 32, 32\)"):
        check_forward(load_model(r), r.model.inputs, load_evaluation(r).sample(0))

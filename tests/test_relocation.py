"""Artifacts must not depend on where the model's checkout or the venv lives: a cluster node builds the
same bytes as this machine (manifest sha256), and so does a colleague's checkout."""
from pathlib import Path

from edgekit.backends.onnxruntime import _TRACE_FILE, _portable_file


def test_stack_traces_lose_machine_specific_prefixes():
    trace = ('File "/work/main/.venv/lib/python3.11/site-packages/torch/nn/modules/linear.py", line 134, in forward\n'
             'File "/tmp/relo/a/b/examples/tiny_multimodal/model.py", line 43, in forward')
    got = _TRACE_FILE.sub(_portable_file, trace)
    assert got == ('File "torch/nn/modules/linear.py", line 134, in forward\n'
                   'File "model.py", line 43, in forward')


def test_model_module_name_comes_from_the_file_not_its_path(tmp_path):
    from edgekit.config.recipe import load_recipe
    from edgekit.inputs.model import load_model

    src = Path(__file__).resolve().parents[1] / "examples" / "tiny_multimodal"
    names = []
    for d in ("a", "b/c"):
        dest = tmp_path / d / "tiny"
        dest.mkdir(parents=True)
        (dest / "model.py").write_text((src / "model.py").read_text())
        (dest / "edgekit.toml").write_text((src / "edgekit.toml").read_text())
        names.append(type(load_model(load_recipe(dest))).__module__)
    assert names[0] == names[1] and names[0].startswith("edgekit_user_model_")

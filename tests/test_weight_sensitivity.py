"""edgekit.weight_sensitivity: layers whose int8 weights break their output are found on the torch model
(the accuracy search's first LiteRT step keeps them in float)."""
import numpy as np
import torch
from torch import nn

from edgekit.weight_sensitivity import fake_quant_weight, weight_sensitivity


class Probe(nn.Module):
    """A conv tower + a linear probe with the kind of weights a folded standardisation gives: one
    near-constant feature per class with a huge weight, which eats the row's int8 scale."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 16, 3)
        self.head = nn.Linear(16, 4)
        self.good = nn.Linear(16, 4)
        with torch.no_grad():
            self.head.weight[:, 0] = 5000.0   # feature 0 is ~0 on every input: no effect in fp32

    def forward(self, x):
        f = self.conv(x).mean(dim=(2, 3))
        f = torch.cat([torch.zeros_like(f[:, :1]), f[:, 1:]], dim=1)
        return self.head(f) + self.good(f)


def test_outlier_weights_rank_worst_and_healthy_layers_stay_high():
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)} for _ in range(4)]
    ranked = dict(weight_sensitivity(Probe().eval(), samples))
    assert set(ranked) == {"conv", "head", "good"}
    assert ranked["head"] < 10.0                 # every ordinary weight of the head rounds to 0
    assert ranked["conv"] > 30.0 and ranked["good"] > 30.0


def test_fake_quant_weight_is_symmetric_int8_per_output_channel():
    w = torch.tensor([[1.0, -0.5, 0.25], [1000.0, 1.0, -1.0]])
    q = fake_quant_weight(w)
    assert torch.allclose(q[0], w[0], atol=1 / 127)   # row 0 keeps its own scale
    assert q[1, 1] == 0 and q[1, 0] == 1000.0         # row 1's scale is 1000/127: 1.0 rounds to 0
    assert torch.equal(fake_quant_weight(w, per_channel=False)[0], torch.zeros(3))


def test_litert_search_first_step_keeps_weak_weight_layers_in_float_and_fuses_hardtanh(tmp_path):
    from types import SimpleNamespace

    from edgekit.backends import litert_search
    from edgekit.backends.base import Artifact
    from edgekit.backends.litert import LiteRtBackend, QuantizeOptions, _named
    from edgekit.data import SampleSet

    backend = LiteRtBackend()
    fp32 = Artifact(path=tmp_path / "model_fp32.tflite", precision="fp32")
    backend._sources[str(fp32.path)] = _named(Probe().eval(), ["x"], (torch.zeros(1, 1, 8, 8),))
    rng = np.random.default_rng(0)
    calib = SampleSet(tmp_path / "calib.npz", {"x": rng.standard_normal((4, 1, 8, 8)).astype(np.float32)}, None)
    first = next(litert_search.candidates(backend, fp32, QuantizeOptions(), SimpleNamespace(target="t",
                                                                                            calibration=calib)))
    assert first.opts.float_modules == ["inner.head"] == first.kept_float   # names as float_modules takes them
    assert first.opts.fuse_conv_hardtanh
    assert "weight SQNR" in first.label and "hardtanh" in first.label


def test_ort_search_first_step_keeps_the_weak_layer_nodes_in_float(tmp_path):
    """ONNX Runtime: the weak torch layer is found in the exported graph by the exporter's name scopes and
    its nodes are excluded from quantization in the search's first step; the healthy ones stay int8."""
    from types import SimpleNamespace

    from edgekit.backends import ort_search
    from edgekit.backends.onnxruntime import ExportOptions, OnnxRuntimeBackend, QuantizeOptions
    from edgekit.data import SampleSet
    from edgekit.recipe import InputSpec

    rng = np.random.default_rng(0)
    calib = SampleSet(tmp_path / "calib.npz", {"x": rng.standard_normal((4, 1, 8, 8)).astype(np.float32)}, None)
    model, backend = Probe().eval(), OnnxRuntimeBackend()
    fp32 = backend.export_fp32(model, (torch.zeros(1, 1, 8, 8),), [InputSpec(name="x", shape=[1, 1, 8, 8], dtype="float32")],
                               tmp_path, ExportOptions())
    opts = QuantizeOptions(op_types=["Conv", "MatMul", "Gemm"])
    first = backend.quantize(fp32, calib, tmp_path, opts)
    ctx = SimpleNamespace(target="t", calibration=calib, model=model,
                          best=SimpleNamespace(artifact=first, candidate=SimpleNamespace(opts=opts)))
    step = next(ort_search.candidates(fp32, opts, ctx))
    excluded = step.opts.nodes_to_exclude
    assert excluded and "weight SQNR" in step.label
    assert excluded == ort_search.nodes_of_modules(fp32.path, first.path, ["head"])
    assert not set(excluded) & set(ort_search.nodes_of_modules(fp32.path, first.path, ["good", "conv"]))

"""edgekit.quantize.weights: layers whose int8 weights break their output are found on the torch model
(the accuracy search's first LiteRT step keeps them in float)."""
import numpy as np
import torch
from torch import nn

from edgekit.quantize.weights import fake_quant_weight, weight_sensitivity


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


class ProbeReLU6(Probe):
    """The probe with a ReLU6 after its conv (what makes LiteRT offer the conv->hardtanh fusion)."""

    def forward(self, x):
        f = nn.functional.relu6(self.conv(x)).mean(dim=(2, 3))
        f = torch.cat([torch.zeros_like(f[:, :1]), f[:, 1:]], dim=1)
        return self.head(f) + self.good(f)


def _first_rung(backend, model, fp32, first, opts, calib):
    """What the first build is made with (edgekit.quantize.quality.prepare), without rewrites: weak
    layers are kept in float."""
    from types import SimpleNamespace

    from edgekit.quantize.quality import prepare

    start = prepare(backend, fp32, opts, model, calib, export=None)
    return SimpleNamespace(opts=start.opts, label=start.label, kept_float=backend.float_units(start.opts))


def _calib(tmp_path):
    from edgekit.inputs.data import SampleSet

    rng = np.random.default_rng(0)
    return SampleSet(tmp_path / "calib.npz", {"x": rng.standard_normal((4, 1, 8, 8)).astype(np.float32)}, None)


def test_litert_first_rung_keeps_weak_weight_layers_in_float_and_fuses_hardtanh(tmp_path):
    from edgekit.backends import get_backend
    from edgekit.backends.base import Artifact
    from edgekit.backends.litert import QuantizeOptions, _named, _Source

    backend = get_backend("litert")
    model = ProbeReLU6().eval()
    named, kwargs = _named(model, ["x"], (torch.zeros(1, 1, 8, 8),))
    fp32 = Artifact(path=tmp_path / "model_fp32.tflite", precision="fp32", state=_Source(named, kwargs))
    first = _first_rung(backend, model, fp32, None, QuantizeOptions(), _calib(tmp_path))
    assert first.opts.float_modules == ["inner.head"] == first.kept_float   # names as float_modules takes them
    assert first.opts.fuse_conv_hardtanh
    assert "weight SQNR" in first.label and "hardtanh" in first.label
    # no ReLU6 in the model: no fusion offered, the weak layer still goes to float
    first = _first_rung(backend, Probe().eval(), Artifact(path=fp32.path, precision="fp32", state=_Source(
        *_named(Probe().eval(), ["x"], (torch.zeros(1, 1, 8, 8),)))), None, QuantizeOptions(), _calib(tmp_path))
    assert not first.opts.fuse_conv_hardtanh and first.opts.float_modules == ["inner.head"]


def test_ort_first_rung_keeps_the_weak_layer_nodes_in_float(tmp_path):
    """ONNX Runtime: the weak torch layer is found in the exported graph by the exporter's name scopes and
    its nodes are excluded from quantization in the search's first step; the healthy ones stay int8."""
    from edgekit.backends import get_backend
    from edgekit.backends.onnxruntime import ExportOptions, QuantizeOptions
    from edgekit.backends.onnxruntime.graph import nodes_of_modules
    from edgekit.config.recipe import InputSpec

    calib = _calib(tmp_path)
    model, backend = Probe().eval(), get_backend("onnxruntime")
    fp32 = backend.export_fp32(model, (torch.zeros(1, 1, 8, 8),), [InputSpec(name="x", shape=[1, 1, 8, 8], dtype="float32")],
                               tmp_path, ExportOptions())
    opts = QuantizeOptions(op_types=["Conv", "MatMul", "Gemm"])
    first = backend.quantize(fp32, calib, tmp_path, opts)
    step = _first_rung(backend, model, fp32, first, opts, calib)
    excluded = step.opts.nodes_to_exclude
    assert excluded and "weight SQNR" in step.label
    assert excluded == nodes_of_modules(fp32.path, first.path, ["head"])
    assert not set(excluded) & set(nodes_of_modules(fp32.path, first.path, ["good", "conv"]))


def test_openvino_first_rung_keeps_the_weak_layer_ops_in_float(tmp_path):
    """OpenVINO gets the same weak-weight rung: the weak Linear's MatMul goes to NNCF's ignored_scope."""
    from edgekit.backends import get_backend
    from edgekit.backends.openvino import ExportOptions, QuantizeOptions
    from edgekit.config.recipe import InputSpec

    calib = _calib(tmp_path)
    model, backend = Probe().eval(), get_backend("openvino")
    fp32 = backend.export_fp32(model, (torch.zeros(1, 1, 8, 8),), [InputSpec(name="x", shape=[1, 1, 8, 8], dtype="float32")],
                               tmp_path, ExportOptions())
    opts = QuantizeOptions(model_type=None)
    first = backend.quantize(fp32, calib, tmp_path, opts)
    step = _first_rung(backend, model, fp32, first, opts, calib)
    names = step.opts.ignored_scope.names
    assert len(names) == 1 and names[0].endswith("/MatMul") and "weight SQNR" in step.label
    assert step.kept_float == names
    (tmp_path / "s1").mkdir()
    art = backend.quantize(fp32, calib, tmp_path / "s1", step.opts)

    def weight_is_float(xml) -> bool:
        import openvino as ov

        op = next(o for o in ov.Core().read_model(str(xml)).get_ordered_ops() if o.get_friendly_name() == names[0])
        w = op.input_value(1).get_node()
        return w.get_type_name() == "Constant" and w.get_element_type().get_type_name() == "f32"

    assert weight_is_float(art.path) and not weight_is_float(first.path)


def test_standardize_is_exact_in_float_and_fixes_the_weights():
    """edgekit.quantize.rewrite.standardize: the folded standardisation's scale moves into the activation;
    the model computes the same, the rewritten Linear's int8 weights are healthy, the original is untouched."""
    from edgekit.quantize.rewrite import Standardize, standardize

    rng = np.random.default_rng(0)
    xs = [(torch.from_numpy(rng.standard_normal((1, 1, 8, 8)).astype(np.float32)),) for _ in range(8)]
    model = Probe().eval()
    new, added = standardize(model, ["head", "conv"], xs)      # conv is not a Linear: left alone
    assert added == ["head.0"] and isinstance(new.get_submodule("head.0"), Standardize)
    assert isinstance(model.head, nn.Linear)                     # a copy was rewritten
    with torch.no_grad():
        for (x,) in xs:
            torch.testing.assert_close(new(x), model(x), rtol=1e-4, atol=1e-4)
    samples = [{"x": x.numpy()} for (x,) in xs]
    before, after = dict(weight_sensitivity(model, samples)), dict(weight_sensitivity(new, samples))
    assert before["head"] < 10 and after["head.1"] > 20


def test_smooth_is_exact_in_float_and_flattens_the_activation():
    """edgekit.quantize.rewrite.smooth: a Linear whose input has an outlier channel gets the scale
    migrated into its weights; same outputs, the int8 activation is flatter, other Linears untouched."""
    from edgekit.quantize.rewrite import ChannelScale, input_absmax, smooth

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[3] *= 50.0           # channel 3 of the second Linear's input is an outlier
    xs = [(torch.randn(2, 8),) for _ in range(16)]
    new, added = smooth(model, xs, alpha=0.5)
    assert added == ["2.0"] and isinstance(new.get_submodule("2.0"), ChannelScale)
    assert isinstance(new.get_submodule("0"), nn.Linear)           # its input has no outlier channel
    with torch.no_grad():
        for (x,) in xs:
            torch.testing.assert_close(new(x), model(x), rtol=1e-4, atol=1e-4)
    before = input_absmax(model, ["2"], xs)["2"]
    after = input_absmax(new, ["2.1"], xs)["2.1"]
    assert float(after.max() / after.median()) < float(before.max() / before.median()) / 4
    assert smooth(model, xs, alpha=0.5, ratio=1e9) == (model, [])

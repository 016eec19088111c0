"""LiteRT (TFLite) for phones: ``litert_torch.convert`` -> fp32 ``.tflite``; PT2E static int8
(litert-torch's ``PT2EQuantizer`` + torchao ``prepare_pt2e`` / calibrate / ``convert_pt2e``) -> int8
``.tflite``; run with ``ai_edge_litert`` (the successor of the retired ``tflite-runtime``), XNNPACK on.

No TensorFlow on this path. What the converter changes, and the runner undoes so every target is fed
the same real samples: int64 ids/masks become int32 inputs; an int8 model takes an int8 image (scale,
zero point in the tensor's quantization) and returns int8 outputs, which are dequantized. The
signature keeps the recipe's input names when they are Python identifiers (the model is wrapped so
its forward takes them as keywords); otherwise inputs are ``args_0..`` in recipe order.
"""
from __future__ import annotations

import keyword
import re
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from edgekit.backends.base import Artifact, Backend, Fix, Options, first_lines, synthetic_array
from edgekit.backends.litert.remote_runner import from_output, output_order, to_input
from edgekit.errors import TargetError
from edgekit.progress import bar


class ExportOptions(Options):
    pass


class QuantizeOptions(Options):
    precision: Literal["int8", "fp16"] = "int8"
    """int8: full-integer static PT2E with calibration; fp16: fp16 weights, float compute and I/O."""
    per_channel: bool = True
    """Per-output-channel int8 weight scales (TFLite's int8 spec for conv/FC); False = per-tensor."""
    fuse_conv_hardtanh: bool = False
    """Annotate conv -> hardtanh (ReLU6) like conv -> relu: one observer after the clip. Off by default
    (the vendor behaviour); the accuracy search turns it on first (README, accuracy-aware quantization)."""
    float_modules: list[str] = []
    """Modules left in float: ``inner.image.net._blocks.3`` = the ops directly in that module (what the
    accuracy search ranks and fills in), ``inner.image.*`` = a whole subtree. ``inner.`` is edgekit's
    wrapper around the recipe's model."""
    float_lines: list[str] = []
    """Source lines (``model.py:131``) whose ops, and the quantized ops reading them, stay float: what the
    conversion-error rescue (``edgekit.quantize.rescue``) fills in from the converter's message."""
    share_same_scale: bool = True
    """Ops whose TFLite kernels need equal input and output scales (reshape, squeeze, transpose, slice,
    ...) share their input's observer (``pt2e.share_same_scale_ops``); False = litert-torch's own, narrower
    propagation, which the converter can reject ("violate the same scale constraint")."""
    float_attention: bool = False
    """Leave attention's activation x activation matmuls and the softmax chain between them in float:
    XNNPACK has no int8 BATCH_MATMUL, and TFLite's reference kernel then takes their time."""
    fold_pads: bool = False
    """Fold symmetric zero pads into their convs before quantizing (exact) and let other pads share their
    input's quantization: in int8 an explicit PAD is a separate op XNNPACK cannot fuse."""
    conv_observer: Literal["default", "minmax"] = "default"
    """Activation observers of conv partitions: litert's default (histogram) or MinMax."""
    smooth_alpha: Optional[float] = 0.5
    """SmoothQuant scale migration (``edgekit.quantize.rewrite.smooth``) for Linears with outlier input
    channels, at this alpha, among the quality methods of the first build; None = off. mnist_bbc: topic
    accuracy 0.939 -> 0.948 at 0.5 (0.75: 0.941)."""
    int8_embedding: bool = False
    """Store embedding tables int8 (AI Edge Quantizer, weight-only, per channel) after conversion: PT2E
    keeps them float. TFLite dequantizes them once at load: same latency, a smaller file."""


class RuntimeOptions(Options):
    threads: int = 1
    xnnpack: bool = True
    """The XNNPACK CPU delegate, LiteRT's default on phones; False = the reference builtin kernels."""


class LiteRtBackend(Backend):
    ExportOptions = ExportOptions
    QuantizeOptions = QuantizeOptions
    RuntimeOptions = RuntimeOptions

    def export_fp32(self, model, args, inputs, out: Path, opts: ExportOptions) -> Artifact:
        litert_torch = self.require("litert_torch")
        named, kwargs = _named(model, [i.name for i in inputs], args)
        path = out / "model_fp32.tflite"
        try:
            litert_torch.convert(named, sample_kwargs=kwargs).export(str(path))
        except Exception as e:  # noqa: BLE001
            raise TargetError(f"litert_torch.convert failed: {type(e).__name__}: {first_lines(e)}") from None
        # state: the (input-named) torch model and sample the file came from; quantize() starts from them
        return Artifact(path=path, precision="fp32", details={"io": io_details(path)}, state=_Source(named, kwargs))

    def quantize(self, fp32: Artifact, calibration, out: Path, opts: QuantizeOptions) -> Artifact:
        import torch

        litert_torch = self.require("litert_torch")
        if not isinstance(fp32.state, _Source):
            raise TargetError("litert: quantize needs the fp32 artifact exported in this process (export_fp32)")
        model, kwargs = fp32.state.model, fp32.state.kwargs
        path = out / f"model_{opts.precision}.tflite"
        if opts.precision == "fp16":
            from litert_torch.generative.quantize import quant_recipes

            try:
                litert_torch.convert(model, sample_kwargs=kwargs,
                                     quant_config=quant_recipes.full_fp16_recipe()).export(str(path))
            except Exception as e:  # noqa: BLE001
                raise TargetError(f"litert fp16 conversion failed: {type(e).__name__}: {first_lines(e)}") from None
            return Artifact(path=path, precision="fp16 weights (float compute)",
                            details={"io": io_details(path)})

        from litert_torch.quantize.quant_config import QuantConfig

        from edgekit.backends.litert.pt2e import fold_symmetric_pads, make_quantizer

        prepare_pt2e, convert_pt2e = _pt2e()
        quantizer = make_quantizer(opts.per_channel, opts.fuse_conv_hardtanh, opts.float_modules,
                                   float_attention=opts.float_attention, pad_shared=opts.fold_pads,
                                   conv_observer=opts.conv_observer, share_same_scale=opts.share_same_scale,
                                   float_lines=opts.float_lines)
        names = list(kwargs)
        folded = 0
        try:
            gm = torch.export.export(model, (), kwargs).module()
            if opts.fold_pads:
                folded = fold_symmetric_pads(gm)
            gm = prepare_pt2e(gm, quantizer)
            with torch.no_grad():
                for sample in bar(calibration, len(calibration), "calibrate"):
                    gm(**{n: torch.from_numpy(v) for n, v in zip(names, sample.values())})
            gm = convert_pt2e(gm, fold_quantize=False)
            litert_torch.convert(gm, sample_kwargs=kwargs,
                                 quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))
            if opts.int8_embedding:
                _int8_embedding_tables(path)
        except Exception as e:  # noqa: BLE001
            raise TargetError(f"litert PT2E int8 failed: {type(e).__name__}: {first_lines(e)}") from None
        parts = [p for p, on in (("conv+ReLU6 fused", opts.fuse_conv_hardtanh), ("attention float", opts.float_attention),
                                 (f"{folded} pads folded", opts.fold_pads), ("MinMax conv observers",
                                                                             opts.conv_observer == "minmax"),
                                 ("int8 embeddings", opts.int8_embedding)) if on]
        return Artifact(path=path, precision=f"int8 (PT2E static, {'per-channel' if opts.per_channel else 'per-tensor'}"
                        + "".join(f", {p}" for p in parts)
                        + (f", {len(opts.float_modules)} modules float" if opts.float_modules else "")
                        + (f", {len(opts.float_lines)} source lines float" if opts.float_lines else "") + ")",
                        details={"per_channel": opts.per_channel, "calibration_samples": len(calibration),
                                 "fuse_conv_hardtanh": opts.fuse_conv_hardtanh, "float_modules": opts.float_modules,
                                 "float_lines": opts.float_lines, "float_attention": opts.float_attention, "pads_folded": folded,
                                 "conv_observer": opts.conv_observer, "int8_embedding": opts.int8_embedding,
                                 "io": io_details(path)},
                        state={"converted": gm})  # the reference-quantized graph the search ranks

    # -- the accuracy search's questions (edgekit.quantize.search) ---------------------------------
    def weights_per_channel(self, opts: QuantizeOptions) -> bool:
        return opts.per_channel

    def smoothing(self, opts: QuantizeOptions) -> Optional[float]:
        return opts.smooth_alpha

    def quality_fixes(self, fp32: Artifact, opts: QuantizeOptions) -> list[Fix]:
        """Measured on mnist_bbc (XNNPACK, 1 thread, AMX CPU), each from 0.409 top-1 at 2.6x to 0.882 at
        4.7x together with the standardize rewrite (README)."""
        if opts.precision != "int8" or not isinstance(fp32.state, _Source):
            return []
        calls = _calls(fp32.state.model, fp32.state.kwargs)
        fixes = []
        if not opts.fuse_conv_hardtanh and calls & {"hardtanh", "hardtanh_", "relu6"}:
            fixes.append(Fix("conv->hardtanh (ReLU6) annotated like conv->relu", {"fuse_conv_hardtanh": True}))
        if not opts.float_attention and calls & {"matmul", "bmm"}:
            fixes.append(Fix("attention's activation x activation matmuls and softmax left float (no int8 "
                             "BATCH_MATMUL in XNNPACK)", {"float_attention": True}))
        if not opts.fold_pads and "pad" in calls:
            fixes.append(Fix("symmetric zero pads folded into their convs, other pads share their input's "
                             "quantization", {"fold_pads": True}))
        if opts.conv_observer == "default" and calls & {"conv1d", "conv2d"}:
            fixes.append(Fix("MinMax activation observers for convolutions", {"conv_observer": "minmax"}))
        return fixes

    def units_of_modules(self, fp32: Artifact, modules: list[str]) -> list[str]:
        return [f"{WRAPPED}.{m}" for m in modules]  # the model runs inside edgekit's input-naming wrapper

    def rank_activations(self, art: Artifact, calibration, samples: int) -> list[tuple[list[str], float]]:
        from edgekit.backends.litert.pt2e import activation_sensitivity

        converted = (art.state or {}).get("converted")
        if converted is None:
            return []
        return [([m], db) for m, db in activation_sensitivity(converted, calibration, samples)]

    def unit_macs(self, art: Artifact, units: Sequence[str]) -> dict[str, int]:
        from edgekit.backends.litert.pt2e import module_macs

        converted = (art.state or {}).get("converted")
        return module_macs(converted, units) if converted is not None else {}

    def float_units(self, opts: QuantizeOptions) -> list[str]:
        return list(opts.float_modules) + list(opts.float_lines)

    def keep_in_float(self, opts: QuantizeOptions, units: Sequence[str]) -> QuantizeOptions:
        lines = {u for u in units if _SOURCE_LINE.fullmatch(u)}
        return opts.model_copy(update={"float_modules": sorted(set(opts.float_modules) | (set(units) - lines)),
                                       "float_lines": sorted(set(opts.float_lines) | lines)})

    def units_of_error(self, fp32: Artifact, opts: QuantizeOptions, message: str) -> list[str]:
        """The converter names the source line of the op it rejects (``model.py:131:0: error: 'tfl.reshape'
        op quantization parameters violate the same scale constraint``): the unit is that line's ops of
        that kind (``model.py:131:tfl.reshape``; ``pt2e.nodes_at_lines``)."""
        return sorted({f"{f.rsplit('/', 1)[-1]}:{ln}" + (f":{op}" if op else "")
                       for f, ln, op in _ERROR_AT.findall(message)})

    def remote_runner(self) -> Path:
        """Verification only (``edgekit.measure.arm``); LiteRT artifacts are not timed over ssh yet."""
        return Path(__file__).with_name("remote_runner.py")

    def remote_settings(self, runtime: RuntimeOptions) -> dict:
        return {"threads": runtime.threads, "xnnpack": runtime.xnnpack}

    RUNTIME_MODULES = ("ai_edge_litert.interpreter",)

    def load(self, path: Path, runtime: RuntimeOptions):
        self.require("ai_edge_litert")
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        kwargs = {} if runtime.xnnpack else \
            {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
        try:
            interp = Interpreter(model_path=str(path), num_threads=runtime.threads, **kwargs)
            interp.allocate_tensors()
        except Exception as e:  # noqa: BLE001
            raise TargetError(f"ai_edge_litert cannot load {path}: {first_lines(e)}") from None
        return _LiteRtRunner(interp, "XNNPACK" if runtime.xnnpack else "builtin kernels")


def _calls(model, kwargs: dict) -> set[str]:
    """The names of the torch functions a forward of ``model`` calls (modules' included)."""
    import torch
    from torch.overrides import TorchFunctionMode

    seen: set[str] = set()

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kw=None):
            seen.add(getattr(func, "__name__", ""))
            return func(*args, **(kw or {}))

    with torch.no_grad(), Spy():
        model(**kwargs)
    return seen


def _int8_embedding_tables(path: Path) -> None:
    """AI Edge Quantizer, weight-only int8 per channel, on every EMBEDDING_LOOKUP table of ``path``."""
    from ai_edge_quantizer import quantizer
    from ai_edge_quantizer.qtyping import TFLOperationName

    qt = quantizer.Quantizer(str(path))
    qt.add_weight_only_config(regex=".*", operation_name=TFLOperationName.EMBEDDING_LOOKUP, num_bits=8)
    qt.quantize().export_model(str(path), overwrite=True)


class _Source:
    """What an fp32 .tflite was converted from, kept on its Artifact for quantize() in the same build."""

    def __init__(self, model, kwargs: dict):
        self.model, self.kwargs = model, kwargs


_SOURCE_LINE = re.compile(r"[\w.-]+\.py:\d+(:tfl\.\w+)?")
_ERROR_AT = re.compile(r"([\w./-]+\.py):(\d+):\d+: error(?:: '(tfl\.\w+)' op)?")

WRAPPED = "inner"
"""The attribute under which ``_named`` wraps the recipe's model (module paths start with it)."""


def _pt2e():
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:  # older stacks ship it in torch.ao
        from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
    return prepare_pt2e, convert_pt2e


def _named(model, names: list[str], args: tuple):
    """Wrap ``model`` so its forward takes the recipe's input names as keywords: the .tflite signature
    then carries them. Names that are not Python identifiers keep positional ``args_i`` names."""
    import torch

    if not all(n.isidentifier() and not keyword.iskeyword(n) for n in names) or "self" in names:
        class Positional(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, *xs):
                return self.inner(*xs)

        return Positional(model).eval(), {f"args_{i}": a for i, a in enumerate(args)}
    params = ", ".join(names)
    ns: dict = {}
    exec(f"def forward(self, {params}):\n    return self.inner({params})\n", ns)  # noqa: S102 - names checked

    def __init__(self, inner):
        torch.nn.Module.__init__(self)
        self.inner = inner

    cls = type("NamedInputs", (torch.nn.Module,), {"__init__": __init__, "forward": ns["forward"]})
    return cls(model).eval(), dict(zip(names, args))


def io_details(path: Path) -> dict:
    """The signature an app developer feeds on the phone: names, dtypes, shapes, quantization."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    sig = interp.get_signature_list()
    key = next(iter(sig))
    r = interp.get_signature_runner(key)

    def side(details: dict) -> list[dict]:
        return [{"name": n, "dtype": np.dtype(d["dtype"]).name, "shape": [int(x) for x in d["shape"]],
                 "scale": float(d["quantization"][0]), "zero_point": int(d["quantization"][1])}
                for n, d in details.items()]

    return {"signature": key, "inputs": side(r.get_input_details()), "outputs": side(r.get_output_details())}


class _LiteRtRunner:
    def __init__(self, interp, device: str):
        self.interp = interp
        self.device = device
        self.runner = interp.get_signature_runner(next(iter(interp.get_signature_list())))
        self.in_details = self.runner.get_input_details()
        self.out_details = self.runner.get_output_details()
        self.positional = all(n.startswith("args_") for n in self.in_details)

    def _feed(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = list(feeds.values())
        return {name: to_input(values[int(name.split("_")[1])] if self.positional else feeds[name], d)
                for name, d in self.in_details.items()}

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        res = self.runner(**self._feed(feeds))
        return [from_output(res[name], self.out_details[name]) for name in sorted(res, key=output_order)]

    def signature(self) -> dict:
        def io(details):
            return [{"name": n, "dtype": np.dtype(d["dtype"]).name, "shape": [int(x) for x in d["shape"]],
                     **({"scale": float(d["quantization"][0]), "zero_point": int(d["quantization"][1])}
                        if d["quantization"][0] else {})} for n, d in details.items()]
        return {"inputs": io(self.in_details), "outputs": io(self.out_details)}

    def synthetic_feed(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        return {name: synthetic_array([int(s) for s in d["shape"]], np.float32 if d["quantization"][0]
                                      else d["dtype"], rng)
                for name, d in self.in_details.items()}

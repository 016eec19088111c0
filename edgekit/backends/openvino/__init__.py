"""OpenVINO: ``ov.convert_model(torch.export.export(...))`` -> fp32 IR -> ``nncf.quantize`` -> int8 IR.

Three traps this module handles (measured on this project's machine, see README):
- tracing fails on ``nn.TransformerEncoder``: convert from a ``torch.export`` program instead;
  its IR has fully dynamic inputs, so it is reshaped to the recipe's static shapes;
- on CPUs with bf16 the plugin runs "fp32" IRs in bf16 unless ``INFERENCE_PRECISION_HINT=f32``:
  the runtime option ``inference_precision`` defaults to f32, so the baseline is true fp32;
- ``ov.save_model`` compresses weights to fp16 by default: the fp32 IR is saved uncompressed.
The same compile settings (threads, precision hint) are used to verify and to time an artifact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from edgekit.backends.base import Artifact, Backend, Fix, Options, first_lines, named_in, synthetic_array
from edgekit.errors import TargetError
from edgekit.progress import bar


class ExportOptions(Options):
    compress_to_fp16: bool = False
    """Save the fp32 IR's weights as fp16 (halves the file; the report then says so)."""


class IgnoredScope(Options):
    names: list[str] = []
    types: list[str] = []
    patterns: list[str] = []
    validate_names: bool = True
    """NNCF checks that every name exists (typos fail the target); the accuracy search turns it off."""


class QuantizeOptions(Options):
    preset: Literal["performance", "mixed"] = "performance"
    model_type: Optional[Literal["transformer"]] = "transformer"
    """'transformer' makes NNCF keep attention-sensitive ops (softmax, layer norm, the embedding gather)
    out of int8. Unset it for pure CNNs."""
    fast_bias_correction: bool = True
    smooth_quant_alpha: Optional[float] = None
    """SmoothQuant alpha for MatMuls (transformer model type only); None keeps NNCF's default."""
    subset_size: Optional[int] = None
    """Calibration samples NNCF uses; None = all of the recipe's calibration set."""
    ignored_scope: IgnoredScope = IgnoredScope()


class RuntimeOptions(Options):
    device: str = "CPU"
    threads: int = 1
    inference_precision: Literal["f32", "bf16", "f16"] = "f32"
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"


class OpenVinoBackend(Backend):
    ExportOptions = ExportOptions
    QuantizeOptions = QuantizeOptions
    RuntimeOptions = RuntimeOptions

    def files(self, path: Path) -> list[Path]:
        return [path, path.with_suffix(".bin")]

    def export_fp32(self, model, args, inputs, out: Path, opts: ExportOptions) -> Artifact:
        import torch

        ov = self.require("openvino")
        try:
            program = torch.export.export(model, args)
        except Exception as e:  # noqa: BLE001
            raise TargetError(f"torch.export.export failed: {type(e).__name__}: {first_lines(e)}") from None
        try:
            ir = ov.convert_model(program)
        except Exception as e:  # noqa: BLE001
            # OpenVINO's frontend buries the useful part ("-- No conversion rule found for operations:
            # aten.histc.default") under C++ check locations; keep the summary lines when there are any.
            summary = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("--")]
            raise TargetError(f"openvino convert_model failed: {type(e).__name__}: "
                              f"{chr(10).join(summary) or first_lines(e)}") from None
        if len(ir.inputs) != len(inputs):
            raise TargetError(f"the converted IR has {len(ir.inputs)} inputs, the recipe {len(inputs)}")
        ir.reshape({port: ov.PartialShape(spec.shape) for port, spec in zip(ir.inputs, inputs)})
        for port, spec in zip(ir.inputs, inputs):
            port.get_tensor().set_names({spec.name})
        path = out / "model_fp32.xml"
        stable_names(ir)
        ov.save_model(ir, str(path), compress_to_fp16=opts.compress_to_fp16)
        return Artifact(path=path, files=self.files(path),
                        precision="fp32 (fp16-compressed weights)" if opts.compress_to_fp16 else "fp32",
                        details={"compress_to_fp16": opts.compress_to_fp16}, state={"fx_modules": _fx_modules(program)})

    def quantize(self, fp32: Artifact, calibration, out: Path, opts: QuantizeOptions) -> Artifact:
        ov = self.require("openvino")
        nncf = self.require("nncf")
        kwargs: dict = {"preset": getattr(nncf.QuantizationPreset, opts.preset.upper()),
                        "fast_bias_correction": opts.fast_bias_correction,
                        "subset_size": min(opts.subset_size or len(calibration), len(calibration))}
        if opts.model_type == "transformer":
            kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        if opts.smooth_quant_alpha is not None:
            from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, \
                AdvancedSmoothQuantParameters

            kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=opts.smooth_quant_alpha))
        scope = opts.ignored_scope
        if scope.names or scope.types or scope.patterns:
            kwargs["ignored_scope"] = nncf.IgnoredScope(names=scope.names, types=scope.types,
                                                        patterns=scope.patterns, validate=scope.validate_names)
        ir = ov.Core().read_model(str(fp32.path))
        dataset = nncf.Dataset(list(bar(calibration, len(calibration), "calibration samples")))
        try:
            q = nncf.quantize(ir, dataset, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise TargetError(f"nncf.quantize failed: {type(e).__name__}: {first_lines(e)}") from None
        path = out / "model_int8.xml"
        stable_names(q)
        ov.save_model(q, str(path), compress_to_fp16=False)
        desc = f"int8 (NNCF {opts.preset}" + (", transformer" if opts.model_type else "") + \
               (f", SmoothQuant {opts.smooth_quant_alpha}" if opts.smooth_quant_alpha is not None else "") + \
               (f", {len(scope.names)} ops float" if scope.names else "") + ")"
        return Artifact(path=path, files=self.files(path), precision=desc, details={
            "preset": opts.preset, "model_type": opts.model_type, "subset_size": kwargs["subset_size"],
            "smooth_quant_alpha": opts.smooth_quant_alpha, "ignored_scope": scope.model_dump(),
            "fake_quantize_nodes": sum(op.get_type_name() == "FakeQuantize" for op in q.get_ops())})

    # -- the accuracy search's questions (edgekit.quantize.search) ---------------------------------
    def quality_fixes(self, fp32: Artifact, opts: QuantizeOptions) -> list[Fix]:
        from edgekit.backends.openvino.graph import activation_matmuls

        # Attention's activation-by-activation MatMuls (Q.K^T, P.V): int8 there lost 0.1-0.2 pt of topic
        # accuracy on MiniLM (mnist_bbc) and was 0.13 ms slower than leaving them to the float kernels.
        mms = sorted(set(activation_matmuls(Path(fp32.path))) - set(opts.ignored_scope.names))
        if not mms:
            return []
        scope = opts.ignored_scope.model_copy(update={"names": sorted(set(opts.ignored_scope.names) | set(mms)),
                                                      "validate_names": False})
        return [Fix(f"the {len(mms)} activation x activation MatMuls (attention) kept out of int8",
                    {"ignored_scope": scope})]

    def units_of_modules(self, fp32: Artifact, modules: list[str]) -> list[str]:
        from edgekit.backends.openvino.graph import ops_of_modules

        return ops_of_modules(Path(fp32.path), (fp32.state or {}).get("fx_modules", {}), modules)

    def rank_activations(self, art: Artifact, calibration, samples: int) -> list[tuple[list[str], float]]:
        from edgekit.backends.openvino.graph import activation_sensitivity

        return [(ops, db) for ops, db in activation_sensitivity(Path(art.path), calibration, samples) if ops]

    def unit_macs(self, art: Artifact, units: Sequence[str]) -> dict[str, int]:
        from edgekit.backends.openvino.graph import op_macs

        return op_macs(Path(art.path), units)

    def float_units(self, opts: QuantizeOptions) -> list[str]:
        return list(opts.ignored_scope.names)

    def keep_in_float(self, opts: QuantizeOptions, units: Sequence[str]) -> QuantizeOptions:
        scope = opts.ignored_scope.model_copy(update={"names": sorted(set(opts.ignored_scope.names) | set(units)),
                                                      "validate_names": False})
        return opts.model_copy(update={"ignored_scope": scope})

    def units_of_error(self, fp32: Artifact, opts: QuantizeOptions, message: str) -> list[str]:
        """OpenVINO and NNCF name the operation (its friendly name) that failed: keep it in float."""
        ov = self.require("openvino")
        return named_in(message, {op.get_friendly_name(): op.get_friendly_name()
                                  for op in ov.Core().read_model(str(fp32.path)).get_ops()
                                  if op.get_type_name() not in ("Parameter", "Result", "Constant")})

    RUNTIME_MODULES = ("openvino",)

    def load(self, path: Path, runtime: RuntimeOptions):
        ov = self.require("openvino")
        config = {"INFERENCE_PRECISION_HINT": runtime.inference_precision,
                  "INFERENCE_NUM_THREADS": runtime.threads,
                  "PERFORMANCE_HINT": runtime.performance_hint}
        try:
            compiled = ov.Core().compile_model(str(path), runtime.device, config)
        except Exception as e:  # noqa: BLE001
            raise TargetError(f"openvino cannot load {path} on {runtime.device}: {first_lines(e)}") from None
        return _OvRunner(compiled, runtime.device)

    def doctor_lines(self) -> list[str]:
        import openvino as ov

        return [f"openvino devices: {', '.join(ov.Core().available_devices)}"]

    def unmeasurable_reason(self, runtime: RuntimeOptions) -> Optional[str]:
        try:
            import openvino as ov
        except ImportError:
            return None  # load() reports the missing package
        if not any(d.split(".")[0] == runtime.device.split(".")[0] for d in ov.Core().available_devices):
            return f"not measured: no OpenVINO {runtime.device} device on this machine"
        return None


def _fx_modules(program) -> dict[str, str]:
    """fx node name -> the innermost torch module it ran in (the converter keeps node names in op names)."""
    out = {}
    for n in program.graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        if stack:
            fqn = list(stack.values())[-1][0]
            out[n.name] = fqn.removeprefix("L['self'].").removeprefix("L__self__.")
    return out


def stable_names(model) -> None:
    """Make the saved .xml the same bytes in every run (manifest.json). OpenVINO names nodes it creates
    ``<Type>_<n>`` (also inside derived names, e.g. ``Multiply_4990/fq_weights_1``) and models
    ``Model<n>``, n from a process-wide counter that depends on everything created before. Each such
    ``<CamelCase>_<n>`` token is renumbered ``<CamelCase>_ek<k>`` in order of first appearance in
    topological order, k continuing after the largest ``_ek`` number already in the graph: names an
    earlier pass made stable (the fp32 IR's, in the int8 IR NNCF built from it) are kept as they are, so
    names never repeat and an op keeps its name from the fp32 IR to the int8 one (the search's
    ``ignored_scope`` names ops of one by what it found in the other). Names from torch (lower-case
    module paths and aten ops) and tensor names (the recipe's inputs) are kept."""
    import re

    token = re.compile(r"(?<![A-Za-z0-9_])([A-Z][A-Za-z0-9]*)_(\d+)(?![A-Za-z0-9])")
    done = re.compile(r"(?<![A-Za-z0-9_])[A-Z][A-Za-z0-9]*_ek(\d+)(?![A-Za-z0-9])")
    ops = model.get_ordered_ops()
    start = 1 + max((int(m.group(1)) for op in ops for m in done.finditer(op.get_friendly_name())), default=-1)
    mapping: dict[str, str] = {}

    def renumber(m: re.Match) -> str:
        return mapping.setdefault(m.group(0), f"{m.group(1)}_ek{start + len(mapping)}")

    for op in ops:
        name = op.get_friendly_name()
        new = token.sub(renumber, name)
        if new != name:
            op.set_friendly_name(new)
    model.set_friendly_name("edgekit")


class _OvRunner:
    def __init__(self, compiled, device: str):
        self.compiled = compiled
        self.device = device
        self.request = compiled.create_infer_request()
        self.inputs = {p.get_any_name(): p for p in compiled.inputs}

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        res = self.request.infer({k: v for k, v in feeds.items() if k in self.inputs})
        return [np.array(res[o]) for o in self.compiled.outputs]

    def signature(self) -> dict:
        def io(ports):
            return [{"name": p.get_any_name(), "dtype": p.get_element_type().get_type_name(),
                     "shape": str(p.get_partial_shape())} for p in ports]
        return {"inputs": io(self.compiled.inputs), "outputs": io(self.compiled.outputs)}

    def synthetic_feed(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        return {name: synthetic_array([d.get_length() if d.is_static else 1 for d in p.get_partial_shape()],
                                      p.get_element_type().to_dtype(), rng)
                for name, p in self.inputs.items()}

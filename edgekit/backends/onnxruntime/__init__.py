"""ONNX Runtime: ``torch.onnx.export(dynamo=True)`` -> ``quant_pre_process`` -> ``quantize_static`` (QDQ).

Defaults measured on an AVX-512 VNNI x86 CPU (see README "Why these defaults"): QUInt8 activations
with QInt8 per-channel weights (U8S8) is the pair ORT's x86 kernels run fast; quantizing only
Conv/MatMul/Gemm keeps a transformer's ``-inf`` padding-mask path out of calibration, which otherwise
wrecks MinMax ranges. Every choice is a profile option.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import numpy as np

from edgekit.measure.machine import has_vnni
from edgekit.backends.base import Artifact, Backend, Fix, Options, first_lines, named_in, synthetic_array
from edgekit.errors import TargetError
from edgekit.progress import bar, say

_QTYPES = {"quint8": "QUInt8", "qint8": "QInt8", "quint16": "QUInt16", "qint16": "QInt16"}
_SHORT = {"quint8": "U8", "qint8": "S8", "quint16": "U16", "qint16": "S16"}
_CALIB = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile", "distribution": "Distribution"}


class ExportOptions(Options):
    opset: int = 20


class QuantizeOptions(Options):
    format: Literal["qdq", "qoperator"] = "qdq"
    activation_type: Literal["quint8", "qint8", "quint16", "qint16"] = "quint8"
    weight_type: Literal["qint8", "quint8"] = "qint8"
    per_channel: bool = True
    reduce_range: Union[bool, Literal["auto"]] = "auto"
    """7-bit weights, so U8S8 products cannot saturate the int16 accumulators of x86 kernels without VNNI
    (ORT's docs). 'auto': on when the host CPU has no VNNI (see `edgekit doctor`)."""
    symmetric_activations: bool = False
    symmetric_weights: Optional[bool] = None
    """None = ORT's default for the weight type. The TensorRT EP wants both symmetric (zero point 0)."""
    calibrate_method: Literal["minmax", "entropy", "percentile", "distribution"] = "minmax"
    op_types: Optional[list[str]] = ["Conv", "MatMul", "Gemm"]
    """ONNX op types to quantize; None = every op ORT can quantize."""
    nodes_to_exclude: list[str] = []
    matmul_add_as_gemm: bool = False
    """Rewrite MatMul + constant bias Add as Gemm before quantizing (exact), so every linear layer runs
    as an integer QGemm (``passes.matmul_add_as_gemm``). A quality fix the search's first build turns on."""
    drop_unread_qdq: bool = False
    """Remove the Q/DQ pairs on MatMul/Gemm outputs that no int8 op reads (``passes.drop_unread_qdq``).
    A quality fix the search's first build turns on."""
    skip_symbolic_shape: bool = False
    """quant_pre_process's symbolic shape inference crashes on some BERT graphs; edgekit retries
    with it skipped automatically, this forces it."""
    variants: list[Literal["fp16"]] = []
    """Extra artifacts built from the fp32 model besides the int8 one: "fp16" (float16 weights and
    compute, float32 I/O) for the CUDA EP."""


class RuntimeOptions(Options):
    providers: list[str] = ["CPUExecutionProvider"]
    threads: int = 1
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    disabled_optimizers: list[str] = []
    """ORT graph optimizers to leave out (InferenceSession's ``disabled_optimizers``), for fp32 and int8
    alike: e.g. ``SkipLayerNormFusion`` where the fused float kernel is slower than its parts."""


class OnnxRuntimeBackend(Backend):
    ExportOptions = ExportOptions
    QuantizeOptions = QuantizeOptions
    RuntimeOptions = RuntimeOptions

    def export_fp32(self, model, args, inputs, out: Path, opts: ExportOptions) -> Artifact:
        import torch

        self.require("onnx")
        self.require("onnxscript")
        path = out / "model_fp32.onnx"
        try:
            torch.onnx.export(model, args, str(path), input_names=[i.name for i in inputs], dynamo=True,
                              opset_version=opts.opset, external_data=False, verbose=False)
        except Exception as e:  # noqa: BLE001 - exporter errors are many types
            raise TargetError(f"torch.onnx.export failed: {type(e).__name__}: {first_lines(e)}") from None
        _portable_traces(path)
        # state: calibration ranges computed for this graph, reused by later builds of the same search
        # that only keep more nodes in float (ORT's calibration_cache_path; see _ranges_file)
        return Artifact(path=path, precision="fp32", details={"opset": opts.opset}, state=_Ranges())

    def quantize(self, fp32: Artifact, calibration, out: Path, opts: QuantizeOptions) -> Artifact:
        q = self.require("onnxruntime.quantization")
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from edgekit.backends.onnxruntime import passes

        pre = out / "model_fp32.pre.onnx"
        src, gemms = Path(fp32.path), 0
        if opts.matmul_add_as_gemm:
            src = out / "model_fp32.gemm.onnx"
            gemms = passes.matmul_add_as_gemm(Path(fp32.path), src)
        skip = opts.skip_symbolic_shape
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=skip)
        except Exception as e:  # noqa: BLE001
            if skip:
                raise TargetError(f"quant_pre_process failed: {first_lines(e)}") from None
            say(f"  quant_pre_process: symbolic shape inference failed ({first_lines(e)}); retrying without it")
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        finally:
            if src != Path(fp32.path):
                src.unlink(missing_ok=True)

        excluded, bad = _guard_calibration(pre, calibration, opts)
        # names from the fp32 graph (the search's units): ORT's pre-processing renames a node it fuses
        # "<name>/<Fusion>", so exclude those too
        fused = _fused_from(pre, set(opts.nodes_to_exclude))
        names = list(calibration.arrays)
        reduce_range = (not has_vnni()) if opts.reduce_range == "auto" else opts.reduce_range

        class Reader(q.CalibrationDataReader):
            def __init__(self):
                self._it = iter(bar(calibration, len(calibration), "calibrate"))

            def get_next(self):
                return next(self._it, None)

        path = out / "model_int8.onnx"
        try:
            q.quantize_static(
                str(pre), str(path), Reader(),
                quant_format=q.QuantFormat.QDQ if opts.format == "qdq" else q.QuantFormat.QOperator,
                op_types_to_quantize=opts.op_types,
                per_channel=opts.per_channel,
                reduce_range=reduce_range,
                activation_type=getattr(q.QuantType, _QTYPES[opts.activation_type]),
                weight_type=getattr(q.QuantType, _QTYPES[opts.weight_type]),
                nodes_to_exclude=sorted(set(opts.nodes_to_exclude) | set(excluded) | fused),
                calibrate_method=getattr(q.CalibrationMethod, _CALIB[opts.calibrate_method]),
                extra_options={"ActivationSymmetric": opts.symmetric_activations,
                               **({} if opts.symmetric_weights is None
                                  else {"WeightSymmetric": opts.symmetric_weights})},
                **_ranges_file(fp32, opts),
            )
            dropped = passes.drop_unread_qdq(path, opts.op_types) if opts.drop_unread_qdq else 0
        except Exception as e:  # noqa: BLE001
            raise TargetError(f"onnxruntime quantize_static failed: {type(e).__name__}: {first_lines(e)}") from None
        finally:
            pre.unlink(missing_ok=True)
            shutil.rmtree(out / "augmented_model.onnx", ignore_errors=True)
        a, w = opts.activation_type, opts.weight_type
        pair = _SHORT[a] + _SHORT[w]  # e.g. U8S8: uint8 activations, int8 weights
        precision = (f"int8 ({opts.format.upper()}, {pair}, "
                     f"{'per-channel' if opts.per_channel else 'per-tensor'}, {opts.calibrate_method}"
                     f"{', symmetric' if opts.symmetric_activations and opts.symmetric_weights else ''}"
                     f"{', reduce-range' if reduce_range else ''}"
                     f"{f', {len(set(opts.nodes_to_exclude) | set(excluded))} nodes float' if opts.nodes_to_exclude or excluded else ''})")
        return Artifact(path=path, precision=precision, details={
            "format": opts.format, "activation_type": a, "weight_type": w, "per_channel": opts.per_channel,
            "reduce_range": reduce_range, "symmetric_activations": opts.symmetric_activations,
            "symmetric_weights": opts.symmetric_weights,
            "calibrate_method": opts.calibrate_method, "op_types": opts.op_types,
            "calibration_samples": len(calibration), "inputs": names,
            "nodes_to_exclude": opts.nodes_to_exclude, "nonfinite_tensors": bad,
            "excluded_nonfinite_nodes": excluded, "matmul_add_as_gemm": gemms, "unread_qdq_dropped": dropped})

    # -- the accuracy search's questions (edgekit.quantize.search) ---------------------------------
    def weights_per_channel(self, opts: QuantizeOptions) -> bool:
        return opts.per_channel

    def quality_fixes(self, fp32: Artifact, opts: QuantizeOptions) -> list[Fix]:
        import onnx

        ops = {n.op_type for n in onnx.load(str(fp32.path), load_external_data=False).graph.node}
        fixes = []
        if opts.op_types is not None and "Clip" not in opts.op_types and "Clip" in ops:
            # ReLU6 quantized with its conv: QDQ around the clip lets ORT fuse it (the conv's output
            # range is then the clipped one); it restored EfficientNet-Lite0's image tower
            fixes.append(Fix("quantize Clip (ReLU6) too, fused with its conv", {"op_types": [*opts.op_types, "Clip"]}))
        if "MatMul" in ops and not (opts.matmul_add_as_gemm and opts.drop_unread_qdq):
            # mnist_bbc: text-tower drop 0.011 -> 0.006 and 2.4x -> 3.2x over fp32 (AMX QGemm everywhere)
            fixes.append(Fix("linear layers as Gemm (integer QGemm) and no int8 rounding of matmul outputs "
                             "only float ops read", {"matmul_add_as_gemm": True, "drop_unread_qdq": True}))
        return fixes

    def units_of_modules(self, fp32: Artifact, modules: list[str]) -> list[str]:
        from edgekit.backends.onnxruntime.graph import nodes_of_modules

        return nodes_of_modules(Path(fp32.path), Path(fp32.path), modules)

    def rank_activations(self, art: Artifact, calibration, samples: int) -> list[tuple[list[str], float]]:
        from edgekit.backends.onnxruntime.graph import activation_sensitivity, nodes_touching

        op_types = art.details.get("op_types")
        ranked = [(nodes_touching(Path(art.path), [t], op_types), db)
                  for t, db in activation_sensitivity(Path(art.path), calibration, samples)]
        return [(units, db) for units, db in ranked if units]  # an activation no quantized node touches: no unit

    def unit_macs(self, art: Artifact, units: Sequence[str]) -> dict[str, int]:
        from edgekit.backends.onnxruntime.graph import node_macs

        return node_macs(Path(art.path), units)

    def float_units(self, opts: QuantizeOptions) -> list[str]:
        return list(opts.nodes_to_exclude)

    def keep_in_float(self, opts: QuantizeOptions, units: Sequence[str]) -> QuantizeOptions:
        return opts.model_copy(update={"nodes_to_exclude": sorted(set(opts.nodes_to_exclude) | set(units))})

    def units_of_error(self, fp32: Artifact, opts: QuantizeOptions, message: str) -> list[str]:
        """ONNX Runtime's quantizer names a node or a tensor (``Expected W to be an initializer``): the
        node, or the nodes that read the named tensor (its producer when nothing reads it)."""
        onnx = self.require("onnx")
        nodes = [n for n in onnx.load(str(fp32.path), load_external_data=False).graph.node if n.name]
        touching: dict[str, set[str]] = {}
        for n in nodes:
            for t in n.input:
                touching.setdefault(t, set()).add(n.name)
        for n in nodes:
            for t in n.output:
                touching.setdefault(t, {n.name})
        named = named_in(message, {**{t: t for t in touching}, **{n.name: n.name for n in nodes}})
        return sorted(set().union(*(touching.get(x, {x}) for x in named))) if named else []

    def variants(self, fp32: Artifact, out: Path, opts: QuantizeOptions) -> dict[str, Artifact]:
        if "fp16" not in opts.variants:
            return {}
        onnx = self.require("onnx")
        from onnxruntime.transformers.float16 import convert_float_to_float16

        path = out / "model_fp16.onnx"
        try:
            # keep_io_types: callers keep feeding float32 / reading float32, as with the other artifacts
            onnx.save(convert_float_to_float16(onnx.load(str(fp32.path)), keep_io_types=True), str(path))
        except Exception as e:  # noqa: BLE001
            raise TargetError(f"fp16 conversion (onnxruntime.transformers.float16) failed: {first_lines(e)}") from None
        return {"fp16": Artifact(path=path, precision="fp16 (weights and compute; float32 I/O)",
                                 details={"keep_io_types": True})}

    RUNTIME_MODULES = ("onnxruntime",)

    def load(self, path: Path, runtime: RuntimeOptions):
        ort = self.require("onnxruntime")
        so = ort.SessionOptions()
        so.intra_op_num_threads = runtime.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[runtime.graph_optimization]
        have = ort.get_available_providers()
        providers = [p for p in runtime.providers if p in have] or ["CPUExecutionProvider"]
        try:
            sess = ort.InferenceSession(str(path), so, providers=providers,
                                        **({"disabled_optimizers": runtime.disabled_optimizers}
                                           if runtime.disabled_optimizers else {}))
        except Exception as e:  # noqa: BLE001
            raise TargetError(f"onnxruntime cannot load {path}: {first_lines(e)}") from None
        return _OrtRunner(sess)

    def remote_runner(self) -> Path:
        return Path(__file__).with_name("remote_runner.py")

    def remote_settings(self, runtime: RuntimeOptions) -> dict:
        return {"providers": list(runtime.providers), "threads": runtime.threads,
                "disabled_optimizers": list(runtime.disabled_optimizers)}

    def doctor_lines(self) -> list[str]:
        import importlib.metadata as md

        import onnxruntime as ort

        def installed(dist: str) -> bool:
            try:
                return bool(md.version(dist))
            except md.PackageNotFoundError:
                return False

        lines = [f"onnxruntime execution providers: {', '.join(ort.get_available_providers())}"]
        if installed("onnxruntime-gpu") and installed("onnxruntime"):
            lines.append("  WARNING: onnxruntime and onnxruntime-gpu are both installed; they share the import "
                         "name and one silently wins. Use a separate environment for edgekit-deploy[onnxruntime-gpu].")
        elif "CUDAExecutionProvider" not in ort.get_available_providers():
            lines.append("  no CUDA provider: GPU latency cannot be measured here. For a GPU box: a separate "
                         "venv with edgekit-deploy[onnxruntime-gpu].")
        return lines

    def unmeasurable_reason(self, runtime: RuntimeOptions) -> Optional[str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return None  # load() reports the missing package
        have = ort.get_available_providers()
        accel = [p for p in runtime.providers if p != "CPUExecutionProvider"]
        if accel and not any(p in have for p in accel):
            # Never time on the CPU EP what the profile means to run on a GPU / NPU.
            what = ("CUDA execution provider" if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(accel)
                    else " / ".join(accel))
            return f"not measured: no {what} ({', '.join(accel)} not in this onnxruntime, which has {', '.join(have)})"
        return None


class _OrtRunner:
    def __init__(self, sess):
        self.sess = sess
        self.inputs = {i.name: i for i in sess.get_inputs()}
        self.providers = sess.get_providers()
        self.device = self.providers[0]  # the EP that runs it (verification and timing say which)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(None, {k: v for k, v in feeds.items() if k in self.inputs})

    def signature(self) -> dict:
        def io(ports):
            return [{"name": p.name, "dtype": p.type.removeprefix("tensor(").rstrip(")"), "shape": list(p.shape)}
                    for p in ports]
        return {"inputs": io(self.sess.get_inputs()), "outputs": io(self.sess.get_outputs())}

    def synthetic_feed(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        return {name: synthetic_array([d if isinstance(d, int) and d > 0 else 1 for d in i.shape],
                                      _ORT_DTYPES.get(i.type, "float32"), rng)
                for name, i in self.inputs.items()}


def _portable_traces(path: Path) -> None:
    """The exporter's per-node Python stack traces name files by absolute path (the model's checkout, the
    venv): keep them (a node's source line helps debugging) without the machine-specific prefixes, so
    the same model gives the same bytes from any folder or cluster node (report manifest's sha256)."""
    import onnx

    m = onnx.load(str(path))
    changed = False
    for g in [m.graph, *(f for f in m.functions)]:
        for n in g.node:
            for p in n.metadata_props:
                if p.key == "pkg.torch.onnx.stack_trace" and 'File "/' in p.value:
                    p.value, changed = _TRACE_FILE.sub(_portable_file, p.value), True
    if changed:
        onnx.save(m, str(path))


_TRACE_FILE = re.compile(r'File "([^"]+)"')


def _portable_file(m: "re.Match") -> str:
    path = m.group(1)
    i = path.rfind("site-packages/")
    return f'File "{path[i + len("site-packages/"):] if i >= 0 else Path(path).name}"'


class _Ranges:
    """Calibration ranges of one fp32 graph, per calibration-relevant option set (ORT's JSON cache files).
    A build that only keeps more nodes in float needs no new ranges; a new op type or method does."""

    def __init__(self):
        self._dir: Optional[tempfile.TemporaryDirectory] = None

    def file(self, key: str) -> str:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="edgekit-ort-ranges-")
        return str(Path(self._dir.name) / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json"))


def _ranges_file(fp32: Artifact, opts: QuantizeOptions) -> dict:
    if not isinstance(fp32.state, _Ranges):
        return {}
    key = repr((opts.op_types, opts.calibrate_method, opts.activation_type, opts.symmetric_activations,
                opts.matmul_add_as_gemm))  # what changes the graph that is calibrated or its ranges
    return {"calibration_cache_path": fp32.state.file(key)}


def _fused_from(pre: Path, names: set[str]) -> set[str]:
    """Nodes of the pre-processed graph that ORT's fusions made from ``names`` (``<name>/<Fusion>``)."""
    if not names:
        return set()
    import onnx

    return {n.name for n in onnx.load(str(pre), load_external_data=False).graph.node
            if "/" in n.name and n.name.split("/")[0] in names}


def _guard_calibration(pre: Path, calibration, opts: QuantizeOptions) -> tuple[list[str], list[str]]:
    """Exclude the nodes around tensors with non-finite (or float-min sentinel) values: their
    calibration range would be non-finite or absurd. Returns (excluded nodes, offending tensors)."""
    from edgekit.backends.onnxruntime import graph

    from edgekit.backends.onnxruntime.passes import sentinel_tensors

    try:  # from a sentinel constant (a -inf mask, even if no calibration sample is padded), or seen in the data
        bad = sorted(sentinel_tensors(pre) | set(graph.nonfinite_tensors(pre, calibration)))
    except Exception as e:  # noqa: BLE001 - the guard must never be what breaks quantization
        say(f"  WARNING: calibration guard could not run ({type(e).__name__}: {first_lines(e, 1)}); skipped")
        return [], []
    nodes = graph.nodes_touching(pre, bad, opts.op_types) if bad else []
    if nodes:
        say(f"  WARNING: calibration guard: non-finite or |x|>=1e30 values in {len(bad)} tensor(s) "
            f"({', '.join(bad[:8])}{', ...' if len(bad) > 8 else ''}); kept in float: {', '.join(nodes)}")
    return nodes, bad


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}

"""``edgekit doctor``: which toolchains are importable here, their versions, execution providers and devices."""
from __future__ import annotations

import importlib
import importlib.metadata

from edgekit.bench import machine

# (import name, distribution, what it is for, how to install it)
TOOLCHAINS = [
    ("torch", "torch", "model loading, torch.export, ONNX export", "pip install torch==2.13.0"),
    ("onnx", "onnx", "ONNX graphs", "pip install 'edgekit[onnxruntime]'"),
    ("onnxscript", "onnxscript", "torch.onnx dynamo exporter", "pip install 'edgekit[onnxruntime]'"),
    ("onnxruntime", "onnxruntime", "ONNX Runtime: quantization + CPU runtime", "pip install 'edgekit[onnxruntime]'"),
    ("openvino", "openvino", "OpenVINO runtime + converter", "pip install 'edgekit[openvino]'"),
    ("nncf", "nncf", "NNCF post-training quantization", "pip install 'edgekit[openvino]'"),
    ("litert_torch", "litert-torch", "PyTorch -> .tflite converter", "pip install 'edgekit[litert]'"),
    ("ai_edge_litert", "ai-edge-litert", "LiteRT interpreter (successor of tflite-runtime)", "pip install 'edgekit[litert]'"),
]


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def report() -> str:
    m = machine()
    lines = [f"machine: {m['cpu']} ({m['arch']}, {m['cores']} cores, ISA: {', '.join(m['isa']) or '?'})",
             f"os: {m['os']}, python {m['python']}", "", "toolchains:"]
    for mod, dist, what, install in TOOLCHAINS:
        ver = _version(dist)
        if ver is None:
            status = f"missing: {install}"
        else:
            try:
                importlib.import_module(mod)
                status = f"ok {ver}"
            except Exception as e:  # noqa: BLE001 - a broken install is exactly what doctor is for
                status = f"BROKEN {ver}: {type(e).__name__}: {e}"
        lines.append(f"  {dist:16} {status:40} {what}")
    lines.append("")
    try:
        import onnxruntime as ort

        lines.append(f"onnxruntime execution providers: {', '.join(ort.get_available_providers())}")
        if _version("onnxruntime-gpu") and _version("onnxruntime"):
            lines.append("  WARNING: onnxruntime and onnxruntime-gpu are both installed; they share the import "
                         "name and one silently wins. Use a separate environment for edgekit[onnxruntime-gpu].")
        elif "CUDAExecutionProvider" not in ort.get_available_providers():
            lines.append("  no CUDA provider: GPU latency cannot be measured here. For a GPU box: a separate "
                         "venv with edgekit[onnxruntime-gpu].")
    except ImportError:
        pass
    try:
        import openvino as ov

        lines.append(f"openvino devices: {', '.join(ov.Core().available_devices)}")
    except ImportError:
        pass
    from edgekit.profiles import available

    lines += ["", f"target profiles: {', '.join(available()) or 'none found'}"]
    return "\n".join(lines)

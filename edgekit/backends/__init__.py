"""Toolchain backends, one package each, and the one registry that describes them.

Everything outside this package learns about a toolchain from ``REGISTRY`` (packages, import names,
install hint, remote timing) or from the ``Backend`` it gets from ``get_backend``; no other module
imports a toolchain. Adding a toolchain = one package here implementing ``base.Backend`` + one entry.
"""
from __future__ import annotations

import importlib

from edgekit.backends.base import Artifact, Backend, BackendInfo, Fix, Runner
from edgekit.errors import InputError

_ORT = (("onnx", "onnx", "ONNX graphs"), ("onnxscript", "onnxscript", "torch.onnx dynamo exporter"),
        ("onnxruntime", "onnxruntime", "ONNX Runtime: quantization + CPU runtime"))

REGISTRY: dict[str, BackendInfo] = {b.name: b for b in (
    BackendInfo("onnxruntime", "edgekit.backends.onnxruntime:OnnxRuntimeBackend", ".onnx",
                packages=("onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript"), imports=_ORT,
                install_hint="pip install -e '.[onnxruntime]'", remote=True),
    BackendInfo("openvino", "edgekit.backends.openvino:OpenVinoBackend", ".xml",
                packages=("openvino", "nncf"),
                imports=(("openvino", "openvino", "OpenVINO runtime + converter"),
                         ("nncf", "nncf", "NNCF post-training quantization")),
                install_hint="pip install -e '.[openvino]'"),
    BackendInfo("litert", "edgekit.backends.litert:LiteRtBackend", ".tflite",
                packages=("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "torchao"),
                imports=(("litert_torch", "litert-torch", "PyTorch -> .tflite converter"),
                         ("ai_edge_litert", "ai-edge-litert", "LiteRT interpreter (successor of tflite-runtime)")),
                install_hint="pip install -e '.[litert]'"),
)}


def get_backend(name: str) -> Backend:
    if name not in REGISTRY:
        raise InputError(f"unknown backend {name!r}; known: {', '.join(REGISTRY)}")
    info = REGISTRY[name]
    module, cls = info.entry.split(":")
    return getattr(importlib.import_module(module), cls)(info)


def remote_backends() -> list[str]:
    return [n for n, b in REGISTRY.items() if b.remote]


__all__ = ["Artifact", "Backend", "BackendInfo", "Fix", "Runner", "REGISTRY", "get_backend", "remote_backends"]

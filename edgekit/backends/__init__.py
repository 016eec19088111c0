"""Toolchain backends, one module each. The pipeline reaches them only through ``get_backend``."""
from __future__ import annotations

import importlib

from edgekit.backends.base import Artifact, Backend, Runner
from edgekit.errors import InputError

# backend name -> "module:class"; modules import their toolchain lazily.
REGISTRY = {
    "onnxruntime": "edgekit.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "edgekit.backends.openvino:OpenVinoBackend",
    "litert": "edgekit.backends.litert:LiteRtBackend",
}


def get_backend(name: str) -> Backend:
    if name not in REGISTRY:
        raise InputError(f"unknown backend {name!r}; known: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Artifact", "Backend", "Runner", "REGISTRY", "get_backend"]

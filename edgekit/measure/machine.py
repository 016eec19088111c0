"""The machine numbers are measured on: CPU, ISA extensions that decide which int8 kernels run, OS."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict:
    """What the latency numbers were measured on."""
    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = val.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(val.split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8",
                        "amx_bf16", "asimddp", "sve")
           if f in flags]
    return {"cpu": cpu or platform.processor() or platform.machine(), "arch": platform.machine(),
            "cores": os.cpu_count(), "isa": isa, "os": platform.platform(),
            "python": platform.python_version()}


def has_vnni() -> bool:
    """x86 int8 dot-product instructions (AVX-512 VNNI or AVX-VNNI); without them int8 GEMMs use
    VPMADDUBSW, whose int16 intermediate can saturate."""
    return bool({"avx512_vnni", "avx_vnni"} & set(machine()["isa"]))


def host_device() -> str:
    return f"host-{platform.machine()}"

"""ARM kernels without a board: a target's artifacts verified on an emulated aarch64 core.

An ``ort-arm`` or ``tflite-mobile`` artifact verified on this x86 host ran x86 kernels; ARM runs others
(ONNX Runtime's ARM graph fuses QDQ pairs into QLinear* ops; NEON, dot-product or i8mm int8 kernels
chosen from the core's feature bits). With a profile's ``[verify] device = "qemu:<cpu>"`` the artifact
also runs under qemu-user on that core, with a real aarch64 CPython and PyPI's aarch64 numpy,
onnxruntime and ai-edge-litert (``edgekit.measure.aarch64``), through the backend's self-contained
runner (``Backend.remote_runner``, verify mode).

Emulation is 25-400x slower than native, so the evaluation samples run in order until ``budget_s`` is
spent (at least one); the report says how many. Latency is never taken there.

**The rule.** ARM's outputs are compared with the host's on the same samples, against the noise the
artifact already has: its distance to the fp32 torch reference. fp32 agrees within 1e-6. int8 differs
where ARM's kernels round differently (ONNX Runtime's ARM graph fuses QDQ pairs into QLinear* ops;
XNNPACK's ARM int8 kernels requantize with another rounding), at most one step per layer, which
accumulates through a deep network: on the real demo, up to 3.9 % of the output range (LiteRT,
Cortex-A76) and 2.8 % (ONNX Runtime, Cortex-A72), yet only 0.18 and 0.13 of the int8 artifact's own
RMS error against fp32. The check fails the target when **rms(ARM - x86) > tolerance x rms(x86 -
fp32 reference)** (default 0.5: ARM would add half again the quantization noise) **and** max
|ARM - x86| is over ``floor`` (1 %) of the largest host output, so float round-off never fails it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from edgekit.errors import TargetError
from edgekit.progress import say

TOLERANCE = 0.5
FLOOR = 0.01


def cpu_of(device: str) -> str:
    """``qemu:cortex-a76`` -> ``cortex-a76``."""
    return device.partition(":")[2]


def unavailable() -> Optional[str]:
    """Why the check cannot run here (None when it can), cheap: no download."""
    from edgekit.measure import aarch64

    ok, why = aarch64.availability()
    return None if ok else why


def run(backend, runtime, files: list[str], samples: list[dict], cpu: str, budget_s: float, tag: str) -> dict:
    """Run the artifact (``files``: main file first) on the samples under qemu on ``cpu`` until
    ``budget_s``; returns ``{"outputs": (n, D) array, "runtime", "machine", "seconds"}``. TargetError
    (or InputError for an unknown cpu) when it cannot."""
    from edgekit.measure import aarch64

    sysroot = aarch64.prepare(progress=lambda line: say(f"{tag} aarch64: {line}"))
    argv, env = aarch64.python_argv(sysroot, cpu)
    with tempfile.TemporaryDirectory(prefix="edgekit-arm-") as d:
        work = Path(d)
        for f in files:
            shutil.copy2(f, work / Path(f).name)
        shutil.copy2(backend.remote_runner(), work / "remote_runner.py")
        names = list(samples[0])
        np.savez(work / "samples.npz", **{k: np.stack([s[k] for s in samples]) for k in names})
        job = {"artifact": Path(files[0]).name, **backend.remote_settings(runtime), "verify": "samples.npz",
               "outputs": "outputs.npy", "budget_s": budget_s}
        (work / "job.json").write_text(json.dumps(job))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(argv + ["remote_runner.py", "job.json"], cwd=work, env=env, capture_output=True,
                                  text=True, timeout=budget_s * 4 + 600)
        except subprocess.TimeoutExpired:
            raise TargetError(f"the aarch64 check (qemu {cpu}) did not finish in {budget_s * 4 + 600:.0f} s") from None
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"ok": False, "error": f"exit {proc.returncode}: " + " | ".join(
            (proc.stdout + proc.stderr).strip().splitlines()[-3:])}
        if not result.get("ok"):
            raise TargetError(f"the aarch64 check (qemu {cpu}) failed: {result.get('error')}")
        return {"outputs": np.load(work / "outputs.npy"), "runtime": result["runtime"], "machine": result["machine"],
                "seconds": round(time.perf_counter() - t0, 1)}


def compare(arm: np.ndarray, host: np.ndarray, reference: np.ndarray, tolerance: float = TOLERANCE,
            floor: float = FLOOR) -> dict:
    """ARM's outputs against the host's on the same (first n) samples, and whether they pass the rule."""
    n = len(arm)
    a, h, ref = arm.astype(np.float64), host[:n].astype(np.float64), reference[:n].astype(np.float64)
    diff = float(np.abs(a - h).max())
    span = float(np.abs(h).max()) or 1.0
    own = float(np.sqrt(np.mean((h - ref) ** 2)))
    ratio = float(np.sqrt(np.mean((a - h) ** 2))) / own if own > 0 else (0.0 if diff == 0 else float("inf"))
    return {"max_abs_diff": diff, "relative_diff": round(diff / span, 6), "noise_ratio": round(ratio, 4),
            "top1_agreement": round(float((a.argmax(1) == h.argmax(1)).mean()), 6),
            "within_tolerance": not (ratio > tolerance and diff > floor * span)}

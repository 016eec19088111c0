"""The benchmark that runs ON a remote device (``device = "ssh:..."``), with the remote's own Python.

Self-contained on purpose: it is copied to the board next to the artifact and needs only the standard
library, numpy and the runtime (onnxruntime). edgekit is not installed there.

    python3 remote_runner.py job.json     # prints one JSON line on stdout

job.json: {"artifact": "model.onnx", "feeds": "feeds.npz", "providers": [...], "threads": 1,
           "disabled_optimizers": [...],
           "warmup": 10, "runs": 100}
The result holds raw per-run times; edgekit computes the statistics on its side, so they are the
same statistics as for host measurements.
"""
import json
import os
import platform
import sys
import time


def _machine():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and val.strip():
                    cpu = val.strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or platform.machine(), "arch": platform.machine(),
            "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version()}


def _peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return None


def run(job):
    try:
        import numpy as np
    except ImportError as e:
        return {"ok": False, "error": f"{sys.executable} on the remote cannot import numpy ({e}); "
                                      f"install it there: {sys.executable} -m pip install numpy onnxruntime"}
    try:
        import onnxruntime as ort
    except ImportError as e:
        return {"ok": False, "error": f"{sys.executable} on the remote cannot import onnxruntime ({e}); "
                                      f"install it there: {sys.executable} -m pip install onnxruntime"}
    have = ort.get_available_providers()
    providers = [p for p in job["providers"] if p in have]
    if not providers:
        return {"ok": False, "error": f"none of the profile's execution providers {job['providers']} is in the "
                                      f"remote's onnxruntime {ort.__version__} (it has {have})"}
    so = ort.SessionOptions()
    so.intra_op_num_threads = job["threads"]
    so.inter_op_num_threads = 1
    t0 = time.perf_counter()
    disabled = job.get("disabled_optimizers") or []
    sess = ort.InferenceSession(job["artifact"], so, providers=providers,
                                **({"disabled_optimizers": disabled} if disabled else {}))
    load_ms = (time.perf_counter() - t0) * 1e3
    names = {i.name for i in sess.get_inputs()}
    with np.load(job["feeds"]) as z:
        feed = {k: z[k] for k in z.files if k in names}
    for _ in range(job["warmup"]):
        sess.run(None, feed)
    times = []
    for _ in range(job["runs"]):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return {"ok": True, "seconds": times, "load_ms": round(load_ms, 2), "peak_rss_mb": _peak_rss_mb(),
            "provider": sess.get_providers()[0], "runtime": f"onnxruntime {ort.__version__}",
            "machine": _machine()}


def main(argv):
    with open(argv[1]) as f:
        job = json.load(f)
    try:
        result = run(job)
    except Exception as e:  # noqa: BLE001 - everything goes back to edgekit as the target's reason
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

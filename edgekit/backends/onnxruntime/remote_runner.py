"""The benchmark that runs ON a remote device (``device = "ssh:..."``), with the remote's own Python.

Self-contained on purpose: it is copied to the board next to the artifact and needs only the standard
library, numpy and the runtime (onnxruntime). edgekit is not installed there.

    python3 remote_runner.py job.json     # prints one JSON line on stdout

job.json: {"artifact": "model.onnx", "feeds": "feeds.npz", "providers": [...], "threads": 1,
           "disabled_optimizers": [...],
           "warmup": 10, "runs": 100}
      or, to time several artifacts in interleaved rounds (edgekit.measure.timing),
          {"artifacts": ["fp32.onnx", "int8.onnx"], ..., "warmup": 10, "rounds": 10, "per_round": 20}
      or, to verify (edgekit.measure.arm): {"artifact": ..., "verify": "samples.npz" (each input stacked
          on a new axis 0), "outputs": "outputs.npy", "budget_s": 60} -> the first output of samples in
          order, flattened, until budget_s is spent (at least one).
The result holds raw per-run times ("seconds", or "blocks": per artifact, one list per round);
edgekit computes the statistics on its side, so they are the same statistics as for host measurements.
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
    disabled = job.get("disabled_optimizers") or []

    def session(path):
        return ort.InferenceSession(path, so, providers=providers,
                                    **({"disabled_optimizers": disabled} if disabled else {}))

    if "verify" in job:  # run evaluation samples in order until the budget is spent (edgekit.measure.arm)
        sess = session(job["artifact"])
        with np.load(job["verify"]) as z:
            samples = {k: z[k] for k in z.files}
        names = {i.name for i in sess.get_inputs()}
        outs, t0 = [], time.perf_counter()
        for i in range(len(next(iter(samples.values())))):
            if outs and time.perf_counter() - t0 > job["budget_s"]:
                break
            y = sess.run(None, {k: v[i] for k, v in samples.items() if k in names})[0]
            outs.append(np.asarray(y, dtype=np.float32).reshape(-1))
        np.save(job["outputs"], np.stack(outs))
        return {"ok": True, "samples": len(outs), "seconds": round(time.perf_counter() - t0, 2),
                "provider": sess.get_providers()[0], "runtime": f"onnxruntime {ort.__version__}",
                "machine": _machine()}
    with np.load(job["feeds"]) as z:
        arrays = {k: z[k] for k in z.files}

    def feed_of(sess):
        names = {i.name for i in sess.get_inputs()}
        return {k: v for k, v in arrays.items() if k in names}

    info = {"runtime": f"onnxruntime {ort.__version__}", "machine": _machine()}
    if "artifacts" in job:  # interleaved rounds over several artifacts (edgekit.measure.timing)
        sessions = {name: session(name) for name in job["artifacts"]}
        feeds = {name: feed_of(s) for name, s in sessions.items()}
        for name, sess in sessions.items():
            for _ in range(job["warmup"]):
                sess.run(None, feeds[name])
        names = list(sessions)
        blocks = {name: [] for name in names}
        for r in range(job["rounds"]):
            shift = (r // 2) % len(names)  # rotate every other round, flip in between: ABBA for two
            order = names[shift:] + names[:shift]
            for name in (order if r % 2 == 0 else order[::-1]):
                sess, feed, block = sessions[name], feeds[name], []
                for _ in range(job["per_round"]):
                    t = time.perf_counter()
                    sess.run(None, feed)
                    block.append(time.perf_counter() - t)
                blocks[name].append(block)
        provider = next(iter(sessions.values())).get_providers()[0]
        return {"ok": True, "blocks": blocks, "provider": provider, **info}
    t0 = time.perf_counter()
    sess = session(job["artifact"])
    load_ms = (time.perf_counter() - t0) * 1e3
    feed = feed_of(sess)
    for _ in range(job["warmup"]):
        sess.run(None, feed)
    times = []
    for _ in range(job["runs"]):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return {"ok": True, "seconds": times, "load_ms": round(load_ms, 2), "peak_rss_mb": _peak_rss_mb(),
            "provider": sess.get_providers()[0], **info}


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

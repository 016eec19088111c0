"""LiteRT's runner for another machine's Python (an emulated aarch64 one: ``edgekit.measure.arm``).

Self-contained on purpose: it is copied next to the artifact and needs only the standard library, numpy
and ``ai-edge-litert``. It feeds and reads the model as edgekit's host runner does
(``edgekit.backends.litert._LiteRtRunner``): recipe input names, or ``args_i`` in recipe order; float
inputs quantized into an int8 input; integer outputs dequantized; outputs in signature order.

    python3 remote_runner.py job.json     # prints one JSON line on stdout

job.json: {"artifact": "model.tflite", "threads": 1, "xnnpack": true, "verify": "samples.npz" (each input
           stacked on a new axis 0), "outputs": "outputs.npy", "budget_s": 60}
-> the first output of the samples in order, flattened, until budget_s is spent (at least one).
"""
import json
import os
import platform
import sys
import time


def _machine():
    return {"cpu": platform.processor() or platform.machine(), "arch": platform.machine(),
            "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version()}


def output_order(name):
    """Signature outputs in the model's order (``output_0``, ``output_1``, ...)."""
    tail = name.rsplit("_", 1)[-1]
    return (0, int(tail)) if tail.isdigit() else (1, name)


def to_input(x, detail):
    """A recipe input as the interpreter takes it: a float array quantized into an int8 input."""
    import numpy as np

    dtype = np.dtype(detail["dtype"])
    scale, zero = detail["quantization"]
    if x.dtype.kind == "f" and dtype.kind in "iu" and scale:
        info = np.iinfo(dtype)
        x = np.clip(np.round(x / scale) + zero, info.min, info.max)
    return x.astype(dtype, copy=False)


def from_output(y, detail):
    """An output as float: an integer output dequantized."""
    import numpy as np

    scale, zero = detail["quantization"]
    return (y.astype(np.float32) - zero) * scale if y.dtype.kind in "iu" and scale else y


def run(job):
    import numpy as np
    from ai_edge_litert import __version__ as version
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kwargs = {} if job.get("xnnpack", True) else \
        {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    interp = Interpreter(model_path=job["artifact"], num_threads=job.get("threads", 1), **kwargs)
    interp.allocate_tensors()
    runner = interp.get_signature_runner(next(iter(interp.get_signature_list())))
    ins, outs_d = runner.get_input_details(), runner.get_output_details()
    positional = all(n.startswith("args_") for n in ins)
    with np.load(job["verify"]) as z:
        samples = {k: z[k] for k in z.files}
    order = list(samples)

    def feed(i):
        return {name: to_input(samples[order[int(name.split("_")[1])]][i] if positional else samples[name][i], d)
                for name, d in ins.items()}

    first = sorted(outs_d, key=output_order)[0]
    outs, t0 = [], time.perf_counter()
    for i in range(len(samples[order[0]])):
        if outs and time.perf_counter() - t0 > job["budget_s"]:
            break
        y = from_output(runner(**feed(i))[first], outs_d[first])
        outs.append(np.asarray(y, dtype=np.float32).reshape(-1))
    np.save(job["outputs"], np.stack(outs))
    return {"ok": True, "samples": len(outs), "seconds": round(time.perf_counter() - t0, 2),
            "provider": "XNNPACK" if job.get("xnnpack", True) else "builtin kernels",
            "runtime": f"ai-edge-litert {version}", "machine": _machine()}


def main(argv):
    with open(argv[1]) as f:
        job = json.load(f)
    try:
        result = run(job)
    except Exception as e:  # noqa: BLE001 - everything goes back to edgekit as the reason
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

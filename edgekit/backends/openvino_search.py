"""OpenVINO (NNCF)'s side of the accuracy-aware quantization search.

``sensitivity`` reads the quantized IR with OpenVINO, adds the input and the output of every activation
``FakeQuantize`` as model outputs, runs a few calibration samples (same f32 compile settings as the
runtime) and ranks the FakeQuantize nodes by SQNR (dB) between the two: the local quantization noise of
each activation. ``candidates`` then keeps the ops fed by the 1, 2, 4, ... worst ones out of int8 with
NNCF's ``ignored_scope`` and re-quantizes. (``nncf.quantize_with_accuracy_control`` ranks every quantizer
group by re-validating the model with that group reverted: hundreds of compiles and validations on the
real demo, beyond a minutes budget on 2 cores, so the search ranks with one pass instead.)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np

from edgekit.progress import say


def sensitivity(xml: Path, calibration, runtime, samples: int = 4) -> list[tuple[list[str], float]]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(xml))
    fqs = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
           and op.input_value(0).get_node().get_type_name() not in ("Constant", "Convert")]
    if not fqs:
        return []
    ins = model.add_outputs([fq.input_value(0) for fq in fqs])
    outs = model.add_outputs([fq.output(0) for fq in fqs])
    compiled = core.compile_model(model, runtime.device, {"INFERENCE_PRECISION_HINT": runtime.inference_precision,
                                                          "INFERENCE_NUM_THREADS": runtime.threads})
    req = compiled.create_infer_request()
    names = {p.get_any_name() for p in compiled.inputs}
    n_out = len(compiled.outputs) - 2 * len(fqs)
    sig = np.zeros(len(fqs))
    noise = np.zeros(len(fqs))
    for i in range(min(samples, len(calibration))):
        res = req.infer({k: v for k, v in calibration.sample(i).items() if k in names})
        vals = [np.asarray(res[compiled.outputs[j]], dtype=np.float64) for j in range(len(compiled.outputs))]
        for j in range(len(fqs)):
            x, y = vals[n_out + j], vals[n_out + len(fqs) + j]
            sig[j] += float((x ** 2).sum())
            noise[j] += float(((x - y) ** 2).sum())
    del ins, outs
    ranked = []
    for j, fq in enumerate(fqs):
        consumers = sorted({t.get_node().get_friendly_name() for t in fq.output(0).get_target_inputs()})
        db = math.inf if noise[j] == 0 else (10 * math.log10(sig[j] / noise[j]) if sig[j] > 0 else -math.inf)
        ranked.append((consumers, db))
    return sorted(ranked, key=lambda t: t[1])


def candidates(fp32, opts, ctx) -> Iterator:
    from edgekit.quantize_search import Candidate

    best = ctx.best
    base = best.candidate.opts or opts
    say(f"[{ctx.target}] quantize search: FakeQuantize SQNR on {min(4, len(ctx.calibration))} calibration samples")
    ranked = sensitivity(Path(best.artifact.path), ctx.calibration, ctx.runtime)
    if not ranked:
        return
    say(f"[{ctx.target}] quantize search: worst activations (SQNR dB): "
        + ", ".join(f"{'/'.join(c)[:60]} {s:.1f}" for c, s in ranked[:5]))
    k = 1
    while True:
        names = sorted(set(base.ignored_scope.names) | {n for c, _ in ranked[:k] for n in c})
        scope = base.ignored_scope.model_copy(update={"names": names, "validate_names": False})
        yield Candidate(f"float fallback (NNCF ignored_scope): ops fed by the {min(k, len(ranked))} "
                        f"lowest-SQNR activations ({len(names)} ops)",
                        base.model_copy(update={"ignored_scope": scope}), kept_float=names)
        if k >= len(ranked):
            return
        k *= 2

"""OpenVINO (NNCF)'s side of the accuracy-aware quantization search.

``sensitivity`` reads the quantized IR with OpenVINO, adds the input and the output of every activation
``FakeQuantize`` as model outputs, runs a few calibration samples (same f32 compile settings as the
runtime) and ranks the FakeQuantize nodes by the median per-channel SQNR between the two
(``quantize_search.channel_sqnr``): the local quantization noise of each activation. ``candidates`` then keeps the ops fed by the 1, 2, 4, ... worst ones out of int8 with
NNCF's ``ignored_scope`` and re-quantizes. (``nncf.quantize_with_accuracy_control`` ranks every quantizer
group by re-validating the model with that group reverted: hundreds of compiles and validations on the
real demo, beyond a minutes budget on 2 cores, so the search ranks with one pass instead.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from edgekit.progress import say
from edgekit.quantize_search import channel_sqnr


def sensitivity(xml: Path, calibration, runtime, samples: int = 4) -> list[tuple[list[str], float]]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(xml))
    fqs = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
           and op.input_value(0).get_node().get_type_name() not in ("Constant", "Convert")]
    if not fqs:
        return []
    consumers = [sorted({t.get_node().get_friendly_name() for t in fq.output(0).get_target_inputs()
                         if t.get_node().get_type_name() != "Result"}) for fq in fqs]
    model.add_outputs([fq.input_value(0) for fq in fqs] + [fq.output(0) for fq in fqs])

    def key(port) -> tuple:
        return port.get_node().get_friendly_name(), port.get_index()

    index = {}
    for i, out in enumerate(model.outputs):  # a Result per output, in the compiled model's order
        index.setdefault(key(out.get_node().input_value(0)), i)
    compiled = core.compile_model(model, runtime.device, {"INFERENCE_PRECISION_HINT": runtime.inference_precision,
                                                          "INFERENCE_NUM_THREADS": runtime.threads})
    req = compiled.create_infer_request()
    names = {p.get_any_name() for p in compiled.inputs}
    pre: list[list] = [[] for _ in fqs]
    post: list[list] = [[] for _ in fqs]
    for i in range(min(samples, len(calibration))):
        res = req.infer({k: v for k, v in calibration.sample(i).items() if k in names})
        vals = [np.asarray(res[compiled.outputs[j]]) for j in range(len(compiled.outputs))]
        for j, fq in enumerate(fqs):
            pre[j].append(vals[index[key(fq.input_value(0))]])
            post[j].append(vals[index[key(fq.output(0))]])
    ranked = [(consumers[j], channel_sqnr(pre[j], post[j])) for j in range(len(fqs))]
    return sorted(ranked, key=lambda t: t[1])


def candidates(fp32, opts, ctx) -> Iterator:
    """Greedy and re-measured, like ORT's: rank the latest artifact's activations, keep the ops fed by
    its k worst (k = 1, 2, 4, ...) out of int8, re-quantize, re-rank."""
    from edgekit.quantize_search import Candidate

    art = ctx.best.artifact
    base = ctx.best.candidate.opts or opts
    kept = set(base.ignored_scope.names)
    k = 1
    while True:
        say(f"[{ctx.target}] quantize search: per-channel SQNR of each activation FakeQuantize on "
            f"{min(4, len(ctx.calibration))} calibration samples")
        ranked = sensitivity(Path(art.path), ctx.calibration, ctx.runtime)
        fresh = [(c, v) for c, v in ranked if set(c) - kept]
        if not fresh:
            return
        say(f"[{ctx.target}] quantize search: worst activations (median per-channel SQNR, dB): "
            + ", ".join(f"{'/'.join(c)[:60]} {v:.1f}" for c, v in fresh[:5]))
        k = max(k, sum(1 for _, v in fresh if v < 10.0))  # every broken activation at once (see ort_search)
        for c, _ in fresh[:k]:
            kept |= set(c)
        scope = base.ignored_scope.model_copy(update={"names": sorted(kept), "validate_names": False})
        yield Candidate(f"float fallback (NNCF ignored_scope): ops fed by the {min(k, len(fresh))} worst "
                        f"activations ({len(kept)} ops in all)",
                        base.model_copy(update={"ignored_scope": scope}), kept_float=sorted(kept))
        art = ctx.history[-1].artifact
        k *= 2

"""edgekit vs each vendor's own tool, side by side (issue 16): the same model, the same calibration data,
every artifact verified on the whole evaluation set and timed interleaved with the others of its runtime.

For each runtime, what a user would run instead of edgekit, from the recipe's model and calibration set:

  onnxruntime  ort-default        quant_pre_process + quantize_static with ORT's defaults (QDQ, S8S8,
                                  per-tensor weights, MinMax, every op type it quantizes)
               ort-per-channel    the same with per_channel=True and op_types_to_quantize=Conv/MatMul/Gemm
                                  (ORT's documented first fix for an accuracy drop)
  openvino     nncf-default       nncf.quantize with the default preset
               nncf-transformer   nncf.quantize(model_type=TRANSFORMER)
               nncf-ac            nncf.quantize_with_accuracy_control (TRANSFORMER; validation = the recipe's
                                  metric on the first --ac-samples evaluation samples, --ac-max-drop); slow
               ov-bf16            the fp32 IR compiled with the plugin's defaults: no INFERENCE_PRECISION_HINT,
                                  i.e. bf16 on CPUs with AVX512-BF16/AMX (the same loader with "bf16")
  litert       pt2e               litert-torch PT2E, its default quantizer config
                                  (get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
               pt2e-per-tensor    the same with is_per_channel=False
               aeq                AI Edge Quantizer's static int8 recipe (static_wi8_ai8) on the fp32 .tflite

The fp32 inputs of the vendor flows are edgekit's own fp32 exports: the run folder's (--run DIR) when it has
one for that backend, else exported here with edgekit's backend (torch.onnx.export dynamo, opset from the
profile; ov.convert_model(torch.export.export(...)) with static shapes; litert_torch.convert).

With --run DIR (an `edgekit run` output folder), edgekit's artifacts listed in DIR/report.json (fp32, the
shipped "optimized" one, extras) are measured next to the vendor ones. Every artifact is loaded with
edgekit's backend loader and the runtime options of the target's profile (edgekit.config.profiles), so
runtime settings are identical to edgekit's (1 thread; OpenVINO's f32 hint; LiteRT's XNNPACK; ORT's
disabled optimizers). Vendor artifacts run on the same loaders.

Accuracy: the recipe's metric on every evaluation sample (drop vs fp32 torch), and, for a joint-class
top-1 task, per-factor accuracy (--factors). Latency: per runtime, all artifacts loaded in this process,
then --rounds rounds of --calls calls each on evaluation sample 0, the order rotating every round; per
artifact the median of its per-round p50s, the per-round ratio to the runtime's fp32 (median, min-max),
and thread CPU time (time.thread_time(), steadier than wall time on a shared machine).

Verdict per runtime (the issue's question): edgekit's shipped artifact vs the fastest vendor flow within
--max-drop (the recipe's max_metric_drop gate, else 0.010; fp32 if no vendor flow is), as the per-round
ratio of their p50s; the goal is >= --goal (1.3x).

A flow that fails is a row marked failed with its error; the run goes on. Builds run one at a time, each in
a child process (a native crash or a memory blow-up fails that row only), and are cached under --work keyed
by the fp32 artifact's bytes (or the model's weights), the calibration data, the flow's settings and the
toolchain versions: a re-run reuses them (--rebuild FLOW to force). Verification outputs are cached by the
artifact's bytes and runtime settings.

Examples (from the repository root, with the venv's python):

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 EDGEKIT_TORCH_THREADS=1 \\
      .venv/bin/python benchmarks/vendor_flows.py --run runs/demo --json runs/vendor_flows.json
    .venv/bin/python benchmarks/vendor_flows.py --run runs/demo --skip ac          # without the slow flow
    .venv/bin/python benchmarks/vendor_flows.py --run runs/demo --flows ort,aeq    # ORT's flows + AEQ only
    .venv/bin/python benchmarks/vendor_flows.py --list
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without an installed edgekit
    sys.path.insert(0, str(ROOT))

DEFAULT_RECIPE = ROOT / "examples" / "mnist_bbc" / "edgekit.toml"
DEFAULT_PROFILE = {"onnxruntime": "ort-cpu", "openvino": "openvino-x86", "litert": "tflite-mobile"}
RUNTIME_ALIASES = {"ort": "onnxruntime", "onnxruntime": "onnxruntime", "ov": "openvino", "openvino": "openvino",
                   "nncf": "openvino", "litert": "litert", "tflite": "litert"}


@dataclass(frozen=True)
class Flow:
    name: str
    backend: str
    what: str
    source: str              # "fp32": built from the fp32 artifact; "model": from the torch model; "none": no build
    params: dict = field(default_factory=dict)
    runtime_update: dict = field(default_factory=dict)  # changes to the profile's runtime options (ov-bf16)
    aliases: tuple[str, ...] = ()


FLOWS: dict[str, Flow] = {f.name: f for f in (
    Flow("ort-default", "onnxruntime", "quantize_static, ORT defaults (QDQ S8S8, per-tensor, MinMax, all op types)",
         "fp32", {}),
    Flow("ort-per-channel", "onnxruntime", "quantize_static, per_channel, op_types Conv/MatMul/Gemm (ORT's first fix)",
         "fp32", {"per_channel": True, "op_types_to_quantize": ["Conv", "MatMul", "Gemm"]}, aliases=("per-channel",)),
    Flow("nncf-default", "openvino", "nncf.quantize, default preset", "fp32", {}),
    Flow("nncf-transformer", "openvino", "nncf.quantize, model_type=TRANSFORMER", "fp32", {"model_type": "transformer"},
         aliases=("transformer",)),
    Flow("nncf-ac", "openvino", "nncf.quantize_with_accuracy_control, TRANSFORMER", "fp32",
         {"model_type": "transformer", "accuracy_control": True}, aliases=("ac",)),
    Flow("ov-bf16", "openvino", "fp32 IR, plugin default compile (no precision hint: bf16 here)", "none",
         runtime_update={"inference_precision": "bf16"}, aliases=("bf16",)),
    Flow("pt2e", "litert", "litert-torch PT2E, default config (symmetric, per-channel, static)", "model",
         {"is_per_channel": True}),
    Flow("pt2e-per-tensor", "litert", "litert-torch PT2E, symmetric per-tensor, static", "model",
         {"is_per_channel": False}, aliases=("per-tensor",)),
    Flow("aeq", "litert", "AI Edge Quantizer static_wi8_ai8 on the fp32 .tflite", "fp32", {"recipe": "static_wi8_ai8"},
         aliases=("ai-edge-quantizer",)),
)}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    from edgekit.orchestrate.cache import file_sha256 as sha

    return sha(path)


def first_lines(text: str, n: int = 4) -> str:
    return " | ".join(ln.strip() for ln in str(text).strip().splitlines()[:n] if ln.strip())


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def size_mb(files: list[Path]) -> float:
    return round(sum(Path(f).stat().st_size for f in files) / 1e6, 2)


# ================================================================================================ child jobs
# Run as `vendor_flows.py --_job JOB.json` in a child process; write JOB's out/meta.json.

def _child(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    meta: dict[str, Any] = {"kind": job["kind"], "flow": job.get("flow"), "notes": []}
    t0 = time.perf_counter()
    try:
        from edgekit.inputs.model import configure_torch

        configure_torch()
        if job["kind"] == "export":
            _job_export(job, out, meta)
        elif job["kind"] == "reference":
            _job_reference(job, out, meta)
        else:
            BUILDERS[job["flow"]](job, out, meta)
        meta["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - a failed flow is a result
        meta["status"] = "failed"
        meta["error"] = f"{type(e).__name__}: {first_lines(str(e))}"
        meta["traceback"] = traceback.format_exc()
        say(meta["traceback"])
    meta["build_s"] = round(time.perf_counter() - t0, 1)
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return 0


def _recipe_bits(job):
    from edgekit.config.recipe import load_recipe
    from edgekit.inputs.data import load_calibration

    recipe = load_recipe(job["recipe"])
    return recipe, load_calibration(recipe)


def _torch_model(recipe, calib):
    from edgekit.inputs.model import example_inputs, load_model

    model = load_model(recipe)
    return model, example_inputs(recipe.model.inputs, calib.sample(0))  # edgekit exports with this sample


def _job_export(job, out: Path, meta: dict) -> None:
    """fp32 export with edgekit's backend and the profile's export options (what `edgekit run` ships)."""
    from edgekit.backends import get_backend
    from edgekit.config.profiles import load_profile

    recipe, calib = _recipe_bits(job)
    prof = load_profile(job["profile"], recipe.root)
    backend = get_backend(prof.backend)
    export_opts, _, _ = backend.options(prof)
    model, args = _torch_model(recipe, calib)
    art = backend.export_fp32(model, args, recipe.model.inputs, out, export_opts)
    meta.update(artifact=Path(art.path).name, files=[Path(f).name for f in art.files], precision=art.precision)


def _job_reference(job, out: Path, meta: dict) -> None:
    from edgekit.inputs.data import load_evaluation
    from edgekit.inputs.model import reference_outputs

    recipe, calib = _recipe_bits(job)
    evals = load_evaluation(recipe)
    model, _ = _torch_model(recipe, calib)
    np.save(out / "reference.npy", reference_outputs(model, recipe.model.inputs, evals))
    meta.update(artifact="reference.npy", files=["reference.npy"])


# -- onnxruntime ---------------------------------------------------------------------------------------------

def _build_ort(job, out: Path, meta: dict) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _, calib = _recipe_bits(job)
    params = FLOWS[job["flow"]].params
    pre = out / "model_fp32.pre.onnx"
    try:  # ORT's docs: pre-process (symbolic shape inference + optimization) before quantize_static
        quant_pre_process(job["fp32"], str(pre))
    except Exception as e:  # noqa: BLE001 - what a user does next: the documented switch that skips it
        meta["notes"].append(f"quant_pre_process failed ({type(e).__name__}: {first_lines(str(e), 1)}); "
                             f"re-run with skip_symbolic_shape=True")
        quant_pre_process(job["fp32"], str(pre), skip_symbolic_shape=True)
    names = [i.name for i in onnx.load(str(pre), load_external_data=False).graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calib)

        def get_next(self):
            s = next(self._it, None)
            return None if s is None else {k: v for k, v in s.items() if k in names}

    path = out / "model_int8.onnx"
    cwd = os.getcwd()
    os.chdir(out)  # ORT writes its augmented calibration model next to the working directory on some versions
    try:
        quantize_static(str(pre), str(path), Reader(), **params)
    finally:
        os.chdir(cwd)
        pre.unlink(missing_ok=True)
        for stray in out.glob("augmented_model*"):
            stray.unlink(missing_ok=True)
    files = [path] + [p for p in out.glob("model_int8.onnx.data")]
    meta.update(artifact=path.name, files=[f.name for f in files],
                precision=("int8 QDQ " + ", ".join(f"{k}={v}" for k, v in params.items())) if params
                else "int8 QDQ (quantize_static defaults)")


# -- openvino / nncf -----------------------------------------------------------------------------------------

def _build_nncf(job, out: Path, meta: dict) -> None:
    import nncf
    import openvino as ov

    recipe, calib = _recipe_bits(job)
    params = FLOWS[job["flow"]].params
    ir = ov.Core().read_model(job["fp32"])
    kwargs: dict = {}
    if params.get("model_type") == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    calibration = nncf.Dataset(list(calib))
    if params.get("accuracy_control"):
        validation, validate = _ac_validation(job, recipe)
        kwargs["max_drop"] = job["ac_max_drop"]
        t0 = time.perf_counter()
        q = nncf.quantize_with_accuracy_control(ir, calibration, validation, validate, **kwargs)
        meta["notes"].append(f"accuracy control: {validate.calls} validations ({validate.items} samples) "
                             f"in {time.perf_counter() - t0:.0f} s; validation = {recipe.data.metric} on the first "
                             f"{job['ac_samples']} evaluation samples, max_drop {job['ac_max_drop']}")
    else:
        q = nncf.quantize(ir, calibration, **kwargs)
    path = out / "model_int8.xml"
    ov.save_model(q, str(path))  # the vendor default: float weights left in the IR are compressed to fp16
    fq = sum(op.get_type_name() == "FakeQuantize" for op in q.get_ops())
    meta["notes"].append(f"{fq} FakeQuantize ops; saved with ov.save_model defaults (compress_to_fp16=True)")
    meta.update(artifact=path.name, files=[path.name, path.with_suffix(".bin").name],
                precision="int8 NNCF" + (f" ({', '.join(f'{k}={v}' for k, v in params.items())})" if params else ""))


def _ac_validation(job, recipe):
    """NNCF's validation_fn: the recipe's metric (top1 on labels, or cosine to fp32 torch) on the first
    ``ac_samples`` evaluation samples, with NNCF's per-sample values."""
    import nncf

    from edgekit.inputs.data import load_evaluation

    evals = load_evaluation(recipe)
    n = min(job["ac_samples"], len(evals))
    labels = evals.labels
    ref = np.load(job["reference"]) if job.get("reference") else None
    items = [(evals.sample(i), i) for i in range(n)]

    class Validate:
        calls = 0
        items = 0

        def __call__(self, compiled, data):
            req = compiled.create_infer_request()
            names = {p.get_any_name() for p in compiled.inputs}
            per = []
            for feeds, i in data:
                y = np.asarray(req.infer({k: v for k, v in feeds.items() if k in names})[compiled.outputs[0]])
                y = y.reshape(-1).astype(np.float64)
                if recipe.data.metric == "top1":
                    per.append(float(y.argmax() == int(labels[i])))
                else:
                    r = ref[i].astype(np.float64)
                    per.append(float(y @ r / max(np.linalg.norm(y) * np.linalg.norm(r), 1e-30)))
            Validate.calls += 1
            Validate.items += len(per)
            return float(np.mean(per)), per

    return nncf.Dataset(items, lambda it: it[0]), Validate()


# -- litert --------------------------------------------------------------------------------------------------

def _build_pt2e(job, out: Path, meta: dict) -> None:
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
    from edgekit.inputs.model import example_inputs

    recipe, calib = _recipe_bits(job)
    params = FLOWS[job["flow"]].params
    model, args = _torch_model(recipe, calib)
    quantizer = PT2EQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=params["is_per_channel"], is_dynamic=False))
    gm = torch.export.export(model, args).module()
    gm = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        for s in calib:
            gm(*example_inputs(recipe.model.inputs, s))
    gm = convert_pt2e(gm, fold_quantize=False)
    path = out / "model_int8.tflite"
    litert_torch.convert(gm, args, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))
    meta.update(artifact=path.name, files=[path.name],
                precision=f"int8 PT2E ({'per-channel' if params['is_per_channel'] else 'per-tensor'}, static)")


def _build_aeq(job, out: Path, meta: dict) -> None:
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe as aeq_recipe

    _, calib = _recipe_bits(job)
    interp = Interpreter(model_path=job["fp32"])
    key = next(iter(interp.get_signature_list()))
    details = interp.get_signature_runner(key).get_input_details()
    def feed(sample: dict) -> dict:  # the .tflite's own input names and dtypes (ids int32 after conversion)
        values = list(sample.values())
        fed = {}
        for name, d in details.items():
            x = values[int(name.split("_")[1])] if name.startswith("args_") and name not in sample else sample[name]
            fed[name] = np.ascontiguousarray(x.astype(np.dtype(d["dtype"]), copy=False))
        return fed

    threads = len(os.sched_getaffinity(0))
    qt = quantizer.Quantizer(job["fp32"], getattr(aeq_recipe, FLOWS[job["flow"]].params["recipe"])())
    result = qt.calibrate({key: [feed(s) for s in calib]}, num_threads=threads)
    path = out / "model_int8.tflite"
    qt.quantize(result).export_model(str(path), overwrite=True)
    meta["notes"].append(f"calibrate(num_threads={threads}) (the default 16 only changes the speed)")
    meta.update(artifact=path.name, files=[path.name], precision="int8 AI Edge Quantizer static_wi8_ai8 (min/max)")


BUILDERS: dict[str, Callable] = {"ort-default": _build_ort, "ort-per-channel": _build_ort,
                                 "nncf-default": _build_nncf, "nncf-transformer": _build_nncf,
                                 "nncf-ac": _build_nncf, "pt2e": _build_pt2e, "pt2e-per-tensor": _build_pt2e,
                                 "aeq": _build_aeq}


# ============================================================================================= parent side

@dataclass
class Built:
    status: str                 # ok | failed
    path: Optional[Path] = None
    files: list[Path] = field(default_factory=list)
    precision: str = ""
    build_s: Optional[float] = None
    error: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    cached: bool = False
    folder: Optional[Path] = None


def run_child(job: dict, folder: Path, label: str, timeout_s: float, mem_gb: float, pin: int) -> Built:
    """Run one child job into ``folder`` (built in ``folder.partial``, renamed when it wrote its meta)."""
    if (folder / "meta.json").is_file():
        return _built(folder, cached=True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    job = {**job, "out": str(partial)}
    (partial / "job.json").write_text(json.dumps(job, indent=2))
    log = partial / "build.log"
    say(f"[{label}] building in a child process (log: {folder / 'build.log'}) ...")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("EDGEKIT_TORCH_THREADS", "1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_job", str(partial / "job.json")]
    if pin:
        cpus = sorted(os.sched_getaffinity(0))[-pin:]
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    t0 = time.perf_counter()
    peak, why = 0.0, None
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        while proc.poll() is None:
            time.sleep(1.0)
            rss = _rss_gb(proc.pid)
            peak = max(peak, rss)
            if rss > mem_gb:
                why = f"killed: resident memory {rss:.1f} GB over --build-mem-gb {mem_gb:g}"
            elif time.perf_counter() - t0 > timeout_s:
                why = f"killed: over --build-timeout {timeout_s:.0f} s"
            if why:
                proc.kill()
                proc.wait()
                break
    seconds = round(time.perf_counter() - t0, 1)
    if why is None and (partial / "meta.json").is_file():
        meta = json.loads((partial / "meta.json").read_text())
        meta["peak_rss_gb"] = round(peak, 2)
        (partial / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        b = _built(folder)
        say(f"[{label}] {b.status} in {seconds:.0f} s" + (f": {b.error}" if b.error else ""))
        return b
    tail = log.read_text(errors="replace").strip().splitlines()[-6:] if log.is_file() else []
    why = why or f"the child process died (exit code {proc.returncode})"
    say(f"[{label}] FAILED after {seconds:.0f} s: {why}; last output:\n  " + "\n  ".join(tail))
    # not cached: a crash, a timeout or a memory kill may depend on the machine's state; the log stays
    return Built("failed", build_s=seconds, error=f"{why}; last output: {first_lines(chr(10).join(tail[-2:]), 2)}",
                 folder=partial)


def _rss_gb(pid: int) -> float:
    """Resident memory of a process and its children, in GB (from /proc)."""
    total = 0
    pids = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024 / 1024


def _built(folder: Path, cached: bool = False) -> Built:
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("status") != "ok":
        return Built("failed", build_s=meta.get("build_s"), error=meta.get("error"), notes=meta.get("notes", []),
                     cached=cached, folder=folder)
    return Built("ok", folder / meta["artifact"], [folder / f for f in meta["files"]], meta.get("precision", ""),
                 meta.get("build_s"), notes=meta.get("notes", []), cached=cached, folder=folder)


# -- rows ------------------------------------------------------------------------------------------------

@dataclass
class Row:
    group: str                   # the runtime group (a target profile name)
    backend: str
    flow: str
    what: str
    kind: str                    # "fp32" | "edgekit" | "vendor"
    path: Optional[Path] = None
    files: list[Path] = field(default_factory=list)
    runtime: Any = None          # the backend's RuntimeOptions
    status: str = "ok"
    error: Optional[str] = None
    build_s: Optional[float] = None
    notes: list[str] = field(default_factory=list)
    size_mb: Optional[float] = None
    acc: dict = field(default_factory=dict)
    lat: dict = field(default_factory=dict)
    cached: bool = False         # the build came from --work
    runner: Any = None


@dataclass
class Group:
    name: str
    backend: str
    profile: Any
    runtime: Any
    fp32: Optional[Path] = None              # the fp32 artifact the vendor flows start from
    fp32_from: str = ""
    rows: list[Row] = field(default_factory=list)
    load_before: str = ""
    load_after: str = ""
    verdict: dict = field(default_factory=dict)


class Bench:
    def __init__(self, args):
        from edgekit.config.recipe import load_recipe

        self.args = args
        self.work = Path(args.work).resolve()
        self.report = None
        self.run_dir = Path(args.run).resolve() if args.run else None
        if self.run_dir is not None:
            rj = self.run_dir / "report.json"
            if not rj.is_file():
                raise SystemExit(f"--run {args.run}: no report.json there (an `edgekit run` output folder)")
            self.report = json.loads(rj.read_text())
        recipe_path = args.recipe or (self.report or {}).get("recipe", {}).get("path") or DEFAULT_RECIPE
        self.recipe = load_recipe(recipe_path)
        from edgekit.inputs.data import load_calibration, load_evaluation

        self.calib = load_calibration(self.recipe)
        self.evals = load_evaluation(self.recipe)
        if args.eval_limit:
            n = min(args.eval_limit, len(self.evals))
            self.evals.arrays = {k: v[:n] for k, v in self.evals.arrays.items()}
            self.evals.labels = self.evals.labels[:n] if self.evals.labels is not None else None
        self.calib_sha = file_sha256(self.calib.path)
        self.eval_sha = file_sha256(self.evals.path)
        self._model_digest: Optional[str] = None
        self.reference: Optional[np.ndarray] = None
        self.fp32_metric: Optional[float] = None
        self.fp32_from = ""
        self.factors = parse_factors(args.factors)
        gates = self.recipe.gates
        self.max_drop = args.max_drop if args.max_drop is not None else (
            getattr(gates, "max_metric_drop", None) or 0.010)

    # -- identities ----------------------------------------------------------------------------------------
    def versions(self, backend: str) -> dict:
        from edgekit.backends import get_backend
        import torch

        return {**get_backend(backend).versions(), "torch": torch.__version__, "numpy": np.__version__}

    def model_digest(self) -> str:
        if self._model_digest is None:
            from edgekit.inputs.model import configure_torch, load_model
            from edgekit.orchestrate.cache import model_digest

            configure_torch()
            src = self.recipe.model.source
            src_file = self.recipe.resolve(src if src.endswith(".pt2") else src.rpartition(":")[0])
            say("[vendor] model digest (state_dict + source) for the build cache keys ...")
            model = load_model(self.recipe)
            self._model_digest = digest({"weights": model_digest(model, src_file), "source": src,
                                         "inputs": [i.model_dump() for i in self.recipe.model.inputs]})
            del model
            gc.collect()
        return self._model_digest

    def job(self, kind: str, **kw) -> dict:
        return {"kind": kind, "recipe": str(self.recipe.path), **kw}

    def child(self, job: dict, folder: Path, label: str) -> Built:
        if label.split(" ")[0] in self.args.rebuild and (folder / "meta.json").is_file():
            shutil.rmtree(folder)
        a = self.args
        return run_child(job, folder, label, a.build_timeout, a.build_mem_gb, a.build_cpus)

    # -- fp32 torch reference ------------------------------------------------------------------------------
    def fp32_reference(self) -> None:
        """The fp32 torch metric drops are measured against: the run's report.json when it scored the same
        evaluation file the same way, else computed here (cached). Cosine needs the outputs themselves."""
        from edgekit.measure.verify import score

        metric = self.recipe.data.metric
        rep = (self.report or {}).get("eval") or {}
        same = (metric == "top1" and not self.args.eval_limit and rep.get("fp32_torch") is not None
                and rep.get("metric") == metric and rep.get("n") == len(self.evals) and rep.get("path")
                and Path(rep["path"]).is_file() and file_sha256(Path(rep["path"])) == self.eval_sha)
        if same:
            self.fp32_metric = float(rep["fp32_torch"])
            self.fp32_from = f"{self.run_dir.name}/report.json eval.fp32_torch"
            return
        self.reference = self.reference_outputs()
        self.fp32_metric = score(metric, self.reference, self.reference, self.evals.labels)
        self.fp32_from = "fp32 torch, computed here"

    def reference_outputs(self) -> np.ndarray:
        if self.reference is None:
            key = digest({"what": "reference", "model": self.model_digest(), "eval": self.eval_sha,
                          "torch": self.versions("onnxruntime")["torch"]})
            b = self.child(self.job("reference"), self.work / "reference" / key[:16], "reference fp32 torch")
            if b.status != "ok":
                raise SystemExit(f"fp32 torch reference failed: {b.error}")
            self.reference = np.load(b.path)[: len(self.evals)]
        return self.reference

    # -- groups ----------------------------------------------------------------------------------------------
    def groups(self, flows: list[str]) -> list[Group]:
        from edgekit.backends import get_backend
        from edgekit.config.profiles import load_profile

        by_name = {}
        for entry in self.recipe.targets:  # a recipe may name a profile by path
            try:
                p = load_profile(entry, self.recipe.root)
                by_name[p.name] = p
            except Exception:  # noqa: BLE001
                pass

        def profile(name: str):
            return by_name.get(name) or load_profile(name, self.recipe.root)

        groups: dict[str, Group] = {}
        targets = [t for t in (self.report or {}).get("targets", []) if t.get("backend") in DEFAULT_PROFILE]
        for t in targets:
            try:
                prof = profile(t["name"])
            except Exception as e:  # noqa: BLE001 - a profile this checkout does not have
                say(f"[vendor] {t['name']}: no loadable target profile ({first_lines(str(e), 1)}); skipped")
                continue
            backend = get_backend(prof.backend)
            runtime = backend.options(prof)[2]
            why = (backend.unmeasurable_reason(runtime) or
                   (None if prof.device == "host" else f"device {prof.device} is not this host") or
                   (None if not prof.arch or prof.arch == os.uname().machine else f"arch {prof.arch}"))
            if why:
                say(f"[vendor] {t['name']}: not timed here ({why}); skipped")
                continue
            g = groups.setdefault(t["name"], Group(t["name"], prof.backend, prof, runtime))
            self._edgekit_rows(g, t)
        wanted = {FLOWS[f].backend for f in flows}
        for b in [b for b in DEFAULT_PROFILE if b in wanted]:  # the vendor flows join the default profile's group (or the first of that backend)
            if not any(g.backend == b for g in groups.values()):
                prof = profile(DEFAULT_PROFILE[b])
                groups[prof.name] = Group(prof.name, b, prof, get_backend(b).options(prof)[2])
        for g in groups.values():
            mine = [f for f in flows if FLOWS[f].backend == g.backend]
            first = next(x for x in groups.values() if x.backend == g.backend)
            home = groups.get(DEFAULT_PROFILE[g.backend]) or first
            if g is home and mine:
                self._vendor_rows(g, mine)
        return [g for g in groups.values() if g.rows]

    def _edgekit_rows(self, g: Group, t: dict) -> None:
        timings = t.get("timings") or {}
        for kind, art in [("fp32", t.get("fp32")), ("optimized", t.get("optimized")),
                          *sorted((t.get("extras") or {}).items())]:
            if not art:
                continue
            path = self.run_dir / art["artifact"]
            files = [self.run_dir / f for f in art.get("files") or [art["artifact"]]]
            if kind == "fp32":
                row = Row(g.name, g.backend, "edgekit fp32", art.get("precision", "fp32"), "fp32", path, files,
                          g.runtime, build_s=timings.get("export_s"))
                g.fp32, g.fp32_from = path, f"{self.run_dir.name}/{art['artifact']}"
            else:
                build = sum(v for k, v in timings.items() if k != "export_s" and isinstance(v, (int, float)))
                status, err = t.get("status", "ok"), t.get("reason")
                row = Row(g.name, g.backend, "edgekit shipped" if kind == "optimized" else f"edgekit {kind}",
                          art.get("precision", ""), "edgekit", path, files, g.runtime,
                          build_s=round(build, 1) if kind == "optimized" and build else None,
                          notes=[f"the edgekit run marked this target {status}: {first_lines(err or '', 1)}"]
                          if status != "ok" and kind == "optimized" else [])
            g.rows.append(row)

    def _fp32_source(self, g: Group) -> tuple[Optional[Path], Optional[str]]:
        """The fp32 artifact the vendor flows of ``g`` start from: the run's, else edgekit's export here."""
        if g.fp32 is not None and g.fp32.is_file():
            return g.fp32, None
        key = digest({"what": "fp32", "model": self.model_digest(), "profile": g.profile.name,
                      "export": g.profile.export, "versions": self.versions(g.backend)})
        b = self.child(self.job("export", profile=str(g.profile.path)), self.work / "fp32" / f"{g.backend}-{key[:16]}",
                       f"fp32 export {g.backend}")
        if b.status != "ok":
            return None, f"fp32 export failed: {b.error}"
        g.fp32, g.fp32_from = b.path, str(b.path)
        if not any(r.kind == "fp32" for r in g.rows):
            g.rows.insert(0, Row(g.name, g.backend, "fp32 (edgekit export)", b.precision or "fp32", "fp32", b.path,
                                 b.files, g.runtime, build_s=b.build_s))
        return b.path, None

    def _vendor_rows(self, g: Group, flows: list[str]) -> None:
        fp32, err = self._fp32_source(g)
        for name in flows:
            f = FLOWS[name]
            runtime = g.runtime.model_copy(update=f.runtime_update) if f.runtime_update else g.runtime
            row = Row(g.name, g.backend, name, f.what, "vendor", runtime=runtime)
            g.rows.append(row)
            if f.source == "fp32" or f.source == "none":
                if fp32 is None:
                    row.status, row.error = "failed", err
                    continue
            if f.source == "none":  # a runtime setting on the fp32 artifact itself
                row.path, row.files, row.build_s = fp32, _files(g.backend, fp32), 0.0
                continue
            ident = {"flow": name, "params": f.params, "calibration": self.calib_sha,
                     "versions": self.versions(g.backend)}
            job = self.job("flow", flow=name)
            if f.source == "fp32":
                ident["fp32"] = [file_sha256(p) for p in _files(g.backend, fp32)]
                job["fp32"] = str(fp32)
            else:
                ident["model"] = self.model_digest()
            if f.params.get("accuracy_control"):
                ident.update(ac_samples=self.args.ac_samples, ac_max_drop=self.args.ac_max_drop,
                             evaluation=self.eval_sha, metric=self.recipe.data.metric)
                job.update(ac_samples=self.args.ac_samples, ac_max_drop=self.args.ac_max_drop)
                if self.recipe.data.metric != "top1":  # cosine to fp32 torch needs its outputs
                    ref = self.work / "reference" / "for_ac.npy"
                    np.save(ref, self.reference_outputs())
                    job["reference"] = str(ref)
            key = digest(ident)
            b = self.child(job, self.work / "flows" / f"{name}-{key[:16]}", name)
            row.build_s, row.notes, row.cached = b.build_s, list(b.notes), b.cached
            if b.status != "ok":
                row.status, row.error = "failed", b.error
            else:
                row.path, row.files = b.path, b.files
                row.what = f"{f.what}"

    # -- accuracy -------------------------------------------------------------------------------------------
    def evaluate(self, g: Group) -> None:
        from edgekit.backends import get_backend

        backend = get_backend(g.backend)
        for row in g.rows:
            if row.status != "ok":
                continue
            row.size_mb = size_mb(row.files)
            try:
                t0 = time.perf_counter()
                row.runner = backend.load(row.path, row.runtime)
                row.lat["load_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
            except Exception as e:  # noqa: BLE001
                row.status, row.error = "failed", f"load: {type(e).__name__}: {first_lines(str(e))}"
                continue
            if g.backend == "openvino" and row.flow == "ov-bf16":
                row.notes.append(_ov_default_precision(row.path, row.runtime))
            key = digest({"files": [file_sha256(f) for f in row.files], "backend": g.backend,
                          "runtime": row.runtime.model_dump(), "eval": self.eval_sha, "n": len(self.evals),
                          "versions": self.versions(g.backend)})
            cache = self.work / "outputs" / f"{key[:24]}.npy"
            try:
                if cache.is_file():
                    outs = np.load(cache)
                else:
                    say(f"[{g.name}] verify {row.flow} on {len(self.evals)} evaluation samples ...")
                    t0 = time.perf_counter()
                    outs = np.stack([np.asarray(row.runner.run(s)[0], dtype=np.float32).reshape(-1)
                                     for s in self.evals])
                    row.lat["verify_s"] = round(time.perf_counter() - t0, 1)
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    np.save(cache, outs)
                row.acc = self.scores(outs)
            except Exception as e:  # noqa: BLE001
                row.status, row.error = "failed", f"verify: {type(e).__name__}: {first_lines(str(e))}"
                row.runner = None

    def scores(self, outs: np.ndarray) -> dict:
        from edgekit.measure.verify import score

        metric = self.recipe.data.metric
        labels = self.evals.labels
        value = score(metric, outs, self.reference if self.reference is not None else outs, labels)
        acc = {"metric": metric, "value": round(value, 6), "drop": round(self.fp32_metric - value, 6),
               "n": int(len(outs))}
        if metric == "top1" and self.factors:
            sizes = [k for _, k in self.factors]
            if int(np.prod(sizes)) == outs.shape[1]:
                pred, lab = outs.argmax(1), labels.reshape(-1).astype(np.int64)
                for (name, k) in reversed(self.factors):
                    acc[name] = round(float((pred % k == lab % k).mean()), 6)
                    pred, lab = pred // k, lab // k
        return acc

    # -- latency --------------------------------------------------------------------------------------------
    def time_group(self, g: Group) -> None:
        rows = [r for r in g.rows if r.status == "ok" and r.runner is not None]
        if not rows:
            return
        feed = self.evals.sample(0)
        a = self.args
        g.load_before = uptime()
        say(f"[{g.name}] timing {len(rows)} artifacts interleaved: {a.rounds} rounds x {a.calls} calls "
            f"(load: {g.load_before.split('load average:')[-1].strip()})")
        for r in rows:
            for _ in range(a.warmup):
                r.runner.run(feed)
        wall = {id(r): [] for r in rows}
        cpu = {id(r): [] for r in rows}
        for rnd in range(a.rounds):
            k = rnd % len(rows)
            for r in rows[k:] + rows[:k]:
                w, c = [], []
                run = r.runner.run
                for _ in range(a.calls):
                    c0, t0 = time.thread_time(), time.perf_counter()
                    run(feed)
                    t1, c1 = time.perf_counter(), time.thread_time()
                    w.append(t1 - t0)
                    c.append(c1 - c0)
                wall[id(r)].append(float(np.median(w)) * 1e3)
                cpu[id(r)].append(float(np.median(c)) * 1e3)
        g.load_after = uptime()
        base = next((r for r in rows if r.kind == "fp32"), None)
        for r in rows:
            r.lat.update(p50_ms=round(statistics.median(wall[id(r)]), 3),
                         cpu_p50_ms=round(statistics.median(cpu[id(r)]), 3),
                         round_p50_ms=[round(x, 3) for x in wall[id(r)]],
                         round_cpu_ms=[round(x, 3) for x in cpu[id(r)]])
            if base is not None:
                for key, series in (("speedup", wall), ("cpu_speedup", cpu)):
                    ratios = [b / x for b, x in zip(series[id(base)], series[id(r)]) if x > 0]
                    r.lat[key] = {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                                  "max": round(max(ratios), 3)}
        self._verdict(g, rows, wall, cpu)

    def _verdict(self, g: Group, rows: list[Row], wall: dict, cpu: dict) -> None:
        ek = next((r for r in rows if r.flow == "edgekit shipped"), None)
        base = next((r for r in rows if r.kind == "fp32"), None)
        ok = [r for r in rows if r.kind == "vendor" and r.acc and r.acc["drop"] <= self.max_drop + 1e-9]
        best = min(ok, key=lambda r: r.lat["p50_ms"]) if ok else base
        v: dict = {"max_drop": self.max_drop, "goal": self.args.goal,
                   "best_vendor": best.flow if best is not None else None,
                   "best_vendor_is_fp32": best is base and best is not None,
                   "vendor_within_budget": [r.flow for r in ok]}
        if ek is None or best is None:
            v["verdict"] = "no edgekit artifact to compare (--run DIR)" if ek is None else "no fp32 or vendor row"
            g.verdict = v
            return
        for key, series in (("ratio", wall), ("cpu_ratio", cpu)):
            ratios = [b / e for b, e in zip(series[id(best)], series[id(ek)]) if e > 0]
            v[key] = {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                      "max": round(max(ratios), 3)}
        v["edgekit_drop"] = ek.acc.get("drop")
        v["best_vendor_drop"] = best.acc.get("drop")
        fastest = min((r for r in rows if r.kind == "vendor"), key=lambda r: r.lat["p50_ms"], default=None)
        if fastest is not None and fastest is not best:  # context: the fastest vendor artifact at any accuracy
            ratios = [f / e for f, e in zip(wall[id(fastest)], wall[id(ek)]) if e > 0]
            v["fastest_vendor_any_accuracy"] = {"flow": fastest.flow, "p50_ms": fastest.lat["p50_ms"],
                                                "drop": fastest.acc.get("drop"),
                                                "ratio": round(statistics.median(ratios), 3)}
        within = ek.acc.get("drop") is not None and ek.acc["drop"] <= self.max_drop + 1e-9
        fast = v["ratio"]["median"] >= self.args.goal
        vs = best.flow if best is not base else f"{best.flow} (no vendor flow within {self.max_drop:.3f})"
        v["verdict"] = ("MEETS" if within and fast else "MISSES") + \
            f": edgekit {ek.lat['p50_ms']:.2f} ms (drop {ek.acc['drop']:+.3f}) vs {vs} " \
            f"{best.lat['p50_ms']:.2f} ms (drop {best.acc['drop']:+.3f}): {v['ratio']['median']:.2f}x " \
            f"(cpu {v['cpu_ratio']['median']:.2f}x), goal >= {self.args.goal:g}x" + \
            ("" if within else f"; edgekit's drop is over {self.max_drop:.3f}")
        others = {r.flow: round(statistics.median([o / e for o, e in zip(wall[id(r)], wall[id(ek)]) if e > 0]), 3)
                  for r in ok if r is not best}
        if others:  # the rest of the vendor flows within budget, slower than the best one
            v["other_vendor_within_budget_ratio"] = others
            v["verdict"] += " (other vendor flows within budget: " + \
                ", ".join(f"{k} {x:.2f}x" for k, x in others.items()) + ")"
        fa = v.get("fastest_vendor_any_accuracy")
        if fa:
            v["verdict"] += (f" [fastest vendor flow at any accuracy: {fa['flow']} {fa['p50_ms']:.2f} ms, drop "
                             f"{fa['drop']:+.3f}, {fa['ratio']:.2f}x edgekit's p50]")
        g.verdict = v

    def release(self, g: Group) -> None:
        for r in g.rows:
            r.runner = None
        gc.collect()


def _files(backend: str, path: Path) -> list[Path]:
    from edgekit.backends import get_backend

    return [f for f in get_backend(backend).files(Path(path)) if Path(f).is_file()]


def _ov_default_precision(path: Path, runtime) -> str:
    """What the CPU plugin picks without INFERENCE_PRECISION_HINT (the vendor default this row stands for)."""
    try:
        import openvino as ov

        c = ov.Core().compile_model(str(path), runtime.device, {"INFERENCE_NUM_THREADS": runtime.threads,
                                                                 "PERFORMANCE_HINT": runtime.performance_hint})
        hint = c.get_property("INFERENCE_PRECISION_HINT")
        return f"compiled without a precision hint, the plugin picks {getattr(hint, 'get_type_name', lambda: hint)()}"
    except Exception as e:  # noqa: BLE001
        return f"could not read the plugin's default precision ({type(e).__name__})"


# -- output ---------------------------------------------------------------------------------------------------

def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def table(bench: Bench, groups: list[Group]) -> str:
    names = [n for n, _ in bench.factors] if bench.recipe.data.metric == "top1" else []
    head = ["runtime", "flow", bench.recipe.data.metric, "drop", *names, "p50 ms", "cpu ms", "vs fp32 (min-max)",
            "size MB", "build s", "status / error"]
    lines = []
    for g in groups:
        for r in g.rows:
            sp = r.lat.get("speedup")
            cells = [g.name, r.flow, _fmt(r.acc.get("value"), ".3f"), _fmt(r.acc.get("drop"), "+.3f"),
                     *[_fmt(r.acc.get(n), ".3f") for n in names], _fmt(r.lat.get("p50_ms"), ".2f"),
                     _fmt(r.lat.get("cpu_p50_ms"), ".2f"),
                     f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})" if sp else "-",
                     _fmt(r.size_mb, ".1f"), _fmt(r.build_s, ".0f"),
                     ("FAILED: " + (r.error or "")) if r.status != "ok" else "ok"]
            lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if i < len(head) - 1 else 0 for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
           "  ".join("-" * max(w, 6) for w in widths).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in lines]
    return "\n".join(out)


def report(bench: Bench, groups: list[Group], load_start: str, load_end: str) -> str:
    from edgekit.measure.machine import machine

    m = machine()
    a = bench.args
    parts = [f"machine: {m['cpu']}, {m['cores']} cores, ISA {' '.join(m['isa'])}, {m['os']}, python {m['python']}",
             f"recipe: {bench.recipe.path}; calibration {len(bench.calib)} samples; evaluation {len(bench.evals)} "
             f"samples; fp32 torch {bench.recipe.data.metric} {bench.fp32_metric:.4f} ({bench.fp32_from})",
             f"timing: per runtime, all artifacts in one process, {a.rounds} rounds x {a.calls} calls, rotating order, "
             f"evaluation sample 0, batch 1; p50 = median of per-round p50s; vs fp32 = per-round ratio median "
             f"(min-max); cpu = thread CPU time p50",
             f"load at start: {load_start}", ""]
    parts.append(table(bench, groups))
    notes = [f"  {g.name} / {r.flow}: {n}" for g in groups for r in g.rows for n in r.notes]
    cached = [r.flow for g in groups for r in g.rows if r.cached]
    if cached:
        notes.append(f"  builds reused from {bench.work} (build s = when first built): {', '.join(cached)}")
    if notes:
        parts += ["", "notes:", *notes]
    parts.append("")
    for g in groups:
        parts.append(f"[{g.name}] runtime options {g.runtime.model_dump()}; vendor flows start from {g.fp32_from or '-'}")
        parts.append(f"  load before timing: {g.load_before}")
        parts.append(f"  load after timing:  {g.load_after}")
        if g.verdict:
            parts.append(f"  verdict: {g.verdict.get('verdict')}")
    parts.append(f"load at end: {load_end}")
    return "\n".join(parts)


def to_json(bench: Bench, groups: list[Group], load_start: str, load_end: str) -> dict:
    from edgekit.measure.machine import machine

    a = bench.args
    return {
        "schema": "edgekit.vendor_flows/1", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
        "load": {"start": load_start, "end": load_end}, "recipe": str(bench.recipe.path),
        "run": str(bench.run_dir) if bench.run_dir else None,
        "calibration": {"path": str(bench.calib.path), "n": len(bench.calib), "sha256": bench.calib_sha},
        "evaluation": {"path": str(bench.evals.path), "n": len(bench.evals), "metric": bench.recipe.data.metric,
                       "fp32_torch": bench.fp32_metric, "fp32_torch_from": bench.fp32_from},
        "timing": {"rounds": a.rounds, "calls": a.calls, "warmup": a.warmup, "order": "rotating",
                   "sample": "evaluation sample 0"},
        "max_drop": bench.max_drop, "goal": a.goal,
        "runtimes": [{
            "name": g.name, "backend": g.backend, "runtime_options": g.runtime.model_dump(),
            "vendor_fp32_source": g.fp32_from, "load_before": g.load_before, "load_after": g.load_after,
            "verdict": g.verdict, "versions": bench.versions(g.backend),
            "rows": [{"flow": r.flow, "kind": r.kind, "what": r.what, "status": r.status, "error": r.error,
                      "artifact": str(r.path) if r.path else None, "size_mb": r.size_mb, "build_s": r.build_s,
                      "runtime_options": r.runtime.model_dump() if r.runtime is not None else None,
                      "build_cached": r.cached, "accuracy": r.acc, "latency": r.lat, "notes": r.notes}
                     for r in g.rows]}
            for g in groups]}


# -- main -------------------------------------------------------------------------------------------------------

def select_flows(flows_arg: Optional[str], skip_arg: Optional[str]) -> list[str]:
    def resolve(items: str) -> set[str]:
        out = set()
        for item in (x.strip() for x in items.split(",") if x.strip()):
            if item in FLOWS:
                out.add(item)
            elif item in RUNTIME_ALIASES:
                out |= {n for n, f in FLOWS.items() if f.backend == RUNTIME_ALIASES[item]}
            elif any(item in f.aliases for f in FLOWS.values()):
                out |= {n for n, f in FLOWS.items() if item in f.aliases}
            elif item in ("all", "vendor"):
                out |= set(FLOWS)
            elif item == "none":
                pass
            else:
                raise SystemExit(f"unknown flow {item!r}; flows: {', '.join(FLOWS)} (or a runtime: "
                                 f"{', '.join(sorted(RUNTIME_ALIASES))}; aliases: "
                                 f"{', '.join(a for f in FLOWS.values() for a in f.aliases)})")
        return out

    chosen = resolve(flows_arg) if flows_arg else set(FLOWS)
    chosen -= resolve(skip_arg) if skip_arg else set()
    return [n for n in FLOWS if n in chosen]


def parse_factors(text: str) -> list[tuple[str, int]]:
    out = []
    for part in (p.strip() for p in (text or "").split(",") if p.strip()):
        name, _, k = part.partition(":")
        if not k.isdigit() or int(k) < 2:
            raise SystemExit(f"--factors {text!r}: expected NAME:SIZE,... (e.g. topic:5,digit:10)")
        out.append((name, int(k)))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", metavar="DIR", help="an `edgekit run` output folder: its report.json's artifacts are "
                    "measured next to the vendor flows (and its fp32 exports are what the vendor flows start from)")
    ap.add_argument("--recipe", help="the recipe (model, data, metric); default: the run's recipe, else "
                    "examples/mnist_bbc")
    ap.add_argument("--work", default="runs/vendor_flows", help="cache of vendor builds and verification outputs "
                    "(default: %(default)s)")
    ap.add_argument("--flows", help="comma-separated flows or runtimes to run (default: all); see --list")
    ap.add_argument("--skip", help="comma-separated flows or aliases to leave out, e.g. --skip ac")
    ap.add_argument("--rebuild", default="", help="comma-separated flows to build again even if cached (also "
                    "'fp32' for this script's own fp32 exports, 'reference' for the fp32 torch outputs)")
    ap.add_argument("--list", action="store_true", help="list the flows and exit")
    ap.add_argument("--json", metavar="FILE", help="also write everything measured as JSON")
    ap.add_argument("--rounds", type=int, default=15, help="timing rounds per runtime (default: %(default)s)")
    ap.add_argument("--calls", type=int, default=20, help="timed calls per artifact per round (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls per artifact first (default: %(default)s)")
    ap.add_argument("--goal", type=float, default=1.3, help="edgekit's shipped p50 should beat the best vendor "
                    "flow within --max-drop by this factor (default: %(default)s)")
    ap.add_argument("--max-drop", type=float, default=None, help="accuracy budget vs fp32 torch (default: the "
                    "recipe's max_metric_drop gate, else 0.010)")
    ap.add_argument("--factors", default="topic:5,digit:10", help="for top-1 over joint classes, the factors "
                    "(slowest first) whose accuracy is reported separately; label = ((f1 * k2) + f2) * k3 + ...; "
                    "ignored unless the sizes multiply to the output width. Default: %(default)s (the demo's "
                    "50 = 5 topics x 10 digits); '' for none")
    ap.add_argument("--ac-samples", type=int, default=300, help="evaluation samples nncf-ac validates on "
                    "(default: the first %(default)s)")
    ap.add_argument("--ac-max-drop", type=float, default=0.01, help="nncf-ac's max_drop (default: %(default)s)")
    ap.add_argument("--eval-limit", type=int, default=None, help="verify on the first N evaluation samples only "
                    "(quick checks; default: all)")
    ap.add_argument("--build-timeout", type=float, default=5400, help="seconds one build may take before it is "
                    "killed and its row failed (default: %(default)s)")
    ap.add_argument("--build-mem-gb", type=float, default=14, help="resident memory one build may use before it "
                    "is killed and its row failed (default: %(default)s)")
    ap.add_argument("--build-cpus", type=int, default=0, help="pin each build to this many CPUs with taskset "
                    "(0 = no pinning, the toolchains' own thread defaults; default: %(default)s)")
    ap.add_argument("--_job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._job:
        return _child(args._job)
    if args.list:
        for f in FLOWS.values():
            print(f"{f.name:17s} {f.backend:12s} {f.what}" + (f"  (alias: {', '.join(f.aliases)})" if f.aliases else ""))
        return 0
    args.rebuild = {x.strip() for x in args.rebuild.split(",") if x.strip()}
    flows = select_flows(args.flows, args.skip)
    load_start = uptime()
    bench = Bench(args)
    bench.fp32_reference()
    t0 = time.perf_counter()
    groups = bench.groups(flows)
    say(f"[vendor] builds ready in {time.perf_counter() - t0:.0f} s")
    for g in groups:  # one runtime at a time: load + verify every artifact, then time them interleaved
        bench.evaluate(g)
        bench.time_group(g)
        bench.release(g)
    load_end = uptime()
    text = report(bench, groups, load_start, load_end)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(to_json(bench, groups, load_start, load_end), indent=2, default=str))
        say(f"[vendor] wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

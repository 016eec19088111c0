"""The ``edgekit`` command line. Exit codes: 0 ok, 1 a gate failed, 2 bad input or usage, 3 a target failed."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from edgekit import __version__
from edgekit.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_OK, EXIT_TARGET_FAILED, InputError, TargetError

RECIPE_HELP = """\
The recipe (edgekit.toml; relative paths resolve against its folder):

  targets = ["ort-cpu"]                  # profiles in targets/ (see `edgekit targets`) or paths to .toml

  [model]
  source = "model.py:build"              # file.py:callable returning an nn.Module, or a torch.export .pt2
  inputs = [                             # in forward() argument order; batch axis = 1
    { name = "image", shape = [1, 3, 64, 64], dtype = "float32", modality = "image" },
    { name = "input_ids", shape = [1, 32], dtype = "int64", modality = "text" },
    { name = "attention_mask", shape = [1, 32], dtype = "int64", modality = "text" },
  ]

  [data]
  calibration = "calib.npz"              # one array per input name; axis 0 = sample, no batch axis
  evaluation = "eval.npz"                # same keys + optional "labels"; held out from calibration
  metric = "top1"                        # top1 (needs labels) | cosine (fidelity to fp32 torch)
  # max_calibration_samples = 256        # optional caps
  # max_evaluation_samples = 1000

  [gates]                                # checked by `edgekit ci` (exit 1), reported by `edgekit run`
  max_metric_drop = 0.01                 # fp32 torch metric - optimized metric
  min_speedup = 1.5                      # fp32 / optimized p50 (median over interleaved rounds, same
                                         # runtime and device); passes when its 95 % interval's low end does
  # max_latency_ms = 10.0
  # max_size_bytes = 20_000_000
  # [gates.targets.ort-cpu]              # per-target overrides
  # min_speedup = 2.0
  # with `edgekit ci --baseline PREV/report.json` (defaults shown):
  # max_latency_regression = 0.10        # relative p50 growth; called only when the intervals separate
  # max_metric_regression = 0.005        # absolute metric loss vs the baseline
  # max_size_growth = 0.05               # relative size growth vs the baseline

  # [prune]                              # optional: structured pruning before export, per target
  # ratio = 0.3                          # fraction of channels / FFN neurons / heads removed
  # ratios = { image = 0.4, text = 0.2 } # per tower, by input modality
  # recover_steps = 200                  # label-free distillation steps from the fp32 model; 0 = none
  # macs_budget = 0.75                   # or: keep at most this share of the MACs (ratios scaled)

Output (--out, default runs/<model name>/): report.json (schema edgekit.report/1), report.md,
report.html, manifest.json (sha256 of every artifact file), artifacts/<target>/ (fp32 and
optimized), logs/<target>.log. Builds are cached in $EDGEKIT_CACHE (default ~/.cache/edgekit).
The directory appears only when the run finishes; a failed target is a 'failed' row with its
reason, and the other targets still run.

Exit codes: 0 ok, 1 a gate failed (ci), 2 bad input or usage, 3 a target failed. A target whose
accuracy-aware quantization search ends over max_metric_drop is 'failed' in the report with its best
artifact ("accuracy budget not met ...") and counts as a failed max_metric_drop gate (exit 1 from ci).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgekit",
        description="Prune, quantize, export, verify and benchmark a multimodal PyTorch model for each "
                    "hardware target, against its fp32 baseline on the same runtime.",
        epilog="Start with `edgekit doctor` (what toolchains are here), `edgekit targets` (what can be built) "
               "and `edgekit run --help` (the recipe).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"edgekit {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    for name, help_ in (("run", "build, verify and benchmark every target of a recipe; write the report"),
                        ("ci", "like run, then enforce the recipe's [gates]: exit 1 if one fails")):
        r = sub.add_parser(name, help=help_, description=help_ + ".", epilog=RECIPE_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        r.add_argument("recipe", nargs="?", default="edgekit.toml",
                       help="recipe file or a folder holding edgekit.toml (default: ./edgekit.toml)")
        r.add_argument("--targets", nargs="+", metavar="TARGET",
                       help="run these targets instead of the recipe's (names or profile paths)")
        r.add_argument("--out", metavar="DIR", help="output directory (default: runs/<model name>)")
        r.add_argument("--device", metavar="DEVICE",
                       help="time every target there instead of its profile's device: host, "
                            "ssh:[user@]host[:port] (a Linux board with python3 + numpy + onnxruntime; "
                            "ssh keys/agent/config, never a password prompt) or adb:SERIAL")
        r.add_argument("--no-cache", action="store_true",
                       help="build everything afresh and store nothing ($EDGEKIT_CACHE, default ~/.cache/edgekit, "
                            "holds exports, calibrations and fp32 reference outputs keyed by their inputs)")
        r.add_argument("--reuse", action="store_true",
                       help="also reuse cached verification + latency results of unchanged artifacts instead of "
                            "measuring again (a quick look; release numbers should be measured)")
        if name == "ci":
            r.add_argument("--baseline", metavar="REPORT",
                           help="the previous release's report.json: fail on latency (noise-aware), metric or "
                                "size regressions (limits: [gates] max_latency_regression, max_metric_regression, "
                                "max_size_growth)")
            r.add_argument("--junit", metavar="FILE", help="write JUnit XML: one test case per target x gate")
            r.add_argument("--summary", metavar="FILE",
                           help="write a Markdown summary (also appended to $GITHUB_STEP_SUMMARY when set)")

    b = sub.add_parser("bench", help="benchmark one artifact (.onnx, .xml, .tflite) on this machine",
                       description="Load an artifact, time it (warm-up, then timed runs) and print latency, "
                                   "load time and peak RSS. Inputs come from --data (an .npz in the recipe's "
                                   "data contract; sample 0 is used) or are synthesized from the artifact's "
                                   "input signature.")
    b.add_argument("artifact")
    b.add_argument("--data", metavar="NPZ", help="feed sample 0 of this .npz")
    b.add_argument("--target", help="profile whose runtime settings to use (default: the first whose backend "
                                    "runs this file type, e.g. ort-cpu for .onnx, openvino-x86 for .xml)")
    b.add_argument("--threads", type=int, help="override the profile's thread count")
    b.add_argument("--device", metavar="ssh:[USER@]HOST[:PORT]",
                   help="time it on a Linux board over ssh instead of here (.onnx only)")
    b.add_argument("--remote-python", metavar="CMD",
                   help="Python on that board, with numpy + onnxruntime (default: the profile's, python3)")
    b.add_argument("--runs", type=int, default=100)
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--json", action="store_true", help="print JSON instead of text")

    sub.add_parser("doctor", help="which toolchains, versions and execution providers are usable here")
    sub.add_parser("targets", help="list the target profiles")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if not args.cmd:
        _parser().print_help()
        return EXIT_BAD_INPUT
    try:
        return {"run": _run, "ci": _run, "bench": _bench, "doctor": _doctor, "targets": _targets}[args.cmd](args)
    except InputError as e:
        print(f"edgekit: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("edgekit: interrupted; nothing was written", file=sys.stderr)
        return 130


def _run(args) -> int:
    import os

    from edgekit import report
    from edgekit.release import baseline, gates, junit
    from edgekit.report.markdown import table
    from edgekit.run import pipeline
    from edgekit.run.cache import Cache

    base = baseline.load(args.baseline) if getattr(args, "baseline", None) else None  # bad input: before any work
    doc = pipeline.run(args.recipe, args.targets, args.out, args.device, cache=Cache.open(not args.no_cache, args.reuse))
    out = Path(args.out) if args.out else Path("runs") / doc.model.name
    results = list(doc.gates)
    if base is not None:
        from edgekit.config.recipe import load_recipe
        from edgekit.release.confirm import confirm_latency

        recipe = load_recipe(args.recipe)
        compared = baseline.compare(doc, base, recipe.gates, confirm=None if args.reuse else (
            lambda row, prev: confirm_latency(recipe, row, out, args.baseline, prev)))
        doc.baseline = {"path": str(args.baseline), "created": base.created, "results": compared}
        results += compared
        report.write(doc, out)
    print()
    print(table(doc))
    print()
    bad_gates = gates.failed(results)
    for g in bad_gates:
        print(f"gate failed: {g.target} {g.gate} = {g.limit:g} ({g.what} = {g.value:g}"
              + (f"; {g.basis})" if g.basis else ")"))
    failed = [t for t in doc.targets if t.status == "failed" and not t.budget_missed]
    for t in failed:
        print(f"target failed: {t.name}: {t.reason.splitlines()[0]}")
    for t in doc.targets:
        if t.budget_missed:  # artifacts built and measured: a failed max_metric_drop gate, not exit 3
            print(f"target failed its accuracy budget: {t.name}: {t.reason.splitlines()[0]}")
    print(f"report: {out / 'report.md'} (and report.json, report.html, manifest.json)")
    code = EXIT_TARGET_FAILED if failed else EXIT_GATE_FAILED if bad_gates and args.cmd == "ci" else EXIT_OK
    if args.cmd == "ci":
        if args.junit:
            junit.write(args.junit, doc, results)
            print(f"junit: {args.junit}")
        md = junit.summary(doc, results, code)
        if args.summary:
            Path(args.summary).write_text(md)
        if os.environ.get("GITHUB_STEP_SUMMARY"):
            with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as f:
                f.write(md)
    elif bad_gates:
        print("(edgekit run reports gates; `edgekit ci` enforces them)")
    return code


def _bench(args) -> int:
    import numpy as np

    from edgekit.backends import get_backend
    from edgekit.measure.bench import measure
    from edgekit.measure.machine import host_device
    from edgekit.config.profiles import load_profile, with_device

    path = Path(args.artifact)
    if not path.is_file():
        raise InputError(f"artifact {path}: file not found")
    prof = load_profile(args.target) if args.target else _profile_for(path)
    backend = get_backend(prof.backend)
    if path.suffix != backend.suffix:
        raise InputError(f"artifact {path}: target {prof.name} runs {backend.suffix} files")
    _, _, runtime = backend.options(prof)
    if args.threads:
        runtime = runtime.model_copy(update={"threads": args.threads})
    if args.data:
        with np.load(args.data, allow_pickle=False) as z:
            feeds = [{k: z[k][:1] for k in z.files if k != "labels"}]
    else:
        feeds = lambda runner: [runner.synthetic_feed()]  # noqa: E731
    device = host_device()
    try:
        if args.device:
            device = with_device(prof, args.device).device
            stats = _bench_remote(args, path, prof, backend, runtime, feeds)
        else:
            stats, _ = measure(lambda: backend.load(path, runtime), feeds, warmup=args.warmup, runs=args.runs)
    except TargetError as e:
        raise InputError(str(e)) from None
    stats.update(artifact=str(path), size_bytes=sum(f.stat().st_size for f in backend.files(path)), device=device,
                 threads=getattr(runtime, "threads", None), target=prof.name)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        lat = stats["latency_ms"]
        print(f"{path} on {stats['device']} ({prof.name}, {stats['threads']} thread(s)): p50 {lat['p50']:.3f} ms, "
              f"p90 {lat['p90']:.3f}, p99 {lat['p99']:.3f}, mean {lat['mean']:.3f} (n={lat['n']}); "
              f"load {stats['load_ms']:.0f} ms; peak RSS {stats['peak_rss_mb'] or 0:.0f} MB; "
              f"size {stats['size_bytes'] / 1e6:.2f} MB")
    return EXIT_OK


def _bench_remote(args, path: Path, prof, backend, runtime, feeds) -> dict:
    from edgekit.measure import remote

    if callable(feeds):  # no --data: synthesize the feed from the artifact's signature, here
        feeds = feeds(backend.load(path, runtime))
    return remote.benchmark(args.device, [str(f) for f in backend.files(path)], feeds[0],
                            runner=backend.remote_runner(), settings=backend.remote_settings(runtime), warmup=args.warmup,
                            runs=args.runs, python=args.remote_python or prof.remote_python)


def _profile_for(path: Path):
    from edgekit.backends import get_backend
    from edgekit.measure.devices import unmeasurable_reason
    from edgekit.config.profiles import available, load_profile

    for name in available():  # the first profile that can time this file type on this machine
        prof = load_profile(name)
        backend = get_backend(prof.backend)
        if (backend.suffix == path.suffix and prof.device == "host" and not unmeasurable_reason("host", prof.arch)
                and not backend.unmeasurable_reason(backend.options(prof)[2])):
            return prof
    raise InputError(f"artifact {path}: no target profile runs {path.suffix or 'extension-less'} files here")


def _doctor(args) -> int:
    from edgekit.doctor import report

    print(report())
    return EXIT_OK


def _targets(args) -> int:
    from edgekit.config.profiles import available, load_profile

    for name in available():
        p = load_profile(name)
        print(f"{name:16} {p.backend:12} {p.description}")
    return EXIT_OK

"""The ``edgekit`` command line. Exit codes: 0 ok, 1 a gate failed, 2 bad input or usage, 3 a target failed,
4 an internal error (a bug; the traceback goes to a log it names), 128+N a signal (130 Ctrl-C)."""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from edgekit import __version__
from edgekit.errors import (EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_INTERNAL, EXIT_OK, EXIT_TARGET_FAILED, InputError,
                            TargetError)

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
  # [prune.low_rank]                     # optional: low-rank factorization after pruning
  # energies = { text = 0.85 }           # per tower: share of each weight's squared singular values kept
  # include = ["*.intermediate.dense"]   # module-name patterns (default: every Linear)

  # [run]
  # cluster = "head:6379"                # run the jobs as Ray tasks there (see --cluster; README: Running
                                         # on a cluster); a target profile's `resources` picks its node

Output (--out, default runs/<model name>/): report.json (schema edgekit.report/1), report.md,
report.html, manifest.json (sha256 of every artifact file), artifacts/<target>/ (fp32 and
optimized), logs/<target>.log. Several recipes (`edgekit run a.toml b.toml`): one such folder per
recipe in <out>/<model name>/, plus matrix.json (schema edgekit.matrix/1) and matrix.md in <out>. Builds are cached in $EDGEKIT_CACHE (default ~/.cache/edgekit).
The directory appears only when the run finishes; a failed target is a 'failed' row with its
reason, and the other targets still run.

Exit codes: 0 ok, 1 a gate failed (ci), 2 bad input or usage, 3 a target failed, 4 an internal error
(a bug: the message names a log with the traceback), 128+N killed by signal N (130 Ctrl-C, 143 SIGTERM). A target whose
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
        if name == "run":
            r.add_argument("recipe", nargs="*", default=["edgekit.toml"],
                           help="recipe file(s) or folder(s) holding edgekit.toml (default: ./edgekit.toml); several "
                                "make a matrix: a report per recipe in <out>/<model name>/ and matrix.md + "
                                "matrix.json across them in <out> (default runs/)")
        else:
            r.add_argument("recipe", nargs="?", default="edgekit.toml",
                           help="recipe file or a folder holding edgekit.toml (default: ./edgekit.toml)")
        r.add_argument("--targets", nargs="+", metavar="TARGET",
                       help="run these targets instead of the recipe's (names or profile paths)")
        r.add_argument("--out", metavar="DIR", help="output directory (default: runs/<model name>)")
        r.add_argument("--device", metavar="DEVICE",
                       help="time every target there instead of its profile's device: host, "
                            "ssh:[user@]host[:port] (a Linux board with python3 + numpy + onnxruntime; "
                            "ssh keys/agent/config, never a password prompt) or adb:SERIAL")
        r.add_argument("--cluster", metavar="ADDRESS",
                       help="run the build and measurement jobs as Ray tasks (pip install 'edgekit-deploy[cluster]' "
                            "here and on every node): auto (the cluster this machine joined with `ray start`), "
                            "local (a Ray instance for this run), HOST:PORT (the head's address) or ray://HOST:PORT "
                            "(Ray Client); targets run at once, builds on any node with a CPU, each target's "
                            "verification + timing on a node advertising its profile's resources (default: "
                            "worker processes here, one job at a time; or the recipe's [run] cluster)")
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
    b.add_argument("--runs", type=_count(1), default=100, help="timed calls (>= 1; default 100)")
    b.add_argument("--warmup", type=_count(0), default=10, help="untimed calls first (>= 0; default 10)")
    b.add_argument("--json", action="store_true", help="print JSON instead of text")

    d = sub.add_parser("doctor", help="which toolchains, versions and execution providers are usable here")
    d.add_argument("--deep", action="store_true", help="import every toolchain (finds broken installs; ~10 s)")
    sub.add_parser("targets", help="list the target profiles")
    r = sub.add_parser("report", help="write report.md and report.html again from an output folder's report.json")
    r.add_argument("dir", help="an edgekit output folder (or its report.json)")
    sub.add_parser("schema", help="print the recipe's JSON schema (for editors and CI linters)")
    c = sub.add_parser("cache", help="look after the build cache ($EDGEKIT_CACHE, default ~/.cache/edgekit)",
                       description="Every entry holds the sha256 of its files; a damaged one is discarded "
                                   "and rebuilt when a run meets it. 'verify' checks them all now.")
    c.add_argument("action", choices=["info", "verify", "prune", "clear"],
                   help="info: entries and size; verify: check every entry, remove damaged ones; "
                        "prune: remove the oldest entries down to --max-size; clear: remove everything")
    c.add_argument("--max-size", metavar="SIZE", type=_size, help="for prune: e.g. 500M, 20G")
    return p


def _size(text: str) -> int:
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 500M or 20G")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def _count(least: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < least:
            raise argparse.ArgumentTypeError(f"{n} is below {least}")
        return n
    return parse


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if not args.cmd:
        _parser().print_help()
        return EXIT_BAD_INPUT
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return {"run": _run, "ci": _run, "bench": _bench, "doctor": _doctor, "targets": _targets,
                "cache": _cache, "report": _report, "schema": _schema}[args.cmd](args)
    except InputError as e:
        print(f"edgekit: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: staging and workers were cleaned up on the way
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        print(f"edgekit: {'interrupted' if signum == signal.SIGINT else signal.Signals(signum).name}; "
              f"nothing was written", file=sys.stderr)
        return 128 + signum
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _internal_error(e)
        print(f"edgekit: error: no space left on the device holding {e.filename or 'the output'} ({e.strerror}); "
              f"free some space (the cache: `edgekit cache prune --max-size 10G`); nothing was written",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - a bug in edgekit: exit 4 with the traceback in a log, never 1
        return _internal_error(e)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _internal_error(e: BaseException) -> int:
    """A bug in edgekit: exit 4, the traceback in a log the message names."""
    import tempfile
    import traceback

    fd, log = tempfile.mkstemp(prefix="edgekit-internal-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write("".join(traceback.format_exception(e)))
    print(f"edgekit: internal error: {type(e).__name__}: {e} (traceback: {log}; please report it)", file=sys.stderr)
    return EXIT_INTERNAL


def _check_writable(path: Path, flag: str) -> None:
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a directory; give a file path")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot create its folder ({e.strerror or e})") from None
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{flag} {path}: not writable")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def _run(args) -> int:
    from edgekit.orchestrate.executor import opened

    recipes = args.recipe if isinstance(args.recipe, list) else [args.recipe]
    for flag in ("junit", "summary"):  # written after the run: checked before it
        if getattr(args, flag, None):
            _check_writable(Path(getattr(args, flag)), f"--{flag}")
    with opened(args.cluster or _recipe_cluster(recipes)) as executor:  # unreachable: exit 2 before any work
        if len(recipes) > 1:
            return _run_matrix(args, recipes, executor)
        args.recipe = recipes[0]
        return _run_one(args, executor)


def _recipe_cluster(recipes: list[str]) -> Optional[str]:
    """The recipes' ``[run] cluster`` (they must agree)."""
    from edgekit.config.recipe import load_recipe

    wanted = {str(r): load_recipe(r).run.cluster for r in recipes}
    values = set(wanted.values())
    if len(values) > 1:
        raise InputError("the recipes ask for different [run] cluster values ("
                         + ", ".join(f"{r}: {c or 'none'}" for r, c in wanted.items())
                         + "); give --cluster to choose one")
    return values.pop()


def _run_matrix(args, recipes: list[str], executor) -> int:
    from edgekit.orchestrate import pipeline
    from edgekit.orchestrate.cache import Cache
    from edgekit.report import terminal

    entries, folder = pipeline.run_matrix(recipes, args.targets, args.out, args.device,
                                          cache=Cache.open(not args.no_cache, args.reuse), executor=executor)
    code = EXIT_OK
    for e in entries:
        print()
        if "error" in e:
            print(f"{e['recipe']}: error: {e['error']}")
            code = max(code, EXIT_BAD_INPUT)
            continue
        doc = e["report"]
        print(f"{e['recipe']} ({doc.model.name}, {e['seconds']:.0f} s): {Path(e['out']) / 'report.html'}")
        print(terminal.table(doc, list(doc.gates)))
        for t in doc.targets:
            if t.status == "failed" and not t.budget_missed:
                print(f"target failed: {doc.model.name} / {t.name}: {t.reason.splitlines()[0]}")
                code = max(code, EXIT_TARGET_FAILED)
    print(f"\nmatrix: {folder / 'matrix.md'} (and matrix.json): {len(entries)} recipes")
    return code


def _run_one(args, executor) -> int:
    from edgekit import report
    from edgekit.release import baseline, gates, junit
    from edgekit.report import terminal
    from edgekit.orchestrate import pipeline
    from edgekit.orchestrate.cache import Cache

    base = baseline.load(args.baseline) if getattr(args, "baseline", None) else None  # bad input: before any work
    if base is not None:
        from edgekit.config.recipe import load_recipe

        baseline.check_matches(base, load_recipe(args.recipe), args.baseline)
    doc = pipeline.run(args.recipe, args.targets, args.out, args.device, cache=Cache.open(not args.no_cache, args.reuse),
                       executor=executor)
    out = Path(args.out) if args.out else Path("runs") / doc.model.name
    results = list(doc.gates)
    if base is not None:
        from edgekit.config.recipe import load_recipe
        from edgekit.release.confirm import confirm_latency

        recipe = load_recipe(args.recipe)
        compared = baseline.compare(doc, base, recipe.gates, confirm=None if args.reuse else (
            lambda row, prev: confirm_latency(recipe, row, out, args.baseline, prev, executor=executor)))
        doc.baseline = {"path": str(args.baseline), "created": base.created, "results": compared}
        results += compared
        report.write(doc, out)
    print()
    print(terminal.table(doc, results))
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
    print(f"report: {out / 'report.html'} (and report.md, report.json, manifest.json; logs/ has each "
          f"target's full toolchain output)")
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
    from edgekit.api import bench

    stats = bench(args.artifact, target=args.target, data=args.data, device=args.device, threads=args.threads,
                  warmup=args.warmup, runs=args.runs, remote_python=args.remote_python)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        lat, path = stats["latency_ms"], stats["artifact"]
        print(f"{path} on {stats['device']} ({stats['target']}, {stats['threads']} thread(s)): p50 {lat['p50']:.3f} ms, "
              f"p90 {lat['p90']:.3f}, p99 {lat['p99']:.3f}, mean {lat['mean']:.3f} (n={lat['n']}); "
              f"load {stats['load_ms']:.0f} ms; peak RSS {stats['peak_rss_mb'] or 0:.0f} MB; "
              f"size {stats['size_bytes'] / 1e6:.2f} MB")
    return EXIT_OK


def _report(args) -> int:
    from edgekit.api import render

    doc = render(args.dir)
    folder = Path(args.dir) if Path(args.dir).is_dir() else Path(args.dir).parent
    print(f"re-rendered {folder / 'report.md'} and {folder / 'report.html'} from report.json "
          f"({len(doc.targets)} targets, created {doc.created})")
    return EXIT_OK


def _schema(args) -> int:
    from edgekit.api import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))
    return EXIT_OK


def _cache(args) -> int:
    from edgekit.orchestrate.cache import Cache, default_root

    cache = Cache(default_root())
    if args.action == "prune" and args.max_size is None:
        raise InputError("edgekit cache prune: give --max-size (e.g. --max-size 20G)")
    if args.action == "info":
        entries = cache.entries()
        by_kind: dict[str, list] = {}
        for e in entries:
            by_kind.setdefault(e["kind"], []).append(e["bytes"])
        print(f"cache {cache.root}: {len(entries)} entries, {sum(e['bytes'] for e in entries) / 1e6:.1f} MB")
        for kind, sizes in by_kind.items():
            print(f"  {kind}: {len(sizes)} entries, {sum(sizes) / 1e6:.1f} MB")
    elif args.action == "verify":
        bad = cache.verify()
        for path, why in bad:
            print(f"removed damaged entry {path}: {why}")
        print(f"cache {cache.root}: {len(cache.entries())} entries intact, {len(bad)} damaged removed")
    elif args.action == "prune":
        removed = cache.prune(args.max_size)
        print(f"cache {cache.root}: removed {len(removed)} oldest entries "
              f"({sum(e['bytes'] for e in removed) / 1e6:.1f} MB); {len(cache.entries())} left")
    else:
        print(f"cache {cache.root}: removed {cache.clear()} entries")
    return EXIT_OK


def _doctor(args) -> int:
    from edgekit.doctor import report

    print(report(deep=args.deep))
    return EXIT_OK


def _targets(args) -> int:
    from edgekit.config.profiles import available, load_profile

    for name in available():
        p = load_profile(name)
        print(f"{name:16} {p.backend:12} {p.description}")
    return EXIT_OK

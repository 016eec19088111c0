"""The Python API, next to the command line (``import edgekit``):

    report = edgekit.run("examples/tiny_multimodal", targets=["ort-cpu"], out="runs/tiny")
    report = edgekit.run({"targets": ["ort-cpu"], "model": {...}, "data": {...}})   # a recipe as a dict
    stats = edgekit.bench("runs/tiny/artifacts/ort-cpu/model_int8.onnx", runs=50)
    edgekit.render("runs/tiny")                      # report.md + report.html again from report.json
    schema = edgekit.recipe_schema()                 # the recipe's JSON schema

Errors are the command line's: ``edgekit.errors.InputError`` for bad input (exit 2 there); a failed
target is a ``failed`` row of the returned report, never an exception.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from edgekit.errors import InputError, TargetError


def run(recipe: str | Path | dict, targets: Optional[Sequence[str]] = None, out: Optional[str | Path] = None,
        device: Optional[str] = None, cache: bool = True, reuse: bool = False, cluster: Optional[str] = None):
    """Run the pipeline (``edgekit run``) and return the typed report (``edgekit.report.schema.Report``).

    ``recipe``: a recipe file or folder, or the recipe's content as a dict; in a dict, relative paths
    (model source, data files, target profiles) resolve against the current directory. ``cluster``:
    as ``edgekit run --cluster`` (default: the recipe's ``[run] cluster``, else worker processes here)."""
    if not isinstance(recipe, dict):
        return _run(recipe, targets, out, device, cache, reuse, cluster)
    folder = Path(tempfile.mkdtemp(prefix="edgekit-recipe-"))
    try:
        path = folder / "edgekit.toml"
        path.write_text(to_toml(_absolute(recipe, Path.cwd())))
        return _run(path, targets, out, device, cache, reuse, cluster)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(path, targets, out, device, cache: bool, reuse: bool, cluster: Optional[str]):
    from edgekit.config.recipe import load_recipe
    from edgekit.orchestrate import pipeline
    from edgekit.orchestrate.cache import Cache
    from edgekit.orchestrate.executor import opened

    with opened(cluster or load_recipe(path).run.cluster) as executor:
        return pipeline.run(path, targets, out, device, cache=Cache.open(cache, reuse), executor=executor)


def bench(artifact: str | Path, target: Optional[str] = None, data: Optional[str | Path] = None,
          device: Optional[str] = None, threads: Optional[int] = None, warmup: int = 10, runs: int = 100,
          remote_python: Optional[str] = None) -> dict:
    """Time one artifact (``edgekit bench``): latency stats, load time, peak RSS, size, device, target."""
    from edgekit.backends import get_backend
    from edgekit.config.profiles import load_profile, with_device
    from edgekit.measure.bench import measure
    from edgekit.measure.machine import host_device

    path = Path(artifact)
    if not path.is_file():
        raise InputError(f"artifact {path}: file not found")
    if runs < 1 or warmup < 0:
        raise InputError(f"runs must be >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup})")
    prof = load_profile(target) if target else _profile_for(path)
    backend = get_backend(prof.backend)
    if path.suffix != backend.suffix:
        raise InputError(f"artifact {path}: target {prof.name} runs {backend.suffix} files")
    _, _, runtime = backend.options(prof)
    if threads:
        runtime = runtime.model_copy(update={"threads": threads})
    feeds = _bench_feeds(Path(data)) if data else (lambda runner: [runner.synthetic_feed()])

    def load():
        runner = backend.load(path, runtime)
        if data:  # the data must fit this artifact: names, then one real call
            names = [i["name"] for i in (runner.signature() or {}).get("inputs", [])]
            missing = [n for n in names if n not in feeds[0]]
            if missing:
                raise InputError(f"--data {data}: no array for input(s) {', '.join(missing)} of {path} "
                                 f"(the file has: {', '.join(feeds[0]) or 'nothing'})")
            try:
                runner.run(feeds[0])
            except Exception as e:  # noqa: BLE001 - a shape or dtype the artifact does not take
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InputError(f"--data {data}: {path} cannot run on its sample 0: {first}") from None
        return runner

    where = host_device()
    try:
        if device:
            where = with_device(prof, device).device
            from edgekit.measure import remote

            fs = feeds if not callable(feeds) else feeds(backend.load(path, runtime))
            stats = remote.benchmark(device, [str(f) for f in backend.files(path)], fs[0],
                                     runner=backend.remote_runner(), settings=backend.remote_settings(runtime),
                                     warmup=warmup, runs=runs, python=remote_python or prof.remote_python)
        else:
            stats, _ = measure(load, feeds, warmup=warmup, runs=runs)
    except TargetError as e:
        raise InputError(str(e)) from None
    stats.update(artifact=str(path), size_bytes=sum(f.stat().st_size for f in backend.files(path)), device=where,
                 threads=getattr(runtime, "threads", None), target=prof.name)
    return stats


def render(out: str | Path):
    """Write report.md and report.html of an output folder again from its report.json; return the report."""
    from pydantic import ValidationError

    from edgekit import report
    from edgekit.report.schema import SCHEMA, Report

    folder = Path(out)
    path = folder / "report.json" if folder.is_dir() else folder
    if not path.is_file():
        raise InputError(f"{path}: no report.json here (give an edgekit output folder)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            raise InputError(f"{path}: not an {SCHEMA} report (schema {raw.get('schema') if isinstance(raw, dict) else None!r})")
        doc = Report.model_validate(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable report.json: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        raise InputError(f"{path}: not a valid {SCHEMA} report: {'.'.join(map(str, first['loc']))}: "
                         f"{first['msg']}") from None
    report.write(doc, path.parent)
    return doc


def recipe_schema() -> dict:
    """The recipe's JSON schema (draft 2020-12), as editors and CI linters read it."""
    from edgekit.config.recipe import Recipe

    schema = Recipe.model_json_schema()
    schema.get("properties", {}).pop("path", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "edgekit recipe (edgekit.toml)"
    return schema


# -- helpers -------------------------------------------------------------------------------------------------

def _bench_feeds(data: Path) -> list[dict]:
    """Sample 0 of every array of ``data`` (labels left out), checked readable and non-empty."""
    import zipfile

    import numpy as np

    if not data.is_file():
        raise InputError(f"--data {data}: file not found")
    try:
        with np.load(data, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "labels"}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, MemoryError) as e:
        raise InputError(f"--data {data}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if not arrays:
        raise InputError(f"--data {data}: holds no input arrays")
    empty = [k for k, a in arrays.items() if a.ndim == 0 or len(a) == 0]
    if empty:
        raise InputError(f"--data {data}: array(s) {', '.join(empty)} have no samples on axis 0")
    return [{k: a[:1] for k, a in arrays.items()}]


def _profile_for(path: Path):
    from edgekit.backends import get_backend
    from edgekit.config.profiles import available, load_profile
    from edgekit.measure.devices import unmeasurable_reason

    for name in available():  # the first profile that can time this file type on this machine
        prof = load_profile(name)
        backend = get_backend(prof.backend)
        if (backend.suffix == path.suffix and prof.device == "host" and not unmeasurable_reason("host", prof.arch)
                and not backend.unmeasurable_reason(backend.options(prof)[2])):
            return prof
    raise InputError(f"artifact {path}: no target profile runs {path.suffix or 'extension-less'} files here")


def _absolute(recipe: dict, base: Path) -> dict:
    """A copy of a recipe dict with its relative paths made absolute against ``base``."""
    import copy

    r = copy.deepcopy(recipe)
    model, data = r.get("model") or {}, r.get("data") or {}
    src = model.get("source")
    if isinstance(src, str):
        file, sep, attr = src.rpartition(":")
        if sep and file and not Path(file).is_absolute():
            model["source"] = f"{(base / file).resolve()}:{attr}"
        elif src.endswith(".pt2") and not Path(src).is_absolute():
            model["source"] = str((base / src).resolve())
    for key in ("calibration", "evaluation"):
        if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
            data[key] = str((base / data[key]).resolve())
    if isinstance(r.get("targets"), list):
        r["targets"] = [str((base / t).resolve()) if isinstance(t, str) and t.endswith(".toml") else t
                        for t in r["targets"]]
    if model and not model.get("name"):
        model["name"] = base.name or "model"
    return r


def to_toml(doc: dict) -> str:
    """TOML for a recipe-shaped dict: scalars and arrays, tables, arrays of inline tables."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise InputError(f"recipe value {v!r}: a {type(v).__name__} cannot go into a recipe")

    def table(prefix: str, d: dict) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{json.dumps(k)} = {value(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k), v)

    table("", doc)
    return "\n".join(lines) + "\n"

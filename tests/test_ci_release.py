"""Release CI: `edgekit ci` gates + JUnit, baseline regressions (noise-aware latency), manifest hashes,
the build cache (warm re-run), and report.html opened in headless Chromium."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from edgekit.release import baseline
from edgekit.report import manifest
from edgekit.report.schema import ArtifactResult, EvalInfo, Latency, Machine, ModelInfo, Report, TargetRow
from tests.conftest import EXAMPLE, ROOT

TARGETS = ("ort-cpu", "openvino-x86", "tflite-mobile")
LOOSE = "[gates]\nmax_metric_drop = 0.05\nmax_size_bytes = 100_000_000\n"


def edgekit(*args, cache: Path, env=None):
    env = {**{k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}, "EDGEKIT_CACHE": str(cache),
           **(env or {})}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "edgekit", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env=env)
    p.wall_s = time.perf_counter() - t0
    return p


def example_recipe(folder: Path, gates: str = LOOSE) -> Path:
    text = (EXAMPLE / "edgekit.toml").read_text().split("[gates]")[0]
    text = text.replace('"model.py:build"', f'"{EXAMPLE}/model.py:build"').replace("../../calibration",
                                                                                  f"{ROOT}/calibration")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "edgekit.toml").write_text(text + gates)
    return folder / "edgekit.toml"


def junit_cases(path: Path) -> dict:
    root = ET.parse(path).getroot()
    return {(tc.get("classname"), tc.get("name")): tc for tc in root.iter("testcase")}


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """One cold `edgekit ci` of the tiny example (3 targets). It fills the test session's cache, so the
    other end-to-end tests of the tiny example (test_e2e.py) reuse its builds."""
    base = tmp_path_factory.mktemp("ci")
    recipe = example_recipe(base / "recipe")
    cache = Path(os.environ["EDGEKIT_CACHE"])
    p = edgekit("ci", recipe, "--out", base / "run1", "--junit", base / "run1.xml", "--summary", base / "run1.md",
                cache=cache, env={"GITHUB_STEP_SUMMARY": ""})
    return base, recipe, cache, p


@pytest.mark.slow
def test_passing_ci_exits_0_with_a_junit_case_per_target_and_gate(cold):
    base, _, _, p = cold
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    doc = json.loads((base / "run1/report.json").read_text())
    assert all(t["cache"]["build"] == "miss" for t in doc["targets"])  # it was a cold run
    cases = junit_cases(base / "run1.xml")
    assert set(cases) == {(f"edgekit.{t}", g) for t in TARGETS for g in ("max_metric_drop", "max_size_bytes")}
    assert not any(tc.find("failure") is not None for tc in cases.values())
    md = (base / "run1.md").read_text()
    assert "edgekit ci: tiny_multimodal — ✅ passed" in md and "| ort-cpu | max_size_bytes |" in md


@pytest.mark.slow
def test_tight_gate_exits_1_and_junit_names_target_and_gate(cold, tmp_path):
    base, _, cache, _ = cold
    recipe = example_recipe(tmp_path, LOOSE + "[gates.targets.ort-cpu]\nmax_size_bytes = 1000\n")
    summary = tmp_path / "step_summary.md"
    p = edgekit("ci", recipe, "--out", tmp_path / "out", "--junit", tmp_path / "j.xml", "--reuse", cache=cache,
                env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]
    cases = junit_cases(tmp_path / "j.xml")
    fail = cases[("edgekit.ort-cpu", "max_size_bytes")].find("failure")
    assert fail is not None and "ort-cpu: gate max_size_bytes failed" in fail.get("message")
    assert cases[("edgekit.openvino-x86", "max_size_bytes")].find("failure") is None
    assert "❌ **ort-cpu** `max_size_bytes`" in summary.read_text()  # appended to $GITHUB_STEP_SUMMARY


@pytest.mark.slow
def test_manifest_hashes_every_artifact_file(cold):
    base, _, _, _ = cold
    out = base / "run1"
    man = json.loads((out / "manifest.json").read_text())
    assert man["schema"] == "edgekit.manifest/1" and man["recipe"]["sha256"]
    arts = {(a["target"], a["kind"]): a for a in man["artifacts"]}
    assert set(arts) == {(t, k) for t in TARGETS for k in ("fp32", "optimized")}
    on_disk = {p.relative_to(out).as_posix() for p in (out / "artifacts").rglob("*") if p.is_file()}
    assert {f["path"] for a in arts.values() for f in a["files"]} == on_disk
    assert manifest.verify(out) == []
    assert arts[("openvino-x86", "optimized")]["quantization"]["preset"]
    assert {i["name"] for i in arts[("ort-cpu", "optimized")]["io"]["inputs"]} == {"image", "input_ids",
                                                                                   "attention_mask"}
    assert man["toolchains"]["tflite-mobile"]["litert-torch"]


@pytest.mark.slow
def test_two_builds_give_identical_artifact_hashes(cold, tmp_path):
    """Every exporter is deterministic: a second build from scratch (no cache) gives the same bytes."""
    base, recipe, cache, _ = cold
    p = edgekit("run", recipe, "--out", tmp_path / "run2", "--no-cache", cache=cache)
    assert p.returncode == 0, p.stderr[-3000:]
    hashes = [{(a["target"], f["path"]): f["sha256"] for a in json.loads((d / "manifest.json").read_text())["artifacts"]
               for f in a["files"]} for d in (base / "run1", tmp_path / "run2")]
    assert len(hashes[0]) == 8 and hashes[0] == hashes[1]


@pytest.mark.slow
def test_warm_rerun_is_10x_faster_and_reuses_the_cache(cold, tmp_path):
    base, recipe, cache, p_cold = cold
    p = edgekit("ci", recipe, "--out", tmp_path / "warm", "--reuse", cache=cache)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((tmp_path / "warm/report.json").read_text())
    for t in doc["targets"]:
        assert t["cache"]["build"] == "hit" and set(t["cache"]["measure"].values()) == {"reused"}
    assert "fp32 torch reference" in p.stderr and "cached" in p.stderr
    print(f"cold {p_cold.wall_s:.1f} s, warm (--reuse) {p.wall_s:.1f} s")
    assert p_cold.wall_s >= 10 * p.wall_s, (p_cold.wall_s, p.wall_s)
    # same artifacts as the cold run, byte for byte
    assert manifest.verify(tmp_path / "warm") == []
    cold_man = json.loads((base / "run1/manifest.json").read_text())["artifacts"]
    assert json.loads((tmp_path / "warm/manifest.json").read_text())["artifacts"] == cold_man


@pytest.mark.slow
def test_warm_rerun_retimes_every_artifact_and_reuses_only_its_verified_outputs(cold, tmp_path):
    """Without --reuse a warm run re-times every artifact (fresh latency) but does not run the evaluation
    set again: the outputs of the same bytes on the same runtime and CPU come from the cache."""
    base, recipe, cache, _ = cold
    p = edgekit("run", recipe, "--out", tmp_path / "warm", cache=cache)
    assert p.returncode == 0, p.stderr[-3000:]
    warm, first = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "warm", base / "run1"))
    for t, c in zip(warm["targets"], first["targets"]):
        assert t["cache"]["build"] == "hit"
        assert set(t["cache"]["measure"].values()) == {"timed (outputs cached)"}
        for kind in ("fp32", "optimized"):
            assert t[kind]["metric"] == c[kind]["metric"] and t[kind]["fidelity"] == c[kind]["fidelity"]
            # timed again (rounds are added until stable, so the count may differ; the figures do)
            assert t[kind]["latency_ms"]["n"] >= 200 and t[kind]["latency_ms"]["rounds_p50"] != c[kind]["latency_ms"]["rounds_p50"]


@pytest.mark.slow
def test_injected_30_percent_latency_regression_fails(cold, tmp_path):
    """The previous release was 30 % faster (its report edited so): judged on the stored numbers
    (--reuse: no re-measurement), every target fails baseline_latency, nothing else. A regression is
    called only when the p50 intervals separate: where the cold run's interval is wider than ±13 % (a
    busy machine), the injected slow-down is made just large enough to separate them."""
    base, recipe, cache, _ = cold
    prev = json.loads((base / "run1/report.json").read_text())
    for t in prev["targets"]:
        lat = t["optimized"]["latency_ms"]
        f = max(1.3, 1.05 * lat["ci"][1] / lat["ci"][0])
        for k in ("p50", "p90", "p99", "mean", "min", "std", "mad", "q1", "q3"):
            lat[k] = lat[k] / f
        lat["ci"] = [x / f for x in lat["ci"]]
        lat["rounds_p50"] = [x / f for x in lat["rounds_p50"]]
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev/report.json").write_text(json.dumps(prev))
    p = edgekit("ci", recipe, "--out", tmp_path / "out", "--reuse", "--baseline", tmp_path / "prev/report.json",
                "--junit", tmp_path / "j.xml", cache=cache)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]
    cases = junit_cases(tmp_path / "j.xml")
    failed = {k for k, tc in cases.items() if tc.find("failure") is not None}
    assert failed == {(f"edgekit.{t}", "baseline_latency") for t in TARGETS}
    assert "ort-cpu: gate baseline_latency failed" in cases[("edgekit.ort-cpu", "baseline_latency")].find(
        "failure").get("message")
    res = json.loads((tmp_path / "out/report.json").read_text())["baseline"]["results"]
    assert {(r["gate"], r["passed"]) for r in res if r["gate"] != "baseline_latency"} == {
        ("baseline_metric", True), ("baseline_size", True)}


@pytest.mark.slow
def test_unchanged_model_never_fails_against_its_own_baseline_20_times(cold):
    """20 fresh measurements of the same ort-cpu artifact (this process, same runtime settings and
    harness as the pipeline's measure worker) judged against the cold run's report, with the same
    confirmation `edgekit ci` uses (baseline and current artifact timed interleaved)."""
    from edgekit.backends import get_backend
    from edgekit.measure.bench import ab_compare, measure
    from edgekit.config.profiles import load_profile
    from edgekit.config.recipe import load_recipe

    base, recipe_path, _, _ = cold
    out = base / "run1"
    base_doc = baseline.load(out / "report.json")
    prof = load_profile("ort-cpu")
    backend = get_backend(prof.backend)
    _, _, runtime = backend.options(prof)
    row = base_doc.target("ort-cpu")
    art = out / row.optimized.artifact
    with np.load(ROOT / "calibration/tiny_multimodal/eval.npz") as z:
        feed = {k: z[k][:1] for k in ("image", "input_ids", "attention_mask")}
    gates = load_recipe(recipe_path).gates
    confirmed = 0

    def confirm(r, prev):
        nonlocal confirmed
        confirmed += 1
        res = ab_compare(backend.load(art, runtime), backend.load(art, runtime), feed, warmup=prof.bench.warmup,
                         rounds=10, per_round=prof.bench.runs // 10)
        return {"method": "ab", "a": Latency(**res["a"]), "b": Latency(**res["b"])}

    verdicts = []
    for _ in range(20):
        stats, _ = measure(lambda: backend.load(art, runtime), [feed], warmup=prof.bench.warmup, runs=prof.bench.runs)
        doc = base_doc.model_copy(deep=True)
        doc.targets = [row.model_copy(deep=True)]
        doc.targets[0].optimized.latency_ms = Latency(**stats["latency_ms"])
        (lat,) = [g for g in baseline.compare(doc, base_doc, gates, confirm=confirm) if g.gate == "baseline_latency"]
        verdicts.append((lat.value, lat.limit, lat.passed))
    print(f"{confirmed} of 20 suspected and re-measured interleaved; verdicts: {verdicts}")
    assert all(v[2] for v in verdicts), verdicts


# -- bad input: the baseline --------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("{not json", "not a readable JSON report"),
    ('{"schema": "edgekit.report/0", "targets": []}', "schema 'edgekit.report/0' does not match"),
    ('{"targets": []}', "no 'schema' field"),
    ('{"schema": "edgekit.report/1", "targets": {"a": 1}}', "'targets' must be a list"),
])
def test_bad_baseline_exits_2_before_any_work(write_recipe, workdir, capsys, content, message):
    from edgekit.cli import main

    prev = workdir / "prev.json"
    if content is not None:
        prev.write_text(content)
    assert main(["ci", str(write_recipe()), "--out", str(workdir / "out"), "--baseline", str(prev)]) == 2
    err = capsys.readouterr().err
    assert f"baseline {prev}" in err and message in err
    assert not (workdir / "out").exists()


# -- judging latency ----------------------------------------------------------------------------------------

def _lat(p50, mad, n=200):
    return Latency(p50=p50, p90=p50, p99=p50, mean=p50, mad=mad, n=n)


def test_latency_threshold_widens_with_noise_and_never_drops_below_the_floor():
    quiet = baseline.judge_latency(_lat(2.0, 0.02), _lat(2.6, 0.02), 0.10)
    assert quiet[0] == pytest.approx(0.3) and quiet[1] == 0.10 and quiet[2] is False
    noisy = baseline.judge_latency(_lat(2.0, 2.0, n=20), _lat(2.6, 2.6, n=20), 0.10)
    assert noisy[1] > 0.3 and noisy[2] is True  # within the noise: not a regression
    assert baseline.judge_latency(_lat(2.0, 0.02), _lat(2.1, 0.02), 0.10)[2] is True


def test_suspected_regression_is_cleared_by_an_interleaved_remeasurement(write_recipe):
    from edgekit.config.recipe import load_recipe

    gates = load_recipe(write_recipe()).gates

    def report(p50: float, mad: float) -> Report:
        art = ArtifactResult(artifact="a.onnx", files=["a.onnx"], size_bytes=100, precision="int8", metric=0.99,
                             latency_ms=_lat(p50, mad))
        return Report(edgekit_version="t", created="t", machine=Machine(cpu="c", arch="x"),
                      model=ModelInfo(name="m", source="s", params=1),
                      eval=EvalInfo(path="e", metric="cosine", n=1, fp32_torch=1.0),
                      targets=[TargetRow(name="ort-cpu", backend="onnxruntime", device="host", optimized=art)])

    doc, base = report(3.0, 0.03), report(2.0, 0.02)
    (lat,) = [g for g in baseline.compare(doc, base, gates) if g.gate == "baseline_latency"]
    assert lat.passed is False and lat.value == pytest.approx(0.5)
    same = lambda r, p: {"method": "ab", "a": _lat(2.5, 0.02), "b": _lat(2.52, 0.02)}  # noqa: E731
    (lat,) = [g for g in baseline.compare(doc, base, gates, confirm=same) if g.gate == "baseline_latency"]
    assert lat.passed is True and lat.confirmed_by["method"] == "ab"


# -- the cache -----------------------------------------------------------------------------------------------

def test_cache_key_follows_weights_data_profile_and_versions(write_recipe, workdir, tmp_path):
    import torch

    from edgekit.orchestrate.cache import Keys
    from edgekit.inputs.model import load_model
    from edgekit.config.recipe import load_recipe

    recipe = load_recipe(write_recipe())
    model = load_model(recipe)
    prof = tmp_path / "p.toml"
    shutil.copy(ROOT / "targets/ort-cpu.toml", prof)
    from edgekit.orchestrate.jobs import BuildJob

    job = BuildJob(recipe=str(recipe.path), target=str(prof), out="/x")
    calib, evals = workdir / "calib.npz", workdir / "eval.npz"

    def key(m=model, r=recipe, versions={"onnxruntime": "1"}, j=job):
        return Keys.for_run(r, m, calib, evals).build(j.identity(), prof, versions)

    k0 = key()
    assert key() == k0 and key(j=job.model_copy(update={"out": "/y"})) == k0  # where it writes is not an input
    assert key(versions={"onnxruntime": "2"}) != k0
    import edgekit.orchestrate.cache as cache

    real = cache.source_digest()
    cache._SOURCE["source"] = "edited"       # edgekit's own code changed, its version did not
    try:
        assert key() != k0
    finally:
        cache._SOURCE["source"] = real
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert key() != k0
    model = load_model(recipe)
    assert key(m=model) == k0
    prof.write_text(prof.read_text().replace("threads = 1", "threads = 2"))
    assert key() != k0
    shutil.copy(ROOT / "targets/ort-cpu.toml", prof)
    arrays = dict(np.load(calib))
    arrays["image"] = arrays["image"] + 1
    np.savez(calib, **arrays)
    assert key() != k0
    # gates do not change artifacts; the input specs do
    gated = load_recipe(write_recipe(extra="[gates]\nmin_speedup = 9.0"))
    assert Keys.for_run(gated, model, calib, evals).recipe == Keys.for_run(recipe, model, calib, evals).recipe
    changed = load_recipe(write_recipe(extra="max_calibration_samples = 3"))
    assert Keys.for_run(changed, model, calib, evals).recipe != Keys.for_run(recipe, model, calib, evals).recipe


def test_cache_writes_are_atomic(tmp_path, monkeypatch):
    from edgekit.orchestrate.cache import Cache

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "c"))
    c = Cache.open()

    def crash(d: Path):
        (d / "half.bin").write_bytes(b"x" * 100)
        raise OSError("disk full")

    with pytest.raises(OSError):
        c.put("builds", "k1", crash)
    assert c.get("builds", "k1") is None and not list((tmp_path / "c/tmp").iterdir())
    # an orphan left by a killed writer is never read, and is cleaned up once old
    orphan = tmp_path / "c/tmp/k2.123.abcd"
    orphan.mkdir()
    (orphan / "entry.json").write_text("{}")
    assert c.get("builds", "k2") is None
    os.utime(orphan, (0, 0))
    Cache.open()
    assert not orphan.exists()
    c.put("builds", "k3", lambda d: {"ok": 1})
    assert json.loads((c.get("builds", "k3") / "entry.json").read_text())["ok"] == 1
    assert Cache.open(enabled=False).get("builds", "k3") is None


# -- report.html ---------------------------------------------------------------------------------------------

def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed (CI must `apt-get install -y chromium`)")
    pytest.skip("chromium not installed (apt-get install -y chromium); required when CI is set")


def dump_dom(html_file: Path, tmp_path: Path, window: str = "800,600") -> str:
    p = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--window-size={window}",
                        f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", html_file.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@pytest.mark.slow
def test_report_html_opens_in_headless_chromium(cold, tmp_path):
    base, _, _, _ = cold
    page = base / "run1/report.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained
    assert text.count("data:image/png;base64,") == 3
    dom = dump_dom(page, tmp_path)
    assert "edgekit report: tiny_multimodal" in dom
    for t in TARGETS:
        assert f"<td>{t}</td>" in dom
    assert "p50 fp32 → opt (ms)" in dom and "Latency distributions" in dom and "Artifact sizes" in dom
    assert dom.count("★ best") == 1 and 'class="best"' in dom  # the best target within its gates
    for t in TARGETS:  # every artifact linked, and the per-target details report.md has
        assert f'href="artifacts/{t}/' in dom and f"<h3>{t} (" in dom
    assert dom.count("p99") >= 6 and "peak RSS" in dom and "load " in dom and "quantize search" in dom
    wide = dump_dom(page, tmp_path, window="1280,2000")  # laid out for a 1280 px window: nothing overflows
    assert int(wide.split('data-scroll-width="')[1].split('"')[0]) <= 1280


def test_report_html_renders_a_failed_and_an_unmeasured_target(tmp_path):
    from edgekit.report import html

    side = {"artifact": "a/m.onnx", "files": ["a/m.onnx"], "size_bytes": 1000, "precision": "fp32", "metric": 0.9,
            "latency_ms": None, "latency_reason": "not measured: no device adb:x"}
    doc = {"schema": "edgekit.report/1", "edgekit_version": "0", "created": "now",
           "model": {"name": "m", "source": "m.py:build", "params": 1e6, "macs": 1e6},
           "machine": {"cpu": "cpu", "arch": "x86_64", "cores": 2, "os": "linux"},
           "eval": {"path": "e.npz", "metric": "top1", "n": 5, "fp32_torch": 0.9},
           "targets": [
               {"name": "phone", "backend": "litert", "status": "ok", "device": "adb:x", "reason": None,
                "fp32": side, "optimized": {**side, "precision": "int8"}, "speedup_p50": None, "metric_drop": 0.0},
               {"name": "broken", "backend": "onnxruntime", "status": "failed", "device": "host",
                "reason": "torch.onnx.export failed: boom", "fp32": None, "optimized": None, "speedup_p50": None,
                "metric_drop": None}],
           "gates": [{"target": "broken", "gate": "min_speedup", "limit": 2, "value": None, "passed": None,
                      "what": "speedup", "note": "target failed"}]}
    html.write(Report.model_validate(doc), tmp_path)
    dom = dump_dom(tmp_path / "report.html", tmp_path)
    assert "<td>broken</td>" in dom and "torch.onnx.export failed: boom" in dom
    assert "<td>phone</td>" in dom and "not measured" in dom and "Artifact sizes" in dom


@pytest.mark.slow
def test_openvino_ir_bytes_do_not_depend_on_what_the_process_did_before(tmp_path):
    """OpenVINO names nodes from a process-wide counter; two builds in one process (counter far apart)
    must still save identical .xml/.bin (edgekit.backends.openvino.stable_names)."""
    from tests.conftest import build_target

    digests = []
    for i in range(2):
        build_target("openvino-x86", tmp_path / str(i), 8, 4) if (tmp_path / str(i)).mkdir() is None else None
        digests.append({f.name: manifest.sha256(f) for f in (tmp_path / str(i)).iterdir() if f.suffix in (".xml", ".bin")})
    assert len(digests[0]) == 4 and digests[0] == digests[1]

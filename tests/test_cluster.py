"""``edgekit run --cluster``: the same jobs as Ray tasks, against a real local two-node Ray cluster
(``ray.cluster_utils.Cluster``: a head for builds and a "board" node advertising a custom resource that
the targets' measurements require). Bad addresses, resources and matrices fail with exit 2 and a message
naming the bad input, before any work."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA, EXAMPLE, ROOT, recipe_text

BOARD = "edgekit_test_board"
TARGETS = ("ort-cpu", "openvino-x86", "tflite-mobile")


def edgekit(*args, cwd=ROOT, timeout=900):
    return subprocess.run([sys.executable, "-m", "edgekit", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


# -- bad input: exit 2, naming it, nothing built -------------------------------------------------------

@pytest.mark.parametrize("address, says", [
    ("nonsense address", "expected auto, local, HOST:PORT"),
    ("127.0.0.1:99999", "expected auto, local, HOST:PORT"),
    ("127.0.0.1:1", "cannot reach the Ray head at 127.0.0.1:1"),
    ("ray://127.0.0.1:1", "cannot reach the Ray head at 127.0.0.1:1"),
])
def test_a_cluster_that_cannot_be_reached_is_exit_2_naming_the_address(tmp_path, address, says):
    r = edgekit("run", EXAMPLE, "--cluster", address, "--out", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    assert f"--cluster {address!r}" in r.stderr or f"--cluster {address}:" in r.stderr
    assert says in r.stderr
    assert not (tmp_path / "out").exists()


def test_recipe_run_cluster_is_validated(write_recipe):
    from edgekit.config.recipe import load_recipe
    from edgekit.errors import InputError

    p = write_recipe(recipe_text("model.py:build", "calib.npz", "eval.npz", extra='[run]\ncluster = "head:port"\n'))
    with pytest.raises(InputError, match=r"run\.cluster: .*'head:port': expected auto, local, HOST:PORT"):
        load_recipe(p)


def test_recipes_of_a_matrix_must_agree_on_their_cluster(workdir, tmp_path):
    a, b = workdir / "a.toml", workdir / "b.toml"
    a.write_text(recipe_text("model.py:build", "calib.npz", "eval.npz", extra='[run]\ncluster = "auto"\n'))
    b.write_text(recipe_text("model.py:build", "calib.npz", "eval.npz"))
    r = edgekit("run", a, b, "--out", tmp_path / "out")
    assert r.returncode == 2
    assert "different [run] cluster values" in r.stderr and "a.toml: auto" in r.stderr and "b.toml: none" in r.stderr


def test_two_recipes_with_one_model_name_are_refused(workdir, tmp_path):
    a, b = workdir / "a.toml", workdir / "b.toml"
    for p in (a, b):
        p.write_text(recipe_text("model.py:build", "calib.npz", "eval.npz").replace(
            "[model]", '[model]\nname = "same"'))
    r = edgekit("run", a, b, "--out", tmp_path / "out")
    assert r.returncode == 2
    assert "model name 'same' is also" in r.stderr and str(a) in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("resources, says", [
    ("{ CPU = 1 }", "CPU is not a device"),
    ("{ board = 0 }", "amount 0 must be > 0"),
    ('{ "bad name" = 1 }', "expected a Ray resource name"),
])
def test_bad_profile_resources_name_the_profile(tmp_path, resources, says):
    from edgekit.config.profiles import load_profile
    from edgekit.errors import InputError

    p = tmp_path / "t.toml"
    p.write_text(f'name = "t"\nbackend = "onnxruntime"\nresources = {resources}\n')
    with pytest.raises(InputError, match=re.escape(str(p)) + ".*" + re.escape(says)):
        load_profile(str(p))


# -- a real two-node cluster --------------------------------------------------------------------------

def board_profiles(folder: Path) -> list[Path]:
    """The shipped CPU targets, with their measurement routed to the board node."""
    out = []
    for name in TARGETS:
        text = (ROOT / "targets" / f"{name}.toml").read_text()
        text = f'resources = {{ {BOARD} = 1 }}\n' + text
        p = folder / f"{name}.toml"
        p.write_text(text)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def cluster():
    """A head (1 CPU: builds) and a board (1 CPU + the custom resource), both on this machine."""
    ray_utils = pytest.importorskip("ray.cluster_utils")
    c = ray_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    board = c.add_node(num_cpus=1, resources={BOARD: 1})
    c.wait_for_nodes()
    yield c, board
    c.shutdown()


def _hashes(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    return {f["path"]: f["sha256"] for a in m["artifacts"] for f in a["files"]}


def _figures(out: Path) -> dict:
    """What must not depend on the executor: statuses, metrics, sizes, what was built."""
    d = json.loads((out / "report.json").read_text())
    keep = {}
    for t in d["targets"]:
        keep[t["name"]] = {"status": t["status"], "metric_drop": t["metric_drop"], "size_ratio": t["size_ratio"],
                           **{k: {f: t[k][f] for f in ("metric", "size_bytes", "precision", "fidelity")}
                              for k in ("fp32", "optimized")}}
    return keep


@pytest.mark.slow
def test_cluster_gives_the_local_figures_and_measures_on_the_board(cluster, tmp_path):
    c, board = cluster
    profiles = board_profiles(tmp_path)
    local = edgekit("run", EXAMPLE, "--targets", *profiles, "--no-cache", "--out", tmp_path / "local")
    assert local.returncode == 0, local.stdout + local.stderr
    t0 = time.monotonic()
    ray_run = edgekit("run", EXAMPLE, "--targets", *profiles, "--no-cache", "--cluster", c.address,
                      "--out", tmp_path / "ray")
    assert ray_run.returncode == 0, ray_run.stdout + ray_run.stderr
    print(f"cluster run: {time.monotonic() - t0:.0f} s")
    assert _hashes(tmp_path / "ray") == _hashes(tmp_path / "local")
    assert _figures(tmp_path / "ray") == _figures(tmp_path / "local")
    d = json.loads((tmp_path / "ray" / "report.json").read_text())
    assert d["cluster"] == c.address
    assert f"on the node each row's device names (Ray cluster {c.address})" in (tmp_path / "ray" / "report.md").read_text()
    for t in d["targets"]:  # every measurement ran on the node advertising the resource
        assert t["device"].startswith(f"ray node {board.node_id[:8]} "), t["device"]
        assert t["optimized"]["latency_ms"]["p50"] > 0 and t["speedup_p50"] > 1
        assert board.node_id[:8] in t["timing"]["method"]
        assert t["fp32"]["verified_on"].startswith(f"ray node {board.node_id[:8]}") or "aarch64" in t["fp32"]["verified_on"]
    local_doc = json.loads((tmp_path / "local" / "report.json").read_text())
    assert "cluster" not in local_doc and local_doc["targets"][0]["device"].startswith("host-")


@pytest.mark.slow
def test_a_matrix_of_two_recipes_runs_in_one_call(cluster, tmp_path):
    c, _ = cluster
    other = tmp_path / "other"  # a second model: absolute data paths travel too
    other.mkdir()
    shutil.copy(EXAMPLE / "model.py", other / "model.py")
    (other / "edgekit.toml").write_text(recipe_text("model.py:build", str(DATA / "calib.npz"), str(DATA / "eval.npz"))
                                        .replace("[model]", '[model]\nname = "tiny_b"'))
    r = edgekit("run", EXAMPLE, other, "--targets", "ort-cpu", "--no-cache", "--cluster", c.address,
                "--out", tmp_path / "m")
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((tmp_path / "m" / "matrix.json").read_text())
    assert m["schema"] == "edgekit.matrix/1" and m["cluster"] == c.address
    assert [(row["model"], row["target"], row["status"]) for row in m["rows"]] == [
        ("tiny_multimodal", "ort-cpu", "ok"), ("tiny_b", "ort-cpu", "ok")]
    for name in ("tiny_multimodal", "tiny_b"):
        assert (tmp_path / "m" / name / "report.json").is_file()
    # same model, same data: the same artifacts, whichever recipe folder they came from
    a, b = _hashes(tmp_path / "m" / "tiny_multimodal"), _hashes(tmp_path / "m" / "tiny_b")
    assert a == b
    assert "| tiny_b | ort-cpu | ok |" in (tmp_path / "m" / "matrix.md").read_text()


@pytest.mark.slow
def test_a_killed_board_fails_its_target_honestly_and_the_run_finishes(tmp_path):
    ray_utils = pytest.importorskip("ray.cluster_utils")
    c = ray_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    board = c.add_node(num_cpus=0, resources={BOARD: 1})
    c.wait_for_nodes()
    try:
        profiles = board_profiles(tmp_path)[:2]  # ort-cpu, openvino-x86
        proc = subprocess.Popen([sys.executable, "-m", "edgekit", "run", str(EXAMPLE), "--targets", *map(str, profiles),
                                 "--no-cache", "--cluster", c.address, "--out", str(tmp_path / "out")], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "] verify fp32" in line:  # a measurement is on the board now: pull its plug
                c.remove_node(board, allow_graceful=False)
                break
        rest = proc.communicate(timeout=600)[0]
        output = "".join(seen) + rest
        assert proc.returncode == 3, output
        d = json.loads((tmp_path / "out" / "report.json").read_text())
        rows = {t["name"]: t for t in d["targets"]}
        failed = [t for t in rows.values() if t["status"] == "failed"]
        for t in rows.values():
            print(f"{t['name']}: {t['status']}: {t.get('reason')} | {t['optimized'] and t['optimized']['latency_reason']}")
        assert failed, output
        for t in failed:
            assert re.search(r"ray node was lost|ray node \w+ at [\d.]+, which was measuring this target, left the "
                             r"cluster|no live node of the Ray cluster advertises", t["reason"]), t["reason"]
        for t in rows.values():  # no number was taken anywhere else in the board's place
            if t["status"] == "ok":
                assert t["optimized"]["latency_ms"] is None
                assert f"no live node of the Ray cluster ({c.address}) advertises {BOARD}=1" in \
                    t["optimized"]["latency_reason"]
        assert "target failed:" in output
    finally:
        c.shutdown()


@pytest.mark.slow
def test_ctrl_c_cancels_the_cluster_jobs_and_writes_nothing(cluster, tmp_path):
    c, _ = cluster
    proc = subprocess.Popen([sys.executable, "-m", "edgekit", "run", str(EXAMPLE), "--targets", *map(
        str, board_profiles(tmp_path)), "--no-cache", "--cluster", c.address, "--out", str(tmp_path / "out")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    for line in proc.stdout:
        if "] export fp32 ..." in line:  # builds are running on the nodes
            break
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "interrupted; nothing was written" in out
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the nodes' worker processes stop with their tasks
        ps = subprocess.run(["pgrep", "-f", f"edgekit.orchestrate.worker build .*{re.escape('edgekit-job-')}"],
                            capture_output=True, text=True).stdout.split()
        if not ps:
            break
        time.sleep(1)
    assert not ps, f"build workers still running: {ps}"


# -- what travels to a node ---------------------------------------------------------------------------

def test_a_build_ships_the_recipe_model_folder_data_and_profile(workdir, write_recipe, tmp_path):
    from edgekit.orchestrate.executor import _files_of, _mirror, _unmirror
    from edgekit.orchestrate.jobs import BuildJob

    recipe = write_recipe()
    (workdir / "__pycache__").mkdir()
    (workdir / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"x")
    (workdir / ".git").mkdir()
    (workdir / ".git" / "HEAD").write_text("x")
    (workdir / "runs" / "old").mkdir(parents=True)
    (workdir / "runs" / "old" / "model_int8.onnx").write_bytes(b"x")
    (workdir / "weights.pt").write_bytes(b"w")  # read by the model file: travels with it
    job = BuildJob(recipe=str(recipe), target=str(ROOT / "targets" / "ort-cpu.toml"), out=str(tmp_path / "out"))
    ship, back, scratch = _files_of("build", job)
    names = {p.name for p in ship}
    assert {"edgekit.toml", "model.py", "weights.pt", "calib.npz", "eval.npz", "ort-cpu.toml"} <= names
    assert not {"model.cpython-311.pyc", "HEAD", "model_int8.onnx"} & names
    assert back == [tmp_path / "out"] and scratch == []
    moved = _mirror(job.model_dump(mode="json"), "/node/fs", [str(p) for p in ship + back])
    assert moved["recipe"] == "/node/fs" + str(recipe) and moved["out"] == "/node/fs" + str(tmp_path / "out")
    assert _unmirror(moved, "/node/fs") == job.model_dump(mode="json")


def test_a_model_folder_too_big_to_send_is_refused_naming_it(tmp_path, monkeypatch):
    from edgekit.errors import InputError
    from edgekit.orchestrate import executor

    (tmp_path / "big.bin").write_bytes(b"x" * 2048)
    monkeypatch.setattr(executor, "MAX_FOLDER_BYTES", 1024)
    with pytest.raises(InputError, match=re.escape(f"model folder {tmp_path}: 0.0 GB to send") + ".*keep the model file"):
        executor._folder(tmp_path)


def test_files_a_node_sends_back_are_checked_before_they_land(tmp_path):
    import hashlib

    from edgekit.errors import TargetError
    from edgekit.orchestrate.executor import _land

    out = tmp_path / "out"
    good = b"artifact bytes"
    sha = hashlib.sha256(good).hexdigest()
    _land([(str(out / "model.onnx").lstrip("/"), sha, good)], [out], "ray node 10.0.0.7", "build")
    assert (out / "model.onnx").read_bytes() == good
    with pytest.raises(TargetError, match=r"do not match the sha256 it sent"):
        _land([(str(out / "model.onnx").lstrip("/"), sha, b"tampered")], [out], "ray node 10.0.0.7", "build")
    assert (out / "model.onnx").read_bytes() == good
    for elsewhere in (tmp_path / "etc" / "passwd", out / ".." / "escape"):
        with pytest.raises(TargetError, match=r"ray node 10.0.0.7 sent back .* which is not where the build job writes"):
            _land([(str(elsewhere).lstrip("/"), sha, good)], [out], "ray node 10.0.0.7", "build")
    assert not (tmp_path / "etc").exists() and not (tmp_path / "escape").exists()


@pytest.mark.slow
def test_release_remeasurement_runs_on_the_node_that_timed_the_target(cluster, tmp_path):
    """``edgekit ci --baseline`` re-times a suspected regression: on a cluster, on the board, never here."""
    from edgekit.config.recipe import load_recipe
    from edgekit.orchestrate.executor import RayExecutor
    from edgekit.release.confirm import confirm_latency
    from edgekit.report.schema import Report

    c, board = cluster
    prof = board_profiles(tmp_path)[0]
    recipe = tmp_path / "edgekit.toml"  # the recipe names the board's profile, as a release recipe would
    recipe.write_text((EXAMPLE / "edgekit.toml").read_text().replace(
        'targets = ["ort-cpu", "openvino-x86", "tflite-mobile"]', f'targets = ["{prof}"]')
        .replace("../../calibration", str(ROOT / "calibration")).replace('"model.py:build"', f'"{EXAMPLE}/model.py:build"'))
    r = edgekit("run", recipe, "--cluster", c.address, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    row = Report.read(tmp_path / "out" / "report.json").targets[0]
    ex = RayExecutor(c.address)
    try:
        got = confirm_latency(load_recipe(recipe), row, tmp_path / "out", tmp_path / "out" / "report.json", row,
                              executor=ex)
        assert got is not None and got["method"] == "ab" and got["a"].p50 > 0 and got["b"].p50 > 0
        assert ex.where(f"{recipe}::ort-cpu")["id"] == board.node_id
    finally:
        ex.close()


@pytest.mark.slow
def test_a_build_whose_node_dies_is_retried_elsewhere(tmp_path):
    """Builds are idempotent: Ray runs a lost one again on a live node, and the target ends ok."""
    ray_utils = pytest.importorskip("ray.cluster_utils")
    c = ray_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    builder = c.add_node(num_cpus=1)  # one build slot each: the two builds start on both nodes
    c.wait_for_nodes()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "edgekit", "run", str(EXAMPLE), "--targets", "ort-cpu",
                                 "openvino-x86", "--no-cache", "--cluster", c.address, "--out", str(tmp_path / "out")],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL)
        started, seen = set(), []
        for line in proc.stdout:
            seen.append(line)
            m = re.search(r"\[(ort-cpu|openvino-x86)\] export fp32 \.\.\.", line)
            if m:
                started.add(m.group(1))
            if len(started) == 2:  # both builds running, one of them on the second node: pull its plug
                c.remove_node(builder, allow_graceful=False)
                break
        output = "".join(seen) + proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output
        d = json.loads((tmp_path / "out" / "report.json").read_text())
        assert [t["status"] for t in d["targets"]] == ["ok", "ok"], output
        head = c.head_node.node_id[:8]
        assert all(t["device"].startswith(f"ray node {head} ") for t in d["targets"])  # measured on the survivor
    finally:
        c.shutdown()

"""Where a job runs: worker processes on this machine (the default), or Ray tasks on a cluster.

Both run the same job (``edgekit.orchestrate.jobs``) through the same worker (``run_in_worker``); the
pipeline does not know which one it has. ``LocalExecutor`` starts the worker process here, one job at a
time. ``RayExecutor`` (``edgekit run --cluster``) sends it to a Ray node:

- **placement**: a build goes to any node with a free CPU (``ray start --num-cpus 0`` keeps a board
  out of builds); a target's verification and timing go to a node advertising the profile's
  ``resources`` (``{"aarch64": 1}``, ``{"GPU": 1}``, a named board), all of one target's to the same node.
  Where no live node advertises them, latency is ``null`` with the reason (verification still runs).
- **data**: every file a job reads travels through Ray's object store with its sha256, checked when the
  node writes it (``$EDGEKIT_CACHE/cluster-files``, content-addressed: a node fetches a file once) and
  mirrored under a private folder at its driver-side path, so a recipe's relative paths still hold.
  The files a job writes (artifacts, verification outputs) come back the same way, checked again here.
- **faults**: builds are retried by Ray on another node when theirs dies (they are idempotent); a
  verification or timing job is never retried (its node was part of the measurement): its target fails
  with the node's reason. Ctrl-C cancels every task in flight.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from edgekit.errors import InputError, TargetError
from edgekit.orchestrate.worker import run_in_worker


class LocalExecutor:
    """Worker processes on this machine, one job at a time (the default: nothing to install)."""

    name = "local"
    address = None
    concurrent = False

    def run(self, kind: str, job, stem: Path, log: Path, progress: Optional[str] = None,
            measure_for: Optional[tuple[str, dict]] = None):
        return run_in_worker(kind, job, stem, log, progress)

    def unplaceable(self, resources: dict) -> Optional[str]:
        return None

    def where(self, group: str) -> Optional[dict]:
        return None

    def cancel_all(self) -> None:
        pass

    def close(self) -> None:
        pass


def measure_group(recipe_path, target: str) -> str:
    """One target of one recipe: its verification and timing jobs (and release CI's re-measurement)
    go to the same node."""
    return f"{recipe_path}::{target}"


def open_executor(cluster: Optional[str]):
    """``None`` or ``"none"``: local worker processes. ``local``: a Ray instance started here, for this run.
    ``auto``: the Ray cluster this machine belongs to (``ray start``). ``HOST:PORT``: a cluster's head (GCS
    address). ``ray://HOST:PORT``: the head's Ray Client server (a driver outside the cluster)."""
    if cluster in (None, "", "none"):
        return LocalExecutor()
    return RayExecutor(cluster)


@contextmanager
def opened(cluster: Optional[str]):
    """``open_executor`` for one run: its tasks cancelled on any error or Ctrl-C, Ray disconnected after."""
    executor = open_executor(cluster)
    try:
        yield executor
    except BaseException:
        executor.cancel_all()
        raise
    finally:
        executor.close()


_ADDRESS = re.compile(r"(?:ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9._-]*):([0-9]{1,5})")


def check_address(cluster: str) -> Optional[tuple[str, int]]:
    """The host and port to reach, or None for ``auto`` / ``local``; InputError for anything else."""
    if cluster in ("auto", "local"):
        return None
    m = _ADDRESS.fullmatch(cluster)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise InputError(f"--cluster {cluster!r}: expected auto, local, HOST:PORT (the head's GCS address, "
                         f"`ray start --head --port 6379`) or ray://HOST:PORT (its Ray Client server, port 10001)")
    return m.group(1).strip("[]"), int(m.group(2))


class RayExecutor:
    """Jobs as Ray tasks (see the module's docstring)."""

    name = "ray"
    concurrent = True

    def __init__(self, cluster: str, connect_timeout_s: float = 5.0):
        try:
            import ray
        except ImportError:
            raise InputError(f"--cluster {cluster}: Ray is not installed here; install the extra: "
                             f"pip install 'edgekit-deploy[cluster]' (on every node too)") from None
        hostport = check_address(cluster)
        if hostport is not None:
            try:
                socket.create_connection(hostport, timeout=connect_timeout_s).close()
            except OSError as e:
                raise InputError(f"--cluster {cluster}: cannot reach the Ray head at {hostport[0]}:{hostport[1]} "
                                 f"({e.strerror or e}); start it there with `ray start --head --port "
                                 f"{hostport[1]}` (README: Running on a cluster)") from None
        self.cluster = cluster
        import sys

        os.environ.setdefault("RAY_COLOR_PREFIX", "1" if sys.stderr.isatty() else "0")  # job lines, forwarded
        kw: dict[str, Any] = {"log_to_driver": True, "logging_level": "warning", "configure_logging": True,
                              "include_dashboard": False}
        try:
            if cluster == "local":
                ray.init(**kw)
            else:
                kw.pop("include_dashboard")
                ray.init(address=cluster, **kw)
        except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, grpc errors...
            raise InputError(f"--cluster {cluster}: cannot connect to the Ray cluster: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.ray = ray
        self.address = cluster if cluster != "local" else "local"
        self._lock = threading.Lock()
        self._inflight: set = set()
        self._files: dict[tuple[str, int, int], tuple[str, Any]] = {}
        self._pinned: dict[str, str] = {}
        self._where: dict[str, dict] = {}
        self._cancelled = False

    # -- what the pipeline asks --------------------------------------------------------------------

    def nodes(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def unplaceable(self, resources: dict) -> Optional[str]:
        """None if a live node advertises ``resources``, else the report's reason."""
        if not resources:
            return None
        if any(_satisfies(n["Resources"], resources) for n in self.nodes()):
            return None
        want = ", ".join(f"{k}={v:g}" for k, v in resources.items())
        return (f"not measured: no live node of the Ray cluster ({self.address}) advertises {want} (a device "
                f"joins with `ray start --address HEAD:PORT --resources '{_json(resources)}'`)")

    def where(self, group: str) -> Optional[dict]:
        """The node that verified and timed ``group`` (its first measurement's)."""
        return self._where.get(group)

    def run(self, kind: str, job, stem: Path, log: Path, progress: Optional[str] = None,
            measure_for: Optional[tuple[str, dict]] = None):
        """Run ``job`` on a node; write what it wrote at the same paths here; return its typed result.
        ``measure_for``: (group, resources) for a verification/timing job: the node advertising
        ``resources`` that measured the group before, else any such node."""
        from edgekit.orchestrate.jobs import BuildJob
        from edgekit.orchestrate.worker import KINDS

        ship, back, scratch = _files_of(kind, job)
        files = [self._put(p) for p in ship]
        opts: dict[str, Any] = {"max_retries": 2 if kind == "build" else 0, "retry_exceptions": False}
        group = None
        if measure_for is None:
            opts["num_cpus"] = 1
        else:
            group, resources = measure_for
            res = dict(resources)
            gpus = res.pop("GPU", 0)
            opts.update(num_cpus=0 if res else 1, num_gpus=gpus, resources=res)
            pinned = self._pinned.get(group)
            if pinned:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=pinned, soft=False)
        payload = job.model_dump(mode="json")
        relocated = {}
        if isinstance(job, BuildJob):
            relocated = _absolute_recipe_paths(job)
        ref = _run_job.options(**opts).remote(kind, payload, files, [str(p) for p in back],
                                              [str(p) for p in scratch], progress, relocated,
                                              _source_digest())
        answer = self._wait(ref, kind, measure_for)
        if answer.get("mismatch"):
            raise TargetError(answer["mismatch"])
        node = answer["node"]
        with open(log, "ab") as f:
            f.write(f"--- {kind} job on ray node {node['ip']} ({node['hostname']}, {node['id'][:12]}) ---\n".encode())
            f.write(answer["log"])
        if "error" in answer:
            raise TargetError(f"{answer['error']} (on ray node {node['ip']})")
        _land(answer["files"], back, f"ray node {node['ip']}", kind)
        if group is not None:
            self._pinned.setdefault(group, node["id"])
            self._where.setdefault(group, node)
        return KINDS[kind][1].model_validate(answer["result"])

    def cancel_all(self) -> None:
        """Ctrl-C: cancel every task in flight (a running one gets KeyboardInterrupt, which stops its
        worker process)."""
        self._cancelled = True
        with self._lock:
            refs = list(self._inflight)
        for ref in refs:
            try:
                self.ray.cancel(ref, recursive=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass

    def close(self) -> None:
        try:
            self.ray.shutdown()
        except Exception:  # noqa: BLE001
            pass

    # -- helpers -----------------------------------------------------------------------------------

    def _put(self, path: Path) -> tuple[str, str, Any]:
        """(mirrored path, sha256, object ref) of a local file; each file is put once per run."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            got = self._files.get(key)
        if got is None:
            data = path.read_bytes()
            got = (hashlib.sha256(data).hexdigest(), self.ray.put(data))
            with self._lock:
                self._files[key] = got
        return str(path).lstrip("/"), got[0], got[1]

    def _wait(self, ref, kind: str, measure_for) -> dict:
        from ray import exceptions as rex

        with self._lock:
            self._inflight.add(ref)
        try:
            while True:
                if self._cancelled:
                    raise KeyboardInterrupt
                done, _ = self.ray.wait([ref], timeout=2.0)
                if done:
                    return self.ray.get(ref)
                if measure_for is not None:  # its node may have left: do not wait for it forever
                    group, resources = measure_for
                    pinned = self._pinned.get(group)
                    alive = self.nodes()
                    why = None
                    if pinned and not any(n["NodeID"] == pinned for n in alive):
                        was = self._where.get(group, {})
                        why = (f"ray node {pinned[:8]} at {was.get('ip', '?')}, which was measuring this target, "
                               f"left the cluster during its {kind} job (not retried: a timing is only valid "
                               f"on the node that took the target's other measurements)")
                    elif resources and not any(_satisfies(n["Resources"], resources) for n in alive):
                        why = f"no live node of the Ray cluster advertises {_json(resources)} any more"
                    if why:
                        self.ray.cancel(ref, force=True)
                        raise TargetError(f"the {kind} job cannot run: {why}")
        except rex.TaskCancelledError:
            raise KeyboardInterrupt from None
        except rex.RayTaskError as e:  # an exception inside _run_job itself (not the job's: those are answers)
            raise TargetError(f"the {kind} job failed on its ray node: {str(e).strip().splitlines()[-1]}") from None
        except rex.RayError as e:  # node died, worker crashed, object lost, unschedulable...
            raise TargetError(f"the {kind} job's ray node was lost ({type(e).__name__}): "
                              f"{_first_line(e)}") from None
        finally:
            with self._lock:
                self._inflight.discard(ref)


def _land(files, back: list[Path], where: str, kind: str) -> None:
    """Write the files a node sent back at their paths here: each checked against the sha256 it came
    with, and only inside the folders or files the job writes (``back``)."""
    for rel, sha, data in files:
        dest = Path("/" + rel)
        if ".." in dest.parts or not any(dest == b or b in dest.parents for b in back):
            raise TargetError(f"{where} sent back {dest}, which is not where the {kind} job writes "
                              f"({', '.join(map(str, back)) or 'nothing'}): not used")
        if hashlib.sha256(data).hexdigest() != sha:
            raise TargetError(f"{dest}: the bytes that came back from {where} do not match the sha256 it sent "
                              f"({sha[:16]}...): not used")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        tmp.write_bytes(data)
        tmp.replace(dest)


def _satisfies(have: dict, want: dict) -> bool:
    return all(have.get(k, 0) >= v for k, v in want.items())


def _json(d: dict) -> str:
    import json

    return json.dumps(d)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _source_digest() -> str:
    from edgekit.orchestrate.cache import source_digest

    return source_digest()


def _files_of(kind: str, job) -> tuple[list[Path], list[Path], list[Path]]:
    """What a job reads (shipped to the node), what it writes that comes back, and its node-local scratch."""
    if kind == "build":
        from edgekit.config.recipe import load_recipe

        recipe = load_recipe(job.recipe)
        src = recipe.model.source
        model = recipe.resolve(src if src.endswith(".pt2") else src.rpartition(":")[0])
        ship = [Path(job.recipe), Path(job.target), recipe.resolve(recipe.data.calibration),
                recipe.resolve(recipe.data.evaluation)]
        ship += [model] if src.endswith(".pt2") else _folder(model.parent)
        if job.search is not None:
            ship.append(Path(job.search.reference))
        if job.prune_eval is not None:
            ship += [Path(job.prune_eval.eval), Path(job.prune_eval.reference)]
        scratch = [Path(job.prune_eval.cache)] if job.prune_eval is not None and job.prune_eval.cache else []
        return _unique(ship), [Path(job.out)], scratch
    if kind == "measure":
        return _unique([*_artifact_files(Path(job.artifact)), Path(job.eval)]), [Path(job.outputs)], []
    if kind == "time":
        return _unique([f for a in job.artifacts.values() for f in _artifact_files(Path(a))] + [Path(job.eval)]), [], []
    if kind == "ab":
        return _unique([*_artifact_files(Path(job.baseline)), *_artifact_files(Path(job.current)), Path(job.eval)]), [], []
    raise ValueError(f"unknown job kind {kind!r}")


MAX_FOLDER_BYTES = 2 << 30


def _folder(d: Path) -> list[Path]:
    """The model file's folder (it may import its neighbours or read weights beside it): its files, not
    hidden ones, caches or edgekit output folders."""
    files, total = [], 0
    for root, dirs, names in os.walk(d):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("__pycache__", "runs")
                   and not (Path(root) / x / ".edgekit-output").exists()]
        for n in names:
            p = Path(root) / n
            if n.startswith(".") or not p.is_file():
                continue
            total += p.stat().st_size
            files.append(p)
    if total > MAX_FOLDER_BYTES:
        raise InputError(f"model folder {d}: {total / 1e9:.1f} GB to send to the cluster's nodes (limit "
                         f"{MAX_FOLDER_BYTES / 1e9:.1f} GB); keep the model file in a folder of its own")
    return files


def _artifact_files(main: Path) -> list[Path]:
    """An artifact's files: the main one, and OpenVINO's weights beside its .xml."""
    return [main] + ([main.with_suffix(".bin")] if main.suffix == ".xml" and main.with_suffix(".bin").exists() else [])


def _unique(paths: list[Path]) -> list[Path]:
    return list(dict.fromkeys(Path(os.path.abspath(p)) for p in paths))


def _absolute_recipe_paths(job) -> dict[str, str]:
    """Recipe paths written as absolute ones: the node must read them under its mirror folder."""
    from edgekit.config.recipe import load_recipe

    recipe = load_recipe(job.recipe)
    out = {}
    for key, value in (("calibration", recipe.data.calibration), ("evaluation", recipe.data.evaluation),
                       ("model", recipe.model.source)):
        if Path(value.rpartition(":")[0] if key == "model" and not value.endswith(".pt2") else value).expanduser().is_absolute():
            out[key] = value
    return out


# -- the node's side -----------------------------------------------------------------------------------

def _node_files_root() -> Path:
    from edgekit.orchestrate.cache import default_root

    return default_root() / "cluster-files"


def _materialize(files, root: Path) -> None:
    """Write every shipped file at its mirrored path under ``root``, from the node's content-addressed
    store when it has those bytes, else from the object store; sha256 checked either way."""
    import ray

    store = _node_files_root()
    store.mkdir(parents=True, exist_ok=True)
    for rel, sha, ref in files:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        kept = store / sha
        if kept.is_file() and _sha256_file(kept) == sha:
            shutil.copyfile(kept, dest)
            continue
        data = ray.get(ref)
        if hashlib.sha256(data).hexdigest() != sha:
            raise TargetError(f"/{rel}: the bytes received from the driver do not match its sha256 ({sha[:16]}...)")
        tmp = store / f".{sha}.{os.getpid()}.part"
        tmp.write_bytes(data)
        tmp.replace(kept)
        shutil.copyfile(kept, dest)


def _sha256_file(p: Path) -> str:
    from edgekit.report.manifest import sha256

    return sha256(p)


def _mirror(obj, root: str, paths: list[str]):
    """Every string in a job that is one of ``paths`` or lies under one, moved under ``root``."""
    if isinstance(obj, dict):
        return {k: _mirror(v, root, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mirror(v, root, paths) for v in obj]
    if isinstance(obj, str) and any(obj == p or obj.startswith(p.rstrip("/") + "/") for p in paths):
        return root + obj
    return obj


def _unmirror(obj, root: str):
    if isinstance(obj, dict):
        return {k: _unmirror(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unmirror(v, root) for v in obj]
    if isinstance(obj, str) and obj.startswith(root + "/"):
        return obj[len(root):]
    return obj


def _node() -> dict:
    import platform

    import ray

    from edgekit.measure.machine import machine

    ctx = ray.get_runtime_context()
    m = machine()
    return {"id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
            "arch": platform.machine(), "cpu": m["cpu"], "machine": m}


def edgekit_job(kind: str, payload: dict, files, back: list[str], scratch: list[str], progress: Optional[str],
              relocated: dict, driver_source: str) -> dict:
    """Run on a Ray node: materialize, run the worker process, send back what it wrote."""
    from edgekit.orchestrate.cache import source_digest
    from edgekit.orchestrate.worker import KINDS

    node = _node()
    if source_digest() != driver_source:
        return {"node": node, "log": b"", "mismatch": (
            f"ray node {node['ip']} ({node['hostname']}) runs other edgekit code than this driver (source "
            f"sha256 {source_digest()[:12]} vs {driver_source[:12]}): install the same edgekit there")}
    tmp = Path(tempfile.mkdtemp(prefix="edgekit-job-"))
    root = str(tmp / "fs")
    try:
        _materialize(files, Path(root))
        paths = ["/" + rel for rel, _, _ in files] + back + scratch
        for p in back + scratch:
            Path(root + p).parent.mkdir(parents=True, exist_ok=True)
        job = KINDS[kind][0].model_validate(_mirror(payload, root, paths))
        if relocated:  # absolute recipe paths: read the mirrored copies
            job = job.model_copy(update={"relocated": {k: _relocate_value(k, v, root) for k, v in relocated.items()}})
        log = tmp / "job.log"
        log.touch()
        answer: dict[str, Any] = {"node": node}
        try:
            result = run_in_worker(kind, job, tmp / "job", log, progress)
            answer["result"] = _unmirror(result.model_dump(mode="json"), root)
        except TargetError as e:
            answer["error"] = str(e)
        answer["files"] = [(str(f)[len(root) + 1:], _sha256_file(f), f.read_bytes())
                           for p in back for f in _walk(Path(root + p))]
        answer["log"] = log.read_bytes()
        return answer
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _relocate_value(key: str, value: str, root: str) -> str:
    if key == "model" and not value.endswith(".pt2"):
        file, _, attr = value.rpartition(":")
        return f"{root}{os.path.abspath(os.path.expanduser(file))}:{attr}"
    return root + os.path.abspath(os.path.expanduser(value))


def _walk(p: Path) -> list[Path]:
    if p.is_file():
        return [p]
    return sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []


def _remote_fn():
    import ray

    return ray.remote(edgekit_job)


class _Lazy:
    """``ray.remote`` applied on first use (importing this module must not need Ray)."""

    fn = None

    def options(self, **kw):
        if self.fn is None:
            self.fn = _remote_fn()
        return self.fn.options(**kw)


_run_job = _Lazy()

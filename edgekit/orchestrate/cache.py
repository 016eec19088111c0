"""A content-addressed cache of builds (export + quantize), measurements and fp32 torch references.

Where: ``$EDGEKIT_CACHE`` (default ``~/.cache/edgekit``); ``edgekit run --no-cache`` turns it off.

What a key covers (sha256 of a canonical JSON document, see ``build_key``):
- the build worker's job, with every file it names replaced by that file's sha256 (so extra inputs
  other steps add to the job — a pruning config, a search space — become part of the key);
- the recipe's ``[model]`` / ``[data]`` / other sections except ``[gates]`` (gates do not change artifacts);
- the model: sha256 of every state_dict tensor (name, dtype, shape, bytes) and of the source file
  (``file.py`` or ``.pt2``). Files the source imports are not hashed: change the source file or the
  weights, or run with ``--no-cache``, when only a helper module changed;
- the calibration and evaluation ``.npz`` files (sha256 of their bytes), the target profile file;
- edgekit's version and the sha256 of its own source files (a development checkout changes code
  without changing its version: a stale build must not be served), Python, torch, numpy and the
  backend's toolchain versions.

Entries are written into ``<cache>/tmp/`` and renamed into place (``os.rename`` of a directory is
atomic on one file system), so a crash leaves at most an orphan in ``tmp/``, never a half entry.
An entry holds ``entry.json`` (the stored result, the sha256 of each of its files and of itself) and
its files; every read checks them, and a damaged entry is discarded with a warning and computed again.
``edgekit cache info|verify|prune --max-size|clear`` looks after it.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from edgekit import __version__
from edgekit.report.manifest import sha256 as _sha256  # not memoized: entries are checked as they are now

_HASH_CACHE: dict[tuple, str] = {}
_SOURCE: dict[str, str] = {}


def default_root() -> Path:
    return Path(os.environ.get("EDGEKIT_CACHE") or Path.home() / ".cache" / "edgekit").expanduser()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, memoized per (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _HASH_CACHE:
        _HASH_CACHE[memo] = _sha256(p)
    return _HASH_CACHE[memo]


def _files(entry: Path) -> list[str]:
    meta = entry / "entry.json"
    return sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file() and p != meta)


def damage(entry: Path) -> Optional[str]:
    """None when a cache entry is intact, else what is wrong with it."""
    try:
        meta = json.loads((entry / "entry.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"entry.json unreadable: {type(e).__name__}"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or "sha256" not in meta:
        return "no hashes (written by an older edgekit)"
    if digest({k: v for k, v in meta.items() if k != "sha256"}) != meta["sha256"]:
        return "entry.json: sha256 differs from the one stored"
    present = _files(entry)
    if sorted(files) != present:
        return f"files {sorted(set(files) ^ set(present))} missing or unexpected"
    for rel, want in files.items():
        if _sha256(entry / rel) != want:
            return f"{rel}: sha256 differs from the one stored"
    return None


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_digest(model, source_file: Optional[Path]) -> str:
    """sha256 over the state_dict (name, dtype, shape, raw bytes) and the model's source file."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        t = t.detach().cpu().contiguous()
        try:
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        except (RuntimeError, TypeError):  # dtypes without a byte view (e.g. quantized tensors)
            h.update(repr(t.tolist()).encode())
    if source_file is not None and Path(source_file).is_file():
        h.update(b"source|" + file_sha256(source_file).encode())
    return h.hexdigest()


def source_digest() -> str:
    """sha256 of edgekit's own ``.py`` files (paths and bytes), computed once per process."""
    if "source" not in _SOURCE:
        root = Path(__file__).resolve().parents[1]  # the edgekit package
        h = hashlib.sha256()
        for p in sorted(root.rglob("*.py")):
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
        _SOURCE["source"] = h.hexdigest()
    return _SOURCE["source"]


def environment() -> dict:
    """Versions that can change an artifact without any input changing."""
    import numpy
    import torch

    return {"edgekit": __version__, "edgekit_source": source_digest(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": numpy.__version__, "arch": platform.machine()}


def _hash_paths(obj):
    """The job with every string that names an existing file replaced by that file's sha256."""
    if isinstance(obj, dict):
        return {k: _hash_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_hash_paths(v) for v in obj]
    if isinstance(obj, str) and len(obj) < 4096 and os.path.isabs(obj) and os.path.isfile(obj):
        return {"file_sha256": file_sha256(obj)}
    return obj


@dataclass
class Cache:
    """``root=None`` is a disabled cache (every lookup misses, nothing is stored)."""

    root: Optional[Path]
    reuse_measurements: bool = False
    hits: list = field(default_factory=list)

    @classmethod
    def open(cls, enabled: bool = True, reuse: bool = False) -> "Cache":
        if not enabled:
            return cls(None)
        root = default_root()
        try:
            (root / "tmp").mkdir(parents=True, exist_ok=True)
        except OSError:
            return cls(None)  # an unwritable cache is no cache, not a failed run
        c = cls(root, reuse)
        c._clean_tmp()
        return c

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _clean_tmp(self, older_than_s: float = 24 * 3600) -> None:
        """Orphans of crashed writers (never read; removed once old enough not to be in use)."""
        now = time.time()
        for p in (self.root / "tmp").iterdir():
            try:
                if now - p.stat().st_mtime > older_than_s:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass

    def get(self, kind: str, key: str) -> Optional[Path]:
        """The entry, checked: its entry.json parses and every file has the sha256 recorded when it was
        stored. A damaged entry (truncated, edited, a file swapped) is discarded with a warning: the
        caller then rebuilds or re-measures it, and never trusts it."""
        if not self.enabled:
            return None
        entry = self.root / kind / key
        if not (entry / "entry.json").is_file():
            return None
        problem = damage(entry)
        if problem is None:
            return entry
        from edgekit.progress import say

        say(f"WARNING: cache entry {entry} is damaged ({problem}); discarded, computing it again")
        shutil.rmtree(entry, ignore_errors=True)
        return None

    def put(self, kind: str, key: str, fill: Callable[[Path], dict]) -> Optional[Path]:
        """``fill(dir)`` writes the entry's files into a fresh dir and returns its entry.json content;
        the dir is then renamed into place in one step. A concurrent writer of the same key wins."""
        if not self.enabled:
            return None
        tmp = self.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            meta = {**fill(tmp), "files": {rel: _sha256(tmp / rel) for rel in _files(tmp)}}
            meta["sha256"] = digest(meta)
            with open(tmp / "entry.json", "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            final = self.root / kind / key
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, final)
            except OSError:  # someone stored the same key first (or an old entry is there): keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
            return final
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # -- housekeeping (``edgekit cache``) --------------------------------------------------------------

    KINDS = ("builds", "measure", "outputs", "values", "reference")

    def entries(self) -> list[dict]:
        """Every entry: kind, key, path, bytes, last modified."""
        out = []
        for kind in self.KINDS:
            for entry in sorted((self.root / kind).glob("*")) if self.enabled else []:
                if entry.is_dir():
                    size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
                    out.append({"kind": kind, "key": entry.name, "path": entry, "bytes": size,
                                "mtime": entry.stat().st_mtime})
        return out

    def verify(self) -> list[tuple[Path, str]]:
        """Check every entry; remove the damaged ones. Returns (entry, what was wrong)."""
        bad = []
        for e in self.entries():
            problem = damage(e["path"])
            if problem:
                shutil.rmtree(e["path"], ignore_errors=True)
                bad.append((e["path"], problem))
        return bad

    def prune(self, max_bytes: int) -> list[dict]:
        """Remove the least recently written entries until the cache holds at most ``max_bytes``."""
        entries = sorted(self.entries(), key=lambda e: e["mtime"])
        total, removed = sum(e["bytes"] for e in entries), []
        for e in entries:
            if total <= max_bytes:
                break
            shutil.rmtree(e["path"], ignore_errors=True)
            total -= e["bytes"]
            removed.append(e)
        return removed

    def clear(self) -> int:
        n = len(self.entries())
        for kind in (*self.KINDS, "tmp"):
            shutil.rmtree(self.root / kind, ignore_errors=True)
        return n

    # -- the three things cached ------------------------------------------------------------------

    def build(self, key: str, out: Path, run: Callable[[], dict]) -> tuple[dict, bool]:
        """The build worker's result with its artifacts in ``out``: copied from the cache on a hit,
        else built by ``run()`` and stored. Returns (result, hit)."""
        entry = self.get("builds", key)
        if entry is not None:
            meta = json.loads((entry / "entry.json").read_text())
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(entry / "files", out)
            return _relocate(meta["result"], "@OUT@", str(out)), True
        result = run()
        if self.enabled and not result.get("optimized_error"):  # failed quantization: try again next time
            def fill(tmp: Path) -> dict:
                shutil.copytree(out, tmp / "files")
                return {"key": key, "created": time.time(), "result": _relocate(result, str(out), "@OUT@")}
            self.put("builds", key, fill)
        return result, False

    def measure(self, key: str, outputs: Optional[Path], run: Callable[[], dict]) -> tuple[dict, bool]:
        """A measure or timing worker's result (and a measure's outputs .npy). Reused only with
        ``--reuse``; otherwise measured again (the point of a release run) and the stored one refreshed."""
        entry = self.get("measure", key) if self.reuse_measurements else None
        if entry is not None:
            if outputs is not None:
                shutil.copyfile(entry / "outputs.npy", outputs)
            return json.loads((entry / "entry.json").read_text())["result"], True
        result = run()
        if self.enabled:
            old = self.get("measure", key)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

            def fill(tmp: Path) -> dict:
                if outputs is not None:
                    shutil.copyfile(outputs, tmp / "outputs.npy")
                return {"key": key, "created": time.time(), "result": result}
            self.put("measure", key, fill)
        return result, False

    def outputs(self, key: str, dest: Path) -> bool:
        """Copy the stored verification outputs of ``key`` to ``dest``; False when there are none."""
        entry = self.get("outputs", key)
        if entry is None:
            return False
        shutil.copyfile(entry / "outputs.npy", dest)
        return True

    def keep_outputs(self, key: str, src: Path) -> None:
        """Store an artifact's outputs on the evaluation set (``Keys.outputs``: they depend only on its
        bytes, the runtime and its settings, the data and the CPU, so they are never measured twice)."""
        if self.enabled and self.get("outputs", key) is None:
            def fill(tmp: Path) -> dict:
                shutil.copyfile(src, tmp / "outputs.npy")
                return {"key": key, "created": time.time()}
            self.put("outputs", key, fill)

    def value(self, key: str, compute: Callable[[], object]):
        """A small JSON value (e.g. the model's MAC count), computed once per key."""
        entry = self.get("values", key)
        if entry is not None:
            return json.loads((entry / "entry.json").read_text())["value"]
        val = compute()
        self.put("values", key, lambda tmp: {"key": key, "value": val})
        return val

    def array(self, key: str, compute: Callable[[], "object"]):
        """A numpy array (the fp32 torch reference outputs), computed once per key."""
        import numpy as np

        entry = self.get("reference", key)
        if entry is not None:
            return np.load(entry / "array.npy"), True
        arr = compute()

        def fill(tmp: Path) -> dict:
            np.save(tmp / "array.npy", arr)
            return {"key": key, "created": time.time()}
        self.put("reference", key, fill)
        return arr, False


def _relocate(obj, old: str, new: str):
    if isinstance(obj, dict):
        return {k: _relocate(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relocate(v, old, new) for v in obj]
    if isinstance(obj, str) and obj.startswith(old):
        return new + obj[len(old):]
    return obj


@dataclass
class Keys:
    """What every key of one run shares: the model, the data, the environment."""

    model: str
    recipe: dict
    calibration: str
    evaluation: str
    env: dict

    @classmethod
    def for_run(cls, recipe, model, calib_path: Path, eval_path: Path) -> "Keys":
        src = recipe.model.source
        src_file = recipe.resolve(src.rpartition(":")[0] if not src.endswith(".pt2") else src)
        spec = recipe.model_dump(mode="json", exclude={"gates", "run"})  # where jobs run: not what they make
        # How a path is spelled does not matter, what it holds does: the model source as an absolute
        # path, the data files by their sha256 (below) instead of their paths.
        spec["model"]["source"] = str(src_file) + (src[len(src.rpartition(":")[0]):] if not src.endswith(".pt2") else "")
        spec.pop("targets", None)  # each build's key has its own target profile
        spec["data"].pop("calibration", None)
        spec["data"].pop("evaluation", None)
        return cls(model=model_digest(model, src_file), recipe=spec,
                   calibration=file_sha256(calib_path), evaluation=file_sha256(eval_path), env=environment())

    def reference(self) -> str:
        return digest({"what": "reference", "model": self.model, "recipe": self.recipe,
                       "evaluation": self.evaluation, "env": self.env})

    def macs(self) -> str:
        return digest({"what": "macs", "model": self.model, "inputs": self.recipe["model"]["inputs"],
                       "env": self.env})

    def build(self, job: dict, profile_path: Path, versions: dict) -> str:
        """``job``: the build job's ``identity()`` (what the build depends on, not where it writes)."""
        return digest({"what": "build", "job": _hash_paths(job), "profile": file_sha256(profile_path),
                       "model": self.model, "recipe": self.recipe, "calibration": self.calibration,
                       "env": self.env, "toolchain": versions})

    def outputs(self, files: list[str], job: dict, machine: dict, versions: dict) -> str:
        """An artifact's outputs on the evaluation set: its files' bytes, the measure job's runtime
        settings, data and limit (``job``: its ``identity()``), the runtime's versions, the CPU."""
        return digest({"what": "outputs", "files": [file_sha256(f) for f in files], "job": _hash_paths(job),
                       "machine": machine, "toolchain": versions, "env": self.env})

    def arm(self, files: list[str], settings: dict, sysroot: str, runner: str, versions: dict) -> str:
        """An artifact's check on an emulated aarch64 core: its bytes, the profile's ``[verify]``, the
        aarch64 sysroot (its packages' versions), the runner script, the evaluation data."""
        return digest({"what": "arm", "files": [file_sha256(f) for f in files], "verify": settings,
                       "sysroot": sysroot, "runner": runner, "toolchain": versions, "evaluation": self.evaluation,
                       "reference": self.reference(), "env": self.env})

    def measure(self, build_key: str, kind: str, job: dict, machine: dict) -> str:
        """``job``: the measure job's ``identity()``; the artifact's bytes are covered by ``build_key``."""
        return digest({"what": "measure", "build": build_key, "kind": kind, "job": _hash_paths(job),
                       "machine": machine})

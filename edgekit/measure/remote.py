"""Benchmarking on a Linux board over ssh (``device = "ssh:[user@]host[:port]"``).

One ssh connection per artifact (load time, memory), then one per target that times all of its
artifacts in interleaved rounds (``benchmark_interleaved``). Each time a tar of the artifacts' files,
the backend's self-contained runner script (``Backend.remote_runner``), one evaluation sample and the
job goes in on stdin; the remote
unpacks it into a fresh temporary directory (removed on exit), runs the benchmark with its own Python
and runtime and prints a JSON line, which comes back on stdout. Authentication is ssh's own (agent, keys,
``~/.ssh/config``); ``EDGEKIT_SSH_CONFIG`` names another config file. Nothing is ever prompted for.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np

from edgekit.measure.bench import latency_stats
from edgekit.errors import TargetError



def ssh_command(device: str) -> list[str]:
    """``ssh`` with options that never prompt and give up quickly, aimed at ``device``'s host."""
    ssh = shutil.which("ssh")
    if ssh is None:
        raise TargetError(f"device {device}: the ssh client is not installed here (apt-get install openssh-client)")
    where = device.partition(":")[2]
    cmd = [ssh, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15"]
    if os.environ.get("EDGEKIT_SSH_CONFIG"):
        cmd += ["-F", os.environ["EDGEKIT_SSH_CONFIG"]]
    m = re.fullmatch(r"(.+):(\d+)", where)
    if m:
        where, port = m.groups()
        cmd += ["-p", port]
    return cmd + ["--", where]  # the host can never be read as an option


def _bundle(files: dict[str, str], feeds: dict[str, np.ndarray], job: dict, runner: Path) -> bytes:
    """A tar of ``files`` (name in the tar -> local path), the runner, the feeds and the job."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for arcname, f in files.items():
            tar.add(f, arcname=arcname)
        tar.add(runner, arcname="remote_runner.py")
        for name, payload in (("feeds.npz", _npz(feeds)), ("job.json", json.dumps(job).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def benchmark(device: str, files: list[str], feeds: dict[str, np.ndarray], *, runner: Path, settings: dict,
              warmup: int, runs: int, python: str = "python3", timeout: float = 900) -> dict:
    """Time one artifact on the remote; return latency stats, load time, peak RSS and the remote's
    machine description. ``runner`` and ``settings``: the backend's script for the board and its
    runtime settings (``Backend.remote_runner``, ``remote_settings``). Any failure (host down, no
    runtime there) raises TargetError naming the device."""
    job = {"artifact": Path(files[0]).name, "feeds": "feeds.npz", **settings, "warmup": warmup, "runs": runs}
    # an artifact and its sidecars live in one folder: keep their names
    result = _call(device, _bundle({Path(f).name: f for f in files}, feeds, job, runner), python, timeout)
    return {"latency_ms": latency_stats(result["seconds"]), "load_ms": result["load_ms"],
            "peak_rss_mb": result["peak_rss_mb"], "runtime_device": result["provider"],
            "runtime": result["runtime"], "machine": result["machine"]}


def benchmark_interleaved(device: str, artifacts: dict[str, list[str]], feeds: dict[str, np.ndarray], *,
                          runner: Path, settings: dict, warmup: int, rounds: int, per_round: int,
                          python: str = "python3", timeout: float = 900) -> dict:
    """Time several artifacts (kind -> files) on the remote in interleaved rounds, in one process there.
    Returns ``{"blocks": {kind: [[seconds, ...] per round]}, "runtime_device", "runtime", "machine"}``."""
    files = {f"{kind}/{Path(f).name}": f for kind, fs in artifacts.items() for f in fs}
    names = {f"{kind}/{Path(fs[0]).name}": kind for kind, fs in artifacts.items()}
    job = {"artifacts": list(names), "feeds": "feeds.npz", **settings, "warmup": warmup, "rounds": rounds,
           "per_round": per_round}
    result = _call(device, _bundle(files, feeds, job, runner), python, timeout)
    return {"blocks": {names[n]: b for n, b in result["blocks"].items()}, "runtime_device": result["provider"],
            "runtime": result["runtime"], "machine": result["machine"]}


def _call(device: str, bundle: bytes, python: str, timeout: float) -> dict:
    """Send the bundle, run the runner there, return its JSON answer (``ok`` checked)."""
    script = ('d=$(mktemp -d) && trap \'rm -rf "$d"\' EXIT && tar -x -C "$d" && cd "$d" && '
              f'{python} remote_runner.py job.json')  # a command line: "python3", "/opt/venv/bin/python", ...
    try:
        proc = subprocess.run(ssh_command(device) + [script], input=bundle, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TargetError(f"device {device}: the remote benchmark did not finish in {timeout:.0f} s") from None
    err = proc.stderr.decode(errors="replace").strip()
    tail = "\n".join(err.splitlines()[-4:])
    if proc.returncode == 255:
        raise TargetError(f"device {device}: cannot reach the host over ssh: {tail or 'ssh exit 255'}")
    if proc.returncode == 127:
        raise TargetError(f"device {device}: {python!r} was not found on the remote (set remote_python in the "
                          f"target profile): {tail}")
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise TargetError(f"device {device}: the remote runner failed (exit {proc.returncode}): "
                          f"{tail or 'no output'}") from None
    if not result.get("ok"):
        raise TargetError(f"device {device}: {result.get('error')}")
    return result

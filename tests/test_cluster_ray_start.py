"""``--cluster ray://HOST:PORT`` against a cluster made the README's way: two ``ray start`` processes (a
head and a node advertising a custom resource), started and stopped by the test. Only this test's Ray
processes are stopped (they are found by their private temp folder), never a cluster of the user's."""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import EXAMPLE
from test_cluster import BOARD, board_profiles

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_client_address_on_ray_start_nodes(tmp_path):
    pytest.importorskip("ray")
    temp = Path(tempfile.mkdtemp(prefix="ekray-", dir="/tmp"))  # short: Ray's socket paths live under it
    port, client = _free_port(), _free_port()
    # Ray >= 2.59 authenticates a `ray start` cluster with a token: every node and the driver need it
    (temp / "token").write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(temp / "token")}
    common = ["--num-cpus", "1", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--ray-client-server-port", str(client),
                        "--include-dashboard=false", "--temp-dir", str(temp), *common], check=True,
                       capture_output=True, timeout=120, env=env)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", "--resources", json.dumps({BOARD: 1}),
                        *common], check=True, capture_output=True, timeout=120, env=env)
        r = subprocess.run([sys.executable, "-m", "edgekit", "run", str(EXAMPLE), "--targets",
                            str(board_profiles(tmp_path)[0]), "--no-cache", "--cluster", f"ray://127.0.0.1:{client}",
                            "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=900, env=env,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr
        d = json.loads((tmp_path / "out" / "report.json").read_text())
        assert d["cluster"] == f"ray://127.0.0.1:{client}"
        t = d["targets"][0]
        assert t["status"] == "ok" and t["device"].startswith("ray node ") and t["speedup_p50"] > 1
    finally:
        subprocess.run(["pkill", "-9", "-f", str(temp)], capture_output=True)
        time.sleep(1)
        subprocess.run(["rm", "-rf", str(temp)], capture_output=True)

"""A real OpenSSH server on 127.0.0.1 for the remote-device tests (Debian's openssh-server).

It runs as a child of the test session with its own host key, authorized key and config, listens on
a free loopback port, and stops itself: killed when the tests end, and `timeout` ends it after
15 minutes whatever happens. Clients reach it as host alias ``edgekit-test`` through the config file
that ``EDGEKIT_SSH_CONFIG`` points at.
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = Path(shutil.which("sshd") or "/usr/sbin/sshd")
ALIAS = "edgekit-test"


@dataclass
class Server:
    config: Path  # ssh client config (for EDGEKIT_SSH_CONFIG)
    alias: str
    port: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder: Path):
    """Start sshd; return (Server, process). Skips (or fails under CI) when openssh-server is absent."""
    if not SSHD.is_file():
        msg = "openssh-server is not installed (apt-get install openssh-server; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    for key in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
    auth = folder / "authorized_keys"
    auth.write_text((folder / "id.pub").read_text())
    auth.chmod(0o600)
    port = free_port()
    cfg = folder / "sshd_config"
    cfg.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {folder / 'host_key'}
AuthorizedKeysFile {auth}
PidFile {folder / 'sshd.pid'}
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    log = open(folder / "sshd.log", "wb")
    proc = subprocess.Popen(["timeout", "900", str(SSHD), "-D", "-e", "-f", str(cfg)], stdout=log, stderr=log)
    client = folder / "ssh_config"
    client.write_text(f"""Host {ALIAS}
  HostName 127.0.0.1
  Port {port}
  User {getpass.getuser()}
  IdentityFile {folder / 'id'}
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
""")
    deadline = time.monotonic() + 20
    while True:
        ok = subprocess.run(["ssh", "-F", str(client), "-o", "BatchMode=yes", ALIAS, "true"],
                            capture_output=True, timeout=20).returncode == 0
        if ok:
            return Server(client, ALIAS, port), proc
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"sshd did not come up: {(folder / 'sshd.log').read_text()[-2000:]}")
        time.sleep(0.3)

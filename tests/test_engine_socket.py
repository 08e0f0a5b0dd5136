"""Engines listen on a Unix socket in a 0700 directory of the runtime directory, never on TCP:
the front server reaches them, another local user does not, whatever the socket's own mode."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from serving import CHAT, chat_body, engine_socket, fake_lanes_env, serving

pytestmark = pytest.mark.engine

NOBODY = 65534
# Runs as `nobody`: connect to the socket and send a request, print what happened.
CONNECT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(sys.argv[1])
    sock.sendall(b"GET /health HTTP/1.1\\r\\nhost: engine\\r\\n\\r\\n")
    print("answered", sock.recv(100)[:12].decode())
except OSError as error:
    print(type(error).__name__, error.errno)
"""


def as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def tcp_listeners(pid: int) -> list[str]:
    """The TCP sockets a process listens on (its fds matched against /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    rows = [line.split() for name in ("tcp", "tcp6") for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]]
    return [row[1] for row in rows if row[3] == "0A" and row[9] in inodes]


def test_another_user_cannot_reach_an_engine_socket(tmp_path, fake_python):
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root")
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    # A runtime directory `nobody` can reach (pytest's own tmp is 0700): only the launcher's
    # sockets directory may stop it.
    runtime = Path(tempfile.mkdtemp(prefix="vllm-uds-test-", dir="/tmp"))
    runtime.chmod(0o755)
    env = fake_lanes_env(fake_python, {"a": {}}, VLLM_RUNTIME_DIR=str(runtime))

    def run(script: str, *args: str, **kwargs) -> str:
        done = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, timeout=30, **kwargs)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    try:
        with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
            served.runtime_dir = runtime
            (pgid,) = served.record_engine_groups()
            path = Path(engine_socket(pgid))
            directory = path.parent
            assert directory == runtime / "sockets" and stat.S_ISSOCK(path.stat().st_mode)
            info = directory.stat()
            assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
            path.chmod(0o777)          # even a socket open to everyone: the directory keeps others out
            listed = "import os, sys; print(sorted(os.listdir(sys.argv[1])))"
            assert "sockets" in run(listed, str(runtime), preexec_fn=as_nobody)     # nobody gets this far
            assert run(CONNECT, str(path), preexec_fn=as_nobody) == "PermissionError 13"
            assert run(CONNECT, str(path)) == "answered HTTP/1.1 200"     # the server's own user is answered
            assert client.post(CHAT, json=chat_body("a")).status_code == 200
            assert tcp_listeners(pgid) == []                                     # and no TCP at all
    finally:
        shutil.rmtree(runtime, ignore_errors=True)

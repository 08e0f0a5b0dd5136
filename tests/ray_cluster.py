"""Real Ray nodes for tests: `vllm-launcher cluster head|join` run inside network namespaces
(tests/netns.py), each with a short Ray directory of its own, 1 CPU and a 100 MB object store,
asked through `vllm-launcher cluster status --json`. Used by tests/test_cluster.py; lanes on the
cluster build on the same helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tiers
from closure_env import CLOSURE_PYTHON
from netns import Machine
from waiting import eventually

UP_TIMEOUT = 120.0


def new_token(path: Path) -> Path:
    """A cluster token written by `vllm-launcher cluster new-token` (mode 0600)."""
    result = subprocess.run([sys.executable, "-m", "vllm_launcher", "cluster", "new-token", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return path


def _cluster_env(machine: Machine, work: Path, token: Path, gpus: int, python: str) -> dict[str, str]:
    # Ray's and vLLM's Unix socket paths must stay under 108 bytes: a short directory per node,
    # Ray's session directory and the node's TMPDIR (where its engines and followers keep theirs)
    short = tempfile.mkdtemp(prefix="vlc", dir="/tmp")
    os.mkdir(os.path.join(short, "tmp"))
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work / "home"),
        "TMPDIR": os.path.join(short, "tmp"), "VLLM_ENGINE_PYTHON": python,
        "VLLM_CLUSTER_INTERFACE": machine.interface,
        "VLLM_CLUSTER_TOKEN_FILE": str(token), "VLLM_CLUSTER_GPUS": str(gpus), "VLLM_CLUSTER_CPUS": "1",
        "VLLM_CLUSTER_OBJECT_STORE_MEMORY": "100M", "VLLM_CLUSTER_TEMP_DIR": short,
    }


class Node:
    """One machine's `vllm-launcher cluster head|join`, run inside its namespace, its Ray from
    `python` (default: the locked closure's), with `extra_env` on top (the node's workers inherit it)."""

    def __init__(self, machine: Machine, work: Path, token: Path, gpus: int, *command: str,
                 python: str = str(CLOSURE_PYTHON), extra_env: dict[str, str] | None = None):
        tiers.require("cluster", doing="starts a Ray node")
        self.machine = machine
        work.mkdir(parents=True, exist_ok=True)
        (work / "home").mkdir(exist_ok=True)
        self.env = {**_cluster_env(machine, work, token, gpus, python), **(extra_env or {})}
        self.log_path = work / "node.log"
        self.started = time.monotonic()
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                machine.argv(sys.executable, "-m", "vllm_launcher", "cluster", *command),
                env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def driver_env(self) -> dict[str, str]:
        """The environment of a Ray driver on this node that talks to the cluster with the token."""
        return {**self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.env["VLLM_CLUSTER_TOKEN_FILE"],
                "RAY_USAGE_STATS_ENABLED": "0"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> tuple[int, float]:
        """SIGTERM to the launcher; (exit status, seconds to exit)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        return code, time.monotonic() - started

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.env["VLLM_CLUSTER_TEMP_DIR"], ignore_errors=True)


def launcher_in(machine: Machine, env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(machine.argv(sys.executable, "-m", "vllm_launcher", *args), env=env,
                          capture_output=True, text=True, timeout=timeout)


def cluster_status(head: Node) -> dict | None:
    result = launcher_in(head.machine, head.env, "cluster", "status", "--json")
    return json.loads(result.stdout) if result.returncode == 0 else None


def wait_for_nodes(head: Node, count: int, timeout: float = UP_TIMEOUT) -> dict:
    def status() -> dict | None:
        assert head.process.poll() is None, f"the head exited:\n{head.log()[-3000:]}"
        found = cluster_status(head)
        return found if found and found["nodes_alive"] == count else None

    return eventually(status, lambda: f"the cluster has {count} nodes: {cluster_status(head)}\n{head.log()[-3000:]}",
                      timeout, 1.0)


def stop_server(server: subprocess.Popen | None, timeout: float = 60.0) -> None:
    """SIGTERM to a `vllm-launcher serve` (it stops its engines), SIGKILL after `timeout`."""
    if server is not None and server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

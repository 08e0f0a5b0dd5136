"""The processes the benchmark runs, each in a process group of its own: the front server
(`vllm-launcher serve`), LiteLLM's proxy, a real engine started alone; waiting until one
answers, and stopping a whole group.  Nothing here comes from tests/: the benchmark finds its
own processes with psutil (a dependency of vLLM, so in every environment that runs it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_members(pgid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of a process group."""
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
    return members


def stop_group(pgid: int, grace: float) -> tuple[float, bool]:
    """SIGTERM the group, SIGKILL it after GRACE seconds; returns (seconds until no member was
    left, whether it had to be killed)."""
    began = time.monotonic()
    killed = False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    while group_members(pgid):
        if not killed and time.monotonic() - began > grace:
            killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.1)
    return time.monotonic() - began, killed


def processes_below(directory: Path) -> list[psutil.Process]:
    """Live processes whose TMPDIR or VLLM_CACHE_ROOT lies under DIRECTORY: every engine the
    benchmark starts, alone or through a server, gets its TMPDIR there (TMPDIR is on the
    launcher's engine allow-list, and engine children inherit it)."""
    root = str(directory.resolve())
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            environ = process.environ()
            values = (environ.get("TMPDIR", ""), environ.get("VLLM_CACHE_ROOT", ""))
            if process.status() != psutil.STATUS_ZOMBIE and any(
                    v == root or v.startswith(root + os.sep) for v in values):
                found.append(process)
    return found


def kill_below(directory: Path, settle: float = 10.0) -> list[str]:
    """Processes under DIRECTORY still alive after SETTLE seconds: listed, their groups killed."""
    deadline = time.monotonic() + settle
    left = processes_below(directory)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = processes_below(directory)
    described = []
    for process in left:
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            described.append(f"{process.pid} {' '.join(process.cmdline())[:200]}")
            os.killpg(os.getpgid(process.pid), signal.SIGKILL)
    return described


def tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and its live children."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def our_cpu_seconds() -> dict[int, float]:
    """pid -> CPU seconds of this process and its descendants (servers, engines)."""
    out = {}
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            out[process.pid] = times.user + times.system
    return out


@dataclass
class Started:
    """A command started in its own process group with its output in a log file."""
    argv: list[str]
    log_path: Path
    process: subprocess.Popen
    started_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    stop_seconds: float | None = None
    killed: bool = False

    @classmethod
    def spawn(cls, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> Started:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            process = subprocess.Popen([str(a) for a in argv], env=dict(env), stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return cls([str(a) for a in argv], log_path, process)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def start_seconds(self) -> float | None:
        return None if self.ready_at is None else self.ready_at - self.started_at

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def wait_answer(self, url: str, timeout: float, ok=lambda response: response.status_code == 200,
                    transport: httpx.HTTPTransport | None = None) -> None:
        """Poll URL until `ok(response)`; raises RuntimeError with the log's tail if the process
        exits first or TIMEOUT passes."""
        deadline = self.started_at + timeout
        with httpx.Client(timeout=2.0, trust_env=False, transport=transport) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.argv[:3]} exited with {self.process.returncode}:\n{self.log()}")
                with contextlib.suppress(httpx.HTTPError):
                    if ok(client.get(url)):
                        self.ready_at = time.monotonic()
                        return
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{self.log()}")
                time.sleep(0.1)

    def stop(self, grace: float = 30.0) -> float:
        if self.stop_seconds is None:
            self.stop_seconds, self.killed = stop_group(self.pid, grace)
            self.process.wait()
        return self.stop_seconds


# ------------------------------------------------------------------ the front server


@dataclass
class Server:
    started: Started
    url: str
    directory: Path

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, trust_env=False)

    def lanes(self) -> dict:
        with self.client() as client:
            return client.get("/lanes").json()["lanes"]

    def log(self) -> str:
        return self.started.log()


def lanes_env(engine_python: Path, lanes: Mapping[str, Mapping[str, str]], **server: str) -> dict[str, str]:
    """Settings for a server whose lanes are served by ENGINE_PYTHON; per lane extra settings
    such as ENV_FAKE_TOKEN_DELAY."""
    env = {"VLLM_ENGINE_PYTHON": str(engine_python), "VLLM_LANES": ",".join(lanes), **server}
    for lane, extra in lanes.items():
        prefix = f"VLLM_LANE_{lane.upper()}_"
        env.setdefault(prefix + "MODEL", f"bench/{lane}-model")
        env.setdefault(prefix + "SERVED_MODEL_NAME", lane)
        env.update({prefix + key: value for key, value in extra.items()})
    return env


@contextlib.contextmanager
def serving(directory: Path, env: Mapping[str, str], *, ready_lane: str, python: str = sys.executable,
            timeout: float = 120.0):
    """`vllm-launcher serve` for the block, listening once READY_LANE is ready; afterwards it is
    stopped (SIGTERM, its own shutdown stops its engines) and no process below DIRECTORY is left."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
                "VLLM_HOST": "127.0.0.1", "VLLM_PORT": str(port), "VLLM_RUNTIME_DIR": str(directory / "run"),
                "VLLM_STOP_TIMEOUT": "10", "TMPDIR": str(directory),
                **({"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}), **env}
    started = Started.spawn([python, "-m", "vllm_launcher", "serve"], full_env, directory / f"server-{port}.log")
    server = Server(started, f"http://127.0.0.1:{port}", directory)
    try:
        started.wait_answer(f"{server.url}/lanes", timeout,
                            ok=lambda r: r.status_code == 200 and r.json()["lanes"][ready_lane]["state"] == "ready")
        yield server
    finally:
        started.stop(grace=60.0)
        left = kill_below(directory)
        if left:
            raise RuntimeError(f"processes left behind by the server: {left}\n{started.log()}")


"""Run the real `vllm-launcher serve` in a subprocess for a test, and make sure it and its
engines are gone afterwards.

Engines are the fake engine (tests/fake_engine.py, through a generated stand-in Python) or
real vLLM; either way they are found afterwards by process group, from the server's own
runtime-directory records and by a scan of /proc for the test's unique marker.

And what tests ask a served launcher: a chat request's body, a stream's events, /metrics samples,
an engine's socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

import tiers
from vllm_launcher.engines.process import KEEPER_SCRIPT
from waiting import eventually

TESTS = Path(__file__).resolve().parent
CHAT = "/v1/chat/completions"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_fake_python(directory: Path) -> Path:
    """A stand-in engine interpreter: `<it> -m vllm.entrypoints.openai.api_server ARGS` runs
    the fake engine with ARGS. The path of this test run is the marker in every cmdline."""
    path = directory / "fake-python"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {TESTS / 'fake_engine.py'} \"$@\"\n")
    path.chmod(0o755)
    return path


def processes_with_tmpdir(prefix: str) -> list[tuple[int, str]]:
    """Processes whose environment has TMPDIR under prefix: every engine a test starts gets
    TMPDIR under its tmp_path (TMPDIR is on the engine allow-list), and engine children inherit it."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        tmpdir = next((item[7:].decode(errors="replace") for item in environ if item.startswith(b"TMPDIR=")), "")
        if tmpdir.startswith(prefix) and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append((int(entry), cmdline.strip()))
    return found


def group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    alive = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return alive


def wait_gone(pid: int, timeout: float = 30) -> None:
    """Until the process is gone (or a zombie nobody has reaped yet)."""
    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    eventually(gone, f"process {pid} gone", timeout)


@dataclass
class Served:
    process: subprocess.Popen
    url: str
    runtime_dir: Path
    log_path: Path
    env: dict
    engine_groups: set = field(default_factory=set)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def record_engine_groups(self) -> set[int]:
        """Engine process groups the server has recorded (running engines)."""
        for path in self.runtime_dir.glob("engine-*.json"):
            with contextlib.suppress(OSError, ValueError):
                self.engine_groups.add(int(json.loads(path.read_text())["pgid"]))
        return self.engine_groups

    @property
    def auth(self) -> dict | None:
        key = self.env.get("VLLM_API_KEY")
        if not key and self.env.get("VLLM_API_KEY_FILE"):
            key = Path(self.env["VLLM_API_KEY_FILE"]).read_text().strip()
        return {"Authorization": f"Bearer {key}"} if key else None

    def lanes(self) -> dict:
        with self.client() as client:
            return client.get("/lanes", headers=self.auth).json()["lanes"]

    def wait_state(self, lane: str, state: str, timeout: float = 60) -> dict:
        def reached() -> dict | None:
            self.record_engine_groups()
            shown = self.lanes()[lane]
            if shown["state"] == "failed" != state:     # final until a load request: no use waiting
                raise AssertionError(f"lane {lane} failed, waiting for {state}: {shown}\n{self.log()[-3000:]}")
            return shown if shown["state"] == state else None

        return eventually(reached, lambda: f"lane {lane} {state}: {self.lanes()}\n{self.log()[-3000:]}", timeout, 0.1)

    def wait_queue(self, lane: str, depth: int, timeout: float = 120) -> None:
        """Until `depth` requests wait for `lane` (requests sent from threads need a moment; on a
        loaded 2-core machine beside a starting engine, tens of seconds)."""
        eventually(lambda: self.lanes()[lane]["queue_depth"] == depth,
                   lambda: f"{depth} requests waiting for lane {lane}: {self.lanes()}", timeout)

    def wait_inflight(self, lane: str, count: int, timeout: float = 120) -> None:
        """Until `count` requests of `lane` are with its engine."""
        eventually(lambda: self.lanes()[lane]["inflight"] == count,
                   lambda: f"{count} requests of lane {lane} with its engine: {self.lanes()}", timeout)

    def terminate(self, timeout: float = 120) -> int:
        """SIGTERM, wait for exit; returns the exit status."""
        self.record_engine_groups()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"server did not exit {timeout} s after SIGTERM\n{self.log()[-3000:]}") from None

    def leftovers(self) -> list[int]:
        return [pid for pgid in self.record_engine_groups() for pid in group_alive(pgid)]


def start_server(tmp_path: Path, env: dict, *, wait_ready_lane: str | None = None, timeout: float = 60,
                 python: str = sys.executable, command: tuple[str, ...] = ("serve",)) -> Served:
    tiers.require("engine", "e2e", "cluster", doing="starts a `vllm-launcher serve` process and its engines")
    port = int(env.get("VLLM_PORT") or free_port())
    tmp_path.mkdir(parents=True, exist_ok=True)
    runtime_dir = tmp_path / "run"
    log_path = tmp_path / f"server-{port}.log"
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
                "VLLM_HOST": "127.0.0.1", "VLLM_PORT": str(port), "VLLM_RUNTIME_DIR": str(runtime_dir),
                "VLLM_STOP_TIMEOUT": "5", "TMPDIR": str(tmp_path), **env}
    log_file = open(log_path, "wb")
    process = subprocess.Popen([python, "-m", "vllm_launcher", *command], env=full_env, stdout=log_file,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    served = Served(process, f"http://127.0.0.1:{port}", runtime_dir, log_path, full_env)

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{served.log()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(served.url + "/readyz", timeout=2).status_code == 200
        return False

    try:
        eventually(listening, lambda: f"server listening:\n{served.log()[-3000:]}", timeout, 0.1)
        if wait_ready_lane:
            served.wait_state(wait_ready_lane, "ready", timeout)
    except BaseException:
        served.terminate()
        raise
    return served


@contextlib.contextmanager
def serving(tmp_path: Path, env: dict, **kwargs):
    """A running server for the block; afterwards it is stopped and no engine of it is left."""
    served = start_server(tmp_path, env, **kwargs)
    try:
        yield served
    finally:
        served.terminate()
        left = served.leftovers()
        assert not left, f"engine processes left behind: {left}\n{served.log()[-3000:]}"


def fake_lanes_env(fake_python: Path, lanes: dict[str, dict[str, str]], **server) -> dict[str, str]:
    """Environment for a server whose lanes are fake engines. lanes: name -> extra per-lane
    settings (keys like ENV_FAKE_START_DELAY or GPU_MEMORY_UTILIZATION)."""
    env = {"VLLM_ENGINE_PYTHON": str(fake_python), "VLLM_LANES": ",".join(lanes), **server}
    for lane, extra in lanes.items():
        env[f"VLLM_LANE_{lane.upper()}_MODEL"] = f"fake-org/{lane}-model"
        env[f"VLLM_LANE_{lane.upper()}_SERVED_MODEL_NAME"] = lane
        for key, value in extra.items():
            env[f"VLLM_LANE_{lane.upper()}_{key}"] = value
    return env


def chat_body(model: str, stream: bool = False, max_tokens: int = 4, content: str = "hi") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": stream}


def sse_events(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def metric_samples(text: str) -> dict:
    """Prometheus text -> {(name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_metric(served: Served, name: str, expected: float, timeout: float = 30, **labels) -> None:
    """Until the server's /metrics shows `expected` for the sample."""
    with served.client() as client:
        def seen() -> float:
            return value(metric_samples(client.get("/metrics").text), name, **labels)

        eventually(lambda: seen() == expected, lambda: f"{name}{labels} = {expected} (is {seen()})", timeout)


def engine_socket(pgid: int) -> str:
    """The Unix socket an engine listens on (its --uds); engines have no --host, and --port 0."""
    argv = Path(f"/proc/{pgid}/cmdline").read_bytes().split(b"\0")
    assert b"--host" not in argv and [argv[i + 1] for i, arg in enumerate(argv) if arg == b"--port"] == [b"0"], argv
    return argv[argv.index(b"--uds") + 1].decode()


def keepers_of(server_pid: int) -> list[psutil.Process]:
    """A server's engine keepers (engines/keeper.py): its children running the keeper script."""
    return [p for p in psutil.Process(server_pid).children() if str(KEEPER_SCRIPT) in " ".join(p.cmdline())]

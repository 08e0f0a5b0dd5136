"""One engine process: started in its own process group, listening on a Unix socket of its own
with a fresh key, watched until ready, stopped as a whole group, never left behind.

The socket lives in a 0700 directory of the runtime directory (see sockets_dir), so no other
local user can reach the engine's endpoints, the unauthenticated ones (/health, /pause,
/collective_rpc ...) included; engines never listen on TCP.

vLLM's API server forks `VLLM::EngineCore` (and on CPU `VLLM::Worker`); SIGKILL of the API
server alone leaves those alive holding memory, so every signal goes to the group, and a
stop is only done when no process of the group is left. The group's leader is the engine's keeper
(keeper.py), the engine its child: when the launcher dies without stopping its engines
(SIGKILL, the OOM killer), each keeper kills its group.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import httpx

from ..engine_command import EngineSpec
from ..logs import ENGINE_STOPPING
from ..settings import mask_secrets
from .keeper import group_members  # keeper.py is standard library only: the one reading of a group

log = logging.getLogger("vllm_launcher.engine")

LOG_TAIL_LINES = 40
KILL_CONFIRM_SECONDS = 30
EXIT_POLL_SECONDS = 0.1                   # how soon an engine's exit is noticed
# After an exit, how long its last lines may take to arrive: short, because a surviving child
# keeps the pipe open (no EOF comes) and the requests on the engine wait for the crash report.
DRAIN_OUTPUT_SECONDS = 0.3
KEEPER_SCRIPT = Path(__file__).resolve().with_name("keeper.py")


ENGINE_URL = "http://engine"             # the host part is not used: every request goes to the socket
# Errors of the server's own resources, not the engine's: they never count toward a lane's failure.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
SOCKET_PATH_MAX = 107                     # sun_path is 108 bytes with its NUL
SOCKET_NAME_LENGTH = len("/0123456789ab.sock")


def engine_client(socket_path: str, **options: Any) -> httpx.AsyncClient:
    """An HTTP client for talking to one engine over its Unix socket. It never reads the
    environment's proxy settings (HTTP_PROXY, ALL_PROXY, .netrc ...): engine traffic carries the
    engine's key and stays on this machine, whatever proxy the operator set for downloads."""
    limits = options.pop("limits", httpx.Limits())
    transport = httpx.AsyncHTTPTransport(uds=socket_path, limits=limits)
    return httpx.AsyncClient(base_url=ENGINE_URL, transport=transport, trust_env=False, **options)


def upstream_session(socket_path: str, key: str) -> aiohttp.ClientSession:
    """The pool requests are forwarded through (aiohttp: a quarter of httpx's CPU per request).
    Like engine_client it never reads proxy settings (aiohttp's trust_env is off); no limit on
    connections; an idle one is dropped after 4 s, before the engine's uvicorn closes it at 5 s
    (a POST on a connection the engine is closing would fail); bodies are passed as they come
    (no decompression), no Accept-Encoding or User-Agent is added, no cookies are kept."""
    connector = aiohttp.UnixConnector(path=socket_path, limit=0, keepalive_timeout=4.0)
    return aiohttp.ClientSession(ENGINE_URL, connector=connector, headers={"Authorization": f"Bearer {key}"},
                                 timeout=aiohttp.ClientTimeout(total=None, connect=10.0, sock_connect=10.0),
                                 auto_decompress=False, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                                 skip_auto_headers=("Accept-Encoding", "User-Agent"))


class UnsafeDirectory(OSError):
    """The runtime directory or its sockets/ may be changed by another user: refused."""


def private_directory(directory: Path) -> Path:
    """DIRECTORY created 0700 if absent, else refused (UnsafeDirectory) unless it is a real
    directory (not a symbolic link) of this user that group and others cannot write: as OpenSSH
    and tmux check theirs, before anything in it is read or created. Another user able to write
    it could plant engine records (the reaper would signal their groups) or swap sockets/."""
    try:
        directory.mkdir(parents=True, mode=0o700)
        os.chmod(directory, 0o700)
    except FileExistsError:
        pass
    info = directory.lstat()
    uid = os.getuid()
    accepted = (f"accepted: a directory owned by this user (uid {uid}) that group and others cannot write "
                f"(chmod 700 {directory}), or a path that does not exist yet (created 0700)")
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(f"{directory} is {'a symbolic link' if stat.S_ISLNK(info.st_mode) else 'not a directory'}; "
                              + accepted)
    if info.st_uid != uid:
        raise UnsafeDirectory(f"{directory} is owned by uid {info.st_uid}, not this user; {accepted}")
    if info.st_mode & 0o022:
        raise UnsafeDirectory(f"{directory} is writable by {'group and others' if info.st_mode & 0o002 else 'its group'} "
                              f"(mode {stat.S_IMODE(info.st_mode):o}); {accepted}")
    return directory


def sockets_dir(runtime_dir: Path) -> Path:
    """The directory of the engines' sockets, sockets/ of the runtime directory: both checked by
    private_directory, and sockets/ closed to others (a socket's own mode is not a guarantee:
    vLLM creates it with the umask's)."""
    private_directory(runtime_dir)
    directory = runtime_dir / "sockets"
    if len(str(directory)) + SOCKET_NAME_LENGTH > SOCKET_PATH_MAX:     # too long for sun_path
        fallback = Path(tempfile.mkdtemp(prefix="vllm-launcher-"))      # 0700, ours
        log.warning("%s is too long for Unix socket paths; engine sockets go to %s", directory, fallback)
        return fallback
    private_directory(directory)
    if stat.S_IMODE(directory.lstat().st_mode) != 0o700:
        os.chmod(directory, 0o700)
    return directory


def resource_error(error: BaseException | None) -> bool:
    """EMFILE/ENFILE anywhere in an exception's chain: the server ran out of descriptors."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
    return False


def process_start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot (field 22 of /proc/PID/stat): with the pid it
    identifies a process across pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class EngineStartError(Exception):
    """A start that failed; `resource` when the server's own resources (EMFILE) were the cause."""

    def __init__(self, message: str, log_tail: list[str], resource: bool = False, status: int | None = None):
        super().__init__(message)
        self.log_tail = log_tail
        self.resource = resource
        self.status = status            # the exit status, when the engine exited while starting

    def cause(self) -> str:
        tail = "\n".join(self.log_tail[-8:])
        return f"{self}" + (f"; last engine log lines:\n{tail}" if tail else "")


@dataclass
class EngineProcess:
    spec: EngineSpec
    served_name: str
    socket_path: str
    api_key: str
    log_line: Callable[[str, str], None] = lambda lane, line: log.info("[%s] %s", lane, line)
    secrets: list[str] = field(default_factory=list)   # masked in its output, with its own key
    process: asyncio.subprocess.Process | None = None
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=LOG_TAIL_LINES))
    started_at: float = 0.0
    listening_at: float | None = None
    ready_at: float | None = None
    _reader: asyncio.Task[None] | None = None
    stop_requested: bool = False              # its output from then on is its end (logs.ENGINE_STOPPING)
    _keeper_pipe: int | None = None           # the write end: closed while the group lives, it dies

    def __post_init__(self) -> None:
        self._masked = sorted({s for s in (self.api_key, *self.secrets) if s and len(s) >= 4}, key=len, reverse=True)

    def mask(self, text: str) -> str:
        """TEXT with the configuration's secrets and this engine's key masked."""
        return mask_secrets(text, self._masked)

    @property
    def lane(self) -> str:
        return self.spec.lane

    @property
    def started(self) -> asyncio.subprocess.Process:
        """The process, for what runs only after start() (which sets it)."""
        return cast(asyncio.subprocess.Process, self.process)

    @property
    def pgid(self) -> int:
        return self.started.pid

    async def start(self) -> None:
        """The engine under its keeper (keeper.py): the launcher's Python, isolated (-I -S: no
        site, no PYTHON* variables), the leader of the engine's new session and group, the read
        end of a pipe whose write end only this process holds; the engine is its child, with
        the engine's environment and output. The keeper's pid is the group's id and its exit
        status the engine's."""
        self.started_at = time.monotonic()
        read_end, self._keeper_pipe = os.pipe()
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", str(KEEPER_SCRIPT), str(read_end), "--", *self.spec.argv,
                env=self.spec.env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, pass_fds=(read_end,), start_new_session=True)
        except BaseException:
            self._close_keeper_pipe()
            raise
        finally:
            os.close(read_end)
        self._reader = asyncio.create_task(self._read_output())

    def _close_keeper_pipe(self) -> None:
        """Only once nothing of the group is left: closed earlier, the keeper kills it."""
        pipe, self._keeper_pipe = self._keeper_pipe, None
        if pipe is not None:
            os.close(pipe)

    async def _read_output(self) -> None:
        stream = cast(asyncio.StreamReader, self.started.stdout)     # stdout=PIPE
        while True:
            try:
                raw = await stream.readline()
            except ValueError:            # a line longer than the stream limit: take what is there
                raw = await stream.read(65536)
            if not raw:
                return
            # masked at the source: the tail goes into /lanes, 503s and the log
            line = self.mask(raw.decode(errors="replace").rstrip())
            self.tail.append(line)
            ENGINE_STOPPING.set(self.stop_requested)      # this reader task's own context
            self.log_line(self.lane, line)

    def exited(self) -> bool:
        return self.process is None or self.process.returncode is not None

    def log_tail(self) -> list[str]:
        return list(self.tail)

    async def wait_ready(self, timeout: float, poll: float = 0.5) -> None:
        """Ready = /health 200 and our served name in /v1/models. Fails at once if the process
        exits; a timeout while the last polls failed for lack of descriptors (EMFILE) is the
        server's resource failure, not the engine's."""
        deadline = self.started_at + timeout
        headers = {"Authorization": f"Bearer {self.api_key}"}
        short_of_descriptors = False
        async with engine_client(self.socket_path, timeout=httpx.Timeout(5.0)) as client:
            while True:
                if self.exited():
                    await self.drain_output()
                    raise EngineStartError(
                        f"engine for lane {self.lane!r} exited with status {self.started.returncode} while starting",
                        self.log_tail(), status=self.started.returncode)
                if time.monotonic() > deadline:
                    raise EngineStartError(
                        f"engine for lane {self.lane!r} not ready after {timeout:.0f} s (VLLM_START_TIMEOUT)"
                        + ("; the server was out of file descriptors (EMFILE)" if short_of_descriptors else ""),
                        self.log_tail(), resource=short_of_descriptors)
                try:
                    health = await client.get("/health")
                    short_of_descriptors = False
                    self.listening_at = self.listening_at or time.monotonic()
                    if health.status_code == 200:
                        models = await client.get("/v1/models", headers=headers)
                        if models.status_code == 200 and any(
                                m.get("id") == self.served_name for m in models.json().get("data", [])):
                            self.ready_at = time.monotonic()
                            return
                except (httpx.HTTPError, ValueError) as error:
                    short_of_descriptors = resource_error(error)
                await asyncio.sleep(poll)

    async def drain_output(self) -> None:
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), DRAIN_OUTPUT_SECONDS)
            except (TimeoutError, asyncio.CancelledError):
                pass

    async def wait_exit(self) -> int:
        """The engine's own exit status. Not `Process.wait()`: that also waits for the output
        pipe to close, and a surviving child (vLLM's EngineCore) keeps it open, so a crash of
        the API server would go unnoticed. The child watcher sets `returncode` at the exit."""
        while (status := self.started.returncode) is None:
            await asyncio.sleep(EXIT_POLL_SECONDS)
        return status

    async def stop(self, grace: float) -> float:
        """SIGTERM the group, SIGKILL it after `grace`, then confirm nothing of it is left.
        Returns the seconds it took."""
        began = time.monotonic()
        if self.process is None:
            return 0.0
        pgid = self.pgid
        self.stop_requested = True
        kill_group(pgid, signal.SIGTERM)
        deadline = began + grace
        while group_members(pgid) and time.monotonic() < deadline:
            if self.process.returncode is None:
                try:
                    await asyncio.wait_for(self.process.wait(), 0.2)
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(0.1)
        give_up = time.monotonic() + KILL_CONFIRM_SECONDS
        while (left := group_members(pgid)) and time.monotonic() < give_up:
            kill_group(pgid, signal.SIGKILL)
            await asyncio.sleep(0.1)
        if left:      # unkillable (uninterruptible I/O in a driver): say so loudly, do not hang
            log.error("engine group %d of lane %s still has processes %s after SIGKILL", pgid, self.lane, left)
        elif self.process.returncode is None:
            await self.process.wait()
        if not left:
            self._close_keeper_pipe()
        await self.drain_output()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
        return time.monotonic() - began

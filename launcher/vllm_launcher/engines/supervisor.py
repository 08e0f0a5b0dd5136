"""Each lane's engine under a supervisor of its own: start, watch, stop, restarts' causes,
timings and the upstream connection pool.

The router decides, through the scheduler, when a lane's engine starts and stops; the
supervisor carries it out and reports back, once per start, exactly one of: ready (with the
Engine handle requests are sent through), start failed (and whether that counts toward the
lane's failure: not when the server itself ran out of file descriptors), or, later, exited.
Like llama-swap's Process (one upstream with its state and lifecycle), one supervisor owns one
engine at a time; unlike it, the policy (when to restart, when to give up) is not here but in
the pure scheduler.

An exit is reported before the engine's pool is closed, so the scheduler no longer counts the
lane ready and the router has ended every request in flight on that engine when the pool goes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import aiohttp
import httpx

from .. import cluster as clusters
from ..config import ClusterConfig
from ..engine_command import LaneLaunch, engine_spec
from ..metrics import Metrics
from ..placement import ClusterState, Placement, nodes_that_fit
from ..settings import mask_secrets
from ..vllm_info import VllmInfo
from .followers import CLUSTER_NOT_READY
from .process import (
    EngineProcess,
    EngineStartError,
    engine_client,
    private_directory,
    resource_error,
    upstream_session,
)
from .reaper import ENGINE_ID_VARIABLE, EngineRecords, new_engine_id
from .warmup import Warmup, WarmupFailed, warm_up

log = logging.getLogger("vllm_launcher.supervisor")

UPSTREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None)
UPSTREAM_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64)
TAIL_IN_ERRORS = 8
CLUSTER_POLL = 2.0          # seconds between two questions to the cluster while a lane waits for it


def query_cluster(launch: LaneLaunch) -> ClusterState:
    """The cluster's nodes, asked from the engines' Python with the token (blocking)."""
    # asked only for a lane with a cluster placement, which comes with the cluster's settings
    return clusters.query_cluster(cast(ClusterConfig, launch.cluster), launch.engine_python, launch.environ)


class ClusterWaitFailed(Exception):
    """The cluster did not get what a lane needs in time (or refused this machine)."""


class Engine:
    """A ready engine as requests see it: the pool they are sent through (`session`, aiohttp;
    `client`, httpx, for the server's own GETs). A request keeps the Engine it was dispatched
    to, so it never looks its lane up again; `ended` says why the engine is gone once it is."""

    def __init__(self, lane: str, process: EngineProcess, client: httpx.AsyncClient,
                 session: aiohttp.ClientSession | None = None):
        self.lane = lane
        self.process = process
        self.client = client
        self.session = session
        self.ended: str | None = None

    async def aclose(self) -> None:
        """Close both pools (their open connections too)."""
        await self.client.aclose()
        if self.session is not None:
            await self.session.close()

    async def get(self, path: str, timeout: float = 5.0) -> httpx.Response:
        """A GET to the engine through its pool, with its key (for /metrics and /version).
        Raises httpx.HTTPError, or RuntimeError when the pool closed meanwhile."""
        return await self.client.get(path, timeout=timeout)


class Reports(Protocol):
    """What a supervisor tells its owner (the router), synchronously, on the event loop."""

    def engine_ready(self, engine: Engine) -> None: ...

    def engine_start_failed(self, lane: str, cause: str, counts: bool) -> None: ...

    def engine_exited(self, engine: Engine, cause: str) -> None: ...

    def cluster_unavailable(self, lane: str, cause: str) -> None: ...


@dataclass
class Timings:
    """The last start and stop of a lane's engine: /lanes, metrics, the Retry-After estimate."""
    start_seconds: float | None = None
    start_phases: dict[str, float | str | None] | None = None
    stop_seconds: float | None = None
    started_at: float | None = None      # monotonic: when the last start began
    sleep_seconds: float | None = None   # the last POST /sleep (vLLM sleep mode)
    wake_seconds: float | None = None    # the last POST /wake_up until /is_sleeping said false
    warmup_seconds: float | None = None  # the last start's warm-up (None: off)


class Supervisor:
    """One lane's engine: at most one process at a time, started, watched and stopped here.

    It gets its lane's slice of the configuration (LaneLaunch), nothing of the other lanes'.
    A lane that runs on the cluster (its placement) first waits until the cluster
    has the nodes and GPUs it needs (`progress` says how far it is, for /lanes, /health and the
    waiting streams); its engine gets the cluster's environment."""

    cluster_query = staticmethod(query_cluster)     # (launch) -> ClusterState; tests inject a fake

    def __init__(self, launch: LaneLaunch, vllm: VllmInfo, metrics: Metrics, reports: Reports,
                 sockets: Path, records: EngineRecords | None = None):
        self.lane = launch.lane.name
        self.launch = launch
        self.vllm = vllm
        self.metrics = metrics
        self.reports = reports
        self.sockets = sockets
        self.records = records
        self.secrets = list(launch.secrets)
        self.timings = Timings()
        self.last_error: str | None = None
        self.progress: str | None = None              # e.g. "waiting for cluster (1/2 nodes)"
        self.engine: Engine | None = None             # the ready engine
        self._process: EngineProcess | None = None    # the process, from spawn to its stop
        self._starting: asyncio.Task[None] | None = None
        self._cleanup: asyncio.Task[None] | None = None     # stopping the group of an engine that exited
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.sleep_mode = False                       # the engine (last started) has --enable-sleep-mode

    # ---------------------------------------------------------------- commands

    def start(self, attempt: int, sleep_mode: bool = False) -> None:
        self.sleep_mode = sleep_mode
        self._starting = self._spawn(self._start(attempt))

    async def sleep(self, level: int) -> float:
        """vLLM's POST /sleep?level=N on the ready engine (it answers 200 once asleep); the
        seconds. Raises RuntimeError with the cause when the engine refuses or is gone."""
        began = time.monotonic()
        await self._dev_call("POST", f"/sleep?level={level}")
        self.timings.sleep_seconds = seconds = time.monotonic() - began
        self.metrics.switch_phase.labels(self.lane, "sleep").observe(seconds)
        log.info("lane %s: engine asleep (level %d) in %.2f s", self.lane, level, seconds)
        return seconds

    async def wake(self) -> float:
        """vLLM's POST /wake_up (every tag), then GET /is_sleeping must say false; the seconds."""
        began = time.monotonic()
        self.progress = "waking (vLLM sleep mode)"       # /lanes, /health, the waiting streams
        try:
            await self._dev_call("POST", "/wake_up")
            answer = await self._dev_call("GET", "/is_sleeping")
        finally:
            self.progress = None
        try:
            sleeping = answer.json()["is_sleeping"]
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"/is_sleeping answered {answer.text[:200]!r}") from None
        if sleeping is not False:
            raise RuntimeError("the engine still says it is sleeping after /wake_up")
        self.timings.wake_seconds = seconds = time.monotonic() - began
        self.metrics.switch_phase.labels(self.lane, "wake").observe(seconds)
        log.info("lane %s: engine woken in %.2f s", self.lane, seconds)
        return seconds

    async def _dev_call(self, method: str, path: str) -> httpx.Response:
        engine = self.engine
        if engine is None:
            raise RuntimeError(f"lane {self.lane!r} has no running engine")
        timeout = self.launch.start_timeout
        try:
            response = await engine.client.request(method, path, timeout=timeout)
        except (httpx.HTTPError, RuntimeError) as error:
            raise RuntimeError(f"{method} {path} failed: {error or type(error).__name__}") from None
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path} answered {response.status_code}: "
                               f"{engine.process.mask(response.text[:200])}")
        return response

    async def stop(self, reason: str) -> float:
        """Stop whatever runs (a start in progress included); the seconds it took."""
        self._stopping = True
        began = time.monotonic()
        try:
            starting, self._starting = self._starting, None
            if starting is not None:
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
            engine, self.engine = self.engine, None
            if engine is not None:
                engine.ended = engine.ended or f"the engine of lane {self.lane!r} was stopped ({reason})"
                await engine.aclose()           # vLLM waits for open client connections on SIGTERM
            await self._stop_process()
            if self._cleanup is not None:
                await asyncio.gather(self._cleanup, return_exceptions=True)
        finally:
            self._stopping = False
        seconds = time.monotonic() - began
        self.timings.stop_seconds = seconds
        self.metrics.switch_phase.labels(self.lane, "stop").observe(seconds)
        log.info("lane %s: engine stopped in %.1f s (%s)", self.lane, seconds, reason)
        return seconds

    def busy(self) -> bool:
        """A process of this lane may still be running (starting, ready or being stopped)."""
        return (self._process is not None or self.engine is not None
                or any(not task.done() for task in self._tasks))

    # ---------------------------------------------------------------- internals

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _engine_log(self, lane: str, line: str) -> None:
        logging.getLogger(f"vllm_launcher.engine.{lane}").info("%s", line)

    async def _start(self, attempt: int) -> None:
        if self._cleanup is not None:                  # the previous engine's group is still going
            await asyncio.gather(self._cleanup, return_exceptions=True)
        placement = self.launch.placement
        cluster_env: dict[str, str] = {}
        if placement is not None:
            self.timings.started_at = time.monotonic()
            try:
                await self._wait_for_cluster(placement)
                # a cluster placement comes with the cluster's settings
                cluster_env = clusters.engine_cluster_environment(cast(ClusterConfig, self.launch.cluster),
                                                                  self.launch.environ)
            except (ClusterWaitFailed, clusters.ClusterError) as error:
                cause = mask_secrets(str(error), self.secrets)
                log.error("lane %s: %s", self.lane, cause)
                self.last_error = cause
                if not self._stopping:
                    self._starting = None
                    # Not the engine's failure (no crash loop), but the requests waiting for it end.
                    self.reports.cluster_unavailable(self.lane, cause)
                return
            finally:
                self.progress = None
        key = secrets.token_urlsafe(32)     # per start, in the engine's environment only
        socket_path = str(self.sockets / f"{secrets.token_hex(6)}.sock")
        spec = engine_spec(self.launch, self.vllm, listen=socket_path, api_key=key, sleep_mode=self.sleep_mode)
        spec.env.update(cluster_env)
        engine_id = spec.env[ENGINE_ID_VARIABLE] = new_engine_id()     # how the reaper knows its group
        # its output is masked with its own key too, wherever it is shown (log, /lanes, 503s)
        process = EngineProcess(spec, self.launch.lane.served_model_name, socket_path, key,
                                log_line=self._engine_log, secrets=self.secrets)
        self._process = process
        self.timings.started_at = time.monotonic()
        self.metrics.engine_starts.labels(self.lane).inc()
        if attempt > 1:
            self.metrics.engine_restarts.labels(self.lane).inc()
        log.info("lane %s: starting engine (attempt %d) on %s", self.lane, attempt, socket_path)
        try:
            private_directory(self.sockets)          # still this user's alone, before a socket is made in it
            await process.start()
            if self.records:
                self.records.record(self.lane, process.pgid, engine_id)
            await process.wait_ready(self.launch.start_timeout)
            warmup = await self._warm_up(process, key)
        except (EngineStartError, OSError) as error:
            if isinstance(error, EngineStartError):
                cause, resource = error.cause(), error.resource
            else:
                cause, resource = f"cannot start the engine: {error}", resource_error(error)
            cause = process.mask(cause)      # the engine's output goes into errors
            log.error("lane %s: %s%s", self.lane, cause,
                      " (the server's own limit: not counted as the lane's failure)" if resource else "")
            await self._stop_process()
            self.last_error = cause
            if placement is not None and getattr(error, "status", None) == CLUSTER_NOT_READY:
                # the mp executor's followers found too few nodes (one lost before Ray noticed):
                # the cluster's state, as when waiting for it, not a crash of the lane's engine
                if not self._stopping:
                    self._starting = None
                    self.reports.cluster_unavailable(self.lane, cause)
                return
            if not resource:
                self.metrics.engine_failures.labels(self.lane).inc()
            if not self._stopping:
                self._starting = None
                self.reports.engine_start_failed(self.lane, cause, counts=not resource)
            return
        except asyncio.CancelledError:
            await self._stop_process()
            raise
        self._starting = None
        self._record_start(process, warmup)
        client = engine_client(socket_path, timeout=UPSTREAM_TIMEOUT, limits=UPSTREAM_LIMITS,
                               headers={"Authorization": f"Bearer {key}"})
        engine = Engine(self.lane, process, client, upstream_session(socket_path, key))
        self.engine = engine
        self._spawn(self._watch(engine))
        self.reports.engine_ready(engine)

    async def _wait_for_cluster(self, placement: Placement) -> None:
        """Until the cluster has `placement.nodes` alive nodes with `per_node` GPUs each;
        ClusterWaitFailed after VLLM_START_TIMEOUT or when the cluster refuses the token."""
        timeout = self.launch.start_timeout
        deadline = time.monotonic() + timeout
        seen = "no answer from the cluster yet"
        while True:
            try:
                state = await asyncio.to_thread(self.cluster_query, self.launch)
            except clusters.TokenRefused as error:
                raise ClusterWaitFailed(f"lane {self.lane!r} cannot use the cluster: {error}") from None
            except (clusters.ClusterError, OSError, RuntimeError, ValueError, AttributeError, TypeError) as error:
                seen = str(error) if isinstance(error, clusters.ClusterError) else f"asking the cluster failed: {error!r}"
                self.progress = "waiting for cluster (head unreachable)"
            else:
                have = nodes_that_fit(placement, state)
                if have >= placement.nodes:
                    log.info("lane %s: the cluster has what it needs (%s): %s", self.lane, placement.describe(),
                             state.describe())
                    return
                seen = state.describe()
                self.progress = f"waiting for cluster ({have}/{placement.nodes} nodes)"
            log.info("lane %s: %s", self.lane, self.progress)
            if time.monotonic() + CLUSTER_POLL > deadline:
                raise ClusterWaitFailed(
                    f"lane {self.lane!r} needs {placement.describe()} of the cluster; after VLLM_START_TIMEOUT="
                    f"{timeout:g} s it had {self.progress.removeprefix('waiting for cluster ')}: {seen}")
            await asyncio.sleep(CLUSTER_POLL)

    async def _warm_up(self, process: EngineProcess, key: str) -> Warmup | None:
        """The lane's warm-up (engines/warmup.py) unless WARMUP is off; EngineStartError when
        the engine dies, breaks or runs out of VLLM_START_TIMEOUT in it. A lane woken from
        sleep is not warmed again: sleep keeps the process, and with it what it compiled."""
        if not self.launch.lane.settings["WARMUP"]:         # always resolved: the table's default is on
            return None
        self.progress = "warming up"            # /lanes, /health and the waiting streams say so
        try:
            async with engine_client(process.socket_path, timeout=httpx.Timeout(None, connect=10.0),
                                     headers={"Authorization": f"Bearer {key}"}) as client:
                result = await warm_up(client, process.served_name, process.started_at + self.launch.start_timeout,
                                       process.wait_exit, process.mask)
        except WarmupFailed as error:
            await process.drain_output()
            assert process.process is not None      # spawned: the warm-up follows the engine's start
            raise EngineStartError(f"engine for lane {self.lane!r}: {error}", process.log_tail(),
                                   status=process.process.returncode) from None
        finally:
            self.progress = None
        refused = "; ".join(result.refused)
        if result.kind is None:
            log.warning("lane %s: the engine refused every warm-up; the lane is ready without one: %s", self.lane, refused)
        elif refused:
            log.info("lane %s: warm-up kinds the engine refused before %s: %s", self.lane, result.kind, refused)
        return result

    def _record_start(self, process: EngineProcess, warmup: Warmup | None) -> None:
        ready_at = cast(float, process.ready_at)    # recorded once the engine is ready
        spawn_to_listen = (process.listening_at or ready_at) - process.started_at
        total = ready_at - process.started_at
        self.timings.start_seconds = total
        self.timings.warmup_seconds = warmup.seconds if warmup else None
        self.timings.start_phases = {"spawn_to_listening": round(spawn_to_listen, 3),
                                     "listening_to_ready": round(total - spawn_to_listen, 3),
                                     "warmup": round(warmup.seconds, 3) if warmup else None,
                                     "warmup_kind": warmup.describe() if warmup else "off"}
        self.metrics.switch_phase.labels(self.lane, "start").observe(total)
        if warmup:
            self.metrics.switch_phase.labels(self.lane, "warmup").observe(warmup.seconds)
        log.info("lane %s: engine ready in %.1f s (spawn to listening %.1f s, to ready %.1f s), warm-up %s",
                 self.lane, total + (warmup.seconds if warmup else 0.0), spawn_to_listen, total - spawn_to_listen,
                 f"{warmup.seconds:.1f} s ({warmup.describe()})" if warmup else "off")

    async def _watch(self, engine: Engine) -> None:
        code = await engine.process.wait_exit()
        if self._stopping or self.engine is not engine:
            return
        await engine.process.drain_output()
        cause = f"engine for lane {self.lane!r} exited with status {code}"
        tail = engine.process.mask("\n".join(engine.process.log_tail()[-TAIL_IN_ERRORS:]))
        log.error("lane %s: %s; last lines:\n%s", self.lane, cause, tail)
        engine.ended = cause
        self.engine = None
        self.last_error = f"{cause}; last engine log lines:\n{tail}" if tail else cause
        # First the scheduler and the requests on this engine, then the pool and the group.
        self.reports.engine_exited(engine, cause)
        self._cleanup = self._spawn(self._after_exit(engine))

    async def _after_exit(self, engine: Engine) -> None:
        await engine.aclose()
        if self._process is engine.process:
            await self._stop_process()      # its EngineCore may still be alive

    async def _stop_process(self) -> None:
        process = self._process
        if process is None:
            return
        try:
            if process.process is not None:
                await process.stop(self.launch.stop_timeout)
                if self.records:
                    self.records.forget(process.pgid)
        finally:
            if self._process is process:
                self._process = None

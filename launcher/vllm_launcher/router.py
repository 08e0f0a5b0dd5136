"""The router: the one place that turns events into the scheduler's decisions and carries the
decisions out (start and stop engines, wake waiting requests, abort what a drain timeout ends).

Everything runs on the event loop's thread and no scheduler call awaits, so each event and
the actions it yields are applied atomically; the policy itself is the pure Scheduler.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

from .config import VLLM_DEFAULT_SHARE, LauncherConfig
from .engine_command import build_engine_spec
from .engine_process import EngineProcess, EngineStartError, engine_client, free_port
from .errors import APIError
from .metrics import Metrics
from .reaper import EngineRecords
from .scheduler import (
    AbortInflight, Dispatch, LanePolicy, LaneState, LaneStateChanged, Reject, Scheduler,
    SchedulerSettings, StartEngine, StopEngine, SwitchPlanned,
)
from .settings import mask_secrets
from .vllm_info import VllmInfo

log = logging.getLogger("vllm_launcher.router")

UPSTREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None)
UPSTREAM_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64)


@dataclass
class Ticket:
    """One admitted request, from arrival to its answer."""
    id: int
    lane: str
    arrived: float
    decided: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    aborted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    dispatched_at: float | None = None
    finished: bool = False
    on_abort: Callable[[], None] | None = None     # closes the upstream response of a stream


@dataclass
class LaneRecord:
    """What /lanes reports beyond the scheduler's own state."""
    last_start_seconds: float | None = None
    last_start_phases: dict | None = None
    last_switch_at: float | None = None          # wall clock
    last_switch_seconds: float | None = None
    last_error: str | None = None
    engine_version: str | None = None
    stop_began: float | None = None
    drain_began: float | None = None
    switch_began: float | None = None


class Router:
    def __init__(self, config: LauncherConfig, vllm: VllmInfo, metrics: Metrics | None = None,
                 records: EngineRecords | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.vllm = vllm
        self.metrics = metrics or Metrics()
        self.records = records
        self.clock = clock
        server = config.server
        policies = [LanePolicy(lane.name, lane.gpu_memory_utilization or VLLM_DEFAULT_SHARE, lane.idle_timeout)
                    for lane in config.lanes.values()]
        self.scheduler = Scheduler(policies, SchedulerSettings(
            switch_max_wait=server.switch_max_wait, drain_timeout=server.drain_timeout,
            queue_max=server.queue_max, queue_timeout=server.queue_timeout,
            memory_budget=server.gpu_memory_budget, max_restarts=server.engine_max_restarts))
        self.tickets: dict[int, Ticket] = {}
        self.engines: dict[str, EngineProcess] = {}
        self.clients: dict[str, httpx.AsyncClient] = {}
        self.lane_records = {name: LaneRecord() for name in config.lanes}
        self.secrets = config.secret_values()
        self.state_listeners: list[Callable[[str, str, str], None]] = []
        self._ids = itertools.count(1)
        self._starting: dict[str, asyncio.Task] = {}
        self._stopping: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._timer: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._changed = asyncio.Event()
        self.started_wall = time.time()
        for lane in config.lanes:
            self.metrics.set_state(lane, LaneState.STOPPED.value)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, preload: str | None) -> None:
        self._timer = asyncio.create_task(self._run_timer(), name="scheduler-timer")
        if preload:
            self._apply(self.scheduler.load(preload, self.clock()))

    def begin_shutdown(self) -> None:
        if not self.scheduler.shutting_down:
            log.info("shutting down: queued requests get 503, in-flight ones may finish (drain %.0f s)",
                     self.config.server.drain_timeout)
            self._apply(self.scheduler.shutdown(self.clock()))

    async def close(self) -> None:
        """After shutdown: wait until every engine is stopped, bounded, then make sure of it."""
        self.begin_shutdown()
        server = self.config.server
        bound = server.drain_timeout + server.stop_timeout + server.start_timeout + 30
        try:
            await asyncio.wait_for(self._wait_idle(), bound)
        except asyncio.TimeoutError:
            log.error("engines still running %.0f s after shutdown began; killing them", bound)
        for task in list(self._starting.values()):
            task.cancel()
        for lane, engine in list(self.engines.items()):
            await self._stop_process(lane, engine)
        if self._timer:
            self._timer.cancel()
        for client in self.clients.values():
            await client.aclose()

    async def _wait_idle(self) -> None:
        while not (self.scheduler.is_idle() and not self.engines and not self._starting):
            self._idle.clear()
            await self._idle.wait()

    # ------------------------------------------------------------------ requests

    def admit(self, lane: str) -> Ticket:
        ticket = Ticket(next(self._ids), lane, self.clock())
        self.tickets[ticket.id] = ticket
        self._apply(self.scheduler.submit(ticket.id, lane, ticket.arrived))
        self.metrics.queue_depth.labels(lane).set(self.scheduler.queue_depth(lane))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client left while queued (or before its answer was sent)."""
        if not ticket.decided.done():
            ticket.decided.cancel()
            self._apply(self.scheduler.cancel(ticket.id, self.clock()))
            self.tickets.pop(ticket.id, None)
            self.metrics.queue_depth.labels(ticket.lane).set(self.scheduler.queue_depth(ticket.lane))

    def finish(self, ticket: Ticket, status: int) -> None:
        if ticket.finished:
            return
        ticket.finished = True
        self.tickets.pop(ticket.id, None)
        self.metrics.requests.labels(ticket.lane, str(status)).inc()
        if ticket.dispatched_at is not None:
            self.metrics.inflight.labels(ticket.lane).dec()
            self._apply(self.scheduler.finish(ticket.id, self.clock()))

    def client_for(self, lane: str) -> httpx.AsyncClient:
        """The upstream client of a dispatched request's engine (it may have died just now)."""
        try:
            return self.clients[lane]
        except KeyError:
            raise APIError(502, f"the engine of lane {lane!r} stopped before the request reached it",
                           "engine_unavailable") from None

    # ------------------------------------------------------------------ lane control

    def load(self, lane: str) -> None:
        self._apply(self.scheduler.load(lane, self.clock()))

    def unload(self, lane: str) -> None:
        self._apply(self.scheduler.unload(lane, self.clock()))

    async def wait_lane(self, lane: str, states: set[LaneState]) -> LaneState:
        while (state := self.scheduler.state(lane)) not in states:
            await self._changed.wait()
        return state

    # ------------------------------------------------------------------ actions

    def _apply(self, actions) -> None:
        for action in actions:
            handler = getattr(self, f"_on_{type(action).__name__}")
            handler(action)
        self._wake.set()
        self._idle.set()

    def _on_Dispatch(self, action: Dispatch) -> None:
        ticket = self.tickets.get(action.request_id)
        if ticket is None or ticket.decided.done():
            self._apply(self.scheduler.finish(action.request_id, self.clock()))
            return
        ticket.dispatched_at = self.clock()
        self.metrics.queue_wait.labels(ticket.lane).observe(ticket.dispatched_at - ticket.arrived)
        self.metrics.inflight.labels(ticket.lane).inc()
        self.metrics.queue_depth.labels(ticket.lane).set(self.scheduler.queue_depth(ticket.lane))
        ticket.decided.set_result(action.lane)

    def _on_Reject(self, action: Reject) -> None:
        self.metrics.rejected.labels(action.lane, action.code).inc()
        self.metrics.queue_depth.labels(action.lane).set(self.scheduler.queue_depth(action.lane))
        ticket = self.tickets.pop(action.request_id, None)
        if ticket is not None and not ticket.decided.done():
            ticket.finished = True
            self.metrics.requests.labels(ticket.lane, str(action.status)).inc()
            ticket.decided.set_result(APIError(action.status, action.message, action.code,
                                               retry_after=action.retry_after))

    def _on_StartEngine(self, action: StartEngine) -> None:
        record = self.lane_records[action.lane]
        record.switch_began = record.switch_began or self.clock()
        self._starting[action.lane] = self._spawn(self._start_engine(action.lane, action.attempt))

    def _on_StopEngine(self, action: StopEngine) -> None:
        self._spawn(self._stop_engine(action.lane, action.reason))

    def _on_AbortInflight(self, action: AbortInflight) -> None:
        error = APIError(503, f"lane {action.lane!r} was switched out before this request finished "
                              f"({action.reason}, VLLM_DRAIN_TIMEOUT={self.config.server.drain_timeout:g} s)",
                         "drain_timeout")
        for request_id in action.request_ids:
            ticket = self.tickets.get(request_id)
            if ticket is not None:
                self._abort(ticket, error)

    def _abort(self, ticket: Ticket, error: APIError) -> None:
        if not ticket.aborted.done():
            ticket.aborted.set_result(error)
        if ticket.on_abort is not None:
            ticket.on_abort()

    def _on_LaneStateChanged(self, action: LaneStateChanged) -> None:
        log.info("lane %s: %s -> %s (%s)", action.lane, action.old, action.new, action.reason)
        self.metrics.set_state(action.lane, action.new.value)
        record = self.lane_records[action.lane]
        now = self.clock()
        if action.new == LaneState.DRAINING:
            record.drain_began = now
        elif action.new == LaneState.STOPPING and record.drain_began is not None:
            self.metrics.switch_phase.labels(action.lane, "drain").observe(now - record.drain_began)
            record.drain_began = None
        self._changed.set()
        self._changed = asyncio.Event()       # waiters hold the old one, now set
        for listener in self.state_listeners:
            listener(action.lane, action.new.value, action.reason)

    def _on_SwitchPlanned(self, action: SwitchPlanned) -> None:
        log.info("switch planned: %s -> %s (%s)", ",".join(action.from_lanes) or "-", action.to_lane, action.reason)
        for source in action.from_lanes or ("",):
            self.metrics.switches.labels(source, action.to_lane, action.reason).inc()
        self.lane_records[action.to_lane].switch_began = self.clock()

    # ------------------------------------------------------------------ engines

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _engine_log(self, lane: str, line: str) -> None:
        logging.getLogger(f"vllm_launcher.engine.{lane}").info("%s", line)

    async def _start_engine(self, lane: str, attempt: int) -> None:
        server = self.config.server
        key = secrets.token_urlsafe(32)       # per start: no other local user can reach the engine
        port = free_port()
        spec = build_engine_spec(self.config, lane, self.vllm, host="127.0.0.1", port=port, api_key=key)
        engine = EngineProcess(spec, self.config.lane(lane).served_model_name, port, key,
                               log_line=self._engine_log)
        self.metrics.engine_starts.labels(lane).inc()
        if attempt > 1:
            self.metrics.engine_restarts.labels(lane).inc()
        log.info("lane %s: starting engine (attempt %d) on 127.0.0.1:%d", lane, attempt, port)
        try:
            await engine.start()
            self.engines[lane] = engine
            if self.records:
                self.records.record(lane, engine.pgid)
            await engine.wait_ready(server.start_timeout)
        except (EngineStartError, OSError) as error:
            cause = error.cause() if isinstance(error, EngineStartError) else f"cannot start the engine: {error}"
            cause = mask_secrets(cause, self.secrets)      # the engine's output goes into errors
            log.error("lane %s: %s", lane, cause)
            await self._stop_process(lane, engine)
            self._starting.pop(lane, None)
            self.metrics.engine_failures.labels(lane).inc()
            self.lane_records[lane].last_error = cause
            if lane not in self._stopping:
                self._apply(self.scheduler.engine_start_failed(lane, self.clock(), cause))
            return
        except asyncio.CancelledError:
            await self._stop_process(lane, engine)
            self._starting.pop(lane, None)
            raise
        self._starting.pop(lane, None)
        self._record_start(lane, engine)
        self.clients[lane] = engine_client(base_url=engine.base_url, timeout=UPSTREAM_TIMEOUT,
                                           limits=UPSTREAM_LIMITS, headers={"Authorization": f"Bearer {key}"})
        self._spawn(self._watch_engine(lane, engine))
        self._apply(self.scheduler.engine_ready(lane, self.clock()))

    def _record_start(self, lane: str, engine: EngineProcess) -> None:
        record = self.lane_records[lane]
        spawn_to_listen = (engine.listening_at or engine.ready_at) - engine.started_at
        total = engine.ready_at - engine.started_at
        record.last_start_seconds = total
        record.last_start_phases = {"spawn_to_listening": round(spawn_to_listen, 3),
                                    "listening_to_ready": round(total - spawn_to_listen, 3)}
        self.metrics.switch_phase.labels(lane, "start").observe(total)
        switch_total = self.clock() - (record.switch_began or engine.started_at)
        record.last_switch_seconds = switch_total
        record.last_switch_at = time.time()
        record.switch_began = None
        self.scheduler.observe_switch_seconds(switch_total)
        log.info("lane %s: engine ready in %.1f s (spawn to listening %.1f s, to ready %.1f s); switch total %.1f s",
                 lane, total, spawn_to_listen, total - spawn_to_listen, switch_total)

    async def _watch_engine(self, lane: str, engine: EngineProcess) -> None:
        code = await engine.wait_exit()
        if lane in self._stopping or self.engines.get(lane) is not engine:
            return
        cause = f"engine for lane {lane!r} exited with status {code}"
        tail = mask_secrets("\n".join(engine.log_tail()[-8:]), self.secrets)
        log.error("lane %s: %s; last lines:\n%s", lane, cause, tail)
        self.lane_records[lane].last_error = cause
        await self._stop_process(lane, engine)     # its EngineCore may still be alive
        crashed = APIError(502, f"{cause} while serving this request", "engine_crashed")
        for ticket in [t for t in self.tickets.values() if t.lane == lane and t.dispatched_at is not None]:
            self._abort(ticket, crashed)
        self._apply(self.scheduler.engine_exited(lane, self.clock(), f"{cause}; last engine log lines:\n{tail}"))

    async def _stop_engine(self, lane: str, reason: str) -> None:
        self._stopping.add(lane)
        began = self.clock()
        try:
            starting = self._starting.pop(lane, None)
            if starting is not None:
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
            engine = self.engines.get(lane)
            if engine is not None:
                await self._stop_process(lane, engine)
            seconds = self.clock() - began
            self.metrics.switch_phase.labels(lane, "stop").observe(seconds)
            log.info("lane %s: engine stopped in %.1f s (%s)", lane, seconds, reason)
        finally:
            self._stopping.discard(lane)
            self._apply(self.scheduler.engine_stopped(lane, self.clock()))

    async def _stop_process(self, lane: str, engine: EngineProcess) -> None:
        client = self.clients.pop(lane, None)
        if client is not None:
            await client.aclose()           # vLLM waits for open client connections on SIGTERM
        if engine.process is not None:
            await engine.stop(self.config.server.stop_timeout)
            if self.records:
                self.records.forget(engine.pgid)
        if self.engines.get(lane) is engine:
            del self.engines[lane]
        self._idle.set()

    # ------------------------------------------------------------------ timer

    async def _run_timer(self) -> None:
        while True:
            self._wake.clear()
            deadline = self.scheduler.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            if deadline is not None and self.clock() >= deadline:
                self._apply(self.scheduler.tick(self.clock()))

    # ------------------------------------------------------------------ views

    def lane_states(self) -> dict[str, str]:
        return {lane: self.scheduler.state(lane).value for lane in self.config.lanes}

"""The router: the one place that turns events into the scheduler's decisions and carries the
decisions out: tickets, dispatch, lane control, the timer. Engines are the supervisors'
(engines/supervisor.py): the router asks them to start and stop, and they report back.

Everything runs on the event loop's thread and no scheduler call awaits, so each event and
the actions it yields are applied atomically; the policy itself is the pure Scheduler.
The HTTP app reads state only through the read API at the end of this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import tempfile
import time
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, assert_never, cast

from .config import VLLM_DEFAULT_SHARE, LaneConfig, LauncherConfig, scheduler_settings
from .engine_command import LaneLaunch, lane_launch
from .engines import Engine, EngineRecords, Supervisor
from .engines.watchdog import Watchdog, hung_cause
from .errors import APIError
from .memory_plan import memory_plan
from .metrics import Metrics
from .scheduler import (
    AbortInflight,
    Action,
    CloseReason,
    Dispatch,
    LanePolicy,
    LaneState,
    LaneStateChanged,
    Preempt,
    PreemptReason,
    Reject,
    Scheduler,
    SleepEngine,
    StartEngine,
    StopEngine,
    StopReason,
    SwitchPlanned,
    WakeEngine,
)
from .settings import ENGINE_SETTINGS_BY_KEY
from .vllm_info import VllmInfo

log = logging.getLogger("vllm_launcher.router")

IDLE_POLL = 0.5
GAUGE_EVERY = 0.25      # seconds between reads of a busy engine's vllm:num_requests_running / _waiting
_GAUGE = re.compile(r"^vllm:num_requests_(running|waiting)(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.MULTILINE)


@dataclass
class Ticket:
    """One admitted request, from arrival to its answer. `decided` resolves to the Engine the
    request was dispatched to, or to the APIError that refuses it."""
    id: int
    lane: str
    arrived: float
    decided: asyncio.Future[Engine | APIError] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    aborted: asyncio.Future[APIError] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    dispatched_at: float | None = None
    engine: Engine | None = None
    finished: bool = False
    on_abort: Callable[[], None] | None = None     # closes the upstream response of a stream
    requeued: bool = False                         # back in line (Preempt): `decided` is a new future


@dataclass
class SwitchRecord:
    """A lane's switch timing (drain of others + stop + start), for /lanes and Retry-After."""
    last_switch_at: float | None = None          # wall clock
    last_switch_seconds: float | None = None
    drain_began: float | None = None
    switch_began: float | None = None


@dataclass
class Lane:
    """One lane at run time: its slice of the configuration (its placement computed once), the
    supervisor of its engine, which gets that slice alone, and its switch timing."""
    launch: LaneLaunch
    supervisor: Supervisor
    switch: SwitchRecord = field(default_factory=SwitchRecord)

    @property
    def config(self) -> LaneConfig:
        return self.launch.lane


class Router:
    def __init__(self, config: LauncherConfig, vllm: VllmInfo, metrics: Metrics | None = None,
                 records: EngineRecords | None = None, clock: Callable[[], float] = time.monotonic,
                 sockets: Path | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.clock = clock
        policies = [lane_policy(lane, config) for lane in config.lanes.values()]
        self.scheduler = Scheduler(policies, scheduler_settings(config.server))
        sockets = sockets or Path(tempfile.mkdtemp(prefix="vllm-launcher-"))
        launches = [lane_launch(config, name) for name in config.lanes]
        self.lanes = {launch.lane.name: Lane(launch, Supervisor(launch, vllm, self.metrics, self, sockets, records))
                      for launch in launches}
        self.tickets: dict[Hashable, Ticket] = {}      # the scheduler's request ids: ours are ints
        self.state_listeners: list[Callable[[str, str, str], object]] = []    # what they return is ignored
        self.started_wall = time.time()
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._tick_at: float | None = None                  # the scheduler deadline the timer is set for
        self._tick_handle: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._changed = asyncio.Event()
        self._gauges: asyncio.Task[None] | None = None
        for lane in config.lanes:
            self.metrics.set_state(lane, LaneState.STOPPED.value)
            self._show_window(lane)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, preload: str | None) -> None:
        self._set_timer()
        self._gauges = asyncio.create_task(self._read_gauges())
        if preload:
            self._apply(self.scheduler.load(preload, self.clock()))

    def begin_shutdown(self) -> None:
        if not self.scheduler.shutting_down:
            log.info("shutting down: queued requests get 503, in-flight ones may finish (drain %.0f s)",
                     self.config.server.drain_timeout)
            self._apply(self.scheduler.shutdown(self.clock()))
            self._changed.set()                   # wake wait_lane()'s waiters: they answer now
            self._changed = asyncio.Event()

    async def close(self) -> None:
        """After shutdown: wait until every engine is stopped, bounded, then make sure of it."""
        self.begin_shutdown()
        server = self.config.server
        bound = 2 * server.drain_timeout + server.stop_timeout + server.start_timeout + 30
        try:
            await asyncio.wait_for(self._wait_idle(), bound)
        except TimeoutError:
            log.error("engines still running %.0f s after shutdown began; killing them", bound)
        for lane in self.lanes.values():
            if lane.supervisor.busy():
                await lane.supervisor.stop("shutdown")
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self._gauges is not None:
            self._gauges.cancel()
            self._gauges = None

    async def _wait_idle(self) -> None:
        while not (self.scheduler.is_idle() and not any(lane.supervisor.busy() for lane in self.lanes.values())):
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), IDLE_POLL)

    # ------------------------------------------------------------------ requests

    def admit(self, lane: str) -> Ticket:
        ticket = Ticket(next(self._ids), lane, self.clock())
        self.tickets[ticket.id] = ticket
        self._apply(self.scheduler.submit(ticket.id, lane, ticket.arrived))
        self.metrics.lane(lane).queue_depth.set(self.scheduler.queue_depth(lane))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client left while queued (or before its answer was sent)."""
        if not ticket.decided.done():
            ticket.decided.cancel()
            self._apply(self.scheduler.cancel(ticket.id, self.clock()))
            self.tickets.pop(ticket.id, None)
            self.metrics.lane(ticket.lane).queue_depth.set(self.scheduler.queue_depth(ticket.lane))

    def finish(self, ticket: Ticket, status: int) -> None:
        if ticket.finished:
            return
        ticket.finished = True
        self.tickets.pop(ticket.id, None)
        lane_metrics = self.metrics.lane(ticket.lane)
        lane_metrics.answered(status).inc()
        if ticket.dispatched_at is not None:
            lane_metrics.inflight.dec()
            self._apply(self.scheduler.finish(ticket.id, self.clock()))

    def output_started(self, ticket: Ticket) -> None:
        """Some of the engine's output is about to reach the client: the request can no longer go
        back in line. Call it synchronously right before that output is sent."""
        if ticket.dispatched_at is not None:
            self._apply(self.scheduler.output_started(ticket.id, self.clock()))

    def preempt(self, lane: str, reason: PreemptReason = "stalled") -> None:
        """The lane's engine stalled (the watchdog): its unanswered requests go back in line (at
        most once; a request back in line before fails, a started stream is cut) and the engine
        is stopped; it loads again for its queue."""
        self._apply(self.scheduler.preempt(lane, self.clock(), reason))

    # ------------------------------------------------------------------ lane control

    def load(self, lane: str) -> None:
        self._apply(self.scheduler.load(lane, self.clock()))

    def unload(self, lane: str) -> None:
        self._apply(self.scheduler.unload(lane, self.clock()))

    async def wait_lane(self, lane: str, states: set[LaneState]) -> LaneState:
        """The lane's state once it is one of STATES, or whatever it is when shutdown begins: a
        waiting `POST /lanes/L/load` must not hold the server's exit (uvicorn waits for it)."""
        while (state := self.scheduler.state(lane)) not in states and not self.scheduler.shutting_down:
            await self._changed.wait()
        return state

    # ------------------------------------------------------------------ actions

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Dispatch():
                    self._dispatch(action)
                case Reject():
                    self._reject(action)
                case StartEngine(lane=lane, attempt=attempt, sleep_mode=sleep_mode):
                    self._switch_begins(lane)
                    self.lanes[lane].supervisor.start(attempt, sleep_mode=sleep_mode)
                case StopEngine(lane=lane, reason=reason):
                    self._spawn(self._stop_engine(lane, reason))
                case SleepEngine(lane=lane, level=level, reason=reason):
                    self._spawn(self._sleep_engine(lane, level, reason))
                case WakeEngine(lane=lane):
                    self._switch_begins(lane)
                    self._spawn(self._wake_engine(lane))
                case AbortInflight():
                    self._abort_inflight(action)
                case Preempt():
                    self._preempt(action)
                case LaneStateChanged():
                    self._lane_state_changed(action)
                case SwitchPlanned():
                    self._switch_planned(action)
                case _:
                    assert_never(action)
        self._set_timer()
        self._idle.set()

    def _dispatch(self, action: Dispatch) -> None:
        ticket = self.tickets.get(action.request_id)
        if ticket is None or ticket.decided.done():
            self._apply(self.scheduler.finish(action.request_id, self.clock()))
            return
        ticket.dispatched_at = self.clock()
        # the scheduler dispatches only to a ready lane, whose supervisor holds its engine
        ticket.engine = engine = cast(Engine, self.lanes[action.lane].supervisor.engine)
        lane_metrics = self.metrics.lane(ticket.lane)
        lane_metrics.queue_wait.observe(ticket.dispatched_at - ticket.arrived)
        lane_metrics.inflight.inc()
        lane_metrics.queue_depth.set(self.scheduler.queue_depth(ticket.lane))
        ticket.decided.set_result(engine)

    def _reject(self, action: Reject) -> None:
        self.metrics.rejected.labels(action.lane, action.code).inc()
        self.metrics.lane(action.lane).queue_depth.set(self.scheduler.queue_depth(action.lane))
        ticket = self.tickets.pop(action.request_id, None)
        if ticket is not None and not ticket.decided.done():
            ticket.finished = True
            self.metrics.lane(ticket.lane).answered(action.status).inc()
            ticket.decided.set_result(APIError(action.status, action.message, action.code,
                                               retry_after=action.retry_after))

    def _switch_begins(self, lane: str) -> None:
        """A start or wake: the lane's switch begins now, unless it began earlier (planned, or a retry)."""
        record = self.lanes[lane].switch
        record.switch_began = record.switch_began or self.clock()

    def _abort_inflight(self, action: AbortInflight) -> None:
        error = self._abort_error(action)
        for request_id in action.request_ids:
            ticket = self.tickets.get(request_id)
            if ticket is not None:
                self._abort(ticket, error)

    def _abort_error(self, action: AbortInflight) -> APIError:
        drain = self.config.server.drain_timeout
        match action.reason:
            case "drain_timeout" if self.scheduler.shutting_down:
                return APIError(503, f"the server is shutting down: this stream was cut at the drain bound ({drain:g} s, "
                                     "VLLM_DRAIN_TIMEOUT); retry when it is back", "shutting_down")
            case "drain_timeout":
                return APIError(503, f"lane {action.lane!r} was switched out: this stream had already sent output "
                                     f"and was cut at twice the drain bound ({2 * drain:g} s, VLLM_DRAIN_TIMEOUT="
                                     f"{drain:g} s); retry, or raise VLLM_DRAIN_TIMEOUT", "drain_timeout")
            case "hung_twice":
                return APIError(503, f"this request went back in line once and held lane {action.lane!r} again: "
                                     f"past the drain bound (twice {drain:g} s, VLLM_DRAIN_TIMEOUT) while other "
                                     f"lanes waited, or on an engine that hung ({self.lanes[action.lane].supervisor.last_error}"
                                     "); it is not sent a third time: ask for fewer tokens, or raise "
                                     "VLLM_DRAIN_TIMEOUT", "hung_twice")
            case "stalled":
                return APIError(503, f"the engine of lane {action.lane!r} hung after this stream had begun: "
                                     f"{self.lanes[action.lane].supervisor.last_error}", "engine_hung")
            case _:
                assert_never(action.reason)

    def _preempt(self, action: Preempt) -> None:
        """Back in line: cancel each request upstream (the proxy closes its connection and waits
        again) and give its ticket a new `decided`."""
        self.metrics.preempted.labels(action.lane, action.reason).inc(len(action.request_ids))
        lane_metrics = self.metrics.lane(action.lane)
        lane_metrics.queue_depth.set(self.scheduler.queue_depth(action.lane))
        for request_id in action.request_ids:
            ticket = self.tickets.get(request_id)
            if ticket is None or ticket.dispatched_at is None:
                continue
            lane_metrics.inflight.dec()
            ticket.dispatched_at = ticket.engine = None
            ticket.requeued = True
            ticket.decided = asyncio.get_running_loop().create_future()
            if ticket.on_abort is not None:
                ticket.on_abort()

    def _abort(self, ticket: Ticket, error: APIError) -> None:
        if not ticket.aborted.done():
            ticket.aborted.set_result(error)
        if ticket.on_abort is not None:
            ticket.on_abort()

    def _lane_state_changed(self, action: LaneStateChanged) -> None:
        log.info("lane %s: %s -> %s (%s)", action.lane, action.old, action.new, action.reason)
        self.metrics.set_state(action.lane, action.new.value)
        record = self.lanes[action.lane].switch
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

    def _switch_planned(self, action: SwitchPlanned) -> None:
        log.info("switch planned: %s -> %s (%s)", ",".join(action.from_lanes) or "-", action.to_lane, action.reason)
        for source in action.from_lanes or ("",):
            self.metrics.switches.labels(source, action.to_lane, action.reason).inc()
        self.lanes[action.to_lane].switch.switch_began = self.clock()

    # ------------------------------------------------------------------ engines

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _stop_engine(self, lane: str, reason: StopReason) -> None:
        try:
            await self.lanes[lane].supervisor.stop(reason)
        finally:
            self._apply(self.scheduler.engine_stopped(lane, self.clock()))

    async def _sleep_engine(self, lane: str, level: int, reason: CloseReason) -> None:
        log.info("lane %s: putting the engine to sleep (level %d, %s)", lane, level, reason)
        try:
            seconds = await self.lanes[lane].supervisor.sleep(level)
        except Exception as error:              # noqa: BLE001 - any failure falls back to stop/start
            cause = str(error) or type(error).__name__
            log.warning("lane %s: sleep failed, the lane falls back to stop/start: %s", lane, cause)
            self._apply(self.scheduler.sleep_failed(lane, self.clock(), cause))
            return
        self.scheduler.observe_engine_seconds(lane, "sleep", seconds)
        self._apply(self.scheduler.engine_slept(lane, self.clock()))

    async def _wake_engine(self, lane: str) -> None:
        log.info("lane %s: waking the engine", lane)
        try:
            seconds = await self.lanes[lane].supervisor.wake()
        except Exception as error:              # noqa: BLE001 - any failure falls back to a cold start
            cause = str(error) or type(error).__name__
            log.warning("lane %s: wake failed, the lane falls back to a cold start: %s", lane, cause)
            self._apply(self.scheduler.wake_failed(lane, self.clock(), cause))
            return
        self.scheduler.observe_engine_seconds(lane, "wake", seconds)
        record = self.lanes[lane].switch
        switch_total = self.clock() - (record.switch_began or self.clock())
        record.last_switch_seconds, record.last_switch_at, record.switch_began = switch_total, time.time(), None
        self._apply(self.scheduler.engine_woke(lane, self.clock()))

    # The supervisors' reports (engines.Reports).

    def engine_ready(self, engine: Engine) -> None:
        lane = engine.lane
        record = self.lanes[lane].switch
        started_at = self.lanes[lane].supervisor.timings.started_at
        switch_total = self.clock() - (record.switch_began or started_at or self.clock())
        record.last_switch_seconds = switch_total
        record.last_switch_at = time.time()
        record.switch_began = None
        self.scheduler.observe_switch_seconds(switch_total)
        log.info("lane %s: switch total %.1f s", lane, switch_total)
        self._apply(self.scheduler.engine_ready(lane, self.clock()))
        self._watch_for_stalls(engine)

    def engine_start_failed(self, lane: str, cause: str, counts: bool) -> None:
        if self.lanes[lane].supervisor.sleep_mode and refused_sleep_mode(cause):
            # vLLM refuses --enable-sleep-mode on this platform (the CPU build does): sleep mode
            # is off for the lane, and its next start is a plain one, not counted as a failure.
            log.warning("lane %s: the engine refused sleep mode; the lane falls back to stop/start", lane)
            said = next(line.strip() for line in cause.splitlines() if refused_sleep_mode(line))
            said = re.sub(r"\s*\[type=value_error.*$", "", said)      # pydantic's input dump (vLLM 0.32)
            self._apply(self.scheduler.sleep_failed(lane, self.clock(), f"engine refused sleep mode: {said}"))
            counts = False
        self._apply(self.scheduler.engine_start_failed(lane, self.clock(), cause, counts=counts))

    def engine_exited(self, engine: Engine, cause: str) -> None:
        """The scheduler first (the lane is no longer ready), then every request in flight on
        this engine ends in the crash's error; the supervisor closes the pool afterwards."""
        self._apply(self.scheduler.engine_exited(engine.lane, self.clock(),
                                                 self.lanes[engine.lane].supervisor.last_error or cause))
        crashed = APIError(502, f"{cause} while serving this request", "engine_crashed")
        for ticket in [t for t in self.tickets.values() if t.engine is engine]:
            self._abort(ticket, crashed)

    # ------------------------------------------------------------------ stalled engines

    def _watch_for_stalls(self, engine: Engine) -> None:
        """The engine's stall watchdog (engines/watchdog.py), until the engine ends or hangs."""
        lane = engine.lane
        config = self.lanes[lane].config
        stall = config.settings.get("ENGINE_STALL_TIMEOUT") or ENGINE_SETTINGS_BY_KEY["ENGINE_STALL_TIMEOUT"].default
        watchdog = Watchdog(engine, config.served_model_name, stall,
                            lambda: self.scheduler.inflight(lane),
                            lambda stalled, probe: self._engine_hung(engine, stalled, probe))
        self._spawn(watchdog.run())

    def _engine_hung(self, engine: Engine, stalled: float, probe: str) -> None:
        """The watchdog declared the engine hung: logged, counted, the lane's error says so (and
        suspects the GPU when it hangs again at once); the scheduler applies the preemption rule
        to its requests and stops it (SIGTERM, then SIGKILL); the lane restarts with back-off."""
        lane = engine.lane
        supervisor = self.lanes[lane].supervisor
        if supervisor.engine is not engine or engine.ended is not None:
            return
        now = self.clock()
        cause = hung_cause(lane, stalled, probe, self.scheduler.hung_again(lane, now))
        log.error("lane %s: %s", lane, cause)
        self.metrics.engine_hangs.labels(lane).inc()
        supervisor.last_error = cause
        engine.ended = cause
        self._apply(self.scheduler.engine_hung(lane, now, cause))

    # ------------------------------------------------------------------ the engines' gauges

    async def _read_gauges(self) -> None:
        """Every GAUGE_EVERY, each lane with requests in its engine and a dispatch limit reports
        its engine's vllm:num_requests_running and _waiting (the engine's /metrics) to the
        scheduler, which holds back while the engine queues internally."""
        while True:
            await asyncio.sleep(GAUGE_EVERY)
            for lane, runtime in self.lanes.items():
                supervisor = runtime.supervisor
                engine = supervisor.engine
                if engine is None or not self.scheduler.inflight(lane) or not self.scheduler.window(lane):
                    continue
                try:
                    text = (await engine.get("/metrics", timeout=GAUGE_EVERY * 4)).text
                except Exception:                   # noqa: BLE001 - no reading this time; the crash path reports
                    continue
                counts = {"running": 0.0, "waiting": 0.0}
                for kind, value in _GAUGE.findall(text):
                    counts[kind] += float(value)
                if supervisor.engine is engine:
                    self._apply(self.scheduler.engine_load(lane, self.clock(), int(counts["running"]),
                                                           int(counts["waiting"])))
                    self._show_window(lane)

    def _show_window(self, lane: str) -> None:
        window = self.scheduler.window(lane)
        if window is not None:
            self.metrics.dispatch_window.labels(lane).set(window)

    # ------------------------------------------------------------------ timer

    def _set_timer(self) -> None:
        """One loop timer for the scheduler's next deadline, moved only when that changes (no
        task, no wake-up per request)."""
        deadline = self.scheduler.next_deadline()
        if deadline == self._tick_at:
            return
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        self._tick_at = deadline
        if deadline is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:                    # not serving (a test driving the router by hand)
                self._tick_at = None
                return
            self._tick_handle = loop.call_later(max(0.0, deadline - self.clock()), self._tick)

    def _tick(self) -> None:
        self._tick_handle = self._tick_at = None
        self._apply(self.scheduler.tick(self.clock()))     # sets the timer again (early: at once)

    # ------------------------------------------------------------------ read API (the HTTP app's)

    @property
    def shutting_down(self) -> bool:
        return self.scheduler.shutting_down

    def lane_state(self, lane: str) -> LaneState:
        return self.scheduler.state(lane)

    def lane_states(self) -> dict[str, str]:
        return {lane: self.scheduler.state(lane).value for lane in self.config.lanes}

    def ever_started(self) -> bool:
        """Some engine became ready once: a lane not ready now is switching, not starting."""
        return any(lane.supervisor.timings.start_seconds is not None for lane in self.lanes.values())

    def last_error(self, lane: str) -> str | None:
        return self.lanes[lane].supervisor.last_error

    def lane_progress(self, lane: str) -> str | None:
        """What a starting lane waits for before its engine, e.g. "waiting for cluster (1/2 nodes)"."""
        return self.lanes[lane].supervisor.progress

    def cluster_unavailable(self, lane: str, cause: str) -> None:
        """A supervisor's report (engines.Reports): a multi-node lane's cluster lacked what it
        needs until the start timeout. Not a crash loop; the requests waiting for it end (503)."""
        self._apply(self.scheduler.engine_start_failed(lane, self.clock(), cause, counts=False, reject_queued=True))

    def serving_engines(self) -> list[tuple[Engine, LaneState]]:
        """Engines that answer requests now (their lane ready or draining), with the lane state."""
        found: list[tuple[Engine, LaneState]] = []
        for name, lane in self.lanes.items():
            state = self.scheduler.state(name)
            engine = lane.supervisor.engine
            if engine is not None and state in (LaneState.READY, LaneState.DRAINING):
                found.append((engine, state))
        return found

    def lane_status(self, lane: str) -> dict[str, Any]:
        """What /lanes reports of a lane's scheduling and engine."""
        snapshot = self.scheduler.snapshot()["lanes"].get(lane, {})
        supervisor, record = self.lanes[lane].supervisor, self.lanes[lane].switch
        timings = supervisor.timings
        return {
            "state": self.scheduler.state(lane).value, "queue_depth": self.scheduler.queue_depth(lane),
            "inflight": self.scheduler.inflight(lane), "restarts": snapshot.get("restarts", 0),
            "failures": snapshot.get("failures", 0), "last_error": supervisor.last_error,
            "retry_at": self._wall(snapshot.get("retry_at")),     # back-off, or a failed lane's cool-off
            "progress": supervisor.progress,
            "last_start_seconds": timings.start_seconds, "last_start_phases": timings.start_phases,
            "last_stop_seconds": timings.stop_seconds, "last_switch_at": record.last_switch_at,
            "last_switch_seconds": record.last_switch_seconds,
            "sleep": self.sleep_status(lane), "last_wake_seconds": timings.wake_seconds,
            "last_sleep_seconds": timings.sleep_seconds,
            "max_inflight": snapshot.get("max_inflight"), "dispatch_window": snapshot.get("window"),
            "preempted": snapshot.get("preemptions", 0),
        }

    def _wall(self, monotonic: float | None) -> float | None:
        """A scheduler time as wall-clock seconds (as last_switch_at)."""
        return None if monotonic is None else time.time() + monotonic - self.clock()

    def sleep_status(self, lane: str) -> str:
        """`off`, `level N`, or `off (<why it fell back>)`."""
        level = self.lanes[lane].config.settings.get("SLEEP_LEVEL", 0)
        if not level:
            return "off"
        off = self.scheduler.sleep_off(lane)
        return f"off ({_first_line(off)})" if off else f"level {level}"


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= limit else line[:limit] + "..."


_SLEEP_REFUSED = re.compile(r"sleep mode[^\n]*not supported|cumem allocator is not supported", re.IGNORECASE)


def refused_sleep_mode(cause: str) -> bool:
    """An engine's start failure that says it cannot run with --enable-sleep-mode (vLLM:
    "Sleep mode is not supported on current platform.", or its cumem allocator's "... is not
    supported"); not any line that merely mentions sleep mode."""
    return bool(_SLEEP_REFUSED.search(cause))


def lane_policy(lane: LaneConfig, config: LauncherConfig) -> LanePolicy:
    """The lane's scheduling policy; a sleep lane's sleep_share from the memory plan: level 1
    keeps its weights in host memory, which on a unified-memory APU is the same memory, so it
    counts weights_bytes / device bytes (its whole share when either is unknown); level 2 counts
    its process overhead, VLLM_SLEEP_OVERHEAD_GB (0 when the device size is unknown)."""
    share = lane.gpu_memory_utilization or VLLM_DEFAULT_SHARE
    level = lane.settings.get("SLEEP_LEVEL", 0) or 0
    sleep_share = 0.0
    if level:
        plan = memory_plan(lane, config.server.gpu_memory_gb)
        device = plan.get("device_bytes")
        if level == 1:
            weights = plan.get("weights_bytes")
            sleep_share = weights / device if (weights and device) else share
        elif device:
            sleep_share = config.server.sleep_overhead_gb * 1e9 / device
    return LanePolicy(lane.name, share, lane.idle_timeout, sleep_level=level,
                      sleep_share=min(max(sleep_share, 0.0), share), max_inflight=lane.settings.get("MAX_NUM_SEQS"))

"""Discrete-event simulation of lane switching over the real :class:`Scheduler`.

Simulated time, no threads, deterministic: the same inputs give the same result
(:func:`random_workload` makes inputs from a seed).  The simulator plays the
part of the I/O layer: it feeds arrivals to a policy, carries out the actions
(engines become ready after their start time, requests finish after their
service time, stopped engines report after the stop time) and records what
happened to every request and lane.

Besides the real scheduler (``policy="scheduler"``) any object with the same
event methods can be simulated (``policy=<factory>``): the benchmark's baselines
(fcfs, llama-swap's rule, today's hold rule) live in bench/baselines.py.

A policy may put a request back in line (``Preempt``): its service is lost and it is dispatched
again later (``RequestRecord.preempted``, ``dispatches``).  With ``streams`` those requests'
output reaches their client when their service starts (``policy.output_started``); with
``gauges`` the engines report their running and waiting counts (``policy.engine_load``) after
every event; ``stalls`` (time, lane) call ``policy.preempt(lane, now, "stalled")`` on a ready
engine, as the stalled-engine watchdog does.

Engines: with ``batch_size`` an engine serves at most that many requests at once;
dispatched requests beyond it wait in the engine's own FIFO (as vLLM's scheduler
queues beyond ``max_num_seqs``), so a request's service starts at ``start`` >=
``dispatch``.  Without it (the default) every dispatched request is served at once.
Switch costs are per lane (``start_seconds`` / ``stop_seconds`` take a mapping or a
function); a policy that puts an engine to sleep instead of stopping it (``SleepEngine`` /
``WakeEngine``, if the policy emits them) is answered after ``sleep_seconds`` /
``wake_seconds`` (see :func:`simulate`).

Clients: besides open-loop ``arrivals`` (fixed times), closed-loop ``clients``
(:class:`Client`) send their next request only after the previous one ended plus a
think time, as an agent loop or a client with fixed concurrency does.
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from vllm_launcher.scheduler import (
    AbortInflight,
    Action,
    Dispatch,
    LanePolicy,
    LaneStateChanged,
    Preempt,
    Reject,
    Scheduler,
    SchedulerSettings,
    SleepEngine,
    StartEngine,
    StopEngine,
    SwitchPlanned,
    WakeEngine,
)

Seconds = float | Mapping[str, float] | Callable[[str], float]


# ----------------------------------------------------------------- results


@dataclass
class RequestRecord:
    request_id: Hashable
    lane: str
    arrival: float
    service: float
    dispatch: float | None = None
    finish: float | None = None
    reject: float | None = None
    reject_code: str | None = None
    retry_after: float | None = None
    outcome: str = "pending"  # finished, rejected, aborted, lost, cancelled, pending
    previous_lane: str | None = None  # lane of the request dispatched just before
    start: float | None = None  # service began (== dispatch unless the engine's batch was full)
    client: str | None = None  # closed-loop client that sent it
    task: Hashable = None  # the client's task (e.g. one agent loop iteration) it belongs to
    preempted: list[float] = field(default_factory=list)  # when it went back in line (Preempt)
    dispatches: list[float] = field(default_factory=list)  # every Dispatch of it
    abort_reason: str | None = None
    attempt: int = 0  # bumped by every dispatch: a finish of an earlier attempt is void

    def waits(self) -> list[tuple[float, float]]:
        """Its waits for a dispatch: (arrival or preemption, dispatch)."""
        # back in line and not yet dispatched again: that wait has no end yet
        return list(zip([self.arrival, *self.preempted], self.dispatches, strict=False))

    @property
    def wait(self) -> float | None:
        """Queue wait: arrival to dispatch (None if never dispatched)."""
        return None if self.dispatch is None else self.dispatch - self.arrival

    @property
    def service_wait(self) -> float | None:
        """What the user feels: arrival to the start of service (the engine's batch queue included)."""
        return None if self.start is None else self.start - self.arrival


@dataclass
class Client:
    """A closed-loop client: its first request arrives at ``start``; each later one ``think``
    seconds after the previous one ended (finished, rejected, aborted or lost).  ``steps``
    yields (lane, service_seconds, think_seconds) or (lane, service, think, task); it may be
    an endless generator when ``simulate(clients_until=...)`` ends the run."""
    name: str
    start: float
    steps: Iterable[tuple]


@dataclass
class SimResult:
    requests: dict[Hashable, RequestRecord]
    timeline: list[tuple[float, str, str, str, str]]  # (time, lane, old, new, reason)
    switches: list[tuple[float, tuple[str, ...], str, str]]  # SwitchPlanned: (time, from, to, reason)
    starts: list[tuple[float, str, int]]  # StartEngine: (time, lane, attempt)
    ready: list[tuple[float, str]]  # engine ready: (time, lane)
    end_time: float
    policy: object = None  # the policy object, in its final state
    failed_loads: list[tuple[float, str]] = field(default_factory=list)  # start or wake failed: (time, lane)
    peak_inflight: dict[str, int] = field(default_factory=dict)  # most requests dispatched to a lane's engine at once

    def not_ready_seconds(self, lane: str, start: float, end: float) -> float:
        """How long, within (start, end], the lane was not READY (its requests waited for a load)."""
        return self._not_ready_until(lane, end) - self._not_ready_until(lane, start)

    def _not_ready_until(self, lane: str, t: float) -> float:
        """Time the lane spent not READY in [0, t] (prefix sums over its state changes, built once)."""
        cache = self.__dict__.setdefault("_not_ready", {})
        if lane not in cache:
            times, totals, ready = [0.0], [0.0], [False]
            for time, name, _old, new, _reason in self.timeline:
                if name == lane:
                    totals.append(totals[-1] + (0.0 if ready[-1] else time - times[-1]))
                    times.append(time)
                    ready.append(new == "ready")
            cache[lane] = (times, totals, ready)
        times, totals, ready = cache[lane]
        i = bisect.bisect_right(times, t) - 1
        return totals[i] + (0.0 if ready[i] else t - times[i])

    @property
    def switch_count(self) -> int:
        """Engine loads that completed (cold start included)."""
        return len(self.ready)

    @property
    def switching_seconds(self) -> float:
        """Time during which some lane was starting, draining or stopping."""
        busy = {"starting", "draining", "stopping"}
        states: dict[str, str] = {}
        total = 0.0
        since: float | None = None
        for time, lane, _old, new, _reason in self.timeline:
            states[lane] = new
            switching = any(s in busy for s in states.values())
            if switching and since is None:
                since = time
            elif not switching and since is not None:
                total += time - since
                since = None
        if since is not None:
            total += self.end_time - since
        return total

    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rec in self.requests.values():
            counts[rec.outcome] = counts.get(rec.outcome, 0) + 1
        return counts

    def readies_between(self, start: float, end: float) -> int:
        """Engine-ready events in the interval (start, end]."""
        times = self._ready_times()
        return bisect.bisect_right(times, end) - bisect.bisect_right(times, start)

    def load_outcomes_between(self, start: float, end: float) -> int:
        """Loads that ended in the interval (start, end]: ready or woken, or failed."""
        return self.readies_between(start, end) + sum(1 for t, _ in self.failed_loads if start < t <= end)

    def _ready_times(self) -> list[float]:
        if len(getattr(self, "_times", ())) != len(self.ready):
            self._times = [t for t, _ in self.ready]  # ready events come in time order
        return self._times


# ----------------------------------------------------------------- policies


def make_policy(policy: str | Callable, lanes: Sequence[LanePolicy], settings: SchedulerSettings | None = None):
    """The policy object: ``"scheduler"`` (the real Scheduler) or a factory with the Scheduler's
    constructor signature, such as the benchmark's baselines (bench/baselines.py)."""
    if callable(policy):
        return policy(lanes, settings)
    if policy != "scheduler":
        raise ValueError(f"unknown policy {policy!r}: 'scheduler', or a policy factory (bench/baselines.py has "
                         "fcfs and llama_swap)")
    return Scheduler(lanes, settings)


# ----------------------------------------------------------------- simulation


def _seconds(value: Seconds, lane: str) -> float:
    if callable(value):
        return float(value(lane))
    if isinstance(value, Mapping):
        return float(value[lane])
    return float(value)


# event kind -> (the policy's method, the injected failure it reports, if it is one)
_REPORTS = {
    "ready": ("engine_ready", None),
    "start_failed": ("engine_start_failed", "start failure"),
    "stopped": ("engine_stopped", None),
    "slept": ("engine_slept", None),
    "sleep_failed": ("sleep_failed", "sleep failure"),
    "woke": ("engine_woke", None),
    "wake_failed": ("wake_failed", "wake failure"),
}


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    data: tuple = field(compare=False, default=())


def simulate(
    lanes: Sequence[LanePolicy],
    arrivals: Iterable[tuple[float, Hashable, str, float]],
    *,
    settings: SchedulerSettings | None = None,
    start_seconds: Seconds = 60.0,
    stop_seconds: Seconds = 5.0,
    start_failures: Mapping[str, int] | Callable[[str, int], bool] | None = None,
    start_fail_seconds: float = 1.0,
    crashes: Iterable[tuple[float, str]] = (),
    cancels: Iterable[tuple[float, Hashable]] = (),
    policy: str | Callable = "scheduler",
    max_time: float = 1e9,
    check: bool = False,
    batch_size: int | Mapping[str, int] | None = None,
    clients: Iterable[Client] = (),
    clients_until: float = float("inf"),
    sleep_seconds: Seconds = 1.0,
    wake_seconds: Seconds = 2.0,
    sleep_failures: Callable[[str, int], bool] | None = None,
    wake_failures: Callable[[str, int], bool] | None = None,
    streams: Iterable[Hashable] = (),
    gauges: bool = False,
    stalls: Iterable[tuple[float, str]] = (),
) -> SimResult:
    """Run the simulation; see the module docstring.

    ``arrivals``: (time, request_id, lane, service_seconds).  ``start_failures``:
    per lane, how many of its first starts fail, or a function (lane, n-th start
    of that lane, from 1) -> bool.  A failed start is reported after
    ``start_fail_seconds``.  ``crashes``: (time, lane) at which a ready or
    draining engine dies.  ``cancels``: (time, request_id) at which a client
    leaves (only effective while the request is queued).  With ``check`` the
    scheduler's internal invariants are checked after every event.

    ``batch_size``: requests an engine serves at once (per lane with a mapping; None:
    unlimited); the rest wait in the engine's FIFO.  ``clients``: closed-loop clients
    (:class:`Client`); none sends a request at or after ``clients_until``.  A
    ``SleepEngine`` action is reported to ``policy.engine_slept(lane, now)`` after
    ``sleep_seconds`` (or, when ``sleep_failures(lane, n-th sleep)`` is true, to
    ``policy.sleep_failed(lane, now, cause)`` after ``start_fail_seconds``); a
    ``WakeEngine`` action to ``policy.engine_woke`` after ``wake_seconds`` (a ready event,
    counted in ``SimResult.ready``), or when ``wake_failures(lane, n-th wake)`` is true to
    ``policy.wake_failed(lane, now, cause)`` after ``start_fail_seconds``.
    """
    pol = make_policy(policy, lanes, settings)
    records: dict[Hashable, RequestRecord] = {}
    timeline: list[tuple[float, str, str, str, str]] = []
    switches: list[tuple[float, tuple[str, ...], str, str]] = []
    starts: list[tuple[float, str, int]] = []
    ready: list[tuple[float, str]] = []
    failed_loads: list[tuple[float, str]] = []
    heap: list[_Event] = []
    seq = 0

    def push(time: float, kind: str, *data) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, _Event(time, seq, kind, data))

    for time, request_id, lane, service in sorted(arrivals, key=lambda a: a[0]):
        if request_id in records:
            raise ValueError(f"duplicate request id {request_id!r}")
        records[request_id] = RequestRecord(request_id, lane, time, service)
        push(time, "arrival", request_id)
    for time, lane in crashes:
        push(time, "crash", lane)
    for time, lane in stalls:
        push(time, "stall", lane)
    # policies without these events (the baselines) are not told
    streams = frozenset(streams) if hasattr(pol, "output_started") else frozenset()
    gauges = gauges and hasattr(pol, "engine_load")
    for time, request_id in cancels:
        push(time, "cancel", request_id)
    client_steps: dict[str, Iterator] = {}
    client_count: dict[str, int] = {}

    def client_next(name: str, when: float) -> None:
        """Queue the client's next request at ``when`` (if it has one before clients_until)."""
        if when >= clients_until:
            return
        step = next(client_steps[name], None)
        if step is None:
            return
        lane, service, think = step[0], step[1], step[2]
        when += think if client_count[name] else 0.0
        if when >= clients_until:
            return
        request_id = f"{name}-{client_count[name]}"
        client_count[name] += 1
        if request_id in records:
            raise ValueError(f"duplicate request id {request_id!r}")
        records[request_id] = RequestRecord(request_id, lane, when, service, client=name,
                                            task=step[3] if len(step) > 3 else None)
        push(when, "arrival", request_id)

    for client in clients:
        if client.name in client_steps:
            raise ValueError(f"duplicate client {client.name!r}")
        client_steps[client.name] = iter(client.steps)
        client_count[client.name] = 0
        client_next(client.name, client.start)

    def ended(rec: RequestRecord) -> None:
        if rec.client is not None:
            client_next(rec.client, now)

    generation = {p.name: 0 for p in lanes}  # bumped on every start and stop
    engine_up = {p.name: False for p in lanes}  # a ready engine is running
    start_count = {p.name: 0 for p in lanes}
    running: dict[str, set[Hashable]] = {p.name: set() for p in lanes}  # dispatched, not ended
    serving: dict[str, set[Hashable]] = {p.name: set() for p in lanes}  # in the engine's batch
    engine_queue: dict[str, deque] = {p.name: deque() for p in lanes}  # dispatched, batch full
    wake_count = {p.name: 0 for p in lanes}
    sleep_count = {p.name: 0 for p in lanes}

    def capacity(lane: str) -> float:
        if batch_size is None:
            return float("inf")
        return float(batch_size[lane] if isinstance(batch_size, Mapping) else batch_size)

    def serve(lane: str, request_id: Hashable) -> None:
        rec = records[request_id]
        rec.start = now
        serving[lane].add(request_id)
        push(now + rec.service, "finish", request_id, lane, rec.attempt)
        if request_id in streams:
            pol.output_started(request_id, now)

    def fill(lane: str) -> None:
        queue = engine_queue[lane]
        while queue and len(serving[lane]) < capacity(lane):
            request_id = queue.popleft()
            if request_id in running[lane]:
                serve(lane, request_id)

    def drop(lane: str, request_id: Hashable) -> None:
        running[lane].discard(request_id)
        serving[lane].discard(request_id)
    peak: dict[str, int] = {}

    def lanes_up() -> list[str]:
        return [name for name, up in engine_up.items() if up and running[name]]

    last_dispatched_lane: str | None = None
    scheduled_ticks: set[float] = set()
    now = 0.0

    def fails(lane: str) -> bool:
        if start_failures is None:
            return False
        if callable(start_failures):
            return bool(start_failures(lane, start_count[lane]))
        return start_count[lane] <= start_failures.get(lane, 0)

    def decide(action: Dispatch | Reject) -> RequestRecord:
        """The record of a request the policy dispatches or rejects: once, and for its own lane."""
        rec = records[action.request_id]
        if rec.outcome != "preempted" and (rec.dispatch is not None or rec.reject is not None
                                           or rec.outcome == "cancelled"):
            raise AssertionError(f"request {action.request_id!r} decided twice: {action}")
        if action.lane != rec.lane:
            raise AssertionError(f"request {action.request_id!r} routed to {action.lane}")
        return rec

    def play(actions: list[Action]) -> None:
        nonlocal last_dispatched_lane
        for action in actions:
            match action:
                case Dispatch(request_id=request_id, lane=lane):
                    rec = decide(action)
                    rec.dispatch = now
                    rec.dispatches.append(now)
                    rec.attempt += 1
                    rec.outcome = "dispatched"
                    rec.previous_lane = last_dispatched_lane
                    last_dispatched_lane = lane
                    running[lane].add(request_id)
                    peak[lane] = max(peak.get(lane, 0), len(running[lane]))
                    if len(serving[lane]) < capacity(lane):
                        serve(lane, request_id)
                    else:
                        engine_queue[lane].append(request_id)
                case Reject():
                    rec = decide(action)
                    rec.reject = now
                    rec.reject_code = action.code
                    rec.retry_after = action.retry_after
                    rec.outcome = "rejected"
                    ended(rec)
                case StartEngine(lane=lane):
                    generation[lane] += 1
                    start_count[lane] += 1
                    starts.append((now, lane, action.attempt))
                    if fails(lane):
                        push(now + start_fail_seconds, "start_failed", lane, generation[lane])
                    else:
                        push(now + _seconds(start_seconds, lane), "ready", lane, generation[lane])
                case StopEngine(lane=lane):
                    generation[lane] += 1
                    engine_up[lane] = False
                    push(now + _seconds(stop_seconds, lane), "stopped", lane, generation[lane])
                case SleepEngine(lane=lane):
                    generation[lane] += 1
                    sleep_count[lane] += 1
                    engine_up[lane] = False
                    if sleep_failures is not None and sleep_failures(lane, sleep_count[lane]):
                        push(now + start_fail_seconds, "sleep_failed", lane, generation[lane])
                    else:
                        push(now + _seconds(sleep_seconds, lane), "slept", lane, generation[lane])
                case WakeEngine(lane=lane):
                    generation[lane] += 1
                    wake_count[lane] += 1
                    if wake_failures is not None and wake_failures(lane, wake_count[lane]):
                        push(now + start_fail_seconds, "wake_failed", lane, generation[lane])
                    else:
                        push(now + _seconds(wake_seconds, lane), "woke", lane, generation[lane])
                case AbortInflight(lane=lane):
                    for request_id in action.request_ids:
                        if request_id not in running[lane]:
                            raise AssertionError(f"abort of {request_id!r}, not in flight on {lane}")
                        drop(lane, request_id)
                        records[request_id].outcome = "aborted"
                        records[request_id].abort_reason = action.reason
                        records[request_id].finish = now
                        ended(records[request_id])
                    fill(lane)
                case Preempt(lane=lane):
                    for request_id in action.request_ids:
                        if request_id not in running[lane]:
                            raise AssertionError(f"preemption of {request_id!r}, not in flight on {lane}")
                        drop(lane, request_id)
                        if request_id in engine_queue[lane]:
                            engine_queue[lane].remove(request_id)
                        rec = records[request_id]
                        rec.outcome = "preempted"
                        rec.preempted.append(now)
                        rec.start = None
                    fill(lane)
                case LaneStateChanged():
                    timeline.append((now, action.lane, str(action.old), str(action.new), action.reason))
                case SwitchPlanned():
                    switches.append((now, action.from_lanes, action.to_lane, action.reason))

    while heap:
        event = heapq.heappop(heap)
        if event.time > max_time:
            break
        now = event.time
        kind, data = event.kind, event.data
        if kind == "arrival":
            (request_id,) = data
            play(pol.submit(request_id, records[request_id].lane, now))
        elif kind == "finish":
            request_id, lane, attempt = data
            if request_id in running[lane] and records[request_id].attempt == attempt:
                drop(lane, request_id)
                records[request_id].finish = now
                records[request_id].outcome = "finished"
                fill(lane)
                ended(records[request_id])
                play(pol.finish(request_id, now))
        elif kind == "cancel":
            (request_id,) = data
            rec = records.get(request_id)
            if rec is not None and rec.outcome == "pending" and rec.arrival <= now:
                rec.outcome = "cancelled"
                ended(rec)
                play(pol.cancel(request_id, now))
        elif kind in _REPORTS:  # an engine's report, void if the engine was stopped or restarted since
            lane, gen = data
            if gen == generation[lane]:
                if kind in ("ready", "woke"):
                    engine_up[lane] = True
                    ready.append((now, lane))
                elif kind in ("start_failed", "wake_failed"):
                    failed_loads.append((now, lane))
                method, failure = _REPORTS[kind]
                args = (lane, now, f"{lane}: injected {failure}") if failure else (lane, now)
                play(getattr(pol, method)(*args))
        elif kind == "crash":
            (lane,) = data
            if engine_up[lane]:
                engine_up[lane] = False
                generation[lane] += 1
                for request_id in running[lane]:
                    records[request_id].outcome = "lost"
                    records[request_id].finish = now
                    ended(records[request_id])
                running[lane].clear()
                serving[lane].clear()
                engine_queue[lane].clear()
                play(pol.engine_exited(lane, now, f"{lane}: injected crash"))
        elif kind == "stall":
            (lane,) = data
            if engine_up[lane]:
                play(pol.preempt(lane, now, "stalled"))
        elif kind == "tick":
            scheduled_ticks.discard(now)
            play(pol.tick(now))
        if gauges:
            for lane in lanes_up():
                play(pol.engine_load(lane, now, len(serving[lane]),
                                     sum(1 for i in engine_queue[lane] if i in running[lane])))
        if check and hasattr(pol, "check_invariants"):
            pol.check_invariants()
        deadline = pol.next_deadline()
        if deadline is not None and deadline > now and deadline not in scheduled_ticks:
            scheduled_ticks.add(deadline)
            push(deadline, "tick")
    return SimResult(records, timeline, switches, starts, ready, now, pol, failed_loads, peak)


def random_workload(
    seed: int,
    lanes: Sequence[str],
    n: int,
    *,
    mean_gap: float = 2.0,
    service: tuple[float, float] = (0.5, 10.0),
) -> list[tuple[float, str, str, float]]:
    """``n`` arrivals over ``lanes`` with exponential gaps, deterministic for ``seed``."""
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(1.0 / mean_gap)
        out.append((t, f"r{i}", rng.choice(list(lanes)), rng.uniform(*service)))
    return out


def steady_stream(
    lane: str, start: float, end: float, gap: float, service: float, prefix: str = "s"
) -> list[tuple[float, str, str, float]]:
    """Back-to-back arrivals for one lane every ``gap`` seconds in [start, end)."""
    out = []
    i = 0
    t = start
    while t < end:
        out.append((t, f"{prefix}{i}", lane, service))
        i += 1
        t = start + i * gap
    return out


__all__ = [
    "Client",
    "RequestRecord",
    "SimResult",
    "make_policy",
    "random_workload",
    "simulate",
    "steady_stream",
]

"""FROZEN: the launcher's lane scheduler as it was before issue 13 (commit a7b979b,
launcher/vllm_launcher/scheduler.py), kept verbatim as the benchmark's "ours before this change"
baseline (the hold rule).  Only the action classes and LanePolicy are imported from the
launcher (the simulator recognises actions by class); do not edit the policy below: it is what
the new policy is compared with.

The front server (the I/O layer) owns sockets, processes and timers.  It reports
what happened through the event methods below, each of which takes the current
time ``now`` (seconds, any monotonic origin) and returns the list of
:class:`Action` objects the I/O layer must carry out, in order.  The scheduler
never looks at a clock: it asks to be woken with :meth:`Scheduler.next_deadline`
and the I/O layer calls :meth:`Scheduler.tick` at (or after) that time.

Contract with the I/O layer
---------------------------
* ``Dispatch``: send the request to the lane's engine now.  Call
  :meth:`Scheduler.finish` when it ends, whatever the outcome.
* ``Reject``: answer the request with ``status`` and an OpenAI-style error.
* ``StartEngine``: start the lane's engine, then report exactly one of
  :meth:`~Scheduler.engine_ready` or :meth:`~Scheduler.engine_start_failed`.
* ``StopEngine``: stop the engine's whole process group (the engine may still be
  starting), then report :meth:`~Scheduler.engine_stopped` exactly once.  Until
  then any other report about that lane is ignored.
* ``AbortInflight``: answer these in-flight requests with 503 (or an SSE error
  event) and close their upstream connections.  The scheduler has forgotten
  them; a later ``finish`` for them is ignored.
* ``engine_exited``: report it (after making sure the process group is gone)
  when a ready or draining engine dies.  The scheduler forgets that lane's
  in-flight requests: the I/O layer answers them 502.
* ``LaneStateChanged`` / ``SwitchPlanned``: for logs, metrics and sd_notify.

Policy
------
Memory occupancy is the sum of the shares of the lanes that are starting, ready,
draining or stopping; a lane may start when occupancy plus its share stays within
the budget (default: the largest share, i.e. one lane at a time with equal
shares).  A request for a READY lane is dispatched at once; otherwise it waits in
its lane's FIFO queue.  The next lane to load (the *candidate*) is the stopped
lane whose oldest queued request has waited longest (ties: lane order); a lane
the operator asked to load (:meth:`Scheduler.load`) goes before every waiter.
When the candidate does not fit, idle READY lanes are stopped (least recently
used first) if that is enough ("idle"); otherwise, once the candidate's oldest
request has waited ``switch_max_wait`` (the hold), READY lanes are drained,
least recently used first, until the freed shares suffice ("max_wait").  A
draining lane takes no new requests (they queue for it) and is stopped when its
in-flight count reaches 0, or at ``drain_timeout`` (its remaining requests are
aborted).  When a lane becomes ready every request queued for it is dispatched;
the hold only applies to later arrivals.  The candidate is re-evaluated at every
event, so it is always the oldest waiter at that moment.

Choices the issues left open
----------------------------
* ``unload(lane)`` drains a READY lane then stops it (a STARTING lane is stopped
  at once).  Requests still queued for the lane, or arriving while it drains,
  keep their place: they load the lane again when it is their turn.
* ``load(lane)`` on a draining or stopping lane makes it the first candidate once
  it has stopped (it is started again; nothing is cancelled).
* Restarts: a failed start, or an engine that exits before it has finished
  ``healthy_after_requests`` (3, "a few") requests since it became ready, is a
  crash loop and counts as one failure; ``max_restarts`` consecutive ones make the
  lane FAILED.  An engine that finished that many requests (or was stopped
  cleanly) resets the count, so one that crashes every 20 requests is restarted
  for ever, each time after the back-off (``backoff_initial`` doubling per
  consecutive failure up to ``backoff_max``).  A crashed lane restarts after the
  back-off if requests wait for it, or if it fits without evicting anything.
  ``engine_start_failed(..., counts=False)`` (the server's own resources, e.g.
  EMFILE, not the engine's fault) backs off the same way but never fails the lane.
* After ``shutdown`` nothing is started again and every submit is rejected.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from vllm_launcher.scheduler import LanePolicy

EPS = 1e-9


class LaneState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    FAILED = "failed"


RESIDENT_STATES = frozenset(
    {LaneState.STARTING, LaneState.READY, LaneState.DRAINING, LaneState.STOPPING}
)


@dataclass(frozen=True)
class SchedulerSettings:
    switch_max_wait: float = 30.0
    drain_timeout: float = 120.0
    queue_max: int = 1024
    queue_timeout: float = 600.0
    memory_budget: float | None = None  # None: the largest lane share
    max_restarts: int = 5
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    healthy_after_requests: int = 3  # requests an engine finishes before its crash is no crash loop
    switch_seconds_estimate: float = 60.0  # initial estimate for Retry-After
    request_seconds_estimate: float = 1.0  # initial per-queued-request cost

    def __post_init__(self) -> None:
        for name in ("switch_max_wait", "drain_timeout", "queue_timeout", "backoff_initial", "backoff_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.queue_max < 0:
            raise ValueError("queue_max must be >= 0")
        if self.max_restarts < 1:
            raise ValueError("max_restarts must be >= 1")
        if self.healthy_after_requests < 1:
            raise ValueError("healthy_after_requests must be >= 1")
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise ValueError("memory_budget must be > 0")


# The actions are the launcher's own classes (the simulator recognises them by class).
from vllm_launcher.scheduler import (  # noqa: E402
    AbortInflight,
    Action,
    Dispatch,
    LaneStateChanged,
    Reject,
    StartEngine,
    StopEngine,
    SwitchPlanned,
)

# ----------------------------------------------------------------- internals


@dataclass
class _Request:
    request_id: Hashable
    lane: str
    submitted: float
    dispatched: float | None = None


@dataclass
class _Lane:
    policy: LanePolicy
    index: int
    state: LaneState = LaneState.STOPPED
    queue: OrderedDict[Hashable, _Request] = field(default_factory=OrderedDict)
    inflight: dict[Hashable, _Request] = field(default_factory=dict)
    last_used: float = -math.inf
    ready_since: float | None = None
    drain_started: float | None = None
    drain_reason: str = ""
    failures: int = 0  # consecutive crash loops: failed starts, crashes before serving a few requests
    setbacks: int = 0  # failed starts that do not count (the server's own resources), for the back-off
    served: int = 0  # requests finished by the current engine since it became ready
    restarts: int = 0  # starts that were retries, for /lanes and metrics
    retry_at: float | None = None  # back-off: no start before this time
    restart_pending: bool = False  # crashed while ready: restart even without waiters
    load_requested: float | None = None  # operator load() time, first candidate
    last_cause: str | None = None

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def share(self) -> float:
        return self.policy.share

    def oldest(self) -> float | None:
        for req in self.queue.values():
            return req.submitted
        return None


class Scheduler:
    """The lane scheduling policy. See the module docstring for the contract."""

    def __init__(self, lanes: Sequence[LanePolicy], settings: SchedulerSettings | None = None):
        if not lanes:
            raise ValueError("at least one lane is needed")
        self.settings = settings if settings is not None else SchedulerSettings()
        self._lanes: dict[str, _Lane] = {}
        for index, policy in enumerate(lanes):
            if policy.name in self._lanes:
                raise ValueError(f"duplicate lane {policy.name!r}")
            self._lanes[policy.name] = _Lane(policy, index)
        budget = self.settings.memory_budget
        self.budget: float = budget if budget is not None else max(p.share for p in lanes)
        for policy in lanes:
            if policy.share > self.budget + EPS:
                raise ValueError(f"lane {policy.name}: share {policy.share} exceeds the memory budget {self.budget}")
        self._requests: dict[Hashable, _Request] = {}
        self._queued = 0
        self._now = -math.inf
        self._shutting_down = False
        self._planned: set[str] = set()
        self._switch_estimate = self.settings.switch_seconds_estimate
        self._request_estimate = self.settings.request_seconds_estimate

    # ------------------------------------------------------------ events

    def submit(self, request_id: Hashable, lane: str, now: float) -> list[Action]:
        ln = self._lane(lane)
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already known")
        now, out = self._begin(now)
        if self._shutting_down:
            out.append(Reject(request_id, lane, 503, "shutting_down", "the server is shutting down"))
            return out
        if ln.state is LaneState.FAILED:
            out.append(self._failed_reject(request_id, ln))
            return out
        req = _Request(request_id, lane, now)
        if ln.state is LaneState.READY:
            self._requests[request_id] = req
            self._dispatch(ln, req, now, out)
            return out
        if self._queued >= self.settings.queue_max:
            out.append(
                Reject(
                    request_id, lane, 503, "queue_full",
                    f"too many requests waiting ({self._queued}); retry later",
                    self._retry_after(ln),
                )
            )
            return out
        self._requests[request_id] = req
        ln.queue[request_id] = req
        self._queued += 1
        self._schedule(now, out)
        return out

    def finish(self, request_id: Hashable, now: float) -> list[Action]:
        now, out = self._begin(now)
        req = self._requests.get(request_id)
        if req is not None and req.dispatched is not None:
            del self._requests[request_id]
            ln = self._lanes[req.lane]
            concurrency = len(ln.inflight)
            del ln.inflight[request_id]
            ln.last_used = now
            ln.served += 1
            if ln.served >= self.settings.healthy_after_requests:
                ln.failures = 0  # it served: a later crash starts a new count
            cost = (now - req.dispatched) / max(1, concurrency)
            self._request_estimate = 0.8 * self._request_estimate + 0.2 * cost
        self._schedule(now, out)
        return out

    def cancel(self, request_id: Hashable, now: float) -> list[Action]:
        now, out = self._begin(now)
        req = self._requests.get(request_id)
        if req is not None and req.dispatched is None:
            self._remove_queued(req)
        self._schedule(now, out)
        return out

    def engine_ready(self, lane: str, now: float) -> list[Action]:
        ln = self._lane(lane)
        now, out = self._begin(now)
        if ln.state is LaneState.STARTING:
            self._transition(ln, LaneState.READY, "engine ready", out)
            ln.setbacks = 0
            ln.served = 0
            ln.ready_since = now
            ln.last_used = now
            ln.load_requested = None
            while ln.queue:
                _, req = ln.queue.popitem(last=False)
                self._queued -= 1
                self._dispatch(ln, req, now, out)
        self._schedule(now, out)
        return out

    def engine_start_failed(self, lane: str, now: float, cause: str, counts: bool = True) -> list[Action]:
        """``counts=False``: the start failed for the server's own resources (EMFILE), not the
        engine's; back off, but never fail the lane for it."""
        ln = self._lane(lane)
        now, out = self._begin(now)
        if ln.state is LaneState.STARTING:
            self._failure(ln, now, cause, restart=False, out=out, counts=counts)
        self._schedule(now, out)
        return out

    def engine_exited(self, lane: str, now: float, cause: str) -> list[Action]:
        ln = self._lane(lane)
        now, out = self._begin(now)
        if ln.state in (LaneState.READY, LaneState.DRAINING, LaneState.STARTING):
            was_ready = ln.state is LaneState.READY
            for request_id in ln.inflight:
                del self._requests[request_id]
            ln.inflight.clear()
            self._failure(ln, now, cause, restart=was_ready, out=out)
        self._schedule(now, out)
        return out

    def engine_stopped(self, lane: str, now: float) -> list[Action]:
        ln = self._lane(lane)
        now, out = self._begin(now)
        if ln.state is LaneState.STOPPING:
            self._transition(ln, LaneState.STOPPED, "engine stopped", out)
        self._schedule(now, out)
        return out

    def load(self, lane: str, now: float) -> list[Action]:
        """Operator: load the lane now, evicting what conflicts (no hold)."""
        ln = self._lane(lane)
        now, out = self._begin(now)
        if not self._shutting_down:
            if ln.state is LaneState.FAILED:
                self._transition(ln, LaneState.STOPPED, "load", out)
                ln.failures = 0
            if ln.state in (LaneState.STOPPED, LaneState.DRAINING, LaneState.STOPPING):
                ln.retry_at = None
                if ln.load_requested is None:
                    ln.load_requested = now
        self._schedule(now, out)
        return out

    def unload(self, lane: str, now: float) -> list[Action]:
        """Operator: drain then stop the lane; its queued requests keep waiting."""
        ln = self._lane(lane)
        now, out = self._begin(now)
        self._take_down(ln, now, "unload", out)
        self._schedule(now, out)
        return out

    def shutdown(self, now: float) -> list[Action]:
        now, out = self._begin(now)
        self._shutting_down = True
        queued = sorted(
            (req for ln in self._lanes.values() for req in ln.queue.values()),
            key=lambda r: r.submitted,
        )
        for req in queued:
            self._remove_queued(req)
            out.append(Reject(req.request_id, req.lane, 503, "shutting_down", "the server is shutting down"))
        for ln in self._lanes.values():
            ln.retry_at = None
            self._take_down(ln, now, "shutdown", out)
        self._schedule(now, out)
        return out

    def tick(self, now: float) -> list[Action]:
        now, out = self._begin(now)
        self._schedule(now, out)
        return out

    def observe_switch_seconds(self, seconds: float) -> None:
        """Feed a measured switch duration (drain + stop + start) into the estimate."""
        if seconds >= 0:
            self._switch_estimate = 0.7 * self._switch_estimate + 0.3 * seconds

    # ------------------------------------------------------------ queries

    def next_deadline(self) -> float | None:
        """The earliest future time at which :meth:`tick` must be called, if any."""
        s = self.settings
        deadlines: list[float] = []
        for ln in self._lanes.values():
            oldest = ln.oldest()
            if oldest is not None:
                deadlines.append(oldest + s.queue_timeout)
                if ln.state is LaneState.STOPPED and not self._shutting_down:
                    deadlines.append(oldest + s.switch_max_wait)
            if ln.state is LaneState.DRAINING and ln.drain_started is not None:
                deadlines.append(ln.drain_started + s.drain_timeout)
            if ln.state is LaneState.READY and ln.policy.idle_timeout is not None and not ln.inflight:
                deadlines.append(ln.last_used + ln.policy.idle_timeout)
            if (
                ln.state is LaneState.STOPPED
                and ln.retry_at is not None
                and (ln.queue or ln.restart_pending or ln.load_requested is not None)
            ):
                deadlines.append(ln.retry_at)
        future = [d for d in deadlines if d > self._now]
        return min(future) if future else None

    def state(self, lane: str) -> LaneState:
        return self._lane(lane).state

    def queue_depth(self, lane: str) -> int:
        return len(self._lane(lane).queue)

    def inflight(self, lane: str) -> int:
        return len(self._lane(lane).inflight)

    def queued_ahead(self, request_id: Hashable) -> int | None:
        """How many requests wait ahead of this one in its lane (None: not queued)."""
        req = self._requests.get(request_id)
        if req is None or req.dispatched is not None:
            return None
        for position, other in enumerate(self._lanes[req.lane].queue):
            if other == request_id:
                return position
        return None  # pragma: no cover - queue and index always agree

    @property
    def lanes(self) -> tuple[str, ...]:
        return tuple(self._lanes)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def occupancy(self) -> float:
        return sum(ln.share for ln in self._lanes.values() if ln.state in RESIDENT_STATES)

    def is_idle(self) -> bool:
        """Everything stopped or failed, nothing queued and nothing in flight."""
        return not self._requests and all(
            ln.state in (LaneState.STOPPED, LaneState.FAILED) for ln in self._lanes.values()
        )

    def snapshot(self) -> dict:
        """Plain data for ``GET /lanes``."""
        lanes = {}
        for ln in self._lanes.values():
            lanes[ln.name] = {
                "state": str(ln.state),
                "share": ln.share,
                "queue_depth": len(ln.queue),
                "inflight": len(ln.inflight),
                "oldest_queued_at": ln.oldest(),
                "last_used": ln.last_used if ln.last_used > -math.inf else None,
                "ready_since": ln.ready_since if ln.state is LaneState.READY else None,
                "draining_since": ln.drain_started if ln.state is LaneState.DRAINING else None,
                "failures": ln.failures,
                "restarts": ln.restarts,
                "retry_at": ln.retry_at,
                "last_cause": ln.last_cause,
                "idle_timeout": ln.policy.idle_timeout,
                "load_requested": ln.load_requested is not None,
            }
        return {
            "memory_budget": self.budget,
            "occupancy": self.occupancy(),
            "queued": self._queued,
            "shutting_down": self._shutting_down,
            "switch_seconds_estimate": self._switch_estimate,
            "lanes": lanes,
        }

    def check_invariants(self) -> None:
        """Raise AssertionError if the internal bookkeeping is inconsistent (for tests)."""
        queued = inflight = 0
        for ln in self._lanes.values():
            for request_id, req in ln.queue.items():
                assert self._requests.get(request_id) is req and req.dispatched is None
                assert req.lane == ln.name
            for request_id, req in ln.inflight.items():
                assert self._requests.get(request_id) is req and req.dispatched is not None
            if ln.state is LaneState.READY:
                assert not ln.queue, f"ready lane {ln.name} has a queue"
            if ln.state not in (LaneState.READY, LaneState.DRAINING):
                assert not ln.inflight, f"{ln.state} lane {ln.name} has requests in flight"
            if ln.state is LaneState.FAILED:
                assert not ln.queue
            queued += len(ln.queue)
            inflight += len(ln.inflight)
        assert queued == self._queued
        assert queued + inflight == len(self._requests)
        assert self.occupancy() <= self.budget + EPS
        if self._shutting_down:
            assert queued == 0

    # ------------------------------------------------------------ helpers

    def _lane(self, lane: str) -> _Lane:
        try:
            return self._lanes[lane]
        except KeyError:
            raise ValueError(f"unknown lane {lane!r}") from None

    def _begin(self, now: float) -> tuple[float, list[Action]]:
        # Time never goes backwards for the policy, whatever the caller's clock does.
        if now < self._now:
            now = self._now
        self._now = now
        return now, []

    def _transition(self, ln: _Lane, new: LaneState, reason: str, out: list[Action]) -> None:
        old = ln.state
        if old is not new:
            ln.state = new
            out.append(LaneStateChanged(ln.name, old, new, reason))

    def _dispatch(self, ln: _Lane, req: _Request, now: float, out: list[Action]) -> None:
        req.dispatched = now
        ln.inflight[req.request_id] = req
        ln.last_used = now
        out.append(Dispatch(req.request_id, ln.name))

    def _remove_queued(self, req: _Request) -> None:
        del self._lanes[req.lane].queue[req.request_id]
        del self._requests[req.request_id]
        self._queued -= 1

    def _failed_reject(self, request_id: Hashable, ln: _Lane) -> Reject:
        message = f"lane {ln.name} failed to start: {ln.last_cause or 'unknown cause'}"
        return Reject(request_id, ln.name, 503, "lane_failed", message)

    def _retry_after(self, ln: _Lane) -> float:
        """Seconds a request for ``ln`` joining now should expect to wait.

        Every lane with waiters is ahead of a newcomer; each of them that is not
        loaded costs one switch, and so does ``ln`` itself if it is not ready.
        Each queued request ahead adds the measured per-request cost.
        """
        switches = 0
        queue_ahead = 0
        for other in self._lanes.values():
            if other.queue and other is not ln and other.state is not LaneState.READY:
                switches += 1
            queue_ahead += len(other.queue)
        if ln.state is not LaneState.READY:
            switches += 1
        estimate = switches * self._switch_estimate + queue_ahead * self._request_estimate
        return float(max(1, math.ceil(estimate)))

    def _failure(self, ln: _Lane, now: float, cause: str, restart: bool, out: list[Action],
                 counts: bool = True) -> None:
        s = self.settings
        if counts:
            ln.failures += 1
        else:
            ln.setbacks += 1
        ln.last_cause = cause
        if ln.failures >= s.max_restarts:
            self._transition(ln, LaneState.FAILED, f"{ln.failures} consecutive failures", out)
            ln.retry_at = None
            ln.restart_pending = False
            ln.load_requested = None
            for req in list(ln.queue.values()):
                self._remove_queued(req)
                out.append(self._failed_reject(req.request_id, ln))
            return
        self._transition(ln, LaneState.STOPPED, "start failed" if not restart else "engine exited", out)
        backoff = min(s.backoff_max, s.backoff_initial * 2 ** (ln.failures + ln.setbacks - 1))
        ln.retry_at = now + backoff
        ln.restart_pending = restart

    def _stop(self, ln: _Lane, reason: str, out: list[Action]) -> None:
        if ln.state is LaneState.READY:
            ln.failures = 0  # taken down cleanly while ready: no crash loop
        self._transition(ln, LaneState.STOPPING, reason, out)
        ln.drain_started = None
        out.append(StopEngine(ln.name, reason))

    def _take_down(self, ln: _Lane, now: float, reason: str, out: list[Action]) -> None:
        """Unload or shutdown: drain a ready lane, stop a starting one, cancel restarts."""
        ln.load_requested = None
        ln.restart_pending = False
        if ln.state is LaneState.READY:
            self._drain(ln, now, reason, out)
        elif ln.state is LaneState.STARTING:
            self._stop(ln, reason, out)

    def _drain(self, ln: _Lane, now: float, reason: str, out: list[Action]) -> None:
        ln.failures = 0  # taken down cleanly while ready: no crash loop
        if not ln.inflight:
            self._stop(ln, reason, out)
            return
        self._transition(ln, LaneState.DRAINING, reason, out)
        ln.drain_started = now
        ln.drain_reason = reason

    # ------------------------------------------------------------ the policy

    def _schedule(self, now: float, out: list[Action]) -> None:
        s = self.settings
        for ln in self._lanes.values():
            while ln.queue:
                req = next(iter(ln.queue.values()))
                if now < req.submitted + s.queue_timeout:
                    break
                self._remove_queued(req)
                out.append(
                    Reject(
                        req.request_id, ln.name, 503, "queue_timeout",
                        f"waited {now - req.submitted:.0f} s for lane {ln.name}; retry later",
                        self._retry_after(ln),
                    )
                )
            if ln.state is LaneState.DRAINING:
                if not ln.inflight:
                    self._stop(ln, ln.drain_reason, out)
                elif ln.drain_started is not None and now >= ln.drain_started + s.drain_timeout:
                    ids = tuple(ln.inflight)
                    for request_id in ids:
                        del self._requests[request_id]
                    ln.inflight.clear()
                    out.append(AbortInflight(ln.name, ids, "drain_timeout"))
                    self._stop(ln, ln.drain_reason, out)
            elif (
                ln.state is LaneState.READY
                and ln.policy.idle_timeout is not None
                and not ln.inflight
                and now >= ln.last_used + ln.policy.idle_timeout
            ):
                self._stop(ln, "idle_timeout", out)
        if not self._shutting_down:
            self._plan(now, out)

    def _candidate(self, now: float) -> _Lane | None:
        best: _Lane | None = None
        best_key: tuple = ()
        for ln in self._lanes.values():
            if ln.state is not LaneState.STOPPED:
                continue
            if ln.retry_at is not None and ln.retry_at > now:
                continue
            if ln.load_requested is not None:
                key = (0, ln.load_requested, ln.index)
            elif ln.queue:
                key = (1, ln.oldest(), ln.index)
            else:
                continue
            if best is None or key < best_key:
                best, best_key = ln, key
        return best

    def _fits(self, ln: _Lane, used: float) -> bool:
        return used + ln.share <= self.budget + EPS

    def _plan(self, now: float, out: list[Action]) -> None:
        # Forget announced switches whose target no longer waits (its requests left).
        self._planned = {
            name for name in self._planned
            if self._lanes[name].state is LaneState.STOPPED
            and (self._lanes[name].queue or self._lanes[name].load_requested is not None)
        }
        while True:
            cand = self._candidate(now)
            if cand is None:
                break
            if self._fits(cand, self.occupancy()):
                self._start(cand, out)
                continue
            self._make_room(cand, now, out)
            return
        # Nobody waits: an engine that crashed while ready comes back if it fits.
        for ln in self._lanes.values():
            if ln.state is LaneState.STOPPED and ln.restart_pending and (ln.retry_at is None or ln.retry_at <= now):
                if self._fits(ln, self.occupancy()):
                    self._start(ln, out)
                else:
                    ln.restart_pending = False

    def _make_room(self, cand: _Lane, now: float, out: list[Action]) -> None:
        """The candidate does not fit: stop or drain READY lanes for it, or wait."""
        # Lanes already draining or stopping will free their share anyway.
        projected = sum(ln.share for ln in self._lanes.values() if ln.state in (LaneState.STARTING, LaneState.READY))
        if self._fits(cand, projected):
            return
        ready = sorted(
            (ln for ln in self._lanes.values() if ln.state is LaneState.READY),
            key=lambda ln: (ln.last_used, ln.index),
        )
        idle = [ln for ln in ready if not ln.inflight]
        busy = [ln for ln in ready if ln.inflight]
        forced = cand.load_requested is not None
        victims = self._victims(cand, projected, idle)
        if victims is not None:
            reason = "load" if forced else "idle"
        else:
            oldest = cand.oldest()
            held = not forced and (oldest is None or now < oldest + self.settings.switch_max_wait)
            if held:
                return
            victims = self._victims(cand, projected, idle + busy)
            if victims is None:
                return  # starting engines hold the memory: wait until they are ready
            reason = "load" if forced else "max_wait"
        for victim in victims:
            self._drain(victim, now, reason, out)
        self._planned.add(cand.name)
        out.append(SwitchPlanned(tuple(v.name for v in victims), cand.name, reason))

    def _victims(self, cand: _Lane, projected: float, pool: list[_Lane]) -> list[_Lane] | None:
        chosen: list[_Lane] = []
        for ln in pool:
            if self._fits(cand, projected):
                break
            chosen.append(ln)
            projected -= ln.share
        return chosen if self._fits(cand, projected) else None

    def _start(self, ln: _Lane, out: list[Action]) -> None:
        attempt = ln.failures + ln.setbacks + 1
        if ln.name in self._planned:
            self._planned.discard(ln.name)
        elif attempt == 1:
            others = any(o.state in RESIDENT_STATES for o in self._lanes.values() if o is not ln)
            reason = "load" if ln.load_requested is not None else ("co_resident" if others else "idle")
            out.append(SwitchPlanned((), ln.name, reason))
        if attempt > 1:
            ln.restarts += 1
        ln.retry_at = None
        ln.restart_pending = False
        self._transition(ln, LaneState.STARTING, "start" if attempt == 1 else f"retry {attempt}", out)
        out.append(StartEngine(ln.name, attempt))

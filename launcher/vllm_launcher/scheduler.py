"""Lane scheduling policy: a pure state machine, no I/O, no clocks, no asyncio.

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
* ``Preempt``: close these in-flight requests' upstream connections without
  answering them: they are back at the head of their lane's queue and a later
  ``Dispatch`` sends them again (see "Preemption").  Report
  :meth:`~Scheduler.output_started` right before any engine output of a request
  reaches its client (a stream's first engine bytes; keep-alives do not count):
  from then on it is never preempted.
* ``engine_load``: report the engine's own gauges (vLLM's
  ``vllm:num_requests_running`` and ``vllm:num_requests_waiting``) now and then
  while its lane has requests in it; :meth:`~Scheduler.preempt` applies the
  preemption rule to a stalled engine's requests and stops it.
* ``engine_exited``: report it (after making sure the process group is gone)
  when a ready or draining engine dies.  The scheduler forgets that lane's
  in-flight requests: the I/O layer answers them 502.
* ``LaneStateChanged`` / ``SwitchPlanned``: for logs, metrics and sd_notify.  ``old`` and
  ``new`` are equal only for the one record that says a lane's sleep mode fell back.

Sleeping lanes (vLLM sleep mode; ``LanePolicy.sleep_level`` 1 or 2, 0 = off)
-----------------------------------------------------------------------------
A lane with ``sleep_level > 0`` is started with ``StartEngine(lane, attempt, sleep_mode=True)``
(``--enable-sleep-mode``, ``VLLM_SERVER_DEV_MODE=1``).  While asleep the lane is
``LaneState.SLEEPING`` and holds ``LanePolicy.sleep_share`` of the memory budget (level 1: its
weights' share; level 2: its process overhead; the I/O layer computes both from the memory
plan).  Actions and the reports each one asks for:

* ``SleepEngine(lane, level, reason)``: instead of ``StopEngine`` when a drained lane is
  switched out (reasons idle, max_wait, cost, load; never for unload, idle_timeout,
  shutdown, which stop).  The lane is STOPPING (full share) until the I/O layer reports
  exactly one of :meth:`~Scheduler.engine_slept` (-> SLEEPING) or
  :meth:`~Scheduler.sleep_failed` (the scheduler then emits ``StopEngine(lane,
  "sleep_failed")``; report ``engine_stopped`` as usual).
* ``WakeEngine(lane)``: the lane's sleeping engine is wanted (it is the next lane to serve).
  The lane is STARTING (full share) until exactly one of :meth:`~Scheduler.engine_woke`
  (-> READY, its queue is dispatched; ``engine_ready`` is accepted too) or
  :meth:`~Scheduler.wake_failed` (-> STOPPING with ``StopEngine(lane, "wake_failed")``;
  after ``engine_stopped`` the lane is cold-started by ``StartEngine`` and its queued
  requests, which kept their place, are served: a failed wake loses nothing).
  ``engine_start_failed`` on a waking lane counts as ``wake_failed``; ``engine_exited`` on a
  waking lane as a failed wake whose process is gone (-> STOPPED, no StopEngine).
* ``StopEngine`` on a SLEEPING lane: a sleeper is evicted for memory (least recently used
  first), unloaded or shut down.  Report ``engine_stopped``.
* ``engine_exited`` on a SLEEPING lane: it is STOPPED; nothing was in flight.
* ``sleep_failed(lane, now, cause)`` may also be reported at any other time, e.g. when an
  engine refuses ``--enable-sleep-mode`` (report it before ``engine_start_failed``, whose
  retry is then a ``StartEngine`` with ``sleep_mode=False``).

The steps of sleep mode within these states are named by :class:`Stage`.

Fallback: after a failed sleep or wake the lane uses stop/start for good (until the
scheduler is built again, i.e. a reload), logged once by a ``LaneStateChanged`` whose reason
says so, and shown by :meth:`Scheduler.sleep_off` and ``snapshot()["lanes"][lane]["sleep_off"]``.

Memory: occupancy counts the full share of STARTING, READY, DRAINING and STOPPING lanes and
the ``sleep_share`` of SLEEPING ones.  When the next lane to start (or wake, which needs
``share - sleep_share`` more) does not fit, the scheduler frees room in this order: idle
READY lanes (least recently used first) are put to sleep or stopped; then sleepers are
stopped, least recently used first; then (when the policy closes them) busy READY lanes are
drained and put to sleep; if still short, the lanes it meant to put to sleep are stopped.

Measurements (what the policy learns)
-------------------------------------
* Service times: :meth:`~Scheduler.finish` takes the request's duration (default: dispatch
  to ``now``; ``service_seconds=`` for an exact figure, ``sample=False`` for a request that
  says nothing about the lane, e.g. a client that left).  :meth:`~Scheduler.service_seconds`
  is the mean over the last ``service_window`` finishes.
* Per-lane costs: the scheduler times each start (StartEngine -> engine_ready), stop
  (StopEngine -> engine_stopped), sleep (SleepEngine -> engine_slept) and wake (WakeEngine
  -> engine_woke) with the ``now`` it is given; the I/O layer may feed its own figures with
  :meth:`~Scheduler.observe_engine_seconds` (lane, phase, seconds).  Before the first
  measurement the ``*_seconds_estimate`` settings stand in.  :meth:`~Scheduler.costs`.

Policy (issue 13: cost-gated, capped)
-------------------------------------
Memory occupancy is the sum of the shares of the lanes that are starting, ready, draining
or stopping, plus the ``sleep_share`` of sleeping ones; a lane may start (or wake) when it
fits the budget (default: the largest share).  A request for a READY lane is dispatched at
once if its engine has room (the dispatch limit below); otherwise it waits in its lane's FIFO
queue.  When a lane becomes ready its queue is dispatched up to the limit, and it keeps taking
its requests in order (exhaustive service) until it is *closed* (drained, then put to sleep or
stopped).

*The dispatch limit* (issue 21).  At most ``LanePolicy.max_inflight`` (N_L, the lane's
``--max-num-seqs``) of a lane's requests are in its engine at once; the rest wait in the lane's
queue here, in order, where closing the lane does not have to drain them: they keep their place
and are served at the lane's next turn.  The lane's *window* (at most N_L) is what it sends now:
while the engine reports requests waiting inside it (``engine_load(waiting > 0)``: its KV cache
holds fewer than N_L) the window is what the engine runs, at least 1; while it runs all it was
given and queues none, the window doubles back up to N_L.  A READY lane's queue waits for its
window, not for a load: it is no waiter of the policy below (W, F, B count only requests whose
lane is not READY), and R, the lane's remaining busy time, includes its queue (len / window mean
service times), so the cost test does not close a lane for its own backlog.  Rule (ii) below
closes a lane that has a backlog here only once it has been READY for ``drain_timeout`` (its
*turn*): before issue 21 its whole queue sat in the engine and a drain let it serve up to
``drain_timeout`` of it; without the turn every switch would buy one window of work (measured:
half the throughput on bench/scheduling.py's workload (b) at B = 120 s).

*Which lane next* (the candidate, among stopped and sleeping lanes with waiters and not
backing off): an operator's ``load`` first; then a lane that others were already taken
down for (a planned switch is kept until it starts or its waiters all leave); then, once
some waiter has waited F (``fair_wait``, 60 s, at most B), the lane of the oldest waiter;
before that the lane with the largest n_j / (S_j + s_j) (n_j its queued requests, S_j the
seconds to bring it in and take it out again: wake + sleep for a sleep lane that sleeps,
start + stop otherwise; s_j its mean service time), ties to the oldest waiter.  If the
candidate fits it starts at once (several lanes may co-reside); else room is made (see
"Memory" above): idle lanes go at once ("idle"); busy READY lanes L are closed when

(i)   L is idle (the case above), or
(ii)  some waiter has waited the cap B (``switch_max_wait``, ``VLLM_SWITCH_MAX_WAIT``):
      every busy lane may be closed, least recently used first ("max_wait"), or
(iii) the cost test says the waiters lose more than L's newcomers gain ("cost"):
      |W| * ext(L) >= theta * (S_L + sum over waiting lanes j of (S_j + s_j)),
      W the requests waiting for a load (every queue but a starting lane's), ext(L) the
      mean over L's recent service times s of max(0, s - R), R the expected remaining busy
      time of L's in-flight requests (mean service time less their age), S_L the seconds to
      take L out and bring it back (sleep + wake or stop + start), theta = ``cost_theta``.

A draining lane takes no new requests (they queue for it) and is put to sleep or stopped
when its in-flight count reaches 0, or once the preemption rule has emptied it.

Preemption (issue 21)
---------------------
At ``drain_timeout`` (D) after a drain began, every request still in flight none of whose
engine output reached its client and that never went back in line is preempted: cancelled
upstream and put back at the head of its lane's queue, in its original order (while shutting
down it is answered 503 shutting_down instead).  The others (a stream whose output reached its
client, a request back in line once) may run on until 2 D after the drain began; then a started
stream is cut (``AbortInflight(drain_timeout)``: an SSE error event) and a request back in line
once fails (``AbortInflight(hung_twice)``: it held its engine past the drain bound twice).  So a
request is preempted at most once, one longer than D is served after at most one preemption if
it needs less than 2 D, and a drain lasts at most 2 D.  A shutdown gives nothing a second
chance, so its drain lasts at most D: at D every request still in flight is cut or answered 503
shutting_down, and the server's stop takes at most D plus the engines' stop.  :meth:`Scheduler.preempt` applies the
same rule at once (no 2 D) to a stalled engine's requests and stops it (the watchdog); the
requests back in line load the lane again.  Requests back in line are queued requests like any
other: an unload or a switch keeps them queued for the lane's next turn, a shutdown answers them
503 shutting_down, and so does a restart of the server (a reload builds a new scheduler).

Queue limits: ``queue_max`` counts every request waiting here (a lane's backlog beyond its
window too), beyond it 503 queue_full; ``queue_timeout`` applies only to a READY lane that took
none of its queue for that long (its engine is stuck): its queue is answered 503 queue_timeout.
Waiting for other lanes' turns never times out: the bound below covers it.  Retry-After comes
from the lane's own figures: its start (or wake) still to come, the drain and way down of a lane
holding the memory, and its queue at its own rate (window / its mean service time).  The scheduler is called at every event and at :meth:`Scheduler.next_deadline`,
which includes each waiting lane's oldest request reaching F and B, and the time a busy
lane's in-flight requests are due (when R reaches 0, ext(L) is largest).

The wait bound
--------------
A request that waits from t0 (its arrival, or the moment it went back in line) until its
dispatch at d spends, of (t0, d], at most

    B + K * P,    P = D + T_down + T_up + X

with its lane not READY (waiting for a load); the rest of its wait its lane is READY and its
window is full of the lane's earlier requests (FIFO).  D is the drain bound (2 ``drain_timeout``,
or less when every service is shorter, see "Preemption"), plus the turn (``drain_timeout``) when
lanes have a dispatch limit,
T_up the longest way up of any lane (a start, a wake, or the report of a failed one),
T_down the longest way down (a stop; for a sleep lane a sleep or failed sleep, then a stop),
X = ``backoff_max`` if starts may fail or engines crash (else 0), and K the number of *load
outcomes* in (t0, d] (a lane leaving STARTING: ready, woken, start or wake failed, exited)
plus the switches abandoned in that interval (a lane that others were taken down for whose
waiters all left, by cancel or queue timeout, before it started).  Assumptions: no operator
``load``/``unload`` during the wait (they go first), reports arrive within the times above
(the I/O layer bounds starts by ``VLLM_START_TIMEOUT`` and stops by ``VLLM_STOP_TIMEOUT``).

Proof.  Let o_1 < o_2 < ... be the outcomes and abandonments in (t0, d] and o_0 = t0.  Each
stretch of (t0, d] during which r's lane is not READY ends at an outcome (its lane's ready) or at
d, and begins at t0 or when the lane was closed; r keeps its place and its age (a request back in
line keeps its arrival), so r's lane is a waiting lane throughout such a stretch, and the time
that is not READY adds up to at most B + K P if o_{k+1} <= tau + P for tau = max(o_k, u, t0 + B),
u the stretch's start.  From tau on, r has waited B >= F: the candidate order is oldest
waiter first (after operator loads and the one planned switch), and every busy lane may be
closed (rule ii), at tau itself since t0 + B is a deadline.  If a lane is STARTING at tau,
its outcome comes within T_up.  Otherwise: if there is no candidate, every waiting lane is
backing off (it may retry by tau + X), or draining or stopping (a candidate by
tau + D + T_down; a drain is only begun for a planned switch, whose target then starts:
an outcome, or an abandonment).  Once there is a candidate C, either it fits and starts
(outcome within T_up), or the room plan exists (no STARTING lane holds memory, and every
other holder may be closed or stopped, pending sleeps turned into stops), its victims drain
in parallel (D) and go down in parallel (T_down), and C, planned and so kept first, starts
(T_up) unless its waiters all left (an abandonment).  The phases do not add up beyond
X + D + T_down + T_up because a back-off and a drain overlap or one of them ends in an
outcome.  Hence o_{k+1} <= tau + P.  With one awake lane at a time and no failures K is small:
after r has waited F the lanes load in the order of their oldest waiters, so each lane
(r's included) loads at most once more, plus the switch already planned (at most lanes + 1
loads after t0 + F).  With co-residency, lanes that fit may load beside r's starting lane;
K counts them too, though they do not delay r.
With the dispatch limit K also counts the turns of other lanes whose older requests need more
than one window, and one load for each request that went back in line during the wait.
tests/test_scheduler_properties.py checks the bound over random arrivals with sleeping
lanes, co-residency, start/sleep/wake failures, crashes, stalled engines, cancels, queue limits,
dispatch limits (engines of that batch, or of a smaller one reporting their gauges) and streams,
and that no engine holds more than N_L, no request is preempted twice or answered twice, and
every request ends.

Choices the issues left open
----------------------------
* ``unload(lane)`` drains a READY lane then stops it (a STARTING lane is stopped
  at once).  Requests still queued for the lane, or arriving while it drains,
  keep their place: they load the lane again when it is their turn.
* ``load(lane)`` on a draining or stopping lane makes it the first candidate once
  it has stopped (it is started again; nothing is cancelled).
* Restarts (issue 23: a crash loop is judged by what the engine did, not by what
  finished).  A failed start, a hang (:meth:`~Scheduler.engine_hung`) or an exit of an
  engine that had *not served* is a crash loop and counts as one failure;
  ``max_restarts`` consecutive ones make the lane FAILED.  An engine *served* when,
  since it became ready, some of its output reached a client (:meth:`~Scheduler.
  output_started`: bytes flowed), or it finished ``healthy_after_requests`` requests,
  or it was ready for ``healthy_after_seconds`` (60 s: longer than the longest
  back-off, so no tight loop); its exit or hang resets the count first (it counts as
  the first failure of a new run), and so does a clean stop while ready.  Hence an
  engine that crashes every 20 requests, even with all of them in flight at once and
  none finished, is restarted for ever, and its back-off stays at its start: the
  back-off (``backoff_initial`` doubling per consecutive failure up to
  ``backoff_max``) resets after a healthy period.  A crashed lane restarts after the
  back-off if requests wait for it, or if it fits without evicting anything.
  ``engine_start_failed(..., counts=False)`` (the server's own resources, e.g.
  EMFILE, not the engine's fault) backs off the same way but never fails the lane.
  A FAILED lane is not failed for good (systemd's start limit, not an operator's
  pager): its queue and newcomers get 503 ``lane_failed`` naming the cause and when it
  is tried again (``Retry-After`` too); after ``failed_cooloff`` (300 s) it is STOPPED
  with one attempt left before FAILED again, and starts at once if it fits without
  evicting anything (else at the next request for it).  ``load`` tries it at once.
* After ``shutdown`` nothing is started again and every submit is rejected.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, Literal, cast

EPS = 1e-9


class LaneState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    SLEEPING = "sleeping"  # the engine process lives, asleep (vLLM sleep mode); holds sleep_share
    FAILED = "failed"


RESIDENT_STATES = frozenset(
    {LaneState.STARTING, LaneState.READY, LaneState.DRAINING, LaneState.STOPPING}
)


class Stage(Enum):
    """A lane's state as the scheduler tells it apart: its LaneState, with the steps of sleep
    mode named.  Only the LaneState (``stage.state``) is shown (LaneStateChanged, logs, /lanes,
    metrics); a step within one LaneState is no state change.  The steps of sleep mode, with
    their LaneState in brackets where the name differs::

        READY -> (DRAINING_TO_SLEEP [draining] while busy) -> FALLING_ASLEEP [stopping] (SleepEngine)
              -> SLEEPING (engine_slept) -> WAKING [starting] (WakeEngine) -> READY (engine_woke)
        FALLING_ASLEEP -> FALLING_ASLEEP_THEN_STOP [stopping] (unload, shutdown, its memory wanted)
              -> SLEEPING (engine_slept) -> STOPPING_ASLEEP [stopping] (StopEngine) -> STOPPED
        SLEEPING -> STOPPING_ASLEEP (StopEngine: evicted, unloaded, shut down) -> STOPPED
        FALLING_ASLEEP* (sleep_failed), WAKING (wake_failed) -> STOPPING (StopEngine): sleep mode off
        DRAINING_TO_SLEEP -> DRAINING (stops once drained): unload, shutdown, memory wanted, sleep mode off
    """

    STOPPED = "stopped"
    STARTING = "starting"  # StartEngine: engine_ready or engine_start_failed is due
    WAKING = "waking"  # WakeEngine: engine_woke or wake_failed is due
    READY = "ready"
    DRAINING = "draining"  # stopped once drained
    DRAINING_TO_SLEEP = "draining to sleep"  # put to sleep once drained
    STOPPING = "stopping"  # StopEngine of an awake (or starting) engine: holds its share
    STOPPING_ASLEEP = "stopping asleep"  # StopEngine of a sleeping engine: holds only sleep_share
    FALLING_ASLEEP = "falling asleep"  # SleepEngine: engine_slept or sleep_failed is due
    FALLING_ASLEEP_THEN_STOP = "falling asleep, then stop"  # stopped once asleep (Lane.stop_reason)
    SLEEPING = "sleeping"
    FAILED = "failed"

    @property
    def state(self) -> LaneState:
        return _SHOWN_AS[self]


_SHOWN_AS = {
    Stage.STOPPED: LaneState.STOPPED,
    Stage.STARTING: LaneState.STARTING,
    Stage.WAKING: LaneState.STARTING,
    Stage.READY: LaneState.READY,
    Stage.DRAINING: LaneState.DRAINING,
    Stage.DRAINING_TO_SLEEP: LaneState.DRAINING,
    Stage.STOPPING: LaneState.STOPPING,
    Stage.STOPPING_ASLEEP: LaneState.STOPPING,
    Stage.FALLING_ASLEEP: LaneState.STOPPING,
    Stage.FALLING_ASLEEP_THEN_STOP: LaneState.STOPPING,
    Stage.SLEEPING: LaneState.SLEEPING,
    Stage.FAILED: LaneState.FAILED,
}
_GOING_TO_SLEEP = frozenset({Stage.FALLING_ASLEEP, Stage.FALLING_ASLEEP_THEN_STOP})  # SleepEngine sent

# Reasons the actions carry (metrics labels, logs, error codes): these strings and no others.
CloseReason = Literal["idle", "max_wait", "cost", "load"]  # why a lane is switched out (see Policy)
SwitchReason = Literal[CloseReason, "co_resident"]  # SwitchPlanned: co_resident = it fits beside others
StopReason = Literal[CloseReason, "unload", "idle_timeout", "shutdown", "sleep_failed", "wake_failed", "stalled"]
RejectCode = Literal["queue_full", "queue_timeout", "lane_failed", "shutting_down", "cluster_unavailable"]
# AbortInflight: drain_timeout = a started stream cut at the second drain bound (2 D); hung_twice = a request
# that held its engine past the drain bound (or stalled it) a second time; stalled = a started stream on a
# stalled engine
AbortReason = Literal["drain_timeout", "hung_twice", "stalled"]
PreemptReason = Literal["drain_timeout", "stalled"]  # Preempt: why unanswered requests went back in line


@dataclass(frozen=True)
class LanePolicy:
    name: str
    share: float = 0.9  # GPU memory fraction (vLLM's gpu_memory_utilization)
    idle_timeout: float | None = None  # stop the lane after this long unused
    sleep_level: int = 0  # vLLM sleep mode: 0 off (stop/start), 1 or 2 (sleep/wake)
    sleep_share: float = 0.0  # memory a sleeping engine holds (level 1: its weights; level 2: overhead)
    max_inflight: int | None = None  # N_L: requests in its engine at once (--max-num-seqs); None: no limit

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("lane name must not be empty")
        if not self.share > 0:
            raise ValueError(f"lane {self.name}: share must be > 0")
        if self.idle_timeout is not None and not self.idle_timeout > 0:
            raise ValueError(f"lane {self.name}: idle_timeout must be > 0")
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"lane {self.name}: sleep_level must be 0, 1 or 2")
        if not 0 <= self.sleep_share <= self.share:
            raise ValueError(f"lane {self.name}: sleep_share must be in [0, share]")
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ValueError(f"lane {self.name}: max_inflight must be >= 1")


@dataclass(frozen=True)
class SchedulerSettings:
    # The first six are server settings, which the server passes (config.scheduler_settings); their
    # defaults here, for tests and bench/, are the settings table's (tests/test_settings_defaults.py
    # holds them equal). The rest are the scheduler's own.
    switch_max_wait: float = 120.0  # the cap B (VLLM_SWITCH_MAX_WAIT), chosen by bench/scheduling.py
    drain_timeout: float = 120.0
    queue_max: int = 4096  # requests waiting in the launcher's queues, all lanes
    queue_timeout: float = 600.0  # a loaded lane that takes none of its queue for this long: its queue gets 503
    memory_budget: float | None = None  # None: the largest lane share
    max_restarts: int = 5
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    healthy_after_requests: int = 3  # requests an engine finishes before its crash is no crash loop
    healthy_after_seconds: float = 60.0  # an engine ready this long served: its crash is no crash loop
    failed_cooloff: float = 300.0  # a FAILED lane is tried again after this long (systemd's start limit)
    switch_seconds_estimate: float = 60.0  # initial estimate for Retry-After
    request_seconds_estimate: float = 1.0  # initial per-queued-request cost
    # Per-lane cost estimates before the first measurement (then measured: see observe_engine_seconds).
    start_seconds_estimate: float = 60.0
    stop_seconds_estimate: float = 5.0
    wake_seconds_estimate: float = 5.0
    sleep_seconds_estimate: float = 5.0
    service_seconds_estimate: float = 10.0  # a lane's mean service time before its first finish
    service_window: int = 32  # recent service times kept per lane
    cost_theta: float = 4.0  # theta of the cost test (a busy lane closes when the waiters lose theta x more)
    fair_wait: float | None = 60.0  # F: oldest waiter first once a waiter waited this long (None, or > B: B)

    def __post_init__(self) -> None:
        for name in ("switch_max_wait", "drain_timeout", "queue_timeout", "backoff_initial", "backoff_max",
                     "start_seconds_estimate", "stop_seconds_estimate", "wake_seconds_estimate",
                     "sleep_seconds_estimate", "service_seconds_estimate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.queue_max < 0:
            raise ValueError("queue_max must be >= 0")
        if self.max_restarts < 1:
            raise ValueError("max_restarts must be >= 1")
        if not self.cost_theta > 0:
            raise ValueError("cost_theta must be > 0")
        if self.fair_wait is not None and self.fair_wait < 0:
            raise ValueError("fair_wait must be >= 0")
        if self.service_window < 1:
            raise ValueError("service_window must be >= 1")
        if self.healthy_after_requests < 1:
            raise ValueError("healthy_after_requests must be >= 1")
        if not (self.healthy_after_seconds > 0 and self.failed_cooloff > 0):
            raise ValueError("healthy_after_seconds and failed_cooloff must be > 0")
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise ValueError("memory_budget must be > 0")


# --------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Dispatch:
    request_id: Hashable
    lane: str


@dataclass(frozen=True)
class Reject:
    request_id: Hashable
    lane: str
    status: int
    code: RejectCode
    message: str
    retry_after: float | None = None


@dataclass(frozen=True)
class StartEngine:
    lane: str
    attempt: int  # 1 for a fresh start, n for the n-th attempt after failures
    sleep_mode: bool = False  # start with --enable-sleep-mode (the lane may be put to sleep later)


@dataclass(frozen=True)
class StopEngine:
    lane: str
    reason: StopReason


@dataclass(frozen=True)
class SleepEngine:
    """Put the lane's (drained, idle) engine to sleep at ``level``; report engine_slept or sleep_failed."""

    lane: str
    level: int  # 1 or 2 (vLLM's POST /sleep?level=)
    reason: CloseReason


@dataclass(frozen=True)
class WakeEngine:
    """Wake the lane's sleeping engine (vLLM's POST /wake_up); report engine_woke or wake_failed."""

    lane: str


@dataclass(frozen=True)
class AbortInflight:
    lane: str
    request_ids: tuple[Hashable, ...]
    reason: AbortReason


@dataclass(frozen=True)
class Preempt:
    """Cancel these in-flight requests upstream (none of their engine output reached the client):
    they are back at the head of their lane's queue and a later ``Dispatch`` sends them again.
    Do not call ``finish`` for them; a ``finish`` for them before that ``Dispatch`` is ignored."""

    lane: str
    request_ids: tuple[Hashable, ...]
    reason: PreemptReason


@dataclass(frozen=True)
class LaneStateChanged:
    lane: str
    old: LaneState
    new: LaneState
    reason: str


@dataclass(frozen=True)
class SwitchPlanned:
    from_lanes: tuple[str, ...]
    to_lane: str
    reason: SwitchReason


Action = (Dispatch | Reject | StartEngine | StopEngine | SleepEngine | WakeEngine | AbortInflight | Preempt
          | LaneStateChanged | SwitchPlanned)


# ----------------------------------------------------------------- internals


@dataclass
class _Request:
    request_id: Hashable
    lane: str
    submitted: float
    dispatched: float | None = None
    seq: int = 0  # submission order (FIFO between requests submitted at the same time)
    preempted: int = 0  # times it went back in line (at most once: see "Preemption")
    started: bool = False  # some of its engine output reached its client: it can no longer go back in line


@dataclass
class _Lane:
    policy: LanePolicy
    index: int
    stage: Stage = Stage.STOPPED
    queue: OrderedDict[Hashable, _Request] = field(default_factory=OrderedDict)
    inflight: dict[Hashable, _Request] = field(default_factory=dict)
    last_used: float = -math.inf
    ready_since: float | None = None
    drain_started: float | None = None
    drain_reason: StopReason = "unload"  # DRAINING: the reason it stops or sleeps with (set by each drain)
    window: int | None = None  # requests sent to its engine at most now (<= max_inflight; the gauges lower it)
    progress_at: float = -math.inf  # READY: when it last took a request of its queue (or became ready)
    preemptions: int = 0  # requests that went back in line, for /lanes and metrics
    failures: int = 0  # consecutive crash loops: failed starts, crashes before serving a few requests
    setbacks: int = 0  # failed starts that do not count (the server's own resources), for the back-off
    served: int = 0  # requests finished by the current engine since it became ready
    output_seen: bool = False  # some output of the current engine reached a client since it became ready
    hung: str | None = None  # STOPPING after engine_hung: the cause, a failure once stopped
    hangs: int = 0  # consecutive hangs of engines that did not serve in between
    restarts: int = 0  # starts that were retries, for /lanes and metrics
    retry_at: float | None = None  # back-off: no start before this time
    restart_pending: bool = False  # crashed while ready: restart even without waiters
    load_requested: float | None = None  # operator load() time, first candidate
    last_cause: str | None = None
    # sleep mode
    sleep_off: str | None = None  # why sleep mode fell back to stop/start for good (None: not fallen back)
    stop_reason: StopReason = "unload"  # FALLING_ASLEEP_THEN_STOP: the StopEngine reason once asleep
    # measurements
    op_since: float | None = None  # when the pending start/stop/sleep/wake was asked for
    costs: dict[str, float] = field(default_factory=dict)  # measured seconds: start, stop, sleep, wake
    services: deque[float] = field(default_factory=deque)  # recent service times (dispatch to finish)

    def __post_init__(self) -> None:
        self.window = self.policy.max_inflight

    @property
    def state(self) -> LaneState:
        return self.stage.state

    @property
    def name(self) -> str:
        return self.policy.name

    def has_room(self) -> bool:
        """Its engine may take one more request (the dispatch limit)."""
        return self.window is None or len(self.inflight) < self.window

    @property
    def share(self) -> float:
        return self.policy.share

    @property
    def keep(self) -> float:
        """Memory the lane holds while asleep."""
        return self.policy.sleep_share

    @property
    def can_sleep(self) -> bool:
        return self.policy.sleep_level > 0 and self.sleep_off is None

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
        self._seq = 0
        self._now = -math.inf
        self._shutting_down = False
        self._planned: dict[str, float] = {}  # lanes that lanes were taken down for -> when (committed)
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
        self._seq += 1
        req = _Request(request_id, lane, now, seq=self._seq)
        if ln.state is LaneState.READY and not ln.queue and ln.has_room():
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

    def finish(self, request_id: Hashable, now: float, service_seconds: float | None = None,
               *, sample: bool = True) -> list[Action]:
        """A dispatched request ended (any outcome).  Its service time (``service_seconds``, by
        default dispatch to ``now``) is learnt for its lane unless ``sample`` is False (a client
        that left early, an error: durations that say nothing about the lane's service)."""
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
            duration = now - req.dispatched if service_seconds is None else service_seconds
            cost = duration / max(1, concurrency)
            self._request_estimate = 0.8 * self._request_estimate + 0.2 * cost
            if sample and duration >= 0 and math.isfinite(duration):
                ln.services.append(duration)
                while len(ln.services) > self.settings.service_window:
                    ln.services.popleft()
        self._schedule(now, out)
        return out

    def cancel(self, request_id: Hashable, now: float) -> list[Action]:
        now, out = self._begin(now)
        req = self._requests.get(request_id)
        if req is not None and req.dispatched is None:
            self._remove_queued(req)
        self._schedule(now, out)
        return out

    def output_started(self, request_id: Hashable, now: float) -> list[Action]:
        """Some of the request's engine output reached its client (a stream's first engine byte
        relayed; a whole answer read): it can no longer go back in line (see "Preemption")."""
        now, out = self._begin(now)
        req = self._requests.get(request_id)
        if req is not None and req.dispatched is not None:
            req.started = True
            self._lanes[req.lane].output_seen = True  # its engine served (see "Restarts")
        return out

    def engine_load(self, lane: str, now: float, running: int, waiting: int) -> list[Action]:
        """The engine's own gauges (vLLM's ``vllm:num_requests_running`` / ``_waiting``): while it
        queues requests internally (``waiting > 0``) the lane's window is what it really runs
        (at least 1); while it runs all it was given and queues none, the window doubles, up to
        ``max_inflight``."""
        ln = self._lane(lane)
        now, out = self._begin(now)
        limit = ln.policy.max_inflight
        if limit is not None and ln.window is not None and ln.state in (LaneState.READY, LaneState.DRAINING):
            if waiting > 0:
                ln.window = min(limit, max(1, running))
            elif running >= ln.window:
                ln.window = min(limit, 2 * ln.window)
        self._schedule(now, out)
        return out

    def preempt(self, lane: str, now: float, reason: PreemptReason = "stalled") -> list[Action]:
        """The lane's engine holds requests it does not answer (the stalled-engine watchdog): the
        preemption rule for each request in flight (see "Preemption"), then the engine is stopped
        (``StopEngine(lane, "stalled")``); the requests back in line load the lane again."""
        ln = self._lane(lane)
        now, out = self._begin(now)
        if ln.state in (LaneState.READY, LaneState.DRAINING):
            self._preempt(ln, tuple(ln.inflight), reason, now, out, final=True)
            self._stop(ln, "stalled", now, out)
        self._schedule(now, out)
        return out

    def engine_hung(self, lane: str, now: float, cause: str) -> list[Action]:
        """The stalled-engine watchdog declared the lane's engine hung: the preemption rule for
        its requests in flight (:meth:`preempt`: back in line, started streams cut, a request
        that hung an engine twice failed), ``StopEngine(lane, "stalled")``, and once it has
        stopped the lane backs off and restarts as after a crash; the hang is a crash loop unless
        the engine served (see "Restarts")."""
        ln = self._lane(lane)
        if ln.state not in (LaneState.READY, LaneState.DRAINING) or self._shutting_down:
            return self.tick(now)
        served = self._served_well(ln, now)
        failures = 0 if served else ln.failures
        ln.hangs = 1 if served else ln.hangs + 1
        out = self.preempt(lane, now, "stalled")
        ln.failures = failures  # a hang is no clean stop (_stop reset the count)
        ln.hung = cause
        return out

    def hung_again(self, lane: str, now: float) -> bool:
        """The lane's engine hangs and the previous one hung too, with nothing served between
        (see :meth:`engine_hung`): a GPU hang rather than one bad request."""
        ln = self._lane(lane)
        return ln.hangs >= 1 and not self._served_well(ln, now)

    def engine_ready(self, lane: str, now: float) -> list[Action]:
        ln = self._lane(lane)
        now, out = self._begin(now)
        if ln.state is LaneState.STARTING:
            woke = ln.stage is Stage.WAKING
            self._measure(ln, "wake" if woke else "start", now)
            self._transition(ln, Stage.READY, "engine woke" if woke else "engine ready", out)
            ln.setbacks = 0
            ln.served = 0
            ln.output_seen = False
            ln.ready_since = now
            ln.last_used = now
            ln.load_requested = None
            ln.progress_at = now
            self._dispatch_queued(ln, now, out)
        self._schedule(now, out)
        return out

    def engine_woke(self, lane: str, now: float) -> list[Action]:
        """The engine woke up after :class:`WakeEngine`: the lane is ready (as engine_ready)."""
        return self.engine_ready(lane, now)

    def engine_start_failed(self, lane: str, now: float, cause: str, counts: bool = True,
                            reject_queued: bool = False) -> list[Action]:
        """``counts=False``: the start failed for the server's own resources (EMFILE), not the
        engine's; back off, but never fail the lane for it. ``reject_queued``: the requests
        waiting for the lane end with 503 and the cause (a multi-node lane whose cluster lacked
        nodes until the start timeout); the lane starts again for the next request."""
        ln = self._lane(lane)
        if ln.stage is Stage.WAKING:
            return self.wake_failed(lane, now, cause)
        now, out = self._begin(now)
        if ln.stage is Stage.STARTING:
            ln.op_since = None
            self._failure(ln, now, cause, restart=False, out=out, counts=counts)
            if reject_queued and ln.state is LaneState.STOPPED:
                ln.load_requested = None
                ln.retry_at = None
                for req in list(ln.queue.values()):
                    self._remove_queued(req)
                    out.append(Reject(req.request_id, ln.name, 503, "cluster_unavailable",
                                      f"lane {ln.name} could not start: {cause}"))
        self._schedule(now, out)
        return out

    def engine_exited(self, lane: str, now: float, cause: str) -> list[Action]:
        ln = self._lane(lane)
        now, out = self._begin(now)
        if ln.stage is Stage.SLEEPING:
            # A sleeping engine died: nothing was in flight and nothing is lost; it is simply gone.
            self._transition(ln, Stage.STOPPED, f"engine exited while asleep: {cause}", out)
        elif ln.stage is Stage.WAKING:
            # Died while waking: a failed wake whose process is already gone (no StopEngine).
            self._sleep_fallback(ln, f"wake failed: {cause}", Stage.STOPPED, out)
            ln.op_since = None
        elif ln.state in (LaneState.READY, LaneState.DRAINING, LaneState.STARTING):
            was_ready = ln.state is LaneState.READY
            for request_id in ln.inflight:
                del self._requests[request_id]
            ln.inflight.clear()
            ln.op_since = None
            if ln.state is not LaneState.STARTING and self._served_well(ln, now):
                ln.failures = 0  # it served: this crash is the first of a new count
            ln.hangs = 0
            self._failure(ln, now, cause, restart=was_ready, out=out)
        self._schedule(now, out)
        return out

    def engine_stopped(self, lane: str, now: float) -> list[Action]:
        ln = self._lane(lane)
        now, out = self._begin(now)
        if ln.state is LaneState.STOPPING:
            if ln.stage not in _GOING_TO_SLEEP:
                self._measure(ln, "stop", now)
            ln.op_since = None
            hung, ln.hung = ln.hung, None
            if hung is not None and not self._shutting_down:
                self._failure(ln, now, hung, restart=True, out=out)  # back-off, as after a crash
            else:
                self._transition(ln, Stage.STOPPED, "engine stopped", out)
        self._schedule(now, out)
        return out

    def engine_slept(self, lane: str, now: float) -> list[Action]:
        """The engine is asleep after :class:`SleepEngine`: the lane is SLEEPING (holds sleep_share)."""
        ln = self._lane(lane)
        now, out = self._begin(now)
        if ln.stage in _GOING_TO_SLEEP:
            self._measure(ln, "sleep", now)
            then_stop = ln.stage is Stage.FALLING_ASLEEP_THEN_STOP
            self._transition(ln, Stage.SLEEPING, "engine asleep", out)
            if then_stop or self._shutting_down:
                self._stop(ln, "shutdown" if self._shutting_down else ln.stop_reason, now, out)
        self._schedule(now, out)
        return out

    def sleep_failed(self, lane: str, now: float, cause: str) -> list[Action]:
        """Sleep mode does not work for this lane: after :class:`SleepEngine` (the engine is then
        stopped: StopEngine, engine_stopped), or at any time (e.g. an engine that refuses
        ``--enable-sleep-mode``: report this, then engine_start_failed).  Either way the lane
        falls back to stop/start for good (this scheduler's lifetime), logged once."""
        ln = self._lane(lane)
        now, out = self._begin(now)
        if ln.stage in _GOING_TO_SLEEP:
            self._sleep_fallback(ln, f"sleep failed: {cause}", Stage.STOPPING, out)
            ln.op_since = now
            out.append(StopEngine(ln.name, "sleep_failed"))
        elif ln.stage is Stage.SLEEPING:
            self._sleep_fallback(ln, f"sleep failed: {cause}", Stage.SLEEPING, out)
            self._stop(ln, "sleep_failed", now, out)
        else:
            self._sleep_fallback(ln, f"sleep failed: {cause}", ln.stage, out)
        self._schedule(now, out)
        return out

    def wake_failed(self, lane: str, now: float, cause: str) -> list[Action]:
        """The engine did not wake after :class:`WakeEngine`: it is stopped (StopEngine, then
        engine_stopped) and the lane falls back to stop/start for good; its queued requests keep
        their place and are served by a cold start."""
        ln = self._lane(lane)
        now, out = self._begin(now)
        if ln.stage is Stage.WAKING:
            self._sleep_fallback(ln, f"wake failed: {cause}", Stage.STOPPING, out)
            ln.op_since = now
            out.append(StopEngine(ln.name, "wake_failed"))
        self._schedule(now, out)
        return out

    def observe_engine_seconds(self, lane: str, phase: str, seconds: float) -> None:
        """Feed a measured duration of ``phase`` (start, stop, sleep, wake) for ``lane``.  The
        scheduler measures these itself (from the action to its report, with the ``now`` it is
        given); the I/O layer may feed its own, more exact, figures too."""
        ln = self._lane(lane)
        if phase not in ("start", "stop", "sleep", "wake"):
            raise ValueError(f"unknown phase {phase!r}")
        if seconds >= 0 and math.isfinite(seconds):
            old = ln.costs.get(phase)
            ln.costs[phase] = seconds if old is None else 0.7 * old + 0.3 * seconds

    def load(self, lane: str, now: float) -> list[Action]:
        """Operator: load the lane now, evicting what conflicts (no hold)."""
        ln = self._lane(lane)
        now, out = self._begin(now)
        if not self._shutting_down:
            if ln.state is LaneState.FAILED:
                self._transition(ln, Stage.STOPPED, "load", out)
                ln.failures = 0
            if ln.state in (LaneState.STOPPED, LaneState.SLEEPING, LaneState.DRAINING, LaneState.STOPPING):
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
        waiting = bool(self._waiting())
        for ln in self._lanes.values():
            oldest = ln.oldest()
            if oldest is not None:
                if ln.state is LaneState.READY:
                    deadlines.append(ln.progress_at + s.queue_timeout)
                elif ln.state is not LaneState.STARTING and not self._shutting_down:
                    deadlines.append(oldest + s.switch_max_wait)
                    deadlines.append(oldest + self._fair_wait())
            if ln.state is LaneState.DRAINING and ln.drain_started is not None:
                deadlines.append(ln.drain_started + s.drain_timeout)
                deadlines.append(ln.drain_started + self._drain_bound())
            if ln.state is LaneState.READY and ln.policy.idle_timeout is not None and not ln.inflight:
                deadlines.append(ln.last_used + ln.policy.idle_timeout)
            if ln.state is LaneState.READY and ln.inflight and waiting:
                # the cost test's R reaches 0 (ext is largest) when the in-flight requests are due
                deadlines.append(self._now + self._remaining(ln, self._now))
                if ln.queue and ln.ready_since is not None:
                    deadlines.append(ln.ready_since + s.drain_timeout)  # its turn may end (see _closable)
            if ln.state is LaneState.FAILED and ln.retry_at is not None and not self._shutting_down:
                deadlines.append(ln.retry_at)  # its cool-off ends
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

    def stage(self, lane: str) -> Stage:
        """The lane's state with its sleep-mode step (:class:`Stage`)."""
        return self._lane(lane).stage

    def costs(self, lane: str) -> dict[str, float]:
        """Seconds a start, stop, sleep and wake of the lane take: measured, else the defaults."""
        ln = self._lane(lane)
        s = self.settings
        defaults = {"start": s.start_seconds_estimate, "stop": s.stop_seconds_estimate,
                    "sleep": s.sleep_seconds_estimate, "wake": s.wake_seconds_estimate}
        return {phase: ln.costs.get(phase, default) for phase, default in defaults.items()}

    def service_seconds(self, lane: str) -> float:
        """The lane's mean service time over its recent finishes (the default before any)."""
        ln = self._lane(lane)
        if not ln.services:
            return self.settings.service_seconds_estimate
        return sum(ln.services) / len(ln.services)

    def sleep_off(self, lane: str) -> str | None:
        """Why sleep mode fell back to stop/start for this lane (None: it has not)."""
        return self._lane(lane).sleep_off

    def queue_depth(self, lane: str) -> int:
        return len(self._lane(lane).queue)

    def inflight(self, lane: str) -> int:
        return len(self._lane(lane).inflight)

    def window(self, lane: str) -> int | None:
        """Requests the lane's engine may hold now (None: no dispatch limit)."""
        return self._lane(lane).window

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
        return sum(self._held(ln) for ln in self._lanes.values())

    def _held(self, ln: _Lane) -> float:
        if ln.stage in (Stage.SLEEPING, Stage.STOPPING_ASLEEP):
            return ln.keep
        return ln.share if ln.state in RESIDENT_STATES else 0.0

    def is_idle(self) -> bool:
        """Everything stopped or failed, nothing queued and nothing in flight."""
        return not self._requests and all(
            ln.state in (LaneState.STOPPED, LaneState.FAILED) for ln in self._lanes.values()
        )

    def snapshot(self) -> dict[str, Any]:
        """Plain data for ``GET /lanes``."""
        lanes = {}
        for ln in self._lanes.values():
            lanes[ln.name] = {
                "state": str(ln.state),
                "share": ln.share,
                "queue_depth": len(ln.queue),
                "inflight": len(ln.inflight),
                "max_inflight": ln.policy.max_inflight,
                "window": ln.window,
                "preemptions": ln.preemptions,
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
                "sleep_level": ln.policy.sleep_level,
                "sleep_share": ln.keep,
                "sleep_off": ln.sleep_off,
                "stage": ln.stage.value,
                "costs": self.costs(ln.name),
                "service_seconds": self.service_seconds(ln.name),
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
            if ln.state is LaneState.READY and ln.queue:
                assert not ln.has_room(), f"ready lane {ln.name} has a queue and room in its window"
            if ln.policy.max_inflight is not None:
                assert ln.window is not None and 1 <= ln.window <= ln.policy.max_inflight
                assert len(ln.inflight) <= ln.policy.max_inflight, f"lane {ln.name} over its dispatch limit"
            for req in ln.inflight.values():
                assert req.preempted <= 1
            if ln.state not in (LaneState.READY, LaneState.DRAINING):
                assert not ln.inflight, f"{ln.state} lane {ln.name} has requests in flight"
            if ln.state is LaneState.FAILED:
                assert not ln.queue
            if ln.stage in (Stage.DRAINING_TO_SLEEP, *_GOING_TO_SLEEP):
                assert ln.can_sleep, f"lane {ln.name} {ln.stage.value} without sleep mode"
            assert ln.state is not LaneState.SLEEPING or ln.can_sleep or ln.sleep_off is not None
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

    def _transition(self, ln: _Lane, new: Stage, reason: str, out: list[Action]) -> None:
        """To ``new``, recorded when its LaneState differs (a step within one state is not)."""
        old = ln.state
        ln.stage = new
        if old is not new.state:
            out.append(LaneStateChanged(ln.name, old, new.state, reason))

    def _dispatch(self, ln: _Lane, req: _Request, now: float, out: list[Action]) -> None:
        req.dispatched = now
        ln.inflight[req.request_id] = req
        ln.last_used = now
        out.append(Dispatch(req.request_id, ln.name))

    def _dispatch_queued(self, ln: _Lane, now: float, out: list[Action]) -> None:
        """A READY lane takes its queue, in order, while its window has room."""
        while ln.queue and ln.has_room():
            _, req = ln.queue.popitem(last=False)
            self._queued -= 1
            ln.progress_at = now
            self._dispatch(ln, req, now, out)

    def _preempt(self, ln: _Lane, ids: tuple[Hashable, ...], reason: PreemptReason, now: float,
                 out: list[Action], final: bool) -> None:
        """The preemption rule, for the in-flight requests ``ids`` of ``ln`` (see "Preemption"): a
        request none of whose output reached its client and never preempted goes back to the head
        of its lane's queue (while shutting down: 503 shutting_down instead); with ``final``, every
        other one ends: a started stream is cut, a request back in line once fails (hung_twice).
        Without ``final`` those stay in flight."""
        back = [ln.inflight[i] for i in ids if not ln.inflight[i].started and not ln.inflight[i].preempted]
        for req in back:
            del ln.inflight[req.request_id]
            req.dispatched = None
            req.preempted += 1
            ln.preemptions += 1
        if back:
            out.append(Preempt(ln.name, tuple(r.request_id for r in back), reason))
        for req in sorted(back, key=lambda r: (r.submitted, r.seq), reverse=True):
            if self._shutting_down:
                del self._requests[req.request_id]
                out.append(Reject(req.request_id, ln.name, 503, "shutting_down", "the server is shutting down"))
            else:
                ln.queue[req.request_id] = req
                ln.queue.move_to_end(req.request_id, last=False)
                self._queued += 1
        if not final:
            return
        cut = tuple(i for i in ids if i in ln.inflight and ln.inflight[i].started)
        failed = tuple(i for i in ids if i in ln.inflight and not ln.inflight[i].started)
        for request_id in (*cut, *failed):
            del ln.inflight[request_id]
            del self._requests[request_id]
        if cut:
            out.append(AbortInflight(ln.name, cut, "drain_timeout" if reason == "drain_timeout" else "stalled"))
        if failed:
            out.append(AbortInflight(ln.name, failed, "hung_twice"))

    def _drain_bound(self) -> float:
        """How long after its start a drain ends (see "Preemption"): 2 D, D while shutting down."""
        return self.settings.drain_timeout * (1 if self._shutting_down else 2)

    def _remove_queued(self, req: _Request) -> None:
        del self._lanes[req.lane].queue[req.request_id]
        del self._requests[req.request_id]
        self._queued -= 1

    def _failed_reject(self, request_id: Hashable, ln: _Lane) -> Reject:
        message = f"lane {ln.name} failed to start: {ln.last_cause or 'unknown cause'}"
        retry = None
        if ln.retry_at is not None:
            retry = float(max(1, math.ceil(ln.retry_at - self._now)))
            message += (f" (lane failed after {ln.failures} consecutive crash loops; it is tried again in "
                        f"{retry:.0f} s, after a cool-off of {self.settings.failed_cooloff:g} s, or at once by "
                        f"POST /lanes/{ln.name}/load)")
        return Reject(request_id, ln.name, 503, "lane_failed", message, retry)

    def _served_well(self, ln: _Lane, now: float) -> bool:
        """The current (ready or draining) engine served (see "Restarts"): its crash or hang is no
        crash loop."""
        s = self.settings
        return (ln.output_seen or ln.served >= s.healthy_after_requests
                or (ln.ready_since is not None and now - ln.ready_since >= s.healthy_after_seconds))

    def _end_cooloffs(self, now: float, out: list[Action]) -> None:
        """FAILED lanes whose cool-off is over are STOPPED with one attempt left (see "Restarts")."""
        if self._shutting_down:
            return
        for ln in self._lanes.values():
            if ln.stage is Stage.FAILED and ln.retry_at is not None and now >= ln.retry_at:
                ln.failures = self.settings.max_restarts - 1
                ln.retry_at = None
                ln.restart_pending = True  # started if it fits without evicting anything
                self._transition(ln, Stage.STOPPED, f"cool-off over ({self.settings.failed_cooloff:g} s): "
                                 "tried again", out)

    def _retry_after(self, ln: _Lane) -> float:
        """Seconds a request for ``ln`` joining now should expect to wait, from the lane's own
        figures: until its turn (0 when loaded; else what its start or wake has left, plus, when
        another lane holds the memory, that lane's drain and its way down), then the lane's queue
        ahead served at its own rate (window / its mean service time)."""
        costs = self.costs(ln.name)
        turn = 0.0
        if ln.state is not LaneState.READY:
            bring = costs["wake"] if ln.stage in (Stage.SLEEPING, Stage.WAKING) else costs["start"]
            if ln.state is LaneState.STARTING and ln.op_since is not None:
                bring = max(0.0, bring - (self._now - ln.op_since))
            turn = bring
            if ln.state is not LaneState.STARTING:
                turn += max((min(self.settings.drain_timeout, self._remaining(o, self._now))
                             + self.costs(o.name)["sleep" if o.can_sleep else "stop"]
                             for o in self._lanes.values() if o is not ln and o.state in RESIDENT_STATES),
                            default=0.0)
        rate = (ln.window or max(1, len(ln.inflight))) / max(EPS, self.service_seconds(ln.name))
        return float(max(1, math.ceil(turn + len(ln.queue) / rate)))

    def _failure(self, ln: _Lane, now: float, cause: str, restart: bool, out: list[Action],
                 counts: bool = True) -> None:
        s = self.settings
        if counts:
            ln.failures += 1
        else:
            ln.setbacks += 1
        ln.last_cause = cause
        if ln.failures >= s.max_restarts:
            self._transition(ln, Stage.FAILED, f"{ln.failures} consecutive failures", out)
            ln.retry_at = now + s.failed_cooloff  # tried again then (_end_cooloffs)
            ln.restart_pending = False
            ln.load_requested = None
            for req in list(ln.queue.values()):
                self._remove_queued(req)
                out.append(self._failed_reject(req.request_id, ln))
            return
        self._transition(ln, Stage.STOPPED, "start failed" if not restart else "engine exited", out)
        backoff = min(s.backoff_max, s.backoff_initial * 2 ** (ln.failures + ln.setbacks - 1))
        ln.retry_at = now + backoff
        ln.restart_pending = restart

    def _stop(self, ln: _Lane, reason: StopReason, now: float, out: list[Action]) -> None:
        if ln.state is LaneState.READY:
            ln.failures = 0  # taken down cleanly while ready: no crash loop
        self._transition(ln, Stage.STOPPING_ASLEEP if ln.stage is Stage.SLEEPING else Stage.STOPPING, reason, out)
        ln.drain_started = None
        ln.op_since = now
        out.append(StopEngine(ln.name, reason))

    def _close(self, ln: _Lane, reason: StopReason, now: float, out: list[Action], sleep: bool) -> None:
        """A drained lane leaves: put to sleep if ``sleep`` (not while shutting down), else stopped."""
        if sleep and not self._shutting_down:
            if ln.state is LaneState.READY:
                ln.failures = 0
            self._transition(ln, Stage.FALLING_ASLEEP, reason, out)
            ln.drain_started = None
            ln.op_since = now
            # only a switch puts a lane to sleep: its reason is a CloseReason
            out.append(SleepEngine(ln.name, ln.policy.sleep_level, cast(CloseReason, reason)))
        else:
            self._stop(ln, reason, now, out)

    def _sleep_fallback(self, ln: _Lane, cause: str, new: Stage, out: list[Action]) -> None:
        """Sleep mode off for this lane for good; logged once as a LaneStateChanged reason (old and
        new states may be equal)."""
        first = ln.sleep_off is None and ln.policy.sleep_level > 0
        if first:
            ln.sleep_off = cause
        ln.last_cause = cause
        reason = f"{cause}; sleep mode off for this lane, stop/start from now on" if first else cause
        if new is Stage.DRAINING_TO_SLEEP:
            new = Stage.DRAINING  # it can sleep no more: it stops once drained
        old = ln.state
        ln.stage = new
        if first or old is not new.state:
            out.append(LaneStateChanged(ln.name, old, new.state, reason))

    def _measure(self, ln: _Lane, phase: str, now: float) -> None:
        if ln.op_since is not None:
            self.observe_engine_seconds(ln.name, phase, now - ln.op_since)
        ln.op_since = None

    def _take_down(self, ln: _Lane, now: float, reason: StopReason, out: list[Action]) -> None:
        """Unload or shutdown: drain a ready lane, stop a starting or sleeping one, cancel restarts."""
        ln.load_requested = None
        ln.restart_pending = False
        if ln.state is LaneState.READY:
            self._drain(ln, now, reason, out)
        elif ln.stage is Stage.DRAINING_TO_SLEEP:
            ln.stage = Stage.DRAINING  # stopped once drained, not put to sleep
        elif ln.state in (LaneState.STARTING, LaneState.SLEEPING):
            self._stop(ln, reason, now, out)
        elif ln.stage in _GOING_TO_SLEEP:
            ln.stage = Stage.FALLING_ASLEEP_THEN_STOP
            ln.stop_reason = reason

    def _drain(self, ln: _Lane, now: float, reason: StopReason, out: list[Action], sleep: bool = False) -> None:
        ln.failures = 0  # taken down cleanly while ready: no crash loop
        sleep = sleep and ln.can_sleep
        if not ln.inflight:
            self._close(ln, reason, now, out, sleep)
            return
        self._transition(ln, Stage.DRAINING_TO_SLEEP if sleep else Stage.DRAINING, reason, out)
        ln.drain_started = now
        ln.drain_reason = reason

    # ------------------------------------------------------------ the policy

    def _schedule(self, now: float, out: list[Action]) -> None:
        s = self.settings
        self._end_cooloffs(now, out)
        for ln in self._lanes.values():
            if ln.state is LaneState.READY:
                self._dispatch_queued(ln, now, out)
                if ln.queue and now >= ln.progress_at + s.queue_timeout:
                    # loaded, and none of its queue taken for queue_timeout: its engine is stuck
                    for req in list(ln.queue.values()):
                        self._remove_queued(req)
                        out.append(Reject(
                            req.request_id, ln.name, 503, "queue_timeout",
                            f"lane {ln.name} is loaded but took no request of its queue for {s.queue_timeout:g} s "
                            "(VLLM_QUEUE_TIMEOUT): its engine is stuck; retry later", self._retry_after(ln)))
            if ln.state is LaneState.DRAINING:
                if ln.drain_started is not None and now >= ln.drain_started + s.drain_timeout:
                    # D: what may go back in line does; 2 D: what is left is cut or failed. While
                    # shutting down nothing goes back in line (it gets 503), so D ends it all: the
                    # shutdown is bounded by VLLM_DRAIN_TIMEOUT, as the unit's stop timeout assumes
                    final = now >= ln.drain_started + self._drain_bound()
                    self._preempt(ln, tuple(ln.inflight), "drain_timeout", now, out, final=final)
                if not ln.inflight:
                    self._close(ln, ln.drain_reason, now, out, sleep=ln.stage is Stage.DRAINING_TO_SLEEP)
            elif (
                ln.state is LaneState.READY
                and ln.policy.idle_timeout is not None
                and not ln.inflight
                and now >= ln.last_used + ln.policy.idle_timeout
            ):
                self._stop(ln, "idle_timeout", now, out)
        if not self._shutting_down:
            self._plan(now, out)

    def _candidate(self, now: float) -> _Lane | None:
        """The next lane to load: an operator's load first, then a lane that others were already
        taken down for (a planned switch is kept), then the waiting lanes: oldest waiter first
        once a waiter has waited ``fair_wait`` (F, at most B), else the largest
        n_j / (S_j + s_j) (queued requests per second of loading and serving the lane)."""
        pool = [
            ln for ln in self._lanes.values()
            if ln.state in (LaneState.STOPPED, LaneState.SLEEPING)
            and (ln.retry_at is None or ln.retry_at <= now)
            and (ln.load_requested is not None or ln.queue)
        ]
        if not pool:
            return None
        oldest = self._oldest_waiting()
        fair = oldest is not None and now >= oldest + self._fair_wait()

        def key(ln: _Lane) -> tuple[object, ...]:
            if ln.load_requested is not None:
                return (0, ln.load_requested, ln.index)
            if ln.name in self._planned:
                return (1, self._planned[ln.name], ln.index)
            if fair:
                return (2, self._head_order(ln), ln.index)
            rate = len(ln.queue) / max(EPS, self._load_cost(ln) + self.service_seconds(ln.name))
            return (2, -rate, self._head_order(ln), ln.index)

        return min(pool, key=key)

    @staticmethod
    def _head_order(ln: _Lane) -> tuple[float, int]:
        """When the lane's oldest queued request came: (time, submission order)."""
        for req in ln.queue.values():
            return (req.submitted, req.seq)
        return (math.inf, 0)

    def _fair_wait(self) -> float:
        f = self.settings.fair_wait
        b = self.settings.switch_max_wait
        return b if f is None else min(f, b)

    def _waiting(self) -> list[_Lane]:
        """Lanes whose queued requests wait for a load (every queue but a starting lane's)."""
        return [ln for ln in self._lanes.values()
                if ln.queue and ln.state not in (LaneState.STARTING, LaneState.READY)]

    def _oldest_waiting(self) -> float | None:
        return min((ln.oldest() for ln in self._waiting()), default=None)  # type: ignore[type-var]

    def _load_cost(self, ln: _Lane) -> float:
        """S_j: seconds to bring the lane in (a wake for a sleeper, else a start) and to take it
        out again afterwards (a sleep if it can, else a stop)."""
        c = self.costs(ln.name)
        bring = c["wake"] if ln.state is LaneState.SLEEPING else c["start"]
        return bring + (c["sleep"] if ln.can_sleep else c["stop"])

    def _cycle_cost(self, ln: _Lane) -> float:
        """S_L: seconds to take a loaded lane out and bring it back later."""
        c = self.costs(ln.name)
        return c["sleep"] + c["wake"] if ln.can_sleep else c["stop"] + c["start"]

    def _remaining(self, ln: _Lane, now: float) -> float:
        """R: expected remaining busy time of the lane's in-flight requests."""
        mean = self.service_seconds(ln.name)
        inflight = max((max(0.0, mean - (now - r.dispatched)) for r in ln.inflight.values()
                        if r.dispatched is not None), default=0.0)
        return inflight + len(ln.queue) * mean / max(1, ln.window or 1)  # its own backlog, window by window

    def _extension(self, ln: _Lane, now: float) -> float:
        """ext(L): mean over recent service times s of max(0, s - R): how much longer the lane
        stays busy if it takes one more request now."""
        samples = list(ln.services) or [self.service_seconds(ln.name)]
        remaining = self._remaining(ln, now)
        return sum(max(0.0, x - remaining) for x in samples) / len(samples)

    def _cost_test(self, ln: _Lane, now: float, waiting: list[_Lane]) -> bool:
        """Close the busy lane L when |W| * ext(L) >= theta * (S_L + sum_j (S_j + s_j))."""
        count = sum(len(w.queue) for w in waiting)
        if not count:
            return False
        price = self._cycle_cost(ln) + sum(self._load_cost(w) + self.service_seconds(w.name) for w in waiting)
        return count * self._extension(ln, now) >= self.settings.cost_theta * price

    def _closable(self, busy: list[_Lane], now: float) -> tuple[list[_Lane], CloseReason]:
        """Busy READY lanes that may be closed now, and why: once a waiter has waited the cap B
        (``switch_max_wait``), every one whose turn is long enough (a lane with a backlog here
        is served for ``drain_timeout`` after it became ready, as much as a drain would have let
        its engine serve of that backlog had it been sent at once: switches stay amortised);
        else those the cost test closes (none when nothing waits)."""
        oldest = self._oldest_waiting()
        if oldest is not None and now >= oldest + self.settings.switch_max_wait:
            turn = self.settings.drain_timeout
            return [ln for ln in busy if not ln.queue or ln.ready_since is None or now >= ln.ready_since + turn], \
                "max_wait"
        waiting = self._waiting()
        return [ln for ln in busy if self._cost_test(ln, now, waiting)], "cost"

    def _need(self, ln: _Lane) -> float:
        """Memory that starting (or waking) ``ln`` adds."""
        return ln.share - (ln.keep if ln.state is LaneState.SLEEPING else 0.0)

    def _fits(self, ln: _Lane, used: float) -> bool:
        return used + self._need(ln) <= self.budget + EPS

    def _projected(self) -> float:
        """Occupancy once every pending drain, stop and sleep has completed."""
        total = 0.0
        for ln in self._lanes.values():
            if ln.state in (LaneState.STARTING, LaneState.READY):
                total += ln.share
            elif ln.stage in (Stage.DRAINING_TO_SLEEP, Stage.FALLING_ASLEEP, Stage.SLEEPING):
                total += ln.keep
        return total

    def _plan(self, now: float, out: list[Action]) -> None:
        # Forget announced switches whose target no longer waits (its requests left).
        self._planned = {
            name: when for name, when in self._planned.items()
            if self._lanes[name].state in (LaneState.STOPPED, LaneState.SLEEPING)
            and (self._lanes[name].queue or self._lanes[name].load_requested is not None)
        }
        while True:
            cand = self._candidate(now)
            if cand is None:
                break
            if self._fits(cand, self.occupancy()):
                self._start(cand, now, out)
                continue
            self._make_room(cand, now, out)
            return
        # Nobody waits: an engine that crashed while ready comes back if it fits.
        for ln in self._lanes.values():
            if ln.state is LaneState.STOPPED and ln.restart_pending and (ln.retry_at is None or ln.retry_at <= now):
                if self._fits(ln, self.occupancy()):
                    self._start(ln, now, out)
                else:
                    ln.restart_pending = False

    def _make_room(self, cand: _Lane, now: float, out: list[Action]) -> None:
        """The candidate does not fit: put to sleep or stop READY lanes, stop sleepers, or wait."""
        if self._fits(cand, self._projected()):
            return  # what drains, stops or falls asleep already makes room
        ready = sorted(
            (ln for ln in self._lanes.values() if ln.state is LaneState.READY),
            key=lambda ln: (ln.last_used, ln.index),
        )
        idle = [ln for ln in ready if not ln.inflight]
        busy = [ln for ln in ready if ln.inflight]
        forced = cand.load_requested is not None
        reason: CloseReason
        plan = self._room_plan(cand, idle, [])
        if plan is not None:
            reason = "load" if forced else "idle"
        else:
            closable, reason = (busy, "load") if forced else self._closable(busy, now)
            if not closable:
                return
            plan = self._room_plan(cand, idle, closable)
            if plan is None:
                return  # starting engines hold the memory (or too few lanes may close): wait
        for victim, sleep in plan:  # READY lanes, sleepers, and lanes on their way to sleep
            if victim.stage is Stage.SLEEPING:
                self._stop(victim, reason, now, out)
            elif victim.stage is Stage.DRAINING_TO_SLEEP:
                victim.stage = Stage.DRAINING  # it was to sleep: it stops instead
            elif victim.stage is Stage.FALLING_ASLEEP:
                victim.stage = Stage.FALLING_ASLEEP_THEN_STOP
                victim.stop_reason = reason
            else:
                self._drain(victim, now, reason, out, sleep=sleep)
        self._planned.setdefault(cand.name, now)
        out.append(SwitchPlanned(tuple(v.name for v, _ in plan), cand.name, reason))

    def _room_plan(self, cand: _Lane, idle: list[_Lane], busy: list[_Lane]) -> list[tuple[_Lane, bool]] | None:
        """Which lanes to take down so that ``cand`` fits, as (lane, sleep) pairs in order, or None.

        Idle READY lanes first (put to sleep when they can, else stopped), then sleepers
        (stopped, least recently used first), then busy READY lanes; when that is not enough,
        the lanes of the plan that were to sleep are stopped instead."""
        room = self.budget + EPS - self._projected() - self._need(cand)
        plan: list[tuple[_Lane, bool]] = []

        def close(lanes: list[_Lane]) -> None:
            nonlocal room
            for ln in lanes:
                if room >= 0:
                    return
                sleep = ln.can_sleep
                plan.append((ln, sleep))
                room += ln.share - (ln.keep if sleep else 0.0)

        close(idle)
        sleepers = sorted(
            (ln for ln in self._lanes.values() if ln.stage is Stage.SLEEPING and ln is not cand),
            key=lambda ln: (ln.last_used, ln.index),
        )
        # then lanes on their way to sleep (they will be stopped instead or once asleep)
        pending = [ln for ln in self._lanes.values() if ln.stage in (Stage.DRAINING_TO_SLEEP, Stage.FALLING_ASLEEP)]
        for ln in sleepers + pending:
            if room >= 0:
                break
            if ln.keep <= 0:
                continue
            plan.append((ln, False))
            room += ln.keep
        close(busy)
        for i, (ln, sleep) in enumerate(plan):
            if room >= 0:
                break
            if sleep and ln.keep > 0:
                plan[i] = (ln, False)
                room += ln.keep
        return plan if room >= 0 else None

    def _unplanned_switch(self, ln: _Lane) -> SwitchPlanned:
        """The record of a load that took nothing down: an operator's, beside others, or alone."""
        others = any(o.state in RESIDENT_STATES for o in self._lanes.values() if o is not ln)
        reason: SwitchReason = "load" if ln.load_requested is not None else ("co_resident" if others else "idle")
        return SwitchPlanned((), ln.name, reason)

    def _start(self, ln: _Lane, now: float, out: list[Action]) -> None:
        if ln.stage is Stage.SLEEPING:
            if self._planned.pop(ln.name, None) is None:
                out.append(self._unplanned_switch(ln))
            ln.op_since = now
            self._transition(ln, Stage.WAKING, "wake", out)
            out.append(WakeEngine(ln.name))
            return
        attempt = ln.failures + ln.setbacks + 1
        if self._planned.pop(ln.name, None) is not None:
            pass
        elif attempt == 1:
            out.append(self._unplanned_switch(ln))
        if attempt > 1:
            ln.restarts += 1
        ln.retry_at = None
        ln.restart_pending = False
        ln.op_since = now
        self._transition(ln, Stage.STARTING, "start" if attempt == 1 else f"retry {attempt}", out)
        out.append(StartEngine(ln.name, attempt, ln.can_sleep))

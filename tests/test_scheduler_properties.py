"""Property tests of the lane scheduler in simulated time (bench/simulator.py).

The wait bound (test_wait_bound), stated and proved in vllm_launcher/scheduler.py
---------------------------------------------------------------------------------
A request that waits from t0 (its arrival, or the moment it went back in line) until its
dispatch at d spent, of that time, while its lane was not READY (waiting for a load)

    at most B + K * P,   P = D + T_down + T_up + X;

the rest of its wait its lane was serving earlier requests of its own (the dispatch limit).
B the cap (``switch_max_wait``), D the drain bound (min(2 drain_timeout, longest service):
at drain_timeout what may go back in line does, a started stream or a request back in line
once has until 2 drain_timeout), T_up the longest way up of any lane (start, wake, or a
failed start or wake reported), T_down the longest way down (stop; for a sleep lane a sleep
or a failed sleep, then a stop), X = ``backoff_max`` when starts may fail or engines crash
(else 0), and K the number of *load outcomes* in (t0, d] (a lane leaving STARTING: ready,
woken, start or wake failed, crashed while starting) plus the switches abandoned in that
interval (a lane that others were taken down for, whose waiters all left before it started).
Checked over random arrivals with sleeping lanes, co-residency, start, sleep and wake
failures, crashes, stalled engines, cancels, queue limits, dispatch limits (engines whose batch
is the limit, or smaller and reported by their gauges) and streams.

The dispatch limit and going back in line (test_dispatch_limit_and_requeue): no engine holds
more than its lane's max_inflight; a request goes back in line at most once, only before any of
its output reached its client; one that was back in line once and holds its engine past the
drain bound again fails (hung_twice); a started stream is only cut at 2 drain_timeout; every
request ends (answered once, or refused, cancelled, lost in a crash).  With one awake lane at a time and no failures
K also stays small: at most (lanes + 1) loads complete after the request has waited F
(fair_wait).  (With co-residency, lanes that fit may also load beside the request's own
starting lane: K counts them too, though they do not delay it.)
"""

from __future__ import annotations

from typing import get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.baselines import BASELINES
from bench.simulator import simulate, steady_stream
from vllm_launcher.scheduler import (
    AbortInflight,
    AbortReason,
    CloseReason,
    LanePolicy,
    Preempt,
    PreemptReason,
    Reject,
    RejectCode,
    Scheduler,
    SchedulerSettings,
    SleepEngine,
    StopEngine,
    StopReason,
    SwitchPlanned,
    SwitchReason,
)

pytestmark = pytest.mark.properties

FINAL = {"finished", "rejected", "aborted", "lost", "cancelled"}
LANE_NAMES = ["a", "b", "c", "d"]
START_FAIL_SECONDS = 1.0

common = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FailsEvery:
    """A failure function for the simulator: the n-th sleep (or wake) of a lane fails as the pattern says."""

    def __init__(self, pattern: tuple[bool, ...]):
        self.pattern = pattern

    def __call__(self, lane: str, n: int) -> bool:
        return self.pattern[(n + LANE_NAMES.index(lane)) % len(self.pattern)]

    def __repr__(self) -> str:
        return f"FailsEvery({self.pattern!r})"


@st.composite
def scenarios(draw, failures: bool = False, co_resident: bool = False, sleep: bool = False):
    n = draw(st.integers(2, 4))
    names = LANE_NAMES[:n]
    if co_resident:
        shares = [draw(st.sampled_from([0.2, 0.3, 0.45, 0.6, 0.9])) for _ in names]
        budget = draw(st.sampled_from([None, 0.9, 1.0, 1.2]))
    else:
        shares, budget = [0.9] * n, None
    if sleep:
        levels = [draw(st.sampled_from([0, 1, 2])) for _ in names]
        keeps = [draw(st.sampled_from([0.0, 0.05, 0.1, 0.3])) * share for share in shares]
        if budget is None:
            budget = max(shares) + draw(st.sampled_from([0.0, 0.1, 0.3]))
    else:
        levels, keeps = [0] * n, [0.0] * n
    limits = [draw(st.sampled_from([None, 1, 2, 4])) for _ in names]
    lanes = [LanePolicy(name, share, sleep_level=level, sleep_share=keep, max_inflight=limit)
             for name, share, level, keep, limit in zip(names, shares, levels, keeps, limits, strict=True)]
    # the engine's batch: the dispatch limit, or smaller (its gauges then tell the scheduler)
    smaller = draw(st.booleans())
    batch = {name: draw(st.sampled_from([1, 2])) if smaller and limit is not None else (limit or 10**6)
             for name, limit in zip(names, limits, strict=True)}
    count = draw(st.integers(1, 40))
    arrivals = []
    for i in range(count):
        time = draw(st.floats(0, 300, allow_nan=False).map(lambda x: round(x, 1)))
        lane = draw(st.sampled_from(names))
        service = draw(st.floats(0.1, 40, allow_nan=False).map(lambda x: round(x, 1)))
        arrivals.append((time, f"r{i}", lane, service))
    cancels = [
        (arrivals[i][0] + draw(st.floats(0, 60)), arrivals[i][1])
        for i in draw(st.lists(st.integers(0, count - 1), max_size=4, unique=True))
    ]
    streams = [arrivals[i][1] for i in draw(st.lists(st.integers(0, count - 1), max_size=count, unique=True))]
    cap = draw(st.sampled_from([0.0, 5.0, 30.0, 60.0, 120.0]))
    cfg = SchedulerSettings(
        switch_max_wait=cap,
        fair_wait=draw(st.sampled_from([None, 0.0, 10.0, 60.0])),
        cost_theta=draw(st.sampled_from([0.5, 2.0, 4.0])),
        drain_timeout=draw(st.sampled_from([1.0, 10.0, 120.0])),
        queue_max=draw(st.sampled_from([5, 1024])) if failures else 1024,
        queue_timeout=draw(st.sampled_from([50.0, 600.0])) if failures else 1e6,
        memory_budget=budget,
        max_restarts=draw(st.integers(1, 4)),
        backoff_initial=1.0,
        backoff_max=8.0,
        start_seconds_estimate=draw(st.sampled_from([5.0, 60.0])),
        service_seconds_estimate=draw(st.sampled_from([1.0, 10.0])),
    )
    start = {name: draw(st.floats(0.5, 60).map(lambda x: round(x, 1))) for name in names}
    stop = {name: draw(st.floats(0, 10).map(lambda x: round(x, 1))) for name in names}
    extra = {"batch_size": batch, "gauges": smaller, "streams": streams}
    if sleep:
        extra["sleep_seconds"] = {name: draw(st.floats(0, 5).map(lambda x: round(x, 1))) for name in names}
        extra["wake_seconds"] = {name: draw(st.floats(0.1, 10).map(lambda x: round(x, 1))) for name in names}
    if failures:
        extra["start_failures"] = {name: draw(st.integers(0, 5)) for name in names}
        extra["crashes"] = draw(st.lists(st.tuples(st.floats(0, 400), st.sampled_from(names)), max_size=3))
        extra["stalls"] = draw(st.lists(st.tuples(st.floats(0, 400), st.sampled_from(names)), max_size=2))
        if sleep:
            extra["sleep_failures"] = FailsEvery(tuple(draw(st.lists(st.booleans(), min_size=1, max_size=4))))
            extra["wake_failures"] = FailsEvery(tuple(draw(st.lists(st.booleans(), min_size=1, max_size=4))))
    return dict(lanes=lanes, arrivals=arrivals, settings=cfg, start_seconds=start, stop_seconds=stop,
                cancels=cancels, start_fail_seconds=START_FAIL_SECONDS, **extra)


def assert_nothing_lost(result):
    for rec in result.requests.values():
        assert rec.outcome in FINAL, rec
        if rec.outcome in ("finished", "aborted", "lost"):
            assert rec.dispatch is not None and rec.finish is not None and rec.reject is None
        if rec.outcome == "rejected":
            assert rec.dispatch is None and rec.reject is not None
        if rec.outcome == "finished":
            assert rec.finish >= rec.dispatch + rec.service - 1e-9  # the engine's own queue may delay it
    snap = result.policy.snapshot()
    assert snap["queued"] == 0
    assert all(lane["inflight"] == 0 for lane in snap["lanes"].values())


@common
@given(scenarios())
def test_no_request_lost_one_lane_at_a_time(sc):
    result = simulate(**sc, check=True)
    assert_nothing_lost(result)
    # no failures, no queue limits: everything not cancelled is served to the end
    for rec in result.requests.values():
        assert rec.outcome in ("finished", "aborted", "cancelled"), rec


@common
@given(scenarios(failures=True, co_resident=True, sleep=True))
def test_no_request_lost_with_failures_crashes_limits_sleep_and_co_residency(sc):
    result = simulate(**sc, check=True)
    assert_nothing_lost(result)


@common
@given(scenarios(co_resident=True, sleep=True))
def test_co_residency_and_sleep_serve_everything(sc):
    result = simulate(**sc, check=True)
    assert_nothing_lost(result)
    for rec in result.requests.values():
        assert rec.outcome in ("finished", "aborted", "cancelled"), rec


def assert_reason_typed(action) -> None:
    """The action's reason (or code) is one of the strings its type names."""
    match action:
        case SwitchPlanned(reason=reason):
            assert reason in get_args(SwitchReason), action
        case StopEngine(reason=reason):
            assert reason in get_args(StopReason), action
        case SleepEngine(reason=reason):
            assert reason in get_args(CloseReason), action
        case AbortInflight(reason=reason):
            assert reason in get_args(AbortReason), action
        case Preempt(reason=reason):
            assert reason in get_args(PreemptReason), action
        case Reject(code=code):
            assert code in get_args(RejectCode), action


class ReasonsChecked:
    """The real Scheduler, every action it returns checked by assert_reason_typed."""

    def __init__(self, lanes, settings):
        self.scheduler = Scheduler(lanes, settings)

    def __getattr__(self, name):
        method = getattr(self.scheduler, name)

        def checked(*args, **kwargs):
            result = method(*args, **kwargs)
            for action in result if isinstance(result, list) else ():
                assert_reason_typed(action)
            return result

        return checked if callable(method) else method


@common
@given(scenarios(failures=True, co_resident=True, sleep=True))
def test_every_reason_is_one_its_type_names(sc):
    result = simulate(**sc, policy=ReasonsChecked)
    assert_nothing_lost(result)


def load_outcomes(result) -> list[float]:
    """Times at which a lane left STARTING (ready, woken, failed, crashed): the engine loads."""
    return sorted(t for t, _lane, old, new, _reason in result.timeline if old == "starting" and new != old)


def abandoned_switches(result) -> list[tuple[float, float]]:
    """Switches planned for a lane that did not start before it was planned again (or ever): its
    waiters left.  As intervals (planned, next plan or start of that lane or the end), within
    which it was abandoned."""
    out = []
    for index, (time, from_lanes, to_lane, _reason) in enumerate(result.switches):
        if not from_lanes:
            continue  # announced at the start itself
        started = min((t for t, lane, old, new, _r in result.timeline
                       if lane == to_lane and new == "starting" and old != new and t >= time), default=None)
        replanned = min((t for t, frm, lane, _r in result.switches[index + 1:] if lane == to_lane and frm),
                        default=None)
        if started is None or (replanned is not None and replanned < started):
            out.append((time, replanned if replanned is not None else result.end_time))
    return out


def per_load(sc) -> float:
    """P = D + T_down + T_up + X (see the module docstring)."""
    cfg = sc["settings"]
    sleepy = {lane.name for lane in sc["lanes"] if lane.sleep_level}
    # an engine's own queue (at most the dispatch limit beyond its batch) is drained too
    rounds = max(-(-(lane.max_inflight or 1) // min(sc["batch_size"][lane.name], lane.max_inflight or 1))
                 for lane in sc["lanes"])
    drain = min(2 * cfg.drain_timeout, rounds * max(a[3] for a in sc["arrivals"]))
    if any(lane.max_inflight is not None for lane in sc["lanes"]):
        drain += cfg.drain_timeout  # a lane with a backlog here has a turn of drain_timeout before it closes
    up = max([*sc["start_seconds"].values(), *sc.get("wake_seconds", {}).values(), START_FAIL_SECONDS])
    down = max(
        sc["stop_seconds"][name] + (max(sc["sleep_seconds"][name], START_FAIL_SECONDS) if name in sleepy else 0.0)
        for name in sc["stop_seconds"]
    )
    failing = bool(sc.get("start_failures") or sc.get("crashes") or sc.get("wake_failures") or sc.get("stalls"))
    return drain + down + up + (cfg.backoff_max if failing else 0.0)


def check_bound(sc, result) -> int:
    """Every wait for a dispatch spent at most B + K P with its lane not READY; returns the largest K seen."""
    cfg = sc["settings"]
    outcomes = load_outcomes(result)
    abandoned = abandoned_switches(result)
    worst = 0
    for rec in result.requests.values():
        for begun, dispatched in rec.waits():
            k = sum(1 for t in outcomes if begun < t <= dispatched)
            k += sum(1 for start, end in abandoned if start < dispatched and end > begun)
            bound = cfg.switch_max_wait + k * per_load(sc)
            waited = result.not_ready_seconds(rec.lane, begun, dispatched)
            assert waited <= bound + 1e-6, (rec, waited, bound, k)
            worst = max(worst, k)
    return worst


@common
@given(scenarios(failures=True, co_resident=True, sleep=True))
def test_wait_bound(sc):
    """B + K P with sleeping lanes, co-residency, failures, crashes, cancels and queue limits."""
    check_bound(sc, simulate(**sc))


@common
@given(scenarios(co_resident=True, sleep=True))
def test_wait_bound_without_failures(sc):
    check_bound(sc, simulate(**sc))


@common
@given(scenarios(sleep=True))
def test_wait_bound_one_awake_lane_counts_few_loads(sc):
    """One awake lane at a time (sleepers beside it), no failures: the bound holds and K is
    small: once a request at the head of its lane's queue has waited F the oldest waiter goes
    first, so at most one load per lane (its own included), the switch already planned, one more
    for each request that went back in line meanwhile, and one per window of another lane's
    older requests (a turn serves at least its window) complete before it is served."""
    result = simulate(**sc)
    check_bound(sc, result)
    cfg = sc["settings"]
    fair = cfg.switch_max_wait if cfg.fair_wait is None else min(cfg.fair_wait, cfg.switch_max_wait)
    outcomes = load_outcomes(result)
    dispatches: dict[str, list[float]] = {}
    preemptions = sorted(t for rec in result.requests.values() for t in rec.preempted)
    for rec in result.requests.values():
        dispatches.setdefault(rec.lane, []).extend(rec.dispatches)
    for rec in result.requests.values():
        for begun, dispatched in rec.waits():
            # from when it is the head of its lane's queue (the lane's earlier requests all sent)
            head = max([begun, *(t for t in dispatches[rec.lane] if t < dispatched)])
            late = sum(1 for t in outcomes if head + fair < t <= dispatched)
            # a request back in line is older than r: its lane may load once more before r's
            again = sum(1 for t in preemptions if begun < t <= dispatched)
            # and a lane's older backlog is served a window per turn (at least 1 with gauges)
            backlog = sum(
                -(-sum(1 for o in result.requests.values() if o.lane == lane.name and o.arrival <= rec.arrival
                       and any(head + fair < t <= dispatched for t in o.dispatches))
                  // (1 if sc["gauges"] else lane.max_inflight))
                for lane in sc["lanes"] if lane.max_inflight is not None and lane.name != rec.lane)
            assert late <= len(sc["lanes"]) + 1 + again + backlog, (rec, late, again, backlog)


@common
@given(scenarios(failures=True, co_resident=True, sleep=True))
def test_dispatch_limit_and_requeue(sc):
    result = simulate(**sc, check=True)
    assert_nothing_lost(result)
    limits = {lane.name: lane.max_inflight for lane in sc["lanes"]}
    for lane, peak in result.peak_inflight.items():
        assert limits[lane] is None or peak <= limits[lane], (lane, peak)
    streams = set(sc["streams"])
    drain = sc["settings"].drain_timeout
    for rec in result.requests.values():
        assert len(rec.preempted) <= 1, rec
        if rec.abort_reason == "hung_twice":
            assert rec.preempted, rec  # only a request that was back in line once
        if rec.abort_reason == "drain_timeout":
            assert rec.request_id in streams and rec.finish - rec.dispatch >= 2 * drain - 1e-6, rec


@common
@given(scenarios())
def test_without_failures_nothing_fails_but_long_requests_after_two_bounds(sc):
    """No failures injected: every request not cancelled is answered, except one that held its
    engine past the drain bound twice (hung_twice: D, then 2 D) or a stream cut once it held its
    engine 2 D."""
    result = simulate(**sc, check=True)
    drain = sc["settings"].drain_timeout
    for rec in result.requests.values():
        assert rec.outcome in ("finished", "cancelled", "aborted"), rec
        if rec.abort_reason == "hung_twice":
            assert rec.preempted[0] - rec.dispatches[0] >= drain - 1e-9, rec
            assert rec.finish - rec.dispatches[1] >= 2 * drain - 1e-9, rec
        elif rec.outcome == "aborted":
            assert rec.abort_reason == "drain_timeout" and rec.request_id in sc["streams"], rec
            assert rec.finish - rec.dispatch >= 2 * drain - 1e-9, rec


@settings(max_examples=40, deadline=None)
@given(scenarios(), st.sampled_from(["fcfs", "llama_swap"]))
def test_baselines_lose_nothing(sc, policy):
    result = simulate(**sc, policy=BASELINES[policy])
    for rec in result.requests.values():
        assert rec.outcome in ("finished", "aborted", "cancelled"), rec


# ------------------------------------------------------------ starvation


STREAM_END = 600.0


def starvation_case(policy: str):
    """A steady stream for lane a (two requests always in flight) and one request for b."""
    lanes = [LanePolicy("a"), LanePolicy("b")]
    cfg = SchedulerSettings(switch_max_wait=30.0, drain_timeout=120.0)
    arrivals = steady_stream("a", 0.0, STREAM_END, gap=0.5, service=1.0)
    arrivals.append((20.0, "victim", "b", 1.0))
    result = simulate(lanes, arrivals, settings=cfg, start_seconds=5.0, stop_seconds=2.0,
                      policy=BASELINES.get(policy, policy))
    return result, cfg


def test_starvation_stream_scheduler_serves_b_within_bound():
    result, cfg = starvation_case("scheduler")
    victim = result.requests["victim"]
    # a is loaded at 5 s; at 20 + 30 s a drains (<= 1 s), stops (2 s) and b starts (5 s)
    bound = cfg.switch_max_wait + 1 * (1.0 + 2.0 + 5.0)
    assert result.readies_between(victim.arrival, victim.dispatch) == 1
    assert victim.wait == bound  # hold, drain (1 s), stop, start: the bound is attained
    assert victim.previous_lane == "a"
    assert all(r.outcome == "finished" for r in result.requests.values())
    assert result.switch_count == 3  # a, b, a again


def test_starvation_stream_llama_swap_starves_b():
    result, _ = starvation_case("llama_swap")
    victim = result.requests["victim"]
    assert victim.dispatch is not None and victim.dispatch >= STREAM_END  # only after the stream ends
    assert victim.wait > 10 * 38.0


def test_fcfs_thrashes_on_alternating_lanes():
    lanes = [LanePolicy("a"), LanePolicy("b")]
    arrivals = [(i * 1.0, f"r{i}", "ab"[i % 2], 0.5) for i in range(20)]
    sched = simulate(lanes, arrivals, start_seconds=10.0, stop_seconds=1.0)
    fcfs = simulate(lanes, arrivals, start_seconds=10.0, stop_seconds=1.0, policy=BASELINES["fcfs"])
    assert sched.switch_count < fcfs.switch_count
    assert fcfs.switch_count >= 15
    assert sched.switching_seconds < fcfs.switching_seconds


def test_simulation_is_deterministic():
    from bench.simulator import random_workload

    lanes = [LanePolicy("a"), LanePolicy("b"), LanePolicy("c")]
    work = random_workload(7, ["a", "b", "c"], 100)
    assert work == random_workload(7, ["a", "b", "c"], 100)
    one = simulate(lanes, work, start_seconds=20.0, stop_seconds=2.0)
    two = simulate(lanes, work, start_seconds=20.0, stop_seconds=2.0)
    assert [(r.dispatch, r.finish) for r in one.requests.values()] == [
        (r.dispatch, r.finish) for r in two.requests.values()
    ]
    assert one.timeline == two.timeline

"""Unit tests for the lane scheduling policy (vllm_launcher.scheduler)."""

from __future__ import annotations

import json

import pytest

from scheduler_actions import bring_up, of
from vllm_launcher.scheduler import (
    AbortInflight,
    Dispatch,
    LanePolicy,
    LaneState,
    LaneStateChanged,
    Preempt,
    Reject,
    Scheduler,
    SchedulerSettings,
    SleepEngine,
    Stage,
    StartEngine,
    StopEngine,
    SwitchPlanned,
    WakeEngine,
)


def dispatched(actions):
    return [a.request_id for a in of(actions, Dispatch)]


def make(names=("a", "b"), shares=None, idle=None, **settings) -> Scheduler:
    shares = shares or {}
    idle = idle or {}
    lanes = [LanePolicy(n, shares.get(n, 0.9), idle.get(n)) for n in names]
    return Scheduler(lanes, SchedulerSettings(**settings))


# ------------------------------------------------------------ basics


def test_first_request_starts_lane_and_ready_dispatches_all_in_order():
    s = make()
    acts = s.submit("r1", "a", 0.0)
    assert of(acts, StartEngine) == [StartEngine("a", 1)]
    assert of(acts, SwitchPlanned) == [SwitchPlanned((), "a", "idle")]
    assert LaneStateChanged("a", LaneState.STOPPED, LaneState.STARTING, "start") in acts
    assert s.state("a") is LaneState.STARTING
    assert s.submit("r2", "a", 1.0) == []  # joins the load
    assert s.queue_depth("a") == 2 and s.queued_ahead("r2") == 1
    acts = s.engine_ready("a", 5.0)
    assert dispatched(acts) == ["r1", "r2"]
    assert s.inflight("a") == 2 and s.queue_depth("a") == 0
    assert dispatched(s.submit("r3", "a", 6.0)) == ["r3"]  # ready lane: at once
    s.check_invariants()


def test_finish_of_unknown_or_queued_request_is_ignored():
    s = make()
    s.submit("r1", "a", 0.0)
    assert s.finish("nope", 1.0) == []
    assert s.finish("r1", 1.0) == []  # still queued: not in flight
    assert s.queue_depth("a") == 1
    s.check_invariants()


def test_bad_input_raises():
    s = make()
    with pytest.raises(ValueError):
        s.submit("r1", "zzz", 0.0)
    s.submit("r1", "a", 0.0)
    with pytest.raises(ValueError):
        s.submit("r1", "a", 0.0)
    with pytest.raises(ValueError):
        Scheduler([LanePolicy("a"), LanePolicy("a")])
    with pytest.raises(ValueError):
        Scheduler([LanePolicy("a", 0.5), LanePolicy("b", 0.9)], SchedulerSettings(memory_budget=0.6))


def test_default_budget_is_largest_share():
    s = make(shares={"a": 0.45, "b": 0.45})
    assert s.budget == pytest.approx(0.45)
    s.submit("r1", "a", 0.0)
    s.submit("r2", "b", 0.0)
    assert s.state("b") is LaneState.STOPPED  # one lane at a time


# ------------------------------------------------------------ switching


def test_switch_on_idle_is_immediate():
    s = make()
    bring_up(s, "a", 0.0)
    acts = s.submit("b1", "b", 10.0)
    assert StopEngine("a", "idle") in acts
    assert SwitchPlanned(("a",), "b", "idle") in acts
    acts = s.engine_stopped("a", 12.0)
    assert of(acts, StartEngine) == [StartEngine("b", 1)]
    assert of(acts, SwitchPlanned) == []  # already announced
    assert dispatched(s.engine_ready("b", 20.0)) == ["b1"]


def test_switch_when_loaded_lane_becomes_idle_before_max_wait():
    s = make(switch_max_wait=30.0)
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 1.0)
    assert s.submit("b1", "b", 2.0) == []  # a is busy: b waits
    acts = s.finish("a1", 5.0)
    assert StopEngine("a", "idle") in acts


def test_hold_then_drain_after_max_wait():
    s = make(switch_max_wait=30.0)
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 0.0)
    assert s.submit("b1", "b", 1.0) == []
    assert dispatched(s.submit("a2", "a", 10.0)) == ["a2"]  # before the cap B: served
    assert s.next_deadline() == pytest.approx(20.0)  # a2 due (default 10 s): the cost test again
    assert s.tick(20.0) == []  # one waiter: 1 x 10 s < 2 x (65 + 65 + 10) s
    assert s.next_deadline() == pytest.approx(31.0)
    assert s.tick(30.9) == []
    acts = s.tick(31.0)
    assert SwitchPlanned(("a",), "b", "max_wait") in acts
    assert s.state("a") is LaneState.DRAINING
    assert s.submit("a3", "a", 32.0) == []  # draining lane: queues
    assert s.queue_depth("a") == 1
    assert of(s.finish("a1", 33.0), StopEngine) == []  # a2 still in flight
    acts = s.finish("a2", 34.0)
    assert StopEngine("a", "max_wait") in acts
    assert s.state("a") is LaneState.STOPPING
    assert of(s.engine_stopped("a", 36.0), StartEngine) == [StartEngine("b", 1)]
    acts = s.engine_ready("b", 50.0)
    assert dispatched(acts) == ["b1"]
    s.check_invariants()


@pytest.mark.parametrize(
    "c_time, b_time, first",
    [(1.0, 2.0, "c"), (2.0, 1.0, "b"), (1.0, 1.0, "b")],  # equal ages: the first submitted (b)
)
def test_oldest_waiter_goes_first(c_time, b_time, first):
    s = make(("a", "b", "c"), switch_max_wait=30.0, fair_wait=0.0)
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 0.0)
    for request_id, lane, time in sorted([("b1", "b", b_time), ("c1", "c", c_time)], key=lambda r: r[2]):
        s.submit(request_id, lane, time)
    s.finish("a1", 3.0)
    assert of(s.engine_stopped("a", 4.0), StartEngine) == [StartEngine(first, 1)]


def test_candidate_is_reevaluated_when_memory_frees():
    s = make(("a", "b", "c"), switch_max_wait=30.0)
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 0.0)
    s.submit("b1", "b", 1.0)
    s.submit("c1", "c", 2.0)
    s.tick(31.0)  # drain a for b
    s.cancel("b1", 31.5)  # b's only waiter leaves
    s.finish("a1", 32.0)
    acts = s.engine_stopped("a", 33.0)
    assert of(acts, StartEngine) == [StartEngine("c", 1)]
    assert of(acts, SwitchPlanned) == [SwitchPlanned((), "c", "idle")]  # announced for c too


def test_ready_dispatches_whole_queue_and_hold_applies_to_later_arrivals():
    s = make(switch_max_wait=30.0)
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 0.0)
    s.submit("b1", "b", 1.0)
    s.tick(31.0)
    s.finish("a1", 32.0)
    s.engine_stopped("a", 33.0)
    s.submit("b2", "b", 40.0)
    s.submit("a2", "a", 41.0)  # waits for a: already held 30 s when b is ready
    acts = s.engine_ready("b", 100.0)
    assert dispatched(acts) == ["b1", "b2"]  # every queued b request, at once
    assert s.state("b") is LaneState.DRAINING  # a2 waited > 30 s: b drains right away
    assert SwitchPlanned(("b",), "a", "max_wait") in acts
    assert s.submit("b3", "b", 101.0) == []  # a later arrival is held
    s.check_invariants()


def test_drain_timeout_puts_unanswered_requests_back_in_line_then_stops():
    s = make(switch_max_wait=30.0, drain_timeout=120.0)
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 0.0)
    s.submit("a2", "a", 0.5)
    s.submit("b1", "b", 1.0)
    s.tick(31.0)
    assert s.next_deadline() == pytest.approx(151.0)
    acts = s.tick(151.0)
    assert acts[0] == Preempt("a", ("a1", "a2"), "drain_timeout")
    assert not of(acts, AbortInflight)
    assert StopEngine("a", "max_wait") in acts
    assert s.inflight("a") == 0 and s.queue_depth("a") == 2 and s.queued_ahead("a1") == 0
    assert s.finish("a1", 152.0) == []  # no longer in flight: ignored
    s.check_invariants()


# ------------------------------------------------------------ queue limits


def full_queue_retry_after(queue_max: int) -> float:
    s = make(queue_max=queue_max, cost_theta=1e9)  # a stays loaded: the queue fills
    bring_up(s, "a", 0.0)
    s.submit("a0", "a", 0.0)
    for i in range(queue_max):
        assert s.submit(f"b{i}", "b", 1.0 + i) == []
    acts = s.submit("late", "b", 50.0)
    (reject,) = of(acts, Reject)
    assert (reject.status, reject.code, reject.request_id) == (503, "queue_full", "late")
    assert s.queue_depth("b") == queue_max
    s.check_invariants()
    return reject.retry_after


def test_queue_full_retry_after_grows_with_queue():
    small, large = full_queue_retry_after(2), full_queue_retry_after(20)
    assert small >= 1 and large > small


def test_queue_full_counts_only_waiting_requests():
    s = make(queue_max=1)
    bring_up(s, "a", 0.0)
    assert dispatched(s.submit("a1", "a", 0.0)) == ["a1"]
    assert dispatched(s.submit("a2", "a", 0.0)) == ["a2"]  # ready lane: never queued
    assert s.submit("b1", "b", 1.0) == []
    assert of(s.submit("b2", "b", 1.0), Reject)[0].code == "queue_full"


def test_queue_timeout_only_for_a_loaded_lane_that_takes_nothing():
    """Waiting for other lanes' turns never times out; a loaded lane whose engine takes none of
    its queue for queue_timeout answers its queue 503 queue_timeout with a Retry-After."""
    s = Scheduler([LanePolicy("a", max_inflight=1), LanePolicy("b")],
                  SchedulerSettings(queue_timeout=100.0, switch_max_wait=1000.0, fair_wait=None))
    bring_up(s, "a", 0.0)
    s.submit("a0", "a", 0.0)
    s.submit("b0", "b", 1.0)  # waits for a's turn to end: no queue timeout
    for i in range(3):
        s.submit(f"a{i + 1}", "a", 1.0)  # a's window (1) is full: queued in the launcher
    assert s.queue_depth("a") == 3
    assert not of(s.tick(99.0), Reject)
    acts = s.tick(100.0)  # a took nothing of its queue since it became ready at 0
    rejects = of(acts, Reject)
    assert [(r.request_id, r.status, r.code) for r in rejects] == [(f"a{i}", 503, "queue_timeout") for i in (1, 2, 3)]
    assert all(r.retry_after >= 1 for r in rejects)
    assert s.queue_depth("b") == 1  # b's request waits on
    s.check_invariants()


def test_retry_after_follows_the_lanes_own_start_time():
    def reject_after(observed):
        s = make(queue_max=1)
        for seconds in observed:
            s.observe_engine_seconds("b", "start", seconds)
        bring_up(s, "a", 0.0)
        s.submit("a0", "a", 0.0)
        s.submit("b0", "b", 1.0)
        return of(s.submit("b1", "b", 2.0), Reject)[0].retry_after

    assert reject_after([5.0] * 20) < reject_after([]) < reject_after([300.0] * 20)


def test_cancel_removes_queued_request_and_does_not_trigger_a_load():
    s = make(switch_max_wait=30.0)
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 0.0)
    s.submit("b1", "b", 1.0)
    assert s.cancel("b1", 2.0) == []
    assert s.queue_depth("b") == 0 and s.queued_ahead("b1") is None
    assert s.next_deadline() is None
    assert s.tick(40.0) == []
    assert s.finish("a1", 41.0) == []  # a idle, nobody waits: no switch
    assert s.state("a") is LaneState.READY
    assert s.cancel("a1", 42.0) == []  # unknown / already dispatched: no-op
    s.check_invariants()


# ------------------------------------------------------------ failures


def test_start_failures_back_off_then_fail_lane_while_other_lane_serves():
    s = make(max_restarts=3, backoff_initial=1.0, backoff_max=60.0)
    assert StartEngine("a", 1) in s.submit("a1", "a", 0.0)
    s.submit("a2", "a", 0.1)
    t = 1.0
    delays = []
    for attempt in (1, 2):
        acts = s.engine_start_failed("a", t, "boom")
        assert of(acts, Reject) == [] and s.state("a") is LaneState.STOPPED
        deadline = s.next_deadline()
        delays.append(deadline - t)
        assert s.tick(deadline - 0.01) == []
        assert of(s.tick(deadline), StartEngine) == [StartEngine("a", attempt + 1)]
        t = deadline + 1.0
    assert delays == [pytest.approx(1.0), pytest.approx(2.0)]
    acts = s.engine_start_failed("a", t, "CUDA out of memory\nTraceback ...")
    assert s.state("a") is LaneState.FAILED
    rejects = of(acts, Reject)
    assert [r.request_id for r in rejects] == ["a1", "a2"]
    assert all(r.status == 503 and r.code == "lane_failed" and "CUDA out of memory" in r.message for r in rejects)
    new = of(s.submit("a3", "a", t + 1), Reject)
    assert new[0].code == "lane_failed" and "CUDA out of memory" in new[0].message
    # the other lane keeps working
    assert of(s.submit("b1", "b", t + 2), StartEngine) == [StartEngine("b", 1)]
    assert dispatched(s.engine_ready("b", t + 3)) == ["b1"]
    assert s.snapshot()["lanes"]["a"]["last_cause"].startswith("CUDA")
    s.check_invariants()


def test_failing_lane_in_back_off_does_not_block_other_lanes():
    s = make(backoff_initial=10.0)
    s.submit("a1", "a", 0.0)
    s.engine_start_failed("a", 1.0, "boom")
    assert of(s.submit("b1", "b", 2.0), StartEngine) == [StartEngine("b", 1)]


def test_load_resets_failed_lane():
    s = make(max_restarts=1)
    s.submit("a1", "a", 0.0)
    s.engine_start_failed("a", 1.0, "boom")
    assert s.state("a") is LaneState.FAILED
    acts = s.load("a", 2.0)
    assert of(acts, StartEngine) == [StartEngine("a", 1)]
    s.engine_ready("a", 3.0)
    assert dispatched(s.submit("a2", "a", 4.0)) == ["a2"]


def test_serving_a_few_requests_resets_the_failure_count():
    s = make(max_restarts=3, healthy_after_requests=3)
    s.submit("a1", "a", 0.0)
    s.engine_start_failed("a", 1.0, "boom")
    assert of(s.tick(2.0), StartEngine) == [StartEngine("a", 2)]
    s.engine_ready("a", 3.0)
    assert s.snapshot()["lanes"]["a"]["failures"] == 1       # ready is not enough: it has to serve
    assert s.snapshot()["lanes"]["a"]["restarts"] == 1
    for n, t in ((1, 4.0), (2, 5.0)):
        s.finish("a1" if n == 1 else f"a{n}", t)
        s.submit(f"a{n + 1}", "a", t)
        assert s.snapshot()["lanes"]["a"]["failures"] == 1, n
    s.finish("a3", 6.0)
    assert s.snapshot()["lanes"]["a"]["failures"] == 0


def crash_after(s, lane: str, requests: int, t: float) -> float:
    """The lane's engine becomes ready, serves `requests` requests and crashes; returns the time."""
    assert of(s.tick(s.next_deadline() or t), StartEngine), s.snapshot()["lanes"][lane]
    t = max(t, s.next_deadline() or t) + 1.0
    s.engine_ready(lane, t)
    for i in range(requests):
        t += 0.1
        dispatched(s.submit(f"{lane}-{t:.1f}-{i}", lane, t))
        s.finish(f"{lane}-{t:.1f}-{i}", t + 0.05)
    t += 1.0
    s.engine_exited(lane, t, "crash")
    return t


def test_an_engine_that_crashes_after_serving_is_restarted_for_ever():
    s = make(max_restarts=2, backoff_initial=1.0)
    bring_up(s, "a", 0.0)
    t = 1.0
    s.engine_exited("a", t, "crash")
    for _ in range(10):
        assert s.state("a") is LaneState.STOPPED
        assert s.next_deadline() == pytest.approx(t + 1.0)      # the back-off stays at its start
        t = crash_after(s, "a", 20, t)
    assert s.state("a") is LaneState.STOPPED and s.snapshot()["lanes"]["a"]["restarts"] == 10


def test_crash_loops_fail_the_lane():
    s = make(max_restarts=3, backoff_initial=1.0, healthy_after_requests=3)
    bring_up(s, "a", 0.0)
    t = 1.0
    s.engine_exited("a", t, "crash")                  # 1: crashed idle, before serving a few requests
    t = crash_after(s, "a", 2, t)                     # 2: two requests, then a crash
    assert s.state("a") is LaneState.STOPPED
    assert s.next_deadline() == pytest.approx(t + 2.0)   # back-off doubles
    s.submit("late", "a", t + 0.5)
    t = crash_after(s, "a", 0, t)                     # 3
    assert s.state("a") is LaneState.FAILED


def test_failures_of_the_servers_own_resources_never_fail_the_lane():
    s = make(max_restarts=2, backoff_initial=1.0, backoff_max=8.0)
    s.submit("a1", "a", 0.0)
    t, delays = 0.0, []
    for attempt in range(1, 7):
        t += 1.0
        s.engine_start_failed("a", t, "cannot start the engine: [Errno 24] Too many open files", counts=False)
        assert s.state("a") is LaneState.STOPPED, attempt
        retry_at = s.snapshot()["lanes"]["a"]["retry_at"]
        delays.append(retry_at - t)
        assert of(s.tick(retry_at - 0.01), StartEngine) == []
        t = retry_at
        assert of(s.tick(t), StartEngine) == [StartEngine("a", attempt + 1)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]     # backs off like any failure, up to backoff_max
    assert s.snapshot()["lanes"]["a"]["failures"] == 0
    assert dispatched(s.engine_ready("a", t + 1.0)) == ["a1"]


def test_engine_exit_forgets_inflight_and_restarts_with_back_off():
    s = make(backoff_initial=2.0)
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 1.0)
    acts = s.engine_exited("a", 2.0, "segfault")
    assert LaneStateChanged("a", LaneState.READY, LaneState.STOPPED, "engine exited") in acts
    assert s.inflight("a") == 0 and s.finish("a1", 2.5) == []
    assert s.submit("a2", "a", 3.0) == []  # waits for the restart
    assert s.next_deadline() == pytest.approx(4.0)
    assert of(s.tick(4.0), StartEngine) == [StartEngine("a", 2)]
    assert dispatched(s.engine_ready("a", 10.0)) == ["a2"]
    s.check_invariants()


def test_crashed_idle_lane_restarts_when_it_fits():
    s = make(backoff_initial=1.0)
    bring_up(s, "a", 0.0)
    s.engine_exited("a", 5.0, "oom")
    assert of(s.tick(6.0), StartEngine) == [StartEngine("a", 2)]


def test_repeated_crashes_fail_the_lane():
    s = make(max_restarts=2, backoff_initial=1.0)
    bring_up(s, "a", 0.0)
    s.engine_exited("a", 1.0, "crash 1")
    s.submit("a1", "a", 1.5)
    s.tick(2.0)
    acts = s.engine_start_failed("a", 3.0, "crash 2")
    assert s.state("a") is LaneState.FAILED
    assert "crash 2" in of(acts, Reject)[0].message


# ------------------------------------------------------------ operator


def test_load_evicts_busy_lane_without_waiting_for_max_wait():
    s = make(switch_max_wait=30.0)
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 1.0)
    acts = s.load("b", 2.0)
    assert SwitchPlanned(("a",), "b", "load") in acts
    assert s.state("a") is LaneState.DRAINING
    assert StopEngine("a", "load") in s.finish("a1", 3.0)
    assert of(s.engine_stopped("a", 4.0), StartEngine) == [StartEngine("b", 1)]
    s.engine_ready("b", 5.0)
    assert s.snapshot()["lanes"]["b"]["load_requested"] is False


def test_load_goes_before_older_waiters():
    s = make(("a", "b", "c"))
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 0.0)
    s.submit("b1", "b", 1.0)
    s.load("c", 2.0)
    s.finish("a1", 3.0)
    assert of(s.engine_stopped("a", 4.0), StartEngine) == [StartEngine("c", 1)]


def test_unload_drains_then_stops_and_queued_requests_reload_later():
    s = make()
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 1.0)
    acts = s.unload("a", 2.0)
    assert LaneStateChanged("a", LaneState.READY, LaneState.DRAINING, "unload") in acts
    assert s.submit("a2", "a", 3.0) == []  # queues while draining
    assert StopEngine("a", "unload") in s.finish("a1", 4.0)
    acts = s.engine_stopped("a", 5.0)
    assert of(acts, StartEngine) == [StartEngine("a", 1)]  # a2 still wants the lane
    assert dispatched(s.engine_ready("a", 6.0)) == ["a2"]


def test_unload_idle_lane_stops_at_once_and_stays_stopped():
    s = make()
    bring_up(s, "a", 0.0)
    assert StopEngine("a", "unload") in s.unload("a", 1.0)
    assert s.engine_stopped("a", 2.0)[-1] == LaneStateChanged("a", LaneState.STOPPING, LaneState.STOPPED, "engine stopped")
    assert s.is_idle() and s.next_deadline() is None


def test_idle_timeout_stops_unused_lane():
    s = make(idle={"a": 10.0})
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 1.0)
    assert s.next_deadline() is None  # busy
    s.finish("a1", 5.0)
    assert s.next_deadline() == pytest.approx(15.0)
    assert s.tick(14.9) == []
    assert StopEngine("a", "idle_timeout") in s.tick(15.0)


def test_shutdown_rejects_queue_drains_and_stops():
    s = make()
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 1.0)
    s.submit("b1", "b", 2.0)
    acts = s.shutdown(3.0)
    assert [(r.request_id, r.status, r.code) for r in of(acts, Reject)] == [("b1", 503, "shutting_down")]
    assert s.state("a") is LaneState.DRAINING
    assert of(s.submit("a2", "a", 4.0), Reject)[0].code == "shutting_down"
    assert not s.is_idle()
    assert StopEngine("a", "shutdown") in s.finish("a1", 5.0)
    s.engine_stopped("a", 6.0)
    assert s.is_idle()
    s.check_invariants()


def test_shutdown_ends_its_drain_at_d_not_2d():
    """Nothing goes back in line at a shutdown, so its drain ends at D: a started stream is cut,
    an unstarted request answered 503, the engine stopped; a switch's drain would run to 2 D."""
    s = make(drain_timeout=10.0)
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 1.0)
    s.submit("a2", "a", 1.0)
    s.output_started("a1", 1.5)
    s.shutdown(2.0)
    assert s.next_deadline() == 12.0
    acts = s.tick(12.0)
    assert [r.request_id for r in of(acts, Reject)] == ["a2"]
    assert [(a.request_ids, a.reason) for a in of(acts, AbortInflight)] == [(("a1",), "drain_timeout")]
    assert StopEngine("a", "shutdown") in acts
    s.check_invariants()


def test_shutdown_stops_starting_engine_and_ignores_late_ready():
    s = make()
    s.submit("a1", "a", 0.0)
    acts = s.shutdown(1.0)
    assert StopEngine("a", "shutdown") in acts and of(acts, Reject)[0].request_id == "a1"
    assert s.engine_ready("a", 2.0) == []
    assert s.state("a") is LaneState.STOPPING
    s.engine_stopped("a", 3.0)
    assert s.is_idle()


# ------------------------------------------------------------ co-residency


def test_co_residency_when_shares_fit():
    s = make(shares={"a": 0.4, "b": 0.4}, memory_budget=0.9)
    assert of(s.submit("a1", "a", 0.0), StartEngine) == [StartEngine("a", 1)]
    acts = s.submit("b1", "b", 0.0)
    assert of(acts, StartEngine) == [StartEngine("b", 1)]
    assert of(acts, SwitchPlanned) == [SwitchPlanned((), "b", "co_resident")]
    s.engine_ready("a", 1.0)
    s.engine_ready("b", 1.0)
    assert s.state("a") is LaneState.READY and s.state("b") is LaneState.READY
    assert s.occupancy() == pytest.approx(0.8)


def test_exclusive_when_shares_do_not_fit():
    s = make(shares={"a": 0.6, "b": 0.6}, memory_budget=0.9)
    bring_up(s, "a", 0.0)
    acts = s.submit("b1", "b", 1.0)
    assert of(acts, StartEngine) == []
    assert StopEngine("a", "idle") in acts


def test_least_recently_used_idle_lane_is_the_victim():
    s = make(("a", "b", "c"), shares={"a": 0.45, "b": 0.45, "c": 0.45}, memory_budget=0.9)
    s.submit("a1", "a", 0.0)
    s.submit("b1", "b", 0.0)
    s.engine_ready("a", 1.0)
    s.engine_ready("b", 1.0)
    s.finish("b1", 2.0)
    s.finish("a1", 3.0)  # a used last: b is the least recently used
    acts = s.submit("c1", "c", 4.0)
    assert of(acts, StopEngine) == [StopEngine("b", "idle")]
    assert SwitchPlanned(("b",), "c", "idle") in acts
    assert of(s.engine_stopped("b", 5.0), StartEngine) == [StartEngine("c", 1)]
    s.check_invariants()


def test_max_wait_drains_least_recently_used_busy_lane():
    s = make(("a", "b", "c"), shares={"a": 0.45, "b": 0.45, "c": 0.45}, memory_budget=0.9, switch_max_wait=30.0)
    s.submit("a1", "a", 0.0)
    s.submit("b1", "b", 0.0)
    s.engine_ready("a", 1.0)
    s.engine_ready("b", 1.0)
    s.submit("b2", "b", 2.0)  # b used last
    s.submit("c1", "c", 3.0)
    acts = s.tick(33.0)
    assert SwitchPlanned(("a",), "c", "max_wait") in acts
    assert s.state("a") is LaneState.DRAINING and s.state("b") is LaneState.READY


def test_snapshot_is_plain_data():
    s = make(idle={"a": 5.0})
    bring_up(s, "a", 0.0)
    s.submit("a1", "a", 1.0)
    s.submit("b1", "b", 2.0)
    snap = s.snapshot()
    json.dumps(snap)
    assert snap["lanes"]["a"]["state"] == "ready" and snap["lanes"]["a"]["inflight"] == 1
    assert snap["lanes"]["b"]["queue_depth"] == 1 and snap["queued"] == 1
    assert snap["memory_budget"] == pytest.approx(0.9)


# ------------------------------------------------------------ sleeping lanes


def sleepy(names=("a", "b"), share=0.8, keep=0.1, level=1, budget=1.0, **settings) -> Scheduler:
    """Lanes that sleep, a budget that holds one awake lane and the others asleep."""
    lanes = [LanePolicy(n, share, sleep_level=level, sleep_share=keep) for n in names]
    return Scheduler(lanes, SchedulerSettings(memory_budget=budget, **settings))


def put_to_sleep(s: Scheduler, now: float = 10.0) -> None:
    """a READY and idle, b requested: a goes to sleep, b starts."""
    s.load("a", 0.0)
    s.engine_ready("a", 1.0)
    acts = s.submit("b1", "b", now)
    assert of(acts, SleepEngine) == [SleepEngine("a", 1, "idle")]
    assert of(acts, StopEngine) == []
    assert s.state("a") is LaneState.STOPPING and s.stage("a") is Stage.FALLING_ASLEEP
    acts = s.engine_slept("a", now + 2.0)
    assert LaneStateChanged("a", LaneState.STOPPING, LaneState.SLEEPING, "engine asleep") in acts
    assert of(acts, StartEngine) == [StartEngine("b", 1, True)]


def waking_a(requests=("a1",)) -> Scheduler:
    """a asleep, b served then idle, requests for a: b goes to sleep and a is waking."""
    s = sleepy()
    put_to_sleep(s)
    s.engine_ready("b", 20.0)
    s.finish("b1", 21.0)
    for i, request_id in enumerate(requests):
        s.submit(request_id, "a", 30.0 + i / 2)
    assert of(s.engine_slept("b", 31.0), WakeEngine) == [WakeEngine("a")]
    return s


def test_every_lane_state_is_shown_for_some_stage():
    """The stages tell sleep mode's steps apart; what is shown (logs, /lanes, the state gauge) is
    still the LaneState, each of them some stage's."""
    assert {stage.state for stage in Stage} == set(LaneState)
    assert {stage.state for stage in Stage if stage.name == stage.state.name} == set(LaneState)


def test_sleep_lane_policy_is_checked():
    with pytest.raises(ValueError):
        LanePolicy("a", 0.5, sleep_level=3)
    with pytest.raises(ValueError):
        LanePolicy("a", 0.5, sleep_level=1, sleep_share=0.6)
    with pytest.raises(ValueError):
        LanePolicy("a", 0.5, sleep_level=1, sleep_share=-0.1)
    assert LanePolicy("a").sleep_level == 0  # off by default: stop/start


def test_a_lane_without_sleep_level_is_started_and_stopped_as_before():
    s = make()
    assert of(s.submit("a1", "a", 0.0), StartEngine) == [StartEngine("a", 1, False)]
    s.engine_ready("a", 1.0)
    s.finish("a1", 2.0)
    acts = s.submit("b1", "b", 3.0)
    assert of(acts, StopEngine) == [StopEngine("a", "idle")] and of(acts, SleepEngine) == []


def test_switching_away_puts_a_sleep_lane_to_sleep_and_back_wakes_it():
    s = sleepy()
    put_to_sleep(s)
    assert s.state("a") is LaneState.SLEEPING
    assert s.occupancy() == pytest.approx(0.1 + 0.8)  # the sleeper counts its sleep_share
    s.engine_ready("b", 20.0)
    s.finish("b1", 21.0)
    acts = s.submit("a1", "a", 30.0)
    # b is idle: it sleeps; a wakes once b is asleep (0.1 + 0.8 + 0.7 > 1.0 before that)
    assert of(acts, SleepEngine) == [SleepEngine("b", 1, "idle")] and of(acts, WakeEngine) == []
    acts = s.engine_slept("b", 31.0)
    assert of(acts, WakeEngine) == [WakeEngine("a")] and of(acts, StartEngine) == []
    assert LaneStateChanged("a", LaneState.SLEEPING, LaneState.STARTING, "wake") in acts
    assert s.stage("a") is Stage.WAKING and s.snapshot()["lanes"]["a"]["stage"] == "waking"
    acts = s.engine_woke("a", 31.5)
    assert dispatched(acts) == ["a1"] and s.state("a") is LaneState.READY
    assert s.costs("a")["wake"] == pytest.approx(0.5)  # measured: WakeEngine at 31, woke at 31.5
    assert s.costs("a")["sleep"] == pytest.approx(2.0)
    assert s.costs("b")["start"] == pytest.approx(8.0)  # started at 12, ready at 20
    s.check_invariants()


def test_a_busy_sleep_lane_drains_then_sleeps():
    s = sleepy(switch_max_wait=30.0)
    s.submit("a1", "a", 0.0)
    s.engine_ready("a", 1.0)
    s.submit("b1", "b", 2.0)
    acts = s.tick(32.0)
    assert s.state("a") is LaneState.DRAINING and of(acts, SleepEngine) == []
    assert s.stage("a") is Stage.DRAINING_TO_SLEEP
    acts = s.finish("a1", 33.0)
    assert of(acts, SleepEngine) == [SleepEngine("a", 1, "max_wait")]
    s.check_invariants()


def test_sleep_mode_lost_while_draining_to_sleep_stops_the_lane_once_drained():
    s = sleepy(switch_max_wait=30.0)
    s.submit("a1", "a", 0.0)
    s.engine_ready("a", 1.0)
    s.submit("b1", "b", 2.0)
    s.tick(32.0)
    assert s.stage("a") is Stage.DRAINING_TO_SLEEP
    acts = s.sleep_failed("a", 32.5, "the engine refused")
    assert [(c.old, c.new) for c in of(acts, LaneStateChanged)] == [(LaneState.DRAINING, LaneState.DRAINING)]
    assert s.stage("a") is Stage.DRAINING
    acts = s.finish("a1", 33.0)
    assert of(acts, StopEngine) == [StopEngine("a", "max_wait")] and of(acts, SleepEngine) == []
    s.check_invariants()


def test_sleep_failure_stops_the_engine_and_falls_back_for_good():
    s = sleepy()
    s.load("a", 0.0)
    s.engine_ready("a", 1.0)
    s.submit("b1", "b", 10.0)
    acts = s.sleep_failed("a", 11.0, "sleep mode is not supported")
    assert of(acts, StopEngine) == [StopEngine("a", "sleep_failed")]
    changes = of(acts, LaneStateChanged)
    assert len(changes) == 1 and "sleep mode off for this lane" in changes[0].reason
    assert s.sleep_off("a") == "sleep failed: sleep mode is not supported"
    assert s.snapshot()["lanes"]["a"]["sleep_off"] == s.sleep_off("a")
    acts = s.engine_stopped("a", 12.0)
    assert of(acts, StartEngine) == [StartEngine("b", 1, True)]
    s.engine_ready("b", 20.0)
    s.finish("b1", 21.0)
    acts = s.submit("a1", "a", 22.0)  # b still sleeps fine; a cold-starts without sleep mode
    assert of(acts, SleepEngine) == [SleepEngine("b", 1, "idle")]
    acts = s.engine_slept("b", 23.0)
    assert of(acts, StartEngine) == [StartEngine("a", 1, False)]
    s.engine_ready("a", 30.0)
    s.finish("a1", 31.0)
    acts = s.submit("b2", "b", 32.0)
    assert of(acts, StopEngine) == [StopEngine("a", "idle")] and of(acts, SleepEngine) == []  # for good
    assert all("sleep mode off" not in c.reason for c in of(acts, LaneStateChanged))  # logged once
    s.check_invariants()


def test_failed_wake_cold_starts_and_serves_the_queued_requests():
    s = waking_a(("a1", "a2"))
    acts = s.wake_failed("a", 32.0, "wake_up returned 500")
    assert of(acts, StopEngine) == [StopEngine("a", "wake_failed")]
    assert of(acts, LaneStateChanged)[0].new is LaneState.STOPPING
    assert "sleep mode off" in of(acts, LaneStateChanged)[0].reason
    assert s.queue_depth("a") == 2  # nothing lost: the requests keep their place
    acts = s.engine_stopped("a", 33.0)
    assert of(acts, StartEngine) == [StartEngine("a", 1, False)]
    assert dispatched(s.engine_ready("a", 40.0)) == ["a1", "a2"]
    assert s.snapshot()["lanes"]["a"]["failures"] == 0  # a failed wake is no crash loop
    s.check_invariants()


def test_engine_start_failed_or_exit_while_waking_is_a_failed_wake():
    s = waking_a()
    acts = s.engine_start_failed("a", 32.0, "wake timed out")
    assert of(acts, StopEngine) == [StopEngine("a", "wake_failed")]
    s2 = waking_a()
    acts = s2.engine_exited("a", 32.0, "exit 1")
    assert s2.sleep_off("a") is not None and of(acts, StopEngine) == []
    assert of(acts, StartEngine) == [StartEngine("a", 1, False)]  # the process is gone: cold start
    s2.check_invariants()


def test_sleep_refused_at_start_is_reported_any_time_and_logged_once():
    s = sleepy()
    s.submit("a1", "a", 0.0)
    acts = s.sleep_failed("a", 1.0, "--enable-sleep-mode is not supported on this platform")
    assert of(acts, LaneStateChanged) == [LaneStateChanged(
        "a", LaneState.STARTING, LaneState.STARTING,
        "sleep failed: --enable-sleep-mode is not supported on this platform; "
        "sleep mode off for this lane, stop/start from now on")]
    assert s.sleep_failed("a", 1.5, "again") == []  # once
    acts = s.engine_start_failed("a", 2.0, "engine exited", counts=False)
    acts = s.tick(5.0)
    assert of(acts, StartEngine) == [StartEngine("a", 2, False)]


def test_sleepers_are_stopped_least_recently_used_first_when_a_start_does_not_fit():
    s = sleepy(("a", "b", "c", "d"))
    put_to_sleep(s)  # a asleep at 12
    s.engine_ready("b", 20.0)
    s.finish("b1", 21.0)
    s.submit("c1", "c", 22.0)
    s.engine_slept("b", 23.0)  # b asleep, c starting
    s.engine_ready("c", 30.0)
    s.finish("c1", 31.0)
    assert s.occupancy() == pytest.approx(0.1 + 0.1 + 0.8)
    acts = s.submit("d1", "d", 40.0)
    # c (idle) sleeps: 0.3 + 0.8 > 1.0, so the least recently used sleeper (a) is stopped too
    assert of(acts, SleepEngine) == [SleepEngine("c", 1, "idle")]
    assert of(acts, StopEngine) == [StopEngine("a", "idle")]
    assert SwitchPlanned(("c", "a"), "d", "idle") in acts
    s.engine_slept("c", 41.0)
    acts = s.engine_stopped("a", 42.0)
    assert of(acts, StartEngine) == [StartEngine("d", 1, True)]
    assert s.state("b") is LaneState.SLEEPING and s.state("c") is LaneState.SLEEPING
    s.check_invariants()


def test_a_sleeper_that_does_not_fit_at_all_is_stopped_instead():
    # budget 1.0, shares 0.9 and sleep share 0.2: no lane can sleep beside an awake one
    s = sleepy(share=0.9, keep=0.2)
    s.load("a", 0.0)
    s.engine_ready("a", 1.0)
    acts = s.submit("b1", "b", 2.0)
    assert of(acts, StopEngine) == [StopEngine("a", "idle")] and of(acts, SleepEngine) == []
    s.check_invariants()


def test_unload_and_shutdown_stop_sleepers():
    s = sleepy()
    put_to_sleep(s)
    acts = s.unload("a", 13.0)
    assert of(acts, StopEngine) == [StopEngine("a", "unload")]
    s.engine_stopped("a", 14.0)
    assert s.state("a") is LaneState.STOPPED
    s.engine_ready("b", 20.0)
    s.finish("b1", 21.0)
    s.submit("a1", "a", 22.0)  # b sleeps, a starts cold
    s.engine_slept("b", 23.0)
    acts = s.shutdown(24.0)
    assert StopEngine("b", "shutdown") in acts and StopEngine("a", "shutdown") in acts
    s.engine_stopped("a", 25.0)
    s.engine_stopped("b", 25.0)
    assert s.is_idle()


def test_unload_while_going_to_sleep_stops_once_asleep():
    s = sleepy()
    s.load("a", 0.0)
    s.engine_ready("a", 1.0)
    s.submit("b1", "b", 10.0)  # a goes to sleep
    assert s.unload("a", 10.5) == []
    assert s.stage("a") is Stage.FALLING_ASLEEP_THEN_STOP
    acts = s.engine_slept("a", 11.0)
    assert of(acts, StopEngine) == [StopEngine("a", "unload")]
    assert s.stage("a") is Stage.STOPPING_ASLEEP
    assert s.occupancy() == pytest.approx(0.1 + 0.8)  # a stopping sleeper holds its sleep share; b starts


def test_a_sleeping_engine_that_exits_is_stopped_and_woken_cold_later():
    s = sleepy()
    put_to_sleep(s)
    acts = s.engine_exited("a", 13.0, "killed")
    assert s.state("a") is LaneState.STOPPED and of(acts, StartEngine) == []
    assert s.sleep_off("a") is None  # sleep mode itself did not fail
    s.check_invariants()


def test_load_wakes_a_sleeper():
    s = sleepy()
    put_to_sleep(s)
    s.engine_ready("b", 20.0)
    s.load("a", 21.0)  # evicts b (busy: it drains) without the hold
    assert s.state("b") is LaneState.DRAINING
    assert of(s.finish("b1", 21.5), SleepEngine) == [SleepEngine("b", 1, "load")]
    assert of(s.engine_slept("b", 22.0), WakeEngine) == [WakeEngine("a")]


def test_service_times_and_costs_are_learnt_per_lane():
    s = make(service_seconds_estimate=7.0, start_seconds_estimate=50.0, service_window=2)
    assert s.service_seconds("a") == 7.0 and s.costs("a")["start"] == 50.0
    s.submit("a1", "a", 0.0)
    s.submit("a2", "a", 0.0)
    s.submit("a3", "a", 0.0)
    s.engine_ready("a", 20.0)
    assert s.costs("a")["start"] == pytest.approx(20.0)  # the first measurement replaces the default
    s.finish("a1", 22.0)
    s.finish("a2", 26.0)
    assert s.service_seconds("a") == pytest.approx(4.0)
    s.finish("a3", 30.0, service_seconds=1.0)
    assert s.service_seconds("a") == pytest.approx(3.5)  # window 2: 6 and 1
    s.submit("a4", "a", 31.0)
    s.finish("a4", 99.0, sample=False)
    assert s.service_seconds("a") == pytest.approx(3.5)
    s.observe_engine_seconds("a", "start", 30.0)
    assert s.costs("a")["start"] == pytest.approx(0.7 * 20.0 + 0.3 * 30.0)
    with pytest.raises(ValueError):
        s.observe_engine_seconds("a", "boot", 1.0)
    assert s.service_seconds("b") == 7.0
    json.dumps(s.snapshot())


# ------------------------------------------------------------ the policy (issue 13)


def costed(**settings) -> Scheduler:
    """Lanes a, b, c one at a time; a start costs 10 s, a stop 1 s, a request 2 s (estimates)."""
    cfg = dict(start_seconds_estimate=10.0, stop_seconds_estimate=1.0, service_seconds_estimate=2.0,
               switch_max_wait=1000.0, fair_wait=None, cost_theta=2.0, queue_timeout=1e6)
    cfg.update(settings)
    s = make(("a", "b", "c"), **cfg)
    s.load("a", -10.0)
    s.engine_ready("a", 0.0)  # a started in 10 s, as estimated
    return s


def test_policy_settings_are_checked():
    with pytest.raises(ValueError):
        SchedulerSettings(cost_theta=0.0)
    with pytest.raises(ValueError):
        SchedulerSettings(fair_wait=-1.0)
    assert SchedulerSettings().switch_max_wait == 120.0  # the cap B


def test_cost_test_closes_a_busy_lane_when_the_waiters_lose_more():
    s = costed()
    s.submit("a1", "a", 0.0)
    for i in range(30):
        assert s.submit(f"b{i}", "b", 1.0) == []
    # at 1 s a1 is expected to run 1 s more: ext(a) = 2 - 1 = 1 s; 30 x 1 < 2 x (11 + 11 + 2)
    assert s.next_deadline() == pytest.approx(2.0)  # a1 is due: ext(a) is largest then
    acts = s.tick(2.0)  # 30 x 2 >= 2 x 24: close a
    assert SwitchPlanned(("a",), "b", "cost") in acts
    assert s.state("a") is LaneState.DRAINING
    s.check_invariants()


def test_cost_test_keeps_a_busy_lane_for_few_waiters():
    s = costed()
    s.submit("a1", "a", 0.0)
    s.submit("b1", "b", 1.0)
    assert s.tick(2.0) == [] and s.tick(500.0) == []  # 1 x 2 < 48, and B = 1000 s not reached
    assert dispatched(s.submit("a2", "a", 600.0)) == ["a2"]  # exhaustive: a keeps serving
    acts = s.tick(1001.0)
    assert SwitchPlanned(("a",), "b", "max_wait") in acts  # the cap B


def test_next_lane_is_the_most_requests_per_second_of_switch_before_f():
    s = costed()
    s.submit("a1", "a", 0.0)
    s.submit("b1", "b", 1.0)
    for i in range(5):
        s.submit(f"c{i}", "c", 2.0)
    s.finish("a1", 3.0)  # a idle: closed at once
    assert of(s.engine_stopped("a", 4.0), StartEngine) == [StartEngine("c", 1)]  # 5 / 13 > 1 / 13


def test_next_lane_is_the_oldest_waiters_once_a_waiter_waited_f():
    s = costed(fair_wait=10.0)
    s.submit("a1", "a", 0.0)
    s.submit("b1", "b", 1.0)
    for i in range(5):
        s.submit(f"c{i}", "c", 2.0)
    s.finish("a1", 12.0)  # b1 waited 11 s > F
    assert of(s.engine_stopped("a", 13.0), StartEngine) == [StartEngine("b", 1)]


def test_a_planned_switch_is_kept_when_another_lane_gets_busier():
    s = costed()
    s.submit("a1", "a", 0.0)
    for i in range(30):
        s.submit(f"b{i}", "b", 1.0)
    assert SwitchPlanned(("a",), "b", "cost") in s.tick(2.0)
    for i in range(60):
        s.submit(f"c{i}", "c", 3.0)  # c now has the most requests per second of switch
    s.finish("a1", 4.0)
    assert of(s.engine_stopped("a", 5.0), StartEngine) == [StartEngine("b", 1)]  # b was planned


def test_a_sleep_lane_that_crashes_while_draining_to_sleep_is_simply_stopped():
    s = sleepy(switch_max_wait=0.0)
    s.submit("a1", "a", 0.0)
    s.engine_ready("a", 1.0)
    s.submit("b1", "b", 2.0)  # the cap (0 s): a drains, to sleep
    assert s.state("a") is LaneState.DRAINING
    acts = s.engine_exited("a", 3.0, "killed")
    assert of(acts, SleepEngine) == [] and s.state("a") is LaneState.STOPPED
    assert of(acts, StartEngine) == [StartEngine("b", 1, True)]
    s.check_invariants()

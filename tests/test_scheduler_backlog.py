"""Issue 21 in the pure scheduler, case by case: the dispatch limit and its window from the
engine's gauges, the preemption rule (at D back in line, at 2 D cut or failed), the stalled-engine
rule, and Retry-After from the lane's own figures (the properties are in test_scheduler_properties.py)."""

from __future__ import annotations

from scheduler_actions import bring_up, of
from vllm_launcher.scheduler import (
    AbortInflight,
    Dispatch,
    LanePolicy,
    LaneState,
    Preempt,
    Reject,
    Scheduler,
    SchedulerSettings,
    StartEngine,
    StopEngine,
)


def test_window_follows_the_engines_gauges():
    s = Scheduler([LanePolicy("a", max_inflight=8)])
    bring_up(s, "a", 0.0)
    sent = [a.request_id for i in range(20) for a in of(s.submit(i, "a", 0.0), Dispatch)]
    assert sent == list(range(8)) and s.queue_depth("a") == 12
    s.engine_load("a", 0.5, running=3, waiting=5)       # its KV cache holds 3: hold back
    assert s.window("a") == 3
    assert not of(s.finish(0, 1.0), Dispatch)            # 7 in flight, window 3: nothing more
    for i in range(1, 5):
        s.finish(i, 1.0)
    assert s.inflight("a") == 3 and s.queue_depth("a") == 12
    assert [a.request_id for a in of(s.finish(5, 1.5), Dispatch)] == [8]
    s.engine_load("a", 2.0, running=3, waiting=0)       # runs all it was given: the window doubles
    assert s.window("a") == 6 and s.inflight("a") == 6
    s.engine_load("a", 2.5, running=6, waiting=0)
    assert s.window("a") == 8                            # up to max_inflight, no further
    s.check_invariants()


def test_drain_bound_preempts_then_cuts_or_fails_at_twice_the_bound():
    s = Scheduler([LanePolicy("a", max_inflight=4), LanePolicy("b")],
                  SchedulerSettings(switch_max_wait=0.0, drain_timeout=10.0))
    bring_up(s, "a", 0.0)
    for i in range(3):
        s.submit(f"a{i}", "a", 0.0)
    s.output_started("a0", 0.5)                          # a stream whose output reached its client
    s.submit("b0", "b", 1.0)                             # a has no backlog here: closed at once
    assert s.state("a") is LaneState.DRAINING
    acts = s.tick(11.0)                                  # D: the two unanswered go back in line
    assert of(acts, Preempt) == [Preempt("a", ("a1", "a2"), "drain_timeout")]
    assert s.inflight("a") == 1 and s.queue_depth("a") == 2 and s.queued_ahead("a1") == 0
    acts = s.tick(21.0)                                  # 2 D: the started stream is cut
    assert of(acts, AbortInflight) == [AbortInflight("a", ("a0",), "drain_timeout")]
    assert StopEngine("a", "max_wait") in acts
    s.check_invariants()


def test_a_request_back_in_line_once_fails_when_it_holds_its_engine_past_the_bound_again():
    s = Scheduler([LanePolicy("a"), LanePolicy("b")], SchedulerSettings(switch_max_wait=0.0, drain_timeout=10.0))
    bring_up(s, "a", 0.0)
    s.submit("long", "a", 0.0)
    s.submit("b0", "b", 1.0)
    assert of(s.tick(11.0), Preempt) == [Preempt("a", ("long",), "drain_timeout")]
    s.engine_stopped("a", 12.0)
    s.engine_ready("b", 13.0)
    s.finish("b0", 14.0)                                 # b idle, a's request waits: a comes back
    s.engine_stopped("b", 15.0)
    assert [a.request_id for a in of(s.engine_ready("a", 16.0), Dispatch)] == ["long"]
    s.submit("b1", "b", 16.0)                            # closes a again at once
    assert not of(s.tick(27.0), (AbortInflight, Preempt))  # back in line once: it has until 2 D
    acts = s.tick(36.0)
    assert of(acts, AbortInflight) == [AbortInflight("a", ("long",), "hung_twice")]
    s.check_invariants()


def test_a_stalled_engine_puts_its_requests_back_and_stops():
    s = Scheduler([LanePolicy("a")])
    bring_up(s, "a", 0.0)
    s.submit("r0", "a", 0.0)
    s.submit("r1", "a", 0.0)
    s.output_started("r1", 1.0)
    acts = s.preempt("a", 5.0, "stalled")
    assert of(acts, Preempt) == [Preempt("a", ("r0",), "stalled")]
    assert of(acts, AbortInflight) == [AbortInflight("a", ("r1",), "stalled")]
    assert StopEngine("a", "stalled") in acts and s.queue_depth("a") == 1
    assert StartEngine("a", 1) in s.engine_stopped("a", 6.0)  # its request back in line loads it again
    s.check_invariants()


def test_retry_after_of_a_starting_lane_is_its_start_left_and_its_own_queue():
    """The issue's case: a lane that starts in about 16 s answered its queue's overflow with
    Retry-After 143 (1 s charged per queued request, whatever the lane)."""
    s = Scheduler([LanePolicy("a", max_inflight=16)], SchedulerSettings(queue_max=100))
    s.observe_engine_seconds("a", "start", 16.0)
    for i in range(100):
        s.submit(i, "a", 0.0)                            # the first starts the lane
    assert s.state("a") is LaneState.STARTING
    (reject,) = of(s.submit("late", "a", 4.0), Reject)
    assert reject.code == "queue_full"
    # 12 s of its start left, then 100 ahead at 16 per 10 s (service_seconds_estimate) = 62.5 s
    assert reject.retry_after == 12 + 63

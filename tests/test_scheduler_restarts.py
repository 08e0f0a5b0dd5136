"""Crash loops judged by what the engine did (issue 23 point 5) and hung engines (point 2), in
the pure scheduler: an engine that served (output reached a client, or a few requests finished,
or it was ready for ``healthy_after_seconds``) is no crash loop; a FAILED lane is tried again
after ``failed_cooloff`` and says when; a hang is handled by the preemption rule, then the lane
backs off and restarts, and a second hang with nothing served between is told apart."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_actions import of
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


def make(**settings) -> Scheduler:
    return Scheduler([LanePolicy("a", 0.9), LanePolicy("b", 0.9)], SchedulerSettings(**settings))


def start(s: Scheduler, t: float) -> float:
    """Wait out the back-off (or cool-off), start lane a and make it ready; the time."""
    acts = s.tick(t) if s.state("a") is LaneState.STOPPED and s.next_deadline() is None else []
    if not of(acts, StartEngine):
        t = max(t, s.next_deadline() or t)
        acts = s.tick(t)
    assert of(acts, StartEngine), (acts, s.snapshot()["lanes"]["a"])
    t += 0.5
    s.engine_ready("a", t)
    return t


def test_a_crash_with_every_request_in_flight_and_output_flowing_is_no_crash_loop():
    """The issue's case: 30 requests dispatched at once, streams under way, none finished, then
    the crash. The old rule (3 finished) counted it as a crash loop and failed the lane."""
    s = make(max_restarts=2, backoff_initial=1.0)
    t = 0.0
    s.load("a", t)
    s.engine_ready("a", t)
    for crash in range(8):
        ids = [f"r{crash}-{i}" for i in range(30)]
        for request_id in ids:
            assert of(s.submit(request_id, "a", t), Dispatch)
        t += 0.2
        s.output_started(ids[0], t)                     # one stream's first bytes reached its client
        t += 0.2
        s.engine_exited("a", t, "exited with status 9")
        assert s.state("a") is LaneState.STOPPED, crash
        assert s.snapshot()["lanes"]["a"]["retry_at"] == pytest.approx(t + 1.0)    # back-off stays at its start
        t = start(s, t)
    assert s.snapshot()["lanes"]["a"]["failures"] == 1
    s.check_invariants()


def test_without_output_or_finishes_a_crash_is_a_crash_loop_unless_the_engine_was_up_a_while():
    s = make(max_restarts=2, backoff_initial=1.0, healthy_after_seconds=60.0)
    s.load("a", 0.0)
    s.engine_ready("a", 0.0)
    s.submit("x", "a", 0.0)
    s.engine_exited("a", 59.0, "crash")                 # up 59 s, nothing flowed: crash loop 1
    t = start(s, 59.0)
    s.engine_exited("a", t + 60.0, "crash")             # up 60 s: it served; the count starts again
    assert s.snapshot()["lanes"]["a"]["failures"] == 1 and s.state("a") is LaneState.STOPPED
    t = start(s, t + 60.0)
    s.engine_exited("a", t + 1.0, "crash")              # second crash loop in a row: failed
    assert s.state("a") is LaneState.FAILED


def test_a_failed_lane_says_when_it_is_tried_again_and_is_after_the_cool_off():
    s = make(max_restarts=2, backoff_initial=1.0, failed_cooloff=300.0)
    s.submit("a1", "a", 0.0)
    s.engine_start_failed("a", 1.0, "CUDA out of memory")
    s.tick(2.0)
    acts = s.engine_start_failed("a", 3.0, "CUDA out of memory")
    assert s.state("a") is LaneState.FAILED
    [reject] = of(acts, Reject)
    assert reject.code == "lane_failed" and reject.retry_after == 300.0
    assert "CUDA out of memory" in reject.message and "tried again in 300 s" in reject.message, reject.message
    [later] = of(s.submit("a2", "a", 103.0), Reject)
    assert later.retry_after == 200.0 and "tried again in 200 s" in later.message
    assert s.next_deadline() == pytest.approx(303.0)
    assert s.tick(302.9) == []
    acts = s.tick(303.0)                                # the cool-off is over: tried again at once
    assert of(acts, StartEngine) == [StartEngine("a", 2)] and s.state("a") is LaneState.STARTING
    s.engine_start_failed("a", 304.0, "CUDA out of memory")
    assert s.state("a") is LaneState.FAILED           # one attempt after the cool-off, then failed again
    assert s.snapshot()["lanes"]["a"]["retry_at"] == pytest.approx(604.0)
    s.tick(604.0)
    s.engine_ready("a", 605.0)                          # this time it starts: serving again
    assert of(s.submit("a3", "a", 606.0), Dispatch)
    s.check_invariants()


def test_a_hung_engine_is_stopped_its_unanswered_requests_go_back_in_line_and_it_restarts_with_back_off():
    s = make(max_restarts=3, backoff_initial=2.0)
    s.load("a", 0.0)
    s.engine_ready("a", 0.0)
    for request_id in ("plain", "stream", "late"):
        s.submit(request_id, "a", 1.0)
    s.output_started("stream", 1.5)                     # its first bytes reached the client
    assert not s.hung_again("a", 2.0)
    acts = s.engine_hung("a", 2.0, "engine hung")
    assert Preempt("a", ("plain", "late"), "stalled") in acts
    assert AbortInflight("a", ("stream",), "stalled") in acts
    assert StopEngine("a", "stalled") in acts and s.state("a") is LaneState.STOPPING
    assert s.queue_depth("a") == 2
    s.engine_stopped("a", 3.0)
    # the engine served (a stream's output reached its client): the count starts again at 1
    assert s.state("a") is LaneState.STOPPED and s.snapshot()["lanes"]["a"]["failures"] == 1
    assert s.next_deadline() == pytest.approx(5.0)    # back-off
    assert s.tick(4.9) == []
    assert of(s.tick(5.0), StartEngine) == [StartEngine("a", 2)]
    assert [a.request_id for a in of(s.engine_ready("a", 6.0), Dispatch)] == ["plain", "late"]
    # it hangs again at once (nothing served): a GPU hang is suspected; the requests that hung an
    # engine twice are failed, saying so
    assert s.hung_again("a", 7.0)
    acts = s.engine_hung("a", 7.0, "engine hung again")
    assert AbortInflight("a", ("plain", "late"), "hung_twice") in acts
    s.engine_stopped("a", 8.0)
    assert s.snapshot()["lanes"]["a"]["failures"] == 2 and s.snapshot()["lanes"]["a"]["last_cause"] == "engine hung again"
    assert s.next_deadline() == pytest.approx(12.0)   # the back-off doubles
    s.check_invariants()


# ------------------------------------------------------------ the rule, as a property

LIVES = st.sampled_from(["start_fails", "crash_idle", "crash_busy", "hang", "crash_after_output",
                         "crash_after_finishes", "crash_after_uptime", "hang_after_output"])
SERVED = {"crash_after_output", "crash_after_finishes", "crash_after_uptime", "hang_after_output"}


@pytest.mark.properties
@settings(max_examples=300, deadline=None)
@given(lives=st.lists(LIVES, min_size=1, max_size=40), max_restarts=st.integers(1, 5),
       gaps=st.lists(st.floats(0.01, 5.0), min_size=40, max_size=40))
def test_a_lane_fails_only_after_max_restarts_crash_loops_in_a_row_and_comes_back_after_the_cool_off(
        lives, max_restarts, gaps):
    """Whatever the engines do, the lane is FAILED exactly when the last max_restarts outcomes
    were crash loops (an engine that served starts the count again at 1, the cool-off leaves one
    attempt); every back-off is backoff_initial doubled per consecutive crash loop (a served
    engine's is backoff_initial); a FAILED lane is tried again at its cool-off's end."""
    s = Scheduler([LanePolicy("a", 0.9)], SchedulerSettings(
        max_restarts=max_restarts, backoff_initial=1.0, backoff_max=8.0, healthy_after_requests=3,
        healthy_after_seconds=60.0, failed_cooloff=300.0))
    t, count, n = 0.0, 0, 0
    s.load("a", t)
    for life, gap in zip(lives, gaps, strict=False):  # 40 gaps for up to 40 lives
        assert s.state("a") is LaneState.STARTING
        t += gap
        if life == "start_fails":
            s.engine_start_failed("a", t, "boom")
        else:
            s.engine_ready("a", t)
            ids = [f"r{n}-{i}" for i in range(3 if life == "crash_after_finishes" else 2)]
            n += 1
            if life != "crash_idle":
                for request_id in ids:
                    s.submit(request_id, "a", t)
            if life in ("crash_after_output", "hang_after_output"):
                s.output_started(ids[0], t + 0.1)
            if life == "crash_after_finishes":
                for request_id in ids:
                    s.finish(request_id, t + 0.2)
            t += 61.0 if life == "crash_after_uptime" else 0.5
            if life.startswith("hang"):
                s.engine_hung("a", t, "hung")
                t += 0.5
                s.engine_stopped("a", t)
            else:
                s.engine_exited("a", t, "crash")
        count = 1 if life in SERVED else count + 1
        lane = s.snapshot()["lanes"]["a"]
        s.check_invariants()
        if count >= max_restarts:
            assert s.state("a") is LaneState.FAILED, (life, count, lane)
            assert s.next_deadline() == pytest.approx(t + 300.0)
            t += 300.0
            acts = s.tick(t)
            count = max_restarts - 1
        else:
            assert s.state("a") is LaneState.STOPPED, (life, count, lane)
            assert lane["retry_at"] - t == pytest.approx(min(8.0, 2.0 ** (count - 1))), (life, count, lane)
            t = lane["retry_at"]
            n += 1
            s.submit(f"w{n}", "a", t - 0.001)       # someone waits for it (a crashed lane restarts anyway)
            acts = s.tick(t)
        assert of(acts, StartEngine), (life, count, s.snapshot()["lanes"]["a"])

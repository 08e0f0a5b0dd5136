"""The simulator's engine and client models (bench/simulator.py): finite batch, closed-loop
clients, sleep and wake, failed loads."""

from __future__ import annotations

from bench.baselines import BASELINES
from bench.simulator import Client, simulate
from vllm_launcher.scheduler import LanePolicy, SchedulerSettings


def test_finite_batch_queues_at_the_engine():
    """Batch 2: the third request dispatched at once waits at the engine for the first to end."""
    arrivals = [(0.0, f"r{i}", "a", 10.0 + i) for i in range(3)]
    result = simulate([LanePolicy("a")], arrivals, start_seconds=5.0, batch_size=2)
    r0, r1, r2 = (result.requests[f"r{i}"] for i in range(3))
    assert r0.dispatch == r1.dispatch == r2.dispatch == 5.0
    assert r0.start == r1.start == 5.0 and r2.start == r0.finish == 15.0
    assert r2.finish == 15.0 + 12.0
    assert (r2.wait, r2.service_wait) == (5.0, 15.0)
    unlimited = simulate([LanePolicy("a")], arrivals, start_seconds=5.0)
    assert all(r.start == r.dispatch for r in unlimited.requests.values())


def test_drain_timeout_puts_the_engine_queue_back_in_line():
    """Batch 1, no dispatch limit: before issue 21 (the frozen scheduler) the drain bound aborted
    what the engine still held; now it goes back in line and is served at a's next turn."""
    lanes = [LanePolicy("a"), LanePolicy("b")]
    settings = SchedulerSettings(switch_max_wait=0.0, drain_timeout=15.0)
    arrivals = [(0.0, f"a{i}", "a", 10.0) for i in range(3)] + [(6.0, "b0", "b", 1.0)]
    before = simulate(lanes, arrivals, settings=settings, start_seconds=5.0, stop_seconds=1.0, batch_size=1,
                      policy=BASELINES["capped"])
    outcomes = {rid: r.outcome for rid, r in before.requests.items()}
    assert outcomes == {"a0": "finished", "a1": "aborted", "a2": "aborted", "b0": "finished"}
    assert before.requests["a2"].start is None  # never left the engine's queue
    now = simulate(lanes, arrivals, settings=settings, start_seconds=5.0, stop_seconds=1.0, batch_size=1)
    assert all(r.outcome == "finished" for r in now.requests.values())
    a1, a2 = now.requests["a1"], now.requests["a2"]
    assert a1.preempted == a2.preempted == [6.0 + 15.0]  # b0 waited B = 0: a drained from 6 s
    assert a1.dispatches[1] == a2.dispatches[1] > now.requests["b0"].finish  # a's next turn, after b


def test_dispatch_limit_keeps_the_backlog_in_the_launcher():
    """max_inflight 2 on an engine of batch 2: the engine never queues, the rest waits in the
    launcher's queue, and a drain holds only what the engine generates."""
    lanes = [LanePolicy("a", max_inflight=2), LanePolicy("b")]
    settings = SchedulerSettings(switch_max_wait=0.0, drain_timeout=15.0)
    arrivals = [(0.0, f"a{i}", "a", 10.0) for i in range(6)] + [(6.0, "b0", "b", 1.0)]
    result = simulate(lanes, arrivals, settings=settings, start_seconds=5.0, stop_seconds=1.0, batch_size=2)
    assert result.peak_inflight["a"] == 2
    assert all(r.outcome == "finished" and not r.preempted for r in result.requests.values())
    assert all(r.start == r.dispatch for r in result.requests.values())  # no engine queue
    b0 = result.requests["b0"]
    # a, ready at 5 with a backlog here, has a turn of drain_timeout (15 s); at 20 it closes: the two
    # in flight since 15 finish at 25, stop 1 s, b starts 5 s
    assert b0.dispatch == 25.0 + 1.0 + 5.0
    assert result.requests["a4"].dispatch > b0.dispatch  # a's rest waited in the launcher for its next turn


def test_closed_loop_client_waits_for_its_answer():
    steps = [("a", 2.0, 0.0, 0), ("a", 3.0, 4.0, 0), ("a", 1.0, 1.0, 1)]
    result = simulate([LanePolicy("a")], [], clients=[Client("c", 1.0, steps)], start_seconds=5.0)
    recs = [result.requests[f"c-{i}"] for i in range(3)]
    assert [r.arrival for r in recs] == [1.0, 6.0 + 2.0 + 4.0, 12.0 + 3.0 + 1.0]
    assert [r.task for r in recs] == [0, 0, 1] and all(r.client == "c" for r in recs)
    cut = simulate([LanePolicy("a")], [], clients=[Client("c", 1.0, iter(steps))], clients_until=12.0,
                   start_seconds=5.0)
    assert list(cut.requests) == ["c-0"]  # the next would arrive at 12.0


def test_sleeping_lane_wakes_instead_of_starting():
    lanes = [LanePolicy("a", 0.6, sleep_level=1, sleep_share=0.1), LanePolicy("b", 0.6, sleep_level=1, sleep_share=0.1)]
    settings = SchedulerSettings(switch_max_wait=0.0, memory_budget=0.8)
    arrivals = [(0.0, "a0", "a", 1.0), (50.0, "b0", "b", 1.0), (100.0, "a1", "a", 1.0)]
    result = simulate(lanes, arrivals, settings=settings, start_seconds=30.0, stop_seconds=2.0,
                      sleep_seconds=1.0, wake_seconds=2.0)
    assert [s[1] for s in result.starts] == ["a", "b"]  # a is woken, not started again
    a1 = result.requests["a1"]
    assert a1.outcome == "finished" and a1.wait <= 1.0 + 2.0 + 1e-9
    assert "sleeping" in {new for _, _, _, new, _ in result.timeline}


def test_failed_loads_count_as_load_outcomes():
    result = simulate([LanePolicy("a")], [(0.0, "r", "a", 1.0)], start_seconds=5.0, start_failures={"a": 1},
                      start_fail_seconds=2.0, settings=SchedulerSettings(backoff_initial=1.0))
    assert result.failed_loads == [(2.0, "a")]
    rec = result.requests["r"]
    assert rec.outcome == "finished" and result.load_outcomes_between(rec.arrival, rec.dispatch) == 2

"""Baseline lane-switching policies for the scheduling benchmark (bench/scheduling.py), with the
Scheduler's event methods so that bench/simulator.py plays them on identical inputs
(``simulate(..., policy=BASELINES[name])``):

* ``fcfs``: one global FIFO queue; whenever the head of the queue is for another lane, the
  loaded lane is drained and the head's lane loaded.
* ``llama_swap``: llama-swap's rule: the loaded lane is served whenever it has requests (fast
  path); when it is idle, the lane of the oldest waiter is loaded.  No bound on waiting: a
  steady stream for the loaded lane starves the others.
* ``capped``: ours before issue 21: the cost-gated policy capped at B, frozen at commit bf47fea in
  bench/capped_scheduler.py: a ready lane takes every request at once (no dispatch limit; the
  engine queues beyond its batch) and what is still in flight at the drain bound is aborted.
* ``hold``: the rule before issue 13 ("ours before this change": another lane's request waits
  at most VLLM_SWITCH_MAX_WAIT before the loaded lane is drained for it, and a lane that loads
  takes only the requests queued for it then): the launcher's Scheduler frozen at commit
  a7b979b in bench/hold_scheduler.py, whatever the launcher's scheduler becomes.

fcfs and llama_swap keep one lane loaded at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import fields

from vllm_launcher.scheduler import (
    AbortInflight,
    Action,
    Dispatch,
    LanePolicy,
    LaneState,
    LaneStateChanged,
    Reject,
    SchedulerSettings,
    StartEngine,
    StopEngine,
    SwitchPlanned,
)

from . import capped_scheduler, hold_scheduler


class _ExclusiveBaseline(ABC):
    """Common machinery of the baselines: one lane loaded at a time."""

    def __init__(self, lanes: Sequence[LanePolicy], settings: SchedulerSettings | None = None):
        self.settings = settings if settings is not None else SchedulerSettings()
        self.lanes = tuple(p.name for p in lanes)
        self._state = {name: LaneState.STOPPED for name in self.lanes}
        self._queue: OrderedDict[Hashable, str] = OrderedDict()  # global FIFO: request -> lane
        self._inflight: dict[Hashable, str] = {}
        self._loaded: str | None = None  # lane resident (any non-stopped state)
        self._drain_started: float | None = None
        self._now = 0.0

    # events -------------------------------------------------------------
    def _event(self, now: float, change: Callable[[list[Action]], None] | None = None) -> list[Action]:
        self._now = now
        out: list[Action] = []
        if change is not None:
            change(out)
        self._step(now, out)
        return out

    def submit(self, request_id: Hashable, lane: str, now: float) -> list[Action]:
        if len(self._queue) >= self.settings.queue_max:
            return [Reject(request_id, lane, 503, "queue_full", "queue full", 1.0)]
        self._queue[request_id] = lane
        return self._event(now)

    def finish(self, request_id: Hashable, now: float) -> list[Action]:
        self._inflight.pop(request_id, None)
        return self._event(now)

    def cancel(self, request_id: Hashable, now: float) -> list[Action]:
        self._queue.pop(request_id, None)
        return self._event(now)

    def tick(self, now: float) -> list[Action]:
        return self._event(now)

    def engine_ready(self, lane: str, now: float) -> list[Action]:
        def change(out: list[Action]) -> None:
            if self._state[lane] is LaneState.STARTING:
                self._set(lane, LaneState.READY, "engine ready", out)

        return self._event(now, change)

    def engine_start_failed(self, lane: str, now: float, cause: str) -> list[Action]:
        # Like llama-swap: a failed start errors every request waiting for it.
        def change(out: list[Action]) -> None:
            if self._state[lane] is LaneState.STARTING:
                self._unload(lane, "start failed", out)
                for request_id, req_lane in list(self._queue.items()):
                    if req_lane == lane:
                        del self._queue[request_id]
                        out.append(Reject(request_id, lane, 503, "lane_failed", cause))

        return self._event(now, change)

    def engine_exited(self, lane: str, now: float, cause: str) -> list[Action]:
        def change(out: list[Action]) -> None:
            if self._state[lane] in (LaneState.READY, LaneState.DRAINING):
                for request_id in [r for r, ln in self._inflight.items() if ln == lane]:
                    del self._inflight[request_id]
                self._unload(lane, "engine exited", out)

        return self._event(now, change)

    def engine_stopped(self, lane: str, now: float) -> list[Action]:
        def change(out: list[Action]) -> None:
            if self._state[lane] is LaneState.STOPPING:
                self._unload(lane, "engine stopped", out)

        return self._event(now, change)

    def next_deadline(self) -> float | None:
        # The baselines have no queue timeout and no hold: only the drain timeout.
        if self._drain_started is None:
            return None
        deadline = self._drain_started + self.settings.drain_timeout
        return deadline if deadline > self._now else None

    def state(self, lane: str) -> LaneState:
        return self._state[lane]

    # machinery ------------------------------------------------------------
    def _unload(self, lane: str, reason: str, out: list[Action]) -> None:
        self._set(lane, LaneState.STOPPED, reason, out)
        self._loaded = None
        self._drain_started = None

    def _set(self, lane: str, new: LaneState, reason: str, out: list[Action]) -> None:
        old = self._state[lane]
        if old is not new:
            self._state[lane] = new
            out.append(LaneStateChanged(lane, old, new, reason))

    def _dispatch_where(self, lane: str, pick: Callable[[str], bool], out: list[Action]) -> None:
        for request_id, req_lane in list(self._queue.items()):
            if not pick(req_lane):
                break
            if req_lane == lane:
                del self._queue[request_id]
                self._inflight[request_id] = lane
                out.append(Dispatch(request_id, lane))

    def _switch_to(self, target: str, now: float, out: list[Action], reason: str) -> None:
        """Drain the loaded lane (or start ``target`` if none is loaded)."""
        loaded = self._loaded
        if loaded is None:
            self._loaded = target
            self._set(target, LaneState.STARTING, "start", out)
            out.append(SwitchPlanned((), target, reason))
            out.append(StartEngine(target, 1))
            return
        state = self._state[loaded]
        if state is LaneState.READY:
            self._set(loaded, LaneState.DRAINING, reason, out)
            self._drain_started = now
            out.append(SwitchPlanned((loaded,), target, reason))
            state = LaneState.DRAINING
        if state is LaneState.DRAINING:
            lane_inflight = [r for r, ln in self._inflight.items() if ln == loaded]
            if lane_inflight and now >= (self._drain_started or now) + self.settings.drain_timeout:
                for request_id in lane_inflight:
                    del self._inflight[request_id]
                out.append(AbortInflight(loaded, tuple(lane_inflight), "drain_timeout"))
                lane_inflight = []
            if not lane_inflight:
                self._drain_started = None
                self._set(loaded, LaneState.STOPPING, reason, out)
                out.append(StopEngine(loaded, reason))

    def _abandon_drain(self, out: list[Action]) -> None:
        """A drain whose target left (cancelled, or now the draining lane's own request heads the
        queue): the loaded lane takes requests again instead of being stopped and started."""
        loaded = self._loaded
        if loaded is None or self._state[loaded] is not LaneState.DRAINING:
            return
        head = next(iter(self._queue.values()), None)
        if head is None or head == loaded:
            self._drain_started = None
            self._set(loaded, LaneState.READY, "switch abandoned", out)

    @abstractmethod
    def _step(self, now: float, out: list[Action]) -> None:
        """The baseline's own rule: dispatch, start or drain given the current state."""


class FcfsPolicy(_ExclusiveBaseline):
    """Strict global FIFO: switch whenever the head of the queue is another lane."""

    def _step(self, now: float, out: list[Action]) -> None:
        self._abandon_drain(out)
        while self._queue:
            head_lane = next(iter(self._queue.values()))
            loaded = self._loaded
            if loaded == head_lane and self._state[loaded] is LaneState.READY:
                self._dispatch_where(loaded, lambda ln, loaded=loaded: ln == loaded, out)
                continue
            if loaded != head_lane:
                self._switch_to(head_lane, now, out, "fcfs")
            return


class LlamaSwapPolicy(_ExclusiveBaseline):
    """llama-swap's behaviour: the loaded lane's requests bypass the queue."""

    def _step(self, now: float, out: list[Action]) -> None:
        self._abandon_drain(out)
        loaded = self._loaded
        if loaded is not None and self._state[loaded] is LaneState.READY:
            self._dispatch_where(loaded, lambda ln: True, out)
            busy = any(ln == loaded for ln in self._inflight.values())
            if busy or not self._queue:
                return
        if not self._queue:
            return
        oldest_lane = next(iter(self._queue.values()))
        if loaded != oldest_lane:
            self._switch_to(oldest_lane, now, out, "idle")


def _frozen(module):
    """A frozen Scheduler of ``module``, with the settings it knows taken from ``settings``."""
    def policy(lanes: Sequence[LanePolicy], settings: SchedulerSettings | None = None):
        known = {f.name for f in fields(module.SchedulerSettings)}
        given = {name: getattr(settings, name) for name in known if settings is not None and hasattr(settings, name)}
        return module.Scheduler(lanes, module.SchedulerSettings(**given))
    return policy


HoldPolicy = _frozen(hold_scheduler)  # the pre-issue-13 Scheduler
CappedPolicy = _frozen(capped_scheduler)  # the pre-issue-21 Scheduler


BASELINES: dict[str, Callable] = {"fcfs": FcfsPolicy, "llama_swap": LlamaSwapPolicy, "hold": HoldPolicy,
                                  "capped": CappedPolicy}

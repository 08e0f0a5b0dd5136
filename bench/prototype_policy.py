"""TEMPORARY: the cost-gated capped policy of issue 13, prototyped on the baselines' machinery to
build the benchmark pipeline until the launcher's Scheduler has it; deleted then.

One lane at a time.  The loaded lane L takes every request for it (exhaustive service) until it
is closed: (i) it is idle while others wait, (ii) a waiter has waited the cap B
(``switch_max_wait``), or (iii) |W| * ext(L) >= theta * (S + sum over waiting lanes j of
(S_j + s_j)).  Next lane: oldest waiter first once someone waited B, else the largest
n_j / (S_j + s_j).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

from vllm_launcher.scheduler import Action, LaneState

from .baselines import _ExclusiveBaseline

THETA = 2.0


class CostGatedPrototype(_ExclusiveBaseline):
    def __init__(self, lanes, settings=None):
        super().__init__(lanes, settings)
        self._arrived: dict[Hashable, float] = {}
        self._dispatched: dict[Hashable, float] = {}
        self._services = {lane: deque(maxlen=32) for lane in self.lanes}
        self._cost = {lane: {"start": 40.0, "stop": 5.0} for lane in self.lanes}
        self._op_since: dict[str, tuple[str, float]] = {}

    # bookkeeping -----------------------------------------------------------
    def submit(self, request_id, lane, now):
        self._arrived[request_id] = now
        return super().submit(request_id, lane, now)

    def finish(self, request_id, now):
        if request_id in self._dispatched and request_id in self._inflight:
            lane = self._inflight[request_id]
            self._services[lane].append(now - self._dispatched.pop(request_id))
        return super().finish(request_id, now)

    def _set(self, lane, new, reason, out):
        old = self._state[lane]
        if new in (LaneState.STARTING, LaneState.STOPPING) and old is not new:
            self._op_since[lane] = ("start" if new is LaneState.STARTING else "stop", self._now)
        elif new in (LaneState.READY, LaneState.STOPPED) and lane in self._op_since:
            phase, since = self._op_since.pop(lane)
            self._cost[lane][phase] = self._now - since
        super()._set(lane, new, reason, out)

    def _dispatch_where(self, lane, pick, out):
        before = set(self._inflight)
        super()._dispatch_where(lane, pick, out)
        for request_id in set(self._inflight) - before:
            self._dispatched[request_id] = self._now
            self._arrived.pop(request_id, None)

    def next_deadline(self):
        deadlines = [d for d in (super().next_deadline(),) if d is not None]
        if self._arrived:
            cap = min(self._arrived.values()) + self.settings.switch_max_wait
            if cap > self._now:
                deadlines.append(cap)
        return min(deadlines) if deadlines else None

    # the rule ---------------------------------------------------------------
    def _mean_service(self, lane: str) -> float:
        s = self._services[lane]
        return sum(s) / len(s) if s else self.settings.request_seconds_estimate

    def _switch_cost(self, lane: str) -> float:
        return self._cost[lane]["start"] + self._cost[lane]["stop"]

    def _pick(self, now: float) -> str | None:
        if not self._queue:
            return None
        oldest_id = next(iter(self._queue))
        if now - self._arrived[oldest_id] >= self.settings.switch_max_wait:
            return self._queue[oldest_id]
        counts: dict[str, int] = {}
        for lane in self._queue.values():
            counts[lane] = counts.get(lane, 0) + 1
        return max(counts, key=lambda j: (counts[j] / (self._switch_cost(j) + self._mean_service(j)), -self.lanes.index(j)))

    def _close(self, loaded: str, now: float) -> bool:
        waiting = [rid for rid, lane in self._queue.items() if lane != loaded]
        if not waiting:
            return False
        inflight = [rid for rid, lane in self._inflight.items() if lane == loaded]
        if not inflight and loaded not in self._queue.values():
            return True
        if now - min(self._arrived[rid] for rid in waiting) >= self.settings.switch_max_wait:
            return True
        mean = self._mean_service(loaded)
        remaining = max((max(0.0, mean - (now - self._dispatched.get(rid, now))) for rid in inflight), default=0.0)
        samples = self._services[loaded] or [mean]
        ext = sum(max(0.0, s - remaining) for s in samples) / len(samples)
        lanes = set(self._queue[rid] for rid in waiting)
        cost = self._switch_cost(loaded) + sum(self._switch_cost(j) + self._mean_service(j) for j in lanes)
        return len(waiting) * ext >= THETA * cost

    def _step(self, now: float, out: list[Action]) -> None:
        loaded = self._loaded
        if loaded is not None and self._state[loaded] is LaneState.READY:
            if self._pick(now) == loaded or not self._close(loaded, now):
                self._dispatch_where(loaded, lambda ln: True, out)
            if self._close(loaded, now):
                target = self._pick(now)
                if target is not None and target != loaded:
                    self._switch_to(target, now, out, "cost")
            return
        if loaded is None:
            target = self._pick(now)
            if target is not None:
                self._switch_to(target, now, out, "idle")
            return
        if self._state[loaded] is LaneState.DRAINING:
            self._switch_to(loaded, now, out, "drain")  # finishes the drain (stop when empty / timeout)

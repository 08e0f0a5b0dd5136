"""Prometheus metrics of the front server (prometheus-client, one registry per server), plus
the loaded engines' own `vllm:*` metrics re-exposed with a `lane` label."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .scheduler import LaneState

WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)
PHASE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900)
STATES = [state.value for state in LaneState]


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("vllm_launcher_requests", "Requests answered, by lane and HTTP status",
                                ["lane", "status"], registry=registry)
        self.rejected = Counter("vllm_launcher_requests_rejected", "Requests refused before reaching an engine, by reason",
                                ["lane", "reason"], registry=registry)
        self.queue_depth = Gauge("vllm_launcher_queue_depth",
                                 "Requests waiting in the launcher for their lane (its backlog beyond the "
                                 "dispatch limit included)",
                                 ["lane"], registry=registry)
        self.queue_wait = Histogram("vllm_launcher_queue_wait_seconds", "Time from arrival to dispatch",
                                    ["lane"], buckets=WAIT_BUCKETS, registry=registry)
        self.inflight = Gauge("vllm_launcher_inflight_requests", "Requests being served by an engine",
                              ["lane"], registry=registry)
        self.switches = Counter("vllm_launcher_switches", "Lane switches, by lanes and reason",
                                ["from_lane", "to_lane", "reason"], registry=registry)
        self.switch_phase = Histogram("vllm_launcher_switch_phase_seconds",
                                      "Duration of the phases of a switch: drain, stop (or sleep), start "
                                      "(spawn to /health ready, or wake), warmup (the lane's warm-up)",
                                      ["lane", "phase"], buckets=PHASE_BUCKETS, registry=registry)
        self.engine_starts = Counter("vllm_launcher_engine_starts", "Engine starts attempted", ["lane"],
                                     registry=registry)
        self.engine_failures = Counter("vllm_launcher_engine_start_failures", "Engine starts that failed",
                                       ["lane"], registry=registry)
        self.engine_restarts = Counter("vllm_launcher_engine_restarts", "Engines restarted after a crash",
                                       ["lane"], registry=registry)
        self.engine_hangs = Counter("vllm_launcher_engine_hangs", "Engines the stall watchdog declared hung",
                                    ["lane"], registry=registry)
        self.lane_state = Gauge("vllm_launcher_lane_state", "1 for the lane's current state, 0 otherwise",
                                ["lane", "state"], registry=registry)
        self.preempted = Counter("vllm_launcher_requests_preempted",
                                 "Requests put back in line (cancelled upstream before any output reached the "
                                 "client, dispatched again later), by reason", ["lane", "reason"], registry=registry)
        self.dispatch_window = Gauge("vllm_launcher_dispatch_window",
                                     "Requests the lane's engine may hold now: the dispatch limit (MAX_NUM_SEQS), "
                                     "lowered while the engine's vllm:num_requests_waiting says it queues",
                                     ["lane"], registry=registry)

        self._lanes: dict[str, LaneMetrics] = {}

    def lane(self, lane: str) -> LaneMetrics:
        """The lane's children of the per-request metrics, looked up once."""
        found = self._lanes.get(lane)
        if found is None:
            found = self._lanes[lane] = LaneMetrics(self, lane)
        return found

    def set_state(self, lane: str, state: str) -> None:
        for name in STATES:
            self.lane_state.labels(lane, name).set(1 if name == state else 0)

    def render(self, engine_metrics: dict[str, str]) -> bytes:
        return generate_latest(self.registry) + merge_engine_metrics(engine_metrics).encode()


class LaneMetrics:
    """One lane's metric children for what every request touches (labels() is a lock, a tuple
    and a dict lookup each time)."""

    def __init__(self, metrics: Metrics, lane: str):
        self.queue_depth = metrics.queue_depth.labels(lane)
        self.queue_wait = metrics.queue_wait.labels(lane)
        self.inflight = metrics.inflight.labels(lane)
        self._requests = metrics.requests
        self._lane = lane
        self._answered: dict[int, object] = {}

    def answered(self, status: int):
        """The requests counter's child for this lane and STATUS."""
        child = self._answered.get(status)
        if child is None:
            child = self._answered[status] = self._requests.labels(self._lane, str(status))
        return child


_SAMPLE = re.compile(r"^(vllm:[a-zA-Z0-9_:]+)(\{[^}]*\})?(\s.*)$")


def merge_engine_metrics(by_lane: dict[str, str]) -> str:
    """The engines' exposition texts merged into one: `vllm:*` families only, each sample given
    a `lane` label, each family's HELP/TYPE written once and its samples kept together."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for lane, text in by_lane.items():
        family = None
        for line in text.splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2] if parts[2].startswith("vllm:") else None
                    if family:
                        comments = families.setdefault(family, ([], []))[0]
                        if line not in comments:
                            comments.append(line)
                continue
            match = _SAMPLE.match(line)
            if not match:
                continue
            name, labels, rest = match.groups()
            inner = labels[1:-1] if labels else ""
            label = f'lane="{lane}"' + (f",{inner}" if inner else "")
            families.setdefault(family or name, ([], []))[1].append(f"{name}{{{label}}}{rest}")
    lines = [line for comments, samples in families.values() for line in (*comments, *samples)]
    return "\n".join(lines) + ("\n" if lines else "")

"""Part 3: scheduling under agent traffic, in simulated time (bench/simulator.py).

Policies, on identical inputs (same arrivals, service times, switch costs, engine batch size):

* ``new``: the launcher's Scheduler (launcher/vllm_launcher/scheduler.py): the cost-gated
  policy capped at B = ``VLLM_SWITCH_MAX_WAIT``;
* ``capped``: ours before issue 21 (bench/capped_scheduler.py, frozen): the same cost-gated policy
  without a dispatch limit (a ready lane sends its engine every request; the engine queues beyond its
  batch) and aborting what is in flight at the drain bound;
* ``hold``: ours before issue 13, the hold rule (bench/hold_scheduler.py, frozen), at its
  default ``VLLM_SWITCH_MAX_WAIT`` of 30 s;
* ``llama_swap``: llama-swap's rule (serve the loaded lane while it has requests, else the
  oldest waiter's lane; no bound);
* ``fcfs``: a global FIFO that switches whenever the head of the queue is another lane.

Engines serve at most ``BATCH`` requests at once (vLLM's ``--max-num-seqs``); the rest wait in
the engine's queue.  Ours sends an engine at most ``BATCH`` (its lanes' ``max_inflight``, the
launcher's dispatch limit), so the rest waits in its own queue.  A request's *wait* is what its
user feels: arrival to the start of its service (the engine's queue included).  The wait *bound*
concerns the scheduler's part: of each wait for a dispatch (from arrival, or from going back in
line), the time its lane was not serving <= B + K (D + S), K the engine loads during the wait, D
the drain bound (``drain_timeout``), S the longest stop + start.

Workloads (service times log-normal per lane, median orchestrator 6 s, coder 15 s, fast_rag 2 s):

(a) ``agent_loop``: six agents, starting within 5 minutes, each looping orchestrator -> coder ->
    orchestrator -> fast_rag with a think time (tool calls, ~20 s exponential) between steps, for
    an hour.  Closed loop: an agent sends its next request after the previous answer plus its
    think time.  A task is one loop iteration (four requests).
(b) ``hammer``: three clients, each sending requests for its own lane every 2 s +- 50 % for 20
    minutes (open loop).
(c) ``bursty``: a Poisson trickle over the three lanes (every ~20 s) plus bursts of 5-25 requests
    for one lane within 10 s, a burst every ~2 minutes, for an hour (open loop).
(d) ``agent_batch``: three agents as in (a) for an hour, beside a batch job hammering the coder
    lane as in (b) for the first 20 minutes.
(e) ``light``: one agent as in (a), alone, for an hour.
(f) ``six_lanes``: six lanes with skewed popularity (Zipf) and per-lane start costs (20-55 s),
    eight closed-loop clients each picking a lane per request, think ~15 s, for an hour.
(g) ``batch_agent``: a batch job of ``BATCH_JOB`` requests submitted at once to the coder lane
    beside one agent looping on the orchestrator lane (think ~20 s) for an hour.
(s) ``saturated``: closed loop with fixed concurrency, four clients per lane, no think time,
    for an hour: the throughput a policy sustains when every lane always has work.

Throughput is counted in a fixed window (the workload's duration, requests finished by its
end, per hour), never per makespan of an open stream.  Seeds 1-20 tune (the choice of B),
seeds 21-40 are held out for the acceptance (issue 13).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from vllm_launcher.scheduler import LanePolicy, SchedulerSettings

from .baselines import BASELINES
from .common import QUICK, log
from .simulator import Client, SimResult, simulate

LANES = ("orchestrator", "coder", "fast_rag")
SERVICE = {"orchestrator": (6.0, 0.6), "coder": (15.0, 0.6), "fast_rag": (2.0, 0.5)}
SIX = ("general", "coder", "rag", "vision", "math", "translate")
SIX_POPULARITY = tuple(1.0 / (k + 1) ** 1.2 for k in range(6))  # Zipf, s = 1.2
SIX_SERVICE = {"general": (5.0, 0.6), "coder": (12.0, 0.6), "rag": (2.0, 0.5), "vision": (8.0, 0.6),
               "math": (10.0, 0.6), "translate": (4.0, 0.5)}
SIX_START = {"general": 30.0, "coder": 40.0, "rag": 20.0, "vision": 55.0, "math": 45.0, "translate": 25.0}
SERVICE_CLIP = (0.3, 60.0)
START_SECONDS = 40.0
STOP_SECONDS = 5.0
SWITCH_SECONDS = START_SECONDS + STOP_SECONDS
BATCH = 16  # requests an engine serves at once (--max-num-seqs); the rest queue at the engine
DRAIN_TIMEOUT = 120.0
HOLD_MAX_WAIT = 30.0  # VLLM_SWITCH_MAX_WAIT's default before issue 13 (the hold)
B_DEFAULT = SchedulerSettings().switch_max_wait  # the cap B if no B passes (a)-(c); else the recommended one
B_SWEEP = (30.0, 120.0, 600.0, 1200.0) if QUICK else (30.0, 60.0, 120.0, 180.0, 240.0, 480.0, 900.0, 1200.0, 1800.0)
TUNING_SEEDS = tuple(range(1, 4)) if QUICK else tuple(range(1, 21))
HELD_OUT_SEEDS = tuple(range(21, 24)) if QUICK else tuple(range(21, 41))
HOUR = 1200.0 if QUICK else 3600.0  # duration of the closed loops and of (c)
HAMMER_SECONDS = 600.0 if QUICK else 1200.0
AGENT_THINK = 20.0
AGENT_STAGGER = 300.0
BOOTSTRAP = 2000
BATCH_JOB = 500 if QUICK else 3000  # (g): requests the batch job submits at once
POLICIES = ("new", "capped", "hold", "llama_swap", "fcfs")
VARIANT_POLICIES = ("new", "hold", "llama_swap")
ACCEPTANCE_WORKLOADS = ("agent_loop", "hammer", "bursty")
THROUGHPUT_TOLERANCE = 0.03


FACTORIES: dict[str, Callable | str] = {"new": "scheduler", **BASELINES}  # "scheduler": the launcher's


def settings_for(policy: str, cap: float, budget: float | None = None,
                 drain_timeout: float = DRAIN_TIMEOUT) -> SchedulerSettings:
    """No rejections (compare waits): unbounded queue, no queue timeout."""
    wait = HOLD_MAX_WAIT if policy == "hold" else cap
    return SchedulerSettings(switch_max_wait=wait, drain_timeout=drain_timeout, queue_max=10**6, queue_timeout=1e9,
                             switch_seconds_estimate=SWITCH_SECONDS, memory_budget=budget)


def service_time(rng: random.Random, lane: str, table: dict = SERVICE) -> float:
    med, sigma = table[lane]
    return min(max(med * math.exp(rng.gauss(0.0, sigma)), SERVICE_CLIP[0]), SERVICE_CLIP[1])


# ------------------------------------------------------------------ workloads


@dataclass
class Workload:
    """One seed's inputs: lanes, open-loop arrivals (ids ``client/n``), closed-loop clients, the
    window [0, until) and each client's class (interactive or batch)."""
    lanes: list[LanePolicy]
    until: float
    arrivals: list[tuple[float, str, str, float]] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)
    classes: dict[str, str] = field(default_factory=dict)
    start_seconds: float | dict = START_SECONDS
    stop_seconds: float | dict = STOP_SECONDS
    budget: float | None = None  # memory budget (None: one lane at a time)
    drain_timeout: float = DRAIN_TIMEOUT
    sim: dict = field(default_factory=dict)  # further simulate() arguments: sleep, wake, start failures


def agent_steps(rng: random.Random) -> Iterator[tuple[str, float, float, int]]:
    loop = ("orchestrator", "coder", "orchestrator", "fast_rag")
    cycle = 0
    while True:
        for lane in loop:
            yield lane, service_time(rng, lane), rng.expovariate(1 / AGENT_THINK) + 0.5, cycle
        cycle += 1


def agents(seed: int, count: int, w: Workload) -> None:
    for a in range(count):
        rng = random.Random(seed * 1000 + 10 + a)
        name = f"agent{a}"
        w.clients.append(Client(name, rng.uniform(0, AGENT_STAGGER) if count > 1 else 0.0, agent_steps(rng)))
        w.classes[name] = "interactive"


def hammer(seed: int, lanes: tuple[str, ...], w: Workload, klass: str, prefix: str = "") -> None:
    rng = random.Random(seed * 1000 + 2)
    for i, lane in enumerate(lanes):
        client = f"{prefix}{lane}"
        t, n = float(i), 0
        while t < HAMMER_SECONDS:
            w.arrivals.append((t, f"{client}/{n}", lane, service_time(rng, lane)))
            n += 1
            t += 2.0 * rng.uniform(0.5, 1.5)
        w.classes[client] = klass


def bursty(seed: int, w: Workload) -> None:
    rng = random.Random(seed * 1000 + 3)
    t, n = 0.0, 0
    while True:
        t += rng.expovariate(1 / 20.0)
        if t >= w.until:
            break
        lane = rng.choice(LANES)
        w.arrivals.append((t, f"trickle/{n}", lane, service_time(rng, lane)))
        n += 1
    t, b = 0.0, 0
    while True:
        t += rng.expovariate(1 / 120.0)
        if t >= w.until - 10.0:
            break
        lane = rng.choice(LANES)
        for k in range(rng.randint(5, 25)):
            w.arrivals.append((t + rng.uniform(0, 10), f"burst{b}/{k}", lane, service_time(rng, lane)))
        w.classes[f"burst{b}"] = "batch"
        b += 1
    w.classes["trickle"] = "interactive"


def six_steps(rng: random.Random) -> Iterator[tuple[str, float, float]]:
    while True:
        lane = rng.choices(SIX, SIX_POPULARITY)[0]
        yield lane, service_time(rng, lane, SIX_SERVICE), rng.expovariate(1 / 15.0) + 0.5


def saturated_steps(rng: random.Random, lane: str) -> Iterator[tuple[str, float, float]]:
    while True:
        yield lane, service_time(rng, lane), 0.0


def orchestrator_steps(rng: random.Random) -> Iterator[tuple[str, float, float, int]]:
    cycle = 0
    while True:
        yield "orchestrator", service_time(rng, "orchestrator"), rng.expovariate(1 / AGENT_THINK) + 0.5, cycle
        cycle += 1


def build(workload: str, seed: int) -> Workload:
    w = _build(workload, seed)
    # the launcher's dispatch limit is the engine's batch (the baselines do not look at it)
    w.lanes = [dataclasses.replace(p, max_inflight=BATCH) for p in w.lanes]
    return w


def _build(workload: str, seed: int) -> Workload:
    three = [LanePolicy(n) for n in LANES]
    if workload == "agent_loop":
        w = Workload(three, HOUR)
        agents(seed, 6, w)
    elif workload == "light":
        w = Workload(three, HOUR)
        agents(seed, 1, w)
    elif workload == "hammer":
        w = Workload(three, HAMMER_SECONDS)
        hammer(seed, LANES, w, "interactive")
    elif workload == "bursty":
        w = Workload(three, HOUR)
        bursty(seed, w)
    elif workload == "agent_batch":
        w = Workload(three, HOUR)  # the agents go on for an hour, the batch job lasts the first 20 minutes
        agents(seed, 3, w)
        hammer(seed, ("coder",), w, "batch", prefix="batch-")
    elif workload == "six_lanes":
        w = Workload([LanePolicy(n) for n in SIX], HOUR,
                     start_seconds=SIX_START, stop_seconds=STOP_SECONDS)
        for c in range(8):
            rng = random.Random(seed * 1000 + 40 + c)
            w.clients.append(Client(f"user{c}", rng.uniform(0, AGENT_STAGGER), six_steps(rng)))
            w.classes[f"user{c}"] = "interactive"
    elif workload == "batch_agent":
        w = Workload(three, HOUR)
        rng = random.Random(seed * 1000 + 5)
        w.arrivals = [(0.0, f"batch/{i}", "coder", service_time(rng, "coder")) for i in range(BATCH_JOB)]
        w.classes["batch"] = "batch"
        agent = random.Random(seed * 1000 + 11)
        w.clients.append(Client("agent", agent.uniform(0, 60.0), orchestrator_steps(agent)))
        w.classes["agent"] = "interactive"
    elif workload == "saturated":
        w = Workload(three, HOUR)
        for lane in LANES:
            for c in range(4):
                rng = random.Random(seed * 1000 + 60 + 4 * LANES.index(lane) + c)
                w.clients.append(Client(f"{lane}{c}", 0.0, saturated_steps(rng, lane)))
                w.classes[f"{lane}{c}"] = "batch"
    elif workload in VARIANTS:
        w = variant(workload, seed)
    else:
        raise ValueError(f"unknown workload {workload!r}")
    return w


# Beyond the acceptance: the simulator's other features.  Sleeping lanes: level 1 keeps the
# weights in (unified) memory: share 0.6 awake, 0.15 asleep, budget 0.95 (one awake lane and two
# sleepers fit); wake 1-3 s per lane, sleep 1 s (published GPU figures, assumed).
WAKE = {"orchestrator": 1.5, "coder": 3.0, "fast_rag": 1.0}
SLEEP_SECONDS = 1.0
START_FAILURE = 0.1  # probability that an engine start fails (reported after START_FAIL_SECONDS)
START_FAIL_SECONDS = 10.0
VARIANTS = {
    "agent_loop_sleep": ("(a) + sleeping lanes", "(a) with every lane at sleep level 1 (share 0.6, asleep 0.15, "
                         "budget 0.95; wake 1-3 s, sleep 1 s); the baselines stop and start"),
    "light_sleep": ("(e) + sleeping lanes", "(e) one agent, lanes sleeping as above"),
    "agent_loop_failures": ("(a) + start failures", f"(a) with each engine start failing with probability "
                            f"{START_FAILURE:.0%} after {START_FAIL_SECONDS:.0f} s"),
    "hammer_long_drain": ("(b) + drain_timeout 600 s", "(b) with `drain_timeout` 600 s instead of 120 s: a drain "
                          "may empty the engine's queue instead of aborting it"),
    "six_lanes_shared": ("(f) + co-residency", "(f) with shares 0.3 and budget 0.9: three lanes fit at once "
                         "(the exclusive baselines load one)"),
}


def variant(workload: str, seed: int) -> Workload:
    base = {"agent_loop_sleep": "agent_loop", "light_sleep": "light", "agent_loop_failures": "agent_loop",
            "hammer_long_drain": "hammer", "six_lanes_shared": "six_lanes"}[workload]
    w = _build(base, seed)
    if workload.endswith("_sleep"):
        w.lanes = [LanePolicy(p.name, 0.6, sleep_level=1, sleep_share=0.15) for p in w.lanes]
        w.budget = 0.95
        w.sim = {"wake_seconds": WAKE, "sleep_seconds": SLEEP_SECONDS}
    elif workload == "hammer_long_drain":
        w.drain_timeout = 600.0
    elif workload == "agent_loop_failures":
        rng = random.Random(seed * 1000 + 7)
        w.sim = {"start_failures": lambda lane, n: rng.random() < START_FAILURE,
                 "start_fail_seconds": START_FAIL_SECONDS}
    else:
        w.lanes = [LanePolicy(p.name, 0.3) for p in w.lanes]
        w.budget = 0.9
    return w


WORKLOADS = {
    "agent_loop": ("(a) agent loop", "(a) agent loop: 6 agents, orchestrator -> coder -> orchestrator -> fast_rag, "
                   "think ~20 s, one hour"),
    "hammer": ("(b) 3 clients hammering", "(b) three clients each hammering its own lane (a request every 2 s "
               "+- 50 %) for 20 minutes"),
    "bursty": ("(c) bursty mixed", "(c) bursty mixed: trickle every ~20 s plus bursts of 5-25 requests for one "
               "lane, one hour"),
    "agent_batch": ("(d) agents + batch job", "(d) 3 agents as in (a) for an hour, beside a batch job hammering the "
                    "coder lane as in (b) for its first 20 minutes"),
    "light": ("(e) one agent", "(e) light: a single agent as in (a), alone, one hour"),
    "six_lanes": ("(f) 6 lanes, skewed", "(f) six lanes, Zipf popularity (s = 1.2), starts 20-55 s, 8 clients "
                  "picking a lane per request, think ~15 s, one hour"),
    "batch_agent": ("(g) batch job + agent", f"(g) a batch job of {BATCH_JOB} requests submitted at once to the "
                    "coder lane, beside one agent looping on the orchestrator lane (think ~20 s), one hour"),
    "saturated": ("(s) saturated", "(s) saturated closed loop: 4 clients per lane, no think time, one hour "
                  "(fixed concurrency 12)"),
}


def run_one(workload: str, seed: int, policy: str, cap: float = B_DEFAULT) -> tuple[SimResult, Workload]:
    w = build(workload, seed)
    result = simulate(w.lanes, w.arrivals, clients=w.clients, clients_until=w.until,
                      settings=settings_for(policy, cap, w.budget, w.drain_timeout), start_seconds=w.start_seconds,
                      stop_seconds=w.stop_seconds, batch_size=BATCH, policy=FACTORIES[policy], **w.sim)
    return result, w


# ------------------------------------------------------------------ measures


def client_of(rec) -> str:
    return rec.client if rec.client is not None else str(rec.request_id).rsplit("/", 1)[0]


def _p(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def stated_bound(cap: float, w: Workload, k: int) -> float:
    """B + K P, P = D + T_down + T_up + X: D the drain bound (drain_timeout: with a finite batch a drain
    also waits for the engine's queue), T_down the longest way down (stop; sleep then stop for a
    sleeping lane), T_up the longest way up (start, wake, a failed start reported), X the longest
    back-off when starts may fail (else 0), K the load outcomes during the wait."""
    starts = w.start_seconds.values() if isinstance(w.start_seconds, dict) else [w.start_seconds]
    sleeps = any(p.sleep_level for p in w.lanes)
    fails = "start_failures" in w.sim
    down = STOP_SECONDS + (SLEEP_SECONDS if sleeps else 0.0)
    up = max([*starts, *(WAKE.values() if sleeps else ()), *((START_FAIL_SECONDS,) if fails else ())])
    backoff = SchedulerSettings().backoff_max if fails else 0.0
    return cap + k * (w.drain_timeout + down + up + backoff)


def measures(result: SimResult, w: Workload, cap: float) -> dict:
    recs = list(result.requests.values())
    served = [r for r in recs if r.start is not None]
    waits = np.array([r.service_wait for r in served])
    by_client: dict[str, list[float]] = {}
    tasks: dict[tuple, list[float]] = {}
    for r in served:
        by_client.setdefault(client_of(r), []).append(r.service_wait)
    for r in recs:
        if r.task is not None:
            tasks.setdefault((r.client, r.task), []).append(r)
    task_times = [max(x.finish for x in rs) - min(x.arrival for x in rs) for rs in tasks.values()
                  if len(rs) == 4 and all(x.outcome == "finished" for x in rs)] if tasks else []
    per_client = {c: {"n": len(v), "p99": _p(v, 99), "max": max(v)} for c, v in by_client.items()}
    classes = {}
    for klass in ("interactive", "batch"):
        v = [x for c, ws in by_client.items() if w.classes.get(c, "interactive") == klass for x in ws]
        if v:
            classes[klass] = {"mean": float(np.mean(v)), "p99": _p(v, 99), "max": max(v)}
    # the bound: the scheduler's part of each wait for a dispatch (its lane not serving)
    violations, worst_ratio, k_max, load_wait_max = 0, 0.0, 0, 0.0
    for r in recs:
        for begun, dispatched in r.waits():
            k = result.load_outcomes_between(begun, dispatched)
            bound = stated_bound(cap, w, k)
            waited = result.not_ready_seconds(r.lane, begun, dispatched)
            k_max = max(k_max, k)
            load_wait_max = max(load_wait_max, waited)
            worst_ratio = max(worst_ratio, waited / bound)
            violations += waited > bound + 1e-6
    finished_in_window = sum(1 for r in recs if r.outcome == "finished" and r.finish <= w.until)
    end = max((r.finish for r in recs if r.finish is not None), default=w.until)
    batch_done = [r.finish for r in recs if w.classes.get(client_of(r)) == "batch" and r.finish is not None]
    return {
        "requests": len(recs),
        "unserved": len(recs) - len(served),
        "errors": sum(1 for r in recs if r.outcome in ("aborted", "rejected", "lost")),  # drain timeout, failed start
        "switches": max(0, result.switch_count - 1),
        "wait_mean": float(waits.mean()),
        "wait_p50": _p(waits, 50),
        "wait_p99": _p(waits, 99),
        "wait_max": float(waits.max()),
        "dispatch_wait_max": load_wait_max,
        "preempted": sum(len(r.preempted) for r in recs),
        "batch_done": max(batch_done) if batch_done and len(batch_done) == sum(
            1 for r in recs if w.classes.get(client_of(r)) == "batch") else None,
        "bound_violations": violations,
        "bound_worst_ratio": worst_ratio,
        "bound_global": stated_bound(cap, w, len(w.lanes)),
        "loads_during_a_wait_max": k_max,
        "worst_client_p99": max(c["p99"] for c in per_client.values()),
        "worst_client_max": max(c["max"] for c in per_client.values()),
        "client_p99_max": {c: [v["p99"], v["max"]] for c, v in per_client.items()},
        "classes": classes,
        "task_mean": float(np.mean(task_times)) if task_times else None,
        "task_p99": _p(task_times, 99) if task_times else None,
        "tasks": len(task_times),
        "agents": len({r.client for r in recs if r.task is not None}),
        "throughput_per_hour": finished_in_window / w.until * 3600.0,
        "switching_fraction": result.switching_seconds / end if end > 0 else 0.0,
    }


def bootstrap(values, seed: int = 0) -> dict:
    """Mean over seeds with the 95 % percentile-bootstrap interval of the mean."""
    v = np.array([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    if len(v) == 1:
        return {"mean": float(v[0]), "lo": float(v[0]), "hi": float(v[0]), "n": 1}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (BOOTSTRAP, len(v)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(v.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(v))}


SUMMARY_KEYS = ("wait_mean", "wait_p99", "wait_max", "worst_client_p99", "worst_client_max", "task_mean", "task_p99",
                "throughput_per_hour", "switches", "switching_fraction", "batch_done")


def summarize(runs: list[dict]) -> dict:
    out = {key: bootstrap([r[key] for r in runs]) for key in SUMMARY_KEYS}
    for klass in ("interactive", "batch"):
        for stat in ("mean", "p99", "max"):
            values = [r["classes"][klass][stat] for r in runs if klass in r["classes"]]
            if values:
                out[f"{klass}_{stat}"] = bootstrap(values)
    out["wait_max_all"] = max(r["wait_max"] for r in runs)
    out["dispatch_wait_max_all"] = max(r["dispatch_wait_max"] for r in runs)
    out["bound_violations"] = sum(r["bound_violations"] for r in runs)
    out["bound_worst_ratio"] = max(r["bound_worst_ratio"] for r in runs)
    out["bound_global"] = min(r["bound_global"] for r in runs)
    out["unserved"] = sum(r["unserved"] for r in runs)
    out["errors"] = sum(r["errors"] for r in runs)
    out["preempted"] = sum(r["preempted"] for r in runs)
    clients = sorted({c for r in runs for c in r["client_p99_max"]})
    if len(clients) <= 12:  # agents, streams, users: each client's p99 and max, mean over seeds
        out["clients"] = {c: {"p99": bootstrap([r["client_p99_max"][c][0] for r in runs if c in r["client_p99_max"]]),
                              "max": bootstrap([r["client_p99_max"][c][1] for r in runs if c in r["client_p99_max"]])}
                          for c in clients}
    return out


def paired(new: list[dict], base: list[dict], key: str) -> dict:
    """The 95 % bootstrap interval of the mean paired difference new - base over seeds."""
    return bootstrap([a[key] - b[key] for a, b in zip(new, base, strict=False)])


# ------------------------------------------------------------------ runs


def quantiles(values: list[float], points: int = 101) -> list[float]:
    return [float(x) for x in np.percentile(values, np.linspace(0, 100, points))] if values else []


def timeline_of(result: SimResult, w: Workload) -> dict:
    """What a plot needs: lane state intervals and the number of requests waiting over time."""
    last = max(r.finish for r in result.requests.values() if r.finish is not None)
    states = [(t, lane, new) for t, lane, _old, new, _reason in result.timeline if t <= last]
    events = []
    for r in result.requests.values():
        events.append((r.arrival, 1, r.lane))
        events.append((r.start if r.start is not None else last, -1, r.lane))
    events.sort(key=lambda e: (e[0], e[1]))
    depth = {p.name: 0 for p in w.lanes}
    step = max(5.0, last / 2000)  # one point per lane and step: the depth at the step's end
    points: dict[tuple[str, int], tuple[float, str, int]] = {}
    for t, delta, lane in events:
        depth[lane] += delta
        points[(lane, int(t // step))] = (round(t, 1), lane, depth[lane])
    return {"states": states, "waiting": sorted(points.values()), "end": last}


def run_policy(workload: str, policy: str, seeds, cap: float, keep: dict | None = None) -> list[dict]:
    runs = []
    for seed in seeds:
        result, w = run_one(workload, seed, policy, cap)
        m = measures(result, w, cap)
        m["seed"] = seed
        runs.append(m)
        if keep is not None:
            keep.setdefault("waits", []).extend(r.service_wait for r in result.requests.values() if r.start is not None)
            if seed == seeds[0] and workload in ("hammer", "agent_batch"):
                keep["timeline"] = timeline_of(result, w)
    return runs


def acceptance(runs: dict, cap: float, ours: str = "new", base: str = "llama_swap") -> dict:
    """Issue 13: ours (the new policy) vs llama-swap on held-out seeds, (a)-(c); the bound everywhere."""
    verdicts = {}
    for workload in ACCEPTANCE_WORKLOADS:
        if workload not in runs:
            continue
        new, ls = runs[workload][ours], runs[workload][base]
        mean_d, p99_d = paired(new, ls, "wait_mean"), paired(new, ls, "wait_p99")
        thr_new = float(np.mean([r["throughput_per_hour"] for r in new]))
        thr_ls = float(np.mean([r["throughput_per_hour"] for r in ls]))
        ratio = thr_new / thr_ls if thr_ls else float("inf")
        verdicts[workload] = {
            "wait_mean_diff": mean_d, "wait_p99_diff": p99_d,
            "wait_mean_ok": mean_d["lo"] <= 0.0, "wait_p99_ok": p99_d["lo"] <= 0.0,
            "throughput_ratio": ratio, "throughput_ok": ratio >= 1.0 - THROUGHPUT_TOLERANCE,
        }
        verdicts[workload]["ok"] = all(verdicts[workload][k] for k in ("wait_mean_ok", "wait_p99_ok", "throughput_ok"))
    bounds = {}
    for workload, per_policy in runs.items():
        new = per_policy.get(ours)
        if new:
            bounds[workload] = {"violations": sum(r["bound_violations"] for r in new),
                                "dispatch_wait_max": max(r["dispatch_wait_max"] for r in new),
                                "bound_global": min(r["bound_global"] for r in new),
                                "worst_ratio": max(r["bound_worst_ratio"] for r in new)}
    bound_ok = all(b["violations"] == 0 for b in bounds.values())
    return {"cap": cap, "ours": ours, "base": base, "workloads": verdicts, "bound": bounds, "bound_ok": bound_ok,
            "ok": bound_ok and all(v["ok"] for v in verdicts.values())}


def sweep(seeds, llama: dict, caps=B_SWEEP) -> dict:
    """The new policy over B on (a)-(d): summaries, and the acceptance checks against llama-swap."""
    out = {}
    for cap in caps:
        row = {}
        for workload in (*ACCEPTANCE_WORKLOADS, "agent_batch"):
            runs = run_policy(workload, "new", seeds, cap)
            entry = {"summary": summarize(runs)}
            if workload in ACCEPTANCE_WORKLOADS:
                ls = llama[workload]
                thr = float(np.mean([r["throughput_per_hour"] for r in runs])) / float(
                    np.mean([r["throughput_per_hour"] for r in ls]))
                md, pd = paired(runs, ls, "wait_mean"), paired(runs, ls, "wait_p99")
                entry["vs_llama_swap"] = {"wait_mean_diff": md, "wait_p99_diff": pd, "throughput_ratio": thr,
                                          "ok": md["lo"] <= 0 and pd["lo"] <= 0 and thr >= 1 - THROUGHPUT_TOLERANCE}
            entry["bound_violations"] = sum(r["bound_violations"] for r in runs)
            row[workload] = entry
        row["passes_a_c"] = all(row[w]["vs_llama_swap"]["ok"] for w in ACCEPTANCE_WORKLOADS)
        out[str(int(cap))] = row
        d = row["agent_batch"]["summary"]
        log(f"sweep B={cap:6.0f}: (d) mean {d['wait_mean']['mean']:6.1f} p99 {d['wait_p99']['mean']:6.1f} "
            f"worst client p99 {d['worst_client_p99']['mean']:6.1f} s; (a)-(c) vs llama-swap "
            f"{'pass' if row['passes_a_c'] else 'FAIL'}")
    return out


def recommend(curve: dict) -> dict:
    """The default B: among the caps that pass (a)-(c) against llama-swap on the tuning seeds, the
    one with the lowest worst-client p99 wait on (d) (what the most-starved user of (d) feels),
    the smaller cap on a tie."""
    passing = [(row["agent_batch"]["summary"]["worst_client_p99"]["mean"], float(cap), cap)
               for cap, row in curve.items() if row["passes_a_c"]]
    rule = " ".join(recommend.__doc__.split())
    if not passing:
        return {"cap": None, "rule": rule, "candidates": []}
    _, cap, key = min(passing)
    return {"cap": cap, "rule": rule,
            "candidates": [float(c) for c, row in curve.items() if row["passes_a_c"]]}


def run(tuning_seeds=TUNING_SEEDS, held_out_seeds=HELD_OUT_SEEDS, caps=B_SWEEP, workloads=tuple(WORKLOADS),
        policies=POLICIES, variants: bool = True) -> dict:
    """The whole part: B chosen on the tuning seeds, then every workload and policy on the held-out
    seeds at that B, the B curve on both, the acceptance.  The arguments shrink it (tests)."""
    began = time.monotonic()
    out = {"settings": {
        "lanes": LANES, "policies": policies, "start_seconds": START_SECONDS, "stop_seconds": STOP_SECONDS,
        "switch_seconds": SWITCH_SECONDS, "batch": BATCH, "drain_timeout": DRAIN_TIMEOUT,
        "hold_max_wait": HOLD_MAX_WAIT, "b_sweep": caps, "tuning_seeds": tuning_seeds,
        "held_out_seeds": held_out_seeds, "service_lognormal_median_sigma": SERVICE, "service_clip": SERVICE_CLIP,
        "six_lanes": {"service": SIX_SERVICE, "start_seconds": SIX_START, "popularity": SIX_POPULARITY},
        "hour": HOUR, "hammer_seconds": HAMMER_SECONDS, "bootstrap": BOOTSTRAP, "quick": QUICK,
        "new_policy": getattr(FACTORIES["new"], "__name__", str(FACTORIES["new"])),
        "scheduler_defaults": {k: v for k, v in vars(SchedulerSettings()).items()
                               if k in ("switch_max_wait", "cost_theta", "fair_wait", "drain_timeout")}},
        "workloads": {}, "waits": {}, "timelines": {}}
    # 1. the cap B: llama-swap on the tuning seeds, then the new policy over B
    llama_tuning = {w: run_policy(w, "llama_swap", tuning_seeds, B_DEFAULT) for w in ACCEPTANCE_WORKLOADS}
    curve = sweep(tuning_seeds, llama_tuning, caps)
    rec = recommend(curve)
    cap = rec["cap"] if rec["cap"] is not None else B_DEFAULT
    log(f"recommended B = {cap:.0f} s ({'none passes (a)-(c): fallback' if rec['cap'] is None else rec['rule']})")
    out["settings"]["cap"] = cap
    # 2. every workload and policy on the held-out seeds at that B
    runs: dict[str, dict[str, list[dict]]] = {}
    for workload in workloads:
        short, description = WORKLOADS[workload]
        per_policy = {}
        runs[workload] = {}
        for policy in policies:
            keep: dict = {}
            rs = run_policy(workload, policy, held_out_seeds, cap, keep)
            runs[workload][policy] = rs
            per_policy[policy] = {"summary": summarize(rs), "runs": rs}
            out["waits"].setdefault(workload, {})[policy] = quantiles(keep.get("waits", []))
            if "timeline" in keep:
                out["timelines"].setdefault(workload, {})[policy] = keep["timeline"]
            s = per_policy[policy]["summary"]
            log(f"scheduling {workload:11s} {policy:10s} wait mean {s['wait_mean']['mean']:7.1f} p99 "
                f"{s['wait_p99']['mean']:7.1f} max {s['wait_max_all']:7.1f} worst-client p99 "
                f"{s['worst_client_p99']['mean']:7.1f} s thr {s['throughput_per_hour']['mean']:6.0f}/h "
                f"switches {s['switches']['mean']:5.1f}")
        out["workloads"][workload] = {"short": short, "description": description, "policies": per_policy}
    # the simulator's other features, held-out seeds, same B
    out["variants"] = {}
    variant_runs: dict[str, dict[str, list[dict]]] = {}
    for workload in (v for v in VARIANTS if variants):
        short, description = VARIANTS[workload]
        per_policy = {}
        variant_runs[workload] = {}
        for policy in VARIANT_POLICIES:
            rs = run_policy(workload, policy, held_out_seeds, cap)
            variant_runs[workload][policy] = rs
            per_policy[policy] = {"summary": summarize(rs), "runs": rs}
            s = per_policy[policy]["summary"]
            log(f"variant {workload:20s} {policy:10s} wait mean {s['wait_mean']['mean']:7.1f} p99 "
                f"{s['wait_p99']['mean']:7.1f} max {s['wait_max_all']:7.1f} s thr {s['throughput_per_hour']['mean']:6.0f}/h")
        out["variants"][workload] = {"short": short, "description": description, "policies": per_policy}
    # 3. the B curve on the held-out seeds too (shown beside the tuning one; the choice used 1-20)
    llama_held = {w: runs[w]["llama_swap"] for w in ACCEPTANCE_WORKLOADS}
    out["b_curve"] = {"tuning": curve, "held_out": sweep(held_out_seeds, llama_held, caps), "recommended": rec}
    out["acceptance"] = acceptance(runs, cap)
    out["acceptance"]["bound_variants"] = acceptance(variant_runs, cap)["bound"] if variant_runs else {}
    acc = out["acceptance"]
    for workload, v in acc["workloads"].items():
        log(f"acceptance {workload:10s}: mean diff {v['wait_mean_diff']['mean']:+.1f} s "
            f"[{v['wait_mean_diff']['lo']:+.1f}, {v['wait_mean_diff']['hi']:+.1f}], p99 diff "
            f"{v['wait_p99_diff']['mean']:+.1f} s [{v['wait_p99_diff']['lo']:+.1f}, {v['wait_p99_diff']['hi']:+.1f}], "
            f"throughput x{v['throughput_ratio']:.3f} -> {'ok' if v['ok'] else 'FAILS'}")
    log(f"acceptance: bound {'holds' if acc['bound_ok'] else 'VIOLATED'} on every workload; overall "
        f"{'PASS' if acc['ok'] else 'FAIL'}")
    out["runtime_seconds"] = time.monotonic() - began
    return out


def b_summary(out: dict) -> dict:
    """bench/results/switch_max_wait.json: the choice of VLLM_SWITCH_MAX_WAIT's default in brief (for the
    scheduler's settings): per B, (d)'s waits and (a)-(c) against llama-swap, on both seed sets."""
    def row(entry: dict) -> dict:
        d = entry["agent_batch"]["summary"]
        return {"d_wait_mean": d["wait_mean"]["mean"], "d_wait_p99": d["wait_p99"]["mean"],
                "d_worst_client_p99": d["worst_client_p99"]["mean"], "d_wait_max": d["wait_max_all"],
                "a_c_no_worse_than_llama_swap": entry["passes_a_c"],
                "a_c": {w: {"mean_diff": entry[w]["vs_llama_swap"]["wait_mean_diff"],
                            "p99_diff": entry[w]["vs_llama_swap"]["wait_p99_diff"],
                            "throughput_ratio": entry[w]["vs_llama_swap"]["throughput_ratio"]}
                        for w in ACCEPTANCE_WORKLOADS}}
    curve = out["b_curve"]
    return {"policy": out["settings"]["new_policy"], "recommended": curve["recommended"],
            "tuning_seeds": out["settings"]["tuning_seeds"], "held_out_seeds": out["settings"]["held_out_seeds"],
            "tuning": {cap: row(e) for cap, e in curve["tuning"].items()},
            "held_out": {cap: row(e) for cap, e in curve["held_out"].items()},
            "acceptance_ok": out["acceptance"]["ok"]}

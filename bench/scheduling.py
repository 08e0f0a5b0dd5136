"""Part 3: scheduling under agent traffic, in simulated time (vllm_launcher.simulator).

The real Scheduler (``scheduler``) and two baselines of bench/baselines.py (``fcfs``: a global FIFO
that switches whenever the head of the queue is another lane; ``llama_swap``: serve the
loaded lane while it has requests, else load the oldest waiter's lane, no wait bound) get
the same arrivals, the same switch cost (stop 5 s + start 40 s = 45 s) and the same service
times, drawn per lane from a log-normal distribution.  Three workloads, fixed seeds:

(a) ``agent_loop``: six agents, starting within 5 minutes, that each loop orchestrator ->
    coder -> orchestrator -> fast_rag, thinking (tool calls, ~20 s exponential) between
    steps.  Closed loop: an agent sends its next request only after the previous answer
    arrived plus its think time.
(b) ``hammer``: three clients, each sending requests for its own lane at a steady rate
    (every 2 s +- 50 %) for 20 minutes, so a loaded lane always has requests in flight.
(c) ``bursty``: a Poisson trickle over the three lanes plus bursts of 5-25 requests for
    one random lane within 10 s, a burst every ~2 minutes on average.
(d) ``agent_batch`` (beyond the issue's three): three agents as in (a) beside a batch job
    that hammers the coder lane as in (b) for 20 minutes.

The simulator takes its arrivals up front; the closed loop of (a) is built on it exactly:
simulation up to time t depends only on arrivals up to t, so the earliest next request of
any agent (its previous request's end + think time) is appended and the run repeated,
adding at once every agent whose previous request ended before that earliest next arrival.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from vllm_launcher.scheduler import LanePolicy, SchedulerSettings
from vllm_launcher.simulator import SimResult, simulate

from .baselines import BASELINES
from .common import QUICK, log, percentile, spread

LANES = ("orchestrator", "coder", "fast_rag")
POLICIES = ("scheduler", "fcfs", "llama_swap")
START_SECONDS = 40.0
STOP_SECONDS = 5.0
SWITCH_SECONDS = START_SECONDS + STOP_SECONDS
# Service time (s) per lane: log-normal with this median and sigma, clipped.
SERVICE = {"orchestrator": (6.0, 0.6), "coder": (15.0, 0.6), "fast_rag": (2.0, 0.5)}
SERVICE_CLIP = (0.3, 60.0)
SETTINGS = SchedulerSettings(switch_max_wait=30.0, drain_timeout=120.0,
                             queue_max=10**6, queue_timeout=1e9)  # no rejections: compare waits
SEEDS = (1, 2) if QUICK else (1, 2, 3, 4, 5)
AGENTS = 6
AGENT_THINK = 20.0  # mean think time (s) between an agent's steps, plus 0.5 s
AGENT_STAGGER = 300.0  # agents start uniformly within this many seconds
AGENT_CYCLES = 6 if QUICK else 12
HAMMER_MINUTES = 10 if QUICK else 20
BURSTY_MINUTES = 30 if QUICK else 60


def service_time(rng: random.Random, lane: str) -> float:
    med, sigma = SERVICE[lane]
    value = med * math.exp(rng.gauss(0.0, sigma))
    return min(max(value, SERVICE_CLIP[0]), SERVICE_CLIP[1])


# ------------------------------------------------------------------ workloads


@dataclass
class Chain:
    """A closed-loop client: steps (lane, service, think before it); the first at ``start``."""
    name: str
    start: float
    steps: list[tuple[str, float, float]]


def agent_chains(seed: int, agents: int = AGENTS) -> list[Chain]:
    rng = random.Random(seed * 1000 + 1)
    loop = ("orchestrator", "coder", "orchestrator", "fast_rag")
    chains = []
    for a in range(agents):
        steps = []
        for _ in range(AGENT_CYCLES):
            for lane in loop:
                steps.append((lane, service_time(rng, lane), rng.expovariate(1 / AGENT_THINK) + 0.5))
        chains.append(Chain(f"agent{a}", rng.uniform(0, AGENT_STAGGER), steps))
    return chains


def closed_loop(chains: list[Chain], policy: str,
                fixed: list[tuple[float, str, str, float]] = ()) -> SimResult:
    """Simulate closed-loop clients (plus the open-loop arrivals ``fixed``) on top of
    simulate() (see the module docstring)."""
    arrivals: list[tuple[float, str, str, float]] = list(fixed)
    position = {c.name: 0 for c in chains}
    last_id: dict[str, str] = {}
    for c in chains:
        lane, service, _think = c.steps[0]
        rid = f"{c.name}-0"
        arrivals.append((c.start, rid, lane, service))
        last_id[c.name] = rid
    while True:
        result = simulate([LanePolicy(n) for n in LANES], arrivals, settings=SETTINGS,
                          start_seconds=START_SECONDS, stop_seconds=STOP_SECONDS,
                          policy=BASELINES.get(policy, policy))
        pending = []  # (next arrival, end of previous, chain)
        for c in chains:
            nxt = position[c.name] + 1
            if nxt >= len(c.steps):
                continue
            rec = result.requests[last_id[c.name]]
            end = rec.finish if rec.finish is not None else rec.reject
            if end is not None:
                pending.append((end + c.steps[nxt][2], end, c))
        if not pending:
            return result
        earliest = min(p[0] for p in pending)
        for when, end, c in pending:
            if end < earliest:  # its end cannot change by arrivals at or after `earliest`
                position[c.name] += 1
                lane, service, _think = c.steps[position[c.name]]
                rid = f"{c.name}-{position[c.name]}"
                arrivals.append((when, rid, lane, service))
                last_id[c.name] = rid


def hammer_arrivals(seed: int, lanes: tuple[str, ...] = LANES) -> list[tuple[float, str, str, float]]:
    rng = random.Random(seed * 1000 + 2)
    out = []
    end = HAMMER_MINUTES * 60.0
    for i, lane in enumerate(lanes):
        t = float(i)  # orchestrator's client first, then coder, then fast_rag
        n = 0
        while t < end:
            out.append((t, f"{lane}-{n}", lane, service_time(rng, lane)))
            n += 1
            t += 2.0 * rng.uniform(0.5, 1.5)
    return out


def bursty_arrivals(seed: int) -> list[tuple[float, str, str, float]]:
    rng = random.Random(seed * 1000 + 3)
    out = []
    end = BURSTY_MINUTES * 60.0
    t, n = 0.0, 0
    while True:  # background trickle
        t += rng.expovariate(1 / 20.0)
        if t >= end:
            break
        lane = rng.choice(LANES)
        out.append((t, f"t{n}", lane, service_time(rng, lane)))
        n += 1
    t, b = 0.0, 0
    while True:  # bursts
        t += rng.expovariate(1 / 120.0)
        if t >= end:
            break
        lane = rng.choice(LANES)
        for k in range(rng.randint(5, 25)):
            out.append((t + rng.uniform(0, 10), f"b{b}-{k}", lane, service_time(rng, lane)))
        b += 1
    return out


SHORT = {"agent_loop": "(a) agent loop", "hammer": "(b) 3 clients hammering", "bursty": "(c) bursty mixed",
         "agent_batch": "(d) agents + batch job"}
WORKLOADS = {
    "agent_loop": "(a) agent loop: 6 agents, orchestrator -> coder -> orchestrator -> fast_rag, think ~20 s",
    "hammer": "(b) three clients each hammering its own lane (a request every 2 s +- 50 %)",
    "bursty": "(c) bursty mixed: trickle every ~20 s plus bursts of 5-25 requests for one lane",
    "agent_batch": "(d) 3 agents as in (a) beside a batch job hammering the coder lane",
}


def run_workload(workload: str, seed: int, policy: str) -> SimResult:
    if workload == "agent_loop":
        return closed_loop(agent_chains(seed), policy)
    if workload == "agent_batch":
        return closed_loop(agent_chains(seed, agents=3), policy, hammer_arrivals(seed, ("coder",)))
    arrivals = hammer_arrivals(seed) if workload == "hammer" else bursty_arrivals(seed)
    return simulate([LanePolicy(n) for n in LANES], arrivals, settings=SETTINGS,
                    start_seconds=START_SECONDS, stop_seconds=STOP_SECONDS, policy=BASELINES.get(policy, policy))


# ------------------------------------------------------------------ measures


def wait_bound(max_service: float) -> float:
    """The configured bound (README, tests/test_scheduler_properties.py): switch_max_wait plus,
    for each of the lanes, drain + stop + start, the drain lasting at most min(drain_timeout,
    longest service time)."""
    drain = min(SETTINGS.drain_timeout, max_service)
    return SETTINGS.switch_max_wait + len(LANES) * (drain + STOP_SECONDS + START_SECONDS)


def run_measures(result: SimResult) -> dict:
    recs = list(result.requests.values())
    finished = [r for r in recs if r.outcome == "finished"]
    waits = [r.wait for r in recs if r.wait is not None]
    first = min(r.arrival for r in recs)
    last = max(r.finish for r in finished)
    makespan = last - first
    max_service = max(r.service for r in recs)
    # per request: wait <= W + K * (D + S + T), K = engine loads during its wait
    drain = min(SETTINGS.drain_timeout, max_service)
    violations = 0
    for r in recs:
        if r.wait is None:
            continue
        k = result.readies_between(r.arrival, r.dispatch)
        if r.wait > SETTINGS.switch_max_wait + k * (drain + STOP_SECONDS + START_SECONDS) + 1e-6:
            violations += 1
    return {
        "requests": len(recs),
        "outcomes": result.outcomes(),
        "switches": max(0, result.switch_count - 1),  # engine loads after the first
        "wait_mean": sum(waits) / len(waits),
        "wait_p50": percentile(waits, 50),
        "wait_p99": percentile(waits, 99),
        "wait_max": max(waits),
        "makespan_seconds": makespan,
        "throughput_per_hour": len(finished) / makespan * 3600.0,
        "switching_seconds": result.switching_seconds,
        "switching_fraction": result.switching_seconds / makespan,
        "max_service": max_service,
        "bound": wait_bound(max_service),
        "per_request_bound_violations": violations,
    }


def timeline_of(result: SimResult) -> dict:
    """What a plot needs: lane state intervals and the number of requests waiting over time."""
    states = [(t, lane, new) for t, lane, _old, new, _reason in result.timeline]
    # result.end_time can be a far timer tick (queue_timeout is "infinite"): end at the last finish
    last = max(r.finish for r in result.requests.values() if r.finish is not None)
    events = []
    for r in result.requests.values():
        events.append((r.arrival, 1, r.lane))
        end = r.dispatch if r.dispatch is not None else (r.reject if r.reject is not None else last)
        events.append((end, -1, r.lane))
    events.sort(key=lambda e: (e[0], e[1]))
    depth = {lane: 0 for lane in LANES}
    waiting = []
    for t, delta, lane in events:
        depth[lane] += delta
        waiting.append((t, lane, depth[lane]))
    return {"states": [s for s in states if s[0] <= last], "waiting": waiting, "end": last}


def run() -> dict:
    out = {"settings": {
        "lanes": LANES, "policies": POLICIES, "start_seconds": START_SECONDS, "stop_seconds": STOP_SECONDS,
        "switch_seconds": SWITCH_SECONDS, "switch_max_wait": SETTINGS.switch_max_wait,
        "drain_timeout": SETTINGS.drain_timeout, "queue_timeout": "none (1e9)",
        "service_lognormal_median_sigma": SERVICE, "service_clip": SERVICE_CLIP, "seeds": SEEDS,
        "agents": AGENTS, "agent_cycles": AGENT_CYCLES, "hammer_minutes": HAMMER_MINUTES,
        "bursty_minutes": BURSTY_MINUTES},
        "workloads": {}, "waits": {}, "timelines": {}}
    for workload, description in WORKLOADS.items():
        per_policy = {}
        for policy in POLICIES:
            runs, waits = [], []
            for seed in SEEDS:
                result = run_workload(workload, seed, policy)
                measures = run_measures(result)
                measures["seed"] = seed
                runs.append(measures)
                waits.extend(r.wait for r in result.requests.values() if r.wait is not None)
                if seed == SEEDS[0] and workload in ("hammer", "agent_batch"):
                    out["timelines"].setdefault(workload, {})[policy] = timeline_of(result)
            per_policy[policy] = {
                "summary": {
                    "switches": spread([r["switches"] for r in runs])["median"],
                    "wait_mean": sum(waits) / len(waits),
                    "wait_p99": percentile(waits, 99),
                    "wait_max": max(r["wait_max"] for r in runs),
                    "throughput_per_hour": spread([r["throughput_per_hour"] for r in runs])["median"],
                    "switching_seconds": spread([r["switching_seconds"] for r in runs])["median"],
                    "switching_fraction": spread([r["switching_fraction"] for r in runs])["median"],
                    "bound_min": min(r["bound"] for r in runs),
                    "runs_over_bound": sum(r["wait_max"] > r["bound"] + 1e-6 for r in runs),
                    "per_request_bound_violations": sum(r["per_request_bound_violations"] for r in runs),
                },
                "runs": runs,
            }
            out["waits"].setdefault(workload, {})[policy] = sorted(waits)
            s = per_policy[policy]["summary"]
            log(f"scheduling {workload:10s} {policy:10s} switches {s['switches']:5.0f}  wait mean "
                f"{s['wait_mean']:7.1f} p99 {s['wait_p99']:7.1f} max {s['wait_max']:7.1f} s  "
                f"thr {s['throughput_per_hour']:6.0f}/h  switching {100 * s['switching_fraction']:4.1f} %")
        out["workloads"][workload] = {"description": description, "short": SHORT[workload], "policies": per_policy}
    hammer = out["workloads"]["hammer"]["policies"]
    ours, llama = hammer["scheduler"]["summary"], hammer["llama_swap"]["summary"]
    out["acceptance"] = {
        "bound": ours["bound_min"],
        "scheduler_max_wait": ours["wait_max"],
        "llama_swap_max_wait": llama["wait_max"],
        "scheduler_within_bound": ours["runs_over_bound"] == 0,
        "llama_swap_within_bound": llama["runs_over_bound"] == 0,
        "holds": ours["runs_over_bound"] == 0 and llama["runs_over_bound"] > 0,
    }
    log(f"acceptance (hammer): ours max {ours['wait_max']:.1f} s, llama_swap max {llama['wait_max']:.1f} s, "
        f"bound {ours['bound_min']:.1f} s -> {'holds' if out['acceptance']['holds'] else 'DOES NOT HOLD'}")
    return out

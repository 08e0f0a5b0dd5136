"""Part 1: proxy overhead, the same engine reached directly and through `vllm-launcher serve`.

One engine process serves both paths: the server starts it (its lane's engine), and the
benchmark reaches it directly on its port.  For that the engine interpreter is a small
wrapper (VLLM_ENGINE_PYTHON) that drops the per-start API key from the engine's environment
(so the direct path needs no key; the server's Authorization header is then ignored) and
pins the engine's CPUs with taskset.  The server runs under another wrapper that pins it;
the client (this process) pins itself.

Per repeat and per scenario the two paths run back to back, the order alternating between
repeats: non-streaming latency at concurrency 1 and 32 (and requests/s at 32), streaming
time to first data event (TTFB) and data events (chunks) per second.  Ratios through/direct
are taken per repeat; the JSON has every repeat, the summary their median and range.  The
front server's CPU time (utime + stime of its process, /proc/<pid>/stat) over each
through-scenario gives CPU seconds per request.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .common import (QUICK, TESTS, WORK, log, percentile, pin_self, proc_cpu_seconds, spread,
                     taskset_prefix, write_wrapper)

ENGINE_PORT_RE = r"lane {lane}: starting engine \(attempt \d+\) on 127\.0\.0\.1:(\d+)"
SCENARIOS = ("c1", "c32", "stream")


@dataclass
class Sizes:
    repeats: int
    c1: int
    c32: int
    stream: int
    max_tokens: int = 16
    stream_tokens: int = 64
    warmup: int = 5


FAKE_SIZES = Sizes(repeats=3, c1=60, c32=320, stream=20) if QUICK else Sizes(repeats=7, c1=150, c32=960, stream=40)
REAL_SIZES = (Sizes(repeats=2, c1=6, c32=32, stream=3, warmup=2) if QUICK
              else Sizes(repeats=5, c1=20, c32=128, stream=8, warmup=3))
PINS_FAKE = {"client": "0", "engine": "0", "server": "1"}
PINS_REAL = {"client": "0", "engine": "0,1", "server": "1"}


# ------------------------------------------------------------------ wrappers


def server_python(directory: Path, cpus: str | None) -> Path:
    """An interpreter for `start_server(python=...)`: this Python pinned to CPUS."""
    return write_wrapper(directory / "server-python", [f"exec {taskset_prefix(cpus)}{sys.executable} \"$@\""])


def engine_python(directory: Path, cpus: str | None, fake: bool) -> Path:
    """VLLM_ENGINE_PYTHON: the engine without its API key (reachable directly), pinned."""
    target = f"{sys.executable} {TESTS / 'fake_engine.py'}" if fake else sys.executable
    return write_wrapper(directory / ("fake-engine-python" if fake else "engine-python"),
                         ["unset VLLM_API_KEY", f"exec {taskset_prefix(cpus)}{target} \"$@\""])


def engine_port(log_text: str, lane: str) -> int:
    ports = re.findall(ENGINE_PORT_RE.format(lane=re.escape(lane)), log_text)
    if not ports:
        raise RuntimeError(f"no engine port for lane {lane} in the server log")
    return int(ports[-1])


# ------------------------------------------------------------------ client


def body(model: str, max_tokens: int, stream: bool) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Say something about lanes."}],
            "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": stream}


async def nonstream(client: httpx.AsyncClient, url: str, payload: dict, n: int, concurrency: int):
    """n requests by `concurrency` workers; returns (latencies, elapsed seconds)."""
    latencies: list[float] = []
    remaining = n

    async def worker():
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            response = await client.post(url, json=payload)
            await response.aread()
            if response.status_code != 200:
                raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]}")
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


async def streamed(client: httpx.AsyncClient, url: str, payload: dict) -> dict:
    """One streaming request: first byte, first data event, data events per second."""
    t0 = time.perf_counter()
    first_byte = first_data = None
    chunks = 0
    async with client.stream("POST", url, json=payload) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]}")
        async for line in response.aiter_lines():
            now = time.perf_counter()
            if first_byte is None:
                first_byte = now - t0
            if line.startswith("data:") and line.strip() != "data: [DONE]":
                if first_data is None:
                    first_data = now - t0
                chunks += 1
    total = time.perf_counter() - t0
    rate = (chunks - 1) / (total - first_data) if chunks > 1 and total > first_data else None
    return {"first_byte": first_byte, "ttfb": first_data, "chunks": chunks, "chunks_per_second": rate,
            "total": total}


async def scenario(client: httpx.AsyncClient, url: str, model: str, name: str, sizes: Sizes) -> dict:
    if name == "c1":
        lat, elapsed = await nonstream(client, url, body(model, sizes.max_tokens, False), sizes.c1, 1)
        return {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "requests": len(lat)}
    if name == "c32":
        lat, elapsed = await nonstream(client, url, body(model, sizes.max_tokens, False), sizes.c32, 32)
        return {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "rps": len(lat) / elapsed,
                "requests": len(lat)}
    runs = [await streamed(client, url, body(model, sizes.stream_tokens, True)) for _ in range(sizes.stream)]
    return {"ttfb": percentile([r["ttfb"] for r in runs], 50),
            "chunks_per_second": percentile([r["chunks_per_second"] for r in runs if r["chunks_per_second"]], 50),
            "requests": len(runs)}


METRICS = {"c1": ("p50", "p99"), "c32": ("p50", "p99", "rps"), "stream": ("ttfb", "chunks_per_second")}


async def compare(direct_base: str, through_base: str, model: str, server_pid: int, sizes: Sizes,
                  label: str) -> dict:
    """Alternate the two paths; returns every repeat plus ratio summaries."""
    # Idle connections are dropped after 2 s, before the servers' 5 s keep-alive closes them
    # (reusing a connection the server is closing gives ReadError on a POST).
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=2.0)
    timeout = httpx.Timeout(300.0)
    path = "/v1/chat/completions"
    repeats = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        for base in (direct_base, through_base):  # warm-up, connections and caches
            await nonstream(client, base + path, body(model, sizes.max_tokens, False), sizes.warmup, 1)
            await streamed(client, base + path, body(model, sizes.stream_tokens, True))
        for rep in range(sizes.repeats):
            order = ("direct", "through") if rep % 2 == 0 else ("through", "direct")
            row: dict = {"order": order}
            for name in SCENARIOS:
                for which in order:
                    base = direct_base if which == "direct" else through_base
                    cpu0 = proc_cpu_seconds(server_pid)
                    result = await scenario(client, base + path, model, name, sizes)
                    cpu1 = proc_cpu_seconds(server_pid)
                    result["server_cpu_seconds"] = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
                    result["server_cpu_per_request"] = (result["server_cpu_seconds"] / result["requests"]
                                                        if result["server_cpu_seconds"] is not None else None)
                    row.setdefault(which, {})[name] = result
            row["ratio"] = {name: {m: row["through"][name][m] / row["direct"][name][m]
                                   for m in METRICS[name]
                                   if row["through"][name].get(m) and row["direct"][name].get(m)}
                            for name in SCENARIOS}
            repeats.append(row)
            r = row["ratio"]
            log(f"{label} repeat {rep + 1}/{sizes.repeats}: c1 p50 x{r['c1'].get('p50', 0):.2f} "
                f"c32 rps x{r['c32'].get('rps', 0):.2f} stream ttfb x{r['stream'].get('ttfb', 0):.2f} "
                f"(c1 p50 direct {1000 * row['direct']['c1']['p50']:.1f} ms, "
                f"through {1000 * row['through']['c1']['p50']:.1f} ms)")
    return {"repeats": repeats, "summary": summarize(repeats), "sizes": sizes.__dict__}


def summarize(repeats: list[dict]) -> dict:
    out = {}
    for name in SCENARIOS:
        for m in METRICS[name]:
            key = f"{name}_{m}"
            out[key] = {
                "direct": spread([r["direct"][name].get(m) for r in repeats]),
                "through": spread([r["through"][name].get(m) for r in repeats]),
                "ratio": spread([r["ratio"][name].get(m) for r in repeats]),
            }
        out[f"{name}_server_cpu_per_request"] = spread(
            [r["through"][name]["server_cpu_per_request"] for r in repeats])
        out[f"{name}_server_cpu_per_request_direct_path"] = spread(
            [r["direct"][name]["server_cpu_per_request"] for r in repeats])
    return out


def measure_through_server(served, lane: str, sizes: Sizes, pins: dict, label: str) -> dict:
    """Run compare() against a started server (tests/serving.py) and its lane's engine."""
    port = engine_port(served.log(), lane)
    previous = pin_self(pins.get("client"))
    try:
        result = asyncio.run(compare(f"http://127.0.0.1:{port}", served.url, lane, served.process.pid, sizes, label))
    finally:
        import os

        os.sched_setaffinity(0, previous)
    result["pins"] = pins
    return result


# ------------------------------------------------------------------ fake engine


def run_fake() -> dict:
    from serving import fake_lanes_env, serving

    directory = WORK / "overhead-fake"
    directory.mkdir(parents=True, exist_ok=True)
    pins = PINS_FAKE
    env = fake_lanes_env(engine_python(directory, pins["engine"], fake=True), {"fake": {}},
                         VLLM_LOG_LEVEL="INFO")
    env["VLLM_LANE_FAKE_ENV_FAKE_TOKEN_DELAY"] = "0"
    log("overhead: fake engine, direct vs through the server")
    with serving(directory, env, wait_ready_lane="fake", python=str(server_python(directory, pins["server"]))) as served:
        result = measure_through_server(served, "fake", FAKE_SIZES, pins, "fake")
    return result

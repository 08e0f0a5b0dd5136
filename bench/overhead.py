"""Part 1: proxy overhead, one engine reached directly, through `vllm-launcher serve`, and
through LiteLLM's proxy (a peer, in a venv of its own: bench/litellm_peer.py).

One engine process serves every path.  Fake engine: the server starts it as its lane's engine
(VLLM_ENGINE_PYTHON runs bench/shared_fake_engine.py), and it listens both where the server tells it
and on a loopback port of the benchmark's choosing, which the direct path and LiteLLM use.
Real engine (bench/real.py): the server's lane engine, reached directly at its address.  The
servers run pinned (taskset) to one CPU, the client (this process) and the engine to another.

Per repeat and per scenario the paths run back to back, their order rotating between repeats:
non-streaming latency at concurrency 1 and 32 (and requests/s at 32), streaming time to first
data event and data events (chunks) per second.  Ratios path/direct are taken per repeat; the
JSON has every repeat, the summary their median, range and quartiles.  Each proxy's CPU time
(utime + stime of its process tree, psutil) over its scenario gives CPU seconds per request:
the figure the machine's other load disturbs least.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from . import litellm_peer
from .common import QUICK, WORK, log, percentile, pin_self, spread, taskset_prefix, write_wrapper
from .processes import free_port, lanes_env, serving, tree_cpu_seconds

SCENARIOS = ("c1", "c32", "stream")
PROXIES = ("ours", "litellm")


@dataclass
class Sizes:
    repeats: int
    c1: int
    c32: int
    stream: int
    max_tokens: int = 16
    stream_tokens: int = 128
    warmup: int = 20


FAKE_SIZES = Sizes(repeats=3, c1=100, c32=640, stream=20) if QUICK else Sizes(repeats=7, c1=300, c32=1920, stream=60)
REAL_SIZES = (Sizes(repeats=2, c1=6, c32=32, stream=3, stream_tokens=64, warmup=2) if QUICK
              else Sizes(repeats=5, c1=20, c32=128, stream=8, stream_tokens=64, warmup=3))
PINS_FAKE = {"client": "0", "engine": "0", "server": "1"}
PINS_REAL = {"client": "0", "engine": "0,1", "server": "1"}
# What issue 12 asks of our proxy against the fake engine (figures of the summary).
GOALS = {"added_c1_p50": ("at most", 0.0005), "c32_rps_ratio": ("at least", 0.7),
         "stream_chunks_ratio": ("at least", 0.9), "cpu_per_request": ("at most", 0.0004)}


@dataclass(frozen=True)
class Target:
    """One way to the engine: a base URL, optionally over a Unix socket, and the pid whose
    process tree is the proxy (None: direct)."""
    name: str
    base: str
    pid: int | None = None
    uds: str | None = None


# ------------------------------------------------------------------ wrappers


def server_python(directory: Path, cpus: str | None) -> Path:
    """An interpreter for the server: this Python pinned to CPUS."""
    return write_wrapper(directory / "server-python", [f"exec {taskset_prefix(cpus)}{sys.executable} \"$@\""])


def engine_python(directory: Path, cpus: str | None, direct_port: int | None = None) -> Path:
    """VLLM_ENGINE_PYTHON, pinned: the real engine without its API key (reachable directly), or
    with DIRECT_PORT the benchmark's fake engine (bench/shared_fake_engine.py) that also listens there."""
    if direct_port:
        script = Path(__file__).resolve().parent / "shared_fake_engine.py"
        target = f"{sys.executable} {script} --direct-port {direct_port}"
    else:
        target = sys.executable
    return write_wrapper(directory / ("fake-engine-python" if direct_port else "engine-python"),
                         ["unset VLLM_API_KEY", f"exec {taskset_prefix(cpus)}{target} \"$@\""])


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
            "chunks": percentile([r["chunks"] for r in runs], 50), "requests": len(runs)}


METRICS = {"c1": ("p50", "p99"), "c32": ("p50", "p99", "rps"), "stream": ("ttfb", "chunks_per_second")}


def _client(path: Target) -> httpx.AsyncClient:
    # Idle connections are dropped after 2 s, before the servers' 5 s keep-alive closes them
    # (reusing a connection the server is closing gives ReadError on a POST).
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=2.0)
    transport = httpx.AsyncHTTPTransport(uds=path.uds, limits=limits) if path.uds else None
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0), transport=transport, trust_env=False)


async def _measure(client: httpx.AsyncClient, path: Target, model: str, name: str, sizes: Sizes) -> dict:
    cpu0 = tree_cpu_seconds(path.pid) if path.pid else None
    result = await scenario(client, path.base + "/v1/chat/completions", model, name, sizes)
    cpu1 = tree_cpu_seconds(path.pid) if path.pid else None
    if cpu0 is not None and cpu1 is not None:
        result["cpu_seconds"] = cpu1 - cpu0
        result["cpu_per_request"] = (cpu1 - cpu0) / result["requests"]
    return result


async def compare(paths: list[Target], model: str, sizes: Sizes, label: str) -> dict:
    """Every path per scenario, the order rotating between repeats; returns every repeat and
    the summaries (ratios against paths[0], the direct path)."""
    direct = paths[0].name
    clients = {path.name: _client(path) for path in paths}
    repeats = []
    try:
        for path in paths:  # warm-up: connections, caches
            client = clients[path.name]
            await nonstream(client, path.base + "/v1/chat/completions", body(model, sizes.max_tokens, False),
                            sizes.warmup, 4)
            await streamed(client, path.base + "/v1/chat/completions", body(model, sizes.stream_tokens, True))
        for rep in range(sizes.repeats):
            order = paths[rep % len(paths):] + paths[:rep % len(paths)]
            if rep // len(paths) % 2:
                order.reverse()
            row: dict = {"order": [p.name for p in order]}
            for name in SCENARIOS:
                for path in order:
                    row.setdefault(path.name, {})[name] = await _measure(clients[path.name], path, model, name, sizes)
            row["ratio"] = {p.name: {name: {m: row[p.name][name][m] / row[direct][name][m] for m in METRICS[name]
                                            if row[p.name][name].get(m) and row[direct][name].get(m)}
                                     for name in SCENARIOS} for p in paths[1:]}
            row["added"] = {p.name: {"c1_p50": row[p.name]["c1"]["p50"] - row[direct]["c1"]["p50"]}
                            for p in paths[1:]}
            repeats.append(row)
            log(f"{label} repeat {rep + 1}/{sizes.repeats}: " + "; ".join(
                f"{p.name}: c1 p50 +{1000 * row['added'][p.name]['c1_p50']:.2f} ms, "
                f"c32 rps x{row['ratio'][p.name]['c32'].get('rps', 0):.2f}, "
                f"chunks/s x{row['ratio'][p.name]['stream'].get('chunks_per_second', 0):.2f}, cpu/req "
                f"{1000 * (row[p.name]['c32'].get('cpu_per_request') or 0):.2f} ms" for p in paths[1:]))
    finally:
        for client in clients.values():
            await client.aclose()
    return {"repeats": repeats, "paths": [p.name for p in paths], "summary": summarize(repeats, paths),
            "sizes": sizes.__dict__}


def summarize(repeats: list[dict], paths: list[Target]) -> dict:
    """Per metric: each path's spread over repeats, and each proxy's ratio to direct
    ("ratio" is ours, "ratio_<proxy>" the others); per proxy and scenario CPU per request."""
    proxies = [p.name for p in paths[1:]]
    out: dict = {}
    for name in SCENARIOS:
        for m in METRICS[name]:
            entry = {p.name: spread([r[p.name][name].get(m) for r in repeats]) for p in paths}
            for proxy in proxies:
                key = "ratio" if proxy == "ours" else f"ratio_{proxy}"
                entry[key] = spread([r["ratio"][proxy][name].get(m) for r in repeats])
            out[f"{name}_{m}"] = entry
        for proxy in proxies:
            out[f"{name}_cpu_per_request_{proxy}"] = spread([r[proxy][name].get("cpu_per_request") for r in repeats])
    for proxy in proxies:
        out[f"added_c1_p50_{proxy}"] = spread([r["added"][proxy]["c1_p50"] for r in repeats])
    if "ours" in proxies:
        out["goals"] = goals(out)
    return out


def goals(summary: dict) -> dict:
    """Issue 12's goals for our proxy, each with the median figure and whether it is met."""
    figures = {"added_c1_p50": summary["added_c1_p50_ours"]["median"],
               "c32_rps_ratio": summary["c32_rps"]["ratio"]["median"],
               "stream_chunks_ratio": summary["stream_chunks_per_second"]["ratio"]["median"],
               "cpu_per_request": summary["c32_cpu_per_request_ours"]["median"]}
    out = {}
    for key, (how, limit) in GOALS.items():
        value = figures[key]
        met = None if value is None else (value <= limit if how == "at most" else value >= limit)
        out[key] = {"value": value, "goal": f"{how} {limit}", "limit": limit, "met": met}
    return out


def measure(paths: list[Target], model: str, sizes: Sizes, pins: dict, label: str) -> dict:
    previous = pin_self(pins.get("client"))
    try:
        result = asyncio.run(compare(paths, model, sizes, label))
    finally:
        os.sched_setaffinity(0, previous)
    result["pins"] = pins
    return result


# ------------------------------------------------------------------ fake engine


def run_fake() -> dict:
    """The fake engine reached directly, through our server and through LiteLLM."""
    directory = WORK / "overhead-fake"
    directory.mkdir(parents=True, exist_ok=True)
    pins = PINS_FAKE
    litellm_peer.ensure_installed()
    direct_port = free_port()
    env = lanes_env(engine_python(directory, pins["engine"], direct_port), {"fake": {"ENV_FAKE_TOKEN_DELAY": "0"}},
                    VLLM_LOG_LEVEL="WARNING")
    direct = f"http://127.0.0.1:{direct_port}"
    log("overhead: fake engine, direct vs ours vs LiteLLM")
    with serving(directory, env, ready_lane="fake", python=str(server_python(directory, pins["server"]))) as served:
        litellm, litellm_url = litellm_peer.start(directory / "litellm", direct + "/v1", "fake", pins["server"])
        try:
            paths = [Target("direct", direct), Target("ours", served.url, served.started.pid),
                     Target("litellm", litellm_url, litellm.pid)]
            result = measure(paths, "fake", FAKE_SIZES, pins, "fake")
        finally:
            litellm.stop(grace=10.0)
    result["litellm_version"] = litellm_peer.version()
    return result

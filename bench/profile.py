"""Where the front server's CPU goes per request: py-spy samples the server (pinned to one CPU)
while the benchmark's client sends non-streaming requests at concurrency 32 (or streams) to
the fake engine through it, and the samples are summed by the package of the innermost frame
(self time) and by a few entry points (inclusive time).  Only the main thread (the event loop) counts:
asyncio's child watcher thread waits in waitpid, which py-spy may sample as running.  py-spy is installed into
bench/.work/tools on first use; it is not a dependency of the project.

    .venv/bin/python -m bench.profile [LABEL] [--stream] [--seconds N]

writes bench/results/profile-LABEL.json (the shares, CPU per request) and prints a table; the
raw samples stay in bench/.work/profile/.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import subprocess
import sys
import time

from .common import RESULTS, WORK, log, pin_self
from .overhead import PINS_FAKE, body, engine_python, server_python, streamed
from .processes import free_port, lanes_env, serving, tree_cpu_seconds

TOOLS = WORK / "tools"
# innermost frame's file -> what it is; the first pattern that matches wins
# innermost frame -> what it is; the first pattern that matches wins.  IDLE: the event loop
# waiting for events (asyncio's epoll, or uvloop's native loop, which py-spy sees as the frame
# that entered it): not CPU, left out of the shares.
IDLE = "idle: the event loop waiting (epoll)"
PACKAGES = [(r"\((?:.*/)?selectors\.py", IDLE), (r"^Runner\.run \((?:.*/)?asyncio/runners\.py", IDLE),
            (r"\.(write|send)\w* \((?:.*/)?asyncio/selector_events", "socket send (the loopback path, in the syscall)"),
            (r"\.(_read_ready\w*|recv\w*) \((?:.*/)?asyncio/selector_events", "socket receive"),
            (r"^RequestResponseCycle\.send \(", "uvicorn: writing the answer (socket send, loopback path)"),
            *[(rf"\((?:.*/)?{package}{'' if package.endswith('py') else '/'}", name) for package, name in (
                ("asyncio", "event loop: asyncio's own Python code"),
                ("httpcore", "httpcore (upstream client: connection pool, HTTP/1.1)"),
                ("h11", "h11 (pure-Python HTTP/1.1 for httpcore)"), ("httpx", "httpx (upstream client)"),
                ("anyio", "anyio (httpcore's async backend)"), ("sniffio", "sniffio"),
                ("aiohttp", "aiohttp (upstream client)"), ("yarl", "aiohttp (upstream client)"),
                ("multidict", "aiohttp (upstream client)"), ("fastapi", "FastAPI (routing, dependency solving)"),
                ("starlette", "Starlette (middlewares, request, responses)"),
                ("uvicorn", "uvicorn (HTTP server protocol)"), ("httptools", "uvicorn (HTTP server protocol)"),
                ("prometheus_client", "prometheus_client (metrics)"), ("json", "JSON"), ("orjson", "JSON"),
                ("msgspec", "JSON"), ("logging", "logging"),
                ("vllm_launcher/limits\\.py", "launcher: connection limits (limits.py)"),
                ("vllm_launcher/(?:router|scheduler|metrics)\\.py", "launcher: router, scheduler, metrics"),
                ("vllm_launcher", "launcher: request handler and proxy"))]]
ENTRY_POINTS = {
    "upstream client: AsyncClient.send": r"AsyncClient\.send \(",
    "upstream client: aiohttp request": r"ClientSession\._request",
    "ASGI app below uvicorn": r"ProxyHeadersMiddleware\.__call__|RequestResponseCycle\.run_asgi",
    "FastAPI/Starlette middlewares and routing": r"ServerErrorMiddleware\.__call__",
    "launcher: request handler": r"openai_post|handle_openai|OpenAIRoute",
    "launcher: router (admit/dispatch/finish)": r"Router\.(admit|finish|cancel|_dispatch)",
    "metrics labels()": r"MetricWrapperBase\.labels",
    "JSON parse/serialise": r"json/(decoder|encoder)\.py|loads|dumps",
}


def ensure_pyspy() -> str:
    command = TOOLS / "bin" / "py-spy"
    if not command.exists():
        log("installing py-spy into bench/.work/tools")
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS)], check=True)
        subprocess.run([str(TOOLS / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install",
                        "py-spy"], check=True)
    return str(command)


async def load(url: str, model: str, seconds: float, stream: bool) -> int:
    import httpx

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=2.0)
    end = time.monotonic() + seconds
    count = 0
    async with httpx.AsyncClient(limits=limits, timeout=60.0, trust_env=False) as client:
        async def worker():
            nonlocal count
            while time.monotonic() < end:
                if stream:
                    await streamed(client, url, body(model, 128, True))
                else:
                    response = await client.post(url, json=body(model, 16, False))
                    await response.aread()
                    response.raise_for_status()
                count += 1
        await asyncio.gather(*(worker() for _ in range(4 if stream else 32)))
    return count


def summarize(raw: str) -> dict:
    self_time: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if "threading.py" in frames[0]:
            continue
        leaf = frames[-1]
        total += n
        kind = next((name for pattern, name in PACKAGES if re.search(pattern, leaf)), "other")
        self_time[kind] += n
        if kind == IDLE:
            continue
        for name, pattern in ENTRY_POINTS.items():
            if any(re.search(pattern, frame) for frame in frames):
                inclusive[name] += n
    busy = total - self_time.pop(IDLE, 0)
    return {"samples": total, "busy_samples": busy,
            "self": {k: v / busy for k, v in self_time.most_common()} if busy else {},
            "inclusive": {k: v / busy for k, v in inclusive.most_common()} if busy else {}}


def run(label: str, seconds: float, stream: bool) -> dict:
    pyspy = ensure_pyspy()
    directory = WORK / "profile"
    directory.mkdir(parents=True, exist_ok=True)
    direct_port = free_port()
    env = lanes_env(engine_python(directory, PINS_FAKE["engine"], direct_port), {"fake": {"ENV_FAKE_TOKEN_DELAY": "0"}},
                    VLLM_LOG_LEVEL="WARNING")
    raw_path = directory / f"{label}.txt"
    previous = pin_self(PINS_FAKE["client"])
    try:
        with serving(directory, env, ready_lane="fake", python=str(server_python(directory, PINS_FAKE["server"]))) as s:
            url = s.url + "/v1/chat/completions"
            asyncio.run(load(url, "fake", 3, stream))                          # warm-up
            cpu0 = tree_cpu_seconds(s.started.pid)
            spy = subprocess.Popen([pyspy, "record", "--pid", str(s.started.pid), "--duration", str(int(seconds)),
                                    "--rate", "200", "--format", "raw", "--output", str(raw_path), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            requests = asyncio.run(load(url, "fake", seconds, stream))
            cpu1 = tree_cpu_seconds(s.started.pid)
            spy.wait()
    finally:
        import os

        os.sched_setaffinity(0, previous)
    result = {"label": label, "stream": stream, "seconds": seconds, "requests": requests,
              "cpu_per_request": (cpu1 - cpu0) / requests if requests else None, **summarize(raw_path.read_text())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"profile-{label}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def resummarize(label: str) -> dict:
    """The stored result of LABEL with its shares computed again from bench/.work/profile."""
    path = RESULTS / f"profile-{label}.json"
    result = json.loads(path.read_text())
    result.update(summarize((WORK / "profile" / f"{label}.txt").read_text()))
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def show(result: dict) -> str:
    lines = [f"profile {result['label']}: {result['requests']} requests, "
             f"{1000 * (result['cpu_per_request'] or 0):.2f} ms server CPU per request, {result['samples']} samples "
             f"({result.get('busy_samples')} busy)", "share of the busy samples by the innermost frame:"]
    lines += [f"  {100 * share:5.1f} %  {name}" for name, share in result["self"].items()]
    lines.append("inclusive:")
    lines += [f"  {100 * share:5.1f} %  {name}" for name, share in result["inclusive"].items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("label", nargs="?", default="c32")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--from-raw", action="store_true", help="only summarise the stored samples again")
    args = parser.parse_args(argv)
    print(show(resummarize(args.label) if args.from_raw else run(args.label, args.seconds, args.stream)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

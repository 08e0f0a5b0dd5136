"""Chaos (issue 23 acceptance): 48 clients on three co-resident lanes whose fake engines crash
at every 20th to 40th request (FAKE_CRASH_EVERY: the engine exits when that request arrives,
taking every request in flight with it). No lane is ever `failed`; every request is answered,
or ends in an OpenAI error (or a stream's SSE error event) that names the crash."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
import pytest

from serving import CHAT, chat_body, fake_lanes_env, metric_samples, serving, value

pytestmark = pytest.mark.engine

LANES = ("a", "b", "c")
CLIENTS = 48
REQUESTS = 1500             # in all; about a minute here (2 cores, three engines, 48 clients)
BOUND = 240.0               # seconds the run may take at most
CRASH = "exited with status 9"


async def one(client: httpx.AsyncClient, lane: str, stream: bool) -> str:
    """One request's outcome: "ok", or "crash: <code>" for an error naming the crash, else the
    error itself (which fails the test)."""
    body = chat_body(lane, stream=stream, max_tokens=4)
    if not stream:
        answer = await client.post(CHAT, json=body)
        if answer.status_code == 200:
            return "ok" if answer.json()["choices"][0]["message"]["content"] else f"empty: {answer.text}"
        error = answer.json().get("error", {})
        return f"crash: {error.get('code')}" if CRASH in error.get("message", "") else f"{answer.status_code} {answer.text}"
    async with client.stream("POST", CHAT, json=body) as answer:
        text = (await answer.aread()).decode()
    if answer.status_code != 200:
        error = json.loads(text).get("error", {})
        return f"crash: {error.get('code')}" if CRASH in error.get("message", "") else f"{answer.status_code} {text}"
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    errors = [event["error"] for event in events if "error" in event]
    if errors:
        return f"crash: stream {errors[0].get('code')}" if CRASH in errors[0].get("message", "") else f"event {errors}"
    return "ok" if text.rstrip().endswith("data: [DONE]") else f"cut: {text[-300:]}"


async def chaos(url: str) -> tuple[Counter, float]:
    outcomes: Counter = Counter()
    sent = 0
    began = time.monotonic()

    async def client_loop(index: int) -> None:
        nonlocal sent
        async with httpx.AsyncClient(base_url=url, timeout=120.0) as client:
            while sent < REQUESTS and time.monotonic() - began < BOUND:
                sent += 1
                outcomes[await one(client, LANES[(index + sent) % 3], stream=sent % 2 == 0)] += 1

    await asyncio.gather(*(client_loop(i) for i in range(CLIENTS)))
    return outcomes, time.monotonic() - began


def test_engines_crashing_every_20_to_40_requests_never_fail_a_lane(tmp_path, fake_python):
    lanes = {lane: {"GPU_MEMORY_UTILIZATION": "0.3", "ENV_FAKE_CRASH_EVERY": "20-40",
                    "ENV_FAKE_TOKEN_DELAY": "0.01"} for lane in LANES}
    env = fake_lanes_env(fake_python, lanes, VLLM_GPU_MEMORY_BUDGET="0.9", VLLM_ENGINE_MAX_RESTARTS="5")
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        outcomes, seconds = asyncio.run(chaos(served.url))
        states = {lane: shown["state"] for lane, shown in served.lanes().items()}
        with served.client() as client:
            samples = metric_samples(client.get("/metrics").text)
        log = served.log()
    answered = outcomes["ok"]
    crashed = sum(n for outcome, n in outcomes.items() if outcome.startswith("crash: "))
    restarts = sum(value(samples, "vllm_launcher_engine_restarts_total", lane=lane) for lane in LANES)
    print(f"chaos: {sum(outcomes.values())} requests in {seconds:.1f} s, {answered} answered, {crashed} ended in "
          f"an error naming the crash ({dict(outcomes)}); {restarts:.0f} engine restarts; lanes {states}")
    assert answered + crashed == sum(outcomes.values()) >= REQUESTS, outcomes
    assert restarts >= 10 and crashed > 0, (restarts, outcomes)          # the engines did crash, often
    assert "failed" not in states.values(), states
    assert "-> failed" not in log, [line for line in log.splitlines() if "-> failed" in line][:5]
    assert not any(reason == "lane_failed" for (name, labels), _ in samples.items()
                   if name == "vllm_launcher_requests_rejected_total" for key, reason in labels if key == "reason")
